"""Interactive segmentation core: embedding cache, prompt-centred zoom, batched objects, commit plans."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_cellseg.core.interactive import (
    INVERTED,
    AnnotationConfig,
    CacheKey,
    EmbeddingCache,
    InteractiveSegmenter,
    ObjectMask,
    ObjectPrompt,
    Window,
    choose_window,
    group_prompts,
    model_fingerprint,
    objects_to_labels,
    plan_commit,
    resolve_mask_threshold,
    segment_boxes,
    unview_tensor,
    view_array,
    view_boxes,
    view_points,
    window_ladder,
)
from napari_cellseg.core.models import random_model
from napari_cellseg.core.predictor import Embedding, Predictor
from napari_cellseg.core.preprocess import ResizeTransform, normalize_image


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    img = rng.normal(0.1, 0.02, (300, 260)).astype(np.float32)
    img[40:80, 50:100] += 0.6
    img[200:240, 150:190] += 0.6
    return img


# ---------------------------------------------------------------- configuration and geometry


def test_config_round_trips_and_validates():
    cfg = AnnotationConfig(zoom="on", context=2.5, disk_cache=True)
    assert AnnotationConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="zoom"):
        AnnotationConfig(zoom="maybe")
    with pytest.raises(ValueError, match="context"):
        AnnotationConfig(context=0.5)
    with pytest.raises(ValueError, match="unknown annotation settings"):
        AnnotationConfig.from_dict({"zom": "on"})


def test_window_ladder_is_increasing_and_ends_at_the_maximum():
    assert window_ladder(256, 1024) == [256, 368, 512, 720, 1024]
    assert window_ladder(64, 100) == [64, 96, 100]
    assert window_ladder(256, 200) == [200]


@pytest.mark.parametrize("box", [(500, 500, 540, 560), (0, 0, 30, 30), (990, 1000, 1022, 1024), (100, 900, 260, 1020)])
def test_zoom_window_holds_the_prompt_with_context_inside_the_image(box):
    shape = (1022, 1024)
    w = choose_window(box, shape, 256, context=3.0, min_margin=0.125)
    assert 0 <= w.r0 < w.r1 <= shape[0] and 0 <= w.c0 < w.c1 <= shape[1]
    assert w.shape[0] >= 256 and w.shape[1] >= 256
    assert w.contains(tuple(int(round(v)) for v in box))
    ext = max(box[2] - box[0], box[3] - box[1])
    grown = (max(0, box[0] - ext), max(0, box[1] - ext), min(shape[0], box[2] + ext), min(shape[1], box[3] + ext))
    assert w.contains(grown)  # a margin of one box size on each side (context 3)
    assert w.side in window_ladder(256, 1024)


def test_zoom_window_is_centred_and_native_for_small_prompts():
    w = choose_window((500, 500, 540, 560), (1024, 1024), 256)
    assert w.shape == (256, 256)
    cr, cc = w.centre
    assert abs(cr - 520) <= 16 and abs(cc - 530) <= 16  # grid of side / 8 = 32 px


def test_zoom_window_grows_for_large_prompts_and_covers_small_images():
    w = choose_window((300, 300, 500, 460), (1024, 1024), 256, context=3.0)
    assert w.side == 720  # 200 px * 3 = 600 -> next ladder side
    assert choose_window((10, 10, 20, 20), (100, 120), 256) == Window(0, 0, 100, 120)


def test_zoom_window_reuses_a_cached_window_that_holds_the_prompt():
    first = choose_window((500, 500, 530, 530), (1024, 1024), 256)
    # a prompt a few pixels away gets the same window from the candidates
    near = choose_window((510, 495, 540, 526), (1024, 1024), 256, candidates=[first])
    assert near == first
    # a far one does not
    far = choose_window((100, 100, 130, 130), (1024, 1024), 256, candidates=[first])
    assert far != first


def test_window_helpers():
    w = Window(10, 20, 74, 84)
    assert w.slices == (slice(10, 74), slice(20, 84))
    assert w.offset == (10, 20) and w.side == 64
    assert Window.whole((5, 7)) == Window(0, 0, 5, 7)


# ---------------------------------------------------------------- prompts


def test_group_prompts_rules():
    # no box: all points make one object
    objs, ignored = group_prompts([[5, 5], [9, 9]], [1, 0], None)
    assert len(objs) == 1 and ignored == 0 and list(objs[0].labels) == [1, 0]
    # negatives alone make nothing
    objs, ignored = group_prompts([[5, 5]], [0], None)
    assert objs == [] and ignored == 1
    # one object per point: negatives go with every positive point
    objs, _ = group_prompts([[5, 5], [50, 50], [9, 9]], [1, 1, 0], None, one_per_point=True)
    assert len(objs) == 2 and all(list(o.labels) == [1, 0] for o in objs)
    # one box takes every point
    objs, _ = group_prompts([[5, 5], [90, 90]], [1, 0], [[0, 0, 20, 20]])
    assert len(objs) == 1 and len(objs[0].points) == 2
    # several boxes: points go to the (smallest) box holding them, others are ignored
    objs, ignored = group_prompts([[5, 5], [55, 55], [200, 200]], [1, 0, 1], [[0, 0, 20, 20], [40, 40, 80, 80],
                                                                               [0, 0, 100, 100]])
    assert len(objs) == 3 and ignored == 1
    assert len(objs[0].points) == 1 and len(objs[1].points) == 1 and len(objs[2].points) == 0
    # one object per point with boxes: positive points outside the boxes are objects of their own
    objs, ignored = group_prompts([[5, 5], [200, 200]], [1, 1], [[0, 0, 20, 20]], one_per_point=True)
    assert len(objs) == 2 and objs[1].box is None


def test_object_prompt_validates():
    with pytest.raises(ValueError, match="labels"):
        ObjectPrompt(points=[[1, 2], [3, 4]], labels=[1])
    with pytest.raises(ValueError, match="NaN"):
        ObjectPrompt(box=[0, 0, np.nan, 3])
    p = ObjectPrompt(points=[[10, 10], [30, 40]], labels=[1, 0], box=[5, 5, 20, 20])
    assert p.extent() == (5.0, 5.0, 20.0, 20.0)  # negatives do not move the window
    assert ObjectPrompt(points=[[3, 4]], labels=[0]).is_empty


# ---------------------------------------------------------------- cache


def _emb(seed=0, c=8):
    g = torch.Generator().manual_seed(seed)
    return Embedding(torch.randn(1, c, 4, 4, generator=g), ResizeTransform((10, 12), 64), "m")


def test_cache_hits_misses_and_lru_eviction():
    one = _emb()
    nbytes = one.features.nelement() * 4
    cache = EmbeddingCache(max_bytes=2 * nbytes)
    keys = [CacheKey("img", "m", "n", Window(0, 0, 10, i + 1)) for i in range(3)]
    assert cache.get(keys[0]) is None and cache.misses == 1
    cache.put(keys[0], _emb(0))
    cache.put(keys[1], _emb(1))
    assert cache.get(keys[0]) is not None and cache.hits == 1  # keys[0] is now the most recent
    cache.put(keys[2], _emb(2))  # over budget: keys[1] (least recently used) leaves
    assert keys[0] in cache and keys[2] in cache and keys[1] not in cache
    assert cache.nbytes == 2 * nbytes and len(cache) == 2
    assert cache.forget(image="img") == 2 and len(cache) == 0 and cache.nbytes == 0


def test_cache_is_invalidated_when_the_image_data_change(tiny_vit, image):
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(invert=False))  # one embedding per window
    key1 = seg.set_image(image)
    seg.segment(ObjectPrompt(box=(40, 50, 80, 100)))
    assert len(seg.cache) == 1
    assert seg.missing_windows([ObjectPrompt(box=(40, 50, 80, 100))]) == []  # hit
    edited = image.copy()
    edited[0, 0] += 1.0
    key2 = seg.set_image(edited)
    assert key2 != key1
    assert len(seg.missing_windows([ObjectPrompt(box=(40, 50, 80, 100))])) == 1  # miss: recomputed
    # the same content again is a hit, whatever array holds it
    seg.set_image(image.copy())
    assert seg.missing_windows([ObjectPrompt(box=(40, 50, 80, 100))]) == []


def test_disk_cache_round_trip(tmp_path, tiny_vit, image):
    disk = tmp_path / "embeddings"
    plain = AnnotationConfig(invert=False)  # one embedding per window
    seg = InteractiveSegmenter(tiny_vit, cache=EmbeddingCache(disk_dir=disk), config=plain)
    seg.set_image(image)
    prompt = ObjectPrompt(box=(40, 50, 80, 100))
    first = seg.segment(prompt)
    files = list(disk.glob("*.pt"))
    assert len(files) == 1
    # a fresh cache (a new napari session) finds the embedding on disk
    seg2 = InteractiveSegmenter(tiny_vit, cache=EmbeddingCache(disk_dir=disk), config=plain)
    seg2.set_image(image)
    assert seg2.missing_windows([prompt]) == []
    second = seg2.segment(prompt)
    assert seg2.cache.disk_hits == 1
    assert np.array_equal(first.mask, second.mask) and first.offset == second.offset
    key = seg2.key_for(first.window)
    loaded = seg2.cache.get(key)
    assert torch.equal(loaded.features, seg.cache.get(seg.key_for(first.window)).features)
    # the file holds plain tensors and values: loadable without unpickling code
    payload = torch.load(files[0], weights_only=True)
    assert set(payload) >= {"features", "original_shape", "target", "model_name", "key"}
    # a corrupt file is a miss, and is removed
    files[0].write_bytes(b"not a torch file")
    seg3 = InteractiveSegmenter(tiny_vit, cache=EmbeddingCache(disk_dir=disk), config=plain)
    seg3.set_image(image)
    assert seg3.cache.get(key) is None and not files[0].exists()


def test_model_fingerprint_tells_weights_apart():
    a = random_model("vit_test", seed=0)
    b = random_model("vit_test", seed=1)
    assert model_fingerprint(a) == model_fingerprint(a)
    assert model_fingerprint(a) != model_fingerprint(b)


# ---------------------------------------------------------------- segmentation


def test_zoom_masks_land_at_full_image_coordinates(tiny_vit, image):
    """The zoomed answer equals embedding the window crop by hand and pasting it back."""
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(invert=False))
    seg.set_image(image)
    assert seg.zoom_active()  # 300 px > 1.5 * 64 px input
    box = np.array([40, 50, 80, 100])
    obj = seg.segment(ObjectPrompt(box=box))
    w = obj.window
    assert w.shape[0] >= 64 and w.contains(tuple(box))
    assert w.shape[0] < image.shape[0]  # a real zoom, not the whole image
    full = obj.to_full(image.shape)
    assert full.shape == image.shape
    outside = np.ones(image.shape, bool)
    outside[w.slices] = False
    assert not full[outside].any()  # the mask lies inside its window
    # by hand: normalise the whole plane, crop the window, embed, decode the shifted box, paste
    pred = Predictor(tiny_vit)
    crop = normalize_image(image)[w.slices]
    pred.set_embedding(pred.embed(np.ascontiguousarray(crop)))
    local = box - np.array([w.r0, w.c0, w.r0, w.c0])
    masks, _, _ = pred.decode(boxes_rc=local[None].astype(float))
    expected = np.zeros(image.shape, bool)
    expected[w.slices] = masks[0, 0]
    assert np.array_equal(full, expected)
    if obj.area:
        r0, c0, r1, c1 = obj.bbox
        assert obj.mask.shape == (r1 - r0, c1 - c0) and obj.mask[0].any() and obj.mask[:, 0].any()


def test_auto_zoom_covers_planes_barely_larger_than_a_small_input(tiny_vit):
    """A small-input model zooms on planes below 1.5 x its input too (a 256 px image for LiteMedSAM); a model
    whose smallest window is its input embeds such a plane whole."""
    plane = np.random.default_rng(3).random((90, 80)).astype(np.float32)  # 90 px < 1.5 * 64 px input
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(invert=False))
    seg.set_image(plane)
    assert seg.min_window == 16 and seg.zoom_active()
    obj = seg.segment(ObjectPrompt(box=(10, 12, 18, 20)))
    assert obj.window.shape[0] < 80 and obj.window.contains((10, 12, 18, 20))
    native = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(invert=False, min_window=64))
    native.set_image(plane)
    assert not native.zoom_active()
    assert native.segment(ObjectPrompt(box=(10, 12, 18, 20))).window == Window.whole(plane.shape)


def test_zoom_off_uses_the_whole_plane(tiny_vit, image):
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(zoom="off", invert=False))
    seg.set_image(image)
    obj = seg.segment(ObjectPrompt(box=(40, 50, 80, 100)))
    assert obj.window == Window.whole(image.shape)
    pred = Predictor(tiny_vit)
    pred.set_image(image)
    masks, _ = pred.predict_boxes([[40, 50, 80, 100]])
    assert np.array_equal(obj.to_full(image.shape), masks[0])


def test_points_and_single_click(tiny_tinyvit, image):
    seg = InteractiveSegmenter(tiny_tinyvit)
    seg.set_image(image)
    click = seg.segment(ObjectPrompt(points=[[60, 75]], labels=[1]))
    assert click.window.contains((60, 75, 61, 76))
    both = seg.segment(ObjectPrompt(points=[[60, 75], [200, 170]], labels=[1, 0], box=(40, 50, 80, 100)))
    assert both.window.contains((40, 50, 80, 100))
    with pytest.raises(ValueError, match="positive point"):
        seg.segment_many([ObjectPrompt(points=[[3, 3]], labels=[0])])


def test_batched_objects_match_one_by_one_and_share_windows(tiny_vit, image):
    seg = InteractiveSegmenter(tiny_vit)  # inverted contrast on (auto, a small model): two views per window
    seg.set_image(image)
    prompts = [ObjectPrompt(box=(40, 50, 80, 100)), ObjectPrompt(box=(45, 55, 75, 95)),
               ObjectPrompt(box=(200, 150, 240, 190)), ObjectPrompt(points=[[220, 170]], labels=[1])]
    windows = seg.windows_for(prompts)
    assert windows[0] == windows[1]  # nearby prompts share one embedding
    many = seg.segment_many(prompts)
    assert seg.inverted and len(seg.cache) == 2 * len(set(windows))
    assert [o.prompt_index for o in many] == [0, 1, 2, 3]
    for p, o in zip(prompts, many):
        one = seg.segment(p)
        assert one.window == o.window and one.offset == o.offset
        assert np.array_equal(one.mask, o.mask)
        assert abs(one.score - o.score) < 1e-4
    # several boxes at once, through the helper
    objs = segment_boxes(seg, [[40, 50, 80, 100], [200, 150, 240, 190]])
    assert len(objs) == 2


def test_precompute_tiles_cover_the_plane_and_are_reused(tiny_vit, image):
    # native-resolution windows (as for large-input models): tiles of the model input serve the prompts
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(min_window=64, invert=False))
    seg.set_image(image)
    gen = seg.precompute()
    records = []
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            computed = stop.value
            break
    tiles = seg.tiles()
    assert computed == len(tiles) == len(seg.cache)
    assert records[-1].step == records[-1].total == computed
    cover = np.zeros(image.shape, bool)
    for t in tiles:
        cover[t.slices] = True
        assert t.shape == (64, 64)
    assert cover.all()
    # a small prompt is answered from a precomputed tile: nothing new to embed
    assert seg.missing_windows([ObjectPrompt(box=(100, 100, 108, 108))]) == []
    # running again computes nothing
    assert list(seg.precompute())[-1].message == "embedding cached"


def test_default_precompute_embeds_the_plane_for_instant_first_answers(tiny_vit, image):
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(invert=False))  # small input: zoom windows >= 16 px
    seg.set_image(image)
    assert seg.min_window == 16
    assert list(seg.precompute())[-1].step == 1
    assert seg.cached_windows() == {Window.whole(image.shape)}
    prompt = ObjectPrompt(box=(40, 50, 80, 100))
    assert seg.coarse_windows([prompt]) == [Window.whole(image.shape)]
    records = []
    gen = seg.run([prompt])
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            final = stop.value
            break
    coarse = records[0].data["objects"]
    assert records[0].data["coarse"] and coarse[0].window == Window.whole(image.shape)
    assert final[0].window != Window.whole(image.shape) and final[0].window.contains((40, 50, 80, 100))
    assert len(seg.cache) == 2


def test_precompute_embeds_every_orientation_only_of_windows_that_answer_prompts(tiny_vit, image):
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(views=4, invert=False))  # zoom: a first answer
    seg.set_image(image)
    list(seg.precompute())
    assert len(seg.cache) == 1  # the coarse answer uses one orientation
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(views=4, zoom="off", invert=False))  # it answers
    seg.set_image(image)
    records = list(seg.precompute())
    whole = Window.whole(image.shape)
    assert all(seg.key_for(whole, v) in seg.cache for v in range(4)) and len(seg.cache) == 4
    assert sum("orientation" in r.message for r in records) == 3
    prompt = ObjectPrompt(box=(40, 50, 80, 100))
    assert seg.missing_windows([prompt]) == [] and seg.missing_views([prompt]) == []
    records = []
    gen = seg.run([prompt])
    with pytest.raises(StopIteration) as stop:
        while True:
            records.append(next(gen))
    # nothing left to embed: one view's answer at once (one decoder pass), then the average of the four
    assert [r.message for r in records] == ["embedding cached", "answer from one view; averaging 4…"]
    first, final = records[1].data["objects"][0], stop.value.value[0]
    assert records[1].data["coarse"] and first.window == final.window
    assert np.array_equal(first.mask, seg.segment_many([prompt], views=[0])[0].mask)
    assert np.array_equal(final.mask, seg.segment_many([prompt])[0].mask)


def test_run_generator_yields_progress_then_objects(tiny_vit, image):
    seg = InteractiveSegmenter(tiny_vit)
    seg.set_image(image)
    gen = seg.run([ObjectPrompt(box=(40, 50, 80, 100))])
    first = next(gen)
    assert first.total == 1 and "embedding" in first.message
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    assert len(stop.value.value) == 1


def test_mask_threshold_defaults_and_monotonic_masks(tiny_vit, image):
    from types import SimpleNamespace

    lite_like = SimpleNamespace(name="litemedsam", entry=SimpleNamespace(name="litemedsam"), meta={})
    assert resolve_mask_threshold(lite_like) == -2.0  # measured default for zero-shot LiteMedSAM
    assert resolve_mask_threshold(lite_like, 0.5) == 0.5  # an explicit value wins
    lite_like.meta["prompt_mask_threshold"] = -1.0  # e.g. written by fine-tuning
    assert resolve_mask_threshold(lite_like) == -1.0
    assert resolve_mask_threshold(tiny_vit) == 0.0  # SAM's own
    prompt = ObjectPrompt(box=(40, 50, 80, 100))
    areas = []
    for t in (2.0, 0.0, -2.0):
        seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(mask_threshold=t))
        seg.set_image(image)
        areas.append(seg.segment(prompt).to_full(image.shape))
    assert (areas[0] <= areas[1]).all() and (areas[1] <= areas[2]).all()  # lower threshold, larger mask


# ---------------------------------------------------------------- orientations (test-time augmentation)


@pytest.mark.parametrize("view", range(8))
def test_views_move_points_boxes_and_logits_with_the_image(view):
    rng = np.random.default_rng(view)
    img = rng.random((5, 7))
    v = view_array(img, view)
    assert v.shape == ((7, 5) if view & 4 else (5, 7))
    pts = np.array([[0, 0], [4, 6], [2, 5], [3, 1]])
    moved = view_points(pts, view, img.shape).astype(int)
    assert [v[r, c] for r, c in moved] == [img[r, c] for r, c in pts]
    box = np.array([[1, 2, 4, 6]])  # rows 1-3, cols 2-5
    inside = np.zeros(img.shape, bool)
    inside[1:4, 2:6] = True
    r0, c0, r1, c1 = view_boxes(box, view, img.shape)[0].astype(int)
    expected = np.zeros(v.shape, bool)
    expected[r0:r1, c0:c1] = True
    assert np.array_equal(view_array(inside, view), expected)
    back = unview_tensor(torch.from_numpy(np.ascontiguousarray(v))[None], view)[0]
    assert np.array_equal(back.numpy(), img)


def test_views_setting_validates_and_depends_on_the_device(tiny_vit):
    with pytest.raises(ValueError, match="views must be one of 1, 2, 4, 8"):
        AnnotationConfig(views=3)
    assert AnnotationConfig.from_json(AnnotationConfig(views=4).to_json()).views == 4
    seg = InteractiveSegmenter(tiny_vit)
    assert seg.views == 1  # a CPU: each orientation costs a full embedding
    seg.model = dataclasses.replace(tiny_vit, device="cuda:0")
    assert seg.model.input_size <= 256 and seg.views == 8  # a small model on a GPU: milliseconds each
    big = random_model("vit_b")
    seg.model = dataclasses.replace(big, device="cuda:0")
    assert seg.views == 1  # SAM's 1024 px encoders: hundreds of ms each even on a GPU
    seg.config = AnnotationConfig(views=2)
    assert seg.views == 2


def test_views_average_the_logits_of_every_orientation(tiny_vit, image):
    """The answer equals embedding each orientation of the window by hand and averaging the logits."""
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(views=4, mask_threshold=0.0, invert=False))
    seg.set_image(image)
    box = np.array([40, 50, 80, 100])
    prompt = ObjectPrompt(box=box)
    gen = seg.run([prompt])
    records = []
    with pytest.raises(StopIteration) as stop:
        while True:
            records.append(next(gen))
    obj = stop.value.value[0]
    # one orientation's answer is shown while the other three are embedded
    early = [r for r in records if r.data and "objects" in r.data]
    assert len(early) == 1 and "one view" in early[0].message
    assert sum("orientation" in r.message for r in records) >= 3
    w = obj.window
    assert all(seg.key_for(w, v) in seg.cache for v in range(4)) and seg.key_for(w, 4) not in seg.cache
    assert seg.missing_views([prompt]) == []
    pred = Predictor(tiny_vit)
    crop = normalize_image(image)[w.slices]
    local = (box - np.array([w.r0, w.c0, w.r0, w.c0]))[None].astype(float)
    total = 0
    for v in range(4):
        pred.set_embedding(pred.embed(np.ascontiguousarray(view_array(crop, v))))
        _, _, low = pred.decode(boxes_rc=view_boxes(local, v, w.shape), upsample=False)
        logits = pred.upsample_logits(torch.as_tensor(np.asarray(low)))[:, 0]
        total = total + unview_tensor(logits, v)
    expected = np.zeros(image.shape, bool)
    expected[w.slices] = (total / 4 > 0).numpy()[0]
    assert np.array_equal(obj.to_full(image.shape), expected)
    assert not np.array_equal(expected[w.slices], early[0].data["objects"][0].to_full(image.shape)[w.slices])


def test_views_are_cached_on_disk_and_forgotten_with_their_window(tmp_path, tiny_vit, image):
    disk = tmp_path / "embeddings"
    cfg = AnnotationConfig(views=2, invert=True)
    seg = InteractiveSegmenter(tiny_vit, cache=EmbeddingCache(disk_dir=disk), config=cfg)
    seg.set_image(image)
    prompt = ObjectPrompt(box=(40, 50, 80, 100))
    first = seg.segment(prompt)
    names = sorted(p.name.rsplit("_", 1)[-1] for p in disk.glob("*.pt"))
    assert names[1:] == ["v1.pt", "v8.pt", "v9.pt"] and not names[0].startswith("v")  # identity, flip, inverted
    seg2 = InteractiveSegmenter(tiny_vit, cache=EmbeddingCache(disk_dir=disk), config=cfg)
    seg2.set_image(image)
    assert seg2.cached_windows() == {first.window}  # one window, in two orientations and two contrasts
    assert seg2.missing_windows([prompt]) == [] and seg2.missing_views([prompt]) == []
    second = seg2.segment(prompt)
    assert seg2.cache.disk_hits == 4 and np.array_equal(first.mask, second.mask)
    seg2.cache.forget(disk=True)
    assert not list(disk.glob("*.pt"))


def test_inverted_contrast_is_on_by_default_for_small_models_on_single_channel_planes(tiny_vit, image):
    with pytest.raises(ValueError, match="invert must be True, False or None"):
        AnnotationConfig(invert="yes")
    assert AnnotationConfig.from_json(AnnotationConfig(invert=False).to_json()).invert is False
    seg = InteractiveSegmenter(tiny_vit)
    seg.set_image(image)
    assert seg.inverted and seg.view_codes() == [0, INVERTED]
    rgb = np.stack([image, image * 0.5, image * 0.2], axis=-1)
    seg.set_image(rgb)
    assert not seg.inverted and seg.view_codes() == [0]  # colour: measured no gain (docs/annotation.md)
    seg.set_image(rgb, channel=1)
    assert seg.inverted  # one channel of a multichannel image is a single-channel plane
    seg.config = AnnotationConfig(invert=True, views=2)
    seg.set_image(rgb)
    assert seg.view_codes() == [0, 1, INVERTED, INVERTED | 1]
    big = InteractiveSegmenter(random_model("vit_b"))
    big.set_image(image)
    assert not big.inverted  # SAM's 1024 px encoders: each embedding costs seconds on a CPU
    for recipe, on in (("prompt", False), ("joint", False), ("distance", True)):
        tuned = InteractiveSegmenter(dataclasses.replace(tiny_vit, meta={"recipe": recipe}))
        tuned.set_image(image)
        assert tuned.inverted is on, recipe  # a prompt path fine-tuned on one contrast is left as it learnt


def test_inverted_contrast_averages_the_logits_of_the_image_and_its_negative(tiny_vit, image):
    """views=2 with inversion: the answer equals embedding the window, its flip and both negatives by hand."""
    seg = InteractiveSegmenter(tiny_vit, config=AnnotationConfig(views=2, invert=True, mask_threshold=0.0))
    seg.set_image(image)
    box = np.array([40, 50, 80, 100])
    prompt = ObjectPrompt(box=box)
    records = []
    gen = seg.run([prompt])
    with pytest.raises(StopIteration) as stop:
        while True:
            records.append(next(gen))
    obj = stop.value.value[0]
    assert sum("inverted contrast" in r.message for r in records) == 2  # the progress names each view
    w = obj.window
    pred = Predictor(tiny_vit)
    crop = normalize_image(image)[w.slices]
    local = (box - np.array([w.r0, w.c0, w.r0, w.c0]))[None].astype(float)
    logits = {}
    for v in (0, 1):
        for negative in (False, True):
            img = view_array(crop, v)
            pred.set_embedding(pred.embed(np.ascontiguousarray(1.0 - img if negative else img)))
            _, _, low = pred.decode(boxes_rc=view_boxes(local, v, w.shape), upsample=False)
            up = pred.upsample_logits(torch.as_tensor(np.asarray(low)))[:, 0]
            logits[v, negative] = unview_tensor(up, v)[0].numpy()
    expected = np.zeros(image.shape, bool)
    expected[w.slices] = sum(logits.values()) / 4 > 0
    assert np.array_equal(obj.to_full(image.shape), expected)
    plain = np.zeros(image.shape, bool)
    plain[w.slices] = (logits[0, False] + logits[1, False]) / 2 > 0
    assert not np.array_equal(plain, expected)  # the negatives changed the answer


def test_eight_views_segment_a_cell_with_litemedsam():
    """Real weights: every orientation finds the disk under the box (a wrong transform would smear it)."""
    from napari_cellseg.core.models import load_model

    yy, xx = np.mgrid[:400, :400]
    img = 0.1 + 0.6 * (((yy - 120) / 30.0) ** 2 + ((xx - 250) / 18.0) ** 2 < 1)  # an ellipse off-centre
    img += 0.5 * (((yy - 300) ** 2 + (xx - 90) ** 2) < 25**2)  # a second cell elsewhere
    truth = ((yy - 120) / 30.0) ** 2 + ((xx - 250) / 18.0) ** 2 < 1
    model = load_model("litemedsam", device="cpu")
    ious = []
    for views in (1, 8):
        seg = InteractiveSegmenter(model, config=AnnotationConfig(views=views))
        seg.set_image(img.astype(np.float32))
        m = seg.segment(ObjectPrompt(box=(90, 232, 151, 269))).to_full(img.shape)
        ious.append((m & truth).sum() / (m | truth).sum())
    assert min(ious) > 0.8, ious


def test_objects_to_labels_paints_in_order():
    w = Window(0, 0, 6, 6)
    a = ObjectMask(np.ones((2, 2), bool), (1, 1), 0.5, w)
    b = ObjectMask(np.ones((2, 2), bool), (2, 2), 0.5, w)
    out = objects_to_labels([a, b], (6, 6))
    assert out[1, 1] == 1 and out[2, 2] == 2 and out[3, 3] == 2 and out.sum() == 1 * 3 + 2 * 4


# ---------------------------------------------------------------- commit planning


def _obj(r0, c0, h, w, score=0.5):
    return ObjectMask(np.ones((h, w), bool), (r0, c0), score, Window(0, 0, 20, 20))


def test_commit_keeps_existing_labels_and_numbers_from_max_plus_one():
    target = np.zeros((20, 20), np.uint16)
    target[0:5, 0:5] = 7
    target[15:20, 15:20] = 3
    plan = plan_commit(target, [_obj(3, 3, 4, 4)])
    assert plan.ids == [8]
    out = target.copy()
    out[plan.rows, plan.cols] = plan.values
    assert (out[0:5, 0:5] == 7).all() and (out[15:, 15:] == 3).all()  # untouched
    assert (out == 8).sum() == 16 - 4 and plan.kept_pixels == 4
    assert target[3, 3] == 7  # the input is never modified


def test_commit_overwrite_takes_every_pixel():
    target = np.zeros((20, 20), np.uint16)
    target[0:5, 0:5] = 7
    plan = plan_commit(target, [_obj(3, 3, 4, 4)], overwrite=True)
    out = target.copy()
    out[plan.rows, plan.cols] = plan.values
    assert (out == 8).sum() == 16 and (out == 7).sum() == 25 - 4


def test_commit_overlapping_new_objects_and_skips():
    target = np.zeros((20, 20), np.uint8)
    target[10:20, 10:20] = 1
    objs = [_obj(0, 0, 4, 4, 0.2), _obj(2, 2, 4, 4, 0.9), _obj(12, 12, 3, 3),
            ObjectMask(np.zeros((0, 0), bool), (0, 0), 0.9, Window(0, 0, 20, 20))]
    plan = plan_commit(target, objs, next_id=5)
    assert plan.ids == [5, 6, 0, 0]
    assert [k for k, _ in plan.skipped] == [2, 3]
    out = target.copy()
    out[plan.rows, plan.cols] = plan.values
    assert out[3, 3] == 6  # the higher score wins the overlap
    assert (out == 5).sum() == 16 - 4
    assert len(plan.rows) == len(set(zip(plan.rows.tolist(), plan.cols.tolist())))  # no pixel twice


def test_commit_refuses_ids_the_dtype_cannot_hold():
    target = np.full((4, 4), 0, np.uint8)
    target[0, 0] = 255
    with pytest.raises(ValueError, match="uint8"):
        plan_commit(target, [_obj(1, 1, 2, 2)])
    with pytest.raises(TypeError):
        plan_commit(target.astype(float), [_obj(1, 1, 2, 2)])


def test_core_module_imports_no_gui():
    code = ("import sys, napari_cellseg.core.interactive as m; "
            "bad = [k for k in ('qtpy', 'PyQt5', 'napari', 'magicgui') if k in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- clicks answered from the cell map


@pytest.fixture
def map_model(tiny_tinyvit, monkeypatch):
    """A tiny model marked as a distance model whose 'network' is a perfect map of the bright rectangles.

    Returns the model and the list of windows (crop shapes) the map was computed for.
    """
    from scipy import ndimage as ndi

    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import postprocess as pp

    calls = []

    def fake_map(image, model, config=None, channel=None, image01=None):
        calls.append(image01.shape[:2])
        yield auto.Progress(0, 1, "map")
        cells, _ = ndi.label(image01[..., 0] > 0.5)
        return pp.distance_targets(cells).astype(np.float32)

    monkeypatch.setattr(auto, "predict_distance_map", fake_map)
    return auto.as_distance_model(tiny_tinyvit, {"peak": 0.5, "fill": 0.09}), calls


def test_a_click_becomes_the_grown_box_of_its_map_cell(map_model, image):
    model, calls = map_model
    seg = InteractiveSegmenter(model)
    seg.set_image(image)
    assert seg.map_guided()
    # the map cell of the rectangle [40:80, 50:100] loses its zero border ring to the fill threshold
    (guided,) = seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert guided.box is not None and len(guided.points) == 0
    cell = (41, 51, 79, 99)  # rows 41..78, cols 51..98
    mr, mc = 0.1 * (cell[2] - cell[0]), 0.1 * (cell[3] - cell[1])
    np.testing.assert_allclose(guided.box, [cell[0] - mr, cell[1] - mc, cell[2] + mr, cell[3] + mc], atol=1.01)
    # the map of a native window of the model's crop size around the click (the plane is 300 x 260)
    assert calls == [(256, 256)]
    # a second click well inside the same window (rows and cols 0-256) reuses its map ...
    (again,) = seg.guide_clicks([ObjectPrompt(points=[[45, 60]])])
    np.testing.assert_array_equal(again.box, guided.box)
    assert len(calls) == 1
    # ... one less than a quarter window from an inner edge gets a window of its own
    (other,) = seg.guide_clicks([ObjectPrompt(points=[[220, 170]])])
    assert other.box[0] < 200 < 240 < other.box[2] and len(calls) == 2


def _spy_map_configs(monkeypatch, setting: str) -> list:
    """The ``setting`` of every distance configuration the (fake) map is asked for, in order."""
    from napari_cellseg.core import automatic as auto

    seen = []
    fake = auto.predict_distance_map

    def spy(image_, model_, config=None, channel=None, image01=None):
        seen.append(getattr(config, setting))
        return fake(image_, model_, config, channel, image01)

    monkeypatch.setattr(auto, "predict_distance_map", spy)
    return seen


def test_map_zoom_widens_the_click_window_and_reaches_the_map(map_model, image, monkeypatch):
    """map_scale 0.5: the click's window covers twice the crop size (clipped to the plane), the distance map
    is asked for that zoom, and the cell comes back in image pixels; maps of other zooms are not reused."""
    model, calls = map_model
    scales = _spy_map_configs(monkeypatch, "scale")
    seg = InteractiveSegmenter(model, config=AnnotationConfig(map_scale=0.5))
    seg.set_image(image)
    (guided,) = seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert calls == [(300, 260)] and scales == [0.5]  # a 512 px window, clipped to the 300 x 260 plane
    cell = (41, 51, 79, 99)
    mr, mc = 0.1 * (cell[2] - cell[0]), 0.1 * (cell[3] - cell[1])
    np.testing.assert_allclose(guided.box, [cell[0] - mr, cell[1] - mc, cell[2] + mr, cell[3] + mc], atol=1.01)
    seg.config = AnnotationConfig(map_scale=2.0)
    seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert calls[1] == (128, 128) and scales[1] == 2.0  # 256 / 2 px around the click, not the 0.5 map
    with pytest.raises(ValueError, match="map_scale must be a zoom between 0.25 and 4"):
        AnnotationConfig(map_scale=0)


def test_map_zoom_auto_measures_the_cells_around_the_first_click_once_per_plane(map_model):
    """map_scale "auto": the first click's plane is mapped at zoom 1 over 4 crops a side around it, its cells
    measured (40 px, for a model whose training nuclei were 9-31 px), and the click maps are then made at the
    zoom that brings them to 20 px; later clicks on the plane reuse it, a new plane is measured again."""
    from skimage.draw import disk

    from napari_cellseg.core.progress import run_to_completion

    model, calls = map_model
    model.meta["cell_diameters"] = {"fluorescence": {"p10": 9.0, "median": 20.0, "p90": 31.4}}
    img = np.full((600, 600), 0.05, np.float32)
    for r in (100, 300, 500):
        for c in (100, 300, 500):
            img[disk((r, c), 20, shape=img.shape)] = 0.9
    seg = InteractiveSegmenter(model, config=AnnotationConfig(map_scale="auto"))
    seg.set_image(img)
    assert seg.map_scale() == 1.0 and seg.size_estimate is None  # nothing measured yet
    records = []
    run_to_completion(seg.run([ObjectPrompt(points=[[300, 300]])]), records.append)
    est = seg.size_estimate
    assert est.kind == "fluorescence" and est.cells == 9 and 0.45 <= est.scale <= 0.6
    assert seg.map_scale() == est.scale
    side = round(256 / est.scale)
    assert calls == [(600, 600), (side, side)]  # the measurement (1024 px, clipped), then the click's window
    assert any(r.message.startswith(f"map zoom {est.scale:g}: cells of") for r in records)
    run_to_completion(seg.run([ObjectPrompt(points=[[100, 500]])]))
    assert seg.size_estimate is est and len(calls) == 3 and calls[2] == (side, side)
    # the measuring map is not a click map: at zoom 1 a click still gets a window centred on it
    seg.config = AnnotationConfig(map_scale=1.0)
    assert seg.missing_maps([ObjectPrompt(points=[[300, 300]])]) == [seg.map_window((300, 300))]
    seg.config = AnnotationConfig(map_scale="auto")
    seg.set_image(img[:, ::-1].copy())  # another plane: measured again
    run_to_completion(seg.run([ObjectPrompt(points=[[300, 300]])]))
    assert seg.size_estimate is not est and calls[3] == (600, 600)
    AnnotationConfig(map_scale="auto")
    with pytest.raises(ValueError, match="map_scale must be a zoom between 0.25 and 4"):
        AnnotationConfig(map_scale="big")


def test_map_zoom_views_reach_the_click_maps_and_key_them(map_model, image, monkeypatch):
    """map_zoom_views: the click's map is asked with those zoom views (test-time augmentation), and cached apart
    from the plain map of the same window."""
    model, calls = map_model
    views = _spy_map_configs(monkeypatch, "zoom_views")
    seg = InteractiveSegmenter(model, config=AnnotationConfig(map_scale=1.0, map_zoom_views=[1.25]))
    assert seg.config.map_zoom_views == (1.25,)
    seg.set_image(image)
    seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert views == [(1.25,)]
    seg.config = AnnotationConfig(map_scale=1.0)
    seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert views == [(1.25,), ()]  # not the averaged map of the same window
    with pytest.raises(ValueError, match="map_zoom_views must be zooms between 0.5 and 2"):
        AnnotationConfig(map_zoom_views=(4.0,))


def test_click_answer_map_answers_with_the_map_cell_unless_negative_points_come_with_it(map_model, image):
    """click_answer="map": the map cell itself, without an embedding; with negative points SAM draws from the
    cell's box. The default, click_answer="sam", always sends the box to SAM."""
    model, calls = map_model
    cell = np.zeros(image.shape, bool)
    cell[41:79, 51:99] = True  # the map cell: the rectangle less its zero border ring
    seg = InteractiveSegmenter(model, config=AnnotationConfig(click_answer="map"))
    seg.set_image(image)
    (guided,) = seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert guided.answer is not None and np.array_equal(guided.answer.to_full(image.shape), cell)
    obj = seg.segment(ObjectPrompt(points=[[60, 75]]))
    assert np.array_equal(obj.to_full(image.shape), cell)
    assert len(seg.cache) == 0 and len(calls) == 1  # the map window only: SAM's encoder never ran
    # a negative point (elsewhere) sends the click to SAM with the box, so that it can trim the mask
    (trimmed,) = seg.guide_clicks([ObjectPrompt(points=[[60, 75], [150, 20]], labels=[1, 0])])
    assert trimmed.answer is None and trimmed.box is not None
    assert seg.segment(ObjectPrompt(points=[[60, 75], [150, 20]], labels=[1, 0])).window is not None
    assert len(seg.cache) >= 1
    sam = InteractiveSegmenter(model)
    assert sam.config.click_answer == "sam"
    sam.set_image(image)
    (drawn,) = sam.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert drawn.answer is None and np.allclose(drawn.box, guided.box)
    with pytest.raises(ValueError, match="click_answer must be 'sam' or 'map'"):
        AnnotationConfig(click_answer="both")


