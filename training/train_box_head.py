"""Train the default model's box head: a copy of LiteMedSAM's mask decoder that answers box prompts on cells.

The packaged model answers boxes (and the clicks it turns into boxes through its cell map) with LiteMedSAM's own
decoder, trained on medical scans. This script trains a copy of that decoder, ``sam.box_decoder``
(:mod:`napari_cellseg.core.box_head`), on box prompts of training cells, each in the window the annotation mode
would cut for it (:meth:`~napari_cellseg.core.interactive.InteractiveSegmenter.window_for`: the box grown by the
context margin, zoomed into the 256 px input), in both contrasts the annotation mode averages for grey images
(as is and inverted). The image encoder is LiteMedSAM's, frozen: each window is embedded once and cached in
``--work`` (float16, 2 MB a window). Loss: BCE + Dice on the mask, MSE of the IoU head to the mask's real IoU;
each box is jittered (every side moved by -5 % to +15 % of the box size, half the first copies exact), since
users' boxes and the boxes the cell map gives clicks (grown by 10 %) are rarely tight.

Data: the training split without the selection images (``train_encoder_stage.split_files``): Usiigaci sets 1-32
(30 cells each) and the DSB training images (3 cells of each fluorescence image, 12 of each bright-field or colour
image). Then the mask threshold of boxes is chosen on the selection images (Usiigaci sets 33-35 and every 40th
DSB training image; never the validation split), and the decoder is added to the packaged model in ``--out``
(float16, ``s0.full.box_decoder.*``), with ``meta["box_mask_threshold"]``.

Usage (about 38 minutes on a 2-core CPU: 13 embedding 3,200 windows, 20 training, 4 choosing the threshold)::

    python training/train_box_head.py --work /tmp/box-train --minutes 20 --out src/napari_cellseg/models

then update the sha256 in ``napari_cellseg.core.models`` (printed at the end). The packaged head (2026-12-04) was
then continued with clicks, a quarter of the prompts a click's (a positive point from the cell's inner 20 % with a
jittered box, or with a box grown by up to 60 % as a cell map that merged the cell with its neighbours gives it;
about 32 minutes with the embedding, which a second run reuses)::

    python training/train_box_head.py --work /tmp/box-pts --minutes 15 --lr 3e-5 --clicks 0.25 \
        --init-from src/napari_cellseg/models/cellseg.safetensors --out OUT

with OUT holding a copy of the packaged model; copy OUT's files into ``src/napari_cellseg/models``.

Each run also chooses the mask threshold of clicks (``meta["click_mask_threshold"]``: the annotation mode's
clicks, drawn from their map cell's box, on the selection images). To choose both thresholds again for the
packaged model without training (about 4 minutes; only its JSON changes, not its tensors or sha256)::

    python training/train_box_head.py --thresholds-only --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import datasets  # noqa: E402

CELLS_PER_IMAGE = {"phase": 30, "fluorescence": 3, "brightfield": 12, "colour": 12}
SIDE = 256  # LiteMedSAM's input
GRID = 64  # its embedding grid
JITTER = (-0.05, 0.15)
GROWN_MAX = 0.6  # a click's grown box: each side pushed out by up to this fraction of the box size
THRESHOLDS = (-2.0, -1.0, 0.0)
#: mask thresholds tried for clicks: the annotation mode draws a click from its map cell's box (grown by 10 %, on
#: a map cell that is itself often a little large), looser than a user's box, so clicks get their own threshold
CLICK_THRESHOLDS = (-1.0, -0.5, 0.0, 0.5, 1.0)


def training_images(seed: int = 1) -> list[tuple[str, object, int]]:
    """(source, key, cells to sample) of the training images, shuffled."""
    import train_encoder_stage

    train_u, train_d, _, _ = train_encoder_stage.split_files()
    items = [("u", k, CELLS_PER_IMAGE["phase"]) for k in train_u]
    items += [("d", r["file"], CELLS_PER_IMAGE.get(r["kind"], 3)) for r in train_d]
    np.random.default_rng(seed).shuffle(items)
    return items


def embed_windows(work: Path, max_windows: int, seed: int = 1) -> int:
    """Embed the sampled cells' annotation windows into ``work`` (resumable); return how many there are."""
    from bench_default_model import sample_cells
    from skimage.transform import resize

    from napari_cellseg.core.interactive import (
        AnnotationConfig,
        InteractiveSegmenter,
        ObjectPrompt,
    )
    from napari_cellseg.core.models import load_model
    from napari_cellseg.core.preprocess import view_image

    meta_path = work / "meta.npz"
    done = int(np.load(meta_path)["n"]) if meta_path.is_file() else 0
    if done >= max_windows:
        return done
    work.mkdir(parents=True, exist_ok=True)
    shape = (max_windows, 256, GRID, GRID)
    if done and np.load(work / "feats.npy", mmap_mode="r").shape[0] < max_windows:  # a larger run resumes a smaller
        old_feats = np.load(work / "feats.npy", mmap_mode="r")
        grown = np.lib.format.open_memmap(work / "feats.tmp.npy", "w+", np.float16, shape)
        grown[:done] = old_feats[:done]
        grown.flush()
        del grown, old_feats
        (work / "feats.tmp.npy").replace(work / "feats.npy")
    feats = (np.load(work / "feats.npy", mmap_mode="r+") if done
             else np.lib.format.open_memmap(work / "feats.npy", "w+", np.float16, shape))
    boxes = np.zeros((max_windows, 4), np.float32)
    valid = np.zeros((max_windows, 2), np.int16)
    targets = np.zeros((max_windows, SIDE, SIDE), np.uint8)
    kinds: list[str] = []
    if done:
        old = np.load(meta_path)
        boxes[:done], valid[:done], targets[:done] = old["boxes"], old["valid"], old["targets"]
        kinds = list(old["kinds"])

    def save(n: int) -> None:
        feats.flush()
        tmp = work / "meta.tmp.npz"
        np.savez(tmp, boxes=boxes[:n], valid=valid[:n], targets=targets[:n], kinds=np.array(kinds[:n]), n=n)
        tmp.replace(meta_path)

    model = load_model("cellseg", device="cpu")
    rng = np.random.default_rng(seed)
    n = last_saved = 0
    t0 = time.time()
    for src, key, ncell in training_images(seed):
        image, labels = datasets.usiigaci_pair(key) if src == "u" else datasets.dsb_pair(key)
        kind = "phase" if src == "u" else ("colour" if image.ndim == 3 else "grey")
        seg = InteractiveSegmenter(model, config=AnnotationConfig(views=1))
        seg.set_image(image)
        codes = seg.view_codes()  # as is, and inverted on grey images
        for i, _, box in sample_cells(labels, ncell, rng):
            w = seg.window_for(ObjectPrompt(box=box))
            ref = (labels[w.slices] == i).astype(np.float32)
            for v in codes:
                if n >= max_windows:
                    break
                if n >= done:
                    e = seg.embedding(w, v)
                    tr = e.transform
                    rows, cols = tr.resized_shape
                    local = np.asarray(box, float) - [w.r0, w.c0, w.r0, w.c0]
                    m = view_image(ref[..., None], v)[..., 0] if v & 7 else ref
                    targets[n] = 0
                    targets[n, :rows, :cols] = resize(m, (rows, cols), order=1, anti_aliasing=False) > 0.5
                    feats[n] = e.features[0].float().numpy().astype(np.float16)
                    boxes[n] = tr.box_rc_to_model_xyxy(local[None])[0]
                    valid[n] = (rows, cols)
                    kinds.append(kind)
                n += 1
            seg.cache.clear()
        if n > done and n - last_saved >= 200:
            save(n)
            last_saved = n
            print(f"embedded {n} / {max_windows} windows ({time.time() - t0:.0f} s)", flush=True)
        if n >= max_windows:
            break
    save(n)
    return n


