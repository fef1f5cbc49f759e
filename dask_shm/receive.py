"""Receiving: how a linked ``shm://`` comm reads a message described to it.

The receiver validates each descriptor before it reads anything, copies the
message into frames allocated as ``TCP.read`` allocates them (from the
peer's memory in place, or out of its buffer region by region), releases
what it read, and aborts the comm if a read fails once the message started
to arrive, as ``TCP.read`` does (docs/protocol.md).
"""

from __future__ import annotations

import errno
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.comm.core import CommClosedError
from distributed.comm.utils import from_frames
from distributed.protocol.utils import host_array
from distributed.utils import nbytes, offload

from dask_shm import handoff, stats
from dask_shm.descriptor import INLINE, Cursor, Envelope, decode
from dask_shm.errors import DescriptorError
from dask_shm.estimate import offloads
from dask_shm.handshake import Handshake, Link
from dask_shm.inbox import Inbox

__all__ = ["Receiver"]


class Receiver:
    """The receiving side of :class:`~dask_shm.comm.SHM` (a mixin)."""

    _link: Link | None
    _handshake: Handshake | None
    _reading: int
    deserialize: bool
    allow_offload: bool

    if TYPE_CHECKING:  # provided by the comm (SHM, and TCP under it)
        def _tcp_read(self, deserializers: Any = None) -> Coroutine[Any, Any, Any]: ...
        def closed(self) -> bool: ...
        def abort(self) -> None: ...
        def _end_link(self) -> None: ...
        def _drop_handshake(self) -> None: ...
        async def _negotiate(self, remote: Any) -> None: ...

    def read(self, deserializers: Any = None) -> Coroutine[Any, Any, Any]:  # type: ignore[override]
        if self._handshake is not None:
            return self._read_handshake(deserializers)
        if self._link is None:
            return self._tcp_read(deserializers)
        return self._read_link(self._link, deserializers)

    async def _read_handshake(self, deserializers: Any) -> Any:
        """The peer's handshake message, then our side of the probe exchange."""
        try:
            msg = await self._tcp_read(deserializers)
        except BaseException:
            self._drop_handshake()
            raise
        await self._negotiate(msg)
        return msg

    async def _read_link(self, link: Link, deserializers: Any) -> Any:
        self._reading += 1
        try:
            return await self._read_message(link, deserializers)
        finally:
            self._reading -= 1
            if self.closed() and not self._reading:  # see comm._stream_closed
                self._end_link()

    async def _read_message(self, link: Link, deserializers: Any) -> Any:
        msg = await self._tcp_read(deserializers)
        if type(msg) is not Envelope:
            return msg
        try:
            frames = msg.frames if msg.descriptor is None else await self._receive(link, msg)
        except BaseException as e:
            # As TCP.read: once a message has started to arrive, anything
            # that stops its read (allocation, a copy, a cancellation) leaves
            # the rest of it unread, which the next read would take for
            # another message.  Abort: the release channel closes, and the
            # sender frees what the message held.
            self.abort()
            if isinstance(e, DescriptorError):
                raise CommClosedError(f"in {self}: {e}") from e
            raise
        try:
            return await from_frames(
                frames,
                deserialize=self.deserialize,
                deserializers=deserializers,
                allow_offload=self.allow_offload,
            )
        except EOFError as e:  # as TCP.read
            self.abort()
            raise CommClosedError(f"in {self}: aborted stream on truncated data") from e
        except DescriptorError as e:  # a peer breaking our protocol ("shm" family)
            self.abort()
            raise CommClosedError(f"in {self}: {e}") from e
        # Any other error (an object that cannot be rebuilt) leaves the comm
        # as TCP.read leaves it: the whole message was read.

    async def _receive(self, link: Link, envelope: Envelope) -> list[Any]:
        """Copy a message's fragments out of the peer's buffer into frames
        allocated as ``TCP.read`` allocates them, releasing each region."""
        inbox = link.inbox
        if inbox is None:
            raise DescriptorError("a descriptor arrived on a link that receives nothing shared")
        buffer_size = 0 if inbox.peer is None else inbox.peer.size  # 0: no region fits
        lengths, fragments, remote = decode(
            envelope.descriptor,
            first=True,
            buffer_size=buffer_size,
            remaining=None,
            inline=[nbytes(f) for f in envelope.frames],
        )
        assert lengths is not None
        if remote and not link.reads_in_place:
            raise DescriptorError("an in-place descriptor, but we did not agree to read in place")
        if remote and [n for n in lengths if n] != [n for _, n in fragments]:
            # Checked before anything is allocated.
            raise DescriptorError("in-place fragments do not match the frames one to one")
        # A relay gets the arrays themselves, not host_array's memoryviews of
        # them, so that it may hand them over (see dask_shm.handoff).
        allocate = host_array if self.deserialize else handoff.bytes_array
        frames = [allocate(n) for n in lengths]
        if remote:
            await self._read_in_place(link, inbox, fragments, frames)
            return frames
        sink = Cursor([np.frombuffer(f, dtype=np.uint8) for f in frames])
        while True:
            inline = iter(envelope.frames)
            for offset, n in fragments:
                into = sink.take(n)
                if offset == INLINE:
                    _scatter_into(np.frombuffer(next(inline), dtype=np.uint8), into)
                    continue
                if self.closed():
                    raise CommClosedError(f"in {self}: closed while receiving")
                if offloads(self.allow_offload, n):
                    await offload(inbox.copy, offset, n, into)
                else:
                    inbox.copy(offset, n, into)
            if not sink.remaining:
                return frames
            envelope = await self._tcp_read()
            if type(envelope) is not Envelope or envelope.descriptor is None:
                raise DescriptorError("expected the rest of a message, got another message")
            _, fragments, remote = decode(
                envelope.descriptor,
                first=False,
                buffer_size=buffer_size,
                remaining=sink.remaining,
                inline=[nbytes(f) for f in envelope.frames],
            )
            if remote:
                raise DescriptorError("an in-place descriptor continues a streamed message")

    async def _read_in_place(
        self, link: Link, inbox: Inbox, fragments: list[tuple[int, int]], frames: list[Any]
    ) -> None:
        """Copy frames the peer described in its own memory straight into
        ``frames`` (one copy), then release them all.  From this same
        process, take over instead each frame nothing else refers to (no
        copy; see :mod:`dask_shm.handoff`)."""
        if self.closed():
            raise CommClosedError(f"in {self}: closed while receiving")
        sized = [i for i, f in enumerate(frames) if f.nbytes]  # one per fragment
        pairs: list[tuple[int, np.ndarray]] = []
        for (address, n), i in zip(fragments, sized):
            # Before the release below, which unpins them.
            taken = handoff.take(address, n) if link.same_process else None
            if taken is None:
                pairs.append((address, np.frombuffer(frames[i], dtype=np.uint8)))
            else:
                # the same type as allocated: the array, or host_array's view of it
                frames[i] = taken if type(frames[i]) is np.ndarray else taken.data
                stats.count("handoff-frames")
                stats.count("handoff-bytes", n)
        try:
            if offloads(self.allow_offload, sum(d.nbytes for _, d in pairs)):
                await offload(inbox.read_in_place, link.peer, pairs)
            else:
                inbox.read_in_place(link.peer, pairs)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise CommClosedError(f"in {self}: the sender exited while we read ({e})") from e
            raise DescriptorError(
                f"cannot read {len(pairs)} frame(s) in the memory of pid {link.peer.pid}: {e}"
            ) from e


def _scatter_into(src: np.ndarray, into: list[np.ndarray]) -> None:
    """Copy ``src`` into consecutive pieces ``into``."""
    pos = 0
    for dst in into:
        np.copyto(dst, src[pos : pos + dst.nbytes])
        pos += dst.nbytes
