"""The receiving side of a link: a peer's buffer, mapped read-only once,
and copies out of it, or out of the sender's own memory (single copy).

Who may map what, when regions are released and what a crash leaves behind
is told once, in :mod:`dask_shm.buffers`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
from distributed.comm.core import CommClosedError

from dask_shm.buffers import map_shared
from dask_shm.errors import DescriptorError
from dask_shm.names import Directory, Owner, check_file, check_name, held
from dask_shm.release import Channel
from dask_shm.single_copy import read_frames

__all__ = ["PeerBuffer", "Inbox"]


class PeerBuffer:
    """A peer's buffer as a receiver sees it: checked by name at the
    handshake, mapped read-only at its first use, shared by every link to
    that peer.  No descriptor is held in between: a link that reads in
    place never maps it, and a process with many peers would otherwise hold
    one descriptor per peer for nothing."""

    def __init__(self, directory: Directory, name: object, owner: Owner, size: object) -> None:
        self.name = check_name(name, owner, "b")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 48:
            raise DescriptorError(f"buffer {self.name}: invalid size {size!r}")
        self.size = size
        self._directory = directory
        fd = self._open()
        st = os.fstat(fd)
        os.close(fd)
        #: The file checked at the handshake: the one mapped later, or none.
        self._identity = (st.st_dev, st.st_ino)
        self._closed = False
        self.view: np.ndarray | None = None
        self.users = 0
        #: map() runs in copying threads, close() on the loop: one at a time.
        self._lock = threading.Lock()
        held(self)

    def _open(self) -> int:
        """Open the file by name and check what was opened."""
        # O_NONBLOCK: a FIFO planted under the name must not block us.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.name, flags, dir_fd=self._directory.fd)
        problem = check_file(os.fstat(fd))
        if problem:
            os.close(fd)
            raise DescriptorError(f"refusing buffer {self.name}: {problem}")
        return fd

    def drop_in_child(self) -> None:
        """In a forked child: unmap (with the view)."""
        self.view = None
        self._closed = True
        self._lock = threading.Lock()  # perhaps held by a thread the child lacks

    def map(self) -> np.ndarray:
        """The buffer's bytes, mapped at the first call.

        Raises
        ------
        DescriptorError
            If the file is not the one checked at the handshake, or is
            smaller than the size its owner announced (a mapping past its
            end would raise SIGBUS on the first read).
        """
        view = self.view
        if view is not None:
            return view
        with self._lock:
            if self.view is not None:
                return self.view
            if self._closed:
                raise DescriptorError(f"buffer {self.name}: closed (its link has ended)")
            try:
                fd = self._open()
            except OSError as e:
                raise DescriptorError(f"cannot open buffer {self.name} again: {e}") from e
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self._identity:
                    raise DescriptorError(
                        f"buffer {self.name} is not the file checked at the handshake"
                    )
                if st.st_size < self.size:
                    raise DescriptorError(
                        f"buffer {self.name} holds {st.st_size} bytes, "
                        f"not the {self.size} its owner announced"
                    )
                view = map_shared(fd, self.size, writable=False)
            finally:
                os.close(fd)  # the mapping needs no descriptor
            self.view = view
        return view

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.view = None  # unmapped once no copy uses it


class Inbox:
    """The receiving side of one link: the sender's buffer (None if it has
    none, or we read all its messages in place) and the link's release
    channel."""

    def __init__(self, peer: PeerBuffer | None, channel: Channel) -> None:
        self.peer = peer
        self._channel: Channel | None = channel.use()
        self._lock = threading.Lock()  # close() against a copy in another thread
        self._copying = 0
        self.closed = False
        held(self)

    def drop_in_child(self) -> None:
        """In a forked child: forget the channel (it closes itself there),
        so that the sender sees end-of-file once the parent lets go."""
        self.closed = True
        self._copying = 0
        self._lock = threading.Lock()  # perhaps held by a thread the child lacks
        self._channel = None

    def copy(self, offset: int, length: int, into: list[np.ndarray]) -> None:
        """Copy a region out into consecutive pieces of ``into`` (their sizes
        add up to ``length``), then release it.  Bounds were validated with
        the descriptor.  Blocking; safe in any thread."""

        peer = self.peer
        assert peer is not None  # decode() refuses regions of a buffer never announced

        def copy() -> None:
            view = peer.map()
            start = offset
            for dst in into:
                np.copyto(dst, view[start : start + dst.nbytes])
                start += dst.nbytes

        self._then_release(copy)

    def read_in_place(self, sender: Owner, pairs: Sequence[tuple[int, np.ndarray]]) -> None:
        """Copy the frames of a message the sender described in its own
        memory (:func:`dask_shm.single_copy.read_frames`), then release
        them (one byte)."""
        self._then_release(lambda: read_frames(sender, pairs))

    def _then_release(self, copy: Callable[[], None]) -> None:
        """Run ``copy``, then release its entry (see
        :meth:`Channel.release`); if the link closed meanwhile, tell the
        sender we are done instead (once no other copy runs).

        Raises
        ------
        CommClosedError
            If the link has closed before the copy could start (it may have
            waited for an offload thread): the sender has freed what it
            described, so nothing of it is read.
        """
        with self._lock:
            if self.closed:
                raise CommClosedError("the link closed before its message could be copied")
            self._copying += 1
        try:
            copy()
        finally:
            with self._lock:
                self._copying -= 1
                if not self.closed:
                    if self._channel is not None:
                        self._channel.release()
                elif not self._copying:
                    self._let_go()

    def close(self) -> None:
        """No more regions will be read; a copy under way finishes first."""
        with self._lock:
            self.closed = True
            if not self._copying:
                self._let_go()

    def _let_go(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.done_writing()
            channel.drop()
