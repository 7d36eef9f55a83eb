"""Turn any 2D image a napari user opens into model input.

The documented normalisation
----------------------------
1. Pick the plane: 2D grayscale is used as is; RGB/RGBA (last axis 3 or 4,
   uint8) keeps its three colour channels; any other multichannel image needs an
   explicit ``channel`` (an index on the last axis) and is reduced to that
   channel. 3D and time stacks are handled plane by plane by the callers.
2. Intensities are rescaled so that the ``low`` percentile (default 1) maps to 0
   and the ``high`` percentile (default 99.8) to 1, then clipped to [0, 1].
   Percentiles ignore NaN and infinite pixels, which become 0. A constant
   image becomes all zeros (callers report that there is nothing to segment).
3. Grayscale is repeated to three channels, since SAM encoders take RGB.

Every model then receives ``image01 * 255`` minus its ``pixel_mean`` divided by
its ``pixel_std`` (ImageNet statistics for SAM, ``0`` and ``255`` for
LiteMedSAM, which was trained on images min-max scaled to [0, 1]).

Tiling helpers cut images larger than the model input into overlapping windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_LOW_PERCENTILE = 1.0
DEFAULT_HIGH_PERCENTILE = 99.8


def as_plane(image: np.ndarray, channel: int | None = None) -> np.ndarray:
    """Return a 2D plane ``(M, N)`` or an RGB image ``(M, N, 3)`` from a user image.

    Parameters
    ----------
    image : ndarray
        ``(M, N)`` grayscale, ``(M, N, 3|4)`` RGB(A) or ``(M, N, C)`` multichannel.
    channel : int, optional
        Index of the channel to use on the last axis of a multichannel image.
        Required when the last axis is not RGB(A).

    Raises
    ------
    TypeError
        For non-numeric data (strings, objects).
    ValueError
        For shapes that are not a single 2D plane, or an out-of-range channel.

    Examples
    --------
    >>> as_plane(np.zeros((4, 5, 2)), channel=1).shape
    (4, 5)
    >>> as_plane(np.zeros((4, 5, 4), np.uint8)).shape
    (4, 5, 3)
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise TypeError(f"image must hold numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError("complex images are not supported: take the magnitude first (np.abs)")
    if arr.ndim == 2:
        plane = arr
    elif arr.ndim == 3:
        n_chan = arr.shape[-1]
        if channel is not None:
            if not -n_chan <= channel < n_chan:
                raise ValueError(
                    f"channel {channel} is out of range for an image with {n_chan} channels "
                    f"(shape {arr.shape})"
                )
            plane = arr[..., channel]
        elif n_chan in (3, 4):
            plane = arr[..., :3]
        else:
            raise ValueError(
                f"image of shape {arr.shape} has {n_chan} channels on its last axis: choose one with "
                "channel=INDEX, or pass a single 2D plane (stacks are segmented plane by plane)"
            )
    else:
        raise ValueError(
            f"expected a 2D image (M, N) or (M, N, C), got shape {arr.shape}: pass one plane of a "
            "3D or time stack at a time"
        )
    if min(plane.shape[:2]) < 2:
        raise ValueError(f"image of shape {plane.shape} is too small to segment")
    return plane


def normalize_image(
    image: np.ndarray,
    channel: int | None = None,
    low: float = DEFAULT_LOW_PERCENTILE,
    high: float = DEFAULT_HIGH_PERCENTILE,
) -> np.ndarray:
    """Normalise a user image to ``float32`` RGB in [0, 1], shape ``(M, N, 3)``.

    Parameters
    ----------
    image : ndarray
        Any 2D image (see :func:`as_plane`); the input is never modified.
    channel : int, optional
        Channel to use on the last axis of a multichannel image.
    low, high : float
        Percentiles mapped to 0 and 1.

    Returns
    -------
    ndarray of float32, shape (M, N, 3)

    Examples
    --------
    >>> out = normalize_image(np.arange(12, dtype=np.uint16).reshape(3, 4), low=0, high=100)
    >>> out.shape, float(out.min()), float(out.max())
    ((3, 4, 3), 0.0, 1.0)
    >>> float(normalize_image(np.full((3, 3), 7.0)).max())
    0.0
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    plane = as_plane(image, channel).astype(np.float32, copy=True)
    finite = np.isfinite(plane)
    if not finite.any():
        return np.zeros(plane.shape[:2] + (3,), np.float32)
    values = plane[finite]
    # one scale for all colour channels keeps the colours' balance
    lo, hi = np.percentile(values, [low, high])
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        hi = values.max()
        lo = values.min()
    if hi <= lo:
        out = np.zeros_like(plane)
    else:
        out = (plane - lo) / (hi - lo)
    out[~finite] = 0.0
    np.clip(out, 0.0, 1.0, out=out)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)


def is_constant(image01: np.ndarray) -> bool:
    """True when a normalised image carries no contrast at all."""
    return float(np.ptp(image01)) == 0.0


@dataclass(frozen=True)
class ResizeTransform:
    """Geometry of resizing an ``(M, N)`` image so its longer side equals ``target``.

    The resized image sits in the top-left corner of a ``target x target``
    square, zero padded, as SAM expects.
    """

    original_shape: tuple[int, int]
    target: int

    @property
    def scale(self) -> float:
        return self.target / max(self.original_shape)

    @property
    def resized_shape(self) -> tuple[int, int]:
        rows, cols = self.original_shape
        s = self.scale
        return int(rows * s + 0.5), int(cols * s + 0.5)

    def rc_to_model_xy(self, coords_rc: np.ndarray) -> np.ndarray:
        """Map (row, col) pixel coordinates to SAM's (x, y) in model input pixels.

        This is the one place where napari's (row, col) order becomes SAM's
        (x, y): every prompt passes through here. Pixel centres are used, so
        row ``r`` maps to ``(r + 0.5) * scale``.
        """
        coords = np.asarray(coords_rc, dtype=np.float64)
        rows_sc = self.resized_shape[0] / self.original_shape[0]
        cols_sc = self.resized_shape[1] / self.original_shape[1]
        out = np.empty_like(coords)
        out[..., 0] = (coords[..., 1] + 0.5) * cols_sc
        out[..., 1] = (coords[..., 0] + 0.5) * rows_sc
        return out

    def box_rc_to_model_xyxy(self, boxes_rc: np.ndarray) -> np.ndarray:
        """Map boxes ``(..., 4)`` given as (r0, c0, r1, c1) to SAM's xyxy in model pixels.

        ``r1``/``c1`` are exclusive ends, as in numpy slices and
        ``skimage.measure.regionprops(...).bbox``; corners may come in any order.
        """
        boxes = np.asarray(boxes_rc, dtype=np.float64)
        r0 = np.minimum(boxes[..., 0], boxes[..., 2])
        r1 = np.maximum(boxes[..., 0], boxes[..., 2])
        c0 = np.minimum(boxes[..., 1], boxes[..., 3])
        c1 = np.maximum(boxes[..., 1], boxes[..., 3])
        rows_sc = self.resized_shape[0] / self.original_shape[0]
        cols_sc = self.resized_shape[1] / self.original_shape[1]
        return np.stack([c0 * cols_sc, r0 * rows_sc, c1 * cols_sc, r1 * rows_sc], axis=-1)


def resize_to_model(image01: np.ndarray, target: int):
    """Resize ``(M, N, 3)`` float image so its longer side is ``target`` and pad to a square.

    Returns
    -------
    tensor : torch.Tensor
        ``(1, 3, target, target)`` float32 in [0, 1], zero padded bottom/right.
    transform : ResizeTransform
    """
    import torch
    import torch.nn.functional as F

    if image01.ndim != 3 or image01.shape[-1] != 3:
        raise ValueError(f"expected a normalised (M, N, 3) image, got shape {image01.shape}")
    transform = ResizeTransform(tuple(image01.shape[:2]), int(target))
    t = torch.from_numpy(np.ascontiguousarray(image01.transpose(2, 0, 1)))[None]
    if t.shape[-2:] != transform.resized_shape:
        t = F.interpolate(t, size=transform.resized_shape, mode="bilinear", align_corners=False,
                          antialias=transform.scale < 1)
    rows, cols = transform.resized_shape
    t = F.pad(t, (0, target - cols, 0, target - rows))
    return t.clamp_(0.0, 1.0), transform


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of size ``tile`` covering ``length`` with at least ``overlap``.

    The last window is aligned with the end, so every window lies inside the
    image when ``length >= tile`` (one window starting at 0 otherwise).

    Examples
    --------
    >>> tile_starts(1024, 256, 32)
    [0, 224, 448, 672, 768]
    >>> tile_starts(100, 256, 32)
    [0]
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def tile_slices(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[slice, slice]]:
    """Overlapping ``(row_slice, col_slice)`` windows of size ``tile`` covering ``shape``.

    Examples
    --------
    >>> len(tile_slices((1024, 1024), 256, 32))
    25
    """
    rows = tile_starts(shape[0], tile, overlap)
    cols = tile_starts(shape[1], tile, overlap)
    return [
        (slice(r, min(r + tile, shape[0])), slice(c, min(c + tile, shape[1])))
        for r in rows
        for c in cols
    ]


def clahe(image01: np.ndarray, clip_limit: float = 0.01, kernel_size: int | None = None) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image (SAMCell's step).

    Uses :func:`skimage.exposure.equalize_adapthist` on each channel of an
    ``(M, N, 3)`` image (once when the channels are equal).
    """
    from skimage.exposure import equalize_adapthist

    if image01.ndim == 3 and np.array_equal(image01[..., 0], image01[..., 1]) and np.array_equal(
        image01[..., 0], image01[..., 2]
    ):
        eq = equalize_adapthist(image01[..., 0], kernel_size=kernel_size, clip_limit=clip_limit)
        return np.repeat(eq[..., None].astype(np.float32), 3, axis=-1)
    # colour: scikit-image equalises the value channel in HSV space, keeping hue
    return equalize_adapthist(image01, kernel_size=kernel_size, clip_limit=clip_limit).astype(np.float32)


# ---------------------------------------------------------------------------
# orientations (test-time augmentation)
# ---------------------------------------------------------------------------

#: orientations an image may be embedded in (``AnnotationConfig.views``, ``GuidedConfig.views``)
VIEW_COUNTS = (1, 2, 4, 8)

#: bit of a view code (above the orientation's three bits) that inverts a normalised image's intensities
#: (``AnnotationConfig.invert``); points, boxes and logits ignore it
INVERTED = 8


def view_array(a: np.ndarray, view: int) -> np.ndarray:
    """Orientation ``view`` (0-7) of an image's first two axes: bit 4 transposes, then bit 1 flips rows, bit 2 columns.

    Examples
    --------
    >>> a = np.arange(6).reshape(2, 3)
    >>> view_array(a, 5).tolist()  # transposed, then rows flipped
    [[2, 5], [1, 4], [0, 3]]
    """
    if view & 4:
        a = a.swapaxes(0, 1)
    if view & 1:
        a = a[::-1]
    if view & 2:
        a = a[:, ::-1]
    return a


def view_image(image01: np.ndarray, view: int) -> np.ndarray:
    """View code ``view`` of a normalised image in [0, 1]: orientation ``view & 7`` (:func:`view_array`), and
    intensities inverted (``1 - x``) when ``view & INVERTED``.

    Examples
    --------
    >>> a = np.array([[0.0, 0.25], [0.5, 1.0]])
    >>> view_image(a, INVERTED | 2).tolist()  # columns flipped, then inverted
    [[0.75, 1.0], [0.0, 0.5]]
    """
    a = view_array(image01, view & 7)
    return 1.0 - a if view & INVERTED else a


def _view_shape(shape: tuple[int, int], view: int) -> tuple[int, int]:
    return (shape[1], shape[0]) if view & 4 else (shape[0], shape[1])


def view_points(points: np.ndarray, view: int, shape: tuple[int, int]) -> np.ndarray:
    """(row, col) pixel coordinates ``(..., 2)`` on an image of ``shape``, in its orientation ``view``."""
    p = np.array(points, dtype=float)
    if view & 4:
        p = p[..., ::-1].copy()
    h, w = _view_shape(shape, view)
    if view & 1:
        p[..., 0] = h - 1 - p[..., 0]
    if view & 2:
        p[..., 1] = w - 1 - p[..., 1]
    return p


def view_boxes(boxes: np.ndarray, view: int, shape: tuple[int, int]) -> np.ndarray:
    """Boxes ``(B, 4)`` (r0, c0, r1, c1; exclusive ends) on an image of ``shape``, in its orientation ``view``."""
    b = np.array(boxes, dtype=float)
    if view & 4:
        b = b[:, [1, 0, 3, 2]]
    h, w = _view_shape(shape, view)
    if view & 1:
        b[:, [0, 2]] = h - b[:, [2, 0]]
    if view & 2:
        b[:, [1, 3]] = w - b[:, [3, 1]]
    return b


def unview_tensor(t, view: int):
    """Undo :func:`view_array` on the last two axes of a torch tensor."""
    import torch

    if view & 2:
        t = torch.flip(t, (-1,))
    if view & 1:
        t = torch.flip(t, (-2,))
    if view & 4:
        t = t.transpose(-1, -2)
    return t
