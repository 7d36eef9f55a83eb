"""`napari-cellseg models` and `napari-cellseg predict` as a user runs them."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_cellseg.cli import main


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""



def test_models_lists_catalogue_and_offline_state(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "*cellseg" in out  # the default model
    for name in (" litemedsam", "*cellseg"):  # both work offline (cellseg ships in the package)
        line = next(x for x in out.splitlines() if x.startswith(name))
        assert "offline" in line, line
    assert "download" in next(x for x in out.splitlines() if x.startswith(" vit_h"))


def test_predict_boxes_and_points_write_one_object_per_prompt(tmp_path, tiny_checkpoint, capsys):
    image = np.random.default_rng(0).random((60, 80)).astype(np.float32)
    tifffile.imwrite(tmp_path / "img.tif", image)
    out = tmp_path / "labels.tif"
    code = main(["predict", str(tmp_path / "img.tif"), "--box", "0", "0", "30", "40", "--box", "30", "40", "60", "80",
                 "--point", "10", "70", "--model", str(tiny_checkpoint), "--device", "cpu", "--out", str(out)])
    assert code == 0
    labels = tifffile.imread(out)
    assert labels.shape == (60, 80) and labels.max() <= 3
    assert "3 prompts" in capsys.readouterr().out


def test_predict_on_a_stack_needs_a_plane(tmp_path, tiny_checkpoint, capsys):
    tifffile.imwrite(tmp_path / "stack.tif", np.random.default_rng(0).random((4, 50, 50)).astype(np.float32))
    args = ["predict", str(tmp_path / "stack.tif"), "--box", "0", "0", "20", "20", "--model", str(tiny_checkpoint),
            "--out", str(tmp_path / "o.tif")]
    assert main(args) == 2
    assert "--plane" in capsys.readouterr().err
    assert main(args + ["--plane", "2"]) == 0


def test_predict_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.tif"), "--box", "0", "0", "5", "5", "--out", "o.tif"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-cellseg predict: error: no such image file") and "Traceback" not in err
    assert main(["predict", "--sample", "cells", "--out", str(tmp_path / "o.tif")]) == 2
    assert "at least one --box" in capsys.readouterr().err
    assert main(["predict", "--sample", "cells", "--box", "0", "0", "9", "9", "--model", "vit_nope",
                 "--out", str(tmp_path / "o.tif")]) == 2
    assert "unknown model 'vit_nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_sample_with_default_model_offline(tmp_path):
    out = tmp_path / "sample.tif"
    assert main(["predict", "--sample", "cells", "--gt-boxes", "--device", "cpu", "--out", str(out)]) == 0
    labels = tifffile.imread(out)
    from napari_cellseg.core.io import load_sample

    gt = load_sample("cells").labels
    assert len(np.unique(labels)) - 1 >= 25
    assert ((labels > 0) & (gt > 0)).sum() / ((labels > 0) | (gt > 0)).sum() > 0.4


def test_measure_writes_a_csv_that_reads_back(tmp_path, capsys):
    from napari_cellseg.core.measure import read_csv

    labels = np.zeros((30, 40), np.uint16)
    labels[2:10, 2:10] = 1  # 64 px
    labels[10:14, 2:30] = 5  # touches 1
    image = np.ones(labels.shape, np.float32) * 3
    tifffile.imwrite(tmp_path / "l.tif", labels)
    tifffile.imwrite(tmp_path / "i.tif", image)
    assert main(["measure", str(tmp_path / "l.tif"), "--image", str(tmp_path / "i.tif"),
                 "--out", str(tmp_path / "t.csv")]) == 0
    assert "2 cells, mean area 88.0 px" in capsys.readouterr().out
    table = read_csv(tmp_path / "t.csv")
    assert table["label"].tolist() == [1, 5]
    assert table["area"].tolist() == [64, 112]
    assert table["n_neighbors"].tolist() == [1, 1]
    assert table["mean_intensity"].tolist() == [3.0, 3.0]
    tifffile.imwrite(tmp_path / "wrong.tif", np.zeros((5, 5), np.float32))
    assert main(["measure", str(tmp_path / "l.tif"), "--image", str(tmp_path / "wrong.tif"),
                 "--out", str(tmp_path / "t.csv")]) == 2
