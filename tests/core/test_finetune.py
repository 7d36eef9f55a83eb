"""Fine-tuning core: data checks, prompts, LoRA placement, training, adapters (tiny random models)."""

from __future__ import annotations

import json

import time

import numpy as np
import pytest
import torch

from napari_cellseg.core import finetune as ft
from napari_cellseg.core import models
from napari_cellseg.core.progress import run_to_completion


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""


def _cells(shape=(96, 96), n=8, seed=0):
    from conftest import make_cells

    return make_cells(shape=shape, n=n, radius=(6, 11), seed=seed)


def _checkpoint(tmp_path, arch: str, seed: int = 0):
    """A tiny random model saved as a checkpoint file, so adapters of it can be reloaded by path."""
    path = tmp_path / f"{arch}-{seed}.pth"
    torch.save(models.random_model(arch, seed=seed).sam.state_dict(), path)
    return str(path)


def _state(sam) -> dict:
    return {k: v.detach().clone() for k, v in sam.state_dict().items()}


# --------------------------------------------------------------------------- configuration


def test_config_round_trips_and_resolves():
    cfg = ft.FinetuneConfig(recipe="distance", minutes=3, prompt_types=("box",), crop_scale=(0.9, 1.1))
    assert ft.FinetuneConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["prompt_types"] == ["box"]
    prompt = ft.FinetuneConfig().resolved(256)
    assert (prompt.decoder, prompt.lr, prompt.warmup, prompt.schedule) == ("lora", 3e-3, 0.3, "onecycle")
    dist = ft.FinetuneConfig(recipe="distance").resolved(256)
    assert (dist.decoder, dist.lr, dist.weight_decay, dist.crop_size, dist.clahe, dist.invert) == (
        "full", 4e-4, 0.1, 256, True, True)
    assert dist.thresholds == {"peak": 0.47, "fill": 0.09}


