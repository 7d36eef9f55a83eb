"""Segment every cell of an image automatically: distance-map, grid and map-guided modes.

Three modes, one shape of API. Each mode is a generator that yields
:class:`~napari_cellseg.core.progress.Progress` records while the network runs
and returns a result object (:class:`DistanceResult`, :class:`GridResult`,
:class:`GuidedResult`) that keeps the expensive intermediate: the stitched
distance map or the candidate masks. ``result.relabel(**thresholds)`` re-applies
new thresholds to that cache without calling the network (milliseconds, for
live sliders). :func:`segment` runs any mode to completion for scripts. One 2D
plane per call; stacks are segmented plane by plane by the callers.

Distance mode (SAMCell, Anderson et al. 2025)
    A distance-map model (``model.meta["output"] == "distance"``) answers SAM's
    default empty prompt with a per-cell normalised distance map (sigmoid of the
    logits). The image is normalised once, cut into 256 px crops with 32 px
    overlap, each crop contrast-equalised (CLAHE), resized to the encoder input
    and embedded (crops are batched through the encoder); the crop maps are
    stitched with a cosine ramp over the overlaps (:func:`stitch_tiles`, one
    array operation per crop) and kept. Cells are the watershed of the map:
    seeds above ``peak`` (0.47), grown inside ``fill`` (0.09)
    (:func:`~napari_cellseg.core.postprocess.labels_from_distance_map`).

Grid mode (CellSeg1, Zhou et al. 2025; SAM's automatic mask generator)
    A ``points_per_side x points_per_side`` grid of single-point prompts
    (32 x 32) is decoded in batches of 4 by
    :class:`~napari_cellseg.core.prompt_decoder.BatchPromptDecoder`, which
    shares the image-side work between prompts and draws a mask only for
    answers above the probability floor (0.5, or the probability threshold if
    lower). Each drawn answer is a candidate cell; the
    decoder's IoU head is read as its cell probability (keep > 0.8), its
    stability score (offset 0.8) must exceed 0.6, masks over 10% of the image
    are dropped, duplicates are removed by two-stage NMS (box overlap, then
    mask IoU > 0.05), overlaps are painted so the smaller mask wins, and pieces
    under 20 pixels are removed (see :mod:`~napari_cellseg.core.postprocess`).
    The image is embedded in one piece when its longer side is at most
    ``max_downscale`` (4) times the model input, otherwise in overlapping crops
    of that size, each with its own grid; candidates of all crops meet in one
    NMS. Candidates are kept at the decoder's resolution and upsampled only when
    they pass the thresholds.

Guided mode (map-guided prompts)
    The distance map's watershed regions become prompts: one positive point at
    each region's peak plus the region's padded box, so SAM draws each cell
    once (tens to hundreds of prompts instead of 1,024). Needs a distance model
    for the map; the drawing is done by ``prompt_model`` (the same model by
    default). Cells SAM does not draw (empty answer, probability below the
    threshold) keep their watershed region when ``fallback`` is on.

Examples
--------
>>> import numpy as np
>>> from napari_cellseg.core.models import random_model
>>> image = np.random.default_rng(0).random((48, 40))
>>> model = random_model("vit_test")
>>> _ = model.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data.add_(1.0)  # confident answers
>>> result = segment(image, model, mode="grid", config=GridConfig(points_per_side=4, max_area_fraction=1.0))
>>> result.labels.shape, len(result.candidates)
((48, 40), 16)
>>> labels = result.relabel(probability=1.5)   # no network call
>>> int(labels.max()), "lower the probability threshold" in result.message
(0, True)
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import postprocess as pp
from .preprocess import (
    INVERTED,
    VIEW_COUNTS,
    as_plane,
    clahe,
    is_constant,
    normalize_image,
    resize_to_model,
    tile_slices,
    unview_tensor,
    view_array,
    view_boxes,
    view_points,
)
from .progress import Progress, prefixed, run_to_completion

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import LoadedModel

MODES = ("distance", "grid", "guided")
#: smallest image side the automatic modes accept
MIN_IMAGE_SIDE = 16
#: grid mode upsamples up to this many candidates while the network runs (later ones on demand)
PRECOMPUTE_LIMIT = 5000
#: range of ``DistanceConfig.scale``, the zoom of the image before the distance model sees it
MIN_SCALE, MAX_SCALE = 0.25, 4.0
#: ``DistanceConfig.scale`` that estimates the zoom from the cells a first pass at zoom 1 finds
#: (:func:`napari_cellseg.core.cell_size.estimate_scale`)
AUTO_SCALE = "auto"
#: the zoom view ``DistanceConfig.small_cell_view`` adds (relative to the chosen zoom) for cells below the model's
#: training median: on the selection and training phase-contrast images whose cells are smaller than the training
#: median (38-48 px against 54), distance AP@0.5 rose 0.50 -> 0.55 (3 images) and 0.43 -> 0.50 (9 images); images
#: of larger cells lost with it (0.86 -> 0.83 on 4), so they do not get it (docs/automatic.md, "Zoom views")
SMALL_CELL_VIEW = 1.25
#: most pixels of a zoomed plane (``DistanceConfig.scale``): about 1.6 GB of image and map in float32
MAX_ZOOMED_PIXELS = 100_000_000

# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


class _Config:
    """JSON round-trip and validation shared by the mode configurations."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict (e.g. parsed JSON); unknown keys are a ValueError."""
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; known: {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            default = getattr(cls(), key)
            if isinstance(default, _Config) and isinstance(value, dict):
                value = type(default).from_dict(value)
            kwargs[key] = value
        obj = cls(**kwargs)
        obj.validate()
        return obj

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def updated(self, **changes):
        """A copy with some settings changed (None values are ignored), validated."""
        obj = replace(self, **{k: v for k, v in changes.items() if v is not None})
        obj.validate()
        return obj

    def validate(self) -> None:  # pragma: no cover - overridden
        pass


def _check_fraction(name: str, value: float, high: float = 1.0) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= high:
        raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}")


def _check_int(name: str, value: int, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class DistanceConfig(_Config):
    """Settings of distance-map mode (SAMCell's defaults).

    Attributes
    ----------
    peak : float
        Cell-peak threshold: regions of the map above it seed cells (0.47).
    fill : float
        Cell-fill threshold: cells grow inside the map above it (0.09).
    min_size : int
        Cells with fewer pixels are removed (0 keeps all).
    fill_holes : bool
        Fill background holes enclosed by a cell.
    smooth : float
        Gaussian smoothing of the stitched map (sigma in image pixels) before
        the watershed; 0 (SAMCell) leaves it as predicted. A model fine-tuned
        on a CPU predicts a grainy map, whose pixel noise seeds many false
        cells; its adapter carries the value tuned with its thresholds.
    crop_size, overlap : int
        Crop side and overlap in image pixels (256 and 32, SAMCell's); each
        crop is resized to the encoder input.
    clahe : bool
        Contrast-limited histogram equalisation of each crop (SAMCell's step).
    batch_size : int or None
        Crops per encoder call; None: 4 on a GPU, 1 on a CPU (on a CPU batching
        gains no speed and multiplies the memory: a ViT-B pass over one crop
        needs about 3 GB).
    embed_window : int or None
        Neighbouring crops are embedded together in windows of up to this
        side (704 px: 3 x 3 crops): the encoder runs once on the window and
        each crop's embedding is cut from its output, so the overlaps are
        embedded once instead of up to four times (a 1024 px image: 1.1
        million pixels through the encoder instead of 1.6 million). Away
        from a crop's border its features equal the crop's own embedding to
        float rounding; at its border the crop sees its real neighbours
        instead of padding. Only for encoders that take any input size
        (TinyViT: LiteMedSAM and the models built on it) with crops at the
        encoder's own scale; others, and 0, embed each crop alone (SAMCell's
        way). Each window is equalised as a whole (CLAHE tiles of
        ``crop_size / 8``, as in a crop). None (the default): 704 where the
        encoder runs in bfloat16 on a CPU, where windows were measured
        1.1-1.25x faster for 0.6 GB more memory; 0 elsewhere (in float32 on
        a CPU they gained 0-1.2x for 1.4 GB more; not measured on a GPU).
    scale : float or "auto"
        Zoom of the image before the model sees it (0.25 to 4; 1, the default,
        leaves it as it is; ``"auto"``: estimated, see below): the map is predicted on the zoomed image and
        resized back, so the labels, ``min_size`` and the measurements stay in
        the image's own pixels. A distance model learns cells of the sizes it
        was trained on and splits much larger ones into pieces of about that
        size, or misses much smaller ones, so the zoom brings the cells to its
        scale (Cellpose's cell diameter plays the same part): below 1 for large
        cells, above 1 for tiny ones. :func:`scale_for_diameter` turns a cell
        diameter into it; the model card gives the sizes of the default
        model's training cells. ``smooth``, ``crop_size`` and ``overlap`` are
        in zoomed pixels, so they keep the meaning the model was tuned with.
        ``"auto"`` maps the image at zoom 1 first, measures the cells found
        there and, when their median diameter lies outside the model's
        training cells' 10th-90th percentiles for the kind of image
        (``meta["cell_diameters"]``), maps it again at the zoom that brings
        them to the median (:func:`napari_cellseg.core.cell_size.estimate_scale`;
        the result's ``size_estimate`` says what was measured and chosen).
    zoom_views : tuple of float
        Test-time augmentation over zoom (empty by default): the image is also
        mapped at ``scale`` times each of these (0.5 to 2, clipped to the
        scale's range) and the maps are averaged, e.g. ``(1.25,)``. Each view
        costs a map of its zoomed pixels (x1.56 at 1.25). With ``"auto"`` the
        views are added to the map at the estimated zoom. Measured with the
        default model in docs/automatic.md, "Zoom views".
    small_cell_view : bool
        With ``scale="auto"`` and no ``zoom_views``: when the cells measured at
        the chosen zoom are smaller than the median of the model's training
        cells of their kind, the map is averaged with a map at
        :data:`SMALL_CELL_VIEW` (1.25) times the zoom (a second map: about
        2.5 times the time). On by default for models that record their
        training cells' sizes (:func:`model_distance_defaults`); the result's
        ``size_estimate.message`` says when it was added.
    """

    peak: float = pp.DEFAULT_PEAK
    fill: float = pp.DEFAULT_FILL
    min_size: int = 0
    fill_holes: bool = False
    smooth: float = 0.0
    crop_size: int = 256
    overlap: int = 32
    clahe: bool = True
    batch_size: int | None = None
    embed_window: int | None = None
    scale: float | str = 1.0
    zoom_views: tuple = ()
    small_cell_view: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.zoom_views, list):  # from JSON
            self.zoom_views = tuple(self.zoom_views)

    def validate(self) -> None:
        pp.check_thresholds(self.peak, self.fill)
        if self.scale != AUTO_SCALE:
            check_scale("scale", self.scale)
        check_zoom_views("zoom_views", self.zoom_views)
        if not (np.isfinite(self.smooth) and 0 <= self.smooth <= 20):
            raise ValueError(f"smooth must be a sigma between 0 and 20 pixels, got {self.smooth}")
        _check_int("min_size", self.min_size, 0)
        _check_int("crop_size", self.crop_size, MIN_IMAGE_SIDE)
        _check_int("overlap", self.overlap, 0)
        if self.embed_window is not None:
            _check_int("embed_window", self.embed_window, 0)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        if self.overlap >= self.crop_size // 2:
            raise ValueError(f"overlap ({self.overlap}) must be less than half the crop size ({self.crop_size})")


