"""``dask shm bench``: ``tcp://`` against ``shm://`` on this machine, in one run.

Every case is measured for each transport in the same run, beside two
bounds: one memcpy of the same bytes (the physical limit) and ``inproc://``
(threads in one process: no IPC at all).  Ratios are computed from those
medians (for cases whose repetitions interleave, comm one-way, the
dask.array workload and cold, the median of the per-repetition ratios); the
first repetition of each case is reported apart as "cold" and compared cold
against cold.  Sections: comm one-way, LocalCluster paths (worker-to-worker,
scatter/gather direct and through the scheduler) with an end-to-end
dask.array workload (one cluster per transport, all at once), the first
transfers of fresh clusters (cold: nothing pooled anywhere), the original
proposal's workload (400 MB ``np.arange`` from a child over
``multiprocessing.Pipe`` + pickle), RSS after a transfer, and joblib's
backends.  Output: markdown tables on stdout, ``results.json`` and
``throughput.png`` in ``--output``.  Timings are evidence here; tests never
assert them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["main"]

DEFAULT_SIZES = "1KB,16KB,64KB,1MB,16MB,128MB,400MB"
DEFAULT_CLUSTER_SIZES = "16MB,128MB,400MB"
SECTIONS = ("comm", "cluster", "cold", "proposal", "memory", "joblib")


def _parse_size(s: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(s))


class _Progress:
    """A tqdm bar when tqdm is installed, else one line per step on stderr."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar: Any = tqdm(total=total, unit="step", file=sys.stderr, leave=False)
        except ImportError:
            self._bar = None
        self._done, self._total = 0, total

    def step(self, label: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(label)
            self._bar.update(1)
        else:
            print(f"  [{self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    from dask_shm import stats
    from dask_shm.bench import cases, joblib_case
    from dask_shm.bench.report import fmt_size, summarize

    sections = set(args.sections.split(","))
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    csizes = [_parse_size(s) for s in args.cluster_sizes.split(",")]
    reps = args.reps + 1  # + the cold one
    results: list[Any] = []
    notes: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], None]]] = []
    substeps = 0  # progress steps inside cluster steps

    if "comm" in sections:
        for n in sizes:
            def comm_step(n: int = n) -> None:
                results.append(summarize("comm one-way", "memcpy", "memcpy", n, cases.memcpy(n, args.reps), cold=False))
                times = cases.comm_one_way(["inproc", "tcp", "shm"], [n], reps, args.pause, lambda: None)
                for (scheme, size), t in times.items():
                    results.append(summarize("comm one-way", "comm one-way", scheme, size, t, paired=True))
            steps.append((f"comm one-way {n} B", comm_step))

    schemes = ["inproc", "tcp", "shm"]
    for scheme in schemes:
        cluster_work: list[tuple[str, Callable[[Any], None]]] = []
        if "cluster" in sections:
            for n in csizes:
                def w2w(client: Any, n: int = n, scheme: str = scheme) -> None:
                    t = cases.worker_to_worker(client, n, reps, args.pause)
                    results.append(summarize("cluster", "worker->worker", scheme, n, t))
                    for direct in (False, True):
                        label = "direct" if direct else "via scheduler"
                        s, g = cases.scatter_gather(client, n, reps, args.pause, direct)
                        results.append(summarize("cluster", f"scatter {label}", scheme, n, s))
                        results.append(summarize("cluster", f"gather {label}", scheme, n, g))
                cluster_work.append((f"cluster paths {fmt_size(n)}", w2w))

        if "proposal" in sections and scheme != "inproc":
            def proposal(client: Any, scheme: str = scheme) -> None:
                n = args.proposal_size // 8
                t = cases.gather_arange(client, n, reps, args.pause)
                results.append(summarize("proposal", "np.arange child->parent", scheme, n * 8, t))
            cluster_work.append(("proposal workload", proposal))
        if "memory" in sections and scheme != "inproc":
            def memory(client: Any, scheme: str = scheme) -> None:
                notes[f"rss {scheme}"] = cases.rss_after_transfer(client, max(csizes))
            cluster_work.append(("RSS after a transfer", memory))
        if not cluster_work:
            continue
        substeps += len(cluster_work)

        def cluster_step(work: list[tuple[str, Callable[[Any], None]]] = cluster_work,
                         scheme: str = scheme) -> None:
            with cases.local_cluster(scheme, args.workers) as client:
                for label, fn in work:
                    progress.step(f"{scheme}: {label}")
                    fn(client)
                if scheme == "shm":
                    notes["worker stats shm"] = client.run(stats.snapshot)
        steps.append((f"start {scheme} cluster", cluster_step))

    if "cluster" in sections:
        def array() -> None:
            times = cases.dask_array_workload(schemes, args.array_n, reps, args.pause, args.workers)
            nbytes = args.array_n**2 * 8
            for scheme, t in times.items():
                results.append(summarize("end-to-end", "dask.array rechunk", scheme, nbytes, t,
                                         paired=scheme != "inproc"))
        steps.append(("dask.array workload (all transports at once)", array))

    if "cold" in sections:
        def cold() -> None:
            n = max(csizes)
            times = cases.cold_transfers(["tcp", "shm"], n, args.cold_samples, args.workers)
            for (scheme, path), t in times.items():
                results.append(summarize("cold", f"first {path}", scheme, n, t, cold=False,
                                         paired=True))
        steps.append(("cold: fresh clusters", cold))

    if "proposal" in sections:
        def pipe() -> None:
            n = args.proposal_size // 8
            t = cases.pipe_pickle(n, reps, args.pause)
            results.append(summarize("proposal", "np.arange child->parent", "pipe+pickle", n * 8, t))
        steps.append(("proposal: Pipe + pickle", pipe))

    if "joblib" in sections:
        import numpy as np

        n = args.joblib_size // 8
        for label, backend, config, jscheme in joblib_case.BACKENDS:
            def jl(label: str = label, backend: str = backend, config: dict[str, Any] = config,
                   scheme: str | None = jscheme) -> None:
                import contextlib

                ctx = cases.local_cluster(scheme, args.workers) if scheme else contextlib.nullcontext()
                with ctx:
                    t = joblib_case.joblib_calls(backend, config, joblib_case.make, n, reps, args.pause)
                    results.append(summarize("joblib", "result", label, n * 8, t))
                    arg = np.arange(n)
                    t = joblib_case.joblib_calls(backend, config, joblib_case.consume, arg, reps, args.pause)
                    results.append(summarize("joblib", "argument", label, n * 8, t))
            steps.append((f"joblib {label}", jl))

    progress = _Progress(len(steps) + substeps)
    try:
        for label, fn in steps:
            progress.step(label)
            fn()
    finally:
        progress.close()
    return results, notes


