"""The shared training data and the team's validation split (used by training and benchmarks).

Usiigaci (``../shared/data/usiigaci-phase-train``): sets 1-35 train, sets 36-45
validation (whole images held out).

DSB 2018 (``../shared/data/dsb2018-stage1-train``): images are grouped by
(size, kind), kind from the pixels: ``colour`` (RGB, stained tissue),
``brightfield`` (grey, bright background) or ``fluorescence`` (grey, dark
background). SOURCE.md asks to hold out whole groups: the groups
``360x360 fluorescence`` (83 images) and ``256x320 fluorescence`` (4) are held
out whole. Colour (one group, 256x320) and bright-field (two groups) would be
lost to training if held out whole, so every fourth image of them (in file
order) is held out instead; their validation figures are within-group and
optimistic, and the docs say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
USIIGACI = SHARED / "usiigaci-phase-train"
DSB = SHARED / "dsb2018-stage1-train"
USIIGACI_TRAIN = list(range(1, 36))
USIIGACI_VALIDATION = list(range(36, 46))
DSB_HELD_OUT_GROUPS = ("360x360 fluorescence", "256x320 fluorescence")
DSB_WITHIN_GROUP_EVERY = 4


def require_data() -> None:
    if not USIIGACI.is_dir() or not DSB.is_dir():
        raise SystemExit(f"the shared training data is not at {SHARED}")


def clean_labels(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected piece of each label (SOURCE.md: some labels have stray pixels)."""
    from scipy import ndimage as ndi

    out = np.zeros_like(labels)
    for idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == idx
        comp, n = ndi.label(mask)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            mask = comp == (np.argmax(sizes) + 1)
        out[sl][mask] = idx
    return out


def usiigaci_pair(k: int) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    return (tifffile.imread(USIIGACI / "images" / f"train_set{k}.tif"),
            clean_labels(tifffile.imread(USIIGACI / "masks" / f"train_set{k}.tif")))


def image_kind(image: np.ndarray) -> str:
    if image.ndim == 3:
        return "colour"
    return "fluorescence" if np.median(image) < 100 else "brightfield"


def dsb_index() -> list[dict]:
    """One record per DSB image: file name, group, kind and split (``train`` / ``validation``)."""
    import tifffile

    records = []
    for f in sorted((DSB / "images").glob("*.tif")):
        with tifffile.TiffFile(f) as tf:
            image = tf.asarray()
        kind = image_kind(image)
        group = f"{image.shape[0]}x{image.shape[1]} {kind}"
        records.append({"file": f.name, "group": group, "kind": kind})
    counts: dict[str, int] = {}
    for r in records:
        if r["group"] in DSB_HELD_OUT_GROUPS:
            r["split"], r["held_out"] = "validation", "whole group"
        elif r["kind"] in ("colour", "brightfield"):
            n = counts.get(r["group"], 0)
            counts[r["group"]] = n + 1
            r["split"] = "validation" if n % DSB_WITHIN_GROUP_EVERY == DSB_WITHIN_GROUP_EVERY - 1 else "train"
            r["held_out"] = "within group" if r["split"] == "validation" else ""
        else:
            r["split"], r["held_out"] = "train", ""
    return records


def dsb_name(record: dict) -> str:
    """A DSB image's name in training data and logs: ``dsb <group> <first 12 characters of the file>``."""
    return f"dsb {record['group']} {record['file'][:12]}"


def dsb_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    return tifffile.imread(DSB / "images" / name), tifffile.imread(DSB / "masks" / name)


def training_size_table() -> dict[str, dict[str, float]]:
    """The default model's ``meta["cell_diameters"]``: per image kind (as
    :func:`napari_cellseg.core.cell_size.image_kind` sees it from the normalised image: Usiigaci images are
    ``phase``), the 10th, 50th and 90th percentiles of the training split's cell diameters, and ``all``."""
    from napari_cellseg.core.cell_size import cell_diameters, image_kind, size_table
    from napari_cellseg.core.preprocess import normalize_image

    cells: dict[str, list[np.ndarray]] = {}
    for r in dsb_index():
        if r["split"] == "train":
            image, labels = dsb_pair(r["file"])
            cells.setdefault(image_kind(normalize_image(image)), []).append(cell_diameters(labels))
    for k in USIIGACI_TRAIN:
        image, labels = usiigaci_pair(k)
        cells.setdefault(image_kind(normalize_image(image)), []).append(cell_diameters(labels))
    return size_table(cells)
