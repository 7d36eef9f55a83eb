"""``napari-cellseg finetune``: trains, prints progress, saves an adapter; clear errors; Ctrl-C keeps the best."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_cellseg import cli
from napari_cellseg.core import finetune as ft
from napari_cellseg.core import models


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""


@pytest.fixture
def files(tmp_path):
    from conftest import make_cells

    image, labels = make_cells(shape=(96, 96), n=8, radius=(6, 11))
    img, lab = tmp_path / "cells.tif", tmp_path / "cells_labels.tif"
    tifffile.imwrite(img, image)
    tifffile.imwrite(lab, labels)
    ckpt = tmp_path / "tiny.pth"
    torch.save(models.random_model("vit_test").sam.state_dict(), ckpt)
    return str(img), str(lab), str(ckpt), labels


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_finetune_command_trains_and_saves_an_adapter(files, capsys):
    img, lab, ckpt, labels = files
    rc, out, err = _run(["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--recipe", "distance",
                         "--epochs", "2", "--config", '{"views": 2}', "--device", "cpu", "--out", "cli-cells"], capsys)
    assert rc == 0, err
    assert "finetune [" in err and "step 1" in err  # progress on stderr
    assert "saved model 'cli-cells'" in out
    entry = models.catalogue()["cli-cells"]
    assert entry.source == "adapter" and entry.capabilities == ("distance",) and entry.base == ckpt
    meta = json.loads((models.cache_dir() / "adapters" / "cli-cells.json").read_text())
    assert meta["config"]["epochs"] == 2 and meta["data"]["cells"] == len(np.unique(labels)) - 1
    assert models.load_model("cli-cells", device="cpu").meta["output"] == "distance"
    # the same name again needs --overwrite
    rc, _, err = _run(["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--epochs", "1",
                       "--out", "cli-cells"], capsys)
    assert rc == 2 and "exists" in err and "--overwrite" in err


def test_validation_images_and_region(files, capsys):
    img, lab, ckpt, _ = files
    rc, out, err = _run(["finetune", "--image", img, "--labels", lab, "--val-image", img, "--val-labels", lab,
                         "--region", "extent", "--base", ckpt, "--epochs", "1",
                         "--config", '{"views": 2, "eval_every": 1}', "--out", "with-val"], capsys)
    assert rc == 0, err
    assert "best validation AP@0.5" in out
    assert json.loads((models.cache_dir() / "adapters" / "with-val.json").read_text())["data"]["regions"][0] \
        .startswith("labels' extent")


@pytest.mark.parametrize("extra, match", [
    (["--labels", "{lab}"], "2 --labels"),
    (["--region", "1,2,3"], "--region must be"),
    (["--config", "{{not json"], "not valid JSON"),
    (["--config", '{{"learning_rate": 1}}'], "unknown fine-tuning settings"),
])
def test_user_errors_are_one_line(files, capsys, extra, match):
    img, lab, ckpt, _ = files
    argv = ["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--epochs", "1", "--out", "x"]
    argv += [a.format(lab=lab) for a in extra]
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert match in err and "Traceback" not in err


def test_labels_without_cells_and_bad_names(files, capsys, tmp_path):
    img, lab, ckpt, _ = files
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((96, 96), np.uint16))
    rc, _, err = _run(["finetune", "--image", img, "--labels", str(empty), "--base", ckpt, "--epochs", "1",
                       "--out", "x"], capsys)
    assert rc == 2 and "no cells" in err
    rc, _, err = _run(["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--epochs", "1",
                       "--out", "../x"], capsys)
    assert rc == 2 and "not valid" in err
    assert not (models.cache_dir() / "adapters").exists()


def test_ctrl_c_saves_the_best_model_so_far(files, capsys, monkeypatch):
    img, lab, ckpt, _ = files
    real = ft.Finetuner._distance_loss
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ft.Finetuner, "_distance_loss", interrupted)
    rc, out, err = _run(["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--recipe", "distance",
                         "--epochs", "100", "--config", '{"views": 1}', "--out", "stopped"], capsys)
    assert rc == 130
    assert "interrupted: cancelled after 2 steps" in out
    meta = json.loads((models.cache_dir() / "adapters" / "stopped.json").read_text())
    assert meta["metrics"]["steps"] == 2


def test_encoder_lora_in_the_last_blocks(files, capsys):
    img, lab, ckpt, _ = files
    rc, out, err = _run(["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--recipe", "distance",
                         "--epochs", "1", "--config", '{"views": 2}', "--encoder-lora-blocks", "1",
                         "--device", "cpu", "--out", "tail-lora"], capsys)
    assert rc == 0, err
    meta = json.loads((models.cache_dir() / "adapters" / "tail-lora.json").read_text())
    assert meta["config"]["encoder_lora"] is True and meta["config"]["encoder_lora_blocks"] == 1
    from safetensors.torch import load_file

    tensors = load_file(str(models.cache_dir() / "adapters" / "tail-lora.safetensors"))
    layers = {k.split(".qkv.", 1)[1].rsplit(".", 1)[0] for k in tensors if ".qkv." in k}
    assert layers == {list(ft.fused_qkv_layers(models.random_model("vit_test").sam))[-1]}
    for n, match in (("0", "at least 1"), ("99", "attention blocks")):
        rc, _, err = _run(["finetune", "--image", img, "--labels", lab, "--base", ckpt, "--epochs", "1",
                           "--encoder-lora-blocks", n, "--device", "cpu", "--out", "bad-tail"], capsys)
        assert rc == 2 and match in err and "Traceback" not in err, err
