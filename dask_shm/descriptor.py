"""The descriptor codec: where a message's bytes are.

Pure functions, no I/O: a descriptor is validated completely here, before
the receiver reads anything it names.

A message that travels through shared memory is one packed stream of bytes,
its frames one after the other.  The stream is cut into *fragments*; each
fragment is either a region of the sender's buffer or an inline frame sent
over TCP beside the descriptor (when the buffer had no room).  The first
descriptor of a message gives the frame lengths; a message larger than the
room in the buffer continues with further descriptors, each listing the next
fragments, until the stream is complete.

Layout (version 2, little-endian)::

    b"DSHM"  version:u8  flags:u8  nframes:u32  nfrags:u32
    nframes times (first descriptor only, flags & FIRST):  length:u64
    nfrags times:                                          offset:u64  length:u64

An ``offset`` of ``INLINE`` means the fragment's bytes are the next inline
frame, in order.  With ``flags & REMOTE`` (single copy, see
:mod:`dask_shm.single_copy`), every ``offset`` is instead an address in the
sender's own memory, which the receiver reads with ``process_vm_readv``.
The whole protocol is in docs/protocol.md.

A descriptor travels in an :class:`Envelope` (a ``Pickled`` TCP message,
its inline frames out of band); :class:`Cursor` walks a message's bytes
across its frames, on both sides.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from typing import Any

from distributed.protocol.serialize import Pickled
from distributed.utils import ensure_memoryview

from dask_shm.errors import DescriptorError

__all__ = [
    "encode", "decode", "Envelope", "Cursor", "INLINE", "MAGIC", "VERSION", "MAX_FRAMES", "REMOTE",
]

MAGIC = b"DSHM"
VERSION = 2
FIRST = 1
REMOTE = 2
INLINE = 2**64 - 1
_HEAD = struct.Struct("<4sBBII")
#: Limits that keep a hostile descriptor from costing memory or time.
MAX_FRAMES = 1 << 20
MAX_FRAGMENTS = 1 << 20
MAX_TOTAL = 1 << 48


def encode(
    lengths: Sequence[int] | None, fragments: Sequence[tuple[int, int]], *, remote: bool = False
) -> bytes:
    """A descriptor: the message's frame ``lengths`` (first descriptor of a
    message only) and its next ``fragments``, as (offset or INLINE, length);
    with ``remote``, (address in the sender's memory, length)."""
    nframes = 0 if lengths is None else len(lengths)
    flags = (0 if lengths is None else FIRST) | (REMOTE if remote else 0)
    head = _HEAD.pack(MAGIC, VERSION, flags, nframes, len(fragments))
    body = struct.pack(f"<{nframes}Q{2 * len(fragments)}Q", *(lengths or ()), *(
        x for frag in fragments for x in frag))
    return head + body


def decode(
    data: object,
    *,
    first: bool,
    buffer_size: int,
    remaining: int | None,
    inline: Sequence[int],
) -> tuple[list[int] | None, list[tuple[int, int]], bool]:
    """Parse and validate a descriptor from a peer.

    Parameters
    ----------
    first
        Whether this starts a message (it must then carry frame lengths).
    buffer_size
        The size of the sender's buffer: every region must lie inside it.
    remaining
        Bytes of the message still expected (None for a first descriptor:
        then the frame lengths say).
    inline
        Lengths of the inline frames that arrived with the descriptor.

    Returns
    -------
    (lengths, fragments, remote): ``lengths`` is None unless ``first``;
    ``remote``: the offsets are addresses in the sender's memory.

    Raises
    ------
    DescriptorError
        Naming the first problem found.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DescriptorError(f"descriptor is a {type(data).__name__}, not bytes")
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise DescriptorError(f"descriptor truncated ({len(data)} bytes)")
    magic, version, flags, nframes, nfrags = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise DescriptorError(f"descriptor has bad magic {magic!r}")
    if version != VERSION:
        raise DescriptorError(f"descriptor version {version} is not {VERSION}")
    remote = bool(flags & REMOTE)
    if bool(flags & FIRST) != first or flags & ~(FIRST | REMOTE):
        what = "the start of a message" if first else "the rest of a message"
        raise DescriptorError(f"descriptor flags {flags:#x}: expected {what}")
    if not 0 < nfrags <= MAX_FRAGMENTS or nframes > MAX_FRAMES or (first and nframes == 0):
        raise DescriptorError(f"descriptor lists {nframes} frames and {nfrags} fragments")
    if len(data) != _HEAD.size + 8 * (nframes + 2 * nfrags):
        raise DescriptorError(
            f"descriptor of {len(data)} bytes does not hold {nframes} frames "
            f"and {nfrags} fragments"
        )
    values = struct.unpack_from(f"<{nframes + 2 * nfrags}Q", data, _HEAD.size)
    lengths = list(values[:nframes]) if first else None
    if lengths is not None:
        remaining = sum(lengths)
        if remaining > MAX_TOTAL:
            raise DescriptorError(f"message of {remaining} bytes is implausible")
    assert remaining is not None
    fragments = list(zip(values[nframes::2], values[nframes + 1 :: 2]))
    inline_left = list(inline)
    for i, (offset, length) in enumerate(fragments):
        if not 0 < length <= remaining:
            raise DescriptorError(
                f"fragment {i}: length {length} with {remaining} bytes of the message left"
            )
        remaining -= length
        if remote:
            if offset == INLINE or offset + length > 2**64:
                raise DescriptorError(f"fragment {i}: address {offset} is invalid")
        elif offset == INLINE:
            if not inline_left or inline_left.pop(0) != length:
                raise DescriptorError(f"fragment {i}: no inline frame of {length} bytes")
        elif not buffer_size:
            raise DescriptorError(f"fragment {i}: a buffer region, but the peer announced no buffer")
        elif offset + length > buffer_size:
            raise DescriptorError(
                f"fragment {i}: bytes {offset}..{offset + length} lie outside "
                f"the sender's buffer of {buffer_size} bytes"
            )
    if inline_left:
        raise DescriptorError(f"{len(inline_left)} inline frame(s) not described")
    return lengths, fragments, remote


class Envelope:
    """A message sent our way: a descriptor (None: every frame is inline)
    and the inline frames, which TCP sends out of band, without copying."""

    __slots__ = ("descriptor", "frames")

    def __init__(self, descriptor: bytes | None, *frames: Any) -> None:
        self.descriptor = descriptor
        self.frames = list(frames)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Envelope, (self.descriptor, *map(pickle.PickleBuffer, self.frames)))

    def pickled(self) -> Pickled:
        # A false callback result keeps each buffer out of band; the frames
        # themselves are sent, so no PickleBuffer outlives this call (one
        # held by an exception's traceback made CPython 3.11's collector
        # crash on a memoryview that still had exports).
        pik = pickle.dumps(self, protocol=5, buffer_callback=lambda b: False)
        return Pickled({"pickled-obj": pik}, [ensure_memoryview(f) for f in self.frames])


class Cursor:
    """Consecutive byte ranges across a list of buffers: the sender's frames
    (it takes pieces to copy in) or the receiver's (it fills them)."""

    def __init__(self, buffers: list[Any]) -> None:
        self.buffers = buffers
        self.remaining = sum(b.nbytes for b in buffers)
        self._i = 0
        self._pos = 0

    def take(self, n: int) -> list[Any]:
        """The next ``n`` bytes, as slices of the buffers."""
        out = []
        self.remaining -= n
        while n:
            buf = self.buffers[self._i]
            k = min(n, buf.nbytes - self._pos)
            out.append(buf[self._pos : self._pos + k])
            n -= k
            self._pos += k
            if self._pos == buf.nbytes:
                self._i += 1
                self._pos = 0
        return out
