"""Automatic segmentation widget: distance-map, grid and map-guided modes with live thresholds.

All computation is :mod:`napari_cellseg.core.automatic`. The network runs once
per image in a ``thread_worker`` over the core generator, on a copy of the
plane(s); the result keeps the distance map or the candidate masks, so moving a
threshold slider only re-runs the post-processing (on the GUI thread, tens of
milliseconds) and rewrites the output Labels layer. The output is a new Labels
layer named after the image and the mode (``"cells grid labels"``); re-runs
and slider moves update that layer and never touch a layer the user made.

Slider moves replace the plane of the output layer directly instead of going
through the undo history: dragging a slider would otherwise fill the history
with full-image edits, and moving the slider back restores the result.
"""

from __future__ import annotations

import time

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cellseg._napari._controls import zoom_controls
from napari_cellseg._napari.session import session_for
from napari_cellseg.core import automatic as auto
from napari_cellseg.core.cpu_memory import reuse_freed_memory
from napari_cellseg.core.preprocess import VIEW_COUNTS
from napari_cellseg.core.progress import Progress

NO_IMAGE = "(no image layer)"
SESSION = "__session__"
METADATA_KEY = "napari_cellseg_automatic"

#: slider name -> (label, default, which modes show it, tooltip)
SLIDERS = {
    "peak": ("Cell peak", 0.47, ("distance", "guided"),
             "Seeds: regions of the distance map above this value become cells (SAMCell: 0.47)"),
    "fill": ("Cell fill", 0.09, ("distance", "guided"),
             "Cells grow inside the distance map above this value (SAMCell: 0.09)"),
    "probability": ("Probability", 0.8, ("grid", "guided"),
                    "Keep masks whose predicted IoU (cell probability) exceeds this (CellSeg1: 0.8; guided: "
                    "SAM's answer replaces the watershed region when it reaches this)"),
    "stability": ("Stability", 0.6, ("grid",), "Keep masks whose stability score is at least this (CellSeg1: 0.6)"),
    "nms_iou": ("NMS IoU", 0.05, ("grid",),
                "Remove a mask overlapping a better one by more than this IoU (CellSeg1: 0.05)"),
}


#: the widget's zoom views (DistanceConfig.zoom_views) when "Also map at zoom x1.25" is ticked
ZOOM_VIEWS = (1.25,)


def _segment_planes(loader, planes, mode, settings, model_thresholds_first):
    """Worker body: load the model(s), segment each plane, return (results, model description).

    Runs off the GUI thread; ``planes`` are copies. Yields overall progress.
    """
    model, prompt_model = loader()
    if model_thresholds_first:  # the sliders sit at SAMCell's defaults: the model's own defaults win
        settings = {**settings, **auto.model_thresholds(model)}
    config = auto.make_config(mode, model, **settings)
    results = []
    n = len(planes)
    with reuse_freed_memory(model.device):  # one setting for the whole stack (see core.cpu_memory)
        for i, plane in enumerate(planes):
            gen = auto.segment_steps(plane, model, mode, config, prompt_model=prompt_model)
            while True:
                try:
                    rec = next(gen)
                except StopIteration as stop:
                    results.append(stop.value)
                    break
                frac = (i + rec.fraction) / n
                prefix = f"plane {i + 1}/{n}: " if n > 1 else ""
                yield Progress(int(frac * 1000), 1000, prefix + rec.message)
    return results, model.describe()


class _FloatSlider(QWidget):
    """A horizontal slider for a value in [0, 1] with its number beside it."""

    def __init__(self, value: float, tooltip: str, parent=None) -> None:
        super().__init__(parent)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, 100)
        self.slider.setValue(int(round(value * 100)))
        self.slider.setToolTip(tooltip)
        self.number = QLabel(f"{value:.2f}")
        self.number.setMinimumWidth(32)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.slider)
        row.addWidget(self.number)
        self.slider.valueChanged.connect(lambda v: self.number.setText(f"{v / 100:.2f}"))

    def value(self) -> float:
        return self.slider.value() / 100.0

    def setValue(self, value: float) -> None:  # noqa: N802 (Qt style)
        self.slider.setValue(int(round(value * 100)))


