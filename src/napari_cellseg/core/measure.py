"""Per-cell measurements of a label image, an image summary, and CSV input/output.

The table is a plain ``dict`` of equally long numpy columns, one row per cell
(sorted by label), so it serves a napari features table, a pandas DataFrame
(``pd.DataFrame(table)``) or a CSV file alike. Columns:

============================  ==================================================================
``label``                     the cell's label value (int)
``area``                      pixel count times the pixel area (``scale[0] * scale[1]``)
``perimeter``                 Crofton perimeter estimate (see below), in units of ``scale``
``centroid_row``, ``_col``    centre of mass, ``(row, col)`` times ``scale``
``equivalent_diameter``       diameter of the disk of the same area, ``sqrt(4 area / pi)``
``circularity``               ``4 pi area / perimeter**2``, clipped to at most 1
``solidity``                  area / area of the convex hull (1 for convex cells)
``aspect_ratio``              major / minor axis of the second-moment ellipse (>= 1)
``eccentricity``              ``sqrt(1 - minor**2 / major**2)`` of that ellipse, in [0, 1)
``mean_intensity``            mean of the intensity image over the cell (NaN without one)
``n_neighbors``               cells touching this one after growing every cell (int)
============================  ==================================================================

Perimeter and circularity
-------------------------
The perimeter is skimage's Crofton estimate with four directions
(:func:`skimage.measure.perimeter_crofton`): it averages the number of boundary
crossings of lines at 0, 45, 90 and 135 degrees, so it is close to the true
length for round outlines (a digital disk of radius 10 to 80 px is within 1 %
of ``2 pi r``) where counting boundary pixels is 5 to 25 % off. Its known bias:
straight edges at 0 or 45 degrees come out short, by ``1 - pi (1 + sqrt 2) / 8``
(about 5 %) for long edges and up to 12 % for cells of a few pixels, so a
square gets circularity 0.87 to 0.93 instead of ``pi / 4 = 0.785``. Outlines of a few pixels are
too coarse for any estimator and can give ``4 pi A / P**2 > 1``; circularity is
clipped to 1, so read it for cells larger than about 5 px in radius.

Aspect ratio and eccentricity
-----------------------------
Both come from the covariance of the cell's pixels treated as unit squares
(the covariance of the pixel centres plus ``1/12`` px² on each axis, the
variance of a uniform unit square). Treating pixels as points, as
``regionprops``' axis lengths do, gives a zero minor axis to every cell one
pixel wide, hence an infinite aspect ratio; with squares an ``h x w``
axis-aligned rectangle gets exactly ``max(h, w) / min(h, w)``, and a line of
``L`` pixels gets ``L``. They do not depend on ``scale``.

Neighbours
----------
Every cell is grown by ``neighbor_distance`` pixels into the background with
:func:`skimage.segmentation.expand_labels` (each background pixel goes to the
nearest cell within that distance, so growing cells never overlap), and two
cells are neighbours when their grown regions share an edge. Cells up to
about ``2 * neighbor_distance`` pixels apart are neighbours whatever their
direction (exactly: a straight gap of ``g`` background pixels along a row or
column is bridged when ``g <= 2 * floor(neighbor_distance)``), a third cell
in between keeps them apart, and the relation is symmetric. Some tools
instead shift every pixel of a cell by a fixed offset (SAMCell's GUI shifts
5 px up and to the left) and count the labels found there minus one for the
cell itself: that looks in one direction only (a neighbour below or to the
right is never seen), counts the background as a neighbour whenever the
shifted pixels leave the cell, and makes the relation asymmetric.

Examples
--------
>>> labels = np.zeros((6, 12), int)
>>> labels[1:5, 1:5] = 3
>>> labels[1:5, 7:11] = 8
>>> table = measure_cells(labels)
>>> table["label"], table["area"], table["n_neighbors"]
(array([3, 8]), array([16., 16.]), array([1, 1]))
>>> summarize(table, labels).confluency
0.4444444444444444
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass
from os import PathLike

import numpy as np

from napari_cellseg.core.metrics import check_label_image

__all__ = [
    "COLUMNS",
    "DEFAULT_NEIGHBOR_DISTANCE",
    "INTEGER_COLUMNS",
    "MeasureSummary",
    "count_neighbors",
    "measure_cells",
    "neighbor_pairs",
    "read_csv",
    "summarize",
    "write_csv",
]

#: column names of :func:`measure_cells`, in order
COLUMNS: tuple[str, ...] = (
    "label",
    "area",
    "perimeter",
    "centroid_row",
    "centroid_col",
    "equivalent_diameter",
    "circularity",
    "solidity",
    "aspect_ratio",
    "eccentricity",
    "mean_intensity",
    "n_neighbors",
)
#: columns holding integers
INTEGER_COLUMNS: tuple[str, ...] = ("label", "n_neighbors")
#: default growth, in pixels, before looking for touching cells
DEFAULT_NEIGHBOR_DISTANCE = 2

_PIXEL_SQUARE_VARIANCE = 1.0 / 12.0


# --------------------------------------------------------------------------- validation


def _check_labels_2d(labels) -> np.ndarray:
    arr = check_label_image(labels, "labels")
    if arr.ndim != 2:
        raise ValueError(
            f"labels must be a 2D label image (M, N), got shape {arr.shape}: measure one plane of a "
            "stack at a time"
        )
    return arr


def _check_scale(scale) -> float:
    """Return the pixel size for an isotropic ``scale`` (None -> 1.0)."""
    if scale is None:
        return 1.0
    values = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    if values.ndim != 1 or values.size not in (1, 2):
        raise ValueError(f"scale must be one number or a (row, col) pair, got {scale!r}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"scale must hold positive finite pixel sizes, got {scale!r}")
    if values.size == 2 and not math.isclose(values[0], values[1], rel_tol=1e-9):
        raise ValueError(
            f"scale {tuple(float(v) for v in values)} is not isotropic: perimeter and circularity need "
            "square pixels. Resample the image to square pixels, or measure in pixels (scale=None)"
        )
    return float(values[0])


def _check_distance(distance) -> float:
    try:
        value = float(distance)
    except (TypeError, ValueError):
        raise TypeError(f"neighbor_distance must be a number of pixels, got {distance!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"neighbor_distance must be >= 0 pixels, got {distance!r}")
    return value


# --------------------------------------------------------------------------- neighbours


def neighbor_pairs(labels, distance: float = DEFAULT_NEIGHBOR_DISTANCE) -> np.ndarray:
    """Pairs of cells that touch after growing every cell by ``distance`` pixels.

    Parameters
    ----------
    labels : array_like of int, shape (M, N)
        Label image, ``0`` = background.
    distance : float
        Growth in pixels (0: only cells that already share an edge).

    Returns
    -------
    ndarray of int64, shape (K, 2)
        Label pairs ``(a, b)`` with ``a < b``, sorted.

    Examples
    --------
    >>> labels = np.array([[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 3]])
    >>> neighbor_pairs(labels, distance=2)  # gap of 3 px <= 4; gap of 5 px > 4
    array([[1, 2]])
    """
    from skimage.segmentation import expand_labels

    arr = _check_labels_2d(labels)
    dist = _check_distance(distance)
    grown = expand_labels(arr, distance=dist) if dist > 0 else arr
    firsts, seconds = [], []
    for a, b in ((grown[:, :-1], grown[:, 1:]), (grown[:-1, :], grown[1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        firsts.append(a[touch])
        seconds.append(b[touch])
    first = np.concatenate(firsts).astype(np.int64)
    second = np.concatenate(seconds).astype(np.int64)
    if first.size == 0:
        return np.zeros((0, 2), np.int64)
    pairs = np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1)
    return np.unique(pairs, axis=0)


def count_neighbors(labels, distance: float = DEFAULT_NEIGHBOR_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """Number of neighbours of every cell (see :func:`neighbor_pairs`).

    Parameters
    ----------
    labels : array_like of int, shape (M, N)
        Label image, ``0`` = background.
    distance : float
        Growth in pixels before looking for touching cells.

    Returns
    -------
    cell_labels : ndarray of int64, shape (C,)
        Every label present, sorted.
    counts : ndarray of int64, shape (C,)
        Its number of neighbours.

    Examples
    --------
    >>> count_neighbors(np.array([[1, 1, 2, 0, 0, 0, 0, 0, 5]]), distance=1)
    (array([1, 2, 5]), array([1, 1, 0]))
    """
    arr = _check_labels_2d(labels)
    ids = np.unique(arr)
    ids = ids[ids > 0].astype(np.int64)
    pairs = neighbor_pairs(arr, distance)
    counts = np.zeros(ids.size, np.int64)
    if pairs.size:
        np.add.at(counts, np.searchsorted(ids, pairs.ravel()), 1)
    return ids, counts


# --------------------------------------------------------------------------- per-cell table


def _shape_moments(arr: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aspect ratio and eccentricity from the covariance of each cell taken as unit squares."""
    rows, cols = np.nonzero(arr)
    if ids.size == 0:
        return np.zeros(0), np.zeros(0)
    index = np.searchsorted(ids, arr[rows, cols])
    n = np.bincount(index, minlength=ids.size).astype(np.float64)
    r = rows.astype(np.float64)
    c = cols.astype(np.float64)
    mean_r = np.bincount(index, r, minlength=ids.size) / n
    mean_c = np.bincount(index, c, minlength=ids.size) / n
    dr = r - mean_r[index]
    dc = c - mean_c[index]
    var_r = np.bincount(index, dr * dr, minlength=ids.size) / n + _PIXEL_SQUARE_VARIANCE
    var_c = np.bincount(index, dc * dc, minlength=ids.size) / n + _PIXEL_SQUARE_VARIANCE
    cov_rc = np.bincount(index, dr * dc, minlength=ids.size) / n
    half_trace = 0.5 * (var_r + var_c)
    radius = np.hypot(0.5 * (var_r - var_c), cov_rc)
    major = half_trace + radius
    minor = half_trace - radius  # >= 1/12 up to rounding: the unit squares make it positive
    minor = np.maximum(minor, _PIXEL_SQUARE_VARIANCE * 1e-6)
    aspect = np.sqrt(major / minor)
    eccentricity = np.sqrt(np.clip(1.0 - minor / major, 0.0, 1.0))
    return aspect, eccentricity


