"""Per-cell measurements on shapes of known geometry, neighbours, units, CSV round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

from napari_cellseg.core.measure import (
    COLUMNS,
    count_neighbors,
    measure_cells,
    neighbor_pairs,
    read_csv,
    summarize,
    write_csv,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def one_cell(table, label):
    (i,) = np.flatnonzero(table["label"] == label)
    return {k: v[i] for k, v in table.items()}


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("radius", [10, 20, 40])
def test_disk(radius):
    labels = np.zeros((2 * radius + 21, 2 * radius + 21), np.uint16)
    centre = (radius + 10, radius + 10)
    labels[disk(centre, radius)] = 9
    cell = one_cell(measure_cells(labels), 9)
    n_px = np.count_nonzero(labels)
    assert cell["area"] == n_px
    assert abs(n_px - math.pi * radius**2) / (math.pi * radius**2) < 0.03
    assert cell["equivalent_diameter"] == pytest.approx(math.sqrt(4 * n_px / math.pi), rel=1e-12)
    assert cell["perimeter"] == pytest.approx(2 * math.pi * radius, rel=0.02)
    assert 0.97 <= cell["circularity"] <= 1.0
    assert cell["aspect_ratio"] == pytest.approx(1.0, abs=0.01)
    assert cell["eccentricity"] < 0.15
    assert cell["solidity"] > 0.97
    assert (cell["centroid_row"], cell["centroid_col"]) == pytest.approx(centre, abs=1e-9)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 10), (4, 6), (10, 40), (30, 12)])
def test_axis_aligned_rectangles(h, w):
    labels = np.zeros((h + 6, w + 6), np.int32)
    labels[3 : 3 + h, 3 : 3 + w] = 4
    cell = one_cell(measure_cells(labels), 4)
    long, short = max(h, w), min(h, w)
    assert cell["area"] == h * w
    # pixels as unit squares: exactly long / short, also for cells one pixel wide
    assert cell["aspect_ratio"] == pytest.approx(long / short, rel=1e-12)
    assert cell["eccentricity"] == pytest.approx(math.sqrt(1 - (short / long) ** 2), rel=1e-12, abs=1e-12)
    assert cell["solidity"] == 1.0
    assert (cell["centroid_row"], cell["centroid_col"]) == (3 + (h - 1) / 2, 3 + (w - 1) / 2)
    if short >= 10:
        # 4-direction Crofton of the continuous rectangle: pi (1 + sqrt 2) (h + w) / 4, 5 % short
        crofton = math.pi * (1 + math.sqrt(2)) * (h + w) / 4
        assert cell["perimeter"] == pytest.approx(crofton, rel=0.02)
        assert 0.92 * 2 * (h + w) <= cell["perimeter"] <= 0.95 * 2 * (h + w)
    assert 0 < cell["circularity"] <= 1.0


def test_circularity_orders_shapes_and_is_clipped():
    labels = np.zeros((60, 120), np.int32)
    labels[disk((15, 15), 12)] = 1
    labels[3:27, 40:64] = 2  # square
    labels[35:45, 5:45] = 3  # 1:4 bar
    labels[55, 5:65] = 4  # 1-px line
    labels[50, 100] = 5  # one pixel: too coarse, 4 pi A / P^2 > 1 is clipped
    c = measure_cells(labels)["circularity"]
    assert c[0] > c[1] > c[2] > c[3]
    assert c[0] > 0.97 and c[4] == 1.0
    assert c[3] < 0.1


def test_solidity_of_an_l_shape():
    labels = np.zeros((20, 20), np.int32)
    labels[2:12, 2:12] = 1
    labels[2:7, 7:12] = 0  # a 10 x 10 square missing a 5 x 5 corner: area 75, hull about 85-87.5
    cell = one_cell(measure_cells(labels), 1)
    assert cell["area"] == 75
    assert 75 / 87.5 - 0.01 <= cell["solidity"] <= 75 / 85 + 1e-12


def test_mean_intensity():
    labels = np.array([[1, 1, 0, 3], [1, 0, 0, 3]])
    image = np.array([[1.0, 2.0, 100.0, 10.0], [6.0, 100.0, 100.0, 20.0]])
    t = measure_cells(labels, image)
    assert t["mean_intensity"].tolist() == [3.0, 15.0]
    assert np.isnan(measure_cells(labels)["mean_intensity"]).all()
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        measure_cells(labels, image[:, :3])


# --------------------------------------------------------------------------- neighbours


def plus_arrangement():
    """A centre cell with four 6 x 6 arms 2 px away, plus an isolated cell far away."""
    labels = np.zeros((24, 40), np.int32)
    labels[0:6, 8:14] = 11  # top
    labels[8:14, 8:14] = 20  # centre
    labels[8:14, 16:22] = 33  # right
    labels[16:22, 8:14] = 41  # bottom
    labels[8:14, 0:6] = 57  # left
    labels[0:4, 34:40] = 99  # isolated, 12 px from the right arm
    return labels


def test_neighbours_of_a_known_arrangement():
    labels = plus_arrangement()
    ids, n = count_neighbors(labels, distance=2)
    assert dict(zip(ids.tolist(), n.tolist())) == {11: 1, 20: 4, 33: 1, 41: 1, 57: 1, 99: 0}
    pairs = neighbor_pairs(labels, distance=2)
    assert pairs.tolist() == [[11, 20], [20, 33], [20, 41], [20, 57]]
    # 1 px growth covers a gap of 2 px; no growth: nobody touches
    assert count_neighbors(labels, distance=1)[1].tolist() == [1, 4, 1, 1, 1, 0]
    assert count_neighbors(labels, distance=0)[1].tolist() == [0] * 6
    # the isolated cell is 13.9 px (centre to centre) from the right arm: 6 px growth is not enough, 8 is
    assert dict(zip(*[a.tolist() for a in count_neighbors(labels, distance=6)]))[99] == 0
    assert dict(zip(*[a.tolist() for a in count_neighbors(labels, distance=8)]))[99] == 1


def test_gap_limit_is_twice_the_distance():
    gap4 = np.zeros((3, 20), np.int32)
    gap4[:, 0:3] = 1
    gap4[:, 7:10] = 2  # 4 background columns
    gap4[:, 15:18] = 3  # 5 background columns from cell 2
    assert neighbor_pairs(gap4, distance=2).tolist() == [[1, 2]]
    assert neighbor_pairs(gap4, distance=2.9).tolist() == [[1, 2]]  # 2 * floor(2.9) = 4 < 5
    assert neighbor_pairs(gap4, distance=3).tolist() == [[1, 2], [2, 3]]
    assert neighbor_pairs(gap4, distance=1.9).tolist() == []


def one_direction_shift_count(labels, offset=5):
    """The shift idea we do not use: labels seen at each pixel moved up-left, minus one for the cell."""
    out = {}
    for label in np.unique(labels[labels > 0]):
        rr, cc = np.nonzero(labels == label)
        rr = np.clip(rr - offset, 0, labels.shape[0] - 1)
        cc = np.clip(cc - offset, 0, labels.shape[1] - 1)
        out[int(label)] = len(np.unique(labels[rr, cc])) - 1
    return out


def test_growth_finds_neighbours_the_shift_misses():
    # two touching cells side by side: each has exactly one neighbour
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:13] = 1
    labels[5:15, 13:23] = 2
    ids, n = count_neighbors(labels, distance=2)
    assert n.tolist() == [1, 1]
    # the shift sees cell 1 from cell 2 but not the reverse, and counts background as a neighbour:
    # cell 1 gets 1 only because its shifted pixels land on background, cell 2 gets 2
    assert one_direction_shift_count(labels) == {1: 1, 2: 2}
    labels[5:15, 3:13] = 0
    assert one_direction_shift_count(labels) == {2: 1}  # alone, yet one "neighbour" 
    # the arms of the plus whose only neighbour lies below or to the right
    plus = plus_arrangement()
    ids, n = count_neighbors(plus)
    ours = dict(zip(ids.tolist(), n.tolist()))
    assert ours[11] == 1 and ours[57] == 1


def test_cells_on_opposite_borders_are_not_neighbours():
    labels = np.zeros((10, 30), np.int32)
    labels[:, 0:2] = 1
    labels[:, 28:30] = 2
    assert count_neighbors(labels, distance=3)[1].tolist() == [0, 0]


# --------------------------------------------------------------------------- units, summary, validation


def test_scale_gives_physical_units():
    labels = plus_arrangement()
    labels[disk((18, 30), 4)] = 7
    px = measure_cells(labels)
    um = measure_cells(labels, scale=(0.5, 0.5))
    assert measure_cells(labels, scale=0.5).keys() == um.keys()
    np.testing.assert_array_equal(um["label"], px["label"])
    np.testing.assert_allclose(um["area"], px["area"] * 0.25, rtol=1e-12)
    for name in ("perimeter", "centroid_row", "centroid_col", "equivalent_diameter"):
        np.testing.assert_allclose(um[name], px[name] * 0.5, rtol=1e-12)
    for name in ("circularity", "solidity", "aspect_ratio", "eccentricity", "n_neighbors"):
        np.testing.assert_allclose(um[name], px[name], rtol=1e-12)
    with pytest.raises(ValueError, match="isotropic"):
        measure_cells(labels, scale=(0.5, 0.25))
    with pytest.raises(ValueError, match="positive"):
        measure_cells(labels, scale=(-1, -1))


def test_table_layout_and_summary():
    labels = plus_arrangement()
    table = measure_cells(labels)
    assert tuple(table) == COLUMNS
    assert table["label"].dtype == np.int64 and table["n_neighbors"].dtype == np.int64
    assert all(table[c].dtype == np.float64 for c in COLUMNS if c not in ("label", "n_neighbors"))
    assert table["label"].tolist() == [11, 20, 33, 41, 57, 99]
    s = summarize(table, labels)
    assert s.count == 6
    assert s.mean_area == pytest.approx((5 * 36 + 24) / 6, rel=1e-15)
    assert s.median_area == 36.0
    assert s.confluency == pytest.approx((5 * 36 + 24) / (24 * 40), rel=1e-15)
    assert s.mean_neighbors == pytest.approx(8 / 6, rel=1e-15)
    assert s.to_dict()["count"] == 6


def test_empty_image():
    labels = np.zeros((5, 7), np.uint8)
    table = measure_cells(labels)
    assert tuple(table) == COLUMNS and all(len(v) == 0 for v in table.values())
    assert table["label"].dtype == np.int64
    s = summarize(table, labels)
    assert (s.count, s.mean_area, s.median_area, s.confluency, s.mean_neighbors) == (0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "labels, error, words",
    [
        (np.zeros((2, 3, 4), int), ValueError, "2D"),
        (np.zeros((3, 3), bool), TypeError, "boolean"),
        (np.full((3, 3), 0.5), TypeError, "fractional"),
        (np.full((3, 3), -2), ValueError, "negative"),
    ],
)
def test_bad_labels(labels, error, words):
    with pytest.raises(error, match=words):
        measure_cells(labels)


def test_bad_neighbor_distance():
    with pytest.raises(ValueError, match=">= 0"):
        measure_cells(np.zeros((3, 3), int), neighbor_distance=-1)
    with pytest.raises(TypeError, match="number"):
        count_neighbors(np.zeros((3, 3), int), distance="far")


def test_inputs_are_not_modified():
    labels = plus_arrangement().astype(np.float32)
    image = np.random.default_rng(0).random(labels.shape)
    copies = labels.copy(), image.copy()
    measure_cells(labels, image, scale=2.0)
    np.testing.assert_array_equal(labels, copies[0])
    np.testing.assert_array_equal(image, copies[1])


# --------------------------------------------------------------------------- CSV


def test_csv_round_trip(tmp_path):
    labels = plus_arrangement()
    image = np.random.default_rng(1).random(labels.shape) * 1000
    table = measure_cells(labels, image, scale=0.3)
    path = tmp_path / "cells.csv"
    write_csv(table, path)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    back = read_csv(path)
    assert list(back) == list(table)
    for name in table:
        assert back[name].dtype == table[name].dtype, name
        np.testing.assert_array_equal(back[name], table[name])  # bit for bit

    no_intensity = measure_cells(labels)
    write_csv(no_intensity, path)
    assert np.isnan(read_csv(path)["mean_intensity"]).all()

    empty = measure_cells(np.zeros((4, 4), int))
    write_csv(empty, path)
    back = read_csv(path)
    assert list(back) == list(COLUMNS) and back["label"].dtype == np.int64 and len(back["area"]) == 0


def test_csv_errors(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        write_csv({"a": [1, 2], "b": [1.0]}, tmp_path / "x.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("label,area\n1,2.0\n2\n")
    with pytest.raises(ValueError, match="line 3"):
        read_csv(bad)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_phase_contrast_cells():
    mask = SHARED_DATA / "usiigaci-phase-train" / "masks" / "train_set1.tif"
    image = SHARED_DATA / "usiigaci-phase-train" / "images" / "train_set1.tif"
    if not mask.is_file():
        pytest.skip(f"real data not found at {mask} (the ../shared folder beside the checkout)")
    import tifffile

    labels = tifffile.imread(mask)
    table = measure_cells(labels, tifffile.imread(image))
    assert table["label"].tolist() == [v for v in np.unique(labels).tolist() if v]
    assert table["area"].sum() == np.count_nonzero(labels)
    assert np.all((table["circularity"] > 0) & (table["circularity"] <= 1))
    assert np.all((table["solidity"] > 0) & (table["solidity"] <= 1))
    assert np.all(table["aspect_ratio"] >= 1) and np.all(np.isfinite(table["mean_intensity"]))
    pairs = neighbor_pairs(labels)
    ids, n = count_neighbors(labels)
    assert n.sum() == 2 * len(pairs)  # every pair counted once at each end
    s = summarize(table, labels)
    assert s.count == len(table["label"]) and 0 < s.confluency < 1
