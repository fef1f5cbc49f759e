"""Lifetime of what we create: the janitor after kill -9, regions held by a
message nobody reads, a full directory, an unusable one, another user."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.comm.core import Comm
from distributed.protocol import to_serialize

from dask_shm import host as hosts, stats
from dask_shm.buffers import Buffer
from dask_shm.send import GROWTH
from dask_shm.errors import ShmFull
from dask_shm.janitor import list_files, sweep
from dask_shm.names import owned_names
from dask_shm.host import create_probe
from dask_shm.names import Directory, current_owner, new_name

from .conftest import SHM_DIR, is_root, ours, peer, root_only, until, wait_for
from .peers import payload
from .test_comm import echo_server

#: Leaves a buffer and a probe, then dies by SIGKILL: no
#: exit handler runs.
CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from dask_shm.buffers import Buffer
    from dask_shm.host import create_probe
    from dask_shm.names import Directory
    from dask_shm.outbox import Outboxes
    d = Directory(sys.argv[1])
    b = Buffer(d, 1 << 20, Outboxes())
    b.fill()
    create_probe(d)
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def crash() -> int:
    """Run CRASHER; its pid (its files are left in SHM_DIR)."""
    proc = subprocess.run([sys.executable, "-c", CRASHER, SHM_DIR], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stderr == ""  # no leak warnings, no traceback
    return int(proc.stdout)


def test_janitor_removes_what_a_killed_process_left() -> None:
    """kill -9 skips every exit handler; the janitor removes what is left."""
    pid = crash()
    left = [n for n in ours() if n.startswith(f"dask-shm-{pid}-")]
    assert sorted(n.split("-")[6] for n in left) == ["b", "p"]
    d = Directory(SHM_DIR)
    try:
        infos = [i for i in list_files(d) if i.owner.pid == pid]
        assert {i.name for i in infos} == set(left) and not any(i.alive for i in infos)
        assert [i.size for i in infos if i.kind == "b"] == [1 << 20]
        assert sorted(i.name for i in sweep(d, dry_run=True)) == sorted(left)
        assert set(ours()) == set(left)  # a dry run removes nothing
        assert sorted(i.name for i in sweep(d)) == sorted(left)
    finally:
        d.close()
    assert not ours()


def test_janitor_never_removes_a_live_process_file() -> None:
    d = Directory(SHM_DIR)
    b = Buffer(d, 1 << 16)
    probe, _ = create_probe(d)
    try:
        assert set(owned_names()) >= {b.name, probe}
        assert sweep(d) == []
        assert set(ours()) == {b.name, probe}
    finally:
        b.destroy()
        d.unlink(probe)
        d.close()
    assert not ours() and b.name not in owned_names()


def _plant(name: str) -> None:
    fd = os.open(f"{SHM_DIR}/{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def test_janitor_detects_pid_reuse_and_leaves_other_namespaces_alone() -> None:
    me = current_owner()
    token = new_name("b").rsplit("-", 1)[1]
    reused = f"dask-shm-{me.pid}-{me.start + 1}-{me.ns}-{me.boot}-b-{token}"
    foreign = f"dask-shm-{2**22 + 7}-1-{me.ns + 1}-{me.boot}-b-{token}"  # another pid namespace
    # Another host's (a directory shared across hosts): our /proc says
    # nothing of it, even where its pid and namespace match a dead one here.
    remote = f"dask-shm-{2**22 + 7}-1-{me.ns}-{'f' * 16}-b-{token}"
    _plant(reused)
    _plant(foreign)
    _plant(remote)
    d = Directory(SHM_DIR)
    try:
        assert [i.name for i in sweep(d)] == [reused]
        assert foreign in ours() and remote in ours()
    finally:
        os.unlink(f"{SHM_DIR}/{foreign}")
        os.unlink(f"{SHM_DIR}/{remote}")
        d.close()


def test_a_process_sweeps_orphans_when_it_first_uses_the_directory() -> None:
    """The first shm:// handshake of a process sweeps what dead processes
    left (no thread or timer of ours ever does)."""
    pid = crash()
    assert [n for n in ours() if n.startswith(f"dask-shm-{pid}-")]

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            assert not [n for n in ours() if n.startswith(f"dask-shm-{pid}-")]
            await comm.close()

    asyncio.run(main())


@pytest.mark.buffer
def test_a_message_nobody_reads_holds_its_regions_until_the_receiver_goes(shm_config: None) -> None:
    """Nothing is freed on a timer: the regions of a message the peer never
    read stay reserved while its comm lives, and are freed once the
    receiver's end is gone (another link keeps the buffer meanwhile)."""

    async def main() -> list[int]:
        receiving: list[Comm] = []
        in_flight = []

        async def handler(comm: Comm) -> None:
            receiving.append(comm)  # never reads

        async with listen("shm://127.0.0.1:0", handler) as listener:
            keep = await connect(listener.contact_address)
            comm = await connect(listener.contact_address)
            await comm.write({"x": to_serialize(np.ones(4 << 20, dtype="u1"))})
            # Its first two fragments (the most one message has in flight).
            await until(lambda: hosts.info()["buffer-in-flight"] >= FIRST_TWO)
            in_flight.append(hosts.info()["buffer-in-flight"])
            await until(lambda: len(receiving) == 2)
            [theirs] = [c for c in receiving if c.peer_address == comm.local_address]
            theirs.abort()  # the receiver goes, its message unread
            await comm.close()  # our end notices at its close at the latest
            in_flight.append(hosts.info()["buffer-in-flight"])
            assert hosts.info()["buffer-bytes"] > 0  # kept by the other link
            await keep.close()
            for c in receiving:
                c.abort()
        return in_flight

    held, after = asyncio.run(main())
    assert held >= FIRST_TWO and after == 0, (held, after)


