"""The comm backend.  Behaviours common to every transport are written once as
``check_*(address)`` and run for ``tcp://`` and ``shm://``, so the two stay
interchangeable; shared-memory specifics follow."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import dask
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.comm.registry import get_backend
from distributed.comm.tcp import TCP
from distributed.protocol import to_serialize

from dask_shm import stats
from dask_shm.comm import SHM, SHMBackend, _Envelope
from dask_shm.descriptor import Placement, encode
from dask_shm.segments import current_owner, drain_unmaps, new_name

from .conftest import SHM_DIR, first_read_error, ours

SCHEMES = ["tcp", "shm"]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def echo_server(comm: Comm) -> None:
    """Send every message back until the peer goes away."""
    try:
        while True:
            msg = await comm.read()
            await comm.write(msg)
    except CommClosedError:
        pass
    finally:
        await comm.close()


async def with_echo(scheme: str, body: Callable[[Comm], Awaitable[None]]) -> None:
    async with listen(f"{scheme}://127.0.0.1:0", echo_server) as listener:
        comm = await connect(listener.contact_address)
        try:
            await body(comm)
        finally:
            await comm.close()


# -- behaviours every transport must have ------------------------------------------


async def check_roundtrip(scheme: str) -> None:
    payloads: list[Any] = [
        {"op": "ping"},
        b"x" * 1000,
        np.arange(100),
        np.arange(40_000, dtype="f8"),  # 320 kB: just above the default threshold
        np.ones((1000, 1000)),  # 8 MB
        [np.arange(10**6), {"nested": np.zeros(70_000)}],
        np.arange(8 * 10**6),  # 64 MB, beyond one TCP shard
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
    async def body(comm: Comm) -> None:
        sizes = [10, 5 * 10**5, 3, 2 * 10**6, 7, 10**5, 4 * 10**6]
        for i, n in enumerate(sizes * 3):
            await comm.write({"i": i, "x": to_serialize(np.full(n, i, dtype="u1"))})
        for i, n in enumerate(sizes * 3):
            msg = await comm.read()
            assert msg["i"] == i and msg["x"].nbytes == n and (msg["x"] == i % 256).all()

    await with_echo(scheme, body)


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


async def check_abort_mid_stream(scheme: str) -> None:
    """Aborting a comm with large messages queued breaks it cleanly."""
    errors: list[BaseException] = []

    async def handler(comm: Comm) -> None:
        try:
            while True:
                await comm.read()
        except CommClosedError as e:
            errors.append(e)
        finally:
            comm.abort()

    async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        for _ in range(3):
            await comm.write({"x": to_serialize(np.ones(10**6))})
        comm.abort()
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.05)
        assert errors and isinstance(errors[0], CommClosedError)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "check",
    [check_roundtrip, check_order_and_mixed_sizes, check_close_after_write_delivers, check_abort_mid_stream],
    ids=lambda f: f.__name__,
)
def test_behaviour(scheme: str, check: Callable[[str], Awaitable[None]], shm_config: None) -> None:
    run(check(scheme))
    if scheme == "shm":
        assert stats.snapshot().get("shm-messages", 0) > 0
        if check is check_roundtrip:  # it sends small messages too
            assert stats.snapshot().get("below-threshold", 0) > 0


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


def test_zero_copy_and_writeable(shm_config: None) -> None:
    async def body(comm: Comm) -> None:
        assert isinstance(comm, SHM) and comm.link is not None
        x = np.arange(8 * 10**6)
        await comm.write({"x": to_serialize(x)})
        y = (await comm.read())["x"]
        path = mapping_of(y.__array_interface__["data"][0])
        assert path is not None and os.path.basename(path).startswith("dask-shm-"), path
        assert y.flags.writeable
        y[0] = -1  # the receiver owns these pages now
        np.testing.assert_array_equal(y[1:], x[1:])

    run(with_echo("shm", body))


def test_sender_unmaps_what_it_hands_over(shm_config: None) -> None:
    """After a transfer the sender maps nothing of the receiver's data."""

    async def body(comm: Comm) -> None:
        x = np.arange(4 * 10**6)
        await comm.write({"x": to_serialize(x)})
        y = (await comm.read())["x"]
        assert drain_unmaps()
        with open("/proc/self/maps") as f:
            mapped = [ln.split()[5] for ln in f if "dask-shm-" in ln]
        # Exactly one mapping of the echo (held by y) and one of the message
        # the server received (freed already or in its pool): never the
        # segments this process handed over.
        assert len(mapped) == len(set(mapped))
        del y

    run(with_echo("shm", body))


