"""Names and identity: what our files are called, who they belong to, and the
directory handle every file access goes through.

Every file dask-shm creates is named::

    dask-shm-<pid>-<start time>-<pid namespace>-<boot>-<kind>-<128 random bits>

``kind`` is ``b`` for a process's shared buffer and ``p`` for a process's
handshake probe; ``r`` names a release socket (:mod:`dask_shm.release`),
which lives in the abstract socket namespace, not in the directory.  The start time (from ``/proc/<pid>/stat``) makes a name
survive pid reuse, so the janitor can prove its owner dead; ``boot`` (the
first 64 bits of the kernel's boot id) says which host's ``/proc`` may
judge it at all; the random part makes it unguessable.  Names are checked against this exact pattern before anything
is opened, and every open, rename and unlink is relative to the directory's
file descriptor, so nothing outside the directory is ever touched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import stat
import sys
import weakref
from dataclasses import dataclass
from typing import Any

from dask_shm.errors import DescriptorError, ShmFull

__all__ = [
    "PREFIX",
    "MODE",
    "KINDS",
    "Owner",
    "current_owner",
    "new_name",
    "parse_name",
    "check_name",
    "Directory",
    "check_file",
    "fmt_bytes",
    "filesystem",
    "MEMORY_FILESYSTEMS",
    "held",
    "close_quietly",
    "own",
    "forget",
    "owned_names",
]

logger = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

#: Every file we create starts with this; nothing else is ever opened.
PREFIX = "dask-shm-"
#: Owner-only permissions: another user on the host can neither read our data
#: nor pass our probe (and so falls back to TCP).
MODE = 0o600
KINDS = {"b": "buffer", "r": "release socket", "p": "probe"}

_NAME_RE = re.compile(
    r"dask-shm-(?P<pid>[0-9]{1,10})-(?P<start>[0-9]{1,20})-(?P<ns>[0-9]{1,20})"
    r"-(?P<boot>[0-9a-f]{16})-(?P<kind>[brp])-(?P<token>[0-9a-f]{32})"
)
#: Longest valid name; anything longer is refused before a regex runs.
MAX_NAME_LENGTH = len(PREFIX) + 10 + 1 + 20 + 1 + 20 + 1 + 16 + 3 + 32


@dataclass(frozen=True)
class Owner:
    """The process responsible for a file, as written in its name."""

    pid: int
    start: int
    ns: int
    #: The first 64 bits of its kernel's boot id, in hex.
    boot: str

    def alive(self, *, strict: bool = False) -> bool:
        """Whether this process still runs.  When we cannot tell (another
        host or pid namespace, an unreadable ``/proc`` entry): True, so
        that the janitor never removes a live process's files; with
        ``strict``, False, so that nothing is read from a pid we cannot
        vouch for."""
        me = current_owner()
        if self.ns != me.ns or self.boot != me.boot:
            return not strict  # its pids mean nothing in our /proc
        info = _proc_stat(self.pid)
        if info is None:
            return False
        state, start = info
        if start == -1:  # it exists, but we may not read its start time
            return not strict
        return state not in ("Z", "X") and start == self.start

    def as_tuple(self) -> tuple[int, int, int, str]:
        return (self.pid, self.start, self.ns, self.boot)

    @classmethod
    def from_tuple(cls, value: object) -> Owner:
        """The owner a peer announced (``as_tuple``).

        Raises
        ------
        DescriptorError
            If it is not a well-formed identity.
        """
        if isinstance(value, list | tuple) and len(value) == 4:
            pid, start, ns, boot = value
            if (
                all(type(v) is int and 0 <= v < 2**64 for v in (pid, start, ns))
                and isinstance(boot, str)
                and re.fullmatch(r"[0-9a-f]{16}", boot)
            ):
                return cls(pid, start, ns, boot)
        raise DescriptorError(f"not a process identity: {value!r:.100}")


#: ``/proc/<pid>/stat`` flag of a process that is exiting: a process killed
#: with -9 closes its sockets before it becomes a zombie.
_PF_EXITING = 0x4


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None if there is no such process;
    the state of an exiting process reads "X"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", -1)  # exists but unreadable: treat as alive elsewhere
    # The command name (field 2) may contain spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    state = "X" if int(fields[6]) & _PF_EXITING else fields[0].decode()
    return state, int(fields[19])


_owner_cache: tuple[int, Owner] | None = None


def current_owner() -> Owner:
    """The identity of this process, as written into the names it creates."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:  # new, or forked
        info = _proc_stat(pid)
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            ns = 0
        _owner_cache = (pid, Owner(pid, info[1] if info else 0, ns, _boot_id()))
    return _owner_cache[1]


