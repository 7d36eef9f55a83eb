"""The fine-tuning widget trains a tiny model in a worker, shows progress, cancels, saves and selects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cellseg._napari.finetune_widget import REGION_EXTENT, FinetuneWidget
from napari_cellseg._napari.session import session_for
from napari_cellseg.core import models

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""


@pytest.fixture
def viewer_with_cells(make_napari_viewer, tmp_path):
    from conftest import make_cells

    viewer = make_napari_viewer()
    image, labels = make_cells(shape=(96, 96), n=8, radius=(6, 11))
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    ckpt = tmp_path / "tiny.pth"
    torch.save(models.random_model("vit_test").sam.state_dict(), ckpt)
    session_for(viewer).select(str(ckpt), "cpu")
    return viewer, image, labels, str(ckpt)


def test_widget_defaults_follow_the_viewer(viewer_with_cells):
    viewer, _, _, ckpt = viewer_with_cells
    widget = FinetuneWidget(viewer)
    assert widget.image_combo.currentText() == "cells"
    assert widget.labels_combo.currentText() == "cells labels"
    assert widget.base_combo.currentText() == ckpt  # the session's model
    assert widget.recipe_combo.currentData() == "distance"  # the recipe that pays in minutes on a CPU
    assert widget.name_edit.text() == "cells-distance"
    viewer.add_labels(np.zeros((96, 96), np.uint8), name="more")
    assert widget.labels_combo.findText("more") >= 0


def test_train_in_a_worker_then_cancel_keeps_the_best(viewer_with_cells, qtbot):
    viewer, image, labels, ckpt = viewer_with_cells
    widget = FinetuneWidget(viewer)
    widget.recipe_combo.setCurrentIndex(widget.recipe_combo.findData("prompt"))
    widget.budget_combo.setCurrentText("epochs")
    widget.epochs_spin.setValue(100000)
    widget.region_combo.setCurrentText(REGION_EXTENT)
    widget.name_edit.setText("gui-cells")
    viewer.layers["cells labels"].data[0, 0] = 0  # the worker got a copy: later edits do not matter
    widget.train_btn.click()
    assert not widget.train_btn.isEnabled() and widget.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: len(widget.plot.losses) >= 3, timeout=120000)
    widget.cancel_btn.click()
    qtbot.waitUntil(lambda: widget.train_btn.isEnabled(), timeout=60000)
    assert not widget.cancel_btn.isEnabled()
    assert "cancelled: saved 'gui-cells'" in widget.status.text()
    assert session_for(viewer).model_name == "gui-cells"
    entry = models.catalogue()["gui-cells"]
    assert entry.source == "adapter" and entry.base == ckpt
    model = models.load_model("gui-cells", device="cpu")
    assert model.meta["output"] == "mask" and model.meta["metrics"]["steps"] >= 3
    # the new model is offered as a base for further training
    assert widget.base_combo.findText("gui-cells") >= 0


def test_a_short_run_finishes_saves_and_selects(viewer_with_cells, qtbot):
    viewer, _, _, _ = viewer_with_cells
    widget = FinetuneWidget(viewer)
    widget.recipe_combo.setCurrentIndex(widget.recipe_combo.findData("distance"))
    widget.budget_combo.setCurrentText("epochs")
    widget.epochs_spin.setValue(2)
    assert widget.name_edit.text() == "cells-distance"
    widget.train_btn.click()
    qtbot.waitUntil(lambda: widget.train_btn.isEnabled(), timeout=120000)
    assert "finished: saved 'cells-distance'" in widget.status.text()
    assert session_for(viewer).model_name == "cells-distance"
    assert models.catalogue()["cells-distance"].capabilities == ("distance",)


def _train_until_refused(viewer, qtbot, labels_name: str, errors: list) -> FinetuneWidget:
    """Start a one-epoch run on the labels layer ``labels_name``; wait until it has stopped with an error."""
    widget = FinetuneWidget(viewer)
    widget.labels_combo.setCurrentText(labels_name)
    widget.budget_combo.setCurrentText("epochs")
    widget.epochs_spin.setValue(1)
    widget.train_btn.click()
    qtbot.waitUntil(lambda: widget.train_btn.isEnabled() and bool(errors), timeout=60000)
    return widget


def test_bad_input_shows_an_error_and_reenables(viewer_with_cells, qtbot, monkeypatch):
    viewer, _, _, _ = viewer_with_cells
    errors = []
    monkeypatch.setattr("napari_cellseg._napari.finetune_widget.show_error", errors.append)
    viewer.add_labels(np.zeros((96, 96), np.uint16), name="empty")
    widget = _train_until_refused(viewer, qtbot, "empty", errors)
    assert "no cells" in errors[-1]
    assert not (models.cache_dir() / "adapters").exists()
    # a name that exists is refused before anything starts
    widget.labels_combo.setCurrentText("cells labels")
    widget.name_edit.setText("litemedsam")
    widget.train_btn.click()
    assert "built-in model" in errors[-1] and widget.train_btn.isEnabled()


def test_cells_painted_with_one_label_are_refused_and_the_layer_is_kept(viewer_with_cells, qtbot, monkeypatch):
    """Every cell painted with label 1 (no new label between cells): the worker stops with a message that says how
    to fix it, nothing is saved, and the user's layer is as it was."""
    viewer, _, labels, _ = viewer_with_cells
    errors = []
    monkeypatch.setattr("napari_cellseg._napari.finetune_widget.show_error", errors.append)
    painted = (labels > 0).astype(np.uint16)
    layer = viewer.add_labels(painted.copy(), name="one label")
    _train_until_refused(viewer, qtbot, "one label", errors)
    assert "share the label 1" in errors[-1] and "press M" in errors[-1]
    assert not (models.cache_dir() / "adapters").exists()
    np.testing.assert_array_equal(layer.data, painted)


def test_encoder_lora_in_the_last_blocks_from_the_widget(viewer_with_cells, qtbot):
    import json

    viewer, _, _, _ = viewer_with_cells
    widget = FinetuneWidget(viewer)
    assert not widget.encoder_blocks_spin.isEnabled()  # only with the encoder LoRA ticked
    widget.encoder_check.setChecked(True)
    assert widget.encoder_blocks_spin.isEnabled() and widget.encoder_blocks_spin.text() == "every block"
    widget.encoder_blocks_spin.setValue(1)
    widget.budget_combo.setCurrentText("epochs")
    widget.epochs_spin.setValue(1)
    widget.name_edit.setText("gui-tail")
    widget.train_btn.click()
    assert not widget.encoder_blocks_spin.isEnabled()  # locked while training
    qtbot.waitUntil(lambda: widget.train_btn.isEnabled(), timeout=120000)
    assert "finished: saved 'gui-tail'" in widget.status.text(), widget.status.text()
    assert widget.encoder_blocks_spin.isEnabled()
    meta = json.loads((models.cache_dir() / "adapters" / "gui-tail.json").read_text())
    assert meta["config"]["encoder_lora"] is True and meta["config"]["encoder_lora_blocks"] == 1
