"""A per-process pool of mapped, pre-faulted segments.

Why a pool: on this kind of machine a *fresh* tmpfs page costs far more than
copying into it (a fresh 400 MB segment fills at ~1.5 GB/s, slower than
loopback TCP), while a segment that is already mapped and touched fills at
memcpy speed (~14 GB/s).  So senders copy into pooled segments only.

Where pooled segments come from:

- a receiver's segment goes back to the receiver's pool when its last view
  dies (it is already mapped: recycling costs nothing);
- a miss ("cold" transfer) or a take that empties a size class asks the
  housekeeping thread to create one in the background, off the event loop.

The pool holds at most ``dask-shm.pool-size`` bytes of idle segments (they
count in this process's RSS) and releases those idle for longer than
``dask-shm.pool-idle-timeout``.  Sizes are rounded up to classes a quarter
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

from dask_shm import stats
from dask_shm.segments import (
    Segment,
    ShmDirectory,
    ShmError,
    ShmFull,
    _quiet_sweep,
)

__all__ = ["Pool", "size_class", "get_pool"]

logger = logging.getLogger(__name__)

#: Smallest segment we create: below this a pool slot is not worth its fd.
MIN_SEGMENT = 64 * 1024

#: How often the housekeeping thread looks for idle segments and orphans.
HOUSEKEEPING_INTERVAL = 1.0
SWEEP_INTERVAL = 60.0


def size_class(n: int) -> int:
    """The segment size used for a frame of ``n`` bytes (>= n, page-aligned)."""
    n = max(n, MIN_SEGMENT)
    e = math.frexp(n)[1] - 3  # n < 2**(e + 3)
    step = 1 << e  # classes are 4..8 steps of 2**e: quarter powers of two
    c = -(-n // step) * step
    return -(-c // os.sysconf("SC_PAGE_SIZE")) * os.sysconf("SC_PAGE_SIZE")


class Pool:
    """Idle segments of one process, by directory and size class."""

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], deque[Segment]] = {}
        self._idle_bytes = 0
        self._warming: set[tuple[str, int]] = set()
        self._requests: queue.SimpleQueue[tuple[ShmDirectory, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._full_warned = False

    # -- taking and giving back -------------------------------------------

    def take(self, directory: ShmDirectory, n: int) -> Segment | None:
        """An idle, mapped segment that fits ``n`` bytes, or None (a miss)."""
        c = size_class(n)
        with self._lock:
            for cls in (c, size_class(c + 1)):
                q = self._idle.get((directory.path, cls))
                if q:
                    seg = q.pop()
                    self._idle_bytes -= seg.size
                    return seg
        return None

    def put(self, seg: Segment) -> None:
        """Keep ``seg`` for reuse, or destroy it if it does not fit the limit.

        Used as the release callback of received segments, so it may run in
        any thread.
        """
        if seg.mapping is None or seg.size > self.limit:
            seg.destroy()
            return
        seg.last_used = time.monotonic()
        evicted = []
        with self._lock:
            self._idle.setdefault((seg.directory.path, seg.size), deque()).append(seg)
            self._idle_bytes += seg.size
            while self._idle_bytes > self.limit:
                evicted.append(self._pop_oldest())
        for old in evicted:
            old.destroy()
        self._ensure_thread()

    def _pop_oldest(self) -> Segment:
        key = min(
            (k for k, q in self._idle.items() if q), key=lambda k: self._idle[k][0].last_used
        )
        seg = self._idle[key].popleft()
        self._idle_bytes -= seg.size
        return seg

    # -- background work ---------------------------------------------------

    def warm(self, directory: ShmDirectory, n: int) -> None:
        """Ask for a segment fitting ``n`` bytes to be created in the background."""
        c = size_class(n)
        key = (directory.path, c)
        with self._lock:
            if key in self._warming or c + self._idle_bytes > self.limit:
                return
            self._warming.add(key)
        self._ensure_thread()
        self._requests.put((directory, c))

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._housekeeping, name="dask-shm-pool", daemon=True
                    )
                    self._thread.start()

    def _housekeeping(self) -> None:
        last_sweep = time.monotonic()
        while True:
            try:
                directory, size = self._requests.get(timeout=HOUSEKEEPING_INTERVAL)
            except queue.Empty:
                pass
            else:
                self._create(directory, size)
                continue
            now = time.monotonic()
            self.trim(now - self.idle_timeout)
            if now - last_sweep > SWEEP_INTERVAL:
                last_sweep = now
                for d in list(ShmDirectory._cache.values()):
                    _quiet_sweep(d)

    def _create(self, directory: ShmDirectory, size: int) -> None:
        try:
            seg = Segment.create(directory, size)
        except ShmFull as e:
            stats.count("fallback-enospc-warm")
            if not self._full_warned:
                self._full_warned = True
                logger.warning("dask-shm: %s", e.strerror)
            return
        except (OSError, ShmError) as e:
            logger.debug("could not warm a %d-byte segment: %s", size, e)
            return
        finally:
            with self._lock:
                self._warming.discard((directory.path, size))
        stats.count("segments-created")
        self.put(seg)

    # -- trimming ------------------------------------------------------------

    def trim(self, older_than: float = math.inf) -> int:
        """Destroy idle segments last used before ``older_than`` (monotonic
        seconds; default: all).  Returns the bytes released."""
        victims = []
        with self._lock:
            for q in self._idle.values():
                while q and q[0].last_used < older_than:
                    seg = q.popleft()
                    self._idle_bytes -= seg.size
                    victims.append(seg)
        for seg in victims:
            seg.destroy()
        return sum(s.size for s in victims)

    def info(self) -> dict[str, int]:
        """Idle segments and bytes held, and warm-ups in progress."""
        with self._lock:
            return {
                "idle-segments": sum(len(q) for q in self._idle.values()),
                "idle-bytes": self._idle_bytes,
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