@pytest.mark.parametrize("kwargs, match", [
    ({"recipe": "unet"}, "unknown recipe"),
    ({"minutes": None, "epochs": None}, "time budget"),
    ({"prompt_types": ("scribble",)}, "prompt_types"),
    ({"minutes": -1}, "positive"),
    ({"decoder": "half"}, "decoder"),
    ({"encoder_precision": "float16"}, "encoder_precision"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ft.FinetuneConfig(**kwargs)


def test_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="unknown fine-tuning settings.*learning_rate"):
        ft.FinetuneConfig.from_dict({"learning_rate": 1})


def test_lr_schedules():
    # one-cycle: 1/25 of the peak at the start, the peak at the end of warm-up, ~0 at the end
    assert ft.lr_factor(0.0, "onecycle", 0.3) == pytest.approx(0.04)
    assert ft.lr_factor(0.3, "onecycle", 0.3) == pytest.approx(1.0)
    assert ft.lr_factor(1.0, "onecycle", 0.3) < 1e-5
    assert ft.lr_factor(0.05, "warmup_linear", 0.1) == pytest.approx(0.5)
    assert ft.lr_factor(1.0, "warmup_linear", 0.1) == 0.0


# --------------------------------------------------------------------------- training data


def test_training_data_summary_and_region():
    image, labels = _cells()
    data = ft.make_training_data(image, labels, roi="extent")
    pair = data.pairs[0]
    assert data.n_cells == len(np.unique(labels)) - 1
    rows, cols = np.nonzero(labels)
    assert pair.known[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert pair.known.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    rect = ft.make_training_data(image, labels, roi=(0, 0, 40, 50)).pairs[0]
    assert rect.known[:40, :50].all()
    # labelled pixels outside the rectangle stay known (they are annotated)
    assert (rect.known[labels > 0]).all()
    assert not rect.known[(labels == 0) & (np.arange(96)[:, None] >= 40)].any()


def test_training_data_stack_skips_unlabelled_planes():
    image, labels = _cells()
    stack = np.stack([image, image, image])
    lab = np.stack([labels, np.zeros_like(labels), labels])
    data = ft.make_training_data(stack, lab)
    assert len(data) == 2 and data.summary["skipped_empty_planes"] == 1


def test_training_data_excluded_region_is_left_out():
    image, labels = _cells()
    held = np.zeros_like(labels)
    held[:48] = labels[:48]
    data = ft.make_training_data(image, labels, exclude=held)
    pair = data.pairs[0]
    rows, cols = np.nonzero(held)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    assert not pair.known[box].any() and not pair.labels[box].any()
    assert pair.known.sum() == held.size - held[box].size


def test_huge_planes_are_tiled(monkeypatch):
    monkeypatch.setattr(ft, "MAX_PLANE_PIXELS", 64 * 64)
    monkeypatch.setattr(ft, "HUGE_TILE", 64)
    monkeypatch.setattr(ft, "HUGE_OVERLAP", 16)
    image, labels = _cells((128, 128), n=12)
    data = ft.make_training_data(image, labels)
    assert data.summary["tiled_planes"] == 1
    assert len(data) > 1 and all(p.shape[0] <= 64 and p.shape[1] <= 64 for p in data.pairs)


def test_labels_that_are_not_one_region_per_cell_are_refused():
    """Every cell painted with label 1 (napari's commonest slip), or the image passed as labels: a clear message,
    not a model trained on nonsense; real instance labels with a stray pixel or a split stroke still pass."""
    from skimage.draw import disk

    image = np.random.default_rng(0).random((96, 96))
    cells = np.zeros((96, 96), np.int32)
    for k, (r, c) in enumerate([(15, 15), (15, 50), (50, 30), (75, 75), (80, 20), (45, 80)], start=1):
        cells[disk((r, c), 8, shape=cells.shape)] = k
    mask = (cells > 0).astype(np.uint8)
    with pytest.raises(ValueError, match="all 6 painted regions share the label 1.*press M"):
        ft.make_training_data(image, mask)
    noise = (np.random.default_rng(1).random((96, 96)) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="not look like an instance label image.*labels lie in"):
        ft.make_training_data(image, noise)
    two_classes = np.where(cells > 3, 2, mask).astype(np.uint8)
    with pytest.raises(ValueError, match="its 2 labels lie in 6 separate pieces"):
        ft.make_training_data(image, two_classes)
    ok = cells.copy()
    ok[0, 95] = 1  # a stray pixel of cell 1
    ok[50, 22:39] = 0  # cell 3 cut in two by an eraser stroke
    assert ft.make_training_data(image, ok).n_cells == 6
    # a stack: the message names the plane
    with pytest.raises(ValueError, match="plane 1: all 6"):
        ft.make_training_data(np.stack([image, image]), np.stack([cells, mask.astype(np.int32)]))


@pytest.mark.parametrize("labels, error, match", [
    (np.zeros((32, 32), np.uint16), ValueError, "no cells"),
    ("single", ValueError, "only 1 cell.*at least 2"),
    ("float", TypeError, "float labels"),
    ("bool", TypeError, "boolean mask"),
    ("negative", ValueError, "negative"),
])
def test_bad_labels_give_clear_messages(labels, error, match):
    image = np.random.default_rng(0).random((32, 32))
    if isinstance(labels, str):
        lab = np.zeros((32, 32), np.int32)
        lab[5:12, 5:12] = 1
        if labels == "float":
            lab = lab * 0.5
        elif labels == "bool":
            lab = lab > 0
        elif labels == "negative":
            lab[20:25, 20:25] = -3
        labels = lab
    with pytest.raises(error, match=match):
        ft.make_training_data(image, labels)


def test_size_mismatch_and_pair_counts():
    image, labels = _cells()
    with pytest.raises(ValueError, match="differ in size"):
        ft.make_training_data(image[:90], labels)
    with pytest.raises(ValueError, match="2 images but 1 label"):
        ft.make_training_data([image, image], [labels])
    with pytest.raises(ValueError, match="stack"):
        ft.make_training_data(np.stack([image] * 2), np.stack([labels] * 3))


def test_whole_number_float_labels_are_accepted():
    image, labels = _cells()
    data = ft.make_training_data(image, labels.astype(np.float32))
    assert data.pairs[0].labels.dtype == np.int32


# --------------------------------------------------------------------------- targets and prompts


def test_distance_target_is_each_cells_distance_over_its_max():
    from scipy import ndimage as ndi

    _, labels = _cells()
    target = ft.normalized_distance_map(labels)
    for idx in range(1, labels.max() + 1):
        cell = labels == idx
        assert target[cell].max() == pytest.approx(1.0)
        dist = ndi.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
        inner = np.unravel_index(np.argmax(dist), dist.shape)
        assert target[inner] == pytest.approx(1.0)
    assert (target[labels == 0] == 0).all()


def test_points_come_from_the_top_20_percent_of_the_distance_transform():
    from scipy import ndimage as ndi
    from skimage.draw import ellipse

    mask = np.zeros((60, 80), bool)
    mask[ellipse(30, 40, 20, 32)] = True
    pts = ft.top_fraction_points(mask, 0.2)
    dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    cut = np.quantile(dist[mask], 0.8)
    assert (dist[pts[:, 0], pts[:, 1]] >= cut).all()
    assert 0.15 <= len(pts) / mask.sum() <= 0.3
    # every candidate of a view lies in the top 20 % of its own cell, and negatives in the background's
    _, labels = _cells()
    known = np.ones_like(labels, bool)
    known[:, :20] = False
    cand = ft._prompt_candidates(labels, known, 0.2)
    for idx, cell_pts, box in cand["cells"]:
        cell = labels == idx
        d = ndi.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
        assert (d[cell_pts[:, 0], cell_pts[:, 1]] >= np.quantile(d[cell], 0.8)).all()
        rows, cols = np.nonzero(cell)
        assert box == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    bg = cand["background"]
    assert len(bg) and (labels[bg[:, 0], bg[:, 1]] == 0).all() and known[bg[:, 0], bg[:, 1]].all()
    bgd = ndi.distance_transform_edt((labels == 0) & known)
    assert (bgd[bg[:, 0], bg[:, 1]] >= np.quantile(bgd[(labels == 0) & known], 0.8)).all()


def test_step_samples_at_most_30_cells_and_15_negatives():
    image, labels = _cells((96, 96), n=40, seed=3)
    lab = np.zeros((200, 200), np.int32)
    k = 0
    for r in range(0, 200, 12):  # a crowded view: 256 small squares, far more than 30 cells
        for c in range(0, 200, 12):
            k += 1
            lab[r + 2:r + 9, c + 2:c + 9] = k
    known = np.ones_like(lab, bool)
    known[:, 150:] = True
    entry = ft._prompt_candidates(lab, known, 0.2, min_area=4)
    trainer = ft.Finetuner(models.random_model("vit_test"), ft.make_training_data(image, labels),
                           ft.FinetuneConfig(epochs=1, minutes=None, max_cells=30, max_negatives=15))
    trainer._setup()
    seen = []
    trainer._prompt_chunk_loss = lambda feats, kind, coords, ids, lt, kt: seen.append((kind, ids)) or \
        torch.zeros((), requires_grad=True)
    entry.update(labels=lab, known=known, features=np.zeros((32, 4, 4), np.float16))
    trainer._prompt_loss(entry, np.random.default_rng(0))
    ids = np.concatenate([i for _, i in seen])
    assert (ids > 0).sum() == 30 and (ids == 0).sum() == 15
    assert len(set(ids[ids > 0])) == 30


# --------------------------------------------------------------------------- LoRA placement


def _expected_lora_counts(sam, rank: int) -> tuple[int, int]:
    from segment_anything.modeling.image_encoder import Attention

    from napari_cellseg.core.tinyvit import WindowAttention

    enc = 0
    for m in sam.image_encoder.modules():
        if isinstance(m, (Attention, WindowAttention)):
            dim = m.qkv.in_features
            enc += 2 * (rank * dim + (m.qkv.out_features // 3) * rank)  # q and v: A (r, dim), B (dim, r)
    dec = 0
    for name, m in sam.mask_decoder.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            dec += rank * (m.in_features + m.out_features)
    return enc, dec


@pytest.mark.parametrize("arch", ["vit_test", "tinyvit_test"])
def test_lora_counts_and_touches_only_q_and_v(arch, tmp_path):
    base = models.load_model(_checkpoint(tmp_path, arch), device="cpu")
    before = _state(base.sam)
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(epochs=2, minutes=None, views=2, encoder_lora=True, train_point_embeddings=False,
                            lr=3e-2, encoder_tail="none", multimask="off")
    trainer = ft.Finetuner(base, data, cfg)
    result = run_to_completion(trainer.run())
    enc, dec = _expected_lora_counts(base.sam, 4)
    assert trainer.n_trainable() == enc + dec
    assert result.meta["metrics"]["trainable_parameters"] == enc + dec
    after = result.model.sam.state_dict()
    qkv = ft.fused_qkv_layers(base.sam)
    assert qkv
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for path, (_, q_rows, v_rows) in qkv.items():
        w0, w1 = before[f"{path}.weight"], after[f"{path}.weight"]
        k_rows = np.setdiff1d(np.arange(w0.shape[0]), np.concatenate([q_rows, v_rows]))
        assert len(k_rows) == len(q_rows) == len(v_rows)
        assert torch.equal(w0[k_rows], w1[k_rows]), f"k rows of {path} changed"
        assert not torch.equal(w0[q_rows], w1[q_rows]) and not torch.equal(w0[v_rows], w1[v_rows])
        assert torch.equal(before[f"{path}.bias"], after[f"{path}.bias"])
    allowed = {f"{p}.weight" for p in qkv} | {f"{p}.weight" for p in ft.decoder_lora_targets(base.sam)}
    assert changed <= allowed
    assert any(k.startswith("mask_decoder.") for k in changed)
    assert not any(k.endswith(("k_proj.weight", "out_proj.weight")) for k in changed)


def test_point_embeddings_are_counted_when_trained():
    image, labels = _cells()
    base = models.random_model("vit_test")
    t = ft.Finetuner(base, ft.make_training_data(image, labels), ft.FinetuneConfig(epochs=1, minutes=None))
    t._setup()
    _, dec = _expected_lora_counts(base.sam, 4)
    dim = base.sam.prompt_encoder.embed_dim
    neck = sum(p.numel() for p in base.sam.image_encoder.neck.parameters())
    assert t.n_trainable() == dec + 5 * dim + neck  # 4 point/corner embeddings + "not a point", the neck


# --------------------------------------------------------------------------- training


def _probe_loss(trainer, entry, recipe):
    trainer.optimizer.zero_grad(set_to_none=True)
    if recipe == "distance":
        loss = trainer._distance_loss([entry])
    else:
        loss = trainer._prompt_loss(entry, np.random.default_rng(123))
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss


@pytest.mark.parametrize("recipe, arch, lr", [("prompt", "vit_test", 3e-2), ("distance", "tinyvit_test", 2e-3)])
def test_tiny_model_trains_with_falling_loss(recipe, arch, lr):
    image, labels = _cells()
    base = models.random_model(arch)
    before = _state(base.sam)
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe=recipe, epochs=40, minutes=None, views=1, augment=False, lr=lr, amp=False,
                            max_negatives=4)
    trainer = ft.Finetuner(base, data, cfg)
    records = []
    result = run_to_completion(trainer.run(), records.append)
    losses = [r.data["loss"] for r in records if r.data and r.data.get("loss") is not None]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    # the same prompts before and after: the trained weights lower the loss
    entry = trainer._view_entry(data, ft.ViewSpec(0, (48.0, 48.0), 64.0), trainer.distances, True)
    untrained, trained = probe_with(trainer, entry, recipe, base)
    assert trained < 0.9 * untrained, (untrained, trained)
    # the base model is never modified
    assert all(torch.equal(v, base.sam.state_dict()[k]) for k, v in before.items())
    assert result.meta["output"] == ("distance" if recipe == "distance" else "mask")
    # the training cells' sizes, for the automatic zoom of images taken at another magnification
    sizes = result.meta["cell_diameters"]
    assert sizes == data.summary["cell_diameters"] and sizes["all"]["cells"] == data.n_cells


def probe_with(trainer, entry, recipe, base):
    """Loss of the same prompts with the untrained and the trained weights (same trainer graph)."""
    trained = _probe_loss(trainer, entry, recipe)
    params = dict(trainer._sam.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for n, p in params.items():
            if not p.requires_grad:
                continue
            if ".lora_B." in n or n.endswith(("q_B", "v_B")):
                p.zero_()
            elif ".lora_A." in n or n.endswith(("q_A", "v_A")):
                continue
            elif n.startswith("distance_refiner."):
                if n.startswith("distance_refiner.out."):
                    p.zero_()  # the refiner starts as the identity
            elif n.startswith("distance_decoder."):
                p.copy_(base.sam.state_dict()["mask_decoder." + n[len("distance_decoder."):]])
            else:
                p.copy_(base.sam.state_dict()[ft._clean_name(n)])
    untrained = _probe_loss(trainer, entry, recipe)
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v)
    return untrained, trained


def test_time_budget_stops_training():
    image, labels = _cells()
    cfg = ft.FinetuneConfig(recipe="distance", minutes=0.05, views=2)
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), ft.make_training_data(image, labels), cfg))
    assert result.stopped == "finished"
    assert result.meta["metrics"]["steps"] > 0
    assert result.meta["metrics"]["seconds"] < 30


def test_time_budget_limits_the_views_embedded_for_large_data():
    # 1,024 tiles of 32 px: far more than fit in 35 % of a 1.2 s budget (a tiny model embeds a view in about 3 ms
    # here, so 0.42 s holds some 140; half the tiles would need 0.8 ms a view); the budget, not the tile count, rules
    image, labels = _cells(shape=(1024, 1024), n=120)
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe="distance", minutes=0.02, crop_size=32)
    n_tiles = len(ft._tiles(data.pairs[0], 32))
    t0 = time.monotonic()
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), data, cfg))
    assert n_tiles >= 1000
    assert ft.MIN_BUDGET_VIEWS <= result.meta["metrics"]["views"] < n_tiles / 2
    assert result.meta["metrics"]["steps"] > 0
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("recipe", ["distance", "prompt"])
def test_views_per_tile_are_capped_by_recipe(recipe):
    # one 96 px plane = one tile; a tiny model embeds a view in milliseconds, so only the per-tile cap stops it
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe=recipe, minutes=0.1, crop_size=96)
    assert len(ft._tiles(data.pairs[0], 96)) == 1
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), data, cfg))
    expected = ft.MAX_VIEWS_PER_TILE.get(recipe, ft.DEFAULT_MAX_VIEWS_PER_TILE)
    assert result.meta["metrics"]["views"] == expected == (64 if recipe == "distance" else 16)


