"""What the numbers depend on: the machine, and the loopback byte counter.

Shared-memory costs depend on the kernel's page size for tmpfs (transparent
huge pages for shmem), the size of the shm directory and the CPU; the
report states them beside every table.  Linux only: everything is read from
``/proc`` and ``/sys``.
"""

from __future__ import annotations

import datetime
import glob
import os
import platform
import sys
from typing import Any

__all__ = ["machine_info", "loopback_rx_bytes", "proc_sizes"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_model() -> str | None:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def proc_sizes(path: str) -> dict[str, int]:
    """The ``Name:  N kB`` lines of a ``/proc`` file (``meminfo``,
    ``self/status``, ``self/smaps_rollup``), in bytes by name."""
    out = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith(":") and parts[2] == "kB":
            out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def _mem_total() -> int | None:
    return proc_sizes("/proc/meminfo").get("MemTotal")


def _selected(setting: str | None) -> str | None:
    """``always within_size [never]`` -> ``never``."""
    if setting and "[" in setting:
        return setting.split("[", 1)[1].split("]", 1)[0]
    return setting


#: virtio-balloon feature bit VIRTIO_BALLOON_F_REPORTING (free page reporting).
_BALLOON_REPORTING = 5


def free_page_reporting() -> int | None:
    """The size of the blocks a virtio balloon hands back to the hypervisor
    once the guest frees them (free page reporting), or None if it does not.

    Touching such memory again costs a host fault on top of the guest's, so
    any repetition that allocates what an earlier one freed may run slower,
    whichever transport it measures: measured here, it made repetitions of
    both transports bimodal (0.3 s against 0.6 s for the same futures run,
    the slow ones spending their extra time zeroing pages).
    """
    on = False
    for path in glob.glob("/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"):
        bits = _read(path) or ""
        on = on or (len(bits) > _BALLOON_REPORTING and bits[_BALLOON_REPORTING] == "1")
    if not on:
        return None
    order = _read("/sys/module/page_reporting/parameters/page_reporting_order")
    return 4096 << int(order) if order and order.isdigit() else 4096 << 9


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dask", "distributed", "numpy", "pandas", "pyarrow", "dask-shm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    """CPU, kernel, Python, library versions, the shm directory's size,
    whether tmpfs gets transparent huge pages and whether freed memory goes
    back to a hypervisor."""
    import dask

    shm_dir = str(dask.config.get("dask-shm.directory", "/dev/shm") or "/dev/shm")
    try:
        st = os.statvfs(shm_dir)
        shm_size: int | None = st.f_blocks * st.f_frsize
    except OSError:
        shm_size = None
    thp = "/sys/kernel/mm/transparent_hugepage"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu count": os.cpu_count(),
        "cpus usable": len(os.sched_getaffinity(0)),
        "cpu model": _cpu_model(),
        "memory": _mem_total(),
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "python": sys.version.split()[0],
        "versions": _versions(),
        "shm directory": shm_dir,
        "shm directory size": shm_size,
        "thp shmem_enabled": _selected(_read(f"{thp}/shmem_enabled")),
        "thp enabled": _selected(_read(f"{thp}/enabled")),
        "free page reporting": free_page_reporting(),
    }


def loopback_rx_bytes() -> int:
    """Bytes received so far on interface ``lo`` (``/proc/net/dev``).

    Every TCP byte between processes on this host crosses it, so the change
    across a repetition is what shared memory did not carry (plus Dask's
    own small control messages, on both transports).
    """
    for line in (_read("/proc/net/dev") or "").splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0
