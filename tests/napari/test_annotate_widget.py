"""The annotation widget driven in a real napari viewer (run under xvfb-run)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_cellseg._napari.annotate_widget import NEW_LAYER, SHORTCUTS, AnnotationWidget
from napari_cellseg._napari.session import session_for

pytestmark = pytest.mark.gui

TIMEOUT = 60000


def _cells():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_cells

    return make_cells()


@pytest.fixture
def setup(make_napari_viewer, qtbot, tiny_vit):
    """A viewer with an image and a pre-existing Labels layer (as a Cellpose output would be)."""
    image, labels = _cells()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    existing = np.zeros_like(labels, dtype=np.uint16)
    existing[labels == 1] = 5  # one cell already annotated, with a non-consecutive id
    existing[labels == 2] = 9
    target = viewer.add_labels(existing, name="cellpose")
    widgets = []

    def make(loader=None, **kwargs):
        w = AnnotationWidget(viewer, model_loader=loader or (lambda: tiny_vit), debounce_ms=10, **kwargs)
        viewer.window.add_dock_widget(w, name="annotate")
        widgets.append(w)
        return w

    yield viewer, make, image, labels, target
    for w in widgets:
        if w._worker is not None:
            w.cancel()
            qtbot.waitUntil(lambda w=w: w._worker is None, timeout=TIMEOUT)
        w.close()


def _centroid(labels, k):
    rr, cc = np.nonzero(labels == k)
    return float(rr.mean()), float(cc.mean())


def _bbox(labels, k):
    rr, cc = np.nonzero(labels == k)
    return rr.min(), cc.min(), rr.max() + 1, cc.max() + 1


def _rectangle(r0, c0, r1, c1):
    # napari vertices sit at pixel centres: pixels r0..r1-1 span [r0 - 0.5, r1 - 0.5]
    return np.array([[r0 - 0.5, c0 - 0.5], [r0 - 0.5, c1 - 0.5], [r1 - 0.5, c1 - 0.5], [r1 - 0.5, c0 - 0.5]])


def _select_target(widget, layer):
    combo = widget.target_combo
    combo.setCurrentIndex(next(i for i in range(combo.count()) if combo.itemData(i) is layer))


def _messages():
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def _preview_ready(widget):
    return bool(widget._worker is None and widget._current and widget._result_generation == widget._generation)


def test_point_gives_a_live_preview_and_commit_goes_into_an_existing_layer_undoably(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    _select_target(widget, target)
    before = target.data.copy()
    widget._activate_points()
    assert viewer.layers.selection.active is widget._points_layer
    widget._points_layer.add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    preview = widget._preview_layer
    assert preview is not None and preview.data.any()
    assert "previewed" in widget.status.text()
    assert widget.target_combo.currentData() is target  # the combo holds the layer itself
    assert all(widget.target_combo.itemData(i) is not preview for i in range(widget.target_combo.count()))

    widget.commit()
    assert target.data.max() == 10  # new id = max + 1
    new = target.data == 10
    assert new.any()
    # existing labels are kept (overlap policy: only background pixels are written)
    assert np.array_equal(target.data[before != 0], before[before != 0])
    assert np.array_equal(target.data[~new], before[~new])
    assert len(widget._points_layer.data) == 0  # prompts cleared
    assert not widget._preview_layer.data.any()
    assert target.selected_label == 11
    assert "committed 1 object" in widget.status.text()

    target.undo()
    assert np.array_equal(target.data, before)


def test_boxes_and_overwrite(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    _select_target(widget, target)
    before = target.data.copy()
    widget._activate_boxes()
    widget._boxes_layer.add_rectangles(_rectangle(*_bbox(labels, 1)))
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    assert len(widget._current) == 1
    obj = widget._current[0]
    assert obj.area > 0
    assert widget.threshold_spin.text() == "model default" and widget.config.mask_threshold is None
    widget.threshold_spin.setValue(-4.0)  # larger masks, from the cached embedding
    qtbot.waitUntil(lambda: _preview_ready(widget) and widget._current[0] is not obj, timeout=TIMEOUT)
    assert widget.config.mask_threshold == -4.0 and "embedded" not in widget.status.text()
    bigger = widget._current[0]
    assert (bigger.to_full(image.shape) >= obj.to_full(image.shape)).all()
    obj = bigger
    widget.overwrite_check.setChecked(True)
    widget.commit()
    mask = obj.to_full(image.shape)
    assert (target.data[mask] == 10).all()  # overwrite: the object takes all its pixels, over label 5
    assert len(widget._boxes_layer.data) == 0
    target.undo()
    assert np.array_equal(target.data, before)


def test_orientations_show_a_first_answer_then_the_average(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    _select_target(widget, target)
    assert widget.views_combo.currentData() is None and widget.config.views is None  # auto: 1 on this CPU
    assert widget.invert_combo.currentData() is None and widget.config.invert is None  # auto: on, a small model
    widget.views_combo.setCurrentIndex(widget.views_combo.findData(4))
    assert widget.config.views == 4
    seen = []
    widget._on_progress = (lambda orig: lambda request, record: (seen.append(record), orig(request, record)))(
        widget._on_progress)
    widget._activate_boxes()
    widget._boxes_layer.add_rectangles(_rectangle(*_bbox(labels, 3)))
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    early = [r for r in seen if r.data and "objects" in r.data and "one view" in r.message]
    assert early, [r.message for r in seen]  # one orientation's answer was shown first
    assert any("inverted contrast" in r.message for r in seen)
    seg = widget._segmenter
    obj = widget._current[0]
    codes = seg.view_codes()
    assert len(codes) == 8 and all(seg.key_for(obj.window, v) in seg.cache for v in codes)  # 4 orientations x 2
    before = target.data.copy()
    widget.commit()
    assert (target.data[obj.to_full(image.shape) & (before == 0)] == 10).all()
    widget.invert_combo.setCurrentIndex(widget.invert_combo.findData(False))
    assert widget.config.invert is False
    widget._boxes_layer.add_rectangles(_rectangle(*_bbox(labels, 4)))
    qtbot.waitUntil(lambda: _preview_ready(widget) and widget._segmenter.config.invert is False, timeout=TIMEOUT)
    assert widget._segmenter.view_codes() == [0, 1, 2, 3]


def test_several_boxes_and_one_object_per_point_commit_several_objects(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    _select_target(widget, target)
    widget.per_point_check.setChecked(True)
    widget._points().add([_centroid(labels, k) for k in (3, 4, 5)])
    qtbot.waitUntil(lambda: _preview_ready(widget) and len(widget._current) == 3, timeout=TIMEOUT)
    widget.commit()
    assert set(np.unique(target.data)) >= {0, 5, 9, 10, 11, 12}
    # several boxes: one object each, one undo step for all
    before = target.data.copy()
    widget.per_point_check.setChecked(False)
    widget._boxes().add_rectangles([_rectangle(*_bbox(labels, k)) for k in (6, 7)])
    qtbot.waitUntil(lambda: _preview_ready(widget) and len(widget._current) == 2, timeout=TIMEOUT)
    widget.commit()
    assert {13, 14} <= set(np.unique(target.data))
    target.undo()
    assert np.array_equal(target.data, before)


def test_negative_points_toggle_and_new_layer_target(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    widget.target_combo.setCurrentIndex(widget.target_combo.findText(NEW_LAYER))
    points = widget._points()
    points.add([_centroid(labels, 3)])
    widget.toggle_sign()
    assert widget.sign_btn.isChecked() and "Negative" in widget.sign_btn.text()
    points.add([_centroid(labels, 4)])
    assert list(points.features["positive"]) == [True, False]
    colours = np.asarray(points.face_color)
    assert colours[0, 1] > colours[0, 0] and colours[1, 0] > colours[1, 1]  # green, then red
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    widget.commit()
    created = [layer for layer in viewer.layers if layer.name.startswith("annotations (cellseg)")]
    assert len(created) == 1 and created[0].data.max() == 1, (widget.status.text(), [l.name for l in viewer.layers])
    assert np.array_equal(target.data[target.data > 0], target.data[target.data > 0])  # untouched
    widget.toggle_sign()
    assert widget._positive


def test_next_object_keeps_objects_for_one_commit(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    _select_target(widget, target)
    widget._points().add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    widget.next_object()
    assert len(widget._pending) == 1 and len(widget._points_layer.data) == 0
    widget._points_layer.add([_centroid(labels, 6)])
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    widget.commit()
    assert {10, 11} <= set(np.unique(target.data))
    assert not widget._pending


def test_shortcuts_are_bound_with_tooltips_and_removed_on_close(setup, qtbot):
    from napari.utils.key_bindings import coerce_keybinding

    viewer, make, image, labels, target = setup
    widget = make()
    for action, (key, _) in SHORTCUTS.items():
        assert coerce_keybinding(key) in viewer.keymap
    assert "Shift+C" in widget.commit_btn.toolTip() and "Shift+S" in widget.segment_btn.toolTip()
    assert "Shift+T" in widget.sign_btn.toolTip() and "Shift+N" in widget.next_btn.toolTip()
    assert "Shift+X" in widget.clear_btn.toolTip()
    # the bound callables drive the widget
    viewer.keymap[coerce_keybinding("Shift-T")](viewer)
    assert not widget._positive
    widget.close()
    for action, (key, _) in SHORTCUTS.items():
        assert coerce_keybinding(key) not in viewer.keymap
    # closing the dock (napari un-parents the widget) unbinds them too, and gives back an earlier binding
    def mine(v):
        return None

    viewer.bind_key("Shift-N", mine, overwrite=True)
    other = make()
    assert viewer.keymap[coerce_keybinding("Shift-N")] is not mine
    viewer.window.remove_dock_widget(other)
    assert other._closed
    assert viewer.keymap[coerce_keybinding("Shift-N")] is mine
    assert coerce_keybinding("Shift-C") not in viewer.keymap
    viewer.bind_key("Shift-N", None)


class _Gate:
    """A model loader that blocks until released: a slow run to act on mid-way."""

    def __init__(self, model):
        self.model = model
        self.event = threading.Event()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if not self.event.wait(30):
            raise RuntimeError("gate never opened")
        return self.model


def test_cancel_stops_the_run(setup, qtbot, tiny_vit):
    viewer, make, image, labels, target = setup
    gate = _Gate(tiny_vit)
    widget = make(loader=gate)
    widget._points().add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: widget._worker is not None and gate.calls == 1, timeout=TIMEOUT)
    assert widget.cancel_btn.isEnabled() and not widget.progress.isHidden()
    widget.cancel()
    gate.event.set()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
    assert widget.status.text() == "cancelled"
    assert widget._preview_layer is None or not widget._preview_layer.data.any()
    assert not widget.cancel_btn.isEnabled()
    # a later request works
    widget.segment()
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)


def test_removing_the_target_layer_mid_run_gives_a_message_not_a_traceback(setup, qtbot, tiny_vit):
    viewer, make, image, labels, target = setup
    gate = _Gate(tiny_vit)
    widget = make(loader=gate)
    _select_target(widget, target)
    before = target.data.copy()
    widget.live_check.setChecked(False)
    widget._points().add([_centroid(labels, 3)])
    widget.commit()  # starts the run; the commit waits for its result
    qtbot.waitUntil(lambda: gate.calls == 1, timeout=TIMEOUT)
    viewer.layers.remove(target)
    assert any("target layer 'cellpose' was removed" in m for m in _messages())
    gate.event.set()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
    assert np.array_equal(target.data, before)  # nothing written anywhere
    assert widget._current  # the object stays in the preview
    assert not any(layer.name.startswith("annotations (cellseg)") for layer in viewer.layers)


def test_target_edited_during_a_run_keeps_the_edit(setup, qtbot, tiny_vit):
    viewer, make, image, labels, target = setup
    gate = _Gate(tiny_vit)
    widget = make(loader=gate)
    _select_target(widget, target)
    widget._points().add([_centroid(labels, 3)])
    widget.commit()
    qtbot.waitUntil(lambda: gate.calls == 1, timeout=TIMEOUT)
    # the user paints label 42 over the cell while the model works
    rr, cc = np.nonzero(labels == 3)
    with target.block_history():
        target.data_setitem((rr, cc), 42)
    edited = target.data.copy()
    gate.event.set()
    qtbot.waitUntil(lambda: widget._worker is None and "committed" in widget.status.text(), timeout=TIMEOUT)
    assert (target.data[rr, cc] == 42).all()  # the edit is kept
    assert target.data.max() == 43  # the new id follows the edit's id
    target.undo()
    assert np.array_equal(target.data, edited)


def test_image_removed_or_replaced_mid_run(setup, qtbot, tiny_vit):
    viewer, make, image, labels, target = setup
    gate = _Gate(tiny_vit)
    widget = make(loader=gate)
    before = target.data.copy()
    widget._points().add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: gate.calls == 1, timeout=TIMEOUT)
    layer = viewer.layers["cells"]
    viewer.layers.remove(layer)
    assert any("image layer 'cells' was removed" in m for m in _messages())
    gate.event.set()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
    assert not widget._current
    assert np.array_equal(target.data, before)
    # a new image: prompts work again; then its data are replaced
    viewer.add_image(image, name="cells again")
    widget.image_combo.setCurrentIndex(widget.image_combo.findText("cells again"))
    widget._points().add([_centroid(labels, 4)])
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    key_count = len(widget.cache)
    assert key_count >= 1
    viewer.layers["cells again"].data = image[::-1].copy()
    assert any("image data changed" in m for m in _messages())
    assert len(widget.cache) == 0  # the old embeddings were dropped
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    assert len(widget.cache) >= 1  # recomputed for the new data


def test_model_changed_while_embedding(setup, qtbot, tiny_vit, tiny_tinyvit):
    viewer, make, image, labels, target = setup
    gate = _Gate(tiny_vit)
    models = {"first": gate, "second": lambda: tiny_tinyvit}
    session = session_for(viewer)
    widget = make(loader=lambda: models.get(session.model_name, gate)())
    session.select("first")
    widget._points().add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: gate.calls == 1, timeout=TIMEOUT)
    session.select("second")
    assert any("model changed to second" in m for m in _messages())
    gate.event.set()
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    assert widget._segmenter.model is tiny_tinyvit
    assert "random-tinyvit_test" in widget.model_label.text()


def test_stack_prompts_segment_the_current_plane(make_napari_viewer, qtbot, tiny_vit):
    image, labels = _cells()
    stack = np.stack([image[::-1], image, image[:, ::-1]])
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="stack")
    widget = AnnotationWidget(viewer, model_loader=lambda: tiny_vit, debounce_ms=10)
    try:
        viewer.dims.set_current_step(0, 1)
        r, c = _centroid(labels, 3)
        widget._points().add([[1, r, c]])
        qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
        assert widget._current_plane == (1,)
        preview = widget._preview_layer.data
        assert preview.shape == stack.shape and preview[1].any() and not preview[0].any() and not preview[2].any()
        widget.commit()
        created = [layer for layer in viewer.layers if layer.name.startswith("annotations (cellseg)")][0]
        assert created.data.shape == stack.shape
        assert created.data[1].any() and not created.data[0].any() and not created.data[2].any()
        # a point on another plane does not answer for this plane
        viewer.dims.set_current_step(0, 2)
        widget._points().add([[0, r, c]])
        widget.segment()
        qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
        assert "no prompt on this plane" in widget.status.text()
    finally:
        qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
        widget.close()


def test_embed_plane_then_prompts_get_a_first_answer_then_the_zoomed_one(setup, qtbot):
    viewer, make, image, labels, target = setup
    widget = make()
    widget.precompute()
    assert not widget.precompute_btn.isEnabled() and widget.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
    assert "embedded 1 window" in widget.status.text()
    assert len(widget.cache) == 1  # the whole plane (tiny model: small input, zoom windows per prompt)
    widget._points().add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    assert widget._coarse_generation == widget._result_generation  # a first answer was shown, then refined
    # the plane, the zoom window, and the window's negative (inverted contrast, auto for a small model)
    assert "embedded 1 window" in widget.status.text() and len(widget.cache) == 3


def test_rgb_image_and_a_target_that_cannot_hold_a_new_id(make_napari_viewer, qtbot, tiny_vit):
    image, labels = _cells()
    rgb = (np.clip(np.stack([image] * 3, axis=-1), 0, 1) * 255).astype(np.uint8)
    viewer = make_napari_viewer()
    viewer.add_image(rgb, name="rgb")
    full = viewer.add_labels(np.where(labels == 1, 255, 0).astype(np.uint8), name="uint8 labels")
    widget = AnnotationWidget(viewer, model_loader=lambda: tiny_vit, debounce_ms=10)
    try:
        assert widget._spatial_shape() == labels.shape
        _select_target(widget, full)
        before = full.data.copy()
        widget._points().add([_centroid(labels, 3)])
        qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
        widget.commit()
        assert any("cannot hold label 256" in m for m in _messages())
        assert np.array_equal(full.data, before)  # nothing written
        assert widget._current  # the object is still there to commit elsewhere
    finally:
        qtbot.waitUntil(lambda: widget._worker is None, timeout=TIMEOUT)
        widget.close()


def test_a_click_is_answered_from_the_cell_map_of_a_distance_model(setup, qtbot, tiny_vit, monkeypatch):
    """With a map model a click becomes its map cell's box (computed in the worker); the checkbox turns it off."""
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import postprocess as pp
    from scipy import ndimage as ndi

    calls = []

    def fake_map(image, model, config=None, channel=None, image01=None):  # a perfect map of the bright disks
        calls.append(threading.current_thread() is threading.main_thread())
        yield auto.Progress(0, 1, "map")
        return pp.distance_targets(ndi.label(image01[..., 0] > 0.5)[0]).astype(np.float32)

    monkeypatch.setattr(auto, "predict_distance_map", fake_map)
    model = auto.as_distance_model(tiny_vit, {"peak": 0.5, "fill": 0.09})
    viewer, make, image, labels, target = setup
    widget = make(loader=lambda: model)
    assert widget.map_check.isChecked() and widget.config.clicks_from_map
    widget._activate_points()
    widget._points_layer.add([_centroid(labels, 3)])
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    assert calls == [False]  # one map, computed in the worker
    (obj,) = widget._current
    assert obj.window.contains(_bbox(labels, 3))  # answered in the window of the cell's box, not of a point
    assert widget.config.click_answer == "sam" and len(widget.cache) > 0  # SAM drew it: its window was embedded
    widget.map_cell_check.setChecked(True)  # the map's cell itself
    assert widget.config.click_answer == "map"
    widget.cache.clear()
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    (obj,) = widget._current
    assert obj.window.contains(_bbox(labels, 3)) and calls == [False]  # the map was cached
    assert len(widget.cache) == 0  # no embedding: the answer is the map cell
    widget.map_cell_check.setChecked(False)
    assert widget.merged_check.isChecked() and widget.config.merged_ratio == 1.5  # the core's default
    widget.merged_check.setChecked(False)  # large cells among small ones: always the map cell's box
    assert widget.config.merged_ratio is None
    widget.merged_check.setChecked(True)
    assert widget.config.merged_ratio == 1.5
    # map zoom "auto" is the default, but this model records no training cell sizes: its maps are at zoom 1
    assert widget.map_auto_check.isChecked() and widget.config.map_scale == "auto"
    widget.map_auto_check.setChecked(False)
    widget.map_scale_spin.setValue(0.5)  # the map zoom: a new map, in the worker, for the same click
    assert widget.config.map_scale == 0.5
    qtbot.waitUntil(lambda: _preview_ready(widget) and len(calls) == 2, timeout=TIMEOUT)
    assert calls == [False, False]
    (obj,) = widget._current
    assert obj.window.contains(_bbox(labels, 3))
    # a model that records its training cells' sizes (the packaged one, fine-tuned ones): the map zoom estimated
    model.meta["cell_diameters"] = {"all": {"p10": 2.0, "median": 20.0, "p90": 200.0}}
    widget.map_auto_check.setChecked(True)  # the cells around the click measured first
    assert widget.config.map_scale == "auto" and not widget.map_scale_spin.isEnabled()
    qtbot.waitUntil(lambda: "; map zoom 1" in widget.status.text(), timeout=TIMEOUT)
    assert calls == [False, False, False]  # the measuring map (4 crops a side, clipped to the plane), in the worker
    assert widget.map_scale_spin.value() == 1.0
    widget.map_auto_check.setChecked(False)
    assert widget.config.map_scale == 1.0 and widget.map_scale_spin.isEnabled()
    widget.map_views_check.setChecked(True)  # the click maps averaged with a view at zoom x1.25
    assert widget.config.map_zoom_views == (1.25,)
    qtbot.waitUntil(lambda: _preview_ready(widget) and len(calls) == 4, timeout=TIMEOUT)
    assert calls == [False] * 4  # a new map for the click (the views' map is not the plain one), in the worker
    widget.map_views_check.setChecked(False)
    assert widget.config.map_zoom_views == ()
    widget.map_check.setChecked(False)
    assert not widget.config.clicks_from_map
    qtbot.waitUntil(lambda: _preview_ready(widget), timeout=TIMEOUT)
    assert calls == [False] * 4  # no map without clicks from the map
