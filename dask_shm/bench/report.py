"""Markdown from a run's records: the tables, and ``benchmark.md``.

Everything here reads a :class:`~dask_shm.bench.results.Run` and nothing
else, so ``dask shm bench --report results.json`` rebuilds the report of any
earlier run without measuring.  Ratios are oriented so that the reader
never has to flip them: wall time tcp/shm (above 1: shm is faster), CPU and
loopback bytes shm/tcp (below 1: shm is cheaper).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dask_shm.bench.buffer import SKIPPED as BUFFER_SKIPPED
from dask_shm.bench.mixed import STEPS
from dask_shm.bench.paired import iqr, median
from dask_shm.bench.paths import cluster_counters, describe, tcp_clusters
from dask_shm.bench.results import Case, Run
from dask_shm.bench.workloads import CONTROL, NO_TRANSFER

__all__ = [
    "fmt_size", "tables", "paths_table", "benchmark_md", "headline", "readme_summary",
    "README_MARKERS",
]

MB = 10**6


# -- formatting ------------------------------------------------------------------


def fmt_size(n: float | None) -> str:
    """Decimal units, as the payloads are chosen: 400 MB = 400 * 10**6 bytes."""
    if n is None:
        return "-"
    for unit, k in (("GB", 10**9), ("MB", MB), ("KB", 1000)):
        if abs(n) >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def _ms(t: float | None) -> str:
    if t is None or math.isnan(t):
        return "-"
    ms = t * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _s(t: float | None) -> str:
    return "-" if t is None else f"{t:.3g}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _pct(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r * 100:.1f}%" if r < 0.1 else f"{r * 100:.0f}%"


def _frac(r: float | None) -> str:
    return "-" if r is None else f"{r:+.2f}"


#: Columns of transports in this order; others after them.
_ORDER = ("loky", "tcp", "dask tcp", "shm", "dask shm")


def _ordered(transports: list[str]) -> list[str]:
    return sorted(transports, key=lambda t: _ORDER.index(t) if t in _ORDER else len(_ORDER))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)])


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- one table per section ---------------------------------------------------------


def workloads_table(cases: list[Case]) -> str:
    head = ["workload", "data", "wall tcp/shm", "worker CPU shm/tcp", "all CPU shm/tcp",
            "loopback shm/tcp", "noise: wall / worker CPU, tcp against tcp again",
            "wall tcp (s)", "wall shm (s)", "CPU tcp (s)", "CPU shm (s)",
            "loopback tcp", "loopback shm"]
    rows = [[
        c.name, fmt_size(c.nbytes),
        _x(c.ratio("tcp", "shm")), _x(c.ratio("shm", "tcp", "cpu")),
        _x(c.ratio("shm", "tcp", "cpu_all")), _pct(c.ratio("shm", "tcp", "lo")),
        f"{_x(c.ratio('tcp', CONTROL))} / {_x(c.ratio(CONTROL, 'tcp', 'cpu'))}"
        if c.values(CONTROL) else "-",
        _s(c.median("tcp")), _s(c.median("shm")), _s(c.median("tcp", "cpu")), _s(c.median("shm", "cpu")),
        fmt_size(c.median("tcp", "lo")), fmt_size(c.median("shm", "lo")),
    ] for c in cases]
    return _table(head, rows)


def ceiling_table(cases: list[Case]) -> str:
    """Workloads also run with no transfer (see ``dask_shm.bench.workloads``):
    how much of what a transport could gain shm:// gets.  Empty if none."""
    rows = [[
        c.name,
        _x(c.ratio("tcp", "shm")), _x(c.ratio("tcp", NO_TRANSFER)),
        _x(c.ratio("shm", "tcp", "cpu")), _x(c.ratio(NO_TRANSFER, "tcp", "cpu")),
        _s(c.median(NO_TRANSFER)), _s(c.median(NO_TRANSFER, "cpu")),
    ] for c in cases if c.values(NO_TRANSFER)]
    if not rows:
        return ""
    head = ["workload", "wall tcp/shm", "wall tcp/no transfer (ceiling)", "worker CPU shm/tcp",
            "worker CPU no transfer/tcp (floor)", "wall no transfer (s)", "CPU no transfer (s)"]
    return ("The same work with no data crossing between processes, on the tcp:// cluster, "
            "after both transports in each repetition: what a transport that cost nothing would "
            "give.\n\n"
            + _table(head, rows))


