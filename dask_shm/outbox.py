"""The sending side of one link: what its receiver has not released yet,
and the release pipe the receiver releases it through.

An entry is a region of this process's buffer (:mod:`dask_shm.buffers`)
or a whole message read in place (:data:`PINNED`, its frames kept alive
here).  The receiver writes one byte per entry it is done with; entries are
freed in the order they were sent (docs/protocol.md, Release).  Lifetime:
see :mod:`dask_shm.buffers`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from dask_shm.names import close_quietly, held

if TYPE_CHECKING:
    from dask_shm.buffers import Buffer

__all__ = ["Outbox", "PIPE_REGIONS", "PINNED", "running_loop"]

#: Regions one link may have in flight: one release byte each must fit in
#: the pipe without blocking the receiver (POSIX guarantees PIPE_BUF, 4096).
PIPE_REGIONS = 4096
#: An entry of an outbox for a message read in place, not a buffer region.
PINNED = -1


class Outbox:
    """The sending side of one link: the regions its receiver has not
    released yet, in the order they were sent, and the release pipe."""

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop | None,
        on_closed: deque[Callable[[], None]] | None = None,
    ) -> None:
        self.fd = fd
        #: The event loop watching ``fd`` (None once it stopped).  The fd is
        #: closed only after that, so its number is never reused under the
        #: loop's registration.
        self.loop: asyncio.AbstractEventLoop | None = loop
        #: Buffer offsets, or PINNED for a message a receiver reads in place.
        self.inflight: deque[int] = deque()
        self.closed = False
        #: Its comm has ended (see :meth:`Buffer.retire`).
        self.retired = False
        #: Run once it closes, queued on ``_on_closed`` (see Buffer.retire).
        self.then: Callable[[], None] | None = None
        self._on_closed = on_closed
        #: The frames of messages read in place, one list per PINNED entry.
        self.pinned: deque[list[memoryview]] = deque()
        #: Bumped whenever regions of this link are freed, by whichever
        #: link's :meth:`Buffer.place` polled them (see :meth:`Buffer.wait`).
        self.release_count = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Makes stopping the watch and closing ``fd`` happen once, whichever
        #: thread gets there first.
        self._fd_lock = threading.Lock()
        held(self)

    def drop_in_child(self) -> None:
        """In a forked child: close the pipe without touching the parent's
        loop (its epoll set is shared), and forget the frames and regions
        (the parent frees them)."""
        self.closed = True
        self.loop = None
        self.then = None
        self.inflight.clear()
        self.pinned.clear()
        self._waiter = None
        if self.fd >= 0:
            close_quietly(self.fd)
            self.fd = -1

    def poll(self, buffer: Buffer) -> None:
        """Free the regions the receiver released (the buffer's lock held)."""
        if self.closed:
            return
        try:
            data = os.read(self.fd, PIPE_REGIONS)
        except BlockingIOError:
            return
        if not data:  # end of file: the receiver will read nothing more
            for offset in self.inflight:
                buffer._free(offset)
            self.inflight.clear()
            self.pinned.clear()
            self.close()
        else:
            n = min(len(data), len(self.inflight))
            for _ in range(n):
                offset = self.inflight.popleft()
                if offset == PINNED:
                    self.pinned.popleft()
                buffer._free(offset)
        self.release_count += 1
        self._wake_waiter()

    def close(self) -> None:
        """Nothing more will be released: wake a waiter, stop watching the
        pipe and close it.  From any thread, the buffer's lock held (so that
        no :meth:`poll` runs meanwhile)."""
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
        """Stop watching the pipe, then close it (once)."""
        with self._fd_lock:
            loop, self.loop = self.loop, None
            if loop is not None:
                loop.remove_reader(self.fd)  # a no-op once the loop is closed
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

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


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