def test_tcp_client_to_shm_listener_is_plain_tcp() -> None:
    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            port = listener.contact_address.rsplit(":", 1)[1]
            comm = await connect(f"tcp://127.0.0.1:{port}")
            assert type(comm) is TCP
            x = np.arange(10**6)
            await comm.write({"x": to_serialize(x)})
            np.testing.assert_array_equal((await comm.read())["x"], x)
            await comm.close()

    run(main())
    assert stats.snapshot().get("handshake-shm", 0) == 0
    assert stats.snapshot()["fallback-plain-peer"] >= 1  # the listener's echoes
    assert not ours()


def test_shm_client_to_tcp_listener_is_plain_tcp() -> None:
    async def main() -> None:
        async with listen("tcp://127.0.0.1:0", echo_server) as listener:
            port = listener.contact_address.rsplit(":", 1)[1]
            comm = await connect(f"shm://127.0.0.1:{port}")
            assert isinstance(comm, SHM) and comm.link is None
            x = np.arange(10**6)
            await comm.write({"x": to_serialize(x)})
            np.testing.assert_array_equal((await comm.read())["x"], x)
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


PEER = textwrap.dedent(
    """
    import asyncio, sys, numpy as np
    from distributed.comm import connect
    from distributed.protocol import to_serialize
    from dask_shm import stats

    async def main():
        comm = await connect(sys.argv[1])
        x = np.arange(10**6)
        await comm.write({"x": to_serialize(x)})
        back = (await comm.read())["x"]
        assert (back == x).all()
        # The same through the "shm" serialization family.
        await comm.write({"x": to_serialize(x)}, serializers=["shm", "dask", "pickle"])
        back = (await comm.read())["x"]
        assert (back == x).all()
        counts = stats.snapshot()
        print(
            "link" if comm.link is not None else "tcp",
            counts.get("shm-messages", 0),
            counts.get("family-messages", 0),
        )
        await comm.close()

    asyncio.run(main())
    """
)


def test_peer_with_another_directory_fails_the_probe(tmp_path: Any) -> None:
    """A peer that cannot see our directory (as a container with its own
    /dev/shm on the same IP) gets TCP, and correct data; the "shm" family
    declines there and the next family serves."""

    async def main() -> str:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            env = dict(os.environ, DASK_DASK_SHM__DIRECTORY=str(tmp_path))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PEER, listener.contact_address,
                env=env, stdout=subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            return out.decode().strip()

    assert run(main()) == "tcp 0 0"
    assert stats.snapshot().get("handshake-no-probe", 0) == 1
    assert stats.snapshot()["fallback-no-probe"] == 2  # the listener's two echoes
    assert not os.listdir(tmp_path)


def test_peer_process_on_same_host_uses_shm() -> None:
    async def main() -> str:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            env = dict(os.environ, DASK_DASK_SHM__COLD_TRANSFER="shm")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PEER, listener.contact_address,
                env=env, stdout=subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            return out.decode().strip()

    with dask.config.set({"dask-shm.cold-transfer": "shm"}):
        assert run(main()) == "link 1 1"