def counters_table(cases: list[Case]) -> str:
    rows = []
    for c in cases:
        counters = c.extra.get("shm counters") or {}
        text = ", ".join(f"{k} {fmt_size(v) if k.endswith('bytes') else v}"
                         for k, v in sorted(counters.items())) or "none"
        rows.append([c.name, text])
    return _table(["workload", "change in dask-shm's counters on the shm cluster's workers "
                               "(all repetitions, warm-up included)"], rows)


def buffer_workloads(run: Run) -> str:
    """The workloads of the buffer run, as the main run's are shown; for a
    run without one (an older results.json, ``--no-buffer-run``), why not."""
    if run.buffer_run is None:
        why = (run.notes.get("skipped") or {}).get(
            BUFFER_SKIPPED, "this results.json has none (it predates the buffer run, or the run "
            "had --no-buffer-run)")
        return f"Not measured: {why}."
    cases = run.buffer_run.section("workloads")
    return workloads_table(cases) + "\n\n" + counters_table(cases)


def _memcpy(run: Run, section: str, nbytes: int) -> float | None:
    c = run.find(section, "memcpy", nbytes)
    return c.median("memcpy") if c else None


def transfers_table(run: Run) -> str:
    head = ["path", "size", "tcp ms", "shm ms", "tcp/shm", "IQR tcp / shm (ms)", "memcpy ms",
            "shm/memcpy", "warm-up tcp / shm (ms)"]
    cases = [c for c in run.section("transfers") if c.name != "memcpy"]
    paths = list(dict.fromkeys(c.name for c in cases))
    rows = []
    for c in sorted(cases, key=lambda c: (paths.index(c.name), c.nbytes)):
        mc = _memcpy(run, "transfers", c.nbytes)
        rows.append([
            c.name, fmt_size(c.nbytes), _ms(c.median("tcp")), _ms(c.median("shm")),
            _x(c.ratio("tcp", "shm")), f"{_ms(iqr(c.values('tcp')))} / {_ms(iqr(c.values('shm')))}",
            _ms(mc), _x(_over(c.median("shm"), mc)),
            f"{_ms(c.warmup.get('tcp', {}).get('wall'))} / {_ms(c.warmup.get('shm', {}).get('wall'))}",
        ])
    return _table(head, rows)


def mixed_table(run: Run) -> str:
    head = ["step", "size", "tcp ms", "shm ms", "tcp/shm", "memcpy ms", "tcp/memcpy", "shm/memcpy"]
    rows = []
    for c in run.section("mixed"):
        if c.name == "memcpy":
            continue
        mc = _memcpy(run, "mixed", c.nbytes)
        rows.append([c.name, fmt_size(c.nbytes), _ms(c.median("tcp")), _ms(c.median("shm")),
                     _x(c.ratio("tcp", "shm")), _ms(mc), _x(_over(c.median("tcp"), mc)),
                     _x(_over(c.median("shm"), mc))])
    return _table(head, rows)


def cold_table(cases: list[Case]) -> str:
    head = ["transfer", "size", "tcp ms", "shm ms", "tcp/shm", "samples (tcp; shm, ms)"]
    rows = [[c.name, fmt_size(c.nbytes), _ms(c.median("tcp")), _ms(c.median("shm")),
             _x(c.ratio("tcp", "shm")),
             ", ".join(_ms(t) for t in c.values("tcp")) + "; " + ", ".join(_ms(t) for t in c.values("shm"))]
            for c in cases]
    return _table(head, rows)


def memory_table(cases: list[Case]) -> str:
    head = ["transport", "size", "sender first / later", "receiver first / later",
            "shm directory first / later"]
    rows = []
    for c in cases:
        for t in _ordered(c.transports):
            cells = []
            for m in ("sender", "receiver", "shm directory"):
                v = c.values(t, m)
                cells.append(f"{_frac(v[0] if v else None)} / {_frac(median(v[1:]))}")
            rows.append([t, fmt_size(c.nbytes), *cells])
    return _table(head, rows)


def holders_table(cases: list[Case]) -> str:
    head = ["case", "size", "host memory growth tcp / shm (x payload)", "tcp ms", "shm ms",
            "wall tcp/shm", f"noise ({CONTROL})"]
    rows = [[c.name, fmt_size(c.nbytes),
             f"{_frac(c.median('tcp', 'memory'))} / {_frac(c.median('shm', 'memory'))}",
             _ms(c.median("tcp")), _ms(c.median("shm")), _x(c.ratio("tcp", "shm")),
             _x(c.ratio("tcp", CONTROL))] for c in cases]
    return _table(head, rows)


