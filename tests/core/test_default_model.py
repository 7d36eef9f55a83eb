"""The model shipped in the package (``cellseg``): integrity, loading, and a regression check on held-out data.

The regression figures live in docs/model_card.md (``<!-- regression: ... -->``),
measured by :func:`regression_figures` on a crop of Usiigaci set 36 (validation
split, never trained on). Run this file as a script to print them.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CARD = REPO / "docs" / "model_card.md"
CROP = (slice(0, 512), slice(0, 512))
TOLERANCE = 0.05
BOX_GAIN = 0.02


def regression_figures(data_root: Path, model, clicks_from_map: bool = True, automatic: bool = True) -> dict:
    """Distance-mode AP@0.5, mean click IoU and mean box IoU of ``model`` on the top-left 512 px of Usiigaci set 36.

    Clicks and boxes (each cell's exact bounding box) go through the annotation
    mode's segmenter (``clicks_from_map`` as given). Also returns ``masks``:
    the click masks, to compare models.
    """
    import tifffile

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.interactive import AnnotationConfig, InteractiveSegmenter, ObjectPrompt
    from napari_cellseg.core.metrics import average_precision
    from scipy import ndimage as ndi

    root = data_root / "usiigaci-phase-train"
    image = tifffile.imread(root / "images" / "train_set36.tif")[CROP]
    labels = tifffile.imread(root / "masks" / "train_set36.tif")[CROP]
    ap50 = None
    if automatic:
        result = auto.segment(image, model, mode="distance")
        ap50 = float(average_precision(labels, result.labels, (0.5,))[0].ap)
    # one click per cell that does not touch the crop's border, at its innermost pixel
    clicks, boxes, ids = [], [], []
    for idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == 512 or sl[1].stop == 512:
            continue
        mask = labels[sl] == idx
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        clicks.append((r + sl[0].start, c + sl[1].start))
        boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
        ids.append(idx)
    seg = InteractiveSegmenter(model, config=AnnotationConfig(clicks_from_map=clicks_from_map))
    seg.set_image(image)
    objs = seg.segment_many([ObjectPrompt(points=[p]) for p in clicks])
    box_objs = seg.segment_many([ObjectPrompt(box=b) for b in boxes])

    def mean_iou(found) -> float:
        ious = []
        for idx, obj in zip(ids, found):
            ref = labels == idx
            m = obj.to_full(labels.shape)
            ious.append(np.logical_and(m, ref).sum() / np.logical_or(m, ref).sum())
        return float(np.mean(ious))

    return {"ap50": ap50, "click_iou": mean_iou(objs), "box_iou": mean_iou(box_objs), "n_cells": len(ids),
            "masks": [obj.to_full(labels.shape) for obj in objs]}


def card_figures() -> dict:
    text = CARD.read_text()
    m = re.search(r"<!-- regression: ap50=([0-9.]+) click_iou=([0-9.]+) box_iou=([0-9.]+) -->", text)
    assert m, f"{CARD} lacks the regression figures line"
    return {"ap50": float(m.group(1)), "click_iou": float(m.group(2)), "box_iou": float(m.group(3))}


def test_packaged_model_is_an_adapter_with_a_verified_checksum():
    from napari_cellseg.core import models

    entry = models.get_entry("cellseg")
    assert entry.name == "cellseg" and entry.source == "adapter" and entry.base == "litemedsam"
    path = Path(entry.location)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert path.stat().st_size <= 20e6  # the budget for what the wheel adds
    assert entry.known_hash == f"sha256:{models.file_hash(path)}"
    assert models.is_available_offline(entry)


def test_default_model_loads_strictly_and_answers_every_mode():
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.finetune import apply_adapter, read_adapter
    from napari_cellseg.core.models import CELLSEG_PATH, load_model

    model = load_model("cellseg", device="cpu", use_cache=False)
    assert auto.is_distance_model(model) and auto.default_mode(model) == "distance"
    assert set(model.entry.capabilities) == {"distance", "prompt", "grid"}
    tensors, meta = read_adapter(CELLSEG_PATH)
    assert meta["base"] == "litemedsam" and meta["prompt_pathway"].startswith("base")
    # stage 1 the joint recipe, stage 2 the distance recipe continued from it, stage 3 the distance recipe with
    # LoRA in the distance path's own encoder (a GPU run), merged into one stage of tensors
    assert [s["recipe"] for s in meta["stages"]] == ["joint", "distance", "distance"] and meta["merged_stages"] == 3
    assert meta["stages"][2]["config"]["encoder_lora"] and not meta["stages"][1]["config"]["encoder_lora"]
    assert {k.split(".", 1)[0] for k in tensors} == {"s0"}
    lora = [k for k in tensors if ".qkv." in k]
    assert lora and all(k.startswith("s0.qkv.distance_encoder.") for k in lora)
    # the adapter adds the distance head (its own encoder, neck, decoder and refiner) and the box decoder, and
    # changes nothing of the base network: points and the grid answer exactly as LiteMedSAM's
    base = load_model("litemedsam", device="cpu")
    import copy

    import torch

    sam = copy.deepcopy(base.sam)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    apply_adapter(sam, tensors)
    after = sam.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    added = set(after) - set(before)
    assert {k.split(".")[0] for k in added} == {"distance_encoder", "distance_neck", "distance_decoder",
                                                 "distance_refiner", "box_decoder"}
    assert meta["box_mask_threshold"] == -1.0 and meta["box_head"]["windows"] > 1000
    # the click threshold is the best of the selection-image search it records (train_box_head.py)
    clicks = meta["box_head"]["selection_click_iou"]
    best = max(clicks, key=lambda t: clicks[t]["mean_over_kinds"])
    assert float(best) == meta["click_mask_threshold"] == 0.5
    # every stored full tensor lands on a parameter; the distance encoder is LiteMedSAM's with the LoRA merged in
    encoder = {k for k in added if k.startswith("distance_encoder.")}
    assert len(added - encoder) == len(tensors) - len(lora)
    changed = {k for k in encoder if not torch.equal(after[k], before["image_encoder." + k.split(".", 1)[1]])}
    assert changed == {k.split(".", 2)[2][:-len(".qA")] + ".weight" for k in lora if k.endswith(".qA")}
    for k, v in model.sam.state_dict().items():
        assert torch.allclose(v, after[k]), k


def test_corrupt_default_weights_give_a_clear_message(tmp_path, monkeypatch):
    from dataclasses import replace

    from napari_cellseg.core import models

    entry = models.get_entry("cellseg")
    bad = tmp_path / "cellseg.safetensors"
    shutil.copy(entry.location, bad)
    shutil.copy(Path(entry.location).with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setitem(models._BUILTIN, "cellseg", replace(entry, location=str(bad)))
    with pytest.raises(ValueError, match="corrupt.*reinstall napari-cellseg"):
        models.load_model("cellseg", device="cpu", use_cache=False)
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="missing from this installation"):
        models.load_model("cellseg", device="cpu", use_cache=False)


@pytest.mark.timeout(600)
def test_default_model_regression_on_held_out_usiigaci(shared_data):
    from napari_cellseg.core.models import load_model

    expected = card_figures()
    got = regression_figures(shared_data, load_model("cellseg", device="cpu"))
    assert got["n_cells"] >= 8
    assert got["ap50"] >= expected["ap50"] - TOLERANCE, (got["ap50"], expected)
    # clicks answered from the cell map (the annotation default for this model)
    assert got["click_iou"] >= expected["click_iou"] - TOLERANCE, (got["click_iou"], expected)
    # boxes answered by the model's own box decoder
    assert got["box_iou"] >= expected["box_iou"] - TOLERANCE, (got["box_iou"], expected)
    # given to SAM as points, clicks are LiteMedSAM's, mask for mask: points read the base's decoder
    points = regression_figures(shared_data, load_model("cellseg", device="cpu"), clicks_from_map=False,
                                automatic=False)
    ref = regression_figures(shared_data, load_model("litemedsam", device="cpu"), automatic=False)
    assert all(np.array_equal(a, b) for a, b in zip(points["masks"], ref["masks"]))
    assert got["click_iou"] > points["click_iou"] + 0.05, (got["click_iou"], points["click_iou"])
    # the box decoder draws these cells better than LiteMedSAM's decoder does
    assert got["box_iou"] > ref["box_iou"] + BOX_GAIN, (got["box_iou"], ref["box_iou"])


@pytest.mark.timeout(600)
def test_default_model_regression_in_the_default_precision(shared_data, monkeypatch):
    """The card's figures hold in the precision users get by default: ``auto``, bfloat16 on CPUs with native
    bfloat16 (the suite itself runs in float32, tests/conftest.py)."""
    from napari_cellseg.core import models

    if models.resolve_precision("auto", "cpu") == "float32":
        pytest.skip("this CPU has no native bfloat16, so auto is float32: the float32 regression test covers it")
    monkeypatch.delenv(models.PRECISION_ENV, raising=False)
    model = models.load_model("cellseg", device="cpu")
    assert model.precision == "bfloat16"
    expected = card_figures()
    got = regression_figures(shared_data, model)
    assert got["ap50"] >= expected["ap50"] - TOLERANCE, (got["ap50"], expected)
    assert got["click_iou"] >= expected["click_iou"] - TOLERANCE, (got["click_iou"], expected)
    assert got["box_iou"] >= expected["box_iou"] - TOLERANCE, (got["box_iou"], expected)


if __name__ == "__main__":  # print the figures for docs/model_card.md
    from napari_cellseg.core.models import load_model

    figures = regression_figures(REPO.parent / "shared" / "data", load_model(sys.argv[1] if len(sys.argv) > 1
                                                                             else "cellseg", device="cpu"))
    print({k: v for k, v in figures.items() if k != "masks"})


def test_packaged_model_records_its_training_cell_sizes_and_auto_zoom_uses_them():
    """``meta["cell_diameters"]`` (training/train_default_model.py --sizes-only) drives ``scale="auto"``: the
    sample nuclei (median 24 px, within the training nuclei's 9-31 px) keep zoom 1 and one map; zoomed in 2.5x
    (59 px) the estimate zooms out and segments them better than zoom 1 does."""
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.cell_size import model_cell_sizes
    from napari_cellseg.core.io import load_sample
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.models import load_model
    from skimage.transform import rescale

    model = load_model("cellseg", device="cpu")
    sizes = model_cell_sizes(model.meta)
    assert {"fluorescence", "phase", "brightfield", "colour", "all"} <= set(sizes)
    assert sizes["fluorescence"]["p10"] < 15 < sizes["fluorescence"]["median"] < 25 < sizes["fluorescence"]["p90"]
    assert sizes["phase"]["median"] > 2 * sizes["fluorescence"]["median"]  # whole cells against nuclei

    sample = load_sample("nuclei")
    at1 = auto.segment(sample.image, model, "distance")
    own = auto.segment(sample.image, model, "distance", auto.make_config("distance", model, scale="auto"))
    assert own.size_estimate.scale == 1.0 and len(own.size_estimate.passes) == 1
    assert own.size_estimate.kind == "fluorescence" and own.size_estimate.message.startswith("zoom 1: cells of")
    np.testing.assert_array_equal(own.labels, at1.labels)

    image = rescale(sample.image, 2.5, order=1, preserve_range=True).astype(sample.image.dtype)
    labels = rescale(sample.labels, 2.5, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
    plain = auto.segment(image, model, "distance", auto.make_config("distance", model, scale=1.0))
    zoomed = auto.segment(image, model, "distance")  # the packaged model's default: scale="auto"
    assert auto.make_config("distance", model).scale == auto.make_config("guided", model).distance.scale == "auto"
    est = zoomed.size_estimate
    assert 0.3 <= est.scale <= 0.7 and est.passes[0][0] == 1.0 and est.passes[0][1] > 31
    assert zoomed.labels.shape == image.shape and f"zoom {est.scale:g}" in zoomed.summary()
    ap_plain = average_precision(labels, plain.labels, (0.5,))[0].ap
    ap_zoomed = average_precision(labels, zoomed.labels, (0.5,))[0].ap
    assert ap_zoomed > ap_plain + 0.04, (ap_plain, ap_zoomed)
