"""Interactive prompted segmentation: embedding cache, prompt-centred zoom, batched objects.

This is the Qt-free engine behind the annotation widget (and usable from
scripts). It answers "segment the object(s) these prompts point at" on one 2D
plane, fast enough for a live preview on a laptop CPU:

* **Embedding cache.** Image embeddings are the slow part (LiteMedSAM: about a
  second and a half on a CPU; SAM ViT-B: tens of seconds). :class:`EmbeddingCache` keeps
  them in memory (least recently used first out, bounded in bytes) and
  optionally on disk, keyed by the image *content* (a hash of the plane's
  bytes, so changed data never reuse a stale embedding), the model (name and a
  fingerprint of its encoder weights), the normalisation and the window.
* **Prompt-centred zoom.** A model with a small input (LiteMedSAM: 256 px)
  sees a 1024 px image shrunk four times, where a cell is a few pixels wide.
  Instead, a *window* around the prompt (its box grown by a context margin) is
  cut from the plane and embedded on its own, so the cell fills most of the
  model input (small cells are even upsampled: zero-shot LiteMedSAM segments
  large objects best, measured in docs/annotation.md). Window sides come from
  a short ladder (``min_window`` times 1, 1.41, 2, 2.83, ...), positions snap
  to a grid, and a cached window that already holds the prompt with its margin
  is reused, so nearby prompts share one embedding. :func:`choose_window` is
  the geometry, :class:`InteractiveSegmenter` the user.
* **Tiles and first answers.** :meth:`InteractiveSegmenter.precompute` embeds
  the plane ahead of the prompts: tile by tile (overlapping windows of the
  model input size) when the zoom works at native resolution (large-input
  models on large images: prompts are then answered from the tiles), else the
  whole plane, from which :meth:`InteractiveSegmenter.run` gives an instant
  first answer while the prompt's own window is embedded.
* **Batched objects.** :meth:`InteractiveSegmenter.segment_many` answers many
  objects (several boxes, or one object per positive point) at once, grouping
  the prompts per window and decoding each group in one batch.

Masks come back as :class:`ObjectMask`: a tight boolean crop plus its offset
in full-plane ``(row, col)`` coordinates, cheap to paste into a label image.
:func:`plan_commit` turns them into the minimal ``(indices, values)`` write of a
target label image under the overlap policy documented there.

Examples
--------
>>> import numpy as np
>>> from napari_cellseg.core.models import random_model
>>> seg = InteractiveSegmenter(random_model("vit_test"))
>>> _ = seg.set_image(np.random.default_rng(0).random((300, 200)))
>>> objs = seg.segment_many([ObjectPrompt(box=(20, 30, 60, 80))])
>>> len(objs), objs[0].window.shape[0] <= 300
(1, True)
"""

from __future__ import annotations

import json
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .predictor import Embedding, Predictor, image_key
from .preprocess import (
    INVERTED,
    VIEW_COUNTS,
    ResizeTransform,
    normalize_image,
    tile_starts,
    unview_tensor,
    view_array,
    view_boxes,
    view_image,
    view_points,
)
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel

__all__ = [
    "AnnotationConfig",
    "CommitPlan",
    "EmbeddingCache",
    "InteractiveSegmenter",
    "ObjectMask",
    "ObjectPrompt",
    "Window",
    "choose_window",
    "group_prompts",
    "model_fingerprint",
    "objects_to_labels",
    "plan_commit",
    "resolve_mask_threshold",
    "segment_boxes",
    "unview_tensor",
    "INVERTED",
    "VIEW_COUNTS",
    "view_array",
    "view_boxes",
    "view_image",
    "view_points",
    "window_ladder",
]

#: on-disk embedding format version (bump when the layout changes)
DISK_FORMAT = 1

#: largest model input (px) counted as small (LiteMedSAM's 256): zoom windows below it, 8 orientations on a GPU
SMALL_INPUT = 256

#: a click's typical box (``missed_click="box"``, ``merged_ratio``): the window's median map cell's equivalent
#: diameter times this
TYPICAL_BOX_GROWTH = 1.2


#: default mask logit threshold of prompted masks per catalogue model, where SAM's 0 is measurably worse.
#: LiteMedSAM zero-shot under-segments phase-contrast cells: -2 gave higher box-prompt IoU on the training
#: images (usiigaci sets 1-35) and on the validation images (sets 36-45), see docs/annotation.md.
#: A model's ``meta["prompt_mask_threshold"]`` (e.g. set by fine-tuning) takes precedence.
PROMPT_MASK_THRESHOLDS: dict[str, float] = {"litemedsam": -2.0}


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


