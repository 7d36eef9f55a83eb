"""TinyViT image encoder: a drop-in ``image_encoder`` for ``segment_anything.modeling.Sam``.

This is the encoder family of MobileSAM and LiteMedSAM (TinyViT, Wu et al.,
ECCV 2022), written for napari-cellseg. Its parameter names follow the layout
of the released LiteMedSAM checkpoint (``image_encoder.patch_embed.seq.*``,
``image_encoder.layers.N.blocks.M.*``, ``image_encoder.neck.*``) so that the
checkpoint loads strictly.

Shape of the network for LiteMedSAM (``img_size=256``)::

    patch_embed   1x1 convs, 3 -> 64 channels, 256 x 256
    stage 0       2 MBConv blocks, 64 ch, 256 x 256, then merge (stride 2) -> 128 ch
    stage 1       2 attention blocks (window 7), 128 x 128, merge (stride 2) -> 160 ch
    stage 2       6 attention blocks (window 14), 64 x 64, merge (stride 1) -> 320 ch
    stage 3       2 attention blocks (window 7), 64 x 64
    neck          1x1 conv + LayerNorm2d + 3x3 conv + LayerNorm2d -> 256 ch, 64 x 64

The output grid is ``img_size // 4`` on a side, the embedding size SAM's
prompt encoder and mask decoder expect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .models import autocast_dtype

#: Fuse GELU and residual additions into the convolutions and linear layers (oneDNN post-ops) when the encoder
#: runs for inference on a CPU. The plain operators run elsewhere (GPUs, training, a torch without these ops).
FUSE_ON_CPU = True

_FUSED_OPS_WORK: bool | None = None


def _fused_ops_work() -> bool:
    """Whether this torch has oneDNN's fused convolution and linear operators and they give the plain results
    (checked once on tiny float32 tensors, outside any autocast in force, since under autocast the plain
    operators would compute in bfloat16 and miss the float32 tolerance; any error means no)."""
    global _FUSED_OPS_WORK
    if _FUSED_OPS_WORK is None:
        try:
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(1, 4, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
                w, b = torch.randn(4, 4, 1, 1, generator=gen), torch.randn(4, generator=gen)
                conv = (F.gelu(F.conv2d(x, w, b)), F.conv2d(x, w, b) + x)
                fused = (torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none"),
                         torch.ops.mkldnn._convolution_pointwise.binary(x, x, w, b, [0, 0], [1, 1], [1, 1], 1, "add",
                                                                         None, None, [], None))
                t, wl = torch.randn(1, 3, 4, generator=gen), torch.randn(4, 4, generator=gen)
                lin = (F.gelu(F.linear(t, wl, b)), F.linear(t, wl, b) + t)
                fused += (torch.ops.mkldnn._linear_pointwise(t, wl, b, "gelu", [], "none"),
                          torch.ops.mkldnn._linear_pointwise.binary(t, t, wl, b, "add"))
                _FUSED_OPS_WORK = all(torch.allclose(a, c, atol=1e-4) for a, c in zip(conv + lin, fused))
        except Exception:  # noqa: BLE001 - no such operator, an unsupported CPU, ...: use the plain ones
            _FUSED_OPS_WORK = False
    return _FUSED_OPS_WORK


def _fused_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype in which a fused oneDNN call computes ``x``'s layer, or None where the plain operators must run
    (not a CPU, gradients recorded, a dtype other than float32 / bfloat16, or no working fused operators)."""
    if not FUSE_ON_CPU or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    dtype = autocast_dtype("cpu") or x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or not _fused_ops_work():
        return None
    return dtype


def _linear(layer: nn.Module, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None):
    """``gelu(layer(x))`` or ``residual + layer(x)``, in one oneDNN call where :func:`_fused_dtype` allows."""
    dtype = _fused_dtype(x) if type(layer) is nn.Linear else None  # an adapter-wrapped layer runs as it is
    if dtype is None:
        y = layer(x)
        if gelu:
            y = F.gelu(y)
        return y if residual is None else residual + y
    w = layer.weight.to(dtype)
    b = None if layer.bias is None else layer.bias.to(dtype)
    x = x.to(dtype)
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.to(dtype), w, b, "add")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none" if gelu else None)


