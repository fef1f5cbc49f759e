"""Configuration: the packaged schema, defaults that survive any way of
assembling the configuration, start-up validation, and turning a whole
``dask scheduler``/``dask worker``/``Client`` deployment onto shared memory
with one YAML file in the Dask config directory."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import dask
import jsonschema
import pytest
import yaml

from dask_shm.config import DEFAULTS_PATH, SCHEMA_PATH, ConfigError, Settings, settings

from .conftest import dask_processes, ours, wait_for

MiB = 2**20
#: The packaged defaults, spelled out: what a user who sets nothing gets.
DEFAULTS = Settings(
    enabled=True,
    directory="/dev/shm",
    threshold=4 * MiB,
    buffer_size=64 * MiB,
    fragment_size=8 * MiB,
    single_copy=True,
    serializers=None,
)


@pytest.fixture
def own_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let a test rebuild Dask's global configuration from the environment,
    with none of the caller's ``DASK_DASK_SHM__*`` variables (the test suite's
    own directory, for one); put the configuration back afterwards."""
    for name in list(os.environ):
        if name.startswith("DASK_DASK_SHM__"):
            monkeypatch.delenv(name)
    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def test_schema_and_defaults_stay_in_sync() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    defaults = yaml.safe_load(DEFAULTS_PATH.read_text())
    jsonschema.validate(defaults, schema)
    keys = {f.name.replace("_", "-") for f in fields(Settings)}
    assert set(schema["properties"]["dask-shm"]["properties"]) == set(defaults["dask-shm"])
    assert set(defaults["dask-shm"]) == keys
    for bad in ({"no-such-key": 1}, {"enabled": "maybe"}, {"fragment-size": [1]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"dask-shm": bad}, schema)


def test_packaged_defaults(own_config: None) -> None:
    dask.config.refresh()
    assert settings() == DEFAULTS


@pytest.mark.parametrize(
    "key, env_value, expected",
    [
        ("enabled", "False", False),
        ("directory", "<tmp_path>", "<tmp_path>"),
        ("threshold", "4MiB", 4 * MiB),
        ("buffer-size", "16 MiB", 16 * MiB),
        ("fragment-size", "1 MiB", 1 * MiB),
        ("single-copy", "false", False),
        ("serializers", '["shm", "pickle"]', ("shm", "pickle")),
    ],
)
def test_one_key_in_the_environment_keeps_every_other_default(
    key: str,
    env_value: str,
    expected: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    own_config: None,
) -> None:
    if env_value == "<tmp_path>":
        env_value = expected = str(tmp_path)
    monkeypatch.setenv("DASK_DASK_SHM__" + key.upper().replace("-", "_"), env_value)
    want = dataclasses.replace(DEFAULTS, **{key.replace("-", "_"): expected})
    # Before any refresh that knows our defaults: what a process holds when
    # it collected its environment before importing dask_shm, and what
    # distributed.utils_test's reset_config() restores when it was imported
    # first. The dask-shm section then holds this one key only.
    others = [d for d in dask.config.defaults if "dask-shm" not in d]
    dask.config.refresh(defaults=others)
    assert set(dask.config.get("dask-shm")) == {key.replace("-", "_")}
    assert settings() == want
    # After a refresh with our defaults among Dask's.
    dask.config.refresh()
    assert settings() == want


def test_distributed_test_utilities_keep_the_defaults(tmp_path: Path) -> None:
    """The reported sequence in a fresh process: distributed.utils_test
    imported first snapshots the configuration, reset_config() restores it."""
    script = textwrap.dedent(
        """
        from distributed.utils_test import reset_config
        import dask_shm
        reset_config()
        print(dask_shm.settings())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DASK_SHM__THRESHOLD"] = "2MiB"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(dataclasses.replace(DEFAULTS, threshold=2 * MiB))


def test_zero_buffer_size_needs_no_fragment_size() -> None:
    with dask.config.set({"dask-shm.buffer-size": 0, "dask-shm.fragment-size": "64 KiB"}):
        conf = settings()
    assert (conf.buffer_size, conf.fragment_size) == (0, 64 * 1024)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("threshold", -1, "non-negative byte count"),
        ("threshold", "lots", "non-negative byte count"),
        ("directory", "/no/such/dir", "existing directory"),
        ("serializers", ["shm", "nope"], "serialization families from"),
        ("enabled", "maybe", "true or false"),
        ("buffer-size", -1, "non-negative byte count"),
        ("buffer-size", "1 MiB", "0 (no shared memory for sending) or a byte count of at least "
         "dask-shm.fragment-size (8.00 MiB)"),
        ("fragment-size", "32 KiB", "at least 65536 (64 KiB)"),
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
    assert "DASK_DASK_SHM__" + key.upper().replace("-", "_") in msg, msg  # how to set it


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

    def nbytes(x):
        return int(x.nbytes)

    if __name__ == "__main__":
        with Client(timeout=30) as client:  # no address: the configuration's
            client.wait_for_workers(2, timeout=30)
            a, b = sorted(client.scheduler_info()["workers"])
            x = client.submit(np.arange, 4 * 10**6, workers=[a], pure=False)
            moved = client.submit(nbytes, x, workers=[b]).result()
            got = client.gather(client.scatter(np.arange(10**6), workers=[a], direct=True))
            out = {
                "scheduler": client.scheduler.address,
                "workers": [a, b],
                "moved": moved,
                "shm-messages": sum(
                    s.get("shm-messages", 0) for s in client.run(stats.snapshot).values()
                ),
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
    assert out["moved"] == 4 * 10**6 * 8
    assert out["shm-messages"] > 0, out  # worker to worker, through shared memory
    assert out["gathered"] == sum(range(10**6))
    assert out["family"] > 0, out
    assert wait_for(lambda: not ours()), ours()
