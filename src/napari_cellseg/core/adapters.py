"""Fine-tuned adapters in the model catalogue.

:func:`napari_cellseg.core.models.catalogue` imports this module when it
exists; importing it registers

* an entry provider listing every adapter saved in
  ``models.cache_dir() / "adapters"`` (``NAME.safetensors`` + ``NAME.json``,
  written by :func:`napari_cellseg.core.finetune.save_adapter`) as a
  :class:`~napari_cellseg.core.models.ModelEntry` with ``source="adapter"``,
  ``base`` = the base model's name and capabilities ``("prompt", "grid")``
  (prompt recipe) or ``("distance",)`` (distance recipe);
* a loader for ``source="adapter"`` that deep-copies the base model and merges
  the adapter into it (the cached base model is never modified). The loaded
  model's ``meta`` holds the adapter's metadata, with ``meta["output"]``
  (``"mask"`` or ``"distance"``) and, for distance models, ``meta["thresholds"]``.

So an adapter appears in model selection and ``napari-cellseg models`` as soon
as it is saved, and ``load_model("my-adapter")`` works like any other name.

Examples
--------
>>> from napari_cellseg.core import models
>>> all(e.source == "adapter" for e in list_adapter_entries())
True
"""

from __future__ import annotations

from . import models
from .finetune import list_adapters, load_adapter


def list_adapter_entries() -> list[models.ModelEntry]:
    """Catalogue entries of the saved adapters (an unreadable adapter is skipped)."""
    return list_adapters()


def _load(entry: models.ModelEntry, device: str) -> models.LoadedModel:
    return load_adapter(entry.location, device=device)


models.register_entry_provider(list_adapter_entries)
models.register_loader("adapter", _load)