def test_clicks_off_the_map_or_cancelled_by_a_negative_point_stay_points(map_model, image):
    model, _ = map_model
    seg = InteractiveSegmenter(model, config=AnnotationConfig(missed_click="point"))
    seg.set_image(image)
    background = ObjectPrompt(points=[[150, 20]])
    cancelled = ObjectPrompt(points=[[60, 75], [62, 70]], labels=[1, 0])
    near = ObjectPrompt(points=[[38, 75]])  # 3 px above the map cell: within map_radius
    out = seg.guide_clicks([background, cancelled, near])
    assert out[0] is background and out[1] is cancelled
    assert out[2].box is not None and out[2].box[0] < 41
    strict = InteractiveSegmenter(model, config=AnnotationConfig(map_radius=0, missed_click="point"))
    strict.set_image(image)
    assert strict.guide_clicks([near])[0].box is None
    # a negative point elsewhere is kept with the box
    kept = seg.guide_clicks([ObjectPrompt(points=[[60, 75], [150, 20]], labels=[1, 0])])[0]
    assert kept.box is not None and kept.points.tolist() == [[150.0, 20.0]] and kept.labels.tolist() == [0.0]


def test_a_click_the_map_misses_gets_a_box_of_the_typical_cell_size(map_model, image):
    """missed_click="box" (the default): SAM gets a square box centred on the click, not a point."""
    from scipy import ndimage as ndi

    model, _ = map_model
    seg = InteractiveSegmenter(model)
    seg.set_image(image)
    assert seg.config.missed_click == "box"
    click = ObjectPrompt(points=[[150, 20], [10, 10]], labels=[1, 0])  # background; a negative point elsewhere
    (out,) = seg.guide_clicks([click])
    # the window's map cells (the bright rectangles inside the 256 px window, less their border ring)
    _, regions = seg.cell_map(seg.map_window(np.array([150.0, 20.0])))
    areas = np.bincount(regions.ravel())[1:]
    side = 1.2 * np.sqrt(4 * np.median(areas[areas > 0]) / np.pi)
    assert out.box is not None
    np.testing.assert_allclose(out.box[2] - out.box[0], side + 1, atol=1e-6)
    np.testing.assert_allclose(out.box[3] - out.box[1], min(side / 2 + 21, side + 1), atol=1e-6)  # cut at col 0
    np.testing.assert_allclose((out.box[0] + out.box[2] - 1) / 2, 150, atol=1e-6)
    assert out.points.tolist() == [[10.0, 10.0]] and out.labels.tolist() == [0.0]
    assert ndi.label(regions)[1] >= 1
    # and it segments (SAM draws from the box)
    obj = seg.segment(click)
    assert obj.to_full(image.shape).any()
    # a window whose map has no cell keeps the point
    blank = np.zeros_like(image)
    seg.set_image(blank)
    assert seg.guide_clicks([click])[0] is click
    with pytest.raises(ValueError, match="missed_click"):
        AnnotationConfig(missed_click="nearest")


