"""FastMaskDecoder answers exactly what segment-anything's decoder answers (up to float rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cellseg.core.fast_decoder import FastMaskDecoder, fast_decoder_unsupported
from napari_cellseg.core.predictor import Predictor

ATOL = 1e-4  # logits of the tiny random models are O(0.1-1); float32 rounding differs by ~1e-7


@pytest.fixture
def wide_decoder():
    """Tiny encoder, decoder of SAM's real width (256): the low-rank attention path runs (8 heads x 7 tokens < 128)."""
    from napari_cellseg.core.models import random_model

    return random_model("tinyvit_test", device="cpu", seed=0, prompt_dim=256)


def _same_masks(fast, ref, logits, thr=0.0, margin=1e-4):
    """Masks equal wherever the reference logit is not within ``margin`` of the threshold."""
    clear = np.abs(logits - thr) > margin
    np.testing.assert_array_equal(fast[clear], ref[clear])
    assert clear.mean() > 0.99


def _sam_predictor(predictor: Predictor):
    """segment-anything's SamPredictor on the same embedding and resize as ``predictor``."""
    from segment_anything import SamPredictor

    emb = predictor.embedding
    sp = SamPredictor(predictor.model.sam)
    sp.features = emb.features
    sp.original_size = tuple(emb.image_shape)
    sp.input_size = tuple(emb.transform.resized_shape)
    sp.is_image_set = True
    return sp


PROMPTS = {
    "box": dict(boxes=[[4, 6, 30, 40], [0, 0, 45, 60], [10, 20, 20, 30]]),
    "click": dict(points=[[[12, 15]], [[30, 50]], [[2, 3]]]),
    "clicks with negatives and padding": dict(points=[[[12, 15], [20, 25], [30, 30]], [[30, 50], [5, 5], [0, 0]],
                                                      [[2, 3], [0, 0], [0, 0]]],
                                              labels=[[1, 0, 1], [1, 0, -1], [1, -1, -1]]),
    "box and points": dict(boxes=[[4, 6, 30, 40], [0, 0, 45, 60], [10, 20, 20, 30]],
                           points=[[[12, 15], [20, 25]], [[30, 50], [6, 6]], [[15, 25], [0, 0]]],
                           labels=[[1, 0], [1, 0], [1, -1]]),
    # 5 output tokens + 12 points + padding: more heads x tokens than the attention width, SAM's own order of work
    "many clicks": dict(points=np.random.default_rng(0).uniform(0, 44, (3, 12, 2)).tolist(),
                        labels=np.random.default_rng(1).integers(0, 2, (3, 12)).tolist()),
}


@pytest.mark.parametrize("model_fixture", ["tiny_vit", "tiny_tinyvit", "wide_decoder"])
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("multimask", [False, True])
def test_equals_segment_anything_sam_predictor(request, model_fixture, kind, multimask):
    model = request.getfixturevalue(model_fixture)
    p = Predictor(model)
    p.set_image(np.random.default_rng(3).random((45, 60)))
    assert p.fast_decoder() is not None
    spec = PROMPTS[kind]
    pts = None if "points" not in spec else np.asarray(spec["points"], float)
    lab = None if pts is None else np.asarray(spec.get("labels", np.ones(pts.shape[:2])), float)
    boxes = None if "boxes" not in spec else np.asarray(spec["boxes"], float)
    masks, scores, low = p.decode(pts, lab, boxes, multimask=multimask)

    emb = p.embedding
    sp = _sam_predictor(p)
    tpts = tlab = tbox = None
    if pts is not None:
        tpts = torch.as_tensor(emb.transform.rc_to_model_xy(pts), dtype=torch.float32)
        tlab = torch.as_tensor(lab, dtype=torch.int64)
    if boxes is not None:
        tbox = torch.as_tensor(emb.transform.box_rc_to_model_xyxy(boxes), dtype=torch.float32)
    with torch.inference_mode():
        ref_logits, ref_iou, ref_low = sp.predict_torch(tpts, tlab, tbox, multimask_output=multimask,
                                                        return_logits=True)
    ref_logits = ref_logits.numpy()
    np.testing.assert_allclose(low, ref_low.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores, ref_iou.numpy(), atol=ATOL, rtol=0)
    assert masks.shape == ref_logits.shape
    _same_masks(masks, ref_logits > model.sam.mask_threshold, ref_logits)


