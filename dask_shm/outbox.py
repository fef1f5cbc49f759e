"""The sending side of links: what each receiver has not released yet.

An entry is a region of this process's buffer (:mod:`dask_shm.buffers`)
or a whole message read in place (:data:`PINNED`, its frames kept alive
here).  The receiver releases entries one byte each, through the link's
release channel (:mod:`dask_shm.release`); they are freed in the order
they were sent (docs/protocol.md, Release).  :class:`Outboxes` is the
bookkeeping of all links of one process and directory, with or without a
buffer: single copy needs no buffer, only this.  Lifetime: see
:mod:`dask_shm.buffers`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence

from dask_shm.names import held
from dask_shm.release import WINDOW, Channel

__all__ = ["Outbox", "Outboxes", "PINNED", "running_loop", "run_queued"]

#: An entry of an outbox for a message read in place, not a buffer region.
PINNED = -1


class Outbox:
    """The sending side of one link: the entries its receiver has not
    released yet, in the order they were sent, and the release channel."""

    def __init__(
        self,
        channel: Channel,
        loop: asyncio.AbstractEventLoop | None,
        on_closed: deque[Callable[[], None]] | None = None,
    ) -> None:
        self.channel = channel.use()
        #: The event loop watching the channel (None once it stopped).  The
        #: channel is let go only after that, so its descriptor is never
        #: reused under the loop's registration.
        self.loop: asyncio.AbstractEventLoop | None = loop
        #: Buffer offsets, or PINNED for a message a receiver reads in place.
        self.inflight: deque[int] = deque()
        self.closed = False
        #: Its comm has ended (see :meth:`Outboxes.retire`).
        self.retired = False
        #: Run once it closes, queued on ``_on_closed`` (see Outboxes.retire).
        self.then: Callable[[], None] | None = None
        self._on_closed = on_closed
        #: The frames of messages read in place, one list per PINNED entry.
        self.pinned: deque[list[memoryview]] = deque()
        #: Bumped whenever entries of this link are freed, by whichever
        #: link's :meth:`Buffer.place` polled them (see :meth:`Outboxes.wait`).
        self.release_count = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Makes stopping the watch and letting go of the channel happen
        #: once, whichever thread gets there first.
        self._fd_lock = threading.Lock()
        #: We hold a use of the channel (see :meth:`_unwatch`).
        self._holds = True
        held(self)

    def drop_in_child(self) -> None:
        """In a forked child: forget everything without touching the
        parent's loop (its epoll set is shared); the channel closes itself,
        and the parent frees the frames and regions."""
        self.closed = True
        self.loop = None
        self.then = None
        self._holds = False
        self.inflight.clear()
        self.pinned.clear()
        self._waiter = None

    def poll(self, free: Callable[[int], None]) -> None:
        """Free, with ``free``, the regions the receiver released (the lock
        of the :class:`Outboxes` held)."""
        if self.closed:
            return
        n = self.channel.read()
        if n is None:
            return
        if n == 0:  # end of file: the receiver will read nothing more
            for offset in self.inflight:
                free(offset)
            self.inflight.clear()
            self.pinned.clear()
            self.close()
        else:
            for _ in range(min(n, len(self.inflight))):
                offset = self.inflight.popleft()
                if offset == PINNED:
                    self.pinned.popleft()
                free(offset)
        self.release_count += 1
        self._wake_waiter()

    def close(self) -> None:
        """Nothing more will be released: wake a waiter, stop watching the
        channel and let go of it.  From any thread, the lock of the
        :class:`Outboxes` held (so that no :meth:`poll` runs meanwhile)."""
        self.closed = True
        self.pinned.clear()
        self._wake_waiter()
        then, self.then = self.then, None
        if then is not None and self._on_closed is not None:
            self._on_closed.append(then)
        loop = self.loop
        if loop is not None and loop.is_running() and running_loop() is not loop:
            try:
                loop.call_soon_threadsafe(self._unwatch)
                return
            except RuntimeError:  # closed meanwhile: nothing watches any more
                pass
        # On the loop, or it is not running (stopped, or closed with its
        # selector): nothing else is using its registrations.
        self._unwatch()

    def _unwatch(self) -> None:
        """Stop watching the channel, then let go of it (once)."""
        with self._fd_lock:
            loop, self.loop = self.loop, None
            if loop is not None:
                loop.remove_reader(self.channel.fd)  # a no-op once the loop is closed
            holds, self._holds = self._holds, False
        if holds:
            self.channel.drop()

    def _wake_waiter(self) -> None:
        future = self._waiter
        if future is None:
            return
        self._waiter = None
        loop = future.get_loop()
        if running_loop() is loop:
            _wake(future)
        else:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # its loop is closed: nobody is waiting
                pass


def _keep(offset: int) -> None:
    """Free nothing (no buffer: every entry is PINNED)."""


class Outboxes:
    """The outboxes of one process's links in one directory, and the lock
    that guards them and the buffer's allocator (:class:`Buffer` shares it).

    All methods may be called from any thread.  Never called from a
    finalizer.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Frees a buffer region (set by the buffer, if there is one).
        self.free: Callable[[int], None] = _keep
        self.boxes: set[Outbox] = set()
        #: What closed outboxes leave to run once the lock is released (see
        #: :meth:`retire`); appended to under the lock.
        self._closed_jobs: deque[Callable[[], None]] = deque()
        held(self)

    def drop_in_child(self) -> None:
        self.boxes = set()
        self._closed_jobs.clear()
        self.lock = threading.Lock()  # perhaps held by a thread the child lacks

    def attach(self, channel: Channel) -> Outbox:
        """The outbox of a new link whose receiver releases through
        ``channel``.  Called on the link's event loop, which watches the
        channel from now until the outbox closes: what the receiver releases
        is freed as soon as it says so, with no task or timer per message,
        and the frames it read in place (the application's memory) go at
        once.  Without a running loop (tests driving the buffer by hand)
        releases are read by :meth:`Buffer.place`."""
        loop = running_loop()
        box = Outbox(channel, loop, self._closed_jobs)
        with self.lock:
            self._tidy()
            self.boxes.add(box)
        self.after_close()
        if loop is not None:
            loop.add_reader(channel.fd, self._on_release, box)
        return box

    def pin(self, box: Outbox, frames: Sequence[memoryview]) -> bool:
        """Keep a message's ``frames`` alive until the receiver has read them
        in place from this process's memory (single copy) and released them.
        False if ``box`` has closed (nothing would release them) or holds
        ``WINDOW`` entries already.  (What the receiver releases, the loop
        watching the channel frees: no poll here.)"""
        with self.lock:
            if box.closed or len(box.inflight) >= WINDOW:
                return False
            box.inflight.append(PINNED)
            box.pinned.append(list(frames))
            return True

    async def wait(self, box: Outbox, seen: int) -> None:
        """Wait until entries of ``box`` are freed after ``seen`` (its
        ``release_count`` when a :meth:`Buffer.place` failed): by its
        receiver's release, which the event loop watching the channel reads
        (see :meth:`attach`), or by any link's poll meanwhile.  Waiters
        share one future (a stream and a closing comm may wait together)."""
        with self.lock:
            if box.release_count != seen or box.closed:
                return
            if box.loop is None:  # nothing would ever wake us
                raise RuntimeError(f"no event loop watches the release channel of {box}")
            future = box._waiter
            if future is None:
                future = box._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(future)  # one waiter cancelled leaves the others waiting

    def poll_all(self) -> None:
        """Free what every link's receiver released (the lock held)."""
        for box in list(self.boxes):
            box.poll(self.free)

    def _on_release(self, box: Outbox) -> None:
        """The release channel is readable (the event loop calls this)."""
        with self.lock:
            box.poll(self.free)
            if box.retired:  # its comm has ended: close it once it is empty
                self._tidy()
        self.after_close()

    def retire(self, box: Outbox, then: Callable[[], None]) -> None:
        """``box``'s comm has ended; ``then`` runs once ``box`` has closed.
        What it still has in flight stays reserved until its receiver
        releases it or hangs up (frames read in place stay alive: they are
        the receiver's only source); with nothing in flight it closes now.
        The caller holds its use of the host until ``then``, so the buffer
        and the watched channel outlive a comm that closed right after a
        write, until its receiver has read it."""
        with self.lock:
            first, box.retired = not box.retired, True
            now = first and box.closed  # its receiver hung up earlier
            if first and not box.closed:
                box.then = then  # queued when it closes, below or later
            self._tidy()
        if now:
            then()
        self.after_close()

    def close_all(self) -> None:
        """The host is closing: close every outbox (nothing queued runs)."""
        with self.lock:  # a loop may be polling one of them meanwhile
            boxes, self.boxes = self.boxes, set()
            for box in boxes:
                box.close()
            self._closed_jobs.clear()  # the host they held is being closed

    def after_close(self) -> None:
        """Run what outboxes closed under the lock left to do (it may take
        locks, this one included)."""
        run_queued(self._closed_jobs)

    def _tidy(self) -> None:
        """Poll retired outboxes, and drop those with nothing left in flight
        (the lock held).  Called whenever a link comes or goes, so their
        number stays that of receivers still copying."""
        for box in [b for b in self.boxes if b.retired]:
            box.poll(self.free)
            if not box.inflight:
                box.close()
            if box.closed:
                self.boxes.discard(box)


def run_queued(jobs: deque[Callable[[], None]]) -> None:
    """Run and remove the jobs in ``jobs``, which other threads may be
    running too (each job runs once)."""
    while jobs:
        try:
            job = jobs.popleft()
        except IndexError:  # another thread took it
            return
        job()


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
