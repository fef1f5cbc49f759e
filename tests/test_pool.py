"""The pool, in memory and on the real shm directory: no cluster needed."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dask_shm import stats
from dask_shm.pool import Pool, size_class
from dask_shm.segments import CREATE_STEP, Segment, ShmDirectory, list_parked

from .conftest import SHM_DIR, wait_for


def take_ready(pool: Pool, d: ShmDirectory, n: int) -> Segment:
    """The idle segment ``pool`` must have ready for ``n`` bytes."""
    seg, _ = pool.take(d, n)
    assert seg is not None, pool.info()
    return seg

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


def test_a_warm_up_waits_for_a_received_segment_to_come_back() -> None:
    """A large warm-up with nothing to claim, in a process that holds a
    received segment of that size, creates nothing: the segment, once its
    last view dies, fills it (creating 400 MB costs ~340 ms of kernel time
    here, and slows any transfer it overlaps)."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=1 << 30, idle_timeout=60)
    pool.warm_wait = 60.0  # the release below must come first, however slow the machine
    n = 40 << 20  # above AWAIT_RETURN_MIN
    received = Segment.create(d, size_class(n))
    view = received.export(pool.received(received))  # as transfer.assemble does
    del received
    created = stats.snapshot().get("segments-created", 0)
    try:
        assert pool.take(d, n) == (None, True)  # a sender that found none...
        pool.warm(d, n)  # ...asks for one
        time.sleep(0.3)
        assert pool.info()["warming"] == 1  # waiting, not creating
        del view  # the data is freed: the segment comes back
        assert wait_for(lambda: pool.info()["warming"] == 0)
        seg = take_ready(pool, d, n)
        assert seg.size == size_class(n)
        assert stats.snapshot().get("segments-created", 0) == created
        seg.destroy()
    finally:
        pool.trim()


def test_a_paced_creation_steps_and_can_be_abandoned() -> None:
    """Creating a large segment step by step calls ``pace`` before each step
    and reserves every byte; if ``pace`` raises, nothing is left behind."""
    d = ShmDirectory.get(SHM_DIR)
    calls = []
    seg = Segment.create(d, 3 * CREATE_STEP, pace=lambda: calls.append(1))
    try:
        assert len(calls) == 3
        st = os.stat(os.path.join(SHM_DIR, seg.name))
        assert st.st_blocks * 512 >= seg.size
    finally:
        seg.destroy()

    def stop() -> None:
        if calls:
            raise RuntimeError("stop")
        calls.append(1)

    calls = []
    with pytest.raises(RuntimeError):
        Segment.create(d, 3 * CREATE_STEP, pace=stop)
    # the autouse fixture checks that no segment is left in the directory


def test_a_full_trim_abandons_warm_ups_under_way() -> None:
    """A warm-up still creating when the pool is trimmed in full (at exit, or
    by the benchmark between cold samples) must not add its segment after."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=1 << 30, idle_timeout=60)
    quiet = threading.Event()

    def transfers() -> None:  # this process keeps moving large messages
        while not quiet.is_set():
            pool.note_activity()
            time.sleep(0.01)

    threading.Thread(target=transfers, daemon=True).start()
    try:
        pool.warm(d, 3 * CREATE_STEP)  # creates, paced: held before its first step
        time.sleep(0.2)
        assert pool.info()["warming"] == 1
        pool.trim()
        quiet.set()
        assert wait_for(lambda: pool.info()["warming"] == 0)
        time.sleep(0.1)
        assert pool.info()["idle-segments"] == 0
    finally:
        quiet.set()
        pool.trim()


def test_a_parked_segment_claimed_elsewhere_is_forgotten() -> None:
    """Once another process has claimed a segment this pool parked, the pool
    stops counting it (its parked bytes bound what it may unlink later)."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=64 << 20, idle_timeout=60)
    n = 1 << 20
    try:
        pool.put(Segment.create(d, size_class(n)))  # parked: this pool does not send it
        assert pool.info()["parked-segments"] == 1
        [(name, _)] = list_parked(d)
        os.unlink(os.path.join(SHM_DIR, name))  # gone, as after another process claimed it
        assert pool.claim(d, n) is None
        info = pool.info()
        assert (info["parked-segments"], info["parked-bytes"]) == (0, 0), info
    finally:
        pool.trim()


