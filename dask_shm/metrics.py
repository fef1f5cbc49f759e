"""dask-shm's counters on Dask's Prometheus endpoints.

distributed's ``/metrics`` handlers (worker and scheduler) serve
``prometheus_client``'s default registry, so a collector registered there
once per process appears beside Dask's own metrics, with no route or plugin
of ours.  Nothing happens when ``prometheus_client`` is not installed (Dask
then has no ``/metrics`` either).

Every counter of :mod:`dask_shm.stats` becomes ``dask_shm_<name>_total``
(``shm-bytes`` -> ``dask_shm_shm_bytes_total``) and the shared memory's state becomes
gauges (``dask_shm_buffer_bytes``, ``dask_shm_buffer_in_flight``,
``dask_shm_peer_buffers``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from dask_shm import stats

__all__ = ["ensure_registered", "ShmCollector"]

_lock = threading.Lock()
#: Names in :func:`stats.snapshot` that are a state, not a count.
GAUGES = frozenset(("buffer-bytes", "buffer-in-flight", "peer-buffers"))
_registered = False


class ShmCollector:
    """A ``prometheus_client`` collector reading :func:`stats.snapshot`."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, value in sorted(stats.snapshot().items()):
            metric = "dask_shm_" + name.replace("-", "_")
            if name in GAUGES:
                yield GaugeMetricFamily(metric, f"dask-shm shared memory now: {name}", value=value)
            else:
                yield CounterMetricFamily(metric, f"dask-shm counter {name}", value=value)

    def describe(self) -> list[Any]:
        return []  # collected lazily: names appear as counters first count


def ensure_registered() -> bool:
    """Register the collector in the default registry (once per process).
    Returns whether dask-shm's metrics are exported."""
    global _registered
    if _registered:
        return True
    with _lock:
        if _registered:
            return True
        try:
            import prometheus_client
        except ImportError:
            return False
        prometheus_client.REGISTRY.register(ShmCollector())  # type: ignore[arg-type]
        _registered = True
        return True
