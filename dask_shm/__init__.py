"""dask-shm: same-host shared memory for Dask distributed.

Importing this package merges its configuration defaults into Dask's,
registers the ``"shm"`` serialization family and adds itself to the worker
preloads, so that worker processes spawned from here know the family too
(:mod:`dask_shm.propagate`).  The ``shm://`` comm backend is found through the
``distributed.comm.backends`` entry point, which imports this package, so
nothing needs importing by hand in a process that uses ``shm://``.
"""

from __future__ import annotations

from dask_shm.config import ConfigError, Settings, load_defaults, settings
from dask_shm.propagate import add_worker_preload

load_defaults()
add_worker_preload()

from dask_shm import family, stats  # noqa: E402

family.register()
from dask_shm.errors import DescriptorError, ShmError, ShmFull  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DescriptorError",
    "Settings",
    "ShmError",
    "ShmFull",
    "settings",
    "stats",
    "__version__",
]
