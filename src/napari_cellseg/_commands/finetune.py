"""``napari-cellseg finetune``: fine-tune a model on images and their label images.

The same core as the fine-tuning widget (:mod:`napari_cellseg.core.finetune`):
pairs of ``--image`` / ``--labels`` (stacks pair plane by plane), a recipe, a
base model, a time budget or a number of epochs, and an output name under
which the adapter is saved in the plugin's model folder (it then appears in
``napari-cellseg models`` and every model choice). Ctrl-C stops training and
saves the best model so far.

Example::

    napari-cellseg finetune --image a.tif --labels a_labels.tif --recipe prompt --minutes 10 --out my-cells
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", required=True, metavar="FILE",
                        help="training image (TIFF, PNG...); repeat with --labels for more pairs")
    parser.add_argument("--labels", action="append", required=True, metavar="FILE",
                        help="instance label image of the preceding --image (0 = background)")
    parser.add_argument("--val-image", action="append", default=[], metavar="FILE",
                        help="held-out image for validation AP and early stopping (optional, repeatable)")
    parser.add_argument("--val-labels", action="append", default=[], metavar="FILE",
                        help="labels of the preceding --val-image")
    parser.add_argument("--base", default=None,
                        help="model to start from (default: the default model); an adapter continues its training")
    parser.add_argument("--recipe", choices=["prompt", "distance", "joint"], default="distance",
                        help="distance (default: the recipe that pays in minutes on a CPU): SAMCell distance maps "
                             "for the automatic modes, clicks answered from the map; prompt: CellSeg1 LoRA for "
                             "clicks, boxes and grid mode (needs long runs or a GPU); joint: both in one model")
    parser.add_argument("--minutes", type=float, default=None, help="time budget (default 10 without --epochs)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the cached views")
    parser.add_argument("--region", default=None, metavar="R0,C0,R1,C1|extent",
                        help="where the labels are complete: 'extent' (the labels' bounding box) or a rectangle; "
                             "unlabelled pixels outside it are ignored")
    parser.add_argument("--channel", type=int, default=None, help="channel of multichannel images")
    parser.add_argument("--encoder-lora", action="store_true", help="also train LoRA in the image encoder (slow)")
    parser.add_argument("--encoder-lora-blocks", type=int, default=None, metavar="N",
                        help="LoRA in the image encoder's last N attention blocks only (implies --encoder-lora): "
                             "what enters them is cached once per view, so the encoder trains on a CPU")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="more FinetuneConfig settings as JSON text or a .json file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out", required=True, metavar="NAME", help="name of the fine-tuned model")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")


def _region(text: str | None):
    from napari_cellseg.cli import UserError

    if text is None or text in ("", "image"):
        return None
    if text == "extent":
        return "extent"
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise UserError(f"--region must be 'extent' or four numbers R0,C0,R1,C1, got {text!r}")
    return values


def _config(args) -> dict:
    import json
    from pathlib import Path

    from napari_cellseg.cli import UserError

    if not args.config:
        return {}
    text = args.config
    if text.endswith(".json") and Path(text).is_file():
        text = Path(text).read_text()
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--config is not valid JSON ({exc})") from exc
    if not isinstance(extra, dict):
        raise UserError("--config must be a JSON object of FinetuneConfig settings")
    return extra


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from napari_cellseg.cli import UserError
    from napari_cellseg.core import finetune as ft
    from napari_cellseg.core.io import read_image
    from napari_cellseg.core.models import DEFAULT_MODEL, load_model
    from napari_cellseg.core.progress import TerminalProgress

    if len(args.image) != len(args.labels):
        raise UserError(f"got {len(args.image)} --image but {len(args.labels)} --labels: give one --labels per --image")
    if len(args.val_image) != len(args.val_labels):
        raise UserError("give one --val-labels per --val-image")
    ft.check_adapter_name(args.out)
    st_path, js_path = ft.adapter_paths(args.out)
    base_name = args.base or DEFAULT_MODEL
    if (st_path.exists() or js_path.exists()) and not args.overwrite:
        raise UserError(f"a model named {args.out!r} exists ({js_path}): choose another --out or add --overwrite")

    settings = {"recipe": args.recipe, "device": args.device,
                "encoder_lora": args.encoder_lora or args.encoder_lora_blocks is not None}
    if args.encoder_lora_blocks is not None:
        settings["encoder_lora_blocks"] = args.encoder_lora_blocks  # (FinetuneConfig checks it)
    if args.minutes is not None or args.epochs is not None:
        settings["minutes"] = args.minutes
        settings["epochs"] = args.epochs
    settings.update(_config(args))
    config = ft.FinetuneConfig.from_dict(settings)

    images = [read_image(p) for p in args.image]
    labels = [read_image(p) for p in args.labels]
    region = _region(args.region)
    data = ft.make_training_data(images, labels, roi=region, channel=args.channel,
                                 names=[Path(p).name for p in args.image])
    validation = None
    if args.val_image:
        validation = ft.make_training_data([read_image(p) for p in args.val_image],
                                           [read_image(p) for p in args.val_labels], channel=args.channel,
                                           names=[Path(p).name for p in args.val_image], min_cells=1)
    base = load_model(base_name, device=args.device)
    print(f"fine-tuning {base.describe()} with the {args.recipe} recipe on {data.n_cells} cells in "
          f"{len(data)} plane(s); budget: "
          + (f"{config.minutes:g} min" if config.minutes else "") + (" / " if config.minutes and config.epochs else "")
          + (f"{config.epochs} epochs" if config.epochs else ""), file=sys.stderr)
    trainer = ft.Finetuner(base, data, config, validation)
    progress = TerminalProgress("finetune")
    gen = trainer.run()
    interrupted = False
    try:
        while True:
            try:
                record = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            progress(record)
    except KeyboardInterrupt:
        interrupted = True
        gen.close()
        result = trainer.best_result()
    finally:
        progress.close()
    if result is None or result.meta["metrics"]["steps"] == 0:
        print("napari-cellseg finetune: stopped before any training step; nothing was saved", file=sys.stderr)
        return 130 if interrupted else 1
    path = ft.save_adapter(result, args.out, overwrite=args.overwrite)
    m = result.meta["metrics"]
    val = f", best validation AP@0.5 {m['best_val_ap']:.3f}" if m.get("best_val_ap") is not None else ""
    print(f"{'interrupted: ' if interrupted else ''}{result.stopped} after {m['steps']} steps "
          f"({m['seconds']:.0f} s, final loss {m['final_loss'] if m['final_loss'] is None else round(m['final_loss'], 4)}"
          f"{val}); saved model {args.out!r} ({path})")
    return 130 if interrupted else 0
