"""SAM's mask decoder for many prompts on one image embedding, at a fraction of the cost.

Grid mode asks the mask decoder the same question about one image embedding a
thousand times, once per point of the grid. Run as written
(``sam.mask_decoder(...)``), every prompt copies the ``(C, G, G)`` embedding
(``repeat_interleave``), projects all ``G * G`` image tokens through every
cross-attention's key/value/query/output layers and upsamples the result to a
``(4G, 4G)`` mask, although most answers are then thrown away because their
predicted IoU is below the threshold. :class:`BatchPromptDecoder` computes the
same function with three changes:

1. **Shared work once per image.** In the first layer the image tokens do not
   yet depend on the prompt, so their key/value projections (token-to-image
   attention) and query projection (image-to-token attention) are computed once
   for all prompts instead of once per prompt.
2. **Projections moved to the few prompt tokens.** Attention between ``T``
   prompt tokens (``T`` = 7 for one point) and ``G * G`` image tokens only needs
   ``H * T`` directions in the image's channel space (``H`` heads). Because
   ``softmax(q (W_k x + b_k)) = softmax((W_k^T q) x)`` (a constant shift of every
   score does not change a softmax) and ``sum_j a_j (W_v x_j + b_v) =
   W_v (sum_j a_j x_j) + b_v`` (attention weights sum to 1), the key, value,
   query and output projections are applied to the ``T`` prompt tokens and
   the image tokens enter through ``(G*G, C) x (C, H*T)`` products: about a
   third of the multiply-adds and far less memory traffic than projecting
   every image token for every prompt.
3. **Masks only for the answers that are kept.** The IoU head reads the
   transformer's output token, so the predicted IoU (grid mode's cell
   probability) is known before the mask is drawn; the output upscaling and the
   hypernetwork product, about half of the stock decoder's cost, run only for
   answers whose IoU exceeds ``min_score``.

Changes 1 and 3 compute exactly what the stock decoder computes; change 2 is
the same arithmetic in another order, so its logits and IoUs agree with the
stock decoder to float32 rounding (about 1e-5; the test suite checks this
against ``segment_anything``'s :class:`MaskDecoder` on random models).
``exact=True`` keeps change 3 only: the stock transformer runs on the whole
batch and the kept answers are bit-for-bit the stock decoder's.

``dtype=torch.bfloat16`` (the grid and guided modes pass it for a model whose
precision is bfloat16, see ``LoadedModel.precision``) keeps the per-prompt
image tokens in bfloat16 and runs the ``(G*G, C) x (C, H*T)`` products and
the output upscaling on them in bfloat16 (accumulated in float32 by the
matrix kernels). The prompt tokens, the first layer's attention over the
shared image tokens, every softmax's sums and the IoU head stay float32. On a
CPU with native bfloat16 that halves the memory traffic and quadruples the
product throughput; the predicted IoUs move by less than a bfloat16 image
encoder moves them (docs/automatic.md, "Grid mode in bfloat16").

Only SAM's own ``MaskDecoder`` with a ``TwoWayTransformer`` (every model of the
catalogue, LoRA adapters merged) is factored; any other decoder is run as it is.
Torch is imported lazily by the callers (this module is imported only when a
network runs).

Examples
--------
>>> import torch
>>> from napari_cellseg.core.models import random_model
>>> sam = random_model("vit_test").sam
>>> g = sam.prompt_encoder.image_embedding_size[0]
>>> features = torch.randn(1, sam.mask_decoder.transformer_dim, g, g)
>>> points = (torch.rand(5, 1, 2) * 64, torch.ones(5, 1, dtype=torch.int64))
>>> with torch.inference_mode():
...     sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
...     dec = BatchPromptDecoder(sam, features, dense)
...     out = dec(sparse, multimask=False, min_score=None)
...     ref_masks, ref_iou = sam.mask_decoder(features, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
>>> out.logits.shape, bool(torch.allclose(out.logits, ref_masks, atol=1e-4))
(torch.Size([5, 1, 16, 16]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class DecodedBatch:
    """Answers of one batch of prompts.

    Attributes
    ----------
    scores : torch.Tensor, shape (B, K)
        Predicted IoU of every answer (``K`` = 1, or 3 with multimask).
    kept : torch.Tensor of bool, shape (B,)
        Prompts with at least one answer whose IoU exceeds ``min_score`` (all
        when ``min_score`` is None).
    logits : torch.Tensor, shape (P, K, 4G, 4G)
        Low-resolution mask logits of the kept prompts only (``P = kept.sum()``).
    """

    scores: Any
    kept: Any
    logits: Any


def _linear_params(module, n_in: int):
    """``(W, b)`` of an affine layer, ``W`` of shape (out, in); probes modules that are not ``nn.Linear``."""
    import torch

    if isinstance(module, torch.nn.Linear):
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features,
                                                                        dtype=module.weight.dtype,
                                                                        device=module.weight.device)
        return module.weight, bias
    p = next(module.parameters())
    bias = module(torch.zeros(1, n_in, dtype=p.dtype, device=p.device))[0]
    weight = (module(torch.eye(n_in, dtype=p.dtype, device=p.device)) - bias).T
    return weight, bias


def can_factor(sam) -> bool:
    """True when the mask decoder is segment_anything's ``MaskDecoder`` with a ``TwoWayTransformer``."""
    try:
        from segment_anything.modeling.mask_decoder import MaskDecoder
        from segment_anything.modeling.transformer import Attention, TwoWayTransformer
    except ImportError:  # pragma: no cover - segment_anything is a dependency
        return False
    dec = getattr(sam, "mask_decoder", None)
    if type(dec) is not MaskDecoder or type(dec.transformer) is not TwoWayTransformer:
        return False
    attns = [dec.transformer.final_attn_token_to_image]
    for layer in dec.transformer.layers:
        attns += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    return all(type(a) is Attention for a in attns)