def test_validation_ap_early_stopping_and_best_model():
    image, labels = _cells()
    vimage, vlabels = _cells(seed=5)
    cfg = ft.FinetuneConfig(recipe="distance", epochs=50, minutes=None, views=2, batch_size=2, eval_every=1,
                            patience=2, min_delta=0.5)
    trainer = ft.Finetuner(models.random_model("vit_test"), ft.make_training_data(image, labels), cfg,
                           ft.make_training_data(vimage, vlabels))
    seen = []
    result = run_to_completion(trainer.run(), seen.append)
    assert any(r.data and "val_ap" in r.data for r in seen)
    assert all("val_ap" in h and 0.0 <= h["val_ap"] <= 1.0 for h in result.history)
    # min_delta 0.5 means no evaluation counts as better: it stops after patience + 1 evaluations
    assert result.stopped == "early stopping"
    assert result.meta["metrics"]["steps"] == 3
    assert "best_val_ap" in result.meta["metrics"]
    # thresholds tuned on the held-out planes travel with the model
    assert result.meta["metrics"]["thresholds_tuned_on"] == "validation"
    th = result.meta["thresholds"]
    assert 0 < th["fill"] < th["peak"] < 1 and result.model.meta["thresholds"] == th


def test_saturated_default_prompt_is_rescaled_so_distance_training_starts(tmp_path):
    from napari_cellseg.core.predictor import default_prompt_logits

    sam = models.random_model("vit_test").sam
    layer = sam.mask_decoder.output_hypernetworks_mlps[0].layers[2]
    with torch.no_grad():
        layer.weight.mul_(500.0)
        layer.bias.mul_(500.0)
        logits = default_prompt_logits(sam, sam.image_encoder(torch.rand(1, 3, 64, 64)))
    assert float(logits.abs().mean()) > 20  # a flat sigmoid almost everywhere: MSE has no gradient
    path = tmp_path / "saturated.pth"
    torch.save(sam.state_dict(), path)
    base = models.load_model(str(path), device="cpu")
    image, labels = _cells()
    cfg = ft.FinetuneConfig(recipe="distance", epochs=30, minutes=None, views=1, augment=False, decoder="lora",
                            lr=1e-2, amp=False)
    trainer = ft.Finetuner(base, ft.make_training_data(image, labels), cfg)
    records = []
    result = run_to_completion(trainer.run(), records.append)
    assert trainer.output_scale is not None and trainer.output_scale < 0.5
    losses = [r.data["loss"] for r in records if r.data and r.data.get("loss") is not None]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    # the rescaled layer is part of the adapter even though the rest of the decoder is LoRA
    assert "s0.full.mask_decoder.output_hypernetworks_mlps.0.layers.2.weight" in result.tensors
    assert any(".lora." in k for k in result.tensors)