def measure_cells(
    labels,
    intensity=None,
    *,
    scale=None,
    neighbor_distance: float = DEFAULT_NEIGHBOR_DISTANCE,
) -> dict[str, np.ndarray]:
    """Measure every cell of a label image.

    Parameters
    ----------
    labels : array_like of int, shape (M, N)
        Label image, ``0`` = background; labels need not be consecutive.
    intensity : array_like, shape (M, N), optional
        Image whose mean over each cell fills ``mean_intensity`` (NaN without it).
    scale : float or (float, float), optional
        Pixel size ``(row, col)`` in physical units (e.g. micrometres); lengths
        and centroids are multiplied by it and areas by its product. Must be
        isotropic (perimeters need square pixels). ``None`` measures in pixels.
    neighbor_distance : float
        Growth in pixels before looking for touching cells (module docstring).

    Returns
    -------
    dict of str to ndarray
        The columns :data:`COLUMNS`, each of shape ``(C,)`` for ``C`` cells,
        sorted by label. ``label`` and ``n_neighbors`` are int64, the rest
        float64.

    Raises
    ------
    TypeError
        Labels that are not whole numbers; a non-numeric intensity image.
    ValueError
        Wrong shapes, negative labels, an anisotropic scale, a negative distance.

    Examples
    --------
    >>> labels = np.zeros((8, 8), int)
    >>> labels[2:4, 1:7] = 5                      # a 2 x 6 bar
    >>> t = measure_cells(labels, scale=0.5)
    >>> float(t["area"][0]), round(float(t["aspect_ratio"][0]), 9), float(t["centroid_row"][0])
    (3.0, 3.0, 1.25)
    """
    from skimage.measure import regionprops_table

    arr = _check_labels_2d(labels)
    pixel = _check_scale(scale)
    _check_distance(neighbor_distance)
    image = None
    if intensity is not None:
        image = np.asarray(intensity)
        if image.dtype == bool:
            image = image.astype(np.uint8)
        if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
            raise TypeError(f"intensity must be a real numeric image, got dtype {image.dtype}")
        if image.shape != arr.shape:
            raise ValueError(
                f"intensity has shape {image.shape} but labels has shape {arr.shape}: pass one "
                "channel of the image the labels were drawn on, of the same (M, N) shape"
            )
    properties = ["label", "area", "perimeter_crofton", "centroid", "equivalent_diameter_area", "solidity"]
    if image is not None:
        properties.append("intensity_mean")
    props = regionprops_table(
        arr,
        intensity_image=None if image is None else image.astype(np.float64),
        properties=properties,
        spacing=(pixel, pixel),
    )
    ids = np.asarray(props["label"], dtype=np.int64)
    area = np.asarray(props["area"], dtype=np.float64)
    perimeter = np.asarray(props["perimeter_crofton"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter > 0, 4.0 * np.pi * area / perimeter**2, np.nan)
    circularity = np.minimum(circularity, 1.0)
    aspect, eccentricity = _shape_moments(arr, ids)
    neighbor_ids, neighbors = count_neighbors(arr, neighbor_distance)
    if not np.array_equal(neighbor_ids, ids):  # pragma: no cover - both are the sorted labels
        raise RuntimeError("internal error: neighbour labels do not match the measured labels")
    if image is None:
        mean_intensity = np.full(ids.size, np.nan)
    else:
        mean_intensity = np.asarray(props["intensity_mean"], dtype=np.float64)
    return {
        "label": ids,
        "area": area,
        "perimeter": perimeter,
        "centroid_row": np.asarray(props["centroid-0"], dtype=np.float64),
        "centroid_col": np.asarray(props["centroid-1"], dtype=np.float64),
        "equivalent_diameter": np.asarray(props["equivalent_diameter_area"], dtype=np.float64),
        "circularity": circularity,
        "solidity": np.asarray(props["solidity"], dtype=np.float64),
        "aspect_ratio": aspect,
        "eccentricity": eccentricity,
        "mean_intensity": mean_intensity,
        "n_neighbors": neighbors,
    }


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class MeasureSummary:
    """Summary of one image's cells.

    Attributes
    ----------
    count : int
        Number of cells.
    mean_area, median_area : float
        Of the cells, in the table's units (0 when there are no cells).
    confluency : float
        Fraction of the image covered by cells, in [0, 1].
    mean_neighbors : float
        Mean of ``n_neighbors`` (0 when there are no cells).
    """

    count: int
    mean_area: float
    median_area: float
    confluency: float
    mean_neighbors: float

    def to_dict(self) -> dict:
        """Fields as JSON-ready Python numbers."""
        return asdict(self)


def summarize(table: dict, labels) -> MeasureSummary:
    """Summarise a table of :func:`measure_cells` and the label image it came from.

    Parameters
    ----------
    table : dict of str to ndarray
        Needs the columns ``area`` and ``n_neighbors``.
    labels : array_like of int, shape (M, N)
        The label image, for the confluency.

    Returns
    -------
    MeasureSummary

    Examples
    --------
    >>> labels = np.array([[1, 1, 0, 2]])
    >>> summarize(measure_cells(labels), labels)
    MeasureSummary(count=2, mean_area=1.5, median_area=1.5, confluency=0.75, mean_neighbors=1.0)
    """
    arr = check_label_image(labels, "labels")
    for name in ("area", "n_neighbors"):
        if name not in table:
            raise ValueError(f"table has no column {name!r}: pass the table returned by measure_cells")
    area = np.asarray(table["area"], dtype=np.float64)
    neighbors = np.asarray(table["n_neighbors"], dtype=np.float64)
    count = int(area.size)
    confluency = float(np.count_nonzero(arr)) / arr.size if arr.size else 0.0
    return MeasureSummary(
        count=count,
        mean_area=float(area.mean()) if count else 0.0,
        median_area=float(np.median(area)) if count else 0.0,
        confluency=confluency,
        mean_neighbors=float(neighbors.mean()) if count else 0.0,
    )


# --------------------------------------------------------------------------- CSV

_INT_TEXT = re.compile(r"^[+-]?\d+$")


def _format(value, integer: bool) -> str:
    if integer:
        return str(int(value))
    return repr(float(value))  # shortest text that reads back to the same float (nan, inf too)


def write_csv(table: dict, path: str | PathLike) -> None:
    """Write a table (dict of equally long columns) to a CSV file, header first.

    Floats are written with Python's shortest round-trip representation, so
    :func:`read_csv` returns the same values bit for bit.

    Parameters
    ----------
    table : dict of str to array_like, each of shape (C,)
    path : str or path-like
    """
    columns = {str(k): np.asarray(v) for k, v in table.items()}
    lengths = {k: v.shape for k, v in columns.items()}
    if any(len(s) != 1 for s in lengths.values()):
        raise ValueError(f"every column must be one-dimensional, got shapes {lengths}")
    if len({s[0] for s in lengths.values()}) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    integer = {k: v.dtype.kind in "iub" for k, v in columns.items()}
    n_rows = next(iter(lengths.values()))[0] if columns else 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(columns))
        for i in range(n_rows):
            writer.writerow([_format(v[i], integer[k]) for k, v in columns.items()])


def read_csv(path: str | PathLike) -> dict[str, np.ndarray]:
    """Read a table written by :func:`write_csv` (or any numeric CSV with a header).

    A column whose every entry is an integer literal becomes int64, any other
    float64; empty columns are int64 for :data:`INTEGER_COLUMNS`, float64
    otherwise.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    dict of str to ndarray, each of shape (C,)
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty: expected a header line") from None
        rows = [row for row in reader if row]
    for i, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {i}: {len(row)} values for {len(header)} columns")
    table: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        texts = [row[j].strip() for row in rows]
        if (texts and all(_INT_TEXT.match(t) for t in texts)) or (not texts and name in INTEGER_COLUMNS):
            table[name] = np.array([int(t) for t in texts], dtype=np.int64)
        else:
            try:
                table[name] = np.array([float(t) for t in texts], dtype=np.float64)
            except ValueError as exc:
                raise ValueError(f"{path}: column {name!r} is not numeric ({exc})") from None
    return table
