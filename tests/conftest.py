"""Shared fixtures and helpers.

Every test is checked for leaks (:func:`no_leaks`): once it ends and no
``shm://`` comm of this process is open, nothing of ours may remain: no file
in the shm directory, no comm open, no descriptor of this process on one of
our files or the directory, no mapping of one of our files, no thread named
``dask-shm...``.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import dask
import pytest
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError

import dask_shm  # noqa: F401  (loads the configuration defaults)
from dask_shm import stats
from dask_shm.names import PREFIX
from dask_shm.release import open_sockets

#: The shm directory under test: /dev/shm, unless DASK_DASK_SHM__DIRECTORY
#: names another (e.g. a private subdirectory of /dev/shm, so that two test
#: runs on one machine do not see each other's files; make it mode 1777
#: like /dev/shm, for the other-user test).
SHM_DIR = os.environ.get("DASK_DASK_SHM__DIRECTORY", "/dev/shm")
#: The repository: peer processes run ``python -m tests.peers`` from here.
ROOT = str(Path(__file__).resolve().parent.parent)
#: How long a test's processes may take to release what they own (a
#: subprocess's exit, a comm's other end noticing a close).
SETTLE = 10.0


def ours(directory: str = SHM_DIR) -> list[str]:
    """Our files in ``directory``, by name."""
    try:
        return sorted(n for n in os.listdir(directory) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def wait_for(predicate: Callable[[], object], timeout: float = SETTLE, interval: float = 0.01) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


async def until(predicate: Callable[[], object], timeout: float = SETTLE) -> None:
    """Wait in an event loop until ``predicate()`` is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.005)


def our_fds(directory: str = SHM_DIR, pid: int | str = "self") -> list[str]:
    """A process's descriptors (this one's by default) on our files
    (buffers, probes, named or unlinked), on the shm directory itself, and
    on release sockets."""
    out = []
    sockets = open_sockets()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used, closed since
        base = os.path.basename(target.removesuffix(" (deleted)"))
        in_dir = os.path.dirname(target) == directory.rstrip("/")
        if (in_dir and base.startswith(PREFIX)) or target == directory.rstrip("/"):
            out.append(target)
        elif target.startswith("socket:[") and int(target[8:-1]) in sockets:
            out.append(f"release socket {sockets[int(target[8:-1])]}")
    return out


