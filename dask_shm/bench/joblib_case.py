"""The joblib section: the same function through joblib's backends.

``loky`` (joblib's default) memory-maps large arguments through files in a
temporary folder (``/dev/shm`` on Linux) but pickles results through pipes;
``loky`` with ``max_nbytes=None`` pickles arguments too.  The ``dask``
backend runs on a LocalCluster over ``tcp://`` or ``shm://``; joblib scatters
large arguments and gathers results through the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["make", "consume", "joblib_calls", "BACKENDS"]

#: (label, joblib backend, extra parallel_config arguments, cluster scheme)
BACKENDS: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("loky (auto-memmap)", "loky", {}, None),
    ("loky (no memmap)", "loky", {"max_nbytes": None}, None),
    ("dask tcp://", "dask", {}, "tcp"),
    ("dask shm://", "dask", {}, "shm"),
]


def make(n: int) -> np.ndarray:
    """A large result: ``np.arange(n)``."""
    return np.arange(n)


def consume(x: np.ndarray) -> int:
    """A large argument, a small result."""
    return int(x[-1])


def joblib_calls(
    backend: str, config: dict[str, Any], fn: Callable[..., Any], arg: Any, reps: int, pause: float
) -> list[float]:
    """Time ``reps`` joblib calls of ``fn(arg)`` (one task each)."""
    from joblib import Parallel, delayed, parallel_config  # type: ignore[import-untyped]

    out = []
    with parallel_config(backend=backend, n_jobs=2, **config):
        for _ in range(reps):
            t0 = time.perf_counter()
            (res,) = Parallel()([delayed(fn)(arg)])
            out.append(time.perf_counter() - t0)
            del res
            time.sleep(pause)
    return out
