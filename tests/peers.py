"""Peer processes for the tests: ``python -m tests.peers ROLE ARG...``.

Each role is a small, real Dask comm end in its own process (its own buffer,
its own pid), driven from the test through its command line and its output:
it prints one line ``READY ...`` when the test may go on, and ``DONE <json>``
(its counters) when it ends normally.  Fault injection (``--die-at N``) kills
the process with SIGKILL from inside the data path, at an exact point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.protocol import to_serialize
from distributed.utils import offload as distributed_offload

from dask_shm import host as hosts, stats
from dask_shm.buffers import Buffer
from dask_shm.comm import SHM
from dask_shm.inbox import Inbox


def say(*words: object) -> None:
    print(*words, flush=True)


def done(**extra: Any) -> None:
    say("DONE", json.dumps({**stats.snapshot(), **extra}))


def die_at(cls: type, method: str, n: int) -> None:
    """SIGKILL this process when ``cls.method`` is called for the ``n``-th time."""
    real: Callable[..., Any] = getattr(cls, method)
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(cls, method, dying)


def payload(nbytes: int, seed: int = 0) -> np.ndarray:
    """Bytes whose values depend on their position: a region delivered in the
    wrong place, twice or stale shows."""
    return ((np.arange(nbytes, dtype=np.uint64) * 2654435761 + seed) >> 7).astype(np.uint8)


@contextlib.asynccontextmanager
async def buffer_kept(keep: bool = True) -> AsyncIterator[None]:
    """With ``keep``, an idle linked comm to a second listener of this
    process for the duration: this process's buffer then outlives the comm
    under test (its last comm otherwise), so what that comm held of it can
    be read afterwards."""
    ended = asyncio.Event()

    async def idle(comm: Comm) -> None:
        await ended.wait()
        comm.abort()

    async with listen("shm://127.0.0.1:0", idle) as other:
        comm = await connect(other.contact_address) if keep else None
        try:
            yield
        finally:
            if comm is not None:
                await comm.close()
            ended.set()


async def echo(args: list[str]) -> None:
    """Listen; echo every message of the first comm back (``{"x": ...}``
    re-serialized); print DONE when that comm closes."""
    finished = asyncio.Event()

    async def handler(comm: Comm) -> None:
        try:
            while True:
                msg = await comm.read()
                msg["x"] = to_serialize(msg["x"])
                await comm.write(msg)
        except CommClosedError:
            pass
        finally:
            await comm.close()
            finished.set()

    async with listen("shm://127.0.0.1:0", handler) as listener:
        say("READY", listener.contact_address)
        await finished.wait()
    done()


async def client(args: list[str]) -> None:
    """Connect; round-trip an 8 MB array with the default serializers and
    with the "shm" family first; print how it went."""
    comm = await connect(args[0])
    x = np.arange(10**6)
    await comm.write({"x": to_serialize(x)})
    assert ((await comm.read())["x"] == x).all()
    await comm.write({"x": to_serialize(x)}, serializers=["shm", "dask", "pickle"])
    assert ((await comm.read())["x"] == x).all()
    linked = comm.link is not None  # type: ignore[attr-defined]
    await comm.close()
    done(linked=linked)


async def send(args: list[str]) -> None:
    """Connect and send one message of ``args[1]`` bytes (``payload``); with
    ``--die-at N``, be killed at the N-th copy into this process's buffer;
    with ``--die-in-handshake``, once both ends have named their files, as
    this end starts checking the other's; with ``--no-memory-to-map``, in
    an address space too small for its buffer."""
    x = payload(int(args[1]))
    if "--die-at" in args:
        die_at(Buffer, "write", int(args[args.index("--die-at") + 1]))
    if "--die-in-handshake" in args:
        die_at(SHM, "_negotiate", 1)
    if "--no-memory-to-map" in args:
        await distributed_offload(lambda: None)  # its thread exists before the limit
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
        # Address space for everything but a 64 MiB buffer: the kernel
        # refuses its mapping (ENOMEM), as a memory cgroup could.
        resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), resource.RLIM_INFINITY))
    comm = await connect(args[0])
    say("READY")
    await comm.write({"x": to_serialize(x)})
    try:
        await comm.read()  # the test closes the comm when it has the message
    except CommClosedError:
        pass
    await comm.close()
    done()


async def write_and_end(args: list[str]) -> None:
    """Connect, write one message of ``args[1]`` bytes (``payload``), then end
    the comm, this process's last, as ``args[2]`` says:

    - ``close``: print READY, close (it returns once the peer has read what
      it reads in place, as ``TCP.close`` returns once the kernel holds
      every byte) and exit at once, with no cleanup at exit;
    - ``abort`` (which does not wait): drop the message, fill memory with
      other bytes, print READY, wait until this process has let go of
      shared memory (its peer released what it read) and report what is
      left of ours.
    """
    import gc

    from dask_shm.host import Host
    from tests.conftest import our_fds, until

    comm = await connect(args[0])
    n = int(args[1])
    await comm.write({"x": to_serialize(payload(n))})
    if args[2] == "close":
        say("READY")
        await comm.close()
        os._exit(0)
    comm.abort()
    gc.collect()
    junk = [np.full(n, 0xAA, dtype=np.uint8) for _ in range(2)]  # reuse what was freed
    say("READY")
    await until(lambda: not Host._hosts, 30)  # the peer has read and released
    del junk
    done(hosts=len(Host._hosts), fds=our_fds())


async def receive(args: list[str]) -> None:
    """Connect and read messages until the comm closes, checking each
    against ``payload``; with ``--die-at N``, be killed at the N-th copy out
    of the peer's buffer."""
    if "--die-at" in args:
        die_at(Inbox, "copy", int(args[args.index("--die-at") + 1]))
    comm = await connect(args[0])
    say("READY")
    good = 0
    try:
        while True:
            x = (await comm.read())["x"]
            good += bool((x == payload(len(x))).all())
    except CommClosedError:
        pass
    await comm.close()
    done(good=good)


