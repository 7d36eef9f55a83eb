"""Measure cells: per-cell table into the Labels layer's features, summary, area histogram, CSV export.

All computation is :mod:`napari_cellseg.core.measure`; this widget picks the
layers, runs the measurement in a thread worker on copies of the data, writes
the table into ``layer.features`` on the main thread and draws a histogram of
cell areas with QPainter (napari ships no plotting library).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QPainter, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_cellseg.core import measure

NO_IMAGE = "(none)"
HISTOGRAM_SIZE = (280, 120)


def _measure_job(labels: np.ndarray, intensity, scale, distance: int):
    """Worker body: the table and its summary (runs off the GUI thread, on copies)."""
    table = measure.measure_cells(labels, intensity, scale=scale, neighbor_distance=distance)
    return table, measure.summarize(table, labels)


def _unit_name(layer) -> str:
    """Short name of the layer's spatial unit ('µm'), or 'units' when it has none."""
    try:
        unit = layer.units[-1]
        text = format(unit, "~")
    except (AttributeError, IndexError, TypeError, ValueError):
        return "units"
    return "units" if text in ("", "px", "pixel") else text


def _layer_scale(layer) -> tuple[float | None, str]:
    """(pixel size or None, unit) of a 2D layer; None (pixels) for unit or anisotropic scales."""
    row, col = (float(v) for v in layer.scale[-2:])
    if row == 1.0 and col == 1.0:
        return None, "px"
    if not np.isclose(row, col, rtol=1e-9, atol=0):
        return None, "px"
    return row, _unit_name(layer)


