"""joblib's ``dask`` backend on a real LocalCluster (worker processes).

How joblib moves data (joblib/_dask.py): every argument that is weakrefable
and larger than 1 kB (numpy arrays, DataFrames) is scattered first, with
``client.scatter(arg, hash=False)`` and no ``direct=``, so from the client
process it goes *through the scheduler* (client -> scheduler -> worker)
unless the client was made with ``direct_to_workers=True``.  The task then
refers to the future.  Results are fetched by ``as_completed(...,
with_results=True)``, i.e. ``client._gather([future])``, again with no
``direct=``: *through the scheduler* (worker -> scheduler -> client) by
default, straight from the worker with ``direct_to_workers=True``.  Every
hop is an ``shm://`` comm here, each a shared-memory message of its own, so
both directions are checked, both ways of routing them, and the default
configuration (1 MiB threshold) from the very first call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster
from joblib import Parallel, delayed, parallel_config

from dask_shm import stats

N = 10**6  # 8 MB of int64: above the 1 MiB default threshold
TASKS = 4


# -- what the workers run (module level: workers import it by reference) ----


def total(x: np.ndarray) -> int:
    """Large argument, small result."""
    return int(x.sum())


def make(seed: int, n: int) -> np.ndarray:
    """Small arguments, large result."""
    return np.arange(n, dtype=np.int64) * seed


def scale(x: np.ndarray, k: int) -> np.ndarray:
    """Large argument, large result."""
    return x * k


def counter(name: str) -> int:
    return stats.snapshot().get(name, 0)


def in_shm(x: np.ndarray) -> bool:
    """Whether ``x``'s memory is a mapping of one of our files (never: the
    receiver copies out)."""
    addr = x.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                return len(parts) > 5 and os.path.basename(parts[5]).startswith("dask-shm-")
    return False


# -- helpers -----------------------------------------------------------------


@contextmanager
def local_cluster(protocol: str, **client_kwargs: Any) -> Iterator[Client]:
    with LocalCluster(
        protocol=protocol,
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        # not None: the scheduler would still serve HTTP on 8787, and warn
        # (an error here) when another cluster on this host has it
        dashboard_address=":0",
    ) as lc, Client(lc, **client_kwargs) as client:
        yield client


def everywhere(client: Client, name: str) -> dict[str, int]:
    """Counter ``name`` in this process (client and scheduler) and each worker."""
    out = {"client+scheduler": counter(name)}
    out.update(client.run(counter, name))
    return out


def inputs() -> list[np.ndarray]:
    return [np.arange(N, dtype=np.int64) + i for i in range(TASKS)]


def round_trip(xs: list[np.ndarray], k: int) -> list[np.ndarray]:
    """One joblib call, large arrays both ways."""
    ys: list[np.ndarray] = Parallel()(delayed(scale)(x, k) for x in xs)
    return ys


def check_round_trip(xs: list[np.ndarray], ys: list[np.ndarray], k: int) -> None:
    assert len(ys) == len(xs)
    for x, y in zip(xs, ys, strict=True):
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x * k)


@pytest.fixture
def client(shm_config: None) -> Iterator[Client]:
    """shm:// with shared memory from 64 KiB on."""
    with local_cluster("shm") as c:
        yield c


# -- tests -------------------------------------------------------------------


def test_large_arguments_go_to_the_workers_through_shared_memory(client: Client) -> None:
    xs = inputs()
    with parallel_config(backend="dask"):
        got = Parallel()(delayed(total)(x) for x in xs)
    assert got == [int(x.sum()) for x in xs]
    # client -> scheduler -> worker: both hops written by this process.
    # Bytes, not messages: distributed may send several arrays in one.
    assert counter("shm-bytes") >= 2 * TASKS * N * 8


def test_large_results_come_back_through_shared_memory(client: Client) -> None:
    with parallel_config(backend="dask"):
        ys = Parallel()(delayed(make)(seed, N) for seed in range(1, TASKS + 1))
    for seed, y in zip(range(1, TASKS + 1), ys, strict=True):
        np.testing.assert_array_equal(y, np.arange(N, dtype=np.int64) * seed)
    # worker -> scheduler -> client: the workers wrote the first hop, this
    # process (the scheduler) the second.  Bytes, not messages: a gather
    # sends the results one worker or one client holds in one message.
    written = client.run(counter, "shm-bytes")
    assert sum(written.values()) >= TASKS * N * 8, written
    assert counter("shm-bytes") >= TASKS * N * 8
    assert not any(in_shm(y) for y in ys)
    assert all(y.flags.writeable for y in ys)
    ys[0][:] = 0  # ours to modify, like any result
    del ys, y


@pytest.mark.parametrize("direct", [False, True], ids=["via-scheduler", "direct"])
def test_several_calls_both_directions(shm_config: None, direct: bool) -> None:
    """Several Parallel calls in a row on one cluster, within one
    ``parallel_config`` (one backend) and across two; large arrays both ways.
    ``direct_to_workers=True`` makes joblib's scatter and gather skip the
    scheduler."""
    xs = inputs()
    with local_cluster("shm", direct_to_workers=direct) as client:
        with parallel_config(backend="dask"):
            for k in (2, 3, 5):
                ys = round_trip(xs, k)
                check_round_trip(xs, ys, k)
                del ys
            # The same array to every task: scattered once per call (joblib
            # keys its scatters by identity); a task that runs on the other
            # worker fetches it from the first one.
            got = Parallel()(delayed(scale)(xs[0], k) for k in range(TASKS))
            for k, y in enumerate(got):
                np.testing.assert_array_equal(y, xs[0] * k)
            del got, y
        with parallel_config(backend="dask", n_jobs=2):
            ys = round_trip(xs, 7)
            check_round_trip(xs, ys, 7)
            del ys

        messages = everywhere(client, "shm-messages")
        assert all(messages.values()), messages  # every process wrote some


def test_default_configuration_uses_shared_memory_from_the_first_call() -> None:
    """Threshold 1 MiB, nothing warmed: a process's buffer is filled before
    its first link is up, so the very first call's transfers already go
    through shared memory.  Results are right on every call."""
    xs = inputs()
    with local_cluster("shm") as client:
        with parallel_config(backend="dask"):
            ys = round_trip(xs, 1)
            check_round_trip(xs, ys, 1)
            first = everywhere(client, "shm-messages")
            for k in range(2, 4):
                ys = round_trip(xs, k)
                check_round_trip(xs, ys, k)
            del ys
        assert all(first.values()), first


def test_tcp_gives_the_same_results(shm_config: None) -> None:
    """The same joblib code over tcp:// and shm://, compared result by result."""
    xs = inputs()

    def run(protocol: str) -> tuple[list[int], list[np.ndarray], int]:
        with local_cluster(protocol) as client:
            with parallel_config(backend="dask"):
                sums = Parallel()(delayed(total)(x) for x in xs)
                ys = round_trip(xs, 3)
            return sums, ys, sum(everywhere(client, "shm-messages").values())

    tcp_sums, tcp_ys, tcp_shm = run("tcp")
    stats.reset()
    shm_sums, shm_ys, shm_shm = run("shm")
    assert tcp_shm == 0 and shm_shm > 0
    assert tcp_sums == shm_sums == [int(x.sum()) for x in xs]
    for a, b in zip(tcp_ys, shm_ys, strict=True):
        np.testing.assert_array_equal(a, b)
    check_round_trip(xs, shm_ys, 3)
