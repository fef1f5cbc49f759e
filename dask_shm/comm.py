"""The ``shm://`` comm backend: distributed's TCP comm, with large messages
moved through shared memory once the handshake has proved that both ends
share the shm directory.

Like distributed's TLS comm, this is TCP with what differs changed: the comm
class extends the handshake and wraps ``read``/``write``; the connector,
listener and backend only swap the prefix and the comm class.

distributed names dask_shm uses beyond its documented comm and
serialization API, in every module (pin the distributed range in
setup.cfg):

- here: ``TCP``, ``TCPConnector``, ``TCPListener``, ``BaseTCPBackend`` (to
  subclass, with the private ``_connector_class``/``_listener_class`` the
  TLS backend swaps too), the private ``_close_comm`` (the callback ``TCP``
  gives its stream, which we extend), ``to_frames``/``from_frames`` and
  ``OFFLOAD_THRESHOLD``
  (``distributed.comm.utils``), ``host_array``
  (``distributed.protocol.utils``), ``Pickled``, ``ToPickle`` and
  ``Serialized`` (``distributed.protocol.serialize``), ``safe_sizeof``
  (``distributed.sizeof``), ``offload``, ``nbytes`` and
  ``ensure_memoryview`` (``distributed.utils``);
- here too: ``Worker.handle_comm``'s ``__self__`` and ``Worker.scheduler``
  (to advertise the address a Worker advertises over ``tcp://``: see
  ``_worker_default_host``);
- :mod:`dask_shm.family`: ``distributed.protocol.pickle`` (``dumps`` and
  ``loads`` with out-of-band buffers);
- :mod:`dask_shm.config`: ``distributed.protocol.serialize.families`` (the
  registered family names, to validate ``dask-shm.serializers``).

Besides, tornado's ``IOStream.set_close_callback`` replaces ``TCP``'s own.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import pickle
import sys
import weakref
from collections import deque
from collections.abc import Coroutine
from typing import Any

import numpy as np
from distributed.comm.addressing import get_address_host
from distributed.comm.core import CommClosedError
from distributed.comm.tcp import TCP, BaseTCPBackend, TCPConnector, TCPListener, _close_comm
from distributed.comm.utils import OFFLOAD_THRESHOLD, from_frames, to_frames
from distributed.protocol.serialize import Pickled, Serialize, Serialized, ToPickle
from distributed.protocol.utils import host_array
from distributed.sizeof import safe_sizeof
from distributed.utils import ensure_memoryview, get_ip, nbytes, offload
from tornado import gen
from tornado.iostream import IOStream

from dask_shm import family, handoff, handshake, stats
from dask_shm.config import settings
from dask_shm.descriptor import INLINE, decode, encode
from dask_shm.errors import DescriptorError
from dask_shm.handshake import Link
from dask_shm.host import later
from dask_shm.inbox import Inbox

__all__ = ["SHM", "SHMConnector", "SHMListener", "SHMBackend", "Link"]

logger = logging.getLogger(__name__)

#: Regions one message keeps in flight: two, so that the sender fills one
#: while the receiver copies out the other (double buffering).  More would
#: not speed a transfer up (the receiver's copy is the slower side) and
#: would take room that concurrent messages to other peers need.
IN_FLIGHT = 2
#: Frames are never split into shards on the shared-memory path: the
#: fragments of the packed stream do that job.
NO_SPLIT = 2**62


def _reaches(msg: Any, threshold: int) -> bool:
    """Whether ``msg`` may carry ``threshold`` bytes or more: the test that
    sends it through shared memory or straight to TCP.  It runs for every
    message on every linked comm, so its cost is bounded (see
    :func:`_estimate`); ~1 us for a small message, ~50 us for a batch of a
    thousand, where distributed's msgpack takes ~800 us."""
    try:
        return _estimate(msg, True) >= threshold
    except RecursionError:  # as to_frames: too deep to size, assume large
        return True


#: Elements of a container that :func:`_estimate` looks at.  A longer one (a
#: batched stream's thousand messages, a p2p shuffle's shards) is estimated
#: from an even sample of this many, scaled to its length, as Dask's sizeof
#: samples 10.  Measured (2-core VM, 2026-12-01): looking at up to 10,000
#: objects, and sizing task specs, made a scheduler's batches cost more to
#: size than to serialize: a sum of 2500 chunks of 29 KB ran at 0.82x tcp's
#: wall with 1.25x the CPU (all processes); with 16, at 0.96-1.11x and
#: 0.90-1.06x (two runs), while the p2p shuffle and rechunk still sent 99.9%
#: of their bytes through shared memory (their shards are alike, so a sample
#: finds them).  The cost is linear in it: ~50 us for a batch of a thousand
#: messages, against ~800 us for msgpack to serialize it.
_SAMPLE = 16


