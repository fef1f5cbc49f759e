"""The README stays true to the code: its configuration table lists exactly
the schema's keys, every command it shows runs, and its benchmark summary is
what the committed results JSON renders to."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dask_shm.config import SCHEMA_PATH

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block(start: str, end: str) -> str:
    return README[README.index(start) + len(start) : README.index(end)]


def test_config_table_lists_exactly_the_schema_keys() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    keys = set(schema["properties"]["dask-shm"]["properties"])
    table = _block("<!-- config-table -->", "<!-- /config-table -->")
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M))
    assert documented == keys


def _commands() -> list[list[str]]:
    """Each command in the README's console blocks, cut to its command words
    (options and arguments dropped) and given ``--help``."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if not words or words[0] == "pip":
                    continue  # installs: .ci/run runs the README's two commands
                if words[:3] == ["python", "-m", "pytest"]:
                    out.append([sys.executable, "-m", "pytest", "--help"])
                    continue
                cut = []
                for w in words:
                    if w.startswith("-") or "/" in w or ":" in w:
                        break
                    cut.append(w)
                exe = str(Path(sys.executable).parent / cut[0])
                out.append([exe, *cut[1:], "--help"])
    return out


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(Path(c[0]).name for _ in [0]) + " " + " ".join(c[1:]))
def test_every_readme_command_runs(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_benchmark_summary_matches_the_committed_json() -> None:
    from dask_shm.bench import results
    from dask_shm.bench.report import README_MARKERS, readme_summary

    run = results.load(str(ROOT / "docs" / "results.json"))
    assert _block(*README_MARKERS).strip() == readme_summary(run).strip()
