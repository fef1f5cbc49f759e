"""Survival: kill -9 in the middle of transfers, another host, long runs, and a
segment swapped under the receiver.

Everything here is real: worker processes, sockets, network namespaces and
files in the shared-memory directory.  Random choices come from a seed that
every failure message names (set ``DASK_SHM_SURVIVAL_SEED`` to replay one).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed import Client, KilledWorker, LocalCluster
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.comm.tcp import TCP
from distributed.protocol import to_serialize

from dask_shm import stats
from dask_shm.comm import _Envelope
from dask_shm.descriptor import Placement, encode
from dask_shm.pool import get_pool
from dask_shm.segments import (
    PREFIX,
    Segment,
    ShmDirectory,
    create_probe,
    current_owner,
    drain_unmaps,
    new_name,
    parse_name,
    sweep,
)

from .conftest import SHM_DIR, is_root, ours, wait_for
from .test_cluster import in_shm, where

ROOT = str(Path(__file__).resolve().parent.parent)
SEED = int(os.environ.get("DASK_SHM_SURVIVAL_SEED", random.SystemRandom().randrange(2**32)))


def _dask(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dask"), *args]


# -- what the workers run (module level: workers import it by reference) ------


def produce(seed: int, n: int) -> np.ndarray:
    """``n`` int64 whose values depend on their position and ``seed``: a frame
    delivered into the wrong place, truncated or stale shows."""
    return np.arange(n, dtype=np.int64) * 7 + seed


def check(x: np.ndarray, seed: int, n: int) -> tuple[int, int, bool]:
    """What a consumer reports about what it received."""
    return seed, len(x), bool(len(x) == n and (x == produce(seed, n)).all())


def identity() -> tuple[int, tuple[int, int, int]]:
    """(pid, owner identity as written into this process's segment names)."""
    return os.getpid(), current_owner().as_tuple()


def running_workers(dask_scheduler: Any) -> list[str]:
    return [a for a, ws in dask_scheduler.workers.items() if ws.status.name == "running"]


def janitor_here() -> list[str]:
    """Run the janitor in this process over the whole directory."""
    return [i.name for i in sweep(ShmDirectory.get(dask.config.get("dask-shm.directory")))]


def held_keys(dask_worker: Any) -> int:
    return len(dask_worker.data)


def counter(name: str) -> int:
    return stats.snapshot().get(name, 0)


def namespaces() -> dict[str, int]:
    """Which network namespace and which filesystem the shm directory of this
    process are (compared between "hosts")."""
    return {
        "net": os.stat("/proc/self/ns/net").st_ino,
        "shm-dev": os.stat(dask.config.get("dask-shm.directory")).st_dev,
    }


def resources() -> dict[str, int]:
    """What a process holds that a leak would grow: descriptors (all, and those
    of files in the shm directory), mappings of our segments, RSS."""
    fds = shm_fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        fds += 1
        shm_fds += PREFIX in target
    with open("/proc/self/maps") as f:
        maps = sum(PREFIX in line for line in f)
    return {"fds": fds, "shm-fds": shm_fds, "maps": maps, "rss": rss()}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle_here() -> dict[str, int]:
    """Empty this process's pool (after its warm-ups finished) and measure."""
    gc.collect()
    wait_for(lambda: get_pool().info()["warming"] == 0)
    get_pool().trim()
    drain_unmaps()
    gc.collect()
    return resources()


def dir_usage() -> tuple[int, int]:
    """(files, bytes) of ours in the shm directory."""
    n = size = 0
    for name in ours():
        try:
            size += os.stat(os.path.join(SHM_DIR, name), follow_symlinks=False).st_size
            n += 1
        except FileNotFoundError:
            pass
    return n, size


# =============================================================================
# 1. kill -9 during transfers

#: A process of another pid (not a Dask process) holding segments and a
#: probe; it stays alive throughout the rounds and removes them at its exit.
HOLDER = textwrap.dedent(
    """
    import sys
    from dask_shm.segments import ShmDirectory, Segment, create_probe, owned_names
    d = ShmDirectory.get(sys.argv[1])
    segs = [Segment.create(d, 3 * 4096) for _ in range(2)]
    create_probe(d)
    print(" ".join(owned_names()), flush=True)
    sys.stdin.read()
    """
)

KILL_ROUNDS = 30  # half killing a sender, half a receiver
TRANSFERS_PER_ROUND = 8
ROUND_TIMEOUT = 60  # a round that does not end by then is a hang


@contextmanager
def live_sentinels() -> Iterator[list[str]]:
    """Segments and a probe whose owners live throughout: this process and
    a separate holder process.  Yields their names; checks on the way out
    that they all survived every janitor, intact."""
    d = ShmDirectory.get(SHM_DIR)
    mine = Segment.create(d, 5 * 4096)
    assert mine.mapping is not None
    pattern = np.frombuffer(mine.mapping, dtype=np.uint8)
    expected = (np.arange(len(pattern)) % 253).astype(np.uint8)
    pattern[:] = expected
    probe, _token = create_probe(d)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, SHM_DIR],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        held = holder.stdout.readline().split()
        assert len(held) == 3, held
        names = [mine.name, probe, *held]
        yield names
        left = set(ours())
        assert set(names) <= left, f"a janitor removed a live process's file: {set(names) - left}"
        assert (pattern == expected).all(), "a live process's segment was changed"
    finally:
        del pattern
        mine.destroy()
        d.unlink(probe)
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    # The holder ended normally: it removed its own files.
    assert wait_for(lambda: not set(held) & set(ours())), ours()


