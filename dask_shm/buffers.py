"""Shared buffers and their lifetime.

This module is the buffer; what receivers have not released yet is
:mod:`dask_shm.outbox`, the release channel :mod:`dask_shm.release`, the
receiving side :mod:`dask_shm.inbox`, and a process's bookkeeping (who
uses its shared memory, and when it goes) :mod:`dask_shm.host`.  The
lifetime below is that of all of them.

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
    through the link's release channel; nothing of them lives in shared
    memory, and a process needs no buffer for it (``buffer-size: 0``).

Who may write and read it
    Only the owner writes into its buffer.  To send, it allocates a region,
    copies a piece of the message into it and sends the region's offset and
    length over the comm's TCP stream.  A receiver maps the sender's buffer
    read-only once and keeps the mapping (one per peer buffer, shared by all
    comms to that peer), copies the region out into ordinary memory
    (``numpy.empty``, as distributed's TCP read does) and releases it.

When it is released
    Every link has a *release channel*: a Unix stream socket between its
    two ends, in the abstract namespace (no file), set up during the
    handshake.  A receiver writes one byte per region once it has copied it
    out; the sender's event loop watches the socket and frees those
    regions, in the order it sent them, as the bytes arrive.  When the
    receiver is done (its comm closed with no copy in flight: it shuts its
    direction down; or its process died) the sender reads end-of-file and
    frees all that link held; a forked child's copy of the socket does not
    delay that.  Nothing is freed on a
    timer.  A comm that closes keeps its link's regions and frames read in
    place, and its channel watched, until its receiver releases them or hangs
    up: a message written just before a close is still delivered.  The
    buffer itself is unmapped and unlinked once the last ``shm://`` comm of
    the process has closed and been released so, and at exit; a receiver
    still copying from it keeps its pages through its own mapping.

What a crash leaves behind
    - ``kill -9`` of a sender: its buffer file and its probe, both named
      with its identity.  The janitor
      (:mod:`dask_shm.janitor`) removes them once it can prove the process
      dead: when a peer's link to it ends, when a handshake with it breaks
      off, or when any process opens the directory; a receiver's mapping
      keeps the pages it may still be reading.
    - ``kill -9`` of a receiver: nothing named.  The kernel closes its end of
      the release channels, and each sender frees that link's regions.
    - A comm closed or aborted in the middle of a message: the receiver
      ends its direction of the release channel only once a copy under way has
      finished, so the sender never overwrites a region still being read.

Working set
    A process's RSS includes its own buffer once (``buffer-size``) and the
    pages of peers' buffers it has copied out of (at most ``buffer-size`` per
    peer it receives from, shared with that peer).  Received data lives in
    private memory and is counted once, where it lives.

Notes
-----
**Memory ordering.**  The release channel orders a receiver's reads before
the sender's next writes on every architecture Linux runs on, x86-64 (TSO)
and aarch64 (weakly ordered) alike, with no barrier instruction needed in
Python: the receiver finishes its copy before it calls send(2) on the
socket; the kernel queues the byte under the receiving queue's lock, whose
release orders all the calling CPU's earlier loads and stores before it;
the sender's recv(2) acquires the same lock before it returns the byte, and
the sender writes into the region only after that.  The other direction is the
same argument through the TCP socket's lock: the receiver learns of a
region only from a descriptor sent after the sender's copy.
"""


from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import mmap
import os
import weakref
from collections.abc import Sequence

import numpy as np

from dask_shm.names import MODE, Directory, close_quietly, held, new_name, own
from dask_shm.outbox import PINNED, Outbox, Outboxes
from dask_shm.release import WINDOW

__all__ = ["Buffer", "ALIGN", "map_shared"]

logger = logging.getLogger(__name__)

#: Regions start on cache-line boundaries, so copies into them are aligned.
ALIGN = 64
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels: touch each page
_PAGE = mmap.PAGESIZE


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_shared(fd: int, size: int, *, writable: bool) -> np.ndarray:
    """The first ``size`` bytes of ``fd``, mapped shared, as a byte array
    (read-only unless ``writable``), unmapped once its last view is gone.
    Unlike :class:`mmap.mmap`, which keeps a duplicate descriptor for as
    long as it lives, the mapping holds no descriptor: a process with many
    peers would otherwise hold one per peer for nothing.

    Raises
    ------
    OSError
        If the kernel refuses the mapping.
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    raw = (ctypes.c_char * size).from_address(address)
    # Not at exit: a thread may still read a view then; the kernel unmaps.
    weakref.finalize(raw, _libc.munmap, address, size).atexit = False
    memory = memoryview(raw) if writable else memoryview(raw).toreadonly()
    return np.frombuffer(memory, dtype=np.uint8)  # keeps ``raw`` alive


class Buffer:
    """This process's shared buffer, and the regions in flight in it.

    All methods may be called from any thread; the lock of the host's
    :class:`Outboxes` guards the allocator (a region is freed while an
    outbox is polled).  Never called from a finalizer.
    """

    def __init__(self, directory: Directory, size: int, outboxes: Outboxes | None = None) -> None:
        self.directory = directory
        self.size = size
        self.name = new_name("b")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.name, flags, MODE, dir_fd=directory.fd)
        own(directory, self.name)
        #: The mapping as bytes, once :meth:`fill` has run.
        self.view: np.ndarray | None = None
        self._outboxes = outboxes = outboxes if outboxes is not None else Outboxes()
        self._lock = outboxes.lock
        outboxes.free = self._free
        self._used: list[tuple[int, int]] = []  # (offset, end), sorted
        #: Regions :meth:`place` gave whose :meth:`write` has not ended, and
        #: whether they were freed meanwhile (their receiver hung up): then
        #: freed when the write ends, never under it.
        self._writing: dict[int, bool] = {}
        held(self)

    def __repr__(self) -> str:
        return f"<Buffer {self.name} {self.size} bytes>"

    def drop_in_child(self) -> None:
        """In a forked child (see :func:`dask_shm.names.held`): unmap (with
        the last view)."""
        if self._fd >= 0:
            close_quietly(self._fd)
            self._fd = -1
        self.view = None

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
            view = map_shared(self._fd, self.size, writable=True)
        except OSError as e:
            os.ftruncate(self._fd, 0)  # give back what was reserved
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.directory.full(e.errno, self.name, self.size) from e
            raise
        if _libc.madvise(view.ctypes.data, self.size, _MADV_POPULATE_WRITE) != 0:
            view[::_PAGE] = 0  # an older kernel: touch each page
        os.close(self._fd)  # the mapping needs no descriptor
        self._fd = -1
        self.view = view

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
        """Unlink the file (the host closed every outbox first).  The
        mapping goes when its last view (a copy under way) is dropped."""
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
            box.poll(self._free)
            if box.closed or len(box.inflight) >= WINDOW:
                return None
            offset = self._find(n)
            if offset is None:
                self._outboxes.poll_all()
                offset = self._find(n)
            if offset is not None:
                box.inflight.append(offset)
                self._writing[offset] = False
        self._outboxes.after_close()
        return offset
