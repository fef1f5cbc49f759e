"""The comm backend.  Behaviours common to every transport are written once as
``check_*(address)`` and run for ``tcp://`` and ``shm://`` (with the default
buffer, and with a buffer far smaller than the messages), so the two stay
interchangeable; shared-memory specifics follow."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.comm.registry import get_backend
from distributed.comm.tcp import TCP
from distributed.protocol import to_serialize

import dask_shm.receive
from dask_shm import stats
from dask_shm.comm import SHM, SHMBackend
from dask_shm.descriptor import Envelope
from dask_shm.estimate import SAMPLE, offloads, reaches
from dask_shm.descriptor import INLINE, encode
from dask_shm.handshake import Handshake
from dask_shm.names import PREFIX, Directory, current_owner, new_name

from .conftest import PATHS, SHM_DIR, echo_server, OpenWatch, is_root, our_fds, ours, peer, took_path, until
from .peers import payload

MiB = 1 << 20


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def with_echo(scheme: str, body: Callable[[Comm], Awaitable[None]], **kwargs: Any) -> None:
    async with listen(f"{scheme}://127.0.0.1:0", echo_server, **kwargs) as listener:
        comm = await connect(listener.contact_address)
        try:
            await body(comm)
        finally:
            await comm.close()


async def one_way(scheme: str, messages: list[Any]) -> list[Any]:
    """Send ``messages`` to a listener that only reads; what it read."""
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(comm: Comm) -> None:
        try:
            for _ in messages:
                await got.put(await comm.read())
        finally:
            await comm.close()

    async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        try:
            for m in messages:
                await comm.write(m)
            return [await asyncio.wait_for(got.get(), 30) for _ in messages]
        finally:
            await comm.close()



async def read_after(scheme: str, n: int, writes: Callable[[Comm], Awaitable[None]]) -> list[Any]:
    """Connect to a listener that reads ``n`` messages only once
    ``writes(comm)`` has returned; what it read (an error it met is raised)."""
    gate = asyncio.Event()
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(comm: Comm) -> None:
        try:
            await gate.wait()
            for _ in range(n):
                await got.put(await comm.read())
        except Exception as e:  # noqa: BLE001  (raised in the caller)
            await got.put(e)
        finally:
            await comm.close()

    async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        try:
            await writes(comm)
            gate.set()
            out = [await asyncio.wait_for(got.get(), 30) for _ in range(n)]
        finally:
            gate.set()
            await comm.close()
    for m in out:
        if isinstance(m, Exception):
            raise m
    return out

# -- behaviours every transport must have ------------------------------------------


async def check_roundtrip(scheme: str) -> None:
    payloads: list[Any] = [
        {"op": "ping"},
        b"x" * 1000,
        np.arange(100),
        np.arange(40_000, dtype="f8"),  # 320 kB
        np.ones((1000, 1000)),  # 8 MB: four fragments of the default size
        [np.arange(10**6), {"nested": np.zeros(70_000)}],
        np.arange(9 * 10**6),  # 72 MB: more than the default buffer
    ]

    async def body(comm: Comm) -> None:
        for p in payloads:
            await comm.write({"data": to_serialize(p)})
            back = (await comm.read())["data"]
            if isinstance(p, np.ndarray):
                np.testing.assert_array_equal(back, p)
                assert back.flags.writeable
            elif isinstance(p, list):
                np.testing.assert_array_equal(back[0], p[0])
                np.testing.assert_array_equal(back[1]["nested"], p[1]["nested"])
            else:
                assert back == p

    await with_echo(scheme, body)


async def check_order_and_mixed_sizes(scheme: str) -> None:
    sizes = [10, 5 * 10**5, 3, 2 * 10**6, 7, 10**5, 4 * 10**6] * 3

    async def writes(comm: Comm) -> None:
        for i, n in enumerate(sizes):
            await comm.write({"i": i, "x": to_serialize(np.full(n, i, dtype="u1"))})

    async def body(comm: Comm) -> None:
        writing = asyncio.ensure_future(writes(comm))
        for i, n in enumerate(sizes):
            msg = await comm.read()
            assert msg["i"] == i and msg["x"].nbytes == n and (msg["x"] == i % 256).all()
        await writing

    await with_echo(scheme, body)


async def check_writes_complete_before_the_peer_reads(scheme: str) -> None:
    """``await comm.write(...)`` returns once the message is on its way, as
    distributed's TCP comm does, whether or not the peer reads yet."""

    async def writes(comm: Comm) -> None:
        for i in range(3):
            await asyncio.wait_for(comm.write({"x": to_serialize(payload(30 * 10**6, i))}), 5)

    for i, msg in enumerate(await read_after(scheme, 3, writes)):
        np.testing.assert_array_equal(msg["x"], payload(30 * 10**6, i))


async def check_both_ends_write_before_reading(scheme: str) -> None:
    """Each end writes large messages, with small ones between them, before
    it reads any: neither waits for the other (TCP queues them), and each
    end receives the other's in order."""
    sizes = [30 * 10**6, 10, 5 * 10**6, 10, 30 * 10**6]

    async def exchange(comm: Comm, seed: int) -> list[Any]:
        for i, n in enumerate(sizes):
            await asyncio.wait_for(comm.write({"x": to_serialize(payload(n, seed + i))}), 5)
        return [(await comm.read())["x"] for _ in sizes]

    done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

    async def handler(comm: Comm) -> None:
        try:
            done.set_result(await exchange(comm, 100))
        except Exception as e:
            done.set_exception(e)
        finally:
            await comm.close()

    async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        try:
            mine = await asyncio.wait_for(exchange(comm, 0), 30)
            theirs = await asyncio.wait_for(done, 30)
        finally:
            comm.abort()
    for i, n in enumerate(sizes):
        np.testing.assert_array_equal(mine[i], payload(n, 100 + i))
        np.testing.assert_array_equal(theirs[i], payload(n, i))


