"""Which data path each cluster took, from dask-shm's own counters.

``shm://`` moves a large message one of two ways: the receiver reads it in
place out of the sender's memory (single copy), or the sender copies it into
its shared buffer and the receiver copies it out (the buffer: what hosts
that refuse ``process_vm_readv`` get, and what ``dask-shm.single-copy:
false`` forces).  Which one a run took is not something to assume from the
configuration: the kernel may refuse, a process may not have the setting.
So the benchmark reads the counters of :mod:`dask_shm.stats` (counted by the
process that sent or received) in every worker, and the change in its own
process, which runs the schedulers and the clients, and the report says
what they show.

A run's ``paths`` maps a cluster's label (``tcp``, ``shm``, ``tcp again``)
to its workers' counters summed, plus :data:`PROCESS` for this process.
The ``tcp://`` clusters' comms are not dask-shm's, so this process's
counters belong to the ``shm://`` cluster's scheduler and client: they are
added to that cluster's, never to a ``tcp://`` one's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROCESS", "process_counters", "worker_counters", "change", "cluster_counters",
           "path_of", "describe", "tcp_clusters"]

#: The key of the benchmark process's own counters in a run's ``paths``.
PROCESS = "benchmark process"
REFUSED = "single-copy-refused-"
FALLBACK = "fallback-"


def _summable(snap: dict[str, Any]) -> dict[str, int]:
    """Counters only: not the gauges (a state's change says nothing of the
    work done), nor anything that is not a number."""
    from dask_shm.metrics import GAUGES

    return {k: int(v) for k, v in snap.items()
            if k not in GAUGES and isinstance(v, (int, float)) and not isinstance(v, bool)}


def process_counters() -> dict[str, int]:
    """dask-shm's counters in this process."""
    from dask_shm import stats

    return _summable(stats.snapshot())


def worker_counters(client: Any) -> dict[str, int]:
    """dask-shm's counters summed over the workers of ``client``'s cluster."""
    from dask_shm import stats

    total: dict[str, int] = {}
    for snap in client.run(stats.snapshot).values():
        for k, v in _summable(snap).items():
            total[k] = total.get(k, 0) + v
    return total


def change(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What was counted between two readings (counters that did not move left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def cluster_counters(paths: dict[str, dict[str, int]], label: str) -> dict[str, int]:
    """The counters of cluster ``label``: its workers', plus this process's
    for the ``shm://`` cluster (see the module's docstring)."""
    parts = [paths.get(label) or {}]
    if label == "shm":
        parts.append(paths.get(PROCESS) or {})
    total: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def path_of(counters: dict[str, int]) -> dict[str, Any]:
    """The path the counters show: messages read in place, messages through
    the buffer, messages below the threshold (sent over TCP), frames handed
    over within a process, and why single copy was refused or a message fell
    back to TCP, by reason."""
    single = counters.get("single-copy-messages", 0)
    shm = counters.get("shm-messages", 0)
    return {
        "single copy": single,
        # shm-messages counts both shared-memory paths; single copy is a part of it
        "buffer": shm - single,
        "below threshold": counters.get("below-threshold", 0) + counters.get("tcp-messages", 0),
        # a reader in the sender's process taking the frames over (no copy at all)
        "handed over": counters.get("handoff-frames", 0),
        "refused": {k[len(REFUSED):]: v for k, v in sorted(counters.items()) if k.startswith(REFUSED)},
        "fallback": {k[len(FALLBACK):]: v for k, v in sorted(counters.items())
                     if k.startswith(FALLBACK)},
    }


def _reasons(by: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in by.items() if v) or "never"


def describe(counters: dict[str, int] | None, expect: str | None = None) -> str:
    """One line for the machine table: which path, then the counts behind
    it.  ``expect`` (``"buffer"``): say so loudly if the counters show
    another path, since the table would then be mislabelled."""
    if counters is None:
        return "-"
    p = path_of(counters)
    single, buffer = p["single copy"], p["buffer"]
    verdict = ("single copy and buffer" if single and buffer else "single copy" if single
               else "buffer" if buffer else "no message through shared memory")
    if expect == "buffer" and single:
        verdict = (f"NOT only the buffer: {single} messages were read in place, so "
                   "single-copy: false did not reach every process")
    text = (f"**{verdict}**: {single} messages read in place (single copy), {buffer} through "
            f"the buffer, {p['below threshold']} below the threshold (over TCP); single copy "
            f"refused: {_reasons(p['refused'])}")
    if p["handed over"]:
        text += f"; {p['handed over']} frames handed over within a process"
    if any(p["fallback"].values()):
        text += f"; fell back to TCP: {_reasons(p['fallback'])}"
    return text


def tcp_clusters(paths: dict[str, dict[str, int]], labels: list[str]) -> str:
    """The ``tcp://`` clusters' line: they should show no shared memory at all."""
    present = [label for label in labels if label in paths]
    if not present:
        return "-"
    shm = sum(path_of(paths[label])["single copy"] + path_of(paths[label])["buffer"]
              for label in present)
    names = " and ".join(f"`{label}`" for label in present)
    return (f"{names}: TCP only" if not shm
            else f"{names}: {shm} messages through shared memory (unexpected on tcp://)")
