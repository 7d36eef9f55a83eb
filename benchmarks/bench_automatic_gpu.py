"""Seconds per 1022 x 1024 image of the default model's automatic modes on a GPU (float32 and bfloat16).

Run on a machine with a CUDA GPU, from the repository root::

    python benchmarks/bench_automatic_gpu.py                      # ../shared data and the installed models
    python benchmarks/bench_automatic_gpu.py --from-pack .gpu/pack  # a GPU machine without ../shared
                                                                    # (pack: training/train_encoder_stage.py --pack)

With ``--from-pack`` the image is the pack's first selection image (Usiigaci set 33) and LiteMedSAM's image and
prompt encoders come from the pack (its mask decoder is not packed: the guided mode's masks are then meaningless,
its time is not). One warm-up call, then ``--repeats`` timed calls per mode and precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-pack", type=Path, default=None)
    p.add_argument("--model", default="cellseg")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)

    import torch

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.models import load_model

    if args.from_pack:
        import train_encoder_stage as stage

        stage.use_packed_encoder(args.from_pack / stage.PACKED_WEIGHTS)
        image, _, name = stage.load_pairs(args.from_pack)["select"][0]
    else:
        import datasets

        (image, _), name = datasets.usiigaci_pair(33), "usiigaci set33"
    model = load_model(args.model, device=args.device)
    sync = torch.cuda.synchronize if str(model.device).startswith("cuda") else (lambda: None)
    print(f"{name} {image.shape}, {args.model} on {model.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if str(model.device).startswith("cuda") else ""))
    for precision in ("float32", "bfloat16"):
        m = model.with_precision(precision)
        for mode in ("distance", "guided"):
            auto.segment(image, m, mode=mode)
            sync()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                result = auto.segment(image, m, mode=mode)
                sync()
                times.append(time.perf_counter() - t0)
            print(f"{precision} {mode}: seconds per image {[round(t, 3) for t in times]}, "
                  f"{int(result.labels.max())} cells", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
