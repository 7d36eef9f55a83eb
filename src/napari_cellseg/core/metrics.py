"""Evaluation metrics for instance and semantic segmentation.

Everything here takes label images (integer arrays, ``0`` = background, any
other value = one object; labels need not be consecutive) of any
dimensionality, compares a prediction with a reference ("ground truth", gt) and
returns plain numbers or small dataclasses with ``to_dict()`` for JSON.

Matching
--------
The overlap of every reference object with every predicted object is counted in
one pass over the pixels (a contingency table built with ``np.bincount``), never
with a loop over cells. A predicted object and a reference object are a *true
positive* pair at threshold ``t`` when they are matched one-to-one and their
intersection over union (IoU) is ``>= t``. The one-to-one matching is optimal: it
has the largest possible number of pairs with IoU ``>= t`` (ties broken by the
largest total IoU), found with :func:`scipy.optimize.linear_sum_assignment`
on each connected group of competing candidate pairs.
For ``t > 0.5`` the pairs are unique anyway (an object can overlap at most one
other object by more than half of their union) and no assignment is solved.

Figures per threshold (Cellpose and CellSeg1 use the same AP)::

    AP        = TP / (TP + FP + FN)
    precision = TP / (TP + FP)          recall = TP / (TP + FN)
    F1        = 2 TP / (2 TP + FP + FN)
    mean matched IoU = sum of IoU of the TP pairs / TP
    panoptic quality = sum of IoU of the TP pairs / (TP + FP / 2 + FN / 2)

Cell Tracking Challenge figures (single frame, no tracking):

* SEG: each reference object is paired with the predicted object that covers
  *more than half* of its pixels (there is at most one); its score is the IoU
  (Jaccard index) of the two, or 0 when no predicted object covers it that
  well. SEG is the mean over reference objects; false positives do not lower it.
* DET: the same "covers more than half" rule pairs objects. Reference objects
  left unpaired are false negatives (FN), predicted objects that pair with no
  reference are false positives (FP) and a predicted object paired with ``k > 1``
  reference objects needs ``k - 1`` splits (NS). With the CTC weights
  ``AOGM = 5 NS + 10 FN + 1 FP`` and ``AOGM_0 = 10 * n_reference`` (the cost of
  building the reference from nothing), ``DET = 1 - min(AOGM, AOGM_0) / AOGM_0``.
  This is the vertex part of the CTC acyclic oriented graph matching, which is
  all DET measures; for a time series the CTC sums AOGM and AOGM_0 over frames,
  which is what the pooled DET of :func:`aggregate` does.

Conventions
-----------
* Zero denominators: every ratio whose denominator is zero is ``1.0`` when the
  image has neither reference nor predicted objects ("nothing to find, nothing
  found") and ``0.0`` otherwise. So an empty prediction of an image with
  objects scores 0 everywhere, a non-empty prediction of an empty image scores
  AP = precision = DET = 0, and SEG of an empty reference is 1.0 only when the
  prediction is empty as well. No figure is ever NaN.
* Shapes must be equal (``ValueError`` naming both shapes). Integer labels of any
  width are accepted, and float labels whose values are whole numbers (as some
  TIFF writers store them); fractional, NaN or infinite values raise
  ``TypeError``, negative labels ``ValueError``. Boolean masks raise ``TypeError``
  for the instance metrics (label their connected components first, or use
  :func:`binary_dice` / :func:`binary_iou`).
* Inputs are never modified.

Examples
--------
>>> gt = np.array([[1, 1, 0, 2, 2]])
>>> pred = np.array([[3, 3, 0, 0, 7]])
>>> [round(s.ap, 4) for s in average_precision(gt, pred, thresholds=(0.5, 0.9))]
[1.0, 0.3333]
>>> seg_score(gt, pred), detection_score(gt, pred)  # 7 covers only half of 2
(0.5, 0.45)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "DEFAULT_THRESHOLDS",
    "AggregateEvaluation",
    "InstanceEvaluation",
    "MatchScores",
    "Overlap",
    "aggregate",
    "average_precision",
    "binary_dice",
    "binary_iou",
    "check_instance_labels",
    "check_label_image",
    "detection_score",
    "evaluate_instances",
    "iou_matrix",
    "label_overlap",
    "match_instances",
    "pool",
    "seg_score",
]

#: IoU thresholds reported by default (the usual AP@0.5, AP@0.75, AP@0.9).
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)

# CTC weights of the AOGM vertex operations used by DET
_W_SPLIT = 5
_W_FN = 10
_W_FP = 1

# largest (n_gt + 1) * (n_pred + 1) counted with one dense bincount
_DENSE_PAIR_LIMIT = 4_000_000


# --------------------------------------------------------------------------- input checks


def check_label_image(labels, name: str = "labels") -> np.ndarray:
    """Validate a label image and return it as a non-negative integer array.

    Parameters
    ----------
    labels : array_like, shape (M, N) or any other
        Instance labels, ``0`` = background. Integer, or float holding whole
        numbers only.
    name : str
        What to call the array in error messages.

    Returns
    -------
    ndarray of integers
        ``labels`` itself when it already is an integer array (not copied),
        otherwise an ``int64`` copy.

    Raises
    ------
    TypeError
        For booleans, non-numbers, and floats that are not whole numbers.
    ValueError
        For negative labels.

    Examples
    --------
    >>> check_label_image(np.array([[0.0, 2.0], [5.0, 5.0]])).dtype
    dtype('int64')
    >>> check_label_image(np.array([0.5]))
    Traceback (most recent call last):
    ...
    TypeError: labels holds fractional values (e.g. 0.5): pass an instance label image with whole-number labels, not a probability or intensity image
    """
    arr = np.asarray(labels)
    if arr.dtype == bool:
        raise TypeError(
            f"{name} is a boolean mask: label its connected components first "
            "(skimage.measure.label), or compare masks with binary_dice / binary_iou"
        )
    if arr.dtype.kind in "iu":
        out = arr
    elif arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            raise TypeError(f"{name} holds NaN or infinite values: pass a label image of whole numbers")
        frac = arr != np.floor(arr)
        if frac.any():
            example = arr[frac].flat[0]
            raise TypeError(
                f"{name} holds fractional values (e.g. {example:g}): pass an instance label image "
                "with whole-number labels, not a probability or intensity image"
            )
        out = arr.astype(np.int64)
    else:
        raise TypeError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if out.size and out.dtype.kind == "i" and out.min() < 0:
        raise ValueError(f"{name} holds negative labels (min {int(out.min())}): labels must be >= 0")
    return out


def _check_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt_arr = check_label_image(gt, "gt")
    pred_arr = check_label_image(pred, "pred")
    if gt_arr.shape != pred_arr.shape:
        raise ValueError(
            f"gt has shape {gt_arr.shape} but pred has shape {pred_arr.shape}: "
            "compare label images of the same shape"
        )
    return gt_arr, pred_arr


def _check_thresholds(thresholds) -> tuple[float, ...]:
    if np.isscalar(thresholds):
        thresholds = (thresholds,)
    out = tuple(float(t) for t in thresholds)
    if not out:
        raise ValueError("give at least one IoU threshold, e.g. thresholds=(0.5,)")
    for t in out:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"IoU thresholds must be in (0, 1], got {t}")
    return out


def _dense_labels(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to ``0..K`` (0 = background); return (label values (K,), dense flat array)."""
    flat = arr.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.intp)
    top = int(flat.max())
    if top <= max(1 << 20, 4 * flat.size):
        present = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), lut[flat]
    values, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.intp)
    if values[0] == 0:
        return values[1:].astype(np.int64), inverse
    return values.astype(np.int64), inverse + 1


