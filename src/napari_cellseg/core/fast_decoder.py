"""SAM's mask decoder, rewritten for a fast live preview on a CPU (same weights, same answers).

segment-anything's :class:`~segment_anything.modeling.MaskDecoder` spends
most of a prompt's time on the image side of its two-way transformer: linear
projections of all ``G * G`` image tokens (4,096 for both LiteMedSAM and SAM
ViT-B), done on channel-strided tensors, plus the upscaling of every mask
token. :class:`FastMaskDecoder` computes the same function with less work:

* **Cached per image embedding** (prompt-independent): the image tokens plus
  the "no mask" dense embedding, the dense positional encoding, and the first
  layer's projections of the image tokens (its keys and values for the
  token-to-image attention, its queries for the image-to-token attention).
* **Low-rank attention.** The prompt side has only ``T`` tokens (5 output
  tokens plus 2 for a box, 2 for a click). Where ``heads * T`` is smaller than
  the attention's internal width, projections are moved to the token side by
  associativity: ``softmax(q (W_k x)^T)`` becomes ``softmax((q W_k) x^T)`` (the
  key bias adds a constant per row, which softmax ignores), ``a (W_v x)``
  becomes ``W_v (a x)`` (rows of ``a`` sum to one), and the output
  projection is applied to the ``T`` values before the image tokens mix them.
  Exact algebra; only float rounding differs.
* **One mask, not four.** Only the mask tokens asked for are upscaled and
  decoded: the first for a single mask, the best-scored of the three
  (SAM's IoU head runs first) for an ambiguous click.
* **Upscaling as two matrix products.** Both 2 x 2 stride-2 transposed
  convolutions touch each input pixel once, so they are plain matrix products
  on contiguous ``(pixels, channels)`` arrays; pixels are put back in image
  order once, on the final single-channel mask.

Everything else (self-attention and MLP of the prompt tokens, layer norms,
hypernetworks, IoU head) runs segment-anything's own modules. The decoder is
used only when the network has segment-anything's layout with plain
``nn.Linear`` projections (a model being fine-tuned with LoRA falls back to
the original), and weights changed in place (training) invalidate its caches.

The outputs equal ``sam.mask_decoder(...)`` up to float rounding (about 1e-5
on logits; tested against segment-anything's ``SamPredictor`` in
``tests/core/test_fast_decoder.py``). With ``image_dtype=torch.bfloat16``
(the distance map of a bfloat16 model) they are within bfloat16 rounding of
those.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from typing import Any

__all__ = ["FastMaskDecoder", "fast_decoder_unsupported"]


def fast_decoder_unsupported(sam) -> str | None:
    """Why :class:`FastMaskDecoder` cannot run this network, or None when it can."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.transformer import Attention
    from torch import nn

    dec = getattr(sam, "mask_decoder", None)
    if type(dec) is not MaskDecoder:
        return "the mask decoder is not segment-anything's MaskDecoder"
    tr = dec.transformer
    if type(tr) is not TwoWayTransformer:
        return "the decoder's transformer is not segment-anything's TwoWayTransformer"
    attns = [a for layer in tr.layers for a in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)]
    attns.append(tr.final_attn_token_to_image)
    for a in attns:
        if type(a) is not Attention:
            return "a cross-attention is not segment-anything's Attention"
        for proj in (a.q_proj, a.k_proj, a.v_proj, a.out_proj):
            if type(proj) is not nn.Linear:
                return "a cross-attention projection is not a plain nn.Linear (e.g. LoRA during fine-tuning)"
    up = list(dec.output_upscaling)
    kinds = [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU]
    if len(up) != 5 or any(type(m) is not k for m, k in zip(up, kinds)):
        return "the output upscaling is not segment-anything's"
    for conv in (up[0], up[3]):
        if (conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0)
                or conv.output_padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1
                or conv.bias is None):
            return "the output upscaling convolutions are not 2 x 2, stride 2"
    if up[2].approximate != "none" or up[4].approximate != "none":
        return "the upscaling GELU is approximate"
    return None


