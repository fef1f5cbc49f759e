"""``dask shm status`` and ``dask shm sweep``, run as real commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dask_shm.buffers import Buffer
from dask_shm.names import Directory

from .conftest import SHM_DIR, ours
from .test_lifetime import crash

DASK = str(Path(sys.executable).parent / "dask")


def dask_shm(*args: str) -> str:
    out = subprocess.run([DASK, "shm", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_status_and_sweep_remove_orphans_only() -> None:
    dead = crash()  # left a buffer and a probe
    d = Directory(SHM_DIR)
    live = Buffer(d, 1 << 16)
    try:
        status = json.loads(dask_shm("status", "--json"))
        by_pid: dict[int, list[dict[str, object]]] = {}
        for f in status["files"]:
            by_pid.setdefault(int(f["pid"]), []).append(f)
        assert {f["alive"] for f in by_pid[dead]} == {False}
        assert sorted(f["kind"] for f in by_pid[dead]) == ["buffer", "probe"]
        assert [f["size"] for f in by_pid[dead] if f["kind"] == "buffer"] == [1 << 20]
        me = int(live.name.split("-")[2])
        assert [(f["kind"], f["alive"]) for f in by_pid[me]] == [("buffer", True)]
        assert status["directory"] == SHM_DIR
        assert status["free"] > 0 and status["total"] >= status["free"]
        assert status["buffer-size"] == 64 << 20 and status["fragment-size"] == 8 << 20
        assert status["huge-pages"]

        table = dask_shm("status")
        assert "orphaned" in table and "alive" in table and str(dead) in table
        assert "huge pages" in table and "buffer-size 64.0 MiB" in table

        dry = dask_shm("sweep", "--dry-run")
        assert "would remove 2 orphaned file(s)" in dry
        assert len([n for n in ours() if n.startswith(f"dask-shm-{dead}-")]) == 2

        swept = dask_shm("sweep")
        assert "removed 2 orphaned file(s)" in swept
        assert ours() == [live.name]
    finally:
        live.destroy()
        d.close()
    assert "no dask-shm files" in dask_shm("status")


def test_status_tells_which_path_this_host_gives() -> None:
    """A real probe between two processes of this user: on this host (no
    Yama, or as root) single copy works; the directory is a tmpfs."""
    status = json.loads(dask_shm("status", "--json"))
    assert status["filesystem"] == "tmpfs" and status["memory-filesystem"]
    copy = status["single-copy"]
    assert copy["enabled"] and copy["declared"] == "ok" and copy["path"] == "single copy"
    assert copy["declaration"] in ("no-yama", "not-needed", "declared")
    assert "single copy: works between two unrelated processes" in dask_shm("status")


def test_status_with_single_copy_off_names_the_buffer_path() -> None:
    env = {**__import__("os").environ, "DASK_DASK_SHM__SINGLE_COPY": "false"}
    out = subprocess.run([DASK, "shm", "status", "--json"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["single-copy"]["path"] == "buffer"


def test_status_lists_the_release_sockets_of_live_links() -> None:
    """A link's release socket is no file: status finds it among the host's
    sockets, both ends named for this process (a comm to itself), and none
    once the comm has closed."""
    import asyncio
    import os

    from distributed.comm import connect, listen

    from .conftest import until
    from .test_comm import echo_server

    def mine() -> list[dict[str, object]]:  # (other processes may have links too)
        listed = json.loads(dask_shm("status", "--json"))["release-sockets"]
        return [s for s in listed if s["pid"] == os.getpid()]

    async def main() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            await comm.write({"x": 1})
            await comm.read()
            during = await asyncio.get_running_loop().run_in_executor(None, mine)
            await comm.close()
        await until(lambda: not mine())
        return during, mine()

    during, after = asyncio.run(main())
    assert len(during) == 2, during  # both ends of a comm to ourselves
    assert after == []


def test_status_ignores_a_socket_that_only_looks_like_ours() -> None:
    """Any process may bind an abstract name starting with ``dask-shm-``:
    status leaves it out rather than fail on it."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind("\0dask-shm-not-one-of-ours")
        listed = json.loads(dask_shm("status", "--json"))["release-sockets"]
    assert all("not-one-of-ours" not in entry["name"] for entry in listed), listed
