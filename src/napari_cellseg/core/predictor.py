"""Embed an image once, then answer many point and box prompts.

Coordinates are napari's ``(row, col)`` everywhere in this module's interface;
they become SAM's ``(x, y)`` only inside
:meth:`napari_cellseg.core.preprocess.ResizeTransform.rc_to_model_xy`.

Examples
--------
>>> import numpy as np
>>> from napari_cellseg.core.models import random_model
>>> predictor = Predictor(random_model("vit_test"))
>>> predictor.set_image(np.random.default_rng(0).random((40, 50)))
>>> masks, scores = predictor.predict_boxes([[5, 5, 20, 30]])
>>> masks.shape, scores.shape
((1, 40, 50), (1,))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .preprocess import ResizeTransform, normalize_image, resize_to_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import LoadedModel


def image_key(image: np.ndarray) -> str:
    """A content hash of an image, for embedding caches (shape, dtype and bytes)."""
    import xxhash

    arr = np.ascontiguousarray(image)
    h = xxhash.xxh3_128()
    h.update(f"{arr.shape}{arr.dtype}".encode())
    h.update(arr.data)
    return h.hexdigest()


@dataclass
class Embedding:
    """The image embedding of one image (or one window of it) for one model.

    Attributes
    ----------
    features : torch.Tensor
        ``(1, C, G, G)`` encoder output on the model's device.
    transform : ResizeTransform
        How the image was resized into the model input.
    model_name : str
    """

    features: Any
    transform: ResizeTransform
    model_name: str

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.transform.original_shape


@dataclass
class PromptResult:
    """Masks answering one set of prompts.

    Attributes
    ----------
    masks : ndarray of bool, shape (K, M, N)
    scores : ndarray of float32, shape (K,)
        SAM's predicted IoU of each mask.
    low_res_logits : ndarray of float32, shape (K, h, w)
        Logits at the decoder's resolution (feed back as ``mask_input``).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class Predictor:
    """Prompted segmentation with any SAM-family model of the catalogue.

    Parameters
    ----------
    model : LoadedModel
        From :func:`napari_cellseg.core.models.load_model` or
        :func:`~napari_cellseg.core.models.random_model`.
    """

    def __init__(self, model: LoadedModel, fast_decoder: bool = True) -> None:
        self.model = model
        self.embedding: Embedding | None = None
        self.use_fast_decoder = bool(fast_decoder)
        self._fast = None
        self._fast_unsupported: str | None = None

    def fast_decoder(self):
        """The :class:`~napari_cellseg.core.fast_decoder.FastMaskDecoder` of this model, or None.

        None when switched off (``fast_decoder=False``) or when the network is
        not segment-anything's layout (``self._fast_unsupported`` says why,
        e.g. a decoder with LoRA layers during fine-tuning); prompts are then
        decoded by segment-anything's own modules.
        """
        if not self.use_fast_decoder:
            return None
        from .fast_decoder import FastMaskDecoder, fast_decoder_unsupported

        sam = self.model.sam
        # checked at every call (microseconds): fine-tuning may put LoRA layers into the decoder, or merge them
        self._fast_unsupported = fast_decoder_unsupported(sam)
        if self._fast_unsupported is not None:
            return None
        if self._fast is None or self._fast.sam is not sam:
            self._fast = FastMaskDecoder(sam)
        return self._fast

    # -- embedding --------------------------------------------------------------

    @property
    def is_image_set(self) -> bool:
        return self.embedding is not None

    def embed(self, image01: np.ndarray) -> Embedding:
        """Run the image encoder on a normalised ``(M, N, 3)`` float image in [0, 1]."""
        import torch

        from .cpu_memory import reuse_freed_memory

        sam = self.model.sam
        tensor, transform = resize_to_model(image01, self.model.input_size)
        tensor = tensor.to(self.model.device)
        # on a CPU, blocks freed by one encoder stage serve the next (LiteMedSAM: 0-8% per embedding, in the noise)
        with torch.inference_mode(), reuse_freed_memory(self.model.device):
            x = (tensor * 255.0 - sam.pixel_mean) / sam.pixel_std
            with self.model.encoder_autocast():
                features = sam.image_encoder(x)
            features = features.float()
        return Embedding(features=features, transform=transform, model_name=self.model.name)

    def set_image(self, image: np.ndarray, channel: int | None = None) -> None:
        """Normalise (see :mod:`~napari_cellseg.core.preprocess`) and embed an image.

        Parameters
        ----------
        image : ndarray
            ``(M, N)``, ``(M, N, 3)`` RGB or ``(M, N, C)`` with ``channel``.
        channel : int, optional
            Channel of a multichannel image.
        """
        self.embedding = self.embed(normalize_image(image, channel=channel))

    def set_embedding(self, embedding: Embedding) -> None:
        """Reuse an embedding computed earlier (from a cache)."""
        if embedding.model_name != self.model.name:
            raise ValueError(
                f"embedding was computed with model {embedding.model_name!r}, not {self.model.name!r}"
            )
        self.embedding = embedding

    def reset_image(self) -> None:
        self.embedding = None

    # -- prompts ------------------------------------------------------------------

    def _require_embedding(self) -> Embedding:
        if self.embedding is None:
            raise RuntimeError("no image is set: call set_image() before asking for masks")
        return self.embedding

    def _check_inside(self, coords_rc: np.ndarray, what: str) -> None:
        rows, cols = self._require_embedding().image_shape
        c = np.asarray(coords_rc, dtype=float).reshape(-1, 2)
        if c.size and (np.isnan(c).any() or (c[:, 0] < -0.5).any() or (c[:, 1] < -0.5).any()
                       or (c[:, 0] > rows - 0.5).any() or (c[:, 1] > cols - 0.5).any()):
            raise ValueError(f"{what} lie outside the image of shape ({rows}, {cols})")

    def decode(
        self,
        points_rc: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes_rc: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
        upsample: bool = True,
        best: bool = False,
    ):
        """Decode a batch of prompt sets: the shared path of every prompt method.

        Parameters
        ----------
        points_rc : ndarray, shape (B, P, 2), optional
            ``P`` points of each of ``B`` objects, (row, col).
        point_labels : ndarray, shape (B, P), optional
            1 for a positive point, 0 for a negative one.
        boxes_rc : ndarray, shape (B, 4), optional
            (r0, c0, r1, c1) boxes with exclusive ends, one per object.
        mask_input : ndarray, shape (B, h, w), optional
            Low-resolution logits from an earlier answer.
        multimask : bool
            Return SAM's three candidate masks per object instead of one.
        upsample : bool
            Return full-resolution masks; otherwise only low-resolution logits.
        best : bool
            With ``multimask``: keep only the candidate with the highest
            predicted IoU (``K = 1``), as SAM's automatic mode does for an
            ambiguous click; the others are never upscaled.

        Notes
        -----
        Prompts with a box go to the model's box decoder where it has one
        (:mod:`~napari_cellseg.core.box_head`), others to its mask decoder.
        Without ``mask_input``, prompts go through
        :class:`~napari_cellseg.core.fast_decoder.FastMaskDecoder` (the same
        answers as segment-anything's decoder up to float rounding, several
        times faster on a CPU); with it, through segment-anything's modules.

        Returns
        -------
        masks : ndarray of bool, shape (B, K, M, N) or None
        scores : ndarray, shape (B, K)
        low_res_logits : ndarray, shape (B, K, h, w)
        """
        import torch
        import torch.nn.functional as F

        emb = self._require_embedding()
        sam = self.model.sam
        dev = emb.features.device
        points = None
        boxes = None
        batch = None
        if points_rc is not None:
            pts = np.asarray(points_rc, dtype=float)
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise ValueError(f"points must have shape (B, P, 2), got {pts.shape}")
            self._check_inside(pts, "points")
            labels = np.ones(pts.shape[:2]) if point_labels is None else np.asarray(point_labels, float)
            if labels.shape != pts.shape[:2]:
                raise ValueError(f"point labels of shape {labels.shape} do not match points {pts.shape[:2]}")
            xy = emb.transform.rc_to_model_xy(pts)
            points = (torch.as_tensor(xy, dtype=torch.float32, device=dev),
                      torch.as_tensor(labels, dtype=torch.int64, device=dev))
            batch = pts.shape[0]
        if boxes_rc is not None:
            bx = np.asarray(boxes_rc, dtype=float)
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise ValueError(f"boxes must have shape (B, 4) as (r0, c0, r1, c1), got {bx.shape}")
            if np.isnan(bx).any():
                raise ValueError("boxes contain NaN")
            bx = clip_boxes(bx, emb.image_shape)
            boxes = torch.as_tensor(emb.transform.box_rc_to_model_xyxy(bx), dtype=torch.float32, device=dev)
            if batch is not None and batch != bx.shape[0]:
                raise ValueError(f"{batch} point sets but {bx.shape[0]} boxes")
            batch = bx.shape[0]
        masks_in = None
        if mask_input is not None:
            masks_in = torch.as_tensor(np.asarray(mask_input, np.float32), device=dev)
            if masks_in.ndim == 3:
                masks_in = masks_in[:, None]
        if batch is None:
            raise ValueError("give at least one point or box")
        if batch == 0:
            rows, cols = emb.image_shape
            return (np.zeros((0, 1, rows, cols), bool), np.zeros((0, 1), np.float32),
                    np.zeros((0, 1, 1, 1), np.float32))
        from .box_head import decoder_for

        # box prompts go to the model's own box decoder where it has one (docs/model_card.md)
        decoder = decoder_for(sam, boxes is not None)
        fast = None
        if masks_in is None and emb.features.shape[0] == 1:
            fast = self.fast_decoder() if decoder is sam.mask_decoder else _fast_default_decoder(sam, decoder)
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks_in)
            if fast is not None:
                low_res, iou = fast(emb.features, sparse, multimask=multimask, best=best)
            else:
                low_res, iou = decoder(
                    image_embeddings=emb.features,
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
                if multimask and best:
                    pick = iou.argmax(dim=1)
                    sel = torch.arange(len(pick), device=pick.device)
                    low_res, iou = low_res[sel, pick][:, None], iou[sel, pick][:, None]
            masks = None
            if upsample:
                logits = self.upsample_logits(low_res)
                masks = (logits > sam.mask_threshold).cpu().numpy()
        return masks, iou.float().cpu().numpy(), low_res.float().cpu().numpy()

    def upsample_logits(self, low_res):
        """Low-resolution logits ``(B, K, h, w)`` to full-image logits ``(B, K, M, N)``."""
        import torch.nn.functional as F

        emb = self._require_embedding()
        size = self.model.input_size
        rows, cols = emb.transform.resized_shape
        x = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[..., :rows, :cols]
        return F.interpolate(x, emb.image_shape, mode="bilinear", align_corners=False)

    def predict(
        self,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
    ) -> PromptResult:
        """Segment ONE object from any mix of points and a box.

        Parameters
        ----------
        points : ndarray, shape (P, 2), optional
            (row, col) points.
        point_labels : ndarray, shape (P,), optional
            1 positive, 0 negative (all positive by default).
        box : sequence of 4, optional
            (r0, c0, r1, c1) with exclusive ends.
        mask_input : ndarray, shape (h, w), optional
            Low-resolution logits of an earlier answer, to refine it.
        multimask : bool
            Three candidates (sorted by score, best first) instead of one.
        """
        pts = None if points is None or len(points) == 0 else np.asarray(points, float)[None]
        lab = None
        if pts is not None:
            lab = (np.ones(pts.shape[1]) if point_labels is None else np.asarray(point_labels, float))[None]
        bx = None if box is None else np.asarray(box, float).reshape(1, 4)
        mi = None if mask_input is None else np.asarray(mask_input, np.float32)[None]
        masks, scores, low = self.decode(pts, lab, bx, mi, multimask=multimask)
        order = np.argsort(-scores[0], kind="stable")
        return PromptResult(masks=masks[0][order], scores=scores[0][order], low_res_logits=low[0][order])

    def predict_boxes(self, boxes: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """One object per box, decoded in batches.

        Parameters
        ----------
        boxes : array-like, shape (B, 4)
            (r0, c0, r1, c1) with exclusive ends.

        Returns
        -------
        masks : ndarray of bool, shape (B, M, N)
        scores : ndarray, shape (B,)
        """
        bx = np.asarray(boxes, float).reshape(-1, 4)
        return self._batched(lambda sl: self.decode(boxes_rc=bx[sl]), len(bx), batch_size)

    def predict_points(self, points: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """One object per positive point (``(B, 2)`` (row, col)), decoded in batches.

        SAM's single-point prompt is ambiguous; as SAM's own automatic mode,
        the best of the three candidate masks by predicted IoU is kept.
        """
        pts = np.asarray(points, float).reshape(-1, 1, 2)

        return self._batched(lambda sl: self.decode(points_rc=pts[sl], multimask=True, best=True), len(pts),
                             batch_size)

    def _batched(self, run, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self._require_embedding().image_shape
        masks = np.zeros((n, rows, cols), bool)
        scores = np.zeros(n, np.float32)
        for start in range(0, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            m, s, _ = run(sl)
            masks[sl] = m[:, 0]
            scores[sl] = s[:, 0]
        return masks, scores


def masks_to_labels(masks: np.ndarray, scores: np.ndarray | None = None, start: int = 1,
                    dtype=np.uint32) -> np.ndarray:
    """Paint binary masks ``(K, M, N)`` into one label image, ids ``start, start+1, ...``.

    Where masks overlap, the pixel goes to the mask with the higher score (the
    earlier mask when no scores are given). Empty masks keep their id unused.

    Examples
    --------
    >>> m = np.zeros((2, 3, 3), bool); m[0, :2] = True; m[1, 1:] = True
    >>> masks_to_labels(m, np.array([0.9, 0.5]))
    array([[1, 1, 1],
           [1, 1, 1],
           [2, 2, 2]], dtype=uint32)
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (K, M, N), got {masks.shape}")
    out = np.zeros(masks.shape[1:], dtype)
    order = np.arange(len(masks)) if scores is None else np.argsort(-np.asarray(scores), kind="stable")
    for k in order[::-1]:  # paint worst first so the best ends on top
        out[masks[k]] = start + k
    return out


_FAST_DEFAULT: dict[int, tuple] = {}


def _without_autocast(device_type: str):
    """Autocast switched off for ``device_type`` where it is on (a no-op context elsewhere, so devices without
    autocast support never see an autocast call)."""
    import contextlib

    import torch

    from .models import autocast_dtype

    on = autocast_dtype(device_type) is not None
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def _fast_default_decoder(sam, decoder, image_dtype=None):
    """A :class:`~napari_cellseg.core.fast_decoder.FastMaskDecoder` over ``decoder`` (kept per decoder and image
    dtype), or None where it cannot run it (checked on every call: LoRA wrapped in during fine-tuning makes it
    unsupported)."""
    import weakref
    from types import SimpleNamespace

    from .fast_decoder import FastMaskDecoder, fast_decoder_unsupported

    view = SimpleNamespace(mask_decoder=decoder, prompt_encoder=sam.prompt_encoder)
    if fast_decoder_unsupported(view) is not None:
        return None
    key = (id(decoder), str(image_dtype))
    hit = _FAST_DEFAULT.get(key)
    if hit is not None and hit[0]() is decoder and hit[1].sam.prompt_encoder is sam.prompt_encoder:
        return hit[1]
    if len(_FAST_DEFAULT) >= 4:  # models come and go: keep a few
        _FAST_DEFAULT.clear()
    fast = FastMaskDecoder(view, max_images=1, image_dtype=image_dtype)
    _FAST_DEFAULT[key] = (weakref.ref(decoder), fast)
    return fast


def default_prompt_logits(sam, features, image_dtype=None):
    """Decode SAM's default (empty) prompt on image features: ``(B, 1, h, w)`` logits.

    This is the forward pass of the distance-map models (SAMCell recipe): the
    mask decoder, given no point, box or mask, regresses a map over the whole
    window. Gradients flow (used by fine-tuning as well as inference); where
    none are recorded, the factored :class:`~napari_cellseg.core.fast_decoder.FastMaskDecoder`
    computes the same logits in float32, or with its image tokens in ``image_dtype`` (bfloat16 for a model
    running in bfloat16, ``automatic.distance_decoder_dtype``). A model with its own distance decoder
    (:mod:`~napari_cellseg.core.distance_head`) answers with that one.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
    features : torch.Tensor, shape (B, C, G, G)
    """
    import torch

    from .distance_head import distance_decoder_of

    decoder = distance_decoder_of(sam)
    batch = features.shape[0]
    fast = None if torch.is_grad_enabled() else _fast_default_decoder(sam, decoder, image_dtype)
    if fast is not None:
        # inference: the factored decoder, one mask token upscaled instead of four (2.8x faster on a CPU), in
        # float32 whatever autocast is in force (the image tokens in image_dtype where asked), so in float32 the
        # map is the stock decoder's to float32 rounding
        with _without_autocast(features.device.type):
            sparse, _ = sam.prompt_encoder(points=None, boxes=None, masks=None)
            feats = features.float()
            return torch.cat([fast(feats[b : b + 1], sparse)[0] for b in range(batch)], dim=0)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    outs = []
    for b in range(batch):  # the decoder takes one image embedding per call
        low, _ = decoder(
            image_embeddings=features[b : b + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False,
        )
        outs.append(low)
    return torch.cat(outs, dim=0)


def distance_logits(sam, features, image01, image_dtype=None):
    """Distance-map logits of crops: the default prompt's, refined when the model has a refiner.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
    features : torch.Tensor, shape (B, C, G, G)
        Image embeddings of the crops.
    image01 : torch.Tensor, shape (B, 3, S, S)
        The crops in [0, 1] as the encoder saw them (before its normalisation);
        resized to the logits' grid for the refiner. Unused without a refiner.
    image_dtype : torch.dtype, optional
        Arithmetic of the decoder's image tokens (:func:`default_prompt_logits`).

    Returns
    -------
    torch.Tensor, shape (B, 1, h, w)
    """
    import torch
    import torch.nn.functional as F

    from .distance_head import get_refiner

    logits = default_prompt_logits(sam, features, image_dtype)
    refiner = get_refiner(sam)
    if refiner is None:
        return logits
    size = logits.shape[-2:]
    image = image01.to(device=logits.device, dtype=torch.float32)
    if image.shape[-2:] != size:
        # box filter (SAM's 1024 px input to its 256 px mask grid is an exact factor 4); "area" has
        # kernels on every device and in float32 under autocast, unlike antialiased bilinear resizing
        image = F.interpolate(image, size, mode="area")
    return refiner(image.to(logits.dtype), logits, features.to(logits.dtype))


def clip_boxes(boxes_rc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Order the corners of ``(B, 4)`` boxes and clip them to an image of ``shape``.

    Raises
    ------
    ValueError
        When a box has no area inside the image.

    Examples
    --------
    >>> clip_boxes(np.array([[30, 5, -4, 12]]), (20, 20))
    array([[ 0.,  5., 20., 12.]])
    """
    bx = np.asarray(boxes_rc, dtype=float).reshape(-1, 4)
    rows, cols = shape
    r0 = np.clip(np.minimum(bx[:, 0], bx[:, 2]), 0, rows)
    r1 = np.clip(np.maximum(bx[:, 0], bx[:, 2]), 0, rows)
    c0 = np.clip(np.minimum(bx[:, 1], bx[:, 3]), 0, cols)
    c1 = np.clip(np.maximum(bx[:, 1], bx[:, 3]), 0, cols)
    bad = np.flatnonzero((r1 - r0 <= 0) | (c1 - c0 <= 0))
    if bad.size:
        raise ValueError(
            f"box {bx[bad[0]].tolist()} has no area inside the image of shape ({rows}, {cols}); "
            "boxes are (r0, c0, r1, c1)"
        )
    return np.stack([r0, c0, r1, c1], axis=1)