def _estimate(x: Any, data: bool) -> int:
    """Bytes ``x`` will take serialized, roughly: buffers exactly, containers
    by their (sampled) elements, other objects by Dask's ``sizeof``, except
    inside a ``ToPickle`` (``data`` false): distributed wraps its own task
    specs in it, whose ``sizeof`` walks the whole task graph node, on every
    compute-task message.  Data travels wrapped in ``Serialize``."""
    t = type(x)
    if t is dict:
        items: Any = x.values()
    elif t is list or t is tuple:
        items = x
    elif t in _SCALARS:
        return 8
    elif t is bytes or t is bytearray or t is str:
        return len(x)
    elif t is memoryview or t is np.ndarray:
        return x.nbytes
    elif t is Serialize:
        return _estimate(x.data, data)
    elif t is ToPickle:
        return _estimate(x.data, False)
    elif t is Serialized or t is Pickled:
        # Pickled's in-band part is in its header
        return sum(map(nbytes, x.frames)) + len(x.header.get("pickled-obj", b""))
    else:
        return safe_sizeof(x, default_size=0) if data else 0
    n = len(items)
    if n > _SAMPLE:
        items = (list(items) if t is dict else items)[:: n // _SAMPLE]
    total = 0
    for i in items:  # leaves inline: a batch has thousands
        ti = type(i)
        if ti is str or ti is bytes:
            total += len(i)
        elif ti in _SCALARS:
            total += 8
        else:
            total += _estimate(i, data)
    return 8 * n + (total * n // len(items) if n > _SAMPLE else total)


_SCALARS = frozenset((int, float, bool, type(None)))


class _Envelope:
    """A message sent our way: a descriptor (None: every frame is inline)
    and the inline frames, which TCP sends out of band, without copying."""

    __slots__ = ("descriptor", "frames")

    def __init__(self, descriptor: bytes | None, *frames: Any) -> None:
        self.descriptor = descriptor
        self.frames = list(frames)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Envelope, (self.descriptor, *map(pickle.PickleBuffer, self.frames)))

    def pickled(self) -> Pickled:
        # A false callback result keeps each buffer out of band; the frames
        # themselves are sent, so no PickleBuffer outlives this call (one
        # held by an exception's traceback made CPython 3.11's collector
        # crash on a memoryview that still had exports).
        pik = pickle.dumps(self, protocol=5, buffer_callback=lambda b: False)
        return Pickled({"pickled-obj": pik}, [ensure_memoryview(f) for f in self.frames])


class _Cursor:
    """Consecutive byte ranges across a list of buffers: the sender's frames
    (it takes pieces to copy in) or the receiver's (it fills them)."""

    def __init__(self, buffers: list[Any]) -> None:
        self.buffers = buffers
        self.remaining = sum(b.nbytes for b in buffers)
        self._i = 0
        self._pos = 0

    def take(self, n: int) -> list[Any]:
        """The next ``n`` bytes, as slices of the buffers."""
        out = []
        self.remaining -= n
        while n:
            buf = self.buffers[self._i]
            k = min(n, buf.nbytes - self._pos)
            out.append(buf[self._pos : self._pos + k])
            n -= k
            self._pos += k
            if self._pos == buf.nbytes:
                self._i += 1
                self._pos = 0
        return out


def _spread(src: np.ndarray, into: list[np.ndarray]) -> None:
    """Copy ``src`` into consecutive pieces ``into``."""
    pos = 0
    for dst in into:
        np.copyto(dst, src[pos : pos + dst.nbytes])
        pos += dst.nbytes


def _offloads(allow: bool, nbytes: int) -> bool:
    """Whether to copy ``nbytes`` off the event loop: as ``TCP`` decides for
    (de)serialization (``distributed.comm.offload``, false disables it)."""
    return bool(allow and OFFLOAD_THRESHOLD and nbytes > OFFLOAD_THRESHOLD)


class SHM(TCP):
    """A TCP comm that moves large messages through shared memory.

    Notes
    -----
    The protocol (the handshake's messages, the envelope, the descriptor and
    the release) is specified in docs/protocol.md; :mod:`dask_shm.handshake`
    negotiates the link.  Here: after a successful handshake, a message
    that may reach ``dask-shm.threshold`` bytes is serialized by this comm,
    without sharding.  If its frames reach the threshold it goes

    - **in place** where the peer may read our memory: the descriptor lists
      each frame's address and the write returns at once, as ``TCP.write``
      returns with its frames queued; the frames stay pinned, unchanged,
      until released, and ``close`` waits for that, as ``TCP.close`` waits
      until the kernel holds every byte (a process may exit right after).
      A relay adds one copy, and none when it forwards to a reader in its
      own process (:mod:`dask_shm.handoff`);
    - **through the buffer** otherwise: a task streams it, ``fragment-size``
      at a time, while the messages written meanwhile wait in order behind
      it (``Link.queue``); a fragment that finds no room, with none of its
      message's in flight, travels inline.

    The receiver validates each descriptor before reading and copies into
    frames allocated as ``TCP.read`` allocates them.  All other messages,
    and every message of a comm whose handshake failed, are plain TCP.
    """

    def __init__(self, stream: IOStream, *args: Any, **kwargs: Any) -> None:
        super().__init__(stream, *args, **kwargs)
        self._handshake: handshake.Handshake | None = None
        self._link: Link | None = None
        #: Messages written as plain TCP, counted as fallback-<why> once the
        #: handshake said why (see :mod:`dask_shm.stats`).
        self._plain: stats.Tally | None = None
        #: close() has begun: writes fail from now on, as TCP's do.
        self._closing = False
        #: Reads of a linked message under way (see _stream_closed).
        self._reading = 0
        # TCP marks a comm closed when its stream closes (the peer hung up, a
        # write failed) without calling close() or abort(), and distributed
        # never aborts a comm that reports closed(): let the link go then.
        stream.set_close_callback(functools.partial(_stream_closed, weakref.ref(self)))

    # -- handshake -----------------------------------------------------------

    def handshake_info(self) -> dict[str, Any]:
        info = super().handshake_info()
        self._handshake, why = handshake.start()
        if self._handshake is None:
            self._plain = stats.Tally(why)
            return info
        self._handshake.watch(self)
        info["dask-shm"] = self._handshake.info(relay=not self.deserialize)
        return info

    async def _negotiate(self, remote: Any) -> None:
        hs = self._handshake
        assert hs is not None
        try:
            link, why = await hs.negotiate(
                remote, lambda msg: super(SHM, self).write(msg), super().read, self.closed
            )
        except CommClosedError as e:
            raise CommClosedError(f"in {self}: {e}") from e
        finally:
            self._handshake = None
        if link is None:
            self._plain = stats.Tally(why)
            return
        self._link = link
        link.finalizer = weakref.finalize(self, later, link.close, link.loop)

    # A staticmethod in Comm; distributed calls it on the instance, and the
    # outcome of this comm's negotiation is instance state.
    def handshake_configuration(  # type: ignore[override]
        self, local: dict[str, Any], remote: dict[str, Any]
    ) -> dict[str, Any]:
        out = super().handshake_configuration(local, remote)
        if self._link is not None:
            out["dask-shm"] = self._link
            out["compression"] = None  # same memory: nothing to gain
        return out

    @property
    def link(self) -> Link | None:
        """The negotiated shared-memory link, or None if this comm is plain TCP."""
        return self._link

    # -- messages ------------------------------------------------------------

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
            return super().write(msg, serializers, on_error)
        if serializers is None:
            serializers = link.serializers
        if (serializers is not None and family.NAME in serializers) or _reaches(
            msg, link.threshold
        ):
            return self._write_link(link, msg, serializers, on_error)
        link.below_threshold.n += 1
        if link.single_copy and not self._closing:
            # Such a link never streams (nothing to queue behind): TCP's own
            # write, without a coroutine of ours around it (~1% of a small
            # message's round trip).
            return super().write(msg, serializers, on_error)
        return self._write_small(link, msg, serializers, on_error)

    async def _write_small(self, link: Link, msg: Any, serializers: Any, on_error: str) -> int:
        # Checked when the write runs, not when it was called: writes created
        # together (asyncio.gather) run later, perhaps during a stream.
        if self._closing:
            raise CommClosedError(f"in {self}: closed")
        if link.queue is not None:
            return await self._write_link(link, msg, serializers, on_error, small=True)
        link.direct += 1  # as in _direct, without a coroutine more per message
        try:
            return await super().write(msg, serializers, on_error)
        finally:
            link.written_direct()

    @staticmethod
    async def _direct(link: Link, write: Coroutine[Any, Any, int]) -> int:
        """Await a write straight to TCP.  Its serialization may yield
        (distributed offloads what is large or what it cannot size), so a
        stream starts only once every such write is in the TCP stream: no
        message may land between the fragments of another."""
        link.direct += 1
        try:
            return await write
        finally:
            link.written_direct()

    async def _write_handshake(self, msg: Any, serializers: Any, on_error: str) -> int:
        try:
            return await super().write(msg, serializers, on_error)
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
            if link.direct:  # writes straight to TCP under way go first
                link.drained = asyncio.get_running_loop().create_future()
                await link.drained
            while queue:
                views, shared = queue[0]
                if shared and await self._filled(link):
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
    async def _filled(link: Link) -> bool:
        """Whether this process's buffer is ready; if it could not be filled
        yet (no room in the directory), try again now."""
        buffer = link.host.buffer
        if buffer is not None and buffer.view is not None:
            return True
        return await offload(link.host.fill) is not None

    async def _write_plain(self, views: list[memoryview]) -> None:
        """Send serialized frames as they are, over TCP."""
        await super().write(_Envelope(None, *views).pickled(), on_error="raise")

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
        buffer = link.host.buffer  # a link's outbox keeps it
        assert outbox is not None and buffer is not None
        # Not pinned: the receiver hung up meanwhile, or has PIPE_REGIONS
        # messages of this link still to read.
        if not buffer.pin(outbox, views):
            await self._fall_back(views)
            return
        if link.same_process:
            for f, v in zip(frames, views):
                handoff.offer(f, v)
        fragments = [
            (np.frombuffer(v, dtype=np.uint8).ctypes.data, v.nbytes) for v in views if v.nbytes
        ]
        descriptor = encode([v.nbytes for v in views], fragments, remote=True)
        await super().write(_Envelope(descriptor).pickled(), on_error="raise")
        stats.count("shm-messages")
        stats.count("shm-bytes", sum(n for _, n in fragments))
        stats.count("single-copy-messages")

    async def _stream(self, link: Link, views: list[memoryview]) -> None:
        """Send ``views`` through the buffer (see the class Notes)."""
        outbox = link.outbox
        buffer = link.host.buffer
        if outbox is None or buffer is None or outbox.closed:
            raise CommClosedError(f"in {self}: closed while streaming")
        source = _Cursor(views)
        lengths: list[int] | None = [v.nbytes for v in views]
        placed = 0  # regions of this message, placed so far
        while source.remaining:
            fragments: list[tuple[int, int]] = []
            inline: list[memoryview] = []
            seen = outbox.freed
            # Regions are released in the order they were placed, so this
            # message's still in flight are the newest of the link's.
            while source.remaining and min(placed, len(outbox.inflight)) < IN_FLIGHT:
                n = min(link.fragment_size, source.remaining)
                seen = outbox.freed
                offset = buffer.place(outbox, n)
                if offset is None:
                    break
                pieces = source.take(n)
                if _offloads(self.allow_offload, n):
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
                    await buffer.wait(outbox, seen)
                    continue
                # No room, and nothing of this link to wait for: TCP carries it.
                for piece in source.take(min(link.fragment_size, source.remaining)):
                    fragments.append((INLINE, piece.nbytes))
                    inline.append(piece)
                stats.count("fallback-busy")
            envelope = _Envelope(encode(lengths, fragments), *inline)
            await super().write(envelope.pickled(), on_error="raise")
            lengths = None

    def read(self, deserializers: Any = None) -> Coroutine[Any, Any, Any]:  # type: ignore[override]
        if self._handshake is not None:
            return self._read_handshake(deserializers)
        if self._link is None:
            return super().read(deserializers)
        return self._read_link(self._link, deserializers)

    async def _read_handshake(self, deserializers: Any) -> Any:
        """The peer's handshake message, then our side of the probe exchange."""
        try:
            msg = await super().read(deserializers)
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
            if self.closed() and not self._reading:  # see _stream_closed
                self._release()

    async def _read_message(self, link: Link, deserializers: Any) -> Any:
        msg = await super().read(deserializers)
        if type(msg) is not _Envelope:
            return msg
        try:
            frames = msg.frames if msg.descriptor is None else await self._receive(link, msg)
        except BaseException as e:
            # As TCP.read: once a message has started to arrive, anything
            # that stops its read (allocation, a copy, a cancellation) leaves
            # the rest of it unread, which the next read would take for
            # another message.  Abort: the release pipe closes, and the
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

    async def _receive(self, link: Link, envelope: _Envelope) -> list[memoryview]:
        """Copy a message's fragments out of the peer's buffer into frames
        allocated as ``TCP.read`` allocates them, releasing each region."""
        inbox = link.inbox
        if inbox is None:
            raise DescriptorError("a descriptor arrived, but the peer announced no buffer")
        lengths, fragments, remote = decode(
            envelope.descriptor,
            first=True,
            buffer_size=inbox.peer.size,
            remaining=None,
            inline=[nbytes(f) for f in envelope.frames],
        )
        assert lengths is not None
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
        sink = _Cursor([np.frombuffer(f, dtype=np.uint8) for f in frames])
        while True:
            inline = iter(envelope.frames)
            for offset, n in fragments:
                into = sink.take(n)
                if offset == INLINE:
                    _spread(np.frombuffer(next(inline), dtype=np.uint8), into)
                    continue
                if self.closed():
                    raise CommClosedError(f"in {self}: closed while receiving")
                if _offloads(self.allow_offload, n):
                    await offload(inbox.copy, offset, n, into)
                else:
                    inbox.copy(offset, n, into)
            if not sink.remaining:
                return frames
            envelope = await super().read()
            if type(envelope) is not _Envelope or envelope.descriptor is None:
                raise DescriptorError("expected the rest of a message, got another message")
            _, fragments, remote = decode(
                envelope.descriptor,
                first=False,
                buffer_size=inbox.peer.size,
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
            if _offloads(self.allow_offload, sum(d.nbytes for _, d in pairs)):
                await offload(inbox.read_in_place, link.peer, pairs)
            else:
                inbox.read_in_place(link.peer, pairs)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise CommClosedError(f"in {self}: the sender exited while we read ({e})") from e
            raise DescriptorError(
                f"cannot read {len(pairs)} frame(s) in the memory of pid {link.peer.pid}: {e}"
            ) from e

    # -- ending ----------------------------------------------------------------

    def _drop_handshake(self) -> None:
        if self._handshake is not None:
            self._handshake.abandon()
            self._handshake = None

    def _release(self) -> None:
        self._drop_handshake()
        link = self._link
        if link is not None:
            if link.pump is not None and link.pump is not _current_task():
                link.pump.cancel()  # the comm is closed: nothing more is sent
            link.close()

    @gen.coroutine
    def close(self):  # type: ignore[no-untyped-def]
        # A generator coroutine like TCP.close (see the comment there).
        self._closing = True
        try:
            link = self._link
            while link is not None and link.pump is not None and not self.closed():
                # What write() accepted is delivered, as TCP.close flushes.
                yield asyncio.wait([link.pump])
            if link is not None and not self.closed():
                yield link.read_in_place()
            yield super().close()
        finally:
            self._release()

    def abort(self) -> None:
        super().abort()
        self._release()


def _stream_closed(ref: weakref.ref[SHM]) -> None:
    """The comm's stream has closed: mark the comm closed, as TCP does, and
    end its link, unless a read is under way: a message the peer described
    before hanging up is still read (tornado hands out what it buffered),
    and the read ends the link when it ends.  A handshake under way ends
    through the error its own read or write gets (which sweeps what a
    killed peer left)."""
    _close_comm(ref)
    comm = ref()
    if comm is not None and not comm._reading and comm._handshake is None:
        comm._release()


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome seen: nobody awaits a shielded write whose
    stream was cancelled (what it raised went with the comm)."""
    if not future.cancelled():
        future.exception()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


class SHMConnector(TCPConnector):
    prefix = "shm://"
    comm_class = SHM
    encrypted = False


class SHMListener(TCPListener):
    prefix = "shm://"
    comm_class = SHM
    encrypted = False

    def __init__(
        self, address: str, comm_handler: Any, *args: Any, default_host: str | None = None,
        **kwargs: Any,
    ) -> None:
        if default_host is None:
            default_host = _worker_default_host(comm_handler)
        super().__init__(address, comm_handler, *args, default_host=default_host, **kwargs)

    async def start(self) -> None:
        settings()  # an invalid configuration fails here, at start-up
        await super().start()


def _worker_default_host(comm_handler: Any) -> str | None:
    """The host a Worker would advertise over ``tcp://``: the interface it
    reaches its scheduler on.  distributed's Worker passes it to its
    listener (``default_host``) only when its protocol is ``tcp`` or
    ``tls``, so over ``shm://`` a Worker started without a Nanny or a
    ``--host`` would advertise the default route's address instead, which
    host restrictions never match and peers may not reach.  Its listener's
    handler is the Worker's bound ``handle_comm``, whose ``scheduler``
    names that address."""
    worker_module = sys.modules.get("distributed.worker")
    server = getattr(comm_handler, "__self__", None)
    if worker_module is None or not isinstance(server, worker_module.Worker):
        return None
    try:
        return get_ip(get_address_host(server.scheduler.address))
    except (AttributeError, ValueError, OSError):
        return None


class SHMBackend(BaseTCPBackend):
    """The ``shm`` scheme, registered through the ``distributed.comm.backends``
    entry point."""

    _connector_class = SHMConnector
    _listener_class = SHMListener
