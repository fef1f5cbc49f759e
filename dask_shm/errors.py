"""dask-shm's exceptions, in one place so every module can raise them."""

from __future__ import annotations

__all__ = ["ShmError", "ShmFull", "DescriptorError"]


class ShmError(Exception):
    """Base class of dask-shm's errors."""


class ShmFull(ShmError, OSError):
    """The shm directory has no room for a buffer (ENOSPC)."""


class DescriptorError(ShmError, ValueError):
    """What a peer sent is invalid (a descriptor, a name, a file it names);
    it was refused before anything it names was read or mapped."""

