"""Shared buffers and their lifetime.

This module is the sending side (:class:`Buffer`, :class:`Outbox`); the
receiving side is :mod:`dask_shm.inbox`, and a process's bookkeeping (who
uses its shared memory, and when it goes) is :mod:`dask_shm.host`.  The
lifetime below is that of all three.

Who creates memory
    Each process with at least one ``shm://`` comm to a proven peer owns one
    *buffer*: a file ``dask-shm-<identity>-b-<random>`` of
    ``dask-shm.buffer-size`` bytes in the shm directory.  Its first handshake
    creates it (``O_CREAT | O_EXCL``, mode 0600); before its first message
    through it the process reserves every page (``posix_fallocate``: a full
    tmpfs fails there with ENOSPC, never with SIGBUS later), maps it and
    faults it in, off the event loop.  If there is no room, that message
    travels over TCP and the next one that needs the buffer tries again
    (a warning, once).  Once filled, the buffer stays mapped and
    serves every message the process sends, whatever the size: no message
    needs fresh pages, no message pays for mmap or munmap.

Single copy, when the kernel permits it
    A receiver that may read the sender's memory (``process_vm_readv``;
    tested at the handshake) copies large frames straight out of the
    sender's own objects instead, and the buffer is never filled.  The
    sender keeps those frames unchanged until the receiver releases them
    through the same release pipe; nothing of them lives in shared memory.

Who may write and read it
    Only the owner writes into its buffer.  To send, it allocates a region,
    copies a piece of the message into it and sends the region's offset and
    length over the comm's TCP stream.  A receiver maps the sender's buffer
    read-only once and keeps the mapping (one per peer buffer, shared by all
    comms to that peer), copies the region out into ordinary memory
    (``numpy.empty``, as distributed's TCP read does) and releases it.

When it is released
    Every direction of a link has a *release pipe*: a FIFO the sender creates
    during the handshake, the receiver opens for writing, and the sender
    unlinks as soon as both ends are open (so nothing named is left).  The
    receiver writes one byte per region once it has copied it out; the
    sender's event loop watches the pipe and frees those regions, in the
    order it sent them, as the bytes arrive.  When the receiver's end closes
    (its comm closed with no copy in flight, or its process died) the sender
    reads end-of-file and frees all that link held.  Nothing is freed on a
    timer.  A comm that closes keeps its link's regions and frames read in
    place, and its pipe watched, until its receiver releases them or hangs
    up: a message written just before a close is still delivered.  The
    buffer itself is unmapped and unlinked once the last ``shm://`` comm of
    the process has closed and been released so, and at exit; a receiver
    still copying from it keeps its pages through its own mapping.

What a crash leaves behind
    - ``kill -9`` of a sender: its buffer file, and a probe or release pipe if
      it was in a handshake, all named with its identity.  The janitor
      (:mod:`dask_shm.janitor`) removes them once it can prove the process
      dead: when a peer's link to it ends, when a handshake with it breaks
      off, or when any process opens the directory; a receiver's mapping
      keeps the pages it may still be reading.
    - ``kill -9`` of a receiver: nothing named.  The kernel closes its end of
      the release pipes, and each sender frees that link's regions.
    - A comm closed or aborted in the middle of a message: the receiver
      closes its end of the release pipe only once a copy under way has
      finished, so the sender never overwrites a region still being read.

Working set
    A process's RSS includes its own buffer once (``buffer-size``) and the
    pages of peers' buffers it has copied out of (at most ``buffer-size`` per
    peer it receives from, shared with that peer).  Received data lives in
    private memory and is counted once, where it lives.

Notes
-----
**Memory ordering.**  The release pipe orders a receiver's reads before the
sender's next writes on every architecture Linux runs on, x86-64 (TSO) and
aarch64 (weakly ordered) alike, with no barrier instruction needed in
Python: the receiver finishes its copy before it calls write(2) on the
pipe; the kernel queues the byte under the pipe's mutex, whose release
orders all the calling CPU's earlier loads and stores before it; the
sender's read(2) acquires the same mutex before it returns the byte, and the
sender writes into the region only after that.  The other direction is the
same argument through the TCP socket's lock: the receiver learns of a
region only from a descriptor sent after the sender's copy.
"""


from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from dask_shm.names import MODE, Directory, close_quietly, held, new_name, own
from dask_shm.outbox import PINNED, PIPE_REGIONS, Outbox, running_loop

__all__ = ["Buffer", "ALIGN", "run_queued"]

logger = logging.getLogger(__name__)

