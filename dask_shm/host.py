"""A process's shared memory in one directory, and who uses it.

Every handshake and every link holds the :class:`Host` of its directory; the
last to let go unlinks this process's buffer and unmaps the peers' (see
:mod:`dask_shm.buffers` for the whole lifetime).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import re
import secrets
import stat
import threading
from collections import deque
from collections.abc import Callable

from dask_shm import stats
from dask_shm.buffers import Buffer
from dask_shm.errors import DescriptorError, ShmFull
from dask_shm.inbox import Inbox, PeerBuffer
from dask_shm.janitor import quiet_sweep
from dask_shm.names import MODE, Directory, Owner, check_name, new_name, own
from dask_shm.outbox import Outboxes, run_queued

__all__ = ["Host", "info", "later", "warn_once", "create_probe", "read_probe"]

logger = logging.getLogger(__name__)


class Host:
    """This process's shared memory in one directory: the directory handle,
    its buffer, the peers' buffers it has mapped, and how many handshakes
    and links use them.  The last user to leave tears everything down."""

    _hosts: dict[str, Host] = {}
    _lock = threading.Lock()
    #: Work from finalizers, which must not take locks: done by the next
    #: :meth:`acquire` or :meth:`release`.
    _deferred: deque[Callable[[], None]] = deque()

    def __init__(self, path: str, buffer_size: int) -> None:
        self.path = path
        self.directory = Directory(path)
        self.users = 0
        #: The sending side of every link, with or without a buffer.
        self.outboxes = Outboxes()
        self.buffer: Buffer | None = None
        self._buffer_size = buffer_size
        #: One attempt to fill the buffer at a time (see :meth:`fill`).
        self._fill_lock = threading.Lock()
        #: An attempt is under way: :meth:`release` leaves closing to it.
        self.filling = False
        #: Its last user has left (see :meth:`release`).
        self.closed = False
        #: The kernel refused the buffer for another reason than a full
        #: directory: :meth:`fill` does not try again.
        self.refused = False
        self._peers: dict[str, PeerBuffer] = {}
        quiet_sweep(self.directory)  # orphans of processes killed earlier
        try:
            #: This process's probe: a file holding a random token, which a
            #: peer proves it shares the directory and the user by reading
            #: (see dask_shm.handshake).  One per process and directory,
            #: whatever the number of comms.
            self.probe, self.token = create_probe(self.directory)
        except BaseException:
            self.directory.close()
            raise
        #: The token again, in this process's memory: a peer that can read
        #: it there (process_vm_readv) may read our frames in place.
        self.memory = ctypes.create_string_buffer(self.token.encode("ascii"))

    @classmethod
    def acquire(cls, path: str, buffer_size: int) -> Host:
        """The host for ``path``, with one more user (opened if needed)."""
        cls._drain()
        with cls._lock:
            host = cls._hosts.get(path)
            if host is None:
                host = cls._hosts[path] = Host(path, buffer_size)
            try:
                if host.buffer is None and host._buffer_size:
                    host.buffer = Buffer(host.directory, host._buffer_size, host.outboxes)
            except BaseException:
                if not host.users:  # nobody else holds it: close it again
                    del cls._hosts[path]
                    host.directory.close()
                raise
            host.users += 1
            return host

    def release(self) -> None:
        """One user less; the last one closes everything."""
        self._drain()
        with self._lock:
            self.users -= 1
            if self.users:
                return
            if self._hosts.get(self.path) is self:
                del self._hosts[self.path]
            self.closed = True
            if self.filling:  # the thread filling the buffer closes us when done
                return
        self._close()

    def _close(self) -> None:
        with self._lock:
            peers, self._peers = self._peers, {}
            buffer, self.buffer = self.buffer, None
        for peer in peers.values():
            peer.close()
        self.outboxes.close_all()
        if buffer is not None:
            buffer.destroy()
        self.directory.unlink(self.probe)
        self.directory.close()

    @classmethod
    def defer(cls, job: Callable[[], None]) -> None:
        """Run ``job`` at the next :meth:`acquire` or :meth:`release`
        (lock-free: a finalizer may call it)."""
        cls._deferred.append(job)

    @classmethod
    def _drain(cls) -> None:
        run_queued(cls._deferred)

    def fill(self) -> Buffer | None:
        """This process's buffer, ready for messages, or None: it has none
        (``buffer-size`` is 0), the directory has no room for it now, or
        the kernel refused it.  Then the message at hand travels over TCP.
        After a full directory the next message that needs the buffer tries
        again: room freed by other processes is used as soon as it is
        there.  After a refusal (a memory cgroup's limit, ``vm.max_map_count``:
        lasting, and costly to find again) this host does not try again.
        Links that never need the buffer (single copy) are not affected.
        Blocking (run it off the event loop); one thread tries at a time:
        the others wait, then find the buffer filled or try in turn (a full
        directory fails at once)."""
        with self._fill_lock:
            with self._lock:
                buffer = self.buffer
                if buffer is not None and buffer.view is not None:
                    return buffer
                if buffer is None or self.closed or self.refused:
                    return None
                self.filling = True
            try:
                buffer.fill()
            except OSError as e:
                # No room (ShmFull), or memory the kernel would not give (a
                # memory cgroup, vm.max_map_count): TCP carries the message.
                if isinstance(e, ShmFull):
                    warn_once(str(e.strerror))  # the file, the size, the free space, the remedy
                    stats.count("fallback-enospc")
                else:
                    warn_once(
                        f"cannot set up the shared buffer {buffer.name} "
                        f"({buffer.size} bytes) in {self.path}: {e}; messages that "
                        "need it go over TCP until every shm:// comm of this process "
                        "has closed. Lower dask-shm.buffer-size, or set it to 0"
                    )
                    stats.count("fallback-no-buffer")
                    self.refused = True
            finally:
                with self._lock:
                    self.filling = False
                    left = self.closed  # everyone left meanwhile
                if left:
                    self._close()
            return None if left or buffer.view is None else buffer

    def peer(self, name: object, owner: Owner, size: object) -> PeerBuffer:
        """The peer buffer ``name`` (opened once per host)."""
        name = check_name(name, owner, "b")  # a cached buffer is checked too
        with self._lock:
            peer = self._peers.get(name)
            if peer is None:
                peer = PeerBuffer(self.directory, name, owner, size)
                self._peers[peer.name] = peer
            elif peer.size != size:
                raise DescriptorError(f"buffer {name}: size {size!r} does not match {peer.size}")
            peer.users += 1
            return peer

    def drop_inbox(self, inbox: Inbox) -> None:
        """A link's inbox is done: close it and let go of its peer buffer."""
        inbox.close()
        if inbox.peer is not None:
            self.unpeer(inbox.peer)

    def unpeer(self, peer: PeerBuffer) -> None:
        with self._lock:
            peer.users -= 1
            if peer.users or self._peers.get(peer.name) is not peer:
                return
            del self._peers[peer.name]
        peer.close()

    @classmethod
    def reset_after_fork(cls) -> None:
        # The child shares none of its parent's links; it must not unlink or
        # reuse its parent's buffer.
        cls._hosts = {}
        cls._deferred = deque()
        cls._lock = threading.Lock()