@dataclass
class AnnotationConfig:
    """Settings of interactive segmentation (round-trips to JSON).

    Attributes
    ----------
    zoom : {"auto", "on", "off"}
        Prompt-centred zoom. ``"auto"``: for models whose ``min_window`` is
        below their input (small-input models, LiteMedSAM's family), on every
        plane larger than that window, small planes included (a 256 px image
        of 10 px nuclei: each prompt's window is upsampled into the model; box
        IoU on fluorescent nuclei 0.78 -> 0.86, docs/annotation.md); for the
        others when the plane's longer side is more than ``zoom_ratio`` times
        the model input (SAM ViT-B on a 1024 px image: no). ``"off"`` always
        embeds the whole plane, shrunk to the model input.
    zoom_ratio : float
        See ``zoom`` (models whose smallest window is their input).
    context : float
        The window holds the prompt box grown to ``context`` times its size
        (a margin of ``(context - 1) / 2`` box sizes on each side), so the model
        sees the cell and some surroundings. With the ladder of window sides and
        ``min_margin`` the cell ends up filling 55-75 % of the window side,
        which is what zero-shot LiteMedSAM does best (measured on the training
        images, see docs/annotation.md).
    min_margin : float
        Smallest margin around the prompt, as a fraction of the window side
        (keeps lone clicks away from the window edge).
    min_window : int or None
        Smallest window side in pixels; smaller windows are upsampled into the
        model. Default (None): a quarter of the model input for small-input
        models (input <= 256 px, e.g. LiteMedSAM: cheap to embed, and measured
        to segment cells better when they fill the input, see
        docs/annotation.md), the model input itself (native resolution, tiles
        shared by nearby prompts) for larger ones.
    mask_threshold : float or None
        Logit threshold of the masks: lower gives larger masks. None: the
        model's own default (``LoadedModel.meta["prompt_mask_threshold"]``,
        else :data:`PROMPT_MASK_THRESHOLDS` for its catalogue name, else SAM's 0;
        prompts with a box on a model with its own box decoder:
        ``meta["box_mask_threshold"]``, see :mod:`~napari_cellseg.core.box_head`;
        clicks drawn from their map cell's box by that decoder:
        ``meta["click_mask_threshold"]``, else the box threshold). A value
        given here applies to every prompt.
    max_memory_mb : float
        Memory budget of the in-memory embedding cache.
    disk_cache : bool
        Also keep embeddings on disk (``models.cache_dir() / "embeddings"``),
        so they survive a restart of napari.
    low, high : float
        Normalisation percentiles (see :func:`~napari_cellseg.core.preprocess.normalize_image`).
    clicks_from_map : bool
        For models that predict a cell distance map (the default ``cellseg``):
        a click (positive points, no box) is answered from the map. The map is
        computed in a native-resolution window around the click (the model's
        training crop, 256 px) and cut into cells as the distance mode does;
        the cell under the click, its box grown by 10 %, becomes a box prompt
        (negative points are kept; a negative point on a map cell removes that
        cell), or is itself the answer (see ``click_answer``). A click where
        the map sees no cell: see ``missed_click``. A model that cannot draw from
        prompts (a ``distance``-recipe adapter, whose mask decoder now draws
        the map) answers a click with the map cell itself.
        Reason: LiteMedSAM's point pathway was never trained (a click gives a
        speckle), its box pathway was; measured on held-out images, click IoU
        rises from 0.29 to 0.39 on phase contrast and from 0.01 to 0.60 on
        fluorescent nuclei (docs/annotation.md).
    map_radius : int
        A click up to this many pixels outside every map cell takes the
        nearest one.
    click_answer : {"sam", "map"}
        How a click the map finds a cell for is answered: ``"sam"`` (default)
        by SAM, from the cell's box grown by 10 %; ``"map"`` with the map cell
        itself (no embedding of the box window: faster), except for clicks
        that come with negative points, which go to SAM with the box so that
        the negative points can trim the mask. Measured with the default model
        (docs/annotation.md): the map cell is better on images like its
        training data (click IoU +0.07), SAM on a nucleus group it never saw
        (0.70 against 0.61); after fine-tuning on that group both give 0.77.
    map_scale : float
        Zoom of the click's map window before the distance model sees it
        (0.25-4; 1: as it is), as ``DistanceConfig.scale`` in the automatic
        modes: below 1 for cells much larger than the model's training cells
        (which its map splits), above 1 for tiny ones. The window covers the
        model's crop size divided by the zoom (512 image pixels at 0.5), so
        the model still sees its training crop size.
        ``"auto"`` (the default): for models that record their training cells'
        sizes (the packaged model, fine-tuned ones; 1 for others), estimated
        once per plane from the cells of the map at
        zoom 1 of a window :data:`MEASURE_WINDOW` crops a side (1,024 px for
        256 px crops) around the first click, by the automatic modes' rule
        (:func:`~napari_cellseg.core.cell_size.estimate_scale`; the model's
        ``meta["cell_diameters"]``); the segmenter's ``size_estimate`` says
        what it measured.
    map_zoom_views : tuple of float
        Test-time augmentation of the click maps over zoom, as
        ``DistanceConfig.zoom_views``: each map window is also mapped at its
        zoom times each of these and the maps averaged (empty by default;
        ``(1.25,)`` raised phase-contrast click IoU 0.43 -> 0.50,
        docs/annotation.md). The measuring map of ``"auto"`` stays plain.
    missed_click : {"box", "point"}
        A click (answered from the map) on which the map sees no cell:
        ``"box"`` gives SAM a square box centred on the click, the size of the
        window's typical map cell (the median cell area's equivalent
        diameter, grown by 20 %); ``"point"`` gives SAM the click as a point
        (LiteMedSAM, never trained with points: a speckle). Either way the
        click stays a point where the window's map has no cell at all.
    merged_ratio : float or None
        A click on a map cell larger than this many times the window's median
        map cell (with at least three cells in the window) is taken for a
        click on several cells the map merged: SAM gets the typical box of
        ``missed_click="box"`` centred on the click instead of the merged
        cell's box. 1.5 by default; None: always the map cell's box. On the
        selection images (training split, 155 clicks) the packaged model's
        click IoU rose from 0.616 to 0.622 at 2 and 0.634 at 1.5 (mean over
        the kinds; docs/annotation.md).
    click_point : bool or None
        Send a click's positive point to SAM with the box the map gives it.
        None (the default): when the model's box head was trained with
        clicks (``meta["box_head"]["clicks"] > 0``, ``train_box_head.py
        --clicks``); a box head trained on boxes alone does worse with the
        point.
    views : int or None
        Test-time augmentation: each window is embedded in this many
        orientations (1, 2, 4 or 8 of the square's symmetries: the identity,
        flips, then transposes) and the answer averages their mask logits.
        None: 8 for small-input models (256 px, LiteMedSAM's family) on a GPU,
        where the extra embeddings cost milliseconds; 1 on a CPU (each costs as
        much as the first: about 0.9 s for LiteMedSAM here) and for SAM's
        1024 px encoders (hundreds of milliseconds each even on a GPU, and the
        gain was measured for LiteMedSAM only). The first orientation's answer
        is shown while the others are embedded. Measured with zero-shot LiteMedSAM on held-out
        phase-contrast cells: 8 views raise the box-prompt IoU by about 0.02
        (docs/annotation.md).
    invert : bool or None
        Test-time augmentation by contrast: each window (in each orientation)
        is also embedded with its intensities inverted (``1 - x`` on the
        normalised image) and the answer averages the logits of both. None:
        on for small-input models (256 px, LiteMedSAM's family) on
        single-channel planes, off for colour (RGB) planes, SAM's 1024 px
        encoders and models whose prompt path this plugin fine-tuned (the
        ``prompt`` and ``joint`` recipes train on one contrast; not
        measured). It doubles the embeddings a window needs (the uninverted
        answer is shown while the inverted one is embedded). Measured with
        zero-shot LiteMedSAM on held-out cells, box-prompt IoU: phase contrast
        +0.04-0.05 (200 cells), bright-field nuclei +0.04, fluorescent nuclei
        +0.02, stained colour tissue -0.01 (docs/annotation.md, "Inverted
        contrast").

    Examples
    --------
    >>> cfg = AnnotationConfig(zoom="off")
    >>> AnnotationConfig.from_json(cfg.to_json()) == cfg
    True
    """

    zoom: str = "auto"
    zoom_ratio: float = 1.5
    context: float = 1.25
    min_margin: float = 0.125
    min_window: int | None = None
    mask_threshold: float | None = None
    max_memory_mb: float = 512.0
    disk_cache: bool = False
    low: float = 1.0
    high: float = 99.8
    clicks_from_map: bool = True
    map_radius: int = 4
    click_answer: str = "sam"
    map_scale: float | str = "auto"
    map_zoom_views: tuple = ()
    missed_click: str = "box"
    merged_ratio: float | None = 1.5
    click_point: bool | None = None
    views: int | None = None
    invert: bool | None = None

    def __post_init__(self) -> None:
        if self.zoom not in ("auto", "on", "off"):
            raise ValueError(f"zoom must be 'auto', 'on' or 'off', got {self.zoom!r}")
        if not self.context >= 1.0:
            raise ValueError(f"context must be >= 1 (the box itself), got {self.context}")
        if not 0.0 <= self.min_margin < 0.5:
            raise ValueError(f"min_margin is a fraction of the window side in [0, 0.5), got {self.min_margin}")
        if self.min_window is not None and int(self.min_window) < 16:
            raise ValueError(f"min_window must be at least 16 pixels, got {self.min_window}")
        if self.max_memory_mb < 0:
            raise ValueError("max_memory_mb must be >= 0")
        if int(self.map_radius) < 0:
            raise ValueError(f"map_radius must be >= 0 pixels, got {self.map_radius}")
        from .automatic import AUTO_SCALE, check_scale, check_zoom_views

        if self.map_scale != AUTO_SCALE:
            check_scale("map_scale", self.map_scale)
        check_zoom_views("map_zoom_views", self.map_zoom_views)
        self.map_zoom_views = tuple(self.map_zoom_views)
        if self.click_answer not in ("map", "sam"):
            raise ValueError(f"click_answer must be 'sam' or 'map', got {self.click_answer!r}")
        if self.missed_click not in ("box", "point"):
            raise ValueError(f"missed_click must be 'box' or 'point', got {self.missed_click!r}")
        if self.merged_ratio is not None and not self.merged_ratio > 1.0:
            raise ValueError(f"merged_ratio must be above 1 (times the typical map cell's area) or None, "
                             f"got {self.merged_ratio!r}")
        if self.views is not None and self.views not in VIEW_COUNTS:
            raise ValueError(f"views must be one of {', '.join(map(str, VIEW_COUNTS))} (or None: by device), "
                             f"got {self.views!r}")
        if self.invert not in (None, True, False):
            raise ValueError(f"invert must be True, False or None (by model and image), got {self.invert!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AnnotationConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown annotation settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> AnnotationConfig:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Window:
    """A rectangle of a plane, ``[r0, r1) x [c0, c1)`` in (row, col) pixels.

    Examples
    --------
    >>> w = Window(10, 20, 74, 84)
    >>> w.shape, w.contains((12, 22, 70, 80)), w.contains((0, 0, 5, 5))
    ((64, 64), True, False)
    """

    r0: int
    c0: int
    r1: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    @property
    def side(self) -> int:
        return max(self.shape)

    @property
    def offset(self) -> tuple[int, int]:
        return self.r0, self.c0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.r0 + self.r1) / 2, (self.c0 + self.c1) / 2

    def contains(self, box) -> bool:
        """True when the box ``(r0, c0, r1, c1)`` (exclusive ends) lies inside."""
        r0, c0, r1, c1 = box
        return self.r0 <= r0 and self.c0 <= c0 and r1 <= self.r1 and c1 <= self.c1

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.r0, self.c0, self.r1, self.c1

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Window:
        return cls(0, 0, int(shape[0]), int(shape[1]))


def window_ladder(min_side: int, max_side: int) -> list[int]:
    """Window sides tried by the zoom: ``min_side * sqrt(2) ** k`` (multiples of 16), up to ``max_side``.

    The ladder keeps the number of distinct windows (and so of embeddings)
    small while never shrinking a prompt by more than about 1.4 times more
    than necessary.

    Examples
    --------
    >>> window_ladder(256, 1024)
    [256, 368, 512, 720, 1024]
    """
    if min_side <= 0:
        raise ValueError(f"min_side must be positive, got {min_side}")
    sides = []
    k = 0
    while True:
        s = int(round(min_side * math.sqrt(2) ** k / 16.0)) * 16 if k else int(min_side)
        s = max(s, 16)
        if s >= max_side:
            sides.append(int(max_side))
            break
        sides.append(s)
        k += 1
    return sorted(set(sides))


def _prompt_box(box, points) -> tuple[float, float, float, float] | None:
    """Bounding box (r0, c0, r1, c1) of a box and positive points, or None."""
    parts = []
    if box is not None:
        b = np.asarray(box, float).reshape(4)
        parts.append([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])])
    if points is not None and len(points):
        p = np.asarray(points, float).reshape(-1, 2)
        parts.append([p[:, 0].min(), p[:, 1].min(), p[:, 0].max() + 1, p[:, 1].max() + 1])
    if not parts:
        return None
    a = np.asarray(parts)
    return float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 2].max()), float(a[:, 3].max())


def _grown(box, margin_r: float, margin_c: float, shape) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = box
    return (
        int(max(0, math.floor(r0 - margin_r))),
        int(max(0, math.floor(c0 - margin_c))),
        int(min(shape[0], math.ceil(r1 + margin_r))),
        int(min(shape[1], math.ceil(c1 + margin_c))),
    )