#: The first two fragments of a message (see dask_shm.send.GROWTH) with the
#: default fragment-size: what a message nobody reads keeps in flight.
FIRST_TWO = 3 * (8 << 20) // GROWTH


# -- a full directory ---------------------------------------------------------


@contextmanager
def tmpfs(tmp_path: Path, options: str) -> Iterator[Path]:
    """A tmpfs of our own (``mount -o options``), and a process that has
    warned of nothing yet."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=1777", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, like Docker's default /dev/shm."""
    with tmpfs(tmp_path, "size=64m") as mnt:
        yield mnt


def of_ours(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith("dask-shm-")]


@root_only
def test_a_buffer_that_cannot_fit_fails_before_reserving_anything(small_tmpfs: Path) -> None:
    """Reserving a buffer larger than the free space would fill the directory
    for everyone else meanwhile: it fails first, naming the remedy."""
    d = Directory(str(small_tmpfs))
    b = Buffer(d, 128 << 20)
    try:
        free_before, _ = d.free_space()
        with pytest.raises(ShmFull, match="free of 64.0 MiB") as e:
            b.fill()
        assert d.free_space()[0] == free_before
        assert "--shm-size" in str(e.value) and "dask-shm.buffer-size" in str(e.value)
    finally:
        b.destroy()
        d.close()
    assert not of_ours(small_tmpfs)


