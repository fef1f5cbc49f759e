"""Configuration: the packaged schema, start-up validation, and turning a
whole ``dask scheduler``/``dask worker``/``Client`` deployment onto shared
memory with one YAML file in the Dask config directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import dask
import jsonschema
import pytest
import yaml

from dask_shm.config import DEFAULTS_PATH, SCHEMA_PATH, ConfigError, Settings, settings

from .conftest import dask_processes, ours, wait_for


def test_schema_covers_every_key_and_accepts_the_defaults() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    defaults = yaml.safe_load(DEFAULTS_PATH.read_text())
    jsonschema.validate(defaults, schema)
    keys = {f.name.replace("_", "-") for f in fields(Settings)}
    assert set(schema["properties"]["dask-shm"]["properties"]) == keys
    assert set(defaults["dask-shm"]) == keys
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dask-shm": {"cold-transfer": "udp"}}, schema)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("threshold", -1, "non-negative byte count"),
        ("threshold", "lots", "non-negative byte count"),
        ("directory", "/no/such/dir", "existing directory"),
        ("serializers", ["shm", "nope"], "serialization families from"),
        ("cold-transfer", "udp", "'tcp' or 'shm'"),
        ("enabled", "maybe", "true or false"),
        ("pool-idle-timeout", "soon", "duration"),
        ("no-such-key", 1, "no such key"),
    ],
)
def test_invalid_values_name_key_value_and_what_is_allowed(
    key: str, value: object, allowed: str
) -> None:
    with dask.config.set({f"dask-shm.{key}": value}):
        with pytest.raises(ConfigError) as info:
            settings()
    msg = str(info.value)
    assert f"dask-shm.{key} = {value!r}" in msg and allowed in msg, msg


def test_serializers_accept_lists_and_comma_separated_strings() -> None:
    with dask.config.set({"dask-shm.serializers": "shm, dask,pickle"}):
        assert settings().serializers == ("shm", "dask", "pickle")
    with dask.config.set({"dask-shm.serializers": ["shm", "pickle"]}):
        assert settings().serializers == ("shm", "pickle")
    assert settings().serializers is None


@pytest.mark.parametrize(
    "variable, value",
    [
        ("THRESHOLD", "-1"),
        ("DIRECTORY", "/no/such/dir"),
        ("SERIALIZERS", '["shm", "nope"]'),
    ],
)
def test_invalid_configuration_fails_the_scheduler_at_start_up(
    variable: str, value: str
) -> None:
    env = dict(os.environ, **{f"DASK_DASK_SHM__{variable}": value})
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dask"), "scheduler", "--protocol", "shm",
         "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    key = variable.lower()
    assert f"ConfigError: Invalid configuration dask-shm.{key} = " in proc.stderr, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CLIENT = textwrap.dedent(
    """
    import json, os
    import numpy as np
    from distributed import Client
    from dask_shm import stats

    def where(x):
        addr = x.__array_interface__["data"][0]
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= addr < hi and len(parts) > 5:
                    return os.path.basename(parts[5])
        return None

    if __name__ == "__main__":
        with Client(timeout=30) as client:  # no address: the configuration's
            client.wait_for_workers(2, timeout=30)
            a, b = sorted(client.scheduler_info()["workers"])
            x = client.submit(np.arange, 4 * 10**6, workers=[a], pure=False)
            segment = client.submit(where, x, workers=[b]).result()
            got = client.gather(client.scatter(np.arange(10**6), workers=[a], direct=True))
            out = {
                "scheduler": client.scheduler.address,
                "workers": [a, b],
                "segment": segment,
                "gathered": int(got.sum()),
                "family": sum(
                    s.get("family-messages", 0)
                    for s in client.run(stats.snapshot).values()
                ) + stats.snapshot().get("family-messages", 0),
            }
            del x, got
            client.retire_workers()
        print(json.dumps(out))
    """
)


def test_one_config_file_turns_a_cli_deployment_onto_shm(tmp_path: Path) -> None:
    """The documented recipe, verbatim but for the port and a threshold low
    enough for small test arrays, with real CLI processes and no flags."""
    address = f"shm://127.0.0.1:{free_port()}"
    config_dir = tmp_path / "dask-config"
    config_dir.mkdir()
    (config_dir / "dask-shm.yaml").write_text(
        textwrap.dedent(
            f"""
            scheduler-address: {address}
            distributed:
              scheduler:
                preload: [dask_shm.preload]
            dask-shm:
              serializers: [shm, dask, pickle]
              threshold: 1 MiB
              cold-transfer: shm
            """
        )
    )
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DASK_") or k == "DASK_DASK_SHM__DIRECTORY"}
    env["DASK_CONFIG"] = str(config_dir)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with dask_processes(env) as start:
        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard")
        start("worker", "--nworkers", "2", "--nthreads", "1", "--no-dashboard")
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["scheduler"] == address
    assert all(w.startswith("shm://") for w in out["workers"]), out
    assert out["segment"] and out["segment"].startswith("dask-shm-"), out
    assert out["gathered"] == sum(range(10**6))
    assert out["family"] > 0, out
    assert wait_for(lambda: not ours()), ours()
