"""Cell sizes and the automatic zoom (``napari_cellseg.core.cell_size``; ``DistanceConfig(scale="auto")``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cellseg.core import cell_size as cs

TABLE = {"fluorescence": {"p10": 9.0, "median": 20.0, "p90": 31.4, "cells": 100},
         "phase": {"p10": 31.7, "median": 54.2, "p90": 83.0, "cells": 50},
         "all": {"p10": 9.2, "median": 21.2, "p90": 39.6, "cells": 150}}


def discs(diameter: float, n: int, side: int = 0, seed: int = 0) -> np.ndarray:
    """A label image of ``n`` non-touching discs of ``diameter`` pixels on a grid."""
    step = int(diameter * 1.5) + 2
    per_row = int(np.ceil(np.sqrt(n)))
    side = side or step * per_row + step
    labels = np.zeros((side, side), np.int32)
    rr, cc = np.mgrid[:side, :side]
    for k in range(n):
        r0, c0 = step * (k // per_row) + step, step * (k % per_row) + step
        labels[(rr - r0) ** 2 + (cc - c0) ** 2 <= (diameter / 2) ** 2] = k + 1
    return labels


def dark_image(labels: np.ndarray) -> np.ndarray:
    return np.where(labels > 0, 0.9, 0.02).astype(np.float32)


def test_cell_diameters_measure_discs():
    d = cs.cell_diameters(discs(30, 9))
    assert d.shape == (9,) and np.allclose(d, 30, rtol=0.04)
    assert cs.cell_diameters(np.zeros((5, 5), int)).size == 0


def test_image_kind_reads_the_background_level_and_colour():
    lab = discs(12, 16)
    assert cs.image_kind(dark_image(lab)) == "fluorescence"
    mid = np.where(lab > 0, 0.1, 0.35).astype(np.float32)  # phase contrast: dark cells on mid grey
    assert cs.image_kind(mid) == "phase"
    bright = np.where(lab > 0, 0.3, 0.9).astype(np.float32)
    assert cs.image_kind(bright) == "brightfield"
    stained = np.stack([np.full(lab.shape, 0.9), np.where(lab > 0, 0.3, 0.7), np.full(lab.shape, 0.85)], -1)
    assert cs.image_kind(stained) == "colour"
    grey_rgb = np.repeat(mid[..., None], 3, -1)  # a grey image stored as RGB is grey
    assert cs.image_kind(grey_rgb) == "phase"


def test_estimate_zooms_large_cells_to_the_training_median():
    lab = discs(40, 12)
    est = cs.estimate_scale(lab, dark_image(lab), TABLE)
    assert est.kind == "fluorescence" and est.cells == 12
    assert est.diameter == pytest.approx(40, rel=0.04)
    assert est.scale == pytest.approx(20 / est.diameter, abs=0.01)
    assert est.reference["kind"] == "fluorescence"
    assert est.message.startswith(f"zoom {est.scale:g}: cells of 40 px") and "9-31 px" in est.message


def test_estimate_keeps_zoom_1_within_the_training_sizes_and_zooms_tiny_cells_up():
    lab = discs(20, 12)
    est = cs.estimate_scale(lab, dark_image(lab), TABLE)
    assert est.scale == 1.0 and est.message.startswith("zoom 1: cells of 20 px")
    tiny = discs(5, 30)
    est = cs.estimate_scale(tiny, dark_image(tiny), TABLE, max_scale=3.0)
    assert est.scale == 3.0  # 20 / 5.1 = 3.9, clipped to the largest zoom the image allows


def test_estimate_needs_cells_and_a_size_table():
    few = discs(40, 3)
    est = cs.estimate_scale(few, dark_image(few), TABLE)
    assert est.scale == 1.0 and "only 3 cells found at zoom 1, too few" in est.message
    lab = discs(40, 12)
    est = cs.estimate_scale(lab, dark_image(lab), {})
    assert est.scale == 1.0 and "records no training cell sizes" in est.message and est.diameter > 35
    # a kind the model has no cells of: its table over every cell
    lab = discs(30, 12)
    bright = np.where(lab > 0, 0.3, 0.9).astype(np.float32)
    est = cs.estimate_scale(lab, bright, TABLE)
    assert est.kind == "brightfield" and est.reference["kind"] == "all" and est.scale == 1.0
    assert "the model's training cells are 9-40 px" in est.message


def test_size_table_and_model_sizes_round_trip_and_drop_bad_entries():
    table = cs.size_table({"fluorescence": [cs.cell_diameters(discs(20, 9))], "phase": cs.cell_diameters(discs(50, 4))})
    assert table["fluorescence"]["median"] == pytest.approx(20, rel=0.05) and table["phase"]["cells"] == 4
    assert table["all"]["cells"] == 13
    meta = {"cell_diameters": {**table, "colour": {"p10": 30, "median": 20, "p90": 40}, "x": "junk"}}
    sizes = cs.model_cell_sizes(meta)
    assert set(sizes) == {"fluorescence", "phase", "all"}
    assert cs.model_cell_sizes({}) == {} and cs.model_cell_sizes(None) == {}
    with pytest.raises(ValueError, match="no cells to measure"):
        cs.diameter_stats([])


def test_training_data_records_the_cell_sizes_per_kind():
    from napari_cellseg.core.finetune import make_training_data

    lab = discs(24, 16)
    data = make_training_data([dark_image(lab)], [lab])
    sizes = data.summary["cell_diameters"]
    assert set(sizes) == {"fluorescence", "all"}
    assert sizes["fluorescence"]["median"] == pytest.approx(24, rel=0.05) and sizes["fluorescence"]["cells"] == 16


def test_a_further_trained_model_widens_its_size_range_and_targets_the_new_cells():
    base = {"fluorescence": {"p10": 9.0, "median": 20.0, "p90": 31.4, "cells": 100},
            "phase": {"p10": 31.7, "median": 54.2, "p90": 83.0, "cells": 50}}
    new = {"fluorescence": {"p10": 38.0, "median": 45.0, "p90": 52.0, "cells": 36},
           "colour": {"p10": 10.0, "median": 15.0, "p90": 20.0, "cells": 30}}
    merged = cs.merge_size_tables(base, new)
    assert merged["fluorescence"] == {"p10": 9.0, "median": 45.0, "p90": 52.0, "cells": 136}
    assert merged["phase"] == base["phase"] and merged["colour"] == new["colour"]
    # nuclei 36 px across keep zoom 1 with the merged table; the new table alone would zoom them in
    lab = discs(36, 9)
    assert cs.estimate_scale(lab, dark_image(lab), merged).scale == 1.0
    assert cs.estimate_scale(lab, dark_image(lab), new).scale != 1.0
    assert cs.merge_size_tables({}, new) == new