async def serve_send(args: list[str]) -> None:
    """Listen; to the first peer that connects, write one message of
    ``args[0]`` bytes, then close that comm (which waits for the message to
    stream).  Meanwhile :func:`buffer_kept` keeps this process's buffer, so
    what that message held of it can be read afterwards: ``in-flight``
    (bytes of the buffer not yet freed) once the comm to the peer is
    closed."""
    import gc

    ended = asyncio.Event()
    report: dict[str, Any] = {}

    async def handler(comm: Comm) -> None:
        try:
            await comm.write({"x": to_serialize(payload(int(args[0])))})
            await comm.close()  # once what the write queued has been streamed
            report["wrote"] = "ok"
        except Exception as e:  # noqa: BLE001  (whatever it raised is the result)
            report["wrote"] = type(e).__name__
        finally:
            comm.abort()
            report["in-flight"] = hosts.info()["buffer-in-flight"]
            report["buffer-bytes"] = hosts.info()["buffer-bytes"]
            ended.set()

    async with listen("shm://127.0.0.1:0", handler) as listener, buffer_kept():
        say("READY", listener.contact_address)
        await ended.wait()
    del handler
    gc.collect()
    done(**report)


async def serve_receive(args: list[str]) -> None:
    """Listen; read messages from the first peer that connects until its
    comm fails; report how many arrived intact and what ended the comm."""
    ended = asyncio.Event()
    report: dict[str, Any] = {"good": 0}

    async def handler(comm: Comm) -> None:
        try:
            while True:
                x = (await comm.read())["x"]
                report["good"] += bool((x == payload(len(x))).all())
        except Exception as e:  # noqa: BLE001  (whatever it raised is the result)
            report["read"] = type(e).__name__
            report["error"] = str(e)
        finally:
            comm.abort()
            ended.set()

    async with listen("shm://127.0.0.1:0", handler) as listener:
        say("READY", listener.contact_address)
        await ended.wait()
    done(**report)


async def hold(args: list[str]) -> None:
    """Own a filled buffer and a probe in the directory, alive until stdin
    closes; print their names."""
    from dask_shm.config import settings
    from dask_shm.host import create_probe
    from dask_shm.names import Directory

    d = Directory(settings().directory)
    buffer = Buffer(d, 1 << 20)
    buffer.fill()
    probe, _ = create_probe(d)
    say("READY", buffer.name, probe)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    buffer.destroy()
    d.unlink(probe)
    d.close()
    done()


async def announce_size(args: list[str]) -> None:
    """Connect announcing a buffer ``args[1]`` times larger than ours, then
    send one large message."""
    real = SHM.handshake_info

    def handshake_info(self: SHM) -> dict[str, Any]:
        info = real(self)
        info["dask-shm"]["size"] *= int(args[1])
        return info

    SHM.handshake_info = handshake_info  # type: ignore[method-assign]
    comm = await connect(args[0])
    try:
        await comm.write({"x": to_serialize(payload(4 << 20))})
        await comm.read()
    except CommClosedError:
        pass
    await comm.close()
    done()


async def offload(args: list[str]) -> None:
    """Print whether this process offloads large copies, then round-trip a
    message larger than distributed's offload threshold within itself."""
    from dask_shm.estimate import offloads

    async def handler(comm: Comm) -> None:
        try:
            msg = await comm.read()
            await comm.write({"x": to_serialize(msg["x"])})
        finally:
            await comm.close()

    async with listen("shm://127.0.0.1:0", handler) as listener:
        comm = await connect(listener.contact_address)
        x = payload(40 << 20)
        await comm.write({"x": to_serialize(x)})
        ok = bool(((await comm.read())["x"] == x).all())
        await comm.close()
    done(offloads=offloads(True, 10**9), ok=ok)


