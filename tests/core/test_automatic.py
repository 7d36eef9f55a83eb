"""Automatic modes: stitching, grid / guided / distance pipelines, caching and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_cellseg.core import automatic as auto
from napari_cellseg.core import postprocess as pp
from napari_cellseg.core.models import random_model
from napari_cellseg.core.preprocess import normalize_image


def _cells(shape, centres, radii, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for k, (c, r) in enumerate(zip(centres, radii), start=1):
        rr, cc = disk(c, r, shape=shape)
        labels[rr, cc] = k
    image = rng.normal(0.1, 0.02, shape) + 0.6 * (labels > 0)
    return image.astype(np.float32), labels


def _same_partition(a, b):
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _best_ious(gt, pred):
    out = []
    for k in range(1, gt.max() + 1):
        g = gt == k
        ids, counts = np.unique(pred[g], return_counts=True)
        best = 0.0
        for i, c in zip(ids, counts):
            if i:
                best = max(best, c / (g | (pred == i)).sum())
        out.append(best)
    return np.array(out)


class OracleDecoder:
    """Stands in for :func:`automatic.decode_prompts`: answers each prompt with the true cell under it.

    It knows the crops in the order the modes embed them (one new ``features``
    tensor per crop), so it works for tiled images as well.
    """

    def __init__(self, labels, crops):
        self.labels = labels
        self.crops = crops
        self.features = None
        self.crop_index = -1
        self.calls = 0

    def __call__(self, model, features, transform, points_rc=None, boxes_rc=None, multimask=False, batch_size=16,
                 min_score=None, exact=False, score_log=None):
        if features is not self.features:
            self.features = features
            self.crop_index += 1
        rs, cs = self.crops[self.crop_index]
        crop_labels = self.labels[rs, cs]
        size = transform.target
        h = 4 * features.shape[-1]
        rows_sc = transform.resized_shape[0] / transform.original_shape[0]
        cols_sc = transform.resized_shape[1] / transform.original_shape[1]
        centre = (np.arange(h) + 0.5) * size / h
        r = np.floor(centre / rows_sc).astype(int)
        c = np.floor(centre / cols_sc).astype(int)
        inside = (r[:, None] < crop_labels.shape[0]) & (c[None, :] < crop_labels.shape[1])
        sampled = np.where(inside, crop_labels[np.minimum(r, crop_labels.shape[0] - 1)[:, None],
                                               np.minimum(c, crop_labels.shape[1] - 1)[None, :]], 0)
        where = points_rc if points_rc is not None else (boxes_rc[:, :2] + boxes_rc[:, 2:]) / 2
        where = np.round(np.asarray(where)).astype(int)
        n = len(where)
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            ks = crop_labels[where[idx, 0], where[idx, 1]]
            logits = np.where(sampled[None] == ks[:, None, None], 8.0, -8.0)
            logits[ks == 0] = -8.0
            scores = np.where(ks > 0, 0.95, 0.2)
            self.calls += 1
            yield idx, logits[:, None].astype(np.float32), scores[:, None].astype(np.float32)


def _count_network_calls(model):
    calls = {"encoder": 0, "decoder": 0}
    model.sam.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    # the IoU head runs once per decoder call, in the stock decoder and in the batch decoder of grid mode
    model.sam.mask_decoder.iou_prediction_head.register_forward_hook(
        lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    return calls


# ---------------------------------------------------------------------------
# stitching
# ---------------------------------------------------------------------------


@pytest.fixture
def distance_model():
    return auto.as_distance_model(random_model("vit_test", seed=1))


def test_stitching_a_constant_map_leaves_no_seams(monkeypatch, distance_model):
    monkeypatch.setattr(auto, "crop_distance_maps", lambda model, crops: [np.full(c.shape[:2], 0.3, np.float32)
                                                                          for c in crops])
    image = np.random.default_rng(0).random((600, 530))
    dmap = auto.run_to_completion(auto.predict_distance_map(image, distance_model))
    assert dmap.shape == (600, 530)
    assert np.abs(dmap - 0.3).max() < 1e-6


def test_stitching_reproduces_a_known_smooth_map(monkeypatch, distance_model):
    # each crop's "prediction" is the crop itself: the stitched map must be the image again
    monkeypatch.setattr(auto, "crop_distance_maps", lambda model, crops: [c[..., 0].copy() for c in crops])
    yy, xx = np.mgrid[:700, :520]
    image = np.sin(yy / 40.0) * np.cos(xx / 55.0)
    cfg = auto.DistanceConfig(clahe=False)
    dmap = auto.run_to_completion(auto.predict_distance_map(image, distance_model, cfg))
    expected = normalize_image(image)[..., 0]
    assert np.abs(dmap - expected).max() < 1e-5
    # images smaller than one crop are mirrored up to the crop size and cropped back
    small = image[:100, :150]
    out = auto.run_to_completion(auto.predict_distance_map(small, distance_model, cfg))
    assert np.abs(out - normalize_image(small)[..., 0]).max() < 1e-5


def test_disagreeing_crops_are_blended_smoothly(monkeypatch, distance_model):
    counter = iter(range(1000))
    monkeypatch.setattr(auto, "crop_distance_maps",
                        lambda model, crops: [np.full(c.shape[:2], next(counter) % 2, np.float32) for c in crops])
    dmap = auto.run_to_completion(auto.predict_distance_map(np.random.default_rng(0).random((480, 480)),
                                                            distance_model, auto.DistanceConfig(batch_size=3)))
    jumps = max(np.abs(np.diff(dmap, axis=0)).max(), np.abs(np.diff(dmap, axis=1)).max())
    assert 0.2 < dmap.max() - dmap.min()
    assert jumps < 0.1  # a hard seam between a 0-crop and a 1-crop would jump by 0.5 or more


def test_stitch_tiles_vectorised_helper():
    from napari_cellseg.core.preprocess import tile_slices

    sl = tile_slices((70, 90), 32, 8)
    tiles = [np.full((32, 32), 2.0)] * len(sl)
    assert np.allclose(auto.stitch_tiles(tiles, sl, (70, 90), 8), 2.0)
    with pytest.raises(ValueError, match="cover"):
        auto.stitch_tiles(tiles[:1], sl[:1], (70, 90), 8)


# ---------------------------------------------------------------------------
# distance mode
# ---------------------------------------------------------------------------


def test_distance_mode_runs_and_relabel_does_not_call_the_network(distance_model):
    calls = _count_network_calls(distance_model)
    image, _ = _cells((300, 280), [(60, 60), (200, 150)], [20, 25])
    records = []
    result = auto.run_to_completion(auto.distance_segmentation(image, distance_model), records.append)
    assert isinstance(result, auto.DistanceResult)
    assert records and records[-1].step == records[-1].total == 4  # 2 x 2 crops of 256 px
    assert calls["encoder"] == 4 and calls["decoder"] == 4  # on a CPU one crop per encoder call
    batched = auto.segment(image, distance_model, "distance", auto.DistanceConfig(batch_size=3))
    assert calls["encoder"] == 6  # batches of 3 and 1 crops
    np.testing.assert_allclose(batched.distance_map, result.distance_map, atol=1e-5)
    assert result.distance_map.shape == (300, 280)
    assert 0.0 <= result.distance_map.min() and result.distance_map.max() <= 1.0
    before = dict(calls)
    for peak in (0.9, 0.5, 0.2):
        labels = result.relabel(peak=peak, fill=0.1)
        assert labels.shape == (300, 280)
    result.relabel(min_size=10, fill_holes=True)
    assert calls == before
    assert result.thresholds["peak"] == 0.2 and result.thresholds["min_size"] == 10


@pytest.fixture
def tinyvit_distance_model():
    return auto.as_distance_model(random_model("tinyvit_test", seed=2))


def test_window_embeddings_cut_the_same_crops_as_crop_by_crop(monkeypatch, tinyvit_distance_model):
    import torch.nn.functional as F

    from napari_cellseg.core import distance_head, predictor

    # a network whose answer at a pixel depends only on its own 4 x 4 block and the pixel itself: embedding a
    # window and cutting the crops out of it must give every crop exactly what embedding it alone gives
    monkeypatch.setattr(distance_head, "distance_features", lambda sam, x: F.avg_pool2d(x, 4))
    monkeypatch.setattr(predictor, "distance_logits", lambda sam, f, px, image_dtype=None:
                        F.interpolate(f[:, :1], scale_factor=4.0) + 3.0 * (px[:, 1:2] - 0.5))
    image = np.random.default_rng(3).random((152, 188))
    base = dict(crop_size=64, overlap=8, clahe=False)
    per_crop = auto.run_to_completion(auto.predict_distance_map(
        image, tinyvit_distance_model, auto.DistanceConfig(embed_window=0, **base)))
    assert per_crop.std() > 0.05
    for window in (64, 120, 1000):  # one crop per window, 2 x 2 crops, the whole image
        records = []
        out = auto.run_to_completion(auto.predict_distance_map(
            image, tinyvit_distance_model, auto.DistanceConfig(embed_window=window, **base)), records.append)
        np.testing.assert_allclose(out, per_crop, atol=1e-6)
        assert records[-1].step == records[-1].total == 12  # 3 x 4 crops
        assert [r.step for r in records] == sorted(r.step for r in records)


def test_window_embeddings_call_the_encoder_once_per_window(tinyvit_distance_model):
    calls = _count_network_calls(tinyvit_distance_model)
    image = np.random.default_rng(4).random((150, 170))  # padded to 152 x 172: crops at 0, 56, 88 and 0, 56, 108
    cfg = auto.DistanceConfig(crop_size=64, overlap=8, embed_window=120)
    result = auto.segment(image, tinyvit_distance_model, "distance", cfg)
    assert calls == {"encoder": 4, "decoder": 9}  # windows of rows {0, 56}, {88} by columns {0, 56}, {108}
    assert result.distance_map.shape == (150, 170) and np.isfinite(result.distance_map).all()
    auto.segment(image, tinyvit_distance_model, "distance", cfg.updated(embed_window=0))
    assert calls == {"encoder": 13, "decoder": 18}
    # by default windows are used where the encoder runs in bfloat16 on a CPU (measured faster there), else not
    assert auto.default_embed_window(tinyvit_distance_model) == 0  # float32 (tests/conftest.py)
    fast = tinyvit_distance_model.with_precision("bfloat16")
    assert auto.default_embed_window(fast) == auto.EMBED_WINDOW
    auto.segment(image, fast, "distance", auto.DistanceConfig(crop_size=64, overlap=8))
    assert calls["encoder"] == 13 + 1  # 152 x 172 px: one window
    # crops resized to the encoder input (here 256 px crops for a 64 px encoder) are embedded one by one
    auto.segment(np.random.default_rng(4).random((300, 280)), tinyvit_distance_model, "distance")
    assert calls["encoder"] == 14 + 4


def test_a_bfloat16_model_decodes_the_distance_map_with_bfloat16_image_tokens(tinyvit_distance_model, monkeypatch):
    import torch

    from napari_cellseg.core.fast_decoder import FastMaskDecoder

    low = tinyvit_distance_model.with_precision("bfloat16")
    assert auto.distance_decoder_dtype(low) == torch.bfloat16
    assert auto.distance_decoder_dtype(tinyvit_distance_model) is None  # float32 (tests/conftest.py)
    seen = []
    call = FastMaskDecoder.__call__

    def spy(self, *args, **kwargs):
        seen.append(self.image_dtype)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(FastMaskDecoder, "__call__", spy)
    image = np.random.default_rng(6).random((150, 170))
    cfg = auto.DistanceConfig(crop_size=64, overlap=8)
    followed = auto.segment(image, low, "distance", cfg).distance_map
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    monkeypatch.setattr(auto, "DISTANCE_DECODER_FOLLOWS_PRECISION", False)
    kept = auto.segment(image, low, "distance", cfg).distance_map
    assert seen and set(seen) == {None}
    diff = np.abs(followed - kept)
    assert 0 < diff.max() < 0.02, diff.max()


def test_distance_relabel_on_a_known_map_and_empty_message():
    labels = pp.distance_targets(_cells((80, 80), [(20, 20), (55, 50)], [10, 12])[1].astype(int))
    dmap = np.where(labels > 0, 0.2 + 0.8 * labels, 0).astype(np.float32)
    result = auto.DistanceResult("distance", np.zeros((80, 80), np.int32), thresholds=dict(
        peak=0.47, fill=0.09, min_size=0, fill_holes=False), distance_map=dmap)
    assert result.relabel().max() == 2 and result.message == ""
    assert result.relabel(peak=1.0).max() == 0
    assert "lower the peak threshold" in result.message and "highest 1.00" in result.message
    assert result.relabel(peak=0.5, min_size=10_000).max() == 0
    assert "lower the minimum size" in result.message


def test_distance_mode_needs_a_distance_model(tiny_vit):
    with pytest.raises(ValueError, match="(?i)fine-tune one with the distance recipe, or use grid mode"):
        auto.segment(np.zeros((32, 32)), tiny_vit, mode="distance")
    with pytest.raises(ValueError, match="guided mode needs a distance-map model"):
        auto.segment(np.zeros((32, 32)), tiny_vit, mode="guided")
    assert auto.default_mode(tiny_vit) == "grid"


def test_model_thresholds_are_the_defaults():
    m = auto.as_distance_model(random_model("vit_test"), {"peak": 0.6, "fill": 0.2})
    assert auto.make_config("distance", m).peak == 0.6
    assert auto.make_config("distance", m, fill=0.05).fill == 0.05
    assert auto.make_config("guided", m).distance.fill == 0.2
    m.meta["crop_size"] = 128  # a distance model fine-tuned on 128 px crops is run on 128 px crops
    assert (auto.make_config("distance", m).crop_size, auto.make_config("distance", m).overlap) == (128, 16)
    assert auto.make_config("guided", m, crop_size=192).distance.crop_size == 192


def test_model_smoothing_default_and_noisy_map_smoothing(monkeypatch):
    m = auto.as_distance_model(random_model("vit_test"), {"peak": 0.5, "fill": 0.2, "smooth": 2.0})
    assert auto.make_config("distance", m).smooth == 2.0
    assert auto.make_config("guided", m, smooth=0.0).distance.smooth == 0.0
    with pytest.raises(ValueError, match="smooth must be"):
        auto.DistanceConfig(smooth=-1).validate()
    # two true cells whose map carries pixel noise: unsmoothed, the noise seeds extra cells; smoothed, it does not
    yy, xx = np.mgrid[:96, :96]
    clean = np.zeros((96, 96), np.float32)
    for cy, cx in ((30, 30), (60, 66)):
        clean = np.maximum(clean, np.clip(1 - np.hypot(yy - cy, xx - cx) / 14, 0, 1))
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.15, clean.shape), 0, 1).astype(np.float32)
    monkeypatch.setattr(auto, "crop_distance_maps", lambda model, crops: [noisy[: c.shape[0], : c.shape[1]]
                                                                            for c in crops])
    image = np.random.default_rng(1).random((96, 96)).astype(np.float32)
    cfg = dict(peak=0.5, fill=0.2, crop_size=96, overlap=0, clahe=False)
    raw = auto.segment(image, m, mode="distance", config=auto.DistanceConfig(**cfg, smooth=0.0))
    smooth = auto.segment(image, m, mode="distance", config=auto.DistanceConfig(**cfg, smooth=2.0))
    assert raw.n_cells > 2
    assert smooth.n_cells == 2
    assert smooth.labels[30, 30] != smooth.labels[60, 66] and smooth.labels[30, 30] and smooth.labels[60, 66]


def _size_selective_maps(lo, hi):
    """Stands in for :func:`automatic.crop_distance_maps` as a distance model that knows cells of one size:
    the normalised distance map of each bright blob whose equivalent radius is in [lo, hi] pixels of the crop,
    nothing elsewhere (a model trained on such cells splits or misses others)."""
    from scipy import ndimage as ndi

    def maps(model, crops):
        out = []
        for crop in crops:
            blobs, n = ndi.label(crop[..., 0] > 0.5)
            dmap = np.zeros(crop.shape[:2], np.float32)
            for k, sl in enumerate(ndi.find_objects(blobs), start=1):
                inside = blobs[sl] == k
                if lo <= np.sqrt(inside.sum() / np.pi) <= hi:
                    dist = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
                    dmap[sl][inside] = dist[inside] / dist.max()
            out.append(dmap)
        return out

    return maps


def test_scale_brings_cells_to_the_models_size_and_the_labels_back(monkeypatch, distance_model):
    # the "model" knows cells 8-14 px in radius; the image holds cells of radius 22 (2x too large)
    monkeypatch.setattr(auto, "crop_distance_maps", _size_selective_maps(8, 14))
    centres = [(40 + 70 * i, 45 + 75 * j) for i in range(4) for j in range(4)]
    image, labels = _cells((300, 320), centres, [22] * len(centres))
    cfg = auto.DistanceConfig(peak=0.47, fill=0.09, clahe=False)
    assert auto.segment(image, distance_model, mode="distance", config=cfg).n_cells == 0
    res = auto.segment(image, distance_model, mode="distance", config=cfg.updated(scale=0.5))
    assert res.labels.shape == labels.shape and res.distance_map.shape == labels.shape
    assert res.n_cells == len(centres)
    ious = _best_ious(labels, res.labels)
    assert ious.min() > 0.8, ious  # back at the image's size, not the zoomed one
    # tiny cells (radius 5) are found when the image is zoomed up
    small, small_labels = _cells((160, 170), [(30 + 35 * i, 30 + 36 * j) for i in range(4) for j in range(4)],
                                 [5] * 16)
    assert auto.segment(small, distance_model, mode="distance", config=cfg).n_cells == 0
    up = auto.segment(small, distance_model, mode="distance", config=cfg.updated(scale=2.0))
    assert up.n_cells == 16 and _best_ious(small_labels, up.labels).min() > 0.6
    # guided mode zooms its distance stage the same way (its map is at the image's size)
    g = auto.make_config("guided", distance_model, peak=0.47, fill=0.09, clahe=False, scale=0.5)
    assert g.distance.scale == 0.5
    dmap = auto.run_to_completion(auto.predict_distance_map(image, distance_model, g.distance))
    assert np.abs(dmap - res.distance_map).max() < 1e-6


def test_scale_one_is_the_unzoomed_map_and_zooming_round_trips_a_smooth_map(monkeypatch, distance_model):
    monkeypatch.setattr(auto, "crop_distance_maps", lambda model, crops: [c[..., 0].copy() for c in crops])
    yy, xx = np.mgrid[:300, :260]
    image = (np.sin(yy / 40.0) * np.cos(xx / 55.0)).astype(np.float32)
    cfg = auto.DistanceConfig(clahe=False)
    plain = auto.run_to_completion(auto.predict_distance_map(image, distance_model, cfg))
    assert np.array_equal(plain, auto.run_to_completion(auto.predict_distance_map(
        image, distance_model, cfg.updated(scale=1.0))))
    steps = {}
    for s in (0.5, 1.5, 3.0):
        progress = []
        dmap = auto.run_to_completion(auto.predict_distance_map(image, distance_model, cfg.updated(scale=s)),
                                      progress.append)
        assert dmap.shape == image.shape and dmap.dtype == np.float32
        assert np.abs(dmap - plain)[4:-4, 4:-4].max() < 0.03  # bilinear there and back on a smooth map
        steps[s] = progress[-1].total
    assert steps[0.5] < steps[1.5] < steps[3.0]  # the crops cover the zoomed image


def test_scale_is_checked_and_huge_zooms_are_refused(distance_model):
    for bad in (0, 0.1, 5, float("nan"), "big", True):
        with pytest.raises(ValueError, match="scale must be a zoom between 0.25 and 4"):
            auto.DistanceConfig(scale=bad).validate()
    auto.DistanceConfig(scale="auto").validate()
    with pytest.raises(ValueError, match="predict_distance_map needs a numeric scale"):
        next(auto.predict_distance_map(np.ones((64, 64)), distance_model, auto.DistanceConfig(scale="auto")))
    assert auto.largest_scale((1000, 1000)) == auto.MAX_SCALE and auto.largest_scale((10000, 10000)) == 1.0
    with pytest.raises(ValueError, match="grid mode has no setting scale"):
        auto.make_config("grid", scale=0.5)
    assert auto.make_config("distance", distance_model, scale=2).scale == 2
    with pytest.raises(ValueError, match=r"makes this 6000 x 5000 image 24000 x 20000 pixels.*lower the scale"):
        auto.zoomed_shape((6000, 5000), 4.0)
    assert auto.zoomed_shape((100, 30), 0.25) == (25, auto.MIN_IMAGE_SIDE)
    assert auto.scale_for_diameter(80, 40) == 0.5 and auto.scale_for_diameter(2, 40) == auto.MAX_SCALE
    with pytest.raises(ValueError, match="positive number of pixels"):
        auto.scale_for_diameter(0, 40)


def test_zoom_views_average_the_maps_at_the_extra_zooms(distance_model):
    from napari_cellseg.core.progress import run_to_completion

    image01, _ = auto.prepare_image(_cells((120, 100), [(40, 40), (80, 60)], [15, 12], seed=3)[0])
    cfg = auto.DistanceConfig()
    maps = {s: run_to_completion(auto.predict_distance_map(None, distance_model, cfg.updated(scale=s),
                                                           image01=image01)) for s in (1.0, 1.25, 0.8)}
    records = []
    both = run_to_completion(auto.predict_distance_map(None, distance_model, cfg.updated(zoom_views=(1.25, 0.8)),
                                                       image01=image01), records.append)
    np.testing.assert_allclose(both, (maps[1.0] + maps[1.25] + maps[0.8]) / 3, atol=1e-6)
    assert any(r.message.startswith("zoom view 2/2 (zoom 0.8)") for r in records)
    assert auto.make_config("guided", distance_model, zoom_views=(1.25,)).distance.zoom_views == (1.25,)
    assert auto.DistanceConfig.from_json(cfg.updated(zoom_views=(1.25,)).to_json()) == cfg.updated(zoom_views=(1.25,))
    for bad in ((3.0,), (0.1,), 1.25, (float("nan"),), (True,)):
        with pytest.raises(ValueError, match="zoom_views must be zooms between 0.5 and 2"):
            auto.DistanceConfig(zoom_views=bad).validate()


def _disk_cells_map(shape, centres, diameter: float) -> np.ndarray:
    """A perfect normalised distance map of round cells of ``diameter`` px at ``centres``."""
    from scipy import ndimage as ndi

    labels = np.zeros(shape, np.int32)
    for k, c in enumerate(centres, start=1):
        rr, cc = disk(c, diameter / 2, shape=shape)
        labels[rr, cc] = k
    dist = ndi.distance_transform_edt(labels > 0)
    out = np.zeros(shape, np.float32)
    for k in range(1, len(centres) + 1):
        out[labels == k] = dist[labels == k] / dist[labels == k].max()
    return out


def test_auto_scale_measures_again_after_each_zoom_and_stops_after_three_maps(distance_model, monkeypatch):
    """A model that splits large cells measures them too small at first: the auto zoom maps again at the zoom
    each measurement asks for, up to ``MAX_PASSES`` maps, and says when it stopped short."""
    from napari_cellseg.core import cell_size

    shape = (400, 400)
    centres = [(80 + 120 * i, 80 + 120 * j) for i in range(3) for j in range(3)]
    measured = {1.0: 40, 0.5: 60, 0.33: 80}  # the cells' diameter (image pixels) the map gives at each zoom
    zooms = []

    def fake_map(image, model, config=None, channel=None, image01=None):
        zooms.append(config.scale)
        yield from ()
        return _disk_cells_map(shape, centres, measured[config.scale])

    monkeypatch.setattr(auto, "predict_distance_map", fake_map)
    distance_model.meta["cell_diameters"] = {"fluorescence": {"p10": 18.0, "median": 20.0, "p90": 22.0}}
    image = np.full(shape, 0.02, np.float32)
    image[::7, ::7] = 1.0  # a dark background
    cfg = auto.DistanceConfig(scale="auto", fill=0.01)
    res = auto.segment(image, distance_model, "distance", cfg)
    est = res.size_estimate
    assert zooms == [1.0, 0.5, 0.33] and [p[0] for p in est.passes] == zooms
    assert est.scale == 0.33 and res.n_cells == 9
    assert est.message.startswith("zoom 0.33: cells of 40 px at zoom 1, 60 px at zoom 0.5, 80 px at zoom 0.33")
    assert est.message.endswith("(measured there, they would need zoom 0.25: set it by hand)")
    assert cell_size.MAX_PASSES == 3
    # zoom views are added to the last map only, at its zoom: the measuring passes stay plain
    view = round(0.33 * 1.25, 3)
    measured[view] = 80
    zooms.clear()
    res = auto.segment(image, distance_model, "distance", cfg.updated(zoom_views=(1.25,)))
    assert zooms == [1.0, 0.5, 0.33, view] and res.size_estimate.scale == 0.33


def test_auto_scale_adds_a_zoomed_in_view_for_cells_below_the_training_median(distance_model, monkeypatch):
    """small_cell_view (on in the defaults of a model that records its training cells' sizes): cells measured
    below the training median of their kind, though within its 10th-90th percentiles (so the zoom stays), get a
    second map at 1.25 times the zoom, averaged in; cells above it, or the option off, keep one map."""
    shape = (300, 300)
    centres = [(60 + 90 * i, 60 + 90 * j) for i in range(3) for j in range(3)]
    diameter = {"px": 16}
    zooms = []

    def fake_map(image, model, config=None, channel=None, image01=None):
        zooms.append(config.scale)
        yield from ()
        return _disk_cells_map(shape, centres, diameter["px"]) * (1.0 if config.scale == 1.0 else 0.5)  # the view's map differs: the average shows

    monkeypatch.setattr(auto, "predict_distance_map", fake_map)
    distance_model.meta["cell_diameters"] = {"fluorescence": {"p10": 10.0, "median": 20.0, "p90": 30.0}}
    defaults = auto.model_distance_defaults(distance_model)
    assert defaults["scale"] == "auto" and defaults["small_cell_view"] is True
    image = np.full(shape, 0.02, np.float32)
    image[::7, ::7] = 1.0  # a dark background: fluorescence
    cfg = auto.DistanceConfig(**{**defaults, "fill": 0.01, "smooth": 0.0})
    res = auto.segment(image, distance_model, "distance", cfg)
    assert zooms == [1.0, auto.SMALL_CELL_VIEW] == [1.0, 1.25]
    assert res.size_estimate.scale == 1.0 and res.n_cells == 9
    assert "below the training median (20 px): also mapped at zoom 1.25 and averaged" in res.size_estimate.message
    assert res.distance_map.max() == pytest.approx(0.75, abs=0.02)  # (1 + 0.5) / 2 at the centres
    for setting, px in ((False, 16), (True, 24)):  # the option off, or cells above the median: one map
        zooms.clear()
        diameter["px"] = px
        res = auto.segment(image, distance_model, "distance", cfg.updated(small_cell_view=setting))
        assert zooms == [1.0] and "training median" not in res.size_estimate.message
    # a numeric zoom measures nothing: no view
    zooms.clear()
    diameter["px"] = 16
    auto.segment(image, distance_model, "distance", cfg.updated(scale=1.0))
    assert zooms == [1.0]
    assert auto.make_config("guided", distance_model, small_cell_view=False).distance.small_cell_view is False


# ---------------------------------------------------------------------------
# grid mode
# ---------------------------------------------------------------------------


def test_grid_pipeline_recovers_exact_cells_with_an_oracle_decoder(monkeypatch):
    # a 64 px image in a 256 px model input: the decoder grid has one pixel per image pixel
    image, labels = _cells((64, 64), [(14, 14), (16, 45), (45, 20), (47, 48), (30, 31)], [8, 9, 7, 10, 5])
    model = random_model("vit_test", img_size=256)
    oracle = OracleDecoder(labels, [(slice(0, 64), slice(0, 64))])
    monkeypatch.setattr(auto, "decode_prompts", oracle)
    result = auto.segment(image, model, mode="grid", config=auto.GridConfig(points_per_side=16))
    assert oracle.calls == 64  # 256 prompts in batches of 4
    assert result.n_cells == 5
    assert _same_partition(result.labels, labels)
    # thresholds re-run only the filtering
    assert result.relabel(probability=0.99).max() == 0
    assert "lower the probability threshold" in result.message and "highest 0.95" in result.message
    assert result.relabel(probability=0.8, stability=1.5).max() == 0
    assert "lower the stability threshold" in result.message
    assert result.relabel(stability=0.6, min_area=400).max() == 0
    assert "lower the minimum area" in result.message
    small = (np.bincount(labels.ravel())[1:] <= 0.04 * 64 * 64).sum()
    assert 0 < small < 5
    assert result.relabel(min_area=20, max_area_fraction=0.04).max() == small  # drops the large cells
    assert oracle.calls == 64


def test_grid_mode_crops_large_images_and_merges_across_crops(monkeypatch):
    centres = [(60, 60), (60, 250), (250, 100), (300, 330), (150, 200), (255, 240), (340, 40)]
    image, labels = _cells((400, 380), centres, [28, 30, 26, 32, 25, 27, 24])
    model = random_model("vit_test", img_size=128)
    crops = auto._model_crops(labels.shape, 128, 1.5)
    assert len(crops) == 9  # crops of 192 px with 48 px overlap
    oracle = OracleDecoder(labels, crops)
    monkeypatch.setattr(auto, "decode_prompts", oracle)
    result = auto.segment(image, model, mode="grid",
                          config=auto.GridConfig(points_per_side=12, max_downscale=1.5))
    assert oracle.crop_index == 8
    assert result.n_cells == len(centres)  # duplicates from overlapping crops are merged by NMS
    ious = _best_ious(labels, result.labels)
    assert ious.min() > 0.75, ious


def test_grid_mode_end_to_end_on_a_tiny_model_and_relabel_is_offline(tiny_vit):
    with_bias = tiny_vit
    with_bias.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data += 1.0  # confident answers
    calls = _count_network_calls(with_bias)
    image, _ = _cells((96, 80), [(30, 30), (60, 50)], [12, 14])
    cfg = auto.GridConfig(points_per_side=6, max_area_fraction=1.0, probability=0.5, stability=0.0, batch_size=8)
    records = []
    result = auto.run_to_completion(auto.grid_segmentation(image, with_bias, cfg), records.append)
    assert calls["encoder"] == 1 and calls["decoder"] == 5  # 36 prompts in batches of 8
    assert [r.step for r in records] == list(range(len(records)))
    assert records[-1].step == records[-1].total
    assert len(result.candidates) == 36 and result.candidates.n_prompts == 36
    assert result.labels.shape == (96, 80) and result.labels.dtype == np.int32
    assert result.n_cells >= 1, result.message
    before = dict(calls)
    for p in (0.0, 0.5, 0.9, 1.2):
        result.relabel(probability=p, stability=0.3, nms_iou=0.5)
    assert calls == before
    assert result.n_cells == 0 and "probability" in result.message


def test_grid_mode_draws_masks_only_above_the_probability_floor(tiny_vit):
    model = tiny_vit
    model.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data += 0.6
    image, _ = _cells((96, 80), [(30, 30), (60, 50)], [12, 14])
    base = dict(points_per_side=6, max_area_fraction=1.0, stability=0.0, nms_iou=0.5)
    # everything drawn (floor 0) as the reference
    full = auto.segment(image, model, mode="grid", config=auto.GridConfig(probability=0.0, **base))
    assert len(full.candidates) == 36
    scores = full.candidates.scores
    floor = float(np.sort(scores)[17] + np.sort(scores)[18]) / 2  # halfway between two answers
    cfg = auto.GridConfig(probability=0.9, probability_floor=floor, **base)
    assert cfg.decode_floor == floor and auto.GridConfig(probability=0.3).decode_floor == 0.3
    result = auto.segment(image, model, mode="grid", config=cfg)
    assert result.probability_floor == floor
    assert len(result.candidates) == int((scores > floor).sum()) == 18  # the others were never drawn
    assert (result.candidates.scores > floor).all()
    assert result.candidates.n_prompts == 36
    assert result.candidates.best_score == pytest.approx(scores.max(), abs=1e-5)
    # above the floor the cached candidates give what a full run gives, without the network
    for p in (floor + 1e-3, 0.9):
        assert np.array_equal(result.relabel(probability=p), full.relabel(probability=p))
        assert result.note == ""
    # below it, only the drawn candidates are there, and the result says so
    below = result.relabel(probability=0.0)
    assert np.array_equal(below, full.relabel(probability=floor + 1e-3))
    assert "run again" in result.note
    # the exact decoder gives the same candidates
    exact = auto.segment(image, model, mode="grid", config=cfg.updated(exact_decoder=True))
    assert np.array_equal(exact.candidates.ids, result.candidates.ids)
    np.testing.assert_allclose(exact.candidates.scores, result.candidates.scores, atol=1e-5)
    assert np.array_equal(exact.relabel(probability=0.9), result.relabel(probability=0.9))


def test_grid_mode_says_when_no_answer_reaches_the_floor(tiny_vit):
    tiny_vit.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data -= 5.0
    image, _ = _cells((64, 64), [(30, 30)], [12])
    result = auto.segment(image, tiny_vit, mode="grid", config=auto.GridConfig(points_per_side=4))
    assert len(result.candidates) == 0 and result.n_cells == 0
    assert "run again" in result.message and "above 0.50" in result.message and "highest" in result.message


def test_grid_multimask_keeps_three_candidates_per_point(tiny_vit):
    cfg = auto.GridConfig(points_per_side=3, max_area_fraction=1.0, multimask=True)
    result = auto.segment(np.random.default_rng(1).random((40, 40)), tiny_vit, mode="grid", config=cfg)
    assert result.candidates.n_prompts == 9
    assert len(result.candidates) <= 27 and set(result.candidates.ids) <= set(range(9))


# ---------------------------------------------------------------------------
# guided mode
# ---------------------------------------------------------------------------


def test_guided_mode_on_a_synthetic_distance_map(monkeypatch):
    image, labels = _cells((64, 64), [(14, 14), (16, 45), (45, 20), (47, 48)], [8, 9, 7, 10])
    dmap = np.where(labels > 0, 0.2 + 0.8 * pp.distance_targets(labels), 0).astype(np.float32)
    model = random_model("vit_test", img_size=256)
    oracle = OracleDecoder(labels, [(slice(0, 64), slice(0, 64))])
    monkeypatch.setattr(auto, "decode_prompts", oracle)
    result = auto.run_to_completion(auto.guided_from_map(image, dmap, model))
    assert oracle.calls == 1  # four cells, one prompt each, one batch
    assert result.candidates.n_prompts == 4
    assert _same_partition(result.labels, labels)
    assert result.n_drawn == 4
    with pytest.raises(ValueError, match="without new prompts"):
        result.relabel(peak=0.3)


def test_guided_mode_falls_back_to_the_watershed_regions(tiny_vit):
    image, labels = _cells((80, 80), [(20, 20), (55, 55)], [10, 12])
    dmap = np.where(labels > 0, 0.2 + 0.8 * pp.distance_targets(labels), 0).astype(np.float32)
    calls = _count_network_calls(tiny_vit)
    result = auto.run_to_completion(auto.guided_from_map(image, dmap, tiny_vit))
    assert calls["encoder"] == 1 and calls["decoder"] == 1
    assert result.n_cells >= 1
    # rejecting every SAM answer leaves exactly the watershed regions
    assert _same_partition(result.relabel(probability=2.0), labels)
    assert result.relabel(probability=2.0, fallback=False).max() == 0
    assert "lower the probability threshold" in result.message
    assert calls["decoder"] == 1


def test_guided_mode_prompt_choices(monkeypatch):
    image, labels = _cells((64, 64), [(14, 14), (16, 45), (45, 20), (47, 48)], [8, 9, 7, 10])
    dmap = np.where(labels > 0, 0.2 + 0.8 * pp.distance_targets(labels), 0).astype(np.float32)
    model = random_model("vit_test", img_size=256)
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["points_rc"] is not None, kwargs["boxes_rc"] is not None))
        yield from OracleDecoder(labels, [(slice(0, 64), slice(0, 64))])(*args, **kwargs)

    monkeypatch.setattr(auto, "decode_prompts", spy)
    run = auto.run_to_completion
    default = run(auto.guided_from_map(image, dmap, model))
    assert seen[-1] == (True, True) and default.candidates.mask_threshold == 0.0
    boxes = run(auto.guided_from_map(image, dmap, model, auto.GuidedConfig(use_points=False, mask_threshold=-2)))
    assert seen[-1] == (False, True) and boxes.candidates.mask_threshold == -2.0
    assert _same_partition(boxes.labels, labels)
    run(auto.guided_from_map(image, dmap, model, auto.GuidedConfig(use_boxes=False, use_points=False)))
    assert seen[-1] == (True, False)  # without boxes the point is the prompt


class ViewOracle(OracleDecoder):
    """The oracle for one crop embedded in ``views`` orientations (each features tensor is the next one); the
    orientations after the first see the crop padded to a square below and right, then turned."""

    def __init__(self, labels, views):
        super().__init__(labels, [(slice(0, labels.shape[0]), slice(0, labels.shape[1]))])
        self.views = views
        self.seen: list[int] = []

    def __call__(self, model, features, transform, **kwargs):
        from napari_cellseg.core.interactive import view_array

        if id(features) not in self.seen:
            self.seen.append(id(features))
        view = self.seen.index(id(features)) % self.views
        labels = self.labels
        if view:
            side = max(labels.shape)
            labels = view_array(np.pad(labels, ((0, side - labels.shape[0]), (0, side - labels.shape[1]))), view)
        crops = [(slice(0, labels.shape[0]), slice(0, labels.shape[1]))]
        yield from OracleDecoder(np.ascontiguousarray(labels), crops)(model, features, transform, **kwargs)


@pytest.mark.parametrize("views, invert", [(2, False), (4, False), (8, False), (1, True), (2, True)])
def test_guided_orientations_move_prompts_and_masks_back(monkeypatch, views, invert):
    """Each orientation's oracle answers in its own frame; averaged back, the cells are exact (non-square crop).
    With ``invert`` every orientation is embedded a second time, as its negative."""
    image, labels = _cells((48, 64), [(12, 12), (13, 44), (36, 16), (35, 48)], [8, 9, 7, 10])  # one image px per low-res px
    dmap = np.where(labels > 0, 0.2 + 0.8 * pp.distance_targets(labels), 0).astype(np.float32)
    model = random_model("vit_test", img_size=256)
    calls = _count_network_calls(model)
    monkeypatch.setattr(auto, "decode_prompts", ViewOracle(labels, views))
    from napari_cellseg.core.predictor import Predictor

    inputs = []
    embed = Predictor.embed
    monkeypatch.setattr(Predictor, "embed", lambda self, x: (inputs.append(np.array(x)), embed(self, x))[1])
    cfg = auto.GuidedConfig(views=views, use_points=views != 4, invert=invert)  # points and boxes, boxes alone
    records = []
    result = auto.run_to_completion(auto.guided_from_map(image, dmap, model, cfg), records.append)
    n = views * (2 if invert else 1)
    assert calls["encoder"] == n  # one encoder pass per view of the one crop
    assert sum("orientation" in r.message for r in records) == n - 1  # each one a cancel point
    assert _same_partition(result.labels, labels) and result.n_drawn == 4
    if invert:  # the second half saw the negatives: the first orientation's is 1 - the crop, unpadded
        assert np.allclose(inputs[views], 1.0 - inputs[0])
        assert sum(", inverted" in r.message for r in records) == views
    with pytest.raises(ValueError, match="views must be one of"):
        auto.GuidedConfig(views=3).validate()


def test_guided_orientations_leave_inference_mode_as_they_found_it(distance_model):
    """The orientations' decoders run interleaved; none may leave torch's inference mode on for the caller."""
    import torch

    image, _ = _cells((72, 72), [(20, 20), (50, 50)], [10, 12])
    cfg = auto.make_config("guided", distance_model, views=2, peak=0.0, fill=0.0)
    assert not torch.is_inference_mode_enabled()
    gen = auto.guided_segmentation(image, distance_model, config=cfg)
    for _ in gen:
        pass
    assert not torch.is_inference_mode_enabled()


def test_averaging_orientations_turns_each_one_back():
    """A random map seen in each orientation averages back to itself (a wrong turn of any one would not)."""
    import torch

    from napari_cellseg.core.interactive import view_array

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2, 1, 16, 16)).astype(np.float32)
    batches = []
    for v in range(8):
        turned = np.moveaxis(view_array(np.moveaxis(truth, (2, 3), (0, 1)), v), (0, 1), (2, 3))
        batches.append((np.arange(2), np.ascontiguousarray(turned), np.full((2, 1), 0.1 * (v + 1), np.float32)))
    logits, scores = auto._average_views(batches, list(range(8)))
    assert np.allclose(logits, truth, atol=1e-6) and np.allclose(scores, 0.45)
    wrong = [batches[0], (np.arange(2), torch.from_numpy(batches[1][1]).flip(-1).numpy(), batches[1][2])]
    assert not np.allclose(auto._average_views(wrong, [0, 1])[0], truth, atol=1e-3)
    # a negative (INVERTED bit) is not turned: the identity's logits come back as they are
    inverted = [batches[0], (np.arange(2), batches[0][1], batches[0][2])]
    assert np.allclose(auto._average_views(inverted, [0, auto.INVERTED])[0], truth, atol=1e-6)


def test_guided_mask_threshold_grows_the_masks(tiny_vit):
    image, labels = _cells((80, 80), [(20, 20), (55, 55)], [10, 12])
    dmap = np.where(labels > 0, 0.2 + 0.8 * pp.distance_targets(labels), 0).astype(np.float32)
    areas = {}
    for t in (-4.0, 0.0, 4.0):
        result = auto.run_to_completion(auto.guided_from_map(image, dmap, tiny_vit, auto.GuidedConfig(mask_threshold=t)))
        cands = result.candidates
        areas[t] = [cands.full_mask(k).area for k in range(len(cands))]
    assert all(a >= b >= c for a, b, c in zip(areas[-4.0], areas[0.0], areas[4.0]))
    assert sum(areas[-4.0]) > sum(areas[4.0])


def test_guided_segmentation_with_a_distance_model(distance_model):
    image, _ = _cells((72, 72), [(20, 20), (50, 50)], [10, 12])
    result = auto.segment(image, distance_model, mode="guided")
    assert isinstance(result, auto.GuidedResult)
    assert result.distance_map.shape == (72, 72)
    if result.regions.max() == 0:
        assert "lower the peak threshold" in result.message


# ---------------------------------------------------------------------------
# bad input and configuration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grid", "distance"])
def test_bad_inputs_give_clear_errors_or_messages(mode, tiny_vit, distance_model):
    model = distance_model if mode == "distance" else tiny_vit
    cfg = auto.GridConfig(points_per_side=4) if mode == "grid" else None
    with pytest.raises(ValueError, match="plane"):
        auto.segment(np.zeros((3, 40, 40, 5)), model, mode=mode, config=cfg)
    with pytest.raises(ValueError, match="channel"):
        auto.segment(np.zeros((40, 40, 7)), model, mode=mode, config=cfg)
    with pytest.raises(ValueError, match="too small"):
        auto.segment(np.ones((8, 40)), model, mode=mode, config=cfg)
    with pytest.raises(TypeError):
        auto.segment(np.full((40, 40), "a"), model, mode=mode, config=cfg)
    constant = auto.segment(np.full((40, 40), 7.0), model, mode=mode, config=cfg)
    assert constant.n_cells == 0 and "constant" in constant.message
    assert constant.relabel().max() == 0
    nan = auto.segment(np.full((40, 40), np.nan), model, mode=mode, config=cfg)
    assert nan.n_cells == 0 and "no finite pixel" in nan.message
    partly = np.random.default_rng(0).random((40, 40))
    partly[:5] = np.nan
    assert auto.segment(partly, model, mode=mode, config=cfg).labels.shape == (40, 40)
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    assert auto.segment(rgb, model, mode=mode, config=cfg).labels.shape == (40, 50)
    assert auto.segment(np.zeros((40, 40, 2)), model, mode=mode, config=cfg, channel=1).n_cells == 0


def test_configs_round_trip_and_validate():
    g = auto.GridConfig(points_per_side=16, probability=0.7)
    assert auto.GridConfig.from_json(g.to_json()) == g
    q = auto.GuidedConfig(distance=auto.DistanceConfig(peak=0.6), probability=0.3)
    assert auto.GuidedConfig.from_json(q.to_json()) == q
    with pytest.raises(ValueError, match="unknown GridConfig settings"):
        auto.GridConfig.from_dict({"probabilty": 0.5})
    with pytest.raises(ValueError, match="must not exceed the peak"):
        auto.DistanceConfig(peak=0.1, fill=0.2).validate()
    with pytest.raises(ValueError, match="nms_iou"):
        auto.GridConfig(nms_iou=1.5).validate()
    with pytest.raises(ValueError, match="embed_window"):
        auto.DistanceConfig(embed_window=-1).validate()
    assert auto.make_config("guided", embed_window=0).distance.embed_window == 0
    with pytest.raises(ValueError, match="has no setting peak"):
        auto.make_config("grid", peak=0.4)
    with pytest.raises(ValueError, match="unknown mode"):
        auto.make_config("magic")
    assert auto.make_config("guided", peak=0.6, probability=0.2).distance.peak == 0.6


def test_inputs_are_not_modified(tiny_vit):
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    before = image.copy()
    auto.segment(image, tiny_vit, mode="grid", config=auto.GridConfig(points_per_side=2))
    assert np.array_equal(image, before)


def test_grid_mode_in_bfloat16_draws_nearly_the_float32_candidates(tiny_vit, monkeypatch):
    """A bfloat16 model runs the batch prompt decoder in bfloat16 (on the same float32 embedding here):
    the same prompts are drawn, with probabilities within bfloat16 rounding, and the labels mostly agree."""
    from napari_cellseg.core.predictor import Predictor

    model = tiny_vit
    model.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data += 1.0  # confident answers
    low = model.with_precision("bfloat16")
    # the same embedding for both precisions, so only the decoder's arithmetic differs
    real_embed = Predictor.embed
    monkeypatch.setattr(Predictor, "embed", lambda self, image01: real_embed(Predictor(model), image01))
    image, _ = _cells((96, 80), [(30, 30), (60, 50)], [12, 14])
    cfg = auto.GridConfig(points_per_side=6, max_area_fraction=1.0, probability=0.5, stability=0.0, nms_iou=0.5)
    ref = auto.segment(image, model, mode="grid", config=cfg)
    out = auto.segment(image, low, mode="grid", config=cfg)
    assert len(ref.candidates) == len(out.candidates) == 36
    assert np.array_equal(ref.candidates.ids, out.candidates.ids)
    err = np.abs(out.candidates.scores - ref.candidates.scores).max()
    assert 0 < err < 0.02  # bfloat16 really ran, and moved the probabilities by little
    assert ref.n_cells >= 1
    fg_ref, fg_out = ref.labels > 0, out.labels > 0
    assert (fg_ref & fg_out).sum() / max(1, (fg_ref | fg_out).sum()) > 0.9
