"""The workloads again, through the buffer: ``dask-shm.single-copy: false``.

Where the kernel lets a process read another's memory, ``shm://`` takes the
single-copy path; hosts that refuse it (Yama ``ptrace_scope`` 2 or 3, some
containers) get the buffer path, and so does anyone who sets
``dask-shm.single-copy: false``.  Their users need that path's numbers too.

The setting is read when each comm handshakes, in every process: the
benchmark's own (schedulers and clients) as much as the workers.  Setting
it with ``dask.config.set`` in this process, which already holds both
clusters' schedulers, would leave the question of what each existing comm
saw; so the workloads section runs a second time in a child process whose
environment has ``DASK_DASK_SHM__SINGLE_COPY=false``, with fresh ``tcp://``,
``shm://`` and control clusters: every process of that run reads the
setting from the start (workers get the configuration of the process that
spawns them).  The child runs after this process's clusters are closed, one
thing at a time on the machine, and writes an ordinary results.json, which
becomes the parent run's ``buffer_run``; its ``paths`` show whether the
buffer was really the path taken (no message read in place).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any

from dask_shm.bench.results import Run

__all__ = ["ENV", "SKIPPED", "run_through_buffer"]

#: What the child's environment adds to this one's.
ENV = {"DASK_DASK_SHM__SINGLE_COPY": "false"}
#: The key of the buffer run in a run's ``notes["skipped"]`` when it did not run.
SKIPPED = "workloads through the buffer"
_MODULE = "dask_shm.bench.buffer"
#: A progress line of the child (``dask_shm.bench._Progress``): its label is
#: passed on, timed by this process's clock instead of the child's.
_PROGRESS = re.compile(r"^\[\s*[\d.]+ s\] (.*)$")
#: Seconds an interrupted child gets to close its clusters before it is killed.
_CLOSE_TIMEOUT = 60.0


def run_through_buffer(o: dict[str, Any], progress: Callable[[str], None],
                       skipped: dict[str, str]) -> Run | None:
    """The workloads section of options ``o``, measured in a child process
    with single copy off; None, with the reason in ``skipped``, if it was not
    measured (a failure here must not cost the main run's results)."""
    import dask

    if not dask.config.get("dask-shm.single-copy", True):
        skipped[SKIPPED] = ("single-copy is already false in this run: the workloads above "
                            "went through the buffer")
        return None
    child = {**o, "sections": ["workloads"], "buffer_run": False}
    with tempfile.TemporaryDirectory(prefix="dask-shm-bench-") as tmp:
        out = os.path.join(tmp, "results.json")
        tail: deque[str] = deque(maxlen=5)
        # As a context manager, Popen closes the pipe and waits for the child
        # however this block ends.  Its own session: a Ctrl-C at the terminal
        # reaches this process only, which passes exactly one on (a second
        # one would interrupt the child while it closes its clusters).
        with subprocess.Popen(
            [sys.executable, "-m", _MODULE, json.dumps(child), out],
            env={**os.environ, **ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        ) as proc:
            try:
                assert proc.stderr is not None
                for line in proc.stderr:
                    m = _PROGRESS.match(line.rstrip("\n"))
                    if m:
                        progress(f"through the buffer: {m.group(1)}")
                    else:  # warnings, a traceback: the user should see them as they come
                        sys.stderr.write(line)
                        tail.append(line.strip())
            except BaseException:  # interrupted: end the child rather than wait for its run
                proc.send_signal(signal.SIGINT)  # it closes its clusters and workers
                try:
                    proc.wait(timeout=_CLOSE_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        rc = proc.returncode
        if rc != 0:
            skipped[SKIPPED] = f"the child run failed (exit status {rc}): " + " / ".join(tail)
            return None
        from dask_shm.bench import results

        return results.load(out)


def _child(argv: list[str]) -> int:
    """Measure the options ``argv[0]`` (JSON) and save the run to ``argv[1]``."""
    from dask_shm.bench import results, run

    results.save(argv[1], run(json.loads(argv[0])))
    return 0


if __name__ == "__main__":  # the child; also guards spawned workers' import of this module
    sys.exit(_child(sys.argv[1:]))
