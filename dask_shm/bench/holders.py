"""Data held by several workers: host memory and wall time.

Two cases, each on every cluster (the tcp:// and shm:// pair, and a second
tcp:// cluster as the A/A control), repetitions interleaved:

- **broadcast**: ``client.scatter(x, broadcast=True)``, a payload the client
  made beforehand, to every worker;
- **read on every worker**: an array made on one worker, then a task on
  every worker reads it; the replicas stay, as a lookup table's do.

Host memory is what the host spends on the cluster's processes: the private
PSS of every worker and of this process (schedulers and clients;
``Pss - Pss_Shmem`` from ``smaps_rollup``), plus the host's ``Shmem``
(``/proc/meminfo``: shared memory counted once, whoever maps it).  Its
growth across the operation is reported as a multiple of the payload, the
array's making included in the second case (not the client's payload in
the first: it is the user's): a copy per holder is 1.0 per worker that
holds it; one copy per host would be about 1.0 in all.  Dask's active memory manager is paused meanwhile (it would drop the
replicas being counted).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dask_shm.bench.clusters import amm_paused, local_cluster, n_tasks, settle, workers
from dask_shm.bench.machine import proc_sizes
from dask_shm.bench.paired import interleaved
from dask_shm.bench.results import Case
from dask_shm.bench.workloads import CONTROL  # the same A/A control label

__all__ = ["several_holders", "host_memory"]

SECTION = "holders"


def _private_pss() -> int:
    """This process's PSS without its shared-memory pages, in bytes (after
    a collection: garbage of earlier repetitions must not count)."""
    gc.collect()
    sizes = proc_sizes("/proc/self/smaps_rollup")
    return sizes.get("Pss", 0) - sizes.get("Pss_Shmem", 0)


def host_memory(client: Any) -> int:
    """The cluster's private PSS (workers and this process) plus the
    host's Shmem, in bytes."""
    shmem = proc_sizes("/proc/meminfo").get("Shmem", 0)
    return sum(client.run(_private_pss).values()) + _private_pss() + shmem


def _read(x: np.ndarray) -> int:
    return int(x[::4096].sum())


def _measured(client: Any, nbytes: int, make: Callable[[], Any], op: Callable[[Any], Any],
              made_counts: bool) -> dict[str, float]:
    """Make the data (``made_counts``: after the first reading of host
    memory), then time ``op`` on it; host memory growth as a multiple of
    ``nbytes``, and the wall time of ``op``."""
    from distributed import wait

    count = n_tasks(client)
    made = None if made_counts else make()
    before = host_memory(client)
    if made_counts:
        made = make()
    t0 = time.perf_counter()
    out = op(made)
    wait(out)
    wall = time.perf_counter() - t0
    after = host_memory(client)
    del out, made
    settle(client, count)
    return {"wall": wall, "memory": (after - before) / nbytes}


def _broadcast(client: Any, nbytes: int) -> dict[str, float]:
    """The client's own payload (the user's: not counted) scattered to
    every worker."""
    return _measured(client, nbytes, lambda: np.ones(nbytes, dtype=np.uint8),
                     lambda x: client.scatter(x, broadcast=True), made_counts=False)


def _read_everywhere(client: Any, nbytes: int) -> dict[str, float]:
    """An array made on the first worker (counted: the data exists once on
    the host at least), then read by a task on every worker; only the reads
    are timed."""
    from distributed import wait

    ws = workers(client)

    def make() -> Any:
        x = client.submit(np.ones, nbytes, dtype=np.uint8, workers=ws[:1], pure=False)
        wait(x)
        return x

    def op(x: Any) -> Any:
        return [client.submit(_read, x, workers=[w], pure=False) for w in ws]

    return _measured(client, nbytes, make, op, made_counts=True)


CASES: dict[str, Callable[[Any, int], dict[str, float]]] = {
    "broadcast scatter": _broadcast,
    "read on every worker": _read_everywhere,
}


def several_holders(clients: dict[str, Any], nbytes: int, reps: int, n_workers: int) -> list[Case]:
    """Both cases on ``clients`` and an A/A control cluster, ``reps``
    repetitions after a warm-up, interleaved."""
    cases = []
    with local_cluster("tcp", n_workers) as control:
        every = {**clients, CONTROL: control}
        with amm_paused(every):
            for name, case_fn in CASES.items():
                case = Case(SECTION, name, nbytes)
                for rep in range(reps + 1):
                    for s in interleaved(list(every), rep):
                        case.add(s, case_fn(every[s], nbytes), warmup=rep == 0)
                cases.append(case)
    return cases
