"""A scheduler preload that listens on the ``shm://`` address named by the
``scheduler-address`` configuration key.

``dask scheduler`` has no configuration key for its own protocol: the
``--protocol`` option defaults to TCP, and ``distributed.comm.default-scheme``
only applies to addresses one *connects* to.  ``scheduler-address``, on the
other hand, is what ``dask worker`` (started without an address) and
``Client()`` (without an address) connect to.  With this preload in
``distributed.scheduler.preload`` the scheduler also listens there, so one
configuration file turns a whole ``dask scheduler``/``dask worker``/``Client``
deployment onto ``shm://``::

    scheduler-address: shm://10.0.0.5:8788
    distributed:
      scheduler:
        preload: [dask_shm.preload]

Workers listen with their scheduler's scheme, so worker-to-worker transfers
use ``shm://`` too.  The scheduler keeps its usual listener (``tcp://...:8786``
unless told otherwise) for anything configured the old way.
"""

from __future__ import annotations

import logging
from typing import Any

import dask.config

from dask_shm.config import settings

__all__ = ["dask_setup"]

logger = logging.getLogger(__name__)
#: Announced beside the scheduler's own "Scheduler at:" lines, where operators
#: look for it (distributed configures only its own loggers' output).
announce = logging.getLogger("distributed.scheduler")


async def dask_setup(server: Any) -> None:
    """Add an ``shm://`` listener to a scheduler (ignored by other servers)."""
    from distributed import Scheduler
    from distributed.comm.addressing import parse_address

    if not isinstance(server, Scheduler):
        return  # workers and nannies follow their scheduler's address scheme
    address = dask.config.get("scheduler-address", None)
    if not address or parse_address(address)[0] != "shm":
        logger.warning(
            "dask_shm.preload: scheduler-address is %r, not an shm:// address; "
            "not adding a listener. Set scheduler-address: shm://<host>:<port>.",
            address,
        )
        return
    if any(listener.contact_address == address for listener in server.listeners):
        return  # started with --protocol shm on that very address
    settings()  # an invalid dask-shm configuration fails the start-up here
    # The same arguments Scheduler.start_unsafe gives its own listeners.
    await server.listen(
        address,
        allow_offload=False,
        handshake_overrides={"pickle-protocol": 4, "compression": None},
        **server.security.get_listen_args("scheduler"),
    )
    announce.info("  Scheduler at: %25s (dask_shm.preload)", server.listeners[-1].contact_address)
