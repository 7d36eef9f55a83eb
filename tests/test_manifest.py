"""The npe2 manifest: valid, shipped with the package, and every python_name importable."""

from __future__ import annotations

import importlib
from pathlib import Path

import npe2
import pytest

MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"


def _commands():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    return manifest.contributions.commands or []


def test_manifest_validates():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-cellseg"
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert {"Model selection", "Interactive annotation", "Automatic segmentation", "Fine-tune on labels",
            "Measure cells"} <= widgets


def test_manifest_found_through_the_installed_distribution():
    manifest = npe2.PluginManifest.from_distribution("napari-cellseg")
    assert manifest.name == "napari-cellseg"
    assert len(manifest.contributions.commands) == len(_commands())


@pytest.mark.parametrize("command", _commands(), ids=lambda c: c.id)
def test_python_name_imports(command):
    module, _, attr = command.python_name.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    assert callable(obj)


def test_npe2_validate_cli():
    from typer.testing import CliRunner
    from npe2.cli import app

    result = CliRunner().invoke(app, ["validate", "napari-cellseg"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output.lower()