def our_maps(pid: int | str = "self") -> list[str]:
    """Mappings of our files in a process (this one by default)."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.split(maxsplit=5)[5].strip() for line in f if PREFIX in line]


def our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.lower().startswith("dask-shm")]


def _open_comms() -> list[Comm]:
    return [c for c in list(Comm._instances) if not c.closed()]


def _shm_comms_open() -> bool:
    from dask_shm.comm import SHM

    return any(isinstance(c, SHM) for c in _open_comms())


@pytest.fixture(autouse=True)
def warnings_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with dask-shm's once-per-process warning unsaid, so
    that "warned once" never depends on which test ran before."""
    import dask_shm.host

    monkeypatch.setattr(dask_shm.host, "_warned", False)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves anything of ours behind (see the module doc)."""
    before = ours()
    assert not before, f"files left by something before this test: {before}"
    stats.reset()
    yield
    leaked_comms = []
    if not wait_for(lambda: not _open_comms(), timeout=5):
        leaked_comms = [repr(c) for c in _open_comms()]
        for c in _open_comms():
            c.abort()

    def clean() -> bool:
        return not (ours() or our_fds() or our_maps() or our_threads())

    def settled() -> bool:
        if clean():
            return True
        gc.collect()  # a dropped comm's finalizer may be what is left to run
        return clean()

    wait_for(settled)
    left, fds, maps, threads = ours(), our_fds(), our_maps(), our_threads()
    for name in left:  # don't let one failure cascade into every later test
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not leaked_comms, f"comms left open: {leaked_comms}"
    assert not left, f"files left in {SHM_DIR}: {left}"
    assert not fds, f"descriptors of ours left open: {fds}"
    assert not maps, f"mappings of ours left: {maps}"
    assert not threads, f"threads of ours left running: {threads}"


#: The threshold tests run with (the default, 4 MiB, would send most test
#: payloads over TCP).
TEST_THRESHOLD = "1 MiB"

#: Every path an shm:// message may take, for the parity checks that run on
#: each (``@pytest.mark.parametrize("scheme, conf", PATHS)``): plain
#: ``tcp://`` as the reference, single copy, the buffer (with the default
#: and a small buffer that every message streams through in many
#: fragments), and the TCP an shm:// comm falls back to.  A path added later
#: is added here, and every parity check covers it.
PATHS = [
    pytest.param("tcp", {}, id="tcp"),
    pytest.param("shm", {"dask-shm.single-copy": True}, id="single-copy"),
    pytest.param("shm", {"dask-shm.single-copy": False}, id="buffer"),
    pytest.param(
        "shm",
        {"dask-shm.single-copy": False, "dask-shm.buffer-size": "1 MiB",
         "dask-shm.fragment-size": "256 KiB"},
        id="small-buffer",
    ),
    pytest.param("shm", {"dask-shm.enabled": False}, id="shm-as-tcp"),
]


def took_path(scheme: str, conf: dict[str, object]) -> None:
    """Assert that this process's messages went the way ``conf`` says (one
    of :data:`PATHS`), so that a parity check proves what it claims."""
    counts = stats.snapshot()
    if scheme == "tcp" or conf.get("dask-shm.enabled") is False:
        assert counts.get("shm-messages", 0) == 0, counts
        if scheme == "shm":
            assert counts.get("fallback-disabled", 0) > 0, counts
    elif conf.get("dask-shm.single-copy"):
        assert counts.get("single-copy-messages", 0) > 0, counts
    else:
        assert counts.get("shm-messages", 0) > 0, counts
        assert counts.get("single-copy-messages", 0) == 0, counts


@pytest.fixture(autouse=True)
def test_threshold(request: pytest.FixtureRequest) -> Iterator[None]:
    """The threshold is lowered to ``TEST_THRESHOLD`` so that small test
    payloads take shared memory.  Tests take the default path (single copy,
    where the kernel permits it: here it does) unless marked ``buffer``
    (they are about the buffer's machinery: regions, fragments, room) or
    parametrized over :data:`PATHS`.  Processes started with their own
    environment (the dask CLI) keep the defaults."""
    conf: dict[str, object] = {"dask-shm.threshold": TEST_THRESHOLD}
    if request.node.get_closest_marker("buffer"):
        conf["dask-shm.single-copy"] = False
    with dask.config.set(conf):
        yield


@pytest.fixture
def shm_config() -> Iterator[None]:
    """Shared memory for every message of 64 KiB or more: mid-sized messages
    exercise the path too."""
    with dask.config.set({"dask-shm.threshold": "64 KiB"}):
        yield


@pytest.fixture
def small_buffer() -> Iterator[None]:
    """A 1 MiB buffer streamed in 256 KiB fragments: any message of a few MB
    takes many descriptors and reuses every byte of the buffer many times."""
    conf = {
        "dask-shm.threshold": "64 KiB",
        "dask-shm.buffer-size": "1 MiB",
        "dask-shm.fragment-size": "256 KiB",
    }
    with dask.config.set(conf):
        yield


def is_root() -> bool:
    return os.geteuid() == 0


root_only = pytest.mark.skipif(not is_root(), reason="needs root (CI runs as root)")

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


async def echo_server(comm: Comm) -> None:
    """A listener's handler: send every message back until the peer goes."""
    try:
        while True:
            msg = await comm.read()
            await comm.write(msg)
    except CommClosedError:
        pass
    finally:
        await comm.close()


async def first_read_error(
    send: Callable[[Comm], Awaitable[object]], address: str = "shm://127.0.0.1:0"
) -> BaseException:
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

    async with listen(address, handler) as listener:
        comm = await connect(listener.contact_address)
        try:
            assert comm.link is not None  # type: ignore[attr-defined]
            await send(comm)
            return await asyncio.wait_for(errors.get(), 10)
        finally:
            comm.abort()


def peer_env(**conf: str) -> dict[str, str]:
    """The environment of a peer process: ours, with ``dask-shm`` keys
    (``buffer_size="1 MiB"``) and any ``DASK_...`` variable (given whole)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # The path under test follows this test's (see test_threshold).
    env["DASK_DASK_SHM__SINGLE_COPY"] = str(dask.config.get("dask-shm.single-copy")).lower()
    env["DASK_DASK_SHM__THRESHOLD"] = str(dask.config.get("dask-shm.threshold"))
    for key, value in conf.items():
        env[key if key.startswith("DASK_") else f"DASK_DASK_SHM__{key.upper()}"] = value
    return env


class Peer:
    """A process running a role of :mod:`tests.peers` (see :func:`peer`)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log

    async def _line(self, word: str, timeout: float) -> list[str]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise AssertionError(f"peer ended before {word}: {self.stderr()}")
            words = line.decode().split(maxsplit=1)
            if words and words[0] == word:
                return words[1:]

    async def ready(self, timeout: float = 30) -> str:
        """What the peer printed after READY (an address, or nothing)."""
        return " ".join(await self._line("READY", timeout))

    async def done(self, timeout: float = 60) -> dict[str, Any]:
        """Its counters, once it ended normally."""
        words = await self._line("DONE", timeout)
        assert await asyncio.wait_for(self.proc.wait(), timeout) == 0, self.stderr()
        return json.loads(words[0])  # type: ignore[no-any-return]

    async def killed(self, timeout: float = 60) -> None:
        """Wait for its death by SIGKILL (from outside or from --die-at)."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        assert code == -signal.SIGKILL, (code, self.stderr())

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def files(self) -> list[str]:
        """Our files in the shm directory named with this process's pid."""
        return [n for n in ours() if n.startswith(f"{PREFIX}{self.pid}-")]


@asynccontextmanager
async def peer(
    role: str, *args: str, process: Sequence[str] = (), **conf: str
) -> AsyncIterator[Peer]:
    """Run ``python -m tests.peers *process role *args`` with ``conf`` (see
    :func:`peer_env`); kill it on the way out if it still runs.  ``process``
    options set who the peer runs as (``--uid``, ``--dumpable``: see
    :func:`tests.peers.become`)."""
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.peers", *process, role, *args,
            cwd=ROOT, env=peer_env(**conf), stdout=asyncio.subprocess.PIPE, stderr=log,
        )
        try:
            yield Peer(proc, log)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.read()


IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_OPEN = 0x1, 0x2, 0x4, 0x20


class OpenWatch:
    """inotify on one file: whether anything opened, read, wrote or
    re-attributed it since the watch started."""

    def __init__(self, path: str | Path) -> None:
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
