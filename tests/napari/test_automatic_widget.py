"""The automatic-segmentation widget: worker runs, live thresholds, cancel, errors and stacks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.draw import disk

from napari_cellseg.core import automatic as auto
from napari_cellseg.core.models import random_model
from napari_cellseg.core.progress import Progress

pytestmark = pytest.mark.gui

widget_module = pytest.importorskip("napari_cellseg._napari.automatic_widget")
AutomaticWidget = widget_module.AutomaticWidget


def _cells(shape=(96, 96)):
    rng = np.random.default_rng(0)
    image = rng.normal(0.1, 0.02, shape)
    for c, r in (((30, 30), 12), ((65, 60), 15)):
        rr, cc = disk(c, r, shape=shape)
        image[rr, cc] += 0.6
    return image.astype(np.float32)


def _confident_tiny_model():
    model = random_model("vit_test", seed=0)
    model.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data += 1.0
    return model


def _count_calls(model):
    calls = []
    model.sam.image_encoder.register_forward_hook(lambda *a: calls.append("encoder"))
    # the IoU head runs once per decoder call, in the stock decoder and in the batch decoder of grid mode
    model.sam.mask_decoder.iou_prediction_head.register_forward_hook(lambda *a: calls.append("decoder"))
    return calls


@pytest.fixture
def setup(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = AutomaticWidget(viewer, debounce_ms=1)
    return viewer, widget


def _select_mode(widget, mode):
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData(mode))


def test_grid_run_creates_a_new_labels_layer_and_sliders_do_not_call_the_network(setup, qtbot):
    viewer, widget = setup
    viewer.add_image(_cells(), name="cells")
    user_layer = viewer.add_labels(np.zeros((96, 96), np.int32), name="cells grid labels")  # the user's own
    model = _confident_tiny_model()
    calls = _count_calls(model)
    widget.set_model(model)
    _select_mode(widget, "grid")
    widget.points_spin.setValue(4)
    widget.max_area_spin.setValue(100)
    widget.sliders["probability"].setValue(0.5)
    widget.sliders["stability"].setValue(0.0)
    widget.run_button.click()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    out = widget.output_layer()
    assert out is not None and out is not user_layer
    assert out.name.startswith("cells grid labels") and out.data.shape == (96, 96)
    assert not user_layer.data.any()  # never written
    assert widget.progress.value() == 1000
    assert "cells" in widget.status.text() or "lower" in widget.status.text()
    n_calls = len(calls)
    assert n_calls == 5  # one encoder pass, 16 prompts in 4 decoder batches of 4
    # slider moves re-run only the post-processing and update the same layer
    before = out.data.copy()
    widget.sliders["probability"].setValue(1.0)
    qtbot.waitUntil(lambda: widget.last_relabel_ms > 0, timeout=5000)
    assert out.data.max() == 0 and "lower the probability threshold" in widget.status.text()
    widget.sliders["probability"].setValue(0.5)
    widget.apply_thresholds()
    assert np.array_equal(out.data, before)
    # the run drew masks only above its floor (0.5 here): lower values say that a new run is needed
    widget.sliders["probability"].setValue(0.3)
    widget.apply_thresholds()
    assert "run again" in widget.status.text() and np.array_equal(out.data, before)
    widget.sliders["probability"].setValue(0.5)
    widget.apply_thresholds()
    assert "run again" not in widget.status.text()
    assert len(calls) == n_calls
    assert widget.output_layer() is out and len(viewer.layers) == 3
    # a second run updates the same layer
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    assert widget.output_layer() is out and len(viewer.layers) == 3


def test_distance_mode_with_a_distance_model_and_live_peak(setup, qtbot):
    viewer, widget = setup
    viewer.add_image(_cells((120, 100)), name="img")
    model = auto.as_distance_model(random_model("vit_test", seed=2))
    calls = _count_calls(model)
    widget.set_model(model)
    _select_mode(widget, "distance")
    widget.min_size_spin.setValue(0)
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    out = widget.output_layer()
    assert out is not None and out.name == "img distance labels"
    dmap = widget._results[0].distance_map
    n = len(calls)
    # choose a peak inside the map's range: a real change of the labels, without the network
    widget.sliders["fill"].setValue(0.0)
    widget.sliders["peak"].setValue(float(np.round(np.quantile(dmap, 0.5), 2)))
    ms = widget.apply_thresholds()
    assert out.data.max() > 0
    assert len(calls) == n
    assert ms < 1000


def test_zoom_reaches_the_distance_map_and_the_labels_keep_the_image_size(setup, qtbot, monkeypatch):
    viewer, widget = setup
    viewer.add_image(_cells((120, 100)), name="img")
    seen = []
    real = auto.crop_distance_maps
    monkeypatch.setattr(auto, "crop_distance_maps",
                        lambda model, crops: seen.extend(c.shape[:2] for c in crops) or real(model, crops))
    widget.set_model(auto.as_distance_model(random_model("vit_test", seed=2)))
    _select_mode(widget, "distance")
    assert widget.auto_zoom_check.isChecked() and not widget.scale_spin.isEnabled()  # the default: estimated
    assert widget.thresholds()["scale"] == "auto"
    widget.auto_zoom_check.setChecked(False)
    assert widget.scale_spin.isEnabled() and widget.scale_spin.value() == 1.0
    widget.scale_spin.setValue(2.5)
    assert widget.thresholds()["scale"] == 2.5
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    out = widget.output_layer()
    assert out is not None and out.data.shape == (120, 100)
    assert widget._results[0].distance_map.shape == (120, 100)
    # the 120 x 100 image was zoomed to 300 x 250: more than one 256 px crop
    assert len(seen) > 1 and all(shape == (256, 256) for shape in seen)
    n = len(seen)
    widget.scale_spin.setValue(0.5)  # a new zoom is not applied until Run: the status says so
    assert "press Run to map the image at zoom 0.5" in widget.status.text() and len(seen) == n
    widget.scale_spin.setValue(2.5)
    assert "press Run" not in widget.status.text()
    widget.zoom_views_check.setChecked(True)  # test-time augmentation over zoom: one more map at 2.5 x 1.25
    assert widget.thresholds()["zoom_views"] == (1.25,)
    n = len(seen)
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    # the 120 x 100 image at zoom 2.5 (300 x 250: 2 crops of 256 px, as above) and at 3.125 (375 x 313: 4 more)
    assert len(seen) - n == 6 and widget.output_layer().data.shape == (120, 100)
    _select_mode(widget, "grid")
    assert not widget.scale_spin.isEnabled() and "scale" not in widget.thresholds()
    assert not widget.zoom_views_check.isEnabled() and "zoom_views" not in widget.thresholds()


def test_auto_zoom_maps_again_at_the_estimated_zoom_and_shows_it(setup, qtbot, monkeypatch):
    """The "auto" box sends ``scale="auto"`` to the core: six cells 40 px across, for a model whose training
    nuclei were 9-31 px, are mapped again at about zoom 0.5; the spin box then shows that zoom and the status
    line says what was measured."""
    from scipy import ndimage as ndi

    viewer, widget = setup
    shape = (240, 240)
    labels = np.zeros(shape, np.int32)
    for k, (r, c) in enumerate([(40, 40), (40, 120), (40, 200), (150, 40), (150, 120), (150, 200)], start=1):
        rr, cc = disk((r, c), 20, shape=shape)
        labels[rr, cc] = k
    viewer.add_image(np.where(labels > 0, 0.8, 0.05).astype(np.float32), name="img")
    dist = ndi.distance_transform_edt(labels > 0)
    cell_map = np.zeros(shape, np.float32)
    for k in range(1, 7):
        cell_map[labels == k] = dist[labels == k] / dist[labels == k].max()
    zooms = []

    def fake_map(image, model, config=None, channel=None, image01=None):  # the cells' own map, at any zoom
        zooms.append(config.scale)
        yield Progress(1, 1, "distance map")
        return cell_map.copy()

    monkeypatch.setattr(auto, "predict_distance_map", fake_map)
    model = auto.as_distance_model(random_model("vit_test", seed=2))
    model.meta["cell_diameters"] = {"fluorescence": {"p10": 9.0, "median": 20.0, "p90": 31.4}}
    widget.set_model(model)
    _select_mode(widget, "distance")
    assert widget.auto_zoom_check.isChecked()  # the default
    assert not widget.scale_spin.isEnabled() and widget.thresholds()["scale"] == "auto"
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    est = widget._results[0].size_estimate
    # measured at zoom 1 (the watershed's cells, about 37 px), mapped again at 20 / 37, measured there: settled
    assert 0.5 <= est.scale <= 0.58 and zooms == [1.0, est.scale] and [p[0] for p in est.passes] == zooms
    assert widget.scale_spin.value() == est.scale and not widget.scale_spin.isEnabled()
    assert f"6 cells (distance mode); zoom {est.scale:g}: cells of {est.passes[0][1]:.0f} px at zoom 1" in \
        widget.status.text()
    assert widget.output_layer().data.max() == 6
    widget.auto_zoom_check.setChecked(False)  # the estimate is where the user's own zoom starts
    assert widget.scale_spin.isEnabled() and widget.thresholds()["scale"] == est.scale
    widget.scale_spin.setValue(0.75)
    assert "press Run to map the image at zoom 0.75" in widget.status.text()


def test_guided_mode_with_orientations_runs_one_encoder_pass_per_orientation(setup, qtbot):
    viewer, widget = setup
    viewer.add_image(_cells((120, 100)), name="img")
    model = auto.as_distance_model(random_model("vit_test", seed=2))
    widget.set_model(model)
    _select_mode(widget, "distance")
    assert not widget.views_combo.isEnabled() and "views" not in widget.thresholds()
    _select_mode(widget, "guided")
    assert widget.views_combo.isEnabled() and widget.thresholds()["views"] == 1
    widget.sliders["peak"].setValue(0.0)  # the random model's map has regions: cells for SAM to draw
    widget.sliders["fill"].setValue(0.0)
    calls = _count_calls(model)
    passes = {}
    for views in (1, 4):
        widget.views_combo.setCurrentIndex(widget.views_combo.findData(views))
        assert widget.thresholds()["views"] == views
        calls.clear()
        widget.run()
        qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
        assert widget.output_layer() is not None and widget.output_layer().name == "img guided labels"
        passes[views] = calls.count("encoder")
    assert passes[4] - passes[1] == 3, passes  # the drawing crop in 3 more orientations; the map once
    assert widget.invert_check.isEnabled() and widget.thresholds()["invert"] is False
    widget.invert_check.setChecked(True)  # each of the 4 orientations also as its negative
    calls.clear()
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    assert calls.count("encoder") - passes[4] == 4
    _select_mode(widget, "distance")
    assert not widget.invert_check.isEnabled() and "invert" not in widget.thresholds()


def test_distance_mode_with_a_plain_model_reports_what_to_do(setup, qtbot, monkeypatch):
    viewer, widget = setup
    viewer.add_image(_cells(), name="cells")
    errors = []
    monkeypatch.setattr(widget_module, "show_error", errors.append)
    widget.set_model(random_model("vit_test"))
    _select_mode(widget, "distance")
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    assert errors and "Fine-tune one with the distance recipe, or use grid mode" in errors[0]
    assert widget.output_layer() is None
    # the distance box marks a checkpoint such as SAMCell's as a distance model
    widget.distance_check.setChecked(True)
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)
    assert widget.output_layer() is not None


def test_cancel_stops_the_worker_and_reenables_the_controls(setup, qtbot, monkeypatch):
    viewer, widget = setup
    viewer.add_image(_cells(), name="cells")
    widget.set_model(random_model("vit_test"))

    def endless(*args, **kwargs):
        i = 0
        while True:
            time.sleep(0.01)
            i += 1
            yield Progress(i % 100, 100, "working")

    monkeypatch.setattr(widget_module.auto, "segment_steps", endless)
    widget.run()
    qtbot.waitUntil(lambda: widget.status.text() == "working", timeout=10000)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10000)
    assert widget.status.text() == "cancelled"
    assert widget.output_layer() is None and len(viewer.layers) == 1


def test_stack_current_plane_and_all_planes_on_copies(setup, qtbot, monkeypatch):
    viewer, widget = setup
    stack = np.stack([_cells(), _cells()[::-1], _cells()[:, ::-1]])
    layer = viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 2)
    seen = []

    def fake(plane, model, mode, config, prompt_model=None):
        seen.append(plane)
        yield Progress(1, 1, "one plane")
        labels = np.zeros(plane.shape, np.int32)
        labels[plane > 0.5] = 1
        return auto.GridResult("grid", labels, thresholds=dict(
            probability=0.8, stability=0.6, nms_iou=0.05, min_area=20, max_area_fraction=0.1))

    monkeypatch.setattr(widget_module.auto, "segment_steps", fake)
    widget.set_model(random_model("vit_test"))
    _select_mode(widget, "grid")
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30000)
    out = widget.output_layer()
    assert out.data.shape == (3, 96, 96)
    assert out.data[2].any() and not out.data[0].any() and not out.data[1].any()
    assert len(seen) == 1 and np.array_equal(seen[0], stack[2])
    assert not np.shares_memory(seen[0], layer.data)
    widget.all_planes_check.setChecked(True)
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30000)
    assert len(seen) == 4 and all(out.data[i].any() for i in range(3))
    assert widget.output_layer() is out
    assert "3 planes" in widget.status.text()


def test_model_entry_follows_the_session(setup):
    from napari_cellseg._napari.session import session_for

    from napari_cellseg.core.models import DEFAULT_MODEL

    viewer, widget = setup
    assert widget.model_combo.itemText(0) == f"session: {DEFAULT_MODEL}"
    session_for(viewer).select("vit_b")
    assert widget.model_combo.itemText(0) == "session: vit_b"


def test_no_image_layer_is_an_error_not_a_crash(setup, monkeypatch):
    viewer, widget = setup
    errors = []
    monkeypatch.setattr(widget_module, "show_error", errors.append)
    widget.run()
    assert errors and "add an image layer" in errors[0]
    assert widget.run_button.isEnabled()