def render(results: list[Any], notes: dict[str, Any]) -> str:
    from dask_shm.bench.report import fmt_size, table

    out = ["## tcp:// against shm://, with memcpy and inproc:// (threads) as bounds", ""]
    out.append(table([r for r in results if r.section != "joblib" and r.section != "proposal"],
                     "tcp", "shm", ("memcpy", "inproc")))
    prop = [r for r in results if r.section == "proposal"]
    if prop:
        out += ["", "## The proposal's workload (np.arange child -> parent)", ""]
        out.append(table(prop, "pipe+pickle", "shm", ("tcp",)))
    jl = [r for r in results if r.section == "joblib"]
    if jl:
        labels = list(dict.fromkeys(r.transport for r in jl))
        out += ["", "## joblib backends, one call (median ms; cold in parentheses)", ""]
        out.append("| case | " + " | ".join(labels) + " | loky/shm | dask tcp/shm |")
        out.append("|" + "---|" * (len(labels) + 3))
        for path in dict.fromkeys(r.path for r in jl):
            row = {r.transport: r for r in jl if r.path == path}
            cells = [f"{row[t].median * 1e3:.0f} ({(row[t].cold or 0) * 1e3:.0f})" if t in row else "-"
                     for t in labels]
            shm = row.get("dask shm://")
            loky = row.get("loky (auto-memmap)")
            tcp = row.get("dask tcp://")
            r1 = f"{loky.median / shm.median:.2f}" if loky and shm else "-"
            r2 = f"{tcp.median / shm.median:.2f}" if tcp and shm else "-"
            out.append(f"| {path} ({fmt_size(next(iter(row.values())).nbytes)}) | " + " | ".join(cells) + f" | {r1} | {r2} |")
    rss = {k: v for k, v in notes.items() if k.startswith("rss")}
    if rss:
        out += ["", "## RSS change across one worker-to-worker transfer, as a fraction of the payload "
                "(pools' idle segments released before each reading; active memory manager paused)", ""]
        out.append("| transport | sender | receiver |")
        out.append("|---|---|---|")
        for k, v in rss.items():
            out.append(f"| {k.split()[1]} | {v['sender']:+.2f} | {v['receiver']:+.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dask shm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comm payloads (default %(default)s)")
    p.add_argument("--cluster-sizes", default=DEFAULT_CLUSTER_SIZES,
                   help="LocalCluster payloads (default %(default)s)")
    p.add_argument("--reps", type=int, default=7, help="warm repetitions per case (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default %(default)s)")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds between large repetitions (default %(default)s)")
    p.add_argument("--cold-samples", type=int, default=6,
                   help="fresh clusters per transport for the cold section (default %(default)s)")
    p.add_argument("--array-n", type=int, default=8000,
                   help="side of the dask.array workload's float64 matrix (default %(default)s)")
    p.add_argument("--proposal-size", type=_parse_size, default="400MB",
                   help="the proposal workload's array (default %(default)s)")
    p.add_argument("--joblib-size", type=_parse_size, default="400MB",
                   help="joblib's argument and result (default %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--output", default="bench-results",
                   help="directory for results.json and throughput.png (default %(default)s)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    from dask_shm.bench.report import plot, write_json

    t0 = time.perf_counter()
    results, notes = run(args)
    notes["wall seconds"] = round(time.perf_counter() - t0, 1)
    print(render(results, notes))
    os.makedirs(args.output, exist_ok=True)
    write_json(os.path.join(args.output, "results.json"), vars(args), results, notes)
    png = os.path.join(args.output, "throughput.png")
    drawn = plot(png, results, "comm one-way", ["memcpy", "inproc", "tcp", "shm"])
    print(f"\nwall time {notes['wall seconds']} s; results in {args.output}/results.json"
          + (f" and {png}" if drawn else
             " (no plot: it needs matplotlib and the comm section)"))
    return 0
