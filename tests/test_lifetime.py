"""Segment lifetime: the janitor after kill -9, a full directory, an unusable one."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.protocol import to_serialize

import dask_shm.comm
from dask_shm import stats
from dask_shm.segments import (
    Segment,
    ShmDirectory,
    current_owner,
    list_segments,
    new_name,
    sweep,
)

from .conftest import SHM_DIR, is_root, ours, wait_for
from .test_comm import echo_server

root_only = pytest.mark.skipif(
    not is_root(), reason="mounting a tmpfs needs root (CI runs as root)"
)

CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from dask_shm.segments import ShmDirectory, Segment, create_probe
    d = ShmDirectory(sys.argv[1])
    segs = [Segment.create(d, 1 << 20) for _ in range(3)]
    segs[0].park()
    create_probe(d)
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_janitor_removes_what_a_killed_process_left() -> None:
    """kill -9 skips every exit handler; the janitor removes what is left,
    and the dying process wrote nothing to stderr (no leak warnings)."""
    proc = subprocess.run(
        [sys.executable, "-c", CRASHER, SHM_DIR], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL
    assert proc.stderr == ""
    pid = int(proc.stdout)
    left = [n for n in ours() if n.startswith(f"dask-shm-{pid}-")]
    assert len(left) == 4  # two data segments, one parked, one probe
    d = ShmDirectory(SHM_DIR)  # not .get(): that starts a background sweep
    assert all(not i.alive for i in list_segments(d) if i.owner.pid == pid)
    removed = sweep(d)
    # Another janitor (this process's periodic one) may have won some races.
    assert {i.name for i in removed} <= set(left)
    assert not ours()


def test_janitor_never_removes_a_live_process_segment() -> None:
    d = ShmDirectory.get(SHM_DIR)
    seg = Segment.create(d, 1 << 16)
    try:
        assert sweep(d) == []
        assert seg.name in ours()
    finally:
        seg.destroy()


def _plant(name: str) -> None:
    fd = os.open(f"{SHM_DIR}/{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def test_janitor_detects_pid_reuse_and_leaves_other_namespaces_alone() -> None:
    me = current_owner()
    token = new_name("s").rsplit("-", 1)[1]
    reused = f"dask-shm-{me.pid}-{me.start + 1}-{me.ns}-s-{token}"
    foreign = f"dask-shm-{2**22 + 7}-1-{me.ns + 1}-s-{token}"  # another pid namespace
    _plant(reused)
    _plant(foreign)
    try:
        removed = [i.name for i in sweep(ShmDirectory.get(SHM_DIR))]
        assert removed == [reused]
        assert foreign in ours()
    finally:
        os.unlink(f"{SHM_DIR}/{foreign}")


def test_unread_segments_are_removed_when_the_comm_aborts() -> None:
    """A message the peer never read: its segments go when the sender aborts."""

    from dask_shm.pool import get_pool



    async def main() -> None:
        server_side: list[object] = []

        async def handler(comm: object) -> None:
            server_side.append(comm)  # never reads

        with dask.config.set({"dask-shm.cold-transfer": "shm", "dask-shm.threshold": "64 KiB"}):
            async with listen("shm://127.0.0.1:0", handler) as listener:
                comm = await connect(listener.contact_address)
                await comm.write({"x": to_serialize(np.ones(10**6))})
                [sent] = comm.link.inflight._names  # type: ignore[attr-defined]
                assert sent in ours()  # handed over, not taken over
                comm.abort()
                assert sent not in ours()
                for c in server_side:
                    c.abort()  # type: ignore[attr-defined]
        assert wait_for(lambda: get_pool().info()["warming"] == 0)

    asyncio.run(main())


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, like Docker's default /dev/shm."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        from dask_shm.pool import get_pool

        get_pool().trim()
        ShmDirectory._cache.pop((os.getpid(), str(mnt)), None)
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@root_only
def test_full_directory_falls_back_to_tcp_and_warns_once(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dask_shm.segments as segments

    segments._full_warned = False
    x = np.arange(5 * 10**7)  # 400 MB through a 64 MiB directory

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None  # type: ignore[attr-defined]
            for _ in range(3):
                await comm.write({"x": to_serialize(x)})
                np.testing.assert_array_equal((await comm.read())["x"], x)
            await comm.close()

    conf = {"dask-shm.directory": str(small_tmpfs), "dask-shm.cold-transfer": "shm"}
    with dask.config.set(conf), caplog.at_level(logging.WARNING, logger="dask_shm"):
        asyncio.run(main())
    full = [r for r in caplog.records if "cannot reserve" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    msg = full[0].getMessage()
    assert "free of 64.0 MiB" in msg and "--shm-size" in msg and "dask-shm.directory" in msg
    assert stats.snapshot()["fallback-enospc"] >= 3
    assert not [n for n in os.listdir(small_tmpfs) if n.startswith("dask-shm-")]


@root_only
def test_a_paced_creation_that_cannot_fit_fails_before_reserving_anything(
    small_tmpfs: Path,
) -> None:
    """A warm-up reserves a large segment step by step; one that cannot fit
    must fail at once, not fill the directory for the length of its steps
    (everyone else's probes and segments would meet ENOSPC meanwhile: a
    handshake failed so in CI once)."""
    from dask_shm.segments import CREATE_STEP, ShmFull

    d = ShmDirectory(str(small_tmpfs))
    steps: list[int] = []
    with pytest.raises(ShmFull, match="free of 64.0 MiB"):
        Segment.create(d, 3 * CREATE_STEP, pace=lambda: steps.append(1))
    assert steps == []
    assert not os.listdir(small_tmpfs)


@root_only
def test_a_directory_too_full_for_a_probe_means_plain_tcp(small_tmpfs: Path) -> None:
    """If not even a handshake probe fits (another program filled the
    directory), the comm is plain TCP and works; connecting does not fail."""
    filler = small_tmpfs / "someone-elses-file"
    with open(filler, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, 64 << 20)
        except OSError:
            pass  # what fitted is reserved: the directory is full either way

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is None  # type: ignore[attr-defined]
            await comm.write({"x": to_serialize(np.arange(10**6))})
            np.testing.assert_array_equal((await comm.read())["x"], np.arange(10**6))
            await comm.close()

    try:
        with dask.config.set({"dask-shm.directory": str(small_tmpfs)}):
            asyncio.run(main())
        assert stats.snapshot().get("fallback-probe-failed", 0) >= 1
        assert not [n for n in os.listdir(small_tmpfs) if n.startswith("dask-shm-")]
    finally:
        filler.unlink()


def _worker_state() -> dict[str, int]:
    from dask_shm import stats as worker_stats

    return {"pid": os.getpid(), "enospc": worker_stats.snapshot().get("fallback-enospc", 0)}


@root_only
def test_full_directory_on_a_cluster_moves_400_mb_and_no_worker_dies(small_tmpfs: Path) -> None:
    """Worker processes on a 64 MiB directory: a 400 MB worker-to-worker
    dependency and a direct gather arrive intact through the TCP fallback,
    no worker dies (same pids before and after: no SIGBUS), the fallback is
    counted, and nothing is left in the small directory."""
    from distributed import Client, LocalCluster

    conf = {"dask-shm.directory": str(small_tmpfs), "dask-shm.cold-transfer": "shm"}
    with dask.config.set(conf), LocalCluster(
        protocol="shm", n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as lc, Client(lc) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        before = client.run(_worker_state)
        x = client.submit(np.arange, 5 * 10**7, workers=[a], pure=False)
        last = client.submit(lambda v: int(v[-1]), x, workers=[b]).result()
        assert last == 5 * 10**7 - 1
        got = client.gather(x, direct=True)
        assert int(got[-1]) == 5 * 10**7 - 1 and got.size == 5 * 10**7
        after = client.run(_worker_state)
        assert {w: s["pid"] for w, s in after.items()} == {w: s["pid"] for w, s in before.items()}
        assert after[a]["enospc"] >= 1, after
        del x, got
    assert wait_for(
        lambda: not [n for n in os.listdir(small_tmpfs) if n.startswith("dask-shm-")]
    )


@root_only
def test_unusable_directory_is_plain_tcp_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    dask_shm.comm._unusable_warned = False
    try:

        async def main() -> None:
            async with listen("shm://127.0.0.1:0", echo_server) as listener:
                for _ in range(2):
                    comm = await connect(listener.contact_address)
                    assert comm.link is None  # type: ignore[attr-defined]
                    await comm.write({"x": to_serialize(np.arange(10**6))})
                    await comm.read()
                    await comm.close()

        with dask.config.set({"dask-shm.directory": str(ro)}), caplog.at_level(logging.WARNING):
            asyncio.run(main())
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)
    warned = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warned) == 1 and "not writable" in warned[0].getMessage()


NOBODY = 65534


@pytest.mark.skipif(not is_root(), reason="switching to another uid needs root (CI runs as root)")
def test_another_user_cannot_use_our_segments_and_gets_tcp() -> None:
    """A peer of another uid fails the probe both ways (our 0600 files are
    closed to it, and we refuse files it owns): TCP, and correct data."""
    import threading

    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: list[object] = []

    async def start() -> None:
        box.append(await listen("shm://127.0.0.1:0", echo_server))

    def serve() -> None:
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    async def peer(address: str) -> str:
        comm = await connect(address)
        x = np.arange(10**6)
        await comm.write({"x": to_serialize(x)})
        ok = bool(((await comm.read())["x"] == x).all())
        link = comm.link  # type: ignore[attr-defined]
        await comm.close()
        return f"{'shm' if link else 'tcp'} {ok}"

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    address = box[0].contact_address  # type: ignore[attr-defined]
    try:
        # Same user first: loads every module the child will need (it cannot
        # import anything once it is nobody) and shows the contrast.
        with dask.config.set({"dask-shm.threshold": "64 KiB", "dask-shm.cold-transfer": "shm"}):
            assert asyncio.run(peer(address)) == "shm True"
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    out = asyncio.run(peer(address))
                except BaseException as e:
                    out = repr(e)
                os.write(w, out.encode()[:1000])
                os._exit(0)
            os.close(w)
            _, status = os.waitpid(pid, 0)
            out = os.read(r, 1000).decode()
            os.close(r)
    finally:
        loop.call_soon_threadsafe(box[0].stop)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert status == 0 and out == "tcp True", out
    assert stats.snapshot().get("handshake-no-probe", 0) >= 1