def draw_histogram(values: np.ndarray, width: int = HISTOGRAM_SIZE[0], height: int = HISTOGRAM_SIZE[1],
                   label: str = "") -> QPixmap:
    """Bar chart of a histogram of ``values`` with the range written under it."""
    pixmap = QPixmap(width, height)
    pixmap.fill(QColor("white"))
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    painter = QPainter(pixmap)
    try:
        text_h = 16
        top = text_h  # a line for the bar scale above the bars
        plot_h = height - 2 * text_h - 4
        painter.setPen(QColor("black"))
        if values.size == 0:
            painter.drawText(pixmap.rect(), int(Qt.AlignCenter), "no cells")
            return pixmap
        bins = int(np.clip(np.sqrt(values.size) * 2, 1, 30))
        counts, edges = np.histogram(values, bins=bins)
        bar_w = (width - 8) / len(counts)
        highest = counts.max()
        painter.setBrush(QColor(70, 130, 180))
        for i, c in enumerate(counts):
            h = int(round(plot_h * c / highest)) if highest else 0
            x = 4 + i * bar_w
            painter.drawRect(int(x), top + plot_h - h, max(1, int(bar_w) - 1), h)
        painter.drawLine(4, top + plot_h, width - 4, top + plot_h)
        painter.drawText(4, height - 4, f"{edges[0]:.4g}")
        right = f"{edges[-1]:.4g}"
        painter.drawText(width - 4 - painter.fontMetrics().horizontalAdvance(right), height - 4, right)
        if label:
            mid = painter.fontMetrics().horizontalAdvance(label)
            painter.drawText((width - mid) // 2, height - 4, label)
        painter.drawText(4, text_h - 4, f"tallest bar: {int(highest)} cells")
    finally:
        painter.end()
    return pixmap


class MeasureWidget(QWidget):
    """Measure every cell of a Labels layer.

    The table (area, perimeter, circularity, neighbours, ... see
    :mod:`napari_cellseg.core.measure`) goes into the layer's ``features``,
    indexed by label, so napari shows it when hovering a cell; a summary line
    and a histogram of areas appear below, and "Export CSV" saves the table.
    Areas and lengths are in the layer's physical units when its scale is
    isotropic and not 1, in pixels otherwise.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self.table: dict | None = None
        self.summary: measure.MeasureSummary | None = None
        #: called to ask for a CSV path; returns '' when cancelled (replaceable in tests)
        self.ask_save_path = self._dialog_save_path

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Labels layer to measure (2D)")
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Optional single-channel image for the mean intensity of each cell")
        self.distance_spin = QSpinBox()
        self.distance_spin.setRange(0, 100)
        self.distance_spin.setValue(measure.DEFAULT_NEIGHBOR_DISTANCE)
        self.distance_spin.setSuffix(" px")
        self.distance_spin.setToolTip(
            "Cells are grown by this many pixels; cells whose grown regions touch are neighbours "
            "(cells up to twice this distance apart)"
        )
        self.measure_button = QPushButton("Measure")
        self.measure_button.clicked.connect(lambda _checked=False: self.measure())
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # busy indicator
        self.progress.setVisible(False)
        self.summary_label = QLabel("not measured yet")
        self.summary_label.setWordWrap(True)
        self.histogram_label = QLabel()
        self.histogram_label.setMinimumSize(*HISTOGRAM_SIZE)
        self.histogram_label.setToolTip("Histogram of cell areas")
        self.export_button = QPushButton("Export CSV…")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(lambda _checked=False: self.export_csv())

        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        form.addRow("Intensity image", self.image_combo)
        form.addRow("Neighbour distance", self.distance_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.measure_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.summary_label)
        layout.addWidget(self.histogram_label)
        layout.addWidget(self.export_button)
        layout.addStretch(1)

        events = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered", "renamed"):
            emitter = getattr(events, name, None)  # not every napari version has all four
            if emitter is not None:
                emitter.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers

    def _refresh_layers(self, event=None) -> None:
        for combo, kind, extra in ((self.labels_combo, Labels, []), (self.image_combo, Image, [NO_IMAGE])):
            current = combo.currentText()
            names = extra + [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif kind is Labels and names:
                combo.setCurrentIndex(len(names) - 1)  # the newest labels layer
            combo.blockSignals(False)

    def _layer(self, name: str, kind):
        if name and name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            return self.viewer.layers[name]
        return None

    # ------------------------------------------------------------------ measuring

    def measure(self):
        """Start measuring the chosen Labels layer; returns the worker (None if nothing to do)."""
        layer = self._layer(self.labels_combo.currentText(), Labels)
        if layer is None:
            show_info("Add or choose a Labels layer to measure.")
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        labels = np.array(data, copy=True)
        if labels.ndim != 2:
            show_error(
                f"Measure works on 2D label layers; {layer.name!r} has shape {labels.shape}. "
                "Take one plane of the stack as its own Labels layer."
            )
            return None
        intensity = None
        image_layer = self._layer(self.image_combo.currentText(), Image)
        if image_layer is not None:
            image_data = image_layer.data[0] if image_layer.multiscale else image_layer.data
            intensity = np.array(image_data, copy=True)
            if image_layer.rgb or intensity.shape != labels.shape:
                show_error(
                    f"Image {image_layer.name!r} (shape {intensity.shape}) does not fit labels of shape "
                    f"{labels.shape}: choose a single-channel image of the same size, or '(none)'."
                )
                return None
        scale, unit = _layer_scale(layer)
        note = ""
        sr, sc = (float(v) for v in layer.scale[-2:])
        if scale is None and not (sr == 1.0 and sc == 1.0):
            note = f" (in pixels: the layer scale {sr:g} x {sc:g} is not isotropic)"

        self.measure_button.setEnabled(False)
        self.progress.setVisible(True)
        self.summary_label.setText(f"measuring {layer.name}…")
        worker = thread_worker(
            _measure_job,
            connect={
                "returned": lambda result: self._on_returned(layer, result, unit, note),
                "errored": self._on_errored,
                "finished": self._on_finished,
            },
        )(labels, intensity, scale, self.distance_spin.value())
        self._worker = worker
        return worker

    def _on_returned(self, layer, result, unit: str, note: str) -> None:
        table, summary = result
        self.table = table
        self.summary = summary
        if layer in self.viewer.layers:
            import pandas as pd

            features = pd.DataFrame({"index": table["label"], **table})
            layer.features = features
        area_unit = f"{unit}²"
        self.summary_label.setText(
            f"{summary.count} cells · mean area {summary.mean_area:.4g} {area_unit} · "
            f"median {summary.median_area:.4g} {area_unit} · confluency {100 * summary.confluency:.1f} % · "
            f"mean neighbours {summary.mean_neighbors:.2f}{note}"
        )
        self.histogram_label.setPixmap(draw_histogram(table["area"], label=f"area ({area_unit})"))
        self.export_button.setEnabled(summary.count > 0)

    def _on_errored(self, exc: BaseException) -> None:
        self.summary_label.setText("measuring failed")
        show_error(f"Measuring failed: {exc}")

    def _on_finished(self) -> None:
        self.measure_button.setEnabled(True)
        self.progress.setVisible(False)
        self._worker = None

    # ------------------------------------------------------------------ export

    def _dialog_save_path(self) -> str:
        path, _ = QFileDialog.getSaveFileName(self, "Export measurements", "measurements.csv", "CSV (*.csv)")
        return path

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the last table to ``path`` (asked with a file dialog when None); return the path."""
        if self.table is None:
            show_info("Measure a Labels layer first.")
            return None
        if path is None:
            path = self.ask_save_path()
            if not path:
                return None
        path = Path(path)
        try:
            measure.write_csv(self.table, path)
        except OSError as exc:
            show_error(f"Could not write {path}: {exc}")
            return None
        show_info(f"Wrote {len(self.table['label'])} cells to {path}")
        return path
