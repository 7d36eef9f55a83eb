"""``napari-cellseg measure``: per-cell measurements of label images, as CSV."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", help="label image (TIFF/PNG; 0 = background); a stack is measured plane by plane")
    parser.add_argument("--image", default=None, help="intensity image of the same shape, for mean_intensity")
    parser.add_argument("--neighbor-distance", type=float, default=2.0,
                        help="grow every cell by this many pixels before counting touching neighbours (default 2)")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="pixel size in physical units (e.g. µm); lengths and areas are scaled by it")
    parser.add_argument("--out", required=True, help="CSV file (one row per cell; stacks get a 'plane' column)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_cellseg.cli import UserError
    from napari_cellseg.core.io import read_image
    from napari_cellseg.core.measure import measure_cells, summarize, write_csv

    labels = read_image(args.labels)
    image = read_image(args.image) if args.image else None
    if image is not None and image.shape != labels.shape:
        raise UserError(f"--image has shape {image.shape} but the labels have shape {labels.shape}")
    if labels.ndim not in (2, 3):
        raise UserError(f"labels must be 2D or a stack of 2D planes, got shape {labels.shape}")
    planes = [labels] if labels.ndim == 2 else list(labels)
    images = [image] if labels.ndim == 2 else (list(image) if image is not None else [None] * len(planes))
    tables = []
    for k, (lab, img) in enumerate(zip(planes, images)):
        table = measure_cells(lab, img, scale=args.pixel_size, neighbor_distance=args.neighbor_distance)
        s = summarize(table, lab)
        where = f"plane {k}: " if labels.ndim == 3 else ""
        unit = " (physical units)" if args.pixel_size else " px"
        print(f"{where}{s.count} cells, mean area {s.mean_area:.1f}{unit}, median area {s.median_area:.1f}, "
              f"confluency {s.confluency:.1%}, mean neighbours {s.mean_neighbors:.2f}")
        if labels.ndim == 3:
            table = {"plane": np.full(len(table["label"]), k, np.int64), **table}
        tables.append(table)
    merged = {key: np.concatenate([t[key] for t in tables]) for key in tables[0]}
    write_csv(merged, Path(args.out))
    print(f"wrote {args.out}")
    return 0
