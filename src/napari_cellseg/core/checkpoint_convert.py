"""Read Segment Anything checkpoints saved in HuggingFace ``transformers`` key layout.

SAMCell's released model (a fine-tune of SAM ViT-B that regresses a distance
map) and every ``SamModel.save_pretrained`` folder store the same tensors as
Meta's ``segment_anything`` under other names, e.g.::

    vision_encoder.layers.3.layer_norm1.weight         image_encoder.blocks.3.norm1.weight
    vision_encoder.neck.conv2.weight                   image_encoder.neck.2.weight
    shared_image_embedding.positional_embedding        prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    prompt_encoder.mask_embed.conv3.weight             prompt_encoder.mask_downscaling.6.weight
    mask_decoder.transformer.layers.0.layer_norm4.bias mask_decoder.transformer.layers.0.norm4.bias
    mask_decoder.upscale_conv2.weight                  mask_decoder.output_upscaling.3.weight
    mask_decoder.iou_prediction_head.proj_out.weight   mask_decoder.iou_prediction_head.layers.2.weight

(the names are those of ``transformers/models/sam/modeling_sam.py``). The
conversion is a pure renaming: no tensor is reshaped or transposed.
:func:`hf_to_sam` is registered in
:data:`napari_cellseg.core.models.STATE_CONVERTERS` when this module is
imported, which :func:`napari_cellseg.core.models.to_sam_layout` does on its
own, so ``load_model("path/to/model.safetensors")`` just works. Keys may carry a
wrapper prefix (``model.``, ``sam.``, ``module.``), as in training scripts that
wrap a ``SamModel``.

A SAMCell checkpoint holds no note saying that its decoder outputs a distance
map. Mark the loaded model as a distance model with
:func:`napari_cellseg.core.automatic.as_distance_model`, ``--output distance``
on the command line, or the "distance-map model" box of the widget.

Examples
--------
>>> from napari_cellseg.core.models import build_sam
>>> sam_state = build_sam("vit_test").state_dict()
>>> hf = sam_to_hf(sam_state)
>>> "vision_encoder.layers.0.attn.qkv.weight" in hf
True
>>> back = hf_to_sam(hf)
>>> sorted(back) == sorted(sam_state)
True
"""

from __future__ import annotations

import re
from typing import Any

#: prefixes that training wrappers put before the ``SamModel`` keys
WRAPPER_PREFIXES = ("model.", "sam.", "module.", "sam_model.")