def _warned_once(conf: dict[str, str], main: Callable[[], Awaitable[None]],
                 caplog: pytest.LogCaptureFixture) -> str:
    """Run ``main`` with ``conf``; the one "cannot reserve" warning it gave."""
    with dask.config.set(conf), caplog.at_level(logging.WARNING, logger="dask_shm"):
        asyncio.run(main())
    full = [r for r in caplog.records if "cannot reserve" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    return full[0].getMessage()


async def _round_trip(comm: Comm, x: np.ndarray) -> None:
    await comm.write({"x": to_serialize(x)})
    np.testing.assert_array_equal((await comm.read())["x"], x)


@root_only
@pytest.mark.buffer
def test_full_directory_falls_back_to_tcp_and_warns_once(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 128 MiB buffer in a 64 MiB directory: it is refused before anything
    is reserved, one warning names the remedy, and 100 MB messages travel
    over TCP, intact."""
    x = np.arange(125 * 10**5)  # 100 MB

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            for _ in range(2):  # a second comm: no second warning
                comm = await connect(listener.contact_address)
                assert comm.link is not None  # type: ignore[attr-defined]
                for _ in range(2):
                    await _round_trip(comm, x)
                await comm.close()

    conf = {"dask-shm.directory": str(small_tmpfs), "dask-shm.buffer-size": "128 MiB"}
    msg = _warned_once(conf, main, caplog)
    assert "free of 64.0 MiB" in msg and "--shm-size" in msg and "dask-shm.directory" in msg
    counts = stats.snapshot()
    assert counts["fallback-enospc"] >= 1 and counts.get("shm-messages", 0) == 0, counts
    assert counts["tcp-messages"] == 8, counts
    assert not of_ours(small_tmpfs)


@root_only
def test_a_directory_without_inodes_falls_back_to_tcp_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tmpfs with room but no inode left (``nr_inodes``): no file of ours
    can be created, so every comm is plain TCP, its messages arrive intact,
    and the condition is logged once, not once per comm."""
    x = np.arange(10**6)  # 8 MB
    with tmpfs(tmp_path, "size=64m,nr_inodes=2") as mnt:
        while True:  # take the inodes left, whatever the root directory used
            try:
                (mnt / f"someone-elses-{len(list(mnt.iterdir()))}").touch()
            except OSError:
                break

        said = _three_comms_in(mnt, x, caplog, linked=False)
        assert len(said) == 1 and "inodes" in said[0], said
        assert not of_ours(mnt)


def _three_comms_in(
    mnt: Path, x: np.ndarray, caplog: pytest.LogCaptureFixture, linked: bool | None = None
) -> list[str]:
    """Round-trip ``x`` over three comms, one after the other, with
    ``mnt`` as the directory (``linked``: whether each must have a link);
    what dask_shm logged meanwhile."""

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            for _ in range(3):
                comm = await connect(listener.contact_address)
                if linked is not None:
                    assert (comm.link is not None) == linked  # type: ignore[attr-defined]
                await _round_trip(comm, x)
                await comm.close()

    with dask.config.set({"dask-shm.directory": str(mnt)}), \
            caplog.at_level(logging.WARNING, logger="dask_shm"):
        asyncio.run(main())
    return [r.getMessage() for r in caplog.records if r.name.startswith("dask_shm")]


@root_only
def test_a_link_needs_no_inode_beyond_the_probe_and_the_buffer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Inodes enough for this process's probe and buffer, none more: links
    still form (their release sockets live in no directory) and carry
    messages through shared memory, with nothing logged."""
    x = np.arange(10**6)  # 8 MB
    with tmpfs(tmp_path, "size=256m,nr_inodes=64") as mnt:
        taken = []
        while True:
            try:
                taken.append(mnt / f"someone-elses-{len(taken)}")
                taken[-1].touch()
            except OSError:
                taken.pop()
                break
        for f in taken[-2:]:  # room for the probe and the buffer
            f.unlink()

        said = _three_comms_in(mnt, x, caplog, linked=True)
        assert said == []
        assert stats.snapshot()["shm-messages"] >= 6
        assert not of_ours(mnt)


def test_no_release_socket_is_tcp_for_that_link_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The accepting end cannot create a release socket (out of descriptors,
    injected): its comms are linked but send everything over TCP, intact,
    with one warning."""
    import errno

    from dask_shm import handshake

    def no_socket() -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(handshake, "listen", no_socket)
    said = _three_comms_in(Path(SHM_DIR), np.arange(10**6), caplog)
    assert len(said) == 1 and "release socket" in said[0], said
    assert stats.snapshot().get("shm-messages", 0) == 0
    assert stats.snapshot()["fallback-no-channel"] == 3


def _occupy(path: Path, nbytes: int) -> None:
    """Another program's file, holding ``nbytes`` of the directory."""
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, nbytes)


@root_only
@pytest.mark.buffer
def test_a_buffer_that_did_not_fit_is_filled_once_room_is_freed(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program holds most of the directory: the buffer does not fit,
    so the first message travels over TCP (one warning).  Once that program
    lets go, the next message fills the buffer and goes through it: a full
    directory costs the messages sent while it is full, not the comm's life."""
    x = np.arange(2 * 10**6)  # 16 MB
    filler = small_tmpfs / "someone-elses-file"
    _occupy(filler, 48 << 20)

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None  # type: ignore[attr-defined]
            await _round_trip(comm, x)
            sent = stats.snapshot()
            assert sent.get("shm-messages", 0) == 0 and sent["tcp-messages"] == 2, sent
            filler.unlink()
            await _round_trip(comm, x)
            assert stats.snapshot()["shm-messages"] == 2, stats.snapshot()
            await comm.close()

    conf = {"dask-shm.directory": str(small_tmpfs), "dask-shm.buffer-size": "32 MiB"}
    _warned_once(conf, main, caplog)
    assert not of_ours(small_tmpfs)


def test_a_buffer_the_kernel_will_not_map_sends_over_tcp() -> None:
    """A sender whose buffer the kernel refuses for another reason than a
    full directory (here its address space is too small for the mapping,
    as a memory cgroup or vm.max_map_count could refuse it): the message
    arrives intact over TCP, counted, and nothing is left behind.  The
    refusal is lasting, so the message does not try again (it would
    reserve the whole buffer before being refused)."""

    async def main() -> tuple[dict[str, Any], list[str]]:
        got: list[bool] = []

        async def handler(comm: Comm) -> None:
            x = (await comm.read())["x"]
            got.append(bool((x == payload(len(x))).all()))
            await comm.close()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            address = listener.contact_address
            async with peer("send", address, str(8 << 20), "--no-memory-to-map",
                            single_copy="false") as sender:
                report = await sender.done()
                assert got == [True], got
                return report, sender.files()

    report, left = asyncio.run(main())
    assert report["fallback-no-buffer"] == 1 and report["tcp-messages"] == 1, report
    assert report.get("shm-messages", 0) == 0, report
    assert left == [], left


@root_only
def test_links_that_read_in_place_outlive_a_buffer_that_does_not_fit(small_tmpfs: Path) -> None:
    """A process with links that read in place, and one comm to a peer that
    cannot, whose buffer does not fit the directory: that comm sends over
    TCP; the others keep reading in place."""
    x = np.arange(2 * 10**6)

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            in_place = await connect(listener.contact_address)
            assert in_place.link.single_copy  # type: ignore[attr-defined]
            with dask.config.set({"dask-shm.single-copy": False}):
                buffered = await connect(listener.contact_address)
            assert not buffered.link.single_copy  # type: ignore[attr-defined]
            await _round_trip(buffered, x)
            assert stats.snapshot()["fallback-enospc"] >= 1
            assert stats.snapshot().get("single-copy-messages", 0) == 0
            await _round_trip(in_place, x)
            got = stats.snapshot()
            assert got["single-copy-messages"] == 2 and got["tcp-messages"] == 2, got
            await buffered.close()
            await in_place.close()

    conf = {"dask-shm.directory": str(small_tmpfs), "dask-shm.buffer-size": "128 MiB"}
    with dask.config.set(conf):
        asyncio.run(main())
    assert not of_ours(small_tmpfs)


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
        assert not of_ours(small_tmpfs)
    finally:
        filler.unlink()


def _worker_state() -> dict[str, int]:
    from dask_shm import stats as worker_stats

    snap = worker_stats.snapshot()
    return {
        "pid": os.getpid(),
        "enospc": snap.get("fallback-enospc", 0),
        "probe-failed": snap.get("fallback-probe-failed", 0),
        "shm": snap.get("shm-messages", 0),
        "buffer": snap.get("buffer-bytes", 0),
    }


def _last(x: np.ndarray) -> int:
    return int(x[-1])


@root_only
@pytest.mark.parametrize("buffer_size", ["24 MiB", "64 MiB"])
@pytest.mark.buffer
def test_full_directory_on_a_cluster_moves_400_mb_and_no_worker_dies(
    small_tmpfs: Path, buffer_size: str
) -> None:
    """Worker processes on a 64 MiB directory (Docker's default /dev/shm):
    not every process's buffer fits (with the default 64 MiB, the first
    buffer fills the whole directory); those that do not fit send over TCP,
    as do comms whose probes found no room.  A 400 MB worker-to-worker
    dependency and a direct gather arrive intact, no worker dies (same pids
    before and after: no SIGBUS), and nothing is left in the directory."""
    from distributed import Client, LocalCluster

    conf = {
        "dask-shm.directory": str(small_tmpfs),
        "dask-shm.buffer-size": buffer_size,
        "dask-shm.fragment-size": "4 MiB",
    }
    with dask.config.set(conf), LocalCluster(
        protocol="shm", n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as lc, Client(lc) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        before = client.run(_worker_state)
        x = client.submit(np.arange, 5 * 10**7, workers=[a], pure=False)
        assert client.submit(_last, x, workers=[b]).result() == 5 * 10**7 - 1
        got = client.gather(x, direct=True)
        assert int(got[-1]) == 5 * 10**7 - 1 and got.size == 5 * 10**7
        after = client.run(_worker_state)
        assert {w: s["pid"] for w, s in after.items()} == {w: s["pid"] for w, s in before.items()}
        everywhere = [*after.values(), _worker_state()]  # (the nannies live in this process)
        assert sum(s["enospc"] + s["probe-failed"] for s in everywhere) >= 1, everywhere
        assert sum(s["buffer"] for s in everywhere) <= 64 << 20, everywhere
        del x, got
    assert wait_for(lambda: not of_ours(small_tmpfs))


@root_only
def test_unusable_directory_is_plain_tcp_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
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
def test_another_user_cannot_use_our_files_and_gets_tcp() -> None:
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
        with dask.config.set({"dask-shm.threshold": "64 KiB"}):
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
    assert wait_for(lambda: not ours())