def _owner_key(name: str) -> tuple[int, int, int]:
    return parse_name(name)[0].as_tuple()


@pytest.mark.slow
def test_kill_9_senders_and_receivers_during_transfers(shm_config: None) -> None:
    """Over 30 rounds, SIGKILL the worker process (the Nanny's child) that
    sends, or the one that receives, several-MB worker-to-worker transfers
    through shared memory, at varied delays after the computation starts
    (before anything moved, during, near the end).  Every round ends within
    its timeout (never a hang) with right results (Dask recomputes what was
    lost) or a clean KilledWorker/CommClosedError, never a wrong result; the
    cluster still computes through shared memory afterwards.  Without any
    explicit sweep, nothing a killed process owned is left (the janitors
    that run by themselves: at worker start, on peer loss).  The janitor run
    explicitly in every process removes only files of processes we killed,
    and no janitor ever removed a file of a live owner (this process and a
    separate holder process: all still there, contents intact).  Once the
    cluster is closed and the janitor has run, nothing of ours is left."""
    rng = random.Random(SEED)
    log: list[str] = []
    killed: set[tuple[int, int, int]] = set()

    def where_am_i() -> str:
        return f"seed {SEED}, rounds so far: {log}"

    # LocalCluster closes a Nanny for good when no worker of its name is back
    # 15 s (lost-worker-timeout) after one was lost: with a kill every second
    # or so, a Nanny whose restarted worker is killed again could be dropped.
    lost = {"distributed.deploy.lost-worker-timeout": "1h"}
    with live_sentinels() as sentinels, dask.config.set(lost):
        with LocalCluster(
            protocol="shm", n_workers=3, threads_per_worker=1, processes=True,
            dashboard_address=":0",
        ) as lc, Client(lc) as client:
            client.wait_for_workers(3, timeout=60)

            def one_round(r: int, role: str | None, delay: float) -> float:
                workers: list[str] = []

                def two_running() -> bool:
                    workers[:] = client.run_on_scheduler(running_workers)
                    return len(workers) >= 2

                assert wait_for(two_running, timeout=60), where_am_i()
                a, b = rng.sample(sorted(workers), 2)
                ids = client.run(identity, workers=[a, b])
                sizes = [rng.randrange(250_000, 1_500_000) for _ in range(TRANSFERS_PER_ROUND)]
                seeds = [r * 100 + i for i in range(TRANSFERS_PER_ROUND)]
                start = time.monotonic()
                xs = [
                    client.submit(produce, s, n, workers=[a], allow_other_workers=True, pure=False)
                    for s, n in zip(seeds, sizes, strict=True)
                ]
                ys = [
                    client.submit(check, x, s, n, workers=[b], allow_other_workers=True, pure=False)
                    for x, s, n in zip(xs, seeds, sizes, strict=True)
                ]
                if role is not None:
                    time.sleep(delay)
                    victim = ids[a if role == "sender" else b]
                    killed.add(tuple(victim[1]))
                    os.kill(victim[0], signal.SIGKILL)
                # A result may be lost after it was computed (its holder was
                # the victim) and recomputed: ask each future for its result.
                deadline = time.monotonic() + ROUND_TIMEOUT
                outcomes = []
                for y, s, n in zip(ys, seeds, sizes, strict=True):
                    try:
                        got = y.result(timeout=max(0.1, deadline - time.monotonic()))
                    except (KilledWorker, CommClosedError) as e:
                        outcomes.append(type(e).__name__)  # a clean error
                    except TimeoutError:
                        pytest.fail(f"round {r} ({role}, {delay:.3f} s) hung; {where_am_i()}")
                    else:
                        assert got == (s, n, True), f"wrong result in round {r}: {got}; {where_am_i()}"
                        outcomes.append("ok")
                elapsed = time.monotonic() - start
                log.append(f"{r}:{role}@{delay:.3f}s->{','.join(sorted(set(outcomes)))}")
                if role is not None:
                    # The killed worker's address leaves the scheduler before
                    # the next round picks its workers.
                    gone = a if role == "sender" else b
                    assert wait_for(
                        lambda: gone not in client.run_on_scheduler(running_workers), timeout=30
                    ), where_am_i()
                del xs, ys
                return elapsed

            # A round without a kill: how long the transfers take here, and
            # proof that they go through shared memory.
            baseline = one_round(0, None, 0.0)
            # (allow_other_workers lets the scheduler co-locate a pair now
            # and then, so not every one of the transfers need happen.)
            moved = client.run(counter, "segments-received")
            assert sum(moved.values()) >= 1, moved
            over_tcp = client.run(counter, "tcp-messages")
            assert sum(over_tcp.values()) == 0, over_tcp
            roles = ["sender", "receiver"] * (KILL_ROUNDS // 2)
            rng.shuffle(roles)
            for r, role in enumerate(roles, start=1):
                # Before anything moved, in the middle, and near the end.
                delay = rng.choice([0.0, rng.uniform(0, baseline), rng.uniform(0, 1.5 * baseline)])
                one_round(r, role, delay)
            assert len(killed) == KILL_ROUNDS

            # The cluster still works, through shared memory.
            client.wait_for_workers(3, timeout=60)
            one_round(KILL_ROUNDS + 1, None, 0.0)

            # The peer-loss janitor removed what the killed processes left,
            # without being asked.
            def killed_left() -> list[str]:
                return [n for n in ours() if _owner_key(n) in killed]

            assert wait_for(lambda: not killed_left(), timeout=30), (killed_left(), where_am_i())
            # Janitor runs in every process now: whatever they remove must
            # belong to a process we killed.
            removed = [n for names in client.run(janitor_here).values() for n in names]
            removed += janitor_here()
            assert all(_owner_key(n) in killed for n in removed), (removed, where_am_i())
            assert set(sentinels) <= set(ours())

        # Cluster closed: this process's pool emptied, then the janitor.
        settle_here()
        d = ShmDirectory.get(SHM_DIR)

        def leftovers() -> set[str]:
            sweep(d)
            return set(ours()) - set(sentinels)

        # Comms closed gracefully leave un-taken-over segments for their
        # grace period (10 s), owned by a live process: wait them out.
        wait_for(lambda: not leftovers(), timeout=30)
        assert not leftovers(), (sorted(leftovers()), where_am_i())
    print(f"seed {SEED}, round without a kill {baseline:.3f} s: {' '.join(log)}")


def _leaked_probe(name: str) -> bool:
    """A probe of this (live) process: what the probe leak leaves."""
    owner, kind = parse_name(name)
    return kind == "p" and owner == current_owner()


def _my_probes() -> list[str]:
    gc.collect()
    return [n for n in ours() if _leaked_probe(n)]


@pytest.mark.parametrize("side", ["connecting", "listening"])
def test_peer_dying_during_the_handshake_leaves_no_probe(side: str) -> None:
    """What the kill -9 rounds found, reproduced deterministically: the peer
    of an shm:// comm dies in the middle of the handshake (after our probe
    was created and named to it, before it answered).  Our probe file must
    not outlive the failed comm: the janitor never removes a live process's
    files, so in a long-lived scheduler such probes would pile up."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if side == "connecting":
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            srv.setblocking(False)

            async def dying_peer() -> None:
                conn, _ = await loop.sock_accept(srv)
                await loop.sock_recv(conn, 65536)  # our handshake, probe named
                conn.close()  # dies without answering

            with srv:
                peer = asyncio.ensure_future(dying_peer())
                with pytest.raises(CommClosedError):
                    await connect(f"shm://127.0.0.1:{srv.getsockname()[1]}", timeout=10)
                await peer
        else:

            async def handler(comm: Comm) -> None:  # never reached
                comm.abort()

            async with listen("shm://127.0.0.1:0", handler) as listener:
                host, port = listener.contact_address[len("shm://"):].rsplit(":", 1)
                with socket.create_connection((host, int(port))) as conn:
                    # The listener wrote its handshake (probe named) to us.
                    await loop.run_in_executor(None, conn.recv, 65536)
                await asyncio.sleep(0.2)  # it notices the close

    try:
        asyncio.run(main())
        assert wait_for(lambda: not _my_probes(), timeout=2), _my_probes()
    finally:
        for name in _my_probes():  # don't fail the leak fixture for this
            os.unlink(os.path.join(SHM_DIR, name))


# =============================================================================
# 2. Another host: own network and own /dev/shm


def _missing_tools() -> str | None:
    if not is_root():
        return "network and mount namespaces need root (CI runs as root)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


needs_namespaces = pytest.mark.skipif(_missing_tools() is not None, reason=str(_missing_tools()))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def other_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to ours by a veth pair on a free
    10.200.x.0/24; yields (namespace, our address, its address) and removes
    both in the end."""
    tag = f"{os.getpid() % 10**6}"
    ns = f"dshm-surv-{tag}"
    here, there = f"dsv{tag}a", f"dsv{tag}b"
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    x = next(i for i in random.Random(SEED).sample(range(1, 255), 254) if f"10.200.{i}." not in used)
    ours_ip, its_ip = f"10.200.{x}.1", f"10.200.{x}.2"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{ours_ip}/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{its_ip}/24", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, ours_ip, its_ip
    finally:
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


#: Run in the namespace: a fresh tmpfs over /dev/shm and over the directory
#: under test (the same path as here, another filesystem), then the command.
_OWN_SHM = (
    'mount -t tmpfs -o size=512m,mode=1777 tmpfs /dev/shm && mkdir -p "$D" && '
    '{ [ "$D" = /dev/shm ] || mount -t tmpfs -o size=512m,mode=1777 tmpfs "$D"; } && exec "$@"'
)


def _close_worker(address: str, dask_scheduler: Any) -> None:
    dask_scheduler.close_worker(address)


@contextmanager
def worker_on_other_host(ns: str, its_ip: str, client: Client, n: int) -> Iterator[str]:
    """A ``dask worker --no-nanny`` on the other host, joined to ``client``'s
    scheduler; yields its address once ``n`` workers are up.

    On a normal exit the scheduler asks it to close and it must end by itself
    with status 0.  (SIGTERM is the way out only after a failure: a ``--no-nanny``
    worker's SIGTERM path cancels every asyncio task, and when that catches
    its batched stream mid-write, distributed's ``BatchedSend.close`` waits
    out its 30 s timeout.)"""
    env = dict(
        os.environ,
        D=SHM_DIR,
        DASK_DASK_SHM__DIRECTORY=SHM_DIR,
        DASK_DASK_SHM__COLD_TRANSFER="shm",
        DASK_DASK_SHM__THRESHOLD="64 KiB",
        PYTHONFAULTHANDLER="1",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    scheduler = client.scheduler.address
    cmd = [
        "ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
        "sh", "-c", _OWN_SHM, "sh",
        *_dask("worker", scheduler, "--no-nanny", "--nthreads", "1", "--host", its_ip,
               "--no-dashboard", "--name", "other-host"),
    ]
    # ip, unshare and sh all exec: this pid becomes the worker's.  Its log
    # goes to a file (a pipe nobody reads could fill up and block it).
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        failing = False
        try:
            client.wait_for_workers(n, timeout=60)
            [address] = [a for a in client.scheduler_info()["workers"] if f"//{its_ip}:" in a]
            yield address
            client.run_on_scheduler(_close_worker, address)
            proc.wait(30)
        except BaseException:
            failing = True
            raise
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                # Stuck: faulthandler (PYTHONFAULTHANDLER) writes every
                # thread's stack to the log on SIGABRT, shown below.
                proc.send_signal(signal.SIGABRT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace")[-12000:]
            sys.stderr.write(f"other host's worker log (tail):\n{tail}\n")  # shown on failure
            if not failing and proc.returncode != 0:
                pytest.fail(f"the other host's worker ended with {proc.returncode}:\n{tail}")


@needs_namespaces
@pytest.mark.root
def test_worker_on_another_host_gets_tcp_and_right_results(shm_config: None) -> None:
    """A worker in its own network namespace (veth pair) and mount namespace
    (its own tmpfs at the same directory path) joins a scheduler here over
    shm://.  It cannot read our probes nor we its: the handshake fails on
    both sides (``handshake-no-probe``), nothing goes through shared memory,
    every frame travels over TCP, and scatter, compute and gather of
    several-MB arrays give the right results."""
    with other_host() as (ns, ours_ip, its_ip), LocalCluster(
        protocol="shm", host=ours_ip, n_workers=0, processes=True, dashboard_address=":0"
    ) as lc, Client(lc) as client, worker_on_other_host(ns, its_ip, client, 1) as c:
        there = client.run(namespaces, workers=[c])[c]
        assert there["net"] != namespaces()["net"]
        assert there["shm-dev"] != namespaces()["shm-dev"]  # its own tmpfs

        data = produce(1, 2 * 10**6)  # 16 MB
        [x] = client.scatter([data], workers=[c])
        np.testing.assert_array_equal(client.submit(np.multiply, x, 3).result(), data * 3)
        y = client.submit(produce, 2, 10**6, workers=[c], pure=False)
        assert client.submit(check, y, 2, 10**6, workers=[c]).result() == (2, 10**6, True)
        for direct in (False, True):
            got = client.gather(y, direct=direct)
            np.testing.assert_array_equal(got, produce(2, 10**6))
            del got

        counts = client.run(stats.snapshot, workers=[c])[c]
        assert counts.get("handshake-no-probe", 0) >= 1, counts
        assert counts.get("handshake-shm", 0) == 0, counts
        for name in ("shm-messages", "segments-received", "segments-created"):
            assert counts.get(name, 0) == 0, counts
        # This process (scheduler and client) failed the probe with it too.
        assert counter("handshake-no-probe") >= 1
        del x, y


@needs_namespaces
@pytest.mark.root
def test_cluster_across_two_hosts(shm_config: None) -> None:
    """Two workers here and one on "another host" (own network and
    /dev/shm): worker-to-worker transfers between the two here go through
    shared memory (zero-copy, ``shm-messages`` > 0); transfers to and from the
    other host, whose handshakes with this host's processes all fail the
    probe, travel over TCP; every result is right."""
    n = 2 * 10**6  # 16 MB
    with other_host() as (ns, ours_ip, its_ip), LocalCluster(
        protocol="shm", host=ours_ip, n_workers=2, threads_per_worker=1, processes=True,
        dashboard_address=":0",
    ) as lc, Client(lc) as client, worker_on_other_host(ns, its_ip, client, 3) as c:
        a, b = sorted(w for w in client.scheduler_info()["workers"] if w != c)

        x = client.submit(np.arange, n, workers=[a], pure=False)
        here = client.submit(where, x, workers=[b], pure=False).result()  # a -> b: same host
        across = client.submit(where, x, workers=[c], pure=False).result()  # a -> c: across
        assert here["ok"] and in_shm(here), here
        assert across["ok"] and not in_shm(across), across
        z = client.submit(produce, 5, n, workers=[c], pure=False)
        for w in (a, b):  # c -> a, c -> b: across
            assert client.submit(check, z, 5, n, workers=[w], pure=False).result() == (5, n, True)
        assert here["pid"] != across["pid"]
        np.testing.assert_array_equal(client.gather(z), produce(5, n))

        counts = client.run(stats.snapshot)
        assert counts[a].get("shm-messages", 0) >= 1, counts
        assert counts[b].get("segments-received", 0) >= 1, counts
        assert counts[a].get("handshake-shm", 0) >= 1 and counts[b].get("handshake-shm", 0) >= 1
        # The other host: failed probes with the scheduler and both workers
        # here, nothing in shared memory either way.
        assert counts[c].get("handshake-no-probe", 0) >= 3, counts[c]
        assert counts[c].get("handshake-shm", 0) == 0, counts[c]
        for name in ("shm-messages", "segments-received", "segments-created"):
            assert counts[c].get(name, 0) == 0, counts[c]
        del x, z


# =============================================================================
# 3. Long runs


def _mixed_sizes(rng: random.Random, count: int) -> list[int]:
    """Mostly small, from 100 B to 16 MiB, log-uniform within bands."""
    out = []
    for _ in range(count):
        u = rng.random()
        lo, hi = (
            (100, 4096) if u < 0.70 else
            (4096, 256 << 10) if u < 0.90 else
            (256 << 10, 2 << 20) if u < 0.98 else
            (2 << 20, 16 << 20)
        )
        out.append(int(lo * (hi / lo) ** rng.random()))
    return out


#: RSS may end this much above where it started: the allocator keeps some
#: freed memory (arenas, numpy's cache), and a 16 MiB message in flight
#: is 2 x 16 MiB transiently.
RSS_TOLERANCE = 96 << 20
LONG_POOL_SIZE = 256 << 20


@pytest.mark.slow
def test_ten_thousand_messages_over_one_comm_leave_nothing_behind(shm_config: None) -> None:
    """10,000 messages of mixed sizes (100 B to 16 MiB, mostly small) echoed
    over one shm:// comm: every one comes back intact and in order; our
    files and bytes in the directory stay bounded by the pools throughout;
    afterwards (pool trimmed, warm-ups finished) our files, descriptors and
    mappings are back to their starting level exactly, and RSS within
    RSS_TOLERANCE."""
    rng = random.Random(SEED)
    sizes = _mixed_sizes(rng, 10_000)
    assert max(sizes) > 8 << 20 and min(sizes) < 200
    peak = {"files": 0, "bytes": 0, "rss": 0}

    async def echo(comm: Comm) -> None:
        try:
            while True:
                msg = await comm.read()
                msg["x"] = to_serialize(msg["x"])
                await comm.write(msg)
                del msg
        except CommClosedError:
            pass
        finally:
            await comm.close()

    async def run(sizes: list[int]) -> None:
        async with listen("shm://127.0.0.1:0", echo) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None  # type: ignore[attr-defined]
            for i, n in enumerate(sizes):
                x = np.full(n, i % 251, dtype=np.uint8)
                await comm.write({"i": i, "x": to_serialize(x)})
                back = await comm.read()
                assert back["i"] == i and back["x"].nbytes == n and (back["x"] == i % 251).all(), (i, n, SEED)
                del back, x
                if i % 500 == 0:
                    files, size = dir_usage()
                    peak["files"] = max(peak["files"], files)
                    peak["bytes"] = max(peak["bytes"], size)
                    peak["rss"] = max(peak["rss"], rss())
            await comm.close()
        # The echo server's side closes asynchronously.
        for _ in range(100):
            if not [c for c in Comm._instances if not c.closed()]:
                break
            await asyncio.sleep(0.05)

    with dask.config.set({"dask-shm.pool-size": LONG_POOL_SIZE}):
        # Warm-up: everything that is created once per process (threads,
        # module state, allocator arenas) exists before the baseline.
        asyncio.run(run(_mixed_sizes(rng, 300) + [16 << 20]))
        start = settle_here()
        assert dir_usage() == (0, 0) and start["shm-fds"] == 0 and start["maps"] == 0
        t0 = time.monotonic()
        asyncio.run(run(sizes))
        elapsed = time.monotonic() - t0
        counts = stats.snapshot()
        end = settle_here()
    assert counts["shm-messages"] > 0, counts
    # Bounded while running: both ends live in this process and share its
    # pool (mapped and parked, each at most the pool size), plus the few
    # segments of the messages in flight (size classes up to 20 MiB).
    assert peak["bytes"] <= 2 * LONG_POOL_SIZE + 4 * (20 << 20), peak
    assert wait_for(lambda: dir_usage() == (0, 0)), ours()
    assert end["shm-fds"] == 0 and end["maps"] == 0, end
    assert end["fds"] == start["fds"], (start, end)
    assert end["rss"] <= start["rss"] + RSS_TOLERANCE, (start, end, peak)
    print(f"10,000 messages in {elapsed:.1f} s; start {start}, end {end}, peak {peak}, seed {SEED}")


#: Sockets a worker may keep in its connection pools after a busier run.
FD_TOLERANCE = 16


@pytest.mark.slow
def test_mixed_workload_on_a_cluster_leaves_nothing_behind(shm_config: None) -> None:
    """Rounds of mixed-size worker-to-worker dependencies, scatters and
    gathers (direct and through the scheduler) on a 2-worker shm:// cluster:
    results are right; afterwards, with the data released and every pool
    trimmed, each process maps none of our segments and holds no
    descriptor of one, our directory is empty, descriptors are within
    FD_TOLERANCE of their start (pooled connections) and RSS within
    RSS_TOLERANCE."""
    rng = random.Random(SEED + 1)

    def workload(client: Client, rounds: int) -> None:
        a, b = sorted(client.scheduler_info()["workers"])
        for r in range(rounds):
            sizes = [max(1, s // 8) for s in _mixed_sizes(rng, 24)] + [2 * 10**6]
            xs = [client.submit(produce, r * 100 + i, n, workers=[a], pure=False)
                  for i, n in enumerate(sizes)]
            ys = [client.submit(check, x, r * 100 + i, n, workers=[b], pure=False)
                  for i, (x, n) in enumerate(zip(xs, sizes, strict=True))]
            assert client.gather(ys) == [(r * 100 + i, n, True) for i, n in enumerate(sizes)], SEED
            scattered = client.scatter([produce(r, n) for n in sizes[-4:]], workers=[b], direct=bool(r % 2))
            back = client.gather(scattered, direct=not r % 2)
            for got, n in zip(back, sizes[-4:], strict=True):
                np.testing.assert_array_equal(got, produce(r, n))
            got = client.gather(xs[-1], direct=bool(r % 2))
            np.testing.assert_array_equal(got, produce(r * 100 + len(sizes) - 1, sizes[-1]))
            del xs, ys, scattered, back, got
        assert wait_for(lambda: not any(client.run(held_keys).values()), timeout=30)

    def settle_all(client: Client) -> dict[str, dict[str, int]]:
        out = dict(client.run(settle_here))
        out["client+scheduler"] = settle_here()
        return out

    with LocalCluster(
        protocol="shm", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as lc, Client(lc) as client:
        workload(client, 2)  # warm-up
        start = settle_all(client)
        assert wait_for(lambda: dir_usage() == (0, 0)), ours()
        workload(client, 12)
        moved = client.run(counter, "shm-messages")
        assert all(moved.values()), moved
        end = settle_all(client)
        assert wait_for(lambda: dir_usage() == (0, 0)), ours()
    for who, e in end.items():
        s = start[who]
        assert e["shm-fds"] == 0 and e["maps"] == 0, (who, e)
        assert e["fds"] <= s["fds"] + FD_TOLERANCE, (who, s, e)
        assert e["rss"] <= s["rss"] + RSS_TOLERANCE, (who, s, e)
    print(f"start {start}\nend {end}")


# =============================================================================
# 4. A segment swapped between the descriptor and its take-over

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_OPEN = 0x1, 0x2, 0x4, 0x20


class OpenWatch:
    """inotify on one file: whether anything opened, read, wrote or
    re-attributed it since the watch started."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        mask = IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_OPEN
        assert libc.inotify_add_watch(self.fd, str(path).encode(), mask) >= 0

    def events(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.fd)


def _fallocated(path: str, size: int, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


SIZE = 1 << 20


def _swap(kind: str, path: str, outside: Path) -> None:
    """Replace the file at ``path`` (atomically where a rename can) with
    something the receiver must refuse."""
    tmp = os.path.join(SHM_DIR, f".swap-{os.getpid()}")  # not one of our names
    if kind == "sparse":
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, SIZE)
        os.close(fd)
    elif kind == "group-readable":
        _fallocated(tmp, SIZE, 0o640)
    elif kind == "smaller":
        _fallocated(tmp, SIZE // 2)
    elif kind == "other-uid":
        _fallocated(tmp, SIZE)
        os.chown(tmp, 65534, 65534)
    elif kind == "fifo":
        os.mkfifo(tmp, 0o600)
    elif kind == "symlink":
        os.symlink(outside, tmp)
    elif kind == "directory":
        os.mkdir(tmp, 0o700)
        os.unlink(path)
    else:
        raise AssertionError(kind)
    os.rename(tmp, path)


SWAPS = [
    pytest.param("sparse", "allocated", id="sparse"),
    pytest.param("group-readable", "not owner-only", id="group-readable"),
    pytest.param("smaller", "less than the", id="smaller"),
    pytest.param(
        "other-uid", "owned by uid 65534", id="other-uid",
        marks=pytest.mark.skipif(not is_root(), reason="chown to another uid needs root (CI runs as root)"),
    ),
    pytest.param("fifo", "not a regular file", id="fifo"),
    pytest.param("symlink", "cannot open segment", id="symlink"),
    pytest.param("directory", "cannot open segment", id="directory"),
]


@pytest.mark.parametrize("kind, problem", SWAPS)
def test_segment_swapped_after_the_descriptor_was_sent(
    kind: str, problem: str, tmp_path: Path
) -> None:
    """A valid, fully allocated 0600 segment of the sender is named in a
    descriptor; after the descriptor is on its way but before the receiver
    reads it, the file under that name is replaced (sparse, group-readable,
    too small, another uid, a FIFO, a symlink out of the directory, a
    directory).  The receiver's checks run on what it actually opened after
    the rename, so it refuses the swapped file: a CommClosedError naming the
    problem, the receiving comm closed, the sender's comm sees the close, the
    swapped-in file is removed, and the symlink's target outside the
    directory was never opened (inotify) nor changed."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"o" * SIZE)
    before = outside.stat()
    name = new_name("s")  # this process is the peer: the name is its own
    path = os.path.join(SHM_DIR, name)
    _fallocated(path, SIZE)

    async def main() -> tuple[Exception, bool, Exception | None]:
        gate = asyncio.Event()
        result: asyncio.Queue[tuple[Exception, bool]] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            await gate.wait()  # the envelope waits in the socket meanwhile
            try:
                await comm.read()
            except Exception as e:  # noqa: BLE001  (whatever it raised is the result)
                await result.put((e, comm.closed()))
            finally:
                comm.abort()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None  # type: ignore[attr-defined]
            desc = encode(1, [Placement(0, name, 0, SIZE)])
            await TCP.write(comm, _Envelope(desc).pickled())
            _swap(kind, path, outside)
            gate.set()
            err, closed = await asyncio.wait_for(result.get(), 10)
            sender_side: Exception | None = None
            try:
                await asyncio.wait_for(comm.read(), 10)
            except Exception as e:  # noqa: BLE001  (whatever it raised is the result)
                sender_side = e
            comm.abort()
        return err, closed, sender_side

    watch = OpenWatch(outside)
    try:
        err, closed, sender_side = asyncio.run(main())
        untouched = watch.events()
        outside.read_bytes()  # the watch works: this open is seen
        assert watch.events(), "inotify saw nothing: the check above proves nothing"
    finally:
        watch.close()
        if os.path.isdir(path):  # only when the product bug hits
            os.rmdir(path)
        for n in ours():
            if os.path.isdir(os.path.join(SHM_DIR, n)):
                os.rmdir(os.path.join(SHM_DIR, n))
    assert isinstance(err, CommClosedError), repr(err)
    assert problem in str(err) and name in str(err), str(err)
    assert closed, "the receiving comm is still open"
    assert isinstance(sender_side, CommClosedError), repr(sender_side)
    assert not ours(), ours()  # the swapped-in file was taken over, then removed
    assert untouched == b"", "something opened the file outside the directory"
    after = outside.stat()
    assert outside.read_bytes() == b"o" * SIZE
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
