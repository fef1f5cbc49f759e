"""Real Dask workloads on a ``tcp://`` and an ``shm://`` cluster side by side.

A transport that wins a transfer loop can still lose a workload: received
data that a worker keeps, task overhead, serialization and compute all
count.  So each workload here is something a Dask user runs, scaled so that
it moves or holds about ``size`` bytes, and three figures are taken per
repetition:

* wall time (the client's view);
* the worker processes' CPU time, user + system, summed over workers (what
  the transport costs the machine, which wall time on a busy host hides);
* bytes received on the loopback interface (what shared memory did not
  carry; both transports send Dask's small control messages over TCP).

A second ``tcp://`` cluster runs every workload too, as a third member of
each repetition: tcp against tcp again is the noise of this machine and of
the method (an A/A comparison), beside which the tcp/shm ratios are read.

Where the work can be run with its transfers taken away (the futures
workload: each array consumed on the worker that made it), that variant is
timed too, on the ``tcp://`` cluster, after both transports in each
repetition: the ceiling of tcp/shm, what a transport that cost nothing
would give.

Inputs are made and persisted before timing (untimed, per cluster or per
repetition), so that what is timed is the transfers and the work on them;
results are released, and the scheduler drained, between repetitions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_shm.bench.clusters import measure, n_tasks, settle, workers
from dask_shm.bench.paired import interleaved
from dask_shm.bench.paths import change, worker_counters
from dask_shm.bench.results import Case

__all__ = ["Workload", "make_workloads", "run_workloads", "NO_TRANSFER", "CONTROL"]

SECTION = "workloads"
#: The samples of a workload's ``ceiling`` (see :class:`Workload`).
NO_TRANSFER = "no transfer"
#: The samples of the second ``tcp://`` cluster (the A/A control).
CONTROL = "tcp again"
#: Rechunked arrays are cut in this many stripes.
STRIPES = 8
#: Below this ``size`` (a --quick run) the matmul, the small chunks and the
#: shuffle are cut in fewer pieces: their per-task overhead, not the bytes,
#: would set the time.
SMALL = 10**8
#: Payloads of the futures and gather workloads, as fractions of ``size``:
#: 1, 10, 40, 100 and 200 MB at the default 400 MB (mixed sizes, some below
#: any sensible shared-memory threshold, most well above).
MIXED_FRACTIONS = (0.0025, 0.025, 0.1, 0.25, 0.5)


@dataclass
class Workload:
    """One workload.

    ``setup(client)`` makes the persisted inputs, once per cluster;
    ``prepare(client, inputs)`` makes per-repetition inputs (untimed);
    ``run(client, prepared)`` is the timed part and returns what it holds
    until the repetition ends; ``ceiling(client, prepared)``, if given, is
    the same work with no data crossing between processes, timed on the
    ``tcp://`` cluster: the bound of any transport.
    """

    name: str
    nbytes: int
    setup: Callable[[Any], Any]
    run: Callable[[Any, Any], Any]
    prepare: Callable[[Any, Any], Any] = lambda client, inputs: inputs
    config: dict[str, Any] | None = None
    ceiling: Callable[[Any, Any], Any] | None = None


def _persisted(client: Any, collection: Any) -> Any:
    from distributed import wait

    out = client.persist(collection)
    wait(out)
    return out


# -- dask.array ----------------------------------------------------------------


def _rechunk(size: int, method: str) -> Workload:
    """Row stripes to column stripes: every output stripe needs a piece of
    every input stripe, so nearly all of the array crosses between workers;
    the result is persisted (kept by the workers that receive it)."""
    import dask.array as da

    n = max(STRIPES, math.isqrt(size // 8) // STRIPES * STRIPES)

    def setup(client: Any) -> Any:
        return _persisted(client, da.random.random((n, n), chunks=(n // STRIPES, n)))

    def run(client: Any, x: Any) -> Any:
        return _persisted(client, x.rechunk((n, n // STRIPES), method=method))

    return Workload(f"dask.array rechunk rows->columns ({method})", n * n * 8, setup, run,
                    config={"array.rechunk.method": method})


def _matmul(size: int, blocks: int) -> Workload:
    """``(x @ x.T).sum()`` on a square array in ``blocks`` x ``blocks``
    blocks: every block meets a row and a column of others, but the flops
    dominate (the array is a quarter of ``size``, so that the work stays
    seconds, not minutes, on a small machine)."""
    import dask.array as da

    n = max(blocks, math.isqrt(size // 32) // blocks * blocks)

    def setup(client: Any) -> Any:
        return _persisted(client, da.random.random((n, n), chunks=n // blocks))

    def run(client: Any, x: Any) -> Any:
        return client.compute((x @ x.T).sum()).result()

    return Workload("dask.array matmul (x @ x.T).sum()", n * n * 8, setup, run)


def _small_chunks(blocks: int) -> Workload:
    """``(x + x.T).sum()`` on ``blocks`` x ``blocks`` chunks of 32 KB:
    thousands of small tasks and transfers, every message below the
    threshold.  What it measures is the comm's cost per message, which
    shared memory must not raise."""
    import dask.array as da

    n = blocks * 64

    def setup(client: Any) -> Any:
        return _persisted(client, da.random.random((n, n), chunks=64))

    def run(client: Any, x: Any) -> Any:
        return client.compute((x + x.T).sum()).result()

    return Workload(f"dask.array (x + x.T).sum(), {blocks * blocks} chunks of 32 KB", n * n * 8,
                    setup, run)


# -- dask.dataframe --------------------------------------------------------------


def _partition(i: int, rows: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(i)
    return pd.DataFrame({
        "key": rng.integers(0, 2**31, rows),
        "a": rng.random(rows),
        "b": rng.random(rows),
        "c": rng.random(rows),
    })


def _shuffle(size: int, partitions: int) -> Workload:
    """A p2p shuffle on a key column of a dataframe persisted in
    ``partitions`` parts; the shuffled result is persisted.  P2P sends many
    shards per message, each small: the case for packing a message."""
    import dask.dataframe as dd

    rows = max(1, size // partitions // 32)

    def setup(client: Any) -> Any:
        df = dd.from_map(_partition, range(partitions), rows=rows)
        return _persisted(client, df)

    def run(client: Any, df: Any) -> Any:
        return _persisted(client, df.shuffle(on="key", shuffle_method="p2p"))

    return Workload("dask.dataframe p2p shuffle", rows * partitions * 32, setup, run,
                    config={"dataframe.shuffle.method": "p2p"})


# -- futures ---------------------------------------------------------------------


def _touch_and_keep(x: np.ndarray) -> np.ndarray:
    """Read every byte, keep the array (it stays on this worker as the result)."""
    x.sum()
    return x


def _produce(client: Any, sizes: list[int]) -> list[Any]:
    """Arrays of ``sizes`` made on the workers in turn (untimed)."""
    from distributed import wait

    ws = workers(client)
    fs = [client.submit(np.ones, n, dtype=np.uint8, workers=[ws[i % len(ws)]], pure=False)
          for i, n in enumerate(sizes)]
    wait(fs)
    return fs


def _futures(sizes: list[int]) -> Workload:
    """Arrays of mixed sizes, each made on one worker and consumed on the
    next (``workers=``), which reads it and keeps it until the repetition
    ends: worker-to-worker transfers whose data the receiver holds.  Its
    ceiling consumes each array where it was made."""
    from distributed import wait

    def consume(client: Any, made: list[Any], shift: int) -> Any:
        ws = workers(client)
        held = [client.submit(_touch_and_keep, f, workers=[ws[(i + shift) % len(ws)]], pure=False)
                for i, f in enumerate(made)]
        wait(held)
        return held

    return Workload("futures: arrays passed between workers", sum(sizes), lambda c: None,
                    functools.partial(consume, shift=1),
                    prepare=lambda client, _: _produce(client, sizes),
                    ceiling=functools.partial(consume, shift=0))


def _gather(sizes: list[int]) -> Workload:
    """The client gathers results of mixed sizes made on all workers
    (``client.gather``, through the scheduler: Dask's default) and keeps them
    until the repetition ends."""

    def run(client: Any, made: list[Any]) -> Any:
        return client.gather(made)

    return Workload("client gather of mixed-size results", sum(sizes), lambda c: None, run,
                    prepare=lambda client, _: _produce(client, sizes))


def make_workloads(size: int, skipped: dict[str, str]) -> list[Workload]:
    """Every workload, scaled to ``size`` bytes; those whose libraries are
    missing are left out, with the reason in ``skipped``."""
    small = size < SMALL
    mixed = [max(1000, int(size * f)) for f in MIXED_FRACTIONS]
    out = [_rechunk(size, "tasks"), _rechunk(size, "p2p"), _matmul(size, 2 if small else 4),
           _small_chunks(8 if small else 30)]
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401  (p2p shuffles need it)
    except ImportError as exc:
        skipped["dask.dataframe p2p shuffle"] = f"needs pandas and pyarrow ({exc})"
    else:
        out.append(_shuffle(size, partitions=4 if small else 32))
    out += [_futures(mixed), _gather(mixed)]
    return out


# -- running ---------------------------------------------------------------------


def run_workloads(clients: dict[str, Any], workloads: list[Workload], reps: int,
                  progress: Callable[[str], None]) -> list[Case]:
    """Each workload on every cluster in ``clients`` (the transports, and
    :data:`CONTROL` if given), repetitions interleaved; the first of each is
    a warm-up.  Also records, per workload, the change in dask-shm's
    counters on the ``shm://`` cluster's workers."""
    import dask

    cases = []
    for w in workloads:
        progress(w.name)
        case = Case(SECTION, w.name, w.nbytes)
        with dask.config.set(w.config or {}):
            inputs = {s: w.setup(c) for s, c in clients.items()}
            baseline = {s: n_tasks(c) for s, c in clients.items()}
            before = worker_counters(clients["shm"])
            # The ceiling runs last: a transport that followed it would find
            # memory the others freed long ago (on a VM with free page
            # reporting, a host fault per page) and, in alternate
            # repetitions only, run slower.
            ceiling = [NO_TRANSFER] if w.ceiling else []
            for rep in range(reps + 1):
                for v in interleaved(list(clients), rep) + ceiling:
                    timed: Callable[[Any, Any], Any] = w.run
                    s = v
                    if v == NO_TRANSFER and w.ceiling is not None:  # (only then is it listed)
                        s, timed = "tcp", w.ceiling
                    client = clients[s]
                    prepared = w.prepare(client, inputs[s])
                    metrics, held = measure(client, functools.partial(timed, client, prepared))
                    case.add(v, metrics, warmup=rep == 0)
                    del held, prepared
                    settle(client, baseline[s])
            after = worker_counters(clients["shm"])
        case.extra["shm counters"] = change(after, before)
        del inputs
        for c in clients.values():
            settle(c, 0)
        cases.append(case)
    return cases