def _jittered(box: np.ndarray, rows: int, cols: int, copies: int, rng) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    out = []
    for k in range(copies):
        if k == 0 and rng.random() < 0.5:
            out.append(box.copy())
            continue
        d = rng.uniform(*JITTER, 4) * np.array([w, h, w, h]) * np.array([-1, -1, 1, 1])
        j = box + d
        j[[0, 2]] = j[[0, 2]].clip(0, cols)
        j[[1, 3]] = j[[1, 3]].clip(0, rows)
        out.append(j)
    return np.stack(out)


def click_point(target: np.ndarray, rng, top: float = 0.2) -> tuple[float, float] | None:
    """A click on the cell ``target`` (bool, model pixels): a random pixel among the ``top`` fraction of its
    distance transform (CellSeg1's rule, :func:`napari_cellseg.core.finetune.top_fraction_points`, as the
    prompt recipe samples them), as model (x, y) at the pixel centre; None for an empty target."""
    from napari_cellseg.core.finetune import top_fraction_points

    pts = top_fraction_points(target, top)
    if not len(pts):
        return None
    r, c = pts[int(rng.integers(len(pts)))]
    return float(c) + 0.5, float(r) + 0.5


def _grown_box(box: np.ndarray, rows: int, cols: int, rng) -> np.ndarray:
    """``box`` (model xyxy) with each side pushed out by 0-60 % of the box size, clipped to the window: the
    oversized box a cell map that merged the cell with its neighbours gives a click."""
    w, h = box[2] - box[0], box[3] - box[1]
    j = box + rng.uniform(0.0, GROWN_MAX, 4) * np.array([w, h, w, h]) * np.array([-1, -1, 1, 1])
    j[[0, 2]] = j[[0, 2]].clip(0, cols)
    j[[1, 3]] = j[[1, 3]].clip(0, rows)
    return j


