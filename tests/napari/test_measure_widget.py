"""The Measure widget: features table, summary, histogram and CSV export through a real worker."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def two_cells():
    labels = np.zeros((40, 60), np.uint16)
    labels[5:15, 5:15] = 3  # 100 px
    labels[5:15, 17:37] = 8  # 200 px, 2 px away from cell 3
    labels[30:35, 50:55] = 12  # 25 px, alone
    return labels


@pytest.fixture
def widget(make_napari_viewer):
    from napari_cellseg._napari.measure_widget import MeasureWidget

    viewer = make_napari_viewer()
    return viewer, MeasureWidget(viewer)


def test_measure_fills_features_and_summary(widget, qtbot):
    viewer, w = widget
    labels = two_cells()
    image = np.zeros(labels.shape, np.float32)
    image[labels == 8] = 4.0
    viewer.add_image(image, name="signal")
    layer = viewer.add_labels(labels, name="cells")
    assert w.labels_combo.currentText() == "cells"
    w.image_combo.setCurrentText("signal")
    w.distance_spin.setValue(1)

    qtbot.mouseClick(w.measure_button, pytest.importorskip("qtpy.QtCore").Qt.LeftButton)
    assert not w.measure_button.isEnabled()
    qtbot.waitUntil(lambda: "label" in layer.features.columns, timeout=20000)
    qtbot.waitUntil(w.measure_button.isEnabled, timeout=5000)

    f = layer.features
    assert f["label"].tolist() == [3, 8, 12] and f["index"].tolist() == [3, 8, 12]
    assert f["area"].tolist() == [100.0, 200.0, 25.0]
    assert f["n_neighbors"].tolist() == [1, 1, 0]
    assert f["mean_intensity"].tolist() == [0.0, 4.0, 0.0]
    assert f["aspect_ratio"].tolist() == pytest.approx([1.0, 2.0, 1.0], rel=1e-12)
    text = w.summary_label.text()
    assert "3 cells" in text and "mean area 108.3 px²" in text and "median 100 px²" in text
    assert f"confluency {100 * 325 / 2400:.1f} %" in text and "mean neighbours 0.67" in text
    assert w.histogram_label.pixmap() is not None and not w.histogram_label.pixmap().isNull()
    assert w.export_button.isEnabled()
    # napari finds each cell's row through the 'index' column
    assert layer._label_index == {3: 0, 8: 1, 12: 2}


def test_physical_units_and_export(widget, qtbot, tmp_path):
    from napari_cellseg.core.measure import read_csv

    viewer, w = widget
    layer = viewer.add_labels(two_cells(), name="cells", scale=(0.5, 0.5), units=("um", "um"))
    assert w.measure() is not None
    # the worker may finish before a waitSignal could connect: wait on its visible effect instead
    qtbot.waitUntil(w.measure_button.isEnabled, timeout=20000)
    assert layer.features["area"].tolist() == [25.0, 50.0, 6.25]
    assert "µm²" in w.summary_label.text()

    target = tmp_path / "cells.csv"
    w.ask_save_path = lambda: str(target)  # instead of the file dialog
    qtbot.mouseClick(w.export_button, pytest.importorskip("qtpy.QtCore").Qt.LeftButton)
    back = read_csv(target)
    assert back["label"].tolist() == [3, 8, 12]
    assert back["area"].tolist() == [25.0, 50.0, 6.25]
    np.testing.assert_array_equal(back["perimeter"], layer.features["perimeter"].to_numpy())

    w.ask_save_path = lambda: ""  # dialog cancelled: nothing written
    assert w.export_csv() is None


def test_errors_reenable_the_button(widget, qtbot, monkeypatch):
    import napari_cellseg._napari.measure_widget as mw

    viewer, w = widget
    viewer.add_labels(two_cells(), name="cells")
    shown = []
    monkeypatch.setattr(mw, "show_error", lambda msg: shown.append(msg))

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(mw.measure, "measure_cells", broken)
    assert w.measure() is not None
    qtbot.waitUntil(w.measure_button.isEnabled, timeout=20000)
    qtbot.waitUntil(lambda: bool(shown), timeout=5000)
    assert "boom" in shown[0]
    assert w.measure_button.isEnabled() and w.summary_label.text() == "measuring failed"


def test_nothing_to_measure_and_3d(widget, monkeypatch):
    import napari_cellseg._napari.measure_widget as mw

    viewer, w = widget
    infos, errors = [], []
    monkeypatch.setattr(mw, "show_info", infos.append)
    monkeypatch.setattr(mw, "show_error", errors.append)
    assert w.measure() is None and infos
    assert w.export_csv() is None
    viewer.add_labels(np.zeros((3, 10, 10), np.uint8), name="stack")
    assert w.measure() is None and "2D" in errors[-1]
    assert w.measure_button.isEnabled()


def test_layer_combos_follow_the_viewer(widget):
    viewer, w = widget
    viewer.add_labels(two_cells(), name="first")
    viewer.add_image(np.zeros((40, 60)), name="img")
    viewer.add_labels(two_cells(), name="second")
    assert [w.labels_combo.itemText(i) for i in range(w.labels_combo.count())] == ["first", "second"]
    assert [w.image_combo.itemText(i) for i in range(w.image_combo.count())] == ["(none)", "img"]
    viewer.layers["first"].name = "renamed"
    assert "renamed" in [w.labels_combo.itemText(i) for i in range(w.labels_combo.count())]
    viewer.layers.remove("second")
    assert [w.labels_combo.itemText(i) for i in range(w.labels_combo.count())] == ["renamed"]