def _ratio(num: float, den: float, empty: bool) -> float:
    if den == 0:
        return 1.0 if empty else 0.0
    return float(num) / float(den)


# --------------------------------------------------------------------------- overlap


@dataclass(frozen=True)
class Overlap:
    """Sparse contingency table of two label images.

    Attributes
    ----------
    gt_labels, pred_labels : ndarray, shape (G,) and (P,)
        The object labels present (sorted, background excluded).
    gt_areas, pred_areas : ndarray, shape (G,) and (P,)
        Pixel counts of those objects.
    gt_index, pred_index : ndarray, shape (K,)
        For each overlapping pair, the position of its objects in ``gt_labels``
        and ``pred_labels``.
    intersection : ndarray, shape (K,)
        Pixels shared by each pair (> 0).
    """

    gt_labels: np.ndarray
    pred_labels: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    intersection: np.ndarray

    @property
    def n_gt(self) -> int:
        """Number of reference objects."""
        return int(self.gt_labels.size)

    @property
    def n_pred(self) -> int:
        """Number of predicted objects."""
        return int(self.pred_labels.size)

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair, shape ``(K,)``."""
        inter = self.intersection.astype(np.float64)
        union = self.gt_areas[self.gt_index] + self.pred_areas[self.pred_index] - inter
        return inter / union

    def iou_matrix(self) -> np.ndarray:
        """Dense IoU matrix, shape ``(G, P)`` (rows: gt objects, columns: predicted objects)."""
        out = np.zeros((self.n_gt, self.n_pred), np.float64)
        out[self.gt_index, self.pred_index] = self.iou
        return out


def label_overlap(gt, pred) -> Overlap:
    """Count the pixels shared by every reference and every predicted object.

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Label images, ``0`` = background.

    Returns
    -------
    Overlap

    Examples
    --------
    >>> ov = label_overlap(np.array([[1, 1, 0, 0]]), np.array([[0, 4, 4, 4]]))
    >>> ov.gt_labels, ov.pred_labels, ov.intersection, ov.iou
    (array([1]), array([4]), array([1]), array([0.25]))
    """
    gt_arr, pred_arr = _check_pair(gt, pred)
    gt_ids, g = _dense_labels(gt_arr)
    pred_ids, p = _dense_labels(pred_arr)
    n_g, n_p = gt_ids.size, pred_ids.size
    gt_areas = np.bincount(g, minlength=n_g + 1)[1:].astype(np.int64)
    pred_areas = np.bincount(p, minlength=n_p + 1)[1:].astype(np.int64)
    both = (g > 0) & (p > 0)
    codes = g[both].astype(np.int64) * (n_p + 1) + p[both]
    if (n_g + 1) * (n_p + 1) <= _DENSE_PAIR_LIMIT:
        counts = np.bincount(codes, minlength=(n_g + 1) * (n_p + 1))
        pair_codes = np.flatnonzero(counts)
        inter = counts[pair_codes]
    else:
        pair_codes, inter = np.unique(codes, return_counts=True)
    gi = pair_codes // (n_p + 1) - 1
    pj = pair_codes % (n_p + 1) - 1
    return Overlap(
        gt_labels=gt_ids,
        pred_labels=pred_ids,
        gt_areas=gt_areas,
        pred_areas=pred_areas,
        gt_index=gi.astype(np.intp),
        pred_index=pj.astype(np.intp),
        intersection=inter.astype(np.int64),
    )


def iou_matrix(gt, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every reference object with every predicted object.

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Label images, ``0`` = background.

    Returns
    -------
    iou : ndarray, shape (G, P)
        ``iou[i, j]`` is the IoU of ``gt_labels[i]`` and ``pred_labels[j]``.
    gt_labels : ndarray, shape (G,)
    pred_labels : ndarray, shape (P,)

    Examples
    --------
    >>> iou, g, p = iou_matrix(np.array([[1, 1, 2, 2]]), np.array([[5, 5, 5, 0]]))
    >>> iou.round(3), g, p
    (array([[0.667],
           [0.25 ]]), array([1, 2]), array([5]))
    """
    ov = label_overlap(gt, pred)
    return ov.iou_matrix(), ov.gt_labels, ov.pred_labels


