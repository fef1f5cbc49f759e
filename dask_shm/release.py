"""The release channel of a link: one Unix stream socket between its two
ends, through which each end tells the other which of its entries (buffer
regions, messages read in place) it is done with (docs/protocol.md,
Release).

One socket serves both directions, so a link costs one descriptor per end
besides its TCP socket.  It lives in Linux's abstract namespace: no file is
ever created for it, so nothing is left behind by a crash and no path
length limits the shm directory's.  Its name travels over the proven TCP
connection only; since abstract names are visible to every process of the
network namespace (``/proc/net/unix``), each end checks the kernel's record
of who is at the other end (``SO_PEERCRED``: our uid, and the peer's pid
when it shares our pid namespace) and accepts nothing else.  A stranger can
at worst make a handshake fall back to TCP.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading

from dask_shm.errors import DescriptorError
from dask_shm.names import Owner, check_name, current_owner, held, new_name

__all__ = ["WINDOW", "Channel", "listen", "connect", "accept", "open_sockets"]

#: Entries one direction of a link may have unreleased.  A release is one
#: byte, written without blocking: the kernel charges each write to the
#: writer's send buffer as a whole packet (about 770 bytes on x86-64 Linux
#: 6.x), and the default send buffer (``net.core.wmem_default``, 208 KiB)
#: holds about 270 of them, so twice this window fits
#: (tests/test_buffers.py checks it on the host that runs the tests).  Each
#: message read in place is one entry and a message through the buffer has at
#: most two regions in flight, so a link reaches it only with over a hundred
#: large messages written and not yet read; the next one then waits (buffer)
#: or goes over TCP (single copy).
WINDOW = 128

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Channel:
    """One end of a link's release socket, shared by the link's outbox
    (which reads the peer's releases) and inbox (which writes ours).  It is
    closed once every user has let go (:meth:`use`, :meth:`drop`)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        #: The handshake holds it until the link's outbox and inbox do.
        self._users = 1
        self._lock = threading.Lock()
        held(self)

    def use(self) -> Channel:
        with self._lock:
            self._users += 1
        return self

    def drop(self) -> None:
        """One user less; the last closes the socket."""
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.sock.close()

    def drop_in_child(self) -> None:
        """In a forked child: close our copy only (a shutdown would end
        the parent's link too)."""
        self._users = 0
        self._lock = threading.Lock()  # perhaps held by a thread the child lacks
        self.sock.close()

    def read(self) -> int | None:
        """Releases that arrived: how many (0: the peer will release nothing
        more), or None if none is waiting."""
        try:
            data = self.sock.recv(WINDOW)
        except BlockingIOError:
            return None
        except ConnectionResetError:  # the peer closed with our bytes unread
            return 0
        return len(data)

    def release(self) -> None:
        """Release the peer's oldest unreleased entry (one byte).  Never
        blocks within the window; beyond it (a host whose send buffers are
        configured below the default), waits until the peer reads.  A peer
        that is gone needs nothing."""
        while True:
            try:
                self.sock.send(b"\0")
                return
            except BlockingIOError:
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT)
                poller.poll()
            except (BrokenPipeError, ConnectionResetError):
                return

    def done_writing(self) -> None:
        """We will release nothing more: the peer reads end-of-file and frees
        what it still held for us."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:  # the peer is gone already
            pass


def listen() -> tuple[str, socket.socket]:
    """A new listening release socket: (its name, the socket)."""
    name = new_name("r")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name)
        sock.listen(8)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return name, sock


def connect(name: object, peer: Owner) -> Channel:
    """Connect to the release socket ``peer`` named.

    Raises
    ------
    DescriptorError
        If the name is not one of ``peer``'s, or someone else listens on it.
    OSError
        If it cannot be reached (gone, another network namespace).
    """
    name = check_name(name, peer, "r")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Named too, so that both ends show as ours (``ss -x``, /proc/net/unix).
        sock.bind("\0" + new_name("r"))
        sock.setblocking(False)
        sock.connect("\0" + name)  # completes at once, or fails (a full backlog)
        problem = _stranger(sock, peer)
        if problem:
            raise DescriptorError(f"release socket {name}: {problem}")
    except BaseException:
        sock.close()
        raise
    return Channel(sock)


def accept(listener: socket.socket, peer: Owner) -> Channel | None:
    """The connection ``peer`` made to our listening release socket, or None
    if it has not connected or cannot be accepted (out of descriptors: the
    comm is then TCP); connections of anyone else are closed."""
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue
            return None
        try:
            if _stranger(sock, peer) is None:
                return Channel(sock)
        except OSError:
            pass
        sock.close()


def _stranger(sock: socket.socket, peer: Owner) -> str | None:
    """Why the process at the other end of ``sock`` is not ``peer``, or None."""
    pid, uid, _ = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    if uid != os.geteuid():
        return f"held by uid {uid}, not by us (uid {os.geteuid()})"
    if peer.ns == current_owner().ns and pid != peer.pid:
        return f"held by pid {pid}, not by the peer (pid {peer.pid})"
    return None


def open_sockets() -> dict[int, str]:
    """Every release socket open on this host's network namespace, by inode:
    its name (both ends of a link are named)."""
    out: dict[int, str] = {}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7].startswith("@dask-shm-"):
                    out[int(fields[6])] = fields[7][1:]
    except OSError:
        pass
    return out
