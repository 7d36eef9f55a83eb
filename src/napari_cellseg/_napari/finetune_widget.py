"""Fine-tune on the labels painted in the viewer: pick layers, recipe and budget, train in a worker.

The widget fills a :class:`~napari_cellseg.core.finetune.FinetuneConfig`, copies
the chosen layers' data, and drives the core generator
(:class:`~napari_cellseg.core.finetune.Finetuner`) in a napari
``thread_worker``: each yielded progress record moves the progress bar and the
live loss curve; the returned result is saved as an adapter and selected as the
viewer's model (so the annotation and automatic widgets use it at once);
Cancel quits the worker and keeps the best model so far.
"""

from __future__ import annotations

import re

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cellseg._napari.session import session_for

REGION_WHOLE = "whole image"
REGION_EXTENT = "labels' extent"
REGION_SHAPES = "Shapes rectangle"
NO_LAYER = "(none)"


class LossPlot(QWidget):
    """A small live plot: training loss (blue line) and validation AP@0.5 (orange dots, 0-1 scale)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(110)
        self.losses: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def clear(self) -> None:
        self.losses.clear()
        self.val.clear()
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        if loss is not None and np.isfinite(loss):
            self.losses.append((int(step), float(loss)))
            self.update()

    def add_val(self, step: int, ap: float) -> None:
        self.val.append((int(step), float(ap)))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        w, h = self.width(), self.height()
        pad = 6
        painter.fillRect(0, 0, w, h, QColor(30, 30, 35))
        painter.setPen(QPen(QColor(90, 90, 100), 1))
        painter.drawRect(pad, pad, w - 2 * pad, h - 2 * pad)
        if not self.losses and not self.val:
            painter.setPen(QColor(150, 150, 160))
            painter.drawText(self.rect(), Qt.AlignCenter, "loss curve")
            painter.end()
            return
        steps = [s for s, _ in self.losses] + [s for s, _ in self.val]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)

        def x(step):
            return pad + (w - 2 * pad) * (step - s0) / (s1 - s0)

        if self.losses:
            values = np.array([v for _, v in self.losses])
            # a running mean keeps the curve readable with random prompts per step
            k = max(1, len(values) // 30)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid") if len(values) >= k else values
            lo, hi = float(smooth.min()), float(smooth.max())
            hi = hi if hi > lo else lo + 1e-6
            pts = [QPointF(x(self.losses[i + k - 1][0]), h - pad - (h - 2 * pad) * (v - lo) / (hi - lo))
                   for i, v in enumerate(smooth)]
            painter.setPen(QPen(QColor(80, 160, 255), 2))
            painter.drawPolyline(QPolygonF(pts))
            painter.setPen(QColor(180, 180, 190))
            painter.drawText(pad + 4, pad + 14, f"loss {smooth[-1]:.3g}")
        if self.val:
            painter.setPen(QPen(QColor(255, 160, 60), 6))
            for step, ap in self.val:
                painter.drawPoint(QPointF(x(step), h - pad - (h - 2 * pad) * ap))
            painter.setPen(QColor(255, 180, 90))
            painter.drawText(w - pad - 110, pad + 14, f"val AP {self.val[-1][1]:.2f}")
        painter.end()


def _train_job(base_name: str, device: str, images, labels, roi, exclude, validation, config, holder: dict):
    """Worker body: load the base model, check the data, train (yields Progress, returns the result)."""
    from napari_cellseg.core import finetune as ft
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.progress import Progress

    yield Progress(0, 0, f"loading {base_name}")
    base = load_model(base_name, device=device, progress=False)
    yield Progress(0, 0, "checking the labels")
    data = ft.make_training_data(images, labels, roi=roi, exclude=exclude)
    val = None
    if validation is not None:
        val = ft.make_training_data(validation[0], validation[1], roi=validation[2], min_cells=1)
    trainer = ft.Finetuner(base, data, config, val)
    holder["trainer"] = trainer
    result = yield from trainer.run()
    return result


def _sanitize(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return name[:60] or "finetuned"


class FinetuneWidget(QWidget):
    """Fine-tune the selected model on an image and its Labels layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self._worker = None
        self._holder: dict = {}
        self._name = ""
        self._overwrite = False
        self._saved = False

        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Instance labels painted on the image: each cell its own label")
        self.region_combo = QComboBox()
        self.region_combo.addItems([REGION_WHOLE, REGION_EXTENT, REGION_SHAPES])
        self.region_combo.setToolTip(
            "Where every cell is labelled. Unlabelled pixels outside it are ignored, so cells you did not "
            "annotate are not taught as background")
        self.shapes_combo = QComboBox()
        self.val_combo = QComboBox()
        self.val_combo.setToolTip(
            "Optional Labels layer with held-out cells on the same image (their bounding box is left out of "
            "training): validation AP, best-model choice and early stopping")
        self.val_planes = QLineEdit()
        self.val_planes.setPlaceholderText("e.g. 3, 7 (stacks only)")
        self.val_planes.setToolTip("Planes of a stack held out for validation instead of training")
        self.recipe_combo = QComboBox()
        # distance first: in minutes on a CPU it is the recipe that pays (docs/finetuning.md, one-image benchmark)
        self.recipe_combo.addItem("distance map (automatic modes and clicks)", "distance")
        self.recipe_combo.addItem("prompt (clicks, boxes, grid; needs long runs)", "prompt")
        self.recipe_combo.addItem("joint (clicks, boxes and automatic)", "joint")
        self.recipe_combo.setToolTip(
            "distance: SAMCell distance maps, for the automatic distance and guided modes; clicks are then answered "
            "from the map. Start here: on nuclei the default model never saw, 3 minutes on one image with 36 "
            "nuclei raised AP@0.5 from 0.49 to 0.82 on 21 held-out images of that kind (docs/finetuning.md).\n"
            "prompt: CellSeg1 LoRA for clicks, boxes and the grid mode. With the image encoder frozen it needs far "
            "more than minutes on a CPU (in 3 minutes clicks did not improve); use a GPU or a long run.\n"
            "joint: both in one model (every mode works with it; slowest per step)")
        self.base_combo = QComboBox()
        self.base_combo.setEditable(True)
        self.base_combo.setToolTip("Model to start from (a catalogue name or a checkpoint path); a fine-tuned "
                                   "model continues its training")
        self.budget_combo = QComboBox()
        self.budget_combo.addItems(["minutes", "epochs"])
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.5, 24 * 60)
        self.minutes_spin.setValue(10.0)
        self.minutes_spin.setSuffix(" min")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 100000)
        self.epochs_spin.setValue(20)
        self.encoder_check = QCheckBox("also LoRA in the image encoder (slow on a CPU)")
        self.encoder_blocks_spin = QSpinBox()
        self.encoder_blocks_spin.setRange(0, 64)
        self.encoder_blocks_spin.setValue(0)
        self.encoder_blocks_spin.setSpecialValueText("every block")
        self.encoder_blocks_spin.setPrefix("last ")
        self.encoder_blocks_spin.setSuffix(" blocks")
        self.encoder_blocks_spin.setToolTip(
            "Where the encoder LoRA goes. 'every block': the whole encoder runs in every step (a GPU's job). "
            "The last N attention blocks: the encoder up to them runs once per view and is cached, so each step "
            "costs only those blocks (LiteMedSAM has 10, vit_b 12; on a 2-core CPU the last 8 of LiteMedSAM's "
            "cost about 1.7 s per step of 2 views)")
        self.encoder_blocks_spin.setEnabled(False)
        self.encoder_check.toggled.connect(self.encoder_blocks_spin.setEnabled)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name of the new model")
        self.overwrite_check = QCheckBox("replace a model of the same name")
        self.train_btn = QPushButton("Train")
        self.train_btn.clicked.connect(self.start)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop and keep the best model so far")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.plot = LossPlot()

        budget_row = QHBoxLayout()
        budget_row.addWidget(self.budget_combo)
        budget_row.addWidget(self.minutes_spin)
        budget_row.addWidget(self.epochs_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_btn)
        buttons.addWidget(self.cancel_btn)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Region", self.region_combo)
        form.addRow("Rectangle", self.shapes_combo)
        form.addRow("Held-out cells", self.val_combo)
        form.addRow("Held-out planes", self.val_planes)
        form.addRow("Recipe", self.recipe_combo)
        form.addRow("Base model", self.base_combo)
        form.addRow("Budget", budget_row)
        form.addRow("", self.encoder_check)
        form.addRow("Encoder LoRA in", self.encoder_blocks_spin)
        form.addRow("New model", self.name_edit)
        form.addRow("", self.overwrite_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.budget_combo.currentIndexChanged.connect(self._on_budget)
        self.region_combo.currentIndexChanged.connect(self._on_region)
        self.image_combo.currentIndexChanged.connect(self._suggest_name)
        self.recipe_combo.currentIndexChanged.connect(self._suggest_name)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh_layers)
        self.session.model_changed.connect(self._on_model_changed)
        self.refresh_layers()
        self.refresh_models()
        self._on_budget()
        self._on_region()

    # -- choices -----------------------------------------------------------------

    def _layers(self, kind: str) -> list[str]:
        from napari.layers import Image, Labels, Shapes

        cls = {"image": Image, "labels": Labels, "shapes": Shapes}[kind]
        return [layer.name for layer in self.viewer.layers if isinstance(layer, cls)]

    @staticmethod
    def _fill(combo: QComboBox, names: list[str], optional: bool = False) -> None:
        current = combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        if optional:
            combo.addItem(NO_LAYER)
        combo.addItems(names)
        idx = combo.findText(current)
        combo.setCurrentIndex(idx if idx >= 0 else 0)
        combo.blockSignals(False)

    def refresh_layers(self, *_) -> None:
        """Re-list the viewer's layers in the layer choices."""
        self._fill(self.image_combo, self._layers("image"))
        labels = self._layers("labels")
        self._fill(self.labels_combo, labels)
        self._fill(self.val_combo, labels, optional=True)
        self._fill(self.shapes_combo, self._layers("shapes"))
        self._suggest_name()

    def refresh_models(self) -> None:
        """Re-read the catalogue; the default base is the viewer's selected model."""
        from napari_cellseg.core.models import catalogue

        self.base_combo.blockSignals(True)
        self.base_combo.clear()
        names = list(catalogue())
        self.base_combo.addItems(names)
        current = self.session.model_name
        if current not in names:
            self.base_combo.addItem(current)
        self.base_combo.setCurrentText(current)
        self.base_combo.blockSignals(False)

    def _on_model_changed(self, name: str) -> None:
        if self._worker is None:
            self.refresh_models()

    def _on_budget(self, *_) -> None:
        minutes = self.budget_combo.currentText() == "minutes"
        self.minutes_spin.setVisible(minutes)
        self.epochs_spin.setVisible(not minutes)

    def _on_region(self, *_) -> None:
        self.shapes_combo.setEnabled(self.region_combo.currentText() == REGION_SHAPES)

    def _suggest_name(self, *_) -> None:
        if self.name_edit.isModified():
            return
        image = self.image_combo.currentText() or "cells"
        self.name_edit.setText(_sanitize(f"{image}-{self.recipe_combo.currentData()}"))

    # -- building the job ----------------------------------------------------------

    def _layer(self, name: str):
        if not name or name == NO_LAYER or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _rectangle(self, labels_layer):
        """(r0, c0, r1, c1) in the labels' data coordinates from the chosen Shapes layer."""
        shapes = self._layer(self.shapes_combo.currentText())
        if shapes is None or len(shapes.data) == 0:
            raise ValueError("choose a Shapes layer holding a rectangle around the annotated cells")
        selected = sorted(shapes.selected_data)
        verts = np.asarray(shapes.data[selected[0] if selected else len(shapes.data) - 1], float)
        try:
            world = np.array([shapes.data_to_world(v) for v in verts])
            verts = np.array([labels_layer.world_to_data(v) for v in world])
        except (AttributeError, ValueError, IndexError):
            pass
        rc = verts[:, -2:]
        return [rc[:, 0].min(), rc[:, 1].min(), rc[:, 0].max(), rc[:, 1].max()]

    def _image_data(self, layer) -> np.ndarray:
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        return np.array(data, copy=True)

    def _planes(self, text: str, n: int) -> list[int]:
        out = []
        for part in text.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 0 <= int(part) < n:
                raise ValueError(f"held-out plane {part!r} is not a plane number between 0 and {n - 1}")
            out.append(int(part))
        return out

    def collect(self) -> dict:
        """Copies of the layer data and the settings of a run (raises ValueError with a message)."""
        from napari_cellseg.core.finetune import FinetuneConfig, adapter_paths, check_adapter_name

        image_layer = self._layer(self.image_combo.currentText())
        labels_layer = self._layer(self.labels_combo.currentText())
        if image_layer is None or labels_layer is None:
            raise ValueError("open an image and paint its cells in a Labels layer, then choose both here")
        image = self._image_data(image_layer)
        labels = np.array(labels_layer.data, copy=True)
        rgb = bool(getattr(image_layer, "rgb", False))
        if image.ndim - (1 if rgb else 0) == labels.ndim + 1:
            # a stack with 2D labels: train on the plane shown
            z = int(self.viewer.dims.current_step[0])
            image = image[z]
        region = self.region_combo.currentText()
        roi = None if region == REGION_WHOLE else "extent" if region == REGION_EXTENT else \
            self._rectangle(labels_layer)
        validation = None
        exclude = None
        val_layer = self._layer(self.val_combo.currentText())
        if val_layer is not None:
            if val_layer is labels_layer:
                raise ValueError("the held-out cells must be in another Labels layer than the training labels")
            val = np.array(val_layer.data, copy=True)
            if val.shape != labels.shape:
                raise ValueError(f"held-out labels {val.shape} and training labels {labels.shape} differ in shape")
            if not val.any():
                raise ValueError(f"the held-out Labels layer {val_layer.name!r} has no cells")
            validation = (image, val, "extent")
            exclude = val  # the held-out cells' bounding box is left out of training
        planes_text = self.val_planes.text().strip()
        if planes_text:
            if labels.ndim != 3:
                raise ValueError("held-out planes need a stack of labels (planes, rows, columns)")
            held = self._planes(planes_text, labels.shape[0])
            keep = [z for z in range(labels.shape[0]) if z not in held]
            if validation is not None:
                raise ValueError("hold out either cells (a Labels layer) or planes, not both")
            validation = (image[held], labels[held], None)
            image, labels = image[keep], labels[keep]
        name = self.name_edit.text().strip()
        check_adapter_name(name)
        st, js = adapter_paths(name)
        base = self.base_combo.currentText().strip()
        overwrite = self.overwrite_check.isChecked() or name == base
        if (st.exists() or js.exists()) and not overwrite:
            raise ValueError(f"a model named {name!r} exists: choose another name or tick 'replace'")
        minutes = self.budget_combo.currentText() == "minutes"
        config = FinetuneConfig(
            recipe=self.recipe_combo.currentData(),
            minutes=float(self.minutes_spin.value()) if minutes else None,
            epochs=None if minutes else int(self.epochs_spin.value()),
            encoder_lora=self.encoder_check.isChecked(),
            encoder_lora_blocks=(self.encoder_blocks_spin.value() or None) if self.encoder_check.isChecked() else None,
            device=self.session.device,
        )
        return {"base": base, "device": self.session.device, "images": image, "labels": labels, "roi": roi,
                "exclude": exclude, "validation": validation, "config": config, "name": name,
                "overwrite": overwrite}

    # -- running ---------------------------------------------------------------------

    def start(self) -> None:
        """Check the choices and train in a worker."""
        from napari.qt.threading import thread_worker

        if self._worker is not None:
            return
        try:
            job = self.collect()
        except (ValueError, TypeError) as exc:
            show_error(f"napari-cellseg fine-tuning: {exc}")
            return
        self._holder = {}
        self._name = job["name"]
        self._overwrite = job["overwrite"]
        self._saved = False
        self.plot.clear()
        self.progress.setRange(0, 0)
        self.status.setText("starting…")
        # errored is connected at creation: the error becomes one notification, not a re-raise
        connect = {"yielded": self._on_progress, "returned": self._on_returned, "errored": self._on_error,
                   "aborted": self._on_aborted, "finished": self._on_finished}
        worker = thread_worker(_train_job, start_thread=False, connect=connect)(
            job["base"], job["device"], job["images"], job["labels"], job["roi"], job["exclude"],
            job["validation"], job["config"], self._holder)
        self._worker = worker
        self._set_running(True)
        worker.start()

    def cancel(self) -> None:
        """Stop training at the next step; the best model so far is saved."""
        if self._worker is not None:
            self.status.setText("stopping…")
            self.cancel_btn.setEnabled(False)
            self._worker.quit()

    def _set_running(self, running: bool) -> None:
        self.train_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        for w in (self.image_combo, self.labels_combo, self.region_combo, self.shapes_combo, self.val_combo,
                  self.val_planes, self.recipe_combo, self.base_combo, self.budget_combo, self.minutes_spin,
                  self.epochs_spin, self.encoder_check, self.name_edit, self.overwrite_check):
            w.setEnabled(not running)
        self.encoder_blocks_spin.setEnabled(not running and self.encoder_check.isChecked())
        if not running:
            self._on_region()

    def _on_progress(self, record) -> None:
        if record.total > 0:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * record.fraction))
        else:
            self.progress.setRange(0, 0)
        self.status.setText(record.message)
        data = record.data or {}
        if data.get("loss") is not None:
            self.plot.add_loss(record.step, data["loss"])
        if data.get("val_ap") is not None:
            self.plot.add_val(record.step, data["val_ap"])

    def _save(self, result, how: str) -> None:
        from napari_cellseg.core.finetune import save_adapter

        if result is None or result.meta["metrics"]["steps"] == 0:
            self.status.setText(f"{how} before any training step: nothing was saved")
            show_info("napari-cellseg: fine-tuning stopped before training; nothing was saved")
            return
        try:
            save_adapter(result, self._name, overwrite=self._overwrite)
        except (OSError, ValueError) as exc:
            show_error(f"napari-cellseg: could not save the model {self._name!r}: {exc}")
            self.status.setText(f"not saved: {exc}")
            return
        self._saved = True
        m = result.meta["metrics"]
        val = f", validation AP@0.5 {m['best_val_ap']:.2f}" if m.get("best_val_ap") is not None else ""
        self.status.setText(f"{how}: saved {self._name!r} after {m['steps']} steps ({m['seconds']:.0f} s{val}); "
                            "it is now the selected model")
        self.session.select(self._name)
        self.refresh_models()
        show_info(f"napari-cellseg: fine-tuned model {self._name!r} saved and selected")

    def _on_returned(self, result) -> None:
        self._save(result, result.stopped if result is not None else "finished")

    def _on_aborted(self) -> None:
        trainer = self._holder.get("trainer")
        self._save(trainer.best_result() if trainer is not None else None, "cancelled")

    def _on_error(self, exc: Exception) -> None:
        show_error(f"napari-cellseg fine-tuning failed: {exc}")
        self.status.setText(f"failed: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self._saved else 0)
        self._set_running(False)