@dataclass
class GridConfig(_Config):
    """Settings of grid mode (CellSeg1's defaults).

    Attributes
    ----------
    points_per_side : int
        The point grid of each crop is ``points_per_side`` squared (32).
    probability : float
        Keep candidates whose predicted IoU (cell probability) exceeds this (0.8).
    stability : float
        Keep candidates whose stability score is at least this (0.6).
    stability_offset : float
        Logit offset of the stability score (0.8); fixed when the network runs.
    nms_iou : float
        Two-stage NMS: suppress masks overlapping a better one by more than this IoU (0.05).
    max_area_fraction : float
        Drop masks covering more than this fraction of the image (0.1). Larger
        masks are not kept when the network runs, so ``relabel`` can lower
        this limit but not raise it.
    min_area : int
        Remove connected pieces smaller than this many pixels (20).
    multimask : bool
        Keep SAM's three answers per point as candidates (SAM's automatic mode)
        instead of the single-mask answer (CellSeg1, LiteMedSAM).
    batch_size : int
        Prompts per decoder call (1-4 is fastest on a CPU: every prompt holds
        its own copy of the image tokens, and small batches stay in the cache).
    probability_floor : float
        Masks are drawn (and kept for the sliders) only for answers whose
        probability exceeds this or ``probability``, whichever is lower (0.5).
        Drawing a mask costs about as much as the rest of the decoder, and
        most answers of a grid are far below any useful threshold; lowering
        the probability slider below the floor needs a new run.
    exact_decoder : bool
        Run SAM's mask decoder as written (bit-for-bit the stock decoder,
        about 3x slower) instead of the factored one (equal to float32
        rounding; see :mod:`~napari_cellseg.core.prompt_decoder`).
    max_downscale : float
        The image is embedded whole when its longer side is at most this many
        times the model input; larger images are cut into crops of that size
        (1 embeds every crop at the model's native resolution: slower, better
        for small cells).
    """

    points_per_side: int = 32
    probability: float = 0.8
    stability: float = 0.6
    stability_offset: float = 0.8
    nms_iou: float = pp.DEFAULT_NMS_IOU
    max_area_fraction: float = pp.DEFAULT_MAX_AREA_FRACTION
    min_area: int = pp.DEFAULT_MIN_AREA
    multimask: bool = False
    batch_size: int = 4
    probability_floor: float = 0.5
    exact_decoder: bool = False
    max_downscale: float = 4.0

    @property
    def decode_floor(self) -> float:
        """Answers with a probability at or below this are not drawn: ``min(probability_floor, probability)``."""
        return min(self.probability_floor, self.probability)

    def validate(self) -> None:
        _check_int("points_per_side", self.points_per_side, 1)
        _check_fraction("probability_floor", self.probability_floor, 2.0)
        _check_fraction("probability", self.probability, 2.0)
        _check_fraction("stability", self.stability, 2.0)
        _check_fraction("stability_offset", self.stability_offset, 100.0)
        _check_fraction("nms_iou", self.nms_iou)
        _check_fraction("max_area_fraction", self.max_area_fraction)
        _check_int("min_area", self.min_area, 0)
        _check_int("batch_size", self.batch_size, 1)
        if not self.max_downscale >= 1:
            raise ValueError(f"max_downscale must be >= 1, got {self.max_downscale}")


@dataclass
class GuidedConfig(_Config):
    """Settings of map-guided mode.

    Attributes
    ----------
    distance : DistanceConfig
        How the map is predicted and cut into regions (peak, fill, min_size, crops).
    probability : float
        SAM's answer for a cell is used when its predicted IoU reaches this (0: always).
    fallback : bool
        Cells whose answer is rejected, empty or smaller than ``min_size`` keep
        their watershed region.
    use_boxes : bool
        Prompt with each region's padded box.
    use_points : bool
        Prompt with each region's peak point as well (without boxes the point
        is always used).
    mask_threshold : float
        Logit threshold of SAM's masks (lower: larger masks). Measured with
        ``cellseg`` on held-out images (docs/automatic.md): neither dropping
        the point nor the annotation mode's -2 helps on every kind, so the
        defaults stay SAM's.
    box_margin : float
        Boxes grow by this fraction of their size on each side; SAM's mask of a
        cell is clipped to its box.
    min_size : int
        Remove pieces smaller than this many pixels from the result.
    batch_size, max_downscale
        As in :class:`GridConfig`.
    views : int
        Orientations of each crop whose mask logits SAM averages (1, 2, 4 or
        8; the annotation mode's test-time augmentation, see
        ``AnnotationConfig.views``). Each costs one more encoder pass per crop.
        The distance map itself is predicted once.
    invert : bool
        Also embed each crop (in each orientation) with its intensities
        inverted and average the mask logits (the annotation mode's
        ``AnnotationConfig.invert``); doubles the encoder passes of the drawing.
    """

    distance: DistanceConfig = field(default_factory=DistanceConfig)
    probability: float = 0.0
    fallback: bool = True
    use_boxes: bool = True
    use_points: bool = True
    mask_threshold: float = 0.0
    box_margin: float = 0.1
    min_size: int = pp.DEFAULT_MIN_AREA
    batch_size: int = 4
    max_downscale: float = 4.0
    views: int = 1
    invert: bool = False

    def validate(self) -> None:
        self.distance.validate()
        if self.views not in VIEW_COUNTS:
            raise ValueError(f"views must be one of {', '.join(map(str, VIEW_COUNTS))}, got {self.views!r}")
        if self.invert not in (True, False):
            raise ValueError(f"invert must be True or False, got {self.invert!r}")
        _check_fraction("probability", self.probability, 2.0)
        _check_fraction("box_margin", self.box_margin, 10.0)
        _check_int("min_size", self.min_size, 0)
        _check_int("batch_size", self.batch_size, 1)
        if not self.max_downscale >= 1:
            raise ValueError(f"max_downscale must be >= 1, got {self.max_downscale}")


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def is_distance_model(model: LoadedModel) -> bool:
    """True when the model's decoder regresses a distance map (``meta["output"] == "distance"``)."""
    return (getattr(model, "meta", None) or {}).get("output") == "distance"


def as_distance_model(model: LoadedModel, thresholds: dict | None = None) -> LoadedModel:
    """A copy of a loaded model marked as a distance-map model (sharing the network).

    Use it for checkpoints that carry no metadata, such as SAMCell's release.

    Parameters
    ----------
    thresholds : dict, optional
        Default ``{"peak": .., "fill": ..}`` for this model.
    """
    meta = {**(model.meta or {}), "output": "distance"}
    if thresholds:
        meta["thresholds"] = {**meta.get("thresholds", {}), **thresholds}
    return replace(model, meta=meta)


def default_mode(model: LoadedModel) -> str:
    """``"distance"`` for distance-map models, ``"grid"`` otherwise."""
    return "distance" if is_distance_model(model) else "grid"


def model_thresholds(model: LoadedModel) -> dict[str, float]:
    """The model's default distance-map thresholds (``meta["thresholds"]``), possibly empty."""
    th = (getattr(model, "meta", None) or {}).get("thresholds") or {}
    return {k: float(v) for k, v in th.items() if k in ("peak", "fill")}


