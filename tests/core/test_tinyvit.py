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


@pytest.mark.parametrize("shape, window, score_bytes", [((64, 64), 7, None), ((150, 94), 7, None),
                                                          ((150, 94), 7, 1), ((128, 128), 14, None)])
def test_the_cpu_inference_paths_compute_the_plain_network(monkeypatch, shape, window, score_bytes):
    from napari_cellseg.core import tinyvit

    if score_bytes is not None:  # one window per chunk of the explicit attention
        monkeypatch.setattr(tinyvit, "WINDOW_SCORE_BYTES", score_bytes)
    enc = _encoder(window=window)
    x = torch.randn(1, 3, *shape)
    chunks = []
    chunk_of = tinyvit._window_chunk
    monkeypatch.setattr(tinyvit, "_window_chunk", lambda q, n, heads: chunks.append(chunk_of(q, n, heads))
                        or chunks[-1])
    with torch.inference_mode():
        fast = enc(x)
        if window == 14:
            assert not chunks  # float32 14 x 14 windows: the fused kernel
        else:
            assert (min(chunks) == 1) == (score_bytes == 1)
        with tinyvit.plain_operators():
            plain = enc(x)
        assert tinyvit.FUSE_ON_CPU and tinyvit.ATTENTION == "auto" and tinyvit.BAND_BYTES  # restored
    torch.testing.assert_close(fast, plain, rtol=0, atol=2e-5 * float(plain.abs().max()))
    if tinyvit._fused_ops_work():  # the fused operators and, on float32 14 x 14 windows, the fused attention
        with torch.inference_mode(), torch.profiler.profile() as prof:
            enc(x)
        names = {e.name for e in prof.events()}
        assert {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise"} <= names
        assert ("aten::scaled_dot_product_attention" in names) == (window == 14)


def test_stage0_in_bands_equals_the_whole_map(monkeypatch):
    from napari_cellseg.core import tinyvit

    enc = _encoder(window=7)
    assert enc._band_halo() == 4  # three 3 x 3 convolutions (two MBConv, the merge), rounded up to its stride 2
    x = torch.randn(1, 3, 150, 94)
    with torch.inference_mode():
        monkeypatch.setattr(tinyvit, "BAND_BYTES", 0)
        whole = enc(x)
        monkeypatch.setattr(tinyvit, "BAND_BYTES", 94 * 32 * 4 * 10)  # 10 rows of the 32-channel MBConv map
        assert enc._band_rows(x) == 10
        banded = enc(x)
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6 * float(whole.abs().max()))
    with torch.no_grad():
        enc.train()
        assert enc._band_rows(x) == 0  # training runs the network as built
        enc.eval()
    assert enc._band_rows(x) == 0  # so does anything that records gradients


def test_fused_operator_check_is_not_fooled_by_autocast(monkeypatch):
    """Under bfloat16 autocast the plain reference would itself be bfloat16 and miss the float32 tolerance: the
    one-time check must run outside autocast, whatever context first asks for it."""
    from napari_cellseg.core import tinyvit

    monkeypatch.setattr(tinyvit, "_FUSED_OPS_WORK", None)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tinyvit._fused_ops_work()
    monkeypatch.setattr(tinyvit, "_FUSED_OPS_WORK", None)
    assert tinyvit._fused_ops_work() == inside


def test_bfloat16_encoder_stays_close_to_float32():
    enc = _encoder(window=7)
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        ref = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(x).float()
    assert float((low - ref).abs().max()) < 0.05 * float(ref.abs().max())


@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_become_a_channels_last_map_and_back_without_copies(batch):
    """With batch 1, ``transpose(1, 2).reshape`` gives a batch stride of C, which the convolutions do not take for
    channels-last and convert (a 20x slower depthwise convolution on stage 1's map): the views must be exact."""
    from napari_cellseg.core.tinyvit import map_to_tokens, tokens_to_map

    tokens = torch.randn(batch, 6 * 5, 4)
    grid = tokens_to_map(tokens, (6, 5))
    assert grid.data_ptr() == tokens.data_ptr()
    assert grid.stride() == torch.empty(batch, 4, 6, 5).contiguous(memory_format=torch.channels_last).stride()
    torch.testing.assert_close(grid, tokens.transpose(1, 2).reshape(batch, 4, 6, 5), rtol=0, atol=0)
    back = map_to_tokens(grid)
    assert back.data_ptr() == tokens.data_ptr() and torch.equal(back, tokens)
    # a convolution keeps the layout, so the next block's tokens are a view too
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with torch.no_grad():
        out = conv(grid)
    assert out.is_contiguous(memory_format=torch.channels_last) and map_to_tokens(out).is_contiguous()
    # non-contiguous tokens still give the right map
    odd = torch.randn(batch, 4, 30).transpose(1, 2)
    torch.testing.assert_close(tokens_to_map(odd, (6, 5)), odd.transpose(1, 2).reshape(batch, 4, 6, 5))
