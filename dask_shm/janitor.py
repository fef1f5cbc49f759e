"""The janitor: what this process must remove at exit, and what dead
processes left behind.

A process is responsible for every file whose name carries its identity
(see :mod:`dask_shm.names`, which records them).  It removes them itself
when it is done with them and, as a last resort, at exit (``atexit``, and multiprocessing's
finalizers for children that leave through ``os._exit``).  A ``kill -9``
skips both; then the files stay until another process proves their owner
dead and removes them: :func:`sweep` unlinks a file only when
``/proc/<pid>/stat`` is gone, shows an exiting process or a zombie, or shows
another start time (the pid was reused).  Files of another pid namespace are
never judged.

Sweeps run when a process first sets up shared memory in a directory, when
a link to a peer ends (a peer killed with ``kill -9`` is exiting, a zombie
or gone by the time its socket closes), at exit, and on ``dask shm sweep``.
No thread or timer of ours ever runs one.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
from collections.abc import Iterator
from dataclasses import dataclass

from dask_shm.errors import DescriptorError
from dask_shm.names import (
    PREFIX,
    Directory,
    Owner,
    fmt_bytes,
    parse_name,
    take_owned,
    used_directories,
)

__all__ = ["FileInfo", "list_files", "sweep", "quiet_sweep"]

logger = logging.getLogger(__name__)

def _cleanup_at_exit() -> None:
    for name, path in take_owned():
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    # Also remove what dead processes left: a Nanny exits right after killing
    # a worker that was slow to close, and nothing else may run here again.
    for path in used_directories():
        try:
            d = Directory(path)
        except OSError:
            continue
        try:
            quiet_sweep(d)
        finally:
            d.close()


# Registered once, at import: it does nothing in a process that never
# created a file of ours.  multiprocessing's finalizers cover children that
# leave through os._exit.
atexit.register(_cleanup_at_exit)
multiprocessing.util.Finalize(None, _cleanup_at_exit, exitpriority=100)


@dataclass(frozen=True)
class FileInfo:
    """One of our files in the directory, as the janitor sees it."""

    name: str
    owner: Owner
    kind: str
    size: int
    alive: bool


def _scan(directory: Directory) -> Iterator[tuple[str, Owner, str]]:
    for entry in os.scandir(directory.fd):  # the directory we opened, not a path
        if entry.name.startswith(PREFIX):
            try:
                owner, kind = parse_name(entry.name)
            except DescriptorError:
                continue
            yield entry.name, owner, kind


def list_files(directory: Directory, owner: Owner | None = None) -> list[FileInfo]:
    """Our files in ``directory`` (only ``owner``'s, if given), with whether
    their owner lives."""
    out = []
    alive: dict[Owner, bool] = {}
    for name, who, kind in _scan(directory):
        if owner is not None and who != owner:
            continue
        if who not in alive:
            alive[who] = who.alive()
        try:
            size = os.stat(name, dir_fd=directory.fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        out.append(FileInfo(name, who, kind, size, alive[who]))
    return out


def sweep(
    directory: Directory, *, owner: Owner | None = None, dry_run: bool = False
) -> list[FileInfo]:
    """Remove files whose owner process is dead; return what was (or would be)
    removed.  With ``owner``, only that process's files are considered (and
    the directory is not even read while it lives)."""
    if owner is not None and owner.alive():
        return []
    removed = []
    for info in list_files(directory, owner):
        if not info.alive and (dry_run or directory.unlink(info.name)):
            removed.append(info)
    if removed and not dry_run:
        logger.info(
            "removed %d orphaned file(s), %s, in %s",
            len(removed),
            fmt_bytes(sum(i.size for i in removed)),
            directory.path,
        )
    return removed


def quiet_sweep(directory: Directory, owner: Owner | None = None) -> None:
    """:func:`sweep` for housekeeping: never raises."""
    try:
        sweep(directory, owner=owner)
    except Exception:
        logger.debug("sweep of %s failed", directory.path, exc_info=True)
