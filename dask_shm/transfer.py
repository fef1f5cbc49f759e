"""Moving frames through shared memory: placing them (sender) and taking them
over (receiver).  The comm backend and the ``"shm"`` serialization family
both use these; neither touches segments directly.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dask_shm import stats
from dask_shm.descriptor import Placement, decode, encode
from dask_shm.pool import Pool, size_class
from dask_shm.segments import (
    Owner,
    Segment,
    ShmDirectory,
    ShmFull,
    forwardable,
    warn_full_once,
)

__all__ = ["Placed", "place", "assemble", "InFlight"]

logger = logging.getLogger(__name__)

Frame = bytes | bytearray | memoryview

@dataclass
class Placed:
    """A message's frames after placement.

    ``descriptor`` is None when nothing went to shared memory; then
    ``inline`` is the original frame list.
    """

    descriptor: bytes | None
    inline: list[Frame]
    names: list[str] = field(default_factory=list)
    nbytes: int = 0
    #: Frame sizes whose size class should be warmed for the next message
    #: (call :meth:`Pool.warm` once the message is on its way).
    warm: list[int] = field(default_factory=list)
    #: Mappings handed over but not yet unmapped: pass them to
    #: :func:`dask_shm.segments.unmap_later` once the descriptor is written.
    unmap: list[mmap.mmap] = field(default_factory=list)


def place(
    frames: Sequence[Frame],
    *,
    directory: ShmDirectory,
    pool: Pool,
    threshold: int,
    cold_transfer: str,
    relay: bool = False,
) -> Placed:
    """Copy every frame of at least ``threshold`` bytes into its own segment.

    A frame a relay received in a segment is handed on in that segment
    instead (once; a second forward copies).

    A frame that finds no mapped segment in ``pool`` claims a parked one if
    there is one; frames that find no segment at all (a cold pool with
    ``cold_transfer="tcp"``, or a full directory) stay inline; so does
    everything smaller.  Blocking: call it off the event loop for large
    messages.  It does not warm the pool itself: warming competes for the CPU
    with sending.  ``relay``: this process hands on what it received (a
    scheduler); see :meth:`Pool.take`.
    """
    placements: list[Placement] = []
    inline: list[Frame] = []
    warm: list[int] = []
    unmap: list[mmap.mmap] = []
    nbytes = 0
    for i, frame in enumerate(frames):
        mv = memoryview(frame)
        n = mv.nbytes
        if n < threshold or not mv.c_contiguous:
            inline.append(frame)
            continue
        received = forwardable(mv)
        if received is not None and received[0].directory is directory:
            # A relay handing on what it received: no copy, no new segment.
            held, offset = received
            placements.append(Placement(i, held.forward(), offset, n))
            nbytes += n
            stats.count("segments-forwarded")
            continue
        seg, replace = pool.take(directory, n, relay=relay)
        if replace:  # fewer of its size are ready here than wanted (see Pool.take)
            warm.append(n)
        if seg is None:
            seg = pool.claim(directory, n, relay=relay)  # a segment some receiver parked
        if seg is None:
            if cold_transfer != "shm":
                stats.count("fallback-cold")
                inline.append(frame)
                continue
            try:
                seg = Segment.create(directory, size_class(n))
            except ShmFull as e:
                stats.count("fallback-enospc")
                warn_full_once(e)
                inline.append(frame)
                continue
            stats.count("segments-created")
        assert seg.mapping is not None
        dst = np.frombuffer(seg.mapping, dtype=np.uint8, count=n)
        dst[:] = np.frombuffer(mv, dtype=np.uint8)  # any contiguous buffer, as bytes
        del dst
        placements.append(Placement(i, seg.hand_over(unmap), 0, n))
        nbytes += n
    if not placements:
        return Placed(None, list(frames), warm=warm)
    return Placed(
        encode(len(frames), placements), inline, [p.name for p in placements], nbytes, warm, unmap
    )


def assemble(
    descriptor: bytes | memoryview,
    inline: Sequence[Frame],
    *,
    directory: ShmDirectory,
    owner: Owner,
    pool: Pool,
    relay: bool = False,
) -> list[Frame]:
    """Rebuild a message's frame list from a descriptor and its inline frames.

    The descriptor is validated in full (names, order, extents) before any
    file is touched; each segment is then taken over and checked against its
    real size before it is mapped.  Received frames are writeable views of
    the segments; a segment goes to ``pool`` when its last view dies.  A
    ``relay`` (a process that forwards frames without deserializing them)
    may hand the segments on as they are (see :func:`place`).

    Raises
    ------
    DescriptorError, SegmentMissing
        Nothing received is kept: segments already taken over are destroyed.
    """
    placements = decode(descriptor, ninline=len(inline), owner=owner)
    needed: dict[str, int] = {}
    for p in placements:
        needed[p.name] = max(needed.get(p.name, 0), p.offset + p.length)
    taken: dict[str, Segment] = {}
    try:
        for name, n in needed.items():
            taken[name] = Segment.take_over(directory, name, owner, n)
    except BaseException:
        for seg in taken.values():
            seg.destroy()
        raise
    stats.count("segments-received", len(taken))
    # A relay's segment may be forwarded, and then never comes back here.
    views = {
        name: seg.export(pool.put if relay else pool.received(seg), relay=relay)
        for name, seg in taken.items()
    }
    del taken
    frames: list[Frame] = []
    rest = iter(inline)
    by_index = {p.index: p for p in placements}
    for i in range(len(inline) + len(placements)):
        q = by_index.get(i)
        frames.append(next(rest) if q is None else views[q.name][q.offset : q.offset + q.length])
    return frames


class InFlight:
    """Segments a comm handed over that the peer may not have taken over yet.

    The peer takes a segment over by renaming it, so a name that no longer
    exists is the peer's; one that still exists when the comm ends is ours to
    remove.
    """

    def __init__(self, directory: ShmDirectory) -> None:
        self.directory = directory
        self._names: list[str] = []

    def add(self, names: Sequence[str]) -> None:
        self._names.extend(names)

    def prune(self) -> None:
        """Forget names the peer has taken over (one ``stat`` per name)."""
        if self._names:
            self._names = [n for n in self._names if self.directory.exists(n)]

    def __len__(self) -> int:
        return len(self._names)

    def discard(self) -> int:
        """Unlink whatever the peer has not taken over; return how many."""
        names, self._names = self._names, []
        return sum(self.directory.unlink(n) for n in names)
