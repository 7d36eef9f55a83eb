"""Fine-tune a SAM-family model on images and their label images, on a CPU.

Two recipes, from two papers (their facts and parameters; the code is ours):

``"prompt"`` (CellSeg1, Zhou et al. 2024)
    LoRA of rank 4 on the query and value projections of the mask decoder's
    attention layers (and, optionally, of the image encoder's attention).
    Every annotated cell gives a single-point prompt drawn from the top 20 % of
    its distance transform; background points are drawn from the top 20 % of
    the background's distance transform (kept inside the annotated region).
    Each point is its own prompt. Loss: binary cross-entropy of the mask for
    cell points, plus the mean squared error between SAM's IoU head and the
    cell probability (1 for a cell point, 0 for a background point). AdamW with
    a one-cycle schedule (max lr 3e-3, 30 % warm-up). Flips, rotations, scale,
    brightness and contrast augmentation. Gradients are clipped at norm 1.

    Changes for napari-cellseg, each measured or needed by the product:

    * boxes: each cell's (slightly jittered) box is a prompt too
      (``prompt_types``; at every step a cell is prompted by a point or a box),
      so annotation boxes keep working after fine-tuning;
    * the encoder's neck is trained too (``encoder_tail``; see there);
    * after training, SAM's three multimask outputs become copies of the
      trained single output (``multimask="tie"``), because the annotation mode
      decodes a click with ``multimask=True`` and keeps the best-scored
      candidate, and LiteMedSAM never trained those outputs;
    * a Dice term joins the BCE (``dice_weight``): with the pixel-averaged BCE
      alone, click masks on Usiigaci shrank instead of growing;
    * at most 8 cells and 4 background points per step (CellSeg1: 30 and 15,
      ``max_cells`` / ``max_negatives``): on a CPU every prompt costs a full
      decoder pass, and more, smaller steps learn faster per minute;
    * the prompt encoder's point embeddings are trained as well
      (``train_point_embeddings``, 5 x 256 numbers): LiteMedSAM's point pathway
      was never trained.

``"distance"`` (SAMCell, VandeLoo et al. 2025)
    SAM's default (empty) prompt regresses a map: each cell's distance
    transform divided by its own maximum. Mean squared error on the sigmoid of
    :func:`~napari_cellseg.core.predictor.default_prompt_logits`. The whole mask
    decoder is trained (encoder LoRA optional); AdamW, weight decay 0.1,
    warm-up then linear decay; augmentation includes intensity inversion.
    Views are 256 px crops with CLAHE, as distance-map inference sees them.

    Changes for napari-cellseg, measured on Usiigaci (one training image,
    held-out images 36-45):

    * the encoder's neck is trained too (``encoder_tail="neck"``): SAM's
      decoder cannot mix neighbouring image tokens, and with a frozen encoder
      the map stayed a blurry read-out of frozen features;
    * a prompt-trained model answers the empty prompt with logits near -20,
      where the sigmoid is flat and the MSE has no gradient: the output layer
      of that answer is rescaled before training (:meth:`Finetuner._unsaturate`);
    * peak learning rate 4e-4 instead of SAMCell's 1e-4 (minutes on a CPU
      instead of GPU hours; see ``lr``);
    * the watershed thresholds are tuned after training
      (``tune_thresholds``) and stored with the model.

CPU first
---------
With the image encoder frozen (the default), the embeddings of ``views``
augmented crops are computed once (this is most of the time on a CPU: about
1.4 s per 256 px view for LiteMedSAM) and an epoch costs decoder time only. New
random prompts are drawn from every cached view at every step. With
``encoder_lora=True`` each step runs the encoder forward and backward on a
freshly augmented view instead (about 3-4x slower per step).

Where the LoRA comes from
-------------------------
* Mask decoder ``q_proj`` / ``v_proj``: :mod:`peft` (``LoraConfig`` +
  ``inject_adapter_in_model``), imported inside the functions that need it.
* Image encoder: SAM fuses q, k and v into one ``qkv`` linear layer, which peft
  can only adapt as a whole. :class:`FusedQKVLoRA` is a small custom adapter
  that adds low-rank updates to the q and v rows only (k untouched), for both
  layouts: segment-anything's ViT (``[all q | all k | all v]``) and TinyViT
  (per head ``[q_h, k_h, v_h]``).

Adapters
--------
What training changed (LoRA matrices and fully trained tensors, nothing else)
is saved as safetensors plus JSON metadata in ``models.cache_dir() /
"adapters"`` (:func:`save_adapter`, written atomically). Loading deep-copies the
base model and merges the adapter into it (:func:`apply_adapter`); the trained
model returned by training is built by the same function, so a saved and
reloaded adapter gives identical outputs. Fine-tuning an adapter again adds a
stage on top of the stages it already has.

Examples
--------
>>> from napari_cellseg.core.models import random_model
>>> from napari_cellseg.core.progress import run_to_completion
>>> image, labels = _doctest_cells()
>>> data = make_training_data(image, labels)
>>> cfg = FinetuneConfig(recipe="distance", epochs=1, views=2, minutes=None)
>>> result = run_to_completion(finetune(random_model("vit_test"), data, cfg))
>>> result.meta["output"], result.stopped
('distance', 'finished')
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import LoadedModel

RECIPES = ("prompt", "distance", "joint")
#: recipes whose model answers the empty prompt with a distance map
DISTANCE_RECIPES = ("distance", "joint")
#: recipes that train point and box prompts
PROMPT_RECIPES = ("prompt", "joint")
PROMPT_TYPES = ("point", "box")
#: fewest annotated cells a run accepts (over all training images)
MIN_CELLS = 2
#: planes with more pixels than this are cut into overlapping tiles
MAX_PLANE_PIXELS = 4096 * 4096
HUGE_TILE = 2048
HUGE_OVERLAP = 256
#: SAMCell's default thresholds of the distance-map watershed
DEFAULT_DISTANCE_THRESHOLDS = {"peak": 0.47, "fill": 0.09}
#: Gaussian smoothing (sigma in pixels) of the distance map tried by the threshold tuning (0: SAMCell's none)
SMOOTHING_CHOICES = (0.0, 1.5, 3.0)


def distance_default_candidates() -> list[tuple[float, float, float]]:
    """(peak, fill, smooth) settings tried by the threshold tuning, SAMCell's unsmoothed 0.47 / 0.09 first."""
    default = (DEFAULT_DISTANCE_THRESHOLDS["peak"], DEFAULT_DISTANCE_THRESHOLDS["fill"], 0.0)
    grid = [(peak, fill, sigma) for sigma in SMOOTHING_CHOICES for peak in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
            for fill in (0.05, 0.09, 0.15, 0.25) if fill < peak]
    return [default] + [c for c in grid if c != default]
ADAPTER_FORMAT = "napari-cellseg-adapter"
ADAPTER_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class FinetuneMemoryError(MemoryError):
    """Training ran out of memory; the message says what to reduce."""


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