def _match(ov: Overlap, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of the pairs with IoU >= threshold (positions and IoU)."""
    iou = ov.iou
    keep = iou >= threshold
    gi, pj, s = ov.gt_index[keep], ov.pred_index[keep], iou[keep]
    if gi.size == 0:
        return gi, pj, s
    ug, g_local = np.unique(gi, return_inverse=True)
    up, p_local = np.unique(pj, return_inverse=True)
    if ug.size == gi.size and up.size == pj.size:
        # every candidate pair is disjoint from the others: they all match (always so for t > 0.5)
        return gi, pj, s
    # Solve each connected component of the candidate graph on its own (they are independent and
    # mostly tiny). Weight 1 per matched pair plus a tie-breaker smaller than 1 in total: the
    # assignment maximises the number of pairs first, then their total IoU.
    n_rows = ug.size
    graph = coo_matrix(
        (np.ones(gi.size), (g_local, p_local + n_rows)), shape=(n_rows + up.size, n_rows + up.size)
    )
    _, component = connected_components(graph, directed=False)
    edge_component = component[g_local]
    order = np.argsort(edge_component, kind="stable")
    starts = np.flatnonzero(np.diff(edge_component[order], prepend=-1))
    stops = np.append(starts[1:], order.size)
    out_g, out_p, out_s = [], [], []
    for start, stop in zip(starts, stops):
        edges = order[start:stop]
        if edges.size == 1:
            out_g.append(gi[edges])
            out_p.append(pj[edges])
            out_s.append(s[edges])
            continue
        rows, r_local = np.unique(g_local[edges], return_inverse=True)
        cols, c_local = np.unique(p_local[edges], return_inverse=True)
        local_iou = np.zeros((rows.size, cols.size), np.float64)
        local_iou[r_local, c_local] = s[edges]
        k = min(rows.size, cols.size)
        weight = np.where(local_iou > 0, 1.0 + local_iou / (k + 1), 0.0)
        r, c = linear_sum_assignment(weight, maximize=True)
        real = weight[r, c] > 0
        r, c = r[real], c[real]
        out_g.append(ug[rows[r]])
        out_p.append(up[cols[c]])
        out_s.append(local_iou[r, c])
    return np.concatenate(out_g), np.concatenate(out_p), np.concatenate(out_s)


def match_instances(gt, pred, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of reference and predicted objects.

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Label images, ``0`` = background.
    threshold : float
        Smallest IoU of a matched pair, in (0, 1].

    Returns
    -------
    gt_labels, pred_labels : ndarray of int, shape (K,)
        The labels of the matched pairs, sorted by reference label.
    iou : ndarray of float, shape (K,)
        The IoU of each pair.

    Examples
    --------
    >>> match_instances(np.array([[1, 1, 2, 2]]), np.array([[5, 5, 5, 0]]))
    (array([1]), array([5]), array([0.66666667]))
    """
    (t,) = _check_thresholds((threshold,))
    ov = label_overlap(gt, pred)
    gi, pj, s = _match(ov, t)
    order = np.argsort(gi, kind="stable")
    return ov.gt_labels[gi[order]], ov.pred_labels[pj[order]], s[order]


# --------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class MatchScores:
    """Counts and figures of one image (or pooled images) at one IoU threshold.

    Attributes
    ----------
    threshold : float
        Smallest IoU of a true positive.
    tp, fp, fn : int
        Matched pairs, unmatched predicted objects, unmatched reference objects.
    iou_sum : float
        Sum of the IoU of the matched pairs (additive, so pooling is exact).

    Examples
    --------
    >>> s = MatchScores(0.5, tp=3, fp=1, fn=2, iou_sum=2.4)
    >>> s.ap, s.precision, s.recall, round(s.f1, 4), round(s.mean_matched_iou, 4)
    (0.5, 0.75, 0.6, 0.6667, 0.8)
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    iou_sum: float = 0.0

    @property
    def n_gt(self) -> int:
        """Reference objects (TP + FN)."""
        return self.tp + self.fn

    @property
    def n_pred(self) -> int:
        """Predicted objects (TP + FP)."""
        return self.tp + self.fp

    @property
    def _empty(self) -> bool:
        return self.n_gt == 0 and self.n_pred == 0

    @property
    def ap(self) -> float:
        """Average precision as in Cellpose: TP / (TP + FP + FN)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn, self._empty)

    @property
    def precision(self) -> float:
        """TP / (TP + FP)."""
        return _ratio(self.tp, self.tp + self.fp, self._empty)

    @property
    def recall(self) -> float:
        """TP / (TP + FN)."""
        return _ratio(self.tp, self.tp + self.fn, self._empty)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN): the harmonic mean of precision and recall."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, self._empty)

    @property
    def mean_matched_iou(self) -> float:
        """Mean IoU of the matched pairs (0 when nothing matched)."""
        return _ratio(self.iou_sum, self.tp, self._empty)

    @property
    def panoptic_quality(self) -> float:
        """Sum of matched IoU / (TP + FP / 2 + FN / 2) (Kirillov et al. 2019)."""
        return _ratio(self.iou_sum, self.tp + 0.5 * self.fp + 0.5 * self.fn, self._empty)

    def __add__(self, other: MatchScores) -> MatchScores:
        if not isinstance(other, MatchScores):
            return NotImplemented
        if other.threshold != self.threshold:
            raise ValueError(f"cannot pool scores at thresholds {self.threshold} and {other.threshold}")
        return MatchScores(
            self.threshold,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.iou_sum + other.iou_sum,
        )

    def to_dict(self) -> dict:
        """Counts and figures as JSON-ready Python numbers."""
        return {
            "threshold": float(self.threshold),
            "tp": int(self.tp),
            "fp": int(self.fp),
            "fn": int(self.fn),
            "iou_sum": float(self.iou_sum),
            "ap": self.ap,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "mean_matched_iou": self.mean_matched_iou,
            "panoptic_quality": self.panoptic_quality,
        }


