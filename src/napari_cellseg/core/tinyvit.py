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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        bn, conv = self.bn, self.c
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, weight, bn.bias - bn.running_mean * scale, conv.stride, conv.padding,
                        conv.dilation, conv.groups)


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
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


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
            b, _, c = x.shape
            x = x.transpose(1, 2).reshape(b, c, *(grid or self.grid))
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


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
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        d = self.head_dim
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        # explicit softmax(q k^T * scale + bias) v: on a CPU, scaled_dot_product_attention with a float mask
        # spends a tenth of the encoder's time checking the mask for -inf rows
        scores = torch.baddbmm(bias.expand(b, -1, -1, -1).reshape(-1, n, n), (q * self.scale).reshape(-1, n, d),
                               k.reshape(-1, n, d).transpose(1, 2))
        out = torch.bmm(scores.softmax(dim=-1), v.reshape(-1, n, d)).view(b, self.num_heads, n, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


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
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


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

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Any input side works (all layers are convolutions or windowed attention); at
        ``img_size`` this is the network as built. Larger inputs serve the distance mode's
        whole-image embedding (:func:`napari_cellseg.core.automatic.predict_distance_map`)."""
        if x.device.type == "cpu":
            # channels-last maps: oneDNN's fast convolution layout, and the token <-> map reshapes between
            # stages become views instead of copies (1.3-1.5x on the whole encoder, same numbers)
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed.seq(x)
        grid = (x.shape[-2], x.shape[-1])
        for stage in self.layers:
            x = stage(x, grid)
            if stage.downsample is not None:
                stride = stage.downsample.conv2.c.stride[0]
                grid = ((grid[0] + stride - 1) // stride, (grid[1] + stride - 1) // stride)
        b, n, c = x.shape
        return x.transpose(1, 2).reshape(b, c, *grid)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
