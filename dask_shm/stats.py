"""Per-process counters: what went through shared memory, what did not, and why.

Read them in any process with :func:`snapshot` (for a cluster:
``client.run(dask_shm.stats.snapshot)``); :mod:`dask_shm.metrics` also puts
them on Dask's Prometheus endpoints.  Names:

``shm-messages`` / ``shm-bytes``
    Messages carrying at least one shared-memory frame, and the bytes placed.
``tcp-messages`` / ``tcp-bytes``
    Messages (and their frame bytes) written on ``shm://`` comms entirely
    over TCP.
``fallback-cold`` / ``fallback-enospc``
    Frames at or above the threshold that went over TCP anyway on a
    shared-memory comm: no pre-faulted or parked segment fitted (``cold``), or
    the directory was full (``enospc``; ``fallback-enospc-warm`` when a
    background warm-up found it full).
``fallback-<reason>``
    Messages written on ``shm://`` comms that are plain TCP, by why:
    ``no-probe`` (the peer failed the handshake probe: another host, user or
    directory), ``plain-peer`` (the peer is ``tcp://``), ``disabled``
    (``dask-shm.enabled`` is false or the directory is unusable),
    ``probe-failed`` (this side could not create its probe: a full directory).
``below-threshold``
    Messages on shared-memory comms estimated smaller than
    ``dask-shm.threshold`` (sent as plain TCP without looking further).
``family-messages`` / ``family-bytes``
    Objects the ``"shm"`` serialization family serialized with at least one
    buffer in shared memory, and the bytes it placed.
``family-declined-<reason>``
    Times the family let the next one serve: ``no-context`` (spilling, direct
    ``serialize()``), ``not-negotiated`` (``tcp://`` or a failed probe),
    ``relay`` (the peer is a scheduler), ``non-contiguous``.
``segments-created`` / ``segments-received``
    Segments this process created (all in the background unless
    ``cold-transfer: shm``) and took over from peers.
``segments-parked`` / ``segments-claimed`` / ``segments-awaited`` / ``segments-forwarded``
    Segments this process parked for any process to claim, claimed (parked
    by itself or another), got back for a warm-up that waited for one, and
    handed on as a relay without copying.
``pool-bursts``
    Times a send missed a size while a warm-up of it was under way, so that
    size now keeps one more segment ready (see ``dask_shm.pool.BURST_SHARE``).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter

__all__ = ["count", "Tally", "snapshot", "reset"]

_counts: Counter[str] = Counter()
#: Reentrant: a Tally's finalizer may run during garbage collection
#: triggered while this thread holds it.
_lock = threading.RLock()
_tallies: weakref.WeakSet[Tally] = weakref.WeakSet()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name``."""
    with _lock:
        _counts[name] += n


class Tally:
    """One counter bumped without a lock by a single thread: ``tally.n += 1``.

    For counts made on every message of a comm (in its event loop's thread):
    even an uncontended lock there costs ~2 % of a small message's round trip
    (measured).  :func:`snapshot` adds live tallies to the totals; a tally
    folds its count into them when it dies.
    """

    __slots__ = ("name", "n", "__weakref__")

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 0
        with _lock:
            _tallies.add(self)

    def __del__(self) -> None:
        with _lock:
            _counts[self.name] += self.n
            self.n = 0


def snapshot() -> dict[str, int]:
    """All counters of this process, with the pool's current state."""
    from dask_shm.pool import get_pool

    with _lock:
        totals = _counts.copy()
        for t in list(_tallies):
            totals[t.name] += t.n
    out = {k: v for k, v in totals.items() if v}
    out.update({f"pool-{k}": v for k, v in get_pool().info().items()})
    return out


def reset() -> None:
    """Set every counter to zero (for tests and benchmarks)."""
    with _lock:
        _counts.clear()
        for t in list(_tallies):
            t.n = 0
