"""segment-anything's ViT image encoder (SAM ViT-B/L/H, SAMCell) with CPU inference paths.

:class:`ViTEncoder` is segment-anything's :class:`~segment_anything.modeling.ImageEncoderViT`
with the same submodules and parameter names (checkpoints load into it unchanged, LoRA targets the
same layers). Where it runs for inference on a CPU (no gradient recorded, the oneDNN operators of
:mod:`napari_cellseg.core.tinyvit` available, not switched off by ``tinyvit.plain_operators()``),
each block computes the same function with less memory traffic:

* **Attention scores updated in place, in cache-sized chunks.** The four global-attention blocks of
  ViT-B compute ``12 x 4096 x 4096`` scores per image (400 MB in bfloat16); segment-anything adds the
  two decomposed relative-position terms out of place (two more score-sized tensors) before the
  softmax. Here the scores of a few rows of queries at a time (:data:`SCORE_BYTES`) land in one buffer,
  both terms are added into it, and the softmax and the second product follow while it is in the
  CPU's cache (one global attention's core: 0.87 s as written, 0.52 s in place, 0.19-0.21 s in chunks,
  bfloat16, 2-core CPU).
* **Fused linear layers.** The MLP's GELU and the residual addition after the MLP run inside the
  linear layers' oneDNN kernels, and the query/key/value and output projections skip the copy of
  their bias into the output (``tinyvit._linear``).

Training, GPUs and ``plain_operators()`` run segment-anything's blocks; inside the CPU path a layer
wrapped by an adapter runs as it is, and an MLP without an exact GELU as written.
``tests/core/test_vit_encoder.py`` compares both paths.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from torch import nn

from .tinyvit import _fused_dtype, _linear


#: Bytes of attention scores computed at a time (rows of queries per chunk; 0: all at once). ViT-B's global
#: attention has 12 x 4096 x 4096 scores per image (400 MB in bfloat16); in chunks of about this size the
#: products, the position terms, the softmax and the second product pass through the CPU's cache instead of
#: memory (2.2-2.5x faster in bfloat16, 1.6x in float32, on a 2-core CPU; the same numbers).
SCORE_BYTES = 16 * 2**20


def _attention(attn, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` of ``x`` (B, H, W, C): the scores updated in place, in chunks
    of query rows (:data:`SCORE_BYTES`)."""
    b, h, w, c = x.shape
    n = h * w
    heads = attn.num_heads
    d = c // heads
    qkv = _linear(attn.qkv, x.reshape(b, n, c)).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, n, d).unbind(0)
    bh = b * heads
    if attn.use_rel_pos:  # segment-anything's position terms read the unscaled queries
        rq = q.reshape(bh, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, get_rel_pos(h, h, attn.rel_pos_h).to(rq.dtype)).to(q.dtype)
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, get_rel_pos(w, w, attn.rel_pos_w).to(rq.dtype)).to(q.dtype)
    q = q * attn.scale
    kt = k.contiguous().transpose(1, 2)  # once: a chunk's product would copy the strided keys again
    v = v.contiguous()
    row_bytes = bh * w * n * q.element_size()
    rows = h if not SCORE_BYTES else max(1, min(h, SCORE_BYTES // row_bytes))
    out = torch.empty(bh, n, d, dtype=q.dtype)
    scores_buf = torch.empty(bh, rows * w, n, dtype=q.dtype)
    weights_buf = torch.empty_like(scores_buf)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        span = slice(r0 * w, r1 * w)
        scores = torch.bmm(q[:, span], kt, out=scores_buf[:, : (r1 - r0) * w])
        if attn.use_rel_pos:
            grid = scores.view(bh, r1 - r0, w, h, w)
            grid.add_(rel_h[:, r0:r1, :, :, None]).add_(rel_w[:, r0:r1, :, None, :])
        weights = torch.softmax(scores, dim=-1, out=weights_buf[:, : (r1 - r0) * w])
        torch.bmm(weights, v, out=out[:, span])
    out = out.view(b, heads, h, w, d).permute(0, 2, 3, 1, 4).reshape(b, n, c)
    return _linear(attn.proj, out).view(b, h, w, c)


def _block(block, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Block.forward`` with :func:`_attention` and :func:`_mlp_residual`."""
    shortcut = x
    y = block.norm1(x)
    if block.window_size > 0:
        h, w = y.shape[1], y.shape[2]
        y, pad_hw = window_partition(y, block.window_size)
    y = _attention(block.attn, y)
    if block.window_size > 0:
        y = window_unpartition(y, block.window_size, pad_hw, (h, w))
    x = shortcut + y
    return _mlp_residual(block, x)


def _mlp_residual(block, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(norm2(x))``, the GELU and the addition fused where the MLP is segment-anything's with an exact GELU."""
    act = getattr(block.mlp, "act", None)
    if type(act) is not nn.GELU or act.approximate != "none":
        return x + block.mlp(block.norm2(x))
    shape = x.shape
    tokens = x.reshape(shape[0], -1, shape[-1])
    y = _linear(block.mlp.lin1, block.norm2(tokens), gelu=True)
    return _linear(block.mlp.lin2, y, residual=tokens).view(shape)


class ViTEncoder(ImageEncoderViT):
    """:class:`~segment_anything.modeling.ImageEncoderViT` with CPU inference paths (see the module notes).

    Built with the same arguments; ``features(x)`` returns the map before the neck ``(B, C, G, G)``.
    """

    def _blocks(self, x: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Patch embedding and the blocks before index ``stop`` (all by default), ``(B, G, G, C)``."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        fast = _fused_dtype(x) is not None
        for block in self.blocks[:stop]:
            x = _block(block, x) if fast else block(x)
        return x

    def attention_blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks, in order (12 for vit_b)."""
        return list(self.blocks)

    def _split(self, tail: int) -> int:
        n = len(self.blocks)
        if not 1 <= tail <= n:
            raise ValueError(f"this encoder has {n} attention blocks: the tail must be 1-{n}, got {tail}")
        return n - tail

    def features_head(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """The map ``(B, G, G, C)`` entering the last ``tail`` blocks (see :meth:`features_tail`)."""
        return self._blocks(x, self._split(tail)).contiguous()

    def features_tail(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """The map before the neck ``(B, C, G, G)`` from :meth:`features_head`'s output."""
        for block in self.blocks[self._split(tail):]:
            x = block(x)
        return x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self._blocks(x).permute(0, 3, 1, 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the neck, ``(B, embed_dim, G, G)`` (what fine-tuning caches)."""
        return self._blocks(x).permute(0, 3, 1, 2)