#: Working-set budget (bytes) of stage 0 run in row bands on a CPU (:meth:`TinyViTEncoder._stage0_in_bands`):
#: each band's widest map stays about this size. 0 runs stage 0 on the whole map.
BAND_BYTES = 16 * 2**20

#: Which window attentions run as one ``scaled_dot_product_attention`` call: "auto" (CPU inference, see
#: :func:`_fused_attention`), "always" or "never" (the explicit softmax(q k^T + bias) v).
ATTENTION = "auto"


#: Bytes of attention scores the explicit form computes at a time in CPU inference (a chunk of windows; 0: all
#: windows at once). Stage 1's 7 x 7 windows of a 704 px window hold 50 MB of bfloat16 scores; in chunks of
#: about this size the product, the softmax and the second product run from the CPU's cache.
WINDOW_SCORE_BYTES = 2 * 2**20


def _fused_attention(q: torch.Tensor, n: int) -> bool:
    """Whether a window attention over ``n`` tokens runs as one fused kernel."""
    if ATTENTION != "auto":
        return ATTENTION == "always"
    if q.device.type != "cpu" or torch.is_grad_enabled():
        return False  # GPUs and training keep the explicit form they were measured and trained with
    # measured on a 2-core AVX-512 CPU, torch 2.14 (2026-12-02): the explicit form in cache-sized chunks of
    # windows beats the fused kernel everywhere but on float32 14 x 14 windows (58 against 80 ms per stage-2
    # block of a 704 px window); bfloat16 14 x 14: 36 against 54 ms; 7 x 7: 1.3-1.5x in both precisions
    return q.dtype != torch.bfloat16 and n > 64  # q: the qkv layer's output, bfloat16 under bfloat16 autocast


