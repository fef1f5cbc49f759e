"""Single copy: where the kernel lets a receiver read its peer's memory
(``process_vm_readv``), large frames are copied once, straight out of the
sender's objects, and the shared buffer is never filled."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.comm.tcp import TCP
from distributed.protocol import to_serialize

from dask_shm import host as hosts, stats
from dask_shm.descriptor import Envelope
from dask_shm.descriptor import encode

from .conftest import ROOT, first_read_error, ours, peer, peer_env


SIZES = [2 * 10**6, 7 * 10**6 + 3, 64 * 10**6, 130 * 10**6]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def echo_server() -> Any:
    async def handler(comm: Comm) -> None:
        try:
            while True:
                await comm.write(await comm.read())
        except CommClosedError:
            pass
        finally:
            await comm.close()

    return listen("shm://127.0.0.1:0", handler)


def test_large_messages_are_read_in_place_and_the_buffer_stays_empty() -> None:
    async def main() -> None:
        async with await echo_server() as listener:
            comm = await connect(listener.contact_address)
            try:
                assert comm.link is not None and comm.link.single_copy  # type: ignore[attr-defined]
                for n in SIZES:
                    x = np.random.default_rng(n).integers(0, 255, n, dtype=np.uint8)
                    parts = {"a": to_serialize(x), "b": to_serialize(x[: n // 3]), "c": b"tiny"}
                    await comm.write(parts)
                    got = await comm.read()
                    assert np.array_equal(got["a"], x) and np.array_equal(got["b"], x[: n // 3])
                    assert got["c"] == b"tiny" and got["a"].flags.writeable
                # Nothing went through the buffer: it was never reserved.
                assert hosts.info()["buffer-bytes"] == 0
            finally:
                await comm.close()

    run(main())
    counts = stats.snapshot()
    assert counts["single-copy-messages"] == 2 * len(SIZES), counts  # both directions
    assert counts["shm-messages"] == 2 * len(SIZES)


SERVER = textwrap.dedent(
    """
    import asyncio, ctypes, sys
    if sys.argv[1] == "undumpable":
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    import dask_shm
    from distributed.comm import listen

    async def main():
        done = asyncio.Event()

        async def handler(comm):
            try:
                while True:
                    msg = await comm.read()
                    await comm.write({"x": msg["x"], "in-place": comm.link.single_copy})
            except Exception:
                done.set()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            print(listener.contact_address, flush=True)
            await done.wait()

    asyncio.run(main())
    """
)


def exchange_with(how: str, **conf: str) -> tuple[bool, bool]:
    """Send 20 MB to a server process started ``how`` and back; return
    (we write in place, it writes in place)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, how], cwd=ROOT, env=peer_env(**conf),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()

        async def main() -> tuple[bool, bool]:
            comm = await connect(address)
            try:
                x = np.arange(20 * 10**6, dtype=np.uint8)
                await comm.write({"x": to_serialize(x)})
                got = await comm.read()
                assert np.array_equal(got["x"], x)
                return comm.link.single_copy, got["in-place"]  # type: ignore[attr-defined]
            finally:
                await comm.close()

        out = run(main())
        assert proc.wait(30) == 0
        return out
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_process_with_single_copy_off_neither_reads_nor_is_read_in_place() -> None:
    assert exchange_with("plain", single_copy="false") == (False, False)


#: An unprivileged user for the peers of the refusal tests: as root (CI) any
#: process may read any other, so the kernel would never refuse.
NOBODY = 65534


def as_user(dumpable: bool) -> list[str]:
    """Options of a peer process (see tests.peers.become): run as NOBODY if
    we are root, as we are otherwise, readable by its user's processes or
    not (``PR_SET_DUMPABLE``: a non-dumpable process refuses readers of its
    own user that lack ``CAP_SYS_PTRACE``)."""
    uid = ["--uid", str(NOBODY)] if os.geteuid() == 0 else []
    return [*uid, "--dumpable", "1" if dumpable else "0"]


@pytest.mark.parametrize("refuses", ["listener", "client", "both"])
def test_where_the_kernel_refuses_single_copy_the_buffer_carries_the_bytes(refuses: str) -> None:
    """Two unprivileged peers, one (or both) refusing to be read: what it
    sends goes through its buffer, byte for byte, the counters say why, and
    nothing is left behind; what the other sends is still read in place."""

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        listener_dumpable = refuses == "client"
        client_dumpable = refuses == "listener"
        async with peer("echo", process=as_user(listener_dumpable)) as listener:
            address = await listener.ready()
            async with peer("client", address, process=as_user(client_dumpable)) as client:
                got = await client.done()
            return await listener.done(), got

    served, sent = run(main())
    assert sent["linked"]
    for me, other, me_refuses in (
        (sent, served, refuses in ("client", "both")),
        (served, sent, refuses in ("listener", "both")),
    ):
        # Two messages each way (client.py), both above the threshold.
        assert me["shm-messages"] == 2, (me, other)
        assert me.get("single-copy-messages", 0) == (0 if me_refuses else 2), (me, other)
        # The reader says why it could not read in place.
        assert other.get("single-copy-refused-eperm", 0) == (1 if me_refuses else 0), other
    assert not ours()


