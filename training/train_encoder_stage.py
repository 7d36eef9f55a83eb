"""Stage 3 of the default model: LoRA in the distance path's image encoder (a GPU run).

Stages 1 and 2 (``train_default_model.py``) train the distance head with
LiteMedSAM's image encoder frozen, which a 2-core CPU affords. Their map still
misses faint flat cells and fires on debris (docs/model_card.md): the frozen
features do not tell them apart. This stage continues the packaged model with
the distance recipe and LoRA (q and v of every attention layer, CellSeg1's
adapter) in the distance path's own copy of the image encoder
(:func:`napari_cellseg.core.distance_head.attach_distance_encoder`), so clicks and boxes keep
LiteMedSAM's answers. With the encoder in the loop no features can be cached:
each step renders fresh augmented views (in ``--workers`` processes) and runs
the encoder forward and backward. That is what a GPU is for (about 0.1 s per
step of 16 views on an H100; several seconds on a 2-core CPU).

Data: the training split of :mod:`datasets`, less a few training images kept
aside to choose between runs (``SELECT_USIIGACI``, every ``SELECT_DSB_EVERY``-th
DSB training image); the validation split is never read.

Usage, on a machine with the shared data (about 10 minutes on one H100)::

    python training/train_encoder_stage.py --minutes 7 --device cuda --workers 12 --out /tmp/stage3

On a GPU machine without ``../shared``, pack what it needs first (here), carry
the folder, and point the run at it::

    python training/train_encoder_stage.py --pack .gpu/pack            # here: data (8-bit) and encoder weights
    python training/train_encoder_stage.py --from-pack .gpu/pack --minutes 7 --device cuda --out $OUT

The result (``--out/cellseg.safetensors`` and its JSON, stages merged into one,
float16) replaces the packaged model after ``train_default_model.py --tune-only``
has chosen its distance-mode defaults on training images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402

SELECT_USIIGACI = (33, 34, 35)
SELECT_DSB_EVERY = 40
PACKED_WEIGHTS = "litemedsam_encoders.safetensors"
PACK_DSB_EVERY = 3  # the GPU machine takes at most 64 MiB: a third of the DSB training images travel


def split_files(dsb_every: int = 1):
    """(training Usiigaci sets, training DSB records, selection Usiigaci sets, selection DSB records)."""
    train_u = [k for k in datasets.USIIGACI_TRAIN if k not in SELECT_USIIGACI]
    dsb = [r for r in datasets.dsb_index() if r["split"] == "train"]
    select_d = dsb[::SELECT_DSB_EVERY]
    chosen = {r["file"] for r in select_d}
    train_d = [r for r in dsb if r["file"] not in chosen][::dsb_every]
    return train_u, train_d, list(SELECT_USIIGACI), select_d


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit copy of a 16-bit image (0.1-99.9 percentile stretch; the plugin normalises by percentiles anyway)."""
    if image.dtype == np.uint8:
        return image
    lo, hi = np.percentile(image, [0.1, 99.9])
    return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def pack(folder: Path) -> None:
    """Write the data and LiteMedSAM's image-encoder weights a GPU machine without ../shared needs."""
    import torch
    from safetensors.torch import save_file

    from napari_cellseg.core.models import load_model

    pairs = load_pairs(None, dsb_every=PACK_DSB_EVERY)
    folder.mkdir(parents=True, exist_ok=True)
    items = [(part, name, image, labels) for part in ("train", "select") for image, labels, name in pairs[part]]
    index = []
    for n, (part, name, image, labels) in enumerate(items):
        file = f"{n:04d}.npz"
        np.savez_compressed(folder / file, image=_to_uint8(image), labels=labels.astype(np.uint16))
        index.append({"file": file, "part": part, "name": name})
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    sam = load_model("litemedsam", device="cpu").sam
    # the image encoder in float16; the prompt encoder (the default prompt's embedding and the positional
    # encoding the distance decoder reads) as it is
    state = {f"image_encoder.{k}": v.detach().to(torch.float16).contiguous()
             for k, v in sam.image_encoder.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v.detach().contiguous() for k, v in sam.prompt_encoder.state_dict().items()})
    save_file(state, str(folder / PACKED_WEIGHTS))
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"packed {len(items)} images ({sum(i[0] == 'train' for i in items)} training) and the encoder "
          f"into {folder}: {size / 1e6:.1f} MB")


def load_pairs(pack_dir: Path | None, dsb_every: int = 1):
    """{"train": [(image, labels, name)], "select": [...]} from the pack or from ../shared.

    ``dsb_every``: from ../shared, every n-th DSB training image (see :func:`split_files`).
    """
    out: dict[str, list] = {"train": [], "select": []}
    if pack_dir is not None:
        for item in json.loads((pack_dir / "index.json").read_text()):
            with np.load(pack_dir / item["file"]) as z:
                out[item["part"]].append((z["image"], z["labels"], item["name"]))
        return out
    datasets.require_data()
    train_u, train_d, select_u, select_d = split_files(dsb_every)
    for part, us, ds in (("train", train_u, train_d), ("select", select_u, select_d)):
        out[part] += [(*datasets.usiigaci_pair(k), f"usiigaci set{k}") for k in us]
        out[part] += [(*datasets.dsb_pair(r["file"]), datasets.dsb_name(r)) for r in ds]
    return out


