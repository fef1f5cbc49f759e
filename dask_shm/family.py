"""The ``"shm"`` serialization family: pickle protocol 5, with out-of-band
buffers placed straight into shared memory.

Use it like any family, ``Client(serializers=["shm", "dask", "pickle"],
deserializers=[...same])``, or for every ``shm://`` comm of a process with
the ``dask-shm.serializers`` key.  It serves only a hop that negotiated shared
memory (a ``shm://`` comm whose handshake probe succeeded) and whose peer
deserializes what it receives.  Everywhere else it raises
``NotImplementedError``, so the next family in the list serves:

- ``context`` is None: spilling to disk, direct ``serialize()`` calls,
  comms that pass no context;
- the comm is ``tcp://``, or ``shm://`` with a peer on another host, of
  another user or with another directory (no ``Link`` in the context);
- the peer is a relay (the scheduler reads with ``deserialize=False`` and
  forwards the frames unchanged to a process that never negotiated shared
  memory with us).

Buffers of ``dask-shm.threshold`` bytes or more are placed by
:meth:`dask_shm.comm.Link.place`, exactly as the comm places frames, and
described in the header; smaller ones stay ordinary frames.  Compared with
the comm's own placement the family adds one thing: it sees the buffers
themselves, so an object whose ``sizeof`` is underestimated still travels
through shared memory.

Header: ``{"descriptor": bytes | None, "writeable": [bool, ...],
"sender": owner, "recipient": owner}``.  The receiver refuses a header
described for another process (a relay that should not have happened) and
validates the descriptor in full before touching any file.
"""

from __future__ import annotations

import pickle
from typing import Any

from distributed.protocol import pickle as dpickle
from distributed.protocol.serialize import register_serialization_family

from dask_shm import stats
from dask_shm.config import settings
from dask_shm.pool import get_pool
from dask_shm.segments import DescriptorError, Owner, ShmDirectory, current_owner
from dask_shm.transfer import Frame, assemble

__all__ = ["NAME", "shm_dumps", "shm_loads"]

NAME = "shm"


def _decline(reason: str) -> NotImplementedError:
    stats.count(f"family-declined-{reason}")
    return NotImplementedError(f"dask-shm family: {reason}")


def shm_dumps(x: Any, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Frame]]:
    """Serialize ``x`` for one negotiated shared-memory hop (see module docs)."""
    # Imported here: comm.py imports this module's package, not the reverse.
    from dask_shm.comm import Link

    if context is None:
        raise _decline("no-context")
    link = context.get("dask-shm")
    if not isinstance(link, Link):
        raise _decline("not-negotiated")
    if link.relay:
        raise _decline("relay")

    buffers: list[memoryview] = []
    writeable: list[bool] = []

    def keep(buf: pickle.PickleBuffer) -> None:
        writeable.append(not memoryview(buf).readonly)
        buffers.append(buf.raw())  # contiguous, as bytes: what a segment holds

    try:
        pik = dpickle.dumps(x, buffer_callback=keep, protocol=5)
    except BufferError as e:  # an out-of-band buffer that is not contiguous
        raise _decline("non-contiguous") from e
    except Exception as e:  # not picklable: perhaps the next family can
        raise NotImplementedError(f"dask-shm family: cannot pickle: {e}") from e

    placed = link.place([pik, *buffers])
    if placed.descriptor is not None:
        stats.count("family-messages")
        stats.count("family-bytes", placed.nbytes)
    header = {
        "descriptor": placed.descriptor,
        "writeable": writeable,
        "sender": list(current_owner().as_tuple()),
        "recipient": list(link.peer.as_tuple()),
    }
    return header, placed.inline


def _owner(header: dict[str, Any], key: str) -> Owner:
    try:
        pid, start, ns = map(int, header[key])
        return Owner(pid, start, ns)
    except (KeyError, TypeError, ValueError) as e:
        raise DescriptorError(f"dask-shm family header: bad {key!r} field") from e


def shm_loads(header: dict[str, Any], frames: list[Frame]) -> Any:
    """Rebuild an object from :func:`shm_dumps`' header and frames.

    Buffers in shared memory are received zero-copy: the object's arrays are
    views of the segments, which go back to this process's pool when the
    last view dies.

    Raises
    ------
    DescriptorError, SegmentMissing
        The header was described for another process, or names segments that
        are not valid ours-to-take (see :func:`dask_shm.transfer.assemble`).
    """
    descriptor = header.get("descriptor")
    writeable = header.get("writeable")
    if not isinstance(writeable, list | tuple):
        raise DescriptorError("dask-shm family header: bad 'writeable' field")
    if descriptor is not None:
        if not isinstance(descriptor, bytes | bytearray | memoryview):
            raise DescriptorError("dask-shm family header: bad 'descriptor' field")
        me = current_owner()
        recipient = _owner(header, "recipient")
        if recipient != me:
            raise DescriptorError(
                f"dask-shm family header was described for process {recipient.pid}, "
                f"not this one ({me.pid}): frames were relayed through a process "
                "that does not deserialize, which the sender should have declined"
            )
        conf = settings()
        frames = assemble(
            bytes(descriptor),
            frames,
            directory=ShmDirectory.get(conf.directory),
            owner=_owner(header, "sender"),
            pool=get_pool(conf.pool_size, conf.pool_idle_timeout),
        )
    if len(frames) != len(writeable) + 1:
        raise DescriptorError(
            f"dask-shm family header lists {len(writeable)} buffers, "
            f"but {len(frames) - 1} arrived"
        )
    buffers = []
    for frame, w in zip(frames[1:], writeable):
        mv = memoryview(frame)
        if w and mv.readonly:
            mv = memoryview(bytearray(mv))  # a small inline frame; can't avoid it
        elif not w and not mv.readonly:
            mv = mv.toreadonly()  # zero-copy: just the flag
        buffers.append(mv)
    return dpickle.loads(frames[0], buffers=buffers)


def register() -> None:
    """Register the family with distributed (done when ``dask_shm`` is imported)."""
    register_serialization_family(NAME, shm_dumps, shm_loads)
