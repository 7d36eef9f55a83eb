"""File > Open Sample: a phase-contrast crop with its hand-drawn labels (shipped, no network)."""

from __future__ import annotations

from napari_cellseg.core.io import load_sample


def make_sample_cells():
    """Layer data for the 'cells' sample: the image and its ground-truth labels."""
    sample = load_sample("cells")
    return [
        (sample.image, {"name": "cells (phase contrast)"}, "image"),
        (sample.labels, {"name": "cells ground truth", "visible": False}, "labels"),
    ]