def use_packed_encoder(path: Path) -> None:
    """Make the catalogue's ``litemedsam`` load from the packed encoder weights.

    Only the image encoder (float16 values, run in float32) and the prompt
    encoder are real; the mask decoder is left as built, which this stage never reads:
    the distance path has its own neck and decoder (from the packaged model),
    and the result is saved as tensors on top of ``litemedsam``, loaded
    where the real checkpoint is.
    """
    from dataclasses import replace

    from safetensors.torch import load_file

    from napari_cellseg.core import models

    entry = models.get_entry("litemedsam")

    def loader(_entry, device):
        sam = models.build_sam(entry.architecture)
        packed = load_file(str(path))
        for part in ("image_encoder", "prompt_encoder"):
            state = {k[len(part) + 1:]: v.float() for k, v in packed.items() if k.startswith(f"{part}.")}
            models.load_state_strict(getattr(sam, part), state, f"packed LiteMedSAM {part}")
        sam.to(device).eval()
        return models.LoadedModel(name="litemedsam", sam=sam, device=device, entry=entry)

    models.register_loader("packed-encoder", loader)
    models._BUILTIN["litemedsam"] = replace(entry, source="packed-encoder")


_STATE: dict = {}


def _render_in_worker(spec):
    ft = _STATE["ft"]
    entry = ft._view_entry(ft.train, spec, ft.distances, with_features=False)
    if "pixels" in entry:
        del entry["image"]  # 4 times the bytes of its 8-bit copy: rebuilt from that in the main process
    return entry


def _restore(entry):
    if "image" not in entry:
        entry["image"] = entry["pixels"].astype(np.float32) / 255.0
    return entry


def _single_thread():
    import torch

    torch.set_num_threads(1)


def pooled_finetuner(workers: int):
    """A Finetuner class that renders each step's views in ``workers`` forked processes."""
    import multiprocessing as mp

    from napari_cellseg.core.finetune import Finetuner

    class Pooled(Finetuner):
        def _render_entries(self, specs):
            if workers <= 1:
                return super()._render_entries(specs)
            if "pool" not in _STATE:
                _STATE["ft"] = self  # inherited by the forked workers (they touch numpy only, never the GPU)
                _STATE["pool"] = mp.get_context("fork").Pool(workers, initializer=_single_thread)
            return [_restore(e) for e in _STATE["pool"].map(_render_in_worker, specs)]

    return Pooled, _STATE


def selection_ap(model, pairs) -> dict:
    """Mean AP@0.5 of the distance mode (model thresholds) on the selection images, per kind."""
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.metrics import average_precision

    per: dict[str, list] = {}
    for image, labels, name in pairs:
        res = auto.segment(image, model, mode="distance")
        ap = average_precision(labels, res.labels, (0.5,))[0].ap
        kind = "usiigaci" if name.startswith("usiigaci") else name.split()[2]
        per.setdefault(kind, []).append(ap)
    out = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
    out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, help="only write the pack for a GPU machine into this folder")
    p.add_argument("--from-pack", type=Path, help="read data and encoder weights from this pack")
    p.add_argument("--base", default=str(datasets.REPO / "src" / "napari_cellseg" / "models" / "cellseg.safetensors"))
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the LoRA")
    p.add_argument("--full-lr", type=float, default=2e-4, help="peak learning rate of the neck, decoder, refiner")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=False)
    p.add_argument("--name", default="cellseg")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--select-limit", type=int, default=None, help="score at most this many selection images")
    args = p.parse_args(argv)
    if args.pack:
        pack(args.pack)
        return 0
    if args.out is None:
        p.error("--out is required")

    import torch

    from napari_cellseg.core.finetune import FinetuneConfig, load_adapter, make_training_data
    from napari_cellseg.core.models import file_hash

    from train_default_model import merge_full_stages, train_and_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_pack:
        use_packed_encoder(args.from_pack / PACKED_WEIGHTS)
    t0 = time.time()
    pairs = load_pairs(args.from_pack)
    images, labels, names = zip(*pairs["train"])
    data = make_training_data(list(images), list(labels), names=list(names))
    print(f"stage 3 data: {len(data)} planes, {data.n_cells} cells; {len(pairs['select'])} selection images "
          f"({time.time() - t0:.0f} s to read)", flush=True)
    base = load_adapter(args.base, device=args.device)
    print(f"device {base.device}; torch {torch.__version__}", flush=True)
    cfg = FinetuneConfig(recipe="distance", minutes=args.minutes, encoder_lora=True, lora_rank=args.rank,
                         lora_alpha=float(args.rank), lr=args.lr, full_lr=args.full_lr, batch_size=args.batch_size,
                         seed=args.seed, patience=0, device=args.device, tune_thresholds=False,
                         thresholds=dict(base.meta.get("thresholds") or {"peak": 0.47, "fill": 0.09}))
    args.out.mkdir(parents=True, exist_ok=True)
    cls, state = pooled_finetuner(args.workers)
    trainer = cls(base, data, cfg)
    t_train = time.time()
    try:
        path = train_and_stage(base, data, cfg, args, "stage 3", trainer=trainer)
    finally:
        if "pool" in state:
            state["pool"].terminate()
    train_s = time.time() - t_train
    print(f"steps {trainer._steps} ({trainer._steps / train_s:.2f}/s over {train_s:.0f} s, views of "
          f"{args.batch_size}), trainable {trainer.n_trainable()}; window losses "
          f"{[round(h['loss'], 5) for h in trainer._history if h.get('loss') is not None]}", flush=True)
    merge_full_stages(path, args.name)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["thresholds"] = dict(base.meta.get("thresholds") or {})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    if args.select_limit is not None:
        pairs["select"] = pairs["select"][: args.select_limit]
    if pairs["select"]:
        t1 = time.time()
        before = selection_ap(base, pairs["select"])
        after = selection_ap(load_adapter(path, device=args.device), pairs["select"])
        print(f"selection AP@0.5 (the base's thresholds): before {before} after {after} ({time.time() - t1:.0f} s)")
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB), sha256 {file_hash(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
