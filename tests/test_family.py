"""The ``"shm"`` serialization family: pickle protocol 5 for hops that
negotiated shared memory, a clean decline everywhere else."""

from __future__ import annotations

import asyncio
import pickle
import re
from collections.abc import Iterator
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from distributed.comm import connect, listen
from distributed.comm.core import Comm, CommClosedError
from distributed.protocol import Serialized, deserialize, serialize, to_serialize

from dask_shm import stats

from .conftest import first_read_error
from .test_cluster import private, where
from .test_comm import mapping_of, run

FAMILY = ["shm", "dask", "pickle"]
MB = 10**6


class Blob:
    """An arbitrary user object whose large buffer pickles out of band."""

    def __init__(self, data: bytearray, label: str) -> None:
        self.data = data
        self.label = label

    def __reduce_ex__(self, protocol: int) -> Any:
        if protocol >= 5:
            return Blob, (pickle.PickleBuffer(self.data), self.label)
        return Blob, (self.data, self.label)


def payloads() -> dict[str, Any]:
    readonly = np.arange(MB)
    readonly.flags.writeable = False
    return {
        "array": np.arange(2 * MB),
        "fortran": np.asfortranarray(np.ones((1000, 600))),
        "readonly": readonly,
        "frame": pd.DataFrame({"a": np.arange(MB), "b": np.ones(MB)}),
        "nested": {"k": [np.zeros(MB), (np.ones(10), "small")], "n": 3},
        "blob": Blob(bytearray(b"z" * (3 * MB)), "mine"),
        "small": {"just": "metadata", "xs": list(range(10))},
    }


def check_equal(name: str, got: Any, want: Any) -> None:
    if name == "frame":
        pd.testing.assert_frame_equal(got, want)
    elif name == "nested":
        np.testing.assert_array_equal(got["k"][0], want["k"][0])
        np.testing.assert_array_equal(got["k"][1][0], want["k"][1][0])
        assert got["k"][1][1] == "small" and got["n"] == 3
    elif name == "blob":
        assert got.data == want.data and got.label == "mine"
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable == want.flags.writeable
        assert got.flags.f_contiguous == want.flags.f_contiguous
    else:
        assert got == want


async def family_echo(scheme: str, deserialize: bool = True) -> tuple[Any, Any]:
    """A listener that sends back what it reads, with the family first."""

    async def handler(comm: Comm) -> None:
        try:
            while True:
                msg = await comm.read(deserializers=FAMILY)
                await comm.write({"x": to_serialize(msg["x"])}, serializers=FAMILY)
        except CommClosedError:
            pass
        finally:
            await comm.close()

    listener = listen(f"{scheme}://127.0.0.1:0", handler, deserialize=deserialize)
    await listener.start()
    comm = await connect(listener.contact_address)
    return listener, comm


@pytest.mark.parametrize("scheme", ["tcp", "shm"])
def test_round_trip_of_every_kind_of_object(scheme: str, shm_config: None) -> None:
    """Same client code on both schemes: the family on shm://, the next
    family on tcp://; what arrives is equal, with the same flags, in memory
    of the receiver's own."""

    async def main() -> None:
        listener, comm = await family_echo(scheme)
        try:
            for name, obj in payloads().items():
                await comm.write({"x": to_serialize(obj)}, serializers=FAMILY)
                got = (await comm.read(deserializers=FAMILY))["x"]
                check_equal(name, got, obj)
                if isinstance(got, np.ndarray):
                    path = mapping_of(got.__array_interface__["data"][0])
                    assert path is None or "dask-shm-" not in path, name
                del got
        finally:
            await comm.close()
            listener.stop()

    run(main())
    counts = stats.snapshot()
    if scheme == "shm":
        assert counts.get("family-messages", 0) >= 2 * len(payloads()), counts
        assert counts.get("shm-messages", 0) >= 2 * (len(payloads()) - 1), counts
    else:
        assert counts.get("family-messages", 0) == 0
        assert counts.get("family-declined-not-negotiated", 0) > 0


def test_declines_without_context() -> None:
    """Spilling and direct ``serialize()`` calls get the next family."""
    x = np.arange(2 * MB)
    header, frames = serialize(x, serializers=FAMILY)
    assert header["serializer"] == "dask"
    np.testing.assert_array_equal(deserialize(header, frames), x)
    assert stats.snapshot()["family-declined-no-context"] == 1
    with pytest.raises(TypeError, match="Could not serialize"):
        serialize(x, serializers=["shm"], on_error="raise")


