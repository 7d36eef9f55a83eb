"""The distance-map head of fine-tuned models: its own mask decoder and a full-resolution refiner.

SAMCell's automatic mode reads a per-cell distance map from SAM's mask
decoder given the default (empty) prompt. A model that must also answer
clicks and boxes (the joint recipe, the packaged ``cellseg`` model) would
share every decoder weight, even the output token, between two opposite
jobs: a smooth map over all cells, and one cell's binary mask. This module
gives such models

* ``sam.distance_decoder``: a second copy of the mask decoder, used only for
  the default prompt (the image encoder and its neck stay shared), so the
  distance map and the prompt masks are trained without fighting; and
* ``sam.distance_refiner``: a small U-Net that corrects the decoder's logits
  from the crop's own pixels. With the image encoder frozen (how fine-tuning
  runs on a CPU), the decoder answers with a per-token read-out of frozen
  features: none of its layers mixes neighbouring image tokens and its
  upscaling is two transposed 2 x 2 convolutions, so maps come out blocky (a
  4 px checkerboard) and blind to the thin borders between touching cells.
  The refiner reads the crop at the decoder's output resolution, the
  decoder's logits and the image embedding (at its coarsest scale), and adds
  a correction to the logits; its last layer starts at zero, so a model
  starts exactly as its decoder. HQ-SAM (Ke et al., 2023) fuses early
  high-resolution features with the decoder's for the same reason; here the
  high-resolution input is the image, so nothing more is cached in training.

A model trained with LoRA in its image encoder for the map (a GPU run, the
distance recipe with ``encoder_lora`` on such a model) also has

* ``sam.distance_encoder``: its own copy of the image encoder, into which the
  LoRA updates go, so the prompts keep reading the base model's encoder. The
  map is computed on its own crops anyway (automatic modes, the annotation
  mode's cell map), so the copy costs memory (about 20 MB for TinyViT-5M),
  not time.

Both are ordinary submodules of the ``Sam`` and are saved with an adapter
like any fully trained tensor (``distance_decoder.*``, ``distance_refiner.*``);
:func:`napari_cellseg.core.predictor.distance_logits` uses them. Prompts
(points, boxes, the grid) never do.
"""

from __future__ import annotations

from typing import Any

REFINER_ATTR = "distance_refiner"
DECODER_ATTR = "distance_decoder"
NECK_ATTR = "distance_neck"
ENCODER_ATTR = "distance_encoder"
DEFAULT_CHANNELS = 16


def _refiner_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, padding=1)

    class DistanceRefiner(nn.Module):
        """``refined = logits + head(image, logits, embedding)``; see the module docstring.

        Parameters
        ----------
        channels : int
            Width at full resolution (doubled at the two coarser scales).
        embed_dim : int
            Channels of the image embedding (256 for every SAM).
        """

        def __init__(self, channels: int = DEFAULT_CHANNELS, embed_dim: int = 256) -> None:
            super().__init__()
            c = int(channels)
            self.channels = c
            self.embed_dim = int(embed_dim)
            self.enc1 = nn.Sequential(conv(4, c), nn.ReLU(), conv(c, c), nn.ReLU())
            self.enc2 = nn.Sequential(nn.MaxPool2d(2), conv(c, 2 * c), nn.ReLU(), conv(2 * c, 2 * c), nn.ReLU())
            self.enc3 = nn.Sequential(nn.MaxPool2d(2), conv(2 * c, 2 * c), nn.ReLU())
            self.embed_proj = nn.Conv2d(self.embed_dim, 2 * c, 1)
            self.mid = nn.Sequential(conv(4 * c, 2 * c), nn.ReLU())
            self.dec2 = nn.Sequential(conv(4 * c, 2 * c), nn.ReLU())
            self.dec1 = nn.Sequential(conv(3 * c, c), nn.ReLU())
            self.out = nn.Conv2d(c, 1, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, image01, logits, embedding):
            """Refined logits.

            Parameters
            ----------
            image01 : Tensor (B, 3, H, W)
                The crops in [0, 1], at the logits' size (``H = W``, a multiple of 4).
            logits : Tensor (B, 1, H, W)
                The mask decoder's default-prompt logits.
            embedding : Tensor (B, embed_dim, h, w)
                The image embedding the logits came from.
            """
            # inference on a CPU: channels-last maps and weights, oneDNN's fast layout for these narrow
            # convolutions (1.7x in bfloat16); training and GPUs run the layers as they are
            fast = logits.device.type == "cpu" and not torch.is_grad_enabled()
            run = (lambda layers, t: _run_channels_last(layers, t)) if fast else (lambda layers, t: layers(t))
            x = torch.cat([image01 - 0.5, torch.tanh(logits / 4.0)], dim=1)
            if fast:
                x = x.contiguous(memory_format=torch.channels_last)
                embedding = embedding.contiguous(memory_format=torch.channels_last)
            a = run(self.enc1, x)
            b = run(self.enc2, a)
            c = run(self.enc3, b)
            e = run(self.embed_proj, embedding)
            if e.shape[-2:] != c.shape[-2:]:
                e = F.interpolate(e, c.shape[-2:], mode="bilinear", align_corners=False)
            c = run(self.mid, torch.cat([c, e], dim=1))
            u = F.interpolate(c, b.shape[-2:], mode="bilinear", align_corners=False)
            u = run(self.dec2, torch.cat([u, b], dim=1))
            u = F.interpolate(u, a.shape[-2:], mode="bilinear", align_corners=False)
            u = run(self.dec1, torch.cat([u, a], dim=1))
            return logits + run(self.out, u).contiguous()

    def _run_channels_last(layers, x):
        """``layers(x)`` with each convolution's weight in channels-last layout (a copy: the parameters keep
        theirs, so training and saving see them unchanged)."""
        for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
            if type(layer) is nn.Conv2d:
                weight = layer.weight.contiguous(memory_format=torch.channels_last)
                x = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                x = layer(x)
        return x

    return DistanceRefiner


