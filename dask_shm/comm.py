"""The ``shm://`` comm backend: distributed's TCP comm, with large frames moved
through shared memory once the handshake has proved that both ends share the
shm directory.

Like distributed's TLS comm, this is TCP with what differs changed: the comm
class extends the handshake and wraps ``read``/``write``; the connector,
listener and backend only swap the prefix and the comm class.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import pickle
import struct
import termios
import threading
import weakref
from collections.abc import Coroutine
from typing import Any

import numpy as np
from distributed.comm.core import CommClosedError
from distributed.comm.tcp import TCP, BaseTCPBackend, TCPConnector, TCPListener
from distributed.comm.utils import OFFLOAD_THRESHOLD, from_frames, to_frames
from distributed.protocol.serialize import Pickled, Serialize, Serialized, ToPickle
from distributed.sizeof import safe_sizeof
from distributed.utils import nbytes, offload
from tornado import gen

from dask_shm import family, metrics, stats
from dask_shm.config import Settings, settings
from dask_shm.pool import Pool, busy_probes, get_pool
from dask_shm.segments import (
    DescriptorError,
    Owner,
    SegmentMissing,
    ShmDirectory,
    ShmFull,
    _quiet_sweep,
    create_probe,
    current_owner,
    read_probe,
    unmap_later,
    warn_full_once,
)
from dask_shm.transfer import InFlight, Placed, assemble, place

__all__ = ["SHM", "SHMConnector", "SHMListener", "SHMBackend", "Link"]

logger = logging.getLogger(__name__)

#: Version of the handshake and descriptor protocol; peers must agree.
PROTOCOL = 1
#: How long a gracefully closed comm leaves un-taken-over segments for the
#: peer to read before unlinking them.
CLOSE_GRACE = 10.0
#: Delay before sweeping a vanished peer's segments (let it finish dying).
PEER_SWEEP_DELAY = 1.0
#: Large frames are never split into shards on the shared-memory path: a
#: segment holds a whole buffer, so the receiver's view of it is one piece.
NO_SPLIT = 2**62

_unusable_warned = False


class Link:
    """What a comm negotiated: shared memory with a proven peer.

    It also travels to serialization families in the write ``context``
    (key ``"dask-shm"``), so they can place buffers for this hop only.
    """

    def __init__(
        self,
        directory: ShmDirectory,
        peer: Owner,
        relay: bool,
        conf: Settings,
        forwarding: bool = False,
    ) -> None:
        self.directory = directory
        self.peer = peer
        #: The peer does not deserialize (a scheduler): what it receives is
        #: forwarded elsewhere, so serialization families must not describe
        #: segments to it (the comm itself re-places frames at every hop).
        self.relay = relay
        #: This end is a relay (it does not deserialize what it reads).
        self.forwarding = forwarding
        self.threshold = conf.threshold
        self.cold_transfer = conf.cold_transfer
        #: Serializers for writes that name none (``dask-shm.serializers``).
        self.serializers = conf.serializers
        self.pool: Pool = get_pool(conf.pool_size, conf.pool_idle_timeout)
        self.inflight = InFlight(directory)
        self.below_threshold = stats.Tally("below-threshold")
        self._warm: list[int] = []
        self._unmap: list[mmap.mmap] = []
        self._open = True
        self.pool.link_opened()

    def close(self) -> None:
        """The comm has ended (idempotent; see :meth:`Pool.link_closed`)."""
        if self._open:
            self._open = False
            self.pool.link_closed()

    def abandon(self) -> None:
        """The comm was dropped without closing: end the link and take back
        what it handed over that its peer never took."""
        self.close()
        self.inflight.discard()

    def pop_warm(self) -> list[int]:
        sizes, self._warm = self._warm, []
        return sizes

    def place(self, frames: list[Any]) -> Placed:
        """Place ``frames`` for this hop (:func:`transfer.place` with this
        link's settings), remember what went in flight, and defer the warm-ups
        and unmaps until the comm has written the message.  Blocking: the
        comm offloads it for large messages; serialization families call it
        while the comm serializes."""
        self.inflight.prune()
        placed = place(
            frames,
            directory=self.directory,
            pool=self.pool,
            threshold=self.threshold,
            cold_transfer=self.cold_transfer,
            relay=self.forwarding,
        )
        self.inflight.add(placed.names)
        self._warm.extend(placed.warm)
        self._unmap.extend(placed.unmap)
        return placed

    @property
    def deferred(self) -> bool:
        """Whether a serialization family left work for after the write."""
        return bool(self._warm or self._unmap)

    def unmap_pending(self) -> None:
        mappings, self._unmap = self._unmap, []
        unmap_later(mappings)

    def __repr__(self) -> str:
        return f"<Link {self.directory.path} peer pid {self.peer.pid}>"


#: How many objects :func:`_reaches` looks at before asking ``sizeof``.
_REACHES_BUDGET = 10_000


def _reaches(msg: Any, threshold: int) -> bool:
    """Whether ``msg`` may carry ``threshold`` bytes or more: the test that
    sends it through shared memory or straight to TCP.

    The common containers and buffers are measured directly, anything else
    with Dask's ``sizeof``.  It runs for every message on every shared-memory
    comm: ``safe_sizeof`` of a small ``{"x": to_serialize(array)}`` costs
    ~12 us here, a measurable share of a 0.45 ms round trip; this costs ~1 us
    (0.1 us for bytes).
    """
    t = type(msg)
    if t is bytes or t is str:
        return len(msg) >= threshold
    total = 0
    stack = [msg]
    budget = _REACHES_BUDGET
    while stack:
        budget -= 1
        if not budget:  # a huge message: estimate it whole
            return safe_sizeof(msg, default_size=0) >= threshold
        x = stack.pop()
        t = type(x)
        if t is dict:
            stack.extend(x.values())
            total += 8 * len(x)
            continue
        if t is list or t is tuple:
            stack.extend(x)
            total += 8 * len(x)
            continue
        if t in _SCALARS:
            continue
        if t is bytes or t is bytearray or t is str:
            total += len(x)
        elif t is memoryview or t is np.ndarray:
            total += x.nbytes
        elif t is Serialize or t is ToPickle:
            stack.append(x.data)
            continue
        elif t is Serialized or t is Pickled:
            total += sum(map(nbytes, x.frames))
            total += len(x.header.get("pickled-obj", b""))  # Pickled's in-band part
        else:
            total += safe_sizeof(x, default_size=0)
        if total >= threshold:
            return True
    return False


_SCALARS = frozenset((int, float, bool, type(None)))


class _Envelope:
    """A message whose frames partly live in shared memory (see :class:`SHM`)."""

    __slots__ = ("descriptor", "frames")

    def __init__(self, descriptor: bytes | None, *frames: Any) -> None:
        self.descriptor = descriptor
        self.frames = list(frames)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Envelope, (self.descriptor, *map(pickle.PickleBuffer, self.frames)))

    def pickled(self) -> Pickled:
        out: list[memoryview] = []
        pik = pickle.dumps(self, protocol=5, buffer_callback=lambda b: out.append(b.raw()))
        return Pickled({"pickled-obj": pik}, out)


def _local_directory() -> tuple[Settings, ShmDirectory | None]:
    """Settings, and the shm directory if this process may use it."""
    global _unusable_warned
    conf = settings()
    metrics.ensure_registered()
    if not conf.enabled:
        return conf, None
    reason = ShmDirectory.unusable_reason(conf.directory)
    if reason is not None:
        if not _unusable_warned:
            _unusable_warned = True
            logger.warning(
                "dask-shm: shared memory is unusable (%s); shm:// comms use plain TCP. "
                "Set dask-shm.directory to a writable tmpfs to enable it.",
                reason,
            )
        return conf, None
    return conf, ShmDirectory.get(conf.directory)


class SHM(TCP):
    """A TCP comm that moves large frames through shared memory.

    Notes
    -----
    **Handshake.**  ``handshake_info`` adds ``"dask-shm": {"version", "probe",
    "owner", "relay"}``: ``probe`` names a fresh file in the shm directory
    holding a random token, ``owner`` is this process's (pid, start time, pid
    namespace).  If both peers sent the key with the same version, each reads
    the other's probe and both exchange one extra message
    ``{"dask-shm-echo": token-or-None}``.  Shared memory is used only if each
    side read the other's token: that proves a shared directory, the same
    user and the same host, whatever the IP addresses say.  Otherwise, or if
    the peer is a plain TCP comm, nothing more is exchanged and the comm is
    TCP byte for byte.

    **Messages.**  After a successful handshake, a message that might hold a
    frame of ``dask-shm.threshold`` bytes or more is serialized here (without
    sharding); each such frame is copied into its own pre-faulted segment and
    the message is written as a ``Pickled`` envelope: the descriptor (see
    :mod:`dask_shm.descriptor`) in-band and the remaining frames out-of-band,
    so TCP sends them without copying.  The receiver validates the
    descriptor, takes each segment over by renaming it, maps it, and
    deserializes the frames zero-copy.  All other messages are plain TCP.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (directory, probe name, token, settings) between handshake_info and
        #: the end of the handshake.
        self._probe: tuple[ShmDirectory, str, str, Settings] | None = None
        self._link: Link | None = None
        #: Messages written as plain TCP, counted as fallback-<why> once the
        #: handshake said why: "disabled" (by configuration, or the directory
        #: is unusable), "plain-peer" (the peer is tcp:// or an older
        #: dask-shm), "no-probe" (another host, user or directory),
        #: "probe-failed" (ours could not be created: a full directory).
        self._plain: stats.Tally | None = None

    # -- handshake -----------------------------------------------------------

    def handshake_info(self) -> dict[str, Any]:
        info = super().handshake_info()
        conf, directory = _local_directory()
        if directory is not None:
            try:
                name, token = create_probe(directory)
            except OSError as e:  # no room even for a probe, say: this comm is TCP
                if isinstance(e, ShmFull):
                    warn_full_once(e)
                else:
                    logger.warning("dask-shm: cannot create a handshake probe (%s); using TCP", e)
                directory = None
                self._plain = stats.Tally("fallback-probe-failed")
        if directory is None:
            if self._plain is None:
                self._plain = stats.Tally("fallback-disabled")
        else:
            self._probe = (directory, name, token, conf)
            # distributed does not close a comm whose handshake failed (the
            # peer died, the connect timed out): the probe must not outlive
            # this object.  The read/write paths below remove it sooner.
            weakref.finalize(self, directory.unlink, name)
            info["dask-shm"] = {
                "version": PROTOCOL,
                "probe": name,
                "owner": current_owner().as_tuple(),
                "relay": not self.deserialize,
            }
        return info

    async def _negotiate(self, remote: Any) -> None:
        assert self._probe is not None
        directory, probe, token, conf = self._probe
        try:
            theirs = remote.get("dask-shm") if isinstance(remote, dict) else None
            if not isinstance(theirs, dict) or theirs.get("version") != PROTOCOL:
                stats.count("handshake-plain")
                self._plain = stats.Tally("fallback-plain-peer")
                return
            try:
                peer = Owner(*map(int, theirs["owner"]))
                their_token = read_probe(directory, theirs["probe"], peer)
            except (KeyError, TypeError, ValueError):
                peer, their_token = None, None
            await super().write({"dask-shm-echo": their_token})
            echo = await super().read()
        finally:
            directory.unlink(probe)
            self._probe = None
        ok = (
            peer is not None
            and their_token is not None
            and isinstance(echo, dict)
            and echo.get("dask-shm-echo") == token
        )
        if not ok or peer is None:
            stats.count("handshake-no-probe")
            self._plain = stats.Tally("fallback-no-probe")
            logger.debug("%s: peer does not share %s; using TCP", self, directory.path)
            return
        self._link = link = Link(
            directory, peer, bool(theirs.get("relay")), conf, forwarding=not self.deserialize
        )
        stats.count("handshake-shm")
        _linked.add(self)
        weakref.finalize(self, link.abandon)

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
    # for an extra coroutine frame otherwise (a few percent of a small
    # message's round trip).

    def write(  # type: ignore[override]
        self, msg: Any, serializers: Any = None, on_error: str = "message"
    ) -> Coroutine[Any, Any, int]:
        link = self._link
        if link is None:
            if self._probe is not None:
                return self._write_handshake(msg, serializers, on_error)
            if self._plain is not None:
                self._plain.n += 1
            return super().write(msg, serializers, on_error)
        if serializers is None:
            serializers = link.serializers
        if _reaches(msg, link.threshold):
            return self._write_large(link, msg, serializers, on_error)
        link.below_threshold.n += 1
        if serializers is not None and family.NAME in serializers:
            return self._write_small(link, msg, serializers, on_error)
        return super().write(msg, serializers, on_error)

    async def _write_handshake(self, msg: Any, serializers: Any, on_error: str) -> int:
        try:
            return await super().write(msg, serializers, on_error)
        except BaseException:
            self._drop_probe()
            raise

    async def _write_small(self, link: Link, msg: Any, serializers: Any, on_error: str) -> int:
        """A message sent as plain TCP whose serialization may still place
        buffers through the "shm" family."""
        try:
            return await super().write(msg, serializers, on_error)
        finally:
            if link.deferred:
                link.unmap_pending()
                self._warm_after_flush(link, link.pop_warm())

    async def _write_large(self, link: Link, msg: Any, serializers: Any, on_error: str) -> int:
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
        total = sum(map(nbytes, frames))
        link.pool.note_activity()  # warm-ups that create pages yield to this
        if total > OFFLOAD_THRESHOLD:
            placed = await offload(link.place, frames)
        else:
            placed = link.place(frames)
        if placed.descriptor is None:
            stats.count("tcp-messages")
            stats.count("tcp-bytes", total)
        else:
            stats.count("shm-messages")
            stats.count("shm-bytes", placed.nbytes)
        envelope = _Envelope(placed.descriptor, *placed.inline)
        try:
            n = await super().write(envelope.pickled(), on_error="raise")
        except BaseException:
            link.inflight.discard()
            raise
        finally:
            link.unmap_pending()
            link.pool.note_activity()
        self._warm_after_flush(link, link.pop_warm())
        return n + placed.nbytes

    def _warm_after_flush(self, link: Link, sizes: list[int]) -> None:
        """Warm the pool once this message has left: TCP.write returns with
        the bytes still queued, and a 400 MB cold transfer takes a while to
        drain; warming meanwhile would compete with it for CPU and memory
        bandwidth."""
        if not sizes:
            return

        def warm(fut: Any = None) -> None:
            if fut is not None:
                fut.exception()  # closed meanwhile: warm anyway, harmlessly
            for size in sizes:
                link.pool.warm(link.directory, size)

        stream = self.stream
        if stream is None or not stream.writing():
            warm()
        else:
            stream.write(b"").add_done_callback(warm)

    def read(self, deserializers: Any = None) -> Coroutine[Any, Any, Any]:  # type: ignore[override]
        if self._probe is not None:
            return self._read_handshake(deserializers)
        if self._link is None:
            return super().read(deserializers)
        return self._read_link(self._link, deserializers)

    async def _read_handshake(self, deserializers: Any) -> Any:
        """The peer's handshake message, then our side of the probe exchange."""
        try:
            msg = await super().read(deserializers)
        except BaseException:
            self._drop_probe()
            raise
        await self._negotiate(msg)
        return msg

    async def _read_link(self, link: Link, deserializers: Any) -> Any:
        try:
            msg = await super().read(deserializers)
            if type(msg) is not _Envelope:
                return msg
            return await self._open_envelope(link, msg, deserializers)
        except CommClosedError:
            self._sweep_peer_later()
            raise
        except (DescriptorError, SegmentMissing) as e:
            # From the comm's descriptor or a serialization family's header.
            self.abort()
            raise CommClosedError(f"in {self}: {e}") from e

    async def _open_envelope(self, link: Link, msg: _Envelope, deserializers: Any) -> Any:
        link.pool.note_activity()
        frames = msg.frames
        if msg.descriptor is not None:
            frames = assemble(
                msg.descriptor,
                frames,
                directory=link.directory,
                owner=link.peer,
                pool=link.pool,
                relay=not self.deserialize,
            )
        try:
            return await from_frames(
                frames,
                deserialize=self.deserialize,
                deserializers=deserializers,
                allow_offload=self.allow_offload,
            )
        except EOFError as e:
            self.abort()
            raise CommClosedError(f"in {self}: aborted stream on truncated data") from e

    # -- ending ----------------------------------------------------------------

    def _drop_probe(self) -> None:
        if self._probe is not None:
            directory, probe, _, _ = self._probe
            directory.unlink(probe)
            self._probe = None

    def _release(self, grace: float) -> None:
        self._drop_probe()
        link = self._link
        if link is not None:
            link.unmap_pending()
            link.close()
        if link is not None and len(link.inflight):
            if grace > 0:
                timer = threading.Timer(grace, link.inflight.discard)
                timer.daemon = True
                timer.start()
            else:
                link.inflight.discard()

    def _sweep_peer_later(self) -> None:
        link = self._link
        if link is not None:
            timer = threading.Timer(
                PEER_SWEEP_DELAY, _quiet_sweep, (link.directory,), {"owner": link.peer}
            )
            timer.daemon = True
            timer.start()

    @gen.coroutine
    def close(self):  # type: ignore[no-untyped-def]
        # A generator coroutine like TCP.close (see the comment there).
        try:
            yield super().close()
        finally:
            self._release(CLOSE_GRACE)

    def abort(self) -> None:
        super().abort()
        self._release(0)


