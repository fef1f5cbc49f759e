"""The records of one benchmark run, and their JSON form.

A run is a list of :class:`Case` objects plus the machine and the options.
A case keeps every repetition of every transport (the warm-up apart), so
the report can be rebuilt from the JSON alone and any statistic recomputed
later.  Metrics are named: ``wall`` and ``cpu`` in seconds, ``lo`` in bytes
received on the loopback interface; sections may add their own.

Keys added since format 1 began (``paths``, ``buffer_run``) are optional:
a results.json written before them still loads, without them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dask_shm.bench.paired import median, paired_ratio, ratio_of_medians

__all__ = ["Case", "Run", "save", "load", "FORMAT"]

#: Bumped when the JSON layout changes incompatibly.
FORMAT = 1


@dataclass
class Case:
    """One measured case: a path or workload, a payload, several transports.

    ``samples[transport][metric]`` holds the measured repetitions in the
    order they ran; ``warmup[transport][metric]`` the discarded first one.
    ``paired``: the transports' repetitions were interleaved one for one,
    so ratios are medians of per-repetition ratios.
    """

    section: str
    name: str
    nbytes: int
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    warmup: dict[str, dict[str, float]] = field(default_factory=dict)
    paired: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, transport: str, metrics: dict[str, float], warmup: bool = False) -> None:
        """Record one repetition."""
        if warmup:
            self.warmup[transport] = dict(metrics)
            return
        per = self.samples.setdefault(transport, {})
        for k, v in metrics.items():
            per.setdefault(k, []).append(v)

    def values(self, transport: str, metric: str = "wall") -> list[float]:
        return self.samples.get(transport, {}).get(metric, [])

    def median(self, transport: str, metric: str = "wall") -> float | None:
        return median(self.values(transport, metric))

    def ratio(self, num: str, den: str, metric: str = "wall") -> float | None:
        """``num`` over ``den``: the median of paired ratios when the case was
        interleaved, else the ratio of the medians."""
        a, b = self.values(num, metric), self.values(den, metric)
        if self.paired:
            return paired_ratio(a, b)
        return ratio_of_medians(a, b)

    @property
    def transports(self) -> list[str]:
        return list(self.samples)


@dataclass
class Run:
    """Everything a report needs: machine, options, cases and notes.

    ``paths``: dask-shm's counters per cluster, which say which data path
    each took (see :mod:`dask_shm.bench.paths`).  ``buffer_run``: the
    workloads measured again with ``dask-shm.single-copy: false`` in every
    process (see :mod:`dask_shm.bench.buffer`), None if not run.
    """

    machine: dict[str, Any]
    options: dict[str, Any]
    cases: list[Case]
    notes: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT
    paths: dict[str, dict[str, int]] = field(default_factory=dict)
    buffer_run: Run | None = None

    def section(self, name: str) -> list[Case]:
        return [c for c in self.cases if c.section == name]

    def find(self, section: str, name: str, nbytes: int | None = None) -> Case | None:
        for c in self.cases:
            if c.section == section and c.name == name and (nbytes is None or c.nbytes == nbytes):
                return c
        return None


def save(path: str, run: Run) -> None:
    with open(path, "w") as f:
        json.dump(asdict(run), f, indent=1)
        f.write("\n")


def _run(doc: dict[str, Any], path: str) -> Run:
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: results format {doc.get('format')!r}, this version reads {FORMAT}")
    cases = [Case(**c) for c in doc["cases"]]
    nested = doc.get("buffer_run")
    return Run(doc["machine"], doc["options"], cases, doc.get("notes", {}), doc["format"],
               doc.get("paths") or {}, _run(nested, path) if nested else None)


def load(path: str) -> Run:
    with open(path) as f:
        return _run(json.load(f), path)
