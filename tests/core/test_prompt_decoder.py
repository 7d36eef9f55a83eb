"""The batch prompt decoder of grid mode against segment_anything's own MaskDecoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cellseg.core.prompt_decoder import BatchPromptDecoder, can_factor


def _prompts(sam, kind: str, n: int = 7, seed: int = 0):
    """Sparse and dense prompt embeddings of ``n`` random points, boxes, or both."""
    g = torch.Generator().manual_seed(seed)
    size = sam.prompt_encoder.input_image_size[0]
    points = None
    boxes = None
    if kind in ("points", "both"):
        points = (torch.rand(n, 1, 2, generator=g) * size, torch.ones(n, 1, dtype=torch.int64))
    if kind in ("boxes", "both"):
        a = torch.rand(n, 2, generator=g) * size / 2
        boxes = torch.cat([a, a + 4 + torch.rand(n, 2, generator=g) * size / 2], dim=1)
    with torch.inference_mode():
        return sam.prompt_encoder(points=points, boxes=boxes, masks=None)


def _features(sam, seed: int = 1):
    g = sam.prompt_encoder.image_embedding_size
    return torch.randn(1, sam.mask_decoder.transformer_dim, *g, generator=torch.Generator().manual_seed(seed))


def _stock(sam, features, sparse, dense, multimask):
    with torch.inference_mode():
        return sam.mask_decoder(image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)


@pytest.mark.parametrize("arch", ["tiny_vit", "tiny_tinyvit"])
@pytest.mark.parametrize("kind", ["points", "boxes", "both"])
@pytest.mark.parametrize("multimask", [False, True])
def test_factored_decoder_equals_the_stock_decoder(arch, kind, multimask, request):
    sam = request.getfixturevalue(arch).sam
    assert can_factor(sam)
    features = _features(sam)
    sparse, dense = _prompts(sam, kind)
    ref_masks, ref_iou = _stock(sam, features, sparse, dense, multimask)
    with torch.inference_mode():
        out = BatchPromptDecoder(sam, features, dense)(sparse, multimask=multimask)
    assert out.kept.all()
    assert out.scores.shape == ref_iou.shape and out.logits.shape == ref_masks.shape
    # the same arithmetic in another order: equal to float32 rounding
    torch.testing.assert_close(out.scores, ref_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref_masks, atol=1e-5 * ref_masks.abs().max().item(), rtol=1e-5)
    # masks can differ only where the logit is within rounding of the threshold
    clear = ref_masks.abs() > 1e-4
    assert torch.equal((out.logits > 0)[clear], (ref_masks > 0)[clear])


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("multimask", [False, True])
def test_masks_are_drawn_only_for_answers_above_the_floor(tiny_tinyvit, exact, multimask):
    sam = tiny_tinyvit.sam
    features = _features(sam, seed=3)
    sparse, dense = _prompts(sam, "points", n=12, seed=4)
    ref_masks, ref_iou = _stock(sam, features, sparse, dense, multimask)
    best = ref_iou.max(dim=1).values.sort().values
    floor = float(best[5] + best[6]) / 2  # halfway between two answers: no answer lies within rounding of it
    decoder = BatchPromptDecoder(sam, features, dense, exact=exact)
    calls = []
    handle = sam.mask_decoder.output_upscaling.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    with torch.inference_mode():
        out = decoder(sparse, multimask=multimask, min_score=floor)
    handle.remove()
    expected = (ref_iou > floor).any(dim=1)
    assert 0 < int(expected.sum()) < 12
    assert torch.equal(out.kept, expected)
    torch.testing.assert_close(out.scores, ref_iou, atol=1e-5, rtol=1e-5)  # every prompt's probability
    assert out.logits.shape[0] == int(expected.sum())  # masks only for the kept prompts
    tol = 1e-6 if exact else 1e-5
    torch.testing.assert_close(out.logits, ref_masks[expected], atol=tol * ref_masks.abs().max().item(), rtol=tol)
    if exact:
        assert calls == [int(expected.sum())]  # the stock upscaling ran on the kept prompts only
    else:
        assert calls == []  # the factored upscaling does not call the module


def test_exact_decoder_is_the_stock_decoder_bit_for_bit(tiny_vit):
    sam = tiny_vit.sam
    features = _features(sam, seed=5)
    for multimask in (False, True):
        sparse, dense = _prompts(sam, "both", n=5, seed=6)
        ref_masks, ref_iou = _stock(sam, features, sparse, dense, multimask)
        with torch.inference_mode():
            out = BatchPromptDecoder(sam, features, dense, exact=True)(sparse, multimask=multimask)
        assert torch.equal(out.scores, ref_iou) and torch.equal(out.logits, ref_masks)


def test_no_answer_above_the_floor_draws_nothing(tiny_vit):
    sam = tiny_vit.sam
    features = _features(sam)
    sparse, dense = _prompts(sam, "points", n=3)
    with torch.inference_mode():
        out = BatchPromptDecoder(sam, features, dense)(sparse, min_score=1e6)
    assert not out.kept.any() and out.logits.shape[0] == 0 and out.scores.shape == (3, 1)


def test_other_decoders_run_as_written(tiny_vit):
    from segment_anything.modeling.mask_decoder import MaskDecoder

    class Custom(MaskDecoder):  # a decoder the factored path does not know
        pass

    sam = tiny_vit.sam
    original = sam.mask_decoder
    custom = Custom.__new__(Custom)
    custom.__dict__.update(original.__dict__)
    sam.mask_decoder = custom
    try:
        assert not can_factor(sam)
        features = _features(sam)
        sparse, dense = _prompts(sam, "points", n=4)
        ref_masks, ref_iou = _stock(sam, features, sparse, dense, False)
        with torch.inference_mode():
            decoder = BatchPromptDecoder(sam, features, dense)
            out = decoder(sparse)
        assert decoder.exact
        assert torch.equal(out.scores, ref_iou) and torch.equal(out.logits, ref_masks)
    finally:
        sam.mask_decoder = original


def test_litemedsam_factored_decoder_matches_on_a_real_embedding(isolated_models):
    """The packaged LiteMedSAM on a real image: the same probabilities and, but for a few border pixels, masks."""
    from napari_cellseg.core.io import load_sample
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.predictor import Predictor
    from napari_cellseg.core.preprocess import normalize_image

    model = load_model("litemedsam", device="cpu")
    sam = model.sam
    emb = Predictor(model).embed(normalize_image(load_sample("cells").image))
    rng = np.random.default_rng(0)
    xy = torch.as_tensor(rng.uniform(0, 255, (16, 1, 2)), dtype=torch.float32)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(xy, torch.ones(16, 1, dtype=torch.int64)), boxes=None,
                                           masks=None)
        ref_masks, ref_iou = _stock(sam, emb.features, sparse, dense, False)
        out = BatchPromptDecoder(sam, emb.features, dense)(sparse, min_score=0.3)
    kept = (ref_iou > 0.3).any(dim=1)
    assert torch.equal(out.kept, kept) and kept.any()
    torch.testing.assert_close(out.scores, ref_iou, atol=5e-5, rtol=0)
    ref = ref_masks[kept]
    assert (out.logits - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    differ = ((out.logits > 0) != (ref > 0)).sum().item()
    assert differ <= 1e-5 * ref.numel()


@pytest.mark.parametrize("arch", ["tiny_vit", "tiny_tinyvit"])
@pytest.mark.parametrize("multimask", [False, True])
def test_bfloat16_image_tokens_stay_close_to_the_stock_decoder(arch, multimask, request):
    sam = request.getfixturevalue(arch).sam
    features = _features(sam, seed=7)
    sparse, dense = _prompts(sam, "both", n=9, seed=8)
    ref_masks, ref_iou = _stock(sam, features, sparse, dense, multimask)
    decoder = BatchPromptDecoder(sam, features, dense, dtype=torch.bfloat16)
    assert decoder.lp is torch.bfloat16 and decoder.src_lp.dtype == torch.bfloat16
    with torch.inference_mode():
        out = decoder(sparse, multimask=multimask)
    assert out.scores.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert not torch.equal(out.logits, ref_masks)  # the products really ran in bfloat16 ...
    err = (out.scores - ref_iou).abs().max().item()
    assert 0 < err < 0.02  # ... and the probabilities moved by far less than any threshold step
    scale = ref_masks.abs().max().item()
    assert (out.logits - ref_masks).abs().max().item() < 0.03 * scale
    clear = ref_masks.abs() > 0.02 * scale  # away from the threshold the masks are the same
    assert torch.equal((out.logits > 0)[clear], (ref_masks > 0)[clear])


def test_exact_decoder_ignores_a_low_precision(tiny_vit):
    sam = tiny_vit.sam
    features = _features(sam, seed=9)
    sparse, dense = _prompts(sam, "points", n=4, seed=10)
    ref_masks, ref_iou = _stock(sam, features, sparse, dense, False)
    decoder = BatchPromptDecoder(sam, features, dense, exact=True, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = decoder(sparse)
    assert decoder.lp is None
    assert torch.equal(out.scores, ref_iou) and torch.equal(out.logits, ref_masks)


def test_decode_prompts_follows_the_model_precision(tiny_tinyvit, monkeypatch):
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.predictor import Predictor

    model = tiny_tinyvit
    assert auto.prompt_dtype(model.with_precision("float32")) is torch.float32
    assert auto.prompt_dtype(model.with_precision("bfloat16")) is torch.bfloat16
    image01 = np.random.default_rng(0).random((40, 40, 3), dtype=np.float32)
    emb = Predictor(model.with_precision("float32")).embed(image01)
    points = np.random.default_rng(1).uniform(0, 39, (6, 2))

    def scores(m):
        return np.concatenate([s for _, _, s in auto.decode_prompts(m, emb.features, emb.transform,
                                                                     points_rc=points)])

    ref = scores(model.with_precision("float32"))
    low = scores(model.with_precision("bfloat16"))
    assert 0 < np.abs(low - ref).max() < 0.02
    monkeypatch.setattr(auto, "PROMPTS_FOLLOW_PRECISION", False)
    assert auto.prompt_dtype(model.with_precision("bfloat16")) is torch.float32
    np.testing.assert_array_equal(scores(model.with_precision("bfloat16")), ref)  # the same embedding, float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_upscaling_equals_the_plain_products(tiny_tinyvit, dtype):
    from napari_cellseg.core import tinyvit

    sam = tiny_tinyvit.sam
    features = _features(sam, seed=11)
    sparse, dense = _prompts(sam, "points", n=5, seed=12)
    decoder = BatchPromptDecoder(sam, features, dense, dtype=dtype)
    w1, w2 = decoder._up[0], decoder._up[4]
    assert w1.T.is_contiguous() and w2.T.is_contiguous() and w1.dtype == dtype  # the fused calls' layout
    with torch.inference_mode():
        keys = torch.randn(3, features.shape[-1] ** 2, features.shape[1]).to(dtype)
        hyper = torch.randn(3, 1, w2.shape[1] // 4)
        assert decoder._fuse_upscaling(keys)
        fused = decoder._upscale(keys, hyper)
        with tinyvit.plain_operators():
            assert not decoder._fuse_upscaling(keys)
            plain = decoder._upscale(keys, hyper)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, plain, atol=tol * plain.abs().max().item(), rtol=0)
