"""Benchmark of fine-tuning on ONE image, evaluated on held-out images of the same kind.

By default the images are Usiigaci's; with ``--dsb-group`` they come from one
group of DSB 2018 (e.g. ``"360x360 fluorescence"``, a group the default model
``cellseg`` never trained on: the case of a user whose cells the shipped model
has not seen), the training image and the held-out images from that group.

Trains each recipe (``prompt``: CellSeg1 LoRA, ``distance``: SAMCell) on one
image of ``../shared/data/usiigaci-phase-train`` (team split: sets 1-35 train,
36-45 validation), from each base model asked for (LiteMedSAM, and the shipped
``cellseg`` a user starts from), within a time budget, and reports wall time
and AP@0.5 / AP@0.75 (AP = TP / (TP + FP + FN), from
:mod:`napari_cellseg.core.metrics`) on held-out images against each base
unchanged. Every figure comes from the product's own code paths:

* clicks: one positive click per reference cell, at its innermost pixel (the
  maximum of its distance transform), answered by the annotation engine
  (:class:`napari_cellseg.core.interactive.InteractiveSegmenter` with its
  defaults: prompt-centred zoom, the model's mask threshold, clicks answered
  from the cell map for distance models); the masks painted into one label
  image give AP, and the mean IoU of each click's mask with its cell is
  reported too;
* distance: the automatic distance mode (:func:`napari_cellseg.core.automatic.segment`,
  the model's own thresholds), for models that have one;
* grid: CellSeg1's automatic mode (32 x 32 point grid, the IoU head read as
  cell probability), for models that draw from prompts.

Adapters are written to a temporary model folder (``$NAPARI_CELLSEG_CACHE`` is
pointed there unless ``--keep`` names a folder), never the user's.

Usage::

    python benchmarks/bench_finetune.py --base litemedsam cellseg --train-set 35 --val-sets 36-45 --minutes 10
    python benchmarks/bench_finetune.py --base cellseg --recipes distance --dsb-group "360x360 fluorescence" --minutes 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "usiigaci-phase-train"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from datasets import clean_labels  # noqa: E402  (largest piece of each label, SOURCE.md's caveat)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def dsb_group_split(group: str, train_index: int, val_every: int) -> tuple[str, list[str]]:
    """The training image and the held-out images of one DSB group (file names).

    The group's images are taken in file-name order; image ``train_index`` is
    the training image, and every ``val_every``-th of the others is held out
    (never the training image).
    """
    import datasets

    files = [r["file"] for r in datasets.dsb_index() if r["group"] == group]
    if not files:
        groups = sorted({r["group"] for r in datasets.dsb_index()})
        raise SystemExit(f"no DSB group {group!r}; groups: {', '.join(groups)}")
    if not 0 <= train_index < len(files):
        raise SystemExit(f"--train-index must be in 0..{len(files) - 1} for group {group!r}")
    train = files[train_index]
    others = [f for f in files if f != train]
    return train, others[::max(1, val_every)]


def dsb_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    image, labels = datasets.dsb_pair(name)
    return image, clean_labels(labels)


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


def eval_clicks(model, image: np.ndarray, gt: np.ndarray, cells: int | None = None) -> dict:
    """One click per reference cell, answered as the annotation mode does; AP of the painted masks, mean IoU.

    The clicks go through :class:`~napari_cellseg.core.interactive.InteractiveSegmenter`
    with its defaults (prompt-centred zoom, the model's mask threshold, clicks
    answered from the cell map for distance models), so the figures are the
    widget's. Masks are painted in order of predicted IoU (the better one on top).
    """
    from napari_cellseg.core.interactive import InteractiveSegmenter, ObjectPrompt
    from napari_cellseg.core.metrics import average_precision

    clicks = innermost(gt)
    if cells and len(clicks) > cells:  # the same cells for every model (AP then counts only these cells)
        keep = np.random.default_rng(0).choice(len(clicks), cells, replace=False)
        clicks = [clicks[i] for i in sorted(keep)]
        gt = np.where(np.isin(gt, [c[0] for c in clicks]), gt, 0)
    seg = InteractiveSegmenter(model)
    seg.set_image(image)
    objs = seg.segment_many([ObjectPrompt(points=[(r, c)]) for _, r, c in clicks])
    pred = np.zeros(gt.shape, np.int32)
    for k in np.argsort([o.score for o in objs], kind="stable"):
        r0, c0, r1, c1 = objs[k].bbox
        if objs[k].area:
            pred[r0:r1, c0:c1][objs[k].mask] = clicks[k][0]
    ious = []
    for (idx, _, _), obj in zip(clicks, objs):
        ref = gt == idx
        m = obj.to_full(gt.shape)
        ious.append(float(np.logical_and(m, ref).sum() / np.logical_or(m, ref).sum()))
    s50, s75 = average_precision(gt, pred, (0.5, 0.75))
    return {"ap50": s50.ap, "ap75": s75.ap, "click_iou": float(np.mean(ious)), "n_cells": len(clicks)}


def eval_automatic(model, image: np.ndarray, gt: np.ndarray, mode: str) -> dict:
    """An automatic mode (distance or grid) as the widget and ``napari-cellseg segment`` run it (model defaults)."""
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.metrics import average_precision

    t0 = time.perf_counter()
    result = auto.segment(image, model, mode=mode)
    seconds = time.perf_counter() - t0
    s50, s75 = average_precision(gt, result.labels, (0.5, 0.75))
    return {"ap50": s50.ap, "ap75": s75.ap, "n_pred": int(result.n_cells), "seconds": round(seconds, 1),
            "n_cells": int(len(np.unique(gt)) - 1)}


def markdown(report: dict) -> str:
    """The report as a markdown section: machine, command, date, then one table row per model."""
    lines = [
        f"### Fine-tuning on one {report.get('source', 'Usiigaci')} image (bench_finetune.py)",
        "",
        f"- Machine: {report['machine']}; load average {report['load_average_start']:.1f} at the start, "
        f"{report['load_average_end']:.1f} at the end",
        f"- Command: `python benchmarks/{report['command']}`",
        f"- Date: {report['date']} UTC",
        f"- Training image: {report['train_name'][:24]} ({report['train_cells']} cells); held out: "
        + (", ".join(f"train_set{k}" for k in report["val_sets"]) if "dsb_group" not in report
           else f"{len(report['val_sets'])} other images of the group")
        + (f"; clicks on {report['cells']} sampled cells per image" if report.get("cells") else ""),
        "",
        "| model | training | click AP@0.5 | click AP@0.75 | click IoU | distance AP@0.5 | distance AP@0.75 "
        "| grid AP@0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = report["summary"]
    for name in report["models"]:
        run = report["runs"].get(name)
        training = (f"{run['wall_s']:.0f} s, {run['steps']} steps" if run else "none (zero-shot)")
        c = summary.get("clicks", {}).get(name, {})
        d = summary.get("distance", {}).get(name, {})
        g = summary.get("grid", {}).get(name, {})
        cells = [c.get("ap50"), c.get("ap75"), c.get("click_iou"), d.get("ap50"), d.get("ap75"), g.get("ap50")]
        lines.append(f"| {name} | {training} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
                     + " |")
    lines += ["", "AP = TP / (TP + FP + FN) at IoU 0.5 / 0.75, mean over the held-out images. Clicks: one at each "
              "cell's innermost pixel through the annotation engine (clicks of distance models are answered from "
              "their cell map); distance: the automatic distance mode with the model's own thresholds; grid: "
              "CellSeg1's 32 x 32 point grid with its defaults (probability 0.8, stability 0.6), for models "
              "that draw from prompts; '-': the model has no such mode."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-set", type=int, default=35,
                        help="Usiigaci set (1-35) to train on (35: its cells are the size of the held-out sets' "
                             "cells, about 1,300 px; those of sets 1-12 are about 3,500 px)")
    parser.add_argument("--val-sets", default="36-45", help="held-out sets, e.g. 36-45 or 36,40,44")
    parser.add_argument("--dsb-group", default=None,
                        help="train and evaluate on one DSB 2018 group instead of Usiigaci, e.g. "
                             "'360x360 fluorescence' (held out whole from the default model's training)")
    parser.add_argument("--train-index", type=int, default=0,
                        help="with --dsb-group: the training image's position in the group (file-name order)")
    parser.add_argument("--val-every", type=int, default=4,
                        help="with --dsb-group: hold out every N-th of the group's other images")
    parser.add_argument("--recipes", default="prompt,distance")
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget of each training run")
    parser.add_argument("--base", nargs="+", default=["litemedsam"],
                        help="base model(s) to fine-tune (catalogue names), each with every recipe")
    parser.add_argument("--config", default="{}", help="JSON of extra FinetuneConfig fields for both recipes")
    parser.add_argument("--modes", default="clicks,distance,grid", help="evaluations to run")
    parser.add_argument("--cells", type=int, default=None,
                        help="clicks on this many cells per held-out image (default: every cell)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--keep", type=Path, default=None, help="model folder to keep the adapters in")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    os.environ["NAPARI_CELLSEG_CACHE"] = str(folder)

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import finetune as ft
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.progress import TerminalProgress, run_to_completion

    extra = json.loads(args.config)
    if args.dsb_group:
        train_name, val_sets = dsb_group_split(args.dsb_group, args.train_index, args.val_every)
        source = f"DSB 2018 '{args.dsb_group}'"
        load_pair = dsb_pair
    else:
        val_sets = parse_sets(args.val_sets)
        if args.train_set in val_sets:
            raise SystemExit("the training set must not be one of the validation sets")
        train_name, source = f"train_set{args.train_set}", "Usiigaci"

        def load_pair(k):
            image, labels = read_pair(args.data, k)
            return image, clean_labels(labels)

    image, labels = load_pair(train_name if args.dsb_group else args.train_set)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine(),
        "load_average_start": os.getloadavg()[0],
        "command": shlex.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "train_name": train_name,
        "source": source,
        "train_cells": int(len(np.unique(labels)) - 1),
        "val_sets": val_sets,
        "cells": args.cells,
        "runs": {},
    }
    report.update({"dsb_group": args.dsb_group} if args.dsb_group else {"train_set": args.train_set})
    models = {}
    for base_name in args.base:
        base = load_model(base_name, device="cpu")
        models[f"{base_name} (zero-shot)"] = base
        for recipe in [r for r in args.recipes.split(",") if r]:
            cfg = ft.FinetuneConfig(recipe=recipe, minutes=args.minutes, **extra)
            data = ft.make_training_data(image, labels, names=[train_name])
            progress = TerminalProgress(f"{base_name} {recipe}")
            t0 = time.monotonic()
            result = run_to_completion(ft.Finetuner(base, data, cfg).run(), progress)
            wall = time.monotonic() - t0
            progress.close()
            name = f"bench-{base_name}-{recipe}-" + (f"set{args.train_set}" if not args.dsb_group
                                                     else f"dsb{args.train_index}")
            ft.save_adapter(result, name, overwrite=True)
            key = f"{base_name} + {recipe}"
            models[key] = load_model(name, device="cpu")
            report["runs"][key] = {"wall_s": round(wall, 1), "steps": result.meta["metrics"]["steps"],
                                   "metrics": result.meta["metrics"], "history": result.history,
                                   "config": result.meta["config"]}
            print(f"{key}: trained in {wall:.0f} s, {result.meta['metrics']['steps']} steps, "
                  f"{result.meta['metrics']['views']} views", file=sys.stderr)
    report["models"] = list(models)
    per_image = {}
    t_eval = time.monotonic()
    for k in val_sets:
        img, gt = load_pair(k)
        row: dict = {"clicks": {}, "distance": {}, "grid": {}}
        for name, model in models.items():
            if "clicks" in args.modes:
                row["clicks"][name] = eval_clicks(model, img, gt, args.cells)
            if "distance" in args.modes and auto.is_distance_model(model):
                row["distance"][name] = eval_automatic(model, img, gt, "distance")
            if "grid" in args.modes and "prompt" in model.entry.capabilities:
                row["grid"][name] = eval_automatic(model, img, gt, "grid")
        per_image[k] = row
        print(f"{k}: " + json.dumps({m: {n: round(v["ap50"], 3) for n, v in r.items()} for m, r in row.items()}),
              file=sys.stderr)
    report["eval_seconds"] = round(time.monotonic() - t_eval, 1)
    report["per_image"] = per_image
    summary: dict = {}
    for mode in ("clicks", "distance", "grid"):
        for name in models:
            vals = [per_image[k][mode][name] for k in per_image if name in per_image[k][mode]]
            if vals:
                summary.setdefault(mode, {})[name] = {
                    m: round(float(np.mean([v[m] for v in vals])), 3) for m in vals[0] if m in (
                        "ap50", "ap75", "click_iou")}
    report["summary"] = summary
    report["load_average_end"] = os.getloadavg()[0]
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
