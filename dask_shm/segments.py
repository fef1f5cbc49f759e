"""Shared-memory segments: names, creation, hand-over, take-over and cleanup.

Who creates, who owns, who unlinks
----------------------------------
A segment is a regular file in the shm directory (``dask-shm.directory``,
normally the tmpfs ``/dev/shm``).  Its *name* says which process is
responsible for it::

    dask-shm-<pid>-<start time>-<pid namespace>-<kind>-<128 random bits>

``kind`` is ``s`` for data segments, ``f`` for free (parked) ones and ``p``
for handshake probes.  The start
time (from ``/proc/<pid>/stat``) makes the name survive pid reuse; the random
part makes it unguessable.  Responsibility moves with the name:

1. **Create.**  A sender creates segments itself: ``O_CREAT | O_EXCL``, mode
   0600, space reserved with ``posix_fallocate`` before the first byte is
   written (a full tmpfs then fails with ENOSPC instead of SIGBUS later), then
   mapped and pre-faulted.  It keeps idle ones in its pool (``pool.py``).
2. **Hand over.**  To send a frame the sender copies it into a pooled segment,
   *unmaps* it (its RSS stops counting those pages: data is counted once;
   large mappings are torn down by a helper thread once the descriptor has
   been written) and sends the name in a descriptor.  The file still carries the sender's name:
   until it is taken over, the sender is responsible for it.
3. **Take over.**  The receiver renames the file to a fresh name of its own.
   ``rename`` is atomic, so exactly one of "receiver takes over" and "sender
   cleans up" wins.  Then it opens, checks and maps the file.
4. **Release.**  The receiver's buffers are views of one exporter object per
   segment; when the last view dies the segment goes back to *its* pool (it
   is mapped already, so the next send from this process is fast) or is
   *parked*: unmapped and renamed to a free (``f``) name of its own, still
   responsible for it, so that any of our processes can *claim* its already
   allocated pages by renaming it to its own name (claiming costs a page-table
   fill, creating costs allocating and zeroing every page).  Parked segments
   nobody claims are unlinked by their parker when idle.  Mappings are never
   ``close()``-d while exported; reference counting unmaps them.
5. **Forward.**  A relay (the scheduler, which reads without deserializing
   and passes frames on) hands a segment it took over on to the next
   receiver as it is, instead of copying it: it sends its own name for it and
   from then on only unmaps it when its last view dies; the next receiver
   renames it as in 3.  A frame is forwarded once; a second forward copies.
6. **Exit.**  A process unlinks every segment it is responsible for at exit
   (``atexit``, and multiprocessing's finalizers for forked children that
   leave through ``os._exit``), then sweeps orphans (below).

What a crash leaves behind, and who removes it
----------------------------------------------
- ``kill -9`` of a sender: its pooled segments and whatever it handed over
  that was not taken over yet, all named with its pid.  A receiver that still
  reads the descriptor may take the file over (the data is intact).
- ``kill -9`` of a receiver: everything it took over, named with its pid.
- An aborted comm: the sender unlinks what is still in flight at once; a comm
  closed gracefully does so after a grace period (the peer may still read).

Orphans are removed by the janitor (:func:`sweep`), which unlinks a file only
when its owner is provably dead: ``/proc/<pid>/stat`` is gone, shows a zombie,
or shows another start time (the pid was reused).  Files of another pid
namespace are never judged.  The janitor runs when a process first uses the
directory, when a comm loses its peer, periodically from the pool's
housekeeping thread, when a process exits (a Nanny outlives the worker it had
to kill), and on ``dask shm sweep``.

Python's ``multiprocessing.shared_memory`` is deliberately not used: before
3.13 its resource tracker registers even an attaching process and unlinks the
segment when that process exits.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import multiprocessing.util
import os
import queue
import re
import secrets
import stat
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

__all__ = [
    "PREFIX",
    "ShmError",
    "ShmFull",
    "DescriptorError",
    "SegmentMissing",
    "Owner",
    "current_owner",
    "ShmDirectory",
    "Segment",
    "SegmentInfo",
    "drain_unmaps",
    "unmap_later",
    "parse_name",
    "check_name",
    "create_probe",
    "read_probe",
    "list_segments",
    "list_parked",
    "sweep",
    "owned_names",
    "warn_full_once",
]

logger = logging.getLogger(__name__)

#: Every file we create starts with this; nothing else is ever opened.
PREFIX = "dask-shm-"

_NAME_RE = re.compile(
    r"dask-shm-(?P<pid>[0-9]{1,10})-(?P<start>[0-9]{1,20})-(?P<ns>[0-9]{1,20})"
    r"-(?P<kind>[psf])-(?P<token>[0-9a-f]{32})"
)
#: Longest valid name; anything longer is refused before a regex runs.
MAX_NAME_LENGTH = 9 + 10 + 1 + 20 + 1 + 20 + 3 + 32

#: Owner-only permissions: another user on the host can neither read our data
#: nor pass our probe (and so falls back to TCP).
MODE = 0o600

# Linux 5.14+; older kernels answer EINVAL and we fault pages in by touching.
# A read-populate suffices: shared tmpfs mappings need no write notification,
# so the entries it installs are writable (and it is 3x cheaper here).
_MADV_POPULATE_READ = 22
_PAGE = mmap.PAGESIZE
#: Step of a paced :meth:`Segment.create`: ~27 ms of kernel time here.
CREATE_STEP = 32 << 20


class ShmError(Exception):
    """Base class of dask-shm's errors."""


