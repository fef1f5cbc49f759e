"""Failures a user can hit on the default path, each compared with what
``tcp://`` does in the same scenario: a read that fails half-way, a peer
that hangs up, a task that forks, connections that never say anything, a
directory that is not memory, a pid that was reused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import dask
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.protocol import to_serialize

from dask_shm import receive
from dask_shm import host as hosts

from .conftest import echo_server, until

#: The two data paths of a linked comm (see conftest.PATHS).
PATHS = ["single copy", "buffer"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    with dask.config.set({"dask-shm.single-copy": request.param == "single copy"}):
        yield request.param


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def failing_once(exc: BaseException, real: Any) -> Any:
    """``real``, except that its first call raises ``exc``."""
    calls = [0]

    def allocate(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise exc
        return real(*args, **kwargs)

    return allocate


@pytest.mark.parametrize("exc", [MemoryError("injected"), asyncio.CancelledError()])
def test_a_read_that_fails_after_its_descriptor_aborts_the_comm_and_frees_the_message(
    path: str, exc: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As TCP.read: whatever fails once the message started arriving aborts
    the comm (the rest of that message would be misread as the next one),
    and the sender gets back what that message held, at once."""
    monkeypatch.setattr(receive, "host_array", failing_once(exc, receive.host_array))
    n = 50 * 10**6

    async def main() -> None:
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        async def handler(comm: Comm) -> None:
            try:
                await comm.read()
                outcome.set_result(None)
            except BaseException as e:  # noqa: BLE001  (the outcome under test)
                outcome.set_result(e)
            # The handler keeps its comm, as distributed's pool may: it must
            # be closed already.

        async with listen("shm://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None  # type: ignore[attr-defined]
            await comm.write({"x": to_serialize(np.ones(n, dtype=np.uint8))})
            raised = await outcome
            assert type(raised) is type(exc), repr(raised)
            # The sender holds nothing of that message any more...
            box = comm.link.outbox  # type: ignore[attr-defined]
            await until(lambda: box.closed and not box.pinned and not box.inflight)
            # ...and its close returns (it waits only for what may be read).
            await asyncio.wait_for(comm.close(), 10)
            await until(lambda: hosts.info()["buffer-in-flight"] == 0)

        assert not [c for c in Comm._instances if not c.closed()]

    run(main())


@pytest.mark.parametrize("how", ["read", "idle"])
def test_a_comm_its_peer_hung_up_on_lets_go_at_once(path: str, how: str) -> None:
    """TCP marks a comm closed by its peer without close() or abort(), and
    distributed never aborts a comm that reports closed(): the link must
    go then, not when the comm is garbage-collected.  ``read``: the
    server was reading when the peer hung up; ``idle``: it was not, and
    learns of it from a failed write."""
    from .conftest import our_fds

    kept: list[Comm] = []

    async def main() -> None:
        read_one = asyncio.Event()
        done = asyncio.Event()

        async def handler(comm: Comm) -> None:
            kept.append(comm)  # held, as a pool or a traceback may hold it
            await comm.read()
            read_one.set()
            if how == "read":
                with pytest.raises(CommClosedError):
                    await comm.read()
            else:
                await until(lambda: comm.closed() or _write_fails(comm))
            done.set()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None  # type: ignore[attr-defined]
            await comm.write({"x": to_serialize(np.ones(5 * 10**6, dtype=np.uint8))})
            await read_one.wait()
            await comm.close()
            await done.wait()
            assert kept[0].closed()
            await until(lambda: not hosts.Host._hosts and not our_fds())

    run(main())
    assert kept  # still referenced: nothing waited for its collection


def _held_by(pid: int) -> list[str]:
    """Mappings and descriptors of ours in process ``pid``."""
    from .conftest import our_fds, our_maps

    return our_maps(pid) + our_fds(pid=pid)


def _write_fails(comm: Comm) -> bool:
    """Start a small write on ``comm`` (its failure is what tells TCP)."""
    asyncio.ensure_future(comm.write({"ping": 1})).add_done_callback(
        lambda f: f.cancelled() or f.exception()
    )
    return False


@pytest.mark.parametrize("style", ["os.fork", "multiprocessing"])
def test_a_task_that_forks_keeps_nothing_of_ours(path: str, style: str) -> None:
    """A receiver forks (a task calling os.fork, or multiprocessing's fork
    context) while a message to it is pinned, then hangs up unread: the
    sender gets it back at once, as over TCP, not when the child exits; the
    child holds no descriptor or mapping of ours."""
    import os
    import signal

    from .conftest import peer

    async def main() -> None:
        comms: asyncio.Queue[Comm] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            await comms.put(comm)

        async with listen("shm://127.0.0.1:0", handler) as listener:
            async with peer("fork-then-hang-up", listener.contact_address, style) as p:
                await p.ready()
                comm = await comms.get()
                assert comm.link is not None  # type: ignore[attr-defined]
                for i in range(2):
                    await comm.write({"x": to_serialize(np.full(20 * 10**6, i, dtype=np.uint8))})
                words = await p._line("FORKED", 30)
                child = int(words[0])
                try:
                    box = comm.link.outbox  # type: ignore[attr-defined]
                    await until(lambda: box.closed)  # the child did not keep it open
                    assert os.path.exists(f"/proc/{child}")
                    # (The child lets go in an at-fork hook, perhaps not yet run.)
                    await until(lambda: not _held_by(child))
                    assert os.path.exists(f"/proc/{child}")
                finally:
                    os.kill(child, signal.SIGKILL)  # (multiprocessing's waits for it at exit)
                await p.done()
                comm.abort()

    run(main())


def test_connections_that_say_nothing_cost_no_file_and_no_descriptor() -> None:
    """Unauthenticated sockets to an shm:// listener (nothing sent) make it
    hold nothing per connection: the probe and the buffer are per process,
    and a release socket is made only for a peer that proved itself."""
    from .conftest import our_fds, ours

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            host, port = listener.contact_address.removeprefix("shm://").rsplit(":", 1)
            # One proven comm first, so that the per-process files exist.
            comm = await connect(listener.contact_address)
            await comm.write({"x": 1})
            await comm.read()  # both ends linked
            files, fds = ours(), our_fds()
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(50)]
            try:
                # The listener has started a handshake on each (its info sent).
                for reader, _ in idle:
                    assert await asyncio.wait_for(reader.read(8), 10)
                assert ours() == files and sorted(our_fds()) == sorted(fds)
            finally:
                for _, writer in idle:
                    writer.close()
            await comm.close()

    run(main())