def mid_stream(args: list[str]) -> None:
    """Within this process, stream a 40 MB message through a 1 MiB buffer
    and, mid-stream, end one side: ``sender`` aborts its comm (another
    linked comm stays open meanwhile), ``receiver`` aborts its comm, or
    ``both`` abort while the stream waits for room (the process's last comm
    closes under a waiting stream).  Report what the write, the read, the
    stream and a write after the abort came to, then collect garbage and
    report what is left of ours."""
    import gc

    import dask

    from tests.conftest import our_fds, our_maps, ours

    who = args[0]
    conf = {"dask-shm.threshold": "64 KiB", "dask-shm.buffer-size": "1 MiB",
            "dask-shm.fragment-size": "256 KiB", "dask-shm.single-copy": False}

    async def scenario() -> tuple[object, object]:
        outcome: asyncio.Queue[BaseException | None] = asyncio.Queue()
        receiving: list[Comm] = []

        async def handler(comm: Comm) -> None:
            receiving.append(comm)
            if who == "both":
                return  # never reads: the write waits for room
            try:
                await comm.read()
                await outcome.put(None)
            except Exception as e:  # noqa: BLE001  (whatever it raised is the result)
                await outcome.put(e)
            finally:
                comm.abort()

        async with listen("shm://127.0.0.1:0", handler) as listener, buffer_kept(who == "sender"):
            comm = await connect(listener.contact_address)
            write = asyncio.ensure_future(comm.write({"x": to_serialize(payload(40 * 10**6))}))
            if who == "both":  # the write waits for room
                while not (receiving and stats.snapshot().get("shm-bytes", 0)):
                    await asyncio.sleep(0.001)
            else:  # more than the buffer copied in, far from the end
                while not 4 << 20 < stats.snapshot().get("shm-bytes", 0) < 30 * 10**6:
                    await asyncio.sleep(0.001)
            # The write returned once the message was queued, as TCP's does;
            # a task streams it.
            wrote: object = "ok"
            try:
                await asyncio.wait_for(write, 10)
            except Exception as e:  # noqa: BLE001
                wrote = e
            assert comm.link is not None and comm.link.pump is not None
            pump = comm.link.pump
            (receiving[0] if who == "receiver" else comm).abort()
            if who == "both":
                receiving[0].abort()
            await asyncio.wait([pump], timeout=10)  # abort stops the stream
            streaming = "ended" if pump.done() else "hung"
            read = None if who == "both" else await asyncio.wait_for(outcome.get(), 10)
            try:
                await comm.write({"x": to_serialize(payload(10))})
                again: object = "ok"
            except Exception as e:  # noqa: BLE001
                again = e  # kept, as a caller keeps it (a future, a log record)
            comm.abort()
        return read, wrote, streaming, again

    with dask.config.set(conf):
        outcomes = asyncio.run(scenario())
    names = [x if isinstance(x, str) else type(x).__name__ for x in outcomes]
    del outcomes  # their tracebacks hold frames of the data path: garbage now
    gc.collect()
    done(read=names[0], wrote=names[1], streaming=names[2], again=names[3], files=ours(),
         fds=our_fds(), maps=our_maps())


def cancel_handshake(args: list[str]) -> None:
    """Connect to a listener of this process and cancel the connecting task
    while its handshake waits for this process's buffer to be filled (a
    256 MiB buffer: long enough to see); let the listener's end finish (it
    fails its handshake if it sees the closed connection after the fill,
    else its handler closes the comm); then report what is left of ours."""
    import gc

    import dask

    from dask_shm.host import Host
    from dask_shm.config import settings
    from tests.conftest import our_fds, ours, until

    def filled(host: Host) -> bool:
        return host.buffer is not None and host.buffer.view is not None

    async def scenario() -> str:
        async def handler(comm: Comm) -> None:
            await comm.close()

        async with listen("shm://127.0.0.1:0", handler) as listener:
            connecting = asyncio.ensure_future(connect(listener.contact_address))
            path = settings().directory
            while not ((host := Host._hosts.get(path)) and (host.filling or filled(host))):
                await asyncio.sleep(0.001)
            done_filling = filled(host)
            connecting.cancel()
            try:
                await connecting
                outcome = "connected"
            except asyncio.CancelledError:
                outcome = "cancelled after filling" if done_filling else "cancelled while filling"
            await until(lambda: not Host._hosts, 30)  # both ends let go of our shared memory
        return outcome

    with dask.config.set({"dask-shm.buffer-size": "256 MiB"}):
        outcome = asyncio.run(scenario())
    gc.collect()
    done(outcome=outcome, files=ours(), fds=our_fds(),
         users=sum(h.users for h in Host._hosts.values()))


