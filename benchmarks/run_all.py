"""Run every benchmark and write docs/benchmarks.md (one command for the whole report).

Usage (from the repository root, with ../shared/data present)::

    python benchmarks/run_all.py            # full settings, about an hour on a 2-core CPU
    python benchmarks/run_all.py --quick    # smaller samples, about 20 minutes

Each benchmark prints a markdown section with its machine, command and date; this script runs them one after the
other (never in parallel: timings on a shared machine are noisy enough) and collects their output. Speed figures
are reported as ratios to the stock segment-anything path measured in the same process wherever a stock path exists.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: one image of a DSB group the default model never trained on (the same run in both plans: it is short)
UNSEEN_KIND_FINETUNE = (
    "Fine-tuning on one image of a kind the default model never saw",
    ["bench_finetune.py", "--base", "cellseg", "--recipes", "distance", "--dsb-group", "360x360 fluorescence",
     "--train-index", "27", "--minutes", "3", "--cells", "8", "--modes", "clicks,distance"],
)

FULL = [
    ("Embedding time per model", ["bench_embedding.py"]),
    ("Automatic modes: speed, slider updates, zero-shot AP", ["bench_automatic.py", "--no-doc"]),
    ("Interactive annotation: latency and box-prompt IoU", ["bench_annotation.py"]),
    ("Fine-tuning on one image: time and AP on held-out images",
     ["bench_finetune.py", "--base", "litemedsam", "cellseg"]),
    UNSEEN_KIND_FINETUNE,
    ("Default model against zero-shot LiteMedSAM on held-out data",
     ["bench_default_model.py", "--modes", "distance", "guided", "grid", "--mode-images", "8"]),
    ("Image encoder arithmetic: float32 against bfloat16", ["bench_precision.py", "--dsb-per-kind", "2"]),
]
QUICK = [
    ("Embedding time per model", ["bench_embedding.py", "--archs", "litemedsam", "vit_b", "--repeat", "3"]),
    ("Automatic modes: speed, slider updates, zero-shot AP",
     ["bench_automatic.py", "--no-doc", "--ap-images", "3"]),
    ("Interactive annotation: latency and box-prompt IoU",
     ["bench_annotation.py", "--cells-per-image", "4", "--latency-prompts", "30", "--images", "5"]),
    ("Fine-tuning on one image: time and AP on held-out images",
     ["bench_finetune.py", "--base", "litemedsam", "cellseg", "--minutes", "3", "--val-sets", "36,44",
      "--cells", "20"]),
    UNSEEN_KIND_FINETUNE,
    ("Default model against zero-shot LiteMedSAM on held-out data",
     ["bench_default_model.py", "--usiigaci", "36,40,44", "--dsb-per-kind", "4", "--cells-per-image", "8",
      "--modes", "distance", "guided", "grid", "--mode-images", "4"]),
    ("Image encoder arithmetic: float32 against bfloat16",
     ["bench_precision.py", "--usiigaci", "36,40,44", "--dsb-per-kind", "4", "--cells-per-image", "8"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples and shorter training")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the benchmarks whose script names contain these; the other sections of an "
                             "existing report are kept")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.only:
        plan = [p for p in plan if any(o in p[1][0] for o in args.only)]
    cmd_line = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    parts = [
        "# Benchmarks\n",
        f"Produced by `{cmd_line}`"
        + (f" (last update {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, sections of an earlier "
           "run kept beside the re-run ones)" if args.only else
           f" on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        + ". Each section names its machine, the exact command and its date; see docs/automatic.md, "
        "docs/annotation.md and docs/finetuning.md for what the figures mean.\n",
    ]
    kept = _sections(args.out) if args.only and args.out.is_file() else {}
    failures = 0
    done: dict[str, str] = {}
    for title, cmd in plan:
        t0 = time.perf_counter()
        print(f"running {' '.join(cmd)} …", flush=True)
        proc = subprocess.run([sys.executable, *cmd], cwd=HERE, capture_output=True, text=True)
        minutes = (time.perf_counter() - t0) / 60
        body = f"\n`cd benchmarks && python {' '.join(cmd)}` ({minutes:.1f} min)\n"
        if proc.returncode != 0:
            failures += 1
            body += f"\n**Failed** (exit {proc.returncode}):\n\n```\n{proc.stderr[-3000:]}\n```\n"
        else:
            # a benchmark's own headings go one level down, under the section's
            out = "\n".join("#" + line if line.startswith("#") else line for line in proc.stdout.strip().splitlines())
            body += "\n" + out + "\n"
        done[title] = body
        # keep what is done if a later part is interrupted; sections in the order of the full plan
        order = [t for t, _ in FULL] + [t for t in kept if t not in dict(FULL)]
        merged = {**kept, **done}
        text = "\n".join(parts) + "".join(f"\n## {t}\n{merged[t]}" for t in order if t in merged)
        args.out.write_text(text)
    print(f"wrote {args.out} ({failures} failed)")
    return 1 if failures else 0


def _sections(path: Path) -> dict[str, str]:
    """Sections (title -> body) of an existing report."""
    out: dict[str, str] = {}
    for chunk in path.read_text().split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        out[title.strip()] = "\n" + body.strip("\n") + "\n"  # the blank line after the title, once
    return out


if __name__ == "__main__":
    sys.exit(main())
