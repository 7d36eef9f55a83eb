"""The ``napari-cellseg`` command line: the same core as the widgets, from a terminal.

Each sub-command lives in its own module under :mod:`napari_cellseg._commands`
with two functions, ``add_arguments(parser)`` and ``run(args) -> int``; this
module only dispatches. Errors a user can fix (bad file, unknown model,
offline without a cached checkpoint) are printed as one line, without a
traceback, and give exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command name -> (module under napari_cellseg._commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("models", "list the model catalogue and what is available offline"),
    "predict": ("predict", "segment prompted objects (boxes or points) in one image"),
    "segment": ("segment", "segment every cell automatically in images, folders or stacks"),
    "finetune": ("finetune", "fine-tune a model on images and their label images"),
    "evaluate": ("evaluate", "compare predicted label images with ground truth"),
    "measure": ("measure", "measure every cell of label images (area, shape, intensity, neighbours) to CSV"),
}


class UserError(Exception):
    """An error with a message meant for the user, printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from napari_cellseg import __version__

    parser = argparse.ArgumentParser(
        prog="napari-cellseg",
        description="Cell segmentation with Segment Anything: the napari-cellseg core from a terminal.",
    )
    parser.add_argument("--version", action="version", version=f"napari-cellseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"napari_cellseg._commands.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-cellseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"napari-cellseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-cellseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