def _sleep_quietly() -> None:
    """A forked child's task: a minute's sleep, with stdout and stderr let go
    (the test waits for their end as for its peer's)."""
    import time

    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(60)


async def fork_then_hang_up(args: list[str]) -> None:
    """Connect; read one message (so that what reading maps is mapped); fork
    a child as a task would (``args[1]``: ``os.fork`` or ``multiprocessing``),
    which sleeps for a minute; print ``FORKED <child pid>``; abort the comm
    without reading the next message, and end."""
    import multiprocessing

    comm = await connect(args[0])
    say("READY")
    await comm.read()
    if args[1] == "os.fork":
        child = os.fork()
        if child == 0:
            _sleep_quietly()
            os._exit(0)
    else:
        proc = multiprocessing.get_context("fork").Process(target=_sleep_quietly)
        proc.start()
        child = proc.pid
    say("FORKED", child)
    comm.abort()
    done()


def abort_handshake(args: list[str]) -> None:
    """Hold this process's host (as a live link would), then stop a listener
    while the handshake of a connection to it waits for the buffer to be
    filled (a 256 MiB buffer): the stop aborts that comm mid-handshake.
    Report the host's users before and after (only our hold may remain)
    and whether it closed under that hold."""
    import gc

    import dask

    from dask_shm.config import settings
    from dask_shm.host import Host
    from tests.conftest import until

    async def scenario() -> dict[str, Any]:
        async def never(comm: Comm) -> None:  # not reached: aborted in its handshake
            await comm.close()

        conf = settings()
        host = Host.acquire(conf.directory, conf.buffer_size)
        try:
            users = host.users
            listener = await listen("shm://127.0.0.1:0", never)
            connecting = asyncio.ensure_future(connect(listener.contact_address, timeout=2))
            await until(lambda: host.filling, 30)
            listener.stop()  # as a Server closing does (distributed core.py):
            listener.abort_handshaking_comms()  # aborts the comm waiting for the fill
            try:
                await connecting
                outcome = "connected"
            except (CommClosedError, OSError):
                outcome = "refused"
            await until(lambda: not host.filling and host.users <= users, 30)
            return {"outcome": outcome, "users before": users, "users after": host.users,
                    "closed": host.closed}
        finally:
            if not host.closed:
                host.release()

    with dask.config.set({"dask-shm.buffer-size": "256 MiB"}):
        got = asyncio.run(scenario())
    gc.collect()
    done(**got)


ROLES = {
    f.__name__.replace("_", "-"): f
    for f in (echo, client, send, write_and_end, receive, serve_send, serve_receive, hold,
              announce_size, offload, mid_stream, cancel_handshake, abort_handshake,
              fork_then_hang_up)
}

def become(uid: int | None, dumpable: bool | None) -> None:
    """Run on as ``uid`` (from root; its groups dropped too) and, if
    ``dumpable`` is given, set whether processes of our user may read our
    memory (``PR_SET_DUMPABLE``: changing uid clears it, so it is always set
    after).  Everything the roles use is imported by now: the repository and
    the interpreter's files need not be readable by ``uid``."""
    import ctypes

    if uid is not None:
        # What is imported lazily (tornado's loop glue, numpy's serializers)
        # is imported now, by a round trip over tcp://: after the change of
        # uid the interpreter's files may not be readable (a virtualenv in a
        # private temporary directory, as .ci/run makes).
        asyncio.run(_round_trip_over_tcp())
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if dumpable is not None:
        assert ctypes.CDLL(None).prctl(4, int(dumpable), 0, 0, 0) == 0  # PR_SET_DUMPABLE


async def _round_trip_over_tcp() -> None:
    async def echo(comm: Comm) -> None:
        await comm.write(await comm.read())
        await comm.close()

    async with listen("tcp://127.0.0.1:0", echo) as listener:
        comm = await connect(listener.contact_address)
        await comm.write({"x": to_serialize(payload(10**6))})
        await comm.read()
        await comm.close()


if __name__ == "__main__":
    argv = sys.argv[1:]
    uid = dumpable = None
    while argv[0].startswith("--"):  # options of the process, before its role
        option, value, *argv = argv
        if option == "--uid":
            uid = int(value)
        elif option == "--dumpable":
            dumpable = value == "1"
    become(uid, dumpable)
    role = ROLES[argv[0]]
    if asyncio.iscoroutinefunction(role):
        asyncio.run(role(argv[1:]))
    else:
        role(argv[1:])
