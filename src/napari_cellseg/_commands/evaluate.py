"""``napari-cellseg evaluate``: compare predicted label images with ground truth.

Files are paired by name: first by identical stems (``img1.tif`` with
``img1.png``), then after dropping one or more common suffixes such as
``_labels``, ``_masks``, ``_gt`` or ``_pred`` on either side (``img1_masks.tif``
with ``img1_labels.tif``). Pairs that cannot be read, whose shapes differ, or
files without a partner are listed in the output and skipped.

Exit status: 0 when at least one pair was evaluated, 2 when none was.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cellseg.cli import UserError
from napari_cellseg.core.metrics import (
    DEFAULT_THRESHOLDS,
    InstanceEvaluation,
    aggregate,
    check_instance_labels,
    evaluate_instances,
)

#: file types read as label images
EXTENSIONS = (".tif", ".tiff", ".png", ".npy")
#: name endings ignored when pairing files (case-insensitive), longest tried first
NAME_SUFFIXES = (
    "_cp_masks",
    "_segmentation",
    "_prediction",
    "_instances",
    "_labels",
    "_label",
    "_masks",
    "_mask",
    "_pred",
    "_seg",
    "_gt",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``napari-cellseg evaluate``."""
    parser.add_argument(
        "--pred", required=True, type=Path, metavar="DIR_OR_FILE", help="predicted label image(s)"
    )
    parser.add_argument(
        "--gt", required=True, type=Path, metavar="DIR_OR_FILE", help="ground-truth label image(s)"
    )
    parser.add_argument(
        "--iou",
        nargs="+",
        type=float,
        default=list(DEFAULT_THRESHOLDS),
        metavar="T",
        help="IoU thresholds for AP, precision, recall and F1 (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PREFIX",
        help="also write PREFIX.csv (one row per image, then mean and pooled) and PREFIX.json",
    )


@dataclass(frozen=True)
class Pair:
    """A predicted file and its ground-truth partner."""

    name: str
    pred: Path
    gt: Path


def pairing_key(stem: str) -> str:
    """Lower-case file stem without the common label-image suffixes.

    Examples
    --------
    >>> pairing_key("Img01_cp_masks"), pairing_key("img01_labels"), pairing_key("labels")
    ('img01', 'img01', 'labels')
    """
    key = stem.lower()
    changed = True
    while changed:
        changed = False
        for suffix in NAME_SUFFIXES:
            if key.endswith(suffix) and len(key) > len(suffix):
                key = key[: -len(suffix)]
                changed = True
                break
    return key


def _list_files(path: Path, role: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise UserError(f"--{role} {path}: no {', '.join(EXTENSIONS)} files in this folder")
        return files
    raise UserError(f"--{role} {path}: no such file or folder")


def pair_files(pred: list[Path], gt: list[Path], report_unpaired_pred: bool = True,
               report_unpaired_gt: bool = True) -> tuple[list[Pair], list[dict]]:
    """Pair predicted and ground-truth files by name.

    Parameters
    ----------
    pred, gt : list of Path
        Candidate files.
    report_unpaired_pred, report_unpaired_gt : bool
        Whether a file of that side left without a partner is reported.

    Returns
    -------
    pairs : list of Pair
        Sorted by name.
    problems : list of dict
        ``{"file": str, "reason": str}`` for every file left out.
    """
    pairs: list[Pair] = []
    problems: list[dict] = []
    free_pred = list(pred)
    free_gt = list(gt)
    for key_of in (lambda p: p.stem, lambda p: pairing_key(p.stem)):
        by_pred: dict[str, list[Path]] = {}
        by_gt: dict[str, list[Path]] = {}
        for p in free_pred:
            by_pred.setdefault(key_of(p), []).append(p)
        for g in free_gt:
            by_gt.setdefault(key_of(g), []).append(g)
        for key in sorted(set(by_pred) & set(by_gt)):
            ps, gs = by_pred[key], by_gt[key]
            if len(ps) == 1 and len(gs) == 1:
                pairs.append(Pair(gs[0].stem, ps[0], gs[0]))
                free_pred.remove(ps[0])
                free_gt.remove(gs[0])
    # what is left has either no partner, or several files share its name on one side
    for side, others, report, missing in (
        (free_pred, free_gt, report_unpaired_pred, "no ground-truth file with a matching name"),
        (free_gt, free_pred, report_unpaired_gt, "no predicted file with a matching name"),
    ):
        for f in side:
            key = pairing_key(f.stem)
            same = [x for x in free_pred + free_gt if pairing_key(x.stem) == key and x != f]
            if any(x in others for x in same):
                names = ", ".join(sorted(x.name for x in same))
                problems.append({"file": str(f), "reason": f"ambiguous name: it and {names} could pair"})
            elif report:
                problems.append({"file": str(f), "reason": missing})
    pairs.sort(key=lambda pr: pr.name)
    return pairs, problems


def read_label_image(path: Path) -> np.ndarray:
    """Read a label image from TIFF (tifffile), PNG (scikit-image) or ``.npy``.

    Leading axes of length one (``(1, M, N)``) are dropped.
    """
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    elif suffix == ".png":
        from skimage.io import imread

        arr = imread(path)
    elif suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"unsupported file type {suffix!r}: use one of {', '.join(EXTENSIONS)}")
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def format_table(thresholds: tuple[float, ...], rows: list[InstanceEvaluation], mean: dict | None,
                 pooled: InstanceEvaluation | None) -> str:
    """The text table printed by the command."""
    figure_cols = [(f"AP@{t:g}", f"ap@{t:g}") for t in thresholds]
    figure_cols += [(f"F1@{thresholds[0]:g}", f"f1@{thresholds[0]:g}"), ("SEG", "seg"), ("DET", "det")]
    names = [r.name for r in rows] + ["mean", "pooled"]
    width = min(max(len(n) for n in names), 40)
    header = f"{'image':<{width}}  {'n_gt':>6}  {'n_pred':>6}  " + "  ".join(
        f"{title:>8}" for title, _ in figure_cols
    )
    lines = [header, "-" * len(header)]

    def line(name: str, n_gt: str, n_pred: str, figures: dict) -> str:
        if len(name) > width:
            name = name[: width - 3] + "..."
        cells = "  ".join(f"{_fmt(figures[key]):>8}" for _, key in figure_cols)
        return f"{name:<{width}}  {n_gt:>6}  {n_pred:>6}  {cells}"

    for r in rows:
        lines.append(line(r.name, str(r.n_gt), str(r.n_pred), r.figures()))
    if mean is not None and pooled is not None:
        lines.append("-" * len(header))
        lines.append(line("mean", "", "", mean))
        lines.append(line("pooled", str(pooled.n_gt), str(pooled.n_pred), pooled.figures()))
    return "\n".join(lines)


