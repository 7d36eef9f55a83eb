"""Benchmark of fine-tuning on ONE Usiigaci image, evaluated on held-out Usiigaci images.

Trains each recipe (``prompt``: CellSeg1 LoRA, ``distance``: SAMCell) on one
image of ``../shared/data/usiigaci-phase-train`` (team split: sets 1-35 train,
36-45 validation), starting from LiteMedSAM, within a time budget, and reports
wall time and AP@0.5 / AP@0.75 (AP = TP / (TP + FP + FN), from
:mod:`napari_cellseg.core.metrics`) on held-out images against zero-shot
LiteMedSAM:

* clicks: one positive click per reference cell, at its innermost pixel (the
  maximum of its distance transform), segmented as the annotation mode does
  (prompt-centred window from :func:`napari_cellseg.core.interactive.choose_window`,
  best of SAM's three candidates); the masks painted into one label image give
  AP, and the mean IoU of each click's mask with its cell is reported too;
* distance: the automatic distance-map mode of :mod:`napari_cellseg.core.automatic`
  (256 px crops with 32 px overlap, CLAHE per crop, SAM's default prompt,
  cosine-ramp stitching, watershed at the model's thresholds, SAMCell's
  peak 0.47 / fill 0.09 unless the adapter carries tuned ones, via
  :func:`napari_cellseg.core.postprocess.labels_from_distance_map`).

Models whose image encoders agree up to the neck share one encoder pass per
window (each applies its own neck to the shared features), so zero-shot and
fine-tuned models see identical inputs and are computed exactly as alone.

Adapters are written to a temporary model folder (``$NAPARI_CELLSEG_CACHE`` is
pointed there unless ``--keep`` names a folder), never the user's.

Usage::

    python benchmarks/bench_finetune.py --train-set 1 --val-sets 36-45 --minutes 10 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "usiigaci-phase-train"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from datasets import clean_labels  # noqa: E402  (largest piece of each label, SOURCE.md's caveat)


def parse_sets(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def read_pair(data: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    return (tifffile.imread(data / "images" / f"train_set{k}.tif"),
            tifffile.imread(data / "masks" / f"train_set{k}.tif"))


def innermost(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(label, row, col) of each cell's innermost pixel."""
    from scipy import ndimage as ndi

    out = []
    for idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == idx
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        out.append((idx, int(r + sl[0].start), int(c + sl[1].start)))
    return out


class SharedEncoder:
    """Runs the image encoder once per window for all models whose encoders agree up to the neck.

    Fine-tuned models with a frozen encoder share everything; distance models
    trained with ``encoder_tail="neck"`` share all but the neck, which is
    applied per model on the cached features (exactly what each model computes).
    """

    def __init__(self, models: dict):
        import torch

        self.groups: dict[str, str] = {}
        reps: list[tuple[str, dict]] = []
        for name, m in models.items():
            state = {k: v for k, v in m.sam.image_encoder.state_dict().items() if not k.startswith("neck.")}
            for rep, rstate in reps:
                if state.keys() == rstate.keys() and all(torch.equal(state[k], rstate[k]) for k in state) and \
                        torch.equal(m.sam.pixel_mean, models[rep].sam.pixel_mean) and \
                        torch.equal(m.sam.pixel_std, models[rep].sam.pixel_std):
                    self.groups[name] = rep
                    break
            else:
                reps.append((name, state))
                self.groups[name] = name
        self.models = models
        self.cache: dict = {}

    def features(self, name: str, key, image01: np.ndarray):
        import torch

        from napari_cellseg.core.finetune import encoder_before_neck
        from napari_cellseg.core.predictor import Embedding
        from napari_cellseg.core.preprocess import resize_to_model

        model = self.models[name]
        rep = self.groups[name]
        if (rep, key) not in self.cache:
            sam = self.models[rep].sam
            x, transform = resize_to_model(image01, model.input_size)
            with torch.inference_mode():
                pre = encoder_before_neck(sam.image_encoder, (x * 255.0 - sam.pixel_mean) / sam.pixel_std)
            self.cache[(rep, key)] = (pre, transform)
        pre, transform = self.cache[(rep, key)]
        with torch.inference_mode():
            features = model.sam.image_encoder.neck(pre)
        return Embedding(features=features, transform=transform, model_name=model.name)

    def clear(self) -> None:
        self.cache.clear()