async def _send_raw_envelope(descriptor: bytes, inline: list[Any]) -> str:
    """Send a hand-made envelope over an established shm link; return the
    error the receiving side raised."""
    err = await first_read_error(
        lambda comm: TCP.write(comm, _Envelope(descriptor, *inline).pickled())
    )
    assert isinstance(err, CommClosedError), err
    return str(err)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../../etc/passwd", "not a dask-shm segment name"),
        ("/etc/passwd", "not a dask-shm segment name"),
        ("psm_1234", "not a dask-shm segment name"),
        ("dask-shm-1-2-3-s-" + "0" * 32, "does not belong to the peer"),
    ],
)
def test_bad_descriptor_closes_comm_with_clear_error(name: str, problem: str) -> None:
    desc = encode(1, [Placement(0, name, 0, 10)])
    assert problem in run(_send_raw_envelope(desc, []))


def test_descriptor_of_missing_segment() -> None:
    name = new_name("s")  # ours by name (the peer is this process) but absent
    desc = encode(1, [Placement(0, name, 0, 10)])
    assert "does not exist" in run(_send_raw_envelope(desc, []))


def test_descriptor_beyond_segment_size_is_refused(tmp_path: Any) -> None:
    name = new_name("s")
    fd = os.open(f"{SHM_DIR}/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, 4096)
    os.close(fd)
    desc = encode(1, [Placement(0, name, 0, 8192)])
    assert "less than the 8192 bytes" in run(_send_raw_envelope(desc, []))
    assert not ours()  # the refused segment was taken over, then removed


def test_sparse_segment_is_refused() -> None:
    """A file that is not fully allocated could SIGBUS us on a full tmpfs."""
    name = new_name("s")
    fd = os.open(f"{SHM_DIR}/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 20)
    os.close(fd)
    desc = encode(1, [Placement(0, name, 0, 1 << 20)])
    assert "allocated" in run(_send_raw_envelope(desc, []))


def test_owner_identity_in_names() -> None:
    me = current_owner()
    assert new_name("s").startswith(f"dask-shm-{me.pid}-{me.start}-{me.ns}-s-")


def test_planted_symlink_is_never_followed(tmp_path: Any) -> None:
    """A symlink named like a segment of the peer, pointing outside the
    directory: refused at open (O_NOFOLLOW), the target untouched."""
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 8192)
    name = new_name("s")
    os.symlink(target, f"{SHM_DIR}/{name}")
    desc = encode(1, [Placement(0, name, 0, 4096)])
    err = run(_send_raw_envelope(desc, []))
    assert "cannot open segment" in err
    assert target.read_bytes() == b"s" * 8192
    assert not ours()


def test_hard_linked_segment_is_refused(tmp_path: Any) -> None:
    """A segment reachable under a second name (one of our live segments,
    say) is refused: taking it over would alias memory."""
    name = new_name("s")
    path = f"{SHM_DIR}/{name}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, 4096)
    os.close(fd)
    alias = f"{SHM_DIR}/{new_name('s')}"
    os.link(path, alias)
    try:
        desc = encode(1, [Placement(0, name, 0, 4096)])
        assert "hard links" in run(_send_raw_envelope(desc, []))
    finally:
        os.unlink(alias)


def test_relay_forwards_received_segments_without_copying(shm_config: None) -> None:
    """A peer that does not deserialize (the scheduler) hands the segments it
    received on to the next receiver as they are: one copy end to end, and
    the data arrives intact and zero-copy."""

    async def relay(comm: Comm) -> None:
        """Forward each message back, then send fresh data of its own: if a
        forwarded segment had gone back into the relay's pool, that data
        would land in pages the client now owns."""
        try:
            while True:
                msg = await comm.read()
                await comm.write(msg)
                del msg
                await comm.write({"x": to_serialize(np.full(4 * 10**6, 7))})
        except CommClosedError:
            pass
        finally:
            await comm.close()

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", relay, deserialize=False) as listener:
            comm = await connect(listener.contact_address)
            x = np.arange(4 * 10**6)
            kept = []
            for _ in range(3):
                await comm.write({"x": to_serialize(x)})
                y = (await comm.read())["x"]
                np.testing.assert_array_equal(y, x)
                path = mapping_of(y.__array_interface__["data"][0])
                assert path and os.path.basename(path).startswith("dask-shm-")
                fresh = (await comm.read())["x"]
                assert (fresh == 7).all()
                np.testing.assert_array_equal(y, x)  # untouched by the relay's new data
                kept.append(y)
                del fresh
            for y in kept:
                np.testing.assert_array_equal(y, x)
                y[:] = -1  # ours alone
            del kept, y
            await comm.close()

    run(main())
    counts = stats.snapshot()
    assert counts["segments-forwarded"] == 3, counts
    assert counts["shm-messages"] == 9  # 3 there, 3 forwarded back, 3 fresh


def test_size_estimate_sends_what_may_be_large_through_shared_memory() -> None:
    from distributed.protocol import Serialized
    from distributed.protocol.serialize import ToPickle

    from dask_shm.comm import _reaches

    big, small = np.ones(5 << 20, dtype="u1"), np.ones(1000, dtype="u1")
    assert _reaches({"x": to_serialize(big)}, 4 << 20)
    assert _reaches([{"a": [to_serialize(small)] * 10_000}], 4 << 20)  # many small ones add up
    assert _reaches({"op": "update", "keys": [str(i) for i in range(10**6)]}, 4 << 20)
    assert _reaches(Serialized({}, [memoryview(big)]), 4 << 20)
    assert _reaches(ToPickle(big), 4 << 20)
    assert not _reaches({"x": to_serialize(small), "op": "get_data", "n": 3}, 4 << 20)
    assert not _reaches(b"ok", 4 << 20)


def test_a_cold_transfer_in_flight_counts_as_busy() -> None:
    """While a large message crosses a linked comm over TCP (a cold transfer),
    its socket holds the bytes and this process counts as busy: a warm-up
    creating fresh pages pauses for it (see Pool.busy)."""
    from dask_shm.comm import _moving_bytes

    async def main() -> None:
        go = asyncio.Event()
        got: asyncio.Queue[Any] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            try:
                await go.wait()  # the peer does not read yet
                await got.put(await comm.read())
            finally:
                await comm.close()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            try:
                assert comm.link is not None  # type: ignore[attr-defined]
                assert not _moving_bytes()
                x = np.ones(32 << 20, dtype="u1")  # no pooled segment fits: TCP
                write = asyncio.ensure_future(comm.write({"x": to_serialize(x)}))
                await asyncio.sleep(0.3)
                assert _moving_bytes()
                go.set()
                await write
                msg = await asyncio.wait_for(got.get(), 10)
                assert msg["x"].nbytes == x.nbytes
                assert stats.snapshot().get("fallback-cold") == 1
                del msg
            finally:
                await comm.close()

    run(main())


def test_once_no_comm_is_left_warm_ups_expect_nothing_back(shm_config: None) -> None:
    """A process that handed large segments to peers, or got them back, waits
    for the next one to come back before creating fresh pages: but once its
    last shared-memory comm has closed, none will, and a warm-up (say, the
    first large send to a new cluster) creates at once instead of waiting."""
    from dask_shm.pool import get_pool
    from dask_shm.segments import ShmDirectory

    from .conftest import wait_for

    n = 40 << 20  # a size whose warm-ups wait for returns

    async def body(comm: Comm) -> None:
        await comm.write({"x": to_serialize(np.ones(n, dtype="u1"))})
        del (await comm.read())["x"]  # the echo came back and is released

    run(with_echo("shm", body))
    pool = get_pool()
    pool.warm_wait = 60.0  # a warm-up still expecting a return would outlast the test
    try:
        pool.trim()  # nothing idle or parked: the warm-up below must create
        pool.warm(ShmDirectory.get(SHM_DIR), n)
        assert wait_for(lambda: pool.info()["warming"] == 0, timeout=20)
        assert pool.info()["idle-segments"] == 1
    finally:
        pool.warm_wait = 1.0