def prompt_batch(box: np.ndarray, target: np.ndarray, rows: int, cols: int, copies: int, clicks: float, rng):
    """``copies`` prompts of one cached window: boxes (jittered) and, a ``clicks`` fraction of them, a click's
    prompt (a jittered or grown box with a positive point from :func:`click_point`). Returns boxes (copies, 4)
    and points (copies, 1, 2) with labels (copies, 1) (-1: no point, ignored by SAM), all model coordinates."""
    boxes = _jittered(box, rows, cols, copies, rng)
    points = np.zeros((copies, 1, 2))
    labels = -np.ones((copies, 1))
    for k in range(copies):
        if rng.random() < clicks and (pt := click_point(target, rng)) is not None:
            points[k, 0], labels[k, 0] = pt, 1
            if rng.random() < 0.5:
                boxes[k] = _grown_box(box, rows, cols, rng)
    return boxes, points, labels


def train_decoder(work: Path, minutes: float, lr: float, seed: int = 0, batch: int = 8, copies: int = 2,
                  checkpoint_minutes: float = 2.0, clicks: float = 0.0, init: dict | None = None) -> dict:
    """Train a copy of LiteMedSAM's mask decoder on the cached windows; resumable from ``work/train.pt``.

    ``clicks``: the fraction of prompts that are a click's (box and point, :func:`prompt_batch`); ``init``: a
    decoder state to start from (a packaged box head) instead of LiteMedSAM's decoder."""
    import copy

    import torch
    import torch.nn.functional as F

    from napari_cellseg.core.models import load_model

    torch.manual_seed(seed)
    meta = np.load(work / "meta.npz")
    n = int(meta["n"])
    feats = np.load(work / "feats.npy", mmap_mode="r")
    boxes, valid, targets = meta["boxes"], meta["valid"], meta["targets"]
    sam = load_model("litemedsam", device="cpu").sam
    decoder = copy.deepcopy(sam.mask_decoder).float().train()
    if init is not None:
        decoder.load_state_dict({k: v.float() for k, v in init.items()})
    for p in decoder.parameters():
        p.requires_grad_(True)
    pe = sam.prompt_encoder.get_dense_pe().detach()
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.01)
    ckpt = work / "train.pt"
    step, elapsed, history = 0, 0.0, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = int(state["step"]), float(state["elapsed"]), list(state["history"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} of {minutes} minutes)", flush=True)
    budget = minutes * 60.0
    start = time.time() - elapsed
    last_save = time.time()

    def save() -> None:
        torch.save({"decoder": decoder.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "elapsed": time.time() - start, "history": history}, work / "train.tmp.pt")
        (work / "train.tmp.pt").replace(ckpt)

    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        factor = min(1.0, progress / 0.05) * 0.5 * (1.0 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * factor
        rng = np.random.default_rng(seed * 1_000_003 + step)
        opt.zero_grad()
        total = 0.0
        for i in rng.choice(n, batch, replace=False):
            rows, cols = int(valid[i, 0]), int(valid[i, 1])
            target = targets[i][:rows, :cols] > 0
            bx, pts, lab = prompt_batch(boxes[i].astype(np.float64), target, rows, cols, copies, clicks, rng)
            bx = torch.as_tensor(bx, dtype=torch.float32)
            points = None
            if (lab > 0).any():
                points = (torch.as_tensor(pts, dtype=torch.float32), torch.as_tensor(lab, dtype=torch.int64))
            with torch.no_grad():
                sparse, dense = sam.prompt_encoder(points=points, boxes=bx, masks=None)
            feat = torch.from_numpy(np.asarray(feats[i], np.float32))[None]
            low, iou = decoder(image_embeddings=feat, image_pe=pe, sparse_prompt_embeddings=sparse,
                               dense_prompt_embeddings=dense, multimask_output=False)
            logits = F.interpolate(low, (SIDE, SIDE), mode="bilinear", align_corners=False)[:, 0, :rows, :cols]
            t = torch.from_numpy(targets[i][:rows, :cols].astype(np.float32))[None].expand_as(logits)
            prob = torch.sigmoid(logits)
            dice = 1 - (2 * (prob * t).sum((1, 2)) + 1) / (prob.sum((1, 2)) + t.sum((1, 2)) + 1)
            with torch.no_grad():
                m = logits > 0
                real = (m & (t > 0)).sum((1, 2)).float() / ((m | (t > 0)).sum((1, 2)).float() + 1e-6)
            loss = F.binary_cross_entropy_with_logits(logits, t) + dice.mean() + F.mse_loss(iou[:, 0], real)
            (loss / batch).backward()
            total += float(loss.detach()) / batch
            history.append(float(real.mean()))
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} ({time.time() - start:.0f} s): loss {total:.3f}, training IoU at logit 0 "
                  f"(last 400 boxes) {np.mean(history[-400:]):.3f}", flush=True)
        if time.time() - last_save > checkpoint_minutes * 60:
            save()
            last_save = time.time()
    save()
    print(f"trained {step} steps ({n} windows)", flush=True)
    return {"decoder": {k: v.detach().clone() for k, v in decoder.state_dict().items()}, "steps": step,
            "windows": n, "seconds": round(time.time() - start, 1),
            "final_training_iou": round(float(np.mean(history[-400:])), 4) if history else None}