class _CrossAttention:
    """One cross-attention layer of the two-way transformer, in factored form.

    Layouts are chosen so that no ``(B, N, C)`` tensor (one copy of the image
    tokens per prompt) is ever transposed or copied: those tensors only enter
    matrix products as they are, and the residual additions are fused into them.
    """

    def __init__(self, attn, lp=None) -> None:
        c = attn.embedding_dim
        self.heads = attn.num_heads
        self.d = attn.internal_dim // attn.num_heads
        self.scale = 1.0 / math.sqrt(self.d)
        wq, self.bq = _linear_params(attn.q_proj, c)
        wk, self.bk = _linear_params(attn.k_proj, c)
        wv, self.bv = _linear_params(attn.v_proj, c)
        wo, self.bo = _linear_params(attn.out_proj, attn.internal_dim)
        h, d = self.heads, self.d
        self.wq2, self.wk2, self.wv2, self.wo2 = wq, wk, wv, wo  # (D, C) x3, (C, D)
        self.wq = wq.reshape(h, d, c)
        self.wk = wk.reshape(h, d, c)
        self.wv = wv.reshape(h, d, c)
        self.wo = wo.reshape(c, h, d)
        #: dtype of the per-prompt image tokens when it is not float32, else None; products with them run in it
        self.lp = lp

    def _lp(self, x):
        """``x`` in the image tokens' dtype (a no-op in float32)."""
        return x if self.lp is None else x.to(self.lp)

    def _heads(self, x, w, bias):
        """Project tokens ``(B, T, C)`` and split the heads: ``(B, T, H, d)``."""
        b, t, _ = x.shape
        return (x @ w.T + bias).reshape(b, t, self.heads, self.d)

    def project_shared(self, x, which: str):
        """Project image tokens shared by all prompts, ``(N, C)``, into heads: ``(H, N, d)``."""
        w, bias = {"q": (self.wq2, self.bq), "k": (self.wk2, self.bk), "v": (self.wv2, self.bv)}[which]
        n = x.shape[0]
        return (x @ w.T + bias).reshape(n, self.heads, self.d).transpose(0, 1).contiguous()

    # prompt tokens (B, T, C) attend to the image tokens ------------------------------------------
    def tokens_to_image(self, q_tok, k_img, v_img, k_shared=None):
        """``attn(q=q_tok, k=k_img + k_shared, v=v_img)`` for per-prompt image tokens ``(B, N, C)``.

        ``k_shared`` ``(N, C)`` (the positional encoding) is added to the keys
        inside the product, without a per-prompt copy of the image tokens.
        """
        import torch

        b, t, c = q_tok.shape
        h = self.heads
        q = self._heads(q_tok, self.wq2, self.bq)
        # the query in the image's channel space, one column per (token, head); b_k shifts every score
        # of a row equally, which a softmax ignores
        q_img = self._lp(torch.einsum("bthd,hdc->bthc", q, self.wk).reshape(b, t * h, c) * self.scale)
        # scores (B, T*H, N): the (B, N, C) operand enters transposed, which BLAS reads without a copy
        if k_shared is None:
            scores = torch.bmm(q_img, k_img.transpose(1, 2))
        else:
            shared = (q_img.reshape(b * t * h, c) @ k_shared.T).reshape(b, t * h, -1)
            scores = torch.baddbmm(shared, q_img, k_img.transpose(1, 2))
        a = torch.softmax(scores, dim=-1, dtype=torch.float32)  # over the image tokens, summed in float32
        ax = torch.bmm(self._lp(a), v_img).float().reshape(b, t, h, c)  # attention-weighted image tokens
        out = torch.einsum("bthc,hdc->bthd", ax, self.wv) + self.bv.reshape(h, self.d)
        return out.reshape(b, t, h * self.d) @ self.wo2.T + self.bo

    def tokens_to_shared_image(self, q_tok, k_shared, v_shared):
        """The same for image tokens shared by all prompts: ``k_shared`` ``(H, d, N)``, ``v_shared`` ``(H, N, d)``."""
        import torch

        b, t, c = q_tok.shape
        q = self._heads(q_tok, self.wq2, self.bq).reshape(b * t, self.heads, self.d).transpose(0, 1)
        a = torch.softmax(torch.bmm(q * self.scale, k_shared), dim=-1)  # (H, B*T, N)
        out = torch.bmm(a, v_shared).transpose(0, 1).reshape(b, t, self.heads * self.d)
        return out @ self.wo2.T + self.bo

    # the image tokens attend to the prompt tokens ----------------------------------------------
    def _token_side(self, k_tok, v_tok):
        """Keys ``(B, T, H, d)`` and the values through the output layer ``(B, T*H, C)``, output bias folded in."""
        import torch

        b, t, c = k_tok.shape
        k = self._heads(k_tok, self.wk2, self.bk)
        v = self._heads(v_tok, self.wv2, self.bv)
        # each head's weights sum to 1 over the tokens, so b_o / H on every row adds b_o once
        v_out = torch.einsum("bthd,chd->bthc", v, self.wo).reshape(b, t * self.heads, c) + self.bo / self.heads
        return k, v_out

    def _residual_mix(self, residual, scores, v_out, inplace: bool = False):
        """``residual + attn`` from scores ``(B, T, H, N)``: softmax over the tokens, one fused product
        (accumulated into ``residual`` itself with ``inplace``, which spares a copy of the image tokens)."""
        import torch

        b, t, h, n = scores.shape
        a = self._lp(torch.softmax(scores, dim=1, dtype=torch.float32).reshape(b, t * h, n))
        if inplace:
            return residual.baddbmm_(a.transpose(1, 2), self._lp(v_out))
        return torch.baddbmm(residual, a.transpose(1, 2), self._lp(v_out))

    def image_to_tokens(self, residual, q_img, k_tok, v_tok):
        """``residual + attn(q=q_img, k=k_tok, v=v_tok)`` for per-prompt image tokens ``(B, N, C)``.

        The result is accumulated into ``residual`` (the previous layer's
        output, which nothing reads afterwards)."""
        import torch

        b, n, c = q_img.shape
        t = k_tok.shape[1]
        h = self.heads
        k, v_out = self._token_side(k_tok, v_tok)
        # the keys in the image's channel space, one column per (token, head); the query bias adds one
        # score per column
        k_img = self._lp(torch.einsum("hdc,bthd->bthc", self.wq, k).reshape(b, t * h, c) * self.scale)
        bias = self._lp(torch.einsum("hd,bthd->bth", self.bq.reshape(h, self.d), k).reshape(b, t * h, 1) * self.scale)
        scores = torch.baddbmm(bias, k_img, q_img.transpose(1, 2)).reshape(b, t, h, n)
        return self._residual_mix(residual, scores, v_out, inplace=True)

    def shared_image_to_tokens(self, residual, q_shared, k_tok, v_tok):
        """The same for image tokens shared by all prompts: ``q_shared`` ``(H, N, d)``."""
        import torch

        k, v_out = self._token_side(k_tok, v_tok)
        b, t, h, d = k.shape
        n = q_shared.shape[1]
        k_rows = (k * self.scale).permute(2, 0, 1, 3).reshape(h, b * t, d)
        scores = torch.bmm(k_rows, q_shared.transpose(1, 2)).reshape(h, b, t, n).permute(1, 2, 0, 3)
        return self._residual_mix(residual, scores.contiguous(), v_out)  # scores (B, T, H, N)