def test_declines_for_a_relay(shm_config: None) -> None:
    """A peer that does not deserialize (the scheduler) forwards the frames
    to a process that may not have dask-shm at all."""

    async def main() -> None:
        got: asyncio.Queue[Any] = asyncio.Queue()

        async def handler(comm: Comm) -> None:
            try:
                await got.put(await comm.read())
            finally:
                await comm.close()

        async with listen("shm://127.0.0.1:0", handler, deserialize=False) as listener:
            comm = await connect(listener.contact_address)
            await comm.write({"x": to_serialize(np.arange(MB))}, serializers=FAMILY)
            msg = await asyncio.wait_for(got.get(), 10)
            await comm.close()
        assert isinstance(msg["x"], Serialized)
        assert msg["x"].header["serializer"] == "dask"

    run(main())
    assert stats.snapshot()["family-declined-relay"] == 1
    assert stats.snapshot()["shm-messages"] == 1  # the message itself still went through


def bad_header(writeable: Any) -> Serialized:
    """A message the "shm" family would decode, with a header that does not
    match its frames; large enough to travel through shared memory."""
    header = {"serializer": "shm", "writeable": writeable}
    return Serialized(header, [pickle.dumps(None), b"x" * (2 * MB)])


@pytest.mark.parametrize(
    "serialized, problem",
    [
        (bad_header(None), "family header lists None buffers, but 1 arrived"),
        (bad_header([True, True]), r"family header lists .True, True. buffers, but 1 arrived"),
        (bad_header("yes"), "family header lists 'yes' buffers"),
    ],
    ids=["no-flags", "too-many-flags", "not-a-list"],
)
def test_bad_header_closes_comm_with_clear_error(serialized: Serialized, problem: str) -> None:
    with dask.config.set({"dask-shm.threshold": "64 KiB"}):
        err = run(first_read_error(lambda comm: comm.write({"x": serialized})))
    assert isinstance(err, CommClosedError), repr(err)
    assert re.search(problem, str(err)), str(err)


@pytest.fixture
def family_cluster(shm_config: None) -> Iterator[tuple[LocalCluster, Client]]:
    with LocalCluster(
        protocol="shm",
        n_workers=2,
        threads_per_worker=1,
        dashboard_address=":0",
        serializers=FAMILY,
        deserializers=FAMILY,
    ) as lc, Client(lc, serializers=FAMILY, deserializers=FAMILY) as client:
        yield lc, client


def make_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(n), "b": np.arange(n) * 0.5})


def frame_where(df: pd.DataFrame) -> dict[str, Any]:
    return where(df["a"].to_numpy())


def family_count() -> int:
    return stats.snapshot().get("family-messages", 0)


def test_cluster_keyword_arguments(family_cluster: tuple[LocalCluster, Client]) -> None:
    """LocalCluster(serializers=...) reaches the workers: worker-to-worker
    dependencies, direct scatter and gather use the family; scatter through
    the scheduler is declined at the relay hop and still right."""
    lc, client = family_cluster
    a, b = sorted(client.scheduler_info()["workers"])
    n = 4 * MB
    df = client.submit(make_frame, n, workers=[a], pure=False)
    info = client.submit(frame_where, df, workers=[b]).result()
    assert info["ok"] and private(info), info
    assert client.run(family_count, workers=[a])[a] >= 1
    x = np.arange(n)
    (direct,) = client.scatter([x], workers=[a], direct=True, hash=False)
    assert client.submit(where, direct, workers=[a]).result()["ok"]
    back = client.gather(direct, direct=True)
    np.testing.assert_array_equal(back, x)
    (relayed,) = client.scatter([x], workers=[b], direct=False, hash=False)
    assert client.submit(where, relayed, workers=[b]).result()["ok"]
    np.testing.assert_array_equal(client.gather(relayed, direct=False), x)
    # This process is the client and (LocalCluster) the scheduler.
    assert family_count() > 0
    assert stats.snapshot().get("family-declined-relay", 0) > 0
    del df, direct, relayed, back


def test_config_key_turns_the_family_on_for_shm_comms(shm_config: None) -> None:
    """``dask-shm.serializers`` serves writes that name no serializers."""

    async def main() -> None:
        listener, comm = await family_echo("shm")
        try:
            blob = Blob(bytearray(2 * MB), "cfg")
            await comm.write({"x": to_serialize(blob)})
            got = (await comm.read())["x"]
            assert got.label == "cfg" and got.data == blob.data
        finally:
            await comm.close()
            listener.stop()

    with dask.config.set({"dask-shm.serializers": FAMILY}):
        run(main())
    assert stats.snapshot()["family-messages"] >= 2
