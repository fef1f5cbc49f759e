"""joblib: one call with a large result, one with a large argument, through
joblib's own process backend and through Dask's.

``loky`` (joblib's default) memory-maps large arguments through files in a
temporary folder (``/dev/shm`` on Linux) but pickles results through pipes.
The ``dask``
backend runs on the benchmark's ``tcp://`` or ``shm://`` cluster; joblib
scatters large arguments and gathers results through the client.  This is
what a scikit-learn or joblib user would choose between.  The backends'
repetitions interleave; the first of each is a warm-up (loky starts its
processes then; two loky configurations would not share its processes,
so there is one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dask_shm.bench.paired import interleaved
from dask_shm.bench.results import Case

__all__ = ["make", "consume", "joblib_cases", "BACKENDS"]

SECTION = "joblib"
#: label -> (joblib backend, parallel_config arguments, cluster transport or None)
BACKENDS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "loky": ("loky", {}, None),
    "dask tcp": ("dask", {}, "tcp"),
    "dask shm": ("dask", {}, "shm"),
}


def make(n: int) -> np.ndarray:
    """A large result: ``np.arange(n)``."""
    return np.arange(n)


def consume(x: np.ndarray) -> int:
    """A large argument, a small result."""
    return int(x[-1])


def _one_call(backend: str, config: dict[str, Any], fn: Callable[[Any], Any], arg: Any) -> float:
    from joblib import Parallel, delayed, parallel_config  # type: ignore[import-untyped]

    with parallel_config(backend=backend, n_jobs=2, **config):
        t0 = time.perf_counter()
        (res,) = Parallel()([delayed(fn)(arg)])
        t = time.perf_counter() - t0
    del res
    return t


def joblib_cases(clients: dict[str, Any], nbytes: int, reps: int, pause: float) -> list[Case]:
    """A call returning ``nbytes`` and a call taking ``nbytes``, per backend."""
    n = nbytes // 8
    arg = np.arange(n)
    cases = []
    for name, fn, x in (("result", make, n), ("argument", consume, arg)):
        case = Case(SECTION, name, n * 8)
        for rep in range(reps + 1):
            for label in interleaved(list(BACKENDS), rep):
                backend, config, scheme = BACKENDS[label]
                if scheme is not None:
                    config = {**config, "client": clients[scheme]}
                case.add(label, {"wall": _one_call(backend, config, fn, x)}, warmup=rep == 0)
                time.sleep(pause)
        cases.append(case)
    return cases
