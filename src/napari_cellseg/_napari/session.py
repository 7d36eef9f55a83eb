"""Per-viewer state shared by the plugin's widgets: which model is selected.

Every widget gets its viewer from npe2; :func:`session_for` returns the one
:class:`Session` of that viewer (no global state beyond a weak per-viewer map),
so the annotation, automatic and fine-tuning widgets all use the model chosen
in the model-selection widget and hear when it changes.
"""

from __future__ import annotations

import weakref

from psygnal import Signal

from napari_cellseg.core.models import DEFAULT_MODEL


class Session:
    """The model choice of one napari viewer.

    Attributes
    ----------
    model_name : str
        Catalogue name or checkpoint path.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    precision : str or None
        Arithmetic of the image encoder (``"float32"`` or ``"bfloat16"``); None:
        :func:`~napari_cellseg.core.models.load_model`'s default.

    Signals
    -------
    model_changed(str)
        Emitted with the new model name when the selection changes.
    """

    model_changed = Signal(str)

    def __init__(self) -> None:
        self.model_name: str = DEFAULT_MODEL
        self.device: str = "auto"
        self.precision: str | None = None

    def select(self, model_name: str, device: str | None = None, precision: str | None = None) -> None:
        """Choose a model (and optionally a device and encoder precision); listeners hear about it."""
        changed = (model_name != self.model_name or (device is not None and device != self.device)
                   or (precision is not None and precision != self.precision))
        self.model_name = model_name
        if device is not None:
            self.device = device
        if precision is not None:
            self.precision = precision
        if changed:
            self.model_changed.emit(model_name)

    def load(self, progress: bool = False):
        """Load (or take from the cache) the selected model. Call from a worker thread."""
        from napari_cellseg.core.models import load_model

        return load_model(self.model_name, device=self.device, progress=progress, precision=self.precision)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer) -> Session:
    """The :class:`Session` of a viewer, created on first use."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = Session()
        _SESSIONS[viewer] = session
    return session
