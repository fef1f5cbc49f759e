"""Real clusters: LocalCluster with worker processes, and the dask CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster, as_completed

from dask_shm import stats

from .conftest import dask_processes, ours, peer_env, wait_for

N = 8 * 10**6  # 64 MB of int64
PREFIX = "dask-shm-"


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


def private(info: dict[str, Any]) -> bool:
    """Copy-out: received data lives in the receiver's own memory."""
    return not (info["path"] and os.path.basename(info["path"]).startswith(PREFIX))


def sent() -> int:
    """Messages this process sent through shared memory so far."""
    return stats.snapshot().get("shm-messages", 0)


def everywhere(client: Client) -> dict[str, int]:
    """``sent()`` in each worker and in this process (client and scheduler)."""
    return {**client.run(sent), "here": sent()}


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


def test_worker_to_worker_goes_through_shared_memory(cluster: tuple[LocalCluster, Client]) -> None:
    lc, client = cluster
    a, b = sorted(client.scheduler_info()["workers"])
    x = client.submit(np.arange, N, workers=[a], pure=False)
    before = everywhere(client)
    info = client.submit(where, x, workers=[b]).result()
    after = everywhere(client)
    assert info["ok"] and info["writeable"] and private(info), info
    assert after[a] > before[a], (before, after)  # a sent it to b
    assert client.run(lambda: stats.snapshot()["peer-buffers"], workers=[b])[b] >= 1


def test_every_data_path_uses_shared_memory(cluster: tuple[LocalCluster, Client]) -> None:
    """Scatter and gather, through the scheduler and straight to the
    worker: every hop is a shared-memory message (the scheduler, a relay,
    forwards what it copied out)."""
    lc, client = cluster
    a, b = sorted(client.scheduler_info()["workers"])
    data = np.arange(N)

    def hops(action: Any) -> tuple[dict[str, int], Any]:
        """What ``action()`` returned, and who sent shared-memory messages
        for it (how many)."""
        before = everywhere(client)
        result = action()
        after = everywhere(client)
        return {k: after[k] - before[k] for k in after if after[k] != before[k]}, result

    # client -> scheduler -> a: this process sends twice
    moved, [via_sched] = hops(lambda: client.scatter([data], workers=[a]))
    assert moved == {"here": 2}, moved
    assert client.submit(where, via_sched, workers=[a]).result()["ok"]
    # client -> b
    moved, [direct] = hops(lambda: client.scatter([data], workers=[b], direct=True))
    assert moved == {"here": 1}, moved
    assert client.submit(where, direct, workers=[b]).result()["ok"]

    y = client.submit(np.arange, N, workers=[a], pure=False)
    y.result()
    # a -> scheduler -> client, then a -> client
    moved, got = hops(lambda: client.gather(y, direct=False))
    assert moved == {a: 1, "here": 1}, moved
    np.testing.assert_array_equal(got, data)
    moved, got = hops(lambda: client.gather(y, direct=True))
    assert moved == {a: 1}, moved
    np.testing.assert_array_equal(got, data)
    assert got.flags.writeable and private(where(got))
    del via_sched, direct, y, got


def double(x: np.ndarray) -> np.ndarray:
    return x * 2


def test_futures_and_dask_array_end_to_end(cluster: tuple[LocalCluster, Client]) -> None:
    import dask.array as da

    lc, client = cluster
    rng = np.random.default_rng(0)
    arrays = [rng.random(n) for n in (10, 10**5, 2 * 10**6, 3 * 10**6)]
    futures = client.map(double, client.scatter(arrays))
    got = {i: f.result() for i, f in enumerate(futures)}
    for i, x in enumerate(arrays):
        np.testing.assert_array_equal(got[i], x * 2)
    for f in as_completed(client.map(np.sum, futures)):
        assert f.result() > 0

    x = da.random.RandomState(0).random((4000, 4000), chunks=(1000, 4000))
    y = (x.T + x).rechunk((4000, 1000)).sum(axis=0)
    expected = (x.compute().T + x.compute()).sum(axis=0)
    np.testing.assert_allclose(y.compute(), expected)
    moved = everywhere(client)
    assert sum(moved.values()) > 0, moved
    del futures


def scheduler_address(path: Path) -> str | None:
    """The address in a scheduler file, once it is completely written."""
    try:
        return str(json.loads(path.read_text())["address"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_cli_scheduler_and_workers(tmp_path: Path) -> None:
    """``dask scheduler --protocol shm`` and ``dask worker`` processes: the
    workers listen on shm:// too, and their transfers go through shared
    memory; processes that end normally leave nothing behind."""
    # The scheduler unpickles task graphs that refer to this module.
    env = peer_env(threshold="64 KiB")
    sched_file = tmp_path / "scheduler.json"
    with dask_processes(env) as start:
        start("scheduler", "--protocol", "shm", "--host", "127.0.0.1", "--port", "0",
              "--no-dashboard", "--scheduler-file", str(sched_file))
        assert wait_for(lambda: scheduler_address(sched_file), timeout=30)
        address = scheduler_address(sched_file)
        assert address.startswith("shm://")
        start("worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
              "--host", "127.0.0.1")
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=30)
            a, b = sorted(client.scheduler_info()["workers"])
            assert a.startswith("shm://") and b.startswith("shm://")
            x = client.submit(np.arange, N, workers=[a], pure=False)
            before = client.run(sent)
            info = client.submit(where, x, workers=[b]).result()
            assert info["ok"], info
            assert client.run(sent)[a] > before[a]
            del x
            client.retire_workers()
    assert wait_for(lambda: not ours()), ours()
