"""Carry ``dask_shm`` into the worker processes this process starts.

The ``"shm"`` serialization family exists in a process only once
``dask_shm`` is imported there: distributed has no entry point for families
and looks them up with ``families[name]``.  A worker asked to reply with
``["shm", "dask", "pickle"]`` (a requester's deserializers become the
responder's serializers) must know the name, if only to decline it over
``tcp://``.  Who imports ``dask_shm``:

- any process that opens an ``shm://`` comm: the comm's entry point;
- every ``dask ...`` command (``dask scheduler``, ``dask worker``): the
  ``dask`` CLI loads each ``dask_cli`` entry point before it runs a command,
  and ours, ``dask_shm.cli``, is inside the package;
- worker processes that a Nanny spawns from a process that imported
  ``dask_shm`` (``LocalCluster(processes=True)``, ``dask worker``): this
  module.  A Nanny hands the worker process both its ``preload`` list, read
  from ``distributed.worker.preload`` when none is given explicitly, and its
  whole configuration, so importing ``dask_shm`` adds itself to that list.

It is appended to the configured list, never substituted for it, so a user's
own preloads keep running; the import is all it needs (the package has no
``dask_setup``).  What this cannot reach: a worker given an explicit,
non-empty ``preload=`` or ``--preload`` (it then ignores the configured list),
workers started by a process that never imported ``dask_shm``
(``python -m distributed.cli.dask_worker``, as cluster managers run them),
a configuration rebuilt with ``dask.config.refresh()`` after the import, and
a client process over ``tcp://``, which must ``import dask_shm`` itself.  The
README says so.
"""

from __future__ import annotations

from typing import Any

import dask.config

__all__ = ["MODULE", "add_worker_preload"]

#: What the workers import: the package, which registers the family.
MODULE = "dask_shm"
PRELOAD = "distributed.worker.preload"
PRELOAD_ARGV = "distributed.worker.preload-argv"


def add_worker_preload() -> None:
    """Append :data:`MODULE` to ``distributed.worker.preload`` in this process's
    configuration, keeping the modules already there (idempotent)."""
    preload: Any = dask.config.get(PRELOAD, default=None) or []
    if isinstance(preload, str):  # distributed accepts one module as a string
        preload = [preload]
    preload = list(preload)
    if MODULE in preload:
        return
    update: dict[str, Any] = {PRELOAD: [*preload, MODULE]}
    argv: Any = dask.config.get(PRELOAD_ARGV, default=None) or []
    # A list of lists gives each module its own arguments and must stay as
    # long as the module list (distributed refuses a mismatch); a flat list
    # goes to every module alike, and ours ignores it.
    if argv and not isinstance(argv[0], str):
        update[PRELOAD_ARGV] = [*argv, []]
    dask.config.set(update)