class ShmFull(ShmError, OSError):
    """The shm directory has no room for a segment (ENOSPC)."""


class DescriptorError(ShmError, ValueError):
    """A descriptor received from a peer is invalid; nothing was opened."""


class SegmentMissing(ShmError, FileNotFoundError):
    """A segment named by a peer no longer exists (its sender cleaned up)."""


# --------------------------------------------------------------------------
# Process identity


@dataclass(frozen=True)
class Owner:
    """The process responsible for a segment, as written in its name."""

    pid: int
    start: int
    ns: int

    def alive(self) -> bool:
        """Whether this process still runs; True when we cannot tell."""
        if self.ns != _current_owner().ns:
            return True  # another pid namespace: its pids mean nothing here
        info = _proc_stat(self.pid)
        if info is None:
            return False
        state, start = info
        return state not in ("Z", "X") and start == self.start

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.pid, self.start, self.ns)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", -1)  # exists but unreadable: treat as alive elsewhere
    # The command name (field 2) may contain spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


_owner_cache: tuple[int, Owner] | None = None


def _current_owner() -> Owner:
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:
        info = _proc_stat(pid)
        start = info[1] if info else 0
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            ns = 0
        _owner_cache = (pid, Owner(pid, start, ns))
    return _owner_cache[1]


def current_owner() -> Owner:
    """The identity of this process, as written into the names it creates."""
    return _current_owner()


def new_name(kind: str) -> str:
    """A fresh, unguessable segment name owned by this process."""
    o = _current_owner()
    return f"{PREFIX}{o.pid}-{o.start}-{o.ns}-{kind}-{secrets.token_hex(16)}"


def parse_name(name: str) -> tuple[Owner, str]:
    """Split a segment name into (owner, kind).

    Raises
    ------
    DescriptorError
        If ``name`` is not one of our names (wrong prefix, path separators,
        anything but the exact pattern).
    """
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
        raise DescriptorError(f"not a dask-shm segment name: {name!r:.100}")
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise DescriptorError(f"not a dask-shm segment name: {name!r}")
    owner = Owner(int(m["pid"]), int(m["start"]), int(m["ns"]))
    return owner, m["kind"]


def check_name(name: str, owner: Owner, kind: str) -> None:
    """Refuse ``name`` unless it is a ``kind`` segment owned by ``owner``."""
    got_owner, got_kind = parse_name(name)
    if got_owner != owner or got_kind != kind:
        raise DescriptorError(
            f"segment {name!r} does not belong to the peer "
            f"(pid {owner.pid}) or is not a {'probe' if kind == 'p' else 'data'} segment"
        )


