"""Frames handed over, not copied, between two comms of one process.

A client's ``gather`` goes through the scheduler (unless ``direct=True``),
and so do ``dask.compute`` results: the scheduler reads the worker's frames
(one copy) and forwards them to the client.  In a LocalCluster the client
and the scheduler share a process, so the client's copy of the scheduler's
frame would only duplicate bytes within it.  Instead:

- The sender (:func:`offer`) registers each frame it pins for a reader in
  its own process, by address and weakly, with the pin (the memoryview the
  comm made of it), if it is an array the reader could have allocated
  itself: one-dimensional bytes that own their memory and are writeable.
- The reader (:func:`take`), before it releases the pin, takes such an
  array instead of copying it, if its pin is still alive and nothing but
  the pin refers to it.  Then no one else can see or change that memory,
  and taking it gives exactly what a copy would.  Otherwise it copies, as
  between processes.

Why the reference count is a complete census: a relay reads large frames as
the arrays themselves (:func:`bytes_array`), where distributed's
``host_array`` returns memoryviews of them, and every view of an array
refers to it (a numpy view through ``base``, a memoryview through its own
buffer object), and so do other weak references, which are counted apart.
The one reference allowed is the pin's, and the pin must be alive and be a
view of this very array: an entry whose pin has gone (its reader hung up
unread) never counts another holder of the same memory as its pin.  Views
derived from the pin itself would not show (a memoryview slice shares its
parent's buffer object), but the pin is made by the sender's comm and never
handed out.  So a frame the relay still holds (a published dataset, a task
spec), any view of one, and data a user still holds (a scatter's) are
copied: TCP's isolation holds.

What a reference count includes (the call's argument, the caller's names) is
the interpreter's business, so the count of an array only a pin holds is
measured at import (:data:`ONLY_PINNED`); without ``sys.getrefcount``
nothing is handed over.  The registry needs no lock: each change is one dict
operation, and an entry goes when its array does (a weakref callback, which
may run in any thread).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import numpy as np

__all__ = ["offer", "take", "bytes_array", "ONLY_PINNED"]

#: Offered arrays and their pins, by address (see the module docstring).  An
#: entry goes when a reader takes or declines it, or with its array.
_offered: dict[int, tuple[weakref.ref[np.ndarray], weakref.ref[memoryview]]] = {}


def bytes_array(n: int) -> np.ndarray:
    """A frame allocated as ``host_array`` allocates it, as the array itself."""
    return np.empty(n, dtype=np.uint8)


def offer(frame: Any, pin: memoryview) -> None:
    """Let a reader in this process take ``frame`` over instead of copying
    it, while ``pin`` (the comm's memoryview of it) holds it for that
    reader.  Only arrays that :func:`bytes_array` could have made qualify."""
    if (
        type(frame) is np.ndarray
        and frame.dtype == np.uint8
        and frame.ndim == 1
        and frame.base is None
        and frame.flags.owndata
        and frame.flags.writeable
        and frame.nbytes
        and pin.obj is frame
    ):
        address = frame.ctypes.data
        _offered[address] = (
            weakref.ref(frame, lambda _, a=address: _offered.pop(a, None)),
            weakref.ref(pin),
        )


def take(address: int, nbytes: int) -> np.ndarray | None:
    """The array offered at ``address``, if it is ``nbytes`` long, its pin
    is alive and nothing but the pin refers to it; otherwise None, and the
    reader copies.  Call it before releasing the pin."""
    entry = _offered.pop(address, None)
    if entry is None:
        return None
    array, pin = entry
    pin_view = pin()
    try:
        if pin_view is None or pin_view.obj is not array():
            return None  # the pin went (its reader hung up): anyone may hold it now
    except ValueError:  # the pin was released
        return None
    del pin_view
    frame, references = _referenced(array)
    if (
        frame is None
        or frame.nbytes != nbytes
        or frame.ctypes.data != address
        or references != ONLY_PINNED
        or weakref.getweakrefcount(frame) != 1  # the registry's, still alive here
    ):
        return None
    return frame


def _referenced(ref: weakref.ref[np.ndarray] | None) -> tuple[np.ndarray | None, int]:
    """The array behind ``ref`` and its reference count, as seen here."""
    frame = ref() if ref is not None else None
    return frame, (sys.getrefcount(frame) if frame is not None else 0)


def _only_pinned() -> int:
    """What :func:`_referenced` counts for an array one memoryview alone
    holds, as a pin does; -1 (never hand over) where there is no reference
    count to read."""
    if not hasattr(sys, "getrefcount"):
        return -1
    probe = np.empty(1, dtype=np.uint8)
    pin, ref = memoryview(probe), weakref.ref(probe)
    del probe
    references = _referenced(ref)[1]
    del pin
    return references


#: :func:`_referenced`'s count for an array that only its pin holds.
ONLY_PINNED = _only_pinned()
