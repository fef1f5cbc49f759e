"""Configuration: packaged defaults, their schema, and validated settings.

The defaults live in ``dask-shm.yaml`` beside this module and are merged into
Dask's configuration with :func:`dask.config.update_defaults` when
``dask_shm`` is imported, so every usual Dask mechanism overrides them: YAML
files in the Dask config directory, ``DASK_DASK_SHM__THRESHOLD=1MiB`` style
environment variables, and :func:`dask.config.set`.

Values are read lazily, when a comm is established, and validated then: an
invalid value raises :class:`ConfigError` naming the key, the value and what
is allowed.

Every key falls back to its packaged default on its own, whatever assembled
the configuration: Dask's configuration can hold a ``dask-shm`` section
without our defaults in it (a ``DASK_DASK_SHM__THRESHOLD`` variable collected
by ``dask.config.refresh()`` or at ``import dask`` before ``dask_shm`` was
imported, or a snapshot restored by distributed's test utilities), so the
defaults are read from the packaged file here rather than trusted to be in
the global configuration.
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import dask.config
import yaml  # type: ignore[import-untyped]
from dask.utils import format_bytes, parse_bytes

__all__ = [
    "ConfigError",
    "Settings",
    "settings",
    "load_defaults",
    "packaged_defaults",
    "DEFAULTS_PATH",
    "SCHEMA_PATH",
    "MIN_FRAGMENT_SIZE",
]

_HERE = pathlib.Path(__file__).parent
DEFAULTS_PATH = _HERE / "dask-shm.yaml"
SCHEMA_PATH = _HERE / "dask-shm-schema.yaml"

DEFAULT_DIRECTORY = "/dev/shm"
#: Each fragment costs one exchange of descriptors over the socket: a floor on
#: its size keeps a large message from turning into a flood of them.
MIN_FRAGMENT_SIZE = 64 * 1024


class ConfigError(ValueError):
    """An invalid ``dask-shm`` configuration value."""


@functools.cache
def _packaged() -> dict[str, Any]:
    with open(DEFAULTS_PATH) as f:
        loaded: dict[str, Any] = yaml.safe_load(f)
    return loaded


def packaged_defaults() -> dict[str, Any]:
    """The ``dask-shm`` section of the packaged ``dask-shm.yaml`` (a copy)."""
    return dict(_packaged()["dask-shm"])


def load_defaults() -> None:
    """Merge the packaged defaults into Dask's configuration (idempotent), so
    that ``dask config get dask-shm`` shows them and Nannies hand them to the
    workers they spawn."""
    dask.config.update_defaults({"dask-shm": packaged_defaults()})


@dataclass(frozen=True)
class Settings:
    """Validated ``dask-shm`` settings, read at one point in time."""

    enabled: bool
    directory: str
    threshold: int
    #: Bytes of the one shared buffer a sending process keeps; 0 sends
    #: nothing through shared memory.
    buffer_size: int
    #: The largest piece of a message placed in the buffer at once.
    fragment_size: int
    #: Let a peer that may read this process's memory copy frames out of it
    #: directly (one copy) instead of through the buffer (two).
    single_copy: bool
    #: Serialization families for ``shm://`` writes that name none, or None
    #: to leave distributed's defaults alone.
    serializers: tuple[str, ...] | None


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(
        f"Invalid configuration dask-shm.{key} = {value!r}: expected {allowed}. "
        "Set it in a Dask config file, with DASK_DASK_SHM__"
        f"{key.upper().replace('-', '_')}=..., or dask.config.set."
    )


def _nbytes(key: str, value: Any) -> int:
    try:
        n = parse_bytes(value) if isinstance(value, str) else value
    except (ValueError, TypeError):
        n = None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise _bad(key, value, 'a non-negative byte count such as 262144 or "256 KiB"')
    return n


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # Environment variables arrive as strings ("False" is parsed by dask, but
    # be lenient about case).
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(key, value, "true or false")


def _serializers(value: Any) -> tuple[str, ...] | None:
    from distributed.protocol.serialize import families  # "shm" registered by dask_shm

    if value is None:
        return None
    allowed = set(families) - {"error"}  # "error" is distributed's internal marker
    names = value.split(",") if isinstance(value, str) else value
    if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
        names = tuple(n.strip() for n in names)
        if all(n in allowed for n in names):
            return names
    raise _bad(
        "serializers",
        value,
        "null or a list of serialization families from " + ", ".join(sorted(allowed)),
    )


def settings() -> Settings:
    """Read and validate the current ``dask-shm`` configuration.

    Each key not set by the user has its packaged default, however the
    configuration was assembled.

    Raises
    ------
    ConfigError
        If any value is invalid.
    """
    configured = dask.config.get("dask-shm", default=None)
    if configured is None:
        configured = {}
    if not isinstance(configured, Mapping):
        raise ConfigError(
            f"Invalid configuration dask-shm = {configured!r}: expected a mapping of "
            "the keys in dask-shm-schema.yaml. Set single keys, e.g. "
            "DASK_DASK_SHM__THRESHOLD=..., in a Dask config file or with dask.config.set."
        )
    # Dask treats "-" and "_" alike; environment variables bring underscores.
    cfg = packaged_defaults()
    cfg.update({str(k).replace("_", "-"): v for k, v in configured.items()})
    unknown = set(cfg) - {f.name.replace("_", "-") for f in fields(Settings)}
    if unknown:
        key = sorted(unknown)[0]
        raise _bad(key, cfg[key], "no such key (see dask-shm-schema.yaml)")

    directory = cfg["directory"]
    # A missing default (/dev/shm on a system without it) means "no shared
    # memory here": shm:// then works as TCP, with a warning.  A directory
    # the user chose must exist.
    if not isinstance(directory, str) or (
        directory != DEFAULT_DIRECTORY and not os.path.isdir(directory)
    ):
        raise _bad("directory", directory, "an existing directory, normally /dev/shm")

    fragment_size = _nbytes("fragment-size", cfg["fragment-size"])
    if fragment_size < MIN_FRAGMENT_SIZE:
        raise _bad(
            "fragment-size",
            cfg["fragment-size"],
            f'a byte count of at least {MIN_FRAGMENT_SIZE} (64 KiB) such as "8 MiB"',
        )
    buffer_size = _nbytes("buffer-size", cfg["buffer-size"])
    if 0 < buffer_size < fragment_size:
        raise _bad(
            "buffer-size",
            cfg["buffer-size"],
            "0 (no shared memory for sending) or a byte count of at least "
            f"dask-shm.fragment-size ({format_bytes(fragment_size)})",
        )

    return Settings(
        enabled=_bool("enabled", cfg["enabled"]),
        single_copy=_bool("single-copy", cfg["single-copy"]),
        directory=directory,
        threshold=_nbytes("threshold", cfg["threshold"]),
        buffer_size=buffer_size,
        fragment_size=fragment_size,
        serializers=_serializers(cfg["serializers"]),
    )
