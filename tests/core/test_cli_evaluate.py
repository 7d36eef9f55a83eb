"""``napari-cellseg evaluate`` on a folder with matching, missing-partner and wrong-shape files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from napari_cellseg._commands.evaluate import pair_files, pairing_key
from napari_cellseg.cli import main


def cells(shape=(20, 30), n=3):
    labels = np.zeros(shape, np.uint16)
    for k in range(n):
        labels[2 : 2 + 5, 2 + 9 * k : 2 + 9 * k + 6] = 10 + k
    return labels


@pytest.fixture
def folders(tmp_path):
    from skimage.io import imsave

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    a = cells(n=3)
    tifffile.imwrite(gt / "a_labels.tif", a)
    tifffile.imwrite(pred / "a_masks.tif", (a * 2).astype(np.uint16))  # same cells, other labels
    b = cells(n=2)
    tifffile.imwrite(gt / "b.tif", b)
    b_pred = b.copy()
    b_pred[b_pred == 11] = 0  # one of two cells missed
    imsave(pred / "b.png", b_pred, check_contrast=False)
    tifffile.imwrite(gt / "c.tif", cells())
    tifffile.imwrite(pred / "c.tif", cells(shape=(21, 30)))  # wrong shape
    tifffile.imwrite(pred / "d_pred.tif", cells())  # no ground truth
    tifffile.imwrite(gt / "e.tif", cells())  # no prediction
    (pred / "notes.txt").write_text("not an image")
    return pred, gt


def test_evaluate_folders(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "results" / "eval"
    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0

    lines = printed.splitlines()
    header = lines[0].split()
    assert header == ["image", "n_gt", "n_pred", "AP@0.5", "AP@0.75", "AP@0.9", "F1@0.5", "SEG", "DET"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line and not line.startswith("-")}
    assert rows["a_labels"] == ["3", "3", "1.000", "1.000", "1.000", "1.000", "1.000", "1.000"]
    assert rows["b"] == ["2", "1", "0.500", "0.500", "0.500", "0.667", "0.500", "0.500"]
    assert rows["mean"] == ["0.750", "0.750", "0.750", "0.833", "0.750", "0.750"]
    assert rows["pooled"] == ["5", "4", "0.800", "0.800", "0.800", "0.889", "0.800", "0.800"]
    assert "Evaluated 2 image pair(s); skipped 3 file(s)." in printed
    assert f"skipped {pred / 'c.tif'}: gt has shape (20, 30) but pred has shape (21, 30)" in printed
    assert f"skipped {pred / 'd_pred.tif'}: no ground-truth file with a matching name" in printed
    assert f"skipped {gt / 'e.tif'}: no predicted file with a matching name" in printed
    assert "notes.txt" not in printed

    report = json.loads((tmp_path / "results" / "eval.json").read_text())
    assert report["thresholds"] == [0.5, 0.75, 0.9]
    assert [im["name"] for im in report["images"]] == ["a_labels", "b"]
    b = report["images"][1]
    assert b["pred_file"] == str(pred / "b.png") and b["gt_file"] == str(gt / "b.tif")
    assert b["scores"][0]["tp"] == 1 and b["scores"][0]["fn"] == 1 and b["scores"][0]["fp"] == 0
    assert b["scores"][0]["ap"] == 0.5 and b["seg"] == 0.5 and b["det"] == 0.5
    assert report["mean"]["ap@0.5"] == 0.75 and report["mean"]["f1@0.5"] == pytest.approx(5 / 6, rel=1e-15)
    assert report["pooled"]["scores"][0]["ap"] == 0.8 and report["pooled"]["n_images"] == 2
    assert sorted(s["file"] for s in report["skipped"]) == sorted(
        [str(pred / "c.tif"), str(pred / "d_pred.tif"), str(gt / "e.tif")]
    )

    with open(tmp_path / "results" / "eval.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == ["a_labels", "b", "mean", "pooled"]
    assert float(table[1]["ap@0.5"]) == 0.5 and int(table[1]["tp@0.5"]) == 1
    assert float(table[2]["ap@0.5"]) == 0.75 and table[2]["tp@0.5"] == ""
    assert float(table[3]["ap@0.5"]) == 0.8 and int(table[3]["n_gt"]) == 5 and int(table[3]["fn@0.5"]) == 1


def test_custom_thresholds_and_single_files(folders, tmp_path, capsys):
    pred, gt = folders
    code = main(["evaluate", "--pred", str(pred / "b.png"), "--gt", str(gt / "b.tif"), "--iou", "0.3", "0.95"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.splitlines()[0].split()[3:5] == ["AP@0.3", "AP@0.95"]
    assert "skipped 0 file(s)" in printed
    assert not list(tmp_path.glob("*.json"))  # nothing written without --out

    # one predicted file, its partner looked up by name in a folder; the folder's other files are no concern
    code = main(["evaluate", "--pred", str(pred / "a_masks.tif"), "--gt", str(gt)])
    printed = capsys.readouterr().out
    assert code == 0 and "a_labels" in printed and "e.tif" not in printed


def test_nothing_evaluated_exits_2(folders, capsys):
    pred, gt = folders
    code = main(["evaluate", "--pred", str(pred / "d_pred.tif"), "--gt", str(gt)])
    captured = capsys.readouterr()
    assert code == 2
    assert "d_pred.tif: no ground-truth file with a matching name" in captured.out
    assert "no image pair could be evaluated" in captured.err

    code = main(["evaluate", "--pred", str(pred / "c.tif"), "--gt", str(gt / "c.tif")])
    assert code == 2 and "shape" in capsys.readouterr().out


def test_user_errors_exit_2(folders, tmp_path, capsys):
    pred, gt = folders
    assert main(["evaluate", "--pred", str(tmp_path / "missing"), "--gt", str(gt)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--iou", "0"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(empty), "--gt", str(gt)]) == 2
    assert "no .tif" in capsys.readouterr().err


def test_fractional_labels_are_reported_not_crashed_on(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    tifffile.imwrite(tmp_path / "g" / "x.tif", cells())
    tifffile.imwrite(tmp_path / "p" / "x.tif", cells().astype(np.float32) / 3)
    tifffile.imwrite(tmp_path / "g" / "y.tif", cells())
    tifffile.imwrite(tmp_path / "p" / "y.tif", cells())
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert "fractional values" in printed and "Evaluated 1 image pair(s)" in printed


def test_a_mask_given_as_labels_is_reported_not_scored(tmp_path, capsys):
    """A binary mask as ground truth (all cells label 1) would score as one object: the pair is skipped with the
    reason, the others are evaluated."""
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    tifffile.imwrite(tmp_path / "g" / "x.tif", (cells() > 0).astype(np.uint8))
    tifffile.imwrite(tmp_path / "p" / "x.tif", cells())
    tifffile.imwrite(tmp_path / "g" / "y.tif", cells())
    tifffile.imwrite(tmp_path / "p" / "y.tif", (cells() > 0).astype(np.uint8) * 7)
    tifffile.imwrite(tmp_path / "g" / "z.tif", cells())
    tifffile.imwrite(tmp_path / "p" / "z.tif", cells())
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert "Evaluated 1 image pair(s); skipped 2 file(s)" in printed
    assert "ground truth x.tif: all 3 painted regions share the label 1" in printed
    assert "prediction y.tif: all 3 painted regions share the label 7" in printed


def test_pairing_rules(tmp_path):
    assert pairing_key("Img01_cp_masks") == "img01"
    assert pairing_key("img01_labels") == "img01"
    assert pairing_key("img01_label_masks") == "img01"
    assert pairing_key("masks") == "masks"
    p = [tmp_path / n for n in ("x.tif", "x_masks.tif", "y_pred.png", "z.tif")]
    g = [tmp_path / n for n in ("x.tif", "y_gt.tif", "z_labels.tif", "z_mask.tif")]
    pairs, problems = pair_files(p, g)
    assert [(pr.pred.name, pr.gt.name) for pr in pairs] == [("x.tif", "x.tif"), ("y_pred.png", "y_gt.tif")]
    reasons = {pathlib_name(d["file"]): d["reason"] for d in problems}
    assert reasons["x_masks.tif"] == "no ground-truth file with a matching name"
    assert reasons["z.tif"].startswith("ambiguous name")
    assert reasons["z_labels.tif"].startswith("ambiguous name")


def pathlib_name(path: str) -> str:
    from pathlib import Path

    return Path(path).name
