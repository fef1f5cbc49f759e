"""The report's plots, drawn from a run's records with matplotlib (Agg).

* ``workloads.png``: each real workload as a pair of bars, tcp against shm,
  for wall time and for worker CPU time.
* ``throughput.png``: throughput against payload size for the transfer
  section's paths, tcp and shm, with one memcpy as the limit.  Only
  transfers are drawn: no line for anything that passes references.
"""

from __future__ import annotations

from typing import Any

from dask_shm.bench.results import Run

__all__ = ["draw_all", "WORKLOADS_PNG", "THROUGHPUT_PNG"]

WORKLOADS_PNG = "workloads.png"
THROUGHPUT_PNG = "throughput.png"
COLORS = {"tcp": "tab:blue", "shm": "tab:orange"}


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _workloads(plt: Any, run: Run, path: str) -> bool:
    cases = run.section("workloads")
    if not cases:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 * len(cases) + 1.8), sharey=True)
    ys = range(len(cases))
    for ax, metric, label, num, den in (
        (axes[0], "wall", "wall time (s, median)", "tcp", "shm"),
        (axes[1], "cpu", "worker CPU, user+sys (s, median)", "shm", "tcp"),
    ):
        for k, t in enumerate(("tcp", "shm")):
            vals = [c.median(t, metric) or 0.0 for c in cases]
            ax.barh([y + (k - 0.5) * 0.38 for y in ys], vals, height=0.38, label=f"{t}://",
                    color=COLORS[t])
        for y, c in zip(ys, cases):
            r = c.ratio(num, den, metric)
            top = max(c.median("tcp", metric) or 0.0, c.median("shm", metric) or 0.0)
            if r is not None:
                ax.text(top, y, f"  {num}/{den} {r:.2f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.margins(x=0.25)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(list(ys), [c.name for c in cases], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.suptitle("Real workloads: tcp:// against shm:// (3 process workers each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _throughput(plt: Any, run: Run, path: str) -> bool:
    cases = [c for c in run.section("transfers") if c.name != "memcpy"]
    if not cases:
        return False
    names = list(dict.fromkeys(c.name for c in cases))
    memcpy = sorted((c.nbytes, s) for c in run.section("transfers")
                    if c.name == "memcpy" and (s := c.median("memcpy")))
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for ax, name in zip(axes.flat, names):
        for t in ("tcp", "shm"):
            pts = sorted((c.nbytes, m) for c in cases if c.name == name and (m := c.median(t)))
            if pts:
                ax.plot([n for n, _ in pts], [n / s / 1e9 for n, s in pts], marker="o",
                        label=f"{t}://", color=COLORS[t])
        if memcpy:
            ax.plot([n for n, _ in memcpy], [n / s / 1e9 for n, s in memcpy], linestyle="--",
                    color="black", label="memcpy (limit)")
        ax.set_title(name, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()  # log-scale minor ticks make the drawing seconds slower
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("payload (bytes)")
    for ax in axes[:, 0]:
        ax.set_ylabel("GB/s (median)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Throughput against payload size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_all(run: Run, directory: str) -> dict[str, str]:
    """Draw every plot the run has data for into ``directory``; returns
    section -> file name (relative to ``directory``).  Empty without
    matplotlib."""
    import os

    plt = _pyplot()
    if plt is None:
        return {}
    out = {}
    if _workloads(plt, run, os.path.join(directory, WORKLOADS_PNG)):
        out["workloads"] = WORKLOADS_PNG
    if _throughput(plt, run, os.path.join(directory, THROUGHPUT_PNG)):
        out["transfers"] = THROUGHPUT_PNG
    return out
