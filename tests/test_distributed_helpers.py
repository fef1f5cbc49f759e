"""distributed's own test helpers over shm://: ``gen_test`` (with the
``cleanup`` fixture) and ``gen_cluster(scheduler="shm://...")``.  Projects
that test their Dask code with these helpers can adopt dask-shm: nothing of
ours trips their checks for leaked threads, processes, instances or comms
(and this suite's own leak check then finds no file, descriptor, mapping or
thread of ours)."""

from __future__ import annotations

import numpy as np
from distributed.comm import connect, listen
from distributed.comm.core import Comm
from distributed.protocol import to_serialize
from distributed.utils_test import cleanup, gen_cluster, gen_test  # noqa: F401  (cleanup: a fixture)

from dask_shm import stats
from dask_shm.comm import SHM

from .test_comm import echo_server

MB = 10**6


@gen_test()
async def test_gen_test_with_an_shm_comm(cleanup: None) -> None:
    async with listen("shm://127.0.0.1:0", echo_server) as listener:
        comm = await connect(listener.contact_address)
        assert isinstance(comm, SHM) and comm.link is not None
        for n in (10, 2 * MB, 30 * MB):  # below the threshold, above, above the buffer
            x = np.arange(n)
            await comm.write({"x": to_serialize(x)})
            np.testing.assert_array_equal((await comm.read())["x"], x)
        await comm.close()
    assert stats.snapshot()["shm-messages"] == 4


def _sent() -> int:
    return stats.snapshot().get("shm-messages", 0)


@gen_cluster(client=True, scheduler="shm://127.0.0.1", allow_unclosed=False)
async def test_gen_cluster_moves_arrays_between_workers_and_to_the_client(c, s, a, b) -> None:  # type: ignore[no-untyped-def]
    assert s.address.startswith("shm://")
    assert a.address.startswith("shm://") and b.address.startswith("shm://")
    x = c.submit(np.arange, 4 * MB, workers=[a.address])
    total = c.submit(np.sum, x, workers=[b.address])  # x moves from a to b
    assert await total == np.arange(4 * MB).sum()
    assert (await c.gather(x)).sum() == np.arange(4 * MB).sum()  # through the scheduler
    got = await c.gather(x, direct=True)
    np.testing.assert_array_equal(got, np.arange(4 * MB))
    [y] = await c.scatter([np.ones(3 * MB)], workers=[b.address])
    assert await c.submit(np.sum, y, workers=[a.address]) == 3 * MB
    assert _sent() >= 5  # one process: workers, scheduler and client
    assert any(isinstance(comm, SHM) and comm.link is not None for comm in Comm._instances)


@gen_cluster(
    client=True,
    scheduler="shm://127.0.0.1",
    allow_unclosed=False,
    config={"dask-shm.buffer-size": "16 MiB", "dask-shm.fragment-size": "1 MiB"},
)
async def test_gen_cluster_streams_frames_larger_than_the_buffer(c, s, a, b) -> None:  # type: ignore[no-untyped-def]
    x = c.submit(np.arange, 5 * MB, workers=[a.address])  # 40 MB through 16 MiB
    assert await c.submit(lambda v: int(v[-1]), x, workers=[b.address]) == 5 * MB - 1
    np.testing.assert_array_equal(await c.gather(x, direct=True), np.arange(5 * MB))
    assert stats.snapshot()["shm-bytes"] >= 80 * MB


@gen_cluster(client=True, scheduler="shm://127.0.0.1", allow_unclosed=False)
async def test_gen_cluster_with_frames_read_in_place(c, s, a, b) -> None:  # type: ignore[no-untyped-def]
    """The default where the kernel permits it: frames read in place stay
    pinned until released, and closing links hold shared memory until then;
    gen_cluster's checks, and this suite's, still find nothing left."""
    x = c.submit(np.arange, 4 * MB, workers=[a.address])
    assert await c.submit(np.sum, x, workers=[b.address]) == np.arange(4 * MB).sum()
    np.testing.assert_array_equal(await c.gather(x), np.arange(4 * MB))
    np.testing.assert_array_equal(await c.gather(x, direct=True), np.arange(4 * MB))
    assert stats.snapshot()["single-copy-messages"] >= 4
