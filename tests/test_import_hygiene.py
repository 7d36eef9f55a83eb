"""The architecture boundary as a test: the core never imports Qt, napari or magicgui;
the package, its command line and its widgets do not import torch until work starts."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import napari_cellseg.core

GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_package_import_loads_no_torch():
    loaded = _loaded_after("import napari_cellseg")
    assert "torch" not in loaded
    assert not loaded & set(GUI_MODULES)


def test_cli_parser_loads_no_torch():
    loaded = _loaded_after("import napari_cellseg.cli as c; c.build_parser()")
    assert "torch" not in loaded
    assert "segment_anything" not in loaded


@pytest.mark.parametrize(
    "module", sorted(m.name for m in pkgutil.iter_modules(napari_cellseg.core.__path__))
)
def test_core_module_imports_no_gui(module):
    loaded = _loaded_after(f"import napari_cellseg.core.{module}")
    assert not loaded & set(GUI_MODULES), f"core.{module} pulls in {sorted(loaded & set(GUI_MODULES))}"


def test_widget_modules_import_no_torch():
    import napari_cellseg._napari as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    loaded = _loaded_after("\n".join(f"import napari_cellseg._napari.{n}" for n in names))
    assert "torch" not in loaded, "a widget module imports torch at import time (import it inside functions)"


def test_the_catalogue_loads_no_torch_and_no_scipy():
    """Listing the models (the model widget opening, ``napari-cellseg models``) imports the adapters' module,
    and with it core.finetune: neither may pull in torch or scipy at import time."""
    loaded = _loaded_after("from napari_cellseg.core import models; models.catalogue()")
    assert "napari_cellseg.core.finetune" in loaded
    assert "torch" not in loaded and "scipy" not in loaded, sorted(m for m in loaded if m in ("torch", "scipy"))
