"""The descriptor codec, in memory: round trips, and hostile input that must
only ever produce a DescriptorError (never another exception, never a file
opened: the codec does no I/O at all)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_shm.descriptor import MAX_EXTENT, Placement, decode, encode
from dask_shm.segments import DescriptorError, Owner, current_owner

ME = current_owner()
OTHER = Owner(ME.pid + 1, ME.start, ME.ns)

tokens = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)


def name_of(owner: Owner, token: str, kind: str = "s") -> str:
    return f"dask-shm-{owner.pid}-{owner.start}-{owner.ns}-{kind}-{token}"


@st.composite
def messages(draw: st.DrawFn) -> tuple[int, list[Placement]]:
    nframes = draw(st.integers(1, 40))
    indices = sorted(draw(st.sets(st.integers(0, nframes - 1), min_size=1)))
    placements = [
        Placement(
            i,
            name_of(ME, draw(tokens)),
            draw(st.integers(0, MAX_EXTENT - 1)),
            draw(st.integers(1, MAX_EXTENT - 1)),
        )
        for i in indices
    ]
    return nframes, placements


@given(messages())
def test_round_trip(msg: tuple[int, list[Placement]]) -> None:
    nframes, placements = msg
    data = encode(nframes, placements)
    assert decode(data, ninline=nframes - len(placements), owner=ME) == placements


@given(st.binary(max_size=2000), st.integers(0, 50))
def test_random_bytes_only_ever_give_descriptor_errors(data: bytes, ninline: int) -> None:
    try:
        decode(data, ninline=ninline, owner=ME)
    except DescriptorError:
        pass


@settings(max_examples=300)
@given(messages(), st.data())
def test_mutated_descriptors_only_ever_give_descriptor_errors(
    msg: tuple[int, list[Placement]], data: st.DataObject
) -> None:
    nframes, placements = msg
    raw = bytearray(encode(nframes, placements))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=20))
    try:
        out = decode(bytes(raw), ninline=nframes - len(placements), owner=ME)
    except DescriptorError:
        return
    for p in out:  # whatever survives is still one of the peer's data segments
        assert p.name.startswith(f"dask-shm-{ME.pid}-{ME.start}-{ME.ns}-s-")
        assert "/" not in p.name and 0 < p.length < MAX_EXTENT and p.offset < MAX_EXTENT


def _raw(name: bytes, offset: int = 0, length: int = 10, index: int = 0, nframes: int = 1) -> bytes:
    head = struct.pack("<4sBBII", b"DSHM", 1, 0, nframes, 1)
    return head + struct.pack("<IQQB", index, offset, length, len(name)) + name


@pytest.mark.parametrize(
    "name",
    [
        b"../../etc/passwd",
        b"/etc/passwd",
        b"/dev/shm/" + name_of(ME, "0" * 32).encode(),
        b"./" + name_of(ME, "0" * 32).encode(),
        name_of(ME, "0" * 32).encode() + b"/x",
        name_of(ME, "0" * 32).encode() + b"\x00",
        b"psm_4f2a",
        b"dask-shm-../../x",
        name_of(ME, "0" * 31).encode(),  # short token
        name_of(ME, "G" * 32).encode(),  # not hex
        name_of(ME, "0" * 32, kind="p").encode(),  # a probe, not data
        name_of(ME, "0" * 32, kind="f").encode(),  # a parked segment
        name_of(OTHER, "0" * 32).encode(),  # another process's segment
        "dask-shm-é".encode(),
        b"\xff\xfe",
    ],
)
def test_adversarial_names_are_refused(name: bytes) -> None:
    with pytest.raises(DescriptorError):
        decode(_raw(name), ninline=0, owner=ME)


@pytest.mark.parametrize(
    "offset, length, index, nframes, ninline",
    [
        (2**63, 10, 0, 1, 0),  # offset beyond any file
        (0, 2**63, 0, 1, 0),  # length beyond any file
        (2**64 - 1, 2**64 - 1, 0, 1, 0),  # sums that would overflow
        (0, 0, 0, 1, 0),  # empty frame
        (0, 10, 1, 1, 0),  # index out of range
        (0, 10, 0, 1, 1),  # frame counts disagree
        (0, 10, 0, 2**32 - 1, 0),
    ],
)
def test_bad_extents_and_counts_are_refused(
    offset: int, length: int, index: int, nframes: int, ninline: int
) -> None:
    with pytest.raises(DescriptorError):
        decode(
            _raw(name_of(ME, "0" * 32).encode(), offset, length, index, nframes),
            ninline=ninline,
            owner=ME,
        )
