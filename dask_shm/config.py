"""Configuration: packaged defaults, their schema, and validated settings.

The defaults live in ``dask-shm.yaml`` beside this module and are merged into
Dask's configuration with :func:`dask.config.update_defaults` when
``dask_shm`` is imported, so every usual Dask mechanism overrides them: YAML
files in the Dask config directory, ``DASK_DASK_SHM__THRESHOLD=1MiB`` style
environment variables, and :func:`dask.config.set`.

Values are read lazily, when a comm is established, and validated then: an
invalid value raises :class:`ConfigError` naming the key, the value and what
is allowed.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, fields
from typing import Any

import dask.config
import yaml  # type: ignore[import-untyped]
from dask.utils import parse_bytes, parse_timedelta

__all__ = ["ConfigError", "Settings", "settings", "load_defaults", "SCHEMA_PATH"]

_HERE = pathlib.Path(__file__).parent
DEFAULTS_PATH = _HERE / "dask-shm.yaml"
SCHEMA_PATH = _HERE / "dask-shm-schema.yaml"

COLD_TRANSFER_CHOICES = ("tcp", "shm")
DEFAULT_DIRECTORY = "/dev/shm"


class ConfigError(ValueError):
    """An invalid ``dask-shm`` configuration value."""


def load_defaults() -> None:
    """Merge the packaged defaults into Dask's configuration (idempotent)."""
    with open(DEFAULTS_PATH) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


@dataclass(frozen=True)
class Settings:
    """Validated ``dask-shm`` settings, read at one point in time."""

    enabled: bool
    directory: str
    threshold: int
    buffer_size: int
    fragment_size: int
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

    Raises
    ------
    ConfigError
        If any value is invalid.
    """
    cfg = dask.config.get("dask-shm", default=None)
    if cfg is None:  # defaults not loaded yet (e.g. config was refreshed)
        load_defaults()
        cfg = dask.config.get("dask-shm")
    # Dask treats "-" and "_" alike; environment variables bring underscores.
    cfg = {str(k).replace("_", "-"): v for k, v in cfg.items()}
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

    return Settings(
        enabled=_bool("enabled", cfg["enabled"]),
        directory=directory,
        threshold=_nbytes("threshold", cfg["threshold"]),
        buffer_size=_nbytes("buffer-size", cfg["buffer-size"]),
        fragment_size=max(_nbytes("fragment-size", cfg["fragment-size"]), 64 * 1024),
        serializers=_serializers(cfg["serializers"]),
    )
