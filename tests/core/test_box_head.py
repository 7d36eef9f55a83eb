"""The box head: a model's own box decoder answers prompts with a box; points and the grid keep the mask decoder."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from napari_cellseg.core import finetune as ft
from napari_cellseg.core import models
from napari_cellseg.core.box_head import (
    BOX_DECODER_ATTR,
    attach_box_decoder,
    decoder_for,
    get_box_decoder,
)
from napari_cellseg.core.interactive import (
    AnnotationConfig,
    InteractiveSegmenter,
    ObjectPrompt,
    resolve_mask_threshold,
)
from napari_cellseg.core.predictor import Predictor
from napari_cellseg.core.progress import run_to_completion

BOX = np.array([[8.0, 10.0, 40.0, 44.0]])


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""
POINTS = np.array([[[20.0, 30.0]]])


def _with_box_decoder(seed: int = 0):
    """A tiny random model whose box decoder differs from its mask decoder."""
    model = models.random_model("vit_test", seed=seed)
    box = attach_box_decoder(model.sam)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in box.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _image():
    return np.random.default_rng(1).random((70, 60)).astype(np.float32)


def _decode(model, fast: bool = True, **prompts):
    p = Predictor(model, fast_decoder=fast)
    p.set_image(_image())
    _, scores, low = p.decode(**prompts)
    return scores, low


def test_boxes_go_to_the_box_decoder_and_points_to_the_mask_decoder():
    model = _with_box_decoder()
    plain = models.random_model("vit_test", seed=0)
    assert get_box_decoder(plain.sam) is None and decoder_for(plain.sam, True) is plain.sam.mask_decoder
    assert decoder_for(model.sam, True) is getattr(model.sam, BOX_DECODER_ATTR)
    assert decoder_for(model.sam, False) is model.sam.mask_decoder
    # points alone: the mask decoder, exactly as the model without a box decoder
    for a, b in zip(_decode(model, points_rc=POINTS, multimask=True), _decode(plain, points_rc=POINTS, multimask=True)):
        np.testing.assert_array_equal(a, b)
    # a box: the box decoder's answer, not the mask decoder's
    box_scores, box_low = _decode(model, boxes_rc=BOX)
    _, plain_low = _decode(plain, boxes_rc=BOX)
    assert np.abs(box_low - plain_low).mean() > 0.05
    # the box decoder module itself gives that answer (the fast path equals segment-anything's modules)
    slow_scores, slow_low = _decode(model, fast=False, boxes_rc=BOX)
    np.testing.assert_allclose(box_low, slow_low, atol=1e-4)
    np.testing.assert_allclose(box_scores, slow_scores, atol=1e-5)
    swapped = copy.deepcopy(plain)
    swapped.sam.mask_decoder = copy.deepcopy(model.sam.box_decoder)
    np.testing.assert_allclose(_decode(swapped, boxes_rc=BOX)[1], box_low, atol=1e-4)
    # a box with points goes to the box decoder too
    _, both = _decode(model, boxes_rc=BOX, points_rc=POINTS)
    _, both_plain = _decode(plain, boxes_rc=BOX, points_rc=POINTS)
    assert np.abs(both - both_plain).mean() > 0.05


def test_box_decoder_travels_in_an_adapter(tmp_path):
    model = _with_box_decoder()
    tensors = {f"s0.full.{BOX_DECODER_ATTR}.{k}": v.clone() for k, v in model.sam.box_decoder.state_dict().items()}
    fresh = models.random_model("vit_test", seed=0)
    ft.apply_adapter(fresh.sam, tensors)
    assert get_box_decoder(fresh.sam) is not None
    np.testing.assert_array_equal(_decode(fresh, boxes_rc=BOX)[1], _decode(model, boxes_rc=BOX)[1])
    bad = {k: v for k, v in tensors.items()}
    key = next(k for k in bad if k.endswith("iou_token.weight"))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        ft.apply_adapter(models.random_model("vit_test", seed=0).sam, bad)


def test_box_mask_threshold_applies_to_box_prompts_of_a_model_with_a_box_decoder():
    model = _with_box_decoder()
    model.meta = {"box_mask_threshold": 3.0}
    assert resolve_mask_threshold(model, None, boxes=True) == 3.0
    assert resolve_mask_threshold(model, None) == 0.0
    assert resolve_mask_threshold(model, -1.0, boxes=True) == -1.0  # the user's value wins
    plain = models.random_model("vit_test", seed=0)
    plain.meta = {"box_mask_threshold": 3.0}  # no box decoder: the meta value does not apply
    assert resolve_mask_threshold(plain, None, boxes=True) == 0.0
    # the annotation engine thresholds box answers with it: a higher threshold, a smaller mask
    image = _image()
    areas = {}
    for t in (None, 3.0):
        model.meta = {} if t is None else {"box_mask_threshold": t}
        seg = InteractiveSegmenter(model, config=AnnotationConfig(invert=False, zoom="off"))
        seg.set_image(image)
        areas[t] = seg.segment(ObjectPrompt(box=BOX[0])).area
    assert areas[3.0] < areas[None]


def _adapter_with_box_decoder(tmp_path):
    """An adapter (a short distance run on a checkpoint) with a box decoder added to its tensors."""
    import json

    from safetensors.torch import load_file, save_file

    path = tmp_path / "base.pth"
    torch.save(models.random_model("vit_test", seed=0).sam.state_dict(), path)
    base = models.load_model(str(path), device="cpu")
    from conftest import make_cells

    data = ft.make_training_data(*make_cells((96, 96), n=6))
    stage = run_to_completion(ft.finetune(base, data, ft.FinetuneConfig(recipe="distance", epochs=1, minutes=None,
                                                                        views=1)))
    st = ft.save_adapter(stage, "withbox")
    tensors = load_file(str(st))
    box = _with_box_decoder().sam.box_decoder
    tensors.update({f"s0.full.{BOX_DECODER_ATTR}.{k}": v.clone() for k, v in box.state_dict().items()})
    save_file(tensors, str(st), metadata={"format": ft.ADAPTER_FORMAT, "name": "withbox"})
    js = st.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta.update(sha256=models.file_hash(st), box_mask_threshold=1.0)
    js.write_text(json.dumps(meta))
    return models.load_model("withbox", device="cpu", use_cache=False), data


def test_a_box_decoder_survives_continued_distance_training_and_the_prompt_recipe_drops_it(tmp_path):
    model, data = _adapter_with_box_decoder(tmp_path)
    assert get_box_decoder(model.sam) is not None and model.meta["box_mask_threshold"] == 1.0
    # the distance recipe does not train prompts: the box decoder and its threshold stay
    kept = run_to_completion(ft.finetune(model, data, ft.FinetuneConfig(recipe="distance", epochs=1, minutes=None,
                                                                        views=1)))
    assert get_box_decoder(kept.model.sam) is not None and kept.meta["box_mask_threshold"] == 1.0
    np.testing.assert_array_equal(_decode(kept.model, boxes_rc=BOX)[1], _decode(model, boxes_rc=BOX)[1])
    # the prompt recipe trains boxes through the mask decoder: the box decoder goes, so boxes read what trained
    tuned = run_to_completion(ft.finetune(model, data, ft.FinetuneConfig(recipe="prompt", epochs=1, minutes=None,
                                                                         views=1)))
    assert get_box_decoder(tuned.model.sam) is None and "box_mask_threshold" not in tuned.meta
    assert not any(".box_decoder." in k for k in tuned.tensors)
    assert get_box_decoder(model.sam) is not None  # the base model is untouched
