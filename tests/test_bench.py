"""``dask shm bench``, run as the real command on tiny payloads: a smoke test
that every section runs and writes its table, JSON and plot.  It asserts no
timing (timings are the benchmark's business, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DASK = str(Path(sys.executable).parent / "dask")


def test_bench_runs_every_section_on_small_payloads(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            DASK, "shm", "bench",
            "--sizes", "1KB,5MB", "--cluster-sizes", "5MB", "--reps", "2",
            "--pause", "0", "--cold-samples", "1", "--array-n", "1000",
            "--proposal-size", "8MB", "--joblib-size", "8MB",
            "--output", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    for row in ("comm one-way", "worker->worker", "scatter via scheduler",
                "dask.array rechunk", "first scatter via scheduler",
                "np.arange child->parent", "joblib"):
        assert row in table, row
    results = json.loads((tmp_path / "results.json").read_text())
    schemes = {r["transport"] for r in results["results"]}
    assert {"tcp", "shm"} <= schemes, schemes
    for r in results["results"]:  # every warm repetition's time is kept
        assert len(r["extra"]["times"]) == r["reps"], r
    assert (tmp_path / "throughput.png").stat().st_size > 0