def test_a_click_on_a_map_cell_merged_with_its_neighbours_gets_a_box_of_the_typical_cell_size(map_model):
    """merged_ratio (1.5 by default): a map cell over 1.5 times the window's median map cell is taken for several
    cells the map merged; the click gets the typical box centred on it instead of the merged cell's box."""
    model, _ = map_model
    rng = np.random.default_rng(1)
    img = rng.normal(0.1, 0.02, (240, 240)).astype(np.float32)
    for r, c in [(20, 20), (20, 200), (200, 20), (200, 200)]:
        img[r : r + 16, c : c + 16] += 0.6  # four single cells
    img[80:160, 80:160] += 0.6  # one 'merged' clump, 25 times their area
    seg = InteractiveSegmenter(model)
    assert seg.config.merged_ratio == 1.5
    seg.set_image(img)
    click = ObjectPrompt(points=[[100, 110]])
    (out,) = seg.guide_clicks([click])
    _, regions = seg.cell_map(seg.map_window(np.array([100.0, 110.0])))
    areas = np.bincount(regions.ravel())[1:]
    side = 1.2 * np.sqrt(4 * np.median(areas[areas > 0]) / np.pi)
    np.testing.assert_allclose(out.box[2:] - out.box[:2], side + 1, atol=1e-6)
    np.testing.assert_allclose((out.box[:2] + out.box[2:] - 1) / 2, [100, 110], atol=1e-6)
    # a single cell keeps its own box; without the rule the clump keeps its box
    (single,) = seg.guide_clicks([ObjectPrompt(points=[[28, 28]])])
    assert single.box[0] < 21 and single.box[2] > 35
    seg.config = AnnotationConfig(merged_ratio=None)
    (whole,) = seg.guide_clicks([click])
    assert whole.box[0] < 82 and whole.box[2] > 158
    with pytest.raises(ValueError, match="merged_ratio must be above 1"):
        AnnotationConfig(merged_ratio=0.5)