def test_a_directory_that_is_not_memory_is_refused_with_one_warning(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On a disk (or network) filesystem buffers would be written back, or
    seen from another host: shm:// is plain TCP there, with one warning
    naming the reason."""
    import logging

    from dask_shm import stats
    from dask_shm.names import filesystem

    assert filesystem(str(tmp_path)) != "tmpfs", "this test needs tmp_path on a disk"

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            for _ in range(3):
                comm = await connect(listener.contact_address)
                assert comm.link is None  # type: ignore[attr-defined]
                x = np.arange(10**6)
                await comm.write({"x": to_serialize(x)})
                assert np.array_equal((await comm.read())["x"], x)
                await comm.close()

    with dask.config.set({"dask-shm.directory": str(tmp_path)}), caplog.at_level(logging.WARNING):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if "dask-shm" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "not a memory filesystem" in warnings[0] and str(tmp_path) in warnings[0]
    assert stats.snapshot()["fallback-disabled"] > 0
    assert not list(tmp_path.iterdir())


def test_a_read_from_a_pid_that_is_no_longer_the_peer_is_refused() -> None:
    """A descriptor names its sender by the pid the handshake proved; if
    that process died and another took its pid, what a read finds there is
    not the peer's.  Simulated exactly: a live process whose start time is
    not the one recorded is what a reused pid looks like."""
    import errno
    import subprocess
    import sys

    from dask_shm.names import current_owner
    from dask_shm.single_copy import read_frames

    me = current_owner()
    x = np.arange(1000, dtype=np.uint8)
    got = np.zeros_like(x)
    read_frames(me, [(x.ctypes.data, got)])  # the real peer: read
    assert np.array_equal(got, x)
    impostor = type(me)(me.pid, me.start + 1, me.ns, me.boot)  # same pid, other process
    with pytest.raises(ProcessLookupError) as e:
        read_frames(impostor, [(x.ctypes.data, got)])
    assert e.value.errno == errno.ESRCH and "may have been reused" in str(e.value)
    # And a pid whose process has exited.
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = type(me)(int(proc.stdout), me.start, me.ns, me.boot)
    with pytest.raises(ProcessLookupError):
        read_frames(gone, [(x.ctypes.data, got)])


@pytest.mark.parametrize("scheme", ["tcp", "shm"])
def test_a_worker_without_a_nanny_advertises_what_it_would_over_tcp(scheme: str) -> None:
    """A Worker started without a Nanny or a host advertises the interface it
    reaches its scheduler on (here loopback), not the default route's
    address, as over tcp://; host restrictions then match it."""
    from distributed import Scheduler, Worker
    from distributed.utils import get_ip

    async def main() -> str:
        async with Scheduler(host="127.0.0.1", protocol=scheme, dashboard_address=":0") as s:
            async with Worker(s.address) as w:
                return str(w.address)

    # Where loopback is the only interface, any address would pass.
    assert get_ip() != "127.0.0.1", "this test needs a host with another interface"
    address = run(main())
    assert address.startswith(f"{scheme}://127.0.0.1:"), address


def test_a_single_copy_link_holds_no_descriptor_on_its_peers_buffer() -> None:
    """The peer's buffer is checked at the handshake and opened again only
    to be mapped, at its first use: a link that reads in place never holds
    a descriptor on it (a scheduler with many workers counts them)."""
    from .conftest import our_fds

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            assert comm.link is not None and comm.link.single_copy  # type: ignore[attr-defined]
            x = np.arange(10**6)
            await comm.write({"x": to_serialize(x)})
            assert np.array_equal((await comm.read())["x"], x)
            # In one process the peer's buffer is our own, whose file this
            # process keeps open until it fills it: that one descriptor only.
            assert len([f for f in our_fds() if "-b-" in f]) == 1, our_fds()
            await comm.close()

    run(main())  # single copy: the default path