def _out_paths(prefix: Path) -> tuple[Path, Path]:
    if prefix.suffix.lower() in (".csv", ".json"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json")


def write_csv(path: Path, rows: list[InstanceEvaluation], pairs: dict, mean: dict,
              pooled: InstanceEvaluation) -> None:
    """One row per image (with its files), then a ``mean`` and a ``pooled`` row."""
    records = []
    for r in rows:
        rec = {"name": r.name, "pred_file": str(pairs[r.name].pred), "gt_file": str(pairs[r.name].gt)}
        rec.update(r.summary())
        records.append(rec)
    pooled_rec = pooled.summary()  # named "pooled"
    mean_rec = {"name": "mean", "n_images": pooled.n_images, **mean}
    fields = list(records[0])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        for rec in records + [mean_rec, pooled_rec]:
            writer.writerow(rec)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the files; 0 if anything was evaluated, else 2."""
    thresholds = tuple(float(t) for t in args.iou)
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise UserError(f"--iou {t}: IoU thresholds must be in (0, 1], e.g. --iou 0.5 0.75 0.9")
    pred_files = _list_files(args.pred, "pred")
    gt_files = _list_files(args.gt, "gt")
    if args.pred.is_file() and args.gt.is_file():
        pairs, problems = [Pair(args.gt.stem, args.pred, args.gt)], []
    else:
        pairs, problems = pair_files(
            pred_files,
            gt_files,
            # a folder searched for the partner of one file: its other files are no concern
            report_unpaired_pred=not (args.pred.is_dir() and args.gt.is_file()),
            report_unpaired_gt=not (args.gt.is_dir() and args.pred.is_file()),
        )
    evaluations: list[InstanceEvaluation] = []
    evaluated: dict[str, Pair] = {}
    for pair in pairs:
        try:
            gt = read_label_image(pair.gt)
            pred = read_label_image(pair.pred)
        except (OSError, ValueError) as exc:
            problems.append({"file": str(pair.pred), "reason": f"cannot read {pair.name}: {exc}"})
            continue
        try:
            # a mask or an image given as labels would score as one object, or as thousands
            for arr, role, path in ((gt, "ground truth", pair.gt), (pred, "prediction", pair.pred)):
                for plane in (arr if arr.ndim == 3 else [arr]):
                    check_instance_labels(plane, f"{role} {path.name}")
            ev = evaluate_instances(gt, pred, thresholds, name=pair.name)
        except (ValueError, TypeError) as exc:
            problems.append({"file": str(pair.pred), "reason": str(exc)})
            continue
        evaluations.append(ev)
        evaluated[pair.name] = pair

    agg = aggregate(evaluations) if evaluations else None
    if evaluations:
        print(format_table(thresholds, evaluations, agg.mean, agg.pooled))
    print(f"\nEvaluated {len(evaluations)} image pair(s); skipped {len(problems)} file(s).")
    for prob in problems:
        print(f"  skipped {prob['file']}: {prob['reason']}")
    if not evaluations:
        print("napari-cellseg evaluate: error: no image pair could be evaluated", file=sys.stderr)
        return 2

    if args.out is not None:
        csv_path, json_path = _out_paths(args.out)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(csv_path, evaluations, evaluated, agg.mean, agg.pooled)
        report = {
            "pred": str(args.pred),
            "gt": str(args.gt),
            "thresholds": list(thresholds),
            "images": [
                {**ev.to_dict(), "pred_file": str(evaluated[ev.name].pred), "gt_file": str(evaluated[ev.name].gt)}
                for ev in evaluations
            ],
            "mean": agg.mean,
            "pooled": agg.pooled.to_dict(),
            "skipped": problems,
        }
        json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"Wrote {csv_path} and {json_path}")
    return 0
