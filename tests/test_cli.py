"""``dask shm status`` and ``dask shm sweep``, run as real commands."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from dask_shm.segments import Segment, ShmDirectory

from .conftest import SHM_DIR, ours
from .test_lifetime import CRASHER

DASK = str(Path(sys.executable).parent / "dask")


def dask_shm(*args: str) -> str:
    out = subprocess.run([DASK, "shm", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def orphan_some() -> int:
    proc = subprocess.run([sys.executable, "-c", CRASHER, SHM_DIR], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    return int(proc.stdout)


def test_status_and_sweep_remove_orphans_only() -> None:
    dead = orphan_some()
    live = Segment.create(ShmDirectory(SHM_DIR), 1 << 16)
    try:
        status = json.loads(dask_shm("status", "--json"))
        by_pid = {}
        for s in status["segments"]:
            by_pid.setdefault(s["pid"], []).append(s)
        assert {s["alive"] for s in by_pid[dead]} == {False}
        assert len(by_pid[dead]) == 4
        me = int(live.name.split("-")[2])
        assert [s["alive"] for s in by_pid[me]] == [True]
        assert sorted(s["kind"] for s in by_pid[dead]) == ["data", "data", "free", "probe"]
        assert status["free"] > 0 and status["total"] >= status["free"]

        table = dask_shm("status")
        assert "orphaned" in table and "alive" in table and str(dead) in table

        dry = dask_shm("sweep", "--dry-run")
        assert "would remove 4 orphaned segment(s)" in dry
        assert len([n for n in ours() if n.startswith(f"dask-shm-{dead}-")]) == 4

        swept = dask_shm("sweep")
        assert "removed 4 orphaned segment(s)" in swept
        assert ours() == [live.name]
    finally:
        live.destroy()
    assert "no dask-shm segments" in dask_shm("status")