def joblib_table(cases: list[Case]) -> str:
    labels = _ordered(list(dict.fromkeys(t for c in cases for t in c.transports)))
    head = ["call", "size", *(f"{t} ms" for t in labels), "loky/dask shm", "dask tcp/shm"]
    rows = [[f"large {c.name}", fmt_size(c.nbytes), *(_ms(c.median(t)) for t in labels),
             _x(c.ratio("loky", "dask shm")), _x(c.ratio("dask tcp", "dask shm"))] for c in cases]
    return _table(head, rows)


# -- assembling ----------------------------------------------------------------------

#: section -> (title, what the table shows, renderer)
_SECTIONS: dict[str, tuple[str, str, Callable[[Run], str]]] = {
    "workloads": (
        "Real workloads",
        "Medians of paired ratios; wall tcp/shm above 1 means shm is faster, CPU and "
        "loopback bytes shm/tcp below 1 mean shm is cheaper. Worker CPU is the workers'; all "
        "CPU adds the benchmark's own process, which runs the schedulers and the clients. "
        "Noise is the same two ratios between two tcp:// clusters (an A/A control): a tcp/shm "
        "ratio as far from 1 as that says nothing. Absolute figures are medians; CPU ones are "
        "the workers'.",
        lambda r: "\n\n".join(t for t in (
            workloads_table(r.section("workloads")), ceiling_table(r.section("workloads")),
            counters_table(r.section("workloads"))) if t),
    ),
    "buffer": (
        "Real workloads through the buffer (single-copy: false)",
        "The same workloads, tcp:// against shm://, run again with `dask-shm.single-copy: false` "
        "in every process (benchmark process, schedulers, clients, workers): the sender copies "
        "into its shared buffer, the receiver copies out. This is the path of hosts that refuse "
        "single copy (Yama `ptrace_scope` 2 or 3, some containers), and of anyone who turns it "
        "off. It has its own tcp:// clusters and A/A control, so its ratios pair with its own "
        "repetitions; read it beside the table above. The machine table says which path each "
        "run took.",
        buffer_workloads,
    ),
    "mixed": (
        "Mixed sequence",
        "Each round: " + ", then ".join(STEPS) + ", on one cluster, then the other. "
        "tcp/shm is the median of paired ratios; x/memcpy compares with one copy of the same bytes.",
        mixed_table,
    ),
    "transfers": (
        "Transfers, the same path repeated",
        "One payload at a time. tcp/shm is the median of paired ratios; memcpy is one copy into "
        "touched memory, the physical bound.",
        transfers_table,
    ),
    "cold": (
        "Cold: a fresh cluster's first transfer",
        "Each sample starts a tcp:// and an shm:// cluster, waits, then times their first and "
        "second worker->worker transfers.",
        lambda r: cold_table(r.section("cold")),
    ),
    "memory": (
        "Memory across a worker->worker transfer",
        "RSS growth of sender and receiver, and growth of the shm directory's use, as multiples "
        "of the payload; the receiver keeps the data (ideal: sender +0, receiver +1). The first "
        "round is this section's first: the clusters have run the sections before it.",
        lambda r: memory_table(r.section("memory")),
    ),
    "holders": (
        "Data held by several workers",
        "Host memory (the cluster processes' private PSS plus the host's Shmem, counted once) "
        "grown by a broadcast scatter to every worker, and by an array made on one worker and "
        "read by a task on every worker, as multiples of the payload; a copy per holder is 1 "
        "per worker. Wall times are medians; the ratio is the median of paired ratios, beside "
        "the same ratio between two tcp:// clusters.",
        lambda r: holders_table(r.section("holders")),
    ),
    "joblib": (
        "joblib backends, one call",
        "Median ms per call; ratios are medians of paired ratios.",
        lambda r: joblib_table(r.section("joblib")),
    ),
}


