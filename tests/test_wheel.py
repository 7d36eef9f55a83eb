"""The built wheel carries the npe2 manifest and the sample data, so napari finds them after `pip install`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_manifest_and_samples(tmp_path):
    pytest.importorskip("build")
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
                          str(REPO)], capture_output=True, text=True)
    if out.returncode != 0 and "hatchling" in out.stderr:
        pytest.skip("hatchling is not installed in this environment")
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("napari_cellseg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_cellseg/napari.yaml") == (REPO / "napari.yaml").read_bytes()
        # the default model ships inside the wheel, byte-identical, within the 20 MB budget
        shipped = REPO / "src" / "napari_cellseg" / "models" / "cellseg.safetensors"
        info = zf.getinfo("napari_cellseg/models/cellseg.safetensors")
        assert info.file_size == shipped.stat().st_size <= 20e6
        assert zf.read("napari_cellseg/models/cellseg.safetensors") == shipped.read_bytes()
        assert "napari_cellseg/models/cellseg.json" in names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari-cellseg = napari_cellseg:napari.yaml" in entry_points
    assert "napari-cellseg = napari_cellseg.cli:main" in entry_points
    assert "napari_cellseg/data/cells_phase_usiigaci.tif" in names
