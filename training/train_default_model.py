"""Train napari-cellseg's default model ("cellseg") from LiteMedSAM on the shared data.

One run of the plugin's own fine-tuning (:mod:`napari_cellseg.core.finetune`,
the code behind the widget and ``napari-cellseg finetune``), with the
``joint`` recipe: every step teaches SAM's empty prompt the SAMCell distance
map (automatic modes) and single points and boxes the cell masks (CellSeg1
recipe: points from the top 20 % of each cell's distance transform, background
points, IoU head as cell probability). The distance map has its own copy of the
mask decoder and a full-resolution refiner (:mod:`napari_cellseg.core.distance_head`),
so it does not fight the prompts for the decoder. LiteMedSAM's image encoder stays frozen
up to its neck; the views' features are cached on disk (``--work``), so an
interrupted run resumes where it stopped (the training state is checkpointed
every two minutes).

Data: the training split of :mod:`datasets` (Usiigaci sets 1-35 and the DSB
images outside the held-out groups).

Usage (about 90 minutes on a 2-core CPU: 20 embedding the views, 65 training)::

    python training/train_default_model.py --minutes 85 --views 600 --work /tmp/cellseg-train \\
        --out src/napari_cellseg/models

then update the sha256 in ``napari_cellseg.core.models`` (printed at the end).

Stage 2 (about 50 minutes): the distance recipe continued from that packaged
model, on Usiigaci sets 1-35 and 60 DSB training images, at half the learning
rate; its tensors replace the first stage's in one packaged stage, and the
distance-mode defaults are chosen again::

    python training/train_default_model.py --continue-minutes 50 --work /tmp/cellseg-train2 \
        --out src/napari_cellseg/models

After training, the distance-mode defaults stored with the model (peak, fill,
map smoothing) are chosen on whole TRAINING images (never the validation
split): ``--tune-only`` repeats just that step on an existing adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402


def build_training_data(dsb_limit: int | None = None, keep_selection_out: bool = False):
    """The training split as :class:`~napari_cellseg.core.finetune.TrainingData`.

    ``dsb_limit``: at most this many DSB training images, spread over the list.
    ``keep_selection_out``: leave out the images kept aside to choose between runs
    (``train_encoder_stage.SELECT_USIIGACI`` and every ``SELECT_DSB_EVERY``-th DSB training image).
    """
    from napari_cellseg.core.finetune import make_training_data

    if keep_selection_out:
        import train_encoder_stage

        usiigaci, dsb, _, _ = train_encoder_stage.split_files()
    else:  # (the DSB index reads every DSB image once: build it once)
        usiigaci = list(datasets.USIIGACI_TRAIN)
        dsb = [r for r in datasets.dsb_index() if r["split"] == "train"]
    if dsb_limit is not None:
        dsb = dsb[:: max(1, len(dsb) // dsb_limit)][:dsb_limit]
    images, labels, names = [], [], []
    for k in usiigaci:
        img, lab = datasets.usiigaci_pair(k)
        images.append(img)
        labels.append(lab)
        names.append(f"usiigaci set{k}")
    for r in dsb:
        img, lab = datasets.dsb_pair(r["file"])
        images.append(img)
        labels.append(lab)
        names.append(datasets.dsb_name(r))
    return make_training_data(images, labels, names=names)


TUNE_USIIGACI = (5, 20, 33)
TUNE_DSB = 8


def tune_distance_defaults(adapter_path: Path) -> dict:
    """Choose (peak, fill, smooth) with the best mean AP@0.5 on whole training images; store them in the JSON."""
    import numpy as np
    from scipy import ndimage as ndi

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.finetune import distance_default_candidates, load_adapter
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.postprocess import labels_from_distance_map

    model = load_adapter(adapter_path, device="cpu")
    pairs = [datasets.usiigaci_pair(k) for k in TUNE_USIIGACI]
    dsb = [r for r in datasets.dsb_index() if r["split"] == "train"]
    pairs += [datasets.dsb_pair(r["file"]) for r in dsb[:: max(1, len(dsb) // TUNE_DSB)][:TUNE_DSB]]
    maps = []
    for n, (image, labels) in enumerate(pairs):
        cfg = auto.DistanceConfig(**{**auto.model_distance_defaults(model), "smooth": 0.0})
        res = auto.segment(image, model, mode="distance", config=cfg)
        maps.append((res.distance_map, labels))
        print(f"tuning: map {n + 1}/{len(pairs)}", flush=True)
    # phase contrast and nuclei weigh the same
    groups = [list(range(len(TUNE_USIIGACI))), list(range(len(TUNE_USIIGACI), len(pairs)))]

    def score(peak, fill, sigma):
        aps = []
        for dmap, labels in maps:
            d = ndi.gaussian_filter(dmap, sigma) if sigma else dmap
            aps.append(average_precision(labels, labels_from_distance_map(d, peak, fill), (0.5,))[0].ap)
        return float(np.mean([np.mean([aps[i] for i in g]) for g in groups if g]))

    candidates = distance_default_candidates()
    default = candidates[0]
    scores = {c: score(*c) for c in candidates}
    best = max(scores, key=scores.get)
    js = adapter_path.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta["thresholds"] = {"peak": best[0], "fill": best[1], "smooth": best[2]}
    meta.setdefault("metrics", {})
    meta["metrics"]["thresholds_tuned_on"] = (f"whole training images: usiigaci sets {list(TUNE_USIIGACI)} and "
                                              f"{len(pairs) - len(TUNE_USIIGACI)} DSB training images")
    meta["metrics"]["tuning_ap50"] = round(scores[best], 4)
    meta["metrics"]["tuning_ap50_samcell_thresholds"] = round(scores[default], 4)
    _write_meta(js, meta)
    print(f"distance defaults {meta['thresholds']}: mean AP@0.5 {scores[best]:.3f} on training images "
          f"(SAMCell's 0.47 / 0.09 unsmoothed: {scores[default]:.3f})")
    return meta["thresholds"]


def _write_meta(js: Path, meta: dict) -> None:
    """Replace an adapter's JSON metadata through a temporary file (an interrupted write leaves the old one)."""
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(js)


