"""dask-shm's exceptions, in one place so every module can raise them."""

from __future__ import annotations

__all__ = ["ShmError", "ShmFull", "DescriptorError", "BufferMissing"]


class ShmError(Exception):
    """Base class of dask-shm's errors."""


class ShmFull(ShmError, OSError):
    """The shm directory has no room for a buffer (ENOSPC)."""


class DescriptorError(ShmError, ValueError):
    """What a peer sent is invalid (a descriptor, a name, a file it names);
    it was refused before anything it names was read or mapped."""


class BufferMissing(ShmError, FileNotFoundError):
    """A file a peer named does not exist (it exited, or a janitor ran)."""
