"""The pool, in memory and on the real shm directory: no cluster needed."""

from __future__ import annotations

import time

from dask_shm.pool import Pool, size_class
from dask_shm.segments import Segment, ShmDirectory

from .conftest import SHM_DIR, wait_for

KiB = 1024


def test_size_classes_are_page_aligned_quarter_steps() -> None:
    for n in (1, 4096, 65_537, 10**6, 4 * 10**6, 400 * 10**6):
        c = size_class(n)
        assert c >= n and c % 4096 == 0 and c <= max(n * 1.25 + 4096, 64 * KiB)


def test_warming_a_new_size_parks_the_least_recently_used_others() -> None:
    """A full pool makes room for the size just asked for: idle segments of
    other sizes are parked (pages kept for any process to claim), oldest
    first, instead of the new size never being warmed."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=1024 * KiB, idle_timeout=60)
    old, newer = Segment.create(d, 256 * KiB), Segment.create(d, 128 * KiB)
    for seg in (old, newer):
        assert pool.take(d, seg.size) == (None, True)  # this process sends these sizes
    pool.put(old)
    time.sleep(0.01)
    pool.put(newer)
    pool.put(Segment.create(d, 256 * KiB))
    assert wait_for(lambda: pool.info()["warming"] == 0)
    assert pool.info()["idle-bytes"] == 640 * KiB
    try:
        big = size_class(500 * KiB)  # 512 KiB: needs 128 KiB more than is free
        pool.warm(d, 500 * KiB)
        assert wait_for(lambda: pool.info()["warming"] == 0)
        info = pool.info()
        assert info["parked-segments"] == 1 and info["parked-bytes"] == 256 * KiB, info
        assert info["idle-bytes"] == 128 * KiB + 256 * KiB + big, info
        seg, _ = pool.take(d, 500 * KiB)
        assert seg is not None and seg.size == big
        assert old.mapping is None  # the oldest was the one parked
        seg.destroy()
    finally:
        pool.trim()


def test_a_sender_that_takes_the_last_segment_of_a_size_asks_for_another() -> None:
    """Whether the last mapped segment of a size was taken, or a parked one
    had to be claimed on the spot, the pool is asked to warm that size again,
    so the next message of that size finds one ready (a regression: claiming
    on a miss once suppressed it, and every later transfer paid the claim)."""
    import numpy as np

    from dask_shm.transfer import place

    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=64 << 20, idle_timeout=60)
    n = 1 << 20
    frame = np.ones(n, dtype="u1")
    pool.take(d, n)  # this process sends that size
    pool.put(Segment.create(d, size_class(n)))
    assert wait_for(lambda: pool.info()["warming"] == 0)
    parked = Segment.create(d, size_class(n))
    parked.park()
    try:
        for how in ("mapped", "claimed"):
            placed = place([frame], directory=d, pool=pool, threshold=1, cold_transfer="tcp")
            assert placed.descriptor is not None, how
            assert placed.warm == [n], how
            for name in placed.names:
                d.unlink(name)
    finally:
        pool.trim()
        d.unlink(parked.name)


def test_a_released_segment_stays_mapped_only_for_sizes_this_process_sends() -> None:
    """A receiver that never sends a size parks what it releases (out of its
    RSS, claimable by the sender); one that sent that size recently keeps it
    mapped for its own next send."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=64 << 20, idle_timeout=60)
    n = 1 << 20
    try:
        first = Segment.create(d, size_class(n))
        pool.put(first)
        info = pool.info()
        assert (info["idle-segments"], info["parked-segments"]) == (0, 1), info
        assert first.mapping is None
        assert pool.take(d, n) == (None, True)  # now it sends that size
        second = Segment.create(d, size_class(n))
        pool.put(second)
        assert wait_for(lambda: pool.info()["warming"] == 0)
        info = pool.info()
        assert (info["idle-segments"], info["parked-segments"]) == (1, 1), info
        assert second.mapping is not None
    finally:
        pool.trim()
