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
segments below ``AWAIT_RETURN_MIN``, one above), so many small segments but
one 400 MB one; the total stays within the limit.  A size sent in bursts (a
send missed it while a warm-up of it was under way: a dask.array rechunk
sends two 128 MB frames in quick succession) keeps one more ready per such
miss, up to ``BURST_SHARE`` of the limit, with as many warm-ups under way at
once; otherwise the second frame of every burst would go over TCP.

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
triggered it was written.  A relay (a scheduler) never warms: it hands on
the segments it receives, and takes one only for a frame whose sender's pool
was cold, which the next message from that sender will not be.

Creating is the last resort: fresh pages cost ~0.85 ms of kernel time per MB
here, and a warm-up that creates 400 MB while a transfer runs slows that
transfer several times over (2 cores).  So a warm-up of a large size
(``AWAIT_RETURN_MIN``) that finds nothing to claim, in a process that holds
received segments of that size or got one back recently, first waits up to
``WARM_WAIT`` for one to come back: a segment this process releases fills it
at once, one another process parks is claimed (only while this process
moves no large message: a claim fills a page table, ~45 ms per 400 MB here,
and slowed the transfer it overlapped).  In a round trip (scatter
then gather, a task's input then its result) segments then circulate and
none are created after the first; nor in a one-way flow once this process
has handed one over (its receiver parks it when done).  Once this process
has no shared-memory comm left, it expects nothing back.  When one must be
created after all, a thread of its own does it in steps of ``CREATE_STEP``,
each waiting while this process moves a large message (``Pool.busy``: one
written or read within ``QUIET``, or a comm socket with bytes queued) and,
until a send of that size misses it, while anything but that thread keeps
more than ``HOST_SHARE`` of the host's CPUs busy (another worker receiving,
or this process receiving over TCP, say); for at most ``MAX_YIELD`` in all.
Measured on the 2-core VM: without the host check, the first scatter of a
fresh cluster took ~120 ms longer than with pooling off; with it, no longer.