def write_package(path: Path, tensors: dict, meta: dict, name: str) -> str:
    """Write the packaged adapter's tensors (through a temporary file) and its JSON with their sha256; return it."""
    from safetensors.torch import save_file

    from napari_cellseg.core.finetune import ADAPTER_FORMAT
    from napari_cellseg.core.models import file_hash

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT, "name": name})
    meta["sha256"] = file_hash(tmp)
    tmp.replace(path)
    _write_meta(path.with_suffix(".json"), meta)
    return meta["sha256"]


def record_cell_sizes(adapter_path: Path) -> dict:
    """Write the training split's cell diameters per image kind into the adapter's JSON
    (``meta["cell_diameters"]``, :func:`datasets.training_size_table`): the sizes the automatic zoom
    (``DistanceConfig(scale="auto")``) compares an image's cells with."""
    table = datasets.training_size_table()
    js = adapter_path.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta["cell_diameters"] = table
    _write_meta(js, meta)
    print("training cell diameters (p10 / median / p90 px): " + "; ".join(
        f"{k} {v['p10']:g} / {v['median']:g} / {v['p90']:g} ({v['cells']} cells)" for k, v in table.items()))
    return table


def package_adapter(path: Path, name: str) -> None:
    """Rewrite a trained adapter as the packaged model: keep LiteMedSAM's prompt pathway, fix its name.

    The joint run trains the prompts too, but with the image encoder frozen
    that lowered box IoU below zero-shot LiteMedSAM's without raising click IoU
    (docs/model_card.md); :func:`~napari_cellseg.core.distance_head.keep_base_prompt_path`
    keeps only the distance head (its neck, decoder and refiner).
    """
    from safetensors.torch import load_file

    from napari_cellseg.core.distance_head import keep_base_prompt_path

    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = keep_base_prompt_path(load_file(str(path)))
    meta.update(name=name, file=path.name, prompt_pathway="base (the prompts answer as the base model does)")
    meta["metrics"]["packaged_parameters"] = int(sum(v.numel() for v in tensors.values()))
    write_package(path, tensors, meta, name)