def _boot_id() -> str:
    """The first 64 bits of this kernel's boot id (random per boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:16].lower()
    except OSError:
        return "0" * 16


def new_name(kind: str) -> str:
    """A fresh, unguessable name of ``kind`` owned by this process."""
    o = current_owner()
    return f"{PREFIX}{o.pid}-{o.start}-{o.ns}-{o.boot}-{kind}-{secrets.token_hex(16)}"


def parse_name(name: object) -> tuple[Owner, str]:
    """Split one of our names into (owner, kind).

    Raises
    ------
    DescriptorError
        If ``name`` is not one of our names (wrong prefix, a path, anything
        but the exact pattern).
    """
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:
        raise DescriptorError(f"not a dask-shm name: {name!r:.100}")
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise DescriptorError(f"not a dask-shm name: {name!r}")
    return Owner(int(m["pid"]), int(m["start"]), int(m["ns"]), m["boot"]), m["kind"]


def check_name(name: object, owner: Owner, kind: str) -> str:
    """Return ``name`` if it is a ``kind`` file of ``owner``; else refuse it."""
    got_owner, got_kind = parse_name(name)
    if got_owner != owner or got_kind != kind:
        raise DescriptorError(
            f"{name!r} is not a {KINDS[kind]} of the peer (pid {owner.pid})"
        )
    assert isinstance(name, str)
    return name


def check_file(st: os.stat_result) -> str | None:
    """Why a file a peer named is unacceptable, or None: it must be a regular
    file of our uid, owner-only, one link."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"permissions {oct(st.st_mode & 0o777)} are not owner-only"
    if st.st_nlink != 1:
        return f"{st.st_nlink} hard links"
    return None


#: statfs(2) magic numbers of filesystems worth naming.
_FILESYSTEMS = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x958458F6: "hugetlbfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0x65735546: "fuse",
    0x01161970: "gfs2",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x6A656A63: "fakeowner",
    0x9FA0: "proc",
}
#: Filesystems whose files live in this host's memory: the only ones a
#: buffer may live on.  tmpfs (/dev/shm) is what POSIX shared memory uses;
#: ramfs is the same without a size limit.  Anything else puts buffers on a
#: disk (every page written back) or, worse, on a network filesystem, where
#: two hosts could pass each other's probe, MAP_SHARED is not coherent
#: across hosts, and the janitor would judge another host's files by this
#: host's /proc.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class _StatFS(ctypes.Structure):
    # Only f_type is read; the rest of struct statfs (120 bytes on 64-bit
    # Linux) is room.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 248)]


def filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (``"tmpfs"``...), or
    ``"0x<magic>"`` for one not named here, ``"unknown"`` if statfs fails."""
    buf = _StatFS()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return "unknown"
    magic = buf.f_type & 0xFFFFFFFF
    return _FILESYSTEMS.get(magic, f"{magic:#x}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


#: Our files that this process must remove, by name (their directory's
#: path): removed at exit by the janitor if still there.  Updated with
#: single dict operations (atomic under the GIL) and no lock, so that a
#: finalizer run by the garbage collector at any point may call
#: :func:`forget`.
_owned: dict[str, str] = {}
#: Every directory this process has used: swept for orphans at exit.
_directories: set[str] = set()


def own(directory: Directory, name: str) -> None:
    """Record that this process must remove ``name`` from ``directory``."""
    _owned[name] = directory.path
    _directories.add(directory.path)


def forget(name: str) -> None:
    """``name`` is removed or no longer ours to remove."""
    _owned.pop(name, None)


def owned_names() -> list[str]:
    """Names of the files this process is currently responsible for."""
    return list(_owned)


def take_owned() -> list[tuple[str, str]]:
    """(name, directory path) of every file this process must remove; the
    record is emptied (for the exit handler)."""
    out = list(_owned.items())
    _owned.clear()
    return out


def used_directories() -> list[str]:
    return list(_directories)


#: Objects holding descriptors, mappings or duties of this process (see
#: :func:`held`).
_held: weakref.WeakSet[Any] = weakref.WeakSet()


def held(obj: Any) -> None:
    """Register ``obj``, whose ``drop_in_child()`` a forked child calls: a
    task that forks (``os.fork``, multiprocessing's fork context) must not
    keep a release channel open (its sender would never see end-of-file), a
    peer's buffer mapped, or a duty such as unlinking its parent's files.
    Each object closes its descriptors there, drops its mappings and
    marks itself unusable, without touching the parent's event loop, whose
    epoll set the child shares."""
    _held.add(obj)


def _drop_in_child() -> None:
    for obj in list(_held):
        obj.drop_in_child()
    _held.clear()
    # The child is not responsible for its parent's files.
    _owned.clear()
    _directories.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def close_quietly(fd: int) -> None:
    """Close ``fd``, whatever state it is in (for a forked child)."""
    try:
        os.close(fd)
    except OSError:
        pass


class Directory:
    """An open handle on the shm directory (``dask-shm.directory``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        held(self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def drop_in_child(self) -> None:
        if self.fd >= 0:
            close_quietly(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Directory {self.path}>"

    @staticmethod
    def unusable_reason(path: str, *, memory: bool = True) -> str | None:
        """Why ``path`` cannot hold buffers on this machine, or None; with
        ``memory`` false, a directory on another filesystem passes (to
        list or sweep what is there)."""
        if not sys.platform.startswith("linux"):
            return f"shared memory needs Linux (this is {sys.platform})"
        if not os.path.isdir(path):
            return f"{path} does not exist"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by uid {os.geteuid()}"
        fs = filesystem(path)
        if memory and fs not in MEMORY_FILESYSTEMS:
            return (
                f"{path} is on {fs}, not a memory filesystem (tmpfs): buffers would "
                "be written to a disk, or shared across hosts"
            )
        return None

    def free_space(self) -> tuple[int, int]:
        """(free, total) bytes in the directory's filesystem."""
        st = os.statvfs(self.path if self.fd < 0 else self.fd)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def describe_space(self) -> str:
        free, total = self.free_space()
        return f"{fmt_bytes(free)} free of {fmt_bytes(total)} in {self.path}"

    def full(self, code: int, name: str, size: int) -> ShmFull:
        """The error for ``size`` bytes that do not fit, naming the remedy."""
        return ShmFull(
            code,
            f"cannot reserve {fmt_bytes(size)} for {name}: {self.describe_space()}. "
            "Give the shared-memory directory more room (e.g. `docker run "
            "--shm-size=1g`, or `mount -o remount,size=... /dev/shm`), lower "
            "dask-shm.buffer-size, or point dask-shm.directory at a larger "
            "tmpfs; meanwhile messages travel over TCP.",
        )

    def unlink(self, name: str) -> bool:
        """Unlink ``name``; False if it was gone already.  Something other
        than a file planted under one of our names (a directory) is removed
        if empty, else left with a warning: never an exception, so cleanup
        always gets through."""
        if self.fd < 0:  # closed, or inherited by a forked child: not ours to touch
            return False
        try:
            try:
                os.unlink(name, dir_fd=self.fd)
                removed = True
            except FileNotFoundError:
                removed = False
            except (IsADirectoryError, PermissionError):  # Linux says EISDIR or EPERM
                os.rmdir(name, dir_fd=self.fd)
                removed = True
        except OSError as e:
            # Still ours to remove at exit (or the janitor's, after it).
            logger.warning("dask-shm: cannot remove %s from %s: %s", name, self.path, e)
            return False
        forget(name)
        return removed
