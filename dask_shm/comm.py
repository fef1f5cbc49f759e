"""The ``shm://`` comm backend: distributed's TCP comm, with large messages
moved through shared memory once the handshake has proved that both ends
share the host, the user and the shm directory.

Like distributed's TLS comm, this is TCP with what differs changed: the comm
class extends the handshake (:mod:`dask_shm.handshake`) and wraps ``write``
(:mod:`dask_shm.send`) and ``read`` (:mod:`dask_shm.receive`); the
connector, listener and backend only swap the prefix and the comm class.

distributed names dask_shm uses beyond its documented comm and
serialization API, in every module (pin the distributed range in
setup.cfg):

- here: ``TCP``, ``TCPConnector``, ``TCPListener``, ``BaseTCPBackend`` (to
  subclass, with the private ``_connector_class``/``_listener_class`` the
  TLS backend swaps too); the private ``_close_comm`` (the callback ``TCP``
  gives its stream, which we extend, through tornado's
  ``IOStream.set_close_callback``); ``Worker.handle_comm``'s ``__self__``
  and ``Worker.scheduler`` (see ``_worker_default_host``); ``get_ip``
  (``distributed.utils``);
- :mod:`dask_shm.send`: ``to_frames`` (``distributed.comm.utils``),
  ``offload`` and ``ensure_memoryview`` (``distributed.utils``);
- :mod:`dask_shm.receive`: ``from_frames`` (``distributed.comm.utils``),
  ``host_array`` (``distributed.protocol.utils``), ``offload`` and
  ``nbytes`` (``distributed.utils``);
- :mod:`dask_shm.estimate`: ``OFFLOAD_THRESHOLD``
  (``distributed.comm.utils``), ``Pickled``, ``ToPickle``, ``Serialize``
  and ``Serialized`` (``distributed.protocol.serialize``), ``safe_sizeof``
  (``distributed.sizeof``), ``nbytes`` (``distributed.utils``);
- :mod:`dask_shm.descriptor`: ``Pickled``, ``ensure_memoryview``;
- :mod:`dask_shm.handshake`: ``offload`` (``distributed.utils``);
- :mod:`dask_shm.family`: ``distributed.protocol.pickle`` (``dumps`` and
  ``loads`` with out-of-band buffers);
- :mod:`dask_shm.config`: ``distributed.protocol.serialize.families`` (the
  registered family names, to validate ``dask-shm.serializers``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import weakref
from typing import Any

from distributed.comm.addressing import get_address_host
from distributed.comm.core import CommClosedError
from distributed.comm.tcp import TCP, BaseTCPBackend, TCPConnector, TCPListener, _close_comm
from distributed.utils import get_ip
from tornado import gen
from tornado.iostream import IOStream

from dask_shm import handshake, stats
from dask_shm.config import settings
from dask_shm.handshake import Link
from dask_shm.host import later
from dask_shm.receive import Receiver
from dask_shm.send import Sender

__all__ = ["SHM", "SHMConnector", "SHMListener", "SHMBackend", "Link"]

logger = logging.getLogger(__name__)


class SHM(Sender, Receiver, TCP):
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

    #: TCP's own write and read, which the Sender and Receiver mixins call
    #: for what goes over the socket as it is.
    _tcp_write = TCP.write
    _tcp_read = TCP.read
    #: This end made the TCP connection (set by SHMConnector); the other
    #: end, which accepted it, creates the link's release socket.
    initiator = False

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
                remote,
                lambda msg: TCP.write(self, msg),
                lambda: TCP.read(self),
                self.closed,
                accepting=not self.initiator,
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

    # -- ending ----------------------------------------------------------------

    def _drop_handshake(self) -> None:
        if self._handshake is not None:
            self._handshake.abandon()
            self._handshake = None

    def _release(self) -> None:
        self._drop_handshake()
        self._end_link()

    def _end_link(self) -> None:
        """End the link, if there is one (idempotent); a handshake under way
        is left to its own error path, which sweeps what a killed peer left."""
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
                yield link.wait_until_released()
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
    and the read ends the link when it ends."""
    _close_comm(ref)
    comm = ref()
    if comm is not None and not comm._reading:
        comm._end_link()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


class SHMConnector(TCPConnector):
    prefix = "shm://"
    comm_class = SHM
    encrypted = False

    async def connect(self, address: str, deserialize: bool = True, **kwargs: Any) -> SHM:
        comm = await super().connect(address, deserialize, **kwargs)
        comm.initiator = True  # before distributed's handshake, which follows
        return comm


class SHMListener(TCPListener):
    prefix = "shm://"
    comm_class = SHM
    encrypted = False

    def __init__(
        self,
        address: str,
        comm_handler: Any,
        deserialize: bool = True,
        allow_offload: bool = True,
        default_host: str | None = None,
        **kwargs: Any,
    ) -> None:
        if default_host is None:
            default_host = _worker_default_host(comm_handler)
        super().__init__(
            address, comm_handler, deserialize, allow_offload, default_host, **kwargs
        )

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
