"""Turn network outputs into label images: distance maps, candidate masks, NMS and painting.

Everything here is numpy / scipy / scikit-image and never calls a network, so
the automatic modes (:mod:`napari_cellseg.core.automatic`) can re-apply their
thresholds to a cached map or cached masks in milliseconds.

Distance maps (SAMCell)
-----------------------
A distance-map model predicts, for every pixel, the distance to the border of
its cell divided by the largest such distance in that cell: ``0`` at the border
and on the background, ``1`` at the cell centre. :func:`labels_from_distance_map`
turns it into instances: the connected regions of ``map > peak`` are the seeds
("markers"), and a watershed of the inverted map grows each seed inside
``map > fill``. SAMCell's defaults are ``peak = 0.47`` and ``fill = 0.09``.

Candidate masks (CellSeg1 / SAM automatic mode)
-----------------------------------------------
The grid and guided modes produce many overlapping candidate masks. They are
held as :class:`CropMask` objects (a boolean array over the mask's bounding box
and its offset in the image), so hundreds of candidates of a large image cost
little memory and their overlaps are computed only where boxes meet.

* :func:`stability_score`: the area of ``logits > t + offset`` divided by the
  area of ``logits > t - offset`` (SAM's definition; CellSeg1 uses offset 0.8).
* :func:`nms_crop_masks`: CellSeg1's two-stage non-maximum suppression. Stage 1
  finds the pairs of masks whose bounding boxes intersect (one vectorised
  comparison of all boxes); stage 2 computes the mask IoU only for those pairs,
  and a mask is suppressed when its IoU with a better-scoring kept mask exceeds
  the threshold (0.05 by default: two cells barely overlap, two answers for the
  same cell overlap a lot). Masks whose boxes do not touch cannot overlap, so
  stage 1 changes no result, only the cost.
* :func:`paint_smaller_wins`: masks are painted largest first, so where two
  kept masks overlap **the pixel goes to the smaller mask** (CellSeg1's rule: a
  large mask that swallows a neighbour does not erase it; the small cell keeps
  its pixels and the large one keeps the rest).
* :func:`remove_small_regions`: connected pieces of any label smaller than
  ``min_area`` pixels (20 by default) are removed, which also drops slivers
  of large masks left around smaller ones by the painting rule.

Examples
--------
>>> import numpy as np
>>> dmap = np.zeros((9, 9), np.float32)
>>> dmap[2:7, 2:7] = 0.5; dmap[4, 4] = 1.0
>>> int(labels_from_distance_map(dmap).max())
1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: SAMCell's default thresholds of the distance map
DEFAULT_PEAK = 0.47
DEFAULT_FILL = 0.09
#: CellSeg1's grid-mode defaults
DEFAULT_MIN_AREA = 20
DEFAULT_MAX_AREA_FRACTION = 0.1
DEFAULT_NMS_IOU = 0.05


# ---------------------------------------------------------------------------
# label images
# ---------------------------------------------------------------------------


def _label_dtype(n: int):
    return np.uint16 if n < np.iinfo(np.uint16).max else np.uint32


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels of an image to ``1..K`` keeping their order; 0 stays 0.

    Returns a new ``int32`` array (the input is not modified).

    Examples
    --------
    >>> relabel_sequential(np.array([[0, 5, 5, 9]]))
    array([[0, 1, 1, 2]], dtype=int32)
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int32)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros(labels.shape, np.int32)
    if ids[-1] < 1 << 24:
        lut = np.zeros(int(ids[-1]) + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return lut[labels]
    return np.searchsorted(np.r_[0, ids], labels).astype(np.int32)


def remove_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove whole labels with fewer than ``min_size`` pixels, then renumber ``1..K``.

    Examples
    --------
    >>> remove_small_labels(np.array([[1, 1, 1, 0, 2]]), 2)
    array([[1, 1, 1, 0, 0]], dtype=int32)
    """
    labels = np.asarray(labels)
    if min_size <= 1 or labels.max(initial=0) == 0:
        return relabel_sequential(labels)
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return relabel_sequential(out)


