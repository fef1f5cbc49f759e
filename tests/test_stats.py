"""Counters: per process, readable from a worker with ``client.run`` and on
Dask's Prometheus endpoints."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dask_shm import stats

from .test_cluster import where

pytest.importorskip("prometheus_client")


def metrics_of(host: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("dask_shm_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.buffer
def test_counters_from_client_run_and_prometheus(shm_config: None) -> None:
    with LocalCluster(
        protocol="shm", n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as lc, Client(lc) as client:
        info = client.scheduler_info()["workers"]
        a, b = sorted(info)
        x = client.submit(np.arange, 4 * 10**6, workers=[a], pure=False)
        assert client.submit(where, x, workers=[b]).result()["ok"]
        small = client.submit(len, x, workers=[b]).result()
        assert small == 4 * 10**6
        counts = client.run(stats.snapshot)
        assert counts[a]["shm-messages"] >= 1 and counts[a]["shm-bytes"] >= 32 * 10**6
        assert counts[a]["buffer-bytes"] == 64 << 20  # the default buffer-size
        assert counts[b]["peer-buffers"] >= 1
        assert all(c["handshake-shm"] >= 1 for c in counts.values())

        port = info[a]["services"]["dashboard"]
        exported = metrics_of("127.0.0.1", port)
        assert exported["dask_shm_shm_messages_total"] >= 1, exported
        assert exported["dask_shm_shm_bytes_total"] >= 32 * 10**6
        assert exported["dask_shm_buffer_bytes"] == 64 << 20
        assert "dask_shm_buffer_in_flight" in exported and "dask_shm_peer_buffers" in exported
        # The scheduler's endpoint too (it runs in this process here).
        sched = metrics_of("127.0.0.1", client.scheduler_info()["services"]["dashboard"])
        assert "dask_shm_handshake_shm_total" in sched
        del x


def test_gauges_are_zero_once_the_last_comm_is_gone() -> None:
    snap = stats.snapshot()
    assert (snap["buffer-bytes"], snap["buffer-in-flight"], snap["peer-buffers"]) == (0, 0, 0)


def test_tally_counts_live_and_after_its_owner_dies() -> None:
    stats.reset()
    t = stats.Tally("test-tally")
    t.n += 3
    assert stats.snapshot()["test-tally"] == 3
    del t  # folded into the totals
    assert stats.snapshot()["test-tally"] == 3
    u = stats.Tally("test-tally")
    u.n += 1
    assert stats.snapshot()["test-tally"] == 4
    stats.reset()
    assert "test-tally" not in stats.snapshot()
    u.n += 1
    assert stats.snapshot()["test-tally"] == 1