def test_a_waiting_warm_up_claims_what_another_process_parks_and_ends() -> None:
    """While it waits, a warm-up claims a segment some receiver parked, and
    then ends (a regression: it kept waiting, and every later warm-up of
    that size was swallowed, so each send claimed on its critical path)."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=1 << 30, idle_timeout=60)
    pool.warm_wait = 60.0
    n = 40 << 20
    held = Segment.create(d, size_class(n))
    view = held.export(pool.received(held))  # a segment of that size is out
    try:
        assert pool.take(d, n) == (None, True)
        for _ in range(2):
            pool.warm(d, n)
            time.sleep(0.2)
            assert pool.info()["warming"] == 1  # waiting for it to come back
            Segment.create(d, size_class(n)).park()  # as a receiver elsewhere parks one
            assert wait_for(lambda: pool.info()["warming"] == 0)
            take_ready(pool, d, n).destroy()
    finally:
        del view
        pool.trim()


def test_a_relay_neither_warms_nor_counts_as_demand() -> None:
    """A scheduler hands on the segments it receives; it takes one only for a
    frame that reached it over TCP (its sender's pool was cold), and the
    next message from that sender arrives in a segment.  So its miss asks
    for no warm-up (fresh pages in the scheduler would sit idle there), and
    what it releases is parked for the senders, not kept."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=64 << 20, idle_timeout=60)
    n = 1 << 20
    try:
        assert pool.take(d, n, relay=True) == (None, False)
        assert pool.claim(d, n, relay=True) is None
        pool.put(Segment.create(d, size_class(n)))
        info = pool.info()
        assert (info["idle-segments"], info["parked-segments"], info["warming"]) == (0, 1, 0), info
    finally:
        pool.trim()


def test_one_idle_segment_of_a_large_size_stays_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Of a size whose warm-ups wait for returns, a process keeps one idle
    segment mapped, not two: returns refill it, and a second would sit in
    its RSS (Dask's memory manager reads RSS) while another sender needs it.
    Received ones beyond it are parked."""
    from dask_shm import pool as pool_module

    monkeypatch.setattr(pool_module, "AWAIT_RETURN_MIN", 1 << 20)  # "large" from 1 MiB
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=16 << 20, idle_timeout=60)  # a 2 MiB class exceeds 1/16 of it
    n = 2 << 20
    try:
        assert pool.take(d, n) == (None, True)  # this process sends that size
        for _ in range(2):
            pool.put(Segment.create(d, size_class(n)))
        assert wait_for(lambda: pool.info()["warming"] == 0)
        info = pool.info()
        assert (info["idle-segments"], info["parked-segments"]) == (1, 1), info
    finally:
        pool.trim()


def test_a_size_sent_in_bursts_keeps_one_more_segment_ready() -> None:
    """A send that misses a size while a warm-up of it waits means frames of
    it go out in bursts (a dask.array rechunk sends two 128 MB ones in quick
    succession): that size then keeps two segments ready, both filled by
    segments coming back, else the second frame of every burst went over
    TCP.  Up to a quarter of the pool: a size that large keeps one."""
    d = ShmDirectory.get(SHM_DIR)
    n = 40 << 20  # above AWAIT_RETURN_MIN: its warm-ups wait for returns
    c = size_class(n)
    for limit, most in ((1 << 30, 2), (4 * c + c // 2, 1)):
        pool = Pool(limit=limit, idle_timeout=60)
        pool.warm_wait = 60.0  # the releases below must come first
        held = [Segment.create(d, c) for _ in range(2)]  # two received ones are out
        views = [seg.export(pool.received(seg)) for seg in held]
        del held
        bursts = stats.snapshot().get("pool-bursts", 0)
        try:
            assert pool.take(d, n) == (None, True)
            pool.warm(d, n)
            assert pool.info()["warming"] == 1  # waiting for a return
            assert pool.take(d, n) == (None, True)  # the burst's second frame
            pool.warm(d, n)
            assert pool.info()["warming"] == most, limit
            assert stats.snapshot().get("pool-bursts", 0) == bursts + most - 1
            assert wait_for(lambda: sum(map(len, pool._awaiting.values())) == most)
            del views  # the data is freed: both come back
            assert wait_for(lambda: pool.info()["warming"] == 0)
            info = pool.info()
            assert (info["idle-segments"], info["parked-segments"]) == (most, 2 - most), (info, stats.snapshot())
            first, replace = pool.take(d, n)
            assert first is not None and replace  # one left, two wanted
            first.destroy()
        finally:
            pool.trim()


def test_a_waiting_warm_up_claims_only_when_this_process_is_quiet() -> None:
    """A warm-up waiting for a segment to come back does not claim a parked
    one while this process moves a large message: the claim fills a page
    table (~45 ms per 400 MB here) and slowed the transfer it overlapped.
    Once quiet, it claims."""
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=1 << 30, idle_timeout=60)
    pool.warm_wait = 60.0
    n = 40 << 20  # above AWAIT_RETURN_MIN
    held = Segment.create(d, size_class(n))
    view = held.export(pool.received(held))  # one of that size is out: wait for it
    Segment.create(d, size_class(n)).park()  # and a surplus one is parked
    stop = threading.Event()

    def transfers() -> None:  # as _write_large notes each large message
        while not stop.is_set():
            pool.note_activity()
            time.sleep(0.005)

    busy = threading.Thread(target=transfers)
    busy.start()
    try:
        assert pool.take(d, n) == (None, True)
        pool.warm(d, n)
        time.sleep(0.5)
        assert pool.info()["warming"] == 1  # busy: not claimed yet
        assert len(list_parked(d)) == 1
        stop.set()
        busy.join()
        assert wait_for(lambda: pool.info()["warming"] == 0)  # quiet: claimed
        assert list_parked(d) == []
        take_ready(pool, d, n).destroy()
    finally:
        stop.set()
        busy.join()
        del view
        pool.trim()


def test_a_creation_yields_to_a_busy_host_until_a_send_misses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fresh pages slow every process on a small machine, so a warm-up that
    must create them waits while other processes keep the host busy (here a
    real process spinning)... until a send of that size misses it: then it
    yields to this process's own transfers only.  A relay's miss does not
    count (a scheduler handing on a cold scatter misses with its sender)."""
    import subprocess
    import sys

    from dask_shm import pool as pool_module

    monkeypatch.setattr(pool_module, "HOST_SHARE", 0.01)  # one spinning CPU is "busy"
    d = ShmDirectory.get(SHM_DIR)
    pool = Pool(limit=1 << 30, idle_timeout=60)
    n = 3 * CREATE_STEP
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        pool.warm(d, n)
        time.sleep(1.0)
        assert pool.info()["warming"] == 1  # still waiting for the host
        assert pool.take(d, n, relay=True) == (None, False)  # a relay's miss...
        time.sleep(0.5)
        assert pool.info()["warming"] == 1  # ...is its sender's, already counted
        assert pool.take(d, n) == (None, True)  # a send misses it
        assert wait_for(lambda: pool.info()["warming"] == 0, timeout=3.0)
        take_ready(pool, d, n).destroy()
    finally:
        spinner.kill()
        spinner.wait()
        pool.trim()