def choose_window(
    prompt_box,
    image_shape: Sequence[int],
    input_size: int,
    context: float = 1.25,
    min_margin: float = 0.125,
    min_window: int | None = None,
    candidates: Iterable[Window] = (),
) -> Window:
    """The window a prompt is segmented in: the prompt-centred zoom's geometry.

    Parameters
    ----------
    prompt_box : sequence of 4 floats
        ``(r0, c0, r1, c1)`` extent of the prompt (a box, or the bounding box of
        its positive points), exclusive ends.
    image_shape : (M, N)
    input_size : int
        Model input side (LiteMedSAM 256, SAM 1024).
    context : float
        The window must hold the box grown to ``context`` times its size.
    min_margin : float
        Smallest margin around the box, as a fraction of the window side.
    min_window : int, optional
        Smallest window side (default ``input_size``: native resolution).
    candidates : iterable of Window
        Windows already embedded (cached). One that holds the grown box, of the
        chosen side or one ladder step larger, is reused (the finest, then the
        best centred on the prompt), so nearby prompts share an embedding.

    Returns
    -------
    Window
        Square of a side from :func:`window_ladder` (clipped to the image where
        the image is smaller), holding the grown box, centred on the prompt as
        nearly as a grid of ``side / 8`` steps and the image border allow.

    Examples
    --------
    >>> choose_window((500, 500, 540, 560), (1024, 1024), 256, context=3)
    Window(r0=384, c0=416, r1=640, c1=672)
    >>> choose_window((500, 500, 540, 560), (1024, 1024), 256, context=6)  # 60 px * 6 > 256
    Window(r0=322, c0=346, r1=690, c1=714)
    >>> choose_window((500, 500, 540, 560), (1024, 1024), 256, min_window=64)  # LiteMedSAM's default zoom
    Window(r0=468, c0=480, r1=564, c1=576)
    """
    rows, cols = int(image_shape[0]), int(image_shape[1])
    r0, c0, r1, c1 = (float(v) for v in prompt_box)
    r0, r1 = min(r0, r1), max(r0, r1)
    c0, c1 = min(c0, c1), max(c0, c1)
    r0, c0 = max(0.0, r0), max(0.0, c0)
    r1, c1 = min(float(rows), max(r1, r0 + 1)), min(float(cols), max(c1, c0 + 1))
    ext = max(r1 - r0, c1 - c0)
    base = int(min_window or input_size)
    max_side = max(rows, cols)
    ladder = window_ladder(min(base, max_side), max_side)
    side = ladder[-1]
    for s in ladder:
        margin = max((context - 1.0) / 2.0 * ext, min_margin * s)
        if ext + 2 * margin <= s:
            side = s
            break
    margin = max((context - 1.0) / 2.0 * ext, min_margin * side)
    grown = _grown((r0, c0, r1, c1), margin, margin, (rows, cols))
    # reuse a cached window that holds the grown box, of the chosen side or one ladder step larger
    # (at most sqrt(2) coarser), preferring the finest, then the best centred
    cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
    k = ladder.index(side)
    allowed = {(min(s, rows), min(s, cols)): rank for rank, s in enumerate(ladder[k : k + 2])}
    best = None
    for w in candidates:
        rank = allowed.get(w.shape)
        if rank is not None and w.contains(grown):
            d = (rank, (w.centre[0] - cr) ** 2 + (w.centre[1] - cc) ** 2)
            if best is None or d < best[0]:
                best = (d, w)
    if best is not None:
        return best[1]
    step = max(1, side // 8)

    def place(centre: float, lo: int, hi: int, length: int) -> tuple[int, int]:
        # start on the grid nearest to centred that keeps [lo, hi) inside, else centred
        if side >= length:
            return 0, length
        first, last = max(0, hi - side), min(lo, length - side)
        ideal = centre - side / 2
        snapped = int(round(ideal / step)) * step
        for cand in sorted({snapped, snapped - step, snapped + step}, key=lambda v: abs(v - ideal)):
            if first <= cand <= last:
                return cand, cand + side
        start = int(min(max(round(ideal), first if first <= last else 0), length - side))
        return start, start + side

    wr0, wr1 = place(cr, grown[0], grown[2], rows)
    wc0, wc1 = place(cc, grown[1], grown[3], cols)
    return Window(wr0, wc0, wr1, wc1)


# ---------------------------------------------------------------------------
# prompts and results
# ---------------------------------------------------------------------------


@dataclass
class ObjectPrompt:
    """The prompts of ONE object on one plane, in (row, col) pixels.

    Attributes
    ----------
    points : ndarray, shape (P, 2)
    labels : ndarray, shape (P,)
        1 positive, 0 negative.
    box : ndarray, shape (4,) or None
        ``(r0, c0, r1, c1)``, exclusive ends.
    answer : ObjectMask or None
        Set by :meth:`InteractiveSegmenter.guide_clicks` when the cell map
        itself answers the prompt (models that cannot draw from prompts); no
        decoder pass is made for it.
    from_click : bool
        Set by :meth:`InteractiveSegmenter.guide_clicks` on the box prompt it
        makes of a click: its mask is thresholded with the model's click
        threshold (``meta["click_mask_threshold"]``, see
        :func:`resolve_mask_threshold`).
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,)))
    box: np.ndarray | None = None
    answer: ObjectMask | None = None
    from_click: bool = False

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, float).reshape(-1, 2)
        if self.labels is None or len(self.labels) == 0 and len(self.points):
            self.labels = np.ones(len(self.points))
        self.labels = np.asarray(self.labels, float).reshape(-1)
        if len(self.labels) != len(self.points):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels")
        if self.box is not None:
            self.box = np.asarray(self.box, float).reshape(4)
            if np.isnan(self.box).any():
                raise ValueError("box contains NaN")
        if np.isnan(self.points).any():
            raise ValueError("points contain NaN")

    @property
    def positive(self) -> np.ndarray:
        return self.points[self.labels > 0]

    @property
    def is_empty(self) -> bool:
        """True when nothing says where the object is (no box, no positive point)."""
        return self.box is None and not (self.labels > 0).any()

    def extent(self) -> tuple[float, float, float, float] | None:
        """Bounding box of the box and the positive points (what the zoom centres on)."""
        return _prompt_box(self.box, self.positive)


@dataclass
class ObjectMask:
    """One segmented object: a tight boolean crop placed in the full plane.

    Attributes
    ----------
    mask : ndarray of bool, shape (h, w)
        Cropped to the object's bounding box (``(0, 0)`` for an empty mask).
    offset : (int, int)
        Full-plane (row, col) of ``mask[0, 0]``.
    score : float
        The model's predicted IoU.
    window : Window
        Window whose embedding answered the prompt.
    prompt_index : int
        Index of the prompt in the list given to ``segment_many``.
    """

    mask: np.ndarray
    offset: tuple[int, int]
    score: float
    window: Window
    prompt_index: int = 0

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        r, c = self.offset
        return r, c, r + self.mask.shape[0], c + self.mask.shape[1]

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Full-plane (rows, cols) of the object's pixels."""
        rr, cc = np.nonzero(self.mask)
        return rr + self.offset[0], cc + self.offset[1]

    def to_full(self, shape: Sequence[int]) -> np.ndarray:
        """The mask as a full ``(M, N)`` boolean plane."""
        out = np.zeros(tuple(shape[:2]), bool)
        r0, c0, r1, c1 = self.bbox
        out[r0:r1, c0:c1] = self.mask
        return out


def _tight(mask: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 0), bool), offset
    cols = np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.ascontiguousarray(crop), (offset[0] + int(rows[0]), offset[1] + int(cols[0]))


def objects_to_labels(objects: Sequence[ObjectMask], shape: Sequence[int], start: int = 1,
                      dtype=np.uint16, out: np.ndarray | None = None) -> np.ndarray:
    """Paint objects into a label plane with ids ``start, start + 1, ...`` (later objects on top).

    Parameters
    ----------
    objects : sequence of ObjectMask
    shape : (M, N)
    start : int
    out : ndarray, optional
        Plane to paint into (written in place); a new zero plane otherwise.
    """
    if out is None:
        out = np.zeros(tuple(shape[:2]), dtype)
    for k, obj in enumerate(objects):
        if obj.area == 0:
            continue
        r0, c0, r1, c1 = obj.bbox
        region = out[r0:r1, c0:c1]
        region[obj.mask] = start + k
    return out


def group_prompts(
    points: np.ndarray | None,
    labels: np.ndarray | None,
    boxes: np.ndarray | None,
    one_per_point: bool = False,
) -> tuple[list[ObjectPrompt], int]:
    """Turn the prompts of one plane into objects.

    Rules (the annotation widget's, documented in docs/annotation.md):

    * Each box is one object; the points inside a box refine that box's object
      (when points lie in several boxes, the smallest box takes them).
    * Without boxes, all points make one object (negative points alone make
      nothing), unless ``one_per_point``: then every positive point is its own
      object, and each takes the negative points as well.
    * With exactly one box, every point refines it.
    * With several boxes, points outside every box also refine nothing in the
      normal mode; with ``one_per_point`` positive points outside every box
      are objects of their own.

    Parameters
    ----------
    points : ndarray, shape (P, 2), optional
    labels : ndarray, shape (P,), optional
        1 positive, 0 negative.
    boxes : ndarray, shape (B, 4), optional
        (r0, c0, r1, c1), exclusive ends.
    one_per_point : bool

    Returns
    -------
    prompts : list of ObjectPrompt
    ignored : int
        Number of points that went into no object.

    Examples
    --------
    >>> objs, ignored = group_prompts([[5, 5], [50, 50]], [1, 1], None, one_per_point=True)
    >>> len(objs), ignored
    (2, 0)
    """
    pts = np.zeros((0, 2)) if points is None else np.asarray(points, float).reshape(-1, 2)
    lab = np.ones(len(pts)) if labels is None else np.asarray(labels, float).reshape(-1)
    if len(lab) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(lab)} labels")
    bxs = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, float).reshape(-1, 4)
    if len(bxs):
        norm = np.stack([np.minimum(bxs[:, 0], bxs[:, 2]), np.minimum(bxs[:, 1], bxs[:, 3]),
                         np.maximum(bxs[:, 0], bxs[:, 2]), np.maximum(bxs[:, 1], bxs[:, 3])], axis=1)
    else:
        norm = bxs
    owner = np.full(len(pts), -1)
    if len(norm) == 1:
        owner[:] = 0
    elif len(norm) > 1 and len(pts):
        area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])
        inside = ((pts[:, None, 0] >= norm[None, :, 0]) & (pts[:, None, 0] < norm[None, :, 2])
                  & (pts[:, None, 1] >= norm[None, :, 1]) & (pts[:, None, 1] < norm[None, :, 3]))
        masked = np.where(inside, area[None, :], np.inf)
        has = inside.any(axis=1)
        owner[has] = masked[has].argmin(axis=1)
    if one_per_point and len(norm) == 1:
        # one box plus separate points: points inside the box refine it, positive points outside are objects
        b = norm[0]
        inside = ((pts[:, 0] >= b[0]) & (pts[:, 0] < b[2]) & (pts[:, 1] >= b[1]) & (pts[:, 1] < b[3]))
        owner = np.where(inside, 0, -1)
    prompts: list[ObjectPrompt] = []
    for i, b in enumerate(bxs):
        sel = owner == i
        prompts.append(ObjectPrompt(points=pts[sel], labels=lab[sel], box=b))
    free = owner < 0
    ignored = 0
    if not len(bxs):
        if one_per_point:
            neg = pts[lab <= 0]
            for p in pts[lab > 0]:
                prompts.append(ObjectPrompt(points=np.vstack([p[None], neg]),
                                            labels=np.r_[1.0, np.zeros(len(neg))]))
            if not (lab > 0).any():
                ignored = len(pts)
        elif (lab > 0).any():
            prompts.append(ObjectPrompt(points=pts, labels=lab))
        else:
            ignored = len(pts)
    else:
        if one_per_point:
            for p in pts[free & (lab > 0)]:
                prompts.append(ObjectPrompt(points=p[None], labels=np.ones(1)))
            ignored = int((free & (lab <= 0)).sum())
        else:
            ignored = int(free.sum())
    return prompts, ignored