def _window_chunk(q: torch.Tensor, n: int, heads: int) -> int:
    """Windows per chunk of the explicit attention: :data:`WINDOW_SCORE_BYTES` of scores in CPU inference; all of
    them in training, on GPUs and under :func:`plain_operators` (one call, as written)."""
    b = q.shape[0]
    if not WINDOW_SCORE_BYTES or ATTENTION == "never" or q.device.type != "cpu" or torch.is_grad_enabled():
        return b
    return max(1, min(b, WINDOW_SCORE_BYTES // (heads * n * n * q.element_size())))


@contextlib.contextmanager
def plain_operators():
    """Run the encoder as written inside the block: no fused post-ops, explicit attention, stage 0 on the whole
    map (:data:`FUSE_ON_CPU`, :data:`ATTENTION`, :data:`BAND_BYTES`); for comparisons in tests and benchmarks."""
    global FUSE_ON_CPU, ATTENTION, BAND_BYTES
    saved = FUSE_ON_CPU, ATTENTION, BAND_BYTES
    FUSE_ON_CPU, ATTENTION, BAND_BYTES = False, "never", 0
    try:
        yield
    finally:
        FUSE_ON_CPU, ATTENTION, BAND_BYTES = saved


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by batch norm (children ``c`` and ``bn``).

    In eval mode the batch norm is folded into the convolution's weights and
    bias on the fly (one pass over the feature map instead of two; the same
    numbers to float rounding, and still differentiable in the weights).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight)
        nn.init.zeros_(self.bn.bias)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the convolution with the batch norm (its running statistics) folded in."""
        bn, conv = self.bn, self.c
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        weight, bias = self.folded()
        conv = self.c
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def run(self, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``gelu(self(x))`` or ``self(x) + residual`` (then GELU if asked): one oneDNN call with the GELU or the
        addition as a post-op when the encoder runs for inference on a CPU (:data:`FUSE_ON_CPU`), which spares a
        pass over the output (the GELU of stage 0's 256-channel maps was a fifth of the encoder's time)."""
        dtype = None if self.training or type(self.c) is not nn.Conv2d else _fused_dtype(x)
        if dtype is None:
            y = self(x)
            if residual is not None:
                y = y + residual
            return F.gelu(y) if gelu else y
        weight, bias = self.folded()
        conv = self.c
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, "gelu" if gelu else "none",
                                                           [], "none" if gelu else None)
        y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual.to(dtype), weight, bias, *geometry, "add",
                                                           None, None, [], None)
        return F.gelu(y) if gelu else y


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

    def __init__(self, dim: int, expand: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight=0.0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1.run(x, gelu=True)
        y = self.conv2.run(y, gelu=True)
        return self.conv3.run(y, gelu=True, residual=x)


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, H * W, C)`` as a map ``(B, C, H, W)``: a view, in channels-last layout when the tokens are
    contiguous.

    ``x.transpose(1, 2).reshape(B, C, H, W)`` gives the same view, but with batch 1 its batch stride is ``C``
    rather than ``H * W * C``; the convolutions then do not see a channels-last map and convert it to NCHW and
    back (a 3 x 3 depthwise convolution on stage 1's 128 x 352 x 352 map took 100 ms instead of 5 ms).
    """
    b, n, c = x.shape
    h, w = grid
    if x.is_contiguous():
        return x.view(b, h, w, c).permute(0, 3, 1, 2)
    return x.transpose(1, 2).reshape(b, c, h, w)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A map ``(B, C, H, W)`` as tokens ``(B, H * W, C)``: a view when the map is channels-last, else a copy."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class PatchMerging(nn.Module):
    """Change width (and optionally halve the grid): tokens or maps in, tokens out."""

    def __init__(self, grid: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.grid = grid
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens ``(B, L, C)`` on ``grid`` (default: the built grid) or a map ``(B, C, H, W)``."""
        if x.ndim == 3:  # (B, L, C) tokens -> (B, C, H, W)
            x = tokens_to_map(x, grid or self.grid)
        x = self.conv1.run(x, gelu=True)
        x = self.conv2.run(x, gelu=True)
        return map_to_tokens(self.conv3(x))


class WindowAttention(nn.Module):
    """Multi-head attention inside a square window with learned relative-offset biases.

    ``qkv`` is one linear layer whose output, viewed per head, holds that head's
    query, key and value in that order (``head_dim`` each): for head ``h`` the
    query rows of ``qkv.weight`` are ``h*3*head_dim : h*3*head_dim + head_dim``.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # bias index of the pair (p, q) of window positions is |dr| * window + |dc|
        rows = torch.arange(window).repeat_interleave(window)
        cols = torch.arange(window).repeat(window)
        index = (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = _linear(self.qkv, self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        d = self.head_dim
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        if _fused_attention(q, n):
            # one fused kernel; the bias broadcasts over the windows, so it is never copied per window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=self.scale)
        else:
            chunk = _window_chunk(q, n, self.num_heads)
            if chunk >= b:
                out = self._explicit(q, k, v, bias)
            else:  # chunks of windows whose scores stay in the CPU's cache
                out = torch.empty(b, self.num_heads, n, d, dtype=q.dtype)
                for i in range(0, b, chunk):
                    self._explicit(q[i : i + chunk], k[i : i + chunk], v[i : i + chunk], bias, out=out[i : i + chunk])
        return _linear(self.proj, out.transpose(1, 2).reshape(b, n, -1))

    def _explicit(self, q, k, v, bias, out=None):
        """softmax(q k^T * scale + bias) v of windows ``(b, heads, n, d)`` (into ``out`` when given)."""
        b, heads, n, d = q.shape
        scores = torch.baddbmm(bias.expand(b, -1, -1, -1).reshape(-1, n, n),
                               q.reshape(-1, n, d), k.reshape(-1, n, d).transpose(1, 2), alpha=self.scale)
        weights = scores.softmax(dim=-1)
        if out is None:
            return torch.bmm(weights, v.reshape(-1, n, d)).view(b, heads, n, d)
        torch.bmm(weights, v.reshape(-1, n, d), out=out.view(-1, n, d))
        return out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + self(x)``, with the GELU and the addition fused into the two layers where :func:`_linear` can."""
        return _linear(self.fc2, _linear(self.fc1, self.norm(x), gelu=True), residual=x)


class TinyViTBlock(nn.Module):
    """Windowed attention, a depthwise 'local' convolution, then an MLP."""

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int, window: int,
                 mlp_ratio: float, local_conv: int) -> None:
        super().__init__()
        self.grid = grid
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        ws = self.window
        b, _, c = x.shape
        if h == ws and w == ws:
            return self.attn(x)
        pad_r, pad_c = (-h) % ws, (-w) % ws
        grid = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_c, 0, pad_r))
        ph, pw = h + pad_r, w + pad_c
        nh, nw = ph // ws, pw // ws
        win = grid.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        win = self.attn(win)
        grid = win.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return grid[:, :h, :w].reshape(b, h * w, c)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens ``(B, H * W, C)`` on ``grid`` (default: the grid the block was built for)."""
        h, w = grid or self.grid
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} tokens, got {n}")
        x = x + self._attend(x, (h, w))
        x = map_to_tokens(self.local_conv(tokens_to_map(x, (h, w))))
        return self.mlp.residual(x)


class Stage(nn.Module):
    """A list of blocks followed by an optional :class:`PatchMerging`."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens on ``grid`` (or a map, for the convolutional stage 0) in, tokens out."""
        for block in self.blocks:
            x = block(x) if x.ndim == 4 else block(x, grid)
        return self.downsample(x, grid) if self.downsample is not None else x


