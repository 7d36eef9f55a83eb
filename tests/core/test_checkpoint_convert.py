"""HuggingFace ``SamModel`` checkpoints (SAMCell's layout) load into segment_anything's SAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cellseg.core import checkpoint_convert as cc
from napari_cellseg.core import models
from napari_cellseg.core.models import build_sam, load_model, random_model
from napari_cellseg.core.predictor import Predictor, default_prompt_logits


def _outputs(model, image):
    predictor = Predictor(model)
    predictor.set_image(image)
    masks, scores, low = predictor.decode(points_rc=np.array([[[10.0, 20.0]], [[30.0, 5.0]]]), multimask=True)
    with torch.inference_mode():
        dmap = default_prompt_logits(model.sam, predictor.embedding.features)
    return predictor.embedding.features.numpy(), low, scores, dmap.numpy()


def test_converter_is_registered_and_ignores_sam_layout():
    assert cc.hf_to_sam in models.STATE_CONVERTERS
    state = build_sam("vit_test").state_dict()
    assert cc.hf_to_sam(state) is None
    assert models.to_sam_layout(state) is state


def test_mapping_round_trips_every_key():
    state = build_sam("vit_test").state_dict()
    hf = cc.sam_to_hf(state)
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.pe_layer")) for k in hf)
    assert "vision_encoder.layers.1.attn.rel_pos_h" in hf
    assert "mask_decoder.iou_prediction_head.proj_out.weight" in hf
    assert "mask_decoder.output_hypernetworks_mlps.3.layers.0.bias" in hf
    back = cc.hf_to_sam(hf)
    assert sorted(back) == sorted(state)
    assert all(back[k] is state[k] for k in state)


@pytest.mark.parametrize("suffix,prefix", [(".pth", ""), (".pt", "model."), (".safetensors", "")])
def test_hf_layout_checkpoint_loads_and_gives_identical_outputs(tmp_path, suffix, prefix):
    original = random_model("vit_test", seed=3)
    hf = {prefix + k: v.clone() for k, v in cc.sam_to_hf(original.sam.state_dict()).items()}
    path = tmp_path / f"samcell_like{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses shared tensors: the duplicated positional embedding is a copy anyway
        save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    else:
        torch.save(hf, path)
    loaded = load_model(path, device="cpu", use_cache=False)
    assert loaded.entry.architecture == "vit_test"
    image = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    for a, b in zip(_outputs(original, image), _outputs(loaded, image)):
        np.testing.assert_array_equal(a, b)


def test_real_transformers_sam_model_matches_after_conversion():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           output_channels=32, window_size=2, global_attn_indexes=[1], num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=16),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=8, iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    hf = transformers.SamModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF initialises some weights to zero: make every tensor count
            p.normal_(0, 0.2)
    sam, arch = models.build_from_state(hf.state_dict(), what="HF checkpoint")
    assert arch == "vit_test"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        emb_hf = hf.get_image_embeddings(x)
        emb = sam.image_encoder(x)
        torch.testing.assert_close(emb, emb_hf, atol=1e-5, rtol=1e-5)
        # a point prompt (SAM's x, y in model pixels), three masks
        pts = torch.tensor([[[[20.0, 30.0]]]])
        lab = torch.tensor([[[1]]])
        out = hf(image_embeddings=emb_hf, input_points=pts, input_labels=lab, multimask_output=True)
        sparse, dense = sam.prompt_encoder(points=(pts[0], lab[0]), boxes=None, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True)
        torch.testing.assert_close(low, out.pred_masks[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(iou, out.iou_scores[0], atol=1e-5, rtol=1e-4)
        # the default (empty) prompt: SAMCell's distance-map forward
        default = hf(image_embeddings=emb_hf, multimask_output=False).pred_masks[0]
        torch.testing.assert_close(default_prompt_logits(sam, emb), default, atol=1e-5, rtol=1e-4)


def test_unknown_hf_keys_are_named_by_the_strict_load():
    hf = cc.sam_to_hf(build_sam("vit_test").state_dict())
    hf["mask_decoder.something_new.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="something_new"):
        models.build_from_state(hf)


def test_samcell_checkpoint_becomes_a_distance_model(tmp_path):
    from napari_cellseg.core.automatic import as_distance_model, default_mode, is_distance_model

    path = tmp_path / "samcell.pt"
    torch.save(cc.sam_to_hf(build_sam("vit_test").state_dict()), path)
    loaded = load_model(path, device="cpu", use_cache=False)
    assert not is_distance_model(loaded) and default_mode(loaded) == "grid"
    dist = as_distance_model(loaded, {"peak": 0.5})
    assert is_distance_model(dist) and default_mode(dist) == "distance"
    assert dist.sam is loaded.sam and dist.meta["thresholds"] == {"peak": 0.5}
    assert loaded.meta.get("output") is None  # the cached model is not changed