# ---------------------------------------------------------------------------
# the embedding cache
# ---------------------------------------------------------------------------

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FP_LOCK = threading.Lock()


def model_fingerprint(model: LoadedModel) -> str:
    """A short key naming a model *and its encoder weights* (for embedding caches).

    Two random models of the same architecture but different seeds, or a
    fine-tuned model re-saved under the same name, get different keys. The
    hash is computed once per loaded network.
    """
    import torch
    import xxhash

    sam = model.sam
    with _FP_LOCK:
        fp = _FINGERPRINTS.get(sam)
    if fp is None:
        h = xxhash.xxh3_64()
        h.update(str(model.name).encode())
        h.update(str(model.input_size).encode())
        for name, tensor in sorted(sam.image_encoder.state_dict().items()):
            h.update(name.encode())
            t = tensor.detach().to("cpu").contiguous().view(-1)
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
        h.update(repr((tuple(sam.pixel_mean.flatten().tolist()), tuple(sam.pixel_std.flatten().tolist()))).encode())
        fp = h.hexdigest()
        with _FP_LOCK:
            _FINGERPRINTS[sam] = fp
    # a bfloat16 encoder gives other embeddings than a float32 one: they must not share a cache entry
    return fp if model.precision == "float32" else f"{fp}-{model.precision}"


@dataclass(frozen=True)
class CacheKey:
    """What an embedding depends on: the plane's content, the model, the normalisation, the window."""

    image: str
    model: str
    norm: str
    window: Window
    view: int = 0  # view code of the window: orientation, + INVERTED (see AnnotationConfig.views, .invert)

    @property
    def group(self) -> tuple[str, str, str]:
        return self.image, self.model, self.norm

    def prefix(self) -> str:
        """File name prefix of the group (image, model, normalisation)."""
        import xxhash

        return xxhash.xxh3_64(f"{self.image}|{self.model}|{self.norm}".encode()).hexdigest()

    def filename(self) -> str:
        w = self.window
        view = f"_v{self.view}" if self.view else ""
        return f"{self.prefix()}_{w.r0}_{w.c0}_{w.r1}_{w.c1}{view}.pt"

    def as_list(self) -> list:
        """The key as stored in a disk file (the view only when it is not the identity)."""
        out = [self.image, self.model, self.norm, list(self.window.as_tuple())]
        return out + [self.view] if self.view else out


class EmbeddingCache:
    """Image embeddings kept in memory (LRU, bounded in bytes) and optionally on disk.

    Parameters
    ----------
    max_bytes : int
        Memory budget; the least recently used embeddings leave first.
    disk_dir : path, optional
        Folder for the on-disk copy (``models.cache_dir() / "embeddings"`` is the
        plugin's default, see :func:`default_disk_dir`). Files are written with
        ``torch.save`` (tensors and plain values only) and read back with
        ``torch.load(weights_only=True)``: no pickled code runs.

    Notes
    -----
    Keys hold a hash of the plane's bytes, so an edited image never reuses a
    stale embedding ("invalidation" is automatic); :meth:`forget` frees the
    memory of an image that is gone. Thread-safe: workers put, the GUI reads.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, disk_dir: str | os.PathLike | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._mem: OrderedDict[CacheKey, Embedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._disk_index: dict[tuple[str, str, str], set[Window]] = {}
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    # -- sizes -----------------------------------------------------------------

    @staticmethod
    def _nbytes(e: Embedding) -> int:
        f = e.features
        return int(f.nelement() * f.element_size())

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)

    # -- lookup ----------------------------------------------------------------

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            if key in self._mem:
                return True
        return self._disk_path(key) is not None and self._disk_path(key).is_file()

    def in_memory(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._mem

    def windows(self, group: tuple[str, str, str]) -> set[Window]:
        """Windows cached (in memory or on disk) for one (image, model, normalisation), first orientation."""
        with self._lock:
            out = {k.window for k in self._mem if k.group == group and not k.view}
        return out | self._disk_windows(group)

    def get(self, key: CacheKey, device: str | None = None) -> Embedding | None:
        """The cached embedding, or None; a disk hit is moved to ``device`` and kept in memory."""
        with self._lock:
            e = self._mem.get(key)
            if e is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return e
        e = self._load(key, device)
        with self._lock:
            if e is None:
                self.misses += 1
                return None
            self.disk_hits += 1
        self._put_memory(key, e)
        return e

    def put(self, key: CacheKey, embedding: Embedding) -> None:
        """Keep an embedding (and write it to disk when a disk folder is set)."""
        self._put_memory(key, embedding)
        if self.disk_dir is not None:
            self._save(key, embedding)

    def _put_memory(self, key: CacheKey, embedding: Embedding) -> None:
        size = self._nbytes(embedding)
        with self._lock:
            if key in self._mem:
                self._bytes -= self._nbytes(self._mem.pop(key))
            if size > self.max_bytes:
                return
            self._mem[key] = embedding
            self._bytes += size
            while self._bytes > self.max_bytes and self._mem:
                _, old = self._mem.popitem(last=False)
                self._bytes -= self._nbytes(old)

    def forget(self, image: str | None = None, model: str | None = None, disk: bool = False) -> int:
        """Drop in-memory embeddings of an image and/or a model (all when both are None).

        Parameters
        ----------
        disk : bool
            Delete the matching files on disk as well.

        Returns
        -------
        int
            Number of in-memory entries dropped.
        """
        with self._lock:
            drop = [k for k in self._mem
                    if (image is None or k.image == image) and (model is None or k.model == model)]
            for k in drop:
                self._bytes -= self._nbytes(self._mem.pop(k))
            if disk and self.disk_dir is not None:
                for group in list(self._disk_index):
                    if (image is None or group[0] == image) and (model is None or group[1] == model):
                        for p in self.disk_dir.glob(f"{CacheKey(*group, Window(0, 0, 0, 0)).prefix()}_*.pt"):
                            p.unlink(missing_ok=True)  # every window and orientation
                        del self._disk_index[group]
                if image is None and model is None and self.disk_dir.is_dir():
                    for p in self.disk_dir.glob("*.pt"):
                        p.unlink(missing_ok=True)
        return len(drop)

    def clear(self) -> None:
        """Empty the in-memory cache (disk files stay)."""
        with self._lock:
            self._mem.clear()
            self._bytes = 0

    # -- disk ------------------------------------------------------------------

    def _disk_path(self, key: CacheKey) -> Path | None:
        return None if self.disk_dir is None else self.disk_dir / key.filename()

    def _disk_windows(self, group: tuple[str, str, str]) -> set[Window]:
        if self.disk_dir is None:
            return set()
        with self._lock:
            if group not in self._disk_index:
                prefix = CacheKey(*group, Window(0, 0, 0, 0)).prefix()
                found = set()
                if self.disk_dir.is_dir():
                    for p in self.disk_dir.glob(f"{prefix}_*.pt"):
                        parts = p.stem.split("_")
                        if len(parts) == 5:
                            try:
                                found.add(Window(*(int(v) for v in parts[1:])))
                            except ValueError:
                                continue
                self._disk_index[group] = found
            return set(self._disk_index[group])

    def _save(self, key: CacheKey, e: Embedding) -> None:
        import torch

        path = self._disk_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": DISK_FORMAT,
            "features": e.features.detach().to("cpu").contiguous(),
            "original_shape": list(e.transform.original_shape),
            "target": int(e.transform.target),
            "model_name": str(e.model_name),
            "key": key.as_list(),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}_{threading.get_ident()}")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return  # a full or read-only disk only costs the disk copy
        if not key.view:
            with self._lock:
                self._disk_index.setdefault(key.group, set()).add(key.window)

    def _load(self, key: CacheKey, device: str | None) -> Embedding | None:
        import torch

        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d.get("format") != DISK_FORMAT or d.get("key") != key.as_list():
                return None
            features = d["features"]
            if device is not None:
                features = features.to(device)
            transform = ResizeTransform(tuple(int(v) for v in d["original_shape"]), int(d["target"]))
            return Embedding(features=features, transform=transform, model_name=str(d["model_name"]))
        except Exception:  # a truncated or foreign file is a miss, and is removed
            path.unlink(missing_ok=True)
            return None


def resolve_mask_threshold(model: LoadedModel, value: float | None = None, boxes: bool = False,
                           clicks: bool = False) -> float:
    """The mask threshold to use: ``value``, else the model's default (see ``AnnotationConfig.mask_threshold``).

    ``boxes``: for prompts with a box, which a model with its own box decoder
    (:mod:`~napari_cellseg.core.box_head`) answers with that decoder and its
    own default, ``meta["box_mask_threshold"]``. ``clicks`` (with ``boxes``):
    for the box prompts the annotation mode makes of clicks from the cell map,
    ``meta["click_mask_threshold"]`` where the model has one (chosen on
    selection images by ``training/train_box_head.py``), else the box threshold.
    """
    if value is not None:
        return float(value)
    meta = getattr(model, "meta", None) or {}
    if boxes and "box_mask_threshold" in meta:
        from .box_head import get_box_decoder

        if get_box_decoder(model.sam) is not None:
            if clicks and meta.get("click_mask_threshold") is not None:
                return float(meta["click_mask_threshold"])
            return float(meta["box_mask_threshold"])
    if "prompt_mask_threshold" in meta:
        return float(meta["prompt_mask_threshold"])
    if str(meta.get("prompt_pathway", "")).startswith("base") and meta.get("base") in PROMPT_MASK_THRESHOLDS:
        # an adapter that leaves the base model's prompt pathway unchanged (the packaged cellseg)
        return float(PROMPT_MASK_THRESHOLDS[meta["base"]])
    entry = getattr(model, "entry", None)
    return float(PROMPT_MASK_THRESHOLDS.get(getattr(entry, "name", model.name), 0.0))


def default_disk_dir() -> Path:
    """The plugin's on-disk embedding folder: ``models.cache_dir() / "embeddings"``."""
    from .models import cache_dir

    return cache_dir() / "embeddings"