# --------------------------------------------------------------------------
# The directory


class ShmDirectory:
    """An open handle on the shm directory; every file access goes through it.

    All opens, renames and unlinks are relative to this directory's file
    descriptor with names that passed :func:`parse_name`, so nothing outside
    it is ever touched.
    """

    _cache: dict[tuple[int, str], ShmDirectory] = {}
    _lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @classmethod
    def get(cls, path: str) -> ShmDirectory:
        """The handle for ``path`` in this process (opened once per process)."""
        key = (os.getpid(), path)
        with cls._lock:
            d = cls._cache.get(key)
            if d is None:
                d = cls._cache[key] = cls(path)
                _ensure_exit_cleanup()
                threading.Thread(
                    target=_quiet_sweep, args=(d,), name="dask-shm-sweep", daemon=True
                ).start()
            return d

    @staticmethod
    def unusable_reason(path: str) -> str | None:
        """Why ``path`` cannot hold segments on this machine, or None."""
        if not sys.platform.startswith("linux"):
            return f"shared memory needs Linux (this is {sys.platform})"
        if not os.path.isdir(path):
            return f"{path} does not exist"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by uid {os.geteuid()}"
        return None

    def free_space(self) -> tuple[int, int]:
        """(free, total) bytes in the directory's filesystem."""
        st = os.statvfs(self.fd)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def describe_space(self) -> str:
        free, total = self.free_space()
        return f"{_fmt(free)} free of {_fmt(total)} in {self.path}"

    def unlink(self, name: str) -> bool:
        """Unlink ``name``; False if it was gone already.

        Something other than a file planted under one of our names (a
        directory) is removed if empty and otherwise left alone with a
        warning: never an exception, so a janitor or a comm's cleanup always
        gets through.
        """
        try:
            os.unlink(name, dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False
        except (IsADirectoryError, PermissionError):  # Linux says EISDIR or EPERM
            try:
                os.rmdir(name, dir_fd=self.fd)
                return True
            except OSError as e:
                logger.warning("dask-shm: cannot remove %s from %s: %s", name, self.path, e)
                return False
        finally:
            _forget_owned(self, name)

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists; if not, this process is no longer
        responsible for it (a peer renamed it away)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            _forget_owned(self, name)
            return False


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# --------------------------------------------------------------------------
# What this process is responsible for (unlinked at exit)

_owned: dict[str, ShmDirectory] = {}
_owned_lock = threading.Lock()
_exit_registered = False


_exiting = False


def _own(directory: ShmDirectory, name: str) -> None:
    with _owned_lock:
        if not _exiting:
            _owned[name] = directory
            return
    # A background thread created a file after exit cleanup ran.
    os.unlink(name, dir_fd=directory.fd)
    raise ShmError("interpreter is exiting")


def _forget_owned(directory: ShmDirectory, name: str) -> None:
    with _owned_lock:
        _owned.pop(name, None)


def owned_names() -> list[str]:
    """Names of the files this process is currently responsible for."""
    with _owned_lock:
        return list(_owned)


def _cleanup_at_exit() -> None:
    global _exiting
    with _owned_lock:
        _exiting = True
        items = list(_owned.items())
        _owned.clear()
    for name, directory in items:
        try:
            os.unlink(name, dir_fd=directory.fd)
        except OSError:
            pass
    # Also remove what dead processes left: a Nanny exits right after killing
    # a worker that was slow to close, and nothing else may run here again.
    for d in list(ShmDirectory._cache.values()):
        _quiet_sweep(d)


def _ensure_exit_cleanup() -> None:
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_cleanup_at_exit)
        # Spawned multiprocessing children leave through os._exit, skipping
        # atexit; multiprocessing runs its own finalizers first.
        multiprocessing.util.Finalize(None, _cleanup_at_exit, exitpriority=100)


def _after_fork_in_child() -> None:
    # The child is not responsible for its parent's files.
    global _exit_registered
    with _owned_lock:
        _owned.clear()
    ShmDirectory._cache.clear()
    _exit_registered = False
    _unmapper.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------
# Deferred unmapping

