"""A mixed sequence: worker-to-worker, scatter, gather, round after round.

Repeating one path at one size is the kindest case for a transport that
keeps state between messages (buffers sized and placed for the last
message).  Real clusters alternate paths and directions: here each round
moves ``nbytes`` from worker to worker, then scatters ``nbytes`` from the
client to a worker through the scheduler, then gathers ``nbytes`` from a
worker to the client through the scheduler, on one cluster, then the same on
the other (the order of the clusters alternating between rounds).  The
first round is a warm-up.  Worker-to-worker is also compared with one
memcpy of the same bytes, its physical bound.
"""

from __future__ import annotations

import time
from typing import Any

from dask_shm.bench.clusters import TRANSPORTS, workers
from dask_shm.bench.paired import interleaved
from dask_shm.bench.results import Case
from dask_shm.bench.transfers import CLUSTER_PATHS, memcpy

__all__ = ["mixed", "STEPS"]

SECTION = "mixed"
#: The steps of one round, in order (names of :data:`CLUSTER_PATHS`).
STEPS = ("worker->worker", "scatter via scheduler", "gather via scheduler")


def mixed(clients: dict[str, Any], nbytes: int, rounds: int, pause: float) -> list[Case]:
    """``rounds`` measured rounds (plus a warm-up) on every cluster; one case
    per step, and a memcpy case of the same size."""
    cases = {step: Case(SECTION, step, nbytes) for step in STEPS}
    pairs = {s: workers(c)[:2] for s, c in clients.items()}
    for rnd in range(rounds + 1):
        for s in interleaved(TRANSPORTS, rnd):
            a, b = pairs[s]
            for step in STEPS:
                cases[step].add(s, {"wall": CLUSTER_PATHS[step](clients[s], nbytes, a, b)},
                                warmup=rnd == 0)
            time.sleep(pause)
    bound = memcpy(nbytes, rounds)
    bound.section = SECTION
    return [*cases.values(), bound]