# ---------------------------------------------------------------------------
# the segmenter
# ---------------------------------------------------------------------------


#: ``map_scale="auto"`` measures the cells of a map window this many map crops a side around the first click
MEASURE_WINDOW = 4


class InteractiveSegmenter:
    """Segment objects from point and box prompts on one plane at a time.

    Parameters
    ----------
    model : LoadedModel
    cache : EmbeddingCache, optional
        Shared cache (a new in-memory one by default; pass one to keep
        embeddings across segmenters, e.g. after switching models back).
    config : AnnotationConfig, optional

    Notes
    -----
    One plane at a time: :meth:`set_image` it (cheap: a hash of the bytes; the
    normalisation runs only when an embedding must be computed). Long work is a
    generator yielding :class:`~napari_cellseg.core.progress.Progress`
    (:meth:`prepare`, :meth:`precompute`, :meth:`run`); its ``quit()`` in a
    napari worker stops at the next window.
    """

    def __init__(self, model: LoadedModel, cache: EmbeddingCache | None = None,
                 config: AnnotationConfig | None = None) -> None:
        self.model = model
        self.config = config or AnnotationConfig()
        if cache is None:
            cache = EmbeddingCache(
                max_bytes=int(self.config.max_memory_mb * 2**20),
                disk_dir=default_disk_dir() if self.config.disk_cache else None,
            )
        self.cache = cache
        self.predictor = Predictor(model)
        self._lock = threading.RLock()
        self._image: np.ndarray | None = None
        self._image01: np.ndarray | None = None
        self._channel: int | None = None
        self.image_key: str | None = None
        self._model_key: str | None = None
        # cell maps for clicks: (image, model, normalisation, window) -> (distance map, regions)
        self._maps: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # map_scale "auto": the zoom estimated per (image, model, normalisation), and the last estimate
        self._map_scales: dict[tuple, float] = {}
        self.size_estimate = None

    # -- image -----------------------------------------------------------------

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = model_fingerprint(self.model)
        return self._model_key

    @property
    def norm_key(self) -> str:
        return f"c{self._channel}-p{self.config.low:g}-{self.config.high:g}"

    @property
    def image_shape(self) -> tuple[int, int]:
        if self._image is None:
            raise RuntimeError("no image is set: call set_image() first")
        return tuple(self._image.shape[:2])

    def set_image(self, image: np.ndarray, channel: int | None = None, key: str | None = None) -> str:
        """Use a 2D plane (``(M, N)``, RGB ``(M, N, 3)``, or ``(M, N, C)`` with ``channel``).

        The plane is copied (later edits of the caller's array do not reach a
        running computation). Returns its content key.
        """
        from .preprocess import as_plane

        as_plane(image, channel)  # validates shape and dtype with a helpful message
        arr = np.array(image, copy=True)
        key = key or image_key(arr)
        with self._lock:
            if key != self.image_key or channel != self._channel:
                self._image01 = None
            self._image = arr
            self._channel = channel
            self.image_key = key
        return key

    def _normalised(self) -> np.ndarray:
        with self._lock:
            if self._image01 is None:
                if self._image is None:
                    raise RuntimeError("no image is set: call set_image() first")
                self._image01 = normalize_image(self._image, channel=self._channel,
                                                low=self.config.low, high=self.config.high)
            return self._image01

    # -- windows ---------------------------------------------------------------

    def zoom_active(self) -> bool:
        """Whether prompts get their own window on this plane (see ``AnnotationConfig.zoom``)."""
        if self.config.zoom == "off":
            return False
        if self.config.zoom == "on":
            return True
        if self.min_window < self.model.input_size:
            # a small-input model upsamples windows smaller than its input: the zoom pays on small planes too
            return max(self.image_shape) > self.min_window
        return max(self.image_shape) > self.config.zoom_ratio * self.model.input_size

    def key_for(self, window: Window, view: int = 0) -> CacheKey:
        if self.image_key is None:
            raise RuntimeError("no image is set: call set_image() first")
        return CacheKey(self.image_key, self.model_key, self.norm_key, window, int(view))

    @property
    def views(self) -> int:
        """Orientations per window in use (see ``AnnotationConfig.views``)."""
        if self.config.views is not None:
            return int(self.config.views)
        on_cpu = str(self.model.device).split(":")[0] == "cpu"
        return 1 if on_cpu or self.model.input_size > SMALL_INPUT else max(VIEW_COUNTS)

    @property
    def inverted(self) -> bool:
        """Whether windows are also embedded with inverted intensities (see ``AnnotationConfig.invert``)."""
        from .finetune import PROMPT_RECIPES

        if self.config.invert is not None:
            return bool(self.config.invert)
        colour = self._image is not None and self._image.ndim == 3 and self._channel is None
        # a prompt path fine-tuned by this plugin learnt one contrast (the prompt recipe does not invert)
        tuned_prompts = (getattr(self.model, "meta", None) or {}).get("recipe") in PROMPT_RECIPES
        return self.model.input_size <= SMALL_INPUT and not colour and not tuned_prompts

    def view_codes(self) -> list[int]:
        """View codes an answer averages: the orientations of :attr:`views`, then the same inverted."""
        codes = list(range(self.views))
        return codes + [v | INVERTED for v in codes] if self.inverted else codes

    @staticmethod
    def describe_view(view: int) -> str:
        """A view code in words, for progress messages."""
        orientation = f"orientation {(view & 7) + 1}"
        return f"{orientation}, inverted contrast" if view & INVERTED else orientation

    def cached_windows(self) -> set[Window]:
        return self.cache.windows((self.image_key, self.model_key, self.norm_key))

    def window_for(self, prompt: ObjectPrompt, candidates: Iterable[Window] | None = None) -> Window:
        """The window this prompt is answered in (the whole plane when the zoom is off)."""
        shape = self.image_shape
        if not self.zoom_active():
            return Window.whole(shape)
        extent = prompt.extent()
        if extent is None:
            raise ValueError("an object needs a box or at least one positive point")
        if candidates is None:
            candidates = self.cached_windows()
        return choose_window(extent, shape, self.model.input_size, context=self.config.context,
                             min_margin=self.config.min_margin, min_window=self.min_window,
                             candidates=candidates)

    def windows_for(self, prompts: Sequence[ObjectPrompt]) -> list[Window]:
        """The window of every prompt (prompts sharing a window share an embedding)."""
        cands = set(self.cached_windows()) if self.zoom_active() else set()
        out = []
        for p in prompts:
            if p.answer is not None:  # answered by the map: its window, no embedding
                out.append(p.answer.window)
                continue
            w = self.window_for(p, cands)
            cands.add(w)  # later prompts may reuse a window chosen for an earlier one
            out.append(w)
        return out

    def missing_windows(self, prompts: Sequence[ObjectPrompt]) -> list[Window]:
        """Windows the prompts need that are not cached yet (first orientation; no computation)."""
        seen = []
        for p, w in zip(prompts, self.windows_for(prompts)):
            if p.answer is None and w not in seen and self.key_for(w) not in self.cache:
                seen.append(w)
        return seen

    def missing_views(self, prompts: Sequence[ObjectPrompt]) -> list[tuple[Window, int]]:
        """(window, view code) pairs beyond the first that :meth:`view_codes` needs and are not cached."""
        out: list[tuple[Window, int]] = []
        codes = self.view_codes()[1:]
        for p, w in zip(prompts, self.windows_for(prompts)):
            if p.answer is not None:
                continue
            for v in codes:
                if (w, v) not in out and self.key_for(w, v) not in self.cache:
                    out.append((w, v))
        return out

    @property
    def mask_threshold(self) -> float:
        """Logit threshold in use (see ``AnnotationConfig.mask_threshold``)."""
        return resolve_mask_threshold(self.model, self.config.mask_threshold)

    @property
    def box_mask_threshold(self) -> float:
        """Logit threshold of prompts with a box (the box decoder's default where the model has one)."""
        return resolve_mask_threshold(self.model, self.config.mask_threshold, boxes=True)

    @property
    def click_mask_threshold(self) -> float:
        """Logit threshold of clicks drawn from their map cell's box (see :func:`resolve_mask_threshold`)."""
        return resolve_mask_threshold(self.model, self.config.mask_threshold, boxes=True, clicks=True)

    @property
    def min_window(self) -> int:
        """Smallest zoom window side (see ``AnnotationConfig.min_window``)."""
        if self.config.min_window:
            return int(self.config.min_window)
        size = int(self.model.input_size)
        return max(16, size // 4) if size <= SMALL_INPUT else size

    def tiles(self, overlap: float = 0.5) -> list[Window]:
        """Overlapping tiles of the model input size covering the plane (the whole plane without zoom)."""
        shape = self.image_shape
        if not self.zoom_active():
            return [Window.whole(shape)]
        side = int(self.model.input_size)
        ov = int(side * overlap)
        rows = tile_starts(shape[0], side, ov)
        cols = tile_starts(shape[1], side, ov)
        return [Window(r, c, min(r + side, shape[0]), min(c + side, shape[1])) for r in rows for c in cols]

    # -- embeddings --------------------------------------------------------------

    def embedding(self, window: Window, view: int = 0) -> Embedding:
        """The embedding of a window in one view (orientation, contrast): from the cache, else computed now
        (blocking)."""
        key = self.key_for(window, view)
        e = self.cache.get(key, device=self.model.device)
        if e is not None:
            return e
        image01 = self._normalised()
        crop = np.ascontiguousarray(view_image(image01[window.slices], view))
        with self._lock:
            e = self.predictor.embed(crop)
        self.cache.put(key, e)
        return e

    def _embed_all(self, windows: Sequence[Window], what: str) -> Generator[Progress, None, int]:
        todo = [w for w in windows if self.key_for(w) not in self.cache]
        n = len(todo)
        for i, w in enumerate(todo):
            yield Progress(i, n, f"{what} {i + 1}/{n} ({w.shape[0]}x{w.shape[1]} px)")
            self.embedding(w)
        yield Progress(n, n, f"{what}: done" if n else "embedding cached")
        return n

    def prepare(self, prompts: Sequence[ObjectPrompt]) -> Generator[Progress, None, int]:
        """Compute the embeddings the prompts need, every orientation (a generator; returns how many)."""
        n = yield from self._embed_all(self.missing_windows(prompts), "embedding window")
        return n + (yield from self._embed_views(self.missing_views(prompts)))

    def _embed_views(self, todo: Sequence[tuple[Window, int]]) -> Generator[Progress, None, int]:
        n = len(todo)
        for i, (w, v) in enumerate(todo):
            yield Progress(i, n, f"embedding {self.describe_view(v)} ({i + 1}/{n})")
            self.embedding(w, v)
        return n

    def precompute(self, tiles: bool | None = None) -> Generator[Progress, None, int]:
        """Embed the plane ahead of the prompts (a generator; returns how many windows were computed).

        Parameters
        ----------
        tiles : bool, optional
            Embed overlapping tiles of the model input size (:meth:`tiles`)
            instead of the whole plane at once. Default: tiles when the zoom is
            active and its windows are the model input size (large-input models
            on large images: prompts are then answered from the tiles), else the
            whole plane, which gives instant first answers
            (:meth:`run` with ``coarse_first``) while zoom windows are computed.
            Windows that answer prompts (tiles, or the plane with the zoom off)
            are embedded in every view :meth:`view_codes` asks for.
        """
        if tiles is None:
            tiles = self.zoom_active() and self.min_window >= self.model.input_size
        windows = self.tiles() if tiles else [Window.whole(self.image_shape)]
        n = yield from self._embed_all(windows, "embedding tile" if tiles else "embedding the plane")
        if tiles or not self.zoom_active():  # these windows answer the prompts: every orientation they need
            todo = [(w, v) for w in windows for v in self.view_codes()[1:] if self.key_for(w, v) not in self.cache]
            n += yield from self._embed_views(todo)
        return n

    # -- clicks answered from the cell map ----------------------------------------

    def map_guided(self) -> bool:
        """Whether clicks on this plane are answered from the model's cell map (``clicks_from_map``)."""
        from .automatic import MIN_IMAGE_SIDE, is_distance_model

        return (bool(self.config.clicks_from_map) and is_distance_model(self.model)
                and min(self.image_shape) >= MIN_IMAGE_SIDE)

    def map_scale(self) -> float:
        """The zoom of this plane's click maps: ``map_scale``, or for ``"auto"`` the estimate made on this plane
        (:meth:`estimate_map_scale`; 1 until then)."""
        from .automatic import AUTO_SCALE

        if self.config.map_scale != AUTO_SCALE:
            return float(self.config.map_scale)
        return self._map_scales.get((self.image_key, self.model_key, self.norm_key), 1.0)

    def _needs_map_estimate(self, prompts: Sequence[ObjectPrompt]) -> bool:
        from .automatic import AUTO_SCALE
        from .cell_size import model_cell_sizes

        return (self.config.map_scale == AUTO_SCALE and self.map_guided()
                and (self.image_key, self.model_key, self.norm_key) not in self._map_scales
                and any(self._is_click(p) for p in prompts) and bool(model_cell_sizes(self.model.meta)))

    def estimate_map_scale(self, prompts: Sequence[ObjectPrompt]):
        """For ``map_scale="auto"``: the zoom of this plane's click maps, estimated once from the cells of a map
        at zoom 1 of :data:`MEASURE_WINDOW` crops a side around the first click among ``prompts`` (blocking:
        computes that map). Returns the :class:`~napari_cellseg.core.cell_size.SizeEstimate` when it made one,
        else None."""
        from . import cell_size
        from .automatic import MAX_SCALE, MIN_SCALE, largest_scale

        if not self._needs_map_estimate(prompts):
            return None
        click = next(p for p in prompts if self._is_click(p))
        # a window of MEASURE_WINDOW map crops a side around the click, at zoom 1 (nothing is estimated yet): a
        # click window alone holds too few large cells to measure
        cfg = replace(self._map_config(), zoom_views=())  # measured on a plain map, as the automatic zoom
        window = self._centred_window(click.positive.mean(axis=0), MEASURE_WINDOW * cfg.crop_size)
        # not kept as a click map: a click is answered better from a window centred on it (measured: click IoU
        # 0.37 -> 0.27 on a phase-contrast image when later clicks reused this window's map)
        _, regions = self._compute_map(window, cfg)
        estimate = cell_size.estimate_scale(regions, self._normalised()[window.slices],
                                            cell_size.model_cell_sizes(self.model.meta), MIN_SCALE,
                                            min(MAX_SCALE, largest_scale(self.image_shape)))
        self._map_scales[(self.image_key, self.model_key, self.norm_key)] = estimate.scale
        self.size_estimate = estimate
        return estimate

    def _map_config(self):
        from .automatic import DistanceConfig, model_distance_defaults

        return DistanceConfig(**{**model_distance_defaults(self.model), "scale": self.map_scale(),
                                 "zoom_views": tuple(self.config.map_zoom_views)})

    def _map_group(self) -> tuple:
        """What a cached map depends on besides its window: plane, model, normalisation and zoom."""
        return (self.image_key, self.model_key, self.norm_key, self.map_scale(), tuple(self.config.map_zoom_views))

    def _map_key(self, window: Window) -> tuple:
        return (*self._map_group(), window)

    def _cached_map_windows(self) -> list[Window]:
        group = self._map_group()
        return [k[-1] for k in self._maps if k[:-1] == group]

    def map_window(self, point, candidates: Iterable[Window] = ()) -> Window:
        """The window whose cell map answers a click at ``point`` (row, col).

        A candidate (cached) window is reused when the click lies at least a
        quarter of its side from each of its edges inside the plane; else a
        new window of the model's crop size over ``map_scale`` centred on the click.
        """
        shape = self.image_shape
        cfg = self._map_config()
        side = int(round(cfg.crop_size / cfg.scale))
        r, c = float(point[0]), float(point[1])
        room = side / 4
        for w in sorted(candidates, key=lambda w: w.as_tuple()):
            if ((w.r0 == 0 or r - w.r0 >= room) and (w.r1 == shape[0] or w.r1 - r >= room)
                    and (w.c0 == 0 or c - w.c0 >= room) and (w.c1 == shape[1] or w.c1 - c >= room)
                    and w.r0 <= r < w.r1 and w.c0 <= c < w.c1):
                return w
        return self._centred_window((r, c), side)

    def _centred_window(self, point, side: int) -> Window:
        """A window of ``side`` pixels centred on ``point``, shifted and clipped to the plane."""
        shape = self.image_shape
        r0 = int(np.clip(round(point[0] - side / 2), 0, max(0, shape[0] - side)))
        c0 = int(np.clip(round(point[1] - side / 2), 0, max(0, shape[1] - side)))
        return Window(r0, c0, min(r0 + side, shape[0]), min(c0 + side, shape[1]))

    def _compute_map(self, window: Window, cfg) -> tuple[np.ndarray, np.ndarray]:
        """The distance map of a window with ``cfg`` and its cells (``labels_from_distance_map``); blocking."""
        from . import postprocess as pp
        from .automatic import predict_distance_map
        from .progress import run_to_completion

        crop = np.ascontiguousarray(self._normalised()[window.slices])
        with self._lock:
            dmap = run_to_completion(predict_distance_map(None, self.model, cfg, image01=crop))
        return dmap, pp.labels_from_distance_map(dmap, cfg.peak, cfg.fill, cfg.min_size, cfg.fill_holes)

    def cell_map(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """The distance map of a window and its cells (``labels_from_distance_map``), cached; blocking."""
        key = self._map_key(window)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        dmap, regions = self._compute_map(window, self._map_config())
        self._maps[key] = (dmap, regions)
        while len(self._maps) > 64:
            self._maps.popitem(last=False)
        return dmap, regions

    @staticmethod
    def _is_click(p: ObjectPrompt) -> bool:
        return p.box is None and bool((p.labels > 0).any())

    def missing_maps(self, prompts: Sequence[ObjectPrompt]) -> list[Window]:
        """Map windows the clicks among ``prompts`` need that are not computed yet (no computation)."""
        if not self.map_guided():
            return []
        cands = self._cached_map_windows()
        out: list[Window] = []
        for p in prompts:
            if self._is_click(p):
                w = self.map_window(p.positive.mean(axis=0), cands + out)
                if w not in cands and w not in out:
                    out.append(w)
        return out

    def guide_clicks(self, prompts: Sequence[ObjectPrompt]) -> list[ObjectPrompt]:
        """The prompts with each click replaced by the box of its cell in the map (see ``clicks_from_map``).

        A click answered by the map cell itself (``click_answer="map"``, or a
        model that cannot draw from prompts) carries it as ``answer`` (and the
        box). Maps not computed yet are computed here (blocking; :meth:`run`
        computes them first, with progress). A click on which the map sees no cell gets a
        box of the window's typical cell size (``missed_click="box"``, the
        default) or is returned unchanged, as are prompts with a box.
        """
        from . import postprocess as pp

        prompts = list(prompts)
        if not self.map_guided():
            return prompts
        self.estimate_map_scale(prompts)
        shape = self.image_shape
        out = []
        for p in prompts:
            if not self._is_click(p):
                out.append(p)
                continue
            centre = p.positive.mean(axis=0)
            negative = p.labels <= 0  # negative points go along with the box
            window = self.map_window(centre, self._cached_map_windows())
            cell = self._cell_under(p, window)
            if cell is not None and window != (fresh := self.map_window(centre)) and _touches_inner_edge(
                    cell, window, shape):
                window, cell = fresh, self._cell_under(p, fresh)  # cut by a reused window's edge
            if cell is None:
                box = self._typical_box(centre, window) if self._draws_prompts() else None
                if box is None:
                    out.append(p)
                else:
                    out.append(ObjectPrompt(points=p.points[negative], labels=p.labels[negative], box=box,
                                            from_click=True))
                continue
            dmap, _ = self.cell_map(window)
            # the guided mode's box: grown by 10 % (at least 2 px), clipped to the window
            _, _, boxes = pp.region_prompts(cell.astype(np.int32), dmap, margin=0.1)
            box = boxes[0] + np.tile(window.offset, 2)
            if self._draws_prompts() and (typical := self._merged_box(cell, centre, window)) is not None:
                box = typical  # the map merged this cell with its neighbours: a box of one cell's size
            answer = None
            if not self._draws_prompts() or (self.config.click_answer == "map" and not negative.any()):
                crop, off = _tight(cell, window.offset)
                answer = ObjectMask(mask=crop, offset=off, score=float(dmap[cell].max()), window=window)
            keep = negative | (p.labels > 0) if self._click_point() else negative
            out.append(ObjectPrompt(points=p.points[keep], labels=p.labels[keep], box=box, answer=answer,
                                    from_click=True))
        return out

    def _click_point(self) -> bool:
        """Whether a click's box goes to SAM with the click itself (``click_point``)."""
        if self.config.click_point is not None:
            return bool(self.config.click_point)
        return float((self.model.meta.get("box_head") or {}).get("clicks") or 0.0) > 0.0

    def _map_cell_areas(self, window: Window) -> np.ndarray:
        """Areas (px) of the cells of ``window``'s cell map."""
        _, regions = self.cell_map(window)
        areas = np.bincount(regions.ravel())[1:]
        return areas[areas > 0]

    def _merged_box(self, cell: np.ndarray, centre: np.ndarray, window: Window) -> np.ndarray | None:
        """The typical box around ``centre`` when the map cell ``cell`` looks merged (``merged_ratio``), else None."""
        ratio = self.config.merged_ratio
        if ratio is None:
            return None
        areas = self._map_cell_areas(window)
        if len(areas) < 3 or cell.sum() <= ratio * float(np.median(areas)):
            return None
        return self._typical_box(centre, window, always=True)

    def _typical_box(self, centre: np.ndarray, window: Window, always: bool = False) -> np.ndarray | None:
        """A box of the window's typical map-cell size centred on ``centre`` (``missed_click="box"``), or None."""
        if self.config.missed_click != "box" and not always:
            return None
        areas = self._map_cell_areas(window)
        if not len(areas):
            return None
        half = TYPICAL_BOX_GROWTH * np.sqrt(4.0 * float(np.median(areas)) / np.pi) / 2.0
        rows, cols = self.image_shape
        r, c = float(centre[0]), float(centre[1])
        return np.array([max(0.0, r - half), max(0.0, c - half), min(float(rows), r + half + 1),
                         min(float(cols), c + half + 1)])

    def _draws_prompts(self) -> bool:
        """False for models whose mask decoder was retrained to draw the map (no ``"prompt"`` capability)."""
        entry = getattr(self.model, "entry", None)
        return "prompt" in tuple(getattr(entry, "capabilities", ("prompt",)))

    def _cell_under(self, p: ObjectPrompt, window: Window) -> np.ndarray | None:
        """Union of the map cells under the prompt's positive points, less those under negative ones."""
        _, regions = self.cell_map(window)
        local = p.points - np.array(window.offset, float)
        ids: set[int] = set()
        for (r, c), lab in zip(local, p.labels):
            if lab > 0:
                k = _region_near(regions, r, c, int(self.config.map_radius))
                if k:
                    ids.add(k)
        for (r, c), lab in zip(local, p.labels):
            if lab <= 0:
                k = _region_near(regions, r, c, 0)
                ids.discard(k)
        if not ids:
            return None
        return np.isin(regions, sorted(ids))

    # -- decoding ----------------------------------------------------------------

    def segment(self, prompt: ObjectPrompt) -> ObjectMask:
        """Segment one object (computing its embedding first if needed)."""
        return self.segment_many([prompt])[0]

    def coarse_windows(self, prompts: Sequence[ObjectPrompt]) -> list[Window | None]:
        """For each prompt, the finest *cached* window that holds it (None where there is none).

        Used for an instant first answer while the prompt's own zoom window is
        being embedded (a whole-plane embedding holds every prompt).
        """
        cands = sorted(self.cached_windows(), key=lambda w: (w.side, w.as_tuple()))
        out: list[Window | None] = []
        for p in prompts:
            if p.answer is not None:
                out.append(p.answer.window)
                continue
            ext = p.extent()
            found = None
            if ext is not None:
                for w in cands:
                    m = self.config.min_margin * w.side / 2
                    grown = _grown(ext, m, m, self.image_shape)
                    if w.contains(grown):
                        found = w
                        break
            out.append(found)
        return out

    def segment_many(self, prompts: Sequence[ObjectPrompt], batch_size: int = 32,
                     windows: Sequence[Window] | None = None, views: Sequence[int] | None = None
                     ) -> list[ObjectMask]:
        """Segment several objects, one per prompt, batched per window.

        A lone positive point (no box, no other point) is ambiguous: the best
        of SAM's three candidate masks by predicted IoU is kept, as in SAM's
        automatic mode. Negative points outside an object's window are dropped.

        Parameters
        ----------
        prompts : sequence of ObjectPrompt
        batch_size : int
            Objects decoded together.
        windows : sequence of Window, optional
            Override the window of each prompt (default: :meth:`windows_for`).
        views : sequence of int, optional
            View codes averaged (default :meth:`view_codes`; ``[0]``: the
            first view alone); missing ones are computed here (blocking).

        Returns
        -------
        list of ObjectMask
            In the order of ``prompts``; empty masks have ``area == 0``.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if p.is_empty:
                raise ValueError(f"prompt {i} has neither a box nor a positive point")
        if windows is None:
            prompts = self.guide_clicks(prompts)
            windows = self.windows_for(prompts)
        else:
            windows = list(windows)
        if len(windows) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(windows)} windows")
        views = self.view_codes() if views is None else [int(v) for v in views]
        groups: dict[tuple, list[int]] = {}
        out: list[ObjectMask | None] = [None] * len(prompts)
        for i, (p, w) in enumerate(zip(prompts, windows)):
            if p.answer is not None:
                out[i] = replace(p.answer, prompt_index=i)
                continue
            single = p.box is None and len(p.points) == 1
            groups.setdefault((w, p.box is not None, single, p.box is not None and p.from_click), []).append(i)
        for (w, has_box, single, click), idx in groups.items():
            emb = self.embedding(w)
            threshold = (self.click_mask_threshold if click else self.box_mask_threshold if has_box
                         else self.mask_threshold)
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                for i, obj in zip(chunk, self._decode_group(emb, w, [prompts[i] for i in chunk],
                                                            has_box, single, views, threshold)):
                    obj.prompt_index = i
                    out[i] = obj
        return out  # type: ignore[return-value]

    def _decode_group(self, emb: Embedding, window: Window, prompts: list[ObjectPrompt], has_box: bool,
                      single: bool, views: Sequence[int] = (0,), threshold: float | None = None
                      ) -> list[ObjectMask]:
        import torch

        r0, c0 = window.offset
        h, w = window.shape
        npts = max(len(p.points) for p in prompts)
        pts = lab = None
        if npts:
            pts = np.zeros((len(prompts), npts, 2))
            lab = np.full((len(prompts), npts), -1.0)  # -1: padding, ignored by SAM
            for b, p in enumerate(prompts):
                local = p.points - (r0, c0)
                keep = ((local[:, 0] >= -0.5) & (local[:, 0] <= h - 0.5)
                        & (local[:, 1] >= -0.5) & (local[:, 1] <= w - 0.5))
                k = int(keep.sum())
                pts[b, :k] = local[keep]
                lab[b, :k] = p.labels[keep]
        boxes = None
        if has_box:
            boxes = np.stack([p.box for p in prompts]) - np.array([r0, c0, r0, c0], float)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, h)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, w)
        total = None
        score_sum = 0.0
        for v in views:
            e = emb if v == 0 else self.embedding(window, v)
            vpts = None if pts is None else view_points(pts, v, (h, w))
            vboxes = None if boxes is None else view_boxes(boxes, v, (h, w))
            with self._lock:
                self.predictor.set_embedding(e)
                # a lone click is ambiguous: the best of SAM's three candidates, the only one upscaled
                _, scores, low = self.predictor.decode(vpts, lab, vboxes, multimask=single, best=single,
                                                       upsample=False)
                with torch.inference_mode():
                    logits = self.predictor.upsample_logits(torch.from_numpy(np.ascontiguousarray(low)))[:, 0]
                    logits = unview_tensor(logits, v)
            total = logits if total is None else total + logits
            score_sum = score_sum + np.asarray(scores)
        if threshold is None:
            threshold = self.box_mask_threshold if has_box else self.mask_threshold
        masks = (total / len(views) > threshold).numpy()
        scores = score_sum / len(views)
        result = []
        for b in range(len(prompts)):
            crop, off = _tight(masks[b], (r0, c0))
            result.append(ObjectMask(mask=crop, offset=off, score=float(scores[b, 0]), window=window))
        return result

    def run(self, prompts: Sequence[ObjectPrompt], coarse_first: bool = True
            ) -> Generator[Progress, None, list[ObjectMask]]:
        """Worker body: embed what is missing (yielding progress), then segment every prompt.

        With ``coarse_first``, when windows must be embedded but every prompt
        lies in some cached window (e.g. a whole-plane embedding), a first
        answer from those is yielded at once as ``Progress.data["objects"]``
        (with ``data["coarse"] = True``), then refined. When the answer
        averages several views (orientations, inverted contrast), the first
        view's answer is yielded the same way before the average, even when
        every view is cached: the preview keeps the latency of one decoder pass.
        """
        if self._needs_map_estimate(prompts):
            yield Progress(0, 1, "measuring the cells around the click for the map zoom")
            estimate = self.estimate_map_scale(prompts)
            yield Progress(1, 1, f"map {estimate.message}")
        maps = self.missing_maps(prompts)
        for i, w in enumerate(maps):
            yield Progress(i, len(maps), f"cell map around the click {i + 1}/{len(maps)}")
            self.cell_map(w)
        prompts = self.guide_clicks(prompts)
        missing = self.missing_windows(prompts)
        if missing and coarse_first:
            coarse = self.coarse_windows(prompts)
            if all(w is not None for w in coarse):
                objects = self.segment_many(prompts, windows=coarse, views=[0])
                yield Progress(0, len(missing), "first answer from a cached embedding; refining…",
                               data={"objects": objects, "coarse": True})
        yield from self._embed_all(missing, "embedding window")
        windows = self.windows_for(prompts)
        more = self.missing_views(prompts)
        if more or (coarse_first and len(self.view_codes()) > 1):
            # the first view's answer at once (one decoder pass), while the other views are embedded or decoded
            objects = self.segment_many(prompts, windows=windows, views=[0])
            yield Progress(0, len(more), f"answer from one view; averaging {len(self.view_codes())}…",
                           data={"objects": objects, "coarse": True})
            yield from self._embed_views(more)
        return self.segment_many(prompts, windows=windows)


def _region_near(regions: np.ndarray, r: float, c: float, radius: int) -> int:
    """The region at pixel (r, c), else the nearest one within ``radius`` pixels (0: none)."""
    h, w = regions.shape
    ri, ci = int(round(r)), int(round(c))
    if not (0 <= ri < h and 0 <= ci < w):
        return 0
    if regions[ri, ci] or radius <= 0:
        return int(regions[ri, ci])
    r0, r1 = max(0, ri - radius), min(h, ri + radius + 1)
    c0, c1 = max(0, ci - radius), min(w, ci + radius + 1)
    patch = regions[r0:r1, c0:c1]
    rr, cc = np.nonzero(patch)
    if rr.size == 0:
        return 0
    d2 = (rr + r0 - ri) ** 2 + (cc + c0 - ci) ** 2
    k = int(np.argmin(d2))
    return int(patch[rr[k], cc[k]]) if d2[k] <= radius * radius else 0


def _touches_inner_edge(mask: np.ndarray, window: Window, shape: Sequence[int]) -> bool:
    """True when the mask (window-sized) reaches an edge of the window that is not the plane's border."""
    return bool((window.r0 > 0 and mask[0].any()) or (window.r1 < shape[0] and mask[-1].any())
                or (window.c0 > 0 and mask[:, 0].any()) or (window.c1 < shape[1] and mask[:, -1].any()))


def segment_boxes(segmenter: InteractiveSegmenter, boxes: np.ndarray) -> list[ObjectMask]:
    """One object per box ``(B, 4)`` (r0, c0, r1, c1) on the segmenter's current plane."""
    return segmenter.segment_many([ObjectPrompt(box=b) for b in np.asarray(boxes, float).reshape(-1, 4)])


# ---------------------------------------------------------------------------
# committing into a label image
# ---------------------------------------------------------------------------


@dataclass
class CommitPlan:
    """The minimal write that commits objects into a label plane.

    Attributes
    ----------
    rows, cols : ndarray of int
        Plane coordinates of the pixels to write.
    values : ndarray
        The new label of each pixel (target dtype).
    ids : list of int
        The id given to each object, 0 for an object that was skipped.
    skipped : list of (int, str)
        (object index, reason) of objects that write nothing.
    kept_pixels : int
        Pixels of new objects left to existing labels (overlap policy).
    """

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    ids: list[int]
    skipped: list[tuple[int, str]]
    kept_pixels: int = 0

    @property
    def n_written(self) -> int:
        return sum(1 for i in self.ids if i)


def plan_commit(
    target: np.ndarray,
    objects: Sequence[ObjectMask],
    next_id: int | None = None,
    overwrite: bool = False,
) -> CommitPlan:
    """Plan writing objects into a label plane with new ids, under the overlap policy.

    Overlap policy
    --------------
    * Existing labels are kept: a new object only takes background (0) pixels,
      unless ``overwrite`` is True, then it takes every pixel of its mask (an
      existing label may shrink, or vanish if fully covered).
    * Where new objects overlap each other, the pixel goes to the object with
      the higher predicted score (the earlier object on ties).
    * Objects are numbered ``next_id, next_id + 1, ...`` in their order; an
      object left with no pixel (empty mask, or all of it already labelled)
      is skipped and consumes no id.

    Parameters
    ----------
    target : ndarray of int, shape (M, N)
        The current label plane (read only).
    objects : sequence of ObjectMask
    next_id : int, optional
        First new id (default ``target.max() + 1``; pass the maximum over the
        whole layer for stacks).
    overwrite : bool

    Raises
    ------
    ValueError
        When the new ids do not fit the target's dtype.

    Examples
    --------
    >>> t = np.zeros((4, 4), np.uint8); t[0, :2] = 5
    >>> m = ObjectMask(np.ones((2, 3), bool), (0, 0), 0.9, Window(0, 0, 4, 4))
    >>> plan = plan_commit(t, [m])
    >>> plan.ids, plan.kept_pixels, sorted(set(plan.values.tolist()))
    ([6], 2, [6])
    """
    target = np.asarray(target)
    if target.ndim != 2:
        raise ValueError(f"target must be a label plane (M, N), got shape {target.shape}")
    if not np.issubdtype(target.dtype, np.integer):
        raise TypeError(f"target labels must be integers, got dtype {target.dtype}")
    if next_id is None:
        next_id = int(target.max(initial=0)) + 1
    shape = target.shape
    n = len(objects)
    # pixels wanted by each object, in full-plane flat indices
    order = sorted(range(n), key=lambda k: (-objects[k].score, k))
    claimed = {}
    taken = np.zeros(0, np.int64)
    skipped: list[tuple[int, str]] = []
    kept = 0
    for k in order:
        obj = objects[k]
        r0, c0, r1, c1 = obj.bbox
        if obj.area == 0:
            skipped.append((k, "empty mask"))
            continue
        if r0 < 0 or c0 < 0 or r1 > shape[0] or c1 > shape[1]:
            raise ValueError(f"object {k} (bbox {obj.bbox}) lies outside the target plane {shape}")
        rr, cc = obj.coords()
        flat = rr.astype(np.int64) * shape[1] + cc
        if not overwrite:
            free = target[rr, cc] == 0
            kept += int((~free).sum())
            flat = flat[free]
        if taken.size:
            flat = flat[~np.isin(flat, taken, assume_unique=False)]
        if flat.size == 0:
            skipped.append((k, "covered by existing labels" if not overwrite else "covered by other objects"))
            continue
        claimed[k] = flat
        taken = np.concatenate([taken, flat])
    ids = [0] * n
    nid = next_id
    for k in range(n):
        if k in claimed:
            ids[k] = nid
            nid += 1
    if claimed:
        top = max(ids)
        info = np.iinfo(target.dtype)
        if top > info.max:
            raise ValueError(
                f"the target layer's dtype {target.dtype} cannot hold label {top}: convert the layer to a "
                "wider integer type (e.g. uint32) first"
            )
    flats = [claimed[k] for k in range(n) if k in claimed]
    vals = [np.full(len(claimed[k]), ids[k], target.dtype) for k in range(n) if k in claimed]
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int64)
    values = np.concatenate(vals) if vals else np.zeros(0, target.dtype)
    skipped.sort()
    return CommitPlan(rows=flat // shape[1], cols=flat % shape[1], values=values, ids=ids, skipped=skipped,
                      kept_pixels=kept)