def remove_small_regions(labels: np.ndarray, min_area: int = DEFAULT_MIN_AREA) -> np.ndarray:
    """Remove connected pieces of any label smaller than ``min_area`` pixels; renumber ``1..K``.

    Unlike :func:`remove_small_labels`, a label split into a large body and a
    small stray piece keeps its body and loses the piece (4-connectivity).

    Examples
    --------
    >>> lab = np.array([[1, 1, 1, 0, 1]])
    >>> remove_small_regions(lab, 2)
    array([[1, 1, 1, 0, 0]], dtype=int32)
    """
    from skimage.measure import label as cc_label

    labels = np.asarray(labels)
    if min_area <= 1 or labels.max(initial=0) == 0:
        return relabel_sequential(labels)
    pieces = cc_label(labels, background=0, connectivity=1)
    counts = np.bincount(pieces.ravel())
    small = counts < min_area
    small[0] = False
    out = labels.copy()
    out[small[pieces]] = 0
    return relabel_sequential(out)


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes enclosed by labels.

    Each hole (a background region not connected to the image border) goes to
    the label it touches most; the input is not modified.

    Examples
    --------
    >>> lab = np.zeros((5, 5), int); lab[1:4, 1:4] = 3; lab[2, 2] = 0
    >>> int(fill_label_holes(lab)[2, 2])
    3
    """
    labels = np.asarray(labels)
    fg = labels > 0
    holes = ndi.binary_fill_holes(fg) & ~fg
    if not holes.any():
        return labels.copy()
    hole_ids, n_holes = ndi.label(holes)
    # pixels of labels that touch a hole: pair (hole id, label) over the hole's outer ring
    grown = ndi.grey_dilation(hole_ids, size=(3, 3))
    ring = (grown > 0) & fg
    pairs = grown[ring].astype(np.int64) * (int(labels.max()) + 1) + labels[ring]
    codes, counts = np.unique(pairs, return_counts=True)
    hole_of = codes // (int(labels.max()) + 1)
    label_of = codes % (int(labels.max()) + 1)
    # for each hole the label with the most contact: sort by (hole, count) and take the last
    order = np.lexsort((counts, hole_of))
    last = np.r_[hole_of[order][1:] != hole_of[order][:-1], True]
    lut = np.zeros(n_holes + 1, labels.dtype)
    lut[hole_of[order][last]] = label_of[order][last]
    out = labels.copy()
    out[holes] = lut[hole_ids[holes]]
    return out


# ---------------------------------------------------------------------------
# distance maps
# ---------------------------------------------------------------------------


def check_thresholds(peak: float, fill: float) -> None:
    """Validate the two distance-map thresholds (``0 <= fill <= peak <= 1``)."""
    for name, value in (("peak", peak), ("fill", fill)):
        if not np.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} threshold must lie in [0, 1], got {value}")
    if fill > peak:
        raise ValueError(
            f"the fill threshold ({fill}) must not exceed the peak threshold ({peak}): cells grow from "
            "their peaks down to the fill level"
        )


def labels_from_distance_map(
    dmap: np.ndarray,
    peak: float = DEFAULT_PEAK,
    fill: float = DEFAULT_FILL,
    min_size: int = 0,
    fill_holes: bool = False,
) -> np.ndarray:
    """Instances from a normalised distance map (SAMCell's post-processing).

    Parameters
    ----------
    dmap : ndarray, shape (M, N)
        Per-cell normalised distance map in [0, 1] (0 at borders and
        background, 1 at cell centres).
    peak : float
        Cell-peak threshold: each connected region of ``dmap > peak`` seeds one cell.
    fill : float
        Cell-fill threshold: cells grow by a watershed of ``-dmap`` inside
        ``dmap > fill``.
    min_size : int
        Cells with fewer pixels are removed (0: keep all).
    fill_holes : bool
        Fill background holes enclosed by a cell.

    Returns
    -------
    labels : ndarray of int32, shape (M, N)
        ``0`` background, cells ``1..K``.

    Notes
    -----
    The watershed runs only where it matters: a connected region of
    ``dmap > fill`` holding one seed is that cell entirely (the watershed
    would flood all of it), one holding no seed is background, and only
    regions holding several seeds (touching cells) are flooded, each in its
    bounding box. The result equals one watershed over the whole image
    (4-connectivity) and takes milliseconds on a 1024 x 1024 map.

    Examples
    --------
    Two touching cells of a known map come back as two labels:

    >>> yy, xx = np.mgrid[:20, :30]
    >>> a = 1 - np.hypot(yy - 10, xx - 9) / 8
    >>> b = 1 - np.hypot(yy - 10, xx - 21) / 8
    >>> dmap = np.clip(np.maximum(a, b), 0, 1)
    >>> lab = labels_from_distance_map(dmap)
    >>> int(lab.max()), int(lab[10, 9]), int(lab[10, 21])
    (2, 1, 2)
    """
    from skimage.segmentation import watershed

    dmap = np.asarray(dmap)
    if dmap.ndim != 2:
        raise ValueError(f"distance map must be 2D (M, N), got shape {dmap.shape}")
    if not np.issubdtype(dmap.dtype, np.floating):
        dmap = dmap.astype(np.float32)
    check_thresholds(peak, fill)
    dmap = np.nan_to_num(dmap, nan=0.0)
    markers, n_markers = ndi.label(dmap > peak)
    out = np.zeros(dmap.shape, np.int32)
    if n_markers == 0:
        return out
    regions, n_regions = ndi.label(dmap > fill)
    # region of each marker (markers lie inside regions because peak >= fill)
    region_of_marker = np.zeros(n_markers + 1, np.int64)
    region_of_marker[markers.ravel()] = regions.ravel()
    region_of_marker[0] = 0
    seeds_per_region = np.bincount(region_of_marker[1:], minlength=n_regions + 1)
    seeds_per_region[0] = 0
    # regions with exactly one seed become that seed's cell
    lut = np.zeros(n_regions + 1, np.int32)
    single = seeds_per_region[region_of_marker[1:]] == 1
    lut[region_of_marker[1:][single]] = np.nonzero(single)[0] + 1
    out = lut[regions]
    # regions with several seeds: watershed in their bounding boxes
    multi = np.nonzero(seeds_per_region > 1)[0]
    if multi.size:
        boxes = ndi.find_objects(regions)
        for rid in multi:
            sl = boxes[rid - 1]
            inside = regions[sl] == rid
            ws = watershed(-dmap[sl], np.where(inside, markers[sl], 0), mask=inside)
            out[sl][inside] = ws[inside]
    out = relabel_sequential(out)
    if fill_holes:
        out = fill_label_holes(out)
    if min_size > 1:
        out = remove_small_labels(out, min_size)
    return out


def distance_targets(labels: np.ndarray) -> np.ndarray:
    """The normalised distance map of a label image (SAMCell's training target).

    Each cell's Euclidean distance to its border divided by that cell's largest
    distance: 1 at the cell's centre, small at its border, 0 on the background.
    Touching cells are separated (each cell's distance is to its own border).

    Examples
    --------
    >>> lab = np.zeros((7, 7), int); lab[1:6, 1:6] = 1
    >>> float(distance_targets(lab)[3, 3])
    1.0
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D, got shape {labels.shape}")
    # a cell's own border: pixels whose 4-neighbour carries another value count as outside
    padded = np.pad(labels, 1)
    inner = labels > 0
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
        inner &= padded[dr : dr + labels.shape[0], dc : dc + labels.shape[1]] == labels
    dist = ndi.distance_transform_edt(inner).astype(np.float32)
    dist[labels > 0] += 1.0
    n = int(labels.max())
    if n == 0:
        return np.zeros(labels.shape, np.float32)
    peaks = ndi.maximum(dist, labels, index=np.arange(n + 1))
    peaks = np.asarray(peaks, np.float32)
    peaks[peaks == 0] = 1.0
    out = dist / peaks[labels]
    out[labels == 0] = 0.0
    return out.astype(np.float32)


def region_prompts(labels: np.ndarray, dmap: np.ndarray, margin: float = 0.1, min_margin: int = 2):
    """One prompt per labelled region: the peak of the map in it and its padded box.

    Parameters
    ----------
    labels : ndarray of int, shape (M, N)
        Regions ``1..K`` (e.g. from :func:`labels_from_distance_map`).
    dmap : ndarray, shape (M, N)
        The map whose highest pixel in each region becomes the point prompt.
    margin : float
        Boxes grow by this fraction of their size on every side ...
    min_margin : int
        ... and by at least this many pixels; they are clipped to the image.

    Returns
    -------
    ids : ndarray of int, shape (K,)
    points : ndarray of float, shape (K, 2)
        (row, col) of each region's peak.
    boxes : ndarray of float, shape (K, 4)
        (r0, c0, r1, c1) with exclusive ends.

    Examples
    --------
    >>> lab = np.zeros((10, 10), int); lab[2:5, 2:6] = 1
    >>> d = np.zeros((10, 10)); d[3, 4] = 1
    >>> ids, pts, boxes = region_prompts(lab, d, margin=0, min_margin=1)
    >>> ids.tolist(), pts.tolist(), boxes.tolist()
    ([1], [[3.0, 4.0]], [[1.0, 1.0, 6.0, 7.0]])
    """
    labels = np.asarray(labels)
    dmap = np.asarray(dmap, np.float32)
    n = int(labels.max(initial=0))
    slices = ndi.find_objects(labels)
    ids = np.array([i + 1 for i, s in enumerate(slices) if s is not None], np.int64)
    if ids.size == 0:
        return ids, np.zeros((0, 2)), np.zeros((0, 4))
    # the peak of each region: sort pixels by (label, value) and take the last of each label
    flat_lab = labels.ravel()
    fg = np.nonzero(flat_lab)[0]
    order = fg[np.lexsort((dmap.ravel()[fg], flat_lab[fg]))]
    lab_sorted = flat_lab[order]
    last = np.r_[lab_sorted[1:] != lab_sorted[:-1], True]
    peak_index = np.zeros(n + 1, np.int64)
    peak_index[lab_sorted[last]] = order[last]
    rows, cols = np.unravel_index(peak_index[ids], labels.shape)
    points = np.stack([rows, cols], axis=1).astype(float)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices if s is not None], float)
    size = boxes[:, 2:] - boxes[:, :2]
    pad = np.maximum(np.ceil(size * margin), min_margin)
    boxes[:, :2] = np.maximum(boxes[:, :2] - pad, 0)
    boxes[:, 2] = np.minimum(boxes[:, 2] + pad[:, 0], labels.shape[0])
    boxes[:, 3] = np.minimum(boxes[:, 3] + pad[:, 1], labels.shape[1])
    return ids, points, boxes


# ---------------------------------------------------------------------------
# candidate masks
# ---------------------------------------------------------------------------


@dataclass
class CropMask:
    """A binary mask stored over its bounding box.

    Attributes
    ----------
    r0, c0 : int
        Image position of ``mask[0, 0]``.
    mask : ndarray of bool, shape (h, w)
    """

    r0: int
    c0: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(r0, c0, r1, c1) with exclusive ends."""
        return self.r0, self.c0, self.r0 + self.mask.shape[0], self.c0 + self.mask.shape[1]

    @classmethod
    def from_dense(cls, mask: np.ndarray) -> CropMask:
        """Crop a full-image boolean mask to its bounding box (empty masks give a 0 x 0 crop)."""
        mask = np.asarray(mask, bool)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return cls(0, 0, np.zeros((0, 0), bool))
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(int(r0), int(c0), mask[r0:r1, c0:c1].copy())

    def tight(self) -> CropMask:
        """The same mask cropped to its own bounding box."""
        inner = CropMask.from_dense(self.mask)
        if inner.mask.size == 0:
            return CropMask(self.r0, self.c0, inner.mask)
        return CropMask(self.r0 + inner.r0, self.c0 + inner.c0, inner.mask)

    def to_dense(self, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, bool)
        r0, c0, r1, c1 = self.box
        out[r0:r1, c0:c1] = self.mask
        return out


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Bounding boxes ``(K, 4)`` as (r0, c0, r1, c1), exclusive ends, of masks ``(K, M, N)``.

    Empty masks get the box ``(0, 0, 0, 0)``.

    Examples
    --------
    >>> m = np.zeros((1, 5, 5), bool); m[0, 1:3, 2:5] = True
    >>> masks_to_boxes(m).tolist()
    [[1, 2, 3, 5]]
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (K, M, N), got {masks.shape}")
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    nonempty = rows.any(axis=1)
    m, n = masks.shape[1:]
    r0 = rows.argmax(axis=1)
    r1 = m - rows[:, ::-1].argmax(axis=1)
    c0 = cols.argmax(axis=1)
    c1 = n - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([r0, c0, r1, c1], axis=1)
    boxes[~nonempty] = 0
    return boxes


def boxes_intersect(boxes_a: np.ndarray, boxes_b: np.ndarray | None = None) -> np.ndarray:
    """``(K, L)`` boolean matrix: do the boxes (r0, c0, r1, c1; exclusive ends) share a pixel?

    Examples
    --------
    >>> b = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [2, 2, 4, 4]])
    >>> boxes_intersect(b).astype(int)
    array([[1, 1, 0],
           [1, 1, 1],
           [0, 1, 1]])
    """
    a = np.asarray(boxes_a, float).reshape(-1, 4)
    b = a if boxes_b is None else np.asarray(boxes_b, float).reshape(-1, 4)
    return (
        (a[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < a[:, None, 2])
        & (a[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < a[:, None, 3])
    )


def stability_score(logits, threshold: float = 0.0, offset: float = 0.8):
    """SAM's stability score of mask logits over their last two axes.

    ``area(logits > threshold + offset) / area(logits > threshold - offset)``:
    close to 1 when the mask hardly changes as the cut-off moves. Works on numpy
    arrays and torch tensors of shape ``(..., h, w)`` and returns shape ``(...)``
    (1.0 where both areas are empty).

    Examples
    --------
    >>> logits = np.array([[[-2.0, 0.5, 2.0, 2.0]]])
    >>> float(stability_score(logits, offset=1.0)[0])
    0.6666666666666666
    """
    hi = (logits > threshold + offset).sum(axis=(-2, -1)) if isinstance(logits, np.ndarray) else \
        (logits > threshold + offset).sum(dim=(-2, -1))
    lo = (logits > threshold - offset).sum(axis=(-2, -1)) if isinstance(logits, np.ndarray) else \
        (logits > threshold - offset).sum(dim=(-2, -1))
    if isinstance(logits, np.ndarray):
        hi = hi.astype(np.float64)
        lo = lo.astype(np.float64)
        return np.where(lo > 0, hi / np.maximum(lo, 1), 1.0)
    import torch

    hi = hi.double()
    lo = lo.double()
    return torch.where(lo > 0, hi / lo.clamp(min=1), torch.ones_like(hi))


def crop_mask_iou(a: CropMask, b: CropMask) -> float:
    """Intersection over union of two :class:`CropMask` (0 when they do not overlap)."""
    ar0, ac0, ar1, ac1 = a.box
    br0, bc0, br1, bc1 = b.box
    r0, c0, r1, c1 = max(ar0, br0), max(ac0, bc0), min(ar1, br1), min(ac1, bc1)
    inter = 0
    if r0 < r1 and c0 < c1:
        inter = int(np.count_nonzero(
            a.mask[r0 - ar0 : r1 - ar0, c0 - ac0 : c1 - ac0] & b.mask[r0 - br0 : r1 - br0, c0 - bc0 : c1 - bc0]
        ))
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def nms_two_stage(
    boxes: np.ndarray,
    scores: np.ndarray,
    pair_iou: Callable[[int, np.ndarray], np.ndarray],
    iou_threshold: float = DEFAULT_NMS_IOU,
) -> np.ndarray:
    """Greedy non-maximum suppression with a box pre-filter (CellSeg1's two stages).

    Parameters
    ----------
    boxes : ndarray, shape (K, 4)
        (r0, c0, r1, c1) of each mask, exclusive ends.
    scores : ndarray, shape (K,)
        Higher is better; ties keep the earlier mask.
    pair_iou : callable
        ``pair_iou(i, js)`` returns the mask IoU of mask ``i`` with each mask in
        ``js`` (only called for masks whose boxes intersect mask ``i``'s).
    iou_threshold : float
        A mask is suppressed when its IoU with a kept, better mask exceeds this.

    Returns
    -------
    keep : ndarray of int
        Indices of the kept masks, best first.
    """
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    scores = np.asarray(scores, float).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"NMS IoU threshold must lie in [0, 1], got {iou_threshold}")
    k = len(scores)
    if k == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    touching = boxes_intersect(boxes)  # stage 1: one vectorised comparison
    removed = np.zeros(k, bool)
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        js = np.flatnonzero(touching[i] & ~removed & (rank > rank[i]))
        if js.size:  # stage 2: mask IoU only for touching boxes
            ious = np.asarray(pair_iou(i, js), float)
            removed[js[ious > iou_threshold]] = True
    return np.asarray(keep, np.int64)


def nms_crop_masks(masks: Sequence[CropMask], scores, iou_threshold: float = DEFAULT_NMS_IOU) -> np.ndarray:
    """Two-stage NMS of :class:`CropMask` candidates; returns kept indices, best first.

    Examples
    --------
    >>> a = CropMask(0, 0, np.ones((4, 4), bool))
    >>> b = CropMask(1, 1, np.ones((4, 4), bool))   # IoU 9/23 with a
    >>> c = CropMask(10, 10, np.ones((2, 2), bool))
    >>> nms_crop_masks([a, b, c], [0.9, 0.95, 0.5]).tolist()
    [1, 2]
    """
    masks = list(masks)
    boxes = np.array([m.box for m in masks], float).reshape(-1, 4)
    return nms_two_stage(
        boxes, scores, lambda i, js: np.array([crop_mask_iou(masks[i], masks[j]) for j in js]), iou_threshold
    )


def nms_masks(masks: np.ndarray, scores, iou_threshold: float = DEFAULT_NMS_IOU) -> np.ndarray:
    """Two-stage NMS of dense masks ``(K, M, N)``; returns kept indices, best first."""
    masks = np.asarray(masks, bool)
    return nms_crop_masks([CropMask.from_dense(m) for m in masks], scores, iou_threshold)


def paint_smaller_wins(masks: Sequence[CropMask], shape: tuple[int, int], ids: Sequence[int] | None = None,
                       dtype=np.int32) -> np.ndarray:
    """Paint masks into a label image; where masks overlap the smaller mask wins.

    Masks are painted in order of decreasing area (ties: later masks first), so
    each pixel ends with the smallest mask covering it (CellSeg1's rule).

    Parameters
    ----------
    masks : sequence of CropMask
    shape : (M, N)
    ids : sequence of int, optional
        Label of each mask (default ``1..K`` in the given order).

    Examples
    --------
    >>> big = CropMask(0, 0, np.ones((3, 3), bool))
    >>> small = CropMask(1, 1, np.ones((1, 2), bool))
    >>> paint_smaller_wins([big, small], (3, 4))
    array([[1, 1, 1, 0],
           [1, 2, 2, 0],
           [1, 1, 1, 0]], dtype=int32)
    """
    masks = list(masks)
    out = np.zeros(shape, dtype)
    if not masks:
        return out
    ids = np.arange(1, len(masks) + 1) if ids is None else np.asarray(ids)
    areas = np.array([m.area for m in masks])
    # largest first; equal areas: the earlier mask is painted last (wins)
    order = np.lexsort((-np.arange(len(masks)), -areas))
    for k in order:
        m = masks[k]
        r0, c0, r1, c1 = m.box
        r0c, c0c, r1c, c1c = max(r0, 0), max(c0, 0), min(r1, shape[0]), min(c1, shape[1])
        if r0c >= r1c or c0c >= c1c:
            continue
        sub = m.mask[r0c - r0 : r1c - r0, c0c - c0 : c1c - c0]
        out[r0c:r1c, c0c:c1c][sub] = ids[k]
    return out


def paint_dense_smaller_wins(masks: np.ndarray) -> np.ndarray:
    """:func:`paint_smaller_wins` for dense masks ``(K, M, N)``."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (K, M, N), got {masks.shape}")
    return paint_smaller_wins([CropMask.from_dense(m) for m in masks], masks.shape[1:])


def large_mask_filter(areas, image_area: int, max_fraction: float = DEFAULT_MAX_AREA_FRACTION) -> np.ndarray:
    """Boolean keep-mask: True for masks covering at most ``max_fraction`` of the image.

    Examples
    --------
    >>> large_mask_filter([5, 50], 100, 0.1).tolist()
    [True, False]
    """
    return np.asarray(areas, float) <= max_fraction * float(image_area)
