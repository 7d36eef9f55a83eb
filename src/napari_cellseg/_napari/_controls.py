"""Qt controls shared by the widgets."""

from __future__ import annotations

from qtpy.QtWidgets import QDoubleSpinBox

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