MIN_BUDGET_VIEWS = 8  # views embedded whatever the time budget (fewer when the data have fewer tiles)
#: most views embedded per tile within a time budget: the distance recipe overfits a few views of one image (a
#: 3-minute run on one 360 px nucleus image: 16 views, 33 epochs, AP@0.5 0.72-0.74 on 21 held-out images; 64
#: views, 7 epochs, 0.83; docs/finetuning.md); the prompt recipe reuses its views with new prompts every step
MAX_VIEWS_PER_TILE = {"distance": 64}
DEFAULT_MAX_VIEWS_PER_TILE = 16


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run; round-trips to JSON (:meth:`to_json`).

    Fields left at ``None`` take the recipe's default (see :meth:`resolved`).

    Attributes
    ----------
    recipe : {"prompt", "distance", "joint"}
        CellSeg1 LoRA for prompts and grid mode, SAMCell distance maps, or
        both at once (``"joint"``: one model for every mode; each step adds
        the distance loss of ``batch_size`` views and the prompt loss of
        points and boxes in the first of them, weighted by
        ``distance_weight``; the whole decoder and the neck are trained).
    minutes : float or None
        Time budget of the whole run (embedding the views included). Training
        stops at the budget or after ``epochs``, whichever comes first.
    epochs : int or None
        Passes over the cached views. ``None`` with a time budget: as many as fit.
    encoder_lora : bool
        Also train LoRA in the image encoder (q and v of its fused qkv). No
        embedding cache then: every step runs the encoder (slow on a CPU),
        unless ``encoder_lora_blocks`` is set.
    encoder_lora_blocks : int or None
        With ``encoder_lora``: adapt only the encoder's last N attention blocks
        (of 10 in LiteMedSAM's TinyViT, 12 in vit_b). The encoder up to them
        never changes, so its output is computed once per augmented view and
        cached, as with a frozen encoder, and each step runs only those blocks
        forward and backward: the CPU way to train the encoder. ``None``: every
        block, the whole encoder in the loop.
    encoder_tail : {"none", "neck"} or None
        Also train the image encoder's neck (its last 1x1 and 3x3
        convolutions, 0.7 M numbers for LiteMedSAM) on cached features from
        just before it (default "neck" for both recipes). SAM's mask decoder
        has no layer that mixes neighbouring image tokens, so with a frozen
        encoder its answers are per-token read-outs of frozen features. On
        Usiigaci (150 steps) the distance map fitted its own training views
        only to a correlation of 0.5 with the target (0.35 held out); with the
        neck, 0.66 (0.6 held out), for twice the cost per step. Prompt recipe,
        60 steps: held-out click IoU 0.17 without, 0.38 with the neck (+27 %
        time per step).
    decoder : {"lora", "full"} or None
        LoRA on the decoder's q_proj/v_proj (prompt default) or train every
        decoder weight (distance default).
    lora_rank, lora_alpha : int, float
        LoRA rank (4) and scale numerator (update scaled by alpha / rank).
    train_point_embeddings : bool
        Prompt recipe: also train the prompt encoder's point-label embeddings
        (5 vectors). LiteMedSAM was trained with boxes only, so its point
        pathway needs it.
    prompt_types : tuple of {"point", "box"}
        Prompts trained by the prompt recipe (both by default: at every step
        each chosen cell is prompted by one of them, drawn at random).
    max_cells, max_negatives : int
        Cells and background points prompted per view and step. CellSeg1 uses
        30 and 15 on a GPU; on a CPU every prompt costs a full decoder pass
        (0.2-0.5 s with its backward pass), and more optimiser steps with fewer
        prompts learn faster per minute, so the defaults are 8 and 4. Views
        with fewer cells get fewer background points (CellSeg1's 2:1 ratio,
        at least 2).
    top_fraction : float
        Points come from the top fraction (0.2) of the distance transform.
    multimask : {"tie", "train", "off"}
        What becomes of SAM's three multimask outputs (the annotation mode
        decodes a click with ``multimask=True`` and keeps the best-scored one;
        LiteMedSAM never trained them). ``"tie"`` (default): train the single
        output, then make the three multimask outputs exact copies of it (their
        mask tokens, hypernetwork MLPs and IoU-head rows), so a click gives the
        trained mask whichever way it is decoded. ``"train"``: train all four
        towards the cell (on Usiigaci the three collapsed to empty masks while
        the single output learned). ``"off"``: leave them untouched.
    box_jitter : float
        Box corners move by up to this fraction of the box side.
    dice_weight : float or None
        Prompt recipe: weight of a Dice term added to the mask BCE (default
        1). A cell covers 1-2 % of a 256 px view, so the pixel-averaged BCE
        alone mostly teaches "background" and, measured on Usiigaci, click
        masks shrank instead of growing in the first tens of steps; with Dice
        they grow.
    crop_size : int or None
        Side of a view in image pixels at scale 1 (256 for distance, the
        model's input size up to 512 for prompts). Views are resized to the
        model input.
    crop_scale : (float, float) or None
        Range of the random zoom (view side = crop_size * scale).
    views : int or None
        Augmented views whose embeddings are cached. ``None``: as many as fit
        in ``cache_fraction`` of the time budget (at least 8, at most 64 per
        tile for the distance recipe and 16 for the others; 4 per tile
        without a budget). Views are drawn from the tiles of
        all planes in shuffled turns, so a budget smaller than one view per
        tile still samples every plane at random.
    cache_fraction : float or None
        Share of the time budget spent embedding views (prompt 0.2: its
        views are reused with new random prompts at every step, so steps
        matter more than views; distance 0.35).
    clahe : bool or None
        CLAHE on every view (distance default: on, as at inference).
    invert : bool or None
        Random intensity inversion (distance default: on).
    augment : bool
        Random flips, rotations, zoom, brightness and contrast.
    lr, weight_decay, warmup : float or None
        Peak learning rate (prompt 3e-3; distance 4e-4, see below), AdamW
        weight decay (prompt 0.01, distance 0.1), warm-up share of the run
        (0.3, 0.1). SAMCell trains with 1e-4 for many GPU epochs; in a CPU
        budget of a few hundred steps, held-out correlation of the map after
        150 steps (Usiigaci, neck and decoder trained) was 0.32 at 1e-4, 0.59
        at 4e-4 and 0.30 at 1e-3. Use 1e-4 for long runs.
    full_lr : float or None
        Peak learning rate of the fully trained tensors (the neck, the point
        embeddings, a fully trained decoder); LoRA matrices use ``lr``.
        Prompt default 3e-4 (a tenth of the LoRA rate: at 3e-3 the neck drifted
        and click masks grew over neighbouring cells); distance default: ``lr``.
    schedule : {"onecycle", "warmup_linear"} or None
        Prompt: one-cycle (cosine); distance: linear warm-up then linear decay.
    batch_size : int or None
        Views per optimiser step (prompt 1, distance 2).
    prompt_batch : int
        Prompts decoded together (gradient accumulation beyond it; lowers memory).
    amp : bool or None
        Run the mask decoder's training passes in bfloat16 autocast (weights and
        optimiser stay float32; embeddings and inference stay float32). ``None``:
        on where the processor computes bfloat16 natively (e.g. AVX-512 BF16 or
        AMX CPUs, recent GPUs), about 1.6x faster on such a CPU.
    eval_every : int or None
        Steps between evaluations (best-model tracking, validation AP, early
        stopping); ``None``: about 10 per run and at least once per epoch.
    patience : int
        Evaluations without a better validation AP before early stopping (0:
        never). Early stopping needs validation data; without it the schedule
        runs to its end and the latest weights are kept.
    min_delta : float
        Smallest improvement that counts.
    seed : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    feature_cache : str or None
        Folder for cached view embeddings on disk (reused by later or resumed runs).
    encoder_precision : {None, "float32", "bfloat16"}
        Arithmetic of the frozen image encoder when it embeds the training
        views (the embeddings are stored as float16 either way). ``None``: the
        base model's own precision (``load_model``'s ``auto`` is bfloat16 on
        CPUs with native bfloat16), so the decoder trains on the embeddings
        it will be given at inference, and embedding a view takes about half
        the time there.
    checkpoint : str or None
        File for a resumable training state, written every ``checkpoint_minutes``
        and read at start when it exists and matches.
    checkpoint_minutes : float
    thresholds : dict or None
        Distance recipe: ``{"peak": ..., "fill": ...}`` of the map watershed
        stored in the adapter (SAMCell's 0.47 / 0.09 by default).
    distance_weight : float or None
        Joint recipe: weight of the distance-map MSE against the prompt loss
        (default 5: the MSE of a normalised distance map is about a tenth of
        the BCE + Dice of a mask).
    refiner : bool or None
        Distance and joint recipes: also train a small full-resolution head
        (:mod:`napari_cellseg.core.distance_head`) that corrects the decoder's
        distance map from the crop's pixels (default on for both). With the
        encoder frozen the decoder alone draws blocky maps blind to the thin
        borders between touching cells. Distance recipe on 12 Usiigaci
        training images, 7 minutes, 3 held-out images: AP@0.5 at SAMCell's
        thresholds 0.02 without, 0.12 with the refiner (0.16 and 0.18 at the
        best thresholds of each), for 1.7x the time per step.
    refiner_channels : int
        Width of the refiner at full resolution (16: about 70 k numbers).
    distance_decoder : bool
        Joint recipe: the distance map gets its own copy of the mask decoder
        (trained with the distance loss only), so it does not share the
        output token and every decoder weight with the click and box masks.
        The adapter grows by one decoder (4 M numbers for LiteMedSAM).
    tune_thresholds : bool
        Distance recipe: after training, choose the thresholds that give the
        best AP@0.5 on the validation planes (or, without them, on the cached
        training views) from a small grid around SAMCell's, and store them in
        the adapter (the automatic mode uses them by default). Takes seconds.
    """

    recipe: str = "prompt"
    minutes: float | None = 10.0
    epochs: int | None = None
    encoder_lora: bool = False
    encoder_lora_blocks: int | None = None
    encoder_tail: str | None = None
    decoder: str | None = None
    lora_rank: int = 4
    lora_alpha: float = 4.0
    train_point_embeddings: bool = True
    prompt_types: tuple[str, ...] = ("point", "box")
    max_cells: int = 8
    max_negatives: int = 4
    top_fraction: float = 0.2
    multimask: str = "tie"
    box_jitter: float = 0.05
    dice_weight: float | None = None
    crop_size: int | None = None
    crop_scale: tuple[float, float] | None = None
    views: int | None = None
    cache_fraction: float | None = None
    clahe: bool | None = None
    invert: bool | None = None
    augment: bool = True
    lr: float | None = None
    full_lr: float | None = None
    weight_decay: float | None = None
    warmup: float | None = None
    schedule: str | None = None
    batch_size: int | None = None
    prompt_batch: int = 16
    amp: bool | None = None
    eval_every: int | None = None
    patience: int = 5
    min_delta: float = 1e-3
    seed: int = 0
    device: str = "auto"
    feature_cache: str | None = None
    encoder_precision: str | None = None
    checkpoint: str | None = None
    checkpoint_minutes: float = 2.0
    thresholds: dict | None = None
    tune_thresholds: bool = True
    distance_weight: float | None = None
    refiner: bool | None = None
    refiner_channels: int = 16
    distance_decoder: bool = True

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: choose 'prompt' (CellSeg1), 'distance' (SAMCell) "
                             "or 'joint' (both)")
        self.prompt_types = tuple(self.prompt_types)
        bad = [p for p in self.prompt_types if p not in PROMPT_TYPES]
        if bad or (self.recipe in PROMPT_RECIPES and not self.prompt_types):
            raise ValueError(f"prompt_types must be a non-empty subset of {PROMPT_TYPES}, got {self.prompt_types}")
        if self.crop_scale is not None:
            self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
            if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
                raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high, got {self.crop_scale}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.minutes is None and self.epochs is None:
            raise ValueError("give a time budget (minutes) or a number of epochs")
        if self.encoder_lora_blocks is not None:
            if not self.encoder_lora:
                raise ValueError("encoder_lora_blocks needs encoder_lora=True")
            if int(self.encoder_lora_blocks) < 1:
                raise ValueError(f"encoder_lora_blocks must be at least 1, got {self.encoder_lora_blocks}")
            self.encoder_lora_blocks = int(self.encoder_lora_blocks)
        if self.encoder_tail not in (None, "none", "neck"):
            raise ValueError(f"encoder_tail must be 'none' or 'neck', got {self.encoder_tail!r}")
        if self.multimask not in ("tie", "train", "off"):
            raise ValueError(f"multimask must be 'tie', 'train' or 'off', got {self.multimask!r}")
        if self.decoder not in (None, "lora", "full"):
            raise ValueError(f"decoder must be 'lora' or 'full', got {self.decoder!r}")
        if self.schedule not in (None, "onecycle", "warmup_linear"):
            raise ValueError(f"schedule must be 'onecycle' or 'warmup_linear', got {self.schedule!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.views is not None and int(self.views) < 1:
            raise ValueError(f"views must be at least 1, got {self.views}")
        if self.encoder_precision not in (None, "float32", "bfloat16"):
            raise ValueError(f"encoder_precision must be 'float32' or 'bfloat16', got {self.encoder_precision!r}")
        if int(self.refiner_channels) < 1:
            raise ValueError(f"refiner_channels must be at least 1, got {self.refiner_channels}")
        if self.thresholds is not None:
            self.thresholds = {"peak": float(self.thresholds["peak"]), "fill": float(self.thresholds["fill"])}

    def resolved(self, input_size: int = 256) -> FinetuneConfig:
        """A copy with every ``None`` replaced by the recipe's default for a model input size."""
        prompt = self.recipe == "prompt"
        values = dict(
            decoder="lora" if prompt else "full",
            encoder_tail="neck",
            crop_size=(input_size if input_size <= 512 else input_size // 2) if prompt else 256,
            crop_scale=(0.8, 2.0) if prompt else (0.8, 1.25),
            clahe=not prompt,
            invert=not prompt,
            lr=3e-3 if prompt else 4e-4,
            full_lr=3e-4 if prompt else (self.lr if self.lr is not None else 4e-4),
            weight_decay=0.01 if prompt else 0.1,
            warmup=0.3 if prompt else 0.1,
            schedule="onecycle" if prompt else "warmup_linear",
            batch_size=1 if prompt else 2,
            dice_weight=1.0 if prompt else 0.0,
            cache_fraction=0.2 if prompt else 0.35,
            thresholds=None if prompt else dict(DEFAULT_DISTANCE_THRESHOLDS),
            distance_weight=5.0 if self.recipe == "joint" else 1.0,
            refiner=not prompt,
        )
        if self.recipe == "joint":
            # distance-style views and schedule; prompts learn with the Dice term; views
            # alternate with and without CLAHE (the distance mode equalises crops, clicks do not)
            values.update(dice_weight=1.0, clahe=False, crop_scale=(0.7, 1.5))
        return replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        """JSON-ready dictionary (tuples become lists)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Examples
        --------
        >>> cfg = FinetuneConfig(recipe="distance", minutes=3)
        >>> FinetuneConfig.from_json(cfg.to_json()) == cfg
        True
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {unknown}; known: {sorted(names)}")
        kwargs = dict(data)
        for key in ("prompt_types", "crop_scale"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------
# training data
# ---------------------------------------------------------------------------


@dataclass
class TrainingPair:
    """One 2D plane ready for training.

    Attributes
    ----------
    image : ndarray of float32, shape (M, N) or (M, N, 3)
        Normalised to [0, 1] (grayscale kept as one channel to save memory).
    labels : ndarray of int32, shape (M, N)
        Instance labels, 0 = background.
    known : ndarray of bool, shape (M, N)
        Where the annotation is complete (region of interest plus every
        labelled pixel); pixels outside are neither cell nor background.
    name : str
    n_cells : int
    """

    image: np.ndarray
    labels: np.ndarray
    known: np.ndarray
    name: str
    n_cells: int
    roi: str = "whole image"
    key: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)

    def rgb(self, region=(slice(None), slice(None))) -> np.ndarray:
        img = self.image[region]
        return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


@dataclass
class TrainingData:
    """Training planes and a JSON-ready summary of them.

    Build with :func:`make_training_data`.
    """

    pairs: list[TrainingPair]
    summary: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return sum(p.n_cells for p in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _as_list(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _check_labels(labels, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        raise TypeError(
            f"{name} is a boolean mask, not an instance label image: give every cell its own number "
            "(e.g. skimage.measure.label(mask))"
        )
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all() or (arr != np.floor(arr)).any():
            raise TypeError(
                f"{name} holds fractional or NaN values (float labels): fine-tuning needs an instance label "
                "image with whole numbers (0 = background, 1, 2, ... = cells), not a probability map"
            )
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} holds negative labels (min {int(arr.min())}): labels must be >= 0")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{name} holds labels above 2**31: relabel it (skimage.segmentation.relabel_sequential)")
    return arr


def _roi_mask(shape: tuple[int, int], roi, labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Boolean (M, N) of the annotated region and a description of it."""
    if roi is None or (isinstance(roi, str) and roi in ("", "image", "none")):
        return np.ones(shape, bool), "whole image"
    if isinstance(roi, str):
        if roi != "extent":
            raise ValueError(f"region must be None, 'extent' or a rectangle (r0, c0, r1, c1), got {roi!r}")
        rows = np.flatnonzero(labels.any(axis=1))
        cols = np.flatnonzero(labels.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        desc = "labels' extent"
    else:
        arr = np.asarray(roi, dtype=float).ravel()
        if arr.size != 4 or not np.isfinite(arr).all():
            raise ValueError(f"a rectangle region is (r0, c0, r1, c1), got {roi!r}")
        r0, r1 = sorted((arr[0], arr[2]))
        c0, c1 = sorted((arr[1], arr[3]))
        r0, c0 = max(0, int(np.floor(r0))), max(0, int(np.floor(c0)))
        r1, c1 = min(shape[0], int(np.ceil(r1))), min(shape[1], int(np.ceil(c1)))
        if r1 - r0 < 2 or c1 - c0 < 2:
            raise ValueError(f"the region {tuple(arr)} lies outside the image of shape {shape} or is empty")
        desc = "rectangle"
    known = np.zeros(shape, bool)
    known[r0:r1, c0:c1] = True
    return known, f"{desc} rows {r0}:{r1}, cols {c0}:{c1}"


def make_training_data(
    images,
    labels,
    roi=None,
    channel: int | None = None,
    names: Sequence[str] | None = None,
    min_cells: int = MIN_CELLS,
    exclude=None,
) -> TrainingData:
    """Check and normalise (image, labels) pairs for fine-tuning.

    Parameters
    ----------
    images : ndarray or list of ndarray
        ``(M, N)``, ``(M, N, 3)`` RGB, ``(M, N, C)`` with ``channel``, or a stack
        ``(Z, M, N)`` / ``(Z, M, N, 3)`` whose planes pair with the planes of its
        labels. Planes without any label are skipped (not taught as background).
    labels : ndarray or list of ndarray
        Instance label images of the same plane shapes (0 = background).
    roi : None, "extent", (r0, c0, r1, c1), or a list of those (one per pair)
        Where the annotation is complete. ``None``: every cell of the image is
        labelled. ``"extent"``: the bounding box of the labels. A rectangle:
        that region. Unlabelled pixels outside it are ignored, so unannotated
        cells are not taught as background.
    channel : int, optional
        Channel of multichannel images.
    names : sequence of str, optional
        Names of the pairs (for messages and the summary).
    min_cells : int
        Fewest cells accepted over all pairs.
    exclude : None, (r0, c0, r1, c1), label image, or a list of those (one per pair)
        A region left out of training entirely (its labels and pixels are
        ignored), e.g. held-out validation cells: a rectangle, or the bounding
        box of the non-zero pixels of an array of the labels' shape.

    Raises
    ------
    TypeError
        Float labels with fractions, boolean masks, non-numeric images.
    ValueError
        Shape mismatches, labels without cells, too few cells, labels that are not one region per cell
        (:func:`~napari_cellseg.core.metrics.check_instance_labels`).

    Examples
    --------
    >>> image, labels = _doctest_cells()
    >>> data = make_training_data(image, labels, roi="extent")
    >>> len(data), data.n_cells
    (1, 6)
    """
    from .metrics import check_instance_labels  # here, not at the top: the catalogue imports this module
    from .preprocess import normalize_image

    image_list = _as_list(images)
    label_list = _as_list(labels)
    if len(image_list) != len(label_list):
        raise ValueError(f"got {len(image_list)} images but {len(label_list)} label images: give one per image")
    if not image_list:
        raise ValueError("give at least one image and its labels")
    rois = roi if isinstance(roi, list) else [roi] * len(image_list)
    if len(rois) != len(image_list):
        raise ValueError(f"got {len(rois)} regions for {len(image_list)} images")
    excludes = exclude if isinstance(exclude, list) else [exclude] * len(image_list)
    if len(excludes) != len(image_list):
        raise ValueError(f"got {len(excludes)} excluded regions for {len(image_list)} images")
    names = list(names) if names is not None else [f"image {i + 1}" for i in range(len(image_list))]
    pairs: list[TrainingPair] = []
    skipped = 0
    tiled = 0
    for img, lab, region, name, excl in zip(image_list, label_list, rois, names, excludes):
        img = np.asarray(img)
        lab = _check_labels(lab, f"labels of {name}")
        if excl is not None:
            lab, drop = _excluded(lab, excl, name)
        else:
            drop = None
        if lab.ndim not in (2, 3):
            raise ValueError(f"labels of {name} must be 2D (M, N) or a stack (Z, M, N), got shape {lab.shape}")
        if lab.ndim == 3:
            if img.shape[:3] != lab.shape or img.ndim not in (3, 4):
                raise ValueError(
                    f"{name}: image of shape {img.shape} does not match labels of shape {lab.shape}: a stack "
                    "of labels needs an image stack with the same planes, rows and columns"
                )
            planes = [(img[z], lab[z], f"{name} plane {z}", None if drop is None else drop[z])
                      for z in range(lab.shape[0])]
        else:
            if img.shape[:2] != lab.shape or img.ndim not in (2, 3):
                raise ValueError(
                    f"{name}: image of shape {img.shape} and labels of shape {lab.shape} differ in size: "
                    "the labels must be painted on this image (same rows and columns)"
                )
            planes = [(img, lab, name, drop)]
        for pimg, plab, pname, pdrop in planes:
            if not plab.any():
                if lab.ndim == 3:
                    skipped += 1
                    continue
                raise ValueError(
                    f"{pname}: the labels contain no cells. Paint some cells (each with its own label) "
                    "before fine-tuning"
                )
            check_instance_labels(plab, f"labels of {pname}")
            known, roi_desc = _roi_mask(plab.shape, region, plab)
            known |= plab > 0
            if pdrop is not None:
                known &= ~pdrop
            image01 = normalize_image(pimg, channel=channel)
            if np.array_equal(image01[..., 0], image01[..., 1]) and np.array_equal(image01[..., 0], image01[..., 2]):
                image01 = np.ascontiguousarray(image01[..., 0])
            plab32 = plab.astype(np.int32, copy=True)
            if plab.size > MAX_PLANE_PIXELS:
                tiled += 1
                from .preprocess import tile_slices

                for k, (rs, cs) in enumerate(tile_slices(plab.shape, HUGE_TILE, HUGE_OVERLAP)):
                    tl = plab32[rs, cs]
                    if not tl.any():
                        continue
                    pairs.append(TrainingPair(
                        np.ascontiguousarray(image01[rs, cs]), np.ascontiguousarray(tl),
                        np.ascontiguousarray(known[rs, cs]), f"{pname} tile {k}", _count_cells(tl), roi_desc))
            else:
                pairs.append(TrainingPair(image01, plab32, known, pname, _count_cells(plab32), roi_desc))
    if not pairs:
        raise ValueError("none of the label planes contains a cell: paint some cells before fine-tuning")
    total = sum(p.n_cells for p in pairs)
    if total < min_cells:
        raise ValueError(
            f"the labels hold only {total} cell{'s' if total != 1 else ''}: annotate at least {min_cells} "
            "cells (20 or more work well), each with its own label"
        )
    summary = {
        "pairs": len(pairs),
        "cells": int(total),
        "pixels": int(sum(p.labels.size for p in pairs)),
        "shapes": [list(p.shape) for p in pairs[:20]],
        "names": [p.name for p in pairs[:20]],
        "regions": sorted({p.roi for p in pairs}),
        "skipped_empty_planes": skipped,
        "tiled_planes": tiled,
        "cell_diameters": cell_size_table(pairs),
    }
    for pair in pairs:
        pair.key = _content_key(pair)
    return TrainingData(pairs, summary)


def cell_size_table(pairs: list[TrainingPair]) -> dict[str, dict[str, float]]:
    """The training cells' diameters per image kind (:func:`napari_cellseg.core.cell_size.size_table`): what a
    trained model records as ``meta["cell_diameters"]`` for the automatic zoom (``DistanceConfig(scale="auto")``)."""
    from .cell_size import cell_diameters, image_kind, size_table

    by_kind: dict[str, list[np.ndarray]] = {}
    for pair in pairs:
        by_kind.setdefault(image_kind(pair.image), []).append(cell_diameters(pair.labels))
    return size_table(by_kind)


def _excluded(labels: np.ndarray, exclude, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels with the excluded region cleared, and the boolean mask of that region."""
    drop = np.zeros(labels.shape, bool)
    arr = np.asarray(exclude)
    if arr.shape == labels.shape:
        nz = arr != 0
        if nz.any():
            planes = [nz] if nz.ndim == 2 else list(nz)
            out_planes = [drop] if drop.ndim == 2 else list(drop)
            for m, d in zip(planes, out_planes):
                if m.any():
                    rows = np.flatnonzero(m.any(axis=1))
                    cols = np.flatnonzero(m.any(axis=0))
                    d[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    else:
        box = np.asarray(exclude, float).ravel()
        if box.size != 4:
            raise ValueError(f"{name}: exclude must be a rectangle (r0, c0, r1, c1) or an array of the labels' "
                             f"shape {labels.shape}, got shape {arr.shape}")
        r0, r1 = sorted((int(np.floor(box[0])), int(np.ceil(box[2]))))
        c0, c1 = sorted((int(np.floor(box[1])), int(np.ceil(box[3]))))
        drop[..., max(0, r0):r1, max(0, c0):c1] = True
    cleared = np.where(drop, 0, labels)
    return cleared, drop


def _content_key(pair: TrainingPair) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for arr in (pair.image, pair.labels, pair.known):
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _count_cells(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


# ---------------------------------------------------------------------------
# targets and prompts
# ---------------------------------------------------------------------------


def normalized_distance_map(labels: np.ndarray) -> np.ndarray:
    """Each cell's distance transform divided by its own maximum (SAMCell's target), shape (M, N).

    The shared definition is :func:`napari_cellseg.core.postprocess.distance_targets`
    (touching cells are separated; 1 at each cell's centre, 0 on the background).

    Examples
    --------
    >>> lab = np.zeros((7, 9), int); lab[1:6, 1:4] = 1; lab[1:6, 5:8] = 2
    >>> d = normalized_distance_map(lab)
    >>> float(d.max()), float(d[3, 2]), float(d[0, 0])
    (1.0, 1.0, 0.0)
    """
    from .postprocess import distance_targets

    return distance_targets(labels)


def top_fraction_points(mask: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """(row, col) pixels of the top ``fraction`` of a mask's distance transform.

    Pixels are ranked by their distance to the mask's border (the image edge
    counts as border); those at or above the ``1 - fraction`` quantile are
    returned (at least one pixel: the innermost).

    Parameters
    ----------
    mask : ndarray of bool, shape (M, N)
    fraction : float

    Returns
    -------
    ndarray of int, shape (K, 2)

    Examples
    --------
    >>> m = np.zeros((9, 9), bool); m[2:7, 2:7] = True   # distances 1 (rim), 2, 3 (centre)
    >>> pts = top_fraction_points(m)
    >>> len(pts), [4, 4] in pts.tolist(), [2, 2] in pts.tolist()
    (9, True, False)
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros((0, 2), np.int64)
    dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    values = dist[mask]
    cut = np.quantile(values, 1.0 - fraction)
    return np.argwhere(mask & (dist >= cut))


# ---------------------------------------------------------------------------
# views: augmented crops at the model's input size
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSpec:
    """Geometry and intensity changes of one augmented view of a training plane."""

    pair: int
    center: tuple[float, float]
    side: float
    angle: float = 0.0
    flip: bool = False
    gain: float = 1.0
    bias: float = 0.0
    invert: bool = False
    clahe: bool = False

    def key(self) -> str:
        return (f"{self.pair}-{self.center[0]:.2f}-{self.center[1]:.2f}-{self.side:.2f}-{self.angle:.4f}-"
                f"{int(self.flip)}-{self.gain:.4f}-{self.bias:.4f}-{int(self.invert)}"
                + ("-clahe" if self.clahe else ""))


def _source_coords(spec: ViewSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(size) + 0.5) / size - 0.5
    gy, gx = np.meshgrid(t, t, indexing="ij")
    if spec.flip:
        gx = -gx
    cos, sin = math.cos(spec.angle), math.sin(spec.angle)
    rows = spec.center[0] + spec.side * (cos * gy - sin * gx) - 0.5
    cols = spec.center[1] + spec.side * (sin * gy + cos * gx) - 0.5
    return rows, cols


def render_view(pair: TrainingPair, spec: ViewSpec, size: int, clahe: bool = False,
                distance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Sample one augmented view of a plane at the model's input size.

    Returns a dict with ``image`` (size, size, 3) float32 in [0, 1], ``labels``
    (size, size) int32, ``known`` (size, size) bool and, when ``distance`` (the
    plane's :func:`normalized_distance_map`) is given, ``target`` float32.
    """
    from scipy import ndimage as ndi

    rows, cols = _source_coords(spec, size)
    # a window of the plane around the view, so filters and sampling stay local
    r0 = max(0, int(np.floor(rows.min())) - 2)
    r1 = min(pair.shape[0], int(np.ceil(rows.max())) + 3)
    c0 = max(0, int(np.floor(cols.min())) - 2)
    c1 = min(pair.shape[1], int(np.ceil(cols.max())) + 3)
    if r1 <= r0 or c1 <= c0:
        r0, r1, c0, c1 = 0, 1, 0, 1
    window = (slice(r0, r1), slice(c0, c1))
    lr, lc = rows - r0, cols - c0
    coords = np.stack([lr, lc])
    img = pair.image[window]
    zoom = spec.side / size
    if zoom > 1.25:  # anti-alias before shrinking
        sigma = (0.5 * (zoom - 1),) * 2 + ((0.0,) if img.ndim == 3 else ())
        img = ndi.gaussian_filter(img, sigma)
    if img.ndim == 2:
        out = ndi.map_coordinates(img, coords, order=1, mode="constant", cval=0.0)
        out = np.repeat(out[..., None], 3, axis=-1)
    else:
        out = np.stack([ndi.map_coordinates(img[..., k], coords, order=1, mode="constant", cval=0.0)
                        for k in range(img.shape[-1])], axis=-1)
    labels = ndi.map_coordinates(pair.labels[window], coords, order=0, mode="constant", cval=0)
    known = ndi.map_coordinates(pair.known[window].astype(np.uint8), coords, order=0, mode="constant",
                                cval=0).astype(bool)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if clahe or spec.clahe:
        from .preprocess import clahe as run_clahe

        out = run_clahe(out)
    if spec.invert:
        out = 1.0 - out
    if spec.gain != 1.0 or spec.bias != 0.0:
        out = np.clip((out - 0.5) * spec.gain + 0.5 + spec.bias, 0.0, 1.0)
    view = {"image": np.ascontiguousarray(out, np.float32), "labels": labels.astype(np.int32), "known": known}
    if distance is not None:
        view["target"] = ndi.map_coordinates(distance[window], coords, order=1, mode="constant",
                                             cval=0.0).astype(np.float32) * (labels > 0)
    return view


def _tiles(pair: TrainingPair, side: int) -> list[tuple[float, float, float, float]]:
    """Grid cells (r0, c0, r1, c1) over the known region's bounding box: view centres fall in them."""
    rows = np.flatnonzero(pair.known.any(axis=1))
    cols = np.flatnonzero(pair.known.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    nr = max(1, int(round((r1 - r0) / side)))
    nc = max(1, int(round((c1 - c0) / side)))
    er = np.linspace(r0, r1, nr + 1)
    ec = np.linspace(c0, c1, nc + 1)
    return [(er[i], ec[j], er[i + 1], ec[j + 1]) for i in range(nr) for j in range(nc)]


def plan_views(data: TrainingData, n_views: int, cfg: FinetuneConfig, rng: np.random.Generator) -> list[ViewSpec]:
    """Random augmented views whose centres visit the tiles of all planes in turn (shuffled)."""
    tiles = [(i, t) for i, p in enumerate(data.pairs) for t in _tiles(p, cfg.crop_size)]
    specs: list[ViewSpec] = []
    order: list[int] = []
    while len(specs) < n_views:
        if not order:
            order = list(rng.permutation(len(tiles)))
        pair_idx, (r0, c0, r1, c1) = tiles[order.pop()]
        center = (float(rng.uniform(r0, r1)), float(rng.uniform(c0, c1)))
        if cfg.augment:
            lo, hi = cfg.crop_scale
            scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            spec = ViewSpec(
                pair=pair_idx, center=center, side=cfg.crop_size * scale,
                angle=float(rng.uniform(-np.pi, np.pi)), flip=bool(rng.random() < 0.5),
                gain=float(np.exp(rng.uniform(np.log(0.75), np.log(1.33)))), bias=float(rng.uniform(-0.1, 0.1)),
                invert=bool(cfg.invert and rng.random() < 0.5),
                clahe=bool(cfg.recipe == "joint" and rng.random() < 0.5),
            )
        else:
            spec = ViewSpec(pair=pair_idx, center=center, side=float(cfg.crop_size))
        specs.append(spec)
    return specs


def _eval_tiles(pair: TrainingPair, crop: int, overlap: int = 32) -> list[tuple[slice, slice]]:
    from .preprocess import tile_slices

    return tile_slices(pair.shape, crop, overlap)


def _tile_spec(pair_idx: int, sl: tuple[slice, slice], crop: int) -> ViewSpec:
    """An un-augmented view of a tile (centre of a crop x crop window from its corner)."""
    return ViewSpec(pair=pair_idx, center=(sl[0].start + crop / 2, sl[1].start + crop / 2), side=float(crop))


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _fused_lora_class():
    torch = _torch()
    import torch.nn.functional as F
    from torch import nn

    class FusedQKVLoRA(nn.Module):
        """LoRA on the q and v rows of a fused ``qkv`` linear layer (k rows untouched).

        ``out = base(x)``, then ``scale * B_q A_q x`` is added to the q rows and
        ``scale * B_v A_v x`` to the v rows, at positions ``q_rows`` / ``v_rows``
        of the output (so any layout of q, k and v works). ``B`` starts at zero,
        so the wrapped layer starts exactly as the base layer. peft cannot do
        this: it adapts a whole linear layer, which here would include k.

        Parameters
        ----------
        base : torch.nn.Linear
            The fused layer, ``3 * dim`` outputs.
        q_rows, v_rows : array of int, shape (dim,)
            Output rows of the queries and values (see :func:`fused_qkv_layers`).
        rank : int
        alpha : float
            Updates are scaled by ``alpha / rank``.
        """

        def __init__(self, base: nn.Linear, q_rows, v_rows, rank: int, alpha: float) -> None:
            super().__init__()
            self.base = base
            dim_in = base.in_features
            self.rank = int(rank)
            self.scale = float(alpha) / float(rank)
            self.register_buffer("q_rows", torch.as_tensor(q_rows, dtype=torch.long), persistent=False)
            self.register_buffer("v_rows", torch.as_tensor(v_rows, dtype=torch.long), persistent=False)
            dev = base.weight.device
            self.q_A = nn.Parameter(torch.empty(rank, dim_in, device=dev))
            self.q_B = nn.Parameter(torch.zeros(len(q_rows), rank, device=dev))
            self.v_A = nn.Parameter(torch.empty(rank, dim_in, device=dev))
            self.v_B = nn.Parameter(torch.zeros(len(v_rows), rank, device=dev))
            for a in (self.q_A, self.v_A):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

        @property
        def weight(self):
            return self.base.weight

        @property
        def bias(self):
            return self.base.bias

        def forward(self, x):
            out = self.base(x)
            dq = F.linear(F.linear(x, self.q_A), self.q_B) * self.scale
            dv = F.linear(F.linear(x, self.v_A), self.v_B) * self.scale
            out = out.index_add(-1, self.q_rows, dq)
            return out.index_add(-1, self.v_rows, dv)

    return FusedQKVLoRA


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    # FusedQKVLoRA subclasses torch.nn.Module: built on first access so importing this module loads no torch
    if name == "FusedQKVLoRA":
        if name not in _LAZY:
            _LAZY[name] = _fused_lora_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENCODER_ROOTS = ("image_encoder", "distance_encoder")


def fused_qkv_layers(sam, roots: Sequence[str] = ENCODER_ROOTS) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
    """The image encoders' fused qkv layers: ``{path: (attention module, q_rows, v_rows)}``.

    ``path`` is the qkv layer's name in ``sam`` (e.g.
    ``image_encoder.blocks.0.attn.qkv``, or ``distance_encoder.layers.1...``
    for a model's distance-path encoder). ``roots``: the encoders to list.
    Layouts: segment-anything's ViT ``[all q | all k | all v]``; TinyViT per
    head ``[q_h, k_h, v_h]``.
    """
    from segment_anything.modeling.image_encoder import Attention as ViTAttention

    from .tinyvit import WindowAttention

    out = {}
    for name, module in sam.named_modules():
        if name.split(".", 1)[0] not in roots:
            continue
        if isinstance(module, (ViTAttention, WindowAttention)):
            qkv = module.qkv
            base = qkv.base if _is_fused_lora(qkv) else qkv
            dim = base.out_features // 3
            if isinstance(module, WindowAttention):
                hd = module.head_dim
                heads = np.arange(module.num_heads)[:, None] * 3 * hd
                q_rows = (heads + np.arange(hd)[None]).ravel()
                v_rows = (heads + 2 * hd + np.arange(hd)[None]).ravel()
            else:
                q_rows = np.arange(dim)
                v_rows = np.arange(2 * dim, 3 * dim)
            out[f"{name}.qkv"] = (module, q_rows, v_rows)
    return out


def _is_fused_lora(module) -> bool:
    return "FusedQKVLoRA" in _LAZY and isinstance(module, _LAZY["FusedQKVLoRA"])


def encoder_before_neck(encoder, x):
    """The image encoder's features just before its neck, ``(B, C, G, G)`` (TinyViT or SAM's ViT)."""
    from .tinyvit import TinyViTEncoder
    from .vit_encoder import ViTEncoder

    if isinstance(encoder, (TinyViTEncoder, ViTEncoder)):
        return encoder.features(x)
    h = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        h = h + encoder.pos_embed
    for block in encoder.blocks:
        h = block(h)
    return h.permute(0, 3, 1, 2)


def tie_multimask_outputs(sam) -> dict:
    """Make SAM's three multimask outputs copies of its single output, in place; return the changed tensors.

    Mask tokens 1-3 take token 0's embedding, hypernetwork MLPs 1-3 take MLP
    0's weights and rows 1-3 of the IoU head's last layer take row 0. Output
    tokens carry no position in the decoder, so the four answers (masks and
    scores) become identical.
    """
    torch = _torch()
    dec = sam.mask_decoder
    with torch.no_grad():
        dec.mask_tokens.weight[1:] = dec.mask_tokens.weight[0]
        src = dec.output_hypernetworks_mlps[0].state_dict()
        for mlp in dec.output_hypernetworks_mlps[1:]:
            mlp.load_state_dict(src)
        last = dec.iou_prediction_head.layers[-1]
        last.weight[1:] = last.weight[0]
        last.bias[1:] = last.bias[0]
    out = {"mask_decoder.mask_tokens.weight": dec.mask_tokens.weight,
           f"mask_decoder.iou_prediction_head.layers.{len(dec.iou_prediction_head.layers) - 1}.weight": last.weight,
           f"mask_decoder.iou_prediction_head.layers.{len(dec.iou_prediction_head.layers) - 1}.bias": last.bias}
    for i in range(1, len(dec.output_hypernetworks_mlps)):
        for k, v in dec.output_hypernetworks_mlps[i].state_dict().items():
            out[f"mask_decoder.output_hypernetworks_mlps.{i}.{k}"] = v
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def decoder_lora_targets(sam) -> list[str]:
    """Names (in ``sam``) of the mask decoder's attention q_proj and v_proj linear layers."""
    from torch import nn

    return [n for n, m in sam.named_modules()
            if n.startswith("mask_decoder.") and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")
            and isinstance(m, nn.Linear)]


def _inject_decoder_lora(sam, rank: int, alpha: float) -> None:
    """peft LoRA on the decoder's q_proj / v_proj (peft imported here: it loads transformers)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(config, sam.mask_decoder)


def _inject_encoder_lora(sam, rank: int, alpha: float, root: str = "image_encoder",
                         last: int | None = None) -> None:
    """LoRA on q and v of the fused qkv layers of the encoder at ``root`` (only the ``last`` N blocks' if given)."""
    layers = list(fused_qkv_layers(sam, (root,)).values())
    if last is not None:
        if last > len(layers):
            raise ValueError(f"encoder_lora_blocks={last}, but this encoder has {len(layers)} attention blocks")
        layers = layers[len(layers) - last:]
    for attn, q_rows, v_rows in layers:
        attn.qkv = __getattr__("FusedQKVLoRA")(attn.qkv, q_rows, v_rows, rank, alpha)


def encoder_head(encoder, x, tail: int):
    """What enters the encoder's last ``tail`` attention blocks (cached when only those blocks train)."""
    if not hasattr(encoder, "features_head"):
        raise ValueError(f"encoder_lora_blocks needs a TinyViT or ViT encoder, not {type(encoder).__name__}")
    return encoder.features_head(x, tail)


def encoder_tail(encoder, h, tail: int):
    """The features before the neck ``(B, C, G, G)`` from :func:`encoder_head`'s output."""
    return encoder.features_tail(h, tail)


def _lora_modules(sam) -> dict[str, Any]:
    """peft LoRA layers of the decoder by their base path in ``sam``."""
    out = {}
    for name, module in sam.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in getattr(module, "lora_A", {}):
            out[name] = module
    return out


def export_adapter_tensors(sam, full_names: Sequence[str], stage: int) -> dict[str, torch.Tensor]:
    """Copy what training changes out of a training model, in the adapter file's naming.

    ``s{stage}.lora.{path}.A/.B`` (decoder, peft), ``s{stage}.qkv.{path}.qA/qB/vA/vB``
    (encoder), ``s{stage}.full.{param}`` (fully trained tensors). The LoRA
    scale is folded into ``B`` so merging is ``W += B @ A``.
    """
    tensors = {}
    for path, mod in _lora_modules(sam).items():
        scale = float(mod.scaling["default"])
        tensors[f"s{stage}.lora.{path}.A"] = mod.lora_A["default"].weight.detach().float().cpu().clone()
        tensors[f"s{stage}.lora.{path}.B"] = (mod.lora_B["default"].weight.detach().float() * scale).cpu().clone()
    for name, mod in sam.named_modules():
        if _is_fused_lora(mod):
            path = name
            tensors[f"s{stage}.qkv.{path}.qA"] = mod.q_A.detach().float().cpu().clone()
            tensors[f"s{stage}.qkv.{path}.qB"] = (mod.q_B.detach().float() * mod.scale).cpu().clone()
            tensors[f"s{stage}.qkv.{path}.vA"] = mod.v_A.detach().float().cpu().clone()
            tensors[f"s{stage}.qkv.{path}.vB"] = (mod.v_B.detach().float() * mod.scale).cpu().clone()
    params = dict(sam.named_parameters())
    for name in full_names:
        tensors[f"s{stage}.full.{_clean_name(name)}"] = params[name].detach().float().cpu().clone()
    return tensors


def _clean_name(name: str) -> str:
    """Parameter name in the plain (un-adapted) model: drop peft's ``.base_layer``."""
    return name.replace(".base_layer.", ".")


def apply_adapter(sam, tensors: dict[str, torch.Tensor]) -> None:
    """Merge adapter tensors into a plain SAM in place, stage by stage.

    Each stage first sets its fully trained tensors, then adds its LoRA
    updates (a distance refiner, :mod:`~napari_cellseg.core.distance_head`, is
    created first when the tensors hold one): ``W += B @ A`` for decoder layers, and the same on the q and v rows
    of the encoder's fused qkv layers.

    Raises
    ------
    ValueError
        When a tensor names a layer the model does not have or has the wrong shape.
    """
    torch = _torch()
    from .distance_head import (ENCODER_ATTR, REFINER_ATTR, attach_distance_decoder, attach_distance_encoder,
                                attach_distance_neck, attach_refiner, get_distance_encoder, get_refiner,
                                refiner_channels_from_tensors)

    stages = sorted({int(k.split(".", 1)[0][1:]) for k in tensors})
    channels = refiner_channels_from_tensors({k: tuple(v.shape) for k, v in tensors.items()})
    if any(".full.distance_decoder." in k for k in tensors):
        attach_distance_decoder(sam)
    if any(".full.distance_neck." in k for k in tensors):
        attach_distance_neck(sam)
    if any(".full.box_decoder." in k for k in tensors):
        from .box_head import attach_box_decoder

        attach_box_decoder(sam)
    if channels is not None:
        existing = get_refiner(sam)
        if existing is not None and existing.channels != channels:
            delattr(sam, REFINER_ATTR)
        attach_refiner(sam, channels)
    params = dict(sam.named_parameters())
    qkv = fused_qkv_layers(sam)
    with torch.no_grad():
        for stage in stages:
            prefix = f"s{stage}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if any(k.startswith((f"qkv.{ENCODER_ATTR}.", f"full.{ENCODER_ATTR}.")) for k in own) \
                    and get_distance_encoder(sam) is None:
                # the distance path's encoder starts as the image encoder of the stages before
                attach_distance_encoder(sam)
                params = dict(sam.named_parameters())
                qkv = fused_qkv_layers(sam)
            for key, value in own.items():
                if key.startswith("full."):
                    name = key[5:]
                    if name not in params or tuple(params[name].shape) != tuple(value.shape):
                        raise ValueError(f"adapter tensor {key} does not fit the base model ({name})")
                    params[name].copy_(value.to(params[name].dtype))
            for key in own:
                if key.startswith("lora.") and key.endswith(".A"):
                    path = key[5:-2]
                    weight = params.get(f"{path}.weight")
                    a, b = own[key], own[f"lora.{path}.B"]
                    if weight is None or tuple(weight.shape) != (b.shape[0], a.shape[1]):
                        raise ValueError(f"adapter LoRA {path} does not fit the base model")
                    weight.add_((b.float() @ a.float()).to(weight.device, weight.dtype))
                elif key.startswith("qkv.") and key.endswith(".qA"):
                    path = key[4:-3]
                    if path not in qkv:
                        raise ValueError(f"adapter LoRA {path} does not fit the base model")
                    attn, q_rows, v_rows = qkv[path]
                    weight = attn.qkv.weight
                    dq = own[f"qkv.{path}.qB"].float() @ own[f"qkv.{path}.qA"].float()
                    dv = own[f"qkv.{path}.vB"].float() @ own[f"qkv.{path}.vA"].float()
                    if dq.shape != (len(q_rows), weight.shape[1]) or dv.shape != (len(v_rows), weight.shape[1]):
                        raise ValueError(f"adapter LoRA {path} does not fit the base model")
                    # (the adapter's tensors are on the CPU; the model may be on a GPU)
                    weight[torch.as_tensor(q_rows, device=weight.device)] += dq.to(weight.device, weight.dtype)
                    weight[torch.as_tensor(v_rows, device=weight.device)] += dv.to(weight.device, weight.dtype)


# ---------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------


def lr_factor(progress: float, schedule: str, warmup: float) -> float:
    """Multiplier of the peak learning rate at ``progress`` in [0, 1] of the run.

    ``"onecycle"``: cosine from 1/25 up to 1 over ``warmup``, then cosine down to
    1/250000 (PyTorch's OneCycleLR shape, driven by progress so a time budget
    can drive it). ``"warmup_linear"``: linear from 0 to 1 over ``warmup``, then
    linear to 0.

    Examples
    --------
    >>> round(lr_factor(0.3, "onecycle", 0.3), 6), round(lr_factor(0.0, "onecycle", 0.3), 6)
    (1.0, 0.04)
    >>> round(lr_factor(0.55, "warmup_linear", 0.1), 6)
    0.5
    """
    p = min(1.0, max(0.0, float(progress)))
    w = min(max(float(warmup), 1e-6), 1.0 - 1e-6)
    if schedule == "onecycle":
        start, end = 1.0 / 25.0, 1.0 / 25.0 / 1e4
        if p < w:
            return start + (1.0 - start) * (1 - math.cos(math.pi * p / w)) / 2
        return end + (1.0 - end) * (1 + math.cos(math.pi * (p - w) / (1 - w))) / 2
    if p < w:
        return p / w
    return max(0.0, (1.0 - p) / (1.0 - w))


def _ap(gt: np.ndarray, pred: np.ndarray, thresholds=(0.5, 0.75)) -> list[float]:
    from .metrics import average_precision

    return [s.ap for s in average_precision(gt, pred, thresholds)]


# ---------------------------------------------------------------------------
# result and training
# ---------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes
    ----------
    model : LoadedModel
        Base model with the adapter merged in (a copy: the base is untouched),
        ready for :class:`~napari_cellseg.core.predictor.Predictor` and the
        automatic modes; ``model.meta`` has ``output`` and ``thresholds``.
    tensors : dict of str to torch.Tensor
        The adapter (all stages), as :func:`save_adapter` writes it.
    meta : dict
        JSON-ready metadata: base, recipe, config, data summary, metrics, stages.
    history : list of dict
        One record per evaluation (step, epoch, seconds, loss, val_ap...).
    stopped : str
        ``"finished"``, ``"time budget"``, ``"early stopping"`` or ``"cancelled"``.
    """

    model: Any
    tensors: dict
    meta: dict
    history: list
    stopped: str


class Finetuner:
    """One fine-tuning run; :meth:`run` is the progress generator.

    Parameters
    ----------
    base : LoadedModel or str
        The model to start from (a catalogue name is loaded). Never modified:
        training works on a deep copy. An adapter continues training: its
        stages are kept and a new one is added.
    train : TrainingData
        From :func:`make_training_data`.
    config : FinetuneConfig, optional
    validation : TrainingData, optional
        Held-out planes or cells: validation AP@0.5 at every evaluation drives
        best-model selection and early stopping.

    Notes
    -----
    :meth:`stop` (any thread) ends training at the next step and :meth:`run`
    returns the best model so far. If the generator is simply abandoned (a
    napari worker's ``quit()``), :meth:`best_result` gives the same.
    """

    def __init__(self, base, train: TrainingData, config: FinetuneConfig | None = None,
                 validation: TrainingData | None = None) -> None:
        import threading

        if not isinstance(train, TrainingData):
            raise TypeError("train must be TrainingData from make_training_data(images, labels)")
        if validation is not None and not isinstance(validation, TrainingData):
            raise TypeError("validation must be TrainingData from make_training_data(images, labels)")
        self.base = base
        self.train = train
        self.config = config or FinetuneConfig()
        self.validation = validation
        self._stop = threading.Event()
        self._best_tensors: dict | None = None
        self._best_score: float | None = None
        self._history: list[dict] = []
        self._sam = None
        self._steps = 0
        self._started = None
        self._finished: FinetuneResult | None = None
        self.output_scale: float | None = None

    # -- control -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask training to end at the next step, keeping the best model so far."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def best_result(self) -> FinetuneResult | None:
        """The best model so far (the current one if no evaluation ran yet); None before any step."""
        if self._finished is not None:
            return self._finished
        if self._sam is None or self._steps == 0:
            return None
        tensors = self._best_tensors if self._best_tensors is not None else self._current_tensors()
        return self._make_result(tensors, "cancelled")

    # -- setup -------------------------------------------------------------------

    def _setup(self):
        torch = _torch()
        from .models import LoadedModel, load_model, native_bfloat16, resolve_device

        cfg = self.config
        base = self.base
        device = resolve_device(cfg.device)
        if isinstance(base, (str, os.PathLike)):
            base = load_model(str(base), device=device, progress=False)
        if not isinstance(base, LoadedModel):
            raise TypeError("base must be a LoadedModel or a catalogue name")
        self.device = device
        self.cfg = cfg.resolved(base.input_size)
        prev_meta = base.meta if base.entry.source == "adapter" else {}
        self.prev_tensors: dict = {}
        if prev_meta:
            self.prev_tensors = dict(read_adapter(base.entry.location)[0])
            self.root_base = prev_meta["base"]
            self.prev_stages = list(prev_meta.get("stages", []))
        else:
            self.root_base = base.entry.name if base.entry.source != "random" else base.name
            self.prev_stages = []
        self.stage = len(self.prev_stages)
        self.base_model = base
        sam = copy.deepcopy(base.sam).to(device)
        sam.eval()
        from .box_head import BOX_DECODER_ATTR, get_box_decoder

        if cfg.recipe in PROMPT_RECIPES and get_box_decoder(sam) is not None:
            # the prompts are trained through the mask decoder: boxes must go there too, so the base's box
            # decoder (which would keep answering boxes untrained) is dropped from the model and its adapter
            delattr(sam, BOX_DECODER_ATTR)
            self.prev_tensors = {k: v for k, v in self.prev_tensors.items() if ".full.box_decoder." not in k}
        for p in sam.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            if self.cfg.encoder_lora:
                _inject_encoder_lora(sam, self.cfg.lora_rank, self.cfg.lora_alpha, self._encoder_lora_root(sam),
                                     last=self.cfg.encoder_lora_blocks)
            if self.cfg.decoder == "lora":
                _inject_decoder_lora(sam, self.cfg.lora_rank, self.cfg.lora_alpha)
            if self.cfg.recipe == "joint" and self.cfg.distance_decoder:
                from .distance_head import attach_distance_decoder

                attach_distance_decoder(sam)
            if self.cfg.recipe in DISTANCE_RECIPES and self.cfg.refiner:
                from .distance_head import attach_refiner

                attach_refiner(sam, self.cfg.refiner_channels)
        sam.to(device)
        for p in sam.parameters():
            p.requires_grad_(False)
        lora_params, full_names = [], []
        for name, p in sam.named_parameters():
            if ".lora_A." in name or ".lora_B." in name or name.rsplit(".", 1)[-1] in ("q_A", "q_B", "v_A", "v_B"):
                lora_params.append(p)
        from .distance_head import get_distance_decoder, get_distance_neck

        if self.cfg.decoder == "full" and (self.cfg.recipe in PROMPT_RECIPES or get_distance_decoder(sam) is None):
            # (a distance recipe on a model whose map has its own decoder never reads the mask decoder)
            full_names += [n for n, _ in sam.named_parameters() if n.startswith("mask_decoder.")]

        if get_distance_neck(sam) is not None and self.cfg.recipe in DISTANCE_RECIPES and \
                self.cfg.encoder_tail != "neck" and not self.cfg.encoder_lora:
            raise ValueError("this base model has its own distance neck: train with encoder_tail='neck'")
        from .distance_head import get_distance_encoder

        if get_distance_encoder(sam) is not None and self.cfg.recipe == "joint":
            # the cached features would serve two encoders (the map's and the prompts')
            raise ValueError("this base model's distance map has its own image encoder: continue it with the "
                             "'distance' recipe (the map) or the 'prompt' recipe (clicks and boxes), not 'joint'")
        if self.cfg.encoder_tail == "neck":
            # the neck each loss reads: the encoder's for prompts, the distance neck (when the base has one)
            # for the distance map
            if self.cfg.recipe in PROMPT_RECIPES or get_distance_neck(sam) is None:
                full_names += [n for n, _ in sam.named_parameters() if n.startswith("image_encoder.neck.")]
            if self.cfg.recipe in DISTANCE_RECIPES and get_distance_neck(sam) is not None:
                full_names += [n for n, _ in sam.named_parameters() if n.startswith("distance_neck.")]
        if self.cfg.recipe in DISTANCE_RECIPES and self.cfg.decoder != "full" and get_distance_decoder(sam) is None:
            # the rescaled output layer (see _unsaturate) must be saved with the adapter
            full_names += [n for n, _ in sam.named_parameters()
                           if n.startswith("mask_decoder.output_hypernetworks_mlps.0.layers.2.")]
        if self.cfg.recipe in PROMPT_RECIPES and self.cfg.train_point_embeddings:
            full_names += [n for n, _ in sam.named_parameters()
                           if n.startswith("prompt_encoder.point_embeddings.")
                           or n.startswith("prompt_encoder.not_a_point_embed.")]
        if self.cfg.recipe in DISTANCE_RECIPES:
            # a refiner (new, or from the adapter trained on) is always trained with the distance map
            full_names += [n for n, _ in sam.named_parameters()
                           if n.startswith("distance_refiner.") or n.startswith("distance_decoder.")]
        params = dict(sam.named_parameters())
        for p in lora_params:
            p.requires_grad_(True)
        for n in full_names:
            params[n].requires_grad_(True)
        self.full_names = full_names
        full_decay, full_no_decay = [], []
        for n in full_names:
            (full_no_decay if params[n].ndim < 2 or "embed" in n else full_decay).append(params[n])
        self.trainable = [p for p in sam.parameters() if p.requires_grad]
        groups = [
            {"params": list(lora_params), "weight_decay": self.cfg.weight_decay, "peak_lr": self.cfg.lr},
            {"params": full_decay, "weight_decay": self.cfg.weight_decay, "peak_lr": self.cfg.full_lr},
            {"params": full_no_decay, "weight_decay": 0.0, "peak_lr": self.cfg.full_lr},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr)
        self._sam = sam
        self.input_size = int(sam.image_encoder.img_size)
        self.use_amp = native_bfloat16(device) if self.cfg.amp is None else bool(self.cfg.amp)
        self.encoder_precision = self.cfg.encoder_precision or getattr(base, "precision", "float32")
        if self.cfg.recipe in DISTANCE_RECIPES:
            self.distances = [normalized_distance_map(p.labels) for p in self.train.pairs]
        else:
            self.distances = [None] * len(self.train.pairs)

    def _encoder_lora_root(self, sam) -> str:
        """Where encoder LoRA goes: the image encoder, or the distance path's own copy of it.

        The distance recipe on a model whose map has its own neck and decoder
        (the packaged ``cellseg``) adapts a copy of the encoder
        (:func:`~napari_cellseg.core.distance_head.attach_distance_encoder`), so
        the prompts keep the base encoder's answers.
        """
        from .distance_head import ENCODER_ATTR, attach_distance_encoder, get_distance_decoder, get_distance_neck

        if self.cfg.recipe == "distance" and get_distance_neck(sam) is not None \
                and get_distance_decoder(sam) is not None:
            attach_distance_encoder(sam)
            return ENCODER_ATTR
        return "image_encoder"

    def _unsaturate(self, entries: list[dict]) -> float | None:
        """Scale the default prompt's output layer so its logits start near +-1 (distance recipe).

        A model trained for prompts answers SAM's empty prompt with logits
        around -20 (LiteMedSAM: -17 to -26): the sigmoid is flat there and the
        MSE of SAMCell's loss has no gradient, so training never starts.
        Scaling the last layer of mask token 0's hypernetwork (a linear map into
        the mask's 32 channels) scales the logits by the same factor (to a mean
        magnitude of 1); the layer is then trained and saved with the adapter.
        Returns the factor (None when the mean magnitude is below 4).
        """
        torch = _torch()
        from .predictor import default_prompt_logits

        feats = torch.cat([self._features_of(e, distance=True) for e in entries[:4]])
        with torch.no_grad():
            logits = default_prompt_logits(self._sam, feats)
        size = float(logits.abs().mean())
        if size < 4.0:
            return None
        factor = 1.0 / size
        from .distance_head import distance_decoder_of

        layer = distance_decoder_of(self._sam).output_hypernetworks_mlps[0].layers[-1]
        with torch.no_grad():
            layer.weight.mul_(factor)
            layer.bias.mul_(factor)
        return factor

    def n_trainable(self) -> int:
        """Number of trainable scalars (after setup)."""
        return int(sum(p.numel() for p in self.trainable))

    # -- features ------------------------------------------------------------------

    def _autocast(self):
        import contextlib

        torch = _torch()
        if not self.use_amp:
            return contextlib.nullcontext()
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(kind, dtype=torch.bfloat16)

    def _encoder_autocast(self):
        """The frozen encoder's arithmetic for embedding views (``FinetuneConfig.encoder_precision``)."""
        from .models import precision_autocast

        return precision_autocast(self.encoder_precision, self.device)

    @property
    def _cache_neck_input(self) -> bool:
        """Cache the features entering the encoder's neck (the neck is trained), not its output."""
        return self.cfg.encoder_tail == "neck" and not self.cfg.encoder_lora

    @property
    def _encoder_in_loop(self) -> bool:
        """Every step runs the whole encoder (LoRA in all its blocks): views are rendered, not cached."""
        return self.cfg.encoder_lora and self.cfg.encoder_lora_blocks is None

    @property
    def _cache_tail_input(self) -> bool:
        """Cache what enters the encoder's adapted last blocks (``encoder_lora_blocks``)."""
        return self.cfg.encoder_lora and self.cfg.encoder_lora_blocks is not None

    def _encode(self, image01: np.ndarray, grad: bool = False, distance: bool = False, sam=None):
        """Encoder output of a view (or, when the neck is trained from the cache, the neck's input).

        ``distance`` (with ``grad``): the distance path's embedding
        (:func:`~napari_cellseg.core.distance_head.distance_features`).
        """
        torch = _torch()
        from .distance_head import distance_features

        sam = sam or self._sam
        x = self._encoder_input([image01], sam)
        if grad:
            return distance_features(sam, x) if distance else sam.image_encoder(x)
        with torch.no_grad(), self._encoder_autocast():
            if self._cache_tail_input:
                return encoder_head(self._cached_encoder(sam), x, self.cfg.encoder_lora_blocks).float()
            if self._cache_neck_input:
                return encoder_before_neck(self._cached_encoder(sam), x).float()
            return sam.image_encoder(x).float()

    def _encoder_input(self, images01: Sequence[np.ndarray], sam=None):
        """Views ``(H, W, 3)`` in [0, 1] as the encoder's normalised input batch, on the training device."""
        torch = _torch()
        sam = sam or self._sam
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images01).transpose(0, 3, 1, 2))).to(self.device)
        return (x * 255.0 - sam.pixel_mean) / sam.pixel_std

    def _cached_encoder(self, sam):
        """The encoder whose features are cached: the distance path's own one for the distance recipe."""
        from .distance_head import get_distance_encoder

        own = get_distance_encoder(sam)
        return own if own is not None and self.cfg.recipe == "distance" else sam.image_encoder

    def _cache_path(self, pair: TrainingPair, spec: ViewSpec) -> Path | None:
        if not self.cfg.feature_cache:
            return None
        import hashlib

        key = (f"{self._model_tag}|{pair.key}|{spec.key()}|{self.cfg.clahe}|{self.input_size}|"
               f"{'neck-input' if self._cache_neck_input else 'embedding'}"
               f"{f'|tail-input-{self.cfg.encoder_lora_blocks}' if self._cache_tail_input else ''}"
               f"{'|bfloat16' if self.encoder_precision == 'bfloat16' else ''}"
               f"{'|distance-encoder' if self._cached_encoder(self._sam) is not self._sam.image_encoder else ''}")
        h = hashlib.sha256(key.encode()).hexdigest()[:32]
        return Path(self.cfg.feature_cache) / f"{h}.npy"

    def _view_entry(self, data: TrainingData, spec: ViewSpec, distances, with_features: bool) -> dict:
        pair = data.pairs[spec.pair]
        view = render_view(pair, spec, self.input_size, clahe=self.cfg.clahe, distance=distances[spec.pair])
        entry = {"labels": view["labels"], "known": view["known"]}
        if self._uses_refiner:
            entry["pixels"] = (view["image"] * 255.0 + 0.5).astype(np.uint8)  # what the refiner reads
        if "target" in view:
            entry["target"] = view["target"].astype(np.float16)
        if self.cfg.recipe in PROMPT_RECIPES:
            entry.update(_prompt_candidates(view["labels"], view["known"], self.cfg.top_fraction))
        if with_features:
            path = self._cache_path(pair, spec)
            feats = None
            if path is not None and path.is_file():
                try:
                    feats = np.load(path)
                except (OSError, ValueError):
                    feats = None
            if feats is None:
                feats = self._encode(view["image"])[0].float().cpu().numpy().astype(np.float16)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
                    np.save(tmp, feats)
                    os.replace(tmp, path)
            entry["features"] = feats
        else:
            entry["image"] = view["image"]
        return entry

    def _render_entries(self, specs: Sequence[ViewSpec]) -> list[dict]:
        """Render training views with their pixels (encoder in the loop: no feature cache).

        One after the other; a training script on a GPU machine overrides this
        to render in worker processes (``training/train_encoder_stage.py``).
        """
        return [self._view_entry(self.train, s, self.distances, with_features=False) for s in specs]

    # -- losses ----------------------------------------------------------------------

    def _features_of(self, entry: dict, sam=None, distance: bool = False):
        """Image embedding of a cached or rendered view (through ``sam``'s neck when the neck is trained).

        ``distance``: the embedding of the distance path, through the model's
        own distance neck when it has one (a model continued from the
        packaged ``cellseg``).
        """
        torch = _torch()
        from .distance_head import get_distance_neck

        sam = sam or self._sam
        neck = get_distance_neck(sam) if distance else None
        if "features" in entry:
            feats = torch.from_numpy(entry["features"].astype(np.float32))[None].to(self.device)
            if self._cache_tail_input:
                return self._through_tail(feats, sam, neck)
            if self._cache_neck_input:
                feats = (neck or sam.image_encoder.neck)(feats)
            return feats
        return self._encode(entry["image"], grad=True, distance=distance, sam=sam)

    def _through_tail(self, head, sam, neck):
        """The adapted last blocks (LoRA, with gradients when training) and the neck, on cached head outputs."""
        with self._autocast():
            feats = encoder_tail(self._cached_encoder(sam), head, self.cfg.encoder_lora_blocks)
            return (neck or sam.image_encoder.neck)(feats).float()

    @property
    def _uses_refiner(self) -> bool:
        from .distance_head import get_refiner

        return self.cfg.recipe in DISTANCE_RECIPES and get_refiner(self._sam) is not None

    def _map_logits(self, entries: list[dict], feats, sam=None):
        """Distance-map logits of views (through the refiner when the model has one)."""
        torch = _torch()
        from .predictor import default_prompt_logits, distance_logits
        from .distance_head import get_refiner

        sam = sam or self._sam
        if get_refiner(sam) is None:
            return default_prompt_logits(sam, feats)
        pixels = np.stack([e["pixels"] for e in entries]).astype(np.float32) / 255.0
        image = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)
        return distance_logits(sam, feats, image)

    def _distance_loss(self, entries: list[dict], weight: float = 1.0):
        torch = _torch()
        import torch.nn.functional as F

        from .distance_head import distance_features

        if all("image" in e for e in entries):
            # encoder in the loop: one batched forward (and backward) for all the views
            x = self._encoder_input([e["image"] for e in entries])
            with self._autocast():
                feats = distance_features(self._sam, x)
        elif self._cache_tail_input and all("features" in e for e in entries):
            # the adapted blocks: one batched forward (and backward) for all the views
            from .distance_head import get_distance_neck

            head = torch.from_numpy(np.stack([e["features"] for e in entries]).astype(np.float32)).to(self.device)
            feats = self._through_tail(head, self._sam, get_distance_neck(self._sam))
        else:
            feats = torch.cat([self._features_of(e, distance=True) for e in entries])
        with self._autocast():
            logits = self._map_logits(entries, feats)
        up = F.interpolate(logits.float(), (self.input_size, self.input_size), mode="bilinear",
                           align_corners=False)[:, 0]
        pred = torch.sigmoid(up)
        target = torch.from_numpy(np.stack([e["target"].astype(np.float32) for e in entries])).to(self.device)
        known = torch.from_numpy(np.stack([e["known"] for e in entries]).astype(np.float32)).to(self.device)
        loss = ((pred - target) ** 2 * known).sum() / known.sum().clamp_min(1.0)
        (loss * weight).backward()
        return float(loss.detach()) * weight

    def _prompt_loss(self, entry: dict, rng: np.random.Generator):
        """Decode sampled prompts of one view, accumulate gradients; return the mean loss."""
        torch = _torch()
        cfg = self.cfg
        cells = entry["cells"]
        n_cells = min(cfg.max_cells, len(cells))
        chosen = rng.choice(len(cells), n_cells, replace=False) if n_cells else np.zeros(0, int)
        batches: list[tuple[str, np.ndarray, np.ndarray]] = []
        size = self.input_size
        kinds = np.array(cfg.prompt_types)[rng.integers(len(cfg.prompt_types), size=n_cells)] if n_cells \
            else np.zeros(0, str)
        point_cells = [i for i, k in zip(chosen, kinds) if k == "point"]
        box_cells = [i for i, k in zip(chosen, kinds) if k == "box"]
        if "point" in cfg.prompt_types:
            pts = [cells[i][1][rng.integers(len(cells[i][1]))] for i in point_cells]
            bg = entry["background"]
            n_neg = min(cfg.max_negatives, len(bg), max(2, math.ceil(n_cells / 2)))
            negs = bg[rng.choice(len(bg), n_neg, replace=False)] if n_neg else np.zeros((0, 2), int)
            ids = np.concatenate([np.array([cells[i][0] for i in point_cells], int), np.zeros(n_neg, int)])
            coords = np.concatenate([np.array(pts, float).reshape(-1, 2), np.asarray(negs, float).reshape(-1, 2)])
            if len(ids):
                batches.append(("point", coords, ids))
        if box_cells:
            boxes, ids = [], []
            for i in box_cells:
                r0, c0, r1, c1 = cells[i][2]
                h, w = r1 - r0, c1 - c0
                j = cfg.box_jitter * rng.uniform(-1, 1, 4) * np.array([h, w, h, w])
                boxes.append([max(0, r0 + j[0]), max(0, c0 + j[1]), min(size, r1 + j[2]), min(size, c1 + j[3])])
                ids.append(cells[i][0])
            batches.append(("box", np.array(boxes, float), np.array(ids, int)))
        n_total = sum(len(b[2]) for b in batches)
        if n_total == 0:
            return None
        feats = self._features_of(entry)
        # encoder gradients: accumulate through one graph (features reused by every micro-batch)
        retain = feats.requires_grad
        labels_t = torch.from_numpy(entry["labels"]).to(self.device)
        known_t = torch.from_numpy(entry["known"].astype(np.float32)).to(self.device)
        total = 0.0
        chunks = [(kind, coords[s:s + cfg.prompt_batch], ids[s:s + cfg.prompt_batch])
                  for kind, coords, ids in batches for s in range(0, len(ids), cfg.prompt_batch)]
        for n, (kind, coords, ids) in enumerate(chunks):
            with self._autocast():
                loss = self._prompt_chunk_loss(feats, kind, coords, ids, labels_t, known_t) * (len(ids) / n_total)
            loss.backward(retain_graph=retain and n < len(chunks) - 1)
            total += float(loss.detach())
        return total

    def _prompt_chunk_loss(self, feats, kind: str, coords: np.ndarray, ids: np.ndarray, labels_t, known_t):
        torch = _torch()
        import torch.nn.functional as F

        sam = self._sam
        dev = self.device
        # (row, col) -> SAM's (x, y) in model input pixels: the only place of this module where the order flips
        if kind == "point":
            xy = np.stack([coords[:, 1] + 0.5, coords[:, 0] + 0.5], axis=-1)[:, None]
            points = (torch.as_tensor(xy, dtype=torch.float32, device=dev),
                      torch.ones((len(ids), 1), dtype=torch.int64, device=dev))
            sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
        else:
            xyxy = coords[:, [1, 0, 3, 2]]
            sparse, dense = sam.prompt_encoder(points=None, masks=None,
                                               boxes=torch.as_tensor(xyxy, dtype=torch.float32, device=dev))
        low, iou = sam.mask_decoder.predict_masks(
            image_embeddings=feats, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        low, iou = low.float(), iou.float()
        size = self.input_size
        ids_t = torch.as_tensor(ids, device=dev)
        is_cell = (ids_t > 0).float()
        gt = (labels_t[None] == ids_t[:, None, None]).float() * is_cell[:, None, None]  # (B, S, S)
        use_multi = kind == "point" and self.cfg.multimask == "train"
        k = 4 if use_multi else 1
        up = F.interpolate(low[:, :k], (size, size), mode="bilinear", align_corners=False)
        w = known_t[None, None]
        bce = F.binary_cross_entropy_with_logits(up, gt[:, None].expand_as(up), reduction="none")
        bce = (bce * w).sum(dim=(-2, -1)) / w.sum().clamp_min(1.0)  # (B, k)
        if self.cfg.dice_weight:
            prob = torch.sigmoid(up) * w
            inter = (prob * gt[:, None]).sum(dim=(-2, -1))
            dice = 1 - (2 * inter + 1) / (prob.sum(dim=(-2, -1)) + (gt[:, None] * w).sum(dim=(-2, -1)) + 1)
            bce = bce + self.cfg.dice_weight * dice
        # BCE of the mask(s) for cell prompts, MSE of the IoU head(s) against the cell probability
        loss = (bce.mean(dim=1) * is_cell).sum() + ((iou[:, :k] - is_cell[:, None]) ** 2).mean(dim=1).sum()
        return loss / len(ids)

    # -- validation ----------------------------------------------------------------

    def _prepare_validation(self):
        """Embed un-augmented tiles of the validation planes once (generator of progress)."""
        self.val_tiles = []
        if self.validation is None:
            return
        crop = self.cfg.crop_size
        dist = [None] * len(self.validation.pairs)
        specs = []
        for i, pair in enumerate(self.validation.pairs):
            for sl in _eval_tiles(pair, crop):
                specs.append((i, sl))
        for n, (i, sl) in enumerate(specs):
            spec = _tile_spec(i, sl, crop)
            entry = self._view_entry(self.validation, spec, dist, with_features=not self._encoder_in_loop)
            entry["pair"], entry["slice"] = i, sl
            self.val_tiles.append(entry)
            yield Progress(n + 1, len(specs), f"embedding validation tile {n + 1}/{len(specs)}")

    def _validate(self) -> dict:
        torch = _torch()
        import torch.nn.functional as F

        if not self.val_tiles:
            return {}
        crop = self.cfg.crop_size
        size = self.input_size
        aps = []
        preds = []
        with torch.no_grad():
            for i, pair in enumerate(self.validation.pairs):
                tiles = [t for t in self.val_tiles if t["pair"] == i]
                if self.cfg.recipe in DISTANCE_RECIPES:
                    acc = np.zeros(pair.shape, np.float32)
                    cnt = np.zeros(pair.shape, np.float32)
                    for t in tiles:
                        feats = self._features_of(t, distance=True)
                        logits = self._map_logits([t], feats)
                        up = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
                        prob = torch.sigmoid(up)[0, 0].cpu().numpy()
                        rs, cs = t["slice"]
                        h, w = rs.stop - rs.start, cs.stop - cs.start
                        # views sample crop x crop windows: resample the model grid back to the tile
                        prob = _resample(prob, crop)[:h, :w]
                        acc[rs, cs] += prob
                        cnt[rs, cs] += 1
                    dmap = acc / np.maximum(cnt, 1)
                    from .postprocess import labels_from_distance_map

                    th = self.cfg.thresholds or DEFAULT_DISTANCE_THRESHOLDS
                    pred = labels_from_distance_map(dmap, th["peak"], th["fill"])
                else:
                    pred = self._validate_points(pair, tiles)
                pred = pred * pair.known
                preds.append(pred)
                aps.append(_ap(pair.labels, pred))
        ap50 = float(np.mean([a[0] for a in aps]))
        ap75 = float(np.mean([a[1] for a in aps]))
        return {"val_ap": ap50, "val_ap75": ap75}

    def _validate_points(self, pair: TrainingPair, tiles: list[dict]) -> np.ndarray:
        """One click per reference cell (its innermost pixel), decoded in the tile whose centre is nearest."""
        torch = _torch()
        import torch.nn.functional as F
        from scipy import ndimage as ndi

        sam = self._sam
        crop = self.cfg.crop_size
        size = self.input_size
        scale = size / crop
        out = np.zeros(pair.shape, np.int32)
        best = np.zeros(pair.shape, np.float32)
        centres = np.array([[t["slice"][0].start + crop / 2, t["slice"][1].start + crop / 2] for t in tiles])
        clicks: dict[int, list] = {}
        for idx, sl in enumerate(ndi.find_objects(pair.labels), start=1):
            if sl is None:
                continue
            mask = pair.labels[sl] == idx
            dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            r, c = np.unravel_index(np.argmax(dist), dist.shape)
            r, c = r + sl[0].start, c + sl[1].start
            k = int(np.argmin(((centres - [r, c]) ** 2).sum(1)))
            clicks.setdefault(k, []).append((idx, r, c))
        for k, items in clicks.items():
            t = tiles[k]
            rs, cs = t["slice"]
            feats = self._features_of(t)
            rc = np.array([[(r - rs.start + 0.5) * scale, (c - cs.start + 0.5) * scale] for _, r, c in items])
            xy = np.ascontiguousarray(rc[:, ::-1])[:, None]
            pts = (torch.as_tensor(xy, dtype=torch.float32, device=self.device),
                   torch.ones((len(items), 1), dtype=torch.int64, device=self.device))
            sparse, dense = sam.prompt_encoder(points=pts, boxes=None, masks=None)
            low, iou = sam.mask_decoder(image_embeddings=feats, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=True)
            pick = iou.argmax(dim=1)
            low = low[torch.arange(len(items)), pick][:, None]
            scores = iou[torch.arange(len(items)), pick].cpu().numpy()
            up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            h, w = rs.stop - rs.start, cs.stop - cs.start
            for j, (idx, _, _) in enumerate(items):
                m = _resample(up[j], crop)[:h, :w] > 0
                region = out[rs, cs]
                bregion = best[rs, cs]
                paint = m & (bregion <= scores[j])
                region[paint] = idx
                bregion[paint] = scores[j]
        return out

    # -- state -----------------------------------------------------------------------

    def _current_tensors(self) -> dict:
        return export_adapter_tensors(self._sam, self.full_names, self.stage)

    def _all_tensors(self, new: dict) -> dict:
        return {**self.prev_tensors, **new}

    def _make_result(self, new_tensors: dict, stopped: str) -> FinetuneResult:
        from .models import LoadedModel

        tensors = self._all_tensors(new_tensors)
        sam = copy.deepcopy(self.root_sam())
        apply_adapter(sam, tensors)
        if self.cfg.recipe in PROMPT_RECIPES and self.cfg.multimask == "tie":
            tied = tie_multimask_outputs(sam)
            tensors = {**tensors, **{f"s{self.stage}.full.{k}": v for k, v in tied.items()}}
        sam.to(self.device).eval()
        meta = self._meta(stopped)
        entry = replace(self.base_model.entry, capabilities=tuple(meta["capabilities"]))
        model = LoadedModel(name=self.base_model.name, sam=sam, device=self.device, entry=entry,
                            meta={k: v for k, v in meta.items() if k in _RUNTIME_META})
        return FinetuneResult(model=model, tensors=tensors, meta=meta, history=list(self._history),
                              stopped=stopped)

    def root_sam(self):
        """The untouched root base network (the adapter's stages are merged into a copy of it)."""
        if self.base_model.entry.source == "adapter":
            from .models import load_model

            return load_model(self.root_base, device=self.device, progress=False).sam
        return self.base_model.sam

    def _meta(self, stopped: str) -> dict:
        import datetime

        from napari_cellseg import __version__

        cfg = self.cfg
        last = self._history[-1] if self._history else {}
        best = max((h for h in self._history if "val_ap" in h), key=lambda h: h["val_ap"], default=None)
        metrics = {
            "steps": self._steps,
            "epochs": round(self._steps / max(1, self._steps_per_epoch), 3),
            "seconds": round(time.monotonic() - self._started, 1) if self._started else 0.0,
            "final_loss": last.get("loss"),
            "trainable_parameters": self.n_trainable(),
            "views": getattr(self, "n_views", 0),
            "stopped": stopped,
        }
        if best is not None:
            metrics["best_val_ap"] = best["val_ap"]
            metrics["best_val_ap75"] = best.get("val_ap75")
        stage = {
            "recipe": cfg.recipe,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "data": self.train.summary,
            "metrics": metrics,
        }
        from .distance_head import get_distance_decoder

        prev = self.base_model.meta or {}
        # a base whose map has its own decoder (joint-trained, the packaged cellseg) keeps both abilities
        # whichever recipe continues it
        own_head = get_distance_decoder(self.base_model.sam) is not None and prev.get("output") == "distance"
        output = "distance" if cfg.recipe in DISTANCE_RECIPES or own_head else "mask"
        if cfg.recipe == "joint" or own_head:
            capabilities = ["distance", "prompt", "grid"]
        elif cfg.recipe == "distance":
            capabilities = ["distance"]  # the map replaced the mask decoder's answers
        else:
            capabilities = ["prompt", "grid"]
        meta = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "base": self.root_base,
            "architecture": self.base_model.entry.architecture,
            "input_size": self.input_size,
            "recipe": cfg.recipe,
            "output": output,
            "capabilities": capabilities,
            "crop_size": cfg.crop_size,
            "config": cfg.to_dict(),
            "data": self.train.summary,
            "metrics": metrics,
            "created": stage["created"],
            "napari_cellseg_version": __version__,
            "stages": self.prev_stages + [stage],
        }
        sizes = self.train.summary.get("cell_diameters") or {}
        if sizes or prev.get("cell_diameters"):
            from .cell_size import merge_size_tables

            # the new cells' median is the zoom's target; the ranges widen to cover the base's training cells
            meta["cell_diameters"] = merge_size_tables(prev.get("cell_diameters") or {}, sizes)
        if output == "distance":
            inherited = prev.get("thresholds") if cfg.recipe not in DISTANCE_RECIPES else None
            meta["thresholds"] = dict(cfg.thresholds or inherited or DEFAULT_DISTANCE_THRESHOLDS)
        if cfg.recipe not in PROMPT_RECIPES:  # this stage did not train the prompt pathway
            # nor the base's box decoder, kept in its tensors
            for key in ("prompt_pathway", "box_mask_threshold", "click_mask_threshold", "box_head"):
                if prev.get(key) is not None:
                    meta[key] = prev[key]
        return meta

    def _checkpoint_state(self, rng, epoch: int, elapsed_train: float, views_done: int) -> dict:
        return {
            "trainable": {n: p.detach().cpu().clone() for n, p in self._sam.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "steps": self._steps, "epoch": epoch, "elapsed_train": elapsed_train,
            "best": self._best_tensors, "best_score": self._best_score, "history": self._history,
            "rng": rng.bit_generator.state, "config": self.cfg.to_dict(), "views_done": views_done,
            "train_budget": getattr(self, "_train_budget", None),
        }

    def _save_checkpoint(self, state: dict) -> None:
        torch = _torch()
        path = Path(self.cfg.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load_checkpoint(self) -> dict | None:
        torch = _torch()
        if not self.cfg.checkpoint or not Path(self.cfg.checkpoint).is_file():
            return None
        state = torch.load(self.cfg.checkpoint, map_location="cpu", weights_only=True)  # tensors and plain data
        if state.get("config") != self.cfg.to_dict():
            raise ValueError(
                f"checkpoint {self.cfg.checkpoint} was written with other settings: delete it or use the same "
                "configuration to resume"
            )
        return state

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> Generator[Progress, None, FinetuneResult]:
        """Train; yields :class:`Progress` (``data``: loss, lr, epoch, val_ap) and returns a :class:`FinetuneResult`."""
        from .cpu_memory import reuse_freed_memory
        from .models import resolve_device

        try:
            # on a CPU, freed tensors stay mapped for the next step's (1.3x per step, see core.cpu_memory)
            with reuse_freed_memory(resolve_device(self.config.device)):
                return (yield from self._run())
        except MemoryError as exc:
            raise FinetuneMemoryError(_oom_message(self.config)) from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower():
                raise FinetuneMemoryError(_oom_message(self.config)) from exc
            raise

    def _run(self):
        torch = _torch()
        self._started = time.monotonic()
        self._steps_per_epoch = 1
        yield Progress(0, 0, "preparing the model")
        self._setup()
        cfg = self.cfg
        budget = cfg.minutes * 60.0 if cfg.minutes else None
        self._model_tag = f"{self.root_base}|{self.stage}|{self.base_model.meta.get('created', '')}"
        rng = np.random.default_rng(cfg.seed)
        resume = self._load_checkpoint()
        cache = not self._encoder_in_loop
        # -- views --------------------------------------------------------------------
        n_tiles = sum(len(_tiles(p, cfg.crop_size)) for p in self.train.pairs)
        entries: list[dict] = []
        target = cfg.views
        if target is None and not (cache and budget):
            target = 4 * n_tiles
        planned = plan_views(self.train, target or max(n_tiles, 1), cfg, rng)
        if not cache:
            # encoder in the loop: views are rendered afresh every step
            self.n_views = n_tiles
        else:
            t0 = time.monotonic()
            n = 0
            while True:
                if target is not None and n >= target:
                    break
                if n >= len(planned):
                    planned += plan_views(self.train, max(n_tiles, 1), cfg, rng)
                entries.append(self._view_entry(self.train, planned[n], self.distances, with_features=True))
                n += 1
                spent = time.monotonic() - t0
                if target is None:
                    per = spent / n
                    # the budget rules: with more tiles than fit in it, views sample the tiles at random
                    # (at least a few views, so that training has something to learn from)
                    cap = max(min(n_tiles, MIN_BUDGET_VIEWS), int(cfg.cache_fraction * budget / max(per, 1e-3)))
                    per_tile = MAX_VIEWS_PER_TILE.get(cfg.recipe, DEFAULT_MAX_VIEWS_PER_TILE)
                    cap = min(cap, per_tile * n_tiles)
                    if n >= cap:
                        break
                    total_views = cap
                else:
                    total_views = target
                yield Progress(n, total_views, f"embedding training view {n}/{total_views}")
                if self._stop.is_set():
                    break
            self.n_views = len(entries)
        if cfg.recipe in DISTANCE_RECIPES and resume is None:
            probe = entries or [self._view_entry(self.train, s, self.distances, with_features=True)
                                for s in plan_views(self.train, 1, cfg, rng)]
            self.output_scale = self._unsaturate(probe)
        if self.validation is not None:
            yield from self._prepare_validation()
        else:
            self.val_tiles = []
        # -- schedule -------------------------------------------------------------------
        bs = cfg.batch_size
        if cache:
            per_epoch = max(1, math.ceil(len(entries) / bs)) if cfg.recipe in DISTANCE_RECIPES else len(entries)
        else:
            per_epoch = max(1, math.ceil(n_tiles / (bs if cfg.recipe in DISTANCE_RECIPES else 1)))
        self._steps_per_epoch = per_epoch
        max_steps = cfg.epochs * per_epoch if cfg.epochs else None
        train_start = time.monotonic()
        elapsed_before = 0.0
        epoch = 0
        order: list[int] = []
        if resume is not None:
            params = dict(self._sam.named_parameters())
            for n, v in resume["trainable"].items():
                params[n].data.copy_(v.to(params[n].device))
            self.optimizer.load_state_dict(resume["optimizer"])
            self._steps = resume["steps"]
            epoch = resume["epoch"]
            elapsed_before = resume["elapsed_train"]
            self._best_tensors, self._best_score = resume["best"], resume["best_score"]
            self._history = resume["history"]
            rng.bit_generator.state = resume["rng"]
            yield Progress(self._steps, max_steps or 0, f"resumed from {cfg.checkpoint} at step {self._steps}")
        train_budget = None
        if budget is not None:
            train_budget = max(1.0, budget - (train_start - self._started))
            if resume is not None:
                # the budget of the interrupted run, not a new one on top of it (the learning-rate schedule
                # and the end of training follow the original run)
                train_budget = resume.get("train_budget") or train_budget + elapsed_before
        self._train_budget = train_budget
        eval_every = cfg.eval_every
        window_losses: list[float] = []
        bad_evals = 0
        stopped = "finished"
        last_ckpt = time.monotonic()
        step_times: list[float] = []
        while True:
            elapsed = elapsed_before + (time.monotonic() - train_start)
            frac_steps = self._steps / max_steps if max_steps else 0.0
            frac_time = elapsed / train_budget if train_budget else 0.0
            progress = max(frac_steps, frac_time)
            if max_steps is not None and self._steps >= max_steps:
                break
            if train_budget is not None and elapsed >= train_budget:
                stopped = "time budget" if max_steps is not None else "finished"
                break
            if self._stop.is_set():
                stopped = "cancelled"
                break
            factor = lr_factor(progress, cfg.schedule, cfg.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            t_step = time.monotonic()
            self.optimizer.zero_grad(set_to_none=True)
            if cache:
                if not order:
                    order = list(rng.permutation(len(entries)))
                    epoch += 1
                take = [order.pop() for _ in range(min(bs if cfg.recipe in DISTANCE_RECIPES else 1, len(order)))]
                batch = [entries[i] for i in take]
            else:
                specs = plan_views(self.train, bs if cfg.recipe in DISTANCE_RECIPES else 1, cfg, rng)
                batch = self._render_entries(specs)
                epoch = self._steps // per_epoch + 1
            if cfg.recipe == "distance":
                loss = self._distance_loss(batch)
            elif cfg.recipe == "joint":
                loss = self._distance_loss(batch, weight=cfg.distance_weight)
                prompt_loss = self._prompt_loss(batch[0], rng)
                if prompt_loss is not None:
                    loss += prompt_loss
            else:
                loss = self._prompt_loss(batch[0], rng)
            if loss is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
                self.optimizer.step()
                window_losses.append(loss)
            self._steps += 1
            step_times.append(time.monotonic() - t_step)
            if eval_every is None:
                if max_steps:
                    est_total = max_steps
                else:
                    mean_t = float(np.mean(step_times[-20:]))
                    est_total = self._steps + max(0.0, (train_budget - elapsed)) / max(mean_t, 1e-3)
                every = max(1, min(per_epoch, int(est_total // 10) or 1))
            else:
                every = int(eval_every)
            total = max_steps or int(self._steps + max(0.0, (train_budget or 0) - elapsed)
                                     / max(float(np.mean(step_times[-20:])), 1e-3))
            data = {"loss": loss, "lr": cfg.lr * factor, "epoch": epoch}
            if self._steps % every == 0:
                record = self._evaluate(window_losses, epoch, elapsed)
                window_losses = []
                improved = self._track_best(record, cfg.min_delta)
                bad_evals = 0 if improved else bad_evals + 1
                data.update({k: v for k, v in record.items() if k.startswith("val_")})
                data["eval"] = True
                if cfg.patience and self.val_tiles and bad_evals >= cfg.patience:
                    stopped = "early stopping"
                    yield Progress(self._steps, total, _step_message(self._steps, epoch, loss, data), data)
                    break
            if cfg.checkpoint and time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                self._save_checkpoint(self._checkpoint_state(rng, epoch, elapsed, len(entries)))
                last_ckpt = time.monotonic()
            yield Progress(self._steps, total, _step_message(self._steps, epoch, loss, data), data)
        if window_losses or not self._history:
            record = self._evaluate(window_losses, epoch, elapsed_before + time.monotonic() - train_start)
            self._track_best(record, cfg.min_delta)
        if cfg.checkpoint:
            self._save_checkpoint(self._checkpoint_state(rng, epoch, elapsed_before + time.monotonic() - train_start,
                                                         len(entries)))
        tensors = self._best_tensors if self._best_tensors is not None else self._current_tensors()
        yield Progress(self._steps, self._steps, "building the fine-tuned model")
        result = self._make_result(tensors, stopped)
        if cfg.recipe in DISTANCE_RECIPES and cfg.tune_thresholds and self.config.thresholds is None:
            yield Progress(self._steps, self._steps, "tuning the distance-map thresholds")
            self._tune_thresholds(result, entries)
        self._finished = result
        return self._finished

    def _tune_thresholds(self, result: FinetuneResult, entries: list[dict], max_views: int = 24) -> None:
        """Pick (peak, fill, smooth) with the best mean AP@0.5 on validation planes or cached training views."""
        torch = _torch()
        import torch.nn.functional as F

        from .postprocess import labels_from_distance_map

        sam = result.model.sam
        size = self.input_size
        samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (map, labels, known)
        with torch.no_grad():
            if self.val_tiles and not self._encoder_in_loop:
                for i, pair in enumerate(self.validation.pairs):
                    acc = np.zeros(pair.shape, np.float32)
                    cnt = np.zeros(pair.shape, np.float32)
                    for t in (t for t in self.val_tiles if t["pair"] == i):
                        logits = self._map_logits([t], self._features_of(t, sam, distance=True), sam).float()
                        up = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
                        rs, cs = t["slice"]
                        prob = _resample(torch.sigmoid(up)[0, 0].cpu().numpy(), self.cfg.crop_size)
                        acc[rs, cs] += prob[:rs.stop - rs.start, :cs.stop - cs.start]
                        cnt[rs, cs] += 1
                    samples.append((acc / np.maximum(cnt, 1), pair.labels, pair.known))
                source = "validation"
            else:
                for e in [e for e in entries if "features" in e][:max_views]:
                    logits = self._map_logits([e], self._features_of(e, sam, distance=True), sam).float()
                    up = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
                    samples.append((torch.sigmoid(up)[0, 0].cpu().numpy(), e["labels"], e["known"]))
                source = "training views"
        if not samples:
            return

        from scipy import ndimage as ndi

        smoothed = {sigma: [ndi.gaussian_filter(d, sigma) if sigma else d for d, _, _ in samples]
                    for sigma in SMOOTHING_CHOICES}

        def mean_ap(peak: float, fill: float, sigma: float = 0.0) -> float:
            aps = []
            for dmap, (_, labels, known) in zip(smoothed[sigma], samples):
                pred = labels_from_distance_map(dmap, peak, fill) * known
                aps.append(_ap(labels * known, pred, (0.5,))[0])
            return float(np.mean(aps))

        candidates = distance_default_candidates()
        default = candidates[0]
        scores = {c: mean_ap(*c) for c in candidates}
        best = max(scores, key=lambda k: (scores[k], k == default))
        # keep SAMCell's thresholds unless others are clearly better
        if scores[best] <= scores[default] + 0.01:
            best = default
        tuned = {"peak": float(best[0]), "fill": float(best[1]), "smooth": float(best[2])}
        result.meta["thresholds"] = tuned
        result.meta["metrics"]["thresholds_tuned_on"] = source
        result.meta["metrics"]["tuning_ap50"] = round(scores[best], 4)
        result.meta["metrics"]["tuning_ap50_samcell_thresholds"] = round(scores[default], 4)
        result.model.meta["thresholds"] = tuned

    def _evaluate(self, window_losses: list[float], epoch: int, elapsed: float) -> dict:
        record = {"step": self._steps, "epoch": epoch, "seconds": round(elapsed, 1),
                  "loss": float(np.mean(window_losses)) if window_losses else None}
        record.update(self._validate())
        self._history.append(record)
        return record

    def _track_best(self, record: dict, min_delta: float) -> bool:
        """Keep the adapter if this evaluation is the best so far (val AP, else window loss)."""
        if "val_ap" in record:
            score = record["val_ap"]
        elif record.get("loss") is not None:
            score = -record["loss"]
        else:
            return False
        if self._best_score is None or score > self._best_score + min_delta:
            self._best_score = score
            self._best_tensors = self._current_tensors()
            return True
        if "val_ap" not in record:
            # without held-out data the latest weights are kept when about as good (the schedule anneals)
            if score >= self._best_score - min_delta:
                self._best_tensors = self._current_tensors()
        return False


#: adapter metadata copied onto the loaded model (``LoadedModel.meta``)
_RUNTIME_META = ("base", "recipe", "output", "thresholds", "capabilities", "crop_size", "input_size", "metrics",
                 "created", "stages", "data", "config", "prompt_pathway", "cell_diameters", "box_mask_threshold",
                 "click_mask_threshold", "box_head")


def _resample(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square (S, S) array to (size, size)."""
    if arr.shape[0] == size:
        return arr
    torch = _torch()
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr, np.float32))[None, None]
    return F.interpolate(t, (size, size), mode="bilinear", align_corners=False,
                         antialias=size < arr.shape[0])[0, 0].numpy()


def _step_message(step: int, epoch: int, loss, data: dict) -> str:
    msg = f"step {step} (epoch {epoch})"
    if loss is not None:
        msg += f" loss {loss:.4f}"
    if "val_ap" in data:
        msg += f" val AP50 {data['val_ap']:.3f}"
    return msg


def _oom_message(cfg: FinetuneConfig) -> str:
    return (
        "fine-tuning ran out of memory. Lower the memory it needs: fewer cached views "
        f"(views, now {cfg.views or 'auto'}), a smaller prompt_batch (now {cfg.prompt_batch}) or batch_size, "
        "leave encoder_lora off, close other programs, or train on a smaller region"
    )


def _prompt_candidates(labels: np.ndarray, known: np.ndarray, fraction: float, min_area: int = 10) -> dict:
    """Cell points (top of each cell's distance transform), boxes, and background points of one view."""
    from scipy import ndimage as ndi

    cells = []
    for idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == idx
        if mask.sum() < min_area:
            continue
        pts = top_fraction_points(mask, fraction) + [sl[0].start, sl[1].start]
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        box = (sl[0].start + rows[0], sl[1].start + cols[0], sl[0].start + rows[-1] + 1, sl[1].start + cols[-1] + 1)
        cells.append((idx, pts, box))
    background = (labels == 0) & known
    if background.any():
        # distance to the nearest cell or unknown pixel: the safest background
        dist = ndi.distance_transform_edt(background)
        values = dist[background]
        cut = np.quantile(values, 1.0 - fraction)
        bg = np.argwhere(background & (dist >= cut))
    else:
        bg = np.zeros((0, 2), np.int64)
    return {"cells": cells, "background": bg}


def finetune(base, train: TrainingData, config: FinetuneConfig | None = None,
             validation: TrainingData | None = None) -> Generator[Progress, None, FinetuneResult]:
    """Fine-tune ``base`` on ``train``: a generator of :class:`Progress` returning a :class:`FinetuneResult`.

    Shorthand for ``Finetuner(base, train, config, validation).run()``; use
    :class:`Finetuner` directly to stop a run early or read its best result.
    """
    return Finetuner(base, train, config, validation).run()


# ---------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------


def adapter_dir() -> Path:
    """Folder of saved adapters: ``models.cache_dir() / "adapters"``."""
    from .models import cache_dir

    return cache_dir() / "adapters"


def check_adapter_name(name: str) -> str:
    """Validate an adapter name (letters, digits, ``.``, ``_``, ``-``; not a built-in model name)."""
    from .models import _BUILTIN

    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"adapter name {name!r} is not valid: use 1-80 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (e.g. 'hela-phase-v1')"
        )
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is the name of a built-in model: choose another name for the adapter")
    return name


def adapter_paths(name: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(safetensors file, JSON file) of an adapter name."""
    folder = Path(directory) if directory is not None else adapter_dir()
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_adapter(result: FinetuneResult, name: str, directory: str | os.PathLike | None = None,
                 overwrite: bool = False, dtype: str = "float32") -> Path:
    """Write an adapter (safetensors + JSON) atomically; return the safetensors path.

    Both files are first written under temporary names in the same folder and
    then renamed, so an interrupted save leaves no half-written adapter. The
    JSON, renamed last, records the safetensors' sha256.

    Parameters
    ----------
    result : FinetuneResult
    name : str
        Adapter name (becomes a catalogue model name).
    directory : path, optional
        Default :func:`adapter_dir`.
    overwrite : bool
        Replace an adapter of the same name.
    dtype : {"float32", "float16"}
        Storage precision (float16 halves the file; outputs then differ slightly).
    """
    torch = _torch()
    from safetensors.torch import save_file

    from .models import file_hash

    check_adapter_name(name)
    st_path, js_path = adapter_paths(name, directory)
    if (st_path.exists() or js_path.exists()) and not overwrite:
        raise FileExistsError(f"an adapter named {name!r} exists ({js_path}): choose another name or overwrite it")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    st_path.parent.mkdir(parents=True, exist_ok=True)
    cast = torch.float16 if dtype == "float16" else torch.float32
    tensors = {k: v.detach().to("cpu", cast).contiguous() for k, v in result.tensors.items()}
    meta = dict(result.meta)
    meta["name"] = name
    meta["dtype"] = dtype
    tag = f".tmp{os.getpid()}-{time.monotonic_ns()}"
    st_tmp = st_path.with_name(st_path.name + tag)
    js_tmp = js_path.with_name(js_path.name + tag)
    try:
        save_file(tensors, str(st_tmp), metadata={"format": ADAPTER_FORMAT, "name": name})
        meta["sha256"] = file_hash(st_tmp)
        meta["file"] = st_path.name
        js_tmp.write_text(json.dumps(_jsonable(meta), indent=1))
        os.replace(st_tmp, st_path)
        os.replace(js_tmp, js_path)
    except BaseException:
        for tmp in (st_tmp, js_tmp):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        raise
    _forget_cached(name)
    result.model.name = name
    return st_path


def _forget_cached(name: str) -> None:
    """Drop a stale loaded copy of a (re)written adapter from the model cache."""
    from . import models

    forget = getattr(models, "forget_model", None)
    if forget is not None:
        forget(name)
        return
    with models._CACHE_LOCK:
        for key in [k for k in models._CACHE if k[0] == name]:
            del models._CACHE[key]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of an adapter file (the ``.safetensors`` or its ``.json``).

    Raises
    ------
    ValueError
        For a missing or unreadable JSON, a checksum mismatch, or a file that is
        not a napari-cellseg adapter.
    """
    from safetensors.torch import load_file

    from .models import file_hash

    path = Path(path)
    st_path = path.with_suffix(".safetensors")
    js_path = path.with_suffix(".json")
    if not st_path.is_file() or not js_path.is_file():
        raise FileNotFoundError(f"adapter files {st_path.name} and {js_path.name} are not both in {path.parent}")
    try:
        meta = json.loads(js_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter metadata {js_path} is not readable JSON ({exc})") from exc
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{js_path} is not a napari-cellseg adapter")
    if meta.get("sha256") and file_hash(st_path) != meta["sha256"]:
        raise ValueError(f"checksum mismatch for {st_path}: the adapter file is corrupt; train or copy it again")
    try:
        tensors = load_file(str(st_path))
    except Exception as exc:
        raise ValueError(f"{st_path} is not a readable safetensors file ({exc})") from exc
    return tensors, meta


def load_adapter(name_or_path: str | os.PathLike, device: str | None = "auto"):
    """Load an adapter: a deep copy of its base model with the adapter merged in.

    Parameters
    ----------
    name_or_path : str or path
        Adapter name (in :func:`adapter_dir`) or its ``.safetensors`` / ``.json`` path.
    device : str

    Returns
    -------
    LoadedModel
        ``meta`` carries the adapter's metadata (``output``, ``thresholds``...).
    """
    from .models import LoadedModel, ModelEntry, load_model, resolve_device

    path = Path(name_or_path)
    if path.suffix not in (".safetensors", ".json"):
        path = adapter_paths(str(name_or_path))[0]
    tensors, meta = read_adapter(path)
    dev = resolve_device(device)
    base = load_model(meta["base"], device=dev, progress=False)
    sam = copy.deepcopy(base.sam)
    apply_adapter(sam, tensors)
    sam.to(dev).eval()
    entry = adapter_entry(path.with_suffix(".json"), meta) or ModelEntry(
        name=path.stem, architecture=base.entry.architecture, input_size=base.input_size, source="adapter",
        location=str(path.with_suffix(".safetensors")), known_hash=None, licence="", description="", base=meta["base"])
    runtime = {k: v for k, v in meta.items() if k in _RUNTIME_META}
    runtime["adapter_file"] = str(path.with_suffix(".safetensors"))
    return LoadedModel(name=entry.name, sam=sam, device=dev, entry=entry, meta=runtime)


def adapter_entry(json_path: str | os.PathLike, meta: dict | None = None):
    """A catalogue ``ModelEntry`` for a saved adapter (None when its JSON is unusable)."""
    from .models import ModelEntry

    json_path = Path(json_path)
    try:
        meta = meta if meta is not None else json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or "base" not in meta:
        return None
    metrics = meta.get("metrics") or {}
    ap = metrics.get("best_val_ap")
    desc = (f"fine-tuned {meta.get('recipe', '?')} adapter on {meta['base']} "
            f"({(meta.get('data') or {}).get('cells', '?')} cells, {meta.get('created', '')[:10]}"
            + (f", val AP50 {ap:.2f}" if isinstance(ap, (int, float)) else "") + ")")
    return ModelEntry(
        name=meta.get("name", json_path.stem) if meta.get("name") == json_path.stem else json_path.stem,
        architecture=meta.get("architecture", ""),
        input_size=int(meta.get("input_size", 0)),
        source="adapter",
        location=str(json_path.with_suffix(".safetensors")),
        known_hash=f"sha256:{meta['sha256']}" if meta.get("sha256") else None,
        licence="same as the base model",
        description=desc,
        filename=json_path.with_suffix(".safetensors").name,
        capabilities=tuple(meta.get("capabilities") or (("distance",) if meta.get("output") == "distance"
                                                         else ("prompt", "grid"))),
        base=meta["base"],
    )


def list_adapters(directory: str | os.PathLike | None = None) -> list:
    """Catalogue entries of the adapters saved in ``directory`` (default :func:`adapter_dir`)."""
    folder = Path(directory) if directory is not None else adapter_dir()
    if not folder.is_dir():
        return []
    out = []
    for js in sorted(folder.glob("*.json")):
        if not js.with_suffix(".safetensors").is_file():
            continue
        entry = adapter_entry(js)
        if entry is not None:
            out.append(entry)
    return out


def _doctest_cells():
    """Six disks on a 64 x 64 image, for the examples."""
    from skimage.draw import disk

    image = np.zeros((64, 64), np.float32)
    labels = np.zeros((64, 64), np.int32)
    for k, (r, c) in enumerate([(12, 12), (12, 40), (30, 25), (45, 10), (50, 45), (30, 52)], start=1):
        rr, cc = disk((r, c), 7, shape=image.shape)
        labels[rr, cc] = k
        image[rr, cc] = 1.0
    return image, labels