#: (HuggingFace name, segment_anything name) templates; ``{i}``/``{j}`` are indices,
#: ``{p}`` is ``weight`` or ``bias``, ``{a}`` an attention sub-module, ``{n}`` a name
_PAIRS: list[tuple[str, str]] = [
    # image encoder
    ("vision_encoder.pos_embed", "image_encoder.pos_embed"),
    ("vision_encoder.patch_embed.projection.{p}", "image_encoder.patch_embed.proj.{p}"),
    ("vision_encoder.layers.{i}.layer_norm1.{p}", "image_encoder.blocks.{i}.norm1.{p}"),
    ("vision_encoder.layers.{i}.layer_norm2.{p}", "image_encoder.blocks.{i}.norm2.{p}"),
    ("vision_encoder.layers.{i}.attn.{n}", "image_encoder.blocks.{i}.attn.{n}"),
    ("vision_encoder.layers.{i}.mlp.lin{j}.{p}", "image_encoder.blocks.{i}.mlp.lin{j}.{p}"),
    ("vision_encoder.neck.conv1.{p}", "image_encoder.neck.0.{p}"),
    ("vision_encoder.neck.layer_norm1.{p}", "image_encoder.neck.1.{p}"),
    ("vision_encoder.neck.conv2.{p}", "image_encoder.neck.2.{p}"),
    ("vision_encoder.neck.layer_norm2.{p}", "image_encoder.neck.3.{p}"),
    # prompt encoder
    ("shared_image_embedding.positional_embedding", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    ("prompt_encoder.point_embed.{i}.weight", "prompt_encoder.point_embeddings.{i}.weight"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("prompt_encoder.mask_embed.conv1.{p}", "prompt_encoder.mask_downscaling.0.{p}"),
    ("prompt_encoder.mask_embed.layer_norm1.{p}", "prompt_encoder.mask_downscaling.1.{p}"),
    ("prompt_encoder.mask_embed.conv2.{p}", "prompt_encoder.mask_downscaling.3.{p}"),
    ("prompt_encoder.mask_embed.layer_norm2.{p}", "prompt_encoder.mask_downscaling.4.{p}"),
    ("prompt_encoder.mask_embed.conv3.{p}", "prompt_encoder.mask_downscaling.6.{p}"),
    # mask decoder: two-way transformer
    ("mask_decoder.transformer.layers.{i}.layer_norm{j}.{p}", "mask_decoder.transformer.layers.{i}.norm{j}.{p}"),
    ("mask_decoder.transformer.layers.{i}.{a}.{n}", "mask_decoder.transformer.layers.{i}.{a}.{n}"),
    ("mask_decoder.transformer.layers.{i}.mlp.lin{j}.{p}", "mask_decoder.transformer.layers.{i}.mlp.lin{j}.{p}"),
    ("mask_decoder.transformer.final_attn_token_to_image.{n}",
     "mask_decoder.transformer.final_attn_token_to_image.{n}"),
    ("mask_decoder.transformer.layer_norm_final_attn.{p}", "mask_decoder.transformer.norm_final_attn.{p}"),
    # mask decoder: tokens and upscaling
    ("mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    ("mask_decoder.upscale_conv1.{p}", "mask_decoder.output_upscaling.0.{p}"),
    ("mask_decoder.upscale_layer_norm.{p}", "mask_decoder.output_upscaling.1.{p}"),
    ("mask_decoder.upscale_conv2.{p}", "mask_decoder.output_upscaling.3.{p}"),
]

_FIELDS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "a": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "n": r"(?:q_proj|k_proj|v_proj|out_proj|qkv|proj)\.(?:weight|bias)|rel_pos_h|rel_pos_w",
}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    regex = "".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for k, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


_HF_RULES = [(_compile(hf), sam) for hf, sam in _PAIRS]
_SAM_RULES = [(_compile(sam), hf) for hf, sam in _PAIRS]


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


#: HuggingFace feed-forward heads: proj_in, layers.0..n-3, proj_out  <->  SAM's MLP layers.0..n-1
_HEADS = r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)"
_HF_MLP = re.compile(_HEADS + r"\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$")
_SAM_MLP = re.compile(_HEADS + r"\.layers\.(\d+)\.(weight|bias)$")

#: keys of HuggingFace checkpoints that duplicate another tensor
_HF_DUPLICATES = ("prompt_encoder.shared_embedding.positional_embedding",)


def strip_wrapper_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Remove a training wrapper's prefix (``model.``, ``sam.``, ...) put before every HF key."""
    for prefix in WRAPPER_PREFIXES:
        if any(k.startswith(prefix + "vision_encoder.") for k in state):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return dict(state)


def is_hf_sam_layout(state: dict[str, Any]) -> bool:
    """True when a state dict looks like a HuggingFace ``SamModel`` (possibly wrapped)."""
    keys = strip_wrapper_prefix(state)
    return any(k.startswith("vision_encoder.") for k in keys) and any(k.startswith("mask_decoder.") for k in keys)


def _mlp_depths(keys, pattern: re.Pattern, hidden_group: int) -> dict[str, int]:
    """Number of hidden ``layers.N`` of each feed-forward head, by head name."""
    depth: dict[str, int] = {}
    for k in keys:
        m = pattern.match(k)
        if m and m.group(hidden_group) is not None:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(hidden_group)) + 1)
    return depth


def hf_to_sam(state: dict[str, Any]) -> dict[str, Any] | None:
    """Rename a HuggingFace ``SamModel`` state dict to segment_anything's layout.

    Returns None when ``state`` is not in HuggingFace layout (the converter
    protocol of :data:`napari_cellseg.core.models.STATE_CONVERTERS`). Keys the
    mapping does not know are kept as they are, so that a strict load names them.
    """
    if not is_hf_sam_layout(state):
        return None
    state = strip_wrapper_prefix(state)
    hidden = _mlp_depths(state, _HF_MLP, 3)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in _HF_DUPLICATES:
            if "shared_image_embedding.positional_embedding" not in state:
                out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = value
            continue
        m = _HF_MLP.match(key)
        if m:
            head, part, idx, kind = m.group(1), m.group(2), m.group(3), m.group(4)
            if part == "proj_in":
                n = 0
            elif part == "proj_out":
                n = hidden.get(head, 0) + 1
            else:
                n = int(idx) + 1
            out[f"mask_decoder.{head}.layers.{n}.{kind}"] = value
            continue
        out[_rename(key, _HF_RULES) or key] = value
    return out


def sam_to_hf(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`hf_to_sam`: segment_anything keys to HuggingFace ``SamModel`` keys.

    Used to write test checkpoints in HuggingFace layout (and to export).
    The positional embedding is written under both HuggingFace names, as
    ``SamModel.state_dict()`` does.
    """
    sam_depth = _mlp_depths(state, _SAM_MLP, 2)
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _SAM_MLP.match(key)
        if m:
            head, n, kind = m.group(1), int(m.group(2)), m.group(3)
            last = sam_depth[head] - 1
            part = "proj_in" if n == 0 else "proj_out" if n == last else f"layers.{n - 1}"
            out[f"mask_decoder.{head}.{part}.{kind}"] = value
            continue
        out[_rename(key, _SAM_RULES) or key] = value
    pe = out.get("shared_image_embedding.positional_embedding")
    if pe is not None:
        out["prompt_encoder.shared_embedding.positional_embedding"] = pe
    return out


def _register() -> None:
    from . import models

    if hf_to_sam not in models.STATE_CONVERTERS:
        models.STATE_CONVERTERS.append(hf_to_sam)


_register()
