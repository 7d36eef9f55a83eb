"""Interactive annotation: embedding time, prompt-to-preview latency, and box-prompt IoU with and without zoom.

Three figures, on this machine's CPU:

1. Time to embed: LiteMedSAM (real weights) on a whole 1022 x 1024 Usiigaci image and on one zoom window, and a
   randomly initialised SAM vit_b (the real architecture; speed does not depend on the weights) on the whole image.
2. Latency from a prompt change to the preview, core path (the part the GUI waits for once the embedding is cached):
   window lookup + prompt encoding + mask decoding + upsampling + pasting the object into a preview label plane.
   p50 / p95 over ``--latency-prompts`` box prompts at ground-truth cell boxes. Goals: p50 <= 30 ms LiteMedSAM,
   <= 100 ms vit_b. Each prompt is answered by the plugin's FastMaskDecoder and, right after it (same load), by
   segment-anything's own MaskDecoder; with 1 and with 2 torch threads (``--latency-threads``).
3. Box-prompt quality, zero-shot LiteMedSAM: mean IoU of the mask answering each ground-truth box with the cell's
   ground-truth mask, on the team's validation images of usiigaci-phase-train (sets 36-45; ground truth = the largest
   connected component of each label, as SOURCE.md advises), with the whole image shrunk to 256 px (zoom off) and
   with the prompt-centred zoom. The zoom embeds one window per cell, so cells are sampled (``--cells-per-image``,
   seeded); the whole-image figure is given on the same sample and on every cell. The zoom's settings were chosen
   on training images (sets 1-35) only. With ``--views N`` (default 8) the same cells are also answered with the
   zoom and N orientations averaged (``AnnotationConfig.views``, test-time augmentation), at the tuned threshold;
   the paired difference to one orientation is reported with its standard error, and the latency of that averaged
   answer (cached embeddings) on ``--views-prompts`` prompts. The same cells are also answered with the inverted
   contrast (``AnnotationConfig.invert``: the window and its negative averaged, the default for LiteMedSAM), with
   one orientation and with N; the zoom columns without it keep ``invert=False``, as in runs before it existed.

Usage: python benchmarks/bench_annotation.py [--parts embed latency iou] [--cells-per-image 8] [--latency-prompts 60]
       [--threads 1] [--latency-threads 1 2] [--no-compare] [--seed 0] [--views 8] [--json FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

from _common import USIIGACI_VALIDATION, header, require_shared_data


def gt_cells(gt: np.ndarray):
    """(label, box (r0, c0, r1, c1), mask crop) of every label, keeping its largest connected component."""
    from scipy import ndimage as ndi

    out = []
    for lab, sl in enumerate(ndi.find_objects(gt), start=1):
        if sl is None:
            continue
        crop = gt[sl] == lab
        comp, n = ndi.label(crop)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            crop = comp == sizes.argmax()
        rr, cc = np.nonzero(crop)
        r0, c0 = sl[0].start + rr.min(), sl[1].start + cc.min()
        box = (int(r0), int(c0), int(sl[0].start + rr.max() + 1), int(sl[1].start + cc.max() + 1))
        mask = crop[rr.min() : rr.max() + 1, cc.min() : cc.max() + 1]
        out.append((lab, box, mask))
    return out


def iou(obj, box, mask) -> float:
    """IoU of an ObjectMask with a ground-truth mask given as a crop at ``box``."""
    r0 = min(obj.bbox[0], box[0])
    c0 = min(obj.bbox[1], box[1])
    r1 = max(obj.bbox[2], box[2])
    c1 = max(obj.bbox[3], box[3])
    a = np.zeros((r1 - r0, c1 - c0), bool)
    b = np.zeros_like(a)
    if obj.area:
        a[obj.bbox[0] - r0 : obj.bbox[2] - r0, obj.bbox[1] - c0 : obj.bbox[3] - c0] = obj.mask
    b[box[0] - r0 : box[2] - r0, box[1] - c0 : box[3] - c0] = mask
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(a)}


def latency(seg, prompts, preview: np.ndarray, fast_flags=(True,)) -> dict:
    """Wall and CPU milliseconds from a prompt change to the object painted in the preview plane (cached embeddings).

    For each prompt, each decoder in ``fast_flags`` (True: the plugin's FastMaskDecoder, False: segment-anything's
    MaskDecoder) answers in turn, so both face the same load on a shared machine. ``decode_ms`` is the part spent in
    ``Predictor.decode`` (prompt encoding + mask decoder); the rest is window lookup, upsampling to the window,
    thresholding, cropping and painting.
    """
    from napari_cellseg.core.interactive import objects_to_labels

    pred = seg.predictor
    inner = pred.decode
    spent = []

    def timed_decode(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent.append((time.perf_counter() - t) * 1000)

    out = {f: {"wall": [], "cpu": [], "decode": []} for f in fast_flags}
    painted = None
    pred.decode = timed_decode
    try:
        for p in prompts:
            for f in fast_flags:
                pred.use_fast_decoder = f
                spent.clear()
                t, c = time.perf_counter(), time.process_time()
                objs = seg.segment_many([p])
                if painted is not None:  # clear the previous object, paint the new one (what the widget does)
                    r0, c0, r1, c1 = painted
                    preview[r0:r1, c0:c1] = 0
                objects_to_labels(objs, preview.shape, out=preview)
                painted = objs[0].bbox
                out[f]["wall"].append((time.perf_counter() - t) * 1000)
                out[f]["cpu"].append((time.process_time() - c) * 1000)
                out[f]["decode"].append(sum(spent))
    finally:
        pred.decode = inner
        pred.use_fast_decoder = True
    return out


def latency_stats(seg, prompts, preview, compare: bool = True) -> dict:
    """p50/p95 of the fast decoder's path, and (``compare``) segment-anything's decoder measured alongside."""
    flags = (True, False) if compare else (True,)
    latency(seg, prompts[:3], preview, flags)  # warm-up
    runs = latency(seg, prompts, preview, flags)
    out = percentiles(runs[True]["wall"])
    out["cpu_p50_ms"] = float(np.percentile(runs[True]["cpu"], 50))
    out["decode_p50_ms"] = float(np.percentile(runs[True]["decode"], 50))
    if compare:
        ref = runs[False]
        out["sam_decoder"] = {**percentiles(ref["wall"]), "cpu_p50_ms": float(np.percentile(ref["cpu"], 50)),
                              "decode_p50_ms": float(np.percentile(ref["decode"], 50))}
        out["speedup_p50"] = out["sam_decoder"]["p50_ms"] / out["p50_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["embed", "latency", "iou"], choices=["embed", "latency", "iou"])
    parser.add_argument("--cells-per-image", type=int, default=8, help="cells sampled per validation image for the zoom IoU")
    parser.add_argument("--latency-prompts", type=int, default=60)
    parser.add_argument("--images", type=int, default=len(USIIGACI_VALIDATION), help="validation images used")
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a machine shared with other jobs, more threads than "
                             "free cores makes every figure several times slower)")
    parser.add_argument("--latency-threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts the latency is measured with (each in the same run)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip segment-anything's own decoder in the latency figures")
    parser.add_argument("--tuned-threshold", type=float, default=-2.0,
                        help="second mask threshold reported (chosen on training sets 1-35)")
    parser.add_argument("--views", type=int, default=8, choices=[1, 2, 4, 8],
                        help="orientations averaged in the extra zoom column (1: no such column)")
    parser.add_argument("--views-prompts", type=int, default=10,
                        help="prompts whose averaged answer is timed (each needs its orientations embedded)")
    parser.add_argument("--json", default=None, help="write the figures as JSON here")
    parser.add_argument("--out", default=None, help="append the markdown report to this file")
    args = parser.parse_args()

    import tifffile

    from napari_cellseg.core.interactive import AnnotationConfig, InteractiveSegmenter, ObjectPrompt
    from napari_cellseg.core.models import load_model, random_model

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    root = require_shared_data() / "usiigaci-phase-train"
    names = USIIGACI_VALIDATION[: args.images]
    data = [(n, tifffile.imread(root / "images" / f"{n}.tif"), tifffile.imread(root / "masks" / f"{n}.tif"))
            for n in names]
    rng = np.random.default_rng(args.seed)
    lite = load_model("litemedsam", device="cpu")
    results: dict = {"config": AnnotationConfig().to_dict(), "threads": args.threads}
    name0, image0, gt0 = data[0]
    cells0 = gt_cells(gt0)
    whole = InteractiveSegmenter(lite, config=AnnotationConfig(zoom="off", mask_threshold=0.0, invert=False))
    # the plain zoom (one view); the segmenters below share its cache, so every view is embedded once
    zoom = InteractiveSegmenter(lite, config=AnnotationConfig(mask_threshold=0.0, invert=False, max_memory_mb=4096))
    zinv = InteractiveSegmenter(lite, cache=zoom.cache,
                                config=AnnotationConfig(mask_threshold=args.tuned_threshold, invert=True))
    zviews = zviews_inv = None
    if args.views > 1:
        zviews = InteractiveSegmenter(lite, cache=zoom.cache, config=AnnotationConfig(
            mask_threshold=args.tuned_threshold, views=args.views, invert=False))
        zviews_inv = InteractiveSegmenter(lite, cache=zoom.cache, config=AnnotationConfig(
            mask_threshold=args.tuned_threshold, views=args.views, invert=True))
    vitb = None if args.skip_vit_b or not {"embed", "latency"} & set(args.parts) else random_model("vit_b")
    vseg = InteractiveSegmenter(vitb, config=AnnotationConfig(mask_threshold=0.0)) if vitb is not None else None

    # -- 1. embedding time ------------------------------------------------------------------
    if "embed" in args.parts:
        emb = {}
        t = []
        for _ in range(3):
            whole.cache.clear()
            whole.set_image(image0)
            whole._image01 = None  # include the normalisation
            t0 = time.perf_counter()
            list(whole.precompute())
            t.append(time.perf_counter() - t0)
        emb["litemedsam_whole_image_s"] = float(np.median(t))
        zoom.set_image(image0)
        t = []
        for k in range(3):
            zoom.cache.clear()
            t0 = time.perf_counter()
            list(zoom.prepare([ObjectPrompt(box=cells0[k][1])]))
            t.append(time.perf_counter() - t0)
        emb["litemedsam_zoom_window_s"] = float(np.median(t))
        if vseg is not None:
            vseg.set_image(image0)
            t0 = time.perf_counter()
            list(vseg.precompute())
            emb["vit_b_whole_image_s"] = time.perf_counter() - t0
            emb["vit_b_zoom_active"] = vseg.zoom_active()
        results["embedding"] = emb
        print("embedding:", json.dumps(emb), flush=True)

    # -- 2. latency prompt -> preview ----------------------------------------------------------
    if "latency" in args.parts:
        idx = rng.choice(len(cells0), size=min(args.latency_prompts, len(cells0)), replace=False)
        prompts0 = [ObjectPrompt(box=cells0[i][1]) for i in idx]
        lat = {}
        preview = np.zeros(image0.shape, np.uint16)
        # embeddings first: the latency is what the GUI waits for once they are cached
        for seg in (zoom, whole, vseg):
            if seg is not None:
                seg.set_image(image0)
                list(seg.precompute()) if seg is not zoom else list(seg.prepare(prompts0))
        for threads in args.latency_threads:
            torch.set_num_threads(threads)
            sfx = "" if threads == args.latency_threads[0] else f"_{threads}threads"
            lat["litemedsam_zoom" + sfx] = latency_stats(zoom, prompts0, preview, not args.no_compare)
            lat["litemedsam_whole_image" + sfx] = latency_stats(whole, prompts0, preview, not args.no_compare)
            if vseg is not None:
                lat["vit_b_whole_image" + sfx] = latency_stats(vseg, prompts0, preview, not args.no_compare)
            print(f"latency ({threads} threads):", json.dumps({k: v for k, v in lat.items() if k.endswith(sfx)}),
                  flush=True)
        vp = prompts0[: args.views_prompts]
        torch.set_num_threads(args.latency_threads[0])
        for seg, what in ((zinv, "1views_inverted"), (zviews_inv, f"{args.views}views_inverted")):
            if seg is not None:  # the averaged answer, once every view is embedded
                seg.set_image(image0)
                list(seg.prepare(vp))
                lat[f"litemedsam_zoom_{what}"] = latency_stats(seg, vp, preview, compare=False)
                print(f"latency ({what}):", json.dumps(lat[f"litemedsam_zoom_{what}"]), flush=True)
        torch.set_num_threads(args.threads)
        lat["threads"] = list(args.latency_threads)
        results["latency"] = lat

    # -- 3. box-prompt IoU ------------------------------------------------------------------------
    if "iou" in args.parts:
        thresholds = {"default": 0.0, "tuned": args.tuned_threshold}
        scores = {f"{mode}_{t}": [] for mode in ("whole_sample", "zoom_sample") for t in thresholds}
        scores["whole_all_default"] = []
        scores["zoom_inv_sample_tuned"] = []
        if zviews is not None:
            scores["zoom_views_sample_tuned"] = []
            scores["zoom_views_inv_sample_tuned"] = []
        windows = 0
        n_cells_all = 0
        base = {"whole": whole.config, "zoom": zoom.config}
        for name, image, gt in data:
            cells = gt_cells(gt)
            n_cells_all += len(cells)
            prompts = [ObjectPrompt(box=b) for _, b, _ in cells]
            pick = rng.choice(len(cells), size=min(args.cells_per_image, len(cells)), replace=False)
            sample = [prompts[i] for i in pick]
            whole.set_image(image)
            zoom.set_image(image)
            windows += len(zoom.missing_windows(sample))
            list(zoom.prepare(sample))
            for tname, thr in thresholds.items():
                whole.config = replace(base["whole"], mask_threshold=thr)
                zoom.config = replace(base["zoom"], mask_threshold=thr)
                if tname == "default":  # every cell (one embedding per image), at SAM's threshold
                    objs = whole.segment_many(prompts)
                    s_all = [iou(o, b, m) for o, (_, b, m) in zip(objs, cells)]
                    scores["whole_all_default"] += s_all
                    scores["whole_sample_default"] += [s_all[i] for i in pick]
                else:
                    objs = whole.segment_many(sample)
                    scores[f"whole_sample_{tname}"] += [iou(o, cells[i][1], cells[i][2]) for o, i in zip(objs, pick)]
                zobjs = zoom.segment_many(sample)
                scores[f"zoom_sample_{tname}"] += [iou(o, cells[i][1], cells[i][2]) for o, i in zip(zobjs, pick)]
            whole.config, zoom.config = base["whole"], base["zoom"]
            for seg, key in ((zinv, "zoom_inv_sample_tuned"), (zviews, "zoom_views_sample_tuned"),
                             (zviews_inv, "zoom_views_inv_sample_tuned")):
                if seg is not None:
                    seg.set_image(image)
                    vobjs = seg.segment_many(sample)
                    scores[key] += [iou(o, cells[i][1], cells[i][2]) for o, i in zip(vobjs, pick)]
            zoom.cache.clear()
            whole.cache.clear()
            print(f"{name}: {len(cells)} cells, whole {np.mean(scores['whole_all_default'][-len(cells):]):.3f}, "
                  f"zoom sample {np.mean(scores['zoom_sample_default'][-len(pick):]):.3f}", flush=True)
        zs = np.asarray(scores["zoom_sample_tuned"])
        extra = {"views": args.views} if zviews is not None else {}
        for key, name in (("zoom_inv_sample_tuned", "inverted"), ("zoom_views_sample_tuned", "views"),
                          ("zoom_views_inv_sample_tuned", "views_inverted")):
            if scores.get(key):
                d = np.asarray(scores[key]) - zs
                extra[f"{name}_gain"] = float(d.mean())
                extra[f"stderr_{name}_gain"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        results["iou"] = {
            "validation_images": names,
            "cells_all": n_cells_all,
            "cells_sampled": len(scores["zoom_sample_default"]),
            "zoom_windows_embedded": windows,
            "thresholds": thresholds,
            **{f"mean_{k}": float(np.mean(v)) for k, v in scores.items()},
            "median_zoom_sample_default": float(np.median(scores["zoom_sample_default"])),
            "stderr_zoom_sample_tuned": float(zs.std(ddof=1) / np.sqrt(len(zs))) if len(zs) > 1 else float("nan"),
            **extra,
        }
        print("iou:", json.dumps(results["iou"]), flush=True)
    results["runtime_s"] = time.perf_counter() - t_start
    results["loadavg_before_after"] = [load_before, os.getloadavg()]

    lines = [header("Interactive annotation (bench_annotation.py)"),
             f"- Load average before / after (other jobs on the machine): "
             f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; runtime {results['runtime_s'] / 60:.1f} min\n",
             "| figure | LiteMedSAM, zoom | LiteMedSAM, whole image | vit_b (random), whole image |",
             "|---|---|---|---|"]
    if "embedding" in results:
        e = results["embedding"]
        lines.append(f"| time to embed (s) | {e['litemedsam_zoom_window_s']:.2f} per window | "
                     f"{e['litemedsam_whole_image_s']:.2f} | {e.get('vit_b_whole_image_s', float('nan')):.1f} |")
    if "latency" in results:
        la = results["latency"]
        for threads in la["threads"]:
            sfx = "" if threads == la["threads"][0] else f"_{threads}threads"
            keys = [k + sfx for k in ("litemedsam_zoom", "litemedsam_whole_image", "vit_b_whole_image")]
            rows = {f"| prompt -> preview p50 / p95 wall (ms), {threads} thread(s) |": lambda d: f"{d['p50_ms']:.0f} / "
                    f"{d['p95_ms']:.0f}",
                    f"| prompt -> preview p50 CPU time (ms), {threads} thread(s) |": lambda d: f"{d['cpu_p50_ms']:.0f}",
                    f"| of which mask decoder p50 (ms), {threads} thread(s) |": lambda d: f"{d['decode_p50_ms']:.0f}"}
            if not args.no_compare:
                rows[f"| same with segment-anything's decoder, p50 / p95 wall (ms), {threads} thread(s) |"] = (
                    lambda d: f"{d['sam_decoder']['p50_ms']:.0f} / {d['sam_decoder']['p95_ms']:.0f}")
                rows[f"| speed-up of the p50, same run, {threads} thread(s) |"] = lambda d: f"{d['speedup_p50']:.1f}x"
            for head, fmt in rows.items():
                lines.append(head + "".join(f" {fmt(la[k])} |" if k in la else " - |" for k in keys))
    if "iou" in results:
        q = results["iou"]
        tuned = f"{args.tuned_threshold:g}"
        lines.append(f"| box-prompt mean IoU, {q['cells_sampled']} sampled cells, mask threshold 0 | "
                     f"{q['mean_zoom_sample_default']:.3f} | {q['mean_whole_sample_default']:.3f} | - |")
        lines.append(f"| box-prompt mean IoU, {q['cells_sampled']} sampled cells, mask threshold {tuned} | "
                     f"{q['mean_zoom_sample_tuned']:.3f} ± {q['stderr_zoom_sample_tuned']:.3f} | "
                     f"{q['mean_whole_sample_tuned']:.3f} | - |")
        lines.append(f"| box-prompt mean IoU, all {q['cells_all']} cells, mask threshold 0 | - | "
                     f"{q['mean_whole_all_default']:.3f} | - |")
        rows = [("inverted", "zoom_inv_sample_tuned", "the window and its inverted contrast averaged (the default)")]
        if "views" in q:
            rows += [("views", "zoom_views_sample_tuned", f"{q['views']} orientations averaged"),
                     ("views_inverted", "zoom_views_inv_sample_tuned",
                      f"{q['views']} orientations, each also inverted, averaged")]
        for name, key, what in rows:
            lines.append(f"| box-prompt mean IoU, same cells, threshold {tuned}, {what} "
                         f"| {q['mean_' + key]:.3f} (paired gain {q[name + '_gain']:+.3f} ± "
                         f"{q['stderr_' + name + '_gain']:.3f}) | - | - |")
    if "latency" in results:
        for k, d in results["latency"].items():
            if k.endswith("views_inverted"):
                n = int(k.split("_")[-2][:-5])
                lines.append(f"| averaged answer of {n} orientation(s) x 2 contrasts, p50 / p95 wall (ms), "
                             f"{results['latency']['threads'][0]} thread(s), {d['n']} prompts | "
                             f"{d['p50_ms']:.0f} / {d['p95_ms']:.0f} | - | - |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(report + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
