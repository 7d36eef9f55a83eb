"""Post-processing: distance maps to instances, NMS, painting and small-region rules."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_cellseg.core import postprocess as pp


def _disks(shape, centres, radii):
    labels = np.zeros(shape, np.int32)
    for k, (c, r) in enumerate(zip(centres, radii), start=1):
        rr, cc = disk(c, r, shape=shape)
        labels[rr, cc] = k
    return labels


def _same_partition(a, b):
    """True when two label images hold the same instances (ids may differ)."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _map_from_labels(labels):
    """A map with every cell pixel above the fill threshold: 0.2 at borders, 1 at centres."""
    d = pp.distance_targets(labels)
    return np.where(labels > 0, 0.2 + 0.8 * d, 0.0).astype(np.float32)


def test_distance_targets_are_one_at_centres_and_zero_outside():
    labels = _disks((40, 40), [(20, 20)], [8])
    d = pp.distance_targets(labels)
    assert d[20, 20] == pytest.approx(1.0)
    assert d[labels == 0].max() == 0
    assert 0 < d[labels > 0].min() < 0.2


def test_recovers_exact_disks():
    centres = [(20, 20), (20, 60), (60, 25), (62, 70), (90, 90)]
    labels = _disks((110, 110), centres, [9, 12, 7, 10, 6])
    out = pp.labels_from_distance_map(_map_from_labels(labels))
    assert out.max() == 5
    assert _same_partition(out, labels)


def test_recovers_touching_cells_exactly():
    # three cells in a row that share borders (a Voronoi split of touching disks)
    yy, xx = np.mgrid[:60, :100]
    centres = np.array([(30, 20), (30, 45), (32, 72)])
    radius = np.array([14, 13, 15])
    dist = np.hypot(yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None])
    inside = dist <= radius[:, None, None]
    nearest = np.argmin(np.where(inside, dist / radius[:, None, None], np.inf), axis=0)
    labels = np.where(inside.any(axis=0), nearest + 1, 0).astype(np.int32)
    # the cells really touch
    assert ((labels[:, 1:] == 1) & (labels[:, :-1] == 2) | (labels[:, 1:] == 2) & (labels[:, :-1] == 1)).any()
    out = pp.labels_from_distance_map(_map_from_labels(labels))
    assert out.max() == 3
    assert _same_partition(out, labels)


def test_sam_cell_style_map_with_default_thresholds():
    # the plain normalised distance map: the fill threshold trims the outer ring, each disk stays one cell
    labels = _disks((80, 80), [(20, 20), (50, 55)], [12, 15])
    out = pp.labels_from_distance_map(pp.distance_targets(labels))
    assert out.max() == 2
    for k in (1, 2):
        region = out[labels == k]
        assert len(np.unique(region[region > 0])) == 1
        assert (out[labels == 0] == 0).all()
        assert (region > 0).mean() > 0.75


def test_thresholds_min_size_and_holes():
    labels = _disks((60, 60), [(15, 15), (45, 45)], [10, 3])
    dmap = _map_from_labels(labels)
    assert pp.labels_from_distance_map(dmap, min_size=50).max() == 1
    assert pp.labels_from_distance_map(dmap, peak=1.0).max() == 0
    assert pp.labels_from_distance_map(np.zeros((10, 10))).max() == 0
    holed = dmap.copy()
    holed[15, 21] = 0.0  # a dark pixel inside the first cell, away from its centre
    assert pp.labels_from_distance_map(holed)[15, 21] == 0
    out = pp.labels_from_distance_map(holed, fill_holes=True)
    assert out[15, 21] == out[15, 15] != 0
    with pytest.raises(ValueError, match="must not exceed the peak"):
        pp.labels_from_distance_map(dmap, peak=0.1, fill=0.5)
    with pytest.raises(ValueError, match="2D"):
        pp.labels_from_distance_map(np.zeros((2, 4, 4)))


def test_equals_global_watershed_on_random_maps():
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    rng = np.random.default_rng(3)
    dmap = ndi.gaussian_filter(rng.random((120, 140)), 4)
    dmap = (dmap - dmap.min()) / np.ptp(dmap)
    out = pp.labels_from_distance_map(dmap, peak=0.7, fill=0.3)
    markers, _ = ndi.label(dmap > 0.7)
    ref = pp.relabel_sequential(watershed(-dmap, markers, mask=dmap > 0.3))
    # identical up to pixels tied between two cells
    assert (out != ref).mean() < 1e-3
    assert out.max() == ref.max()


def test_stability_score_numpy_and_torch():
    torch = pytest.importorskip("torch")
    logits = np.array([[[-2.0, -0.5, 0.5, 2.0]], [[-5.0, -5.0, -5.0, -5.0]]])
    s = pp.stability_score(logits, 0.0, 0.8)
    assert s.tolist() == [pytest.approx(1 / 3), 1.0]  # one above +0.8 of three above -0.8; empty -> 1
    st = pp.stability_score(torch.as_tensor(logits), 0.0, 0.8)
    assert st.numpy() == pytest.approx(s)


