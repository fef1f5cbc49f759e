"""The handshake: how two ``shm://`` ends prove that they share the host, the
user and the shm directory, and what each sets up once they have.  The
messages and their keys are specified in docs/protocol.md.

Nothing of ours exists per connection before the peer is proven: a
connection that never says anything costs a :class:`Handshake` object and
one use of this process's :class:`~dask_shm.host.Host` (whose probe and
buffer are per process), no file and no descriptor.  A release pipe is made
only for a peer that read our probe, and its name is unlinked as soon as
the peer has said it opened it, or the handshake ended otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
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
from dask_shm.inbox import Inbox
from dask_shm.janitor import quiet_sweep
from dask_shm.names import Directory, Owner, close_quietly, current_owner, held
from dask_shm.single_copy import declare_readable, reads_token

__all__ = ["PROTOCOL", "Link", "Handshake", "start"]

logger = logging.getLogger(__name__)

#: Version of the handshake, envelope and descriptor protocol; peers must
#: agree (docs/protocol.md).
PROTOCOL = 3


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
        #: Where our messages to the peer go (None: we have no buffer).
        self.outbox = outbox
        #: Where the peer's messages come from (None: it has no buffer).
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
        box, buffer = self.outbox, self.host.buffer
        while box is not None and buffer is not None and box.pinned and not box.closed:
            await buffer.wait(box, box.release_count)

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
        buffer = self.host.buffer
        if self.outbox is not None and buffer is not None:
            # Our use of the host ends once the peer has released what it
            # may still read (at once if nothing).
            buffer.retire(self.outbox, self.host.release)
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
        #: Our release pipe, made once the peer is proven: (name, read end).
        self.pipe: str | None = None
        self.pipe_fd = -1
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

    async def negotiate(
        self, remote: Any, write: Write, read: Read, closed: Callable[[], bool]
    ) -> tuple[Link | None, str]:
        """Prove the peer and set up the link (docs/protocol.md, messages 2
        and 3), with the comm's plain TCP ``write`` and ``read``.  The link,
        or None and the fallback counter naming why the comm is TCP."""
        host = self.host
        theirs = remote.get("dask-shm") if isinstance(remote, dict) else None
        if not isinstance(theirs, dict) or theirs.get("version") != PROTOCOL:
            stats.count("handshake-plain")
            self.abandon()
            return None, "fallback-plain-peer"
        peer: Owner | None = None
        their_token: str | None = None
        inbox: Inbox | None = None
        try:
            try:
                peer = Owner.from_tuple(theirs.get("owner"))
                their_token = read_probe(host.directory, theirs.get("probe"), peer)
            except DescriptorError as e:
                logger.debug("peer's handshake unusable: %s", e)
            in_place = False
            if peer is not None and their_token is not None:
                if host.buffer is not None:  # only now: the peer is proven
                    try:
                        self.pipe, self.pipe_fd = host.new_pipe()
                    except OSError as e:  # no inode left: we send it nothing through shm
                        warn_once(f"cannot create a release pipe in {host.path} ({e}); "
                                  "large messages to some peers go over TCP")
                        stats.count("fallback-no-pipe")
                if self.conf.single_copy:
                    refused = reads_token(peer, theirs.get("memory"), their_token)
                    if refused is not None:  # the buffer carries the peer's messages
                        stats.count(f"single-copy-refused-{refused}")
                    in_place = refused is None
            await write({"dask-shm-echo": their_token, "read-memory": in_place,
                         "release": self.pipe})
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
                inbox = self._open_inbox(peer, theirs, echo.get("release"))
                opened = True
            except (DescriptorError, OSError) as e:
                logger.debug("cannot open the peer's buffer or release pipe: %s", e)
                opened = False
            await write({"dask-shm-ready": opened})
            ack = await read()
        except BaseException:
            self.fail(peer)
            if inbox is not None:
                host.drop_inbox(inbox)
            raise
        finally:
            self.end()  # the peer has opened our pipe by now, or never will
        if not (opened and isinstance(ack, dict) and ack.get("dask-shm-ready") is True):
            stats.count("handshake-not-opened")
            if inbox is not None:
                host.drop_inbox(inbox)
            self.abandon()
            return None, "fallback-not-opened"
        return await self._link(peer, theirs, inbox, echo.get("read-memory") is True, closed), ""

    def _open_inbox(self, peer: Owner, theirs: dict[str, Any], pipe: object) -> Inbox | None:
        """The peer's buffer and release pipe, if it named them."""
        if pipe is None:
            return None
        host = self.host
        buffer = host.peer(theirs.get("buffer"), peer, theirs.get("size"))
        try:
            return Inbox(buffer, host.directory, pipe, peer)
        except BaseException:
            host.unpeer(buffer)
            raise

    async def _link(
        self,
        peer: Owner,
        theirs: dict[str, Any],
        inbox: Inbox | None,
        read_in_place: bool,
        closed: Callable[[], bool],
    ) -> Link:
        host = self.host
        fd, self.pipe_fd = self.pipe_fd, -1
        buffer = host.buffer
        single_copy = buffer is not None and fd >= 0 and read_in_place
        if buffer is not None and not single_copy:
            # Messages to this peer go through the buffer: fill it now (once
            # per process; a link that reads in place never needs it).  If
            # there is no room, the link's messages try again, one by one.
            try:
                await offload(host.fill)
                if closed():  # aborted meanwhile (a listener stopping)
                    raise CommClosedError("closed during the handshake")
            except BaseException:  # nothing of this link may stay
                if fd >= 0:
                    os.close(fd)
                if inbox is not None:
                    host.drop_inbox(inbox)
                host.release()
                raise
        outbox = buffer.attach(fd) if buffer is not None and fd >= 0 else None
        link = Link(host, peer, outbox, inbox, bool(theirs.get("relay")), self.conf)
        link.single_copy = single_copy and outbox is not None
        stats.count("handshake-shm")
        return link

    def drop_in_child(self) -> None:
        """In a forked child: the handshake is its parent's."""
        self._done = self._abandoned = True
        if self.finalizer is not None:
            self.finalizer.detach()
        fd, self.pipe_fd = self.pipe_fd, -1
        if fd >= 0:
            close_quietly(fd)

    def end(self) -> None:
        """No peer will open our pipe by name any more: unlink it (its read
        end stays open).  Idempotent; lock-free (a finalizer may call it)."""
        if self._done:
            return
        self._done = True
        if self.finalizer is not None:
            self.finalizer.detach()
        if self.pipe is not None:
            self.host.directory.unlink(self.pipe)

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
        fd, self.pipe_fd = self.pipe_fd, -1
        if fd >= 0:
            os.close(fd)
        if from_finalizer:
            later(self.host.release, self.loop)
        else:
            self.host.release()