class BatchPromptDecoder:
    """SAM's mask decoder for many prompts on one image embedding (see the module notes).

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
    features : torch.Tensor, shape (1, C, G, G)
        Image embedding.
    dense : torch.Tensor, shape (1 or B, C, G, G)
        Dense prompt embedding of prompts without a mask input (the same for every prompt).
    exact : bool
        Run the stock transformer (bit-for-bit the stock decoder); masks are
        still drawn only for the kept answers.
    dtype : torch.dtype, optional
        Arithmetic of the per-prompt image tokens (default float32;
        ``torch.bfloat16``: see the module notes). Ignored with ``exact``.

    Call it inside ``torch.inference_mode()`` with sparse prompt embeddings
    ``(B, P, C)`` from ``sam.prompt_encoder``; see :meth:`__call__`.
    """

    def __init__(self, sam, features, dense, exact: bool = False, dtype=None) -> None:
        import torch

        self.dec = sam.mask_decoder
        self.features = features
        self.dense = dense[:1]
        self.pe = sam.prompt_encoder.get_dense_pe()
        self.exact = exact or not can_factor(sam)
        self._up = None
        #: dtype of the per-prompt image tokens when it is not float32, else None
        self.lp = None if self.exact or dtype in (None, torch.float32) else dtype
        if self.exact:
            return
        tr = self.dec.transformer
        c = features.shape[1]
        src = (features + self.dense).flatten(2).transpose(1, 2)[0]  # (N, C), the same for every prompt
        pos = self.pe.flatten(2).transpose(1, 2)[0]
        self.src, self.pos = src, pos
        # the shared image tokens as the per-prompt ones are kept (the first layer's residual, every key's PE)
        self.src_lp, self.pos_lp = (src, pos) if self.lp is None else (src.to(self.lp), pos.to(self.lp))
        self.layers = []
        for i, layer in enumerate(tr.layers):
            t2i = _CrossAttention(layer.cross_attn_token_to_image, self.lp)
            i2t = _CrossAttention(layer.cross_attn_image_to_token, self.lp)
            shared = None
            if i == 0:  # the image tokens of the first layer do not depend on the prompt
                shared = dict(k=t2i.project_shared(src + pos, "k").transpose(1, 2).contiguous(),
                              v=t2i.project_shared(src, "v"), q=i2t.project_shared(src + pos, "q"))
            self.layers.append((layer, t2i, i2t, shared))
        self.final = _CrossAttention(tr.final_attn_token_to_image, self.lp)
        self._up = self._prepare_upscaling()

    def _transformer(self, tokens, out_tokens):
        """The two-way transformer.

        Returns the output tokens listed in ``out_tokens`` ``(B, len(out_tokens), C)``
        and the image tokens ``(B, N, C)``. The last cross-attention treats
        every token on its own, so it runs only for the tokens that are read
        (the IoU token and the mask tokens of the requested answers).
        """
        queries = tokens
        keys = None  # None: still the shared self.src
        for layer, t2i, i2t, shared in self.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            if keys is None:
                attn = t2i.tokens_to_shared_image(queries + tokens, shared["k"], shared["v"])
            else:
                kp = keys + self.pos_lp  # shared by both cross-attentions of this layer
                attn = t2i.tokens_to_image(queries + tokens, kp, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            if keys is None:
                src = self.src_lp.unsqueeze(0).expand(tokens.shape[0], -1, -1)
                keys = layer.norm4(i2t.shared_image_to_tokens(src, shared["q"], queries + tokens, queries))
            else:
                keys = layer.norm4(i2t.image_to_tokens(keys, kp, queries + tokens, queries))
        if keys is None:  # a transformer without layers
            keys = self.src_lp.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        queries = queries[:, out_tokens]
        attn = self.final.tokens_to_image(queries + tokens[:, out_tokens], keys, keys, k_shared=self.pos_lp)
        queries = self.dec.transformer.norm_final_attn(queries + attn)
        return queries, keys

    def _upscale(self, keys, hyper):
        """Mask logits ``(P, K, 4G, 4G)`` from image tokens ``(P, N, C)`` and hypernetwork outputs ``(P, K, C')``.

        SAM's output upscaling (two stride-2 2x2 transposed convolutions with
        a channel LayerNorm between them) maps every image token to its own
        4 x 4 block of output pixels, so it is computed as two matrix products
        over channels-last tokens (the factored path); the exact path runs the
        modules.
        """
        import torch
        import torch.nn.functional as F

        dec = self.dec
        p, n, c = keys.shape
        g = self.features.shape[-1]
        if self.exact or self._up is None:
            up = dec.output_upscaling(keys.float().transpose(1, 2).reshape(p, c, g, g))
            _, cu, hu, wu = up.shape
            return (hyper @ up.view(p, cu, hu * wu)).view(p, -1, hu, wu)
        w1, b1, ln, act1, w2, b2, act2 = self._up
        c4 = b1.shape[0] // 4  # channels of the first convolution (its bias is repeated per sub-pixel)
        if self._fuse_upscaling(keys):
            # oneDNN's linear with the bias (and the second GELU) as post-ops: no separate pass over the output
            y = torch.ops.mkldnn._linear_pointwise(keys.reshape(p * n, c), w1.T, b1, "none", [], None)
            y = act1(F.layer_norm(y.reshape(p, n * 4, c4), (c4,), ln.weight, ln.bias, ln.eps))
            z = torch.ops.mkldnn._linear_pointwise(y.reshape(p * n * 4, c4), w2.T, b2, "gelu", [], "none")
        else:
            y = torch.addmm(b1, keys.reshape(p * n, c), w1).reshape(p, n * 4, c4)
            y = act1(F.layer_norm(y, (c4,), ln.weight, ln.bias, ln.eps))
            z = act2(torch.addmm(b2, y.reshape(p * n * 4, c4), w2))
        # z: (P*N*4, 4*C8), sub-pixel (a, b) of the first convolution, then (a2, b2) of the second
        hyper = hyper.to(z.dtype)
        logits = torch.bmm(z.reshape(p, n * 16, -1), hyper.transpose(1, 2)).float()  # (P, N*16, K)
        k = hyper.shape[1]
        logits = logits.reshape(p, g, g, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(p, k, 4 * g, 4 * g)

    def _fuse_upscaling(self, keys) -> bool:
        """Whether the factored upscaling runs its two products as fused oneDNN calls: where the encoder's own
        fused calls would run in the image tokens' dtype (``tinyvit._fused_dtype``: a CPU, inference, working
        operators, not switched off by ``tinyvit.plain_operators()``) and the second activation is the exact
        GELU they compute."""
        import torch

        from . import tinyvit

        act2 = self._up[-1]
        return (type(act2) is torch.nn.GELU and act2.approximate == "none"
                and tinyvit._fused_dtype(keys) == keys.dtype)

    def _prepare_upscaling(self):
        """Weights of the factored upscaling, or None when the upscaling is not SAM's layout."""
        import torch
        from segment_anything.modeling.common import LayerNorm2d

        seq = self.dec.output_upscaling
        if not (isinstance(seq, torch.nn.Sequential) and len(seq) == 5
                and type(seq[0]) is torch.nn.ConvTranspose2d and type(seq[1]) is LayerNorm2d
                and type(seq[3]) is torch.nn.ConvTranspose2d
                and all(m.kernel_size == (2, 2) and m.stride == (2, 2) and m.padding == (0, 0)
                        and m.groups == 1 and m.bias is not None and m.output_padding == (0, 0)
                        for m in (seq[0], seq[3]))):
            return None
        t1, ln, act1, t2, act2 = seq
        # (in, out, a, b) -> (in, a, b, out): output channels last for each sub-pixel; one bias per sub-pixel
        # (the transposes, (out, in), are contiguous: the layout of the fused calls)
        w1 = t1.weight.permute(0, 2, 3, 1).reshape(t1.in_channels, -1).T.contiguous().T
        w2 = t2.weight.permute(0, 2, 3, 1).reshape(t2.in_channels, -1).T.contiguous().T
        b1, b2 = t1.bias.repeat(4), t2.bias.repeat(4)
        if self.lp is not None:  # the products run on the low-precision image tokens; the LayerNorm sums in float32
            w1, b1, w2, b2 = (t.to(self.lp) for t in (w1, b1, w2, b2))
        return w1, b1, ln, act1, w2, b2, act2

    def __call__(self, sparse, multimask: bool = False, min_score: float | None = None) -> DecodedBatch:
        """Decode a batch of prompts.

        Parameters
        ----------
        sparse : torch.Tensor, shape (B, P, C)
            Sparse prompt embeddings.
        multimask : bool
            SAM's three answers per prompt instead of the single-mask answer.
        min_score : float, optional
            Draw masks only for prompts with an answer whose predicted IoU
            exceeds this (None: all).
        """
        import torch

        dec = self.dec
        b = sparse.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        n_mask = dec.num_mask_tokens
        mask_ids = list(range(1, n_mask)) if multimask else [0]
        out_tokens = [0] + [1 + i for i in mask_ids]
        if self.exact:
            src = torch.repeat_interleave(self.features, b, dim=0) + self.dense
            pos_src = torch.repeat_interleave(self.pe, b, dim=0)
            hs, keys = dec.transformer(src, pos_src, tokens)
            mask_ids = list(range(n_mask))  # as the stock decoder: every mask, then the answers are selected
            out_tokens = list(range(1 + n_mask))
        else:
            hs, keys = self._transformer(tokens, out_tokens)
        sl = slice(1, None) if multimask else slice(0, 1)
        iou = dec.iou_prediction_head(hs[:, 0, :])
        scores = iou[:, sl] if self.exact else iou[:, mask_ids]
        if min_score is None:
            kept = torch.ones(b, dtype=torch.bool, device=scores.device)
        else:
            kept = (scores > min_score).any(dim=1)
        g = self.features.shape[-1]
        if not bool(kept.any()):
            return DecodedBatch(scores, kept, torch.zeros((0, scores.shape[1], 4 * g, 4 * g), device=scores.device))
        if not bool(kept.all()):
            idx = torch.nonzero(kept)[:, 0]
            hs, keys = hs[idx], keys[idx]
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + j, :]) for j, i in enumerate(mask_ids)], 1)
        masks = self._upscale(keys, hyper)
        return DecodedBatch(scores, kept, masks[:, sl] if self.exact else masks)
