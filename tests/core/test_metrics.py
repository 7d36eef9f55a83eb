"""Instance and semantic metrics against hand-computed values and a brute-force reference."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from napari_cellseg.core.metrics import (
    aggregate,
    average_precision,
    binary_dice,
    binary_iou,
    check_label_image,
    detection_score,
    evaluate_instances,
    iou_matrix,
    label_overlap,
    match_instances,
    pool,
    seg_score,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def row(*segments, length=20):
    """A (1, length) label image from (label, start, stop) segments."""
    out = np.zeros((1, length), np.int64)
    for label, start, stop in segments:
        out[0, start:stop] = label
    return out


def counts(scores):
    return (scores.tp, scores.fp, scores.fn)


# --------------------------------------------------------------------------- hand-made cases


def test_identical_with_relabelled_non_consecutive_labels():
    gt = np.zeros((6, 6), np.uint8)
    gt[0:2, 0:2] = 1
    gt[3:6, 0:3] = 2
    gt[0:3, 4:6] = 3
    pred = np.zeros((6, 6), np.uint32)
    pred[gt == 1] = 500
    pred[gt == 2] = 7
    pred[gt == 3] = 70000
    ev = evaluate_instances(gt, pred, thresholds=(0.5, 0.75, 0.9, 1.0))
    assert (ev.n_gt, ev.n_pred) == (3, 3)
    for s in ev.scores:
        assert counts(s) == (3, 0, 0)
        assert s.ap == s.precision == s.recall == s.f1 == s.mean_matched_iou == s.panoptic_quality == 1.0
    assert ev.seg == 1.0 and ev.det == 1.0
    g, p, iou = match_instances(gt, pred)
    assert g.tolist() == [1, 2, 3] and p.tolist() == [500, 7, 70000] and iou.tolist() == [1.0, 1.0, 1.0]


def test_empty_prediction_scores_zero():
    gt = row((1, 0, 4), (2, 6, 9))
    ev = evaluate_instances(gt, np.zeros_like(gt), thresholds=(0.5,))
    s = ev.at(0.5)
    assert counts(s) == (0, 0, 2)
    assert (s.ap, s.precision, s.recall, s.f1, s.mean_matched_iou, s.panoptic_quality) == (0.0,) * 6
    assert ev.seg == 0.0
    assert (ev.det_fn, ev.det_fp, ev.det_splits, ev.aogm, ev.aogm0) == (2, 0, 0, 20, 20)
    assert ev.det == 0.0


def test_empty_ground_truth_with_predictions_scores_zero():
    pred = row((4, 2, 5))
    ev = evaluate_instances(np.zeros_like(pred), pred, thresholds=(0.5,))
    s = ev.at(0.5)
    assert counts(s) == (0, 1, 0)
    assert (s.ap, s.precision, s.recall, s.f1, s.mean_matched_iou) == (0.0,) * 5
    assert ev.seg == 0.0 and ev.det == 0.0


def test_both_empty_is_perfect():
    empty = np.zeros((4, 5), np.uint16)
    ev = evaluate_instances(empty, empty)
    for s in ev.scores:
        assert counts(s) == (0, 0, 0)
        assert s.ap == s.precision == s.recall == s.f1 == s.mean_matched_iou == s.panoptic_quality == 1.0
    assert ev.seg == 1.0 and ev.det == 1.0
    assert binary_dice(empty, empty) == 1.0 and binary_iou(empty, empty) == 1.0


def test_one_reference_overlapped_by_two_predictions():
    gt = row((1, 0, 10))
    pred = row((5, 0, 7), (9, 7, 10))  # IoU 0.7 and 0.3
    ev = evaluate_instances(gt, pred, thresholds=(0.5, 0.75))
    s = ev.at(0.5)
    assert counts(s) == (1, 1, 0)
    assert s.ap == 0.5 and s.precision == 0.5 and s.recall == 1.0
    assert s.f1 == pytest.approx(2 / 3, rel=1e-15)
    assert s.mean_matched_iou == pytest.approx(0.7, rel=1e-15)
    assert s.panoptic_quality == pytest.approx(0.7 / 1.5, rel=1e-15)
    assert counts(ev.at(0.75)) == (0, 2, 1) and ev.at(0.75).ap == 0.0
    assert ev.seg == pytest.approx(0.7, rel=1e-15)  # 7 of 10 pixels covered: more than half
    assert (ev.det_fn, ev.det_fp, ev.det_splits) == (0, 1, 0)
    assert ev.det == pytest.approx(0.9, rel=1e-15)  # AOGM 1 of AOGM_0 10


def test_two_references_merged_into_one_prediction():
    gt = row((1, 0, 5), (2, 5, 10))
    pred = row((3, 0, 10))
    ev = evaluate_instances(gt, pred, thresholds=(0.5, 0.51))
    assert counts(ev.at(0.5)) == (1, 0, 1)  # IoU exactly 0.5 counts (>=), one-to-one
    assert ev.at(0.5).ap == 0.5 and ev.at(0.5).mean_matched_iou == 0.5
    assert counts(ev.at(0.51)) == (0, 1, 2)
    assert ev.seg == 0.5  # the merged cell covers all of both: Jaccard 1/2 each
    assert (ev.det_fn, ev.det_fp, ev.det_splits) == (0, 0, 1)
    assert ev.det == 0.75  # one split, 5 of 20


def test_split_cell():
    gt = row((1, 0, 4), (2, 5, 7))
    pred = row((4, 0, 2), (5, 2, 4), (2, 5, 7))
    ev = evaluate_instances(gt, pred, thresholds=(0.5, 0.75))
    assert counts(ev.at(0.5)) == (2, 1, 0)  # one half has IoU exactly 0.5
    assert ev.at(0.5).ap == pytest.approx(2 / 3, rel=1e-15)
    assert ev.at(0.5).mean_matched_iou == 0.75
    assert counts(ev.at(0.75)) == (1, 2, 1) and ev.at(0.75).ap == 0.25
    assert ev.seg == 0.5  # neither half covers more than half of cell 1
    assert (ev.det_fn, ev.det_fp, ev.det_splits) == (1, 2, 0)
    assert ev.det == pytest.approx(0.4, rel=1e-15)  # AOGM 12 of 20


def test_optimal_matching_beats_greedy():
    # A = 0..9, B = 10..19; X = 3..13 overlaps A (IoU 7/14) and B (4/17); Y = 0..2 overlaps A (3/10).
    # Greedy (best IoU first) takes A-X and leaves B and Y unmatched; the optimum is A-Y and B-X.
    gt = row((1, 0, 10), (2, 10, 20))
    pred = row((8, 3, 14), (9, 0, 3))
    iou, g, p = iou_matrix(gt, pred)
    assert g.tolist() == [1, 2] and p.tolist() == [8, 9]
    np.testing.assert_array_equal(iou, [[7 / 14, 3 / 10], [4 / 17, 0.0]])
    ev = evaluate_instances(gt, pred, thresholds=(0.2, 0.25, 0.5))
    assert counts(ev.at(0.2)) == (2, 0, 0)
    assert ev.at(0.2).mean_matched_iou == pytest.approx((3 / 10 + 4 / 17) / 2, rel=1e-15)
    assert counts(ev.at(0.25)) == (1, 1, 1)
    assert ev.at(0.25).mean_matched_iou == 0.5  # of A-X and A-Y, the higher IoU is kept
    assert counts(ev.at(0.5)) == (1, 1, 1)
    g, p, s = match_instances(gt, pred, threshold=0.2)
    assert list(zip(g.tolist(), p.tolist())) == [(1, 9), (2, 8)]
    assert ev.seg == 0.25  # A: X covers 7/10 -> 0.5; B: X covers 4/10 -> 0
    assert ev.det == pytest.approx(0.45, rel=1e-15)  # B missed (10), Y spurious (1), of 20


def test_average_precision_seg_and_det_shortcuts_agree():
    gt = row((1, 0, 4), (2, 5, 7))
    pred = row((4, 0, 2), (5, 2, 4), (2, 5, 7))
    ev = evaluate_instances(gt, pred)
    assert [s.to_dict() for s in average_precision(gt, pred)] == [s.to_dict() for s in ev.scores]
    assert seg_score(gt, pred) == ev.seg
    assert detection_score(gt, pred) == ev.det


def test_label_overlap_counts():
    gt = np.array([[1, 1, 0], [2, 2, 2]])
    pred = np.array([[3, 0, 0], [3, 3, 4]])
    ov = label_overlap(gt, pred)
    assert ov.gt_labels.tolist() == [1, 2] and ov.pred_labels.tolist() == [3, 4]
    assert ov.gt_areas.tolist() == [2, 3] and ov.pred_areas.tolist() == [3, 1]
    pairs = sorted(zip(ov.gt_index.tolist(), ov.pred_index.tolist(), ov.intersection.tolist()))
    assert pairs == [(0, 0, 1), (1, 0, 2), (1, 1, 1)]
    np.testing.assert_array_equal(ov.iou_matrix(), [[1 / 4, 0.0], [2 / 4, 1 / 3]])


def test_huge_label_values_and_mixed_dtypes():
    gt = np.zeros((3, 4), np.uint8)
    gt[0, :2] = 1
    gt[2, 1:] = 200
    pred = np.zeros((3, 4), np.int64)
    pred[0, :2] = 2**40  # too large for a lookup table: the np.unique path
    pred[2, 1:] = 3
    ev = evaluate_instances(gt, pred)
    assert all(counts(s) == (2, 0, 0) for s in ev.scores)


def test_whole_float_labels_are_accepted():
    gt = row((1, 0, 4), (2, 5, 7))
    pred = row((4, 0, 3), (2, 5, 7))
    a = evaluate_instances(gt.astype(np.float32), pred.astype(np.float64))
    b = evaluate_instances(gt, pred)
    assert a.to_dict() == b.to_dict()
    assert check_label_image(np.array([0.0, 3.0])).tolist() == [0, 3]


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (np.array([[0.0, 1.5]]), TypeError, "fractional"),
        (np.array([[0.0, np.nan]]), TypeError, "NaN"),
        (np.array([[0, -1]]), ValueError, "negative"),
        (np.array([[True, False]]), TypeError, "skimage.measure.label"),
        (np.array([["a", "b"]]), TypeError, "dtype"),
    ],
)
def test_bad_labels_are_rejected(bad, error, words):
    with pytest.raises(error, match=words):
        evaluate_instances(np.zeros(bad.shape, int), bad)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        evaluate_instances(np.zeros((3, 4), int), np.zeros((4, 3), int))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        binary_dice(np.zeros(2), np.zeros(3))


@pytest.mark.parametrize("thresholds", [(0.0,), (1.2,), (), (-0.5, 0.5)])
def test_bad_thresholds(thresholds):
    with pytest.raises(ValueError, match="threshold"):
        evaluate_instances(np.zeros((2, 2), int), np.zeros((2, 2), int), thresholds=thresholds)


def test_inputs_are_not_modified():
    gt = row((3, 0, 4), (9, 5, 7)).astype(np.float64)
    pred = row((4, 1, 3))
    gt_copy, pred_copy = gt.copy(), pred.copy()
    evaluate_instances(gt, pred)
    binary_dice(gt, pred)
    np.testing.assert_array_equal(gt, gt_copy)
    np.testing.assert_array_equal(pred, pred_copy)


def test_binary_dice_and_iou():
    a = np.zeros((4, 4), bool)
    a[:2, :] = True  # 8 px
    b = np.zeros((4, 4), np.uint16)
    b[1:3, :] = 7  # 8 px, 4 shared
    assert binary_dice(a, b) == 0.5
    assert binary_iou(a, b) == pytest.approx(4 / 12, rel=1e-15)
    assert binary_dice(a, np.zeros_like(a)) == 0.0
    assert binary_iou(np.zeros_like(a), a) == 0.0
    assert binary_dice(a, a) == 1.0


# --------------------------------------------------------------------------- aggregation and JSON


def test_aggregate_mean_and_pooled():
    a = evaluate_instances(row((1, 0, 3)), row((1, 0, 3)), thresholds=(0.5,), name="a")
    b = evaluate_instances(row((1, 0, 2), (2, 4, 6), (3, 8, 9)), np.zeros((1, 20), int), (0.5,), name="b")
    agg = aggregate([a, b])
    assert [e.name for e in agg.per_image] == ["a", "b"]
    assert agg.mean["ap@0.5"] == 0.5 and agg.mean["seg"] == 0.5 and agg.mean["det"] == 0.5
    assert agg.mean["recall@0.5"] == 0.5 and agg.mean["precision@0.5"] == 0.5
    pooled = agg.pooled
    assert pooled.name == "pooled" and pooled.n_images == 2
    assert counts(pooled.at(0.5)) == (1, 0, 3)
    assert pooled.at(0.5).ap == 0.25 and pooled.at(0.5).precision == 1.0
    assert pooled.seg == 0.25  # 1 + 0 + 0 + 0 over 4 reference cells
    assert pooled.det == 0.25  # AOGM 30 of 40
    with pytest.raises(ValueError, match="thresholds"):
        pool([a, evaluate_instances(row((1, 0, 3)), row((1, 0, 3)), thresholds=(0.7,))])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_to_dict_is_json_ready():
    gt = row((1, 0, 4), (2, 5, 7))
    pred = row((4, 0, 2), (5, 2, 4), (2, 5, 7))
    ev = evaluate_instances(gt, pred, name="img")
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["name"] == "img" and d["n_gt"] == 2 and d["n_pred"] == 3
    assert d["thresholds"] == [0.5, 0.75, 0.9]
    assert d["scores"][1] == {
        "threshold": 0.75,
        "tp": 1,
        "fp": 2,
        "fn": 1,
        "iou_sum": 1.0,
        "ap": 0.25,
        "precision": 1 / 3,
        "recall": 0.5,
        "f1": 0.4,
        "mean_matched_iou": 1.0,
        "panoptic_quality": 1 / 2.5,
    }
    assert d["seg"] == 0.5 and d["det"] == 0.4 and d["aogm"] == 12 and d["aogm0"] == 20
    agg = json.loads(json.dumps(aggregate([ev, ev]).to_dict()))
    assert agg["n_images"] == 2 and agg["pooled"]["n_gt"] == 4
    row_ = ev.summary()
    assert row_["ap@0.75"] == 0.25 and row_["tp@0.75"] == 1 and row_["seg"] == 0.5


# --------------------------------------------------------------------------- brute-force reference


def reference_scores(gt: np.ndarray, pred: np.ndarray, threshold: float):
    """Pure-Python reference: pixel sets, exact fractions, exhaustive matching per connected component."""
    gt_objs: dict[int, set] = {}
    pred_objs: dict[int, set] = {}
    for idx, v in np.ndenumerate(gt):
        if v:
            gt_objs.setdefault(int(v), set()).add(idx)
    for idx, v in np.ndenumerate(pred):
        if v:
            pred_objs.setdefault(int(v), set()).add(idx)
    iou = {}
    for g, gs in gt_objs.items():
        for p, ps in pred_objs.items():
            inter = len(gs & ps)
            if inter:
                iou[(g, p)] = Fraction(inter, len(gs | ps))
    edges = [e for e, v in iou.items() if v >= Fraction(threshold).limit_denominator(10**9)]
    # connected components of the candidate graph, then every matching of each component
    tp, iou_sum = 0, Fraction(0)
    remaining = set(edges)
    while remaining:
        comp = {remaining.pop()}
        grew = True
        while grew:
            grew = False
            for e in list(remaining):
                if any(e[0] == f[0] or e[1] == f[1] for f in comp):
                    comp.add(e)
                    remaining.discard(e)
                    grew = True
        comp = sorted(comp)
        best = (0, Fraction(0))
        for k in range(len(comp), 0, -1):
            for subset in itertools.combinations(comp, k):
                if len({e[0] for e in subset}) == k and len({e[1] for e in subset}) == k:
                    best = max(best, (k, sum(iou[e] for e in subset)))
            if best[0] == k:
                break
        tp += best[0]
        iou_sum += best[1]
    # SEG and DET: the predicted object covering more than half of each reference object
    seg_sum = Fraction(0)
    refs_of = {p: 0 for p in pred_objs}
    fn = 0
    for g, gs in gt_objs.items():
        cover = [p for p, ps in pred_objs.items() if 2 * len(gs & ps) > len(gs)]
        if cover:
            seg_sum += iou[(g, cover[0])]
            refs_of[cover[0]] += 1
        else:
            fn += 1
    fp = sum(1 for n in refs_of.values() if n == 0)
    ns = sum(n - 1 for n in refs_of.values() if n > 1)
    n_gt, n_pred = len(gt_objs), len(pred_objs)
    aogm, aogm0 = 5 * ns + 10 * fn + fp, 10 * n_gt
    det = Fraction(aogm0 - min(aogm, aogm0), aogm0) if aogm0 else Fraction(int(n_pred == 0))
    seg = seg_sum / n_gt if n_gt else Fraction(int(n_pred == 0))
    return {
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_gt - tp,
        "iou_sum": iou_sum,
        "seg": seg,
        "det": det,
    }


def random_label_pair(rng, shape=(12, 14)):
    gt = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    rects = []
    for label in rng.choice(np.arange(1, 60), size=rng.integers(0, 7), replace=False):
        r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, 6), rng.integers(2, 6)
        gt[r : r + h, c : c + w] = label
        rects.append((r, c, h, w))
    for k, (r, c, h, w) in enumerate(rects):
        if rng.random() < 0.2:
            continue  # missed
        dr, dc, dh, dw = rng.integers(-2, 3, size=4)
        r2, c2 = max(0, r + dr), max(0, c + dc)
        pred[r2 : r2 + max(1, h + dh), c2 : c2 + max(1, w + dw)] = 100 + 3 * k
    for k in range(rng.integers(0, 3)):  # spurious objects
        r, c = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
        pred[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = 1000 + k
    return gt, pred


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    gt, pred = random_label_pair(rng)
    thresholds = (0.1, 0.25, 0.5, 0.75)
    ev = evaluate_instances(gt, pred, thresholds)
    for t in thresholds:
        ref = reference_scores(gt, pred, t)
        s = ev.at(t)
        assert counts(s) == (ref["tp"], ref["fp"], ref["fn"]), (seed, t)
        assert s.iou_sum == pytest.approx(float(ref["iou_sum"]), rel=1e-12, abs=1e-12)
    ref = reference_scores(gt, pred, 0.5)
    assert ev.seg == pytest.approx(float(ref["seg"]), rel=1e-12, abs=1e-12)
    assert ev.det == pytest.approx(float(ref["det"]), rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_nuclei_self_and_eroded():
    mask_path = SHARED_DATA / "dsb2018-nucleus" / "masks" / "dsb2018_img2d.tif"
    if not mask_path.is_file():
        pytest.skip(f"real data not found at {mask_path} (the ../shared folder beside the checkout)")
    import tifffile
    from skimage.morphology import disk, erosion

    gt = tifffile.imread(mask_path)
    assert gt.shape == (512, 512) and len(np.unique(gt)) - 1 == 125
    ev = evaluate_instances(gt, gt)
    assert all(s.ap == 1.0 and s.mean_matched_iou == 1.0 for s in ev.scores)
    assert ev.seg == 1.0 and ev.det == 1.0

    eroded = erosion(gt, disk(2))
    ev = evaluate_instances(gt, eroded, thresholds=(0.5, 0.75, 0.9))
    aps = [s.ap for s in ev.scores]
    assert aps[0] > aps[1] > aps[2]
    assert aps[2] < 0.5 and ev.seg < 1.0
    for t in (0.5, 0.75, 0.9):
        ref = reference_scores(gt, eroded, t)
        assert counts(ev.at(t)) == (ref["tp"], ref["fp"], ref["fn"])
        assert ev.at(t).iou_sum == pytest.approx(float(ref["iou_sum"]), rel=1e-12)
    ref = reference_scores(gt, eroded, 0.5)
    assert ev.seg == pytest.approx(float(ref["seg"]), rel=1e-12)
    assert ev.det == pytest.approx(float(ref["det"]), rel=1e-12)


def test_agrees_with_cellpose_when_installed():
    """Cross-check with Cellpose's own AP (skipped unless cellpose and its imports are installed)."""
    cpm = pytest.importorskip("cellpose.metrics")
    from skimage.segmentation import relabel_sequential

    thresholds = [0.1, 0.25, 0.5, 0.75, 0.9]
    for seed in range(60):
        gt, pred = random_label_pair(np.random.default_rng(seed))
        if gt.max() == 0 or pred.max() == 0:
            continue  # cellpose counts objects by their largest label
        gt, pred = relabel_sequential(gt)[0], relabel_sequential(pred)[0]
        ap, tp, fp, fn = cpm.average_precision([gt], [pred], threshold=thresholds)
        ev = evaluate_instances(gt, pred, thresholds)
        for i, t in enumerate(thresholds):
            assert counts(ev.at(t)) == (tp[0, i], fp[0, i], fn[0, i])
            assert ev.at(t).ap == pytest.approx(ap[0, i], rel=1e-12)