#: Mappings at least this large are unmapped by a helper thread once the
#: message that handed them over has been written: tearing down the page
#: tables of 400 MB of touched pages takes ~32 ms here, as long as copying the
#: data in.  It must not start earlier: while it runs it holds this process's
#: mmap lock, and the event loop stalls on its next page fault or malloc
#: (measured: the envelope's write then took as long as the munmap).
DEFER_UNMAP = 8 << 20


class _Unmapper:
    """One daemon thread per process that closes handed-over mappings."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._queue: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._pending = 0

    def submit(self, mapping: mmap.mmap) -> None:
        with self._cond:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dask-shm-unmapper", daemon=True
                )
                self._thread.start()
        self._queue.put(mapping)

    def _run(self) -> None:
        while True:
            mapping = self._queue.get()
            try:
                mapping.close()
            except BufferError:  # a view leaked: a bug; refcounting unmaps it later
                logger.error("dask-shm: a handed-over mapping still had views")
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every deferred mapping is closed (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)


_unmapper = _Unmapper()
drain_unmaps = _unmapper.drain


def unmap_later(mappings: list[mmap.mmap]) -> None:
    """Have the helper thread close ``mappings`` (see :data:`DEFER_UNMAP`)."""
    for m in mappings:
        _unmapper.submit(m)


# --------------------------------------------------------------------------
# Segments


class Segment:
    """A data segment this process is responsible for, usually mapped.

    Parameters
    ----------
    directory
        Where the file lives.
    name
        Its current name (always one of ours).
    size
        Its size in bytes (the capacity; frames may use less).
    mapping
        The read-write shared mapping, or None once handed over.
    """

    __slots__ = ("directory", "name", "size", "mapping", "last_used", "forwarded", "__weakref__")

    def __init__(
        self, directory: ShmDirectory, name: str, size: int, mapping: mmap.mmap | None
    ) -> None:
        self.directory = directory
        self.name = name
        self.size = size
        self.mapping = mapping
        self.last_used = 0.0
        #: Handed on by a relay while its views were alive: the file is the
        #: next receiver's to take; ours only to unmap (see :func:`forwardable`).
        self.forwarded = False

    def __repr__(self) -> str:
        return f"<Segment {self.name} {_fmt(self.size)}>"

    @classmethod
    def create(
        cls,
        directory: ShmDirectory,
        size: int,
        pace: Callable[[], None] | None = None,
    ) -> Segment:
        """Create, reserve, map and pre-fault a new segment of ``size`` bytes.

        With ``pace``, do it in steps of :data:`CREATE_STEP` bytes and call
        ``pace()`` before each (it may wait): fresh pages cost ~0.85 ms of
        kernel time per MB here, and a warm-up should yield to transfers.
        Every byte is reserved before it is mapped in, either way.

        Raises
        ------
        ShmFull
            If the directory has no room (nothing is left behind).
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        name = new_name("s")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, MODE, dir_fd=directory.fd)
        _own(directory, name)
        mapping = None
        try:
            if pace is None:
                _reserve(fd, 0, size, name, directory)
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
            else:
                # Reserved step by step, so fail at once if it cannot all fit:
                # a directory left full for the whole creation would refuse
                # everyone else's probes and segments meanwhile.
                if directory.free_space()[0] < size:
                    raise _full(errno.ENOSPC, name, size, directory)
                os.ftruncate(fd, size)  # sparse: nothing touches it until reserved
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
                for offset in range(0, size, CREATE_STEP):
                    pace()
                    n = min(CREATE_STEP, size - offset)
                    _reserve(fd, offset, n, name, directory, size)
                    _populate(mapping, offset, n)
        except BaseException:
            if mapping is not None:
                mapping.close()
            directory.unlink(name)
            raise
        finally:
            os.close(fd)
        return cls(directory, name, size, mapping)

    @classmethod
    def take_over(
        cls,
        directory: ShmDirectory,
        name: str,
        owner: Owner,
        needed: int,
    ) -> Segment:
        """Take responsibility for a segment a peer handed over, and map it.

        ``name`` must be a data segment of ``owner`` (checked before anything
        is touched); ``needed`` is the number of bytes the descriptor uses
        (checked against the real, fully allocated size before mapping).

        Raises
        ------
        DescriptorError
            If the name, the file or its size is not acceptable.
        SegmentMissing
            If the file is gone (the sender aborted, or a janitor ran).
        """
        check_name(name, owner, "s")
        return cls._adopt(directory, name, needed, populate=False)

    @classmethod
    def _adopt(
        cls, directory: ShmDirectory, name: str, needed: int, *, populate: bool
    ) -> Segment:
        """Rename ``name`` to a fresh name of ours (the atomic take-over), then
        open, check and map it; on any failure nothing of it is kept."""
        mine = new_name("s")
        try:
            os.rename(name, mine, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except FileNotFoundError as e:
            raise SegmentMissing(
                errno.ENOENT,
                f"segment {name} does not exist in {directory.path} "
                "(its sender cleaned it up or was killed, or another process took it)",
            ) from e
        _own(directory, mine)
        try:
            fd = os.open(mine, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
        except OSError as e:
            directory.unlink(mine)
            raise DescriptorError(f"cannot open segment {name} taken over as {mine}: {e}") from e
        try:
            st = os.fstat(fd)
            problem = _check_file(st, needed)
            if problem:
                raise DescriptorError(f"refusing segment {name}: {problem}")
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
            mapping = mmap.mmap(fd, st.st_size, flags=flags)
        except BaseException:
            directory.unlink(mine)
            raise
        finally:
            os.close(fd)
        return cls(directory, mine, st.st_size, mapping)

    def park(self) -> str:
        """Unmap and rename to a free name of ours; return that name.

        The pages stay allocated for a later :meth:`claim` by any process.
        Safe to call from a release callback: the mapping is dropped, not
        closed, and unmapped once its last view is gone.
        """
        free = new_name("f")
        os.rename(self.name, free, src_dir_fd=self.directory.fd, dst_dir_fd=self.directory.fd)
        _forget_owned(self.directory, self.name)
        _own(self.directory, free)
        self.name, self.mapping = free, None
        return free

    @classmethod
    def claim(cls, directory: ShmDirectory, name: str) -> Segment | None:
        """Take a parked segment (any owner of our uid) and map it pre-faulted;
        None if another process claimed it first or it is not acceptable."""
        if parse_name(name)[1] != "f":
            raise DescriptorError(f"{name} is not a free segment")
        try:
            return cls._adopt(directory, name, 1, populate=True)
        except (SegmentMissing, DescriptorError):
            return None  # lost the race, or not acceptable: fine

    def prefault(self) -> None:
        """Install page-table entries for the whole mapping in one call, so
        writes into it do not fault page by page."""
        assert self.mapping is not None
        _populate(self.mapping, 0, len(self.mapping))

    def hand_over(self, unmap_later: list[mmap.mmap] | None = None) -> str:
        """Unmap (the receiver will own these pages) and return the name to send.

        A large mapping is appended to ``unmap_later`` instead, if given: the
        caller passes those to :func:`unmap_later` once the descriptor is
        written (nothing of ours writes to them any more).  The file stays;
        this process remains responsible for it until the receiver renames it.
        """
        mapping, self.mapping = self.mapping, None
        assert mapping is not None
        if unmap_later is not None and len(mapping) >= DEFER_UNMAP:
            unmap_later.append(mapping)
        else:
            mapping.close()  # BufferError here would mean a view leaked: a bug
        return self.name

    def export(
        self, on_release: Callable[[Segment], None], *, relay: bool = False
    ) -> memoryview:
        """A writeable view of the whole segment; ``on_release(self)`` runs when
        the last view derived from it dies (in whichever thread drops it).

        ``relay``: this process only forwards what it receives (it never
        deserializes it), so a frame of this segment may later be handed on
        to the next receiver as it is (:func:`forwardable`) instead of copied.
        """
        assert self.mapping is not None
        base = np.frombuffer(self.mapping, dtype=np.uint8)
        key = id(base)
        if relay:
            with _exports_lock:
                _exports[key] = (weakref.ref(base), self)
        fin = weakref.finalize(base, _released, self, key, on_release)
        fin.atexit = False  # exit cleanup unlinks files; don't recycle then
        return memoryview(base)  # type: ignore[arg-type]  # numpy's stubs lag the buffer protocol

    def forward(self) -> str:
        """Hand this (received, still mapped) segment on to another receiver
        without copying; return the name to send.  Our mapping goes when our
        last view dies; until the next receiver renames the file we remain
        responsible for it, exactly as after :meth:`hand_over`."""
        self.forwarded = True
        return self.name

    def destroy(self) -> None:
        """Unlink the file and drop our mapping (unmapped once no view uses it)."""
        self.directory.unlink(self.name)
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # still exported (release callback): refcounting unmaps it


#: Segments exported by relay processes, by the id of their exporter array
#: (the object a received frame's memoryview refers to).
_exports: dict[int, tuple[weakref.ref[np.ndarray], Segment]] = {}
_exports_lock = threading.Lock()


def _released(seg: Segment, key: int, on_release: Callable[[Segment], None]) -> None:
    with _exports_lock:
        entry = _exports.get(key)
        if entry is not None and entry[1] is seg:
            del _exports[key]
    if seg.forwarded:
        seg.mapping = None  # the views are gone, so refcounting unmaps it;
        return  # the file is the next receiver's (or our InFlight's to remove)
    on_release(seg)


def forwardable(frame: memoryview) -> tuple[Segment, int] | None:
    """The segment a relay received ``frame`` in, and the frame's offset in
    it, if the frame can be handed on as it is: it is a view of a segment
    exported with ``relay=True`` that was not forwarded already (a second
    forward copies, so no two receivers ever share pages)."""
    base = frame.obj
    if not isinstance(base, np.ndarray):
        return None
    with _exports_lock:
        entry = _exports.get(id(base))
    if entry is None or entry[0]() is not base:
        return None
    seg = entry[1]
    if seg.forwarded or seg.mapping is None or not frame.c_contiguous:
        return None
    offset = np.frombuffer(frame, dtype=np.uint8).ctypes.data - base.ctypes.data
    if offset < 0 or offset + frame.nbytes > seg.size:
        return None
    return seg, offset


_full_warned = False


def warn_full_once(exc: ShmFull) -> None:
    """Log a full directory once per process (the fallback is counted in
    :mod:`dask_shm.stats` every time)."""
    global _full_warned
    with _owned_lock:
        if _full_warned:
            return
        _full_warned = True
    logger.warning("dask-shm: %s (shown once per process)", exc.strerror)


def _check_file(st: os.stat_result, needed: int) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"permissions {oct(st.st_mode & 0o777)} are not owner-only"
    if st.st_nlink != 1:
        return f"{st.st_nlink} hard links"
    if st.st_size < needed:
        return f"its size {st.st_size} is less than the {needed} bytes described"
    # Fully reserved (sender used posix_fallocate)? A sparse file could SIGBUS
    # us on first touch if the tmpfs filled up meanwhile.
    if st.st_blocks * 512 < st.st_size:
        return f"only {st.st_blocks * 512} of its {st.st_size} bytes are allocated"
    return None


def _full(code: int, name: str, size: int, directory: ShmDirectory) -> ShmFull:
    return ShmFull(
        code,
        f"cannot reserve {_fmt(size)} for segment {name}: "
        f"{directory.describe_space()}. Give the shared-memory "
        "directory more room (e.g. `docker run --shm-size=4g`, or "
        "`mount -o remount,size=... /dev/shm`), or point "
        "dask-shm.directory at a larger tmpfs; meanwhile large "
        "frames travel over TCP.",
    )


def _reserve(
    fd: int, offset: int, n: int, name: str, directory: ShmDirectory, size: int | None = None
) -> None:
    """``posix_fallocate``, with ENOSPC as a :class:`ShmFull` naming the remedy."""
    try:
        os.posix_fallocate(fd, offset, n)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _full(e.errno, name, size or n, directory) from e
        raise


def _populate(mapping: mmap.mmap, offset: int, n: int) -> None:
    """Install page-table entries for ``n`` reserved bytes at ``offset``."""
    try:
        mapping.madvise(_MADV_POPULATE_READ, offset, n)
    except OSError:  # kernel < 5.14: touch one byte per page instead
        np.frombuffer(mapping, dtype=np.uint8, count=n, offset=offset)[::_PAGE].sum()


try:
    _MAP_POPULATE = mmap.MAP_POPULATE
except AttributeError:  # pragma: no cover - not Linux
    _MAP_POPULATE = 0


# --------------------------------------------------------------------------
# Handshake probes


def create_probe(directory: ShmDirectory) -> tuple[str, str]:
    """Create a probe file holding a random token; return (name, token)."""
    name = new_name("p")
    token = secrets.token_hex(16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, MODE, dir_fd=directory.fd)
    _own(directory, name)
    try:
        os.write(fd, token.encode())
    except BaseException as e:
        directory.unlink(name)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _full(e.errno, name, len(token), directory) from e
        raise
    finally:
        os.close(fd)
    return name, token


def read_probe(directory: ShmDirectory, name: str, owner: Owner) -> str | None:
    """The token in a peer's probe, or None if we cannot read it (with why
    logged at debug level): then we do not share the directory with it."""
    try:
        check_name(name, owner, "p")
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except (OSError, DescriptorError) as e:
        logger.debug("cannot read probe %r in %s: %s", name, directory.path, e)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            logger.debug("probe %r is not a regular file of ours", name)
            return None
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    token = data.decode("ascii", "replace")
    return token if re.fullmatch(r"[0-9a-f]{32}", token) else None


# --------------------------------------------------------------------------
# The janitor


@dataclass(frozen=True)
class SegmentInfo:
    """One of our files in the directory, as the janitor sees it."""

    name: str
    owner: Owner
    kind: str
    size: int
    alive: bool


def _scan(directory: ShmDirectory) -> Iterator[tuple[str, Owner, str]]:
    for entry in os.scandir(directory.path):
        if not entry.name.startswith(PREFIX):
            continue
        try:
            owner, kind = parse_name(entry.name)
        except DescriptorError:
            continue
        yield entry.name, owner, kind


def list_segments(directory: ShmDirectory) -> list[SegmentInfo]:
    """All our files in ``directory`` with their owner and whether it lives."""
    out = []
    alive: dict[Owner, bool] = {}
    for name, owner, kind in _scan(directory):
        if owner not in alive:
            alive[owner] = owner.alive()
        try:
            size = os.stat(name, dir_fd=directory.fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        out.append(SegmentInfo(name, owner, kind, size, alive[owner]))
    return out


def list_parked(directory: ShmDirectory) -> list[tuple[str, int]]:
    """(name, size) of every parked segment in ``directory``, any owner."""
    out = []
    for name, _owner, kind in _scan(directory):
        if kind == "f":
            try:
                out.append((name, os.stat(name, dir_fd=directory.fd, follow_symlinks=False).st_size))
            except FileNotFoundError:
                pass
    return out


def sweep(
    directory: ShmDirectory, *, owner: Owner | None = None, dry_run: bool = False
) -> list[SegmentInfo]:
    """Remove files whose owner process is dead; return what was (or would be)
    removed.  With ``owner``, only that process's files are considered."""
    removed = []
    for info in list_segments(directory):
        if info.alive or (owner is not None and info.owner != owner):
            continue
        if dry_run or directory.unlink(info.name):
            removed.append(info)
    if removed and not dry_run:
        logger.info(
            "removed %d orphaned segment(s), %s, in %s",
            len(removed),
            _fmt(sum(i.size for i in removed)),
            directory.path,
        )
    return removed


def _quiet_sweep(directory: ShmDirectory, owner: Owner | None = None) -> None:
    try:
        sweep(directory, owner=owner)
    except Exception:  # never let housekeeping kill anything
        logger.debug("sweep of %s failed", directory.path, exc_info=True)
