"""``napari-cellseg predict``: one object per box and per click, negative clicks, the default model."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.measure import regionprops

from napari_cellseg.cli import main
from napari_cellseg.core import models
from napari_cellseg.core.predictor import Predictor

from conftest import make_cells


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""



@pytest.fixture
def disk_decoder(monkeypatch):
    """Replace the mask decoder by a known answer: a disk of radius 8 px around each object's positive point,
    minus a disk of radius 5 px around each of its negative points; predicted IoU 0.9, 0.8, ... by object.

    The command's own path (prompt grouping, windows, upsampling, threshold, crops, painting) runs unchanged.
    """

    def decode(self, points_rc=None, point_labels=None, boxes_rc=None, mask_input=None, multimask=False,
               upsample=True, best=False):
        emb = self.embedding
        g = self.model.sam.prompt_encoder.image_embedding_size[0] * 4  # low-resolution side
        step = self.model.input_size / g  # model pixels per low-resolution pixel
        yy, xx = np.mgrid[0:g, 0:g] * step + step / 2  # low-res pixel centres in model (y, x)
        scale = emb.transform.resized_shape[0] / emb.image_shape[0]  # model pixels per image pixel
        pts = np.asarray(points_rc, float)
        lab = np.asarray(point_labels, float)
        low = np.full((len(pts), 1, g, g), -10.0, np.float32)
        for b in range(len(pts)):
            for (r, c), kind in zip(pts[b], lab[b]):
                d = np.hypot(yy - (r + 0.5) * scale, xx - (c + 0.5) * scale) / scale  # image pixels
                if kind == 1:
                    low[b, 0] = np.maximum(low[b, 0], 8.0 - d)
                elif kind == 0:
                    low[b, 0] = np.where(d < 5.0, -10.0, low[b, 0])
        scores = (0.9 - 0.1 * np.arange(len(pts), dtype=np.float32))[:, None]
        return None, scores, low

    monkeypatch.setattr(Predictor, "decode", decode)


def test_one_object_per_point_each_containing_its_point(tmp_path, tiny_checkpoint, disk_decoder, capsys):
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).random((90, 120)).astype(np.float32))
    points = [(20, 25), (60, 90), (30, 100), (70, 30)]
    args = ["predict", str(tmp_path / "img.tif"), "--model", str(tiny_checkpoint), "--device", "cpu",
            "--out", str(tmp_path / "labels.tif")]
    for r, c in points:
        args += ["--point", str(r), str(c)]
    assert main(args) == 0
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == (90, 120)
    assert sorted(np.unique(labels)) == [0, 1, 2, 3, 4]  # one object per point, ids in the order given
    for k, (r, c) in enumerate(points, start=1):
        assert labels[r, c] == k
        rows, cols = np.nonzero(labels == k)
        assert 100 < rows.size < 400  # a disk of radius 8 (201 px), give or take the 4x upsampling
        assert abs(rows.mean() - r) < 2 and abs(cols.mean() - c) < 2
    out = capsys.readouterr().out
    assert "4 prompts (4 points) -> 4 objects" in out


def test_negative_points_apply_to_every_object_and_overlaps_go_to_the_better_score(
        tmp_path, tiny_checkpoint, disk_decoder, capsys):
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(1).random((80, 80)).astype(np.float32))
    # two overlapping objects (centres 10 px apart) and a box object elsewhere; one negative click between them
    args = ["predict", str(tmp_path / "img.tif"), "--model", str(tiny_checkpoint), "--device", "cpu",
            "--box", "50", "50", "70", "70", "--point", "20", "20", "--point", "20", "30",
            "--neg-point", "12", "25", "--out", str(tmp_path / "labels.tif")]
    assert main(args) == 0
    labels = tifffile.imread(tmp_path / "labels.tif")
    # the box object gets no positive point from the stub decoder: empty, its id 1 stays unused
    assert sorted(np.unique(labels)) == [0, 2, 3]
    assert labels[12, 25] == 0 and labels[13, 25] == 0  # the negative click is out of both objects
    assert labels[20, 20] == 2 and labels[20, 30] == 3
    assert labels[20, 25] == 2  # overlap: object 2 (score 0.8) wins over object 3 (0.7)
    out = capsys.readouterr().out
    assert "3 prompts (1 box + 2 points, 1 negative point each) -> 2 objects" in out


def test_points_outside_the_image_and_negative_points_alone_are_user_errors(tmp_path, tiny_checkpoint, capsys):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((30, 40), np.float32))
    base = ["predict", str(tmp_path / "img.tif"), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o.tif")]
    assert main(base + ["--point", "35", "3"]) == 2
    assert "--point 35 3 lies outside the image of shape (30, 40)" in capsys.readouterr().err
    assert main(base + ["--point", "5", "5", "--neg-point", "5", "-9"]) == 2
    assert "--neg-point 5 -9 lies outside" in capsys.readouterr().err
    assert main(base + ["--neg-point", "5", "5"]) == 2
    assert "--neg-point alone makes no object" in capsys.readouterr().err


def test_without_model_predict_uses_the_catalogue_default(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """The default is read from the catalogue at run time (a fine-tuned default model will replace LiteMedSAM)."""
    monkeypatch.setattr(models, "DEFAULT_MODEL", str(tiny_checkpoint))
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).random((40, 40)).astype(np.float32))
    assert main(["predict", str(tmp_path / "img.tif"), "--box", "5", "5", "30", "30", "--device", "cpu",
                 "--out", str(tmp_path / "o.tif")]) == 0
    out = capsys.readouterr().out
    assert "tiny.pth" in out and "(default model)" in out


@pytest.mark.slow
def test_boxes_with_the_default_model_segment_the_cells(tmp_path, capsys):
    """Real weights, offline: one box per synthetic cell gives that cell (each object holds its cell's centre)."""
    image, gt = make_cells((160, 160), n=10, seed=0)
    tifffile.imwrite(tmp_path / "cells.tif", (image * 1000).astype(np.uint16))
    cells = regionprops(gt)
    args = ["predict", str(tmp_path / "cells.tif"), "--device", "cpu", "--out", str(tmp_path / "labels.tif")]
    for r in cells:
        args += ["--box", *map(str, r.bbox)]
    assert main(args) == 0
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert len(np.unique(labels)) - 1 == len(cells)
    ious = []
    for k, r in enumerate(cells, start=1):
        assert labels[tuple(int(v) for v in r.centroid)] == k
        m, g = labels == k, gt == r.label
        ious.append((m & g).sum() / (m | g).sum())
    assert np.mean(ious) > 0.8
    out = capsys.readouterr().out
    assert models.DEFAULT_MODEL in out and "(default model)" in out
    assert "mask threshold -2 (boxes -1)" in out  # the box head's own threshold


def test_views_average_orientations_and_reject_other_counts(tmp_path, capsys):
    """Real weights: --views 4 and --invert segment the same cells (test-time augmentation); 3 is not a symmetry
    count."""
    image, gt = make_cells((160, 160), n=6, seed=1)
    tifffile.imwrite(tmp_path / "cells.tif", (image * 1000).astype(np.uint16))
    cells = regionprops(gt)
    base = ["predict", str(tmp_path / "cells.tif"), "--device", "cpu"]
    for r in cells:
        base += ["--box", *map(str, r.bbox)]
    outs = {}
    for views, invert in (("1", "off"), ("1", "auto"), ("4", "auto")):
        out = tmp_path / f"v{views}{invert}.tif"
        assert main(base + ["--views", views, "--invert", invert, "--out", str(out)]) == 0
        outs[views, invert] = tifffile.imread(out)
    for labels in outs.values():
        ious = [((labels == k) & (gt == r.label)).sum() / ((labels == k) | (gt == r.label)).sum()
                for k, r in enumerate(cells, start=1)]
        assert np.mean(ious) > 0.8
    assert not np.array_equal(outs["1", "off"], outs["1", "auto"])  # auto inverted the contrast: a new answer
    assert not np.array_equal(outs["1", "auto"], outs["4", "auto"])  # the other orientations did change it
    with pytest.raises(SystemExit) as err:
        main(base + ["--views", "3", "--out", str(tmp_path / "v3.tif")])
    assert err.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err


@pytest.mark.slow
def test_clicks_with_the_default_model_are_answered_from_its_cell_map(tmp_path, capsys):
    """Real weights: a click per synthetic cell; the map's box beats the click given to SAM as a point."""
    image, gt = make_cells((160, 160), n=10, seed=1)
    tifffile.imwrite(tmp_path / "cells.tif", (image * 1000).astype(np.uint16))
    cells = regionprops(gt)
    clicks = [a for r in cells for a in ("--point", *map(str, np.round(r.centroid).astype(int)))]
    mean_iou = {}
    for flag in ([], ["--no-map-clicks"]):
        out = tmp_path / f"labels{len(flag)}.tif"
        assert main(["predict", str(tmp_path / "cells.tif"), "--device", "cpu", "--out", str(out), *clicks, *flag]) == 0
        labels = tifffile.imread(out)
        ious = []
        for k, r in enumerate(cells, start=1):
            m, g = labels == k, gt == r.label
            ious.append((m & g).sum() / (m | g).sum())
        mean_iou[bool(flag)] = float(np.mean(ious))
        printed = capsys.readouterr().out
        # map clicks are drawn by the box head with the model's own click threshold, which the line reports
        click = models.load_model(models.DEFAULT_MODEL, device="cpu").meta["click_mask_threshold"]
        assert (f", clicks {click:g})" in printed) == (not flag), printed
    assert mean_iou[False] > 0.7 and mean_iou[False] > mean_iou[True] + 0.2, mean_iou


def test_missed_click_and_click_answer_options_reach_the_annotation_config(tmp_path, monkeypatch, capsys):
    """--missed-click box|point, --click-answer sam|map and --merged-ratio R|none set AnnotationConfig (box, sam
    and 1.5 by default); other values are refused."""
    from napari_cellseg.core import interactive

    seen = []

    class Capture(interactive.InteractiveSegmenter):
        def __init__(self, model, config=None):
            seen.append((config.missed_click, config.click_answer, config.merged_ratio))
            raise KeyboardInterrupt  # stop before any network work

    monkeypatch.setattr(interactive, "InteractiveSegmenter", Capture)  # the command imports it when it runs
    image, _ = make_cells((64, 64), n=2, seed=0)
    tifffile.imwrite(tmp_path / "c.tif", (image * 1000).astype(np.uint16))
    base = ["predict", str(tmp_path / "c.tif"), "--model", "litemedsam", "--device", "cpu", "--point", "20", "20",
            "--out", str(tmp_path / "o.tif")]
    for extra, want in (([], ("box", "sam", 1.5)), (["--missed-click", "point"], ("point", "sam", 1.5)),
                        (["--click-answer", "map"], ("box", "map", 1.5)),
                        (["--merged-ratio", "2.5"], ("box", "sam", 2.5)),
                        (["--merged-ratio", "None"], ("box", "sam", None))):
        try:
            main(base + extra)
        except (KeyboardInterrupt, SystemExit):
            pass
        assert seen[-1] == want
    for bad in (["--missed-click", "nearest"], ["--click-answer", "both"]):
        with pytest.raises(SystemExit) as err:
            main(base + bad)
        assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err
    for bad in ("1", "0.5", "big"):
        with pytest.raises(SystemExit) as err:
            main(base + ["--merged-ratio", bad])
        assert err.value.code == 2 and "expected a number above 1 or 'none'" in capsys.readouterr().err


def test_map_scale_reaches_the_annotation_config_and_bad_zooms_are_user_errors(tmp_path, monkeypatch, capsys):
    from napari_cellseg.core import interactive

    seen, views = [], []

    class Capture(interactive.InteractiveSegmenter):
        def __init__(self, model, config=None):
            seen.append(config.map_scale)
            views.append(config.map_zoom_views)
            raise KeyboardInterrupt  # stop before any network work

    monkeypatch.setattr(interactive, "InteractiveSegmenter", Capture)
    image, _ = make_cells((64, 64), n=2, seed=0)
    tifffile.imwrite(tmp_path / "c.tif", (image * 1000).astype(np.uint16))
    base = ["predict", str(tmp_path / "c.tif"), "--model", "litemedsam", "--device", "cpu", "--point", "20", "20",
            "--out", str(tmp_path / "o.tif")]
    for extra, want in (([], "auto"), (["--map-scale", "0.5"], 0.5), (["--map-scale", "auto"], "auto"),
                        (["--map-zoom-views", "1.25"], "auto")):
        try:
            main(base + extra)
        except (KeyboardInterrupt, SystemExit):
            pass
        assert seen[-1] == want
    assert main(base + ["--map-scale", "8"]) == 2
    assert "map_scale must be a zoom between 0.25 and 4, got 8.0" in capsys.readouterr().err
    assert len(seen) == 4  # refused before the segmenter is built
    assert views == [(), (), (), (1.25,)]