class AutomaticWidget(QWidget):
    """Segment every cell of an image layer automatically.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    debounce_ms : int
        Delay between the last slider move and the relabelling.
    """

    def __init__(self, napari_viewer, debounce_ms: int = 40) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self._model_override = None  # a LoadedModel set from Python (tests, scripts)
        self._worker = None
        self._results: list[auto.AutomaticResult] = []
        self._planes: list[tuple[int, ...]] = []
        self._source = None  # the image layer of the cached results
        self._mode_of_results = ""
        self._scale_of_run = 1.0  # the zoom of the run in flight, then of the results shown
        self._outputs: dict[tuple[int, str], Labels] = {}
        self.last_relabel_ms = 0.0
        self._relabel_timer = QTimer(self)
        self._relabel_timer.setSingleShot(True)
        self._relabel_timer.setInterval(debounce_ms)
        self._relabel_timer.timeout.connect(self.apply_thresholds)
        self._build_ui()
        self._refresh_images()
        self._on_mode_changed()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self.session.model_changed.connect(self._on_session_model)

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment (a copy of the current plane is used)")
        form.addRow("Image", self.image_combo)
        self.mode_combo = QComboBox()
        for mode, tip in (
            ("distance", "SAMCell: a distance-map model predicts the map; watershed cuts it into cells"),
            ("grid", "CellSeg1: a grid of point prompts; masks filtered by probability, stability and NMS"),
            ("guided", "Map-guided: SAM draws each cell from the peak and box of the distance map"),
        ):
            self.mode_combo.addItem(mode, mode)
            self.mode_combo.setItemData(self.mode_combo.count() - 1, tip, Qt.ToolTipRole)
        form.addRow("Mode", self.mode_combo)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model for this widget; the first entry follows the Model selection widget")
        self._fill_models()
        form.addRow("Model", self.model_combo)
        self.distance_check = QCheckBox("model outputs a distance map (SAMCell)")
        self.distance_check.setToolTip(
            "Tick for checkpoints without metadata that were trained with the distance recipe, such as "
            "SAMCell's release")
        form.addRow("", self.distance_check)
        self.draw_combo = QComboBox()
        self.draw_combo.addItem("same model", "same")
        self.draw_combo.addItem("session model", "session")
        self.draw_combo.setToolTip("Guided mode: which model draws the cells from the map's prompts")
        form.addRow("Draw with", self.draw_combo)
        self.views_combo = QComboBox()
        for n in VIEW_COUNTS:
            self.views_combo.addItem(str(n), n)
        self.views_combo.setToolTip(
            "Guided mode: orientations of each embedded crop (flips, transposes) whose SAM masks are averaged. "
            "Each costs one more encoder pass per crop and one more decoder pass per cell (8: about 16 s more per "
            "1024 px image on a 2-core CPU); measured +0.01 AP@0.5 on average, see docs/automatic.md")
        form.addRow("Orientations", self.views_combo)
        self.invert_check = QCheckBox("Inverted contrast")
        self.invert_check.setToolTip(
            "Guided mode: each embedded crop (in each orientation) is also embedded as its negative, and the SAM "
            "masks of both are averaged (doubles the encoder passes of the drawing); see docs/automatic.md")
        form.addRow("", self.invert_check)
        self.points_spin = QSpinBox()
        self.points_spin.setRange(1, 128)
        self.points_spin.setValue(32)
        self.points_spin.setToolTip("Grid mode: prompts per side of each crop (32 x 32 = 1,024 prompts; on a "
                                    "CPU each prompt costs a decoder pass)")
        form.addRow("Points per side", self.points_spin)
        self.max_area_spin = QSpinBox()
        self.max_area_spin.setRange(1, 100)
        self.max_area_spin.setValue(10)
        self.max_area_spin.setSuffix(" %")
        self.max_area_spin.setToolTip("Grid mode: masks larger than this share of the image are dropped when the "
                                      "network runs (CellSeg1: 10%); raise it for images of a few large cells")
        form.addRow("Max mask area", self.max_area_spin)
        self.scale_spin, self.auto_zoom_check, zoom_box = zoom_controls(
            "Distance and guided modes: zoom of the image before the distance model sees it (the labels stay at "
            "the image's size). The model splits cells much larger than its training cells and misses much "
            "smaller ones. The default model's training cells: nuclei 9-31 px across (median 20), phase-contrast "
            "cells 32-83 px (median 54). Outside that range zoom by median / your diameter (0.43 for nuclei 47 px "
            "across: held-out AP@0.5 0.55 -> 0.79). Press Run after changing it; see docs/model_card.md",
            "Estimate the zoom (the default): map the image at zoom 1, measure the cells found, and map it again "
            "at the zoom that brings them to the model's training cells when they lie outside their sizes (the "
            "model card's rule; the status line says what was measured). The zoom found is shown beside; untick "
            "to set your own. No second pass when the cells are within the training sizes; tiny cells are seldom "
            "seen, set their zoom by hand")
        self.scale_spin.valueChanged.connect(self._on_zoom_changed)
        self.auto_zoom_check.toggled.connect(self._on_auto_zoom)
        form.addRow("Zoom", zoom_box)
        self.zoom_views_check = QCheckBox("Also map at zoom x1.25 and average")
        self.zoom_views_check.setToolTip(
            "Distance and guided modes: test-time augmentation over zoom (DistanceConfig.zoom_views): the image is "
            "also mapped at 1.25 times the zoom and the two maps are averaged. About 2.5 times the network time. "
            "Default model, validation images: phase contrast AP@0.5 +0.05, bright-field +0.02, fluorescent nuclei "
            "level, stained colour tissue -0.01 (docs/automatic.md, 'Zoom views'). Unticked, the automatic zoom "
            "still adds this view where the cells it measures are below the model's training median (phase "
            "contrast cells under 54 px; the status line says so). Press Run after changing it")
        form.addRow("", self.zoom_views_check)
        self.sliders: dict[str, _FloatSlider] = {}
        self._slider_rows: dict[str, tuple[QLabel, _FloatSlider]] = {}
        for name, (label, default, _modes, tip) in SLIDERS.items():
            slider = _FloatSlider(default, tip)
            slider.slider.valueChanged.connect(self._on_slider)
            lab = QLabel(label)
            form.addRow(lab, slider)
            self.sliders[name] = slider
            self._slider_rows[name] = (lab, slider)
        self.min_size_spin = QSpinBox()
        self.min_size_spin.setRange(0, 1_000_000)
        self.min_size_spin.setValue(20)
        self.min_size_spin.setToolTip("Remove cells (or pieces) smaller than this many pixels")
        self.min_size_spin.valueChanged.connect(self._on_slider)
        form.addRow("Min size (px)", self.min_size_spin)
        self.all_planes_check = QCheckBox("all planes of a stack")
        self.all_planes_check.setToolTip("Segment every plane of a 3D or time stack (otherwise the current one)")
        form.addRow("", self.all_planes_check)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Run the network on the image (once; thresholds are applied live)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.mode_combo.currentIndexChanged.connect(self._on_mode_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)

    def _fill_models(self) -> None:
        from napari_cellseg.core.models import catalogue

        self.model_combo.clear()
        self.model_combo.addItem(f"session: {self.session.model_name}", SESSION)
        try:
            names = list(catalogue())
        except Exception:  # a broken adapter provider must not break the widget
            names = []
        for name in names:
            self.model_combo.addItem(name, name)

    def _on_session_model(self, name: str) -> None:
        self.model_combo.setItemText(0, f"session: {name}")

    def _on_mode_changed(self, *_) -> None:
        mode = self.mode
        for name, (label, slider) in self._slider_rows.items():
            visible = mode in SLIDERS[name][2]
            label.setVisible(visible)
            slider.setVisible(visible)
        self.points_spin.setEnabled(mode == "grid")
        self.max_area_spin.setEnabled(mode == "grid")
        self.draw_combo.setEnabled(mode == "guided")
        self.views_combo.setEnabled(mode == "guided")
        self.invert_check.setEnabled(mode == "guided")
        self.auto_zoom_check.setEnabled(mode != "grid")
        self.zoom_views_check.setEnabled(mode != "grid")
        self.scale_spin.setEnabled(mode != "grid" and not self.auto_zoom_check.isChecked())

    def _refresh_images(self, *_) -> None:
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        for name in names or [NO_IMAGE]:
            self.image_combo.addItem(name)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        self._outputs = {k: v for k, v in self._outputs.items() if v in self.viewer.layers}

    # ------------------------------------------------------------------ state

    @property
    def mode(self) -> str:
        return self.mode_combo.currentData()

    def set_model(self, model) -> None:
        """Use this loaded model instead of loading one by name (scripts, tests); None to undo."""
        self._model_override = model

    def thresholds(self) -> dict:
        """The slider values of the current mode, as settings of :func:`automatic.make_config`."""
        mode = self.mode
        out = {name: s.value() for name, s in self.sliders.items() if mode in SLIDERS[name][2]}
        if mode == "grid":
            out["min_area"] = self.min_size_spin.value()
            out["points_per_side"] = self.points_spin.value()
            out["max_area_fraction"] = self.max_area_spin.value() / 100.0
        else:
            out["min_size"] = self.min_size_spin.value()
            out["scale"] = auto.AUTO_SCALE if self.auto_zoom_check.isChecked() else float(self.scale_spin.value())
            if self.zoom_views_check.isChecked():
                out["zoom_views"] = ZOOM_VIEWS
        if mode == "guided":
            out["views"] = int(self.views_combo.currentData())
            out["invert"] = self.invert_check.isChecked()
        return out

    def _image_layer(self) -> Image | None:
        name = self.image_combo.currentText()
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            return self.viewer.layers[name]
        return None

    def _spatial_ndim(self, layer: Image) -> int:
        return layer.ndim  # napari's ndim excludes the RGB axis

    def _current_plane(self, layer: Image) -> tuple[int, ...]:
        nd = self._spatial_ndim(layer)
        if nd == 2:
            return ()
        point = np.asarray(self.viewer.dims.point, float)
        data_pt = np.asarray(layer.world_to_data(point[-nd:]), float)
        shape = layer.data.shape
        return tuple(int(np.clip(round(v), 0, shape[i] - 1)) for i, v in enumerate(data_pt[: nd - 2]))

    def _plane_indices(self, layer: Image) -> list[tuple[int, ...]]:
        nd = self._spatial_ndim(layer)
        if nd == 2:
            return [()]
        if self.all_planes_check.isChecked():
            return [tuple(int(i) for i in idx) for idx in np.ndindex(*layer.data.shape[: nd - 2])]
        return [self._current_plane(layer)]

    def _plane_copies(self, layer: Image, planes) -> list[np.ndarray]:
        """Copies of the planes for the worker (never views of the live layer data)."""
        data = layer.data[0] if layer.multiscale else layer.data
        return [np.array(data[idx] if idx else data, copy=True) for idx in planes]

    def _loader(self, mode: str):
        override = self._model_override
        choice = self.model_combo.currentData()
        session = self.session
        mark_distance = self.distance_check.isChecked()
        draw = self.draw_combo.currentData()

        def load():
            from napari_cellseg.core.models import load_model

            if override is not None:
                model = override
            elif choice == SESSION:
                model = session.load()
            else:
                model = load_model(choice, device=session.device, progress=False)
            if mark_distance and not auto.is_distance_model(model):
                model = auto.as_distance_model(model)
            prompt_model = None
            if mode == "guided" and draw == "session" and override is None:
                prompt_model = session.load()
            return model, prompt_model

        return load

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        """Start the network on the chosen image in a worker."""
        if self._worker is not None:
            return
        layer = self._image_layer()
        if layer is None:
            show_error("Automatic segmentation: add an image layer first")
            return
        mode = self.mode
        planes = self._plane_indices(layer)
        try:
            data = self._plane_copies(layer, planes)
        except Exception as exc:
            show_error(f"Automatic segmentation: could not read the image ({exc})")
            return
        settings = self.thresholds()
        if settings.get("scale", 1.0) != auto.AUTO_SCALE:  # an estimate is known when the run returns
            self._scale_of_run = settings.get("scale", 1.0)
        at_defaults = all(abs(settings.get(k, SLIDERS[k][1]) - SLIDERS[k][1]) < 1e-9 for k in ("peak", "fill"))
        worker = thread_worker(
            _segment_planes,
            start_thread=False,
            connect={
                "yielded": self._on_progress,
                "returned": lambda out, _l=layer, _p=planes, _m=mode: self._on_returned(out, _l, _p, _m),
                "errored": self._on_error,
                "aborted": self._on_aborted,
                "finished": self._on_finished,
            },
        )(self._loader(mode), data, mode, settings, at_defaults and mode != "grid")
        self._worker = worker
        self._set_running(True)
        self.status.setText(f"{mode} mode: starting on {layer.name} ({len(planes)} plane{'s' * (len(planes) > 1)})")
        worker.start()

    def cancel(self) -> None:
        """Stop the running worker at its next progress report."""
        if self._worker is not None:
            self._worker.quit()
            self.status.setText("cancelling...")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in (self.image_combo, self.mode_combo, self.model_combo, self.distance_check, self.draw_combo,
                  self.views_combo, self.invert_check, self.points_spin, self.max_area_spin, self.all_planes_check,
                  self.auto_zoom_check, self.scale_spin, self.zoom_views_check):
            w.setEnabled(not running)
        if not running:
            self._on_mode_changed()
        else:
            self.progress.setValue(0)

    def _on_progress(self, record) -> None:
        if isinstance(record, Progress):
            self.progress.setValue(int(record.fraction * 1000))
            self.status.setText(record.message)

    def _on_error(self, exc: Exception) -> None:
        show_error(f"Automatic segmentation failed: {exc}")
        self.status.setText(f"failed: {exc}")

    def _on_aborted(self) -> None:
        self.status.setText("cancelled")
        self.progress.setValue(0)

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)

    def _on_returned(self, out, layer: Image, planes, mode: str) -> None:
        results, description = out
        self._results = list(results)
        self._planes = list(planes)
        self._source = layer
        self._mode_of_results = mode
        self.progress.setValue(1000)
        th = self._results[0].thresholds if self._results else {}
        for key in ("peak", "fill"):
            if key in th and key in self.sliders:
                slider = self.sliders[key].slider
                slider.blockSignals(True)
                self.sliders[key].setValue(float(th[key]))
                self.sliders[key].number.setText(f"{float(th[key]):.2f}")
                slider.blockSignals(False)
        estimates = [r.size_estimate for r in self._results if r.size_estimate is not None]
        if estimates:  # the zoom the estimate chose (the first plane's), where the user can start from
            self._scale_of_run = estimates[0].scale
            self.scale_spin.blockSignals(True)
            self.scale_spin.setValue(estimates[0].scale)
            self.scale_spin.blockSignals(False)
        self._write(layer, mode)
        seconds = sum(r.seconds for r in results)
        self.status.setText(self._summary() + f" - {description}, {seconds:.1f} s")
        empty = [r.message for r in results if r.message]
        if empty and all(r.n_cells == 0 for r in results):
            show_info(f"Automatic segmentation: {empty[0]}")

    # ------------------------------------------------------------------ output

    def output_layer(self, layer: Image | None = None, mode: str | None = None) -> Labels | None:
        """The Labels layer this widget wrote for an image and mode, if it still exists."""
        layer = layer or self._source
        mode = mode or getattr(self, "_mode_of_results", self.mode)
        if layer is None:
            return None
        out = self._outputs.get((id(layer), mode))
        return out if out is not None and out in self.viewer.layers else None

    def _write(self, layer: Image, mode: str) -> None:
        out = self.output_layer(layer, mode)
        data = layer.data[0] if layer.multiscale else layer.data
        spatial = tuple(data.shape[: layer.ndim])  # napari's ndim leaves out the RGB axis
        if out is None or tuple(out.data.shape) != tuple(spatial):
            data = np.zeros(spatial, np.int32)
            for idx, res in zip(self._planes, self._results):
                data[idx] = res.labels
            out = self.viewer.add_labels(
                data, name=f"{layer.name} {mode} labels", scale=layer.scale, translate=layer.translate,
                metadata={METADATA_KEY: {"source": layer.name, "mode": mode}},
            )
            self._outputs[(id(layer), mode)] = out
        else:
            for idx, res in zip(self._planes, self._results):
                out.data[idx] = res.labels
            out.refresh()

    def _summary(self) -> str:
        if not self._results:
            return ""
        if len(self._results) == 1:
            return self._results[0].summary()
        cells = sum(r.n_cells for r in self._results)
        empty = sum(1 for r in self._results if r.n_cells == 0)
        text = f"{cells} cells in {len(self._results)} planes"
        if empty:
            first = next(r.message for r in self._results if r.n_cells == 0)
            text += f" ({empty} empty: {first})"
        return text

    def _on_slider(self, *_) -> None:
        if self._results:
            self._relabel_timer.start()

    def _on_auto_zoom(self, checked: bool) -> None:
        self.scale_spin.setEnabled(not checked and self.mode != "grid")
        if not checked:
            self._on_zoom_changed(self.scale_spin.value())

    def _on_zoom_changed(self, value: float) -> None:
        """A new zoom needs a new map: say so (the sliders keep working on the last run's map)."""
        if self._results and self._worker is None and self._mode_of_results != "grid":
            note = "" if abs(value - self._scale_of_run) < 1e-9 else (
                f" (zoom {self._scale_of_run:g} - press Run to map the image at zoom {value:g})")
            self.status.setText(self._summary() + note)

    def apply_thresholds(self) -> float:
        """Re-apply the sliders to the cached results (no network) and update the layer; returns ms."""
        if not self._results or self._source is None:
            return 0.0
        mode = self._mode_of_results
        values = {name: s.value() for name, s in self.sliders.items() if mode in SLIDERS[name][2]}
        t0 = time.perf_counter()
        try:
            for res in self._results:
                if mode == "distance":
                    peak = values["peak"]
                    fill = min(values["fill"], peak)
                    res.relabel(peak=peak, fill=fill, min_size=self.min_size_spin.value())
                elif mode == "grid":
                    res.relabel(probability=values["probability"], stability=values["stability"],
                                nms_iou=values["nms_iou"], min_area=self.min_size_spin.value())
                else:
                    res.relabel(probability=values["probability"], min_size=self.min_size_spin.value())
        except ValueError as exc:
            self.status.setText(str(exc))
            return 0.0
        out = self.output_layer(self._source, mode)
        if out is None:
            self._write(self._source, mode)
        else:
            for idx, res in zip(self._planes, self._results):
                out.data[idx] = res.labels
            out.refresh()
        self.last_relabel_ms = (time.perf_counter() - t0) * 1000
        note = ""
        if mode == "guided" and any(abs(values[k] - self._results[0].thresholds.get(k, values[k])) > 1e-9
                                    for k in ("peak", "fill")):
            note = " (peak and fill change the prompts: press Run)"
        elif mode == "grid":
            # the run drew masks only above its probability floor: lower thresholds need a new run
            floor_note = next((r.note for r in self._results if getattr(r, "note", "")), "")
            if floor_note:
                note = f" ({floor_note})"
        self.status.setText(f"{self._summary()} - updated in {self.last_relabel_ms:.0f} ms{note}")
        return self.last_relabel_ms

    def cleanup(self) -> None:
        """Disconnect from the viewer and the session (called when the widget closes)."""
        self.cancel()
        try:
            self.session.model_changed.disconnect(self._on_session_model)
            self.viewer.layers.events.inserted.disconnect(self._refresh_images)
            self.viewer.layers.events.removed.disconnect(self._refresh_images)
        except (TypeError, ValueError, RuntimeError):
            pass

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.cleanup()
        super().closeEvent(event)