CONTINUE_DSB = 60
CONTINUE_LR = 2e-4


def merge_full_stages(path: Path, name: str) -> None:
    """Rewrite a staged adapter whose stages hold only full tensors (and distance-encoder LoRA) as one stage.

    A continued run saves its base's tensors (stage ``s0``) and its own
    (``s1``); when the later stage trains every tensor of the earlier one
    (the distance recipe continued from the packaged model does), the
    earlier values are dead weight in the package. Each tensor keeps the
    value of the last stage that has it, except the distance encoder's LoRA,
    whose stages are joined into one LoRA of their summed rank (the same
    update); the JSON keeps the stage history.
    """
    from safetensors.torch import load_file

    import torch

    tensors = load_file(str(path))
    merged: dict = {}
    stages = sorted({int(k.split(".", 1)[0][1:]) for k in tensors})
    for stage in stages:
        for key, value in tensors.items():
            prefix, rest = key.split(".", 1)
            if prefix != f"s{stage}":
                continue
            if rest.startswith("full.distance_encoder.") or not rest.startswith(("full.", "qkv.distance_encoder.")):
                raise ValueError(f"cannot merge stage tensor {key}: only full tensors and the distance encoder's "
                                 "LoRA merge")
            value = value.half() if value.is_floating_point() else value
            old = merged.get(f"s0.{rest}")
            if old is not None and rest.startswith("qkv."):
                # LoRA of several stages on the same layer adds up: B0 A0 + B1 A1 = [B0 B1] [A0; A1], one LoRA
                # of the summed rank (the distance encoder has no full tensors, so the order does not matter)
                value = torch.cat([old, value], dim=0 if rest.endswith("A") else 1)
            merged[f"s0.{rest}"] = value
    meta = json.loads(path.with_suffix(".json").read_text())
    meta.update(name=name, file=path.name, dtype="float16", merged_stages=len(meta.get("stages", [])))
    write_package(path, merged, meta, name)


def train_and_stage(base, data, cfg, args, label: str, trainer=None) -> Path:
    """Run the fine-tuning with a progress bar; save its adapter (float16) as ``--out/NAME.safetensors``.

    ``trainer``: a ready :class:`~napari_cellseg.core.finetune.Finetuner` (of a subclass) to run instead of a
    plain one on ``base``, ``data`` and ``cfg``.
    """
    from napari_cellseg.core.finetune import Finetuner, save_adapter
    from napari_cellseg.core.progress import TerminalProgress

    gen = (trainer or Finetuner(base, data, cfg)).run()
    bar = TerminalProgress(label)
    try:
        while True:
            bar(next(gen))
    except StopIteration as stop:
        result = stop.value
    bar.close()
    # the packaged name is a catalogue entry (not a valid adapter name): save under a staging name, then rename
    staged = save_adapter(result, f"{args.name}-build", directory=args.out, overwrite=True, dtype="float16")
    path = Path(args.out) / f"{args.name}.safetensors"
    staged.replace(path)
    staged.with_suffix(".json").replace(path.with_suffix(".json"))
    return path


