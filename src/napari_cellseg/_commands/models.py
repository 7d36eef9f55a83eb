"""``napari-cellseg models``: the catalogue, and what is available offline."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also print sources and checksums")


def run(args: argparse.Namespace) -> int:
    from napari_cellseg.core.models import DEFAULT_MODEL, cache_dir, catalogue, is_available_offline

    rows = []
    for name, entry in catalogue().items():
        state = "offline" if is_available_offline(entry) else "download"
        mark = "*" if name == DEFAULT_MODEL else " "
        rows.append((f"{mark}{name}", entry.architecture, str(entry.input_size), state, entry.licence,
                     entry.description))
    header = ("name", "architecture", "input", "weights", "licence", "description")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print(fmt.format(*header))
    for row in rows:
        print(fmt.format(*row))
    if args.verbose:
        print()
        for name, entry in catalogue().items():
            print(f"{name}: {entry.location} [{entry.known_hash or 'no checksum'}]")
    print(f"\n* default model. Downloads are cached in {cache_dir()} (set NAPARI_CELLSEG_CACHE to change).")
    return 0
