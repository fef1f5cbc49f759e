"""Memory: what a worker-to-worker transfer adds to the sender and receiver.

A transfer should leave the receiver holding the payload once (RSS grows by
1.0x what it keeps) and the sender holding nothing new beyond whatever
buffers its transport keeps for reuse, paid once.  Each round moves a fresh
array (a replica already on the receiver would not move) and reads RSS
(``VmRSS``: anonymous and shared pages alike) of both workers just before
and just after; the receiver reads every byte and keeps the array.  The
first round shows one-time costs, later ones the steady state.  The shm
directory's use is read too (what stays in ``/dev/shm`` after the round).

Dask's active memory manager is paused meanwhile: it drops surplus
replicas every 2 s, and dropping the sender's copy between the two
readings would read as a shrink.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dask_shm.bench.clusters import TRANSPORTS, amm_paused, n_tasks, settle, workers
from dask_shm.bench.machine import proc_sizes
from dask_shm.bench.paired import interleaved
from dask_shm.bench.results import Case

__all__ = ["rss_across_transfers"]

SECTION = "memory"


def _rss() -> int:
    return proc_sizes("/proc/self/status").get("VmRSS", 0)


def _shm_used() -> int:
    import dask

    st = os.statvfs(str(dask.config.get("dask-shm.directory", "/dev/shm") or "/dev/shm"))
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _read_and_keep(x: np.ndarray) -> np.ndarray:
    x.sum()
    return x


def _round(client: Any, a: str, b: str, nbytes: int) -> dict[str, float]:
    from distributed import wait

    n0 = n_tasks(client)
    x = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
    wait(x)
    before, shm0 = client.run(_rss, workers=[a, b]), _shm_used()
    y = client.submit(_read_and_keep, x, workers=[b], pure=False)
    wait(y)
    after, shm1 = client.run(_rss, workers=[a, b]), _shm_used()
    del x, y
    settle(client, n0)
    return {
        "sender": (after[a] - before[a]) / nbytes,
        "receiver": (after[b] - before[b]) / nbytes,
        "shm directory": (shm1 - shm0) / nbytes,
    }


def rss_across_transfers(clients: dict[str, Any], nbytes: int, rounds: int) -> list[Case]:
    """``rounds`` transfers per cluster, interleaved; every round is kept
    (the first is not a warm-up here: it is the one-time cost)."""
    case = Case(SECTION, "RSS growth across worker->worker, x payload", nbytes, paired=False)
    pairs = {s: workers(c)[:2] for s, c in clients.items()}
    with amm_paused(clients):
        for rnd in range(rounds):
            for s in interleaved(TRANSPORTS, rnd):
                a, b = pairs[s]
                case.add(s, _round(clients[s], a, b, nbytes))
    return [case]
