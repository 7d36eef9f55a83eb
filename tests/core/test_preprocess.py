from __future__ import annotations

import numpy as np
import pytest

from napari_cellseg.core.preprocess import (
    ResizeTransform,
    as_plane,
    normalize_image,
    resize_to_model,
    tile_slices,
    tile_starts,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_normalize_maps_percentiles_to_unit_range(dtype):
    rng = np.random.default_rng(1)
    image = (rng.random((50, 60)) * 200).astype(dtype)
    out = normalize_image(image, low=0, high=100)
    assert out.shape == (50, 60, 3) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    # monotone: the brightest input pixel stays the brightest
    assert out[..., 0].ravel()[np.argmax(image)] == 1.0


def test_normalize_clips_outliers_at_default_percentiles():
    image = np.zeros((100, 100), np.uint16)
    image[:50] = 100
    image[0, 0] = 60000  # one hot pixel must not squash the rest
    out = normalize_image(image)
    assert out[60, 0, 0] == 0.0
    assert out[10, 0, 0] == pytest.approx(1.0)


def test_normalize_does_not_modify_input_and_handles_nan():
    image = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    image[3, 3] = np.nan
    image[4, 4] = np.inf
    before = image.copy()
    out = normalize_image(image, low=0, high=100)
    np.testing.assert_array_equal(np.isnan(image), np.isnan(before))
    assert np.isfinite(out).all()
    assert out[3, 3, 0] == 0.0 and out[4, 4, 0] == 0.0
    assert out[19, 19, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("value", [0, 7.5, np.nan])
def test_constant_or_empty_image_becomes_zeros(value):
    out = normalize_image(np.full((8, 9), value))
    assert out.shape == (8, 9, 3)
    assert not out.any()


def test_rgb_keeps_colour_and_drops_alpha():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 1] = 100
    out = normalize_image(rgba, low=0, high=100)
    assert out.shape == (10, 10, 3)
    assert out[5, 5, 0] == 1.0 and out[5, 5, 1] == 0.0 and out[5, 5, 2] == 0.0


def test_multichannel_needs_a_channel():
    image = np.zeros((10, 10, 5))
    image[..., 2] = np.arange(10)
    with pytest.raises(ValueError, match="channel=INDEX"):
        normalize_image(image)
    out = normalize_image(image, channel=2, low=0, high=100)
    assert out[0, 9, 0] == 1.0
    with pytest.raises(ValueError, match="out of range"):
        as_plane(image, channel=7)


@pytest.mark.parametrize("shape", [(5, 10, 10, 3), (4,), (3, 10, 10, 10)])
def test_bad_shapes_are_explained(shape):
    with pytest.raises(ValueError, match="plane"):
        as_plane(np.zeros(shape))


def test_non_numeric_image_is_a_type_error():
    with pytest.raises(TypeError, match="numbers"):
        as_plane(np.array([["a", "b"], ["c", "d"]]))


def test_resize_transform_maps_row_col_to_sam_xy():
    t = ResizeTransform((100, 200), 256)
    assert t.resized_shape == (128, 256)
    xy = t.rc_to_model_xy(np.array([[10.0, 50.0]]))
    # (row, col) -> (x, y): x comes from the column
    np.testing.assert_allclose(xy, [[(50 + 0.5) * 1.28, (10 + 0.5) * 1.28]])
    box = t.box_rc_to_model_xyxy(np.array([20, 40, 10, 80]))  # corners in any order
    np.testing.assert_allclose(box, [40 * 1.28, 10 * 1.28, 80 * 1.28, 20 * 1.28])


def test_resize_to_model_pads_bottom_right():
    image = np.ones((50, 100, 3), np.float32)
    tensor, t = resize_to_model(image, 64)
    assert tuple(tensor.shape) == (1, 3, 64, 64)
    assert t.resized_shape == (32, 64)
    assert float(tensor[0, 0, :32].min()) == pytest.approx(1.0)
    assert float(tensor[0, 0, 32:].max()) == 0.0


def test_tiles_cover_the_image_with_overlap():
    shape = (1000, 700)
    tiles = tile_slices(shape, 256, 32)
    covered = np.zeros(shape, int)
    for rs, cs in tiles:
        assert rs.stop - rs.start == 256 and cs.stop - cs.start == 256
        covered[rs, cs] += 1
    assert covered.min() >= 1
    starts = tile_starts(1000, 256, 32)
    assert all(b - a <= 256 - 32 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        tile_starts(100, 32, 32)


def test_clahe_grey_and_colour():
    from napari_cellseg.core.preprocess import clahe

    rng = np.random.default_rng(0)
    grey = np.repeat((0.4 + 0.05 * rng.random((64, 64), np.float32))[..., None], 3, axis=-1)
    out = clahe(grey)
    assert out.shape == (64, 64, 3) and np.array_equal(out[..., 0], out[..., 2])
    assert out.std() > 3 * grey.std()  # a dim, flat image gains contrast
    colour = rng.random((64, 64, 3)).astype(np.float32)
    out = clahe(colour)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
