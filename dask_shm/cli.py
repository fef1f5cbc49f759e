"""``dask shm ...``: the benchmark and the operator's tools.

Registered as a ``dask_cli`` entry point (so ``dask shm bench`` works) and as
the ``dask-shm`` console script.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

__all__ = ["shm"]


@click.group(name="shm")
def shm() -> None:
    """dask-shm: shared memory for Dask on one host."""


def _directory(path: str | None) -> Any:
    from dask_shm.config import settings
    from dask_shm.names import Directory

    path = path or settings().directory
    reason = Directory.unusable_reason(path, memory=False)
    if reason:
        raise click.ClickException(reason)
    return Directory(path)


def _fmt(n: int) -> str:
    from dask_shm.names import fmt_bytes

    return fmt_bytes(n)


def huge_pages(path: str) -> str:
    """Whether files in ``path`` get huge pages: the tmpfs mount's ``huge=``
    option, else the system-wide shmem setting.  With huge pages a buffer
    is faulted in faster and copied out of faster."""
    best = ("", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _dev, mnt, fstype, opts = line.split()[:4]
                if path.startswith(mnt) and len(mnt) >= len(best[0]) and fstype == "tmpfs":
                    best = (mnt, opts)
    except OSError:
        return "unknown"
    for opt in best[1].split(","):
        if opt.startswith("huge="):
            return f"{opt[5:]} (mount option)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            setting = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"
    return f"{setting} (shmem_enabled)"


def single_copy_verdict(enabled: bool) -> tuple[dict[str, Any], str]:
    """What this host gives single copy (a real probe, see
    :func:`dask_shm.single_copy.probe_host`): the facts, and one line
    saying which path links get and what to change where it is refused."""
    import os

    from dask_shm.single_copy import probe_host, yama_scope

    scope = yama_scope()
    probe = probe_host()
    facts: dict[str, Any] = {"enabled": enabled, "yama-ptrace-scope": scope, **probe}
    yama = "no Yama" if scope is None else f"Yama ptrace_scope {scope}"
    who = f"two unrelated processes of uid {os.geteuid()}"
    if not enabled:
        facts["path"] = "buffer"
        return facts, f"single copy: off (dask-shm.single-copy false); {yama}"
    if probe["declared"] == "ok":
        facts["path"] = "single copy"
        how = "" if probe["undeclared"] == "ok" else " once each declares itself readable (dask-shm does)"
        return facts, f"single copy: works between {who}{how}; {yama}"
    facts["path"] = "buffer"
    if scope is not None and scope >= 2:
        fix = (
            f"ptrace_scope {scope} refuses it for good; `sysctl kernel.yama.ptrace_scope=1` "
            "(or 0) lets dask-shm declare itself readable"
        )
    else:
        fix = (
            "a seccomp filter or a non-dumpable process refuses it (in a container, "
            "allow process_vm_readv, e.g. Docker's default profile on a recent "
            "kernel, or --cap-add SYS_PTRACE)"
        )
    return facts, f"single copy: refused between {who} ({probe['declared']}); {yama}: {fix}. Large messages go through the buffer"


@shm.command()
@click.option("--directory", default=None, help="Shared-memory directory (default: dask-shm.directory).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(directory: str | None, as_json: bool) -> None:
    """Which path this host gives shm:// comms (single copy, tested between
    two processes, or the buffer), the directory's filesystem, free space
    and huge pages; then dask-shm's files (buffers, probes): owner, alive
    or orphaned, size, totals; and the links' release sockets open on this
    host's network namespace (they are not files)."""
    from dask_shm.config import settings
    from dask_shm.janitor import list_files
    from dask_shm.names import KINDS, MEMORY_FILESYSTEMS, filesystem
    from dask_shm.release import open_sockets

    d = _directory(directory)
    infos = list_files(d)
    free, total = d.free_space()
    conf = settings()
    huge = huge_pages(d.path)
    fs = filesystem(d.path)
    copy_facts, copy_line = single_copy_verdict(conf.single_copy)
    sockets = sorted(_socket_owners(open_sockets().values()))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "directory": d.path,
                    "filesystem": fs,
                    "memory-filesystem": fs in MEMORY_FILESYSTEMS,
                    "single-copy": copy_facts,
                    "free": free,
                    "total": total,
                    "buffer-size": conf.buffer_size,
                    "fragment-size": conf.fragment_size,
                    "huge-pages": huge,
                    "files": [
                        {
                            "name": i.name,
                            "pid": i.owner.pid,
                            "kind": KINDS[i.kind],
                            "size": i.size,
                            "alive": i.alive,
                        }
                        for i in infos
                    ],
                    "release-sockets": [{"name": n, "pid": pid} for pid, n in sockets],
                },
                indent=2,
            )
        )
        return
    click.echo(f"{d.path}: {fs}, {_fmt(free)} free of {_fmt(total)}; huge pages: {huge}")
    if fs not in MEMORY_FILESYSTEMS:
        click.echo(
            "  not a memory filesystem: shm:// comms use plain TCP here. "
            "Set dask-shm.directory to a tmpfs such as /dev/shm"
        )
    click.echo(copy_line)
    click.echo(
        f"buffer-size {_fmt(conf.buffer_size)} per process with an shm:// comm, "
        f"fragment-size {_fmt(conf.fragment_size)}"
    )
    if sockets:
        pids = sorted({pid for pid, _ in sockets})
        click.echo(f"release sockets: {len(sockets)} link ends, processes {', '.join(map(str, pids))}")
    by_pid: dict[int, list[Any]] = {}
    for i in infos:
        by_pid.setdefault(i.owner.pid, []).append(i)
    if not infos:
        click.echo("no dask-shm files")
        return
    click.echo(f"{'pid':>8}  {'state':8}  {'files':>8}  {'bytes':>12}")
    for pid, items in sorted(by_pid.items()):
        state = "alive" if items[0].alive else "orphaned"
        click.echo(f"{pid:>8}  {state:8}  {len(items):>8}  {_fmt(sum(i.size for i in items)):>12}")
    orphaned = [i for i in infos if not i.alive]
    click.echo(
        f"total: {len(infos)} files, {_fmt(sum(i.size for i in infos))}; "
        f"orphaned: {len(orphaned)}, {_fmt(sum(i.size for i in orphaned))}"
    )


def _socket_owners(names: Any) -> list[tuple[int, str]]:
    """(owner pid, name) of the release sockets among ``names``; an
    abstract socket that merely starts like ours is left out."""
    from dask_shm.errors import DescriptorError
    from dask_shm.names import parse_name

    out = []
    for name in names:
        try:
            out.append((parse_name(name)[0].pid, name))
        except DescriptorError:
            pass
    return out


@shm.command()
@click.option("--directory", default=None, help="Shared-memory directory (default: dask-shm.directory).")
@click.option("--dry-run", is_flag=True, help="Show what would be removed, remove nothing.")
def sweep(directory: str | None, dry_run: bool) -> None:
    """Remove dask-shm files whose owner process is dead (never a live one's)."""
    from dask_shm.janitor import sweep as do_sweep

    removed = do_sweep(_directory(directory), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for i in removed:
        click.echo(f"{verb} {i.name} ({_fmt(i.size)}, pid {i.owner.pid})")
    click.echo(f"{verb} {len(removed)} orphaned file(s), {_fmt(sum(i.size for i in removed))}")


@shm.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],  # --help reaches the benchmark's own parser
    }
)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmark tcp:// against shm:// on this machine (see --help)."""
    from dask_shm.bench import main

    sys.exit(main(ctx.args))


if __name__ == "__main__":  # pragma: no cover
    shm()
