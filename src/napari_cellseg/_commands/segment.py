"""``napari-cellseg segment``: segment every cell automatically in images, folders and stacks.

Each input (a file, or every image file of a folder) is read, segmented plane by
plane (multi-page TIFF stacks and 3D arrays: along their first axes) and
written to ``OUT/<stem>_labels.tif`` with the same leading shape. A file that
cannot be read or segmented is reported and skipped; the others still run. The
exit status is 0 when at least one input was segmented and 2 when none was.

Examples::

    napari-cellseg segment --sample cells --out results/
    napari-cellseg segment images/ --mode grid --probability 0.6 --points-per-side 16 --out results/
    napari-cellseg segment stack.tif --model samcell.safetensors --output distance --peak 0.5 --out results/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_cellseg._commands import add_precision_argument, zoom_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from napari_cellseg.core.preprocess import VIEW_COUNTS

    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders of images")
    parser.add_argument("--sample", choices=["cells", "nuclei"], help="segment a sample image shipped with the plugin")
    parser.add_argument("--out", required=True, help="folder for the label images (<stem>_labels.tif)")
    parser.add_argument("--model", default=None, help="catalogue name or checkpoint file (default: the default model)")
    parser.add_argument("--mode", choices=["distance", "grid", "guided"], default=None,
                        help="default: distance for distance-map models, grid otherwise")
    parser.add_argument("--output", choices=["auto", "distance"], default="auto",
                        help="'distance' marks a checkpoint without metadata (SAMCell's release) as a distance-map "
                             "model; 'auto' trusts the model's metadata")
    parser.add_argument("--prompt-model", default=None,
                        help="guided mode: the model that draws the cells (default: --model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    add_precision_argument(parser)
    parser.add_argument("--channel", type=int, default=None, help="channel of multichannel images (last axis)")
    dist = parser.add_argument_group("distance and guided modes")
    dist.add_argument("--peak", type=float, default=None, help="cell-peak threshold (0.47, or the model's own)")
    dist.add_argument("--fill", type=float, default=None, help="cell-fill threshold (0.09, or the model's own)")
    dist.add_argument("--min-size", type=int, default=None,
                      help="remove cells smaller than this many pixels (distance: 0, guided: 20)")
    dist.add_argument("--fill-holes", action="store_true", default=None, help="fill holes inside cells")
    dist.add_argument("--smooth", type=float, default=None,
                      help="Gaussian sigma (pixels) applied to the distance map before the watershed (0, or the "
                           "model's own)")
    dist.add_argument("--scale", type=zoom_argument, default=None, metavar="ZOOM",
                      help="zoom the image by this factor before the distance model sees it (0.25-4; 1: as it "
                           "is): below 1 for cells much larger than the model's training cells, which it splits, "
                           "above 1 for tiny ones; 'auto': measure the cells a first pass at zoom 1 finds and "
                           "zoom when they lie outside the model's training sizes (the default for models that "
                           "record them: the default model, fine-tuned ones; else 1; see docs/automatic.md)")
    dist.add_argument("--zoom-views", type=float, nargs="+", default=None, metavar="Z",
                      help="test-time augmentation over zoom: also map the image at the zoom times each Z (0.5-2) "
                           "and average the maps, e.g. --zoom-views 1.25 (each view costs a map of its zoomed "
                           "pixels; see docs/automatic.md, 'Zoom views')")
    dist.add_argument("--no-small-cell-view", dest="small_cell_view", action="store_false", default=None,
                      help="with --scale auto (the default model's default): do not add the map at 1.25 times the "
                           "zoom that cells below the model's training median get (DistanceConfig.small_cell_view)")
    dist.add_argument("--embed-window", type=int, default=None, metavar="PX",
                      help="embed neighbouring crops together in windows up to this side (704; 0: crop by crop; "
                           "default: 704 where the encoder runs in bfloat16 on a CPU, else 0; TinyViT models)")
    dist.add_argument("--views", type=int, choices=list(VIEW_COUNTS), default=None,
                      help="guided mode: orientations of each crop whose SAM masks are averaged (test-time "
                           "augmentation; 1: each costs one more encoder pass per crop)")
    dist.add_argument("--invert", action="store_true", default=None,
                      help="guided mode: also embed each crop as its negative and average the SAM masks of both "
                           "(test-time augmentation; doubles the encoder passes of the drawing)")
    grid = parser.add_argument_group("grid mode (CellSeg1 defaults)")
    grid.add_argument("--points-per-side", type=int, default=None, help="point grid per crop (32)")
    grid.add_argument("--probability", type=float, default=None,
                      help="keep masks whose predicted IoU exceeds this (grid 0.8; guided: use SAM's answer from 0)")
    grid.add_argument("--stability", type=float, default=None, help="minimum stability score (0.6)")
    grid.add_argument("--stability-offset", type=float, default=None, help="stability-score offset (0.8)")
    grid.add_argument("--nms-iou", type=float, default=None, help="NMS mask-IoU threshold (0.05)")
    grid.add_argument("--max-area", type=float, default=None, help="largest mask as a fraction of the image (0.1)")
    grid.add_argument("--min-area", type=int, default=None, help="smallest region in pixels (20)")
    grid.add_argument("--multimask", action="store_true", default=None,
                      help="keep SAM's three answers per point (SAM's automatic mode)")
    grid.add_argument("--max-downscale", type=float, default=None,
                      help="embed the image whole up to this many times the model input, else in crops (4)")


def _settings(args: argparse.Namespace, mode: str) -> dict:
    """Only the thresholds the user gave, mapped to the mode's configuration names."""
    given = {
        "peak": args.peak, "fill": args.fill, "fill_holes": args.fill_holes, "smooth": args.smooth,
        "points_per_side": args.points_per_side, "probability": args.probability, "stability": args.stability,
        "stability_offset": args.stability_offset, "nms_iou": args.nms_iou,
        "max_area_fraction": args.max_area, "min_area": args.min_area, "multimask": args.multimask,
        "max_downscale": args.max_downscale, "views": args.views, "invert": args.invert,
        "embed_window": args.embed_window, "scale": args.scale,
        "zoom_views": tuple(args.zoom_views) if args.zoom_views else None,
        "small_cell_view": args.small_cell_view,
    }
    if args.min_size is not None:
        given["min_area" if mode == "grid" else "min_size"] = args.min_size
    return {k: v for k, v in given.items() if v is not None}


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files to segment (folders expanded to their image files, sorted) and problems found."""
    from napari_cellseg.core.io import IMAGE_SUFFIXES

    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.stem.endswith("_labels"))
            if not found:
                problems.append(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def planes_of(image, channel: int | None):
    """Split an image into 2D planes: returns (planes, leading shape).

    ``(M, N)`` and RGB ``(M, N, 3|4)`` are one plane; with ``channel`` the last
    axis is channels; every other leading axis is a stack axis.
    """
    import numpy as np

    arr = np.asarray(image)
    per_plane = 2
    if arr.ndim >= 3 and (channel is not None or (arr.shape[-1] in (3, 4) and arr.dtype == np.uint8)):
        per_plane = 3
    if arr.ndim < per_plane:
        raise ValueError(f"image of shape {arr.shape} is not an image")
    lead = arr.shape[: arr.ndim - per_plane]
    flat = arr.reshape((-1,) + arr.shape[arr.ndim - per_plane:])
    return flat, lead


def _output_path(out_dir: Path, source: Path, used: set[Path]) -> Path:
    path = out_dir / f"{source.stem}_labels.tif"
    k = 2
    while path in used:
        path = out_dir / f"{source.stem}_{k}_labels.tif"
        k += 1
    used.add(path)
    return path


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_cellseg.cli import UserError
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import models
    from napari_cellseg.core.cpu_memory import reuse_freed_memory
    from napari_cellseg.core.io import load_sample, read_image, write_labels
    from napari_cellseg.core.progress import TerminalProgress, run_to_completion

    if not args.inputs and not args.sample:
        raise UserError("give at least one INPUT (file or folder) or --sample NAME")
    files, problems = collect_inputs(args.inputs)
    jobs: list[tuple[str, Path | None]] = [(str(f), f) for f in files]
    if args.sample:
        jobs.insert(0, (f"sample:{args.sample}", None))
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not jobs:
        raise UserError("nothing to segment: " + "; ".join(problems))

    # the catalogue's default model, read at run time (a fine-tuned default replaces LiteMedSAM there)
    model = models.load_model(args.model or models.DEFAULT_MODEL, device=args.device, precision=args.precision)
    if args.output == "distance":
        model = auto.as_distance_model(model)
    mode = args.mode or auto.default_mode(model)
    if mode in ("distance", "guided"):
        auto.require_distance_model(model, mode)
    prompt_model = None
    if mode == "guided" and args.prompt_model:
        prompt_model = models.load_model(args.prompt_model, device=args.device, precision=args.precision)
    config = auto.make_config(mode, model, **_settings(args, mode))
    out_dir = Path(args.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    default = " (default model)" if args.model is None else ""
    print(f"{mode} mode with {model.describe()}{default}; {len(jobs)} input(s) -> {out_dir}", file=sys.stderr)

    used: set[Path] = set()
    ok = 0
    failed = len(problems)
    with reuse_freed_memory(model.device):  # one setting for the whole batch (see core.cpu_memory)
        for i, (name, path) in enumerate(jobs, start=1):
            try:
                if path is None:
                    image = load_sample(args.sample).image
                    target = _output_path(out_dir, Path(args.sample), used)
                else:
                    image = read_image(path)
                    target = _output_path(out_dir, path, used)
                planes, lead = planes_of(image, args.channel)
                labels = []
                messages = []
                for p, plane in enumerate(planes):
                    label = f"[{i}/{len(jobs)}] {Path(name).name}"
                    if len(planes) > 1:
                        label += f" plane {p + 1}/{len(planes)}"
                    bar = TerminalProgress(label)
                    try:
                        result = run_to_completion(
                            auto.segment_steps(plane, model, mode, config, prompt_model=prompt_model,
                                               channel=args.channel), bar)
                    finally:
                        bar.close()
                    labels.append(result.labels)
                    note = result.message or (result.size_estimate.message if result.size_estimate else "")
                    if note:
                        messages.append(note if len(planes) == 1 else f"plane {p + 1}: {note}")
                stack = np.stack(labels).reshape(tuple(lead) + labels[0].shape)
                write_labels(target, stack)
            except (ValueError, TypeError, OSError) as exc:
                failed += 1
                print(f"skipped {name}: {exc}", file=sys.stderr)
                continue
            ok += 1
            cells = sum(int(lab.max()) for lab in labels)
            where = f" in {len(labels)} planes" if len(labels) > 1 else ""
            print(f"{name}: {cells} cells{where} -> {target}")
            for message in messages[:3]:
                print(f"  {message}", file=sys.stderr)
    if failed:
        print(f"{ok} segmented, {failed} skipped", file=sys.stderr)
    return 0 if ok else 2
