"""Sending: what a linked ``shm://`` comm does with a message it writes.

Small messages go to TCP as they are.  A message that may reach
``dask-shm.threshold`` bytes is serialized here; if it does, it is
described in place for a peer that may read our memory (single copy), or
streamed through this process's buffer, fragment by fragment, with the
messages written meanwhile queued behind it in order (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.comm.core import CommClosedError
from distributed.comm.utils import to_frames
from distributed.utils import ensure_memoryview, offload

from dask_shm import family, handoff, stats
from dask_shm.config import MIN_FRAGMENT_SIZE
from dask_shm.descriptor import INLINE, Cursor, Envelope, encode
from dask_shm.estimate import offloads, reaches
from dask_shm.handshake import Handshake, Link

__all__ = ["Sender", "IN_FLIGHT", "NO_SPLIT"]

logger = logging.getLogger(__name__)

#: Regions one message keeps in flight: two, so that the sender fills one
#: while the receiver copies out the other (double buffering).  More would
#: not speed a transfer up (the receiver's copy is the slower side) and
#: would take room that concurrent messages to other peers need.
IN_FLIGHT = 2
#: The first fragment of a message is fragment-size / GROWTH; each next one
#: doubles, up to fragment-size (see Sender._stream).
GROWTH = 8
#: Frames are never split into shards on the shared-memory path: the
#: fragments of the packed stream do that job.
NO_SPLIT = 2**62


class Sender:
    """The sending side of :class:`~dask_shm.comm.SHM` (a mixin): what a
    write does with a message on a linked comm (see the SHM Notes)."""

    _link: Link | None
    _handshake: Handshake | None
    _plain: stats.Tally | None
    _closing: bool
    allow_offload: bool
    local_info: dict[str, Any]
    remote_info: dict[str, Any]
    handshake_options: dict[str, Any]

    if TYPE_CHECKING:  # provided by the comm (SHM, and TCP under it)
        def _tcp_write(
            self, msg: Any, serializers: Any = None, on_error: str = "message"
        ) -> Coroutine[Any, Any, int]: ...
        def closed(self) -> bool: ...
        def abort(self) -> None: ...
        def _release(self) -> None: ...
        def _drop_handshake(self) -> None: ...

    # ``write`` and ``read`` are plain methods returning TCP's coroutine
    # wherever nothing of ours runs after the bytes move: every message pays
    # for an extra coroutine frame otherwise.

    def write(  # type: ignore[override]
        self, msg: Any, serializers: Any = None, on_error: str = "message"
    ) -> Coroutine[Any, Any, int]:
        link = self._link
        if link is None:
            if self._handshake is not None:
                return self._write_handshake(msg, serializers, on_error)
            if self._plain is not None:
                self._plain.n += 1
            return self._tcp_write(msg, serializers, on_error)
        if serializers is None:
            serializers = link.serializers
        if (serializers is not None and family.NAME in serializers) or reaches(
            msg, link.threshold
        ):
            return self._write_link(link, msg, serializers, on_error)
        link.below_threshold.n += 1
        if link.single_copy and not self._closing:
            # Such a link never streams (nothing to queue behind): TCP's own
            # write, without a coroutine of ours around it (~1% of a small
            # message's round trip).
            return self._tcp_write(msg, serializers, on_error)
        return self._write_small(link, msg, serializers, on_error)

    async def _write_small(self, link: Link, msg: Any, serializers: Any, on_error: str) -> int:
        # Checked when the write runs, not when it was called: writes created
        # together (asyncio.gather) run later, perhaps during a stream.
        if self._closing:
            raise CommClosedError(f"in {self}: closed")
        if link.queue is not None:
            return await self._write_link(link, msg, serializers, on_error, small=True)
        link.tcp_writes += 1  # as in _direct, without a coroutine more per message
        try:
            return await self._tcp_write(msg, serializers, on_error)
        finally:
            link.written_direct()

    @staticmethod
    async def _direct(link: Link, write: Coroutine[Any, Any, Any]) -> Any:
        """Await a write straight to TCP.  Its serialization may yield
        (distributed offloads what is large or what it cannot size), so a
        stream starts only once every such write is in the TCP stream: no
        message may land between the fragments of another."""
        link.tcp_writes += 1
        try:
            return await write
        finally:
            link.written_direct()

    async def _write_handshake(self, msg: Any, serializers: Any, on_error: str) -> int:
        try:
            return await self._tcp_write(msg, serializers, on_error)
        except BaseException:
            self._drop_handshake()
            raise

    async def _write_link(
        self, link: Link, msg: Any, serializers: Any, on_error: str, small: bool = False
    ) -> int:
        try:
            frames = await to_frames(
                msg,
                allow_offload=self.allow_offload,
                serializers=serializers,
                on_error=on_error,
                context={
                    "sender": self.local_info,
                    "recipient": self.remote_info,
                    **self.handshake_options,
                },
                frame_split_size=NO_SPLIT,
            )
            if self._closing or self.closed():  # closed while serializing: as TCP
                raise CommClosedError(f"in {self}: closed")
            views = [ensure_memoryview(f) for f in frames]
            total = sum(v.nbytes for v in views)
            # A closed outbox: the receiver hung up.
            shared = total >= link.threshold and link.outbox is not None and not link.outbox.closed
            if not shared and not small:
                stats.count("tcp-messages")
                stats.count("tcp-bytes", total)
            if link.queue is not None:  # behind a stream: wait your turn
                link.queue.append((views, shared))
            elif not shared:
                await self._direct(link, self._write_plain(views))
            elif link.single_copy:
                await self._direct(link, self._send_in_place(link, views, frames))
            else:
                link.queue = deque([(views, True)])
                link.pump = asyncio.ensure_future(self._pump(link))
            return total
        except CommClosedError:
            # Refused because close() has begun: close() delivers what was
            # accepted before, so the link stays until it has.
            if self.closed():
                self._release()
            raise

    async def _pump(self, link: Link) -> None:
        """Send the link's queue in order, streaming what goes through the
        buffer.  ``write`` has returned meanwhile, as ``TCP.write`` returns
        with its frames queued in the stream: an end that writes large
        messages before it reads does not wait for its peer to read them.
        ``abort`` cancels it; ``close`` waits for it."""
        queue = link.queue
        assert queue is not None
        try:
            if link.tcp_writes:  # writes straight to TCP under way go first
                link.tcp_drained = asyncio.get_running_loop().create_future()
                await link.tcp_drained
            while queue:
                views, shared = queue[0]
                if shared and await self._buffer_ready(link):
                    await self._stream(link, views)
                    stats.count("shm-messages")
                elif shared:  # the directory has no room for the buffer now
                    await self._fall_back(views)
                else:
                    await self._write_plain(views)
                queue.popleft()
        except CommClosedError:
            self._release()
        except Exception:
            # No caller is left to raise to: end the comm, so that both ends
            # see it closed rather than wait for the rest of a message.
            logger.exception("%s: streaming a message failed; aborting the comm", self)
            self.abort()
        finally:
            if link.queue is queue:
                link.queue = None
                link.pump = None

    @staticmethod
    async def _buffer_ready(link: Link) -> bool:
        """Whether this process's buffer is ready; if it could not be filled
        yet (no room in the directory), try again now."""
        buffer = link.host.buffer
        if buffer is not None and buffer.view is not None:
            return True
        return await offload(link.host.fill) is not None

    async def _write_plain(self, views: list[memoryview]) -> None:
        """Send serialized frames as they are, over TCP."""
        await self._tcp_write(Envelope(None, *views).pickled(), on_error="raise")

    async def _fall_back(self, views: list[memoryview]) -> None:
        """Send over TCP, counted so, a message meant for shared memory."""
        stats.count("tcp-messages")
        stats.count("tcp-bytes", sum(v.nbytes for v in views))
        await self._write_plain(views)

    async def _send_in_place(self, link: Link, views: list[memoryview], frames: list[Any]) -> None:
        """Single copy: describe the frames where they are.  Like
        ``TCP.write``, which leaves its frames queued in the stream, this
        returns at once; the frames are kept alive until the receiver has
        copied them (or, in this same process, taken them over: see
        :mod:`dask_shm.handoff`) and must not change meanwhile (distributed never
        changes what it sends)."""
        outbox = link.outbox
        assert outbox is not None
        # Not pinned: the receiver hung up meanwhile, or has WINDOW messages
        # of this link still to read.
        if not link.host.outboxes.pin(outbox, views):
            await self._fall_back(views)
            return
        if link.same_process:
            for f, v in zip(frames, views):
                handoff.offer(f, v)
        fragments = [
            (np.frombuffer(v, dtype=np.uint8).ctypes.data, v.nbytes) for v in views if v.nbytes
        ]
        descriptor = encode([v.nbytes for v in views], fragments, remote=True)
        await self._tcp_write(Envelope(descriptor).pickled(), on_error="raise")
        stats.count("shm-messages")
        stats.count("shm-bytes", sum(n for _, n in fragments))
        stats.count("single-copy-messages")

    async def _stream(self, link: Link, views: list[memoryview]) -> None:
        """Send ``views`` through the buffer (see the class Notes)."""
        outbox = link.outbox
        buffer = link.host.buffer
        if outbox is None or buffer is None or outbox.closed:
            raise CommClosedError(f"in {self}: closed while streaming")
        source = Cursor(views)
        lengths: list[int] | None = [v.nbytes for v in views]
        placed = 0  # regions of this message, placed so far
        # Fragments start small, so that the receiver starts copying out at
        # once, and double up to fragment-size, so that a large message
        # costs few descriptors (each one a TCP message and a release).
        size = max(link.fragment_size // GROWTH, MIN_FRAGMENT_SIZE)
        while source.remaining:
            fragments: list[tuple[int, int]] = []
            inline: list[memoryview] = []
            seen = outbox.release_count
            # Regions are released in the order they were placed, so this
            # message's still in flight are the newest of the link's.
            while source.remaining and min(placed, len(outbox.inflight)) < IN_FLIGHT:
                n = min(size, source.remaining)
                seen = outbox.release_count
                offset = buffer.place(outbox, n)
                if offset is None:
                    break
                size = min(2 * size, link.fragment_size)
                pieces = source.take(n)
                if offloads(self.allow_offload, n):
                    # Shielded: if the stream is cancelled, the write still
                    # runs and ends, and only then is its region freed.
                    write = asyncio.ensure_future(offload(buffer.write, offset, pieces))
                    write.add_done_callback(_retrieved)
                    await asyncio.shield(write)
                else:
                    buffer.write(offset, pieces)
                fragments.append((offset, n))
                placed += 1
                stats.count("shm-bytes", n)
                if lengths is not None:
                    break  # start the receiver at once
            if not fragments:
                if outbox.inflight and not outbox.closed:
                    await link.host.outboxes.wait(outbox, seen)
                    continue
                # No room, and nothing of this link to wait for: TCP carries it.
                for piece in source.take(min(link.fragment_size, source.remaining)):
                    fragments.append((INLINE, piece.nbytes))
                    inline.append(piece)
                stats.count("fallback-busy")
            envelope = Envelope(encode(lengths, fragments), *inline)
            await self._tcp_write(envelope.pickled(), on_error="raise")
            lengths = None



def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome seen: nobody awaits a shielded write whose
    stream was cancelled (what it raised went with the comm)."""
    if not future.cancelled():
        future.exception()