#: Set: a SlowToPickle may finish serializing.
PICKLING = threading.Event()
#: Set by a SlowToPickle once its serialization has begun.
PICKLING_STARTED = threading.Event()


class SlowToPickle:
    """Small, but Dask cannot size it, so distributed's TCP write serializes
    it off the event loop (``offload``): the write yields between being
    called and reaching the stream, until :data:`PICKLING` is set."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __sizeof__(self) -> int:
        raise TypeError("no size")

    def __reduce__(self) -> tuple[Any, ...]:
        PICKLING_STARTED.set()
        PICKLING.wait(30)
        return (SlowToPickle, (self.value,))


class SlowAndLooksLarge(SlowToPickle):
    """Dask sizes it at 8 MiB, but it serializes to a few bytes."""

    def __sizeof__(self) -> int:
        return 8 << 20


async def check_a_stream_waits_for_small_writes_under_way(scheme: str) -> None:
    """A small write is still being serialized when a large message starts
    to stream (9 MB, serialized on the loop); the reader is not reading yet.
    The stream starts only once the small message is in the stream, so no
    message lands between the fragments of another: both arrive whole (in
    either order: TCP's own write does not order writes made at once)."""
    PICKLING.clear()
    x = payload(9 * 10**6)

    async def writes(comm: Comm) -> None:
        try:
            small = asyncio.ensure_future(comm.write({"y": to_serialize(SlowToPickle(7))}))
            large = asyncio.ensure_future(comm.write({"x": to_serialize(x)}))
            await until(large.done)  # returned: queued to stream, as TCP queues
            PICKLING.set()
            await asyncio.gather(small, large)
        finally:
            PICKLING.set()

    out = await read_after(scheme, 2, writes)
    [small] = [m for m in out if "y" in m]
    [large] = [m for m in out if "x" in m]
    assert small["y"].value == 7
    np.testing.assert_array_equal(large["x"], x)


async def check_concurrent_writers(scheme: str) -> None:
    """Writes started together on one comm (while the peer reads) are not
    interleaved."""
    sizes = [20 * 10**6, 10, 2 * 10**6, 10**5, 20 * 10**6]

    async def reads(comm: Comm) -> set[int]:
        seen = set()
        for _ in sizes:
            msg = await comm.read()
            i = msg["i"]
            np.testing.assert_array_equal(msg["x"], payload(sizes[i], i))
            seen.add(i)
        return seen

    async def body(comm: Comm) -> None:
        writes = [comm.write({"i": i, "x": to_serialize(payload(n, i))}) for i, n in enumerate(sizes)]
        *_, seen = await asyncio.gather(*writes, reads(comm))
        assert seen == set(range(len(sizes)))

    await with_echo(scheme, body)


async def check_many_small_frames(scheme: str) -> None:
    """A message of 200 frames of 64 kB each, 13 MB in all."""
    msg = {f"k{i}": to_serialize(np.full(8192, i, dtype="f8")) for i in range(200)}
    [got] = await one_way(scheme, [msg])
    assert sorted(got) == sorted(msg)
    for i in range(200):
        np.testing.assert_array_equal(got[f"k{i}"], np.full(8192, i, dtype="f8"))


async def check_close_after_write_delivers(scheme: str) -> None:
    """A message written just before a graceful close still arrives whole."""
    received: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(comm: Comm) -> None:
        try:
            await received.put(await comm.read())
        finally:
            await comm.close()

    async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        x = np.arange(2 * 10**6)
        await comm.write({"x": to_serialize(x)})
        await comm.close()
        msg = await asyncio.wait_for(received.get(), 10)
        np.testing.assert_array_equal(msg["x"], x)
        del msg


async def check_abort_after_writes(scheme: str) -> None:
    """Aborting a comm with large messages written but not yet read breaks it
    cleanly: what the reader gets is whole, then a CommClosedError."""
    errors: list[BaseException] = []
    got: list[Any] = []

    async def handler(comm: Comm) -> None:
        try:
            while True:
                got.append((await comm.read())["x"])
        except CommClosedError as e:
            errors.append(e)
        finally:
            comm.abort()

    async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        for i in range(3):
            await comm.write({"x": to_serialize(payload(8 * 10**6, i))})
        await until(lambda: got)  # the rest are in flight or queued
        comm.abort()
        await until(lambda: errors)
    assert isinstance(errors[0], CommClosedError)
    for i, x in enumerate(got):
        np.testing.assert_array_equal(x, payload(8 * 10**6, i))


CHECKS = [
    check_roundtrip,
    check_order_and_mixed_sizes,
    check_many_small_frames,
    check_close_after_write_delivers,
    check_abort_after_writes,
    check_a_stream_waits_for_small_writes_under_way,
]
#: Shared memory for every message of 64 KiB or more: mid-sized messages take
#: the path too.
LOW = {"dask-shm.threshold": "64 KiB"}


@pytest.mark.parametrize("scheme, conf", PATHS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_behaviour(scheme: str, conf: dict[str, str], check: Callable[[str], Awaitable[None]]) -> None:
    with dask.config.set({**LOW, **conf}):
        run(asyncio.wait_for(check(scheme), 120))
    took_path(scheme, conf)


@pytest.mark.parametrize("scheme, conf", PATHS)
def test_writes_complete_before_the_peer_reads(scheme: str, conf: dict[str, str]) -> None:
    with dask.config.set(conf):
        run(check_writes_complete_before_the_peer_reads(scheme))
        run(check_both_ends_write_before_reading(scheme))
    took_path(scheme, conf)


@pytest.mark.parametrize("scheme, conf", PATHS)
def test_concurrent_writers(scheme: str, conf: dict[str, str]) -> None:
    with dask.config.set({**LOW, **conf}):
        run(asyncio.wait_for(check_concurrent_writers(scheme), 60))
    took_path(scheme, conf)


# -- the shared-memory specifics -------------------------------------------------


def test_backend_registered_by_entry_point() -> None:
    assert isinstance(get_backend("shm"), SHMBackend)


def mapping_of(address: int) -> str | None:
    """The file backing ``address`` in this process, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def readonly_maps() -> list[str]:
    """Peers' buffers this process has mapped (read-only, shared)."""
    with open("/proc/self/maps") as f:
        return [ln.split()[5] for ln in f if PREFIX in ln and ln.split()[1] == "r--s"]


def test_received_data_is_private_writeable_memory(shm_config: None) -> None:
    """Copy-out: what a receiver gets lives in its own memory, not in the
    sender's buffer, and stays intact after the buffer is gone."""
    kept = []

    async def body(comm: Comm) -> None:
        assert isinstance(comm, SHM) and comm.link is not None
        x = np.arange(8 * 10**6)
        for _ in range(2):
            await comm.write({"x": to_serialize(x)})
            y = (await comm.read())["x"]
            path = mapping_of(y.__array_interface__["data"][0])
            assert path is None or PREFIX not in path, path
            assert y.flags.writeable
            y[0] = -1
            kept.append(y)

    run(with_echo("shm", body))
    assert stats.snapshot()["shm-messages"] == 4
    for y in kept:  # every buffer is unmapped and unlinked by now
        assert y[0] == -1
        np.testing.assert_array_equal(y[1:], np.arange(1, 8 * 10**6))


SIZES_KIB = [1, 60, 64, 100, 255, 256, 257, 1023, 1024, 1025, 3000, 4500, 10, 2048, 1, 700, 4096]


def test_one_buffer_per_process_serves_every_size(small_buffer: None) -> None:
    """Buffer reuse: messages from 1 KiB to 4.5 times the buffer, both ways
    between two processes, arrive byte-exact; the directory holds exactly one
    buffer per process, the same two files, from the first message to the
    last; every message of 64 KiB or more went through shared memory."""

    async def main() -> tuple[list[set[str]], dict[str, Any], int]:
        conf = {"threshold": "64 KiB", "buffer_size": "1 MiB", "fragment_size": "256 KiB"}
        async with peer("echo", **conf) as p:
            comm = await connect(await p.ready())
            assert comm.link is not None  # type: ignore[attr-defined]
            seen = []
            for i, kib in enumerate(SIZES_KIB * 2):
                x = payload(kib << 10, i)
                await comm.write({"i": i, "x": to_serialize(x)})
                back = await comm.read()
                assert back["i"] == i
                np.testing.assert_array_equal(back["x"], x)
                seen.append({n for n in ours() if "-b-" in n})
            await comm.close()
            return seen, await p.done(), p.pid

    seen, theirs, pid = run(main())
    first = seen[0]
    assert all(s == first for s in seen), seen
    assert sorted(int(n.split("-")[2]) for n in first) == sorted([os.getpid(), pid])
    large = 2 * sum(kib >= 64 for kib in SIZES_KIB)
    counts = stats.snapshot()
    assert counts["shm-messages"] == large == theirs["shm-messages"], (counts, theirs)
    assert counts.get("fallback-busy", 0) == theirs.get("fallback-busy", 0) == 0


@pytest.mark.buffer
def test_a_frame_larger_than_the_buffer_streams_through_it(
    small_buffer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 MB through a 1 MiB buffer in 256 KiB fragments: correct, every byte
    through shared memory (none inline: the link is idle), in many
    descriptors."""
    descriptors = []
    real = dask_shm.receive.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        descriptors.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dask_shm.receive, "decode", counting)
    x = payload(20 * 10**6)
    [got] = run(one_way("shm", [{"x": to_serialize(x)}]))
    np.testing.assert_array_equal(got["x"], x)
    counts = stats.snapshot()
    assert counts["shm-messages"] == 1
    # The frames are the array and a few hundred bytes of header.
    assert x.nbytes <= counts["shm-bytes"] < x.nbytes + 4096, counts
    assert counts.get("fallback-busy", 0) == 0 and counts.get("tcp-bytes", 0) == 0
    assert len(descriptors) > 20  # at most 1 MiB in flight per descriptor


def test_a_message_of_many_small_frames_goes_through_shared_memory() -> None:
    """The suite's threshold (1 MiB): 200 frames of 64 kB, each far below it, are
    one packed message through shared memory."""
    assert dask.config.get("dask-shm.threshold") == "1 MiB"
    msg = {f"k{i}": to_serialize(np.ones(8192)) for i in range(200)}
    [got] = run(one_way("shm", [msg]))
    assert all((got[f"k{i}"] == 1).all() for i in range(200))
    counts = stats.snapshot()
    assert counts["shm-messages"] == 1 and counts["shm-bytes"] >= 200 * 65536, counts
    assert counts.get("tcp-messages", 0) == 0


def test_a_stream_waits_for_envelopes_under_way() -> None:
    """Message A is below the threshold once serialized, though its estimate
    reached it, and large enough that distributed serializes its envelope
    off the loop; B streams.  Both are serialized in distributed's single
    offload thread, A first (gated), so A's envelope is still being
    serialized when B's stream would start: B waits for it, and the reader
    (which reads only once both writes returned) gets both whole."""
    PICKLING.clear()
    PICKLING_STARTED.clear()
    a = {"a": to_serialize(payload(12 * 10**6)), "slow": to_serialize(SlowAndLooksLarge(1))}
    b = {"x": to_serialize(payload(30 * 10**6, 1))}

    async def writes(comm: Comm) -> None:
        try:
            first = asyncio.ensure_future(comm.write(a))
            second = asyncio.ensure_future(comm.write(b))
            await until(PICKLING_STARTED.is_set)  # both writes are serializing
            PICKLING.set()
            await asyncio.gather(first, second)
        finally:
            PICKLING.set()

    with dask.config.set({"dask-shm.threshold": "16 MiB"}):
        out = run(read_after("shm", 2, writes))
    [got_a] = [m for m in out if "a" in m]
    [got_b] = [m for m in out if "x" in m]
    np.testing.assert_array_equal(got_a["a"], payload(12 * 10**6))
    np.testing.assert_array_equal(got_b["x"], payload(30 * 10**6, 1))
    counts = stats.snapshot()
    assert counts["tcp-messages"] == 1 and counts["shm-messages"] == 1, counts


SMALL_BUFFER = {"dask-shm.threshold": "64 KiB", "dask-shm.buffer-size": "1 MiB",
                "dask-shm.fragment-size": "256 KiB"}


@pytest.mark.parametrize("scheme", ["tcp", "shm"])
@pytest.mark.buffer
def test_abort_while_streaming_to_a_peer_that_does_not_read(scheme: str) -> None:
    """A 40 MB message streams through a 1 MiB buffer to a live peer that
    does not read, and the writer aborts: the stream stops, close() returns
    at once and the next write raises CommClosedError, as with TCP."""

    async def main() -> object:
        gate = asyncio.Event()

        async def handler(comm: Comm) -> None:
            await gate.wait()  # alive, not reading
            comm.abort()

        async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            try:
                await asyncio.wait_for(comm.write({"x": to_serialize(payload(40 * 10**6))}), 10)
                link = getattr(comm, "link", None)
                pump = link.pump if link is not None else None
                if scheme == "shm":
                    assert pump is not None  # stuck: the peer does not read
                comm.abort()
                if pump is not None:
                    await asyncio.wait([pump], timeout=10)
                    assert pump.done() and link is not None and link.pump is None
                await asyncio.wait_for(comm.close(), 10)
                try:
                    await comm.write({"y": 1})
                except CommClosedError as e:
                    return type(e).__name__
                return "wrote"
            finally:
                gate.set()

    with dask.config.set(SMALL_BUFFER):
        assert run(main()) == "CommClosedError"


@pytest.mark.parametrize("scheme", ["tcp", "shm"])
@pytest.mark.parametrize("end", ["close", "abort"])
def test_a_write_serializing_across_the_end_of_its_comm_fails(scheme: str, end: str) -> None:
    """A large write is still being serialized (off the loop) when its comm
    is closed or aborted: it raises CommClosedError, as TCP's does, and no
    stream starts."""
    PICKLING.clear()
    PICKLING_STARTED.clear()

    async def main() -> object:
        async def handler(comm: Comm) -> None:
            try:
                await comm.read()
            except CommClosedError:
                pass
            finally:
                comm.abort()

        async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            msg = {"x": to_serialize(payload(40 * 10**6)), "slow": to_serialize(SlowToPickle(1))}
            write = asyncio.ensure_future(comm.write(msg))
            try:
                await until(PICKLING_STARTED.is_set)
                if end == "close":
                    await asyncio.wait_for(comm.close(), 10)
                else:
                    comm.abort()
            finally:
                PICKLING.set()
            outcome = (await asyncio.gather(write, return_exceptions=True))[0]
            link = getattr(comm, "link", None)
            assert link is None or link.pump is None
            return type(outcome).__name__

    with dask.config.set(SMALL_BUFFER):
        assert run(main()) == "CommClosedError"


@pytest.mark.parametrize(
    "who",
    [
        "sender",
        "receiver",
        "both",
    ],
)
def test_a_comm_closed_mid_stream(who: str) -> None:
    """While a 40 MB message streams through a 1 MiB buffer, one end aborts
    (``both``: both ends, while the stream waits for room, so the process's
    last comm closes under it).  The write returned at once, as TCP's does;
    the stream ends rather than hangs; the read and the next write fail with
    CommClosedError; and once the garbage is collected nothing of ours is
    left: no file, descriptor or mapping.  In a process of its own (it is the
    whole process's state that is checked)."""

    async def main() -> dict[str, Any]:
        async with peer("mid-stream", who) as p:
            return await p.done()

    got = run(main())
    if who != "both":
        assert got["read"] == "CommClosedError", got
    assert (got["wrote"], got["streaming"], got["again"]) == ("ok", "ended", "CommClosedError"), got
    assert got["files"] == got["fds"] == got["maps"] == [], got


def test_tcp_client_to_shm_listener_is_plain_tcp() -> None:
    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            port = listener.contact_address.rsplit(":", 1)[1]
            comm = await connect(f"tcp://127.0.0.1:{port}", timeout=5)
            try:
                assert type(comm) is TCP
                x = np.arange(10**6)
                await comm.write({"x": to_serialize(x)})
                np.testing.assert_array_equal((await asyncio.wait_for(comm.read(), 10))["x"], x)
            finally:
                await comm.close()

    run(main())
    assert stats.snapshot().get("handshake-shm", 0) == 0
    assert stats.snapshot()["fallback-plain-peer"] >= 1  # the listener's echoes


def test_shm_client_to_tcp_listener_is_plain_tcp() -> None:
    async def main() -> None:
        async with listen("tcp://127.0.0.1:0", echo_server) as listener:
            port = listener.contact_address.rsplit(":", 1)[1]
            comm = await connect(f"shm://127.0.0.1:{port}", timeout=5)
            try:
                assert isinstance(comm, SHM) and comm.link is None
                x = np.arange(10**6)
                await comm.write({"x": to_serialize(x)})
                np.testing.assert_array_equal((await asyncio.wait_for(comm.read(), 10))["x"], x)
            finally:
                await comm.close()

    run(main())
    snap = stats.snapshot()
    assert snap.get("handshake-shm", 0) == 0 and snap.get("handshake-plain", 0) == 1


def test_disabled_is_plain_tcp() -> None:
    with dask.config.set({"dask-shm.enabled": False}):

        async def body(comm: Comm) -> None:
            assert comm.link is None  # type: ignore[attr-defined]
            await comm.write({"x": to_serialize(np.arange(10**6))})
            await comm.read()

        run(with_echo("shm", body))
    assert stats.snapshot().get("shm-messages", 0) == 0
    assert stats.snapshot()["fallback-disabled"] >= 2
    assert not ours()


@pytest.mark.parametrize("single_copy", [True, False], ids=["single-copy", "buffer"])
def test_a_process_without_a_buffer(single_copy: bool) -> None:
    """``buffer-size: 0`` in one process: it still reads what its peer sends
    through shared memory; what it sends, its peer reads in place where
    single copy is on (no buffer needed), else it goes over TCP."""

    async def main() -> dict[str, Any]:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            async with peer(
                "client", listener.contact_address, buffer_size="0", threshold="64 KiB",
                single_copy=str(single_copy).lower(),
            ) as p:
                return await p.done()

    with dask.config.set({"dask-shm.threshold": "64 KiB", "dask-shm.single-copy": single_copy}):
        theirs = run(main())
    assert theirs["linked"] and theirs.get("buffer-bytes", 0) == 0, theirs
    if single_copy:
        assert theirs["single-copy-messages"] >= 1 and theirs.get("tcp-messages", 0) == 0, theirs
    else:
        assert theirs.get("shm-messages", 0) == 0 and theirs["tcp-messages"] >= 1, theirs
    assert stats.snapshot()["shm-messages"] == 2  # the echoes


def test_peer_with_another_directory_fails_the_probe() -> None:
    """A peer that cannot see our directory (as a container with its own
    /dev/shm on the same IP) gets TCP, and correct data; the "shm" family
    declines there and the next family serves."""
    tmp_path = Path(tempfile.mkdtemp(dir=SHM_DIR))  # a tmpfs, another directory

    async def main() -> dict[str, Any]:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            async with peer("client", listener.contact_address, directory=str(tmp_path)) as p:
                return await p.done()

    try:
        theirs = run(main())
    finally:
        left = os.listdir(tmp_path)
        shutil.rmtree(tmp_path)
    assert not left
    assert not theirs["linked"] and theirs.get("shm-messages", 0) == 0
    assert theirs.get("family-messages", 0) == 0 and theirs["handshake-no-probe"] == 1
    assert stats.snapshot().get("handshake-no-probe", 0) == 1
    assert stats.snapshot()["fallback-no-probe"] == 2  # the listener's two echoes


def test_peer_process_on_same_host_uses_shm() -> None:
    async def main() -> dict[str, Any]:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            async with peer("client", listener.contact_address) as p:
                return await p.done()

    theirs = run(main())
    assert theirs["linked"] and theirs["shm-messages"] == 2 and theirs["family-messages"] == 1
    assert stats.snapshot()["shm-messages"] == 2  # the echoes


def test_a_relay_forwards_what_it_received() -> None:
    """A peer that does not deserialize (the scheduler) forwards the frames
    it copied out; each hop is its own shared-memory message."""

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server, deserialize=False) as listener:
            comm = await connect(listener.contact_address)
            for i in range(3):
                x = payload(4 * 10**6, i)
                await comm.write({"x": to_serialize(x)})
                np.testing.assert_array_equal((await comm.read())["x"], x)
            await comm.close()

    run(main())
    assert stats.snapshot()["shm-messages"] == 6


# -- what a peer sends is validated before anything is read --------------------


async def refused(send: Callable[[Comm], Awaitable[object]]) -> tuple[str, list[str]]:
    """Connect to a listener over a negotiated link, ``send`` on it, and
    return the error the listener's read raised and the peer buffers it had
    mapped at that moment."""
    result: asyncio.Queue[tuple[BaseException, list[str]]] = asyncio.Queue()

    async def handler(comm: Comm) -> None:
        try:
            await comm.read()
        except BaseException as e:
            await result.put((e, readonly_maps()))
        finally:
            comm.abort()

    async with listen("shm://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        try:
            assert comm.link is not None  # type: ignore[attr-defined]
            await send(comm)
            err, maps = await asyncio.wait_for(result.get(), 10)
        finally:
            comm.abort()
    assert isinstance(err, CommClosedError), repr(err)
    return str(err), maps


def raw(*envelopes: tuple[bytes | None, list[Any]] | dict[str, Any]) -> Callable[[Comm], Awaitable[None]]:
    """Write hand-made envelopes (descriptor, inline frames) or plain
    messages, bypassing the comm's own write."""

    async def send(comm: Comm) -> None:
        for e in envelopes:
            msg = e if isinstance(e, dict) else Envelope(e[0], *e[1]).pickled()
            await TCP.write(comm, msg)  # type: ignore[arg-type]

    return send


BUFFER = 64 * MiB  # the default buffer-size: what the sender announced


@pytest.mark.parametrize(
    "send, problem",
    [
        pytest.param(raw((encode([100], [(BUFFER - 50, 100)]), [])), "outside the sender's buffer",
                     id="region-past-the-end"),
        pytest.param(raw((encode([2 * BUFFER], [(0, 2 * BUFFER)]), [])), "outside the sender's buffer",
                     id="region-larger-than-the-buffer"),
        pytest.param(raw((encode([10], [(0, 11)]), [])), "length 11", id="longer-than-the-message"),
        pytest.param(raw((encode([100], [(INLINE, 100)]), [])), "no inline frame of 100 bytes",
                     id="inline-frame-missing"),
        pytest.param(raw((encode([100], [(INLINE, 100)]), [b"x" * 99])), "no inline frame of 100 bytes",
                     id="inline-frame-of-another-length"),
        pytest.param(raw((encode([100], [(0, 100)]), [b"x" * 10])), "1 inline frame(s) not described",
                     id="inline-frame-not-described"),
        pytest.param(raw((b"DSHM" + b"\xff" * 20, [])), "descriptor", id="garbage"),
        pytest.param(raw(("not bytes", []), ), "descriptor is a str", id="not-bytes"),  # type: ignore[arg-type]
        pytest.param(raw((encode(None, [(0, 10)]), [])), "expected the start of a message",
                     id="continuation-first"),
        pytest.param(raw((encode([200], [(INLINE, 100)]), [b"x" * 100]), {"op": "ping"}),
                     "expected the rest of a message", id="another-message-mid-stream"),
        pytest.param(raw((encode([200], [(INLINE, 100)]), [b"x" * 100]),
                         (encode([100], [(INLINE, 100)]), [b"y" * 100])),
                     "expected the rest of a message", id="a-new-message-mid-stream"),
        pytest.param(raw((encode([200], [(INLINE, 100)]), [b"x" * 100]), (encode(None, [(0, 101)]), [])),
                     "length 101 with 100 bytes of the message left", id="rest-too-long"),
    ],
)
def test_a_bad_descriptor_closes_the_comm_before_anything_is_read(
    send: Callable[[Comm], Awaitable[None]], problem: str
) -> None:
    err, maps = run(refused(send))
    assert problem in err, err
    assert maps == [], f"the peer's buffer was mapped: {maps}"


def test_a_descriptor_from_a_peer_without_a_buffer_is_refused() -> None:
    with dask.config.set({"dask-shm.buffer-size": 0}):
        err, _ = run(refused(raw((encode([100], [(0, 100)]), []))))
    assert "the peer announced no buffer" in err


def test_inline_fragments_alone_make_a_valid_message() -> None:
    """The control for the refusals above: a well-formed hand-made message
    (every fragment inline) is read as the frames it describes."""
    from distributed.comm.utils import to_frames

    async def main() -> Any:
        got: asyncio.Queue[Any] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            try:
                await got.put(await comm.read())
            finally:
                comm.abort()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            frames = [memoryview(f) for f in await to_frames({"x": to_serialize(np.arange(1000))})]
            packed = b"".join(frames)
            pieces = [packed[:100], packed[100:]]
            await raw(
                (encode([f.nbytes for f in frames], [(INLINE, 100)]), pieces[:1]),
                (encode(None, [(INLINE, len(pieces[1]))]), pieces[1:]),
            )(comm)
            msg = await asyncio.wait_for(got.get(), 10)
            comm.abort()
        return msg

    np.testing.assert_array_equal(run(main())["x"], np.arange(1000))


# -- what a peer announces at the handshake is validated before it is opened ----


@contextmanager
def announcing(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> Iterator[set[str]]:
    """Comms connecting to the addresses put into the yielded set announce
    ``fields`` in their handshake instead of their own (a callable value is
    called with the real entry); ``release``, which only the accepting end
    announces, is announced by the listener's end instead."""
    targets: set[str] = set()
    real = SHM.handshake_info
    real_negotiate = Handshake.negotiate
    #: Keys of the second message (the echo); the rest are the first's.
    in_echo = {"release"}

    def handshake_info(self: SHM) -> dict[str, Any]:
        info = real(self)
        connecting = self.initiator and self.peer_address in targets
        accepting = not self.initiator and self.local_address in targets
        if (connecting or accepting) and "dask-shm" in info:
            entry = info["dask-shm"]
            real_entry = dict(entry)
            for key, value in fields.items():
                if key not in in_echo and connecting:
                    entry[key] = value(real_entry) if callable(value) else value
            self._handshake.tamper = real_entry  # type: ignore[union-attr]
        return info

    async def negotiate(self: Handshake, remote: Any, write: Any, *args: Any, accepting: bool) -> Any:
        entry = getattr(self, "tamper", None)

        async def tampered(msg: Any) -> Any:
            if entry is not None and accepting and isinstance(msg, dict) and "dask-shm-echo" in msg:
                for key in in_echo & set(fields):
                    msg[key] = fields[key](entry) if callable(fields[key]) else fields[key]
            return await write(msg)

        return await real_negotiate(self, remote, tampered, *args, accepting=accepting)

    monkeypatch.setattr(SHM, "handshake_info", handshake_info)
    monkeypatch.setattr(Handshake, "negotiate", negotiate)
    yield targets


async def handshake_with(targets: set[str], send: bool = True) -> tuple[Any, Any, np.ndarray | None]:
    """Connect to a listener, as a comm whose handshake is tampered with;
    the links both ends negotiated, and an 8 MB array sent through (unless
    not ``send``)."""
    links: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(comm: Comm) -> None:
        await links.put(comm.link)  # type: ignore[attr-defined]
        await echo_server(comm)

    async with listen("shm://127.0.0.1:0", handler) as listener:
        targets.add(listener.contact_address)
        comm = await connect(listener.contact_address)
        back = None
        if send:
            await comm.write({"x": to_serialize(np.arange(10**6))})
            back = (await comm.read())["x"]
        theirs = await asyncio.wait_for(links.get(), 10)
        ours_ = comm.link  # type: ignore[attr-defined]
        await comm.close()
    return ours_, theirs, back


ME = current_owner()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"buffer": "/etc/passwd"}, id="buffer-path"),
        pytest.param({"buffer": "../../etc/passwd"}, id="buffer-relative-path"),
        pytest.param({"buffer": f"dask-shm-{ME.pid + 1}-{ME.start}-{ME.ns}-{ME.boot}-b-{'0' * 32}"},
                     id="buffer-of-another-process"),
        pytest.param({"buffer": lambda e: e["probe"]}, id="buffer-is-the-probe"),
        pytest.param({"buffer": 42}, id="buffer-not-a-name"),
        pytest.param({"release": "/etc/passwd"}, id="release-path"),
        pytest.param({"release": lambda e: e["buffer"]}, id="release-is-the-buffer"),
        pytest.param({"release": lambda e: new_name("r")}, id="release-nobody-listens"),
        pytest.param({"size": -1}, id="size-negative"),
        pytest.param({"size": "64 MiB"}, id="size-a-string"),
        pytest.param({"owner": [ME.pid + 1, ME.start, ME.ns, ME.boot]}, id="owner-another-process"),
        pytest.param({"owner": [ME.pid, ME.start, ME.ns]}, id="owner-without-boot"),
        pytest.param({"owner": "me"}, id="owner-garbage"),
        pytest.param({"probe": "/etc/passwd"}, id="probe-path"),
    ],
)
def test_a_bad_handshake_is_refused_and_the_comm_is_plain_tcp(
    monkeypatch: pytest.MonkeyPatch, shm_config: None, fields: dict[str, Any]
) -> None:
    with announcing(monkeypatch, **fields) as targets:
        mine, theirs, back = run(handshake_with(targets))
    np.testing.assert_array_equal(back, np.arange(10**6))
    assert mine is None and theirs is None
    counts = stats.snapshot()
    # Who the peer is (owner, probe) fails the proof; what a proven peer
    # names (buffer, size, release socket) fails when it is opened.
    failed = "no-probe" if {"owner", "probe"} & set(fields) else "not-opened"
    assert counts[f"handshake-{failed}"] == 2 and counts.get("shm-messages", 0) == 0, counts


def test_a_path_announced_at_the_handshake_is_never_opened(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"t" * 4096)
    watch = OpenWatch(target)
    try:
        with announcing(monkeypatch, buffer=str(target), release=str(target), probe=str(target)) as t:
            mine, theirs, _ = run(handshake_with(t))
        assert watch.events() == b""
        target.read_bytes()
        assert watch.events(), "inotify saw nothing: the check above proves nothing"
    finally:
        watch.close()
    assert mine is None and theirs is None


def plant(what: str, outside: Path) -> str:
    """A buffer file of this process's (so a name the handshake accepts)
    that the receiver must refuse to use."""
    name = new_name("b")
    path = os.path.join(SHM_DIR, name)
    if what == "symlink":
        os.symlink(outside, path)
        return name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, BUFFER)
    if what == "group-readable":
        os.fchmod(fd, 0o640)
    elif what == "other-uid":
        os.fchown(fd, 65534, 65534)
    elif what == "hard-link":
        os.link(path, os.path.join(SHM_DIR, new_name("b")))
    os.close(fd)
    return name


