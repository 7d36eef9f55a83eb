from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_cellseg.core.models import load_model
from napari_cellseg.core.predictor import Predictor, clip_boxes, masks_to_labels


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_shapes_for_every_prompt_kind(tiny_vit, tiny_tinyvit):
    rng = np.random.default_rng(0)
    for model in (tiny_vit, tiny_tinyvit):
        p = Predictor(model)
        p.set_image(rng.random((40, 70)))
        r = p.predict(points=[[5, 5], [20, 30]], point_labels=[1, 0], box=[2, 2, 30, 40], multimask=True)
        assert r.masks.shape == (3, 40, 70) and r.masks.dtype == bool
        assert np.all(np.diff(r.scores) <= 0)  # best first
        masks, scores = p.predict_boxes(np.array([[0, 0, 10, 10], [5, 5, 40, 70], [1, 1, 3, 3]]), batch_size=2)
        assert masks.shape == (3, 40, 70) and scores.shape == (3,)
        masks, scores = p.predict_points(np.array([[1, 1], [39, 69]]))
        assert masks.shape == (2, 40, 70)


def test_batched_decoding_equals_one_by_one(tiny_vit):
    p = Predictor(tiny_vit)
    p.set_image(np.random.default_rng(1).random((64, 64)))
    boxes = np.array([[0, 0, 20, 20], [10, 30, 50, 60], [40, 5, 64, 30]])
    batched, s_b = p.predict_boxes(boxes, batch_size=3)
    for i, box in enumerate(boxes):
        single = p.predict(box=box)
        np.testing.assert_array_equal(single.masks[0], batched[i])
        assert single.scores[0] == pytest.approx(s_b[i], abs=1e-5)


def test_prompts_outside_or_without_image_are_explained(tiny_vit):
    p = Predictor(tiny_vit)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=[0, 0, 5, 5])
    p.set_image(np.zeros((30, 30)))
    with pytest.raises(ValueError, match="outside the image"):
        p.predict(points=[[40, 3]])
    with pytest.raises(ValueError, match="no area inside"):
        p.predict(box=[31, 0, 40, 10])
    with pytest.raises(ValueError, match="at least one"):
        p.decode()


def test_clip_boxes_orders_corners():
    np.testing.assert_array_equal(clip_boxes(np.array([[10, 20, 0, 5]]), (8, 30)), [[0, 5, 8, 20]])


def test_masks_to_labels_higher_score_wins():
    m = np.zeros((3, 4, 4), bool)
    m[0, :2] = True
    m[1, 1:3] = True
    labels = masks_to_labels(m, np.array([0.2, 0.9, 0.5]))
    assert (labels[1] == 2).all() and (labels[0] == 1).all() and (labels[3] == 0).all()
    assert 3 not in labels  # empty mask keeps its id unused


@pytest.mark.slow
def test_litemedsam_segments_a_synthetic_disk_from_its_box():
    from skimage.draw import disk

    image = np.zeros((200, 300), np.float32)
    truth = np.zeros(image.shape, bool)
    truth[disk((80, 120), 30, shape=image.shape)] = True
    image[truth] = 1.0
    image += np.random.default_rng(0).normal(0, 0.05, image.shape).astype(np.float32)
    p = Predictor(load_model("litemedsam", device="cpu"))
    p.set_image(image)
    r = p.predict(box=[48, 88, 113, 153])
    assert _iou(r.masks[0], truth) > 0.85


@pytest.mark.realdata
@pytest.mark.slow
def test_litemedsam_box_prompts_on_dsb_nuclei(shared_data):
    """Zero-shot LiteMedSAM at each ground-truth box of the DSB 2018 image: mean IoU >= 0.65."""
    from skimage.measure import regionprops

    folder = shared_data / "dsb2018-nucleus"
    image = tifffile.imread(folder / "images" / "dsb2018_img2d.tif")
    gt = tifffile.imread(folder / "masks" / "dsb2018_img2d.tif")
    props = regionprops(gt)
    p = Predictor(load_model("litemedsam", device="cpu"))
    p.set_image(image)
    masks, _ = p.predict_boxes(np.array([r.bbox for r in props]), batch_size=8)
    ious = [_iou(masks[i], gt == r.label) for i, r in enumerate(props)]
    assert len(ious) == 125
    assert np.mean(ious) >= 0.65, f"mean IoU {np.mean(ious):.3f}"


def test_bfloat16_encoder_embeds_in_float32_close_to_float32_and_draws_the_same_disk():
    from napari_cellseg.core.interactive import model_fingerprint

    model = load_model("litemedsam", device="cpu")
    fast = model.with_precision("bfloat16")
    yy, xx = np.mgrid[:256, :256]
    image = np.where((yy - 120) ** 2 + (xx - 140) ** 2 < 40**2, 0.8, 0.2) + np.random.default_rng(0).normal(
        0, 0.02, (256, 256))
    exact, approx = Predictor(model), Predictor(fast)
    exact.set_image(image)
    approx.set_image(image)
    a, b = exact.embedding.features, approx.embedding.features
    assert b.dtype == a.dtype == __import__("torch").float32
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05  # bfloat16 did run (not bit-identical) and stays close
    box = [78, 98, 163, 183]
    m1 = exact.predict(box=box).masks[0]
    m2 = approx.predict(box=box).masks[0]
    assert _iou(m1, m2) > 0.95
    assert model_fingerprint(model) != model_fingerprint(fast)  # embedding caches keep them apart


def test_bfloat16_encoder_runs_sam_vit_layouts_too(tiny_vit):
    """SAM's ViT (vit_b/l/h layout, relative positions, windowed and global attention) under bfloat16 autocast."""
    rng = np.random.default_rng(1)
    image = rng.random((40, 70))
    exact, approx = Predictor(tiny_vit), Predictor(tiny_vit.with_precision("bfloat16"))
    exact.set_image(image)
    approx.set_image(image)
    a, b = exact.embedding.features, approx.embedding.features
    assert b.dtype == a.dtype and b.shape == a.shape
    assert 0 < float((a - b).norm() / a.norm()) < 0.05
    r = approx.predict(box=[5, 5, 30, 50])
    assert r.masks.shape == (1, 40, 70)
