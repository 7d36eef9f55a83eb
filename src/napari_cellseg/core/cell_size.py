"""Cell sizes: what a model was trained on, what an image holds, and the zoom between them.

A distance model learns cells of the sizes it was trained on: it splits much larger cells into pieces of about
that size and misses much smaller ones (docs/model_card.md, "Cell size and zoom"). This module holds

* :func:`cell_diameters` / :func:`diameter_stats`: equivalent diameters of a label image's cells;
* :func:`image_kind`: the kind of image from its normalised pixels (fluorescence: dark background; phase
  contrast: mid-grey; bright-field: bright; colour: stained tissue), the key of a model's size table;
* :func:`model_cell_sizes`: a model's table of training cell diameters per kind (``meta["cell_diameters"]``,
  written by fine-tuning and by the default model's training script);
* :func:`estimate_scale`: the zoom (``DistanceConfig.scale``) for an image from the cells a first
  segmentation at zoom 1 found in it (``DistanceConfig(scale="auto")``).

numpy and scipy only: no torch, no Qt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: image kinds of :func:`image_kind`, with what a user calls them
KIND_NAMES = {
    "fluorescence": "fluorescence (dark background)",
    "phase": "phase contrast (mid-grey background)",
    "brightfield": "bright-field (bright background)",
    "colour": "stained, colour",
}
#: a grey image whose median normalised pixel lies below this has a dark background (fluorescence): measured
#: 0.00-0.19 on 485 DSB fluorescence images, 0.25-0.42 on 45 Usiigaci phase-contrast ones
DARK_BELOW = 0.2
#: ... and above this a bright one (bright-field: 0.82-0.95 on 14 DSB images)
BRIGHT_ABOVE = 0.65
#: an RGB image whose median pixel spread between channels exceeds this is colour (stained DSB: 0.05-0.72;
#: grey images stored as RGB: 0)
COLOUR_ABOVE = 0.02
#: fewest cells a first segmentation must find for its median diameter to choose a zoom
MIN_CELLS_TO_MEASURE = 5
#: key of the size table's entry over every training cell, whatever the kind
ALL_KINDS = "all"
#: most distance maps ``DistanceConfig(scale="auto")`` computes for one image (the first at zoom 1)
MAX_PASSES = 3


def cell_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameter (pixels) of each cell of a label image: ``sqrt(4 area / pi)``.

    >>> lab = np.zeros((20, 20), int); lab[:10, :10] = 1; lab[12:14, 12:14] = 2
    >>> np.round(cell_diameters(lab), 2)
    array([11.28,  2.26])
    """
    lab = np.asarray(labels)
    if lab.size == 0 or not lab.any():
        return np.zeros(0)
    areas = np.bincount(lab.ravel().astype(np.int64, copy=False))[1:]
    return np.sqrt(4 * areas[areas > 0] / np.pi)


def diameter_stats(diameters: np.ndarray) -> dict[str, float]:
    """10th, 50th and 90th percentiles of cell diameters (pixels, one decimal) and the number of cells."""
    d = np.asarray(diameters, dtype=float)
    if d.size == 0:
        raise ValueError("no cells to measure")
    p10, p50, p90 = np.percentile(d, [10, 50, 90])
    return {"p10": round(float(p10), 1), "median": round(float(p50), 1), "p90": round(float(p90), 1),
            "cells": int(d.size)}


def image_kind(image01: np.ndarray) -> str:
    """The kind of a normalised ``(M, N)`` or ``(M, N, 3)`` image in [0, 1] (see :data:`KIND_NAMES`).

    Colour when its channels differ (:data:`COLOUR_ABOVE`), else by the median grey level: below
    :data:`DARK_BELOW` fluorescence, above :data:`BRIGHT_ABOVE` bright-field, phase contrast between.

    >>> image_kind(np.zeros((8, 8)) + 0.01), image_kind(np.full((8, 8), 0.3)), image_kind(np.full((8, 8), 0.9))
    ('fluorescence', 'phase', 'brightfield')
    """
    x = np.asarray(image01, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] >= 3:
        if float(np.nanmedian(x.max(-1) - x.min(-1))) > COLOUR_ABOVE:
            return "colour"
        x = x.mean(-1)
    level = float(np.nanmedian(x))
    if level < DARK_BELOW:
        return "fluorescence"
    return "brightfield" if level > BRIGHT_ABOVE else "phase"


def size_table(diameters_by_kind: dict[str, list[np.ndarray] | np.ndarray]) -> dict[str, dict[str, float]]:
    """A model's size table: :func:`diameter_stats` per kind, plus :data:`ALL_KINDS` over every cell."""
    table: dict[str, dict[str, float]] = {}
    every = []
    for kind, parts in sorted(diameters_by_kind.items()):
        d = np.concatenate([np.ravel(p) for p in parts]) if isinstance(parts, list) else np.ravel(parts)
        if d.size:
            table[kind] = diameter_stats(d)
            every.append(d)
    if every:
        table[ALL_KINDS] = diameter_stats(np.concatenate(every))
    return table