class TinyViTEncoder(nn.Module):
    """TinyViT image encoder producing a SAM image embedding ``(B, out_chans, S/4, S/4)``.

    Parameters
    ----------
    img_size : int
        Side of the square input (256 for LiteMedSAM).
    embed_dims, depths, num_heads, window_sizes : sequence of 4 ints
        Width, number of blocks, attention heads and window of each stage
        (stage 0 is convolutional and ignores heads and window).
    merge_strides : sequence of 3 ints
        Stride of the patch merging after stages 0, 1 and 2.
    out_chans : int
        Width of the embedding (SAM's prompt/decoder width, 256).

    Examples
    --------
    >>> enc = TinyViTEncoder(img_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
    ...                      num_heads=(1, 2, 2, 4), window_sizes=(7, 7, 7, 7), out_chans=16)
    >>> enc(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 16, 16, 16])
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if len(embed_dims) != 4 or len(depths) != 4 or len(merge_strides) != 3:
            raise ValueError("TinyViT needs 4 stages (embed_dims, depths) and 3 merge strides")
        self.img_size = img_size
        d0 = embed_dims[0]
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(in_chans, d0 // 2), nn.GELU(), ConvBN(d0 // 2, d0))

        side = img_size
        stages = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            grid = (side, side)
            merge = None
            if i < 3:
                merge = PatchMerging(grid, dim, embed_dims[i + 1], merge_strides[i])
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(dim, grid, num_heads[i], window_sizes[i], mlp_ratio, local_conv_size)
                    for _ in range(depth)
                ]
            stages.append(Stage(blocks, merge))
            if i < 3:
                side = (side + merge_strides[i] - 1) // merge_strides[i]
        self.layers = nn.ModuleList(stages)
        self.out_grid = side
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self._features(x)).contiguous()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the neck, ``(B, embed_dims[-1], S/4, S/4)``, contiguous (what the fine-tuning caches)."""
        return self._features(x).contiguous()

    def _ops(self) -> list[nn.Module]:
        """The encoder after its stem as one flat list: every block, then each stage's merge."""
        ops: list[nn.Module] = []
        for stage in self.layers:
            ops += list(stage.blocks)
            if stage.downsample is not None:
                ops.append(stage.downsample)
        return ops

    def attention_blocks(self) -> list[nn.Module]:
        """The windowed-attention blocks, in order (10 for LiteMedSAM's TinyViT-5M)."""
        return [op for op in self._ops() if isinstance(op, TinyViTBlock)]

    def _split(self, tail: int) -> int:
        blocks = self.attention_blocks()
        if not 1 <= tail <= len(blocks):
            raise ValueError(f"this encoder has {len(blocks)} attention blocks: the tail must be 1-{len(blocks)}, "
                             f"got {tail}")
        return self._ops().index(blocks[len(blocks) - tail])

    def features_head(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """Tokens ``(B, L, C)`` entering the last ``tail`` attention blocks, for inputs of ``img_size``.

        With :meth:`features_tail` this is :meth:`features` cut in two, so a
        fine-tuning that adapts only those blocks computes (and caches) this
        part once per view.
        """
        x = self._stem(x)
        for op in self._ops()[: self._split(tail)]:
            x = op(x) if x.ndim == 4 else op(x, None)
        return x.contiguous()

    def features_tail(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """The map before the neck ``(B, C, G, G)`` from :meth:`features_head`'s tokens."""
        for op in self._ops()[self._split(tail):]:
            x = op(x, None)
        return tokens_to_map(x, self.layers[-1].blocks[-1].grid).contiguous()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        stem, _, embed = self.patch_embed.seq
        return embed(stem.run(x, gelu=True))

    def _band_halo(self) -> int:
        """Input rows a band of :meth:`_stage0_in_bands` reads beyond its own on each side: one per 3 x 3
        convolution of stage 0 and of the first merge, rounded up to the merge's stride (bands start there)."""
        merge = self.layers[0].downsample
        stage0 = [m.c for m in (*self.patch_embed.seq.modules(), *self.layers[0].blocks.modules(),
                                merge.conv1, merge.conv2) if isinstance(m, ConvBN)]
        stride = merge.conv2.c.stride[0]
        reach = sum(c.kernel_size[0] // 2 for c in stage0) + 1
        return -(-reach // stride) * stride

    def _band_rows(self, x: torch.Tensor) -> int:
        """Rows per band for :meth:`_stage0_in_bands`, or 0 to run stage 0 whole (see :data:`BAND_BYTES`)."""
        stem_strides = [m.c.stride[0] for m in self.patch_embed.seq if isinstance(m, ConvBN)]
        if (not BAND_BYTES or x.device.type != "cpu" or self.training or torch.is_grad_enabled()
                or self.layers[0].downsample is None or not isinstance(self.layers[0].blocks[0], MBConv)
                or any(s != 1 for s in stem_strides)):  # bands are cut in input rows: the stem must keep them
            return 0
        hidden = self.layers[0].blocks[0].conv1.c.out_channels
        dtype = autocast_dtype("cpu") or x.dtype
        item = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        stride = self.layers[0].downsample.conv2.c.stride[0]
        rows = BAND_BYTES // (x.shape[-1] * hidden * item) // stride * stride
        rows = max(rows, 2 * self._band_halo())
        return rows if rows < x.shape[-2] else 0

    def _stage0_in_bands(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Stage 0 and the first merge's ``conv1``, ``conv2`` on bands of ``rows`` input rows (plus a halo),
        so the widest maps (4 x stage 0's width at the input's full size) stay in the CPU's cache instead of
        passing through memory. The result equals the whole-map computation: each band reads enough rows
        beyond its own that the zero padding at its cut edges never reaches the rows it keeps."""
        stage0, merge = self.layers[0], self.layers[0].downsample
        stride = merge.conv2.c.stride[0]
        halo = self._band_halo()
        side = x.shape[-2]
        out = []
        for r0 in range(0, side, rows):
            r1 = min(side, r0 + rows)
            a, b = max(0, r0 - halo), min(side, r1 + halo)
            y = self._stem(x[:, :, a:b])
            for block in stage0.blocks:
                y = block(y)
            y = merge.conv2.run(merge.conv1.run(y, gelu=True), gelu=True)
            out.append(y[:, :, (r0 - a) // stride : -(-(r1 - a) // stride)])
        return torch.cat(out, dim=2).contiguous(memory_format=torch.channels_last)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Any input side works (all layers are convolutions or windowed attention); at
        ``img_size`` this is the network as built. Larger inputs serve the distance mode's
        whole-image embedding (:func:`napari_cellseg.core.automatic.predict_distance_map`)."""
        if x.device.type == "cpu":
            # channels-last maps: oneDNN's fast convolution layout, and the token <-> map reshapes between
            # stages become views instead of copies (1.3-1.5x on the whole encoder, same numbers)
            x = x.contiguous(memory_format=torch.channels_last)
        layers = list(self.layers)
        rows = self._band_rows(x)
        if rows:
            # stage 0 and the first merge's expansion and downsampling, band by band; then its projection
            x = self._stage0_in_bands(x, rows)
            grid = (x.shape[-2], x.shape[-1])
            x = map_to_tokens(layers.pop(0).downsample.conv3(x))
        else:
            x = self._stem(x)
            grid = (x.shape[-2], x.shape[-1])
        for stage in layers:
            x = stage(x, grid)
            if stage.downsample is not None:
                stride = stage.downsample.conv2.c.stride[0]
                grid = ((grid[0] + stride - 1) // stride, (grid[1] + stride - 1) // stride)
        return tokens_to_map(x, grid)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
