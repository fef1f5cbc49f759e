"""What the benchmark measures.  Each function returns raw times in seconds
(the first repetition is the cold one); summaries are made by the driver."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "memcpy", "comm_one_way", "local_cluster", "worker_to_worker", "scatter_gather",
    "dask_array_workload", "cold_transfers", "pipe_pickle", "gather_arange", "rss_after_transfer",
]

Tick = Callable[[], None]
#: Small payloads' repetitions are this many times finer (see comm_one_way).
SMALL_SPLIT = 8


def memcpy(nbytes: int, reps: int) -> list[float]:
    """One copy of ``nbytes`` into already-touched memory: the physical bound."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out.append(time.perf_counter() - t0)
    return out


def comm_one_way(
    schemes: list[str], sizes: list[int], reps: int, pause: float, tick: Tick
) -> dict[tuple[str, int], list[float]]:
    """A message one way plus a tiny acknowledgement, per scheme and size.

    All schemes' comms are open at once and their repetitions interleave (in
    alternating order), so that drift in the machine's state hits each alike;
    small payloads are timed over a batch of messages per repetition, and
    get ``SMALL_SPLIT`` times the repetitions with batches as much smaller:
    the same messages, interleaved more finely (a few percent matter here).
    ``inproc://`` moves Python objects between threads: no IPC at all.
    """
    from distributed.comm import connect, listen
    from distributed.protocol import to_serialize

    async def handler(comm: Any) -> None:
        try:
            while True:
                msg = await comm.read()
                del msg
                await comm.write(b"ok")
        except Exception:  # the bench closes its comms: that ends the loop
            pass
        finally:
            comm.abort()

    async def run() -> dict[tuple[str, int], list[float]]:
        async with contextlib.AsyncExitStack() as stack:
            comms = {}
            for s in schemes:
                address = "inproc://" if s == "inproc" else f"{s}://127.0.0.1:0"
                listener = await stack.enter_async_context(listen(address, handler))
                comms[s] = await connect(listener.contact_address)
            out: dict[tuple[str, int], list[float]] = {}
            for n in sizes:
                payload = {"x": to_serialize(np.ones(n, dtype=np.uint8))}
                batch = max(1, min(200, 20_000_000 // max(n, 1)))
                split = SMALL_SPLIT if batch >= 10 * SMALL_SPLIT else 1
                batch //= split
                for rep in range(1 + (reps - 1) * split):  # the cold one, then warm ones
                    order = schemes if rep % 2 == 0 else schemes[::-1]
                    for s in order:
                        comm = comms[s]
                        t0 = time.perf_counter()
                        for _ in range(batch):
                            await comm.write(payload)
                            await comm.read()
                        out.setdefault((s, n), []).append((time.perf_counter() - t0) / batch)
                        if n >= 10**7:
                            await asyncio.sleep(pause)
                    tick()
            for comm in comms.values():
                await comm.close()
            return out

    return asyncio.run(run())


@contextlib.contextmanager
def local_cluster(scheme: str, workers: int) -> Iterator[Any]:
    """A LocalCluster on ``scheme``; ``inproc`` means worker threads in this
    process (the no-IPC bound)."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        protocol=scheme,
        n_workers=workers,
        threads_per_worker=1,
        processes=scheme != "inproc",
        dashboard_address=":0",
        silence_logs=50,
    ) as lc, Client(lc) as client:
        yield client


def _last(x: np.ndarray) -> int:
    return int(x[-1])


def _read_and_keep(x: np.ndarray) -> np.ndarray:
    """Touch every page (a shared mapping counts in RSS once touched) and keep it."""
    x.sum()
    return x


def _workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def worker_to_worker(client: Any, nbytes: int, reps: int, pause: float) -> list[float]:
    """A task on worker b that depends on an array held by worker a."""
    a, b = _workers(client)[:2]
    out = []
    for _ in range(reps):
        x = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
        client.submit(len, x, workers=[a]).result()  # x exists on a before timing
        t0 = time.perf_counter()
        client.submit(_last, x, workers=[b]).result()
        out.append(time.perf_counter() - t0)
        del x
        time.sleep(pause)
    return out


def scatter_gather(
    client: Any, nbytes: int, reps: int, pause: float, direct: bool
) -> tuple[list[float], list[float]]:
    """``client.scatter`` then ``client.gather``, directly to the worker or
    through the scheduler (Dask's default)."""
    a = _workers(client)[0]
    data = np.ones(nbytes, dtype=np.uint8)
    scat, gath = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        # hash=False: measure the transport, not hashing the bytes for a key
        [f] = client.scatter([data], workers=[a], direct=direct, hash=False)
        scat.append(time.perf_counter() - t0)
        time.sleep(pause)
        y = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
        client.submit(len, y, workers=[a]).result()
        t0 = time.perf_counter()
        got = client.gather(y, direct=direct)
        gath.append(time.perf_counter() - t0)
        del f, y, got
        time.sleep(pause)
    return scat, gath


def dask_array_workload(
    schemes: list[str], n: int, reps: int, pause: float, workers: int
) -> dict[str, list[float]]:
    """Wall time of a transfer-heavy dask.array computation: a task-based
    rechunk of an ``n`` x ``n`` float64 array from row stripes to column
    stripes (every output stripe needs a piece of every input stripe), then a
    column sum.  The input is persisted first, so only the rechunk's
    transfers and copies are timed.

    One LocalCluster per scheme, all running at once; the schemes'
    repetitions interleave (in alternating order), so that drift in the
    machine's state hits each alike (the times are paired, as in
    :func:`comm_one_way`).
    """
    import dask.array as da
    from distributed import wait

    stripes = 8
    with contextlib.ExitStack() as stack:
        clients = {s: stack.enter_context(local_cluster(s, workers)) for s in schemes}
        arrays = {}
        for s, client in clients.items():
            with client.as_current():
                arrays[s] = da.random.random((n, n), chunks=(n // stripes, n)).persist()
                wait(arrays[s])
        out: dict[str, list[float]] = {s: [] for s in schemes}
        for rep in range(reps):
            for s in schemes if rep % 2 == 0 else schemes[::-1]:
                with clients[s].as_current():
                    t0 = time.perf_counter()
                    arrays[s].rechunk((n, n // stripes), method="tasks").sum(axis=0).compute()
                    out[s].append(time.perf_counter() - t0)
                time.sleep(pause)
        del arrays
    return out


def cold_transfers(schemes: list[str], nbytes: int, samples: int,
                   workers: int) -> dict[tuple[str, str], list[float]]:
    """The first transfers of a fresh cluster, when nothing is pooled yet:
    a worker-to-worker dependency, then a scatter through the scheduler.

    Every sample starts a new LocalCluster per scheme (schemes alternate
    from sample to sample), so each time is a cold one; keyed by (scheme,
    path).  ``shm://`` sends a cold transfer over TCP (``cold-transfer:
    tcp``) and warms its pool afterwards, so it should match ``tcp://``.
    """
    from dask_shm.pool import get_pool

    out: dict[tuple[str, str], list[float]] = {}
    for i in range(samples):
        for scheme in schemes if i % 2 == 0 else schemes[::-1]:
            get_pool().trim()  # this process hosts the client and the scheduler
            with local_cluster(scheme, workers) as client:
                [w2w] = worker_to_worker(client, nbytes, reps=1, pause=0.0)
                out.setdefault((scheme, "worker->worker"), []).append(w2w)
                data = np.ones(nbytes, dtype=np.uint8)
                t0 = time.perf_counter()
                [f] = client.scatter([data], workers=_workers(client)[:1], hash=False)
                out.setdefault((scheme, "scatter via scheduler"), []).append(time.perf_counter() - t0)
                del f
    return out


# -- the original proposal's workload --------------------------------------------


def _pipe_child(conn: Any, n: int, reps: int) -> None:
    x = np.arange(n)
    for _ in range(reps):
        conn.recv()
        conn.send(x)  # pickled through the pipe
    conn.close()


def pipe_pickle(n: int, reps: int, pause: float) -> list[float]:
    """The proposal's baseline: a child process sends ``np.arange(n)`` to its
    parent over ``multiprocessing.Pipe`` (pickle).  The array exists in the
    child before timing; each repetition is one request and one reply."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_child, args=(child, n, reps))
    proc.start()
    child.close()
    out = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            parent.send("go")
            y = parent.recv()
            out.append(time.perf_counter() - t0)
            del y
            time.sleep(pause)
    finally:
        proc.join(60)
        parent.close()
    return out


def gather_arange(client: Any, n: int, reps: int, pause: float) -> list[float]:
    """The same with Dask: ``np.arange(n)`` computed on a worker, gathered by
    the client directly from it (timed once it exists)."""
    a = _workers(client)[0]
    out = []
    for _ in range(reps):
        f = client.submit(np.arange, n, workers=[a], pure=False)
        client.submit(len, f, workers=[a]).result()
        t0 = time.perf_counter()
        y = client.gather(f, direct=True)
        out.append(time.perf_counter() - t0)
        del f, y
        time.sleep(pause)
    return out


# -- memory ------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _settled_rss() -> int:
    """RSS of the data alone: once this process's pool has finished warming,
    with its idle segments released (they are a bounded cache, reported by
    ``dask shm status`` and the ``pool-*`` counters, not data)."""
    from dask_shm.pool import get_pool

    deadline = time.monotonic() + 10
    while get_pool().info()["warming"] and time.monotonic() < deadline:
        time.sleep(0.05)
    get_pool().trim()
    time.sleep(0.2)
    return _rss()


def rss_after_transfer(client: Any, nbytes: int, rounds: int = 3) -> dict[str, float]:
    """RSS of the sender and the receiver of a worker-to-worker transfer, just
    before and just after one more transfer (after ``rounds`` of the same
    size) whose result the receiver reads and keeps; both readings exclude
    the pools' idle segments (see :func:`_settled_rss`).  Each round moves a
    freshly made array (a replica already on the receiver would not move).
    Returned as fractions of ``nbytes``: the sender's should be ~0 (it keeps
    nothing of what it handed over), the receiver's ~1 (the data, counted
    once).

    Dask's active memory manager is paused meanwhile: every 2 s it drops
    surplus replicas, and dropping the sender's (it did, between the two
    readings, in full runs of this benchmark) reads as -1."""
    a, b = _workers(client)[:2]
    amm = client.amm.running()
    client.amm.stop()
    try:
        return _rss_rounds(client, a, b, nbytes, rounds)
    finally:
        if amm:
            client.amm.start()


def _rss_rounds(client: Any, a: str, b: str, nbytes: int, rounds: int) -> dict[str, float]:
    def one() -> dict[str, float]:
        x = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
        client.submit(len, x, workers=[a]).result()
        before = client.run(_settled_rss, workers=[a, b])
        y = client.submit(_read_and_keep, x, workers=[b], pure=False)
        client.submit(len, y, workers=[b]).result()
        after = client.run(_settled_rss, workers=[a, b])
        del x, y
        time.sleep(0.3)
        return {
            "sender": (after[a] - before[a]) / nbytes,
            "receiver": (after[b] - before[b]) / nbytes,
        }

    for _ in range(rounds):
        one()
    return one()