def test_prompt_validation_runs_clicks():
    image, labels = _cells()
    cfg = ft.FinetuneConfig(epochs=1, minutes=None, views=2, eval_every=2)
    data = ft.make_training_data(image, labels)
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), data, cfg, validation=data))
    assert "val_ap" in result.history[-1] and "val_ap75" in result.history[-1]


def test_out_of_memory_gives_a_message(monkeypatch):
    image, labels = _cells()

    def boom(self, *a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(ft.Finetuner, "_prompt_loss", boom)
    gen = ft.finetune(models.random_model("vit_test"), ft.make_training_data(image, labels),
                      ft.FinetuneConfig(epochs=1, minutes=None, views=1))
    with pytest.raises(ft.FinetuneMemoryError, match="ran out of memory.*fewer cached views"):
        run_to_completion(gen)


# --------------------------------------------------------------------------- adapters


def _decode_outputs(model):
    from napari_cellseg.core.predictor import Predictor, default_prompt_logits

    rng = np.random.default_rng(1)
    image = rng.random((70, 60))
    p = Predictor(model)
    p.set_image(image)
    _, scores, low = p.decode(points_rc=np.array([[[20, 30]], [[40, 10]]], float), multimask=True)
    _, bscores, blow = p.decode(boxes_rc=np.array([[5, 5, 30, 40]], float))
    with torch.no_grad():
        dist = default_prompt_logits(model.sam, p.embedding.features).numpy()
    from napari_cellseg.core.automatic import crop_distance_maps

    crop = np.repeat(rng.random((model.input_size, model.input_size, 1)).astype(np.float32), 3, axis=-1)
    refined = crop_distance_maps(model, [crop])[0]  # through the refiner when the model has one
    return scores, low, bscores, blow, dist, refined


@pytest.mark.parametrize("recipe, arch, encoder", [("prompt", "tinyvit_test", True), ("distance", "vit_test", False)])
def test_adapter_round_trip(recipe, arch, encoder, tmp_path):
    base = models.load_model(_checkpoint(tmp_path, arch), device="cpu")
    image, labels = _cells()
    cfg = ft.FinetuneConfig(recipe=recipe, epochs=2, minutes=None, views=2, encoder_lora=encoder, lr=1e-2)
    result = run_to_completion(ft.finetune(base, ft.make_training_data(image, labels), cfg))
    path = ft.save_adapter(result, "my-cells")
    assert path == models.cache_dir() / "adapters" / "my-cells.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["base"] == base.name and meta["recipe"] == recipe
    assert meta["output"] == ("distance" if recipe == "distance" else "mask")
    assert meta["data"]["cells"] == len(np.unique(labels)) - 1 and meta["config"]["recipe"] == recipe
    assert meta["sha256"] == models.file_hash(path) and meta["created"]
    # only what training changed is stored
    from safetensors.torch import load_file

    stored = load_file(str(path))
    n_stored = sum(v.numel() for v in stored.values())
    changed_at_most = sum(p.numel() for p in base.sam.mask_decoder.parameters()) + sum(
        p.numel() for p in base.sam.image_encoder.neck.parameters()) + 10 * 32 * 32 * 8
    assert n_stored <= changed_at_most
    entry = models.catalogue()["my-cells"]
    assert entry.source == "adapter" and entry.base == base.name
    assert entry.capabilities == (("distance",) if recipe == "distance" else ("prompt", "grid"))
    loaded = models.load_model("my-cells", device="cpu")
    assert loaded.meta["output"] == meta["output"]
    assert loaded.meta["cell_diameters"] == meta["cell_diameters"] == result.meta["cell_diameters"]
    if recipe == "distance":
        # SAMCell's thresholds, unsmoothed, unless the tuning found clearly better ones (it did not here)
        assert loaded.meta["thresholds"] == {"peak": 0.47, "fill": 0.09, "smooth": 0.0}
    for a, b in zip(_decode_outputs(result.model), _decode_outputs(loaded)):
        np.testing.assert_array_equal(a, b)
    # the base is not the adapter
    assert not np.array_equal(_decode_outputs(base)[1 if recipe == "prompt" else 4],
                              _decode_outputs(loaded)[1 if recipe == "prompt" else 4])


def test_continue_training_from_an_adapter(tmp_path):
    base = models.load_model(_checkpoint(tmp_path, "vit_test"), device="cpu")
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(epochs=1, minutes=None, views=2, lr=1e-2)
    ft.save_adapter(run_to_completion(ft.finetune(base, data, cfg)), "stage1")
    first = models.load_model("stage1", device="cpu")
    before = _state(first.sam)
    second = run_to_completion(ft.finetune(first, data, replace_cfg(cfg, recipe="distance")))
    assert all(torch.equal(v, first.sam.state_dict()[k]) for k, v in before.items())
    assert {k.split(".")[0] for k in second.tensors} == {"s0", "s1"}
    assert second.meta["base"] == base.name and len(second.meta["stages"]) == 2
    ft.save_adapter(second, "stage2")
    loaded = models.load_model("stage2", device="cpu")
    for a, b in zip(_decode_outputs(second.model), _decode_outputs(loaded)):
        np.testing.assert_array_equal(a, b)


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_cancelled_run_writes_no_adapter_and_stop_keeps_the_best():
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(epochs=1000, minutes=None, views=2)
    trainer = ft.Finetuner(models.random_model("vit_test"), data, cfg)
    gen = trainer.run()
    steps = 0
    for record in gen:
        if record.data and "loss" in record.data:
            steps += 1
            if steps == 3:
                break
    gen.close()  # what a napari worker's quit() amounts to
    assert not (models.cache_dir() / "adapters").exists()
    best = trainer.best_result()
    assert best is not None and best.stopped == "cancelled" and best.meta["metrics"]["steps"] == 3
    # stop(): the generator itself returns the best model so far
    trainer2 = ft.Finetuner(models.random_model("vit_test"), data, cfg)
    gen2 = trainer2.run()
    for record in gen2:
        if record.data and record.data.get("loss") is not None:
            trainer2.stop()
    assert trainer2.best_result().stopped == "cancelled"
    assert not (models.cache_dir() / "adapters").exists()


def test_interrupted_save_leaves_nothing(monkeypatch, tmp_path):
    image, labels = _cells()
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), ft.make_training_data(image, labels),
                                           ft.FinetuneConfig(epochs=1, minutes=None, views=1)))
    real_replace = ft.os.replace
    calls = []

    def crash(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # the user quits napari in the middle of the save
        return real_replace(src, dst)

    monkeypatch.setattr(ft.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ft.save_adapter(result, "half")
    folder = models.cache_dir() / "adapters"
    # the safetensors may have landed, but no JSON: the adapter is not listed and no temp file is left
    assert not (folder / "half.json").exists()
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    assert "half" not in models.catalogue()


def test_an_adapter_file_loads_by_its_path_and_never_stands_in_for_a_catalogue_model(tmp_path):
    """A colleague's adapter copied into any folder: ``--model path/to/it.safetensors`` (or its .json) loads it,
    under its path, even when the catalogue holds another adapter of the same file name."""
    import shutil

    base = models.load_model(_checkpoint(tmp_path, "vit_test"), device="cpu")
    image, labels = _cells()

    def train(lr):
        cfg = ft.FinetuneConfig(recipe="distance", epochs=2, minutes=None, views=2, lr=lr)
        return run_to_completion(ft.finetune(base, ft.make_training_data(image, labels), cfg))

    mine = ft.save_adapter(train(1e-2), "twin")
    elsewhere = tmp_path / "from-a-colleague"
    theirs = ft.save_adapter(train(3e-2), "twin", directory=elsewhere)
    assert theirs.parent == elsewhere
    models.clear_model_cache()
    by_path = models.load_model(str(theirs), device="cpu")
    assert by_path.name == str(theirs.resolve()) and by_path.entry.source == "adapter"
    assert by_path.meta["output"] == "distance"
    assert by_path.describe().startswith("twin.safetensors (vit_test")  # the status line names the file
    assert models.load_model(str(theirs.with_suffix(".json")), device="cpu").name == str(theirs.resolve())
    by_name = models.load_model("twin", device="cpu")
    assert by_name.meta["adapter_file"] == str(mine)
    a, b = _decode_outputs(by_path)[4], _decode_outputs(by_name)[4]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, _decode_outputs(ft.load_adapter(theirs, device="cpu"))[4])
    # a corrupt copy is refused by its checksum, as by name; a lone safetensors file is read as a checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (theirs, theirs.with_suffix(".json")):
        shutil.copy(f, broken / f.name)
    data = bytearray((broken / theirs.name).read_bytes())
    data[-5] ^= 0xFF
    (broken / theirs.name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        models.load_model(str(broken / theirs.name), device="cpu")
    (broken / "twin.json").unlink()
    with pytest.raises(ValueError, match="not a Segment Anything checkpoint"):
        models.load_model(str(broken / theirs.name), device="cpu")


def test_adapter_names_and_overwrite():
    image, labels = _cells()
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), ft.make_training_data(image, labels),
                                           ft.FinetuneConfig(epochs=1, minutes=None, views=1)))
    for bad in ("", "../evil", "a b", "litemedsam"):
        with pytest.raises(ValueError):
            ft.save_adapter(result, bad)
    ft.save_adapter(result, "twice")
    with pytest.raises(FileExistsError, match="exists"):
        ft.save_adapter(result, "twice")
    ft.save_adapter(result, "twice", overwrite=True)