def test_a_click_goes_with_its_box_when_the_box_head_was_trained_with_clicks(map_model, image):
    """click_point None (the default): the click's positive point goes to SAM with its box only when the
    model's box head was trained with clicks (meta["box_head"]["clicks"] > 0); True/False force it."""
    model, _ = map_model
    seg = InteractiveSegmenter(model)
    seg.set_image(image)
    assert seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])[0].points.shape == (0, 2)
    model.meta["box_head"] = {"clicks": 0.5}
    (guided,) = seg.guide_clicks([ObjectPrompt(points=[[60, 75], [150, 20]], labels=[1, 0])])
    assert guided.box is not None
    assert guided.points.tolist() == [[60.0, 75.0], [150.0, 20.0]] and guided.labels.tolist() == [1.0, 0.0]
    assert seg.segment(ObjectPrompt(points=[[60, 75]])).to_full(image.shape).any()
    seg.config = AnnotationConfig(click_point=False)
    assert seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])[0].points.shape == (0, 2)


def test_clicks_drawn_by_the_box_head_use_its_click_threshold_and_boxes_keep_theirs(map_model, image):
    """meta["click_mask_threshold"]: the box prompt the map makes of a click is thresholded with it, a user's
    box with meta["box_mask_threshold"]; without it clicks take the box threshold; a given value applies to all."""
    from napari_cellseg.core.box_head import attach_box_decoder
    from napari_cellseg.core.interactive import resolve_mask_threshold

    model, _ = map_model
    box_decoder = attach_box_decoder(model.sam)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in box_decoder.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.meta.update(box_mask_threshold=-1.0)
    assert resolve_mask_threshold(model, None, boxes=True, clicks=True) == -1.0  # no click threshold: the box's
    model.meta.update(click_mask_threshold=0.0)
    assert resolve_mask_threshold(model, None, boxes=True, clicks=True) == 0.0
    assert resolve_mask_threshold(model, None, boxes=True) == -1.0
    assert resolve_mask_threshold(model, 0.5, boxes=True, clicks=True) == 0.5  # the user's value wins
    seg = InteractiveSegmenter(model, config=AnnotationConfig(invert=False))
    seg.set_image(image)
    assert (seg.box_mask_threshold, seg.click_mask_threshold) == (-1.0, 0.0)
    (guided,) = seg.guide_clicks([ObjectPrompt(points=[[60, 75]])])
    assert guided.from_click and guided.box is not None
    user_box = ObjectPrompt(box=guided.box)
    assert not user_box.from_click
    # the same box answered twice: as the click's (threshold 0) and as a user's box (threshold -1)
    click_obj, box_obj = seg.segment_many([ObjectPrompt(points=[[60, 75]]), user_box])
    assert 0 < click_obj.area < box_obj.area
    model.meta.update(click_mask_threshold=-1.0)
    again, = seg.segment_many([ObjectPrompt(points=[[60, 75]])])
    np.testing.assert_array_equal(again.to_full(image.shape), box_obj.to_full(image.shape))


