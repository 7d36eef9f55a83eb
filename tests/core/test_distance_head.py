"""The distance-map head: the refiner starts as the identity, attaches once, resizes what it reads."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.core import distance_head as dh  # noqa: E402
from napari_cellseg.core import models  # noqa: E402
from napari_cellseg.core.predictor import default_prompt_logits, distance_logits  # noqa: E402


def _inputs(model, scale: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = model.sam.prompt_encoder.image_embedding_size
    feats = torch.randn(2, model.sam.mask_decoder.transformer_dim, *grid, generator=g)
    side = 4 * grid[0] * scale
    image = torch.rand(2, 3, side, side, generator=g)
    return feats, image


def test_a_new_refiner_is_the_identity_and_learns_a_correction():
    model = models.random_model("tinyvit_test")
    feats, image = _inputs(model)
    with torch.no_grad():
        plain = default_prompt_logits(model.sam, feats)
    refiner = dh.attach_refiner(model.sam, channels=8)
    assert dh.attach_refiner(model.sam) is refiner  # attached once
    with torch.no_grad():
        start = distance_logits(model.sam, feats, image)
    torch.testing.assert_close(start, plain, rtol=0, atol=0)
    # a few steps towards a target that depends on the pixels: the refined map moves towards it
    target = (image.mean(1, keepdim=True) > 0.5).float()
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = ((torch.sigmoid(distance_logits(model.sam, feats, image)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert not any(p.requires_grad and p.grad is None for p in refiner.parameters())


def test_the_refiner_reads_crops_larger_than_the_mask_grid():
    """SAM's 1024 px input against its 256 px mask grid: the crop is box-filtered to the grid."""
    model = models.random_model("tinyvit_test")
    feats, image = _inputs(model, scale=4)
    refiner = dh.attach_refiner(model.sam, channels=4)
    torch.nn.init.normal_(refiner.out.weight, std=0.1)
    with torch.no_grad():
        big = distance_logits(model.sam, feats, image)
        small = distance_logits(model.sam, feats, torch.nn.functional.avg_pool2d(image, 4))
    assert big.shape == default_prompt_logits(model.sam, feats).shape
    torch.testing.assert_close(big, small, rtol=1e-5, atol=1e-5)


def test_refiner_width_is_read_from_adapter_tensors():
    refiner = dh.make_refiner(channels=12, embed_dim=32)
    shapes = {f"s0.full.distance_refiner.{k}": tuple(v.shape) for k, v in refiner.state_dict().items()}
    assert dh.refiner_channels_from_tensors(shapes) == 12
    assert dh.refiner_channels_from_tensors({"s0.full.mask_decoder.x": (3, 3)}) is None
    assert 5_000 < sum(p.numel() for p in refiner.parameters()) < 60_000


def test_distance_decoder_is_a_separate_copy():
    model = models.random_model("tinyvit_test")
    decoder = dh.attach_distance_decoder(model.sam)
    assert decoder is not model.sam.mask_decoder and dh.distance_decoder_of(model.sam) is decoder
    feats, _ = _inputs(model)
    with torch.no_grad():
        a = default_prompt_logits(model.sam, feats)
        decoder.output_hypernetworks_mlps[0].layers[-1].bias.add_(1.0)
        b = default_prompt_logits(model.sam, feats)
    assert not torch.allclose(a, b)
    names = [n for n, _ in model.sam.named_parameters()]
    assert any(n.startswith("distance_decoder.") for n in names)
    assert np.isclose(sum(p.numel() for p in decoder.parameters()),
                      sum(p.numel() for p in model.sam.mask_decoder.parameters()))


def test_inference_decodes_the_default_prompt_with_the_factored_decoder():
    """Without gradients the default prompt goes through FastMaskDecoder: the stock decoder's logits to float32
    rounding, float32 under bfloat16 autocast too, and the stock decoder again once a projection is wrapped."""
    from napari_cellseg.core import predictor

    model = models.random_model("tinyvit_test")
    decoder = dh.attach_distance_decoder(model.sam)
    for p in decoder.parameters():  # non-trivial weights
        p.data.normal_(0, 0.2)
    feats, _ = _inputs(model)
    with torch.enable_grad():
        stock = default_prompt_logits(model.sam, feats).detach()  # gradients recorded: the stock decoder
    with torch.no_grad():
        fast = default_prompt_logits(model.sam, feats)
        assert predictor._fast_default_decoder(model.sam, decoder) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = default_prompt_logits(model.sam, feats)
    torch.testing.assert_close(fast, stock, rtol=0, atol=1e-4 * float(stock.abs().max()))
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, fast)

    class Wrapped(torch.nn.Module):  # what LoRA does to a projection during fine-tuning
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1.0

    attn = decoder.transformer.layers[0].cross_attn_token_to_image
    attn.q_proj = Wrapped(attn.q_proj)
    with torch.no_grad():
        assert predictor._fast_default_decoder(model.sam, decoder) is None
        wrapped = default_prompt_logits(model.sam, feats)
    assert not torch.allclose(wrapped, fast)  # the wrapper's change is seen: the stock decoder ran


def test_the_refiner_gives_the_same_logits_in_inference_and_keeps_its_weights_layout():
    """On a CPU without gradients the refiner runs on channels-last maps and weight copies: same numbers, and the
    parameters (saved with adapters, which need contiguous tensors) keep their layout."""
    model = models.random_model("tinyvit_test")
    feats, image = _inputs(model)
    refiner = dh.attach_refiner(model.sam, channels=8)
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.2)
    logits = default_prompt_logits(model.sam, feats).detach()
    trained = refiner(image, logits, feats)  # gradients on: the layers as they are
    assert trained.requires_grad
    with torch.inference_mode():
        fast = refiner(image, logits, feats)
    torch.testing.assert_close(fast, trained.detach(), rtol=0, atol=1e-5 * float(trained.abs().max()))
    assert fast.is_contiguous()
    assert all(p.is_contiguous() for p in refiner.parameters())