def eval_clicks(models: dict, enc: SharedEncoder, image: np.ndarray, gt: np.ndarray) -> dict:
    """One click per reference cell for each model: AP@0.5/0.75 and mean IoU of the clicked cell."""
    from napari_cellseg.core.interactive import AnnotationConfig, choose_window
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.predictor import Embedding, Predictor
    from napari_cellseg.core.preprocess import normalize_image

    image01 = normalize_image(image)
    cfg = AnnotationConfig()
    clicks = innermost(gt)
    windows = []
    groups: dict = {}
    any_model = next(iter(models.values()))
    for idx, r, c in clicks:
        w = choose_window((r, c, r + 1, c + 1), gt.shape, any_model.input_size, context=cfg.context,
                          min_margin=cfg.min_margin, candidates=windows)
        if w not in windows:
            windows.append(w)
        groups.setdefault(w, []).append((idx, r, c))
    results = {}
    for name, model in models.items():
        pred = np.zeros(gt.shape, np.int32)
        best = np.full(gt.shape, -np.inf, np.float32)
        ious = []
        for w, items in groups.items():
            sl = (slice(w.r0, w.r1), slice(w.c0, w.c1))
            emb = enc.features(name, w, image01[sl])
            predictor = Predictor(model)
            predictor.set_embedding(Embedding(emb.features, emb.transform, model.name))
            pts = np.array([[[r - w.r0, c - w.c0]] for _, r, c in items], float)
            _, scores, low = predictor.decode(points_rc=pts, multimask=True, upsample=False)
            pick = scores.argmax(axis=1)
            sel = np.arange(len(pick))
            import torch

            with torch.inference_mode():
                logits = predictor.upsample_logits(torch.from_numpy(np.ascontiguousarray(low[sel, pick][:, None])))
            masks = (logits[:, 0] > 0).numpy()
            for j, (idx, _, _) in enumerate(items):
                m = masks[j]
                ref = gt[sl] == idx
                inter = np.logical_and(m, ref).sum()
                full_ref = (gt == idx).sum()
                union = m.sum() + full_ref - inter
                ious.append(inter / union if union else 0.0)
                paint = m & (best[sl] < scores[j, pick[j]])
                pred[sl][paint] = idx
                best[sl][paint] = scores[j, pick[j]]
        s50, s75 = average_precision(gt, pred, (0.5, 0.75))
        results[name] = {"ap50": s50.ap, "ap75": s75.ap, "click_iou": float(np.mean(ious)),
                         "n_cells": len(clicks), "windows": len(groups)}
    return results


def distance_map(model, enc: SharedEncoder, name: str, image01: np.ndarray, crop: int = 256,
                 overlap: int = 32) -> np.ndarray:
    """The automatic distance mode's stitched map (CLAHE per crop, default prompt, cosine-ramp stitching).

    Same steps as :func:`napari_cellseg.core.automatic.predict_distance_map`,
    with the crop embeddings shared between models that have the same encoder.
    """
    import torch
    import torch.nn.functional as F

    from napari_cellseg.core.automatic import stitch_tiles
    from napari_cellseg.core.predictor import default_prompt_logits
    from napari_cellseg.core.preprocess import clahe, tile_slices

    size = model.input_size
    slices = tile_slices(image01.shape[:2], crop, overlap)
    tiles = []
    for rs, cs in slices:
        key = ("clahe", rs.start, cs.start, crop)
        tile = image01[rs, cs]
        cached = (enc.groups[name], key) in enc.cache
        emb = enc.features(name, key, tile if cached else clahe(tile))
        with torch.inference_mode():
            logits = default_prompt_logits(model.sam, emb.features).float()
            if logits.shape[-2:] != tile.shape[:2]:
                logits = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
                rows, cols = emb.transform.resized_shape
                logits = F.interpolate(logits[..., :rows, :cols], tile.shape[:2], mode="bilinear",
                                       align_corners=False)
        tiles.append(torch.sigmoid(logits)[0, 0].numpy().astype(np.float32))
    return stitch_tiles(tiles, slices, image01.shape[:2], overlap)