def make_refiner(channels: int = DEFAULT_CHANNELS, embed_dim: int = 256):
    """A new :class:`DistanceRefiner` (identity at start: its output layer is zero)."""
    return _refiner_class()(channels, embed_dim)


def attach_refiner(sam, channels: int = DEFAULT_CHANNELS):
    """Give ``sam`` a fresh refiner (on its device) unless it has one; return the refiner."""
    existing = get_refiner(sam)
    if existing is not None:
        return existing
    embed_dim = int(sam.mask_decoder.transformer_dim)
    device = next(sam.mask_decoder.parameters()).device
    refiner = make_refiner(channels, embed_dim).to(device)
    setattr(sam, REFINER_ATTR, refiner)
    return refiner


def get_refiner(sam) -> Any | None:
    return getattr(sam, REFINER_ATTR, None)


def refiner_channels_from_tensors(names_and_shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The width of the refiner stored in adapter tensors (``None`` when they hold none)."""
    for name, shape in names_and_shapes.items():
        if name.endswith(f"{REFINER_ATTR}.enc1.0.weight"):
            return int(shape[0])
    return None


def get_distance_decoder(sam) -> Any | None:
    return getattr(sam, DECODER_ATTR, None)


def _attach_copy(sam, attr: str, source):
    """Set ``sam.<attr>`` to a deep copy of ``source`` unless it is set; return it."""
    import copy

    existing = getattr(sam, attr, None)
    if existing is None:
        existing = copy.deepcopy(source)
        setattr(sam, attr, existing)
    return existing


def attach_distance_decoder(sam):
    """Give ``sam`` its own distance decoder (a copy of its mask decoder) unless it has one; return it."""
    return _attach_copy(sam, DECODER_ATTR, sam.mask_decoder)


def distance_decoder_of(sam):
    """The decoder that answers the default prompt: the distance decoder when there is one."""
    decoder = get_distance_decoder(sam)
    return sam.mask_decoder if decoder is None else decoder



def get_distance_neck(sam) -> Any | None:
    return getattr(sam, NECK_ATTR, None)


def attach_distance_neck(sam):
    """Give ``sam`` its own distance-path neck (a copy of its image encoder's neck) unless it has one."""
    return _attach_copy(sam, NECK_ATTR, sam.image_encoder.neck)


def get_distance_encoder(sam) -> Any | None:
    return getattr(sam, ENCODER_ATTR, None)


def attach_distance_encoder(sam):
    """Give ``sam`` its own distance-path image encoder (a copy of its image encoder) unless it has one.

    Only the copy's layers before the neck are read (the distance path has its
    own neck, :func:`attach_distance_neck`).
    """
    return _attach_copy(sam, ENCODER_ATTR, sam.image_encoder)


def distance_features(sam, x):
    """Image embeddings for the distance path of encoder inputs ``x`` (normalised as the encoder expects).

    The image encoder's output, or, for a model with its own distance neck, the
    features before the encoder's neck (of the distance encoder when the model
    has one) through that neck.
    """
    neck = get_distance_neck(sam)
    if neck is None:
        return sam.image_encoder(x)
    from .finetune import encoder_before_neck

    encoder = get_distance_encoder(sam)
    return neck(encoder_before_neck(sam.image_encoder if encoder is None else encoder, x))


def keep_base_prompt_path(tensors: dict) -> dict:
    """Adapter tensors whose prompt pathway is the base model's, unchanged: only the distance head trains.

    A joint-recipe adapter trains the image encoder's neck for both the distance
    map and the prompts, and the mask decoder and point embeddings for the
    prompts. This keeps its distance path (the trained neck, renamed
    ``distance_neck``, its ``distance_decoder`` and ``distance_refiner``) and
    drops what changed the prompts, so clicks, boxes and the grid mode answer
    exactly as the base model does. Used for the packaged model: with the
    image encoder frozen, prompt training lowered box IoU below zero-shot
    LiteMedSAM's without raising click IoU (docs/model_card.md).

    Raises
    ------
    ValueError
        When the tensors hold no separate distance decoder (the distance map
        would then depend on the dropped prompt decoder).
    """
    if not any(".full.distance_decoder." in k for k in tensors):
        raise ValueError("these adapter tensors have no separate distance decoder: nothing to keep apart")
    out = {}
    for key, value in tensors.items():
        stage, _, rest = key.partition(".")
        if rest.startswith("full.image_encoder.neck."):
            out[f"{stage}.full.{NECK_ATTR}." + rest[len("full.image_encoder.neck."):]] = value
        elif rest.startswith(("full.mask_decoder.", "full.prompt_encoder.", "lora.mask_decoder.")):
            continue
        else:
            out[key] = value
    return out
