"""Fine-tuning the default model on ONE annotated image of a kind it never saw, on real data (issue 5's use).

The DSB 2018 group "360x360 fluorescence" is held out whole from the default model's training
(docs/model_card.md), like a user's own cells. docs/finetuning.md reports the full benchmark
(``benchmarks/bench_finetune.py --dsb-group``: 3 minutes, 21 held-out images); this test trains a few epochs and
checks the automatic distance mode on the group's first three images (file-name order), against the default model
at zoom 1 and with its automatic zoom.
"""

from __future__ import annotations

import numpy as np
import pytest

DSB = "dsb2018-stage1-train"
TRAIN = "5488e8df5440ee5161fdfae3aeccd2ee396636430065c90e3f1f73870a975991.tif"  # 36 nuclei
HELD_OUT = [
    "02903040e19ddf92f452907644ad3822918f54af41dd85e5a3fe3e1b6d6f9339.tif",
    "03b9306f44e9b8951461623dcbd615550cdcf36ea93b203f2c8fa58ed1dffcbe.tif",
    "03f583ec5018739f4abb9b3b4a580ac43bd933c4337ad8877aa18b1dfb59fc9a.tif",
]


def _pair(root, name):
    import tifffile

    return tifffile.imread(root / DSB / "images" / name), tifffile.imread(root / DSB / "masks" / name)


@pytest.mark.timeout(900)
def test_one_image_of_an_unseen_kind_lifts_the_default_models_automatic_ap(shared_data, tmp_path, monkeypatch):
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core import finetune as ft
    from napari_cellseg.core import models
    from napari_cellseg.core.metrics import average_precision
    from napari_cellseg.core.progress import run_to_completion

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "models"))
    base = models.load_model("cellseg", device="cpu")
    before_state = {k: v.clone() for k, v in base.sam.state_dict().items()}
    image, labels = _pair(shared_data, TRAIN)
    data = ft.make_training_data(image, labels, names=["one image"])
    assert data.summary["cells"] >= 30
    config = ft.FinetuneConfig(recipe="distance", minutes=None, epochs=6, seed=0)
    result = run_to_completion(ft.Finetuner(base, data, config).run())
    assert result.stopped == "finished"

    def ap50(model, name, **settings):
        img, gt = _pair(shared_data, name)
        config = auto.make_config("distance", model, **settings)
        return float(average_precision(gt, auto.segment(img, model, "distance", config).labels, (0.5,))[0].ap)

    # the default model at the image's own scale splits these nuclei (twice its training nuclei's size) ...
    before = [ap50(base, n, scale=1.0) for n in HELD_OUT]
    after = [ap50(result.model, n) for n in HELD_OUT]
    assert np.mean(after) >= np.mean(before) + 0.15, (before, after)
    assert np.mean(after) >= 0.65, (before, after)
    # ... the fine-tuned model learned their size: it records it, and its automatic zoom keeps zoom 1 on them
    sizes, before_sizes = result.model.meta["cell_diameters"], base.meta["cell_diameters"]
    assert sizes["fluorescence"]["median"] > 35 and sizes["phase"] == before_sizes["phase"]
    # the range widened to the new nuclei and kept the training nuclei's
    assert sizes["fluorescence"]["p10"] == before_sizes["fluorescence"]["p10"]
    assert sizes["fluorescence"]["p90"] > 40
    img, _ = _pair(shared_data, HELD_OUT[0])
    assert auto.segment(img, result.model, "distance").size_estimate.scale == 1.0
    # the default model's own automatic zoom (its default) also lifts it, without training
    zoomed = [ap50(base, n) for n in HELD_OUT]
    assert np.mean(zoomed) >= np.mean(before) + 0.15, (before, zoomed)
    # the shipped model is left as it was
    assert all(bool((base.sam.state_dict()[k] == v).all()) for k, v in before_state.items())
