from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cellseg._napari.model_widget import CUSTOM, ModelSelectionWidget
from napari_cellseg._napari.session import session_for
from napari_cellseg.core import models

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""


def test_widget_lists_catalogue_and_marks_downloads(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = ModelSelectionWidget(viewer)
    labels = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "litemedsam" in labels and "cellseg" in labels
    assert "vit_h (download)" in labels
    assert labels[-1] == CUSTOM
    assert widget.chosen_name() == models.DEFAULT_MODEL == "cellseg"


def test_browse_offers_adapter_files_and_fills_the_path_box(make_napari_viewer, monkeypatch, tmp_path):
    from napari_cellseg._napari import model_widget

    asked = {}

    def fake_dialog(parent, caption, folder, filters):
        asked["filters"] = filters
        return str(tmp_path / "mine.json"), filters

    monkeypatch.setattr(model_widget.QFileDialog, "getOpenFileName", staticmethod(fake_dialog))
    widget = ModelSelectionWidget(make_napari_viewer())
    widget._browse()
    assert "*.json" in asked["filters"] and "*.safetensors" in asked["filters"] and "*.pth" in asked["filters"]
    assert widget.path_edit.text() == str(tmp_path / "mine.json")


def test_loading_a_checkpoint_runs_in_a_worker_and_updates_the_session(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = ModelSelectionWidget(viewer)
    path = tmp_path / "tiny.pth"
    torch.save(models.build_sam("vit_test").state_dict(), path)
    widget.model_combo.setCurrentIndex(widget.model_combo.findData(CUSTOM))
    widget.path_edit.setText(str(path))
    widget.device_combo.setCurrentText("cpu")
    heard = []
    session_for(viewer).model_changed.connect(heard.append)
    widget.load_btn.click()
    assert not widget.load_btn.isEnabled()  # disabled while the worker runs
    qtbot.waitUntil(lambda: widget.load_btn.isEnabled(), timeout=30000)
    assert widget.status.text().startswith("loaded: tiny.pth (vit_test, 64 px) on cpu")
    assert session_for(viewer).model_name == str(path)
    assert heard == [str(path)]


def test_an_adapter_file_from_elsewhere_loads_from_the_path_box(make_napari_viewer, qtbot, tmp_path):
    """A colleague's adapter (its .safetensors and .json in any folder) is picked like a checkpoint file: it loads
    as the adapter, with its distance-map output, and the session holds its path."""
    from conftest import make_cells

    from napari_cellseg.core import finetune as ft
    from napari_cellseg.core.progress import run_to_completion

    base = tmp_path / "tiny.pth"
    torch.save(models.build_sam("vit_test").state_dict(), base)
    image, labels = make_cells(shape=(64, 64), n=4, radius=(5, 8))
    result = run_to_completion(ft.finetune(models.load_model(str(base), device="cpu"),
                                           ft.make_training_data(image, labels),
                                           ft.FinetuneConfig(recipe="distance", epochs=1, minutes=None, views=1)))
    path = ft.save_adapter(result, "shared-cells", directory=tmp_path / "from-a-colleague")
    models.clear_model_cache()
    viewer = make_napari_viewer()
    widget = ModelSelectionWidget(viewer)
    widget.model_combo.setCurrentIndex(widget.model_combo.findData(CUSTOM))
    widget.path_edit.setText(str(path))
    widget.device_combo.setCurrentText("cpu")
    widget.load_btn.click()
    qtbot.waitUntil(lambda: widget.load_btn.isEnabled(), timeout=30000)
    assert widget.status.text().startswith("loaded: shared-cells.safetensors (vit_test, 64 px) on cpu")
    session = session_for(viewer)
    assert session.model_name == str(path)
    assert models.load_model(session.model_name, device="cpu").meta["output"] == "distance"


def test_bfloat16_encoder_choice_reaches_the_session_and_the_other_widgets(make_napari_viewer, qtbot, tmp_path,
                                                                            monkeypatch):
    monkeypatch.delenv(models.PRECISION_ENV, raising=False)
    viewer = make_napari_viewer()
    widget = ModelSelectionWidget(viewer)
    assert widget.precision_combo.currentText() == "auto"  # the product's default without the variable
    path = tmp_path / "tiny.pth"
    torch.save(models.build_sam("vit_test").state_dict(), path)
    widget.model_combo.setCurrentIndex(widget.model_combo.findData(CUSTOM))
    widget.path_edit.setText(str(path))
    widget.device_combo.setCurrentText("cpu")
    widget.precision_combo.setCurrentText("bfloat16")
    widget.load_btn.click()
    qtbot.waitUntil(lambda: widget.load_btn.isEnabled(), timeout=30000)
    assert "bfloat16 encoder" in widget.status.text()
    session = session_for(viewer)
    assert session.precision == "bfloat16"
    model = session.load()  # what the annotation, automatic and fine-tuning widgets get
    assert model.precision == "bfloat16" and model.name == str(path)
    if not models.native_bfloat16("cpu"):
        assert "no native bfloat16" in widget.status.text()
    # auto: the status line says what it resolved to on this CPU
    widget.precision_combo.setCurrentText("auto")
    widget.load_btn.click()
    qtbot.waitUntil(lambda: widget.load_btn.isEnabled(), timeout=30000)
    assert session.load().precision == models.resolve_precision("auto", "cpu")
    assert ("bfloat16 encoder" in widget.status.text()) == models.native_bfloat16("cpu")
    assert "no native bfloat16" not in widget.status.text()


def test_a_corrupt_checkpoint_gives_a_message_not_a_traceback(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = ModelSelectionWidget(viewer)
    path = tmp_path / "broken.pth"
    path.write_bytes(b"garbage")
    widget.model_combo.setCurrentIndex(widget.model_combo.findData(CUSTOM))
    widget.path_edit.setText(str(path))
    widget.load_btn.click()
    qtbot.waitUntil(lambda: widget.load_btn.isEnabled(), timeout=30000)
    assert widget.status.text().startswith("not loaded:") and "could not be read" in widget.status.text()
    assert session_for(viewer).model_name == models.DEFAULT_MODEL


def test_sample_data_opens_without_network(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cellseg", "cells")
    image, labels = viewer.layers
    assert image.data.shape == (512, 512)
    assert int(np.max(labels.data)) == 27


def test_segment_anything_imports_after_the_canvas_exists(tmp_path):
    """Regression: importing torchvision after napari's OpenGL canvas segfaulted (Triton vs Mesa LLVM)."""
    import subprocess
    import sys

    code = (
        "import napari\n"
        "viewer = napari.Viewer(show=False)\n"
        "import napari_cellseg._napari.model_widget\n"
        "from napari_cellseg.core.models import random_model\n"
        "import segment_anything, torchvision\n"
        "random_model('vit_test')\n"
        "print('alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "alive" in out.stdout
