"""Names and identity, in memory and in a scratch directory: adversarial
names never pass, files a peer names are judged on what was opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_shm.errors import DescriptorError
from dask_shm.names import (
    KINDS,
    MAX_NAME_LENGTH,
    Directory,
    Owner,
    check_file,
    check_name,
    current_owner,
    new_name,
    parse_name,
)

ME = current_owner()
OTHER = Owner(ME.pid + 1, ME.start, ME.ns, ME.boot)


def name_of(owner: Owner, token: str = "0" * 32, kind: str = "b") -> str:
    return f"dask-shm-{owner.pid}-{owner.start}-{owner.ns}-{owner.boot}-{kind}-{token}"


def test_owner_identity_in_names() -> None:
    for kind in KINDS:
        name = new_name(kind)
        assert name.startswith(f"dask-shm-{ME.pid}-{ME.start}-{ME.ns}-{ME.boot}-{kind}-")
        assert parse_name(name) == (ME, kind)
        assert len(name) <= MAX_NAME_LENGTH
    assert new_name("b") != new_name("b")


@given(st.sampled_from(sorted(KINDS)), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
def test_names_round_trip(kind: str, token: str) -> None:
    assert check_name(name_of(ME, token, kind), ME, kind) == name_of(ME, token, kind)


@given(st.text(max_size=200))
def test_arbitrary_text_is_never_a_name_unless_it_matches_exactly(text: str) -> None:
    try:
        owner, kind = parse_name(text)
    except DescriptorError:
        return
    assert text.startswith("dask-shm-") and "/" not in text and kind in KINDS
    assert text.endswith(f"-{kind}-{text[-32:]}")


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "/dev/shm/" + name_of(ME),
        "./" + name_of(ME),
        name_of(ME) + "/x",
        name_of(ME) + "\x00",
        name_of(ME) + "\n",
        "psm_4f2a",
        "dask-shm-../../x",
        name_of(ME, "0" * 31),  # short token
        name_of(ME, "0" * 33),  # long token
        name_of(ME, "G" * 32),  # not hex
        name_of(ME, "A" * 32),  # upper case
        name_of(ME, kind="s"),  # a kind of the old design
        name_of(ME, kind="f"),
        "dask-shm-é",
        "x" * 100_000,
        b"dask-shm-1-2-3-0000000000000000-b-" + b"0" * 32,  # bytes, not str
        f"dask-shm-{ME.pid}-{ME.start}-{ME.ns}-b-{'0' * 32}",  # no boot id (version 2)
        None,
        42,
        ["dask-shm"],
    ],
)
def test_adversarial_names_are_refused(name: object) -> None:
    with pytest.raises(DescriptorError, match="not a dask-shm name"):
        parse_name(name)
    for kind in KINDS:
        with pytest.raises(DescriptorError):
            check_name(name, ME, kind)


@pytest.mark.parametrize(
    "name, kind",
    [
        (name_of(OTHER), "b"),  # another process's buffer
        (name_of(Owner(ME.pid, ME.start + 1, ME.ns, ME.boot)), "b"),  # the pid, reused
        (name_of(Owner(ME.pid, ME.start, ME.ns + 1, ME.boot)), "b"),  # another pid namespace
        (name_of(Owner(ME.pid, ME.start, ME.ns, "f" * 16)), "b"),  # another host's
        (name_of(ME, kind="p"), "b"),  # a probe offered as a buffer
        (name_of(ME, kind="b"), "r"),  # a buffer offered as a release socket
        (name_of(ME, kind="r"), "p"),
    ],
)
def test_names_of_another_owner_or_kind_are_refused(name: str, kind: str) -> None:
    with pytest.raises(DescriptorError, match=f"not a {KINDS[kind]} of the peer"):
        check_name(name, ME, kind)


def test_check_file_judges_type_mode_and_links(tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"x")
    regular.chmod(0o600)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert check_file(os.stat(regular)) is None
    assert check_file(os.stat(fifo)) == "not a regular file"
    assert check_file(os.stat(tmp_path)) == "not a regular file"
    regular.chmod(0o640)
    assert "not owner-only" in str(check_file(os.stat(regular)))
    regular.chmod(0o600)
    os.link(regular, tmp_path / "alias")
    assert check_file(os.stat(regular)) == "2 hard links"


def test_unlink_never_fails_and_stays_in_the_directory(tmp_path: Path) -> None:
    """Cleanup always gets through: a name already gone, a directory planted
    under one of our names (removed if empty, left with a warning if not)."""
    inside = tmp_path / "shm"
    inside.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    d = Directory(str(inside))
    try:
        assert d.unlink(new_name("b")) is False
        empty = new_name("b")
        (inside / empty).mkdir()
        assert d.unlink(empty) is True and not (inside / empty).exists()
        full = new_name("b")
        (inside / full).mkdir()
        (inside / full / "x").write_bytes(b"")
        assert d.unlink(full) is False and (inside / full / "x").exists()
        link = new_name("b")
        os.symlink(outside, inside / link)
        assert d.unlink(link) is True  # the link goes, never its target
        assert outside.read_bytes() == b"keep"
    finally:
        d.close()