@pytest.mark.parametrize("model_fixture", ["tiny_vit", "wide_decoder"])
def test_best_of_three_and_batches_match_the_reference_path(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    fast, slow = Predictor(model), Predictor(model, fast_decoder=False)
    fast.set_image(np.random.default_rng(4).random((64, 50)))
    slow.set_embedding(fast.embedding)
    assert slow.fast_decoder() is None
    pts = np.array([[[5, 5]], [[30, 20]], [[60, 45]], [[10, 40]]], float)
    for kw in (dict(multimask=True, best=True), dict(multimask=True), dict()):
        m_f, s_f, l_f = fast.decode(points_rc=pts, **kw)
        m_s, s_s, l_s = slow.decode(points_rc=pts, **kw)
        assert l_f.shape == l_s.shape and l_f.shape[:2] == (4, 1 if not kw.get("multimask") or kw.get("best") else 3)
        np.testing.assert_allclose(l_f, l_s, atol=ATOL, rtol=0)
        np.testing.assert_allclose(s_f, s_s, atol=ATOL, rtol=0)
    # batched == one by one, through the predictor's public methods
    m_all, s_all = fast.predict_points(pts[:, 0], batch_size=3)
    for i in range(len(pts)):
        m_one, s_one = fast.predict_points(pts[i : i + 1, 0])
        np.testing.assert_array_equal(m_one[0], m_all[i])
        assert s_one[0] == pytest.approx(s_all[i], abs=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_tinyvit", "wide_decoder"])
def test_first_and_later_prompts_on_an_embedding_agree(request, model_fixture):
    """The first prompt runs the first layer uncached, later ones from the cache: same answer."""
    sam = request.getfixturevalue(model_fixture).sam
    fd = FastMaskDecoder(sam)
    feats = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    box = torch.tensor([[3.0, 4.0, 40.0, 30.0]])
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        ref, ref_iou = sam.mask_decoder(image_embeddings=feats, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
    first, _ = fd(feats, sparse)
    assert "k1t" not in fd._images[id(feats)][1]
    second, iou = fd(feats, sparse)
    assert "k1t" in fd._images[id(feats)][1]
    for out in (first, second):
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=ATOL, rtol=0)


def test_weights_changed_in_place_are_seen(wide_decoder):
    """Training steps modify weights in place: the derived weights and per-image caches are rebuilt."""
    model = wide_decoder
    p = Predictor(model)
    p.set_image(np.random.default_rng(5).random((40, 40)))
    box = np.array([[5, 5, 30, 30]], float)
    before = p.decode(boxes_rc=box)[2]
    p.decode(boxes_rc=box)  # now the first layer is cached too
    with torch.no_grad():
        model.sam.mask_decoder.output_upscaling[0].weight.mul_(1.5)
        model.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.add_(0.05)
    after = p.decode(boxes_rc=box)[2]
    ref = Predictor(model, fast_decoder=False)
    ref.set_embedding(p.embedding)
    np.testing.assert_allclose(after, ref.decode(boxes_rc=box)[2], atol=ATOL, rtol=0)
    assert np.abs(after - before).max() > 1e-3


def test_unsupported_decoder_falls_back_to_segment_anything(tiny_vit):
    """A LoRA-like wrapper on a cross-attention projection: the fast decoder steps aside, and comes back."""
    import copy

    from torch import nn

    class Wrapped(nn.Module):  # stands in for peft's LoRA layer
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.weight = base.weight

        def forward(self, x):
            return self.base(x) * 1.1

    model = copy.deepcopy(tiny_vit)
    attn = model.sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    plain = attn.q_proj
    attn.q_proj = Wrapped(plain)
    assert "nn.Linear" in fast_decoder_unsupported(model.sam)
    with pytest.raises(ValueError, match="cannot run"):
        FastMaskDecoder(model.sam)
    p = Predictor(model)
    p.set_image(np.random.default_rng(6).random((40, 40)))
    box = np.array([[5, 5, 30, 30]], float)
    masks, scores, low = p.decode(boxes_rc=box)
    assert p.fast_decoder() is None and p._fast_unsupported
    ref = Predictor(model, fast_decoder=False)
    ref.set_embedding(p.embedding)
    np.testing.assert_array_equal(low, ref.decode(boxes_rc=box)[2])  # the very same modules ran
    attn.q_proj = plain
    assert p.fast_decoder() is not None


def test_mask_input_uses_segment_anything(tiny_vit):
    p = Predictor(tiny_vit)
    p.set_image(np.random.default_rng(7).random((40, 40)))
    first = p.predict(box=[5, 5, 30, 30])
    refined = p.predict(box=[5, 5, 30, 30], mask_input=first.low_res_logits[0])
    assert refined.masks.shape == (1, 40, 40)


@pytest.mark.parametrize("prompt", ["default", "box"])
def test_bfloat16_image_tokens_stay_close_to_float32(wide_decoder, prompt):
    """The distance map's decoder of a bfloat16 model: image tokens in bfloat16, close to the float32 answer, the
    logits float32, and no cached first-layer projections (they would be computed in float32 from bfloat16)."""
    sam = wide_decoder.sam
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size, generator=g)
    boxes = torch.tensor([[3.0, 4.0, 40.0, 30.0]]) if prompt == "box" else None
    with torch.inference_mode():
        sparse, _ = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    ref, ref_iou = FastMaskDecoder(sam)(feats, sparse)
    low = FastMaskDecoder(sam, image_dtype=torch.bfloat16)
    first, iou = low(feats, sparse)
    again, _ = low(feats, sparse)
    assert "k1t" not in low._images[id(feats)][1]
    assert first.dtype == torch.float32 and iou.dtype == torch.float32
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    scale = float(ref.abs().max())
    err = (first - ref).abs()
    assert float(err.max()) < 0.05 * scale and float(err.mean()) < 0.005 * scale, (float(err.max()), scale)
    assert float(err.max()) > 0  # bfloat16 really ran
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=0.02)