def test_corrupt_adapter_is_refused(tmp_path):
    base = models.load_model(_checkpoint(tmp_path, "vit_test"), device="cpu")
    image, labels = _cells()
    result = run_to_completion(ft.finetune(base, ft.make_training_data(image, labels),
                                           ft.FinetuneConfig(epochs=1, minutes=None, views=1)))
    path = ft.save_adapter(result, "broken")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    models.clear_model_cache()
    with pytest.raises(ValueError, match="checksum"):
        models.load_model("broken", device="cpu")


# --------------------------------------------------------------------------- caches and resuming


def test_feature_cache_on_disk_is_reused(tmp_path, monkeypatch):
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe="distance", epochs=1, minutes=None, views=3, feature_cache=str(tmp_path / "f"))
    calls = []
    real = ft.Finetuner._encode

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(ft.Finetuner, "_encode", counting)
    run_to_completion(ft.finetune(models.random_model("vit_test"), data, cfg))
    assert len(calls) == 3 and len(list((tmp_path / "f").glob("*.npy"))) == 3
    run_to_completion(ft.finetune(models.random_model("vit_test"), data, cfg))
    assert len(calls) == 3


def test_views_are_embedded_in_the_base_models_precision(tmp_path, monkeypatch):
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cache = tmp_path / "f"
    dtypes = []
    real = ft.encoder_before_neck

    def spy(encoder, x):
        out = real(encoder, x)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(ft, "encoder_before_neck", spy)
    base = models.random_model("tinyvit_test", seed=3)
    cfg = ft.FinetuneConfig(recipe="distance", epochs=1, minutes=None, views=1, feature_cache=str(cache), seed=5)
    run_to_completion(ft.finetune(base, data, cfg))  # a float32 model (tests/conftest.py)
    assert dtypes == [torch.float32]
    (file32,) = cache.glob("*.npy")
    fast = base.with_precision("bfloat16")
    run_to_completion(ft.finetune(fast, data, cfg))  # the model's own precision: bfloat16 arithmetic
    assert dtypes == [torch.float32, torch.bfloat16]
    (file16,) = set(cache.glob("*.npy")) - {file32}  # kept apart in the cache
    # the same view: its bfloat16 embedding is close to the float32 one, not equal
    a, b = np.load(file32).astype(np.float32), np.load(file16).astype(np.float32)
    rel = np.abs(a - b).mean() / np.abs(a).mean()
    assert 1e-4 < rel < 0.05, rel
    # float32 asked for on the bfloat16 model: read back from the float32 file, nothing embedded
    run_to_completion(ft.finetune(fast, data, ft.FinetuneConfig(**{**cfg.to_dict(), "encoder_precision": "float32"})))
    assert len(dtypes) == 2 and len(list(cache.glob("*.npy"))) == 2


