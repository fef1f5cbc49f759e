"""Real clusters: LocalCluster with worker processes, and the dask CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dask_shm import stats

from .conftest import dask_processes, ours, wait_for

N = 8 * 10**6  # 64 MB of int64


def where(x: np.ndarray) -> dict[str, Any]:
    """Where a worker's copy of ``x`` lives, and whether it is intact."""
    addr = x.__array_interface__["data"][0]
    path = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                path = parts[5] if len(parts) > 5 else None
    return {
        "path": path,
        "writeable": bool(x.flags.writeable),
        "ok": bool((x == np.arange(len(x))).all()),
        "pid": os.getpid(),
    }


def in_shm(info: dict[str, Any]) -> bool:
    return bool(info["path"]) and os.path.basename(info["path"]).startswith("dask-shm-")


@pytest.fixture
def cluster(shm_config: None) -> Iterator[tuple[LocalCluster, Client]]:
    with LocalCluster(
        protocol="shm",
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
    ) as lc, Client(lc) as client:
        yield lc, client


def test_worker_to_worker_is_zero_copy(cluster: tuple[LocalCluster, Client]) -> None:
    lc, client = cluster
    a, b = sorted(client.scheduler_info()["workers"])
    x = client.submit(np.arange, N, workers=[a], pure=False)
    info = client.submit(where, x, workers=[b]).result()
    assert info["ok"] and info["writeable"]
    assert in_shm(info), info
    received = client.run(lambda: stats.snapshot().get("segments-received", 0), workers=[b])
    assert received[b] >= 1


def test_every_data_path_uses_shared_memory(cluster: tuple[LocalCluster, Client]) -> None:
    lc, client = cluster
    a, b = sorted(client.scheduler_info()["workers"])
    data = np.arange(N)

    # scatter through the scheduler (two hops, each negotiated for itself;
    # the scheduler hands the segment it received on without copying)
    [via_sched] = client.scatter([data], workers=[a])
    assert in_shm(client.submit(where, via_sched, workers=[a]).result())
    assert stats.snapshot().get("segments-forwarded", 0) == 1  # this process is the scheduler
    # scatter straight to the worker
    [direct] = client.scatter([data], workers=[b], direct=True)
    assert in_shm(client.submit(where, direct, workers=[b]).result())

    # gather through the scheduler and straight from the worker: this process
    # receives into shared memory
    y = client.submit(np.arange, N, workers=[a], pure=False)
    for kwargs in ({"direct": False}, {"direct": True}):
        got = client.gather(y, **kwargs)
        info = where(got)
        assert info["ok"] and in_shm(info), (kwargs, info)
        del got
    assert stats.snapshot()["segments-forwarded"] == 2  # the gather via the scheduler
    del via_sched, direct, y


def test_results_are_right_on_a_transfer_heavy_workload(
    cluster: tuple[LocalCluster, Client],
) -> None:
    import dask.array as da

    lc, client = cluster
    x = da.random.RandomState(0).random((4000, 4000), chunks=(1000, 4000))
    y = (x.T + x).rechunk((4000, 1000)).sum(axis=0)
    expected = (x.compute().T + x.compute()).sum(axis=0)
    np.testing.assert_allclose(y.compute(), expected)
    moved = client.run(lambda: stats.snapshot().get("shm-messages", 0))
    assert sum(moved.values()) > 0


def test_cli_scheduler_and_workers(tmp_path: Path) -> None:
    # The scheduler unpickles task graphs that refer to this module.
    root = str(Path(__file__).parent.parent)
    env = dict(
        os.environ,
        DASK_DASK_SHM__COLD_TRANSFER="shm",
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    sched_file = tmp_path / "scheduler.json"
    with dask_processes(env) as start:
        start("scheduler", "--protocol", "shm", "--host", "127.0.0.1", "--port", "0",
              "--no-dashboard", "--scheduler-file", str(sched_file))
        assert wait_for(sched_file.exists, timeout=30)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("shm://")
        start("worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
              "--host", "127.0.0.1")
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=30)
            a, b = sorted(client.scheduler_info()["workers"])
            assert a.startswith("shm://") and b.startswith("shm://")
            x = client.submit(np.arange, N, workers=[a], pure=False)
            info = client.submit(where, x, workers=[b]).result()
            assert info["ok"] and in_shm(info), info
            del x
            client.retire_workers()
    # Processes that ended normally leave nothing behind.
    assert wait_for(lambda: not ours()), ours()