def test_map_clicks_segment_and_run_reports_the_map(map_model, image):
    model, calls = map_model
    seg = InteractiveSegmenter(model)
    seg.set_image(image)
    gen = seg.run([ObjectPrompt(points=[[60, 75]])])
    first = next(gen)
    assert "cell map" in first.message
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    (obj,) = stop.value.value
    assert obj.window.contains((41, 51, 79, 99)) and len(calls) == 1
    # the same answer through segment_many (the map is cached)
    again = seg.segment_many([ObjectPrompt(points=[[60, 75]])])[0]
    assert np.array_equal(again.to_full(image.shape), obj.to_full(image.shape)) and len(calls) == 1


def test_map_clicks_are_off_for_models_without_a_map_and_when_asked(map_model, tiny_tinyvit, image):
    model, calls = map_model
    click = ObjectPrompt(points=[[60, 75]])
    for m, cfg in ((tiny_tinyvit, AnnotationConfig()), (model, AnnotationConfig(clicks_from_map=False))):
        seg = InteractiveSegmenter(m, config=cfg)
        seg.set_image(image)
        assert not seg.map_guided()
        assert seg.guide_clicks([click])[0] is click
        seg.segment(click)
    assert calls == []
    with pytest.raises(ValueError, match="map_radius"):
        AnnotationConfig(map_radius=-1)


def test_a_model_that_cannot_draw_from_prompts_answers_a_click_with_its_map_cell(map_model, image):
    from dataclasses import replace

    from napari_cellseg.core.progress import run_to_completion

    model, calls = map_model
    mapper = replace(model, entry=replace(model.entry, capabilities=("distance",)))  # a distance-recipe adapter
    seg = InteractiveSegmenter(mapper)
    seg.set_image(image)
    objs = list(run_to_completion(seg.run([ObjectPrompt(points=[[60, 75]]), ObjectPrompt(points=[[220, 170]])])))
    cells = [np.zeros(image.shape, bool), np.zeros(image.shape, bool)]
    cells[0][41:79, 51:99] = True  # the map cells (the rectangles less their zero border ring)
    cells[1][201:239, 151:189] = True
    for obj, cell in zip(objs, cells):
        assert np.array_equal(obj.to_full(image.shape), cell)
    assert [o.prompt_index for o in objs] == [0, 1]
    assert len(seg.cache) == 0  # no embedding was computed: the decoder never ran
    assert len(calls) == 2