def eval_distance(models: dict, enc: SharedEncoder, image: np.ndarray, gt: np.ndarray, thresholds: dict) -> dict:
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.postprocess import labels_from_distance_map
    from napari_cellseg.core.preprocess import normalize_image

    image01 = normalize_image(image)
    out = {}
    for name, model in models.items():
        th = model.meta.get("thresholds") or thresholds
        dmap = distance_map(model, enc, name, image01)
        pred = labels_from_distance_map(dmap, th["peak"], th["fill"])
        s50, s75 = average_precision(gt, pred, (0.5, 0.75))
        out[name] = {"ap50": s50.ap, "ap75": s75.ap, "n_pred": int(pred.max()), "n_cells": int(len(np.unique(gt)) - 1)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-set", type=int, default=1, help="Usiigaci set (1-35) to train on")
    parser.add_argument("--val-sets", default="36-45", help="held-out sets, e.g. 36-45 or 36,40,44")
    parser.add_argument("--recipes", default="prompt,distance")
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget of each training run")
    parser.add_argument("--base", default="litemedsam")
    parser.add_argument("--config", default="{}", help="JSON of extra FinetuneConfig fields for both recipes")
    parser.add_argument("--modes", default="clicks,distance", help="evaluations to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--keep", type=Path, default=None, help="model folder to keep the adapters in")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    os.environ["NAPARI_CELLSEG_CACHE"] = str(folder)

    from napari_cellseg.core import finetune as ft
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.progress import TerminalProgress, run_to_completion

    extra = json.loads(args.config)
    val_sets = parse_sets(args.val_sets)
    if args.train_set in val_sets:
        raise SystemExit("the training set must not be one of the validation sets")
    image, labels = read_pair(args.data, args.train_set)
    labels = clean_labels(labels)
    base = load_model(args.base, device="cpu")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads",
        "load_average_start": os.getloadavg()[0],
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "train_set": args.train_set,
        "train_cells": int(len(np.unique(labels)) - 1),
        "val_sets": val_sets,
        "runs": {},
    }
    models = {"zero-shot": base}
    for recipe in [r for r in args.recipes.split(",") if r]:
        cfg = ft.FinetuneConfig(recipe=recipe, minutes=args.minutes, **extra)
        data = ft.make_training_data(image, labels, names=[f"train_set{args.train_set}"])
        progress = TerminalProgress(recipe)
        t0 = time.monotonic()
        trainer = ft.Finetuner(base, data, cfg)
        result = run_to_completion(trainer.run(), progress)
        wall = time.monotonic() - t0
        progress.close()
        name = f"bench-{recipe}-set{args.train_set}"
        ft.save_adapter(result, name, overwrite=True)
        models[recipe] = load_model(name, device="cpu")
        report["runs"][recipe] = {"wall_s": round(wall, 1), "metrics": result.meta["metrics"],
                                  "history": result.history, "config": result.meta["config"]}
        print(f"{recipe}: trained in {wall:.0f} s, {result.meta['metrics']['steps']} steps, "
              f"{result.meta['metrics']['views']} views", file=sys.stderr)
    enc = SharedEncoder(models)
    click_models = {k: m for k, m in models.items() if k != "distance"}
    dist_models = {k: m for k, m in models.items() if k != "prompt"}
    per_image = {}
    t_eval = time.monotonic()
    for k in val_sets:
        img, gt = read_pair(args.data, k)
        gt = clean_labels(gt)
        row = {}
        if "clicks" in args.modes:
            row["clicks"] = eval_clicks(click_models, enc, img, gt)
        if "distance" in args.modes:
            row["distance"] = eval_distance(dist_models, enc, img, gt, ft.DEFAULT_DISTANCE_THRESHOLDS)
        per_image[k] = row
        enc.clear()
        print(f"set {k}: " + json.dumps({m: {n: round(v["ap50"], 3) for n, v in r.items()} for m, r in row.items()}),
              file=sys.stderr)
    report["eval_seconds"] = round(time.monotonic() - t_eval, 1)
    report["per_image"] = per_image
    summary = {}
    for mode in next(iter(per_image.values())):
        names = next(iter(per_image.values()))[mode].keys()
        summary[mode] = {
            n: {m: round(float(np.mean([per_image[k][mode][n][m] for k in per_image])), 3)
                for m in ("ap50", "ap75") + (("click_iou",) if mode == "clicks" else ())}
            for n in names
        }
    report["summary"] = summary
    report["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