def model_distance_defaults(model: LoadedModel) -> dict:
    """:class:`DistanceConfig` defaults a distance model carries: its thresholds and training crop size, and
    ``scale="auto"`` when it records its training cells' sizes (``meta["cell_diameters"]``: the packaged model
    and fine-tuned ones)."""
    from .cell_size import model_cell_sizes

    out: dict = dict(model_thresholds(model))
    if is_distance_model(model) and model_cell_sizes(getattr(model, "meta", None)):
        out["scale"] = AUTO_SCALE
        out["small_cell_view"] = True
    smooth = ((getattr(model, "meta", None) or {}).get("thresholds") or {}).get("smooth")
    if smooth is not None:
        out["smooth"] = float(smooth)
    crop = (getattr(model, "meta", None) or {}).get("crop_size")
    if is_distance_model(model) and isinstance(crop, (int, np.integer)) and crop >= MIN_IMAGE_SIDE:
        out["crop_size"] = int(crop)
        out["overlap"] = min(32, int(crop) // 8)
    return out


def require_distance_model(model: LoadedModel, mode: str = "distance") -> None:
    """Raise a ValueError that says what to do when ``model`` is not a distance model."""
    if not is_distance_model(model):
        name = getattr(model, "name", "this model")
        raise ValueError(
            f"{mode} mode needs a distance-map model, and {name!r} is not one (it was not trained to "
            "output a distance map). Fine-tune one with the distance recipe, or use grid mode. If the "
            "checkpoint is a SAMCell model, mark it as one (--output distance on the command line, the "
            "'distance-map model' box in the widget, or as_distance_model() in Python)"
        )


# ---------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------


def prepare_image(image: np.ndarray, channel: int | None = None) -> tuple[np.ndarray, str]:
    """Check and normalise one 2D plane: returns ``(image01, message)``.

    ``image01`` is float32 ``(M, N, 3)`` in [0, 1]; ``message`` is empty, or
    says why there is nothing to segment (a constant or all-NaN image).

    Raises
    ------
    ValueError, TypeError
        For stacks, unknown channel layouts, non-numeric data and images
        smaller than :data:`MIN_IMAGE_SIDE` pixels.
    """
    plane = as_plane(image, channel)
    if min(plane.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image of shape {plane.shape[:2]} is too small for automatic segmentation: it needs at "
            f"least {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} pixels"
        )
    image01 = normalize_image(image, channel=channel)
    if is_constant(image01):
        what = "has no finite pixel" if not np.isfinite(plane).any() else "is constant (no contrast)"
        return image01, f"the image {what}: nothing to segment"
    return image01, ""


def _model_crops(shape: tuple[int, int], input_size: int, max_downscale: float) -> list[tuple[slice, slice]]:
    """Windows in which an image is embedded: whole, or crops of ``input_size * max_downscale``."""
    side = int(round(input_size * max_downscale))
    if max(shape) <= side:
        return [(slice(0, shape[0]), slice(0, shape[1]))]
    return tile_slices(shape, side, side // 4)


# ---------------------------------------------------------------------------
# distance maps
# ---------------------------------------------------------------------------


def ramp_profile(length: int, overlap: int) -> np.ndarray:
    """1D blending weight of a tile: a cosine ramp over ``overlap`` pixels at both ends.

    Never zero, so pixels covered by one tile only keep that tile's value.

    Examples
    --------
    >>> w = ramp_profile(8, 2)
    >>> bool(w.min() > 0), float(w[3]), bool(np.allclose(w, w[::-1]))
    (True, 1.0, True)
    """
    i = np.arange(length, dtype=np.float64) + 0.5
    if overlap <= 0:
        return np.ones(length, np.float32)
    t = np.minimum(1.0, np.minimum(i, length - i) / overlap)
    return (np.sin(0.5 * np.pi * t) ** 2).astype(np.float32)


def stitch_tiles(tiles, slices, shape: tuple[int, int], overlap: int) -> np.ndarray:
    """Blend overlapping tile maps into one map (weighted by :func:`ramp_profile`).

    Parameters
    ----------
    tiles : sequence of ndarray, each (h, w)
        Maps of the windows ``slices`` (one per slice).
    slices : sequence of (slice, slice)
    shape : (M, N)
    overlap : int
        Length of the blending ramps.

    Returns
    -------
    ndarray of float32, shape (M, N)
        The weighted mean of the tiles covering each pixel (exact for any
        map the tiles agree on, e.g. a constant).

    Examples
    --------
    >>> from napari_cellseg.core.preprocess import tile_slices
    >>> sl = tile_slices((10, 13), 8, 3)
    >>> out = stitch_tiles([np.full((8, 8), 0.3)] * len(sl), sl, (10, 13), 3)
    >>> bool(np.allclose(out, 0.3))
    True
    """
    acc = np.zeros(shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    for tile, (rs, cs) in zip(tiles, slices):
        tile = np.asarray(tile, np.float32)
        w = ramp_profile(tile.shape[0], overlap)[:, None] * ramp_profile(tile.shape[1], overlap)[None, :]
        acc[rs, cs] += w * tile
        wsum[rs, cs] += w
    if (wsum <= 0).any():
        raise ValueError("the tiles do not cover the whole image")
    return acc / wsum


def _clahe(image01: np.ndarray, tile: int | None = None) -> np.ndarray:
    """CLAHE of a crop (contextual tiles of 1/8 of its sides) or of a window (tiles of ``tile`` px);
    colour images are equalised channel by channel."""
    if np.array_equal(image01[..., 0], image01[..., 1]) and np.array_equal(image01[..., 0], image01[..., 2]):
        return clahe(image01, kernel_size=tile)
    return np.stack([clahe(np.repeat(image01[..., i : i + 1], 3, axis=-1), kernel_size=tile)[..., 0]
                     for i in range(3)], axis=-1)


def _encoder_input(sam, tensor):
    return (tensor * 255.0 - sam.pixel_mean) / sam.pixel_std


#: whether the distance map's decoder keeps its image tokens in bfloat16 for a model running in bfloat16
#: (:func:`distance_decoder_dtype`); False keeps it in float32 whatever the precision (for comparisons)
DISTANCE_DECODER_FOLLOWS_PRECISION = True


def distance_decoder_dtype(model: LoadedModel):
    """Arithmetic of the distance map decoder's image tokens for ``model``: bfloat16 when the model runs in
    bfloat16 (``LoadedModel.precision``) and :data:`DISTANCE_DECODER_FOLLOWS_PRECISION`, else None (float32; see
    :class:`~napari_cellseg.core.fast_decoder.FastMaskDecoder`)."""
    import torch

    low = DISTANCE_DECODER_FOLLOWS_PRECISION and getattr(model, "precision", "float32") == "bfloat16"
    return torch.bfloat16 if low else None


def crop_distance_maps(model: LoadedModel, crops01: list[np.ndarray]) -> list[np.ndarray]:
    """Distance maps (sigmoid of the default-prompt logits) of square crops, one encoder call.

    Parameters
    ----------
    crops01 : list of ndarray, each (c, c, 3) float in [0, 1]
        Crops of one size; each is resized to the encoder input.

    Returns
    -------
    list of ndarray, each (c, c) float32 in [0, 1]
    """
    import torch
    import torch.nn.functional as F

    from .distance_head import distance_features
    from .predictor import distance_logits

    sam = model.sam
    size = model.input_size
    tensors = []
    transform = None
    for crop in crops01:
        t, transform = resize_to_model(crop, size)
        tensors.append(t)
    x = torch.cat(tensors).to(model.device)
    with torch.inference_mode():
        with model.encoder_autocast():  # the encoder and the refiner in the model's precision; the decoder float32
            features = distance_features(sam, _encoder_input(sam, x)).float()
            logits = distance_logits(sam, features, x, distance_decoder_dtype(model)).float()
        h = logits.shape[-1]
        rows, cols = transform.resized_shape
        crop_shape = tuple(transform.original_shape)
        if rows == cols == size and crop_shape == (h, h):
            lr = logits  # the decoder grid falls on the crop's pixels (SAMCell: 256 px crops)
        else:
            lr = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)[..., :rows, :cols]
            lr = F.interpolate(lr, crop_shape, mode="bilinear", align_corners=False)
        maps = torch.sigmoid(lr)[:, 0].cpu().numpy()
    return [m.astype(np.float32) for m in maps]


#: side of the windows in which crops are embedded together where that is the default (DistanceConfig.embed_window)
EMBED_WINDOW = 704

def window_stride(model: LoadedModel, crop_size: int) -> int | None:
    """Input pixels per embedding cell of the distance path's encoder when crops can share window
    embeddings (crops cut from a window's embedding start at multiples of it), else None.

    Windows need a TinyViT encoder (windowed attention and convolutions: any
    input side works) and crops at its own scale (``crop_size`` equal to the
    encoder input, so no crop is resized).
    """
    from .distance_head import get_distance_encoder
    from .tinyvit import TinyViTEncoder

    encoder = get_distance_encoder(model.sam) or model.sam.image_encoder
    if not isinstance(encoder, TinyViTEncoder) or int(crop_size) != int(model.input_size):
        return None
    return int(encoder.img_size) // int(encoder.out_grid)


def default_embed_window(model: LoadedModel) -> int:
    """:data:`EMBED_WINDOW` where the encoder runs in bfloat16 on a CPU, else 0 (see ``DistanceConfig.embed_window``)."""
    cpu = str(getattr(model, "device", "cpu")) == "cpu"
    return EMBED_WINDOW if cpu and getattr(model, "precision", "float32") == "bfloat16" else 0


def group_starts(starts: list[int], tile: int, max_side: int) -> list[list[int]]:
    """Consecutive tile starts grouped so that each group's tiles span at most ``max_side``.

    Examples
    --------
    >>> group_starts([0, 224, 448, 672, 768], 256, 704)
    [[0, 224, 448], [672, 768]]
    >>> group_starts([0, 224], 256, 100)
    [[0], [224]]
    """
    groups: list[list[int]] = []
    for s in starts:
        if groups and s + tile - groups[-1][0] <= max_side:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def window_distance_maps(model: LoadedModel, window01: np.ndarray, offsets: list[tuple[int, int]],
                         crop: int, stride: int) -> list[np.ndarray]:
    """Distance maps of the ``crop`` px crops at ``offsets`` of one window, from one encoder call.

    Parameters
    ----------
    window01 : ndarray, (H, W, 3) float in [0, 1]
        The window as the encoder sees it (equalised already); H and W and
        the offsets are multiples of ``stride``.
    offsets : list of (row, col)
    stride : int
        Input pixels per embedding cell (:func:`window_stride`).

    Returns
    -------
    list of ndarray, each (crop, crop) float32 in [0, 1]
    """
    import torch

    from .distance_head import distance_features
    from .predictor import distance_logits

    sam = model.sam
    g = crop // stride
    x = torch.from_numpy(np.ascontiguousarray(window01.transpose(2, 0, 1)))[None].to(model.device)
    with torch.inference_mode():
        with model.encoder_autocast():  # as in crop_distance_maps
            features = distance_features(sam, _encoder_input(sam, x)).float()
            cuts = torch.cat([features[..., r // stride : r // stride + g, c // stride : c // stride + g]
                              for r, c in offsets])
            pixels = torch.cat([x[..., r : r + crop, c : c + crop] for r, c in offsets])
            logits = distance_logits(sam, cuts.contiguous(), pixels, distance_decoder_dtype(model)).float()
        if logits.shape[-2:] != (crop, crop):  # pragma: no cover - TinyViT's mask grid is the input grid
            import torch.nn.functional as F

            logits = F.interpolate(logits, (crop, crop), mode="bilinear", align_corners=False)
        maps = torch.sigmoid(logits)[:, 0].cpu().numpy()
    return [m.astype(np.float32) for m in maps]


def check_scale(name: str, value) -> None:
    """Raise a ValueError unless ``value`` is a zoom in [:data:`MIN_SCALE`, :data:`MAX_SCALE`]."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and np.isfinite(value) and MIN_SCALE <= value <= MAX_SCALE):
        raise ValueError(f"{name} must be a zoom between {MIN_SCALE:g} and {MAX_SCALE:g}, got {value!r}")


def check_zoom_views(name: str, value) -> None:
    """Raise a ValueError unless ``value`` is a tuple or list of relative zooms in [0.5, 2]
    (``DistanceConfig.zoom_views``, ``AnnotationConfig.map_zoom_views``)."""
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(z, (int, float)) and not isinstance(z, bool) and np.isfinite(z) and 0.5 <= z <= 2
            for z in value):
        raise ValueError(f"{name} must be zooms between 0.5 and 2 relative to the scale, e.g. (1.25,); "
                         f"got {value!r}")


def zoomed_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Shape of a plane of ``shape`` zoomed by ``scale`` (at least :data:`MIN_IMAGE_SIDE` on each side).

    Raises
    ------
    ValueError
        When the zoomed plane would exceed :data:`MAX_ZOOMED_PIXELS`.
    """
    out = tuple(max(MIN_IMAGE_SIDE, int(round(s * scale))) for s in shape[:2])
    if out[0] * out[1] > MAX_ZOOMED_PIXELS:
        raise ValueError(
            f"a scale of {scale:g} makes this {shape[0]} x {shape[1]} image {out[0]} x {out[1]} pixels, more than "
            f"the {MAX_ZOOMED_PIXELS / 1e6:.0f} million the distance map handles: lower the scale, or segment a "
            "crop of the image"
        )
    return out


def zoom_plane(image01: np.ndarray, scale: float) -> np.ndarray:
    """Zoom a normalised ``(M, N, 3)`` plane by ``scale`` (bilinear; anti-aliased when shrinking)."""
    from skimage.transform import resize

    shape = zoomed_shape(image01.shape[:2], scale)
    out = resize(image01.astype(np.float32, copy=False), shape + image01.shape[2:], order=1, mode="symmetric",
                 anti_aliasing=scale < 1, preserve_range=True)  # float32 in, float32 out
    return np.clip(out, 0.0, 1.0, out=out)


def resize_map(dmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A distance map resized (bilinear, anti-aliased when shrinking) to ``shape``, float32 in [0, 1]."""
    from skimage.transform import resize

    if dmap.shape == tuple(shape):
        return dmap
    shrink = dmap.shape[0] > shape[0] or dmap.shape[1] > shape[1]
    out = resize(dmap.astype(np.float32, copy=False), shape, order=1, mode="symmetric", anti_aliasing=shrink,
                 preserve_range=True)  # float32 in, float32 out
    return np.clip(out, 0.0, 1.0, out=out)


def scale_for_diameter(diameter: float, model_diameter: float) -> float:
    """The ``DistanceConfig.scale`` that brings cells ``diameter`` pixels across to ``model_diameter``
    (clipped to the scale's range).

    >>> scale_for_diameter(80, 40)
    0.5
    """
    if not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"the cell diameter must be a positive number of pixels, got {diameter!r}")
    return float(np.clip(model_diameter / diameter, MIN_SCALE, MAX_SCALE))


def predict_distance_map(
    image: np.ndarray,
    model: LoadedModel,
    config: DistanceConfig | None = None,
    channel: int | None = None,
    image01: np.ndarray | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Predict and stitch the distance map of one plane (generator; returns ``(M, N)`` float32).

    With ``config.scale`` other than 1 the plane is zoomed first (:func:`zoom_plane`) and the map resized
    back to the plane's shape. The image is padded (mirrored) to at least one crop on each side, so every
    crop has the same size and scale. With window embeddings
    (``config.embed_window``) it is also padded to a multiple of the encoder's
    stride, and the crops are embedded window by window.
    """
    cfg = config or DistanceConfig()
    cfg.validate()
    require_distance_model(model)
    if cfg.scale == AUTO_SCALE:
        raise ValueError("predict_distance_map needs a numeric scale: use distance_map_at_scale for "
                         "scale='auto'")
    if image01 is None:
        image01, _ = prepare_image(image, channel)
    m, n = image01.shape[:2]
    if cfg.zoom_views:
        plain = replace(cfg, zoom_views=())
        dmap = yield from predict_distance_map(None, model, plain, image01=image01)
        return (yield from _add_zoom_views(dmap, image01, model, plain, cfg.zoom_views))
    if cfg.scale != 1:
        zoomed = zoom_plane(image01, cfg.scale)
        dmap = yield from predict_distance_map(None, model, cfg.updated(scale=1.0), image01=zoomed)
        return resize_map(dmap, (m, n))
    c = cfg.crop_size
    window_side = default_embed_window(model) if cfg.embed_window is None else cfg.embed_window
    stride = window_stride(model, c) if window_side >= c else None
    windowed = stride is not None
    step = stride if windowed else 1
    pad = ((0, max(c, -(-m // step) * step) - m), (0, max(c, -(-n // step) * step) - n), (0, 0))
    padded = np.pad(image01, pad, mode="symmetric") if (pad[0][1] or pad[1][1]) else image01
    slices = tile_slices(padded.shape[:2], c, cfg.overlap)
    total = len(slices)
    tiles: list[np.ndarray] = []
    yield Progress(0, total, f"distance map: {total} crops")
    if windowed:
        if cfg.clahe:
            padded = _clahe(padded, c // 8)
        row_groups = group_starts(sorted({sl[0].start for sl in slices}), c, window_side)
        col_groups = group_starts(sorted({sl[1].start for sl in slices}), c, window_side)
        by_start: dict[tuple[int, int], np.ndarray] = {}
        for rows in row_groups:
            for cols in col_groups:
                r0, c0 = rows[0], cols[0]
                offsets = [(r - r0, q - c0) for r in rows for q in cols]
                maps = window_distance_maps(model, padded[r0 : rows[-1] + c, c0 : cols[-1] + c], offsets, c,
                                            stride)
                for (r, q), tile in zip(offsets, maps):
                    by_start[(r + r0, q + c0)] = tile
                yield Progress(len(by_start), total, f"distance map: crop {len(by_start)}/{total}")
        tiles = [by_start[(sl[0].start, sl[1].start)] for sl in slices]
    else:
        batch_size = cfg.batch_size or (1 if str(model.device) == "cpu" else 4)
        for start in range(0, total, batch_size):
            batch = slices[start : start + batch_size]
            crops = [padded[sl] for sl in batch]
            if cfg.clahe:
                crops = [_clahe(crop) for crop in crops]
            tiles.extend(crop_distance_maps(model, crops))
            yield Progress(min(total, start + len(batch)), total, f"distance map: crop {len(tiles)}/{total}")
    dmap = stitch_tiles(tiles, slices, padded.shape[:2], cfg.overlap)
    if cfg.smooth > 0:
        from scipy import ndimage as ndi

        dmap = ndi.gaussian_filter(dmap, cfg.smooth, mode="reflect")
    return np.ascontiguousarray(dmap[:m, :n])


# ---------------------------------------------------------------------------
# decoding prompts
# ---------------------------------------------------------------------------


#: whether the batch prompt decoder follows a bfloat16 model precision (:func:`prompt_dtype`); False keeps it in
#: float32 whatever the precision (for comparisons in benchmarks)
PROMPTS_FOLLOW_PRECISION = True


def largest_scale(shape: tuple[int, int]) -> float:
    """The largest zoom (at most :data:`MAX_SCALE`) that keeps a plane of ``shape`` within
    :data:`MAX_ZOOMED_PIXELS`."""
    fit = float(np.sqrt(MAX_ZOOMED_PIXELS / max(1, shape[0] * shape[1])))
    return float(max(MIN_SCALE, min(MAX_SCALE, np.floor(fit * 100) / 100)))


def _add_zoom_views(dmap: np.ndarray, image01: np.ndarray, model: LoadedModel, config: DistanceConfig,
                    zooms) -> Generator[Progress, None, np.ndarray]:
    """``dmap`` (the map at ``config.scale``) averaged with the maps at ``config.scale`` times each of ``zooms``."""
    total = dmap.astype(np.float32, copy=True)
    top = largest_scale(image01.shape[:2])
    for i, z in enumerate(zooms, start=1):
        s = float(np.clip(round(float(config.scale) * float(z), 3), MIN_SCALE, top))
        total += yield from prefixed(predict_distance_map(None, model, config.updated(scale=s), image01=image01),
                                     f"zoom view {i}/{len(zooms)} (zoom {s:g}): ")
    return total / (1 + len(zooms))


def distance_map_at_scale(
    image: np.ndarray | None,
    model: LoadedModel,
    config: DistanceConfig,
    channel: int | None = None,
    image01: np.ndarray | None = None,
) -> Generator[Progress, None, tuple[np.ndarray, Any]]:
    """The distance map at ``config.scale``, estimating it first when it is ``"auto"`` (generator).

    Returns ``(map, estimate)``: ``estimate`` is None for a numeric scale, else the
    :class:`~napari_cellseg.core.cell_size.SizeEstimate` of the zoom the map was made at. ``"auto"`` maps the
    image at zoom 1, segments the map with the config's thresholds and measures the cells
    (:func:`~napari_cellseg.core.cell_size.estimate_scale`); while they lie outside the model's training
    sizes it maps the image again at the zoom they ask for and measures again, up to
    :data:`~napari_cellseg.core.cell_size.MAX_PASSES` maps, and stops when a measurement asks for the zoom
    it was made at (within 10 %). Cells within the training sizes at zoom 1 cost no second map.
    """
    if config.scale != AUTO_SCALE:
        return (yield from predict_distance_map(image, model, config, channel, image01=image01)), None
    from . import cell_size

    if image01 is None:
        image01, _ = prepare_image(image, channel)
    sizes = cell_size.model_cell_sizes(model.meta)
    top = largest_scale(image01.shape[:2])
    views, config = tuple(config.zoom_views), replace(config, zoom_views=())  # the views: on the last map only
    scale, estimate, prefix = 1.0, None, ""
    for k in range(cell_size.MAX_PASSES):
        # the passes after the first say which zoom they map at
        dmap = yield from prefixed(predict_distance_map(None, model, config.updated(scale=scale), image01=image01),
                                   prefix)
        labels = pp.labels_from_distance_map(dmap, peak=config.peak, fill=config.fill, min_size=config.min_size,
                                             fill_holes=config.fill_holes)
        estimate = cell_size.estimate_scale(labels, image01, sizes, MIN_SCALE, top, scale,
                                            estimate.passes if estimate else None)
        settled = abs(math.log(estimate.scale / scale)) < math.log(1.1)  # within 10 %: this map is the answer
        if settled or k == cell_size.MAX_PASSES - 1:
            break
        scale = estimate.scale
        prefix = f"{estimate.message} - "
    note = "" if settled else f" (measured there, they would need zoom {estimate.scale:g}: set it by hand)"
    estimate.message = re.sub(r"^zoom [0-9.]+", f"zoom {scale:g}", estimate.message) + note
    estimate.scale = scale
    if not views and config.small_cell_view and estimate.reference and estimate.diameter is not None and (
            estimate.cells >= cell_size.MIN_CELLS_TO_MEASURE
            and estimate.diameter * scale < estimate.reference["median"]):
        views = (SMALL_CELL_VIEW,)  # cells below the training median: a view zoomed further in
        estimate.message += (f"; cells below the training median ({estimate.reference['median']:.0f} px): "
                             f"also mapped at zoom {min(scale * SMALL_CELL_VIEW, top):g} and averaged")
    if views:
        dmap = yield from _add_zoom_views(dmap, image01, model, config.updated(scale=scale), views)
    return dmap, estimate


def prompt_dtype(model: LoadedModel):
    """Arithmetic of the batch prompt decoder's per-prompt image tokens for ``model``: bfloat16 when the model
    runs in bfloat16 (``LoadedModel.precision``) and :data:`PROMPTS_FOLLOW_PRECISION`, else float32 (see
    :class:`~napari_cellseg.core.prompt_decoder.BatchPromptDecoder`)."""
    import torch

    low = PROMPTS_FOLLOW_PRECISION and getattr(model, "precision", "float32") == "bfloat16"
    return torch.bfloat16 if low else torch.float32


def decode_prompts(
    model: LoadedModel,
    features,
    transform,
    points_rc: np.ndarray | None = None,
    boxes_rc: np.ndarray | None = None,
    multimask: bool = False,
    batch_size: int = 4,
    min_score: float | None = None,
    exact: bool = False,
    score_log: list | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode one positive point (and/or one box) per object, in batches, at decoder resolution.

    Uses :class:`~napari_cellseg.core.prompt_decoder.BatchPromptDecoder`: the
    image-side work shared by all prompts is done once, and masks are drawn
    only for answers whose predicted IoU exceeds ``min_score``.

    Parameters
    ----------
    features : torch.Tensor, shape (1, C, G, G)
        Image embedding of the crop.
    transform : ResizeTransform
        How the crop was resized into the model input.
    points_rc : ndarray, shape (K, 2), optional
        One (row, col) point per object, crop coordinates.
    boxes_rc : ndarray, shape (K, 4), optional
        One (r0, c0, r1, c1) box per object, crop coordinates.
    min_score : float, optional
        Only prompts with an answer whose predicted IoU exceeds this are
        returned (None: every prompt).
    exact : bool
        Run SAM's transformer as written (bit-for-bit the stock decoder)
        instead of the factored one (equal to float32 rounding). Otherwise
        the factored decoder runs in the model's precision (:func:`prompt_dtype`).
    score_log : list, optional
        Receives the predicted IoUs of every batch, kept or not, ``(B, K)``.

    Yields
    ------
    One record per batch of ``batch_size`` prompts (possibly with no object):

    index : ndarray of int, shape (B,)
        Which objects this batch answers (those passing ``min_score``).
    logits : ndarray of float32, shape (B, K, h, w)
        Low-resolution logits over the model input (K = 3 with ``multimask``, else 1).
    scores : ndarray of float32, shape (B, K)
        Predicted IoU.
    """
    import torch

    from .prompt_decoder import BatchPromptDecoder

    sam = model.sam
    n = len(points_rc) if points_rc is not None else len(boxes_rc)
    dev = features.device
    xy = None if points_rc is None else transform.rc_to_model_xy(np.asarray(points_rc, float).reshape(-1, 2))
    xyxy = None if boxes_rc is None else transform.box_rc_to_model_xyxy(np.asarray(boxes_rc, float).reshape(-1, 4))
    decoder = None
    for s in range(0, n, batch_size):
        # inference mode per batch, not around the yield: a context held across a yield leaks into the caller,
        # and generators interleaved (guided mode's orientations) would restore it out of order
        with torch.inference_mode():
            idx = np.arange(s, min(n, s + batch_size))
            pts = None
            if xy is not None:
                pts = (torch.as_tensor(xy[idx][:, None], dtype=torch.float32, device=dev),
                       torch.ones((len(idx), 1), dtype=torch.int64, device=dev))
            bxs = None if xyxy is None else torch.as_tensor(xyxy[idx], dtype=torch.float32, device=dev)
            sparse, dense = sam.prompt_encoder(points=pts, boxes=bxs, masks=None)
            if decoder is None:
                decoder = BatchPromptDecoder(sam, features, dense, exact=exact, dtype=prompt_dtype(model))
            out = decoder(sparse, multimask=multimask, min_score=min_score)
            kept = out.kept.cpu().numpy()
            if score_log is not None:
                score_log.append(out.scores.float().cpu().numpy())
            record = idx[kept], out.logits.float().cpu().numpy(), out.scores[out.kept].float().cpu().numpy()
        yield record


# ---------------------------------------------------------------------------
# candidate masks
# ---------------------------------------------------------------------------


def _interp_matrix(n_out: int, start: float, step: float, n_in: int) -> np.ndarray:
    """Bilinear weights ``(n_out, n_in)``: output pixel ``p`` samples input index ``(p + 0.5 - start) / step - 0.5``."""
    u = (np.arange(n_out) + 0.5 - start) / step - 0.5
    i0 = np.floor(u).astype(int)
    f = (u - i0).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, np.clip(i0, 0, n_in - 1)), 1 - f)
    np.add.at(w, (rows, np.clip(i0 + 1, 0, n_in - 1)), f)
    return w


class MaskCandidates:
    """Candidate masks from the decoder, kept at decoder resolution and upsampled on demand.

    Each candidate keeps its logits over its bounding box (plus one pixel) at
    the decoder's resolution as float16, its predicted IoU, stability score,
    estimated area, prompt and placement in the image. :meth:`full_mask`
    upsamples one candidate to image resolution (bilinear, as SAM does) and
    remembers the answer, so threshold changes only upsample candidates that
    were never needed before.

    Parameters
    ----------
    image_shape : (M, N)
    """

    def __init__(self, image_shape: tuple[int, int], mask_threshold: float = 0.0) -> None:
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        #: logit threshold of the masks (SAM's 0 unless the prompt model has its own, see guided mode)
        self.mask_threshold = float(mask_threshold)
        self._scores: list[np.ndarray] = []
        self._stability: list[np.ndarray] = []
        self._areas: list[np.ndarray] = []
        self._points: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []
        # per candidate: lr_r0, lr_c0 (index of logits[0, 0] in the crop's decoder grid),
        # crop r0, c0, r1, c1 (image px), step_r, step_c (image px per decoder px), clip box
        self._geom: list[np.ndarray] = []
        self._cache: dict[int, pp.CropMask] = {}
        self.n_prompts = 0
        #: highest predicted IoU of any answer, drawn or not (None when unknown)
        self.best_score: float | None = None
        self._frozen: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(sum(len(s) for s in self._scores))

    def _array(self, name: str) -> np.ndarray:
        if self._frozen is None:
            self._frozen = {}
        if name not in self._frozen:
            parts = getattr(self, f"_{name}")
            width = {"points": 2, "geom": 12}.get(name)
            if parts:
                self._frozen[name] = np.concatenate(parts)
            else:
                self._frozen[name] = np.zeros((0, width) if width else (0,))
        return self._frozen[name]

    @property
    def scores(self) -> np.ndarray:
        """Predicted IoU (cell probability) of each candidate, shape (K,)."""
        return self._array("scores")

    @property
    def stability(self) -> np.ndarray:
        """Stability score of each candidate, shape (K,)."""
        return self._array("stability")

    @property
    def areas(self) -> np.ndarray:
        """Area in image pixels, estimated at decoder resolution, shape (K,)."""
        return self._array("areas")

    @property
    def points(self) -> np.ndarray:
        """The (row, col) point prompt of each candidate, shape (K, 2)."""
        return self._array("points")

    @property
    def ids(self) -> np.ndarray:
        """Which prompt (object) each candidate answers, shape (K,)."""
        return self._array("ids")

    def add(
        self,
        logits: np.ndarray,
        scores: np.ndarray,
        *,
        crop: tuple[slice, slice],
        transform,
        points: np.ndarray,
        ids: np.ndarray,
        stability_offset: float = 0.8,
        max_area: float | None = None,
        keep_empty: bool = False,
        clip_boxes: np.ndarray | None = None,
        image_shape: tuple[int, int] | None = None,
        min_score: float | None = None,
    ) -> int:
        """Add a decoded batch; returns how many candidates were kept.

        Parameters
        ----------
        logits : ndarray, shape (B, K, h, w)
            Decoder logits over the whole (square) model input.
        scores : ndarray, shape (B, K)
        crop : (slice, slice)
            Image window that was embedded.
        transform : ResizeTransform
            How that window was resized into the model input.
        points : ndarray, shape (B, 2)
            Image (row, col) of each prompt.
        ids : ndarray, shape (B,)
            Object id of each prompt.
        max_area : float, optional
            Candidates larger than this many image pixels are not kept.
        keep_empty : bool
            Keep empty answers (guided mode falls back for them).
        clip_boxes : ndarray, shape (B, 4), optional
            Image boxes that each object's mask is clipped to.
        image_shape : (M, N), optional
            Give it when the image was cut into crops: masks that touch an
            edge of the crop inside the image are cut off there and are not
            kept (the neighbouring crop sees the whole cell), as in SAM's
            automatic mode.
        min_score : float, optional
            Candidates whose predicted IoU is at or below this are not kept.
        """
        logits = np.asarray(logits, np.float32)
        b, k, h, w = logits.shape
        self.n_prompts += b
        # decoder pixels per model-input pixel, then image pixels per decoder pixel on each axis
        lr_per_model = h / transform.target
        rows_rs, cols_rs = transform.resized_shape
        crop_rows, crop_cols = transform.original_shape
        step_r = crop_rows / (rows_rs * lr_per_model)
        step_c = crop_cols / (cols_rs * lr_per_model)
        valid_r = int(math.ceil(rows_rs * lr_per_model - 1e-6))
        valid_c = int(math.ceil(cols_rs * lr_per_model - 1e-6))
        flat = logits.reshape(b * k, h, w)
        if valid_r < h or valid_c < w:  # decoder pixels over the zero padding are not the image
            flat = flat.copy()
            flat[:, max(valid_r, 0) :, :] = -1e4
            flat[:, :, max(valid_c, 0) :] = -1e4
        masks = flat > self.mask_threshold
        rows_any = masks.any(axis=2)
        cols_any = masks.any(axis=1)
        area_lr = masks.sum(axis=(1, 2))
        nonempty = area_lr > 0
        area = area_lr * step_r * step_c
        stab = pp.stability_score(flat, self.mask_threshold, stability_offset)
        keep = np.ones(b * k, bool) if keep_empty else nonempty.copy()
        if max_area is not None:
            keep &= area <= max_area
        if min_score is not None:
            keep &= np.asarray(scores, np.float32).reshape(b * k) > min_score
        if not keep.any():
            return 0
        r0 = rows_any.argmax(axis=1)
        r1 = h - rows_any[:, ::-1].argmax(axis=1)
        c0 = cols_any.argmax(axis=1)
        c1 = w - cols_any[:, ::-1].argmax(axis=1)
        if image_shape is not None:
            cut = np.zeros(b * k, bool)
            if crop[0].start > 0:
                cut |= r0 <= 1
            if crop[1].start > 0:
                cut |= c0 <= 1
            if crop[0].stop < image_shape[0]:
                cut |= r1 >= min(h, valid_r) - 1
            if crop[1].stop < image_shape[1]:
                cut |= c1 >= min(w, valid_c) - 1
            keep &= ~(cut & nonempty)
            if not keep.any():
                return 0
        r0 = np.where(nonempty, np.maximum(r0 - 1, 0), 0)
        c0 = np.where(nonempty, np.maximum(c0 - 1, 0), 0)
        r1 = np.where(nonempty, np.minimum(r1 + 1, h), 0)
        c1 = np.where(nonempty, np.minimum(c1 + 1, w), 0)
        sel = np.flatnonzero(keep)
        obj = sel // k
        for j in sel:
            self._logits.append(flat[j, r0[j] : r1[j], c0[j] : c1[j]].astype(np.float16))
        crop_box = np.array([crop[0].start, crop[1].start, crop[0].stop, crop[1].stop], float)
        geom = np.zeros((len(sel), 12))
        geom[:, 0] = r0[sel]
        geom[:, 1] = c0[sel]
        geom[:, 2:6] = crop_box
        geom[:, 6] = step_r
        geom[:, 7] = step_c
        if clip_boxes is None:
            geom[:, 8:12] = crop_box
        else:
            cb = np.asarray(clip_boxes, float).reshape(-1, 4)[obj]
            geom[:, 8:10] = np.maximum(cb[:, :2], crop_box[:2])
            geom[:, 10:12] = np.minimum(cb[:, 2:], crop_box[2:])
        self._geom.append(geom)
        self._scores.append(np.asarray(scores, np.float32).reshape(b * k)[sel])
        self._stability.append(np.asarray(stab, np.float32)[sel])
        self._areas.append(area[sel].astype(np.float64))
        self._points.append(np.asarray(points, float).reshape(b, 2)[obj])
        self._ids.append(np.asarray(ids).reshape(b)[obj])
        self._frozen = None
        return len(sel)

    def full_mask(self, k: int) -> pp.CropMask:
        """Candidate ``k`` at image resolution (memoised)."""
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        logits = self._logits[k].astype(np.float32)
        g = self._array("geom")[k]
        lr_r0, lr_c0, cr0, cc0, cr1, cc1, step_r, step_c, br0, bc0, br1, bc1 = g
        if logits.size == 0:
            out = pp.CropMask(int(cr0), int(cc0), np.zeros((0, 0), bool))
        else:
            h, w = logits.shape
            # image rows covered by this block of decoder pixels, inside the crop and clip box
            top = max(math.floor(cr0 + lr_r0 * step_r), br0)
            bottom = min(math.ceil(cr0 + (lr_r0 + h) * step_r), br1)
            left = max(math.floor(cc0 + lr_c0 * step_c), bc0)
            right = min(math.ceil(cc0 + (lr_c0 + w) * step_c), bc1)
            top, bottom, left, right = int(top), int(bottom), int(left), int(right)
            if bottom <= top or right <= left:
                out = pp.CropMask(int(cr0), int(cc0), np.zeros((0, 0), bool))
            else:
                wr = _interp_matrix(bottom - top, cr0 + lr_r0 * step_r - top, step_r, h)
                wc = _interp_matrix(right - left, cc0 + lr_c0 * step_c - left, step_c, w)
                up = wr @ logits @ wc.T
                out = pp.CropMask(top, left, up > self.mask_threshold).tight()
        self._cache[k] = out
        return out

    def forget_full_masks(self) -> None:
        """Free the upsampled masks (they are recomputed on demand)."""
        self._cache.clear()


def _point_grid(crop: tuple[slice, slice], n: int) -> np.ndarray:
    """``n x n`` (row, col) points at the centres of an even grid over a crop (SAM's layout)."""
    rows = crop[0].stop - crop[0].start
    cols = crop[1].stop - crop[1].start
    f = (np.arange(n) + 0.5) / n
    rr, cc = np.meshgrid(f * rows - 0.5 + crop[0].start, f * cols - 0.5 + crop[1].start, indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1)


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass
class AutomaticResult:
    """What an automatic mode returns: labels, a message, and what it needs to relabel.

    Attributes
    ----------
    mode : str
    labels : ndarray of int32, shape (M, N)
        The current segmentation (``0`` background).
    message : str
        Empty, or why the result is empty and which threshold to lower.
    thresholds : dict
        The thresholds that produced ``labels``.
    model_name : str
    seconds : float
        Time the network part took.
    """

    mode: str
    labels: np.ndarray
    message: str = ""
    thresholds: dict = field(default_factory=dict)
    model_name: str = ""
    seconds: float = 0.0
    size_estimate: Any = None

    @property
    def n_cells(self) -> int:
        return int(self.labels.max(initial=0))

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)

    def relabel(self, **thresholds) -> np.ndarray:  # pragma: no cover - overridden
        """Re-apply thresholds to the cached intermediate; never calls the network."""
        return self.labels

    def summary(self) -> str:
        """One line for a status bar."""
        if self.message:
            return self.message
        line = f"{self.n_cells} cells ({self.mode} mode)"
        return f"{line}; {self.size_estimate.message}" if self.size_estimate is not None else line


@dataclass
class DistanceResult(AutomaticResult):
    """Distance-mode result: the stitched map and the labels cut from it.

    ``relabel(peak=, fill=, min_size=, fill_holes=)`` recomputes the labels from
    the cached ``distance_map``.
    """

    distance_map: np.ndarray | None = None

    def relabel(self, peak: float | None = None, fill: float | None = None, min_size: int | None = None,
                fill_holes: bool | None = None) -> np.ndarray:
        th = {**self.thresholds}
        for key, value in (("peak", peak), ("fill", fill), ("min_size", min_size), ("fill_holes", fill_holes)):
            if value is not None:
                th[key] = value
        if self.distance_map is None:
            self.labels = np.zeros(self.labels.shape, np.int32)
            self.thresholds = th
            return self.labels
        labels = pp.labels_from_distance_map(
            self.distance_map, peak=float(th["peak"]), fill=float(th["fill"]),
            min_size=int(th.get("min_size", 0)), fill_holes=bool(th.get("fill_holes", False)),
        )
        self.labels, self.thresholds = labels, th
        self.message = ""
        if labels.max() == 0:
            top = float(self.distance_map.max()) if self.distance_map.size else 0.0
            if top <= th["peak"]:
                self.message = (f"no cells: no pixel of the distance map exceeds the peak threshold "
                                f"{th['peak']:.2f} (highest {top:.2f}): lower the peak threshold")
            else:
                self.message = (f"no cells: every cell is smaller than the minimum size {th.get('min_size', 0)}: "
                                "lower the minimum size")
        return labels


@dataclass
class GridResult(AutomaticResult):
    """Grid-mode result: the candidate masks and the labels kept from them.

    ``relabel(probability=, stability=, nms_iou=, min_area=, max_area_fraction=)``
    filters the cached candidates again.
    """

    candidates: MaskCandidates | None = None

    @property
    def probability_floor(self) -> float | None:
        """Answers with a probability at or below this were not drawn by the run (None: all were)."""
        return self.thresholds.get("probability_floor")

    @property
    def note(self) -> str:
        """Empty, or a warning that the probability threshold is below what the run drew."""
        floor = self.probability_floor
        if floor is not None and self.thresholds.get("probability", floor) < floor:
            return (f"answers with a probability of {floor:.2f} or less were not drawn by this run: run again "
                    "to include them")
        return ""

    def relabel(self, probability: float | None = None, stability: float | None = None,
                nms_iou: float | None = None, min_area: int | None = None,
                max_area_fraction: float | None = None) -> np.ndarray:
        th = {**self.thresholds}
        for key, value in (("probability", probability), ("stability", stability), ("nms_iou", nms_iou),
                           ("min_area", min_area), ("max_area_fraction", max_area_fraction)):
            if value is not None:
                th[key] = value
        _check_fraction("nms_iou", th["nms_iou"])
        cands = self.candidates
        shape = self.labels.shape
        if cands is None or len(cands) == 0:
            self.labels = np.zeros(shape, np.int32)
            self.thresholds = th
            if cands is not None and not self.message.startswith("the image"):
                floor = th.get("probability_floor")
                if floor is not None and cands.best_score is not None and cands.best_score <= floor:
                    self.message = (f"no cells: none of the {cands.n_prompts} prompts has an answer with a cell "
                                    f"probability (predicted IoU) above {floor:.2f} (highest "
                                    f"{cands.best_score:.2f}): lower the probability threshold and run again")
                else:
                    self.message = (f"no cells: none of the {cands.n_prompts} prompts gave a mask smaller than "
                                    f"{th['max_area_fraction']:.0%} of the image: raise the maximum mask area and "
                                    "run again")
            return self.labels
        image_area = shape[0] * shape[1]
        p_ok = cands.scores > th["probability"]
        s_ok = p_ok & (cands.stability >= th["stability"])
        a_ok = s_ok & (cands.areas <= th["max_area_fraction"] * image_area) & (cands.areas >= th["min_area"])
        sel = np.flatnonzero(a_ok)
        masks = [cands.full_mask(k) for k in sel]
        areas = np.array([m.area for m in masks])
        good = (areas >= max(th["min_area"], 1)) & (areas <= th["max_area_fraction"] * image_area)
        sel = sel[good]
        masks = [m for m, g in zip(masks, good) if g]
        keep = pp.nms_crop_masks(masks, cands.scores[sel], th["nms_iou"])
        kept = [masks[i] for i in keep]
        labels = pp.paint_smaller_wins(kept, shape)
        labels = pp.remove_small_regions(labels, int(th["min_area"]))
        self.labels, self.thresholds = labels, th
        self.message = ""
        if labels.max() == 0:
            n = len(cands)
            if not p_ok.any():
                self.message = (f"no cells: none of the {n} candidate masks has a cell probability (predicted "
                                f"IoU) above {th['probability']:.2f} (highest {cands.scores.max():.2f}): lower "
                                "the probability threshold")
            elif not s_ok.any():
                best = cands.stability[p_ok].max()
                self.message = (f"no cells: {int(p_ok.sum())} candidates pass the probability threshold but "
                                f"none has a stability score of {th['stability']:.2f} or more (highest {best:.2f}): "
                                "lower the stability threshold")
            else:
                self.message = (f"no cells: the {int(s_ok.sum())} candidates passing probability and stability "
                                f"are all larger than {th['max_area_fraction']:.0%} of the image or smaller "
                                f"than {th['min_area']} pixels: lower the minimum area (or the probability "
                                "threshold)")
        return labels


@dataclass
class GuidedResult(AutomaticResult):
    """Guided-mode result: the map, its watershed regions (the prompts) and SAM's masks.

    ``relabel(probability=, fallback=, min_size=)`` chooses again between SAM's
    answers and the watershed regions. The prompts themselves follow ``peak``
    and ``fill`` of the run; changing those needs a new run (the map is kept in
    ``distance_map`` and can be passed to :func:`guided_from_map`).
    """

    distance_map: np.ndarray | None = None
    regions: np.ndarray | None = None
    candidates: MaskCandidates | None = None
    n_drawn: int = 0

    def relabel(self, probability: float | None = None, fallback: bool | None = None,
                min_size: int | None = None, **ignored) -> np.ndarray:
        bad = sorted(k for k, v in ignored.items() if v is not None and v != self.thresholds.get(k))
        if bad:
            raise ValueError(
                f"guided mode cannot change {', '.join(bad)} without new prompts: run guided_from_map() with the "
                "cached distance_map (only SAM's decoder runs), or use distance mode to explore them"
            )
        th = {**self.thresholds}
        for key, value in (("probability", probability), ("fallback", fallback), ("min_size", min_size)):
            if value is not None:
                th[key] = value
        shape = self.labels.shape
        cands = self.candidates
        masks: list[pp.CropMask] = []
        n_sam = 0
        if cands is not None and len(cands):
            ok = cands.scores >= th["probability"]
            answered = set()
            for k in np.flatnonzero(ok):
                m = cands.full_mask(k)
                if m.area >= max(int(th["min_size"]), 1):  # smaller answers count as no answer
                    masks.append(m)
                    answered.add(int(cands.ids[k]))
            n_sam = len(masks)
        else:
            answered = set()
        if th["fallback"] and self.regions is not None and self.regions.max() > 0:
            from scipy import ndimage as ndi

            for rid, sl in enumerate(ndi.find_objects(self.regions), start=1):
                if sl is None or rid in answered:
                    continue
                masks.append(pp.CropMask(sl[0].start, sl[1].start, self.regions[sl] == rid))
        labels = pp.paint_smaller_wins(masks, shape)
        labels = pp.remove_small_regions(labels, int(th["min_size"]))
        self.labels, self.thresholds = labels, th
        self.message = ""
        self.n_drawn = n_sam
        if labels.max() == 0:
            if self.regions is None or self.regions.max() == 0:
                top = float(self.distance_map.max()) if self.distance_map is not None else 0.0
                self.message = (f"no cells: no pixel of the distance map exceeds the peak threshold "
                                f"{th['peak']:.2f} (highest {top:.2f}), so there was nothing to prompt: lower the "
                                "peak threshold")
            elif not th["fallback"] and n_sam == 0:
                self.message = (f"no cells: SAM's answers all have a probability below {th['probability']:.2f}: "
                                "lower the probability threshold (or turn the fallback on)")
            else:
                self.message = f"no cells: every cell is smaller than {th['min_size']} pixels: lower the minimum size"
        return labels


# ---------------------------------------------------------------------------
# the modes
# ---------------------------------------------------------------------------


def distance_segmentation(
    image: np.ndarray,
    model: LoadedModel,
    config: DistanceConfig | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, DistanceResult]:
    """Distance-map mode (SAMCell) on one 2D plane: a generator returning :class:`DistanceResult`.

    Parameters
    ----------
    image : ndarray
        ``(M, N)``, RGB ``(M, N, 3)`` or ``(M, N, C)`` with ``channel``.
    model : LoadedModel
        A distance-map model (see :func:`is_distance_model`).
    config : DistanceConfig, optional
        Defaults, with the model's own ``meta["thresholds"]`` when it has some.
    """
    require_distance_model(model)
    cfg = config or DistanceConfig(**model_distance_defaults(model))
    cfg.validate()
    image01, message = prepare_image(image, channel)
    th = {"peak": cfg.peak, "fill": cfg.fill, "min_size": cfg.min_size, "fill_holes": cfg.fill_holes}
    shape = image01.shape[:2]
    if message:
        return DistanceResult("distance", np.zeros(shape, np.int32), message, th, model.name)
    t0 = time.perf_counter()
    dmap, estimate = yield from distance_map_at_scale(image, model, cfg, channel, image01=image01)
    result = DistanceResult("distance", np.zeros(shape, np.int32), "", th, model.name,
                            time.perf_counter() - t0, estimate, distance_map=dmap)
    result.relabel()
    return result


def grid_segmentation(
    image: np.ndarray,
    model: LoadedModel,
    config: GridConfig | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, GridResult]:
    """Grid mode (CellSeg1) on one 2D plane: a generator returning :class:`GridResult`.

    Works with every model of the catalogue (zero-shot) and with fine-tuned ones.
    """
    from .predictor import Predictor

    cfg = config or GridConfig()
    cfg.validate()
    image01, message = prepare_image(image, channel)
    shape = image01.shape[:2]
    th = {"probability": cfg.probability, "stability": cfg.stability, "nms_iou": cfg.nms_iou,
          "min_area": cfg.min_area, "max_area_fraction": cfg.max_area_fraction,
          "stability_offset": cfg.stability_offset, "probability_floor": cfg.decode_floor}
    cands = MaskCandidates(shape)
    if message:
        return GridResult("grid", np.zeros(shape, np.int32), message, th, model.name, candidates=cands)
    t0 = time.perf_counter()
    crops = _model_crops(shape, model.input_size, cfg.max_downscale)
    predictor = Predictor(model)
    per_crop = cfg.points_per_side ** 2
    n_batches = -(-per_crop // cfg.batch_size)
    total = len(crops) * (n_batches + 1)
    step = 0
    max_area = cfg.max_area_fraction * shape[0] * shape[1]
    score_log: list[np.ndarray] = []
    for ci, crop in enumerate(crops):
        if ci == 0:
            yield Progress(step, total, f"grid: embedding crop 1/{len(crops)}")
        emb = predictor.embed(image01[crop])
        step += 1
        yield Progress(step, total, f"grid: embedded crop {ci + 1}/{len(crops)}")
        points = _point_grid(crop, cfg.points_per_side)
        local = points - [crop[0].start, crop[1].start]
        done = 0
        for idx, logits, scores in decode_prompts(
            model, emb.features, emb.transform, points_rc=local, multimask=cfg.multimask,
            batch_size=cfg.batch_size, min_score=cfg.decode_floor, exact=cfg.exact_decoder, score_log=score_log,
        ):
            if len(idx):
                cands.add(logits, scores, crop=crop, transform=emb.transform, points=points[idx],
                          ids=idx + ci * per_crop, stability_offset=cfg.stability_offset, max_area=max_area,
                          image_shape=shape if len(crops) > 1 else None, min_score=cfg.decode_floor)
            done = min(per_crop, done + cfg.batch_size)
            step += 1
            yield Progress(step, total, f"grid: {done}/{per_crop} prompts, {len(cands)} candidates")
    cands.n_prompts = len(crops) * per_crop
    if score_log:
        cands.best_score = float(max(x.max(initial=-np.inf) for x in score_log))
    # upsample every candidate now, off the GUI thread, so that slider moves only filter and paint
    if len(cands) <= PRECOMPUTE_LIMIT:
        for k in range(len(cands)):
            cands.full_mask(k)
    result = GridResult("grid", np.zeros(shape, np.int32), "", th, model.name, time.perf_counter() - t0,
                        candidates=cands)
    result.relabel()
    return result


def guided_from_map(
    image: np.ndarray,
    distance_map: np.ndarray,
    prompt_model: LoadedModel,
    config: GuidedConfig | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, GuidedResult]:
    """Guided mode from a given distance map: SAM draws each watershed region from its peak and box.

    Parameters
    ----------
    distance_map : ndarray, shape (M, N)
        A normalised distance map of ``image`` (e.g. ``DistanceResult.distance_map``).
    prompt_model : LoadedModel
        Any SAM-family model; it draws the cells.
    """
    from .predictor import Predictor

    cfg = config or GuidedConfig()
    cfg.validate()
    use_points = cfg.use_points or not cfg.use_boxes
    image01, message = prepare_image(image, channel)
    shape = image01.shape[:2]
    dmap = np.asarray(distance_map, np.float32)
    if dmap.shape != shape:
        raise ValueError(f"distance map of shape {dmap.shape} does not match the image {shape}")
    dc = cfg.distance
    th = {"peak": dc.peak, "fill": dc.fill, "probability": cfg.probability, "fallback": cfg.fallback,
          "min_size": cfg.min_size}
    cands = MaskCandidates(shape, mask_threshold=cfg.mask_threshold)
    if message:
        return GuidedResult("guided", np.zeros(shape, np.int32), message, th, prompt_model.name,
                            distance_map=dmap, regions=np.zeros(shape, np.int32), candidates=cands)
    t0 = time.perf_counter()
    regions = pp.labels_from_distance_map(dmap, dc.peak, dc.fill, dc.min_size, dc.fill_holes)
    ids, points, boxes = pp.region_prompts(regions, dmap, margin=cfg.box_margin)
    crops = _model_crops(shape, prompt_model.input_size, cfg.max_downscale)
    # each prompt goes to the crop that holds its box with the most room around it
    owner = np.zeros(len(ids), int)
    if len(crops) > 1 and len(ids):
        cb = np.array([[c[0].start, c[1].start, c[0].stop, c[1].stop] for c in crops], float)
        room = np.minimum.reduce([
            boxes[:, None, 0] - cb[None, :, 0], boxes[:, None, 1] - cb[None, :, 1],
            cb[None, :, 2] - boxes[:, None, 2], cb[None, :, 3] - boxes[:, None, 3],
        ])
        owner = room.argmax(axis=1)
    predictor = Predictor(prompt_model)
    used = [ci for ci in range(len(crops)) if (owner == ci).any()]
    total = sum(1 + -(-int((owner == ci).sum()) // cfg.batch_size) for ci in used)
    step = 0
    yield Progress(0, max(total, 1), f"guided: {len(ids)} cells to draw")
    for ci in used:
        crop = crops[ci]
        mine = np.flatnonzero(owner == ci)
        pixels = image01[crop]
        hw = pixels.shape[:2]
        side = max(hw)
        # other orientations: of the crop padded to a square below and right, as the model pads it, so each
        # orientation's model input is the first's turned (same scale, logits move back exactly)
        # (a negative is inverted before the padding: the padding stays the model's zeros)
        codes = list(range(cfg.views))
        codes += [v | INVERTED for v in codes] if cfg.invert else []
        embs = [predictor.embed(pixels)]
        for v in codes[1:]:  # a progress record (a cancel point) per view
            yield Progress(step, total, f"guided: crop {used.index(ci) + 1}/{len(used)}, orientation "
                                        f"{(v & 7) + 1}/{cfg.views}{', inverted' if v & INVERTED else ''}")
            src = 1.0 - pixels if v & INVERTED else pixels
            if v & 7:
                src = view_array(np.pad(src, ((0, side - hw[0]), (0, side - hw[1]), (0, 0))), v & 7)
            embs.append(predictor.embed(np.ascontiguousarray(src)))
        step += 1
        yield Progress(step, total, f"guided: embedded crop {used.index(ci) + 1}/{len(used)}")
        emb = embs[0]
        origin = np.array([crop[0].start, crop[1].start, crop[0].start, crop[1].start], float)
        local_boxes = np.clip(boxes[mine] - origin, 0, None)
        local_boxes[:, 2] = np.minimum(local_boxes[:, 2], crop[0].stop - crop[0].start)
        local_boxes[:, 3] = np.minimum(local_boxes[:, 3], crop[1].stop - crop[1].start)
        local_points = points[mine] - origin[:2]
        decoders = [decode_prompts(
            prompt_model, e.features, e.transform,
            points_rc=view_points(local_points, v, (side, side)) if use_points else None,
            boxes_rc=view_boxes(local_boxes, v, (side, side)) if cfg.use_boxes else None,
            multimask=False, batch_size=cfg.batch_size,
        ) for v, e in zip(codes, embs)]
        for batches in zip(*decoders):  # one batch of the same prompts per view
            idx, logits, scores = batches[0]
            if len(batches) > 1:
                logits, scores = _average_views(batches, codes)
            sel = mine[idx]
            cands.add(logits, scores, crop=crop, transform=emb.transform, points=points[sel],
                      ids=ids[sel], keep_empty=True, clip_boxes=boxes[sel])
            step += 1
            yield Progress(step, total, f"guided: drew {len(cands)}/{len(ids)} cells")
    result = GuidedResult("guided", np.zeros(shape, np.int32), "", th, prompt_model.name,
                          time.perf_counter() - t0, distance_map=dmap, regions=regions, candidates=cands)
    result.relabel()
    return result


def _average_views(batches, codes) -> tuple[np.ndarray, np.ndarray]:
    """Average decoder batches ``(index, logits, scores)`` of the views of one crop (view ``codes``, the first 0).

    Orientation ``v & 7`` > 0 saw the crop padded to a square and turned (see
    ``GuidedConfig.views``), so its low-resolution logits over the model
    input turn back onto the first orientation's frame as a whole; the
    inverted contrast does not move them.
    """
    import torch

    total = batches[0][1].astype(np.float32)
    for v, (_, logits, _) in zip(codes[1:], batches[1:]):
        total = total + unview_tensor(torch.from_numpy(np.ascontiguousarray(logits)), v).numpy()
    return total / len(batches), np.mean([b[2] for b in batches], axis=0)


def guided_segmentation(
    image: np.ndarray,
    model: LoadedModel,
    prompt_model: LoadedModel | None = None,
    config: GuidedConfig | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, GuidedResult]:
    """Guided mode: the distance ``model`` predicts the map, ``prompt_model`` (default: ``model``) draws."""
    require_distance_model(model, "guided")
    cfg = config or GuidedConfig(distance=DistanceConfig(**model_distance_defaults(model)))
    cfg.validate()
    image01, message = prepare_image(image, channel)
    if message:
        return (yield from guided_from_map(image, np.zeros(image01.shape[:2], np.float32),
                                           prompt_model or model, cfg, channel))
    t0 = time.perf_counter()
    dmap, estimate = yield from distance_map_at_scale(image, model, cfg.distance, channel, image01=image01)
    result = yield from guided_from_map(image, dmap, prompt_model or model, cfg, channel)
    result.seconds = time.perf_counter() - t0
    result.size_estimate = estimate
    return result


def make_config(mode: str, model: LoadedModel | None = None, **settings):
    """The configuration of a mode with the model's own defaults, updated by ``settings``.

    A distance model's ``meta["thresholds"]`` and ``meta["crop_size"]`` are the
    defaults of distance and guided mode. ``peak``, ``fill``, ``fill_holes``,
    ``crop_size``, ``overlap``, ``clahe``, ``smooth``, ``embed_window`` and ``scale`` given to guided mode go to its
    :class:`DistanceConfig`. Settings that are None are ignored.

    Examples
    --------
    >>> make_config("grid", probability=0.5).probability
    0.5
    >>> make_config("guided", peak=0.6).distance.peak
    0.6
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    settings = {k: v for k, v in settings.items() if v is not None}
    defaults = model_distance_defaults(model) if model is not None else {}
    if mode == "distance":
        cfg = DistanceConfig(**defaults)
        return cfg.updated(**_only(DistanceConfig, settings, mode))
    if mode == "grid":
        return GridConfig().updated(**_only(GridConfig, settings, mode))
    dist_keys = {"peak", "fill", "crop_size", "overlap", "clahe", "fill_holes", "smooth", "embed_window", "scale",
                 "zoom_views", "small_cell_view"}
    dist = DistanceConfig(**defaults).updated(**{k: v for k, v in settings.items() if k in dist_keys})
    rest = {k: v for k, v in settings.items() if k not in dist_keys}
    return GuidedConfig(distance=dist).updated(**_only(GuidedConfig, rest, mode))


def _only(cls, settings: dict, mode: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"{mode} mode has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(names))}")
    return settings


def segment_steps(
    image: np.ndarray,
    model: LoadedModel,
    mode: str | None = None,
    config: DistanceConfig | GridConfig | GuidedConfig | None = None,
    prompt_model: LoadedModel | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, AutomaticResult]:
    """Any mode as a generator (for workers): ``mode`` None picks :func:`default_mode`."""
    from .cpu_memory import reuse_freed_memory

    mode = mode or default_mode(model)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    with reuse_freed_memory(model.device):  # on a CPU: freed tensors stay mapped for the next window's
        if mode == "distance":
            return (yield from distance_segmentation(image, model, config, channel))
        if mode == "grid":
            return (yield from grid_segmentation(image, model, config, channel))
        return (yield from guided_segmentation(image, model, prompt_model, config, channel))


def segment(
    image: np.ndarray,
    model: LoadedModel,
    mode: str | None = None,
    config: DistanceConfig | GridConfig | GuidedConfig | None = None,
    prompt_model: LoadedModel | None = None,
    channel: int | None = None,
    callback=None,
) -> AutomaticResult:
    """Segment one 2D plane with any mode and return the result (for scripts).

    ``callback`` receives every :class:`~napari_cellseg.core.progress.Progress`
    record (e.g. a :class:`~napari_cellseg.core.progress.TerminalProgress`).
    """
    return run_to_completion(segment_steps(image, model, mode, config, prompt_model, channel), callback)
