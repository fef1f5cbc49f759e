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
    from dask_shm.segments import ShmDirectory

    path = path or settings().directory
    reason = ShmDirectory.unusable_reason(path)
    if reason:
        raise click.ClickException(reason)
    return ShmDirectory(path)


def _fmt(n: int) -> str:
    from dask_shm.segments import _fmt as fmt

    return fmt(n)


@shm.command()
@click.option("--directory", default=None, help="Shared-memory directory (default: dask-shm.directory).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(directory: str | None, as_json: bool) -> None:
    """List dask-shm segments: owner, alive or orphaned, size, totals."""
    from dask_shm.segments import list_segments

    d = _directory(directory)
    infos = list_segments(d)
    free, total = d.free_space()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "directory": d.path,
                    "free": free,
                    "total": total,
                    "segments": [
                        {
                            "name": i.name,
                            "pid": i.owner.pid,
                            "kind": {"p": "probe", "s": "data", "f": "free"}[i.kind],
                            "size": i.size,
                            "alive": i.alive,
                        }
                        for i in infos
                    ],
                },
                indent=2,
            )
        )
        return
    click.echo(f"{d.path}: {_fmt(free)} free of {_fmt(total)}")
    by_pid: dict[int, list[Any]] = {}
    for i in infos:
        by_pid.setdefault(i.owner.pid, []).append(i)
    if not infos:
        click.echo("no dask-shm segments")
        return
    click.echo(f"{'pid':>8}  {'state':8}  {'segments':>8}  {'bytes':>12}")
    for pid, items in sorted(by_pid.items()):
        state = "alive" if items[0].alive else "orphaned"
        click.echo(f"{pid:>8}  {state:8}  {len(items):>8}  {_fmt(sum(i.size for i in items)):>12}")
    orphaned = [i for i in infos if not i.alive]
    click.echo(
        f"total: {len(infos)} segments, {_fmt(sum(i.size for i in infos))}; "
        f"orphaned: {len(orphaned)}, {_fmt(sum(i.size for i in orphaned))}"
    )


@shm.command()
@click.option("--directory", default=None, help="Shared-memory directory (default: dask-shm.directory).")
@click.option("--dry-run", is_flag=True, help="Show what would be removed, remove nothing.")
def sweep(directory: str | None, dry_run: bool) -> None:
    """Remove segments whose owner process is dead (never a live one's)."""
    from dask_shm.segments import sweep as do_sweep

    removed = do_sweep(_directory(directory), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for i in removed:
        click.echo(f"{verb} {i.name} ({_fmt(i.size)}, pid {i.owner.pid})")
    click.echo(f"{verb} {len(removed)} orphaned segment(s), {_fmt(sum(i.size for i in removed))}")


@shm.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmark tcp:// against shm:// on this machine (see --help)."""
    from dask_shm.bench import main

    sys.exit(main(ctx.args))


if __name__ == "__main__":  # pragma: no cover
    shm()