#: Comms of this process with a shared-memory link (see :func:`_moving_bytes`).
_linked: weakref.WeakSet[SHM] = weakref.WeakSet()
#: Bytes queued in a socket that mean a large message is on its way.
BUSY_QUEUE = 256 * 1024


def _moving_bytes() -> bool:
    """Whether a linked comm of this process has a large message in flight
    over TCP (a cold transfer): at least ``BUSY_QUEUE`` bytes queued in its
    socket, either way.  A busy probe of the pool (see ``Pool.busy``), run
    in its threads: a closed socket is skipped, and a race with the event
    loop can only make it say "busy" once too often or too rarely."""
    try:
        comms = list(_linked)
    except RuntimeError:  # the set changed while copied
        return True
    for comm in comms:
        stream = comm.stream
        sock = None if stream is None else stream.socket
        fd = -1 if sock is None else sock.fileno()
        if fd < 0:
            continue
        for request in (termios.FIONREAD, termios.TIOCOUTQ):
            try:
                queued = struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
            except OSError:
                break
            if queued >= BUSY_QUEUE:
                return True
    return False


busy_probes.append(_moving_bytes)


class SHMConnector(TCPConnector):
    prefix = "shm://"
    comm_class = SHM
    encrypted = False


class SHMListener(TCPListener):
    prefix = "shm://"
    comm_class = SHM
    encrypted = False

    async def start(self) -> None:
        settings()  # an invalid configuration fails here, at start-up
        await super().start()


class SHMBackend(BaseTCPBackend):
    """The ``shm`` scheme, registered through the ``distributed.comm.backends``
    entry point."""

    _connector_class = SHMConnector
    _listener_class = SHMListener
