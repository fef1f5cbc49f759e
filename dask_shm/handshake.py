"""The handshake: how two ``shm://`` ends prove that they share the host, the
user and the shm directory, and what each sets up once they have.  The
messages and their keys are specified in docs/protocol.md.

Nothing of ours exists per connection before the peer is proven: a
connection that never says anything costs a :class:`Handshake` object and
one use of this process's :class:`~dask_shm.host.Host` (whose probe and
buffer are per process), no file and no descriptor.  A release socket
(:mod:`dask_shm.release`) is made only for a peer that read our probe, by
the end that accepted the TCP connection, and stops listening as soon as
the peer has connected, or the handshake ended otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from distributed.comm.core import CommClosedError
from distributed.utils import offload

from dask_shm import metrics, stats
from dask_shm.outbox import Outbox, running_loop
from dask_shm.config import Settings, settings
from dask_shm.errors import DescriptorError, ShmFull
from dask_shm.host import Host, later, read_probe, warn_once
from dask_shm.inbox import Inbox, PeerBuffer
from dask_shm.janitor import quiet_sweep
from dask_shm.names import Directory, Owner, current_owner, held
from dask_shm.release import Channel, accept, connect, listen
from dask_shm.single_copy import declare_readable, reads_token

__all__ = ["PROTOCOL", "Link", "Handshake", "start"]

logger = logging.getLogger(__name__)

#: Version of the handshake, envelope and descriptor protocol; peers must
#: agree (docs/protocol.md).
PROTOCOL = 4


class Link:
    """What a comm negotiated: shared memory with a proven peer.

    It also travels to serialization families in the write ``context``
    (key ``"dask-shm"``), so the ``"shm"`` family knows the hop is shared.
    """

    def __init__(
        self,
        host: Host,
        peer: Owner,
        outbox: Outbox | None,
        inbox: Inbox | None,
        relay: bool,
        conf: Settings,
    ) -> None:
        self.host = host
        self.peer = peer
        #: What the peer has not released of ours (None: nothing of ours goes
        #: to it through shared memory: we have no buffer, and it cannot
        #: read our memory).
        self.outbox = outbox
        #: The peer's buffer and our side of the release channel (None:
        #: nothing of the peer's comes through shared memory).
        self.inbox = inbox
        #: The peer does not deserialize (a scheduler): what it receives is
        #: forwarded elsewhere, so the "shm" family must not be used for it.
        self.relay = relay
        self.threshold = conf.threshold
        self.fragment_size = conf.fragment_size
        #: Serializers for writes that name none (``dask-shm.serializers``).
        self.serializers = conf.serializers
        #: The peer reads our frames in place (one copy): set by the handshake.
        self.single_copy = False
        #: We read the peer's frames in place: set by the handshake.
        self.reads_in_place = False
        #: The peer is this very process (a client in its scheduler's
        #: process): frames may be handed over rather than copied (see
        #: :mod:`dask_shm.handoff`).
        self.same_process = peer == current_owner()
        self.below_threshold = stats.Tally("below-threshold")
        #: While a message streams through the buffer, the messages written
        #: after it, serialized, in order: (frames, through the buffer?).  No
        #: message may start between the fragments of another.  None: nothing
        #: is streaming, and messages go straight to TCP.
        self.queue: deque[tuple[list[memoryview], bool]] | None = None
        #: The task streaming the queue (see SHM._pump).
        self.pump: asyncio.Future[None] | None = None
        #: Writes on their way straight to TCP: envelopes, in-place
        #: descriptors, and small messages on a link that streams (on one
        #: that reads in place they go to TCP uncounted).  Their
        #: serialization may yield (distributed offloads what is large or
        #: what it cannot size), so a stream starts only once they are in
        #: the stream (``tcp_drained``).
        self.tcp_writes = 0
        self.tcp_drained: asyncio.Future[None] | None = None
        #: The comm's loop, which a finalizer hands the link's end to.
        self.loop = running_loop()
        #: Ends the link if its comm is dropped unclosed (see host.later).
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self._open = True
        held(self)

    def drop_in_child(self) -> None:
        """In a forked child: the link is its parent's to end (its outbox
        and inbox drop their descriptors themselves)."""
        self._open = False
        self.queue = None
        if self.finalizer is not None:
            self.finalizer.detach()

    async def wait_until_released(self) -> None:
        """Wait until the peer has read what it reads in place from our
        memory (or hung up).  ``TCP.close`` returns once the kernel holds
        every byte written, so a process may exit right after it; frames
        read in place live in this process until released."""
        box = self.outbox
        while box is not None and box.pinned and not box.closed:
            await self.host.outboxes.wait(box, box.release_count)

    def written_direct(self) -> None:
        """A write straight to TCP has ended: wake a stream waiting for it."""
        self.tcp_writes -= 1
        if not self.tcp_writes and self.tcp_drained is not None:
            if not self.tcp_drained.done():
                self.tcp_drained.set_result(None)
            self.tcp_drained = None

    def close(self) -> None:
        """The comm has ended (idempotent)."""
        if not self._open:
            return
        self._open = False
        if self.finalizer is not None:
            self.finalizer.detach()
        if self.inbox is not None:
            self.host.drop_inbox(self.inbox)
        quiet_sweep(self.host.directory, owner=self.peer)  # if it was killed (-9)
        if self.outbox is not None:
            # Our use of the host ends once the peer has released what it
            # may still read (at once if nothing).
            self.host.outboxes.retire(self.outbox, self.host.release)
        else:
            self.host.release()

    def __repr__(self) -> str:
        return f"<Link {self.host.path} peer pid {self.peer.pid}>"


def start() -> tuple[Handshake | None, str]:
    """A handshake for a new ``shm://`` comm, if this process may use
    shared memory; else None and why not (a fallback counter name)."""
    conf = settings()
    metrics.ensure_registered()
    if not conf.enabled:
        return None, "fallback-disabled"
    reason = Directory.unusable_reason(conf.directory)
    if reason is not None:
        warn_once(
            f"shared memory is unusable ({reason}); shm:// comms use plain TCP. "
            "Set dask-shm.directory to a writable tmpfs such as /dev/shm to enable it"
        )
        return None, "fallback-disabled"
    try:
        host = Host.acquire(conf.directory, conf.buffer_size)
    except OSError as e:  # no room or no inode even for the probe
        warn_once(
            str(e.strerror)  # names the file, the size, the free space, the remedy
            if isinstance(e, ShmFull)
            else f"cannot use {conf.directory} ({e}); shm:// comms use TCP meanwhile. "
            "Free space or inodes there, or set dask-shm.directory"
        )
        return None, "fallback-probe-failed"
    # Before our info tells peers where to read us (Yama scope 1).
    declare_readable(conf.single_copy)
    return Handshake(host, conf), ""


Write = Callable[[Any], Awaitable[Any]]
Read = Callable[[], Awaitable[Any]]


class Handshake:
    """One comm's negotiation under way.  It holds one use of the host until
    it ends: as a :class:`Link`, which takes that use over, or abandoned
    (the comm is TCP)."""

    def __init__(self, host: Host, conf: Settings) -> None:
        self.host = host
        self.conf = conf
        #: Our listening release socket, made once the peer is proven, on
        #: the accepting end only: (name, socket).
        self.release: str | None = None
        self.listener: socket.socket | None = None
        #: Abandons the handshake if its comm is dropped midway (distributed
        #: does not close a comm whose handshake failed).
        self.finalizer: weakref.finalize[Any, Any] | None = None
        #: The loop of the comm, which a finalizer hands its work to.
        self.loop = running_loop()
        self._done = False
        self._abandoned = False
        held(self)

    def watch(self, comm: object) -> None:
        """Abandon this handshake if ``comm`` is dropped before it ends."""
        self.finalizer = weakref.finalize(comm, self.abandon, from_finalizer=True)

    def info(self, relay: bool) -> dict[str, Any]:
        """What ``handshake_info`` adds (docs/protocol.md, message 1)."""
        host = self.host
        return {
            "version": PROTOCOL,
            "owner": current_owner().as_tuple(),
            "probe": host.probe,
            "memory": ctypes.addressof(host.memory) if self.conf.single_copy else None,
            "relay": relay,
            "buffer": None if host.buffer is None else host.buffer.name,
            "size": None if host.buffer is None else host.buffer.size,
        }

    def _shares(self, theirs: dict[str, Any]) -> bool:
        """Whether either end may send the other anything through shared
        memory (a buffer, or memory read in place): then the link needs a
        release channel.  Both ends compute the same answer."""
        host = self.host
        return (
            host.buffer is not None
            or self.conf.single_copy
            or theirs.get("buffer") is not None
            or theirs.get("memory") is not None
        )

    async def negotiate(
        self,
        remote: Any,
        write: Write,
        read: Read,
        closed: Callable[[], bool],
        accepting: bool,
    ) -> tuple[Link | None, str]:
        """Prove the peer and set up the link (docs/protocol.md, messages 2
        and 3), with the comm's plain TCP ``write`` and ``read``;
        ``accepting``: this end accepted the TCP connection (it creates the
        release socket and reads the last message first).  The link, or
        None and the fallback counter naming why the comm is TCP."""
        host = self.host
        theirs = remote.get("dask-shm") if isinstance(remote, dict) else None
        if not isinstance(theirs, dict) or theirs.get("version") != PROTOCOL:
            stats.count("handshake-plain")
            self.abandon()
            return None, "fallback-plain-peer"
        peer: Owner | None = None
        their_token: str | None = None
        buffer: PeerBuffer | None = None
        channel: Channel | None = None
        try:
            try:
                peer = Owner.from_tuple(theirs.get("owner"))
                their_token = read_probe(host.directory, theirs.get("probe"), peer)
            except DescriptorError as e:
                logger.debug("peer's handshake unusable: %s", e)
            in_place = False
            if peer is not None and their_token is not None:  # only now: the peer is proven
                if self.conf.single_copy:
                    refused = reads_token(peer, theirs.get("memory"), their_token)
                    if refused is not None:  # the buffer carries the peer's messages
                        stats.count(f"single-copy-refused-{refused}")
                    in_place = refused is None
                if accepting and self._shares(theirs):
                    try:
                        self.release, self.listener = listen()
                    except OSError as e:  # out of descriptors: nothing shared with it
                        warn_once(f"cannot create a release socket ({e}); "
                                  "large messages to some peers go over TCP")
                        stats.count("fallback-no-channel")
            await write({"dask-shm-echo": their_token, "read-memory": in_place,
                         "release": self.release})
            echo = await read()
            if not (
                peer is not None
                and their_token is not None
                and isinstance(echo, dict)
                and echo.get("dask-shm-echo") == host.token
            ):
                stats.count("handshake-no-probe")
                logger.debug("peer does not share %s; using TCP", host.path)
                self.abandon()
                return None, "fallback-no-probe"
            try:
                buffer = self._peer_buffer(peer, theirs)
                if not accepting and echo.get("release") is not None:
                    channel = connect(echo.get("release"), peer)
                opened = True
            except (DescriptorError, OSError) as e:
                logger.debug("cannot open the peer's buffer or release socket: %s", e)
                opened = False
            if accepting:  # the peer has connected by the time it says so
                ack = await read()
                if opened and self.listener is not None and _ready(ack):
                    channel = accept(self.listener, peer)
                    opened = channel is not None
                await write({"dask-shm-ready": opened})
            else:
                await write({"dask-shm-ready": opened})
                ack = await read()
        except BaseException:
            self.fail(peer)
            _let_go(host, buffer, channel)
            raise
        finally:
            self.end()  # the peer has connected by now, or never will
        if not (opened and _ready(ack)):
            stats.count("handshake-not-opened")
            _let_go(host, buffer, channel)
            self.abandon()
            return None, "fallback-not-opened"
        reads_us = echo.get("read-memory") is True
        return await self._link(peer, theirs, buffer, channel, in_place, reads_us, closed), ""

    def _peer_buffer(self, peer: Owner, theirs: dict[str, Any]) -> PeerBuffer | None:
        """The peer's buffer, if it named one."""
        if theirs.get("buffer") is None:
            return None
        return self.host.peer(theirs.get("buffer"), peer, theirs.get("size"))

    async def _link(
        self,
        peer: Owner,
        theirs: dict[str, Any],
        buffer: PeerBuffer | None,
        channel: Channel | None,
        in_place: bool,
        reads_us: bool,
        closed: Callable[[], bool],
    ) -> Link:
        host = self.host
        ours = host.buffer
        try:
            if channel is not None and ours is not None and not reads_us:
                # Messages to this peer go through the buffer: fill it now
                # (once per process; a link that reads in place never needs
                # it).  If there is no room, the link's messages try again,
                # one by one.
                await offload(host.fill)
                if closed():  # aborted meanwhile (a listener stopping)
                    raise CommClosedError("closed during the handshake")
            if self._abandoned:  # the comm was aborted, which gave our use back
                raise CommClosedError("aborted during the handshake")
        except BaseException:  # nothing of this link may stay
            _let_go(host, buffer, channel)
            self.abandon()  # our use of the host, unless the abort gave it back
            raise
        outbox = inbox = None
        if channel is not None:
            if ours is not None or reads_us:
                outbox = host.outboxes.attach(channel)
            if buffer is not None or in_place:
                inbox = Inbox(buffer, channel)
                buffer = None  # the inbox holds it now
            channel.drop()  # the handshake's use
        _let_go(host, buffer, None)
        link = Link(host, peer, outbox, inbox, bool(theirs.get("relay")), self.conf)
        link.single_copy = outbox is not None and reads_us
        link.reads_in_place = inbox is not None and in_place
        stats.count("handshake-shm")
        return link

    def drop_in_child(self) -> None:
        """In a forked child: the handshake is its parent's."""
        self._done = self._abandoned = True
        if self.finalizer is not None:
            self.finalizer.detach()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()

    def end(self) -> None:
        """No peer will connect to our release socket any more: close it.
        Idempotent; lock-free (a finalizer may call it)."""
        if self._done:
            return
        self._done = True
        if self.finalizer is not None:
            self.finalizer.detach()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()

    def fail(self, peer: Owner | None) -> None:
        """The handshake broke off after ``peer`` (if known) said who it is:
        if it was killed, remove what it left (no link to it exists whose
        end would), then abandon."""
        if peer is not None and not self._abandoned:
            quiet_sweep(self.host.directory, owner=peer)
        self.abandon()

    def abandon(self, *, from_finalizer: bool = False) -> None:
        """The handshake failed or fell back to TCP: remove everything.
        Idempotent."""
        if self._abandoned or (self._done and from_finalizer):
            return
        self._abandoned = True
        self.end()
        if from_finalizer:
            later(self.host.release, self.loop)
        else:
            self.host.release()


def _ready(message: object) -> bool:
    return isinstance(message, dict) and message.get("dask-shm-ready") is True


def _let_go(host: Host, buffer: PeerBuffer | None, channel: Channel | None) -> None:
    """Undo what a handshake opened for a link that will not be."""
    if buffer is not None:
        host.unpeer(buffer)
    if channel is not None:
        channel.drop()