def test_resume_from_checkpoint(tmp_path):
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe="distance", epochs=6, minutes=None, views=2, batch_size=1,
                            checkpoint=str(tmp_path / "run.ckpt"), checkpoint_minutes=0.0)
    gen = ft.finetune(models.random_model("vit_test"), data, cfg)
    for record in gen:
        if record.step == 4 and record.data:
            break
    gen.close()
    assert (tmp_path / "run.ckpt").is_file()
    seen = []
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), data, cfg), seen.append)
    assert any("resumed" in r.message for r in seen)
    assert result.meta["metrics"]["steps"] == 12
    assert sum(1 for r in seen if r.data and "loss" in r.data) == 12 - 4
    with pytest.raises(ValueError, match="other settings"):
        run_to_completion(ft.finetune(models.random_model("vit_test"), data, replace_cfg(cfg, lr=0.5)))


def test_core_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, napari_cellseg.core.finetune, napari_cellseg.core.adapters; "
            "print(any(m in sys.modules for m in ('torch', 'peft', 'qtpy', 'napari')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("arch", ["vit_test", "tinyvit_test"])
def test_features_before_the_neck_plus_the_neck_equal_the_encoder(arch):
    sam = models.random_model(arch).sam
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(sam.image_encoder.neck(ft.encoder_before_neck(sam.image_encoder, x)).numpy(),
                                   sam.image_encoder(x).numpy(), rtol=1e-5, atol=1e-6)


def test_distance_recipe_trains_the_neck_from_cached_neck_inputs(tmp_path):
    base = models.load_model(_checkpoint(tmp_path, "tinyvit_test"), device="cpu")
    before = _state(base.sam)
    image, labels = _cells()
    cfg = ft.FinetuneConfig(recipe="distance", epochs=2, minutes=None, views=2, lr=1e-2)
    trainer = ft.Finetuner(base, ft.make_training_data(image, labels), cfg)
    result = run_to_completion(trainer.run())
    neck = sum(p.numel() for p in base.sam.image_encoder.neck.parameters())
    decoder = sum(p.numel() for p in base.sam.mask_decoder.parameters())
    refiner = sum(p.numel() for p in trainer._sam.distance_refiner.parameters())
    assert 30_000 < refiner < 150_000
    assert trainer.n_trainable() == neck + decoder + refiner
    after = result.model.sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("image_encoder.neck.") for k in changed)
    assert all(k.startswith(("image_encoder.neck.", "mask_decoder.")) for k in changed)
    assert any(k.startswith("distance_refiner.") for k in after) and not any(k.startswith("distance_refiner.")
                                                                             for k in before)
    # the cache holds the neck's input, and the loaded adapter reproduces the trained model
    assert trainer._cache_neck_input
    ft.save_adapter(result, "neck")
    for a, b in zip(_decode_outputs(result.model), _decode_outputs(models.load_model("neck", device="cpu"))):
        np.testing.assert_array_equal(a, b)


def test_tied_multimask_outputs_answer_like_the_single_output():
    from napari_cellseg.core.predictor import Predictor

    image, labels = _cells()
    result = run_to_completion(ft.finetune(models.random_model("vit_test"), ft.make_training_data(image, labels),
                                           ft.FinetuneConfig(epochs=1, minutes=None, views=1)))
    p = Predictor(result.model)
    p.set_image(image)
    pts = np.array([[[30, 30]], [[60, 20]]], float)
    _, s1, low1 = p.decode(points_rc=pts, multimask=False)
    _, s3, low3 = p.decode(points_rc=pts, multimask=True)
    for k in range(3):
        np.testing.assert_allclose(low3[:, k], low1[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s3[:, k], s1[:, 0], rtol=1e-5, atol=1e-6)
    assert "s0.full.mask_decoder.output_hypernetworks_mlps.3.layers.0.weight" in result.tensors


def test_joint_recipe_learns_distance_and_prompts_in_one_model():
    image, labels = _cells()
    base = models.random_model("tinyvit_test")
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe="joint", epochs=30, minutes=None, views=2, augment=False, lr=2e-3, amp=False,
                            max_negatives=4, batch_size=1)
    trainer = ft.Finetuner(base, data, cfg)
    records = []
    result = run_to_completion(trainer.run(), records.append)
    losses = [r.data["loss"] for r in records if r.data and r.data.get("loss") is not None]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    entry = trainer._view_entry(data, ft.ViewSpec(0, (48.0, 48.0), 64.0), trainer.distances, True)
    assert "target" in entry and "cells" in entry  # both losses have their data
    for recipe in ("distance", "prompt"):  # each half of the loss fell
        untrained, trained = probe_with(trainer, entry, recipe, base)
        assert trained < untrained, (recipe, untrained, trained)
    meta = result.meta
    assert meta["output"] == "distance" and set(meta["capabilities"]) == {"distance", "prompt", "grid"}
    assert meta["config"]["distance_weight"] == 5.0 and "thresholds" in meta
    # the point embeddings and the whole decoder are trained; multimask outputs are tied to the single one
    assert any(k.startswith("prompt_encoder.point_embeddings") for k in trainer.full_names)
    sam = result.model.sam
    assert torch.equal(sam.mask_decoder.mask_tokens.weight[0], sam.mask_decoder.mask_tokens.weight[1])
    # the distance map has its own decoder (and refiner), trained apart from the prompts' decoder
    assert sam.distance_decoder is not sam.mask_decoder and sam.distance_refiner is not None
    assert not torch.equal(sam.distance_decoder.output_upscaling[0].weight, sam.mask_decoder.output_upscaling[0].weight)
    assert not torch.equal(sam.distance_decoder.output_upscaling[0].weight,
                           base.sam.mask_decoder.output_upscaling[0].weight)


