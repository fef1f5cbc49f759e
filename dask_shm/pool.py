"""A per-process pool of mapped, pre-faulted segments, and the host's free list.

Why a pool: on this kind of machine a *fresh* tmpfs page costs far more than
copying into it (a fresh 400 MB segment fills at ~1.5 GB/s, slower than
loopback TCP), while a segment that is already mapped and touched fills at
memcpy speed (~14 GB/s).  So senders copy into pooled segments only.

Two tiers:

- **Mapped** (this process): ready to write into at memcpy speed; they count
  in this process's RSS.  At most ``dask-shm.pool-size`` bytes in all.
- **Parked** (the host): unmapped segments under free names (see
  ``segments.py``).  Their pages stay allocated but in nobody's RSS; any of
  our processes may claim one, which costs a page-table fill (~45 ms per
  400 MB here) instead of allocating and zeroing pages (~230 ms).  Each
  process parks at most ``dask-shm.pool-size`` bytes.

In the mapped tier a size class holds up to 1/16 of the limit (at least two
segments), so many small segments but two 400 MB ones; the total stays
within the limit.

Flow: a received segment goes back to the receiver's mapped tier when its last
view dies if this process has itself sent frames of that size within
``pool-idle-timeout`` (pre-faulted again first: the receiver mapped it lazily,
and a write fault per page would cost more than the copy); otherwise, or if
its class is full, it is parked.  So a worker that only receives keeps no
idle segments in its RSS (Dask's memory manager reads RSS), and the sender
claims back what the receiver released instead of creating fresh pages.  A
sender that takes the last mapped segment of a size, or finds none (a *cold*
transfer, which goes over TCP), asks the housekeeping thread to *warm* one:
claim a parked segment of that size, else create one.  So in a one-way flow
(worker A to worker B, client to workers) the sender refills from what the
receiver released.  Warming runs at low CPU priority, after the message that
triggered it was written.

Idle segments are released after ``dask-shm.pool-idle-timeout``: mapped ones
are parked, parked ones unlinked.  Sizes are rounded up to classes a quarter
power of two apart, so a segment serves any frame up to 25 % smaller.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Callable

from dask_shm import stats
from dask_shm.segments import (
    Segment,
    ShmDirectory,
    ShmError,
    ShmFull,
    _quiet_sweep,
    list_parked,
    warn_full_once,
)

__all__ = ["Pool", "size_class", "get_pool"]

logger = logging.getLogger(__name__)

#: Smallest segment we create: below this a pool slot is not worth its fd.
MIN_SEGMENT = 64 * 1024
#: Mapped idle bytes kept per size class, as a share of the pool limit: many
#: small segments (cheap, and a ping-pong of messages needs several), and at
#: least two big ones: a process that relays (a LocalCluster's scheduler
#: shares its process, and pool, with the client) needs one per hop.
CLASS_SHARE = 16
#: Recycled segments up to this size are pre-faulted at once, in the
#: releasing thread (~0.1 ms per MiB); larger ones by the housekeeping thread.
INLINE_PREFAULT = 4 << 20
#: How often the housekeeping thread looks for idle segments and orphans.
HOUSEKEEPING_INTERVAL = 1.0
SWEEP_INTERVAL = 60.0
#: Niceness of the housekeeping thread: warming must not slow a transfer.
WARM_NICENESS = 10

_PAGE = os.sysconf("SC_PAGE_SIZE")


def size_class(n: int) -> int:
    """The segment size used for a frame of ``n`` bytes (>= n, page-aligned)."""
    n = max(n, MIN_SEGMENT)
    e = math.frexp(n)[1] - 3  # n < 2**(e + 3); classes step by 2**e
    c = -(-n // (1 << e)) << e
    return -(-c // _PAGE) * _PAGE


class Pool:
    """Idle segments of one process, by directory and size class."""

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], deque[Segment]] = {}
        self._idle_bytes = 0
        self._parked: deque[tuple[float, ShmDirectory, str, int]] = deque()
        self._parked_bytes = 0
        self._warming: set[tuple[str, int]] = set()
        #: When this process last wanted a segment of each class to send.
        self._sent: dict[tuple[str, int], float] = {}
        self._requests: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # -- taking and giving back -------------------------------------------

    def take(self, directory: ShmDirectory, n: int) -> tuple[Segment | None, bool]:
        """An idle mapped segment fitting ``n`` bytes (or None: a miss), and
        whether one should be warmed to replace it."""
        c = size_class(n)
        with self._lock:
            self._sent[(directory.path, c)] = time.monotonic()
            for cls in (c, size_class(c + 1)):
                q = self._idle.get((directory.path, cls))
                if q:
                    seg = q.pop()
                    self._idle_bytes -= seg.size
                    return seg, not q
        return None, True

    def put(self, seg: Segment) -> None:
        """Keep ``seg`` mapped for reuse if this process sends its size (and
        there is room), or park it for any process to claim.

        Used as the release callback of received segments, so it may run in
        any thread.
        """
        if seg.mapping is None:
            seg.destroy()
            return
        key = (seg.directory.path, seg.size)
        now = time.monotonic()
        evicted: list[Segment] = []
        with self._lock:
            q = self._idle.get(key)
            keep = (
                now - self._sent.get(key, -math.inf) < self.idle_timeout
                and (len(q) if q else 0) < self._per_class(seg.size)
                and key not in self._warming
                and seg.size <= self.limit
            )
            if keep:  # a size this process sends: others make room, as in warm()
                evicted = self._evict(self._idle_bytes + seg.size - self.limit, keep=key)
                if self._idle_bytes + seg.size > self.limit:
                    self._return(evicted)
                    evicted, keep = [], False
            if keep:
                self._warming.add(key)  # pre-faulted before anyone takes it
                self._idle_bytes += seg.size
        for old in evicted:
            self._park(old)
        if not keep:
            self._park(seg)
        elif seg.size <= INLINE_PREFAULT:
            self._prefault(seg)
        else:
            self._ensure_thread()
            self._requests.put(partial(self._prefault, seg))

    def _per_class(self, size: int) -> int:
        return max(2, self.limit // CLASS_SHARE // size)

    def _park(self, seg: Segment) -> None:
        if seg.size > self.limit:
            seg.destroy()
            return
        try:
            name = seg.park()
        except OSError:
            seg.destroy()
            return
        stats.count("segments-parked")
        evicted = []
        with self._lock:
            self._parked.append((time.monotonic(), seg.directory, name, seg.size))
            self._parked_bytes += seg.size
            while self._parked_bytes > self.limit:
                evicted.append(self._parked.popleft())
                self._parked_bytes -= evicted[-1][3]
        for _, directory, old, _ in evicted:
            directory.unlink(old)

    # -- background work ---------------------------------------------------

    def warm(self, directory: ShmDirectory, n: int) -> None:
        """Have a segment fitting ``n`` bytes made ready in the background.

        If the pool is full, idle segments of other sizes make room, least
        recently used first (they are parked, not lost): the size just asked
        for is the one most likely to be asked for again.
        """
        c = size_class(n)
        key = (directory.path, c)
        with self._lock:
            if key in self._warming or c > self.limit:
                return
            evicted = self._evict(c + self._idle_bytes - self.limit, keep=key)
            if c + self._idle_bytes > self.limit:  # could not make room
                self._return(evicted)
                return
            self._warming.add(key)
        self._ensure_thread()
        self._requests.put(partial(self._make_ready, directory, c, evicted))

    def _evict(self, nbytes: int, keep: tuple[str, int]) -> list[Segment]:
        """Take at least ``nbytes`` of idle segments of classes other than
        ``keep`` out of the pool, least recently used first (lock held)."""
        if nbytes <= 0:
            return []
        candidates = sorted(
            (seg.last_used, k) for k, q in self._idle.items() if k != keep for seg in q
        )
        out: list[Segment] = []
        for _, k in candidates:
            if nbytes <= 0:
                break
            seg = self._idle[k].popleft()  # each deque is oldest first
            self._idle_bytes -= seg.size
            nbytes -= seg.size
            out.append(seg)
        return out

    def _return(self, segs: list[Segment]) -> None:
        """Undo :meth:`_evict` (lock held)."""
        for seg in segs:
            self._idle[(seg.directory.path, seg.size)].appendleft(seg)
            self._idle_bytes += seg.size

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._housekeeping, name="dask-shm-pool", daemon=True
                )
                self._thread.start()

    def _housekeeping(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_NICENESS)
        except (OSError, AttributeError):
            pass
        last_sweep = time.monotonic()
        while True:
            try:
                job = self._requests.get(timeout=HOUSEKEEPING_INTERVAL)
            except queue.Empty:
                pass
            else:
                job()
                continue
            now = time.monotonic()
            self.trim(now - self.idle_timeout)
            if now - last_sweep > SWEEP_INTERVAL:
                last_sweep = now
                for d in list(ShmDirectory._cache.values()):
                    _quiet_sweep(d)

    def _make_ready(
        self, directory: ShmDirectory, size: int, evicted: Sequence[Segment] = ()
    ) -> None:
        for old in evicted:
            self._park(old)
        seg = None
        try:
            seg = self._claim(directory, size)
            if seg is not None:
                stats.count("segments-claimed")
            else:
                seg = Segment.create(directory, size)
                stats.count("segments-created")
        except ShmFull as e:
            stats.count("fallback-enospc-warm")
            warn_full_once(e)
        except (OSError, ShmError) as e:
            logger.debug("could not warm a %d-byte segment: %s", size, e)
        finally:
            with self._lock:  # ready and no longer warming, atomically
                if seg is not None:
                    seg.last_used = time.monotonic()
                    self._idle.setdefault((directory.path, seg.size), deque()).append(seg)
                    self._idle_bytes += seg.size
                self._warming.discard((directory.path, size))

    def _prefault(self, seg: Segment) -> None:
        """Make a recycled segment write-ready, then offer it for sending.

        A receiver maps lazily; writing into pages not yet in our page table
        costs a write fault each (~2.6 us per 4 KiB page here), a batched
        read-populate ~0.4 us, after which writes run at memcpy speed.
        """
        try:
            seg.prefault()
        except (OSError, ValueError):
            pass
        seg.last_used = time.monotonic()
        with self._lock:
            self._idle.setdefault((seg.directory.path, seg.size), deque()).append(seg)
            self._warming.discard((seg.directory.path, seg.size))

    def claim(self, directory: ShmDirectory, n: int) -> Segment | None:
        """A parked segment fitting ``n`` bytes, claimed and mapped now (or
        None).  For a sender that found no mapped segment: claiming costs a
        page-table fill (~0.11 ms per MB here), cheaper than sending the frame
        over TCP (~0.4 ms per MB), and far cheaper than creating one."""
        seg = self._claim(directory, size_class(n))
        if seg is not None:
            stats.count("segments-claimed")
        return seg

    def _claim(self, directory: ShmDirectory, size: int) -> Segment | None:
        """Claim a parked segment of class ``size`` (ours first, then anyone's)."""
        with self._lock:
            mine = [p for p in self._parked if p[1] is directory and p[3] == size]
        candidates = [p[2] for p in mine] + [
            name for name, n in list_parked(directory) if n == size
        ]
        for name in candidates:
            seg = Segment.claim(directory, name)
            if seg is not None:
                self._forget_parked(name)
                return seg
        return None

    def _forget_parked(self, name: str) -> None:
        with self._lock:
            for i, p in enumerate(self._parked):
                if p[2] == name:
                    del self._parked[i]
                    self._parked_bytes -= p[3]
                    return

    # -- trimming ------------------------------------------------------------

    def trim(self, older_than: float = math.inf) -> int:
        """Release idle segments last used before ``older_than`` (monotonic
        seconds; default: all): mapped ones are parked, parked ones unlinked;
        with the default everything is unlinked.  Returns the bytes released."""
        everything = older_than == math.inf
        victims, stale = [], []
        with self._lock:
            for q in self._idle.values():
                while q and q[0].last_used < older_than:
                    seg = q.popleft()
                    self._idle_bytes -= seg.size
                    victims.append(seg)
            while self._parked and self._parked[0][0] < older_than:
                stale.append(self._parked.popleft())
                self._parked_bytes -= stale[-1][3]
        for seg in victims:
            seg.destroy() if everything else self._park(seg)
        for _, directory, name, _ in stale:
            directory.unlink(name)  # gone already if someone claimed it
        return sum(s.size for s in victims) + sum(p[3] for p in stale)

    def info(self) -> dict[str, int]:
        """Idle mapped and parked segments and bytes, and warm-ups in progress."""
        with self._lock:
            return {
                "idle-segments": sum(len(q) for q in self._idle.values()),
                "idle-bytes": self._idle_bytes,
                "parked-segments": len(self._parked),
                "parked-bytes": self._parked_bytes,
                "warming": len(self._warming),
                "limit": self.limit,
            }


_pool: Pool | None = None
_pool_lock = threading.Lock()


def get_pool(limit: int | None = None, idle_timeout: float | None = None) -> Pool:
    """This process's pool; ``limit``/``idle_timeout`` update its settings."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Pool(limit or 0, idle_timeout or 0.0)
        if limit is not None:
            _pool.limit = limit
        if idle_timeout is not None:
            _pool.idle_timeout = idle_timeout
        return _pool


def _reset_after_fork() -> None:
    global _pool
    _pool = None  # the parent's segments and thread are not ours


os.register_at_fork(after_in_child=_reset_after_fork)
