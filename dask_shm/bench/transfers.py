"""Transfers of one payload at a time, ``tcp://`` against ``shm://``.

* ``memcpy``: one copy of the bytes into touched memory, the physical bound
  of any same-host transfer.
* ``comm one-way``: a message and a tiny acknowledgement over a bare
  ``distributed.comm`` connection, no cluster: the transport alone.  Also
  ``comm one-way, buffer``: the same with ``dask-shm.single-copy`` off, the
  path of hosts where a process may not read another's memory (Yama
  ``ptrace_scope`` 1, Ubuntu's default).
* Cluster paths: worker-to-worker dependency transfers, and the client's
  scatter and gather, through the scheduler (Dask's default) and direct.
  The same path repeated: the case a transport's warm state suits best.
* ``cold``: the first worker-to-worker transfer of a fresh cluster, a few
  seconds after it started: what a short-lived cluster or a first
  computation gets.

Every case interleaves the transports' repetitions (see
:mod:`dask_shm.bench.paired`); the first repetition of each is a warm-up,
kept apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dask_shm.bench.clusters import (
    TRANSPORTS, cluster_pair, worker_to_worker, workers,
)
from dask_shm.bench.paired import interleaved
from dask_shm.bench.results import Case

__all__ = ["memcpy", "comm_one_way", "cluster_paths", "Cold", "CLUSTER_PATHS"]

SECTION = "transfers"
#: The ``shm://`` connection that goes through the buffer (comm one-way).
BUFFER = "shm, buffer"
#: Payloads at or above this get a pause after each repetition, so that the
#: kernel's freeing of the last one's memory does not land in the next.
LARGE = 10**7


def memcpy(nbytes: int, reps: int) -> Case:
    """One copy of ``nbytes`` into already-touched memory (numpy copyto)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    case = Case(SECTION, "memcpy", nbytes, paired=False)
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        case.add("memcpy", {"wall": time.perf_counter() - t0}, warmup=rep == 0)
    return case