def _key(name: str, threshold: float) -> str:
    return f"{name}@{threshold:g}"


#: ratio figures reported per threshold by :meth:`InstanceEvaluation.summary`
_THRESHOLD_FIGURES = ("ap", "precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")
_THRESHOLD_COUNTS = ("tp", "fp", "fn")


@dataclass(frozen=True)
class InstanceEvaluation:
    """Every instance metric of one image (or of several images pooled).

    All fields are counts or sums, so evaluations of several images add up
    exactly (:func:`pool`); the figures are properties computed from them.

    Attributes
    ----------
    name : str
        Image name (for tables), ``"pooled"`` for pooled evaluations.
    n_gt, n_pred : int
        Reference and predicted objects.
    scores : tuple of MatchScores
        One per IoU threshold, in the order given.
    seg_sum : float
        Sum over reference objects of their SEG Jaccard index.
    det_fn, det_fp, det_splits : int
        DET's unpaired reference objects, unpaired predicted objects and splits.
    n_images : int
        Images this evaluation covers.
    """

    name: str
    n_gt: int
    n_pred: int
    scores: tuple[MatchScores, ...]
    seg_sum: float
    det_fn: int
    det_fp: int
    det_splits: int
    n_images: int = 1

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The IoU thresholds, in order."""
        return tuple(s.threshold for s in self.scores)

    def at(self, threshold: float) -> MatchScores:
        """The :class:`MatchScores` at one of the evaluated thresholds."""
        for s in self.scores:
            if math.isclose(s.threshold, threshold, rel_tol=0, abs_tol=1e-12):
                return s
        raise KeyError(f"threshold {threshold} was not evaluated; evaluated: {self.thresholds}")

    @property
    def _empty(self) -> bool:
        return self.n_gt == 0 and self.n_pred == 0

    @property
    def seg(self) -> float:
        """Cell Tracking Challenge SEG (mean Jaccard over reference objects)."""
        return _ratio(self.seg_sum, self.n_gt, self._empty)

    @property
    def aogm(self) -> int:
        """Weighted vertex-operation cost ``5 NS + 10 FN + 1 FP``."""
        return _W_SPLIT * self.det_splits + _W_FN * self.det_fn + _W_FP * self.det_fp

    @property
    def aogm0(self) -> int:
        """Cost of building the reference from nothing, ``10 * n_gt``."""
        return _W_FN * self.n_gt

    @property
    def det(self) -> float:
        """Cell Tracking Challenge DET: ``1 - min(AOGM, AOGM_0) / AOGM_0``."""
        if self.aogm0 == 0:
            return 1.0 if self._empty else 0.0
        # (AOGM_0 - min(AOGM, AOGM_0)) / AOGM_0 == 1 - min(...) / AOGM_0, with one rounding only
        return (self.aogm0 - min(self.aogm, self.aogm0)) / self.aogm0

    def summary(self) -> dict[str, float | int | str]:
        """One flat row: name, counts, every figure at every threshold, SEG and DET.

        Keys look like ``"ap@0.5"``, ``"f1@0.75"``, ``"tp@0.9"``.
        """
        row: dict[str, float | int | str] = {
            "name": self.name,
            "n_images": int(self.n_images),
            "n_gt": int(self.n_gt),
            "n_pred": int(self.n_pred),
        }
        for s in self.scores:
            for fig in _THRESHOLD_FIGURES:
                row[_key(fig, s.threshold)] = getattr(s, fig)
            for cnt in _THRESHOLD_COUNTS:
                row[_key(cnt, s.threshold)] = int(getattr(s, cnt))
        row["seg"] = self.seg
        row["det"] = self.det
        return row

    def figures(self) -> dict[str, float]:
        """The ratio figures only (what :func:`aggregate` averages over images)."""
        out = {}
        for s in self.scores:
            for fig in _THRESHOLD_FIGURES:
                out[_key(fig, s.threshold)] = getattr(s, fig)
        out["seg"] = self.seg
        out["det"] = self.det
        return out

    def to_dict(self) -> dict:
        """Everything as JSON-ready Python values."""
        return {
            "name": self.name,
            "n_images": int(self.n_images),
            "n_gt": int(self.n_gt),
            "n_pred": int(self.n_pred),
            "thresholds": [float(t) for t in self.thresholds],
            "scores": [s.to_dict() for s in self.scores],
            "seg": self.seg,
            "seg_sum": float(self.seg_sum),
            "det": self.det,
            "det_fn": int(self.det_fn),
            "det_fp": int(self.det_fp),
            "det_splits": int(self.det_splits),
            "aogm": int(self.aogm),
            "aogm0": int(self.aogm0),
        }


@dataclass(frozen=True)
class AggregateEvaluation:
    """Evaluation of several images.

    Attributes
    ----------
    per_image : tuple of InstanceEvaluation
        One per image, in the order given.
    mean : dict of str to float
        The mean over images of each per-image figure (``"ap@0.5"``, ``"seg"``, ...):
        every image counts the same whatever its number of cells.
    pooled : InstanceEvaluation
        Counts summed over images, then the ratios: every object counts the
        same (CTC's SEG and DET over a time series are pooled this way).
    """

    per_image: tuple[InstanceEvaluation, ...]
    mean: dict[str, float] = field(default_factory=dict)
    pooled: InstanceEvaluation | None = None

    def to_dict(self) -> dict:
        """Everything as JSON-ready Python values."""
        return {
            "n_images": len(self.per_image),
            "per_image": [e.to_dict() for e in self.per_image],
            "mean": {k: float(v) for k, v in self.mean.items()},
            "pooled": None if self.pooled is None else self.pooled.to_dict(),
        }


# --------------------------------------------------------------------------- metrics


def _evaluate_overlap(ov: Overlap, thresholds: tuple[float, ...], name: str) -> InstanceEvaluation:
    scores = []
    for t in thresholds:
        gi, _, s = _match(ov, t)
        tp = int(gi.size)
        scores.append(MatchScores(t, tp, ov.n_pred - tp, ov.n_gt - tp, float(s.sum())))
    # CTC pairing: the predicted object covering more than half of a reference object
    covers = 2 * ov.intersection > ov.gt_areas[ov.gt_index]
    gi, pj = ov.gt_index[covers], ov.pred_index[covers]
    seg_sum = float(ov.iou[covers].sum())
    refs_per_pred = np.bincount(pj, minlength=ov.n_pred)
    det_fn = ov.n_gt - int(np.unique(gi).size)
    det_fp = int(np.count_nonzero(refs_per_pred == 0))
    det_splits = int(np.maximum(refs_per_pred - 1, 0).sum())
    return InstanceEvaluation(
        name=name,
        n_gt=ov.n_gt,
        n_pred=ov.n_pred,
        scores=tuple(scores),
        seg_sum=seg_sum,
        det_fn=det_fn,
        det_fp=det_fp,
        det_splits=det_splits,
    )


def evaluate_instances(
    gt, pred, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, name: str = ""
) -> InstanceEvaluation:
    """All instance metrics of one prediction: AP, P, R, F1, IoU at each threshold, SEG, DET.

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Reference and predicted label images, ``0`` = background.
    thresholds : sequence of float
        IoU thresholds in (0, 1].
    name : str
        Image name carried into tables.

    Returns
    -------
    InstanceEvaluation

    Examples
    --------
    >>> gt = np.array([[1, 1, 1, 1, 0, 2, 2]])
    >>> pred = np.array([[4, 4, 5, 5, 0, 2, 2]])  # cell 1 split in two halves
    >>> ev = evaluate_instances(gt, pred, thresholds=(0.5,))
    >>> ev.at(0.5).tp, ev.at(0.5).fp, ev.at(0.5).fn  # one half has IoU 0.5 >= 0.5
    (2, 1, 0)
    >>> ev.seg, ev.det  # no half covers *more* than half of cell 1: FN + 2 FP
    (0.5, 0.4)
    """
    ts = _check_thresholds(thresholds)
    return _evaluate_overlap(label_overlap(gt, pred), ts, str(name))


def average_precision(gt, pred, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> tuple[MatchScores, ...]:
    """Average precision ``TP / (TP + FP + FN)`` and its companions at each IoU threshold.

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Reference and predicted label images, ``0`` = background.
    thresholds : sequence of float
        IoU thresholds in (0, 1].

    Returns
    -------
    tuple of MatchScores
        One per threshold with ``ap``, ``precision``, ``recall``, ``f1``,
        ``mean_matched_iou``, ``panoptic_quality`` and the counts.

    Examples
    --------
    >>> gt = np.array([[1, 1, 0, 2, 2, 2]])
    >>> [s.ap for s in average_precision(gt, gt)]
    [1.0, 1.0, 1.0]
    >>> average_precision(gt, np.zeros_like(gt), thresholds=(0.5,))[0].ap
    0.0
    >>> average_precision(np.zeros((2, 2), int), np.zeros((2, 2), int), thresholds=(0.5,))[0].ap
    1.0
    """
    return evaluate_instances(gt, pred, thresholds).scores


def seg_score(gt, pred) -> float:
    """Cell Tracking Challenge SEG of one image.

    Each reference object scores the IoU with the predicted object covering
    more than half of its pixels, or 0 if none does; SEG is the mean.

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Reference and predicted label images.

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> seg_score(np.array([[1, 1, 1, 1]]), np.array([[2, 2, 2, 0]]))
    0.75
    >>> seg_score(np.array([[1, 1, 1, 1]]), np.array([[2, 2, 3, 3]]))  # half is not more than half
    0.0
    """
    return evaluate_instances(gt, pred, (0.5,)).seg


def detection_score(gt, pred) -> float:
    """Cell Tracking Challenge DET of one image (vertex operations of AOGM, CTC weights).

    Parameters
    ----------
    gt, pred : array_like, same shape, e.g. (M, N)
        Reference and predicted label images.

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> gt = np.array([[1, 1, 0, 2, 2]])
    >>> detection_score(gt, np.array([[3, 3, 3, 3, 3]]))  # two cells merged: one split needed
    0.75
    """
    return evaluate_instances(gt, pred, (0.5,)).det


def pool(evaluations: Iterable[InstanceEvaluation], name: str = "pooled") -> InstanceEvaluation:
    """Sum the counts of several evaluations (every object counts the same).

    Parameters
    ----------
    evaluations : iterable of InstanceEvaluation
        Evaluated at the same thresholds.
    name : str
        Name of the result.

    Returns
    -------
    InstanceEvaluation
    """
    evs = list(evaluations)
    if not evs:
        raise ValueError("nothing to pool: give at least one evaluation")
    thresholds = evs[0].thresholds
    for ev in evs[1:]:
        if ev.thresholds != thresholds:
            raise ValueError(
                f"evaluations use different IoU thresholds ({thresholds} and {ev.thresholds}): "
                "evaluate every image at the same thresholds"
            )
    scores = list(evs[0].scores)
    for ev in evs[1:]:
        scores = [a + b for a, b in zip(scores, ev.scores)]
    return InstanceEvaluation(
        name=name,
        n_gt=sum(e.n_gt for e in evs),
        n_pred=sum(e.n_pred for e in evs),
        scores=tuple(scores),
        seg_sum=float(sum(e.seg_sum for e in evs)),
        det_fn=sum(e.det_fn for e in evs),
        det_fp=sum(e.det_fp for e in evs),
        det_splits=sum(e.det_splits for e in evs),
        n_images=sum(e.n_images for e in evs),
    )


def aggregate(evaluations: Iterable[InstanceEvaluation]) -> AggregateEvaluation:
    """Summarise several images: mean of per-image figures, and pooled counts.

    Parameters
    ----------
    evaluations : iterable of InstanceEvaluation
        One per image, evaluated at the same thresholds.

    Returns
    -------
    AggregateEvaluation

    Examples
    --------
    >>> a = evaluate_instances(np.array([[1, 0]]), np.array([[1, 0]]), (0.5,), name="a")
    >>> b = evaluate_instances(np.array([[1, 2, 3]]), np.array([[0, 0, 0]]), (0.5,), name="b")
    >>> agg = aggregate([a, b])
    >>> agg.mean["ap@0.5"], agg.pooled.at(0.5).ap
    (0.5, 0.25)
    """
    evs = tuple(evaluations)
    if not evs:
        raise ValueError("nothing to aggregate: give at least one evaluation")
    pooled = pool(evs)
    rows = [e.figures() for e in evs]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return AggregateEvaluation(per_image=evs, mean=mean, pooled=pooled)


# --------------------------------------------------------------------------- semantic masks


def _binary_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    arr_a, arr_b = np.asarray(a), np.asarray(b)
    for name, arr in (("mask_a", arr_a), ("mask_b", arr_b)):
        if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
            raise TypeError(f"{name} must be a boolean or numeric mask, got dtype {arr.dtype}")
    if arr_a.shape != arr_b.shape:
        raise ValueError(
            f"mask_a has shape {arr_a.shape} but mask_b has shape {arr_b.shape}: "
            "compare masks of the same shape"
        )
    return arr_a != 0, arr_b != 0


def binary_dice(mask_a, mask_b) -> float:
    """Dice coefficient ``2 |A and B| / (|A| + |B|)`` of two foreground masks.

    Non-zero pixels are foreground, so label images work too (all objects
    merged). Two empty masks give 1.0.

    Parameters
    ----------
    mask_a, mask_b : array_like, same shape, e.g. (M, N)

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> binary_dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    0.5
    """
    a, b = _binary_pair(mask_a, mask_b)
    inter = int(np.count_nonzero(a & b))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return _ratio(2 * inter, total, total == 0)


def binary_iou(mask_a, mask_b) -> float:
    """Intersection over union (Jaccard) ``|A and B| / |A or B|`` of two foreground masks.

    Non-zero pixels are foreground. Two empty masks give 1.0.

    Parameters
    ----------
    mask_a, mask_b : array_like, same shape, e.g. (M, N)

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> round(binary_iou(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])), 4)
    0.3333
    """
    a, b = _binary_pair(mask_a, mask_b)
    inter = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(a | b))
    return _ratio(inter, union, union == 0)


def check_instance_labels(labels: np.ndarray, name: str) -> None:
    """Refuse a label plane that is not one connected region per cell: every cell painted with the same label
    (a mask, napari's most common slip), or an image or class map passed as labels. Fine-tuning would learn such
    labels as nonsense, and AP against them means nothing (``ValueError``, naming ``name``).

    The test: the share of labelled pixels in their label's largest 8-connected piece. Real instance labels keep
    nearly all of them there (a stray pixel or a split stroke costs little); in a mask all cells but one lie
    outside it.
    """
    from skimage.measure import label as connected

    pieces = connected(labels, background=0, connectivity=2)
    sizes = np.bincount(pieces.ravel())[1:]
    if sizes.size < 3:
        return
    owner = np.zeros(sizes.size, np.int64)  # the label of each piece
    fg = pieces > 0
    owner[pieces[fg] - 1] = labels[fg]
    ids, which = np.unique(owner, return_inverse=True)
    largest = np.zeros(ids.size, np.int64)
    np.maximum.at(largest, which.ravel(), sizes)
    kept = largest.sum() / sizes.sum()
    if kept >= 0.5:
        return
    if ids.size == 1:
        raise ValueError(
            f"{name}: all {sizes.size} painted regions share the label {int(ids[0])}, so they would be learnt "
            "as one cell. Give each cell its own number: in napari, pick a new label (press M) before painting "
            "each cell, or split a mask of separate cells with skimage.measure.label")
    raise ValueError(
        f"{name}: this does not look like an instance label image: its {ids.size} labels lie in {sizes.size} "
        f"separate pieces, and only {kept:.0%} of the labelled pixels are in their label's largest piece. Each "
        "cell needs its own number and one connected region (is it the image itself, or a class map?)")
