"""The box head of fine-tuned models: a copy of the mask decoder trained to answer box prompts.

LiteMedSAM learned boxes on medical scans, not on cells; its decoder draws a
phase-contrast cell's halo or a stained nucleus's rim its own way. Training
its prompt pathway on cells with the image encoder frozen (the ``prompt`` and
``joint`` recipes) trains one decoder for points and boxes together, and
lowered box IoU (docs/model_card.md). A model with

* ``sam.box_decoder``: its own copy of the mask decoder, read only by box
  prompts (a box, with or without points: the annotation mode's boxes, and
  the clicks it answers from the cell map through that cell's box)

keeps LiteMedSAM's decoder for lone points and the grid mode and lets the
copy learn boxes alone, from windows cut and zoomed the way the annotation
mode cuts them (``training/train_box_head.py``). The image encoder and the
prompt encoder stay shared. The copy is an ordinary submodule of the ``Sam``,
saved with an adapter like any fully trained tensor (``box_decoder.*``);
:meth:`napari_cellseg.core.predictor.Predictor.decode` uses it.
"""

from __future__ import annotations

from typing import Any

BOX_DECODER_ATTR = "box_decoder"


def get_box_decoder(sam) -> Any | None:
    """The model's own box decoder, or None (boxes then go to its mask decoder)."""
    return getattr(sam, BOX_DECODER_ATTR, None)


def attach_box_decoder(sam):
    """Give ``sam`` its own box decoder (a copy of its mask decoder) unless it has one; return it."""
    from .distance_head import _attach_copy

    return _attach_copy(sam, BOX_DECODER_ATTR, sam.mask_decoder)


def decoder_for(sam, has_box: bool):
    """The decoder a prompt set goes to: the box decoder for prompts with a box where the model has one."""
    box = get_box_decoder(sam) if has_box else None
    return sam.mask_decoder if box is None else box