def test_joint_adapter_with_distance_head_round_trips(tmp_path):
    from napari_cellseg.core.automatic import crop_distance_maps
    from napari_cellseg.core.predictor import default_prompt_logits

    image, labels = _cells()
    base = models.load_model(_checkpoint(tmp_path, "tinyvit_test"), device="cpu")
    cfg = ft.FinetuneConfig(recipe="joint", epochs=3, minutes=None, views=2, lr=1e-2, amp=False, batch_size=1)
    result = run_to_completion(ft.finetune(base, ft.make_training_data(image, labels), cfg))
    names = {k.split(".full.", 1)[-1].split(".")[0] for k in result.tensors if ".full." in k}
    assert {"distance_decoder", "distance_refiner", "mask_decoder"} <= names
    ft.save_adapter(result, "joint-head")
    loaded = models.load_model("joint-head", device="cpu")
    for a, b in zip(_decode_outputs(result.model), _decode_outputs(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the refiner changes the map: without it the same crop reads differently
    crop = np.repeat(np.random.default_rng(3).random((64, 64, 1)).astype(np.float32), 3, axis=-1)
    refined = crop_distance_maps(loaded, [crop])[0]
    del loaded.sam.distance_refiner
    plain = crop_distance_maps(loaded, [crop])[0]
    assert np.abs(refined - plain).max() > 1e-4
    # and the distance decoder, not the prompt decoder, answers the default prompt
    grid = loaded.sam.prompt_encoder.image_embedding_size
    feats = torch.randn(1, loaded.sam.mask_decoder.transformer_dim, *grid, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = default_prompt_logits(loaded.sam, feats)
        del loaded.sam.distance_decoder
        shared = default_prompt_logits(loaded.sam, feats)
    assert not torch.allclose(own, shared)


def test_joint_views_alternate_clahe_and_keys_differ():
    image, labels = _cells()
    data = ft.make_training_data(image, labels)
    cfg = ft.FinetuneConfig(recipe="joint", epochs=1, minutes=None).resolved(64)
    specs = ft.plan_views(data, 40, cfg, np.random.default_rng(0))
    flags = [s.clahe for s in specs]
    assert 5 < sum(flags) < 35
    a, b = specs[0], ft.ViewSpec(**{**specs[0].__dict__, "clahe": not specs[0].clahe})
    assert a.key() != b.key()
    plain = ft.render_view(data.pairs[0], ft.ViewSpec(0, (48.0, 48.0), 64.0), 64)
    equalised = ft.render_view(data.pairs[0], ft.ViewSpec(0, (48.0, 48.0), 64.0, clahe=True), 64)
    assert not np.allclose(plain["image"], equalised["image"])
    prompt_cfg = ft.FinetuneConfig(recipe="prompt", epochs=1, minutes=None).resolved(64)
    assert not any(s.clahe for s in ft.plan_views(data, 20, prompt_cfg, np.random.default_rng(0)))


def test_keeping_the_base_prompt_path_keeps_the_trained_distance_map(tmp_path):
    """The packaged model's construction: prompts answer as the base, the map as the joint-trained model."""
    import copy

    from napari_cellseg.core.automatic import crop_distance_maps
    from napari_cellseg.core.distance_head import keep_base_prompt_path
    from napari_cellseg.core.models import LoadedModel

    image, labels = _cells()
    base = models.load_model(_checkpoint(tmp_path, "tinyvit_test"), device="cpu")
    cfg = ft.FinetuneConfig(recipe="joint", epochs=3, minutes=None, views=2, lr=1e-2, amp=False, batch_size=1)
    result = run_to_completion(ft.finetune(base, ft.make_training_data(image, labels), cfg))
    kept = keep_base_prompt_path(result.tensors)
    assert not any(".mask_decoder." in k or ".prompt_encoder." in k or ".image_encoder." in k for k in kept)
    assert any(".full.distance_neck." in k for k in kept)
    sam = copy.deepcopy(base.sam)
    ft.apply_adapter(sam, kept)
    split = LoadedModel(name="split", sam=sam.eval(), device="cpu", entry=base.entry,
                        meta={**result.model.meta, "prompt_pathway": "base (unchanged)",
                              "thresholds": {"peak": 0.4, "fill": 0.1, "smooth": 1.0}})
    a, b, c = _decode_outputs(split), _decode_outputs(base), _decode_outputs(result.model)
    for x, y in zip(a[:4], b[:4]):  # clicks and boxes: the base model's
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a[5], c[5], rtol=1e-5, atol=1e-6)  # the refined distance map: the trained one
    with pytest.raises(ValueError, match="no separate distance decoder"):
        keep_base_prompt_path({k: v for k, v in kept.items() if ".distance_decoder." not in k})
    # continuing with the distance recipe trains the distance path only
    trainer = ft.Finetuner(split, ft.make_training_data(image, labels),
                           ft.FinetuneConfig(recipe="distance", epochs=1, minutes=None, views=1, lr=1e-2, amp=False))
    continued = run_to_completion(trainer.run())
    assert any(n.startswith("distance_neck.") for n in trainer.full_names)
    assert not any(n.startswith(("image_encoder.neck.", "mask_decoder.")) for n in trainer.full_names)
    assert any(n.startswith("distance_decoder.") for n in trainer.full_names)
    # ... and the result still draws from prompts with the base's pathway
    assert continued.meta["capabilities"] == ["distance", "prompt", "grid"]
    assert continued.meta["prompt_pathway"] == "base (unchanged)"
    # continuing with the prompt recipe keeps the map (and its thresholds); the prompt pathway is now trained
    prompted = run_to_completion(ft.finetune(split, ft.make_training_data(image, labels), ft.FinetuneConfig(
        recipe="prompt", epochs=1, minutes=None, views=1, lr=1e-2, amp=False)))
    assert prompted.meta["output"] == "distance" and prompted.meta["capabilities"] == ["distance", "prompt", "grid"]
    assert prompted.meta["thresholds"] == {"peak": 0.4, "fill": 0.1, "smooth": 1.0}
    assert "prompt_pathway" not in prompted.meta
    # a plain distance recipe replaces the mask decoder's answers: no prompt capability
    plain = run_to_completion(ft.finetune(base, ft.make_training_data(image, labels), ft.FinetuneConfig(
        recipe="distance", epochs=1, minutes=None, views=1, lr=1e-2, amp=False, refiner=False)))
    assert plain.meta["capabilities"] == ["distance"]


def test_encoder_lora_on_a_split_model_adapts_a_copy_of_the_encoder(tmp_path):
    """The distance recipe with encoder LoRA on a model with its own distance head (the packaged model's GPU stage).

    The LoRA goes into the distance path's own copy of the image encoder: the
    map changes, clicks and boxes keep the base's answers, and the adapter
    round-trips through a file.
    """
    import copy

    from napari_cellseg.core.distance_head import get_distance_encoder, keep_base_prompt_path
    from napari_cellseg.core.models import LoadedModel

    image, labels = _cells()
    base = models.load_model(_checkpoint(tmp_path, "tinyvit_test"), device="cpu")
    joint = run_to_completion(ft.finetune(base, ft.make_training_data(image, labels), ft.FinetuneConfig(
        recipe="joint", epochs=2, minutes=None, views=2, lr=1e-2, amp=False, batch_size=1)))
    sam = copy.deepcopy(base.sam)
    ft.apply_adapter(sam, keep_base_prompt_path(joint.tensors))
    split = LoadedModel(name="split", sam=sam.eval(), device="cpu", entry=base.entry,
                        meta={**joint.model.meta, "prompt_pathway": "base (unchanged)"})
    trainer = ft.Finetuner(split, ft.make_training_data(image, labels), ft.FinetuneConfig(
        recipe="distance", epochs=3, minutes=None, lr=3e-2, amp=False, encoder_lora=True))
    result = run_to_completion(trainer.run())
    qkv_keys = [k for k in result.tensors if ".qkv." in k]
    assert qkv_keys and all(".qkv.distance_encoder." in k for k in qkv_keys)
    n_layers = len(ft.fused_qkv_layers(base.sam))
    assert len(qkv_keys) == 4 * n_layers  # qA, qB, vA, vB of every attention layer of the copy
    assert any(float(v.abs().max()) > 0 for k, v in result.tensors.items() if k.endswith((".qB", ".vB")))
    # the trained model: its own encoder for the map, the base's for the prompts
    assert get_distance_encoder(result.model.sam) is not None
    a, b, c = _decode_outputs(result.model), _decode_outputs(base), _decode_outputs(split)
    for x, y in zip(a[:4], b[:4]):  # clicks and boxes
        np.testing.assert_array_equal(x, y)
    assert np.abs(a[5] - c[5]).max() > 1e-4  # the map moved
    # round trip through the adapter file
    path = ft.save_adapter(result, "lora-map")
    loaded = ft.load_adapter(path, device="cpu")
    assert get_distance_encoder(loaded.sam) is not None
    d = _decode_outputs(loaded)
    for x, y in zip(d[:4], b[:4]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(d[5], a[5], rtol=1e-4, atol=1e-5)
    # continuing it on a CPU (encoder frozen, features cached) caches the distance encoder's features:
    # the map computed from the cache is the model's own map
    cont = ft.Finetuner(loaded, ft.make_training_data(image, labels), ft.FinetuneConfig(
        recipe="distance", epochs=1, minutes=None, views=1, amp=False))
    cont._setup()
    spec = ft.plan_views(cont.train, 1, cont.cfg, np.random.default_rng(0))[0]
    entry = cont._view_entry(cont.train, spec, cont.distances, with_features=True)
    fresh = cont._view_entry(cont.train, spec, cont.distances, with_features=False)
    with torch.no_grad():
        cached = cont._map_logits([entry], cont._features_of(entry, distance=True))
        direct = cont._map_logits([fresh], cont._features_of(fresh, distance=True))
    torch.testing.assert_close(cached, direct, rtol=1e-3, atol=2e-3)  # (the cache holds float16)
    with pytest.raises(ValueError, match="own image encoder"):
        ft.Finetuner(loaded, ft.make_training_data(image, labels), ft.FinetuneConfig(
            recipe="joint", epochs=1, minutes=None, views=1))._setup()
    # LoRA of a layer the distance encoder does not have fails clearly
    bad = {k.replace("distance_encoder.layers.1.", "distance_encoder.layers.9."): v
           for k, v in result.tensors.items() if ".qkv." in k and ".layers.1." in k}
    with pytest.raises(ValueError, match="does not fit"):
        ft.apply_adapter(copy.deepcopy(split.sam), bad)


@pytest.mark.parametrize("arch", ["vit_test", "tinyvit_test"])
def test_encoder_cut_in_two_is_the_encoder(arch):
    """features_head then features_tail is features, for every place the cut can go."""
    enc = models.random_model(arch).sam.image_encoder.eval()
    n = len(enc.attention_blocks())
    assert n >= 2
    x = torch.randn(1, 3, enc.img_size, enc.img_size)
    with torch.no_grad():
        whole = enc.features(x)
        for tail in range(1, n + 1):
            cut = enc.features_tail(enc.features_head(x, tail), tail)
            torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-5)
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=f"has {n} attention blocks"):
            enc.features_head(x, bad)


def test_lora_in_the_last_blocks_trains_from_cached_features(tmp_path):
    """encoder_lora_blocks: LoRA in the last N blocks only, the encoder's output up to them cached, and the
    adapter round-trips (the CPU way to adapt the encoder)."""
    base = models.load_model(_checkpoint(tmp_path, "tinyvit_test"), device="cpu")
    before = _state(base.sam)
    image, labels = _cells()
    with pytest.raises(ValueError, match="needs encoder_lora=True"):
        ft.FinetuneConfig(encoder_lora_blocks=2)
    with pytest.raises(ValueError, match="at least 1"):
        ft.FinetuneConfig(encoder_lora=True, encoder_lora_blocks=0)
    cfg = ft.FinetuneConfig(recipe="distance", epochs=3, minutes=None, views=3, encoder_lora=True,
                            encoder_lora_blocks=1, lr=3e-2, amp=False, feature_cache=str(tmp_path / "cache"))
    trainer = ft.Finetuner(base, ft.make_training_data(image, labels), cfg)
    calls = []
    head = base.sam.image_encoder.__class__.features_head

    def counting_head(self, x, tail):
        calls.append(tail)
        return head(self, x, tail)

    base.sam.image_encoder.__class__.features_head = counting_head
    try:
        result = run_to_completion(trainer.run())
    finally:
        base.sam.image_encoder.__class__.features_head = head
    # the head ran once per cached view (and validation/probe views), never per step
    assert calls and set(calls) == {1} and len(calls) <= 3 + 1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    qkv = list(ft.fused_qkv_layers(base.sam))
    lora_keys = sorted({k.split(".qkv.", 1)[1].rsplit(".", 1)[0] for k in result.tensors if ".qkv." in k})
    assert lora_keys == [qkv[-1]]  # the last block's qkv only
    after = result.model.sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert f"{qkv[-1]}.weight" in changed
    assert not any(f"{p}.weight" in changed for p in qkv[:-1])
    # the cached path computes what the model computes from pixels
    spec = ft.plan_views(trainer.train, 1, trainer.cfg, np.random.default_rng(1))[0]
    cached = trainer._view_entry(trainer.train, spec, trainer.distances, with_features=True)
    fresh = trainer._view_entry(trainer.train, spec, trainer.distances, with_features=False)
    with torch.no_grad():
        a = trainer._features_of(cached, distance=True)
        b = trainer._features_of(fresh, distance=True)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    path = ft.save_adapter(result, "tail-lora")
    loaded = ft.load_adapter(path, device="cpu")
    for x, y in zip(_decode_outputs(loaded), _decode_outputs(result.model)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
