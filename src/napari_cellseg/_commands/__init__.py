"""Sub-commands of the ``napari-cellseg`` command line (see :mod:`napari_cellseg.cli`)."""

from __future__ import annotations

import argparse


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the image encoder's arithmetic (:attr:`napari_cellseg.core.models.LoadedModel.precision`)."""
    from napari_cellseg.core.models import PRECISION_ENV, PRECISIONS

    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="arithmetic of the image encoder: bfloat16 is about 2x faster on CPUs with native "
                             "bfloat16 and on recent GPUs, slightly different masks (default: "
                             f"${PRECISION_ENV} or float32)")
