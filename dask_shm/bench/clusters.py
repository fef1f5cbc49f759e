"""Clusters to compare, and how one repetition on them is measured.

Every cluster section runs on two LocalClusters alive at once, one on
``tcp://`` and one on ``shm://``, with the same process workers (one thread
each).  One repetition at a time runs, so the other cluster is idle but
warm, and the loopback counter sees one cluster's traffic (plus the idle
one's heartbeats).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dask_shm.bench.machine import loopback_rx_bytes

__all__ = [
    "TRANSPORTS", "amm_paused", "local_cluster", "cluster_pair", "worker_cpu", "measure", "n_tasks", "settle",
    "workers", "worker_to_worker",
]

#: The compared transports, in the order of even repetitions.
TRANSPORTS = ("tcp", "shm")


@contextlib.contextmanager
def local_cluster(scheme: str, n_workers: int) -> Iterator[Any]:
    """A LocalCluster on ``scheme`` with ``n_workers`` process workers of
    one thread each, and a client of it."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        protocol=scheme,
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=50,
    ) as lc, Client(lc) as client:
        client.wait_for_workers(n_workers)
        yield client


@contextlib.contextmanager
def cluster_pair(n_workers: int) -> Iterator[dict[str, Any]]:
    """A client per transport in :data:`TRANSPORTS`, all clusters running."""
    with contextlib.ExitStack() as stack:
        yield {s: stack.enter_context(local_cluster(s, n_workers)) for s in TRANSPORTS}


@contextlib.contextmanager
def amm_paused(clients: dict[str, Any]) -> Iterator[None]:
    """Dask's active memory manager stopped on every cluster meanwhile (it
    drops surplus replicas every 2 s: a measurement of held data would see
    them go), then restarted where it ran."""
    running = {s: c.amm.running() for s, c in clients.items()}
    for c in clients.values():
        c.amm.stop()
    try:
        yield
    finally:
        for s, c in clients.items():
            if running[s]:
                c.amm.start()


def workers(client: Any) -> list[str]:
    """The workers' addresses, sorted (stable across repetitions)."""
    return sorted(client.scheduler_info()["workers"])


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def worker_cpu(client: Any) -> float:
    """User + system CPU seconds used so far by all worker processes."""
    return float(sum(client.run(_cpu_seconds).values()))


def measure(client: Any, fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Run ``fn`` once; return its wall time, the workers' CPU time, the CPU
    time of all processes (the workers and this one, which runs both
    clusters' schedulers and clients: the idle cluster's share is small and
    falls on both transports alike), the loopback bytes it caused, and what
    it returned (for the caller to hold until the repetition ends).  The CPU
    readings bracket the loopback readings, so their own messages are not
    counted as traffic."""
    cpu0, here0 = worker_cpu(client), _cpu_seconds()
    lo0 = loopback_rx_bytes()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    lo = loopback_rx_bytes() - lo0
    cpu, here = worker_cpu(client) - cpu0, _cpu_seconds() - here0
    return {"wall": wall, "cpu": cpu, "cpu_all": cpu + here, "lo": float(lo)}, out


def _n_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def n_tasks(client: Any) -> int:
    """How many tasks the scheduler knows (held results included)."""
    return int(client.run_on_scheduler(_n_tasks))


def settle(client: Any, count: int, timeout: float = 30.0) -> None:
    """Wait until the scheduler knows ``count`` tasks again: what the last
    repetition made has been released on every worker (a released
    repetition must not add work to the next one)."""
    deadline = time.monotonic() + timeout
    while n_tasks(client) > count and time.monotonic() < deadline:
        time.sleep(0.02)


def _last(x: np.ndarray) -> int:
    return int(x[-1])


def worker_to_worker(client: Any, nbytes: int, a: str, b: str) -> float:
    """Seconds for a task on worker ``b`` whose dependency, ``nbytes`` made
    on worker ``a`` (before timing), must move from ``a``: one
    worker-to-worker transfer plus a tiny task and its round trip."""
    from distributed import wait

    x = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
    wait(x)
    t0 = time.perf_counter()
    client.submit(_last, x, workers=[b], pure=False).result()
    t = time.perf_counter() - t0
    del x
    return t
