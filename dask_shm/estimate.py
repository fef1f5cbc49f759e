"""The size estimate: which messages may be large enough for shared memory,
and which copies are large enough to leave the event loop.

A linked comm decides per message, before serializing it, whether it may
reach ``dask-shm.threshold`` bytes (:func:`reaches`): only then does the
comm serialize it itself and look at the real size.  The test runs on every
message, so its cost is bounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from distributed.comm.utils import OFFLOAD_THRESHOLD
from distributed.protocol.serialize import Pickled, Serialize, Serialized, ToPickle
from distributed.sizeof import safe_sizeof
from distributed.utils import nbytes

__all__ = ["reaches", "estimate", "offloads", "SAMPLE"]


def reaches(msg: Any, threshold: int) -> bool:
    """Whether ``msg`` may carry ``threshold`` bytes or more: the test that
    sends it through shared memory or straight to TCP.  It runs for every
    message on every linked comm, so its cost is bounded (see
    :func:`estimate`); ~1 us for a small message, ~50 us for a batch of a
    thousand, where distributed's msgpack takes ~800 us."""
    try:
        return estimate(msg, True) >= threshold
    except RecursionError:  # as to_frames: too deep to size, assume large
        return True


#: Elements of a container that :func:`estimate` looks at.  A longer one (a
#: batched stream's thousand messages, a p2p shuffle's shards) is estimated
#: from an even sample of this many, scaled to its length, as Dask's sizeof
#: samples 10: sizing every element made a scheduler's batches cost more to
#: size than to serialize, while shards are alike, so a sample finds them.
#: The cost is linear in it (docs/tuning.md).
SAMPLE = 16


def estimate(x: Any, data: bool) -> int:
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
    elif t in SCALARS:
        return 8
    elif t is bytes or t is bytearray or t is str:
        return len(x)
    elif t is memoryview or t is np.ndarray:
        return x.nbytes
    elif t is Serialize:
        return estimate(x.data, data)
    elif t is ToPickle:
        return estimate(x.data, False)
    elif t is Serialized or t is Pickled:
        # Pickled's in-band part is in its header
        return sum(map(nbytes, x.frames)) + len(x.header.get("pickled-obj", b""))
    else:
        return safe_sizeof(x, default_size=0) if data else 0
    n = len(items)
    if n > SAMPLE:
        items = (list(items) if t is dict else items)[:: n // SAMPLE]
    total = 0
    for i in items:  # leaves inline: a batch has thousands
        ti = type(i)
        if ti is str or ti is bytes:
            total += len(i)
        elif ti in SCALARS:
            total += 8
        else:
            total += estimate(i, data)
    return 8 * n + (total * n // len(items) if n > SAMPLE else total)


SCALARS = frozenset((int, float, bool, type(None)))


def offloads(allow: bool, nbytes: int) -> bool:
    """Whether to copy ``nbytes`` off the event loop: as ``TCP`` decides for
    (de)serialization (``distributed.comm.offload``, false disables it)."""
    return bool(allow and OFFLOAD_THRESHOLD and nbytes > OFFLOAD_THRESHOLD)
