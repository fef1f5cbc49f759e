"""Shared fixtures.  Every test is checked for leaks: a segment of ours left in
the shm directory, or a comm left open, fails it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import pytest
from distributed.comm import connect, listen
from distributed.comm.core import Comm

import dask_shm  # noqa: F401  (loads the configuration defaults)
from dask_shm import stats
from dask_shm.pool import get_pool
from dask_shm.segments import PREFIX

#: The shm directory under test: /dev/shm, unless DASK_DASK_SHM__DIRECTORY
#: names another (e.g. a private subdirectory of /dev/shm, so that two test
#: runs on one machine do not see each other's segments; make it mode 1777
#: like /dev/shm, for the other-user test).
SHM_DIR = os.environ.get("DASK_DASK_SHM__DIRECTORY", "/dev/shm")
#: How long a test's processes may take to finish releasing what they own
#: (subprocess exit, graceful-close grace periods are longer and are not
#: waited for: a test must not leave anything in flight).
SETTLE = 10.0


def ours(directory: str = SHM_DIR) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def wait_for(predicate, timeout: float = SETTLE, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _open_comms() -> list[Comm]:
    return [c for c in list(Comm._instances) if not c.closed()]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a segment in /dev/shm or a comm open."""
    before = set(ours())
    assert not before, f"segments left by something before this test: {before}"
    stats.reset()
    yield
    gc.collect()
    # This process's pool is not a leak (anything else is): let warm-ups
    # finish, then empty it.
    wait_for(lambda: get_pool().info()["warming"] == 0)
    get_pool().trim()
    leaked_comms = []
    if not wait_for(lambda: not _open_comms(), timeout=5):
        leaked_comms = [repr(c) for c in _open_comms()]
        for c in _open_comms():
            c.abort()

    def settled() -> bool:
        gc.collect()
        return not ours()

    left = [] if wait_for(settled) else ours()
    for name in left:  # don't let one failure cascade into every later test
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not leaked_comms, f"comms left open: {leaked_comms}"
    assert not left, f"segments left in {SHM_DIR}: {left}"


@pytest.fixture
def shm_config() -> Iterator[None]:
    """Shared memory for every frame of 64 KiB or more, even on a cold pool:
    tests that check zero-copy need the first transfer to go through a
    segment, and mid-sized frames exercise the path too."""
    with dask.config.set({"dask-shm.cold-transfer": "shm", "dask-shm.threshold": "64 KiB"}):
        yield


def is_root() -> bool:
    return os.geteuid() == 0


Start = Callable[..., "subprocess.Popen[bytes]"]


@contextmanager
def dask_processes(env: dict[str, str]) -> Iterator[Start]:
    """Start ``dask ...`` commands (``start("scheduler", "--port", "0")``) with
    ``env``; on leaving, terminate them (a normal exit, which cleans up) and
    kill what does not end within 30 s."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        cmd = [str(Path(sys.executable).parent / "dask"), *args]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        return procs[-1]

    try:
        yield start
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def first_read_error(send: Callable[[Comm], Awaitable[object]]) -> BaseException:
    """Open an shm:// listener, connect to it, ``send`` on the new comm (which
    must have negotiated shared memory) and return the exception the
    listener's first ``read`` raised."""
    errors: asyncio.Queue[BaseException] = asyncio.Queue()

    async def handler(comm: Comm) -> None:
        try:
            await comm.read()
        except BaseException as e:
            await errors.put(e)
        finally:
            comm.abort()

    async with listen("shm://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        try:
            assert comm.link is not None  # type: ignore[attr-defined]
            await send(comm)
            return await asyncio.wait_for(errors.get(), 10)
        finally:
            comm.abort()