def continue_distance(args) -> Path:
    """A distance stage continued from the packaged model (its encoder frozen), merged into one packaged stage.

    Stage 2 (``--continue-dsb 60``) continued stage 1; stage 4 (``--continue-dsb all --keep-selection-out``)
    continues stage 3, whose distance encoder carries LoRA: the features are cached through that encoder
    and its neck, decoder and refiner are trained on all the DSB training images. With
    ``--encoder-lora-blocks N`` the last N attention blocks of that encoder get LoRA too (what enters them is
    cached instead of the features before the neck).
    """
    from napari_cellseg.core.finetune import FinetuneConfig, load_adapter

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    packaged = Path(args.out) / f"{args.name}.safetensors"
    limit = None if args.continue_dsb == "all" else int(args.continue_dsb)
    data = build_training_data(limit, keep_selection_out=args.keep_selection_out)
    print(f"continued stage data: {len(data)} planes, {data.n_cells} cells", flush=True)
    lora = {}
    if args.encoder_lora_blocks:
        # LoRA in the distance encoder's last blocks (what enters them is cached per view): stage 3's
        # adapter and learning rates, on a CPU
        lora = dict(encoder_lora=True, encoder_lora_blocks=args.encoder_lora_blocks, lora_rank=args.rank,
                    lora_alpha=float(args.rank), full_lr=args.lr or CONTINUE_LR)
    cfg = FinetuneConfig(recipe="distance", minutes=args.continue_minutes, views=args.views,
                         lr=args.lora_lr if lora else (args.lr or CONTINUE_LR), seed=args.seed,
                         feature_cache=str(work / "features"), checkpoint=str(work / "checkpoint.pt"),
                         patience=0, device="cpu", **lora)
    path = train_and_stage(load_adapter(packaged, device="cpu"), data, cfg, args, "continued stage")
    merge_full_stages(path, args.name)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=75.0, help="time budget of training (embedding included)")
    p.add_argument("--views", type=int, default=None, help="augmented views to cache (default: by the budget)")
    p.add_argument("--work", default="cellseg-train", help="folder for cached features and the checkpoint")
    p.add_argument("--out", default=str(datasets.REPO / "src" / "napari_cellseg" / "models"))
    p.add_argument("--name", default="cellseg")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dsb-limit", type=int, default=None, help="use at most this many DSB training images")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--package-only", action="store_true",
                   help="only rewrite the adapter in --out as the packaged model (keep the base prompt pathway)")
    p.add_argument("--continue-minutes", type=float, default=None,
                   help="stage 2 or 4: continue the packaged model in --out with the distance recipe for this long")
    p.add_argument("--continue-dsb", default=str(CONTINUE_DSB),
                   help="DSB training images of a continued stage: a number (spread over the list) or 'all'")
    p.add_argument("--keep-selection-out", action="store_true",
                   help="leave out the images train_encoder_stage.py keeps aside to choose between runs")
    p.add_argument("--encoder-lora-blocks", type=int, default=None,
                   help="continued stage: also train LoRA in the last N attention blocks of the distance encoder")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank with --encoder-lora-blocks")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA peak learning rate with --encoder-lora-blocks")
    p.add_argument("--sizes-only", action="store_true",
                   help="only record the training cells' diameters per image kind in the adapter in --out "
                        "(meta['cell_diameters'], read by the automatic zoom; no training)")
    p.add_argument("--tune-only", action="store_true",
                   help="only choose the distance-mode defaults of the adapter in --out (no training)")
    args = p.parse_args(argv)
    datasets.require_data()
    if args.package_only:
        package_adapter(Path(args.out) / f"{args.name}.safetensors", args.name)
        return 0
    if args.tune_only:
        tune_distance_defaults(Path(args.out) / f"{args.name}.safetensors")
        return 0
    if args.sizes_only:
        record_cell_sizes(Path(args.out) / f"{args.name}.safetensors")
        return 0

    import torch

    from napari_cellseg.core.finetune import FinetuneConfig
    from napari_cellseg.core.models import file_hash, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.continue_minutes:
        path = continue_distance(args)
        tune_distance_defaults(path)
        record_cell_sizes(path)
        print(f"\nsaved {path} ({path.stat().st_size / 1e6:.1f} MB), sha256 {file_hash(path)}")
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = build_training_data(args.dsb_limit)
    print(f"training data: {len(data)} planes, {data.n_cells} cells ({time.time() - t0:.0f} s to read)", flush=True)
    cfg = FinetuneConfig(recipe="joint", minutes=args.minutes, views=args.views, lr=args.lr, seed=args.seed,
                         feature_cache=str(work / "features"), checkpoint=str(work / "checkpoint.pt"),
                         patience=0, device="cpu")
    path = train_and_stage(load_model("litemedsam", device="cpu"), data, cfg, args, "train")
    package_adapter(path, args.name)
    tune_distance_defaults(path)
    record_cell_sizes(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    print(f"\nsaved {path} ({path.stat().st_size / 1e6:.1f} MB), sha256 {file_hash(path)}")
    print(json.dumps(meta["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