needs_root = pytest.mark.skipif(not is_root(), reason="chown to another uid needs root (CI runs as root)")


@pytest.mark.parametrize(
    "what",
    [
        "symlink",
        "hard-link",
        "group-readable",
        pytest.param("other-uid", marks=needs_root),
        "fifo",
        "valid",  # the control: a file the receiver accepts
    ],
)
def test_a_planted_buffer_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shm_config: None, what: str
) -> None:
    """A peer names one of its own files at the handshake, but the file is a
    symlink (to a file outside the directory), hard-linked, not owner-only,
    of another uid or of the wrong type: the receiver refuses it on what it
    opened, and the comm is plain TCP with correct data."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"o" * 4096)
    if what == "fifo":
        name = new_name("b")
        os.mkfifo(os.path.join(SHM_DIR, name), 0o600)
    else:
        name = plant(what, outside)
    try:
        with announcing(monkeypatch, buffer=name) as targets:
            mine, theirs, back = run(handshake_with(targets, send=what != "valid"))
    finally:
        d = Directory(SHM_DIR)
        for n in ours():
            d.unlink(n)
        d.close()
    if what == "valid":  # (nothing sent: the receiver would copy out of the decoy)
        assert theirs is not None and theirs.inbox.peer.name == name
        return
    np.testing.assert_array_equal(back, np.arange(10**6))
    assert mine is None and theirs is None
    assert outside.read_bytes() == b"o" * 4096


@pytest.mark.buffer
def test_a_buffer_announced_larger_than_it_is_is_refused_before_mapping() -> None:
    """Mapping past the end of a file raises SIGBUS at the first read: a peer
    that announces more than its file holds is refused with a clear error."""

    async def main() -> BaseException:
        errors: asyncio.Queue[BaseException] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            try:
                await comm.read()
            except Exception as e:  # noqa: BLE001
                await errors.put(e)
            finally:
                comm.abort()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            async with peer("announce-size", listener.contact_address, "2", threshold="64 KiB") as p:
                err = await asyncio.wait_for(errors.get(), 30)
                await p.done()
        return err

    err = run(main())
    assert isinstance(err, CommClosedError)
    assert f"holds {BUFFER} bytes, not the {2 * BUFFER} its owner announced" in str(err)


# -- sizes, offload, descriptors -------------------------------------------------


def test_size_estimate_sends_what_may_be_large_through_shared_memory() -> None:
    from distributed.protocol import Serialized
    from distributed.protocol.serialize import ToPickle

    big, small = np.ones(5 << 20, dtype="u1"), np.ones(1000, dtype="u1")
    assert reaches({"x": to_serialize(big)}, 4 << 20)
    assert reaches([{"a": [to_serialize(small)] * 10_000}], 4 << 20)  # many small ones add up
    assert reaches({"op": "update", "keys": [str(i) for i in range(10**6)]}, 4 << 20)
    assert reaches(Serialized({}, [memoryview(big)]), 4 << 20)
    assert reaches(ToPickle(big), 4 << 20)
    assert not reaches({"x": to_serialize(small), "op": "get_data", "n": 3}, 4 << 20)
    assert not reaches(b"ok", 4 << 20)


class _Sized:
    """An object whose ``sizeof`` is counted (and says 1 MB)."""

    calls = 0

    def __sizeof__(self) -> int:
        _Sized.calls += 1
        return 10**6


def test_size_estimate_costs_a_bounded_number_of_looks() -> None:
    """It runs for every message: a batch of thousands of small messages, or
    a task spec, must not cost more to size than to serialize."""
    from distributed.protocol.serialize import ToPickle

    _Sized.calls = 0
    # A long list is sized from a sample, scaled: 10,000 x 1 MB
    assert reaches([to_serialize(_Sized()) for _ in range(10_000)], 4 << 20)
    assert 0 < _Sized.calls <= 2 * SAMPLE
    # A batch of many small messages: small, from a sample too
    _Sized.calls = 0
    assert not reaches([{"op": "task-finished", "key": str(i), "nbytes": 8} for i in range(10**4)],
                        4 << 20)
    # distributed's task specs (ToPickle) are not sized; data (Serialize) is
    assert not reaches({"op": "compute-task", "run_spec": ToPickle(_Sized())}, 4 << 10)
    assert _Sized.calls == 0
    assert reaches({"op": "get_data", "data": {"k": to_serialize(_Sized())}}, 4 << 10)


def test_offload_follows_distributed() -> None:
    """Copies go off the event loop as distributed's TCP (de)serialization
    does: never when the comm disallows it (what the scheduler asks), else
    above ``distributed.comm.offload`` (read by distributed at import)."""
    from distributed.comm.utils import OFFLOAD_THRESHOLD

    assert OFFLOAD_THRESHOLD  # the default: 10 MiB
    assert offloads(False, 10**9) is False
    assert offloads(True, 10**9) is True
    assert offloads(True, OFFLOAD_THRESHOLD) is False


@pytest.mark.parametrize("offload", [None, "False"], ids=["default", "disabled"])
def test_large_messages_with_and_without_offload(offload: str | None) -> None:
    conf = {} if offload is None else {"DASK_DISTRIBUTED__COMM__OFFLOAD": offload}

    async def main() -> dict[str, Any]:
        async with peer("offload", **conf) as p:
            return await p.done()

    got = run(main())
    assert got["ok"] and got["shm-messages"] == 2
    assert got["offloads"] is (offload is None)


def test_a_listener_that_disallows_offload_still_moves_large_messages() -> None:
    x = payload(30 * 10**6)

    async def body(comm: Comm) -> None:
        await comm.write({"x": to_serialize(x)})
        np.testing.assert_array_equal((await comm.read())["x"], x)

    run(with_echo("shm", body, allow_offload=False))
    assert stats.snapshot()["shm-messages"] == 2


def test_closed_comms_leave_no_descriptors_while_others_stay_open(shm_config: None) -> None:
    """A long-lived process (a worker) keeps some comm open while others come
    and go: what each closed comm held (its release pipes) goes with it."""

    async def main() -> list[int]:
        counts = []
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            keep = await connect(listener.contact_address)
            await until(lambda: sum(1 for c in Comm._instances if not c.closed()) == 2)
            baseline = len(our_fds())
            for _ in range(5):
                comm = await connect(listener.contact_address)
                await comm.write({"x": to_serialize(np.ones(MiB))})
                await comm.read()
                await comm.close()
                await until(lambda: sum(1 for c in Comm._instances if not c.closed()) == 2)
                counts.append(len(our_fds()) - baseline)
            await keep.close()
        return counts

    assert run(main()) == [0] * 5
