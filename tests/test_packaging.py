"""The wheel a normal, non-editable ``pip install`` builds carries every module
of the source tree: an editable install (what the test suite runs from) would
hide a subpackage left out of ``setup.cfg``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dask_shm"
#: Data files the package reads at run time, beside its modules.
DATA_FILES = ("dask_shm/dask-shm.yaml", "dask_shm/dask-shm-schema.yaml", "dask_shm/py.typed")


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a clean copy of the tree: an in-tree build would
    leave build/ behind, and a stale build/lib from an earlier build is packed
    into the next wheel, which could hide a missing package."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
            ".pytest_cache", ".venv", "bench-results",
        ),
    )
    out = tmp_path / "wheels"
    # No build isolation: it would download setuptools and wheel on every
    # run; the test extra installs them.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("dask_shm-*.whl")
    return wheel


def test_wheel_has_every_module_and_data_file(tmp_path: Path) -> None:
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}
    assert "dask_shm/bench/__init__.py" in modules  # the walk sees subpackages
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    missing = set(DATA_FILES) - names
    assert not missing, f"data files missing from the wheel: {sorted(missing)}"
