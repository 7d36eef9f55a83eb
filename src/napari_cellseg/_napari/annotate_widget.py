"""Interactive annotation: point and box prompts, live preview, commit into any Labels layer, undo.

A thin widget over :mod:`napari_cellseg.core.interactive`. The workflow:

1. Pick the image layer; the model is the one chosen in "Model selection"
   (this widget follows its changes).
2. Click cells in the "point prompts (cellseg)" layer (positive points; press
   Shift+T to switch to negative points, shown in red) and/or draw rectangles
   in the "box prompts (cellseg)" layer. The current object appears in the
   "preview (cellseg)" layer as you go (debounced; computed in a worker, the
   GUI never waits).
3. Commit (Shift+C) writes the object(s) into the target Labels layer — any
   Labels layer, including one you already have, or a new one — with new ids,
   as one undoable step (Ctrl+Z on the target layer, or ``layer.undo()``).

Everything slow (model loading, embeddings, decoding) runs in one
``napari.qt.threading.thread_worker`` at a time; requests made meanwhile are
coalesced into one re-run when it finishes, and a generation counter makes
sure a stale answer never replaces a newer one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_cellseg._napari._controls import zoom_controls
from napari_cellseg._napari.session import session_for
from napari_cellseg.core.interactive import (
    AnnotationConfig,
    EmbeddingCache,
    VIEW_COUNTS,
    InteractiveSegmenter,
    ObjectMask,
    default_disk_dir,
    group_prompts,
    plan_commit,
)
from napari_cellseg.core.progress import Progress

NEW_LAYER = "New layer"

#: action -> (napari key binding, what it does); bound on the viewer while the widget lives
SHORTCUTS: dict[str, tuple[str, str]] = {
    "segment": ("Shift-S", "segment now (update the preview)"),
    "commit": ("Shift-C", "commit the previewed object(s) into the target layer"),
    "clear": ("Shift-X", "clear the prompts and the uncommitted objects"),
    "toggle_sign": ("Shift-T", "toggle positive / negative points"),
    "next_object": ("Shift-N", "keep the current object aside and start the next one"),
}

#: the threshold spin box's lowest value, shown as "model default"
THRESHOLD_AUTO = -10.5

POSITIVE_COLOUR = "lime"
NEGATIVE_COLOUR = "red"


def _key_label(key: str) -> str:
    return key.replace("-", "+")


class _UserError(Exception):
    """A problem the user can fix; shown as a message, never as a traceback."""


@dataclass
class _Request:
    """What one worker run answers."""

    generation: int
    kind: str  # "segment" or "precompute"
    layer: Any
    plane: tuple[int, ...]
    prompts: list
    model_name: str
    started: float


@dataclass
class _Outcome:
    segmenter: InteractiveSegmenter
    image_key: str
    objects: list
    computed: int
    error: str | None = None
    size_estimate: object = None  # a map zoom estimated by this request (map zoom "auto")


#: AnnotationConfig.merged_ratio when "Clicks on merged map cells" is ticked (the config's default)
MERGED_RATIO = AnnotationConfig().merged_ratio

#: the click maps' zoom views (AnnotationConfig.map_zoom_views) when "Also map clicks at zoom x1.25" is ticked
MAP_ZOOM_VIEWS = (1.25,)


def _work(segmenter, loader, plane_data, channel, prompts, config, cache, precompute):
    """Worker body (runs in a thread): load the model if needed, embed, decode."""
    try:
        if segmenter is None:
            yield Progress(0, 0, "loading the model…")
            model = loader()
            segmenter = InteractiveSegmenter(model, cache=cache, config=config)
        else:
            segmenter.config = config
        key = segmenter.set_image(plane_data, channel)
        if precompute:
            n = yield from segmenter.precompute()
            return _Outcome(segmenter, key, [], n)
        n = len(segmenter.missing_windows(prompts))
        before = segmenter.size_estimate
        objects = yield from segmenter.run(prompts, coarse_first=True)
        estimate = segmenter.size_estimate if segmenter.size_estimate is not before else None
        return _Outcome(segmenter, key, objects, n, size_estimate=estimate)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, MemoryError) as exc:
        return _Outcome(segmenter, "", [], 0, error=f"{type(exc).__name__}: {exc}")


class AnnotationWidget(QWidget):
    """Segment cells from point and box prompts and commit them into a Labels layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    model_loader : callable, optional
        Returns the :class:`~napari_cellseg.core.models.LoadedModel` to use; called
        in a worker. Default: the viewer's session (``session_for(viewer).load``),
        i.e. the model chosen in the model-selection widget. Tests inject a tiny
        random model here.
    debounce_ms : int
        Quiet time after the last prompt change before the preview is computed.

    Notes
    -----
    Overlap policy of Commit: existing labels are kept (the new object only
    takes background pixels) unless "overwrite existing labels" is ticked; new
    ids are ``max + 1, max + 2, ...`` of the target layer; see
    :func:`napari_cellseg.core.interactive.plan_commit`.
    """

    def __init__(self, napari_viewer, model_loader=None, debounce_ms: int = 50):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.model_loader = model_loader
        self.config = AnnotationConfig()
        self.cache = EmbeddingCache(max_bytes=int(self.config.max_memory_mb * 2**20))

        self._segmenter: InteractiveSegmenter | None = None
        self._segmenter_model: str | None = None
        self._image_layer: Image | None = None
        self._points_layer: Points | None = None
        self._boxes_layer: Shapes | None = None
        self._preview_layer: Labels | None = None
        self._worker = None
        self._request: _Request | None = None
        self._rerun: str | None = None
        self._generation = 0
        self._result_generation = -1
        self._commit_requested = False
        self._cancelled_generation = -1
        self._coarse_generation = -1
        self._current: list[ObjectMask] = []
        self._current_plane: tuple[int, ...] = ()
        self._pending: list[tuple[tuple[int, ...], ObjectMask]] = []
        self._painted: list[tuple[tuple[int, ...], tuple[int, int, int, int]]] = []
        self._keys_by_layer: dict[int, set[str]] = {}
        self._positive = True
        self._muted = False
        self._bound: dict[str, tuple[Any, Any]] = {}
        self._closed = False
        self._docked = False

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(debounce_ms))
        self._timer.timeout.connect(lambda: self._start("segment", quiet=True))

        self._build_ui()
        self._connect_viewer()
        self._refresh_layer_combos()
        self._bind_keys()
        self._update_model_label()

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        def tip(action: str) -> str:
            key, what = SHORTCUTS[action]
            return f"{what[0].upper()}{what[1:]} [{_key_label(key)}]"

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment (2D, RGB, or a 3D/time stack: the current plane)")
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.model_label.setToolTip("The model chosen in the 'Model selection' widget")
        self.target_combo = QComboBox()
        self.target_combo.setToolTip(
            "Labels layer that receives committed objects: any Labels layer (an automatic result, a Cellpose "
            "output, hand-drawn labels) or a new one"
        )
        self.live_check = QCheckBox("Live preview")
        self.live_check.setChecked(True)
        self.live_check.setToolTip("Update the preview as prompts change; otherwise press Segment")
        self.per_point_check = QCheckBox("One object per point")
        self.per_point_check.setToolTip("Every positive point is its own object (several cells in one go)")
        self.overwrite_check = QCheckBox("Overwrite existing labels")
        self.overwrite_check.setToolTip(
            "Off (default): a committed object only takes unlabelled pixels, existing labels are kept.\n"
            "On: the object takes all of its pixels, over existing labels."
        )
        self.zoom_check = QCheckBox("Zoom on the prompt (small-input models)")
        self.zoom_check.setChecked(True)
        self.zoom_check.setToolTip(
            "Segment from an embedding of a window around the prompt at native resolution, instead of the "
            "whole image shrunk to the model input (LiteMedSAM: 256 px). Automatic: only where it helps."
        )
        self.map_check = QCheckBox("Clicks from the cell map (distance models)")
        self.map_check.setChecked(True)
        self.map_check.setToolTip(
            "With a model that predicts a cell map (the default cellseg), a click is answered by the cell the map "
            "finds under it, drawn by SAM from that cell's box: LiteMedSAM's point pathway was never trained, "
            "its box pathway was (docs/annotation.md). Off: the click goes to SAM as a point."
        )
        self.map_cell_check = QCheckBox("Clicks: the map's cell itself, not SAM's drawing")
        self.map_cell_check.setToolTip(
            "On: a click is answered with the map's cell itself, without SAM (faster: no embedding of the box "
            "window); clicks with negative points still go to SAM. Better where the model's map knows your "
            "cells (images like its training data, or after fine-tuning); SAM's drawing (off, the default) was "
            "better on nuclei the default model never saw (docs/annotation.md)."
        )
        self.merged_check = QCheckBox("Clicks on merged map cells: a box of the typical cell size")
        self.merged_check.setChecked(True)
        self.merged_check.setToolTip(
            f"On (the default): a click on a map cell over {MERGED_RATIO:g} times the area of the window's median "
            "map cell is taken for a click on several cells the map merged, and SAM gets a box of the typical "
            "cell size centred on the click instead of the merged cell's box (AnnotationConfig.merged_ratio). "
            "Held-out phase-contrast cells: click IoU 0.46 -> 0.55. Off for images with large cells among small "
            "ones, whose clicks it would draw too small (docs/annotation.md)."
        )
        self.disk_check = QCheckBox("Keep embeddings on disk")
        self.disk_check.setToolTip(f"Cache embeddings in {default_disk_dir()} so they survive a restart")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(THRESHOLD_AUTO, 10.0)
        self.threshold_spin.setSingleStep(0.5)
        self.threshold_spin.setSpecialValueText("model default")
        self.threshold_spin.setValue(THRESHOLD_AUTO)
        self.threshold_spin.setToolTip(
            "Mask logit threshold: lower gives larger masks. 'model default': SAM's 0, or -2 for zero-shot "
            "LiteMedSAM (measured on phase-contrast cells, see docs/annotation.md); boxes of the default model: "
            "-1, and clicks it draws from their map cell's box +0.5 (its box head's own). A value set here "
            "applies to every prompt. Changing it re-uses the cached embedding."
        )
        self.threshold_spin.valueChanged.connect(self._on_settings_changed)
        self.map_scale_spin, self.map_auto_check, self._map_zoom_box = zoom_controls(
            "Clicks from the cell map: zoom of the map window before the model sees it, as the automatic "
            "widget's Zoom. Below 1 for cells much larger than the model's training cells (its map splits them), "
            "above 1 for tiny ones. The default model's training cells: nuclei 9-31 px across (median 20), "
            "phase-contrast cells 32-83 px (median 54); outside that range zoom by median / your diameter "
            "(docs/model_card.md).",
            "Estimate the map zoom once per image (the default): at the first click, a map at zoom 1 of 1,024 px "
            "around it is cut into cells and measured; when they lie outside the model's training cells' sizes, "
            "the click maps are made at the zoom that brings them there (the status line says what was measured; "
            "the zoom shows beside)")
        self.map_scale_spin.valueChanged.connect(self._on_settings_changed)
        self.map_auto_check.toggled.connect(self._on_map_auto)
        self.map_views_check = QCheckBox("Also map clicks at zoom x1.25 and average")
        self.map_views_check.setToolTip(
            "Clicks from the cell map: each click's map window is also mapped at 1.25 times its zoom and the two "
            "maps are averaged (test-time augmentation; AnnotationConfig.map_zoom_views). Default model, held-out "
            "phase-contrast cells: click IoU 0.43 -> 0.50; bright-field nuclei level (docs/annotation.md). Each "
            "new map window costs about five times the map time")
        self.map_views_check.toggled.connect(self._on_settings_changed)
        self.views_combo = QComboBox()
        self.views_combo.addItem("auto (8 for LiteMedSAM-sized models on a GPU, else 1)", None)
        for n in VIEW_COUNTS:
            self.views_combo.addItem(str(n), n)
        self.views_combo.setToolTip(
            "Orientations averaged (test-time augmentation): each window is also embedded flipped and "
            "transposed, and the masks' logits are averaged. The first orientation's answer shows at once, the "
            "average when the others are embedded (each costs a full embedding: about 0.9 s for LiteMedSAM on a "
            "CPU). 8 raised the zero-shot box IoU of LiteMedSAM by about 0.02 (docs/annotation.md)."
        )
        self.views_combo.currentIndexChanged.connect(self._on_settings_changed)
        self.invert_combo = QComboBox()
        self.invert_combo.addItem("auto (on for LiteMedSAM-sized models, not for colour images)", None)
        self.invert_combo.addItem("on: as is and inverted", True)
        self.invert_combo.addItem("off: as is", False)
        self.invert_combo.setToolTip(
            "Inverted contrast (test-time augmentation): each window is also embedded with its intensities "
            "inverted, and the masks' logits are averaged with the uninverted ones (shown first). It doubles the "
            "embeddings per window. Zero-shot LiteMedSAM box IoU on held-out cells: +0.04-0.05 phase contrast, "
            "+0.04 bright-field and +0.02 fluorescent nuclei, -0.01 stained colour tissue (docs/annotation.md)."
        )
        self.invert_combo.currentIndexChanged.connect(self._on_settings_changed)
        for box in (self.per_point_check, self.zoom_check, self.map_check, self.map_cell_check, self.merged_check,
                    self.disk_check):
            box.toggled.connect(self._on_settings_changed)
        self.live_check.toggled.connect(self._on_settings_changed)

        self.sign_btn = QPushButton()
        self.sign_btn.setCheckable(True)
        self.sign_btn.setToolTip(tip("toggle_sign"))
        self.sign_btn.clicked.connect(lambda *_: self.toggle_sign())
        self.points_btn = QPushButton("Add points")
        self.points_btn.setToolTip("Select the point-prompt layer in 'add' mode (created if needed)")
        self.points_btn.clicked.connect(lambda *_: self._activate_points())
        self.boxes_btn = QPushButton("Draw boxes")
        self.boxes_btn.setToolTip("Select the box-prompt layer in 'rectangle' mode (created if needed)")
        self.boxes_btn.clicked.connect(lambda *_: self._activate_boxes())

        self.segment_btn = QPushButton("Segment")
        self.segment_btn.setToolTip(tip("segment"))
        self.segment_btn.clicked.connect(lambda *_: self.segment())
        self.commit_btn = QPushButton("Commit")
        self.commit_btn.setToolTip(tip("commit"))
        self.commit_btn.clicked.connect(lambda *_: self.commit())
        self.clear_btn = QPushButton("Clear")
        self.clear_btn.setToolTip(tip("clear"))
        self.clear_btn.clicked.connect(lambda *_: self.clear())
        self.next_btn = QPushButton("Next object")
        self.next_btn.setToolTip(tip("next_object"))
        self.next_btn.clicked.connect(lambda *_: self.next_object())
        self.precompute_btn = QPushButton("Embed plane now")
        self.precompute_btn.setToolTip(
            "Embed the current plane ahead of the prompts: afterwards every prompt gets an instant first answer "
            "(refined by the zoom), or its final one (tiles of large images for large-input models)"
        )
        self.precompute_btn.clicked.connect(lambda *_: self.precompute())
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop the running computation (after the current window)")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(lambda *_: self.cancel())

        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.status = QLabel("Add point or box prompts on a cell")
        self.status.setWordWrap(True)
        self.shortcuts_label = QLabel(
            "Shortcuts: " + ", ".join(f"{_key_label(k)} {a.replace('_', ' ')}" for a, (k, _) in SHORTCUTS.items())
        )
        self.shortcuts_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_label)
        form.addRow("Target labels", self.target_combo)
        form.addRow("Mask threshold", self.threshold_spin)
        form.addRow("Map zoom", self._map_zoom_box)
        form.addRow("", self.map_views_check)
        form.addRow("Orientations", self.views_combo)
        form.addRow("Inverted contrast", self.invert_combo)
        prompts_row = QHBoxLayout()
        prompts_row.addWidget(self.points_btn)
        prompts_row.addWidget(self.boxes_btn)
        prompts_row.addWidget(self.sign_btn)
        grid = QGridLayout()
        grid.addWidget(self.segment_btn, 0, 0)
        grid.addWidget(self.commit_btn, 0, 1)
        grid.addWidget(self.next_btn, 1, 0)
        grid.addWidget(self.clear_btn, 1, 1)
        grid.addWidget(self.precompute_btn, 2, 0)
        grid.addWidget(self.cancel_btn, 2, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for box in (self.live_check, self.per_point_check, self.overwrite_check, self.zoom_check,
                    self.map_check, self.map_cell_check, self.merged_check, self.disk_check):
            layout.addWidget(box)
        layout.addLayout(prompts_row)
        layout.addLayout(grid)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.shortcuts_label)
        layout.addStretch(1)
        self._update_sign_button()

        self.image_combo.currentIndexChanged.connect(self._on_image_choice)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def _update_model_label(self) -> None:
        loaded = self._segmenter is not None and self._segmenter_model == self.session.model_name
        if loaded:
            self.model_label.setText(self._segmenter.model.describe())
        else:
            self.model_label.setText(f"{self.session.model_name} (loaded on the first prompt)")

    def _update_sign_button(self) -> None:
        self.sign_btn.setChecked(not self._positive)
        self.sign_btn.setText("Negative points (−)" if not self._positive else "Positive points (+)")

    # -------------------------------------------------------------- viewer wiring

    def _connect_viewer(self) -> None:
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.layers.events.moved.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_plane_changed)
        self.session.model_changed.connect(self._on_model_changed)

    def _disconnect_viewer(self) -> None:
        for emitter, cb in (
            (self.viewer.layers.events.inserted, self._on_layers_changed),
            (self.viewer.layers.events.removed, self._on_layer_removed),
            (self.viewer.layers.events.moved, self._on_layers_changed),
            (self.viewer.dims.events.current_step, self._on_plane_changed),
        ):
            try:
                emitter.disconnect(cb)
            except (TypeError, ValueError, RuntimeError):
                pass
        try:
            self.session.model_changed.disconnect(self._on_model_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._watch_image(None)
        for layer in (self._points_layer, self._boxes_layer):
            if layer is not None:
                try:
                    layer.events.data.disconnect(self._on_prompts_changed)
                except (TypeError, ValueError, RuntimeError):
                    pass

    def _bind_keys(self) -> None:
        from napari.utils.key_bindings import coerce_keybinding

        for action, (key, _) in SHORTCUTS.items():
            def handler(viewer, _action=action):
                getattr(self, _action)()

            previous = self.viewer.bind_key(key, handler, overwrite=True)
            self._bound[key] = (handler, previous, coerce_keybinding(key))

    def _unbind_keys(self) -> None:
        for key, (handler, previous, kb) in self._bound.items():
            if self.viewer.keymap.get(kb) is handler:  # still ours: give back what was there
                self.viewer.bind_key(key, previous, overwrite=True)
        self._bound.clear()

    def cleanup(self) -> None:
        """Unbind the shortcuts, disconnect from the viewer and stop the worker (called on close)."""
        if self._closed:
            return
        self._closed = True
        self._timer.stop()
        self._unbind_keys()
        self._disconnect_viewer()
        if self._worker is not None:
            self._worker.quit()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.cleanup()
        super().closeEvent(event)

    def event(self, event) -> bool:
        # napari's remove_dock_widget (the dock's close button) only un-parents the widget: clean up then too
        if event.type() == QEvent.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self.cleanup()
        return super().event(event)

    # -------------------------------------------------------------- layer combos

    def _owned(self, layer) -> bool:
        return layer is not None and any(layer is x for x in (self._points_layer, self._boxes_layer,
                                                                self._preview_layer))

    def _refresh_layer_combos(self) -> None:
        current_image = self._image_layer
        current_target = self.target_combo.currentData()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                self.image_combo.addItem(layer.name, layer)
        idx = next((i for i in range(self.image_combo.count()) if self.image_combo.itemData(i) is current_image), -1)
        if idx < 0 and self.image_combo.count():
            idx = 0
        self.image_combo.setCurrentIndex(idx)
        self.image_combo.blockSignals(False)

        self.target_combo.blockSignals(True)
        self.target_combo.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and not self._owned(layer):
                self.target_combo.addItem(layer.name, layer)
        self.target_combo.addItem(NEW_LAYER, None)
        # keep the user's choice; "New layer" when there was none (never write into a layer unasked)
        idx = next((i for i in range(self.target_combo.count())
                    if current_target is not None and self.target_combo.itemData(i) is current_target), -1)
        self.target_combo.setCurrentIndex(idx if idx >= 0 else self.target_combo.count() - 1)
        self.target_combo.blockSignals(False)
        self._on_image_choice()

    def _on_layers_changed(self, event=None) -> None:
        self._refresh_layer_combos()

    def _on_image_choice(self, *_) -> None:
        layer = self.image_combo.currentData()
        if layer is self._image_layer:
            return
        had_objects = len(self._pending)
        self._watch_image(layer)
        self._invalidate(cancel=True)
        if had_objects:
            self._pending.clear()
            show_warning(f"napari-cellseg: another image was chosen: {had_objects} uncommitted object(s) "
                         "were discarded (labels layers are unchanged)")
        self._clear_current()
        self._schedule()

    def _watch_image(self, layer) -> None:
        if self._image_layer is not None:
            try:
                self._image_layer.events.data.disconnect(self._on_image_data_changed)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._image_layer = layer
        if layer is not None:
            layer.events.data.connect(self._on_image_data_changed)

    def _target_layer(self, create: bool = False) -> Labels | None:
        layer = self.target_combo.currentData()
        if layer is not None and layer in self.viewer.layers:
            return layer
        if layer is not None:  # the chosen layer is gone
            return None
        if not create:
            return None
        shape = self._spatial_shape()
        image = self._image_layer
        new = self.viewer.add_labels(
            np.zeros(shape, np.uint32), name="annotations (cellseg)", scale=image.scale, translate=image.translate,
        )
        idx = next(i for i in range(self.target_combo.count()) if self.target_combo.itemData(i) is new)
        self.target_combo.setCurrentIndex(idx)
        return new

    # -------------------------------------------------------------- prompt layers

    def _spatial_shape(self) -> tuple[int, ...]:
        layer = self._require_image()
        data = layer.data[0] if layer.multiscale else layer.data
        shape = tuple(int(s) for s in data.shape)
        return shape[:-1] if layer.rgb else shape

    def _require_image(self) -> Image:
        layer = self._image_layer
        if layer is None or layer not in self.viewer.layers:
            raise _UserError("choose an image layer first")
        return layer

    def _points(self, create: bool = True) -> Points | None:
        layer = self._points_layer
        if layer is not None and layer in self.viewer.layers:
            return layer
        if not create:
            return None
        image = self._require_image()
        nd = len(self._spatial_shape())
        import pandas as pd

        size = max(3.0, 0.012 * max(self._spatial_shape()[-2:]))
        layer = Points(
            ndim=nd, name="point prompts (cellseg)", scale=image.scale, translate=image.translate,
            features=pd.DataFrame({"positive": pd.Series([], dtype=bool)}),
            face_color="positive", face_color_cycle={True: POSITIVE_COLOUR, False: NEGATIVE_COLOUR},
            border_color="white", size=size,
        )
        layer.feature_defaults = {"positive": self._positive}
        self._points_layer = layer
        self.viewer.layers.append(layer)
        layer.events.data.connect(self._on_prompts_changed)
        return layer

    def _boxes(self, create: bool = True) -> Shapes | None:
        layer = self._boxes_layer
        if layer is not None and layer in self.viewer.layers:
            return layer
        if not create:
            return None
        image = self._require_image()
        nd = len(self._spatial_shape())
        width = max(1.0, 0.003 * max(self._spatial_shape()[-2:]))
        layer = Shapes(
            ndim=nd, name="box prompts (cellseg)", scale=image.scale, translate=image.translate,
            edge_color="yellow", face_color="transparent", edge_width=width,
        )
        self._boxes_layer = layer
        self.viewer.layers.append(layer)
        layer.events.data.connect(self._on_prompts_changed)
        return layer

    def _activate_points(self) -> None:
        try:
            layer = self._points()
        except _UserError as exc:
            show_warning(f"napari-cellseg: {exc}")
            return
        self.viewer.layers.selection.active = layer
        layer.mode = "add"

    def _activate_boxes(self) -> None:
        try:
            layer = self._boxes()
        except _UserError as exc:
            show_warning(f"napari-cellseg: {exc}")
            return
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"

    def _ensure_preview(self) -> Labels:
        shape = self._spatial_shape()
        layer = self._preview_layer
        if layer is not None and layer in self.viewer.layers and layer.data.shape == shape:
            return layer
        image = self._image_layer
        if layer is not None and layer in self.viewer.layers:
            layer.data = np.zeros(shape, np.uint16)
            layer.scale, layer.translate = image.scale, image.translate
        else:
            layer = Labels(np.zeros(shape, np.uint16), name="preview (cellseg)", scale=image.scale,
                           translate=image.translate, opacity=0.5)
            self._preview_layer = layer
            active = self.viewer.layers.selection.active
            self.viewer.layers.append(layer)
            if active is not None:  # keep the user's prompt layer active
                self.viewer.layers.selection.active = active
        self._painted = []
        return layer

    # -------------------------------------------------------------- planes and prompts

    def _plane_index(self) -> tuple[int, ...]:
        """Indices of the non-displayed axes of the image for the viewer's current position."""
        image = self._require_image()
        shape = self._spatial_shape()
        nd = len(shape)
        if nd == 2:
            return ()
        if self.viewer.dims.ndisplay != 2:
            raise _UserError("switch the viewer to 2D to annotate a plane of a stack")
        dims_nd = self.viewer.dims.ndim
        displayed = tuple(self.viewer.dims.order[-2:])
        if displayed != (dims_nd - 2, dims_nd - 1):
            raise _UserError("annotate with the last two axes displayed (reset the axis order)")
        point = np.asarray(self.viewer.dims.point, float)
        data_pt = np.asarray(image.world_to_data(point[-nd:] if len(point) >= nd else point), float)
        idx = tuple(int(np.clip(round(v), 0, shape[i] - 1)) for i, v in enumerate(data_pt[: nd - 2]))
        return idx

    def _to_image_coords(self, layer, coords: np.ndarray) -> np.ndarray:
        """Data coordinates of a prompt layer -> data coordinates of the image layer."""
        image = self._image_layer
        out = np.empty((len(coords), image.ndim))
        for i, c in enumerate(coords):
            out[i] = image.world_to_data(layer.data_to_world(c))
        return out

    def _collect_prompts(self, plane: tuple[int, ...]):
        """(points (P, 2), labels (P,), boxes (B, 4)) of the current plane, image pixel coordinates."""
        nd = len(plane) + 2
        pts = np.zeros((0, 2))
        labels = np.zeros(0)
        points_layer = self._points(create=False)
        if points_layer is not None and len(points_layer.data):
            coords = self._to_image_coords(points_layer, np.asarray(points_layer.data, float))
            on_plane = np.all(np.round(coords[:, : nd - 2]) == np.asarray(plane), axis=1) if plane else \
                np.ones(len(coords), bool)
            pts = coords[on_plane, -2:]
            if "positive" in points_layer.features:
                signs = np.asarray(points_layer.features["positive"], bool)
            else:
                signs = np.ones(len(coords), bool)
            labels = signs[on_plane].astype(float)
        boxes = []
        boxes_layer = self._boxes(create=False)
        if boxes_layer is not None:
            for verts in boxes_layer.data:
                v = self._to_image_coords(boxes_layer, np.asarray(verts, float))
                if plane and not np.all(np.round(v[:, : nd - 2]) == np.asarray(plane)):
                    continue
                rc = v[:, -2:]
                # napari draws around pixel centres: a pixel i spans [i - 0.5, i + 0.5]
                r0, c0 = rc.min(axis=0) + 0.5
                r1, c1 = rc.max(axis=0) + 0.5
                if r1 - r0 >= 1 and c1 - c0 >= 1:
                    boxes.append((r0, c0, r1, c1))
        shape = self._spatial_shape()[-2:]
        inside = ((pts[:, 0] >= -0.5) & (pts[:, 0] <= shape[0] - 0.5) & (pts[:, 1] >= -0.5)
                  & (pts[:, 1] <= shape[1] - 0.5))
        pts, labels = pts[inside], labels[inside]
        bx = np.asarray(boxes, float).reshape(-1, 4)
        if len(bx):
            bx[:, [0, 2]] = bx[:, [0, 2]].clip(0, shape[0])
            bx[:, [1, 3]] = bx[:, [1, 3]].clip(0, shape[1])
            bx = bx[(bx[:, 2] - bx[:, 0] >= 1) & (bx[:, 3] - bx[:, 1] >= 1)]
        return pts, labels, bx

    def _plane_data(self, plane: tuple[int, ...]) -> np.ndarray:
        image = self._require_image()
        data = image.data[0] if image.multiscale else image.data
        return np.array(data[plane] if plane else data, copy=True)

    # -------------------------------------------------------------- events

    def _on_prompts_changed(self, event=None) -> None:
        if self._muted:
            return
        self._generation += 1
        if self.live_check.isChecked():
            self._schedule()

    def _schedule(self) -> None:
        if self.live_check.isChecked() and not self._closed:
            self._timer.start()

    def _threshold_value(self) -> float | None:
        value = float(self.threshold_spin.value())
        return None if value <= THRESHOLD_AUTO + 1e-9 else value

    def _on_map_auto(self, checked: bool) -> None:
        self.map_scale_spin.setEnabled(not checked)
        self._on_settings_changed()

    def _on_settings_changed(self, *_) -> None:
        self.config = replace(self.config, zoom="auto" if self.zoom_check.isChecked() else "off",
                              disk_cache=self.disk_check.isChecked(),
                              clicks_from_map=self.map_check.isChecked(),
                              click_answer="map" if self.map_cell_check.isChecked() else "sam",
                              merged_ratio=MERGED_RATIO if self.merged_check.isChecked() else None,
                              map_scale="auto" if self.map_auto_check.isChecked()
                              else float(self.map_scale_spin.value()),
                              map_zoom_views=MAP_ZOOM_VIEWS if self.map_views_check.isChecked() else (),
                              mask_threshold=self._threshold_value(),
                              views=self.views_combo.currentData(),
                              invert=self.invert_combo.currentData())
        self.cache.disk_dir = default_disk_dir() if self.config.disk_cache else None
        self._generation += 1
        self._schedule()

    def _on_plane_changed(self, event=None) -> None:
        try:
            if len(self._spatial_shape()) <= 2:
                return
        except _UserError:
            return
        self._generation += 1
        self._clear_current()
        self._schedule()

    def _on_model_changed(self, name: str) -> None:
        running = self._worker is not None
        self._segmenter = None
        self._segmenter_model = None
        self._invalidate(cancel=True)
        self._clear_current()
        self._update_model_label()
        if running:
            show_info(f"napari-cellseg: the model changed to {name} during a computation: it was cancelled and "
                      "the preview will be recomputed with the new model (labels are unchanged)")
        self._schedule()

    def _on_image_data_changed(self, event=None) -> None:
        layer = self._image_layer
        keys = self._keys_by_layer.pop(id(layer), set())
        for key in keys:
            self.cache.forget(image=key)
        running = self._worker is not None
        self._invalidate(cancel=True)
        self._clear_current()
        msg = "the image data changed: its embeddings will be recomputed"
        if running:
            msg += " (the running computation was cancelled)"
        if self._pending:
            try:
                same = all(o.bbox[2] <= self._spatial_shape()[-2] and o.bbox[3] <= self._spatial_shape()[-1]
                           for _, o in self._pending)
            except _UserError:
                same = False
            if not same:
                show_warning(f"napari-cellseg: {len(self._pending)} uncommitted object(s) no longer fit the "
                             "image and were discarded (labels layers are unchanged)")
                self._pending.clear()
        show_info(f"napari-cellseg: {msg}")
        self._render_preview()
        self._schedule()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        running = self._worker is not None
        if layer is self._image_layer:
            self._watch_image(None)
            self._invalidate(cancel=True)
            n = len(self._pending) + len(self._current)
            self._pending.clear()
            self._current = []
            self._painted = []
            self._commit_requested = False
            show_warning(
                f"napari-cellseg: the image layer '{layer.name}' was removed"
                + (": the running computation was stopped" if running else "")
                + (f"; {n} uncommitted object(s) discarded" if n else "")
                + ". Labels layers are unchanged."
            )
        elif layer is self._points_layer or layer is self._boxes_layer:
            try:
                layer.events.data.disconnect(self._on_prompts_changed)
            except (TypeError, ValueError, RuntimeError):
                pass
            if layer is self._points_layer:
                self._points_layer = None
            else:
                self._boxes_layer = None
            self._generation += 1
            self._clear_current()
            if running:
                show_info(f"napari-cellseg: the prompt layer '{layer.name}' was removed during a computation: "
                          "its result is discarded")
            self._schedule()
        elif layer is self._preview_layer:
            self._preview_layer = None
            self._painted = []
        elif isinstance(layer, Labels) and layer is self.target_combo.currentData():
            if self._commit_requested:
                self._commit_requested = False
                show_warning(f"napari-cellseg: the target layer '{layer.name}' was removed before the commit: "
                             "nothing was written; the object stays in the preview — choose a target and "
                             "commit again")
        self._refresh_layer_combos()

    # -------------------------------------------------------------- actions

    def toggle_sign(self) -> None:
        """Switch new points between positive and negative [Shift+T]."""
        self._positive = not self._positive
        layer = self._points(create=False)
        if layer is not None:
            layer.feature_defaults = {"positive": self._positive}
        self._update_sign_button()
        self._set_status(f"new points are {'positive' if self._positive else 'negative'}")

    def segment(self) -> None:
        """Compute the preview of the current prompts now [Shift+S]."""
        self._timer.stop()
        self._start("segment")

    def precompute(self) -> None:
        """Embed the current plane ahead of the prompts (tile by tile for large images)."""
        self._start("precompute")

    def cancel(self) -> None:
        """Stop the running computation at its next step."""
        if self._worker is None:
            return
        self._rerun = None
        self._commit_requested = False
        self._cancelled_generation = self._generation  # no automatic re-run until the prompts change
        self._worker.quit()
        self._set_status("cancelling… (after the current window)")

    def clear(self) -> None:
        """Remove the prompts of the current plane and every uncommitted object [Shift+X]."""
        try:
            plane = self._plane_index()
        except _UserError:
            plane = None
        self._clear_prompts(plane)
        self._pending.clear()
        self._generation += 1
        self._commit_requested = False
        self._clear_current()
        self._set_status("cleared")

    def next_object(self) -> None:
        """Keep the previewed object(s) aside (uncommitted) and start a new one [Shift+N]."""
        if not self._current or self._result_generation != self._generation:
            self._set_status("nothing to keep yet: wait for the preview, or press Segment")
            return
        self._pending.extend((self._current_plane, o) for o in self._current if o.area)
        self._current = []
        self._clear_prompts(self._current_plane)
        self._generation += 1
        self._render_preview()
        self._set_status(f"{len(self._pending)} object(s) waiting for Commit; add prompts for the next one")

    def commit(self) -> None:
        """Write the previewed object(s) into the target layer with new ids, undoably [Shift+C]."""
        fresh = self._result_generation == self._generation and self._worker is None
        try:
            has_prompts = self._has_prompts()
        except _UserError as exc:
            show_warning(f"napari-cellseg: {exc}")
            return
        if has_prompts and not fresh:
            self._commit_requested = True
            self._timer.stop()
            self._start("segment")
            return
        self._do_commit()

    # -------------------------------------------------------------- worker

    def _has_prompts(self) -> bool:
        plane = self._plane_index()
        pts, labels, boxes = self._collect_prompts(plane)
        return bool(len(boxes) or (labels > 0).any())

    def _invalidate(self, cancel: bool) -> None:
        self._generation += 1
        if cancel and self._worker is not None:
            self._worker.quit()

    def _start(self, kind: str, quiet: bool = False) -> None:
        if self._closed:
            return
        if self._worker is not None:
            # one worker at a time: the latest request runs when this one ends
            if kind == "precompute" or self._rerun != "precompute":
                self._rerun = kind
            return
        try:
            image = self._require_image()
            plane = self._plane_index()
            shape = self._spatial_shape()
            prompts = []
            if kind == "segment":
                pts, labels, boxes = self._collect_prompts(plane)
                prompts, ignored = group_prompts(pts, labels, boxes, self.per_point_check.isChecked())
                if not prompts:
                    self._commit_requested = False
                    self._result_generation = self._generation
                    self._clear_current()
                    if not quiet or ignored:
                        self._set_status("no prompt on this plane"
                                         + (f" ({ignored} point(s) ignored)" if ignored else ""))
                    return
                if ignored:
                    self._set_status(f"{ignored} point(s) outside every box are ignored")
            data = self._plane_data(plane)
        except _UserError as exc:
            self._commit_requested = False
            show_warning(f"napari-cellseg: {exc}")
            return
        if len(shape) < 2:
            show_warning("napari-cellseg: the image must have at least two spatial axes")
            return
        model_name = self.session.model_name
        segmenter = self._segmenter if self._segmenter_model == model_name else None
        loader = self.model_loader or self.session.load
        request = _Request(self._generation, kind, image, plane, prompts, model_name, time.perf_counter())
        worker = thread_worker(
            _work,
            start_thread=False,
            connect={
                "yielded": lambda record, r=request: self._on_progress(r, record),
                "returned": lambda outcome, r=request: self._on_returned(r, outcome),
                "errored": lambda exc, r=request: self._on_errored(r, exc),
                "aborted": lambda r=request: self._on_aborted(r),
                "finished": self._on_finished,
            },
        )(segmenter, loader, data, None, prompts, self.config, self.cache, kind == "precompute")
        self._worker = worker
        self._request = request
        self.cancel_btn.setEnabled(True)
        self.precompute_btn.setEnabled(False)
        self.progress.setRange(0, 0)  # busy until the first progress record
        self.progress.setVisible(True)
        worker.start()

    def _on_progress(self, request: _Request, record: Progress) -> None:
        if self._closed:
            return
        objects = (record.data or {}).get("objects")
        if objects is not None and request.generation == self._generation and request.layer is self._image_layer:
            # a first answer from a cached (coarser) embedding while the zoom window is embedded;
            # shown, but Commit waits for the refined one
            self._current = list(objects)
            self._current_plane = request.plane
            self._coarse_generation = request.generation
            self._render_preview()
        self.progress.setVisible(True)
        if record.total > 0:
            self.progress.setRange(0, record.total)
            self.progress.setValue(record.step)
        else:
            self.progress.setRange(0, 0)
        if record.message:
            self._set_status(record.message)

    def _on_returned(self, request: _Request, outcome: _Outcome) -> None:
        if self._closed:
            return
        if outcome.error:
            self._commit_requested = False
            show_error(f"napari-cellseg: {outcome.error}")
            self._set_status(outcome.error)
            return
        seg = outcome.segmenter
        if request.model_name == self.session.model_name:
            self._segmenter = seg
            self._segmenter_model = request.model_name
            self._update_model_label()
        if outcome.image_key and request.layer is not None:
            self._keys_by_layer.setdefault(id(request.layer), set()).add(outcome.image_key)
        elapsed = time.perf_counter() - request.started
        if request.kind == "precompute":
            self._set_status(f"embedded {outcome.computed} window(s) in {elapsed:.1f} s"
                             if outcome.computed else "embeddings already cached")
            return
        if request.generation != self._generation or request.layer is not self._image_layer:
            return  # stale: a newer request follows (or the image went away)
        self._current = list(outcome.objects)
        self._current_plane = request.plane
        self._result_generation = request.generation
        self._render_preview()
        areas = [o.area for o in self._current]
        empty = sum(1 for a in areas if a == 0)
        text = f"{len(areas)} object(s) previewed in {elapsed * 1000:.0f} ms"
        if outcome.computed:
            text += f" (embedded {outcome.computed} window(s))"
        if empty:
            text += f"; {empty} came out empty"
        if outcome.size_estimate is not None:  # map zoom "auto": what this plane's clicks are mapped at
            text += f"; map {outcome.size_estimate.message}"
            self.map_scale_spin.blockSignals(True)
            self.map_scale_spin.setValue(outcome.size_estimate.scale)
            self.map_scale_spin.blockSignals(False)
        self._set_status(text)
        if self._commit_requested:
            self._commit_requested = False
            self._do_commit()

    def _on_errored(self, request: _Request, exc: Exception) -> None:
        # napari's worker already shows the traceback as a notification
        self._commit_requested = False
        if not self._closed:
            self._set_status(f"failed: {type(exc).__name__}: {exc}")

    def _on_aborted(self, request: _Request) -> None:
        if not self._closed:
            self._set_status("cancelled")

    def _on_finished(self) -> None:
        self._worker = None
        self._request = None
        if self._closed:
            return
        self.progress.setVisible(False)
        self.cancel_btn.setEnabled(False)
        self.precompute_btn.setEnabled(True)
        rerun, self._rerun = self._rerun, None
        if rerun is not None:
            self._start(rerun, quiet=True)
        elif self._result_generation != self._generation and self._cancelled_generation != self._generation:
            self._schedule()

    # -------------------------------------------------------------- preview and commit

    def _clear_current(self) -> None:
        self._current = []
        self._render_preview()

    def _render_preview(self) -> None:
        if not self._current and not self._pending and not self._painted:
            return
        try:
            layer = self._ensure_preview()
        except _UserError:
            return
        data = layer.data
        for plane, (r0, c0, r1, c1) in self._painted:
            data[plane + (slice(r0, r1), slice(c0, c1))] = 0
        painted = []
        objects = list(self._pending) + [(self._current_plane, o) for o in self._current]
        try:
            for k, (plane, obj) in enumerate(objects, start=1):
                if obj.area == 0:
                    continue
                r0, c0, r1, c1 = obj.bbox
                region = data[plane + (slice(r0, r1), slice(c0, c1))]
                region[obj.mask] = k
                painted.append((plane, obj.bbox))
        except (IndexError, ValueError):  # objects of an image whose shape changed
            data[...] = 0
            painted = []
            self._pending.clear()
            self._current = []
            show_warning("napari-cellseg: the uncommitted objects no longer fit the image and were discarded "
                         "(labels layers are unchanged)")
        self._painted = painted
        layer.refresh()

    def _clear_prompts(self, plane: tuple[int, ...] | None) -> None:
        """Remove the prompts of one plane (all prompts when ``plane`` is None)."""
        self._muted = True
        try:
            nd_plane = 0 if plane is None else len(plane)
            points = self._points(create=False)
            if points is not None and len(points.data):
                if plane is None or nd_plane == 0:
                    keep = np.zeros(len(points.data), bool)
                else:
                    coords = self._to_image_coords(points, np.asarray(points.data, float))
                    keep = ~np.all(np.round(coords[:, :nd_plane]) == np.asarray(plane), axis=1)
                if not keep.all():
                    points.selected_data = set(np.flatnonzero(~keep).tolist())
                    points.remove_selected()
            boxes = self._boxes(create=False)
            if boxes is not None and len(boxes.data):
                drop = []
                for i, verts in enumerate(boxes.data):
                    if plane is None or nd_plane == 0:
                        drop.append(i)
                        continue
                    v = self._to_image_coords(boxes, np.asarray(verts, float))
                    if np.all(np.round(v[:, :nd_plane]) == np.asarray(plane)):
                        drop.append(i)
                if drop:
                    boxes.selected_data = set(drop)
                    boxes.remove_selected()
        finally:
            self._muted = False

    def _do_commit(self) -> None:
        objects = list(self._pending)
        if self._result_generation == self._generation:
            objects += [(self._current_plane, o) for o in self._current]
        objects = [(p, o) for p, o in objects if o.area]
        if not objects:
            self._set_status("nothing to commit: add prompts and wait for the preview")
            show_info("napari-cellseg: nothing to commit")
            return
        try:
            shape = self._spatial_shape()
        except _UserError as exc:
            show_warning(f"napari-cellseg: {exc}")
            return
        chosen = self.target_combo.currentData()
        if chosen is not None and chosen not in self.viewer.layers:
            show_warning("napari-cellseg: the target layer is gone: choose another target and commit again "
                         "(the objects stay in the preview)")
            return
        target = self._target_layer(create=True)
        if tuple(target.data.shape) != tuple(shape):
            show_error(f"napari-cellseg: the target layer '{target.name}' has shape {tuple(target.data.shape)}, "
                       f"the image {tuple(shape)}: choose a matching Labels layer or '{NEW_LAYER}'. "
                       "Nothing was written.")
            return
        data = target.data
        next_id = int(np.max(data)) + 1 if data.size else 1
        by_plane: dict[tuple[int, ...], list[ObjectMask]] = {}
        for plane, obj in objects:
            by_plane.setdefault(plane, []).append(obj)
        writes = []
        ids: list[int] = []
        skipped = 0
        kept = 0
        overwrite = self.overwrite_check.isChecked()
        try:
            for plane, objs in by_plane.items():
                plane_data = np.asarray(data[plane] if plane else data)
                plan = plan_commit(plane_data, objs, next_id=next_id, overwrite=overwrite)
                written = [i for i in plan.ids if i]
                if written:
                    next_id = max(written) + 1
                ids.extend(written)
                skipped += len(plan.skipped)
                kept += plan.kept_pixels
                if plan.rows.size:
                    idx = tuple(np.full(plan.rows.size, p, np.intp) for p in plane) + (plan.rows, plan.cols)
                    writes.append((idx, plan.values))
        except (ValueError, TypeError) as exc:
            show_error(f"napari-cellseg: {exc}. Nothing was written.")
            return
        if writes:
            idx = tuple(np.concatenate([w[0][a] for w in writes]) for a in range(len(writes[0][0])))
            values = np.concatenate([w[1] for w in writes])
            with target.block_history():  # one undo step for the whole commit
                target.data_setitem(idx, values)
        planes = list(by_plane)
        self._pending.clear()
        self._current = []
        for plane in planes:
            self._clear_prompts(plane)
        self._generation += 1
        self._result_generation = self._generation
        self._render_preview()
        if ids:
            target.selected_label = next_id
        text = (f"committed {len(ids)} object(s) into '{target.name}'"
                + (f" (ids {ids[0]}–{ids[-1]})" if len(ids) > 1 else f" (id {ids[0]})" if ids else ""))
        if skipped:
            text += f"; {skipped} skipped (empty or covered by existing labels)"
        if kept and not overwrite:
            text += f"; {kept} pixel(s) left to existing labels"
        self._set_status(text)
        if not ids:
            show_info(f"napari-cellseg: {text}")
