"""core.cpu_memory: freed blocks are reused (no new page faults) inside the block, and malloc is restored after."""

import threading

import numpy as np
import pytest

from napari_cellseg.core import cpu_memory

glibc = pytest.mark.skipif(not cpu_memory.available(), reason="malloc settings exist only with glibc (Linux)")

# Run in a fresh interpreter: how malloc serves a block depends on what the process freed before (other tests
# leave free heap chunks behind), so the measurement needs a heap of its own.
_MEASURE = """
import json, resource, torch
from napari_cellseg.core import cpu_memory

BLOCK = 48 * 2**20  # over glibc's 32 MiB ceiling for heap blocks: mmapped unless the setting is in force


def faults_per_pass(n):
    # three large tensors made one from the other, then freed together (a toy network's pass); torch's CPU
    # allocator asks malloc for plain pages (numpy would ask the kernel for huge pages, which fault rarely)
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(BLOCK, dtype=torch.uint8)
        y = x + 1
        z = y * 2
        del x, y, z
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


out = {"default": faults_per_pass(3)}
with cpu_memory.reuse_freed_memory("cpu") as changed:
    out["changed"], out["active"] = changed, cpu_memory.active()
    out["inside"] = faults_per_pass(12)
    out["rss_inside_mb"] = rss_mb()
out["active_after"] = cpu_memory.active()
out["rss_after_mb"] = rss_mb()
print(json.dumps(out))
"""


@glibc
def test_freed_blocks_are_reused_inside_and_returned_to_the_system_after():
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    pages = 3 * 48 * 2**20 // 4096
    assert min(out["default"]) > pages // 2  # glibc's default: fresh mappings every pass, faulted page by page
    assert out["changed"] and out["active"] and not out["active_after"]
    assert out["inside"][0] > pages // 2  # the run's first pass takes its pages from the system ...
    assert sum(out["inside"][-3:]) < pages // 20  # ... and, after a few passes, later ones reuse them
    assert out["rss_inside_mb"] - out["rss_after_mb"] > 100  # the end of the run returns the kept blocks


@glibc
def test_nested_and_concurrent_blocks_share_one_setting():
    with cpu_memory.reuse_freed_memory():
        with cpu_memory.reuse_freed_memory() as inner:
            assert inner
        assert cpu_memory.active()  # the inner block's end does not restore malloc under the outer one
        done = threading.Event()

        def other():
            with cpu_memory.reuse_freed_memory():
                pass
            done.set()

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert done.is_set() and cpu_memory.active()
    assert not cpu_memory.active()


def test_gpu_devices_and_the_switch_leave_malloc_alone():
    with cpu_memory.reuse_freed_memory("cuda:0") as changed:
        assert not changed and not cpu_memory.active()
    with cpu_memory.reuse_freed_memory("mps") as changed:
        assert not changed
    with cpu_memory.switched_off(), cpu_memory.reuse_freed_memory("cpu") as changed:
        assert not changed and not cpu_memory.active()
    assert cpu_memory.ENABLED  # the switch is back on after its block


@glibc
def test_an_error_inside_restores_malloc():
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_memory.reuse_freed_memory():
            raise RuntimeError("boom")
    assert not cpu_memory.active()


def test_segmentation_runs_inside_the_block(monkeypatch):
    """The automatic modes hold the setting while the network runs on a CPU, and release it when done."""
    from napari_cellseg.core import automatic as auto
    from napari_cellseg.core.models import random_model

    seen = []
    real = auto.predict_distance_map

    def spy(*args, **kwargs):
        seen.append(cpu_memory.active())
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(auto, "predict_distance_map", spy)
    model = auto.as_distance_model(random_model("tinyvit_test", device="cpu"))
    image = np.random.default_rng(0).random((80, 90)).astype(np.float32)
    auto.segment(image, model, "distance", auto.DistanceConfig(crop_size=64, overlap=8))
    assert seen == [cpu_memory.available()]
    assert not cpu_memory.active()


def test_embedding_runs_inside_the_block():
    """An embedding (the annotation mode's clicks) holds the setting while its encoder runs, and only then."""
    from napari_cellseg.core.models import random_model
    from napari_cellseg.core.predictor import Predictor

    model = random_model("tinyvit_test", device="cpu")
    seen = []
    model.sam.image_encoder.register_forward_hook(lambda *_: seen.append(cpu_memory.active()))
    Predictor(model).embed(np.random.default_rng(0).random((50, 60, 3)).astype(np.float32))
    assert seen == [cpu_memory.available()]
    assert not cpu_memory.active()