Idle segments are released after ``dask-shm.pool-idle-timeout``: mapped ones
are parked, parked ones unlinked.  Sizes are rounded up to classes a quarter
power of two apart, so a segment serves any frame up to 25 % smaller.
"""

from __future__ import annotations

import logging
import math
import os
import heapq
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Callable

from dask_shm import stats
from dask_shm.segments import (
    CREATE_STEP,
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
#: small segments (cheap, and a ping-pong of messages needs several, so at
#: least two), but only one of a size whose warm-ups wait for returns
#: (AWAIT_RETURN_MIN): a second one would sit idle in RSS while returns
#: refill the first; received ones beyond it are parked for other senders.
CLASS_SHARE = 16
#: A size class sent in bursts (a send missed it while a warm-up of it was
#: under way) may keep one more segment ready per such miss, up to this share
#: of the pool limit: two 128 MB ones in a 1 GiB pool, but one of 400 MB.
BURST_SHARE = 4
#: Recycled segments up to this size are pre-faulted at once, in the
#: releasing thread (~0.1 ms per MiB); larger ones by the housekeeping thread.
INLINE_PREFAULT = 4 << 20
#: How often the housekeeping thread looks for idle segments and orphans.
HOUSEKEEPING_INTERVAL = 1.0
#: Warm-ups of at least this size may wait for a segment to come back
#: instead of creating one at once (below it creating costs < ~27 ms).
AWAIT_RETURN_MIN = 32 << 20
#: How long such a warm-up waits, and how often it looks for parked ones.
WARM_WAIT = 1.0
WARM_POLL = 0.05
#: After a large message, this process counts as busy for this long: a
#: warm-up that must create fresh pages waits for quiet (see Pool.busy)...
QUIET = 0.05
#: ...and while anything but the warm-up's own thread keeps more than this
#: share of the host's CPUs busy...
HOST_SHARE = 0.25
#: ...but for at most this long in all.
MAX_YIELD = 5.0
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
        #: How long a warm-up waits for a segment to come back (WARM_WAIT).
        self.warm_wait = WARM_WAIT
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], deque[Segment]] = {}
        self._idle_bytes = 0
        self._parked: deque[tuple[float, ShmDirectory, str, int]] = deque()
        self._parked_bytes = 0
        #: Warm-ups under way per class (waiting, claiming, creating, or
        #: pre-faulting a segment that came back).
        self._warming: dict[tuple[str, int], int] = {}
        #: How many segments of a class to have ready at once, where sends
        #: of it come in bursts (else one; see BURST_SHARE).
        self._want: dict[tuple[str, int], int] = {}
        #: When this process last wanted a segment of each class to send.
        self._sent: dict[tuple[str, int], float] = {}
        #: Received segments of each class whose views are alive, and when
        #: one last came back: a warm-up may wait for the next (see above).
        self._live: dict[tuple[str, int], int] = {}
        self._returned: dict[tuple[str, int], float] = {}
        #: When this process last handed a segment of each class to a peer:
        #: that receiver parks it once done, for this process to claim.
        self._handed: dict[tuple[str, int], float] = {}
        #: Comms of this process with a shared-memory link (see link_closed).
        self._links = 0
        #: Sizes being created that a send has missed meanwhile.
        self._urgent: set[tuple[str, int]] = set()
        #: Warm-ups waiting for a segment to come back: a token each, with
        #: its deadline, oldest first.
        self._awaiting: dict[tuple[str, int], dict[int, float]] = {}
        self._tokens = itertools.count()
        self._requests: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._last_activity = -math.inf
        #: Bumped by a full trim: warm-ups started before it discard their segment.
        self._generation = 0
        self._thread: threading.Thread | None = None

    # -- taking and giving back -------------------------------------------

    def take(
        self, directory: ShmDirectory, n: int, *, relay: bool = False
    ) -> tuple[Segment | None, bool]:
        """An idle mapped segment fitting ``n`` bytes (or None: a miss), and
        whether one should be warmed to replace it.

        A miss while that size is being created makes the creation urgent
        (see :meth:`_create`).  A ``relay`` (a scheduler handing on frames it
        received over TCP because their sender's pool was cold) takes what is
        idle but never warms, nor counts as demand: it forwards the segments
        it receives, and the next message from that sender arrives in one.
        A relay's warm-up only put ~0.85 ms of kernel time per MB of fresh
        pages on a busy host and left an idle segment in the scheduler.

        A miss while a warm-up of that size is under way means sends of it
        come in bursts (two frames in quick succession, as a dask.array
        rechunk sends): that size then keeps one more segment ready (see
        ``BURST_SHARE``), else the second frame of every burst goes over TCP.
        """
        c = size_class(n)
        key = (directory.path, c)
        with self._lock:
            now = time.monotonic()
            if not relay:
                self._wanted(key, now)  # a burst long past is forgotten
                self._sent[key] = now
            for cls in (c, size_class(c + 1)):
                q = self._idle.get((directory.path, cls))
                if q:
                    seg = q.pop()
                    self._idle_bytes -= seg.size
                    if relay:
                        return seg, False
                    k = (directory.path, seg.size)
                    self._handed[k] = now
                    return seg, self._ready_count(k) < self._wanted(k, now)
            if relay:
                return None, False
            if key in self._warming:
                self._urgent.add(key)
                want = self._want.get(key, 1)
                if want < max(1, self.limit // BURST_SHARE // c):
                    self._want[key] = want + 1
                    stats.count("pool-bursts")
        return None, True

    def _ready_count(self, key: tuple[str, int]) -> int:
        """Idle mapped segments of class ``key`` plus warm-ups under way (lock held)."""
        q = self._idle.get(key)
        return (len(q) if q else 0) + self._warming.get(key, 0)

    def _wanted(self, key: tuple[str, int], now: float) -> int:
        """How many segments of class ``key`` to have ready (lock held): one,
        or more for a size sent in bursts, until it goes unsent for
        ``idle_timeout``."""
        if key in self._want and now - self._sent.get(key, -math.inf) >= self.idle_timeout:
            del self._want[key]
        return self._want.get(key, 1)

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
            generation = self._generation
            waiting = self._awaiting.get(key)
            awaited = next(iter(waiting)) if waiting else None  # the oldest waiting warm-up
            if awaited is not None:
                self._stop_waiting(key, awaited)
                keep = True  # what a warm-up waits for: it goes on as the pre-fault below
            else:
                keep = (
                    now - self._sent.get(key, -math.inf) < self.idle_timeout
                    and self._ready_count(key)
                    < max(self._per_class(seg.size), self._wanted(key, now))
                    and seg.size <= self.limit
                )
            if keep:  # a size this process sends: others make room, as in warm()
                evicted = self._evict(self._idle_bytes + seg.size - self.limit, keep=key)
                if self._idle_bytes + seg.size > self.limit:
                    self._return(evicted)
                    evicted, keep = [], False
            if awaited is not None and not keep:
                self._done(key)  # no room for what it waits for: it ends
            if keep:
                if awaited is None:
                    self._start(key)  # pre-faulted before anyone takes it
                self._idle_bytes += seg.size
                if awaited is not None:
                    stats.count("segments-awaited")
        for old in evicted:
            self._park(old)
        if not keep:
            self._park(seg)
        elif seg.size <= INLINE_PREFAULT:
            self._prefault(seg, generation)
        else:
            self._ensure_thread()
            self._requests.put(partial(self._prefault, seg, generation))

    def received(self, seg: Segment) -> Callable[[Segment], None]:
        """Count ``seg``, just received, as alive here; return the callback
        to run when its last view dies (it gives the segment back)."""
        key = (seg.directory.path, seg.size)
        with self._lock:
            self._live[key] = self._live.get(key, 0) + 1
        return self._released

    def _released(self, seg: Segment) -> None:
        key = (seg.directory.path, seg.size)
        with self._lock:
            left = self._live.get(key, 0) - 1
            if left > 0:
                self._live[key] = left
            else:
                self._live.pop(key, None)
            if self._links:  # this process still receives
                self._returned[key] = time.monotonic()
        self.put(seg)

    def _expects_return(self, key: tuple[str, int], now: float) -> bool:
        """Whether a segment of class ``key`` is likely to come back here soon
        (lock held)."""
        recent = now - self.idle_timeout
        return key[1] >= AWAIT_RETURN_MIN and (
            key in self._live
            or self._returned.get(key, -math.inf) > recent
            or self._handed.get(key, -math.inf) > recent
        )

    def link_opened(self) -> None:
        """A comm of this process has a shared-memory link."""
        with self._lock:
            self._links += 1

    def link_closed(self) -> None:
        """A comm with a shared-memory link has ended.  Once none is left,
        nothing handed over or received will come back, so warm-ups stop
        expecting it (a client that closes one cluster and starts another
        would otherwise wait ``WARM_WAIT`` on its first large send)."""
        with self._lock:
            self._links = max(0, self._links - 1)
            if not self._links:
                self._handed.clear()
                self._returned.clear()

    def _per_class(self, size: int) -> int:
        """How many idle segments of class ``size`` stay mapped (see CLASS_SHARE)."""
        return max(2 if size < AWAIT_RETURN_MIN else 1, self.limit // CLASS_SHARE // size)

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
        if not seg.directory.exists(name):  # claimed before it was noted above
            self._forget_parked(name)

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
            if self._ready_count(key) >= self._wanted(key, time.monotonic()) or c > self.limit:
                return
            evicted = self._evict(c + self._idle_bytes - self.limit, keep=key)
            if c + self._idle_bytes > self.limit:  # could not make room
                self._return(evicted)
                return
            self._start(key)
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

    def _stop_waiting(self, key: tuple[str, int], token: int) -> None:
        """Forget the waiting warm-up ``token`` (lock held)."""
        waiting = self._awaiting[key]
        del waiting[token]
        if not waiting:
            del self._awaiting[key]

    def _start(self, key: tuple[str, int]) -> None:
        """A warm-up of class ``key`` begins (lock held)."""
        self._warming[key] = self._warming.get(key, 0) + 1

    def _done(self, key: tuple[str, int]) -> None:
        """A warm-up of class ``key`` ends (lock held)."""
        left = self._warming.get(key, 0) - 1
        if left > 0:
            self._warming[key] = left
        else:
            self._warming.pop(key, None)
            self._urgent.discard(key)

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

    def _later(self, delay: float, job: Callable[[], None]) -> None:
        """Run ``job`` in the housekeeping thread ``delay`` seconds from now."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), job))
        self._requests.put(_nothing)  # wake the thread to see the new timer

    def _due(self, now: float) -> tuple[list[Callable[[], None]], float]:
        """Timers due at ``now``, and how long until the next one."""
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
            wait = self._timers[0][0] - now if self._timers else math.inf
        return due, wait

    def _housekeeping(self) -> None:
        _lower_priority()
        last_trim = last_sweep = time.monotonic()
        while True:
            due, wait = self._due(time.monotonic())
            for job in due:
                job()
            try:
                job = self._requests.get(timeout=min(wait, HOUSEKEEPING_INTERVAL))
            except queue.Empty:
                pass
            else:
                job()
            now = time.monotonic()
            if now - last_trim >= HOUSEKEEPING_INTERVAL:
                last_trim = now
                self.trim(now - self.idle_timeout)
            if now - last_sweep > SWEEP_INTERVAL:
                last_sweep = now
                for d in list(ShmDirectory._cache.values()):
                    _quiet_sweep(d)

    def _make_ready(
        self,
        directory: ShmDirectory,
        size: int,
        evicted: Sequence[Segment] = (),
        token: int | None = None,
    ) -> None:
        """Claim or create a segment of class ``size`` for the mapped tier;
        or, if one may come back soon (:meth:`_expects_return`), look again
        every ``WARM_POLL`` until a deadline before creating one.  ``token``
        names the waiting warm-up when looking again; once put() has removed
        it from ``_awaiting``, a segment came back and the warm-up lives on
        as that segment's pre-fault."""
        for old in evicted:
            self._park(old)
        key = (directory.path, size)
        seg, later = None, False  # later: a timer or a thread finishes
        generation = self._generation
        deadline = None
        try:
            now = time.monotonic()
            with self._lock:
                if token is None:
                    if self._expects_return(key, now):
                        token, deadline = next(self._tokens), now + self.warm_wait
                        self._awaiting.setdefault(key, {})[token] = deadline
                else:
                    deadline = self._awaiting.get(key, {}).get(token)
                    if deadline is None:
                        return  # a segment came back (put() ended the wait)
            # A warm-up that waits claims only while this process is quiet:
            # claiming fills a page table (~45 ms per 400 MB here), which
            # slows a transfer under way, and what it waits for may come
            # back meanwhile (then a surplus segment stays parked).
            if deadline is None or now >= deadline or not self.busy():
                seg = self._claim(directory, size)
                if seg is not None:
                    stats.count("segments-claimed")
                    return
            now = time.monotonic()
            with self._lock:
                if token is not None and token not in self._awaiting.get(key, {}):
                    return  # came back meanwhile
                later = deadline is not None and now < deadline
                if token is not None and not later:
                    self._stop_waiting(key, token)  # waited long enough: create one
                    token = None
            if later:
                self._later(WARM_POLL, partial(self._make_ready, directory, size, (), token))
                return
            if size >= 2 * CREATE_STEP:  # paced, in a thread of its own (see _create)
                later = True
                threading.Thread(
                    target=self._create, args=(directory, size, generation),
                    name="dask-shm-create", daemon=True,
                ).start()
                return
            seg = self._fresh(directory, size)
        except (OSError, ShmError) as e:  # listing or claiming parked segments
            logger.debug("could not warm a %d-byte segment: %s", size, e)
        finally:
            if not later:
                self._ready(key, seg, generation, token)

    def _create(self, directory: ShmDirectory, size: int, generation: int) -> None:
        """Create a large segment for the mapped tier, step by step, each step
        waiting while this process moves a large message (:meth:`busy`) and,
        until a send misses it, while the rest of the host is busy; for
        at most ``MAX_YIELD`` in all: a transfer then never competes with
        ~0.85 ms of kernel time per MB of fresh pages for long."""
        _lower_priority()
        key = (directory.path, size)
        until = time.monotonic() + MAX_YIELD

        host = _HostLoad()

        def pace() -> None:
            while time.monotonic() < until:
                if self.busy():
                    time.sleep(WARM_POLL / 5)
                    continue
                if key in self._urgent:
                    break  # sends are missing it: yield to this process only
                time.sleep(WARM_POLL / 2)  # a window to see what the host does
                if host.elsewhere() < HOST_SHARE * host.cpus:
                    break
            if generation != self._generation:
                raise _Abandoned  # trimmed meanwhile: Segment.create unlinks it

        seg = None
        try:
            seg = self._fresh(directory, size, pace)
        finally:
            self._ready(key, seg, generation)

    @staticmethod
    def _fresh(
        directory: ShmDirectory, size: int, pace: Callable[[], None] | None = None
    ) -> Segment | None:
        """A new segment for a warm-up (counted), or None if it cannot be made."""
        try:
            seg = Segment.create(directory, size, pace=pace)
        except _Abandoned:
            return None
        except ShmFull as e:
            stats.count("fallback-enospc-warm")
            warn_full_once(e)
            return None
        except (OSError, ShmError) as e:
            logger.debug("could not warm a %d-byte segment: %s", size, e)
            return None
        stats.count("segments-created")
        return seg

    def _ready(
        self,
        key: tuple[str, int],
        seg: Segment | None,
        generation: int,
        token: int | None = None,
    ) -> None:
        """End a warm-up (the waiting one ``token``, if given): ``seg`` (if
        any) joins the mapped tier, unless the pool was trimmed in full since
        the warm-up began."""
        surplus = False
        with self._lock:  # ready and no longer warming, atomically
            stale = generation != self._generation
            if token is None:
                self._done(key)
            elif token in self._awaiting.get(key, {}):
                self._stop_waiting(key, token)  # it claimed one while waiting
                self._done(key)
            else:  # put() ended the wait (and the pre-fault it started ends it)
                surplus = seg is not None  # claimed meanwhile: one too many
            if seg is not None and not stale and not surplus:
                seg.last_used = time.monotonic()
                self._idle.setdefault(key, deque()).append(seg)
                self._idle_bytes += seg.size
        if seg is not None and stale:
            seg.destroy()
        elif seg is not None and surplus:
            self._park(seg)

    # -- activity --------------------------------------------------------------

    def note_activity(self) -> None:
        """A large message was just written or read in this process."""
        self._last_activity = time.monotonic()

    def busy(self) -> bool:
        """Whether this process is moving a large message (or just did): one
        was noted within ``QUIET``, or a busy probe says so (the comm backend
        registers one that looks for bytes queued in its comms' sockets)."""
        if time.monotonic() - self._last_activity < QUIET:
            return True
        return any(probe() for probe in busy_probes)

    def _prefault(self, seg: Segment, generation: int) -> None:
        """Make a recycled segment write-ready, then offer it for sending
        (unless the pool was trimmed in full meanwhile).

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
            stale = generation != self._generation
            if stale:
                self._idle_bytes -= seg.size
            else:
                self._idle.setdefault((seg.directory.path, seg.size), deque()).append(seg)
            self._done((seg.directory.path, seg.size))
        if stale:
            seg.destroy()

    def claim(self, directory: ShmDirectory, n: int, *, relay: bool = False) -> Segment | None:
        """A parked segment fitting ``n`` bytes, claimed and mapped now (or
        None).  For a sender that found no mapped segment: claiming costs a
        page-table fill (~0.11 ms per MB here), cheaper than sending the frame
        over TCP (~0.4 ms per MB), and far cheaper than creating one.
        ``relay``: as in :meth:`take`."""
        seg = self._claim(directory, size_class(n))
        if seg is not None:
            stats.count("segments-claimed")
            if not relay:
                with self._lock:
                    self._handed[(directory.path, seg.size)] = time.monotonic()
        return seg

    def _claim(self, directory: ShmDirectory, size: int) -> Segment | None:
        """Claim a parked segment of class ``size`` (ours first, then anyone's)."""
        with self._lock:
            mine = [p[2] for p in self._parked if p[1] is directory and p[3] == size]
        for name in mine:
            seg = Segment.claim(directory, name)
            self._forget_parked(name)  # ours again, or another process's now
            if seg is not None:
                return seg
        for name, n in list_parked(directory):
            if n == size:
                seg = Segment.claim(directory, name)
                if seg is not None:
                    self._forget_parked(name)  # ours, if just parked (see _park)
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
            if everything:  # and no warm-up under way adds one later
                self._generation += 1
                for key, waiting in list(self._awaiting.items()):
                    for _ in waiting:
                        self._done(key)
                self._awaiting.clear()
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
                "warming": sum(self._warming.values()),
                "limit": self.limit,
            }


class _HostLoad:
    """CPU time the host spends outside the calling thread (Linux
    ``/proc/stat``).

    Fresh pages cost kernel time that, on a small or virtualized machine,
    slows every process on it: a warm-up creating them waits until the rest
    of the host (another worker receiving, or this very process receiving a
    transfer, whose reads over TCP leave no trace in :meth:`Pool.busy`) leaves
    it half idle.  Only the warm-up's own thread is left out: it is what
    would be measured otherwise.
    """

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat", "rb") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return time.monotonic(), 0.0, 0.0  # not Linux: say "idle"
        busy = (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK  # all but idle, iowait
        return time.monotonic(), busy, time.thread_time()

    def elsewhere(self) -> float:
        """CPUs' worth used outside the calling thread since the last call."""
        t0, busy0, own0 = self._last
        self._last = t1, busy1, own1 = self._sample()
        if t1 <= t0:
            return 0.0
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


class _Abandoned(Exception):
    """A warm-up outlived by a full trim."""


def _nothing() -> None:
    pass


def _lower_priority() -> None:
    """Run this thread at ``WARM_NICENESS``: warming must not slow transfers."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_NICENESS)
    except (OSError, AttributeError):
        pass


#: Callables saying whether this process is moving a large message now.
busy_probes: list[Callable[[], bool]] = []


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