class FastMaskDecoder:
    """Decode point and box prompts with SAM's mask decoder, faster (see the module docstring).

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        Checked with :func:`fast_decoder_unsupported` (raises ``ValueError``
        when unsupported).
    max_images : int
        Image embeddings whose prompt-independent work is kept (least recently
        used first out; about 10 MB each for a 64 x 64 x 256 embedding).
    image_dtype : torch.dtype, optional
        Arithmetic of the image tokens (default float32). ``torch.bfloat16``
        keeps them, and the products and the upscaling that read them, in
        bfloat16 (the matrix kernels accumulate in float32); the prompt tokens,
        every softmax's sums and the layer norms' statistics stay float32. Used
        by the distance map's decoder of a bfloat16 model
        (``automatic.DISTANCE_DECODER_FOLLOWS_PRECISION``); the annotation
        mode's clicks and boxes keep float32. The first layer's image
        projections are then never cached (the low-rank form runs every time).
    """

    def __init__(self, sam, max_images: int = 4, image_dtype=None) -> None:
        import torch

        why = fast_decoder_unsupported(sam)
        if why is not None:
            raise ValueError(f"the fast decoder cannot run this network: {why}")
        self.sam = sam
        self.max_images = int(max_images)
        #: dtype of the image tokens when it is not float32, else None
        self.image_dtype = None if image_dtype in (None, torch.float32) else image_dtype
        self._lock = threading.RLock()
        self._weights_key: tuple | None = None
        self._weights: dict[str, Any] = {}
        self._images: OrderedDict[int, tuple[Any, dict]] = OrderedDict()
        self._work: dict[tuple, Any] = {}

    def _buf(self, name: str, shape: tuple, like):
        """A reusable output tensor (fresh multi-megabyte tensors each prompt cost page faults)."""
        import torch

        key = (name, tuple(shape), like.dtype, like.device)
        t = self._work.get(key)
        if t is None:
            if len(self._work) > 64:  # shapes change with the batch size: keep a bounded set
                self._work.clear()
            t = self._work[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t

    # -- caches ------------------------------------------------------------------

    def _version_key(self) -> tuple:
        dec = self.sam.mask_decoder
        pe = self.sam.prompt_encoder
        tensors = [*dec.parameters(), pe.no_mask_embed.weight, pe.pe_layer.positional_encoding_gaussian_matrix]
        return tuple((id(t), t._version, t.device, t.dtype) for t in tensors)

    def _prepare_weights(self) -> dict:
        """Derived weights; rebuilt when any decoder weight changed (training steps bump versions)."""
        key = self._version_key()
        if key == self._weights_key:
            return self._weights
        import torch

        dec = self.sam.mask_decoder
        up = dec.output_upscaling
        c1, ln, _, c2, _ = up
        with torch.inference_mode():
            w = {
                # (C_in, C_out, 2, 2) -> (C_in, 2 * 2 * C_out): output sub-pixel (di, dj), then channel
                "w1": c1.weight.detach().permute(0, 2, 3, 1).reshape(c1.in_channels, -1).contiguous(),
                "b1": c1.bias.detach().repeat(4).contiguous(),
                "w2": c2.weight.detach().permute(0, 2, 3, 1).reshape(c2.in_channels, -1).contiguous(),
                "b2": c2.bias.detach().repeat(4).contiguous(),
                "ln_w": ln.weight.detach(), "ln_b": ln.bias.detach(), "ln_eps": float(ln.eps),
                "c1_out": c1.out_channels, "c2_out": c2.out_channels,
            }
            pe = self.sam.prompt_encoder.get_dense_pe().detach()  # (1, C, G, G)
            w["pe_nc"] = pe.reshape(pe.shape[1], -1).t().contiguous()  # (N, C)
            if self.image_dtype is not None:  # what multiplies or adds to the image tokens, in their dtype
                for name in ("w1", "b1", "w2", "b2", "ln_w", "ln_b", "pe_nc"):
                    w[name] = w[name].to(self.image_dtype)
        with self._lock:
            self._weights = w
            self._weights_key = key
            self._images.clear()
        return w

    def _image_state(self, features, w: dict) -> dict:
        """Prompt-independent work on one image embedding ``(1, C, G, G)``, cached by tensor identity.

        The first prompt on an embedding gets the image tokens only (``"k1t"``
        absent: its first layer runs the low-rank way, the cheapest without a
        cache); from the second prompt on (the user is refining an object),
        the first layer's projections of the image tokens are computed once
        and kept.
        """
        import torch

        fid = id(features)
        with self._lock:
            hit = self._images.get(fid)
            if hit is not None and hit[0]() is features:
                self._images.move_to_end(fid)
                if "k1t" in hit[1]:
                    return hit[1]
                state = hit[1]
            else:
                state = None
        tr = self.sam.mask_decoder.transformer
        pe = self.sam.prompt_encoder
        _, c, g0, g1 = features.shape
        n = g0 * g1
        with torch.inference_mode():
            if state is None:
                keys0 = (features.reshape(c, n).t() + pe.no_mask_embed.weight.reshape(1, c)).contiguous()
                if self.image_dtype is not None:
                    keys0 = keys0.to(self.image_dtype)
                state = {"keys0": keys0[None], "grid": (g0, g1)}  # (1, N, C)
            elif self.image_dtype is None:  # a later prompt (in a low precision every prompt runs the low-rank form)
                keys0 = state["keys0"][0]
                kpe0 = keys0 + w["pe_nc"]
                first = tr.layers[0]
                t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
                h = t2i.num_heads
                d = t2i.internal_dim // h
                k1 = t2i.k_proj(kpe0)  # (N, D)
                v1 = t2i.v_proj(keys0)
                d_i = i2t.internal_dim // i2t.num_heads
                q1 = i2t.q_proj(kpe0) * (1.0 / math.sqrt(d_i))
                state = {
                    **state,
                    "k1t": k1.view(n, h, d).permute(1, 2, 0).contiguous(),  # (H, d, N)
                    "v1": v1.view(n, h, d).permute(1, 0, 2).contiguous(),  # (H, N, d)
                    "q1": q1.view(n, i2t.num_heads, d_i).permute(1, 0, 2).contiguous(),  # (H, N, d), pre-scaled
                }
        with self._lock:
            self._images[fid] = (weakref.ref(features), state)
            self._images.move_to_end(fid)
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return state

    def clear(self) -> None:
        """Forget every cached image (the derived weights stay)."""
        with self._lock:
            self._images.clear()

    # -- attention pieces --------------------------------------------------------------

    @staticmethod
    def _heads(x, h: int):
        b, t, dim = x.shape
        return x.view(b, t, h, dim // h).transpose(1, 2)  # (B, H, T, d)

    @staticmethod
    def _merge(x):
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def _token_to_image_cached(self, attn, q, state):
        """First layer's token-to-image attention on the cached image keys and values."""
        import torch

        h = attn.num_heads
        qh = self._heads(attn.q_proj(q), h)  # (B, H, T, d)
        qh = qh * (1.0 / math.sqrt(qh.shape[-1]))
        a = torch.softmax(torch.matmul(qh, state["k1t"]), dim=-1)  # (B, H, T, N)
        out = torch.matmul(a, state["v1"])  # (B, H, T, d)
        return attn.out_proj(self._merge(out))

    def _token_to_image(self, attn, q, keys, kpe):
        """Token-to-image attention of prompt tokens ``q`` (B, T, C) on image tokens (B, N, C)."""
        import torch

        h = attn.num_heads
        b, t, c = q.shape
        if h * t >= attn.internal_dim:  # many prompt tokens: project the image side, as SAM does
            return attn(q=q, k=kpe.float(), v=keys.float())
        d = attn.internal_dim // h
        qh = self._heads(attn.q_proj(q), h) * (1.0 / math.sqrt(d))  # (B, H, T, d)
        # (q W_k) x^T: the key bias adds a constant to every score of a row, which softmax cancels
        g = torch.einsum("bhtd,hdc->bhtc", qh, attn.k_proj.weight.view(h, d, c)).reshape(b, h * t, c)
        scores = torch.bmm(g.to(kpe.dtype), kpe.transpose(1, 2))
        a = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (B, H*T, N)
        # rows of a sum to one: W_v (a x) + b_v = a (W_v x + b_v)
        r = torch.bmm(a.to(keys.dtype), keys).float().view(b, h, t, c)
        v = torch.einsum("bhtc,hdc->bhtd", r, attn.v_proj.weight.view(h, d, c)) + attn.v_proj.bias.view(h, 1, d)
        return attn.out_proj(self._merge(v))

    def _image_to_token(self, attn, scores, v_tok, keys):
        """``keys + attn_out``: image tokens attend to the prompt tokens, given the scores (B, H, T, N)."""
        import torch

        h = attn.num_heads
        b, t, c = v_tok.shape
        d = attn.internal_dim // h
        a = torch.softmax(scores, dim=2, dtype=torch.float32).to(keys.dtype)  # over the T prompt tokens, per head
        vh = self._heads(attn.v_proj(v_tok), h)  # (B, H, T, d)
        # out_proj(sum_t a v_t) = sum_t a (W_o,h v_t) + b_o; the H heads' weights each sum to one: b_o / H each
        wo = attn.out_proj.weight.view(c, h, d)
        u = torch.einsum("bhtd,chd->bhtc", vh, wo) + attn.out_proj.bias.view(1, 1, 1, c) / h
        out = self._buf(f"i2t{id(attn)}", keys.shape, keys)
        return torch.baddbmm(keys, a.view(b, h * t, -1).transpose(1, 2), u.reshape(b, h * t, c).to(keys.dtype),
                             out=out)

    def _image_to_token_scores_cached(self, attn, k_tok, state):
        import torch

        kh = self._heads(attn.k_proj(k_tok), attn.num_heads)  # (B, H, T, d)
        return torch.matmul(kh, state["q1"].transpose(1, 2))  # (B, H, T, N); q1 is pre-scaled

    def _image_to_token_scores(self, attn, k_tok, kpe):
        """Scores (B, H, T, N) of image queries ``W_q kpe + b_q`` against prompt keys, via the token side."""
        import torch

        h = attn.num_heads
        b, t, c = k_tok.shape
        d = attn.internal_dim // h
        kh = self._heads(attn.k_proj(k_tok), h) * (1.0 / math.sqrt(d))  # (B, H, T, d)
        m = torch.einsum("bhtd,hdc->bhtc", kh, attn.q_proj.weight.view(h, d, c)).reshape(b, h * t, c)
        bias = torch.einsum("bhtd,hd->bht", kh, attn.q_proj.bias.view(h, d)).reshape(b, h * t, 1)
        dt = kpe.dtype
        return torch.baddbmm(bias.to(dt), m.to(dt), kpe.transpose(1, 2)).view(b, h, t, -1)

    def _image_to_token_direct(self, attn, k_tok, v_tok, kpe, keys):
        return keys + attn(q=kpe.float(), k=k_tok, v=v_tok).to(keys.dtype)

    # -- forward ---------------------------------------------------------------------

    def _transformer(self, features, sparse):
        """The two-way transformer: ``(tokens_out (B, T, C), image_tokens (B, N, C))``."""
        import torch

        w = self._prepare_weights()
        state = self._image_state(features, w)
        dec = self.sam.mask_decoder
        tr = dec.transformer
        b = sparse.shape[0]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        t = tokens.shape[1]
        queries, qpe = tokens, tokens
        pe = w["pe_nc"][None]
        cached = "k1t" in state
        keys = state["keys0"].expand(b, -1, -1)
        kpe = None
        for i, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + qpe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            if kpe is None:
                kpe = torch.add(keys, pe, out=self._buf("kpe_in", keys.shape, keys)) if not cached or i else None
            q = queries + qpe
            t2i = layer.cross_attn_token_to_image
            if i == 0 and cached:
                attn_out = self._token_to_image_cached(t2i, q, state)
            else:
                attn_out = self._token_to_image(t2i, q, keys, kpe)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            k_tok = queries + qpe
            i2t = layer.cross_attn_image_to_token
            if i2t.num_heads * t >= i2t.internal_dim:
                src_pe = kpe if kpe is not None else keys + pe
                keys = self._image_to_token_direct(i2t, k_tok, queries, src_pe, keys)
            else:
                if i == 0 and cached:
                    scores = self._image_to_token_scores_cached(i2t, k_tok, state)
                else:
                    scores = self._image_to_token_scores(i2t, k_tok, kpe)
                keys = self._image_to_token(i2t, scores, queries, keys)
            keys = layer.norm4(keys)
            kpe = torch.add(keys, pe, out=self._buf(f"kpe{i}", keys.shape, keys))
        if kpe is None:  # a transformer of depth 0
            kpe = keys + pe
        attn_out = self._token_to_image(tr.final_attn_token_to_image, queries + qpe, keys, kpe)
        queries = tr.norm_final_attn(queries + attn_out)
        return queries, keys

    def _upscale(self, keys, hyper, grid: tuple[int, int]):
        """Masks ``(B, K, 4 G, 4 G)`` from image tokens ``(B, N, C)`` and hypernetwork outputs ``(B, K, C/8)``."""
        import torch
        import torch.nn.functional as F

        w = self._prepare_weights()
        b, n, c = keys.shape
        g0, g1 = grid
        o1, o2 = w["c1_out"], w["c2_out"]
        x = keys.reshape(b * n, c)
        y = torch.addmm(w["b1"], x, w["w1"], out=self._buf("up1", (b * n, 4 * o1), x)).view(b * n * 4, o1)
        y = torch.ops.aten.gelu_(F.layer_norm(y, (o1,), w["ln_w"], w["ln_b"], w["ln_eps"]))
        y = torch.addmm(w["b2"], y, w["w2"], out=self._buf("up2", (b * n * 4, 4 * o2), y))
        y = torch.ops.aten.gelu_(y).view(b, n * 16, o2)
        k = hyper.shape[1]
        m = torch.bmm(y, hyper.to(y.dtype).transpose(1, 2)).float()  # (B, N*16, K)
        # pixel (4i + 2di + di2, 4j + 2dj + dj2) is at [i, j, di, dj, di2, dj2]
        m = m.view(b, g0, g1, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return m.reshape(b, k, 4 * g0, 4 * g1)

    def __call__(self, features, sparse, multimask: bool = False, best: bool = False):
        """Decode prompts on one image embedding.

        Parameters
        ----------
        features : torch.Tensor, shape (1, C, G, G)
            The image embedding.
        sparse : torch.Tensor, shape (B, S, C)
            Sparse prompt embeddings (``sam.prompt_encoder``'s first output);
            the dense input is SAM's "no mask" embedding.
        multimask : bool
            SAM's three candidates instead of its single-mask output.
        best : bool
            With ``multimask``: keep only the candidate with the highest
            predicted IoU (``K = 1``); only that one is upscaled.

        Returns
        -------
        low_res : torch.Tensor, shape (B, K, 4 G, 4 G)
            Mask logits, as ``sam.mask_decoder`` returns them.
        iou : torch.Tensor, shape (B, K)
        """
        import torch

        if features.dim() != 4 or features.shape[0] != 1:
            raise ValueError(f"features must have shape (1, C, G, G), got {tuple(features.shape)}")
        dec = self.sam.mask_decoder
        with self._lock, torch.inference_mode():
            hs, keys = self._transformer(features, sparse)
            iou = dec.iou_prediction_head(hs[:, 0, :])
            tokens = hs[:, 1 : 1 + dec.num_mask_tokens, :]
            if not multimask:
                idx = [0]
                iou = iou[:, 0:1]
            else:
                idx = list(range(1, dec.num_mask_tokens))
                iou = iou[:, 1:]
            hyper = torch.stack([dec.output_hypernetworks_mlps[i](tokens[:, i, :]) for i in idx], dim=1)
            if multimask and best:
                pick = iou.argmax(dim=1)
                sel = torch.arange(len(pick), device=pick.device)
                hyper = hyper[sel, pick][:, None]
                iou = iou[sel, pick][:, None]
            masks = self._upscale(keys, hyper, tuple(features.shape[-2:]))
        return masks, iou
