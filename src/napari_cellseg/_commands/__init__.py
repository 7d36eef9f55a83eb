"""Sub-commands of the ``napari-cellseg`` command line (see :mod:`napari_cellseg.cli`)."""

from __future__ import annotations

import argparse


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the image encoder's arithmetic (:attr:`napari_cellseg.core.models.LoadedModel.precision`)."""
    from napari_cellseg.core.models import PRECISION_CHOICES, PRECISION_ENV

    parser.add_argument("--precision", choices=list(PRECISION_CHOICES), default=None,
                        help="arithmetic of the image encoder, the distance map's refiner and the grid and guided "
                             "modes' batch prompt decoder: bfloat16 is about "
                             "2x faster on CPUs with native "
                             "bfloat16 (AVX-512 BF16, AMX), slightly different masks; auto: bfloat16 on such a CPU, "
                             f"float32 elsewhere (default: ${PRECISION_ENV} or auto)")


def zoom_argument(text: str):
    """``--scale`` and ``--map-scale``: a number, or ``auto`` (the zoom estimated from the cells a first map finds)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a zoom such as 0.5 or 'auto', got {text!r}") from None