def comm_one_way(sizes: list[int], reps: int, pause: float) -> list[Case]:
    """A message of each size one way plus a tiny acknowledgement, over a
    ``tcp://`` and an ``shm://`` connection open at once in this process,
    and over an ``shm://`` connection whose ends do not read in place (a
    second case, paired with the same ``tcp://`` repetitions).

    Small payloads are timed over a batch of messages per repetition (the
    per-message time is reported), large ones one message at a time.
    """
    import dask
    from distributed.comm import connect, listen
    from distributed.protocol import to_serialize

    async def handler(comm: Any) -> None:
        try:
            while True:
                await comm.read()
                await comm.write(b"ok")
        except Exception:  # the bench closing its comm ends the loop
            pass
        finally:
            comm.abort()

    async def run() -> list[Case]:
        async with contextlib.AsyncExitStack() as stack:
            comms, addresses = {}, {}
            for s in TRANSPORTS:
                listener = await stack.enter_async_context(listen(f"{s}://127.0.0.1:0", handler))
                addresses[s] = listener.contact_address
                comms[s] = await connect(addresses[s])
            with dask.config.set({"dask-shm.single-copy": False}):  # both ends: one process
                comms[BUFFER] = await connect(addresses["shm"])
            cases = []
            for n in sizes:
                case = Case(SECTION, "comm one-way", n)
                buffered = Case(SECTION, "comm one-way, buffer", n)
                payload = {"x": to_serialize(np.ones(n, dtype=np.uint8))}
                batch = max(1, min(200, 20_000_000 // max(n, 1)))
                for rep in range(reps + 1):
                    for s in interleaved((*TRANSPORTS, BUFFER), rep):
                        t0 = time.perf_counter()
                        for _ in range(batch):
                            await comms[s].write(payload)
                            await comms[s].read()
                        sample = {"wall": (time.perf_counter() - t0) / batch}
                        if s != "shm":
                            buffered.add("shm" if s == BUFFER else s, sample, warmup=rep == 0)
                        if s != BUFFER:
                            case.add(s, sample, warmup=rep == 0)
                        if n >= LARGE:
                            await asyncio.sleep(pause)
                cases += [case, buffered]
            for comm in comms.values():
                await comm.close()
            return cases

    return asyncio.run(run())


def _scatter(client: Any, nbytes: int, a: str, b: str, direct: bool) -> float:
    data = np.ones(nbytes, dtype=np.uint8)
    t0 = time.perf_counter()
    # hash=False: time the transport, not hashing the bytes into a key
    [f] = client.scatter([data], workers=[a], direct=direct, hash=False)
    t = time.perf_counter() - t0
    del f
    return t


def _gather(client: Any, nbytes: int, a: str, b: str, direct: bool) -> float:
    from distributed import wait

    y = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
    wait(y)
    t0 = time.perf_counter()
    got = client.gather(y, direct=direct)
    t = time.perf_counter() - t0
    del got, y
    return t


#: name -> one timed transfer on a client from/to workers ``a`` and ``b``.
CLUSTER_PATHS: dict[str, Callable[[Any, int, str, str], float]] = {
    "worker->worker": worker_to_worker,
    "scatter via scheduler": lambda c, n, a, b: _scatter(c, n, a, b, direct=False),
    "gather via scheduler": lambda c, n, a, b: _gather(c, n, a, b, direct=False),
    "scatter direct": lambda c, n, a, b: _scatter(c, n, a, b, direct=True),
    "gather direct": lambda c, n, a, b: _gather(c, n, a, b, direct=True),
}


def cluster_paths(clients: dict[str, Any], sizes: list[int], reps: int, pause: float) -> list[Case]:
    """Each cluster path at each size, the same path repeated, transports
    interleaved."""
    cases = []
    pairs = {s: workers(c)[:2] for s, c in clients.items()}
    for n in sizes:
        for name, path in CLUSTER_PATHS.items():
            case = Case(SECTION, name, n)
            for rep in range(reps + 1):
                for s in interleaved(TRANSPORTS, rep):
                    a, b = pairs[s]
                    case.add(s, {"wall": path(clients[s], n, a, b)}, warmup=rep == 0)
                    if n >= LARGE:
                        time.sleep(pause)
            cases.append(case)
    return cases


class Cold:
    """The first and the second worker-to-worker transfer of ``nbytes`` on
    fresh clusters, one sample per fresh pair of clusters.

    A sample waits ``delay`` seconds after the pair started (a cluster is
    rarely asked for data the instant it starts, and whatever a transport
    prepares in the background may finish meanwhile), then times the first
    transfer on each cluster (order alternating between samples), then a
    second one.  Samples are paired.  The pair the other cluster sections
    use gives the last sample, before anything else runs on it.
    """

    def __init__(self, nbytes: int, delay: float) -> None:
        self.delay = delay
        self.cases = [Case("cold", f"{which} worker->worker", nbytes, extra={"delay": delay})
                      for which in ("first", "second")]

    def sample(self, clients: dict[str, Any]) -> None:
        """Measure one sample on a pair of clusters that has done nothing yet."""
        first, second = self.cases
        i = len(first.values("tcp"))
        time.sleep(self.delay)
        for s in interleaved(TRANSPORTS, i):
            a, b = workers(clients[s])[:2]
            first.add(s, {"wall": worker_to_worker(clients[s], first.nbytes, a, b)})
        for s in interleaved(TRANSPORTS, i):
            a, b = workers(clients[s])[:2]
            second.add(s, {"wall": worker_to_worker(clients[s], second.nbytes, b, a)})

    def fresh_samples(self, samples: int, n_workers: int) -> None:
        """``samples`` samples, each on a pair of clusters of its own."""
        for _ in range(samples):
            with cluster_pair(n_workers) as clients:
                self.sample(clients)
