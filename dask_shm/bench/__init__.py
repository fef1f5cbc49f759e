"""``dask shm bench``: ``tcp://`` against ``shm://`` on this machine, in one run.

Both transports are measured side by side in the same run, their
repetitions interleaved, and compared by the median of paired ratios.
Sections:

  workloads  real Dask work (rechunks, matmul, many small chunks, p2p
             shuffle, futures, gather): wall time, worker CPU and loopback
             bytes
  mixed      worker->worker, scatter, gather, round after round
  transfers  one path repeated: comm one-way and cluster paths by payload
             size, with memcpy as the physical bound
  cold       a fresh cluster's first worker->worker transfer
  memory     RSS of sender and receiver across a transfer
  holders    host memory and wall time when several workers hold the same
             data (a broadcast scatter; an array read on every worker)
  joblib     joblib's loky backend against its dask backend on each cluster

The workloads section then runs again with ``dask-shm.single-copy: false``
in every process (a child process; ``--no-buffer-run`` skips it): tcp://
against shm:// through the buffer, the path of hosts that refuse single
copy.  The machine table says which path each cluster took, from
dask-shm's counters.

Writes markdown tables to stdout, and ``results.json`` (every repetition),
``benchmark.md`` and plots to ``--output``.  ``--report results.json``
rebuilds ``benchmark.md`` and the plots from a saved run, measuring nothing.
``--quick`` runs every section on small payloads in about a minute: a check
that everything works, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["main", "SECTIONS"]

#: In the order they run.  Cold samples but the last start their own
#: clusters first; the last is the first transfer of the tcp:// and shm://
#: clusters every later section shares.
SECTIONS = ("transfers", "cold", "workloads", "mixed", "memory", "holders", "joblib")

#: Defaults of a full run, and of --quick.
FULL: dict[str, Any] = {
    "reps": 5, "sizes": "1KB,64KB,1MB,16MB,128MB,400MB", "large": "400MB",
    "workload_size": "400MB", "cold_samples": 3, "cold_delay": 3.0, "pause": 0.2,
    "buffer_run": True,
}
QUICK: dict[str, Any] = {
    "reps": 2, "sizes": "1KB,1MB,16MB", "large": "16MB",
    "workload_size": "16MB", "cold_samples": 1, "cold_delay": 1.0, "pause": 0.0,
    "buffer_run": True,
}


def _size(s: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(s))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dask shm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small payloads and few repetitions (about a minute): "
                        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()
                                    if k != "buffer_run"))
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--reps", type=int,
                   help=f"measured repetitions per case and transport, after one warm-up "
                        f"(default {FULL['reps']})")
    p.add_argument("--workers", type=int, default=3,
                   help="process workers per cluster (default %(default)s)")
    p.add_argument("--sizes", help=f"payloads of the transfers section (default {FULL['sizes']})")
    p.add_argument("--large",
                   help=f"payload of the mixed, cold, memory, holders and joblib sections (default {FULL['large']})")
    p.add_argument("--workload-size",
                   help=f"about how much data each workload moves or holds (default {FULL['workload_size']})")
    p.add_argument("--cold-samples", type=int,
                   help=f"fresh cluster pairs in the cold section, the last being the one the other "
                        f"sections then use (default {FULL['cold_samples']})")
    p.add_argument("--cold-delay", type=float,
                   help=f"seconds between a cold cluster's start and its first transfer "
                        f"(default {FULL['cold_delay']})")
    p.add_argument("--pause", type=float,
                   help=f"seconds after each large repetition (default {FULL['pause']})")
    p.add_argument("--no-buffer-run", dest="buffer_run", action="store_false", default=None,
                   help="do not run the workloads a second time with dask-shm.single-copy "
                        "false (the buffer path)")
    p.add_argument("--output", default=None,
                   help="directory for results.json, benchmark.md and the plots "
                        "(default bench-results; with --report, the JSON's directory)")
    p.add_argument("--readme", metavar="README",
                   help="with --report: also rewrite the benchmark summary in this README")
    p.add_argument("--report", metavar="RESULTS_JSON",
                   help="measure nothing: regenerate benchmark.md and the plots from a saved run")
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the profile's defaults, overridden by options."""
    profile = QUICK if args.quick else FULL
    o = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in profile.items()}
    o.update(quick=args.quick, workers=args.workers, sections=args.sections.split(","))
    o["sizes"] = [_size(s) for s in str(o["sizes"]).split(",")]
    o["large"] = _size(str(o["large"]))
    o["workload_size"] = _size(str(o["workload_size"]))
    return o