def box_head_state(path: Path) -> dict:
    """The box decoder's tensors (float32) in a packaged model's safetensors file."""
    from safetensors.torch import load_file

    tag = ".full.box_decoder."
    state = {k.split(tag, 1)[1]: v.float() for k, v in load_file(str(path)).items() if tag in k}
    if not state:
        raise SystemExit(f"{path} holds no box head (no '*{tag}*' tensors)")
    return state


def init_record(path: Path) -> dict | None:
    """The box head training record (``meta["box_head"]``) of the packaged model ``path`` training started from."""
    js = Path(path).with_suffix(".json")
    return json.loads(js.read_text()).get("box_head") if js.exists() else None


def with_box_decoder(model, state: dict):
    """The loaded packaged model with ``state`` as its box decoder (in place; returns the model)."""
    from napari_cellseg.core.box_head import attach_box_decoder

    decoder = attach_box_decoder(model.sam)
    decoder.load_state_dict({k: v.to(next(decoder.parameters()).dtype) for k, v in state.items()})
    decoder.eval()
    return model


def _iou(obj, ref: np.ndarray) -> float:
    m = obj.to_full(ref.shape)
    union = np.logical_or(m, ref).sum()
    return float(np.logical_and(m, ref).sum() / union) if union else 0.0


def _best(scores: dict[float, dict[str, list[float]]], what: str) -> tuple[float, dict]:
    """The threshold with the best mean IoU over the image kinds (so the many fluorescence images do not decide
    alone), and the table of mean IoUs per threshold and kind."""
    table = {t: {k: round(float(np.mean(v)), 4) for k, v in d.items()} for t, d in scores.items()}
    for t in table:
        table[t]["mean_over_kinds"] = round(float(np.mean([v for v in table[t].values()])), 4)
    best = max(table, key=lambda t: table[t]["mean_over_kinds"])
    for t in table:
        print(f"{what} mask threshold {t:+.1f}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[t].items()),
              flush=True)
    return best, {str(t): v for t, v in table.items()}


