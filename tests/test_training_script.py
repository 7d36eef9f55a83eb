"""Helpers of training/train_default_model.py that package the default model (no training, no data)."""

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import train_default_model  # noqa: E402

from napari_cellseg.core.models import file_hash  # noqa: E402


def _staged_adapter(tmp_path, tensors):
    path = tmp_path / "cellseg.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    meta = {"name": "cellseg-cont", "base": "litemedsam",
            "stages": [{"recipe": "joint"}, {"recipe": "distance"}]}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_merge_full_stages_keeps_the_last_value_of_each_tensor(tmp_path):
    a0, a1, b0 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5)
    path = _staged_adapter(tmp_path, {"s0.full.a.weight": a0, "s1.full.a.weight": a1, "s0.full.b.bias": b0})

    train_default_model.merge_full_stages(path, "cellseg")

    merged = safetensors_torch.load_file(str(path))
    assert set(merged) == {"s0.full.a.weight", "s0.full.b.bias"}
    assert all(v.dtype == torch.float16 for v in merged.values())
    torch.testing.assert_close(merged["s0.full.a.weight"].float(), a1.half().float())  # stage 2 wins
    torch.testing.assert_close(merged["s0.full.b.bias"].float(), b0.half().float())  # only stage 1 has it
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["name"] == "cellseg" and meta["merged_stages"] == 2 and meta["dtype"] == "float16"
    assert meta["sha256"] == file_hash(path)
    assert [s["recipe"] for s in meta["stages"]] == ["joint", "distance"]


def test_merge_full_stages_refuses_lora_and_leaves_the_file(tmp_path):
    path = _staged_adapter(tmp_path, {"s0.full.a.weight": torch.ones(2, 2), "s1.lora.a.A": torch.ones(1, 2),
                                      "s1.lora.a.B": torch.ones(2, 1)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="only full tensors and the distance encoder's LoRA merge"):
        train_default_model.merge_full_stages(path, "cellseg")
    assert path.read_bytes() == before


def test_merge_joins_the_distance_encoders_lora_of_several_stages_into_the_same_update(tmp_path):
    """Stage 3 continued again: two LoRA updates of one qkv layer become one LoRA of twice the rank."""
    layer = "qkv.distance_encoder.layers.1.blocks.0.attn.qkv"
    g = torch.Generator().manual_seed(0)
    t = {f"s{s}.{layer}.{p}": torch.randn(*shape, generator=g)
         for s in (0, 1) for p, shape in (("qA", (4, 8)), ("qB", (8, 4)), ("vA", (4, 8)), ("vB", (8, 4)))}
    t["s1.full.distance_neck.0.weight"] = torch.randn(3, 3, generator=g)
    path = _staged_adapter(tmp_path, dict(t))

    train_default_model.merge_full_stages(path, "cellseg")

    merged = safetensors_torch.load_file(str(path))
    for p in ("q", "v"):
        a, b = merged[f"s0.{layer}.{p}A"].float(), merged[f"s0.{layer}.{p}B"].float()
        assert a.shape == (8, 8) and b.shape == (8, 8)
        want = sum(t[f"s{s}.{layer}.{p}B"].half().float() @ t[f"s{s}.{layer}.{p}A"].half().float() for s in (0, 1))
        torch.testing.assert_close(b @ a, want)
    assert "s0.full.distance_neck.0.weight" in merged


def test_a_continued_stage_can_keep_the_selection_images_out(shared_data):
    """Stage 4's data: the training split less the images kept aside to choose between runs (never validation)."""
    import datasets
    import train_encoder_stage

    data = train_default_model.build_training_data(dsb_limit=6, keep_selection_out=True)
    names = [p.name for p in data.pairs]
    _, _, select_u, select_d = train_encoder_stage.split_files()
    held = {f"usiigaci set{k}" for k in select_u + datasets.USIIGACI_VALIDATION}
    held |= {datasets.dsb_name(r) for r in select_d}
    held |= {datasets.dsb_name(r) for r in datasets.dsb_index() if r["split"] == "validation"}
    assert len(names) == len(datasets.USIIGACI_TRAIN) - len(select_u) + 6
    assert not held & set(names)
    # without the flag the selection images are training data, as in stages 1-2
    everything = train_default_model.build_training_data(dsb_limit=6)
    assert {f"usiigaci set{k}" for k in select_u} <= {p.name for p in everything.pairs}


def test_box_head_package_adds_the_box_decoder_in_float16_and_a_new_checksum(tmp_path):
    import numpy as np
    import train_box_head

    path = tmp_path / "cellseg.safetensors"
    safetensors_torch.save_file({"s0.full.distance_decoder.x": torch.randn(4),
                                 "s0.full.box_decoder.old": torch.randn(2)}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"name": "cellseg", "base": "litemedsam",
                                                     "prompt_pathway": "base (the prompts answer as the base does)"}))
    state = {"iou_token.weight": torch.randn(1, 8), "mask_tokens.weight": torch.randn(4, 8)}
    sha = train_box_head.package(tmp_path, state, -1.0, {"windows": 10}, click_threshold=0.5)
    tensors = safetensors_torch.load_file(str(path))
    assert set(tensors) == {"s0.full.distance_decoder.x", "s0.full.box_decoder.iou_token.weight",
                            "s0.full.box_decoder.mask_tokens.weight"}  # an earlier box decoder is replaced
    assert tensors["s0.full.box_decoder.mask_tokens.weight"].dtype == torch.float16
    torch.testing.assert_close(tensors["s0.full.box_decoder.mask_tokens.weight"].float(),
                               state["mask_tokens.weight"].half().float())
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == sha == file_hash(path) and meta["box_mask_threshold"] == -1.0
    assert meta["click_mask_threshold"] == 0.5
    assert meta["box_head"] == {"windows": 10} and meta["prompt_pathway"].startswith("base for points")

    rng = np.random.default_rng(0)
    box = np.array([10.0, 20.0, 50.0, 60.0])  # x0, y0, x1, y1, 40 px a side
    boxes = np.concatenate([train_box_head._jittered(box, 64, 64, 2, rng) for _ in range(200)])
    assert (boxes[:, [0, 1]] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 64).all()
    assert (boxes[:, [0, 1]] >= box[[0, 1]] - 0.15 * 40 - 1e-9).all()  # grown by at most 15 % a side
    assert (boxes[:, [0, 1]] <= box[[0, 1]] + 0.05 * 40 + 1e-9).all()  # shrunk by at most 5 % a side
    assert (np.abs(boxes - box).sum(1) > 0).mean() > 0.5  # most copies are jittered


