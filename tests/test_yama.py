"""Single copy under Yama: where ``ptrace_scope`` is 1 a process that sets up
an ``shm://`` handshake declares itself readable by its user's processes,
as Open MPI and MPICH do (see dask_shm.single_copy).  This kernel has no
Yama, so the scope file is injected and the declaration recorded; the
refusal path itself runs for real in test_single_copy.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.protocol import to_serialize

from dask_shm import single_copy

from .conftest import echo_server


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Each call of the (recorded) prctl; this process starts undecided."""
    made: list[str] = []

    def prctl() -> int:
        made.append("PR_SET_PTRACER_ANY")
        return 0

    monkeypatch.setattr(single_copy, "_declared", None)
    monkeypatch.setattr(single_copy, "_prctl_set_ptracer_any", prctl)
    yield made


def scope_file(tmp_path: Path, content: str | None) -> str:
    path = tmp_path / "ptrace_scope"
    if content is not None:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    ("content", "outcome", "declared"),
    [
        ("0\n", "not-needed", False),
        ("1\n", "declared", True),
        ("2\n", "scope-2", False),
        ("3\n", "scope-3", False),
        (None, "no-yama", False),
        ("garbage", "no-yama", False),
    ],
)
def test_the_decision_follows_the_scope(
    tmp_path: Path, calls: list[str], content: str | None, outcome: str, declared: bool
) -> None:
    path = scope_file(tmp_path, content)
    assert single_copy.declare_readable(True, scope_path=path) == outcome
    assert calls == (["PR_SET_PTRACER_ANY"] if declared else [])
    # Once per process: asking again changes nothing and calls nothing.
    assert single_copy.declare_readable(True, scope_path=path) == outcome
    assert len(calls) == int(declared)


def test_single_copy_off_never_touches_the_ptrace_settings(
    tmp_path: Path, calls: list[str]
) -> None:
    path = scope_file(tmp_path, "1")
    assert single_copy.declare_readable(False, scope_path=path) == "off"
    assert calls == []
    # "off" is not remembered: a later comm configured otherwise decides then.
    assert single_copy.declare_readable(True, scope_path=path) == "declared"


def test_a_refused_declaration_is_reported(tmp_path: Path, calls: list[str]) -> None:
    path = scope_file(tmp_path, "1")
    assert single_copy.declare_readable(True, scope_path=path, prctl=lambda: 1) == "refused"


def test_the_real_call_is_the_kernels_to_refuse() -> None:
    """Without Yama the kernel rejects PR_SET_PTRACER (EINVAL); with it, 0."""
    err = single_copy._prctl_set_ptracer_any()
    has_yama = single_copy.yama_scope() is not None
    assert err == 0 if has_yama else err != 0


@pytest.mark.parametrize("enabled", [True, False])
def test_a_handshake_declares_where_the_scope_is_one(
    tmp_path: Path, calls: list[str], monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """A real shm:// handshake on a host whose scope is 1 declares once, before
    its info reaches the peer, and only with single-copy on."""
    monkeypatch.setattr(single_copy, "YAMA_SCOPE", scope_file(tmp_path, "1"))

    async def main() -> None:
        async with listen("shm://127.0.0.1:0", echo_server) as listener:
            comm = await connect(listener.contact_address)
            try:
                assert comm.link is not None  # type: ignore[attr-defined]
                x = np.arange(2 * 10**6, dtype=np.uint8)
                await comm.write({"x": to_serialize(x)})
                assert np.array_equal((await comm.read())["x"], x)
            finally:
                await comm.close()

    with dask.config.set({"dask-shm.single-copy": enabled}):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert calls == (["PR_SET_PTRACER_ANY"] if enabled else [])
