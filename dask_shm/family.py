"""The ``"shm"`` serialization family: pickle protocol 5, for hops that
negotiated shared memory.

Use it like any family, ``Client(serializers=["shm", "dask", "pickle"],
deserializers=[...same])``, or for every ``shm://`` comm of a process with
the ``dask-shm.serializers`` key.  It pickles an object with protocol 5 and
keeps its buffers out of band, as they are; the comm then copies them
straight into its shared buffer (one copy) and the receiver copies them out
into memory of its own, so the object it rebuilds owns its data.  Naming the
family also makes the comm serialize every message itself and decide by its
real size, so an object whose ``sizeof`` is underestimated still travels
through shared memory.

It serves only a hop that negotiated shared memory and whose peer
deserializes what it receives.  Everywhere else it raises
``NotImplementedError``, so the next family in the list serves:

- ``context`` is None: spilling to disk, direct ``serialize()`` calls;
- the comm is ``tcp://``, or ``shm://`` with a peer on another host, of
  another user or with another directory (no ``Link`` in the context);
- the peer is a relay (a scheduler forwards frames unchanged to a process
  that may not have dask-shm at all).

Header: ``{"writeable": [bool, ...]}``, one flag per out-of-band buffer.
"""

from __future__ import annotations

import pickle
from typing import Any

from distributed.protocol import pickle as dpickle
from distributed.protocol.serialize import register_serialization_family

from dask_shm import stats
from dask_shm.errors import DescriptorError
from dask_shm.handshake import Link

__all__ = ["NAME", "shm_dumps", "shm_loads", "register"]

NAME = "shm"


def _decline(reason: str) -> NotImplementedError:
    stats.count(f"family-declined-{reason}")
    return NotImplementedError(f"dask-shm family: {reason}")


def shm_dumps(x: Any, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Serialize ``x`` for one negotiated shared-memory hop (see module docs)."""
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
        buffers.append(buf.raw())  # contiguous, as bytes

    try:
        pik = dpickle.dumps(x, buffer_callback=keep, protocol=5)
    except BufferError as e:  # an out-of-band buffer that is not contiguous
        raise _decline("non-contiguous") from e
    except Exception as e:  # not picklable: perhaps the next family can
        raise NotImplementedError(f"dask-shm family: cannot pickle: {e}") from e
    stats.count("family-messages")
    return {"writeable": writeable}, [pik, *buffers]


def shm_loads(header: dict[str, Any], frames: list[Any]) -> Any:
    """Rebuild an object from :func:`shm_dumps`' header and frames.

    Raises
    ------
    DescriptorError
        If the header does not match the frames.
    """
    writeable = header.get("writeable")
    if not isinstance(writeable, list | tuple) or len(frames) != len(writeable) + 1:
        raise DescriptorError(
            f"dask-shm family header lists {writeable!r:.50} buffers, "
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
