"""Held-out accuracy and speed of the default model against zero-shot LiteMedSAM.

Validation split (see ``training/datasets.py``): Usiigaci sets 36-45 (phase
contrast) and the DSB groups held out from training (fluorescence groups held
out whole; colour / stained and bright-field held out within their group,
flagged as optimistic). Per image kind:

* automatic: AP@0.5 / AP@0.75 (AP = TP / (TP + FP + FN), the Cellpose and
  CellSeg1 definition, from :mod:`napari_cellseg.core.metrics`) of the model's
  default automatic mode with the thresholds it ships with (distance mode for
  the default model; grid and guided modes where asked);
* clicks: one positive click per sampled cell at its innermost pixel (the
  maximum of its distance transform), through the annotation mode's own
  :class:`~napari_cellseg.core.interactive.InteractiveSegmenter` (prompt-centred
  zoom, best of three candidates); mean IoU with the cell;
* boxes: the cell's exact bounding box, the same way; mean IoU (``--views N``: N orientations of each
  window averaged, the annotation mode's test-time augmentation; 1 by default, as on a CPU; ``--invert``: the
  inverted-contrast averaging, by default as in the widget);
* speed: seconds of the distance mode per Usiigaci image (1022 x 1024);
* ``--zoom rule``: the distance and guided modes run with the zoom (``DistanceConfig.scale``) of the model
  card's rule, from each image's median cell diameter and the training cells' diameters of its kind
  (:func:`rule_zoom`; chosen on the selection images, ``--selection``); clicks answered from the map use the
  same zoom for their map window (``AnnotationConfig.map_scale``). ``--zoom auto``: the same rule on the cells
  a first pass at zoom 1 finds (``DistanceConfig(scale="auto")``, what a user without a measurement gets);
  clicks: ``AnnotationConfig(map_scale="auto")``, estimated from the map window around each image's first click.

Run from the repository root::

    python benchmarks/bench_default_model.py --models cellseg litemedsam --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import datasets  # noqa: E402
from _common import header  # noqa: E402

INVERT = {"auto": None, "on": True, "off": False}
KIND_NAMES = {"phase": "phase contrast (Usiigaci)", "fluorescence": "fluorescence nuclei (DSB)",
              "brightfield": "bright-field nuclei (DSB)", "colour": "stained tissue, colour (DSB)"}


def _usiigaci_item(k: int) -> dict:
    return {"kind": "phase", "name": f"usiigaci set{k}", "load": ("u", k)}


def _dsb_item(r: dict) -> dict:
    return {"kind": r["kind"], "name": f"dsb {r['group']} {r['file'][:10]}", "load": ("d", r["file"])}


def validation_images(usiigaci: list[int], dsb_per_kind: int) -> list[dict]:
    items = [_usiigaci_item(k) for k in usiigaci]
    by_kind: dict[str, list[dict]] = {}
    for r in datasets.dsb_index():
        if r["split"] == "validation":
            by_kind.setdefault(r["kind"], []).append(r)
    for _, recs in sorted(by_kind.items()) if dsb_per_kind > 0 else []:
        step = max(1, len(recs) // dsb_per_kind)
        for r in recs[::step][:dsb_per_kind]:
            items.append({**_dsb_item(r), "held_out": r["held_out"]})
    return items


def selection_images() -> list[dict]:
    """The images the default model's stage 3 held out of its training to choose between runs (Usiigaci sets
    33-35, every 40th DSB training image): for choosing settings without reading the validation split."""
    import train_encoder_stage

    _, _, sets, records = train_encoder_stage.split_files()
    return [_usiigaci_item(k) for k in sets] + [_dsb_item(r) for r in records]


def load(item):
    kind, key = item["load"]
    return datasets.usiigaci_pair(key) if kind == "u" else datasets.dsb_pair(key)


def sample_cells(labels: np.ndarray, n: int, rng) -> list[tuple[int, tuple[int, int], tuple[int, int, int, int]]]:
    """(id, innermost pixel, box) of up to ``n`` random cells."""
    from scipy import ndimage as ndi

    ids = [i for i in np.unique(labels) if i]
    ids = list(rng.choice(ids, min(n, len(ids)), replace=False)) if ids else []
    out = []
    objs = ndi.find_objects(labels)
    for i in ids:
        sl = objs[i - 1]
        mask = labels[sl] == i
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        out.append((int(i), (r + sl[0].start, c + sl[1].start), (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
    return out


def prompt_ious(model, image, labels, cells, views: int = 1, invert: bool | None = None,
                click_answer: str = "sam", map_scale: float = 1.0, map_zoom_views: tuple = (),
                **config) -> dict:
    """Mean IoU of one click and one box per cell; ``config``: further :class:`AnnotationConfig` fields."""
    from napari_cellseg.core.interactive import AnnotationConfig, InteractiveSegmenter, ObjectPrompt

    seg = InteractiveSegmenter(model, config=AnnotationConfig(views=views, invert=invert, click_answer=click_answer,
                                                              map_scale=map_scale, map_zoom_views=map_zoom_views,
                                                              **config))
    seg.set_image(image)
    out = {}
    for kind in ("clicks", "boxes"):
        prompts = [ObjectPrompt(points=[pt]) if kind == "clicks" else ObjectPrompt(box=box) for _, pt, box in cells]
        objs = seg.segment_many(prompts)
        ious = []
        for (i, _, _), obj in zip(cells, objs):
            ref = labels == i
            m = obj.to_full(labels.shape)
            union = np.logical_or(m, ref).sum()
            ious.append(float(np.logical_and(m, ref).sum() / union) if union else 0.0)
        out[kind] = ious
    if seg.size_estimate is not None:  # map_scale "auto": the zoom estimated around the first click
        out["map_zoom"] = seg.size_estimate.scale
    return out


def rule_zoom(model, image, labels) -> float:
    """The model card's zoom rule (:func:`napari_cellseg.core.cell_size.estimate_scale`) with the image's
    ground-truth cells standing in for the user's measurement of a few cells: 1 while their median diameter
    lies within the model's training cells' 10th-90th percentiles for the image's kind, else the zoom that
    brings it to their median. ``--zoom auto`` measures the cells a first pass at zoom 1 finds instead."""
    from napari_cellseg.core import cell_size
    from napari_cellseg.core.preprocess import normalize_image

    return cell_size.estimate_scale(labels, normalize_image(image), cell_size.model_cell_sizes(model.meta)).scale


def automatic(model, image, labels, mode: str, scale: float = 1.0, zoom_views: tuple = (),
              small_cell_view: bool | None = None) -> dict:
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.metrics import average_precision

    t = time.perf_counter()
    config = auto.make_config(mode, model, **({} if mode == "grid" else {
        "scale": scale, "zoom_views": zoom_views, "small_cell_view": small_cell_view}))
    res = auto.segment(image, model, mode=mode, config=config)
    seconds = time.perf_counter() - t
    s50, s75 = average_precision(labels, res.labels, (0.5, 0.75))
    out = {"ap50": s50.ap, "ap75": s75.ap, "seconds": seconds, "n_pred": int(res.n_cells)}
    if res.size_estimate is not None:
        out["zoom"] = res.size_estimate.scale
    return out


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        d = out.setdefault(r["model"], {}).setdefault(r["kind"], {"images": 0})
        d["images"] += 1
        for k, v in r.items():
            if k in ("model", "kind", "image"):
                continue
            d.setdefault(k, []).append(v)
    for model in out.values():
        for d in model.values():
            for k, v in list(d.items()):
                if isinstance(v, list):
                    flat = [x for y in v for x in (y if isinstance(y, list) else [y])]
                    d[k] = round(float(np.mean(flat)), 3) if flat else None
    return out


def markdown(summary: dict, modes: list[str]) -> str:
    cols = [f"{m} AP@0.5" for m in modes] + ["distance AP@0.75", "click IoU", "box IoU"]
    lines = ["| model | image kind | images | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for model, kinds in summary.items():
        for kind, d in kinds.items():
            vals = [d.get(f"{m}_ap50") for m in modes] + [d.get("distance_ap75"), d.get("click_iou"),
                                                           d.get("box_iou")]
            cells = ["-" if v is None else f"{v:.3f}" for v in vals]
            lines.append(f"| {model} | {KIND_NAMES.get(kind, kind)} | {d['images']} | " + " | ".join(cells) + " |")
    speed = [f"{model} {m} mode {d[f'{m}_seconds_per_image']:.1f} s" for model, kinds in summary.items()
             for kind, d in kinds.items() for m in modes if d.get(f"{m}_seconds_per_image") is not None]
    if speed:
        lines += ["", "Seconds per phase-contrast image (1022 x 1024), automatic modes: " + "; ".join(speed) + "."]
    lines += ["", "Non-distance modes ran on fewer images where `--mode-images` says so (their image counts are "
              "in the JSON). Clicks of `cellseg` are answered from its cell map (docs/annotation.md); "
              "LiteMedSAM's row is the same click given to SAM as a point."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from napari_cellseg._commands.predict import merged_ratio_argument
    from napari_cellseg.core.interactive import AnnotationConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cellseg", "litemedsam"])
    p.add_argument("--usiigaci", default="36,38,40,42,44", help="validation sets (comma separated)")
    p.add_argument("--dsb-per-kind", type=int, default=6)
    p.add_argument("--cells-per-image", type=int, default=10)
    p.add_argument("--modes", nargs="*", default=["distance"],
                   help="automatic modes: distance, grid, guided (none: prompts only)")
    p.add_argument("--mode-images", type=int, default=None, help="run the non-distance modes on this many images")
    p.add_argument("--no-prompts", action="store_true")
    p.add_argument("--views", type=int, default=1, choices=[1, 2, 4, 8],
                   help="orientations averaged for clicks and boxes (the annotation mode's test-time augmentation)")
    p.add_argument("--invert", choices=list(INVERT), default="auto",
                   help="the annotation mode's inverted-contrast averaging for clicks and boxes (auto: the "
                        "widget's default)")
    p.add_argument("--click-answer", choices=["sam", "map"], default="sam",
                   help="a click the cell map finds: SAM from the cell's box (the default) or the map cell itself")
    p.add_argument("--selection", action="store_true",
                   help="evaluate on the stage-3 selection images (training split) instead of the validation split")
    p.add_argument("--prompt-decoder", choices=["auto", "float32"], default="auto",
                   help="arithmetic of the batch prompt decoder of the grid and guided modes: the model's precision "
                        "(auto, the default) or float32 whatever the precision (the setting before 2026-12-01)")
    p.add_argument("--zoom", choices=["none", "rule", "auto"], default="none",
                   help="distance and guided modes: run at the image's own scale (none), zoomed by the model "
                        "card's rule from the ground truth's cell diameter (rule: see rule_zoom), or with the "
                        "zoom estimated from a first pass at zoom 1 (auto: DistanceConfig(scale='auto'); clicks "
                        "measure the cells around the first click, AnnotationConfig(map_scale='auto'))")
    p.add_argument("--zoom-views", type=float, nargs="*", default=[],
                   help="distance and guided modes: extra zooms (relative) whose maps are averaged in "
                        "(DistanceConfig.zoom_views, test-time augmentation)")
    p.add_argument("--no-small-cell-view", dest="small_cell_view", action="store_false", default=None,
                   help="distance and guided modes with --zoom auto: without the map at 1.25 x the zoom that cells "
                        "below the model's training median get (DistanceConfig.small_cell_view, on by default)")
    p.add_argument("--map-zoom-views", type=float, nargs="*", default=[],
                   help="clicks: extra zooms whose click maps are averaged in (AnnotationConfig.map_zoom_views)")
    p.add_argument("--merged-ratio", type=merged_ratio_argument, default=AnnotationConfig().merged_ratio,
                   help="clicks: AnnotationConfig.merged_ratio (a number above 1, or 'none'; default: the config's)")
    p.add_argument("--click-point", choices=["auto", "yes", "no"], default="auto",
                   help="clicks: send the click's point with its box (AnnotationConfig.click_point; auto: when "
                        "the box head was trained with clicks)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    datasets.require_data()
    import torch

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    auto.PROMPTS_FOLLOW_PRECISION = args.prompt_decoder == "auto"
    items = (selection_images() if args.selection
             else validation_images([int(x) for x in args.usiigaci.split(",") if x], args.dsb_per_kind))
    extra = {"click_point": {"auto": None, "yes": True, "no": False}[args.click_point],
             "merged_ratio": args.merged_ratio}
    rows = []
    for name in args.models:
        model = load_model(name, device="cpu")
        for n_img, item in enumerate(items):
            image, labels = load(item)
            rng = np.random.default_rng(0)
            row = {"model": name, "kind": item["kind"], "image": item["name"]}
            zoom = {"none": 1.0, "auto": "auto"}.get(args.zoom) or rule_zoom(model, image, labels)
            if args.zoom == "rule":
                row["zoom"] = zoom
            for mode in args.modes:
                if mode in ("distance", "guided") and not auto.is_distance_model(model):
                    continue  # zero-shot LiteMedSAM has no map
                if mode != "distance" and args.mode_images is not None and n_img % max(
                        1, len(items) // args.mode_images) != 0:
                    continue
                r = automatic(model, image, labels, mode, zoom if mode != "grid" else 1.0, tuple(args.zoom_views),
                              args.small_cell_view)
                row[f"{mode}_ap50"], row[f"{mode}_ap75"] = r["ap50"], r["ap75"]
                if "zoom" in r:
                    row[f"{mode}_zoom"] = r["zoom"]
                if item["kind"] == "phase":
                    row[f"{mode}_seconds_per_image"] = r["seconds"]
            if not args.no_prompts:
                cells = sample_cells(labels, args.cells_per_image, rng)
                ious = prompt_ious(model, image, labels, cells, args.views, INVERT[args.invert], args.click_answer,
                                   zoom, tuple(args.map_zoom_views), **extra)
                row["click_iou"], row["box_iou"] = ious["clicks"], ious["boxes"]
                if "map_zoom" in ious:
                    row["click_map_zoom"] = ious["map_zoom"]
            rows.append(row)
            print(json.dumps({k: (round(float(np.mean(v)), 3) if isinstance(v, list) else
                                  (round(v, 3) if isinstance(v, float) else v)) for k, v in row.items()}),
                  file=sys.stderr, flush=True)
    summary = summarise(rows)
    text = header("Default model against zero-shot LiteMedSAM") + "\n" + markdown(summary, args.modes)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows, "markdown": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