os.register_at_fork(after_in_child=Host.reset_after_fork)

def create_probe(directory: Directory) -> tuple[str, str]:
    """Create a handshake probe holding a random token; return (name, token).

    Raises
    ------
    ShmFull
        If the directory has no room even for the probe.
    """
    name = new_name("p")
    token = secrets.token_hex(16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, MODE, dir_fd=directory.fd)
    own(directory, name)
    try:
        os.write(fd, token.encode())
    except BaseException as e:
        directory.unlink(name)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise directory.full(e.errno, name, len(token)) from e
        raise
    finally:
        os.close(fd)
    return name, token


def read_probe(directory: Directory, name: object, owner: Owner) -> str | None:
    """The token in a peer's probe, or None if we cannot read it (with why
    logged at debug level): then we do not share the directory with it."""
    try:
        name = check_name(name, owner, "p")
        # O_NONBLOCK: a FIFO planted under the name must not block us.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=directory.fd)
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


def later(release: Callable[[], None], loop: asyncio.AbstractEventLoop | None) -> None:
    """Run ``release`` soon, from a finalizer: it takes locks, and the
    garbage collector may run a finalizer in any thread, while that thread
    holds one.  Handed to ``loop`` (the comm's; a lock-free hand-off) while
    it runs, else left for the next :class:`Host` operation."""
    if loop is not None and loop.is_running():
        try:
            loop.call_soon_threadsafe(release)
            return
        except RuntimeError:  # closed meanwhile
            pass
    Host.defer(release)


_warned = False


def warn_once(message: str) -> None:
    """Log ``message`` as a warning if no trouble with shared memory has been
    logged in this process yet: a lasting condition (a full directory, one
    without inodes) would otherwise be logged for every comm."""
    global _warned
    if not _warned:
        _warned = True
        logger.warning("dask-shm: %s (shown once per process)", message)


def info() -> dict[str, int]:
    """This process's shared memory now: its buffers' bytes, the bytes in
    flight in them, and the peer buffers it has mapped."""
    with Host._lock:
        hosts = list(Host._hosts.values())
    buffers = [h.buffer for h in hosts if h.buffer is not None and h.buffer.view is not None]
    return {
        "buffer-bytes": sum(b.size for b in buffers),
        "buffer-in-flight": sum(b.in_use() for b in buffers),
        "peer-buffers": sum(len(h._peers) for h in hosts),
    }


stats.add_gauges(info)