def choose_thresholds(state: dict, cells: int = 10) -> tuple[float, dict, float, dict]:
    """Mean IoU on the selection images of one box per cell at each of :data:`THRESHOLDS` and of one click per
    cell at each of :data:`CLICK_THRESHOLDS` (the annotation mode's clicks: the map cell's box with the click,
    the benchmark's clicks at the cell's innermost pixel); the best box threshold and its table, the best click
    threshold and its table."""
    from bench_default_model import load, sample_cells, selection_images

    from napari_cellseg.core.interactive import (
        AnnotationConfig,
        InteractiveSegmenter,
        ObjectPrompt,
    )
    from napari_cellseg.core.models import load_model

    model = with_box_decoder(load_model("cellseg", device="cpu").with_precision(None), state)
    boxes: dict[float, dict[str, list[float]]] = {t: {} for t in THRESHOLDS}
    clicks: dict[float, dict[str, list[float]]] = {t: {} for t in CLICK_THRESHOLDS}
    for item in selection_images():
        image, labels = load(item)
        picked = sample_cells(labels, cells, np.random.default_rng(0))
        seg = InteractiveSegmenter(model, config=AnnotationConfig())
        seg.set_image(image)
        guided = seg.guide_clicks([ObjectPrompt(points=[pt]) for _, pt, _ in picked])
        for table, thresholds, prompts in ((boxes, THRESHOLDS, [ObjectPrompt(box=box) for _, _, box in picked]),
                                           (clicks, CLICK_THRESHOLDS, guided)):
            for t in thresholds:
                seg.config.mask_threshold = t
                for (i, _, _), obj in zip(picked, seg.segment_many(prompts)):
                    table[t].setdefault(item["kind"], []).append(_iou(obj, labels == i))
    box_best, box_table = _best(boxes, "box")
    click_best, click_table = _best(clicks, "click")
    return box_best, box_table, click_best, click_table


def rechoose_thresholds(out: Path, name: str = "cellseg") -> None:
    """Choose the box and click thresholds of the packaged model in ``out`` again and write them into its JSON
    (the tensors, and so the sha256, are unchanged)."""
    from train_default_model import _write_meta

    path = out / f"{name}.safetensors"
    box_best, box_table, click_best, click_table = choose_thresholds(box_head_state(path))
    js = path.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta["box_mask_threshold"], meta["click_mask_threshold"] = float(box_best), float(click_best)
    meta.setdefault("box_head", {})["selection_box_iou"] = box_table
    meta["box_head"]["selection_click_iou"] = click_table
    _write_meta(js, meta)
    print(f"box mask threshold {box_best:+.1f}, click mask threshold {click_best:+.1f}; written to {js}",
          flush=True)


