"""The descriptor codec, in memory: round trips, and hostile input that must
only ever produce a DescriptorError naming the problem (never another
exception; the codec does no I/O at all, so nothing it refuses was read)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_shm.descriptor import INLINE, MAGIC, MAX_TOTAL, VERSION, decode, encode
from dask_shm.errors import DescriptorError

BUFFER = 64 << 20  # the sender's buffer size the receiver knows from the handshake

Fragments = list[tuple[int, int]]


def inline_lengths(fragments: Fragments) -> list[int]:
    return [n for offset, n in fragments if offset == INLINE]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[int], list[Fragments]]:
    """A message's frame lengths and its fragments cut into descriptors, as a
    sender makes them: a packed stream, each piece a region of the buffer or
    an inline frame."""
    lengths = draw(st.lists(st.integers(0, 3 * BUFFER), min_size=1, max_size=30))
    total = sum(lengths)
    if total == 0:
        lengths[0] = total = 1
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=20)) if total > 1 else set())
    bounds = [0, *cuts, total]
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        n = hi - lo
        if n > BUFFER or draw(st.booleans()) and draw(st.booleans()):
            pieces.append((INLINE, n))
        else:
            pieces.append((draw(st.integers(0, BUFFER - n)), n))
    groups: list[Fragments] = []
    while pieces:
        k = draw(st.integers(1, len(pieces)))
        groups.append(pieces[:k])
        pieces = pieces[k:]
    return lengths, groups


@given(streams())
def test_round_trip_of_a_streamed_message(msg: tuple[list[int], list[Fragments]]) -> None:
    lengths, groups = msg
    remaining: int | None = None
    for i, fragments in enumerate(groups):
        first = i == 0
        data = encode(lengths if first else None, fragments)
        got_lengths, got, _remote = decode(
            data, first=first, buffer_size=BUFFER, remaining=remaining,
            inline=inline_lengths(fragments),
        )
        assert got == fragments
        assert got_lengths == (lengths if first else None)
        remaining = (sum(lengths) if first else remaining) - sum(n for _, n in fragments)  # type: ignore[operator]
    assert remaining == 0


@given(st.binary(max_size=2000), st.booleans(), st.lists(st.integers(0, 1 << 40), max_size=5))
def test_random_bytes_only_ever_give_descriptor_errors(
    data: bytes, first: bool, inline: list[int]
) -> None:
    try:
        decode(data, first=first, buffer_size=BUFFER, remaining=None if first else 1 << 30, inline=inline)
    except DescriptorError:
        pass


@settings(max_examples=300)
@given(streams(), st.data())
def test_mutated_descriptors_only_ever_give_descriptor_errors(
    msg: tuple[list[int], list[Fragments]], data: st.DataObject
) -> None:
    lengths, groups = msg
    fragments = groups[0]
    raw = bytearray(encode(lengths, fragments))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=20))
    inline = inline_lengths(fragments)
    try:
        got_lengths, got, _remote = decode(bytes(raw), first=True, buffer_size=BUFFER, remaining=None, inline=inline)
    except DescriptorError:
        return
    # Whatever survives describes a message the receiver can safely read.
    assert got_lengths is not None and 0 < sum(got_lengths) <= MAX_TOTAL
    assert sum(n for _, n in got) <= sum(got_lengths)
    assert [n for off, n in got if off == INLINE] == inline
    for offset, n in got:
        assert n > 0 and (offset == INLINE or offset + n <= BUFFER)


def raw(
    frames: list[int] | None, fragments: Fragments, *, magic: bytes = MAGIC,
    version: int = VERSION, flags: int | None = None, nframes: int | None = None,
    nfrags: int | None = None,
) -> bytes:
    """A descriptor with any field set to anything, as a hostile peer would."""
    frames = frames or []
    if flags is None:
        flags = 1 if frames else 0
    head = struct.pack(
        "<4sBBII", magic, version, flags,
        len(frames) if nframes is None else nframes,
        len(fragments) if nfrags is None else nfrags,
    )
    return head + struct.pack(f"<{len(frames) + 2 * len(fragments)}Q", *frames,
                              *(x for f in fragments for x in f))


@pytest.mark.parametrize(
    "data, first, remaining, inline, problem",
    [
        pytest.param(raw([100], [(BUFFER - 50, 100)]), True, None, [], "outside", id="region-past-the-end"),
        pytest.param(raw([100], [(2**64 - 2, 100)]), True, None, [], "outside", id="offset-that-would-wrap"),
        pytest.param(raw([2**40], [(0, 2**40)]), True, None, [], "outside", id="region-larger-than-buffer"),
        pytest.param(raw([100], [(0, 0)]), True, None, [], "length 0", id="empty-fragment"),
        pytest.param(raw([100], [(0, 101)]), True, None, [], "length 101", id="longer-than-message"),
        pytest.param(raw(None, [(0, 11)]), False, 10, [], "length 11", id="longer-than-rest"),
        pytest.param(raw([2**48, 2**48], [(0, 1)]), True, None, [], "implausible", id="huge-message"),
        pytest.param(raw([100], [(INLINE, 100)]), True, None, [], "no inline frame", id="inline-missing"),
        pytest.param(raw([100], [(INLINE, 100)]), True, None, [99], "no inline frame", id="inline-length"),
        pytest.param(raw([100], [(0, 100)]), True, None, [100], "not described", id="inline-extra"),
        pytest.param(raw([100], [(INLINE, 50), (0, 50)]), True, None, [50, 50], "not described",
                     id="inline-count"),
        pytest.param(raw([100], [(0, 100)], magic=b"NOPE"), True, None, [], "bad magic", id="magic"),
        pytest.param(raw([100], [(0, 100)], version=1), True, None, [], "version 1", id="old-version"),
        pytest.param(raw(None, [(0, 100)]), True, None, [], "expected the start", id="not-first"),
        pytest.param(raw([100], [(0, 100)]), False, 100, [], "expected the rest", id="first-again"),
        pytest.param(raw([100], [(0, 100)], flags=0x81), True, None, [], "flags", id="unknown-flag"),
        pytest.param(raw([], [(0, 100)], flags=1), True, None, [], "0 frames", id="no-frames"),
        pytest.param(raw([100], []), True, None, [], "0 fragments", id="no-fragments"),
        pytest.param(raw([100], [(0, 100)], nfrags=2), True, None, [], "does not hold", id="count-too-big"),
        pytest.param(raw([100], [(0, 100)], nframes=2**32 - 1), True, None, [], "frames", id="frames-huge"),
        pytest.param(raw([100], [(0, 100)])[:-1], True, None, [], "does not hold", id="truncated"),
        pytest.param(raw([100], [(0, 100)]) + b"\0", True, None, [], "does not hold", id="trailing"),
        pytest.param(b"DSH", True, None, [], "truncated", id="shorter-than-header"),
        pytest.param("DSHM", True, None, [], "str", id="a-str"),
        pytest.param(None, True, None, [], "NoneType", id="none"),
    ],
)
def test_hostile_descriptors_are_refused_naming_the_problem(
    data: Any, first: bool, remaining: int | None, inline: list[int], problem: str
) -> None:
    with pytest.raises(DescriptorError, match=problem):
        decode(data, first=first, buffer_size=BUFFER, remaining=remaining, inline=inline)


def test_a_region_may_end_exactly_at_the_end_of_the_buffer() -> None:
    fragments = [(BUFFER - 100, 100)]
    assert decode(encode([100], fragments), first=True, buffer_size=BUFFER,
                  remaining=None, inline=[]) == ([100], fragments, False)


def test_an_in_place_descriptor_lists_addresses_not_buffer_regions() -> None:
    """With the REMOTE flag the offsets are addresses in the sender's memory:
    no buffer bound applies, but inline frames are refused."""
    fragments = [(2**47, 100), (2**47 + 4096, 50)]
    data = encode([100, 50], fragments, remote=True)
    assert decode(data, first=True, buffer_size=BUFFER, remaining=None, inline=[]) == (
        [100, 50], fragments, True)
    with pytest.raises(DescriptorError):
        decode(encode([100], [(INLINE, 100)], remote=True), first=True, buffer_size=BUFFER,
               remaining=None, inline=[100])