def test_an_address_the_sender_does_not_have_closes_the_comm() -> None:
    async def send(comm: Comm) -> None:
        descriptor = encode([1000], [(8, 1000)], remote=True)  # page 0: never mapped
        await TCP.write(comm, Envelope(descriptor).pickled())  # type: ignore[arg-type]

    err = run(first_read_error(send))
    assert isinstance(err, CommClosedError), repr(err)
    assert "cannot read 1 frame(s) in the memory of pid" in str(err)


def test_fragments_that_do_not_match_the_frames_close_the_comm() -> None:
    async def send(comm: Comm) -> None:
        x = np.ones(1000, dtype=np.uint8)
        descriptor = encode([1000], [(x.ctypes.data, 999)], remote=True)
        await TCP.write(comm, Envelope(descriptor).pickled())  # type: ignore[arg-type]

    err = run(first_read_error(send))
    assert "do not match the frames" in str(err) or "fragment" in str(err), str(err)


def test_a_cluster_with_the_defaults() -> None:
    """dask.array work, scatter and gather through the scheduler (a relay:
    it reads in place from one process and is read in place by the next)."""
    import dask.array as da

    with LocalCluster(
        protocol="shm", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        x = da.random.default_rng(0).random((4000, 4000), chunks=(1000, 4000))
        y = x.rechunk((4000, 1000))
        assert np.isclose(y.sum().compute(), x.sum().compute())
        a = np.arange(8 * 10**6)
        [f] = client.scatter([a])
        assert np.array_equal(client.gather(f), a)
        moved = client.run(lambda: __import__("dask_shm").stats.snapshot().get("single-copy-messages", 0))
        assert sum(moved.values()) > 0, moved
        del f


#: Bytes of the frame the handoff tests relay (above the threshold).
RELAYED = 8 * 2**20


def relayed_frame() -> tuple[dict[str, Any], np.ndarray]:
    """A serialized array's header, and its frame as a relay receives it: an
    array of its own (see dask_shm.handoff)."""
    from distributed.protocol import serialize

    header, [data] = serialize(np.arange(RELAYED // 8, dtype=np.float64))
    frame = np.empty(RELAYED, dtype=np.uint8)
    frame[:] = np.frombuffer(data, dtype=np.uint8)
    return header, frame


def collecting_server(got: asyncio.Queue[Any], unread: list[Comm] | None = None) -> Any:
    """A listener whose comms put what they read into ``got``; if ``unread``
    is given, its first comm goes there instead and reads nothing."""

    async def handler(comm: Comm) -> None:
        if unread is not None and not unread:
            unread.append(comm)
            return
        try:
            while True:
                await got.put(await comm.read())
        except CommClosedError:
            pass
        finally:
            await comm.close()

    return listen("shm://127.0.0.1:0", handler)


@pytest.mark.parametrize("holder", [None, "array", "slice", "memoryview", "memoryview slice"])
def test_in_one_process_a_frame_only_its_pin_holds_is_handed_over(holder: str | None) -> None:
    """A relay forwarding a frame to a reader in its own process (a
    LocalCluster's scheduler and client) hands the array over instead of
    copying it, but only when nothing else refers to it: a frame the relay
    still holds, or any view of it, is copied, and the reader's writes never
    reach it."""
    from distributed.protocol.serialize import Serialized

    async def main() -> None:
        got: asyncio.Queue[Any] = asyncio.Queue()
        async with collecting_server(got) as listener:
            comm = await connect(listener.contact_address)
            try:
                assert comm.link.same_process  # type: ignore[attr-defined]
                header, frame = relayed_frame()
                held = {None: None, "array": frame, "slice": frame[8:],
                        "memoryview": memoryview(frame),
                        "memoryview slice": memoryview(frame)[8:]}[holder]
                msg = {"x": Serialized(header, [frame])}
                del frame
                await comm.write(msg)
                del msg  # as distributed's handler drops its reply once written
                x = (await got.get())["x"]
                assert x[-1] == RELAYED // 8 - 1 and x.flags.writeable
                x[:] = -1
                if held is not None:
                    assert np.frombuffer(held, dtype=np.uint8)[-1] != 255  # untouched
            finally:
                await comm.close()

    run(main())
    counts = stats.snapshot()
    assert counts.get("handoff-frames", 0) == (1 if holder is None else 0), counts
    assert counts["single-copy-messages"] == 1


def test_an_offer_whose_pin_has_gone_hands_nothing_over() -> None:
    """A frame offered to a reader that hung up unread loses its pin; another
    holder of the same memory that then sends it on must not be taken for
    that pin.  Nor is an array anything else holds a weak reference to."""
    import weakref

    from distributed.protocol.serialize import Serialized

    async def main() -> None:
        got: asyncio.Queue[Any] = asyncio.Queue()
        readers: list[Comm] = []
        async with collecting_server(got, unread=readers) as listener:
            unread = await connect(listener.contact_address)
            comm = await connect(listener.contact_address)
            try:
                header, a = relayed_frame()
                msg = {"x": Serialized(header, [a])}
                await unread.write(msg)
                del msg
                readers[0].abort()
                outbox = unread.link.outbox  # type: ignore[attr-defined]
                await asyncio.wait_for(unread.link.wait_until_released(), 10)  # type: ignore[attr-defined]
                assert outbox.closed and not outbox.pinned
                held = memoryview(a)  # now the only holder of that memory
                del a
                msg = {"x": Serialized(header, [held])}
                await comm.write(msg)
                del msg
                x = (await got.get())["x"]
                x[:] = -1
                assert np.frombuffer(held, dtype=np.float64)[-1] == RELAYED // 8 - 1

                header, b = relayed_frame()
                watcher = weakref.ref(b)
                msg = {"x": Serialized(header, [b])}
                del b
                await comm.write(msg)
                del msg
                x = (await got.get())["x"]
                x[:] = -1
                assert watcher() is not None and watcher()[-1] != 255  # type: ignore[index]
            finally:
                await unread.close()
                await comm.close()

    run(main())
    assert stats.snapshot().get("handoff-frames", 0) == 0


def test_a_client_in_the_scheduler_process_takes_over_what_it_gathers() -> None:
    """Gathering through the scheduler copies once (worker to scheduler):
    the client, in the scheduler's process, takes the scheduler's frame
    over.  What it then changes is its own."""
    with LocalCluster(
        protocol="shm", n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        f = client.submit(np.arange, 10**7, pure=False)
        got = client.gather(f, direct=False)
        assert stats.snapshot().get("handoff-frames", 0) >= 1
        assert got[-1] == 10**7 - 1 and got.flags.writeable
        got[:] = 0
        assert client.gather(f, direct=False)[-1] == 10**7 - 1
        del f


def test_the_sender_lets_go_of_frames_once_they_are_read() -> None:
    """Frames read in place are pinned only until their release arrives, not
    until the sender's next message: their memory is the application's."""
    from .conftest import until

    async def main() -> None:
        received = asyncio.Event()

        async def handler(comm: Comm) -> None:
            try:
                while True:
                    await comm.read()
                    received.set()
            except CommClosedError:
                pass
            finally:
                await comm.close()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            try:
                x = np.ones(20 * 10**6, dtype=np.uint8)
                await comm.write({"x": to_serialize(x)})
                await received.wait()
                outbox = comm.link.outbox  # type: ignore[attr-defined]
                await until(lambda: not outbox.pinned)
            finally:
                await comm.close()

    run(main())


@pytest.mark.parametrize("end", ["close", "abort"])
def test_a_message_written_just_before_the_last_comm_ends_is_read_intact(end: str) -> None:
    """A process writes a large message and ends its last comm at once; its
    peer starts reading only then.

    - ``close`` returns only once the peer has read it, as ``TCP.close``
      returns once the kernel holds every byte: the process exits right
      after, and the message still arrives; it left nothing behind.
    - ``abort`` returns at once; the process drops the message and reuses
      its memory, and the message still arrives intact: its frames stay
      pinned, and the process's shared memory open, until released; then
      nothing of ours is left there.
    """
    from .conftest import peer
    from .peers import payload

    n = 20 * 10**6

    async def main() -> None:
        ready = asyncio.Event()
        got: asyncio.Queue[object] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            await ready.wait()
            try:
                x = (await comm.read())["x"]
                await got.put(bool((x == payload(len(x))).all()))
            except Exception as e:  # noqa: BLE001  (whatever it raised is the result)
                await got.put(repr(e))
            finally:
                await comm.close()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            async with peer("write-and-end", listener.contact_address, str(n), end) as p:
                await p.ready()
                ready.set()
                assert await asyncio.wait_for(got.get(), 30) is True
                if end == "close":
                    assert await asyncio.wait_for(p.proc.wait(), 30) == 0, p.stderr()
                else:
                    report = await p.done()
                    assert report["single-copy-messages"] == 1, report
                    assert report["hosts"] == 0 and report["fds"] == [], report
                assert p.files() == []

    run(main())
