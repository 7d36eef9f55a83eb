"""Image encoder in float32 against bfloat16: speed and what it changes in the results, on held-out images.

``LoadedModel.precision = "bfloat16"`` (``--precision bfloat16`` on the command
line, "Encoder arithmetic" in the model widget, ``$NAPARI_CELLSEG_PRECISION``)
runs the image encoder under bfloat16 autocast. This measures, for the default
model ``cellseg`` on the validation split of docs/model_card.md:

* the encoder's time per 256 px crop in each precision (median of ``--repeat``);
* the automatic distance mode: seconds per image and AP@0.5 in each precision;
* one click and one box per sampled cell through the annotation engine: mean IoU
  with the reference cell in each precision, and the IoU between the two
  precisions' masks of the same prompt.

Usage::

    python benchmarks/bench_precision.py --usiigaci 36,40,44 --dsb-per-kind 1 --cells-per-image 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import header, timed  # noqa: E402
from bench_default_model import load, sample_cells, validation_images  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def encoder_seconds(model, repeat: int) -> float:
    import torch

    sam = model.sam
    x = torch.rand(1, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(0))

    def run():
        with torch.inference_mode(), model.encoder_autocast():
            sam.image_encoder(x)

    return statistics.median(timed(run, repeat=repeat, warmup=1))


def prompt_masks(model, image, cells) -> dict[str, list[np.ndarray]]:
    from napari_cellseg.core.interactive import InteractiveSegmenter, ObjectPrompt

    seg = InteractiveSegmenter(model)
    seg.set_image(image)
    out = {}
    for kind in ("clicks", "boxes"):
        prompts = [ObjectPrompt(points=[pt]) if kind == "clicks" else ObjectPrompt(box=box) for _, pt, box in cells]
        out[kind] = [o.to_full(image.shape[:2]) for o in seg.segment_many(prompts)]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cellseg")
    parser.add_argument("--usiigaci", default="36,40,44", help="held-out Usiigaci sets")
    parser.add_argument("--dsb-per-kind", type=int, default=1, help="held-out DSB images per image kind")
    parser.add_argument("--cells-per-image", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="encoder timings per precision")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.models import load_model, native_bfloat16

    t_start = time.monotonic()
    models = {p: load_model(args.model, device="cpu", precision=p) for p in PRECISIONS}
    enc = {p: encoder_seconds(m, args.repeat) for p, m in models.items()}
    items = validation_images([int(k) for k in args.usiigaci.split(",") if k], args.dsb_per_kind)
    rows = []
    for item in items:
        image, labels = load(item)
        cells = sample_cells(labels, args.cells_per_image, np.random.default_rng(args.seed))
        row = {"kind": item["kind"], "name": item["name"]}
        masks = {}
        for p, model in models.items():
            t = time.perf_counter()
            res = auto.segment(image, model, mode="distance")
            row[f"seconds_{p}"] = time.perf_counter() - t
            row[f"ap50_{p}"] = average_precision(labels, res.labels, (0.5,))[0].ap
            masks[p] = prompt_masks(model, image, cells)
            for kind in ("clicks", "boxes"):
                row[f"{kind}_{p}"] = float(np.mean([_iou(m, labels == i) for m, (i, _, _) in zip(masks[p][kind], cells)]))
        for kind in ("clicks", "boxes"):
            row[f"{kind}_agreement"] = float(np.mean([_iou(a, b) for a, b in zip(masks["float32"][kind],
                                                                                   masks["bfloat16"][kind])]))
        rows.append(row)
        print(item["name"], {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, file=sys.stderr,
              flush=True)

    def mean(key, sel=rows):
        return float(np.mean([r[key] for r in sel]))

    lines = [header("Image encoder arithmetic: float32 against bfloat16"),
             f"Model `{args.model}`; native bfloat16 on this CPU (oneDNN): {native_bfloat16('cpu')}; "
             f"{len(rows)} held-out images ({', '.join(r['name'] for r in rows)}), {args.cells_per_image} sampled "
             f"cells each; {(time.monotonic() - t_start) / 60:.1f} min.", "",
             "| figure | float32 | bfloat16 | bfloat16 / float32 |", "|---|---|---|---|",
             f"| encoder, one 256 px crop (median of {args.repeat}) | {enc['float32']:.3f} s | {enc['bfloat16']:.3f} s "
             f"| {enc['bfloat16'] / enc['float32']:.2f} |"]
    phase = [r for r in rows if r["kind"] == "phase"]
    if phase:
        lines.append(f"| distance mode, s per Usiigaci image (1022 x 1024) | {mean('seconds_float32', phase):.1f} "
                     f"| {mean('seconds_bfloat16', phase):.1f} "
                     f"| {mean('seconds_bfloat16', phase) / mean('seconds_float32', phase):.2f} |")
    lines += [f"| distance mode AP@0.5, mean over images | {mean('ap50_float32'):.3f} | {mean('ap50_bfloat16'):.3f} "
              f"| {mean('ap50_bfloat16') - mean('ap50_float32'):+.3f} (difference) |",
              f"| click IoU with the reference cell | {mean('clicks_float32'):.3f} | {mean('clicks_bfloat16'):.3f} "
              f"| {mean('clicks_bfloat16') - mean('clicks_float32'):+.3f} (difference) |",
              f"| box IoU with the reference cell | {mean('boxes_float32'):.3f} | {mean('boxes_bfloat16'):.3f} "
              f"| {mean('boxes_bfloat16') - mean('boxes_float32'):+.3f} (difference) |",
              f"| IoU between the two precisions' masks of the same prompt (clicks / boxes) "
              f"| {mean('clicks_agreement'):.3f} / {mean('boxes_agreement'):.3f} | | |", ""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
