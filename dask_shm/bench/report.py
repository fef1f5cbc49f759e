"""Results of one benchmark run: summaries, the table, JSON and the plot."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Result", "summarize", "ratio", "fmt_size", "table", "write_json", "plot"]

MB = 10**6


@dataclass
class Result:
    """One case (path, transport, payload) of one run.  Times in seconds."""

    section: str
    path: str
    transport: str
    nbytes: int
    median: float
    spread: float  #: interquartile range of the warm repetitions
    cold: float | None  #: the first repetition, before anything was warm
    reps: int
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(
    section: str, path: str, transport: str, nbytes: int, times: list[float], cold: bool = True,
    paired: bool = False,
) -> Result:
    """Median and spread of the warm repetitions; the first one is "cold".

    The warm repetitions' raw times are kept (``extra["times"]``, in the
    JSON).  ``paired``: they interleave with another transport's, one for
    one, and :func:`ratio` takes the median of the per-repetition ratios,
    which cancels the machine's drift.
    """
    first = times[0] if cold and len(times) > 1 else None
    warm = times[1:] if first is not None else times
    q = statistics.quantiles(warm, n=4) if len(warm) > 1 else [warm[0]] * 3
    extra: dict[str, Any] = {"times": warm, "paired": paired}
    return Result(section, path, transport, nbytes, statistics.median(warm), q[2] - q[0], first,
                  len(warm), extra)


def fmt_size(n: int) -> str:
    for unit, k in (("GB", 10**9), ("MB", MB), ("KB", 1000)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{n} B"


def _ms(t: float | None) -> str:
    if t is None or math.isnan(t):
        return "-"
    return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def ratio(base: Result, cont: Result) -> float:
    """``base`` over ``cont``: the median of per-repetition ratios when both
    were measured interleaved (see :func:`summarize`), else of the medians."""
    a, b = base.extra.get("times"), cont.extra.get("times")
    if base.extra.get("paired") and cont.extra.get("paired") and a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return base.median / cont.median


def table(results: list[Result], baseline: str, contender: str, bounds: tuple[str, ...]) -> str:
    """A markdown table: for each (section, path, size), the baseline and the
    contender transport side by side, their ratio, the bounds, and cold
    against cold."""
    by = {(r.section, r.path, r.transport, r.nbytes): r for r in results}
    keys = list(dict.fromkeys((r.section, r.path, r.nbytes) for r in results))
    memcpy = {r.nbytes: r for r in results if r.transport == "memcpy"}
    head = [
        "section", "path", "size", f"{baseline} ms", f"{contender} ms", f"{baseline}/{contender}",
        "± spread (IQR, ms)", *(f"{b} ms" for b in bounds), f"{contender}/{bounds[0]}" if bounds else "",
        f"{baseline} cold", f"{contender} cold", "cold ratio",
    ]
    lines = ["| " + " | ".join(h for h in head if h) + " |", "|" + "---|" * len([h for h in head if h])]
    for section, path, n in keys:
        base = by.get((section, path, baseline, n))
        cont = by.get((section, path, contender, n))
        if base is None or cont is None:
            continue
        bnd = [by.get((section, path, b, n)) or memcpy.get(n) if b == "memcpy"
               else by.get((section, path, b, n)) for b in bounds]
        row = [
            section, path, fmt_size(n), _ms(base.median), _ms(cont.median),
            f"{ratio(base, cont):.2f}",
            f"{_ms(base.spread)} / {_ms(cont.spread)}",
            *(_ms(b.median if b else None) for b in bnd),
        ]
        if bounds:
            row.append(_ratio(cont.median, bnd[0].median if bnd[0] else None))
        row += [_ms(base.cold), _ms(cont.cold), _ratio(base.cold, cont.cold)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(path: str, args: dict[str, Any], results: list[Result], notes: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"args": args, "notes": notes, "results": [asdict(r) for r in results]}, f, indent=1)


def plot(path: str, results: list[Result], section: str, transports: list[str]) -> bool:
    """Throughput against payload size, one line per transport, with the
    memcpy limit drawn.  Returns False if matplotlib is missing."""
    if not any(r.section == section and r.transport in transports for r in results):
        return False  # that section was not run
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in transports:
        pts = sorted((r.nbytes, r.nbytes / r.median) for r in results
                     if r.section == section and r.transport == t and r.median > 0)
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] / 1e9 for p in pts]
            if t == "memcpy":
                ax.plot(xs, ys, label="memcpy (limit)", linestyle="--", color="black")
            else:
                ax.plot(xs, ys, label=t, marker="o")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload (bytes)")
    ax.set_ylabel("throughput (GB/s)")
    ax.set_title(f"dask shm bench: {section} (median of warm repetitions)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
