"""Reading images and writing label images, and the plugin's sample data.

TIFF goes through :mod:`tifffile` (multi-page stacks included), other formats
through :func:`skimage.io.imread`. Errors name the file and what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}

#: sample name -> (image file, labels file, description), files in napari_cellseg/data
SAMPLES = {
    "cells": ("cells_phase_usiigaci.tif", "cells_phase_usiigaci_labels.tif",
              "phase-contrast cells (Usiigaci, MIT), 512 x 512, 27 annotated cells"),
    "nuclei": ("nuclei_fluo_dsb2018.tif", "nuclei_fluo_dsb2018_labels.tif",
               "fluorescent nuclei (DSB 2018 via stardist, BSD-3), 256 x 256, 35 annotated nuclei"),
}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a numpy array.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file cannot be decoded as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            return np.asarray(tifffile.imread(path))
        from skimage.io import imread

        return np.asarray(imread(path))
    except Exception as exc:
        raise ValueError(f"could not read {path} as an image ({exc.__class__.__name__}: {exc})") from exc


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write a label image as a zlib-compressed TIFF (uint16 when it fits, else uint32).

    The file appears whole or not at all (written to a temporary name, then renamed).
    """
    import tifffile

    path = Path(path)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    dtype = np.uint16 if labels.size == 0 or labels.max() < 2**16 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Sample:
    """A sample image with its hand-drawn labels."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    description: str


def sample_path(filename: str) -> Path:
    return Path(__file__).resolve().parents[1] / "data" / filename


def load_sample(name: str = "cells") -> Sample:
    """Load a sample shipped with the package (no network).

    Examples
    --------
    >>> s = load_sample("cells")
    >>> s.image.shape, int(s.labels.max())
    ((512, 512), 27)
    """
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}: choose one of {', '.join(SAMPLES)}")
    img, lab, desc = SAMPLES[name]
    return Sample(name, read_image(sample_path(img)), read_image(sample_path(lab)), desc)
