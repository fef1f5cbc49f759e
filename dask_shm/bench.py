"""``dask shm bench``: tcp:// against shm:// on this machine, in one run.

Every path is measured for each transport in the same process and run, with
one memcpy of the same bytes as the physical bound; ratios are computed from
those medians.  The first repetition of each case is reported apart as
"cold" for both transports (nothing pooled yet, and first-touch costs in every
process), and compared cold against cold.  Timings here are the product's evidence; tests never assert
them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["main", "Result"]

MB = 10**6
DEFAULT_SIZES = "1KB,64KB,1MB,16MB,128MB,400MB"
DEFAULT_CLUSTER_SIZES = "16MB,128MB,400MB"


@dataclass
class Result:
    path: str
    transport: str
    nbytes: int
    median: float
    spread: float  # interquartile range, seconds
    cold: float | None  # the first repetition, before any pool was warm
    reps: int


def parse_size(s: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(s))


def fmt_size(n: int) -> str:
    for unit, k in (("GB", 10**9), ("MB", MB), ("KB", 1000)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{n} B"


def summarize(path: str, transport: str, nbytes: int, times: list[float], cold: bool) -> Result:
    first = times[0] if cold else None
    warm = times[1:] if cold and len(times) > 1 else times
    q = statistics.quantiles(warm, n=4) if len(warm) > 1 else [warm[0]] * 3
    return Result(path, transport, nbytes, statistics.median(warm), q[2] - q[0], first, len(warm))


# -- paths -----------------------------------------------------------------------


def bench_memcpy(nbytes: int, reps: int) -> list[float]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out.append(time.perf_counter() - t0)
    return out


def bench_comm(scheme: str, nbytes: int, reps: int, pause: float) -> list[float]:
    """One-way transfer plus a tiny acknowledgement, between two processes'
    worth of comms in one process (listener and connector)."""
    from distributed.comm import connect, listen
    from distributed.protocol import to_serialize

    async def run() -> list[float]:
        async def handler(comm: Any) -> None:
            try:
                while True:
                    msg = await comm.read()
                    del msg
                    await comm.write(b"ok")
            except Exception:
                pass
            finally:
                comm.abort()

        async with listen(f"{scheme}://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            payload = {"x": to_serialize(np.ones(nbytes, dtype=np.uint8))}
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                await comm.write(payload)
                await comm.read()
                out.append(time.perf_counter() - t0)
                await asyncio.sleep(pause)
            await comm.close()
            return out

    return asyncio.run(run())


@contextlib.contextmanager
def local_cluster(scheme: str, workers: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(
        protocol=scheme,
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=50,
    ) as lc, Client(lc) as client:
        yield client


def _last(x: np.ndarray) -> int:
    return int(x[-1])


def bench_worker_to_worker(client: Any, nbytes: int, reps: int, pause: float) -> list[float]:
    a, b = sorted(client.scheduler_info()["workers"])[:2]
    out = []
    for _ in range(reps):
        x = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
        client.submit(len, x, workers=[a]).result()  # x exists on a before timing
        t0 = time.perf_counter()
        client.submit(_last, x, workers=[b]).result()
        out.append(time.perf_counter() - t0)
        del x
        time.sleep(pause)
    return out


def bench_scatter_gather(client: Any, nbytes: int, reps: int, pause: float, direct: bool) -> tuple[list[float], list[float]]:
    a = sorted(client.scheduler_info()["workers"])[0]
    data = np.ones(nbytes, dtype=np.uint8)
    scat, gath = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        # hash=False: measure the transport, not hashing the bytes for a key
        [f] = client.scatter([data], workers=[a], direct=direct, hash=False)
        scat.append(time.perf_counter() - t0)
        time.sleep(pause)
        y = client.submit(np.ones, nbytes, dtype=np.uint8, workers=[a], pure=False)
        client.submit(len, y, workers=[a]).result()
        t0 = time.perf_counter()
        got = client.gather(y, direct=direct)
        gath.append(time.perf_counter() - t0)
        del f, y, got
        time.sleep(pause)
    return scat, gath


# -- driver ------------------------------------------------------------------------


def run_all(args: argparse.Namespace, progress: Callable[[str], None]) -> list[Result]:
    results: list[Result] = []
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    csizes = [parse_size(s) for s in args.cluster_sizes.split(",")]
    for n in sizes:
        progress(f"memcpy {fmt_size(n)}")
        results.append(summarize("memcpy", "bound", n, bench_memcpy(n, args.reps), False))
        for scheme in ("tcp", "shm"):
            progress(f"comm {scheme} {fmt_size(n)}")
            t = bench_comm(scheme, n, args.reps + 1, args.pause)
            results.append(summarize("comm one-way", scheme, n, t, True))
    for scheme in ("tcp", "shm"):
        progress(f"cluster {scheme}")
        with local_cluster(scheme, args.workers) as client:
            for n in csizes:
                progress(f"worker->worker {scheme} {fmt_size(n)}")
                t = bench_worker_to_worker(client, n, args.reps + 1, args.pause)
                results.append(summarize("worker->worker", scheme, n, t, True))
                for direct in (False, True):
                    label = "direct" if direct else "via scheduler"
                    progress(f"scatter/gather {label} {scheme} {fmt_size(n)}")
                    s, g = bench_scatter_gather(client, n, args.reps + 1, args.pause, direct)
                    results.append(summarize(f"scatter {label}", scheme, n, s, True))
                    results.append(summarize(f"gather {label}", scheme, n, g, True))
    return results


def table(results: list[Result]) -> str:
    by = {(r.path, r.transport, r.nbytes): r for r in results}
    lines = [
        f"{'path':24} {'size':>8} {'tcp ms':>9} {'shm ms':>9} {'memcpy':>8} "
        f"{'tcp/shm':>8} {'shm/memcpy':>10} {'tcp cold':>9} {'shm cold':>9} {'cold t/s':>8}"
    ]
    for (path, transport, n), r in by.items():
        if transport != "tcp":
            continue
        s = by.get((path, "shm", n))
        m = by.get(("memcpy", "bound", n))
        if s is None:
            continue
        tc, sc = r.cold or float("nan"), s.cold or float("nan")
        lines.append(
            f"{path:24} {fmt_size(n):>8} {r.median * 1e3:9.2f} {s.median * 1e3:9.2f} "
            f"{(m.median * 1e3 if m else float('nan')):8.2f} {r.median / s.median:8.2f} "
            f"{(s.median / m.median if m else float('nan')):10.2f} "
            f"{tc * 1e3:9.2f} {sc * 1e3:9.2f} {tc / sc:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dask shm bench", description=__doc__)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comm payloads (default %(default)s)")
    p.add_argument("--cluster-sizes", default=DEFAULT_CLUSTER_SIZES, help="cluster payloads (default %(default)s)")
    p.add_argument("--reps", type=int, default=7, help="warm repetitions per case (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default %(default)s)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between repetitions (default %(default)s)")
    p.add_argument("--output", default="bench-results", help="directory for results.json (default %(default)s)")
    args = p.parse_args(argv)

    def progress(msg: str) -> None:
        print(f"  ... {msg}", file=sys.stderr, flush=True)

    results = run_all(args, progress)
    print(table(results))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
