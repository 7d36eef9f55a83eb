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
    if entry.known_hash:  # a catalogue entry (the packaged default model): check the file first
        from pathlib import Path

        if not Path(entry.location).is_file():
            raise FileNotFoundError(
                f"the weights of {entry.name!r} are missing from this installation ({entry.location}): "
                "reinstall napari-cellseg, or choose another model")
        try:
            models.verify_hash(entry.location, entry.known_hash)
        except ValueError as exc:
            raise ValueError(f"the weights of {entry.name!r} in this installation are corrupt ({exc}); "
                             "reinstall napari-cellseg") from None
    return load_adapter(entry.location, device=device)


models.register_entry_provider(list_adapter_entries)
models.register_loader("adapter", _load)
