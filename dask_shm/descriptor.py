"""The descriptor codec: which frames of a message live in which segments.

Pure functions, no I/O: a descriptor is validated completely here before the
receiver opens or maps anything.

Layout (version 1, little-endian)::

    b"DSHM"  version:u8  flags:u8  nframes:u32  nplaced:u32
    nplaced times:
        index:u32  offset:u64  length:u64  namelen:u8  name:namelen ASCII bytes

``nframes`` counts every frame of the message; the ``nframes - nplaced``
frames not listed travel inline over TCP, in order.  Indices are strictly
increasing; ``name`` is a data segment owned by the sending peer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dask_shm.segments import DescriptorError, Owner, check_name

__all__ = ["Placement", "encode", "decode", "MAGIC", "VERSION"]

MAGIC = b"DSHM"
VERSION = 1
_HEAD = struct.Struct("<4sBBII")
_ENTRY = struct.Struct("<IQQB")
#: Offsets and lengths beyond this are nonsense (and would overflow sums).
MAX_EXTENT = 2**62
#: A descriptor is small; refuse to parse anything absurdly large.
MAX_DESCRIPTOR = 1 << 20


@dataclass(frozen=True)
class Placement:
    """Frame ``index`` of a message is ``length`` bytes at ``offset`` in ``name``."""

    index: int
    name: str
    offset: int
    length: int


def encode(nframes: int, placements: Sequence[Placement]) -> bytes:
    """The descriptor of a message of ``nframes`` frames with ``placements``."""
    parts = [_HEAD.pack(MAGIC, VERSION, 0, nframes, len(placements))]
    for p in placements:
        name = p.name.encode("ascii")
        parts.append(_ENTRY.pack(p.index, p.offset, p.length, len(name)))
        parts.append(name)
    return b"".join(parts)


def decode(data: bytes | memoryview, *, ninline: int, owner: Owner) -> list[Placement]:
    """Parse and validate a descriptor received from the peer ``owner``.

    ``ninline`` is the number of frames that arrived inline with it.

    Raises
    ------
    DescriptorError
        Naming the first problem found; nothing has been opened.
    """
    data = bytes(data[: MAX_DESCRIPTOR + 1])
    if len(data) > MAX_DESCRIPTOR:
        raise DescriptorError(f"descriptor larger than {MAX_DESCRIPTOR} bytes")
    if len(data) < _HEAD.size:
        raise DescriptorError(f"descriptor truncated ({len(data)} bytes)")
    magic, version, _flags, nframes, nplaced = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise DescriptorError(f"descriptor has bad magic {magic!r}")
    if version != VERSION:
        raise DescriptorError(f"descriptor version {version} is not {VERSION}")
    if nplaced == 0 or nframes != ninline + nplaced:
        raise DescriptorError(
            f"descriptor places {nplaced} of {nframes} frames but {ninline} arrived inline"
        )
    out: list[Placement] = []
    pos = _HEAD.size
    last = -1
    for _ in range(nplaced):
        if pos + _ENTRY.size > len(data):
            raise DescriptorError("descriptor truncated inside an entry")
        index, offset, length, namelen = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        raw = data[pos : pos + namelen]
        pos += namelen
        if len(raw) != namelen:
            raise DescriptorError("descriptor truncated inside a name")
        if not last < index < nframes:
            raise DescriptorError(
                f"frame index {index} out of order or out of range (nframes={nframes})"
            )
        last = index
        if length == 0 or offset >= MAX_EXTENT or length >= MAX_EXTENT:
            raise DescriptorError(f"frame {index}: offset {offset} / length {length} invalid")
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DescriptorError(f"frame {index}: segment name is not ASCII: {raw!r}") from None
        check_name(name, owner, "s")
        out.append(Placement(index, name, offset, length))
    if pos != len(data):
        raise DescriptorError(f"{len(data) - pos} trailing bytes after the descriptor")
    return out
