"""Model selection: pick a catalogue model or a checkpoint file and a device, load it in a worker."""

from __future__ import annotations

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_cellseg._napari.session import session_for

CUSTOM = "Checkpoint file…"


def _load(name: str, device: str, precision: str | None = None):
    """Worker body: load a model (download if needed), yielding a busy marker first."""
    yield f"loading {name}…"
    from napari_cellseg.core.models import load_model

    return load_model(name, device=device, progress=False, precision=precision)


class ModelSelectionWidget(QWidget):
    """Choose the model every napari-cellseg widget of this viewer uses.

    The dropdown lists the catalogue; entries whose weights are not on disk
    are marked "(download)". A checkpoint file can be picked instead. Loading
    runs in a thread worker; the status line says what is loaded and where.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self._worker = None

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Catalogue models; '(download)' ones are fetched on first use")
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("path to a .pth / .pt / .safetensors checkpoint")
        self.browse_btn = QPushButton("Browse…")
        self.browse_btn.clicked.connect(self._browse)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_combo.setToolTip("auto: CUDA GPU, then Apple MPS, then CPU")
        self.precision_combo = QComboBox()
        from napari_cellseg.core.models import PRECISION_CHOICES, default_precision

        self.precision_combo.addItems(list(PRECISION_CHOICES))
        self.precision_combo.setToolTip(
            "Arithmetic of the image encoder (and of the distance map's refiner and the grid and guided modes' "
            "prompt decoder). bfloat16: about 2x faster embeddings and grid mode on CPUs with native bfloat16 "
            "(AVX-512 BF16 or AMX: recent Intel Xeon, AMD Zen 4 and later), slower on other CPUs; masks differ "
            "slightly, with the same accuracy (docs/benchmarks.md). auto: bfloat16 on such a CPU, float32 "
            "elsewhere; the status line says which one the loaded model runs with")
        try:
            self.precision_combo.setCurrentText(default_precision())
        except ValueError:  # a wrong $NAPARI_CELLSEG_PRECISION is reported when a model loads
            pass
        self.load_btn = QPushButton("Load model")
        self.load_btn.clicked.connect(self.load)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.status = QLabel("no model loaded")
        self.status.setWordWrap(True)
        self.description = QLabel("")
        self.description.setWordWrap(True)

        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit)
        path_row.addWidget(self.browse_btn)
        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Checkpoint", path_row)
        form.addRow("Device", self.device_combo)
        form.addRow("Encoder arithmetic", self.precision_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.description)
        layout.addWidget(self.load_btn)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._on_choice)
        self.refresh()
        self.session.model_changed.connect(self._on_session_changed)

    # -- catalogue ---------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the catalogue (new fine-tuned adapters appear here)."""
        from napari_cellseg.core.models import catalogue, is_available_offline

        current = self.session.model_name
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for name, entry in catalogue().items():
            label = name if is_available_offline(entry) else f"{name} (download)"
            self.model_combo.addItem(label, name)
            self.model_combo.setItemData(self.model_combo.count() - 1, entry.description, Qt.ToolTipRole)
        self.model_combo.addItem(CUSTOM, CUSTOM)
        idx = self.model_combo.findData(current)
        if idx < 0:
            idx = self.model_combo.findData(CUSTOM)
            self.path_edit.setText(current)
        self.model_combo.setCurrentIndex(idx)
        self.model_combo.blockSignals(False)
        self._on_choice()

    def chosen_name(self) -> str:
        data = self.model_combo.currentData()
        if data == CUSTOM:
            return self.path_edit.text().strip()
        return data

    def _on_choice(self, *_):
        from napari_cellseg.core.models import catalogue

        custom = self.model_combo.currentData() == CUSTOM
        self.path_edit.setEnabled(custom)
        self.browse_btn.setEnabled(custom)
        entry = catalogue().get(self.model_combo.currentData())
        self.description.setText(
            f"{entry.description} — {entry.input_size} px input, licence {entry.licence}" if entry else
            "a SAM vit_b/l/h or LiteMedSAM checkpoint (weights only; nothing in it is executed)"
        )

    def _on_session_changed(self, name: str) -> None:
        if name != self.chosen_name():
            self.refresh()

    def _browse(self) -> None:
        # an adapter is a .safetensors file beside its .json: either file loads it
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint or an adapter", "",
                                              "Checkpoints and adapters (*.pth *.pt *.safetensors *.ckpt *.bin "
                                              "*.json)")
        if path:
            self.path_edit.setText(path)

    # -- loading -----------------------------------------------------------------

    def load(self) -> None:
        """Load the chosen model in a worker; the status line reports the outcome."""
        name = self.chosen_name()
        if not name:
            show_error("Choose a model, or give the path of a checkpoint file")
            return
        device = self.device_combo.currentText()
        precision = self.precision_combo.currentText()
        self.load_btn.setEnabled(False)
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)  # busy: downloads report to the terminal
        self.status.setText(f"loading {name}…")
        # errored is connected at creation, so napari reports the error once
        # (a notification) instead of re-raising it in the event loop
        worker = create_worker(
            _load,
            name,
            device,
            precision,
            _connect={
                "yielded": self.status.setText,
                "returned": lambda model: self._loaded(name, device, precision, model),
                "errored": self._failed,
                "finished": self._done,
            },
            _start_thread=False,
        )
        self._worker = worker
        worker.start()

    def _loaded(self, name: str, device: str, precision: str, model) -> None:
        self.session.select(name, device, precision)
        from napari_cellseg.core.models import native_bfloat16

        note = ""
        if model.precision == "bfloat16" and not native_bfloat16(model.device):
            note = f" — {model.device} has no native bfloat16: float32 is probably faster here"
        self.status.setText(f"loaded: {model.describe()}{note}")
        show_info(f"napari-cellseg: {model.describe()}")

    def _failed(self, exc: Exception) -> None:
        # napari's worker already shows the error as a notification
        self.status.setText(f"not loaded: {exc}")

    def _done(self) -> None:
        self.progress.setVisible(False)
        self.load_btn.setEnabled(True)
        self._worker = None
