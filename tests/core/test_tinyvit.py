"""TinyViT: the encoder takes any input size, and a crop's embedding is the window's away from the crop border."""

import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.core.tinyvit import TinyViTEncoder  # noqa: E402


def _encoder(window: int = 2) -> TinyViTEncoder:
    torch.manual_seed(0)
    enc = TinyViTEncoder(img_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                         window_sizes=(window,) * 4, out_chans=16).eval()
    for module in enc.modules():  # non-trivial batch norms and attention biases
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
        if hasattr(module, "attention_biases"):
            torch.nn.init.normal_(module.attention_biases)
    return enc


def test_any_input_size_and_crops_agree_with_the_window_inside():
    enc = _encoder()
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        whole = enc(x)
        assert whole.shape == (1, 16, 40, 48)
        for r, c in [(0, 0), (48, 56), (96, 128)]:  # offsets on the attention windows' grid (8 px here)
            crop = enc(x[..., r : r + 64, c : c + 64])
            assert crop.shape == (1, 16, 16, 16)
            cut = whole[..., r // 4 : r // 4 + 16, c // 4 : c // 4 + 16]
            inner = (..., slice(6, -6), slice(6, -6))
            torch.testing.assert_close(cut[inner], crop[inner], rtol=0, atol=1e-5 * float(crop.abs().max()))
            # at the crop's border the window sees real neighbours where the crop sees padding
            assert (cut - crop).abs().max() > 0.01 * crop.abs().max()


def test_the_built_size_is_unchanged_and_odd_sizes_run():
    enc = _encoder(window=7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = enc(x)
        b = torch.cat([enc(x[:1]), enc(x[1:])])
        torch.testing.assert_close(a, b)
        assert enc(torch.randn(1, 3, 72, 100)).shape == (1, 16, 18, 25)
        assert enc.features(torch.randn(1, 3, 70, 66)).shape == (1, 32, 18, 17)