def tables(run: Run, images: dict[str, str] | None = None, level: str = "##") -> str:
    """Every section the run has, as headed markdown tables; ``images``
    (section -> file name) are linked under their section's table."""
    out: list[str] = []
    for key, (title, blurb, render) in _SECTIONS.items():
        # the buffer run exists only beside the workloads section
        if not run.section("workloads" if key == "buffer" else key):
            continue
        out += [f"{level} {title}", "", blurb, "", render(run), ""]
        if images and key in images:
            out += [f"![{title}]({images[key]})", ""]
    skipped = run.notes.get("skipped") or {}
    if skipped:
        out += [f"{level} Not run", ""]
        out += [f"- {name}: {why}" for name, why in skipped.items()] + [""]
    return "\n".join(out)


def _reporting(block: int | None) -> str:
    if not block:
        return "off (or not a virtual machine)"
    return (f"on: freed blocks of {fmt_size(block)} go back to the hypervisor, and touching them "
            "again costs a host fault, in either transport; expect slow outliers")


def _machine_table(run: Run) -> str:
    m = run.machine
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    rows = [
        ["CPU", f"{m.get('cpu model')}, {m.get('cpu count')} CPUs ({m.get('cpus usable')} usable)"],
        ["memory", fmt_size(m.get("memory"))],
        ["kernel", f"{m.get('kernel')} ({m.get('architecture')})"],
        ["Python", str(m.get("python"))],
        ["versions", versions],
        ["shm directory", f"{m.get('shm directory')}, {fmt_size(m.get('shm directory size'))}"],
        ["transparent huge pages", f"shmem_enabled = {m.get('thp shmem_enabled')}, "
                                   f"enabled = {m.get('thp enabled')}"],
        ["free page reporting", _reporting(m.get("free page reporting"))],
        ["date", str(m.get("date"))],
        *_path_rows(run),
    ]
    return _table(["", ""], rows)


def _path_rows(run: Run) -> list[list[str]]:
    """Which path each cluster took, from dask-shm's counters ("-" for a run
    that did not record them: an older results.json)."""
    b = run.buffer_run
    return [
        ["path, shm:// cluster", describe(cluster_counters(run.paths, "shm") if run.paths else None)],
        ["path, tcp:// clusters", tcp_clusters(run.paths, ["tcp", CONTROL])],
        ["path, shm:// cluster of the buffer run",
         describe(cluster_counters(b.paths, "shm") if b and b.paths else None, expect="buffer")],
        ["path, tcp:// clusters of the buffer run",
         tcp_clusters(b.paths, ["tcp", CONTROL]) if b else "-"],
    ]


def paths_table(run: Run) -> str:
    """The machine table's path rows alone: what the command prints, since
    which path a user gets is the first thing to know about the numbers."""
    return _table(["cluster", "data path (dask-shm's counters)"], _path_rows(run))


def _method(run: Run) -> str:
    o = run.options
    control = [
        "- The workloads also run on a second tcp:// cluster, a third member of each repetition "
        "(the order rotates: each cluster takes each place in turn). tcp against tcp again is an "
        "A/A control: the noise of the machine and of the method, in the same units as the "
        "tcp/shm ratios.",
    ] if any(c.values(CONTROL) for c in run.section("workloads")) else []
    if run.buffer_run is not None:
        control.append(
            "- The workloads then run a second time, after these clusters closed, in a child "
            "process whose environment sets `DASK_DASK_SHM__SINGLE_COPY=false`, on fresh "
            "clusters (tcp://, shm:// and the control): every process of that run uses the "
            "buffer path. Its repetitions pair among themselves only.")
    paths = [
        "- The paths in the machine table are dask-shm's own counters (`dask_shm.stats`), "
        "summed over each cluster's workers, plus, for the shm:// cluster, the change in this "
        "benchmark's process, which runs its scheduler and client: messages read in place "
        "(single copy), copied through the buffer, or below the threshold and sent over TCP, "
        "and handshakes at which single copy was refused, by reason.",
    ] if run.paths else []
    lines = [
        "## Method",
        "",
        f"- Two LocalClusters run side by side, one on `tcp://` and one on `shm://`, each with "
        f"{o.get('workers')} process workers of one thread. Both stay alive through the cluster "
        "sections; one repetition runs at a time.",
        "- Repetitions interleave: tcp, shm, then shm, tcp, and so on, so that the machine's drift "
        "hits both alike. The first repetition of each transport is a warm-up and is not counted "
        "(it is kept in the JSON).",
        *control,
        "- Ratios are medians of paired ratios: repetition *i* of tcp against repetition *i* of "
        f"shm, {o.get('reps')} pairs per case. Absolute times are medians and vary from run to run.",
        "- Worker CPU is user + system time of the worker processes (`os.times()` in each worker "
        "before and after a repetition, summed); all CPU adds this benchmark's process, which "
        "runs both clusters' schedulers and clients (the idle cluster's heartbeats fall on both "
        "transports alike). Loopback bytes are bytes received on interface "
        "`lo` (`/proc/net/dev`) during a repetition: what shared memory did not carry.",
        *paths,
        "- Workload inputs are persisted before timing; results are released and the scheduler "
        "drained between repetitions.",
        f"- Cold: each sample starts a fresh tcp:// and shm:// cluster, waits "
        f"{o.get('cold_delay')} s, then times each one's first worker->worker transfer, then a "
        "second (order alternating between samples); the benchmark resets or trims nothing. "
        "The last sample is taken on the clusters the other sections then use.",
        "- The loopback counter is host-wide: anything else using `lo` meanwhile is counted too.",
        "- 1 MB = 10^6 bytes.",
    ]
    if o.get("quick"):
        lines.append("- **This was a `--quick` run**: small payloads and few repetitions. It checks "
                     "that everything runs; its ratios say little about large transfers.")
    return "\n".join(lines)


