"""Guided-mode prompt settings against distance mode, from the same distance map, on held-out images.

For each validation image (the split of ``bench_default_model.py``) the
distance mode runs once with the model's own thresholds; guided mode then draws
the cells of that map with each setting (points and boxes, the mask threshold,
the crop scale), through :func:`napari_cellseg.core.automatic.guided_from_map`.
Prints AP@0.5 (TP / (TP + FP + FN)) per image and the mean per image kind, as a
markdown table (docs/automatic.md quotes it).

Run from the repository root::

    python benchmarks/bench_guided_settings.py --usiigaci 36,44 --dsb-per-kind 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_default_model import KIND_NAMES, load, validation_images  # noqa: E402

SETTINGS = {  # --settings key: (column, GuidedConfig settings)
    "default": ("point + box, threshold 0 (default)", {}),
    "box-2": ("box only, threshold -2", {"use_points": False, "mask_threshold": -2.0}),
    "box0": ("box only, threshold 0", {"use_points": False}),
    "box-2-native": ("box only, threshold -2, native crops",
                     {"use_points": False, "mask_threshold": -2.0, "max_downscale": 1.0}),
    "views8": ("point + box, threshold 0, 8 orientations", {"views": 8}),
    "invert": ("point + box, threshold 0, inverted contrast averaged", {"invert": True}),
    "box-2-invert": ("box only, threshold -2, inverted contrast averaged",
                     {"use_points": False, "mask_threshold": -2.0, "invert": True}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cellseg")
    p.add_argument("--usiigaci", default="36,44")
    p.add_argument("--dsb-per-kind", type=int, default=3)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                   default=["default", "box-2", "box0", "box-2-native"])
    args = p.parse_args(argv)

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.progress import run_to_completion

    model = load_model(args.model, device="cpu")
    defaults = auto.DistanceConfig(**auto.model_distance_defaults(model))
    per_kind: dict[str, dict[str, list[float]]] = {}
    for item in validation_images([int(x) for x in args.usiigaci.split(",") if x], args.dsb_per_kind):
        image, labels = load(item)
        dist = auto.segment(image, model, mode="distance")
        row = {"distance mode": average_precision(labels, dist.labels, (0.5,))[0].ap}
        for key in args.settings:
            name, settings = SETTINGS[key]
            cfg = auto.GuidedConfig(distance=defaults, **settings)
            t0 = time.perf_counter()
            res = run_to_completion(auto.guided_from_map(image, dist.distance_map, model, cfg))
            row[name] = average_precision(labels, res.labels, (0.5,))[0].ap
            print(f"{item['name']}: {name} AP@0.5 {row[name]:.3f} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        for name, v in row.items():
            per_kind.setdefault(item["kind"], {}).setdefault(name, []).append(v)
    names = ["distance mode", *(SETTINGS[k][0] for k in args.settings)]
    print(f"Guided-mode settings, model `{args.model}`, AP@0.5 mean per kind "
          f"(`python benchmarks/bench_guided_settings.py --usiigaci {args.usiigaci} "
          f"--dsb-per-kind {args.dsb_per_kind} --settings {' '.join(args.settings)}`, "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)\n")
    print("| image kind (images) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for kind, d in per_kind.items():
        n = len(d["distance mode"])
        print(f"| {KIND_NAMES.get(kind, kind)} ({n}) | " + " | ".join(f"{np.mean(d[k]):.3f}" for k in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
