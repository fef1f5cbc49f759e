"""The "shm" family resolves in every process of a cluster, whatever the
scheme: over tcp:// it then declines and the next family serves.

A process that was never asked to import dask_shm does not know the name, and
distributed looks families up with ``families[name]``: a worker asked to
reply with ``["shm", "dask", "pickle"]`` failed with ``KeyError: 'shm'``.
These clusters run over tcp:// only, with real processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dask_shm.propagate import MODULE, add_worker_preload

from .conftest import dask_processes

SERIALIZERS = ["shm", "dask", "pickle"]
TIMEOUT = 60


def family_probe() -> Callable[[], tuple[bool, list[str]]]:
    """A function for ``client.run``: does this process know the "shm" family,
    and which modules has it imported?"""

    # Nested, so that it is pickled by value: workers started by the dask
    # command cannot import this test module.
    def probe() -> tuple[bool, list[str]]:
        import sys

        from distributed.protocol.serialize import families

        return "shm" in families, sorted(sys.modules)

    return probe


def check_round_trip(client: Client) -> None:
    """Scatter, compute on and gather data with the "shm" lists; every worker
    knows the family."""
    x = np.arange(100_000)
    [future] = client.scatter([x])
    assert client.submit(np.sum, future).result(timeout=TIMEOUT) == x.sum()
    np.testing.assert_array_equal(client.gather(future), x)
    known = client.run(family_probe())
    assert known and all(ok for ok, _ in known.values()), {a: ok for a, (ok, _) in known.items()}


@pytest.fixture
def preload_config() -> Iterator[None]:
    """Let a test change the worker preload configuration of this process."""
    keys = ("distributed.worker.preload", "distributed.worker.preload-argv")
    saved = {k: dask.config.get(k) for k in keys}
    yield
    dask.config.set(saved)


def test_local_cluster_with_process_workers_over_tcp() -> None:
    with (
        LocalCluster(
            protocol="tcp",
            host="127.0.0.1",
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            serializers=SERIALIZERS,
            deserializers=SERIALIZERS,
        ) as cluster,
        Client(cluster, serializers=SERIALIZERS, deserializers=SERIALIZERS) as client,
    ):
        check_round_trip(client)


def test_dask_scheduler_and_worker_commands_over_tcp(tmp_path: Path) -> None:
    """Real ``dask`` commands, configured only through the environment, with a
    worker preload of the user's own that must keep running beside ours."""
    scheduler_file = str(tmp_path / "scheduler.json")
    user_preload = tmp_path / "user_preload.py"
    user_preload.write_text('"""A user\'s own worker preload."""\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DASK_") or k == "DASK_DASK_SHM__DIRECTORY"}
    env["DASK_DISTRIBUTED__WORKER__PRELOAD"] = repr([str(user_preload)])
    with dask_processes(env) as start:
        start("scheduler", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
              "--port", "0", "--no-dashboard")
        start("worker", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
              "--nworkers", "1", "--nthreads", "1", "--no-dashboard")
        with Client(
            scheduler_file=scheduler_file,
            timeout=TIMEOUT,
            serializers=SERIALIZERS,
            deserializers=SERIALIZERS,
        ) as client:
            client.wait_for_workers(1, timeout=TIMEOUT)
            assert all(w.startswith("tcp://") for w in client.scheduler_info()["workers"])
            check_round_trip(client)
            for _, modules in client.run(family_probe()).values():
                assert "user_preload" in modules and MODULE in modules


def test_worker_preload_is_appended_to_the_users_own(preload_config: None) -> None:
    dask.config.set({
        "distributed.worker.preload": ["mine", "/path/to/other.py"],
        "distributed.worker.preload-argv": [["--mine"], []],
    })
    add_worker_preload()
    add_worker_preload()  # once only
    assert dask.config.get("distributed.worker.preload") == ["mine", "/path/to/other.py", MODULE]
    # Per-module arguments stay aligned with their modules.
    assert dask.config.get("distributed.worker.preload-argv") == [["--mine"], [], []]


def test_worker_preload_from_a_single_module_and_shared_argv(preload_config: None) -> None:
    # A string names one module; a flat argv list goes to every module alike.
    dask.config.set({
        "distributed.worker.preload": "mine",
        "distributed.worker.preload-argv": ["--verbose"],
    })
    add_worker_preload()
    assert dask.config.get("distributed.worker.preload") == ["mine", MODULE]
    assert dask.config.get("distributed.worker.preload-argv") == ["--verbose"]