class _Progress:
    """One line per step on stderr, with the time since the start."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def __call__(self, label: str) -> None:
        print(f"[{time.perf_counter() - self._t0:6.1f} s] {label}", file=sys.stderr, flush=True)


def run(o: dict[str, Any]) -> Any:
    """Measure the selected sections; returns a :class:`~dask_shm.bench.results.Run`."""
    from dask_shm.bench import holders, joblib_case, memory, mixed, transfers, workloads
    from dask_shm.bench.buffer import run_through_buffer
    from dask_shm.bench.clusters import cluster_pair, local_cluster
    from dask_shm.bench.machine import machine_info
    from dask_shm.bench.paths import PROCESS, change, process_counters, worker_counters
    from dask_shm.bench.results import Case, Run

    sections, reps, pause = set(o["sections"]), o["reps"], o["pause"]
    cases: list[Case] = []
    skipped: dict[str, str] = {}
    #: cluster label -> dask-shm's counters (see dask_shm.bench.paths)
    paths: dict[str, dict[str, int]] = {}
    progress = _Progress()
    t0 = time.perf_counter()

    if "transfers" in sections:
        progress("transfers: memcpy and comm one-way")
        cases += [transfers.memcpy(n, reps) for n in o["sizes"]]
        cases += transfers.comm_one_way(o["sizes"], reps, pause)
    cold = transfers.Cold(o["large"], o["cold_delay"]) if "cold" in sections else None
    if cold and o["cold_samples"] > 1:
        progress(f"cold: {o['cold_samples'] - 1} pair(s) of fresh clusters")
        cold.fresh_samples(o["cold_samples"] - 1, o["workers"])

    steps: list[tuple[str, Callable[[dict[str, Any]], list[Case]]]] = []
    if "transfers" in sections:
        steps.append(("transfers: cluster paths",
                      lambda c: transfers.cluster_paths(c, o["sizes"], reps, pause)))
    if "workloads" in sections:
        chosen = workloads.make_workloads(o["workload_size"], skipped)

        def run_workloads(clients: dict[str, Any]) -> list[Case]:
            progress(f"workloads: starting a second tcp:// cluster ({o['workers']} workers), "
                     "the control")
            with local_cluster("tcp", o["workers"]) as control:
                out = workloads.run_workloads(
                    {**clients, workloads.CONTROL: control}, chosen, reps,
                    lambda name: progress(f"workloads: {name}"))
                paths[workloads.CONTROL] = worker_counters(control)
                return out

        steps.append(("workloads", run_workloads))
    if "mixed" in sections:
        steps.append(("mixed sequence", lambda c: mixed.mixed(c, o["large"], reps, pause)))
    if "memory" in sections:
        steps.append(("memory", lambda c: memory.rss_across_transfers(c, o["large"], 3)))
    if "holders" in sections:
        steps.append(("data held by several workers: starting a control tcp:// cluster",
                      lambda c: holders.several_holders(c, o["large"], reps, o["workers"])))
    if "joblib" in sections:
        try:
            import joblib  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            skipped["joblib"] = f"joblib is not installed ({exc})"
        else:
            steps.append(("joblib", lambda c: joblib_case.joblib_cases(c, o["large"], reps, pause)))
    if steps or cold:
        progress(f"starting a tcp:// and an shm:// cluster ({o['workers']} workers each)")
        # Read before the clusters start, so that their handshakes (where
        # single copy is refused, if it is) count; after the sections that
        # ran their own comms and clusters here, so that theirs do not.
        here = process_counters()
        with cluster_pair(o["workers"]) as clients:
            if cold:
                progress("cold: the first transfers of these clusters")
                cold.sample(clients)
                cases += cold.cases
            for label, step in steps:
                progress(label)
                cases += step(clients)
            paths.update({label: worker_counters(c) for label, c in clients.items()})
            paths[PROCESS] = change(process_counters(), here)
            progress("closing the clusters")

    buffer_run = None
    if "workloads" in sections and o.get("buffer_run"):
        # After the clusters above closed: one run at a time on the machine.
        progress("workloads through the buffer (single-copy: false), in a child process")
        buffer_run = run_through_buffer(o, progress, skipped)

    notes = {"wall seconds": round(time.perf_counter() - t0, 1), "skipped": skipped}
    return Run(machine_info(), o, cases, notes, paths=paths, buffer_run=buffer_run)


def write(run: Any, directory: str) -> dict[str, str]:
    """Plots and ``benchmark.md`` of ``run`` into ``directory``; returns the
    plots drawn (section -> file name)."""
    from dask_shm.bench.plots import draw_all
    from dask_shm.bench.report import benchmark_md

    os.makedirs(directory, exist_ok=True)
    images = draw_all(run, directory)
    with open(os.path.join(directory, "benchmark.md"), "w") as f:
        f.write(benchmark_md(run, images))
    return images


def _plots_written(images: dict[str, str]) -> str:
    if images:
        return ", " + ", ".join(images.values())
    return " (no plots: they need matplotlib, and the workloads or transfers section)"


def main(argv: list[str] | None = None) -> int:
    """The ``dask shm bench`` command."""
    p = _parser()
    args = p.parse_args(argv)
    from dask_shm.bench import results
    from dask_shm.bench.report import headline, paths_table

    if args.report:
        try:
            saved = results.load(args.report)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"cannot read {args.report}: {exc}")
        out = args.output or os.path.dirname(os.path.abspath(args.report))
        images = write(saved, out)
        if args.readme:
            from dask_shm.bench.report import fill_readme

            with open(args.readme) as f:
                text = fill_readme(f.read(), saved)
            with open(args.readme, "w") as f:
                f.write(text)
        print(headline(saved) + "\n\n" + paths_table(saved))
        print(f"\nThe full report: {os.path.join(out, 'benchmark.md')}" + _plots_written(images))
        return 0

    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    for name in ("reps", "cold_samples", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    out = args.output or "bench-results"
    measured = run(_options(args))
    os.makedirs(out, exist_ok=True)
    results.save(os.path.join(out, "results.json"), measured)
    images = write(measured, out)
    print(headline(measured) + "\n\n" + paths_table(measured))
    print(f"\nThe full report (every table, the method): {out}/benchmark.md; "
          f"{measured.notes['wall seconds']} s; wrote {out}/results.json"
          + _plots_written(images)
          + f"; regenerate the report with: dask shm bench --report {out}/results.json")
    return 0
