"""Per-process counters: what went through shared memory, what did not, and why.

Read them in any process with :func:`snapshot` (for a cluster:
``client.run(dask_shm.stats.snapshot)``); :mod:`dask_shm.metrics` also puts
them on Dask's Prometheus endpoints.  Names:

``shm-messages`` / ``shm-bytes``
    Messages that bypassed TCP, and their bytes: copied into this process's
    buffer, or read in place by the receiver.
``single-copy-messages``
    Those of them the receiver read in place, straight out of this
    process's memory (``dask-shm.single-copy``).
``handoff-frames`` / ``handoff-bytes``
    Counted by the reader: frames it took over instead of copying, from a
    sender in its own process that no longer referred to them (a client
    gathering through the scheduler in the scheduler's process).
``single-copy-refused-<reason>``
    Handshakes at which this process could not read its peer's memory, so
    that the peer's large messages come through its buffer, by why:
    ``eperm`` (Yama scope 2 or 3, a non-dumpable peer, another user
    namespace), ``esrch`` (another pid namespace), ``enosys`` (a seccomp
    filter, an old kernel), ``efault``, ``mismatch``, ``no-address`` (the
    peer has ``single-copy`` off).  See :mod:`dask_shm.single_copy`.
``tcp-messages`` / ``tcp-bytes``
    Messages serialized for shared memory that turned out smaller than
    ``dask-shm.threshold`` (or found this process without a buffer), and
    their bytes: sent over TCP.
``fallback-busy``
    Fragments sent inline over TCP because the buffer had no room and the
    message had nothing in flight to wait for (other links held the room).
``fallback-enospc``
    Times this process could not reserve its buffer (a full directory): it
    then sends over TCP.
``fallback-no-buffer``
    Times it could not set its buffer up for another reason (the kernel
    refused the memory or the mapping): it then sends over TCP, without
    trying again until its ``shm://`` comms have all closed.
``fallback-no-channel``
    Handshakes at which this process could not create a release socket
    (out of descriptors): nothing goes through shared memory on that link,
    either way.
``fallback-<reason>``
    Messages written on ``shm://`` comms that are plain TCP, by why:
    ``no-probe`` (the peer failed the handshake probe: another host, user or
    directory), ``not-opened`` (a proven peer named a buffer or release
    socket that could not be opened or reached, or refused ours), ``plain-peer`` (the
    peer is ``tcp://`` or speaks another protocol version), ``disabled``
    (``dask-shm.enabled`` is false, or the directory is unusable or not a
    memory filesystem), ``probe-failed`` (this side could not create its
    probe: a full directory).
``below-threshold``
    Messages on shared-memory comms estimated smaller than
    ``dask-shm.threshold`` (sent as plain TCP without looking further).
``handshake-shm`` / ``handshake-no-probe`` / ``handshake-not-opened`` / ``handshake-plain``
    Handshakes that negotiated shared memory, failed the probe, could not
    open what a proven peer named, or met a peer without dask-shm.
``family-messages`` / ``family-declined-<reason>``
    Objects the ``"shm"`` serialization family serialized, and times it let
    the next family serve: ``no-context`` (spilling, direct ``serialize()``),
    ``not-negotiated`` (``tcp://`` or a failed probe), ``relay`` (the peer is
    a scheduler), ``non-contiguous``.
``buffer-bytes`` / ``buffer-in-flight`` / ``peer-buffers`` (gauges)
    This process's shared buffer (0 until its first linked comm, and again
    after its last), the bytes of it awaiting release by receivers, and the
    peers' buffers it has mapped.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable

__all__ = ["count", "Tally", "snapshot", "reset", "add_gauges"]

_counts: Counter[str] = Counter()
_lock = threading.Lock()
_tallies: weakref.WeakSet[Tally] = weakref.WeakSet()
#: Counts of tallies that died, appended without a lock (a finalizer may run
#: while this thread holds ``_lock``) and folded in under it.
_dead: deque[tuple[str, int]] = deque()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name``."""
    with _lock:
        _counts[name] += n


def _fold() -> None:
    """Add what dead tallies left (``_lock`` held)."""
    while _dead:
        name, n = _dead.popleft()
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
        if self.n:
            _dead.append((self.name, self.n))


#: Functions returning gauges of this process's state (its shared memory:
#: :func:`dask_shm.host.info` registers itself), added to every snapshot.
_gauges: list[Callable[[], dict[str, int]]] = []


def add_gauges(read: Callable[[], dict[str, int]]) -> None:
    """Add the gauges ``read()`` returns to every :func:`snapshot`."""
    _gauges.append(read)


def snapshot() -> dict[str, int]:
    """All counters of this process, with its shared memory's current state."""
    with _lock:
        _fold()
        totals = _counts.copy()
        for t in list(_tallies):
            totals[t.name] += t.n
    out = {k: v for k, v in totals.items() if v}
    for read in _gauges:
        out.update(read())
    return out


def reset() -> None:
    """Set every counter to zero (for tests and benchmarks)."""
    with _lock:
        _dead.clear()
        _counts.clear()
        for t in list(_tallies):
            t.n = 0
