"""Qt controls shared by the widgets."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QHBoxLayout, QWidget

from napari_cellseg.core.automatic import MAX_SCALE, MIN_SCALE


def zoom_spin_box(tooltip: str) -> QDoubleSpinBox:
    """A spin box for a distance-map zoom (``DistanceConfig.scale``, ``AnnotationConfig.map_scale``), at 1."""
    spin = QDoubleSpinBox()
    spin.setRange(MIN_SCALE, MAX_SCALE)
    spin.setSingleStep(0.25)
    spin.setDecimals(2)
    spin.setValue(1.0)
    spin.setSuffix(" x")
    spin.setToolTip(tooltip)
    return spin


def zoom_controls(tooltip: str, auto_tooltip: str) -> tuple[QDoubleSpinBox, QCheckBox, QWidget]:
    """A zoom spin box with an "auto" box beside it, ticked (the zoom estimated; the spin box disabled until the
    user unticks it), and the row widget holding both for a form."""
    spin = zoom_spin_box(tooltip)
    check = QCheckBox("auto")
    check.setToolTip(auto_tooltip)
    check.setChecked(True)
    spin.setEnabled(False)
    row = QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(spin, 1)
    row.addWidget(check)
    box = QWidget()
    box.setLayout(row)
    return spin, check, box
