"""Helpers shared by the benchmark scripts: machine description, timing, data location."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
#: the team's split of usiigaci-phase-train: sets 1-35 train, 36-45 validation (whole images held out)
USIIGACI_VALIDATION = [f"train_set{i}" for i in range(36, 46)]
USIIGACI_TRAIN = [f"train_set{i}" for i in range(1, 36)]


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{encoder_precision()}")


def encoder_precision() -> str:
    """The image encoder's arithmetic of models loaded without ``precision`` on the CPU (the default setting)."""
    from napari_cellseg.core.models import default_precision, resolve_precision

    asked = default_precision()
    got = resolve_precision(asked, "cpu")
    return f"image encoder in {got}" + (f" (precision {asked})" if asked != got else "")


def header(title: str) -> str:
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    return (f"## {title}\n\n- Machine: {machine()}\n- Command: `{cmd}`\n"
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")


def timed(fn, repeat: int = 3, warmup: int = 1) -> list[float]:
    """Wall times in seconds of ``repeat`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        sys.exit(f"this benchmark needs the real data at {SHARED_DATA}")
    return SHARED_DATA
