"""``napari-cellseg segment``: folders, a corrupt file, multi-page stacks, modes and exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import disk

from napari_cellseg.cli import main
from napari_cellseg.core import models
from napari_cellseg.core.checkpoint_convert import sam_to_hf


def _image(seed=0, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 5, shape)
    rr, cc = disk((shape[0] // 2, shape[1] // 2), 12, shape=shape)
    img[rr, cc] += 80
    return img.astype(np.uint16)


GRID = ["--mode", "grid", "--points-per-side", "3", "--max-area", "1.0", "--device", "cpu"]


def test_folder_with_a_corrupt_file_reports_it_and_segments_the_rest(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _image(0))
    tifffile.imwrite(folder / "b.tif", _image(1))
    (folder / "broken.tif").write_bytes(b"this is not a tiff")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    code = main(["segment", str(folder), "--model", str(tiny_checkpoint), "--out", str(out), *GRID])
    captured = capsys.readouterr()
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif"]
    assert "skipped" in captured.err and "broken.tif" in captured.err
    assert "2 segmented, 1 skipped" in captured.err
    assert "a.tif: " in captured.out and "cells" in captured.out
    labels = tifffile.imread(out / "a_labels.tif")
    assert labels.shape == (64, 64) and labels.dtype == np.uint16


def test_multipage_tiff_is_segmented_plane_by_plane(tmp_path, tiny_checkpoint, capsys):
    stack = np.stack([_image(i) for i in range(3)])
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")  # three pages
    out = tmp_path / "out"
    code = main(["segment", str(src), "--model", str(tiny_checkpoint), "--out", str(out), *GRID])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    labels = tifffile.imread(out / "stack_labels.tif")
    assert labels.shape == (3, 64, 64)
    assert "in 3 planes" in captured.out
    assert "plane 3/3" in captured.err  # the progress bar names the planes


def test_all_inputs_failing_exits_with_2(tmp_path, tiny_checkpoint, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    code = main(["segment", str(bad), str(tmp_path / "missing.tif"), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "out"), *GRID])
    captured = capsys.readouterr()
    assert code == 2
    assert "bad.png" in captured.err and "missing.tif" in captured.err
    assert main(["segment", "--out", str(tmp_path / "o")]) == 2
    assert "give at least one INPUT" in capsys.readouterr().err


def test_distance_mode_needs_a_distance_model_or_the_output_flag(tmp_path, capsys):
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, _image(2, (80, 70)))
    # a SAMCell-like checkpoint: HuggingFace key layout, no metadata
    ckpt = tmp_path / "samcell.pt"
    torch.save(sam_to_hf(models.build_sam("vit_test").state_dict()), ckpt)
    out = tmp_path / "out"
    code = main(["segment", str(src), "--model", str(ckpt), "--mode", "distance", "--out", str(out),
                 "--device", "cpu"])
    assert code == 2
    assert "Fine-tune one with the distance recipe, or use grid mode" in capsys.readouterr().err
    code = main(["segment", str(src), "--model", str(ckpt), "--output", "distance", "--peak", "0.6",
                 "--fill", "0.2", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "distance mode" in captured.err  # the default mode of a distance model
    assert tifffile.imread(out / "img_labels.tif").shape == (80, 70)
    code = main(["segment", str(src), "--model", str(ckpt), "--output", "distance", "--mode", "guided",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    guided = tifffile.imread(out / "img_labels.tif")
    code = main(["segment", str(src), "--model", str(ckpt), "--output", "distance", "--mode", "guided",
                 "--views", "2", "--out", str(out / "views"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert tifffile.imread(out / "views" / "img_labels.tif").shape == guided.shape
    code = main(["segment", str(src), "--model", str(ckpt), "--output", "distance", "--mode", "guided",
                 "--invert", "--out", str(out / "invert"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert tifffile.imread(out / "invert" / "img_labels.tif").shape == guided.shape
    code = main(["segment", str(src), "--model", str(ckpt), "--output", "distance", "--mode", "distance",
                 "--views", "2", "--out", str(out / "views"), "--device", "cpu"])
    assert code == 2 and "distance mode has no setting views" in capsys.readouterr().err


def test_thresholds_of_another_mode_are_a_user_error(tmp_path, tiny_checkpoint, capsys):
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, _image())
    code = main(["segment", str(src), "--model", str(tiny_checkpoint), "--peak", "0.5", "--out",
                 str(tmp_path / "o"), *GRID])
    assert code == 2
    assert "grid mode has no setting peak" in capsys.readouterr().err


def test_sample_image(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("napari_cellseg.core.io").load_sample  # the shipped sample
    out = tmp_path / "out"
    code = main(["segment", "--sample", "cells", "--model", str(tiny_checkpoint), "--out", str(out),
                 "--mode", "grid", "--points-per-side", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert tifffile.imread(out / "cells_labels.tif").shape == (512, 512)
    assert "sample:cells" in captured.out


def test_without_model_segment_uses_the_catalogue_default(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """The default is read from the catalogue at run time (a fine-tuned default model will replace LiteMedSAM)."""
    monkeypatch.setattr(models, "DEFAULT_MODEL", str(tiny_checkpoint))
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, _image())
    code = main(["segment", str(src), "--out", str(tmp_path / "out"), *GRID])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tiny.pth" in captured.err and "(default model)" in captured.err
    assert tifffile.imread(tmp_path / "out" / "img_labels.tif").shape == (64, 64)


def _distance_run(tmp_path, monkeypatch, setting: str):
    """(command line of a distance run on a tiny TinyViT checkpoint, the ``setting`` of each distance
    configuration the segmentation asks for)."""
    from napari_cellseg.core import automatic as auto

    seen = []
    real = auto.predict_distance_map

    def spy(image, model, config=None, *args, **kwargs):
        seen.append(getattr(config, setting))
        return real(image, model, config, *args, **kwargs)

    monkeypatch.setattr(auto, "predict_distance_map", spy)
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, _image(3, (70, 60)))
    ckpt = tmp_path / "tiny.pt"
    torch.save(models.build_sam("tinyvit_test").state_dict(), ckpt)
    return ["segment", str(src), "--model", str(ckpt), "--output", "distance", "--device", "cpu"], seen


def test_embed_window_reaches_the_distance_configuration(tmp_path, monkeypatch, capsys):
    base, seen = _distance_run(tmp_path, monkeypatch, "embed_window")
    assert main([*base, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert main([*base, "--embed-window", "0", "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    assert seen == [None, 0]
    assert main([*base, "--embed-window", "-3", "--out", str(tmp_path / "c")]) == 2
    assert "embed_window" in capsys.readouterr().err
    assert main([*base, "--mode", "grid", "--embed-window", "704", "--out", str(tmp_path / "d")]) == 2
    assert "grid mode has no setting embed_window" in capsys.readouterr().err


def test_scale_reaches_the_distance_configuration_and_bad_zooms_are_user_errors(tmp_path, monkeypatch, capsys):
    base, seen = _distance_run(tmp_path, monkeypatch, "scale")
    assert main([*base, "--scale", "0.5", "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert seen[0] == 0.5  # the call of the segmentation (the zoomed plane is then mapped at scale 1)
    assert tifffile.imread(tmp_path / "a" / "img_labels.tif").shape == (70, 60)
    assert main([*base, "--scale", "9", "--out", str(tmp_path / "b")]) == 2
    assert "scale must be a zoom between 0.25 and 4, got 9.0" in capsys.readouterr().err
    assert main([*base, "--mode", "grid", "--scale", "2", "--out", str(tmp_path / "c")]) == 2
    assert "grid mode has no setting scale" in capsys.readouterr().err


def test_scale_auto_estimates_the_zoom_and_says_so(tmp_path, monkeypatch, capsys):
    base, seen = _distance_run(tmp_path, monkeypatch, "scale")
    assert main([*base, "--scale", "auto", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    # a first map at zoom 1; a checkpoint without training cell sizes cannot estimate more, and says so
    assert seen == [1.0] and "zoom 1 (this model records no training cell sizes" in err
    assert main([*base, "--scale", "AUTO", "--out", str(tmp_path / "b")]) == 0 and seen == [1.0, 1.0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, without a traceback
        main([*base, "--scale", "big", "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    assert "--scale: expected a zoom such as 0.5 or 'auto', got 'big'" in capsys.readouterr().err


def test_zoom_views_reach_the_distance_configuration(tmp_path, monkeypatch, capsys):
    base, seen = _distance_run(tmp_path, monkeypatch, "zoom_views")
    assert main([*base, "--zoom-views", "1.25", "0.8", "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert seen[0] == (1.25, 0.8)  # the segmentation's call; the views are then mapped plain
    assert main([*base, "--zoom-views", "5", "--out", str(tmp_path / "b")]) == 2
    assert "zoom_views must be zooms between 0.5 and 2" in capsys.readouterr().err


def test_no_small_cell_view_reaches_the_distance_configuration(tmp_path, monkeypatch, capsys):
    from napari_cellseg.core import automatic as auto

    base, seen = _distance_run(tmp_path, monkeypatch, "small_cell_view")
    real = auto.model_distance_defaults
    # as for a model that records its training cells' sizes (the default model): on unless the flag says no
    monkeypatch.setattr(auto, "model_distance_defaults", lambda model: {**real(model), "small_cell_view": True})
    assert main([*base, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert seen == [True]
    assert main([*base, "--no-small-cell-view", "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    assert seen == [True, False]
    assert main([*base, "--mode", "grid", "--no-small-cell-view", "--out", str(tmp_path / "c")]) == 2
    assert "grid mode has no setting small_cell_view" in capsys.readouterr().err