def test_box_head_click_prompts_put_the_point_in_the_cells_core_and_grow_some_boxes():
    """train_box_head --clicks: a click's prompt is a positive point among the top 20 % of the cell's distance
    transform (CellSeg1's rule) with a jittered or grown box; box_head_state reads a packaged head back."""
    import numpy as np
    import train_box_head
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    target = np.zeros((64, 64), bool)
    target[10:50, 20:40] = True  # rows 10-49, cols 20-39
    dist = ndi.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1]
    cut = np.quantile(dist[target], 0.8)
    for _ in range(50):
        x, y = train_box_head.click_point(target, rng)
        assert dist[int(y), int(x)] >= cut and x % 1 == 0.5
    assert train_box_head.click_point(np.zeros((8, 8), bool), rng) is None
    box = np.array([20.0, 10.0, 40.0, 50.0])  # its xyxy
    boxes, points, labels = train_box_head.prompt_batch(box, target, 64, 64, 400, 0.5, rng)
    clicked = labels[:, 0] > 0
    assert 0.4 < clicked.mean() < 0.6 and (labels[~clicked] == -1).all()
    grown = clicked & ((boxes[:, 0] < box[0] - 0.15 * 20) | (boxes[:, 2] > box[2] + 0.15 * 20))
    assert grown[clicked].mean() > 0.2 and not grown[~clicked].any()  # only clicks' boxes grow beyond the jitter
    assert (boxes[:, [0, 1]] >= 0).all() and (boxes[:, [2, 3]] <= 64).all()
    assert (boxes[:, 2] - boxes[:, 0] <= 20 * (1 + 2 * train_box_head.GROWN_MAX) + 1e-9).all()
    assert target[points[clicked, 0, 1].astype(int), points[clicked, 0, 0].astype(int)].all()


def test_box_head_state_reads_a_packaged_head_and_refuses_a_model_without_one(tmp_path):
    import train_box_head

    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file({"s1.full.box_decoder.a.weight": torch.ones(2, dtype=torch.float16),
                                 "s1.full.distance_decoder.b": torch.ones(1)}, str(path))
    state = train_box_head.box_head_state(path)
    assert list(state) == ["a.weight"] and state["a.weight"].dtype == torch.float32
    safetensors_torch.save_file({"s1.full.distance_decoder.b": torch.ones(1)}, str(path))
    with pytest.raises(SystemExit, match="holds no box head"):
        train_box_head.box_head_state(path)


def test_a_warm_started_box_head_keeps_the_record_of_the_head_it_started_from(tmp_path):
    import train_box_head

    path = tmp_path / "m.safetensors"
    assert train_box_head.init_record(path) is None  # no metadata beside it
    path.with_suffix(".json").write_text(json.dumps({"box_head": {"steps": 456, "clicks": 0.0}}))
    assert train_box_head.init_record(path) == {"steps": 456, "clicks": 0.0}
    path.with_suffix(".json").write_text(json.dumps({"name": "no head"}))
    assert train_box_head.init_record(path) is None