def package(out: Path, state: dict, threshold: float, record: dict, name: str = "cellseg",
            click_threshold: float | None = None) -> str:
    """Add the box decoder (float16) to the packaged adapter in ``out``; return its new sha256."""
    from safetensors.torch import load_file
    from train_default_model import write_package

    path = out / f"{name}.safetensors"
    js = path.with_suffix(".json")
    tensors = {k: v for k, v in load_file(str(path)).items() if ".full.box_decoder." not in k}
    stage = sorted({k.split(".", 1)[0] for k in tensors})[-1]
    for k, v in state.items():
        tensors[f"{stage}.full.box_decoder.{k}"] = v.half().contiguous() if v.is_floating_point() else v
    meta = json.loads(js.read_text())
    meta["box_mask_threshold"] = float(threshold)
    meta["click_mask_threshold"] = None if click_threshold is None else float(click_threshold)
    meta["prompt_pathway"] = ("base for points and the grid; boxes: the model's own box decoder (box_decoder, "
                              "trained by training/train_box_head.py)")
    meta["box_head"] = record
    meta.setdefault("metrics", {})["packaged_parameters"] = int(sum(v.numel() for v in tensors.values()))
    return write_package(path, tensors, meta, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="box-train", help="folder for the cached windows and the checkpoint")
    p.add_argument("--windows", type=int, default=3200, help="windows (cells x contrasts) to embed")
    p.add_argument("--minutes", type=float, default=20.0, help="training time (embedding not included)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(datasets.REPO / "src" / "napari_cellseg" / "models"),
                   help="folder of the packaged model the box decoder is added to")
    p.add_argument("--clicks", type=float, default=0.0,
                   help="fraction of prompts that are a click's: a box (jittered, or grown as a cell map that "
                        "merged neighbours gives it) with a positive point from the cell's inner 20 %%")
    p.add_argument("--init-from", default=None,
                   help="a packaged model (.safetensors) whose box head training starts from (default: "
                        "LiteMedSAM's decoder)")
    p.add_argument("--thresholds-only", action="store_true",
                   help="only choose the box and click mask thresholds of the packaged model in --out again, on "
                        "the selection images, and write them into its JSON (the tensors stay)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    datasets.require_data()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.thresholds_only:
        rechoose_thresholds(Path(args.out))
        return 0
    work = Path(args.work)
    t0 = time.time()
    n = embed_windows(work, args.windows)
    embed_s = time.time() - t0
    print(f"{n} windows embedded ({embed_s / 60:.1f} minutes)", flush=True)
    init = box_head_state(Path(args.init_from)) if args.init_from else None
    trained = train_decoder(work, args.minutes, args.lr, args.seed, clicks=args.clicks, init=init)
    threshold, table, click_threshold, click_table = choose_thresholds(trained["decoder"])
    record = {"windows": n, "steps": trained["steps"], "training_seconds": trained["seconds"], "lr": args.lr,
              "jitter": list(JITTER), "clicks": args.clicks, "grown_max": GROWN_MAX if args.clicks else None,
              "init_from": Path(args.init_from).name if args.init_from else "litemedsam",
              "cells_per_image": CELLS_PER_IMAGE, "final_training_iou": trained["final_training_iou"],
              "selection_box_iou": table, "selection_click_iou": click_table,
              "init_record": init_record(Path(args.init_from)) if args.init_from else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sha = package(Path(args.out), trained["decoder"], threshold, record, click_threshold=click_threshold)
    print(f"box mask threshold {threshold:+.1f}, click mask threshold {click_threshold:+.1f}; packaged in "
          f"{args.out}; sha256 {sha}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
