"""joblib on Dask, with large numpy arrays moved through shared memory.

What this shows: code written for joblib (``Parallel`` / ``delayed``) runs
unchanged on a Dask ``LocalCluster`` whose comms are ``shm://``; the only
dask-shm-specific word is ``protocol="shm"``.  Each task gets a large array
as its argument and returns a large array; the script checks every result
and prints dask-shm's per-process counters (``dask_shm.stats.snapshot()``)
for this process and for each worker, which show how many messages and bytes
went through ``/dev/shm`` rather than TCP.

How joblib's dask backend moves the data (joblib/_dask.py): each argument
larger than 1 kB that can be weakly referenced (numpy arrays, DataFrames) is
scattered first with ``client.scatter(arg, hash=False)``, and the results
are fetched with ``client.gather``; from a client outside the cluster both
go *through the scheduler* (client -> scheduler -> worker and back), unless
the client is created with ``direct_to_workers=True`` (``--direct``), which
makes them go straight to and from the workers.  With ``LocalCluster`` the
scheduler runs in this process, so the counters printed for "this process"
include its relaying.

Arrays below ``dask-shm.threshold`` (4 MiB) travel over TCP as usual;
larger ones bypass it from the first call.

Run it (``--protocol tcp`` for comparison)::

    python examples/joblib_dask_shm.py                # 100 MB arrays
    python examples/joblib_dask_shm.py --mb 400       # np.arange(5 * 10**7)
    python examples/joblib_dask_shm.py --protocol tcp
"""

from __future__ import annotations

import argparse
import time

import joblib
import numpy as np
from distributed import Client, LocalCluster

import dask_shm

#: int64 elements per megabyte (10**6 bytes): 400 MB is np.arange(5 * 10**7)
PER_MB = 10**6 // 8

#: The counters worth printing, out of everything snapshot() returns.
COUNTERS = (
    "shm-messages",  # messages that bypassed TCP
    "shm-bytes",  # their bytes
    "single-copy-messages",  # of them, read in place out of the sender's memory
    "below-threshold",  # messages small enough for TCP
    "fallback-busy",  # buffer pieces sent over TCP because the buffer was full
)


def transform(x: np.ndarray, k: int) -> np.ndarray:
    """The joblib task: a large array in, a large array out."""
    return x * k + 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=100, help="size of each array in MB (default 100)")
    p.add_argument("--tasks", type=int, default=2, help="arrays (tasks) per call (default 2)")
    p.add_argument("--calls", type=int, default=3, help="Parallel calls in a row (default 3)")
    p.add_argument("--protocol", choices=["shm", "tcp"], default="shm")
    p.add_argument(
        "--direct",
        action="store_true",
        help="Client(direct_to_workers=True): scatter/gather skip the scheduler",
    )
    return p.parse_args()


def print_counters(label: str, counts: dict[str, int]) -> None:
    shown = ", ".join(
        f"{name}={counts.get(name, 0) / 1e6:.0f} MB"
        if name.endswith("bytes")
        else f"{name}={counts.get(name, 0)}"
        for name in COUNTERS
    )
    print(f"  {label}: {shown}")


def main() -> None:
    args = parse_args()
    n = args.mb * PER_MB
    # The inputs live in this process; joblib scatters each one to a worker.
    xs = [np.arange(n, dtype=np.int64) + i for i in range(args.tasks)]

    with LocalCluster(
        protocol=args.protocol,  # "shm": the dask-shm comm backend
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # any free port
    ) as cluster, Client(cluster, direct_to_workers=args.direct) as client:
        print(f"scheduler {client.scheduler.address}, {args.tasks} x {args.mb} MB each way")

        # The joblib part: the Client above is the default one, which the
        # "dask" backend picks up.
        with joblib.parallel_config(backend="dask"):
            for k in range(2, 2 + args.calls):
                t0 = time.perf_counter()
                ys = joblib.Parallel()(joblib.delayed(transform)(x, k) for x in xs)
                elapsed = time.perf_counter() - t0
                for x, y in zip(xs, ys, strict=True):  # verify every result
                    assert y.shape == x.shape and np.array_equal(y, x * k + 1)
                print(f"call {k - 1}: {elapsed:.2f} s, results verified")
                del ys

        # Which processes moved what, and how.  Over tcp:// these stay zero:
        # dask-shm never sees the traffic.
        print("dask_shm.stats.snapshot():")
        print_counters("this process (client + scheduler)", dask_shm.stats.snapshot())
        for addr, counts in sorted(client.run(dask_shm.stats.snapshot).items()):
            print_counters(f"worker {addr}", counts)


if __name__ == "__main__":  # required: the worker processes are spawned
    main()