#: Regions start on cache-line boundaries, so copies into them are aligned.
ALIGN = 64
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels: touch each page
_PAGE = mmap.PAGESIZE


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Buffer:
    """This process's shared buffer, and the regions in flight in it.

    All methods may be called from any thread; one lock guards the
    allocator.  Never called from a finalizer.
    """

    def __init__(self, directory: Directory, size: int) -> None:
        self.directory = directory
        self.size = size
        self.name = new_name("b")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.name, flags, MODE, dir_fd=directory.fd)
        own(directory, self.name)
        #: The mapping as bytes, once :meth:`fill` has run.
        self.view: np.ndarray | None = None
        self._lock = threading.Lock()
        self._used: list[tuple[int, int]] = []  # (offset, end), sorted
        #: Regions :meth:`place` gave whose :meth:`write` has not ended, and
        #: whether they were freed meanwhile (their receiver hung up): then
        #: freed when the write ends, never under it.
        self._writing: dict[int, bool] = {}
        self._outboxes: set[Outbox] = set()
        #: What closed outboxes leave to run once the lock is released (see
        #: :meth:`retire`); appended to under the lock.
        self._closed_jobs: deque[Callable[[], None]] = deque()
        held(self)

    def __repr__(self) -> str:
        return f"<Buffer {self.name} {self.size} bytes>"

    def drop_in_child(self) -> None:
        """In a forked child (see :func:`dask_shm.names.held`): unmap (the
        mmap object goes with its last view, closing its own descriptor)."""
        if self._fd >= 0:
            close_quietly(self._fd)
            self._fd = -1
        self.view = None
        self._outboxes = set()
        self._closed_jobs.clear()
        self._lock = threading.Lock()  # perhaps held by a thread the child lacks

    def fill(self) -> None:
        """Reserve, map and fault in every page (blocking: ~0.6 ms per MiB
        here; run it off the event loop).

        Raises
        ------
        ShmFull
            If the directory has no room; nothing is reserved then.
        OSError
            If the kernel refuses the memory or the mapping (a memory
            cgroup, ``vm.max_map_count``); nothing is reserved either.
        """
        free, _ = self.directory.free_space()
        if free < self.size:  # fail before filling the tmpfs for everyone else
            raise self.directory.full(errno.ENOSPC, self.name, self.size)
        try:
            os.posix_fallocate(self._fd, 0, self.size)
            mapping = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED)
        except OSError as e:
            os.ftruncate(self._fd, 0)  # give back what was reserved
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.directory.full(e.errno, self.name, self.size) from e
            raise
        try:
            mapping.madvise(_MADV_POPULATE_WRITE, 0, self.size)
        except OSError:
            np.frombuffer(mapping, dtype=np.uint8)[::_PAGE] = 0
        # The mmap object keeps a descriptor of its own.
        os.close(self._fd)
        self._fd = -1
        self.view = np.frombuffer(mapping, dtype=np.uint8)

    def write(self, offset: int, pieces: Sequence[memoryview]) -> None:
        """Copy ``pieces`` (byte views) one after the other into the region
        at ``offset``, which :meth:`place` gave.  Blocking; safe in any
        thread."""
        try:
            view = self.view
            if view is None:  # destroyed: nobody will read the region
                return
            at = offset
            for piece in pieces:
                n = piece.nbytes
                np.copyto(view[at : at + n], np.frombuffer(piece, dtype=np.uint8))
                at += n
        finally:
            self.written(offset)

    def written(self, offset: int) -> None:
        """The write into the region at ``offset`` has ended (:meth:`write`
        says so itself); if its receiver hung up meanwhile, free it now."""
        with self._lock:
            if self._writing.pop(offset, False):
                self._free(offset)

    def destroy(self) -> None:
        """Unlink the file and close every link's release pipe.  The mapping
        goes when its last view (a copy under way) is dropped."""
        with self._lock:  # a loop may be polling one of them meanwhile
            outboxes, self._outboxes = self._outboxes, set()
            for box in outboxes:
                box.close()
            self._closed_jobs.clear()  # the host they held is being closed
        self.directory.unlink(self.name)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.view = None

    # -- the allocator ---------------------------------------------------------

    def _find(self, n: int) -> int | None:
        """First fit: the lowest gap of ``n`` bytes.  A stream then cycles
        through the same few regions, so its receiver touches (and counts in
        its RSS) only those pages of the buffer, and they stay hot."""
        at = 0
        for start, end in self._used:
            if start - at >= n:
                break
            at = end
        if self.size - at < n:
            return None
        bisect.insort(self._used, (at, at + n))
        return at

    def _free(self, offset: int) -> None:
        if offset == PINNED:
            return
        if offset in self._writing:  # another link could be given it now
            self._writing[offset] = True
            return
        i = bisect.bisect_left(self._used, (offset, -1))
        if i < len(self._used) and self._used[i][0] == offset:
            del self._used[i]

    def in_use(self) -> int:
        """Bytes in regions not yet released."""
        with self._lock:
            return sum(end - start for start, end in self._used)

    def place(self, box: Outbox, n: int) -> int | None:
        """Allocate a region of ``n`` bytes for a message on ``box``'s link;
        its offset, or None if there is no room now.  Frees what receivers
        released first.  The region is being written until :meth:`write`
        into it ends (or :meth:`written`): it is not freed before, even if
        its receiver hangs up, as another link could be given it."""
        n = _aligned(n)
        with self._lock:
            box.poll(self)
            if box.closed or len(box.inflight) >= PIPE_REGIONS:
                return None
            offset = self._find(n)
            if offset is None:
                for other in list(self._outboxes):
                    other.poll(self)
                offset = self._find(n)
            if offset is not None:
                box.inflight.append(offset)
                self._writing[offset] = False
        self._after_close()
        return offset

    def pin(self, box: Outbox, frames: Sequence[memoryview]) -> bool:
        """Keep a message's ``frames`` alive until the receiver has read them
        in place from this process's memory (single copy) and released them
        (one release byte).  False if ``box`` has closed (nothing would
        release them) or holds ``PIPE_REGIONS`` entries already.  (What the
        receiver releases, the loop watching the pipe frees: no poll here.)"""
        with self._lock:
            if box.closed or len(box.inflight) >= PIPE_REGIONS:
                return False
            box.inflight.append(PINNED)
            box.pinned.append(list(frames))
            return True

    async def wait(self, box: Outbox, seen: int) -> None:
        """Wait until regions of ``box`` are freed after ``seen`` (its
        ``release_count`` when a :meth:`place` failed): by its receiver's
        release, which the event loop watching the pipe reads (see
        :meth:`attach`), or by any link's poll meanwhile.  Waiters share
        one future (a stream and a closing comm may wait together)."""
        with self._lock:
            if box.release_count != seen or box.closed:
                return
            if box.loop is None:  # nothing would ever wake us
                raise RuntimeError(f"no event loop watches the release pipe of {box}")
            future = box._waiter
            if future is None:
                future = box._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(future)  # one waiter cancelled leaves the others waiting

    def _on_release(self, box: Outbox) -> None:
        """The release pipe is readable (the event loop calls this)."""
        with self._lock:
            box.poll(self)
            if box.retired:  # its comm has ended: close it once it is empty
                self._tidy()
        self._after_close()

    def attach(self, fd: int) -> Outbox:
        """The outbox of a new link whose receiver holds the write end of
        the release pipe read through ``fd``.  Called on the link's event
        loop, which watches the pipe from now until the outbox closes: what
        the receiver releases is freed as soon as it says so, with no task
        or timer per message, and the frames it read in place (the
        application's memory) go at once.  Without a running loop (tests
        driving the buffer by hand) releases are read by :meth:`place`."""
        loop = running_loop()
        box = Outbox(fd, loop, self._closed_jobs)
        with self._lock:
            self._tidy()
            self._outboxes.add(box)
        self._after_close()
        if loop is not None:
            loop.add_reader(fd, self._on_release, box)
        return box

    def retire(self, box: Outbox, then: Callable[[], None]) -> None:
        """``box``'s comm has ended; ``then`` runs once ``box`` has closed.
        What it still has in flight stays reserved until its receiver
        releases it or its end of the pipe closes (frames read in place
        stay alive: they are the receiver's only source); with nothing in
        flight it closes now.  The caller holds its use of the host until
        ``then``, so the buffer and the watched pipe outlive a comm that
        closed right after a write, until its receiver has read it."""
        with self._lock:
            first, box.retired = not box.retired, True
            now = first and box.closed  # its receiver hung up earlier
            if first and not box.closed:
                box.then = then  # queued when it closes, below or later
            self._tidy()
        if now:
            then()
        self._after_close()

    def _after_close(self) -> None:
        """Run what outboxes closed under the lock left to do (it may take
        locks, the buffer's included)."""
        run_queued(self._closed_jobs)

    def _tidy(self) -> None:
        """Poll retired outboxes, and drop those with nothing left in flight
        (the lock held).  Called whenever a link comes or goes, so their
        number stays that of receivers still copying."""
        for box in [b for b in self._outboxes if b.retired]:
            box.poll(self)
            if not box.inflight:
                box.close()
            if box.closed:
                self._outboxes.discard(box)


def run_queued(jobs: deque[Callable[[], None]]) -> None:
    """Run and remove the jobs in ``jobs``, which other threads may be
    running too (each job runs once)."""
    while jobs:
        try:
            job = jobs.popleft()
        except IndexError:  # another thread took it
            return
        job()