def test_two_stage_nms_on_hand_made_masks():
    a = pp.CropMask(0, 0, np.ones((10, 10), bool))         # cell, area 100
    b = pp.CropMask(1, 1, np.ones((10, 10), bool))         # duplicate of a: IoU 81/119
    c = pp.CropMask(9, 9, np.ones((10, 10), bool))         # neighbour touching a by 1 px: IoU 1/199 < 0.05
    d = pp.CropMask(30, 30, np.ones((5, 5), bool))         # far away
    scores = [0.9, 0.95, 0.8, 0.5]
    keep = pp.nms_crop_masks([a, b, c, d], scores, iou_threshold=0.05)
    assert keep.tolist() == [1, 2, 3]  # best first; a suppressed by b; c overlaps b by 4 px: IoU 4/196 = 0.02
    assert pp.nms_crop_masks([a, b, c, d], scores, iou_threshold=0.01).tolist() == [1, 3]
    assert pp.nms_crop_masks([], []).tolist() == []


def test_nms_computes_mask_iou_only_for_touching_boxes():
    masks = [pp.CropMask(20 * i, 0, np.ones((10, 10), bool)) for i in range(5)]
    masks.append(pp.CropMask(5, 0, np.ones((10, 10), bool)))  # overlaps masks 0 and 1
    boxes = np.array([m.box for m in masks])
    calls = []

    def pair_iou(i, js):
        calls.append((int(i), sorted(int(j) for j in js)))
        return np.array([pp.crop_mask_iou(masks[i], masks[j]) for j in js])

    keep = pp.nms_two_stage(boxes, np.arange(6)[::-1].astype(float), pair_iou, 0.05)
    assert keep.tolist() == [0, 1, 2, 3, 4]
    assert calls == [(0, [5])]  # mask 5 is suppressed by mask 0; no other boxes touch


def test_dense_nms_and_boxes():
    m = np.zeros((3, 20, 20), bool)
    m[0, 2:8, 2:8] = True
    m[1, 3:8, 2:8] = True
    m[2, 12:15, 1:19] = True
    assert pp.masks_to_boxes(m).tolist() == [[2, 2, 8, 8], [3, 2, 8, 8], [12, 1, 15, 19]]
    assert pp.nms_masks(m, [0.5, 0.6, 0.1]).tolist() == [1, 2]
    assert pp.masks_to_boxes(np.zeros((1, 4, 4), bool)).tolist() == [[0, 0, 0, 0]]


def test_smaller_mask_wins_where_masks_overlap():
    big = np.zeros((12, 12), bool)
    big[1:11, 1:11] = True
    small = np.zeros((12, 12), bool)
    small[8:12, 8:12] = True  # sticks out of the big one
    # order and ids do not matter: the small mask keeps its pixels inside the big one
    for masks in ([big, small], [small, big]):
        out = pp.paint_dense_smaller_wins(np.array(masks))
        small_id = 1 + [m is small for m in masks].index(True)
        big_id = 3 - small_id
        assert (out[small] == small_id).all()
        assert (out[big & ~small] == big_id).all()
        assert (out[~(big | small)] == 0).all()


def test_remove_small_regions_and_large_masks():
    lab = np.zeros((30, 30), np.int32)
    lab[0:10, 0:10] = 1
    lab[20:22, 20:22] = 1   # stray piece of label 1 (4 px)
    lab[25:27, 0:3] = 2      # tiny cell (6 px)
    out = pp.remove_small_regions(lab, 20)
    assert out.max() == 1 and (out > 0).sum() == 100
    assert pp.remove_small_labels(lab, 20).max() == 1
    assert pp.large_mask_filter([10, 91, 90], 900, 0.1).tolist() == [True, False, True]


def test_region_prompts_peaks_and_boxes():
    labels = _disks((50, 50), [(15, 15), (35, 30)], [6, 8])
    dmap = pp.distance_targets(labels)
    from scipy import ndimage as ndi

    ids, pts, boxes = pp.region_prompts(labels, dmap, margin=0, min_margin=0)
    assert ids.tolist() == [1, 2]
    assert pts.tolist() == [[15.0, 15.0], [35.0, 30.0]]
    expected = [[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in ndi.find_objects(labels)]
    assert boxes.tolist() == expected
    _, _, padded = pp.region_prompts(labels, dmap, margin=0.5, min_margin=2)
    pad = np.maximum(np.ceil((boxes[:, 2:] - boxes[:, :2]) * 0.5), 2)
    assert padded[:, :2].tolist() == np.maximum(boxes[:, :2] - pad, 0).tolist()
    assert padded[:, 2:].tolist() == np.minimum(boxes[:, 2:] + pad, 50).tolist()
    assert padded[1, 2] == 50  # clipped to the image


def test_inputs_are_not_modified():
    labels = _disks((40, 40), [(20, 20)], [8])
    dmap = _map_from_labels(labels)
    before = dmap.copy()
    pp.labels_from_distance_map(dmap, fill_holes=True, min_size=3)
    assert np.array_equal(dmap, before)
    lab = labels.copy()
    pp.remove_small_regions(lab, 5)
    pp.fill_label_holes(lab)
    assert np.array_equal(lab, labels)