def merge_size_tables(base: dict, new: dict) -> dict[str, dict[str, float]]:
    """The size table of a model trained further from ``base`` on cells of the ``new`` table.

    Per kind both: the new cells' median (the zoom's target), the wider of the two 10th-90th percentile ranges
    (a model keeps handling the sizes it was trained on before), the cells of both. The base's other kinds stay.

    >>> merge_size_tables({"fluorescence": {"p10": 9, "median": 20, "p90": 31, "cells": 100}},
    ...                   {"fluorescence": {"p10": 38, "median": 45, "p90": 52, "cells": 36}})["fluorescence"]
    {'p10': 9, 'median': 45, 'p90': 52, 'cells': 136}
    """
    out = {k: dict(v) for k, v in (base or {}).items()}
    for kind, stats in (new or {}).items():
        old = out.get(kind)
        if old is None:
            out[kind] = dict(stats)
            continue
        out[kind] = {"p10": min(old["p10"], stats["p10"]), "median": stats["median"],
                     "p90": max(old["p90"], stats["p90"]),
                     "cells": int(old.get("cells", 0) or 0) + int(stats.get("cells", 0) or 0)}
    return out


def model_cell_sizes(meta: dict | None) -> dict[str, dict[str, float]]:
    """A model's training cell diameters per image kind (``meta["cell_diameters"]``), or ``{}``.

    Entries that are not ``{"p10", "median", "p90"}`` with ``0 < p10 <= median <= p90`` are dropped.
    """
    table = (meta or {}).get("cell_diameters") or {}
    out = {}
    if not isinstance(table, dict):
        return out
    for kind, stats in table.items():
        try:
            p10, med, p90 = (float(stats[k]) for k in ("p10", "median", "p90"))
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite([p10, med, p90]).all() and 0 < p10 <= med <= p90:
            out[str(kind)] = {"p10": p10, "median": med, "p90": p90, "cells": int(stats.get("cells", 0) or 0)}
    return out


@dataclass
class SizeEstimate:
    """A zoom chosen from an image's cells.

    Attributes
    ----------
    scale : float
        The zoom (1: the image's cells are within the model's training sizes, or could not be measured).
    kind : str
        :func:`image_kind` of the image.
    diameter : float or None
        Median equivalent diameter (image pixels) of the cells the last measured segmentation found.
    cells : int
        How many cells it found.
    reference : dict or None
        The model's training diameters used (``p10``, ``median``, ``p90``), and which kind they are for.
    message : str
        One sentence for a status line.
    passes : list of (zoom, diameter, cells)
        Every segmentation measured, in order (the first at zoom 1).
    """

    scale: float
    kind: str
    diameter: float | None
    cells: int
    reference: dict | None
    message: str
    passes: list = field(default_factory=list)


def estimate_scale(labels: np.ndarray, image01: np.ndarray, sizes: dict[str, dict[str, float]],
                   min_scale: float = 0.25, max_scale: float = 4.0, current: float = 1.0,
                   earlier: list | None = None) -> SizeEstimate:
    """The zoom for an image from the ``labels`` a segmentation at zoom ``current`` found in it (labels in the
    image's own pixels, as the automatic modes return them).

    The model card's rule: keep the zoom while the found cells' median diameter, zoomed, lies within the
    model's training cells' 10th-90th percentiles for the image's kind (:func:`image_kind`; the table's
    :data:`ALL_KINDS` entry when the model has none of that kind), else the zoom that brings it to their median
    (clipped to ``[min_scale, max_scale]``). Kept when fewer than :data:`MIN_CELLS_TO_MEASURE` cells were found
    or the model has no size table. A model splits cells much larger than its own into pieces, so a first
    measurement of large cells is low: measuring again at the new zoom (``current``, with the ``earlier``
    passes for the message) corrects it (``DistanceConfig(scale="auto")`` does, up to
    :data:`MAX_PASSES` maps).
    """
    kind = image_kind(image01)
    d = cell_diameters(labels)
    n = int(d.size)
    diameter = float(np.median(d)) if n else None
    passes = list(earlier or []) + [(float(current), diameter, n)]
    history = ", ".join(f"{pd:.0f} px at zoom {pz:g}" for pz, pd, pn in passes if pd is not None
                        and pn >= MIN_CELLS_TO_MEASURE)
    keep = f"zoom {current:g}"
    if not sizes:
        return SizeEstimate(current, kind, diameter, n, None,
                            f"{keep} (this model records no training cell sizes to estimate the zoom from)", passes)
    ref_kind = kind if kind in sizes else ALL_KINDS if ALL_KINDS in sizes else next(iter(sizes))
    ref = {**sizes[ref_kind], "kind": ref_kind}
    if n < MIN_CELLS_TO_MEASURE:
        return SizeEstimate(current, kind, diameter, n, ref,
                            f"{keep}: only {n} cell{'s' if n != 1 else ''} found at zoom {current:g}, too few to "
                            "measure their size (set the zoom by hand)", passes)
    lo, med, hi = ref["p10"], ref["median"], ref["p90"]
    trained = f"the model's {KIND_NAMES.get(ref_kind, 'training')} cells are {lo:.0f}-{hi:.0f} px"
    if lo <= diameter * current <= hi:
        return SizeEstimate(current, kind, diameter, n, ref,
                            f"{keep}: cells of {history} ({n} measured; {trained})", passes)
    scale = float(np.clip(round(med / diameter, 2), min_scale, max_scale))
    return SizeEstimate(scale, kind, diameter, n, ref,
                        f"zoom {scale:g}: cells of {history} ({n} measured); {trained}, median {med:.0f}",
                        passes)
