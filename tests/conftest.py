"""Shared fixtures: tiny random models, synthetic images and the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The suite runs the image encoder in float32 so that its figures are the same on every CPU: the product's default
# precision ("auto") is bfloat16 on CPUs with native bfloat16. Tests of "auto" itself unset this variable
# (tests/core/test_models.py, tests/core/test_default_model.py, tests/napari/test_model_widget.py).
os.environ.setdefault("NAPARI_CELLSEG_PRECISION", "float32")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data; skips the test with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the ../shared folder beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def tiny_vit():
    """A randomly initialised SAM with a ViT encoder of the real layout, 64 px input."""
    from napari_cellseg.core.models import random_model

    return random_model("vit_test", device="cpu", seed=0)


@pytest.fixture
def tiny_tinyvit():
    """A randomly initialised SAM with a TinyViT encoder of LiteMedSAM's layout, 64 px input."""
    from napari_cellseg.core.models import random_model

    return random_model("tinyvit_test", device="cpu", seed=0)


def make_cells(shape=(128, 128), n=12, radius=(6, 12), seed=0):
    """Synthetic image of bright disks on a dark noisy background and its label image."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    image = rng.normal(0.1, 0.02, shape)
    k = 0
    for _ in range(n * 20):
        if k == n:
            break
        r = rng.integers(*radius)
        c = rng.integers(r + 1, shape[0] - r - 1), rng.integers(r + 1, shape[1] - r - 1)
        rr, cc = disk(c, r + 2, shape=shape)
        if labels[rr, cc].any():
            continue
        rr, cc = disk(c, r, shape=shape)
        k += 1
        labels[rr, cc] = k
        image[rr, cc] += 0.6
    return image.astype(np.float32), labels


@pytest.fixture
def synthetic_cells():
    """(image, labels): 12 non-touching bright disks on a noisy background, 128 x 128."""
    return make_cells()


@pytest.fixture
def isolated_models(tmp_path, monkeypatch):
    """An empty model/cache folder, no loaded models, and one torch thread (the test machine's cores are shared)."""
    import torch

    from napari_cellseg.core import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    models.clear_model_cache()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "cache"
    torch.set_num_threads(threads)
    models.clear_model_cache()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A randomly initialised vit_test SAM saved as a plain state-dict checkpoint file."""
    import torch

    from napari_cellseg.core import models

    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save(models.build_sam("vit_test").state_dict(), path)
    return path