def benchmark_md(run: Run, images: dict[str, str]) -> str:
    """The whole report: method, machine, every table, links to the plots."""
    wall = run.notes.get("wall seconds")
    return "\n".join([
        "# dask-shm benchmark: tcp:// against shm://",
        "",
        "Generated by `dask shm bench` from `results.json` (every repetition of both transports); "
        "`dask shm bench --report results.json` regenerates this page and its plots."
        + (f" The run took {wall:.0f} s." if isinstance(wall, (int, float)) else ""),
        "",
        _method(run),
        "",
        "## Machine",
        "",
        _machine_table(run),
        "",
        tables(run, images),
    ])


#: The README block :func:`readme_summary` fills (``--readme``).
README_MARKERS = ("<!-- bench-summary -->", "<!-- /bench-summary -->")


def _pair(c: Case | None) -> str:
    if c is None:
        return "-"
    return f"{_x(c.ratio('tcp', 'shm'))} / {_x(c.ratio('shm', 'tcp', 'cpu'))}"


def _noise(c: Case | None) -> str:
    if c is None or not c.values(CONTROL):
        return "-"
    return f"{_x(c.ratio('tcp', CONTROL))} / {_x(c.ratio(CONTROL, 'tcp', 'cpu'))}"


def headline(run: Run) -> str:
    """The few lines a user reads first: each real workload's speed-up and
    CPU on both paths, each beside the noise of its own run (a second
    tcp:// cluster against the first), and the large transfers of the mixed
    sequence."""
    m = run.machine
    machine = f"{m.get('cpu count', '?')} CPUs, {m.get('cpu model', 'unknown CPU')}"
    buffered = {c.name: c for c in run.buffer_run.section("workloads")} if run.buffer_run else {}
    rows = [[c.name, fmt_size(c.nbytes), _pair(c), _noise(c),
             _pair(buffered.get(c.name)), _noise(buffered.get(c.name))]
            for c in run.section("workloads")]
    head = ["workload", "data", "shm://: wall tcp/shm / worker CPU shm/tcp",
            "noise: tcp against tcp again", "shm:// through the buffer: the same",
            "noise of the buffer run"]
    out = [
        f"One default run of `dask shm bench` ({machine}; "
        f"{run.notes.get('wall seconds', '?')} s). Wall above 1 and CPU below 1 favour "
        "shm://; read each ratio beside the noise column.",
        "",
        _table(head, rows),
    ]
    mixed = [c for c in run.section("mixed") if c.name != "memcpy" and c.values("shm")]
    if mixed:
        out += ["", "Transfers of " + fmt_size(mixed[0].nbytes) + " (single copy), tcp/shm: "
                + ", ".join(f"{c.name} {_x(c.ratio('tcp', 'shm'))}" for c in mixed) + "."]
    return "\n".join(out)


def readme_summary(run: Run) -> str:
    """The README's benchmark block, from ``run`` alone: the headline and
    where the rest is."""
    return headline(run) + "\n\nEvery table, the method and the plots: [docs/benchmark.md](docs/benchmark.md)."


def fill_readme(text: str, run: Run) -> str:
    """``text`` (a README) with its benchmark block replaced from ``run``."""
    start, end = README_MARKERS
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + readme_summary(run) + "\n" + text[j:]
