"""The ViT encoder's CPU inference paths compute segment-anything's network."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from segment_anything.modeling import ImageEncoderViT  # noqa: E402

from napari_cellseg.core import tinyvit  # noqa: E402
from napari_cellseg.core.models import random_model  # noqa: E402
from napari_cellseg.core.vit_encoder import ViTEncoder  # noqa: E402


def _encoder():
    enc = random_model("vit_test").sam.image_encoder.eval()
    assert isinstance(enc, ViTEncoder)
    torch.manual_seed(1)
    for block in enc.blocks:  # random weights start the position terms at zero: make them count
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    return enc


@pytest.mark.parametrize("side, chunked", [(64, False), (48, False), (64, True)])
def test_the_cpu_inference_path_computes_segment_anythings_encoder(side, chunked, monkeypatch):
    from napari_cellseg.core import vit_encoder

    if chunked:  # one row of queries at a time (ViT-B's global attention runs in chunks)
        monkeypatch.setattr(vit_encoder, "SCORE_BYTES", 1)
    enc = _encoder()
    assert any(b.window_size == 0 for b in enc.blocks) and any(b.window_size > 0 for b in enc.blocks)
    x = torch.randn(2, 3, 64, 64)
    x[..., side:, :] = 0  # padded input, as SAM's preprocessing does
    with torch.inference_mode():
        fast = enc(x)
        stock = ImageEncoderViT.forward(enc, x)
        with tinyvit.plain_operators():
            plain = enc(x)
    torch.testing.assert_close(plain, stock, rtol=0, atol=0)  # switched off: segment-anything's code
    assert (fast - stock).abs().max() > 0  # a different path ...
    torch.testing.assert_close(fast, stock, rtol=0, atol=2e-5 * float(stock.abs().max()))  # ... the same function
    if tinyvit._fused_ops_work():
        with torch.inference_mode(), torch.profiler.profile() as prof:
            enc(x)
        assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}


def test_training_runs_segment_anythings_blocks_and_gradients_flow():
    enc = _encoder().train()
    x = torch.randn(1, 3, 64, 64)
    out = enc(x)
    torch.testing.assert_close(out, ImageEncoderViT.forward(enc, x))
    out.square().mean().backward()
    assert enc.blocks[0].attn.qkv.weight.grad is not None
    assert float(enc.blocks[-1].attn.rel_pos_h.grad.abs().sum()) > 0


def test_bfloat16_stays_close_to_the_stock_bfloat16_encoder():
    enc = _encoder()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = enc(x).float()
            stock = ImageEncoderViT.forward(enc, x).float()
    # both in bfloat16 move from float32 by about as much
    err_fast, err_stock = float((fast - ref).abs().mean()), float((stock - ref).abs().mean())
    assert err_fast < 2 * err_stock + 1e-3, (err_fast, err_stock)


def test_features_are_the_map_before_the_neck():
    enc = _encoder()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        feats = enc.features(x)
        assert feats.shape == (1, enc.patch_embed.proj.out_channels, 4, 4)
        torch.testing.assert_close(enc.neck(feats), enc(x))
