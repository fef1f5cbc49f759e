"""The buffer module without comms: a real buffer file in the shm directory
and real release sockets, driven by hand.  Regions in flight are never
handed out twice; receivers free them through the release channel, in the
order they were sent; a receiver's end closing frees all its link held; a
copy under way keeps the channel open; files and sockets a peer names are
judged on what was opened."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from distributed.comm.core import CommClosedError
from hypothesis import strategies as st

from dask_shm.buffers import ALIGN, Buffer
from dask_shm.outbox import Outbox, Outboxes
from dask_shm.release import WINDOW, Channel, accept, connect, listen
from dask_shm.errors import DescriptorError
from dask_shm.host import Host
from dask_shm.inbox import Inbox, PeerBuffer
from dask_shm.host import read_probe
from dask_shm.names import Directory, Owner, current_owner, new_name

from .conftest import SHM_DIR, is_root, ours, wait_for

ME = current_owner()
T = TypeVar("T")
SIZE = 1 << 20


@pytest.fixture
def directory() -> Iterator[Directory]:
    d = Directory(SHM_DIR)
    yield d
    d.close()


@pytest.fixture
def outboxes() -> Outboxes:
    return Outboxes()


@pytest.fixture
def buffer(directory: Directory, outboxes: Outboxes) -> Iterator[Buffer]:
    b = Buffer(directory, SIZE, outboxes)
    b.fill()
    yield b
    outboxes.close_all()
    b.destroy()


class Pipe:
    """A release channel as a link has it: the sender's outbox on one end of
    a socket pair, the receiver's end the other.  The outbox is attached on
    ``on``'s loop, which then watches the channel, as the handshake attaches
    it; without ``on``, in this thread, with no loop (releases are read by
    ``place``)."""

    def __init__(self, outboxes: Outboxes, on: LoopThread | None = None) -> None:
        ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = Channel(ours)
        self.box: Outbox = (
            outboxes.attach(channel) if on is None else on.run(lambda: outboxes.attach(channel))
        )
        channel.drop()  # the handshake's use

    def release(self, n: int = 1) -> None:
        self.theirs.send(b"\0" * n)

    def hang_up(self) -> None:
        self.theirs.close()


def let_go(box: Outbox) -> bool:
    """Whether the outbox stopped watching and let go of its channel."""
    return box.loop is None and not box._holds and box.channel.sock.fileno() == -1


class Ended:
    """What a retired link's end does (see Buffer.retire): counted."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def place(buffer: Buffer, box: Outbox, n: int) -> int | None:
    """A region placed as a stream places one, its write over (no bytes)."""
    offset = buffer.place(box, n)
    if offset is not None:
        buffer.written(offset)
    return offset


@pytest.fixture
def pipes(outboxes: Outboxes, buffer: Buffer) -> Iterator[list[Pipe]]:
    made = [Pipe(outboxes) for _ in range(2)]
    yield made
    for p in made:
        p.hang_up()


def test_regions_are_aligned_released_in_order_and_reused(buffer: Buffer, pipes: list[Pipe]) -> None:
    a = pipes[0]
    assert place(buffer, a.box, 1) == 0
    assert place(buffer, a.box, 300_000) == ALIGN
    third = place(buffer, a.box, 300_000)
    assert third == ALIGN + 300_032  # the next cache line
    assert place(buffer, a.box, 600_000) is None  # no room: nothing was released
    assert buffer.in_use() == ALIGN + 2 * 300_032
    a.release()  # the receiver copied the first region out
    assert place(buffer, a.box, 600_000) is None  # only 64 bytes came free
    a.release()
    assert buffer.in_use() == 2 * 300_032  # freed at the next poll, not before
    # First fit: the lowest gap, so a stream cycles through the same pages.
    assert place(buffer, a.box, 300_000) == 0
    assert place(buffer, a.box, 300_000) == third + 300_032
    assert list(a.box.inflight) == [third, 0, third + 300_032]
    assert buffer.in_use() == 3 * 300_032


def test_a_full_buffer_takes_back_what_other_links_released(
    buffer: Buffer, pipes: list[Pipe]
) -> None:
    a, b = pipes
    assert place(buffer, b.box, SIZE // 2) == 0
    assert place(buffer, a.box, SIZE // 2) == SIZE // 2
    assert place(buffer, a.box, SIZE // 2) is None
    b.release()  # b's receiver released; a's place polls every link when full
    assert place(buffer, a.box, SIZE // 2) == 0
    assert not b.box.inflight


def test_a_receiver_hanging_up_frees_all_its_link_held(buffer: Buffer, pipes: list[Pipe]) -> None:
    a, b = pipes
    assert place(buffer, b.box, 100_000) == 0
    for _ in range(3):
        assert place(buffer, a.box, 100_000) is not None
    a.hang_up()  # its process died, or its comm closed with no copy under way
    assert place(buffer, b.box, SIZE - 200_000) is not None  # full: polls a, end of file
    assert a.box.closed and not a.box.inflight
    assert place(buffer, a.box, 10) is None  # nobody reads that link any more
    assert list(b.box.inflight)[0] == 0
    ended = Ended()
    buffer._outboxes.retire(a.box, ended)
    assert a.box not in buffer._outboxes.boxes and ended.n == 1


def test_a_message_read_in_place_is_one_release_whatever_its_frames(
    buffer: Buffer, pipes: list[Pipe]
) -> None:
    """A message of more frames than the window is one entry, one release
    byte; a link with WINDOW messages unreleased refuses more (the message
    goes over TCP) rather than block its receiver's release."""
    a = pipes[0]
    many = [memoryview(bytearray(8)) for _ in range(2 * WINDOW)]
    assert buffer._outboxes.pin(a.box, many)
    for _ in range(WINDOW - 1):
        assert buffer._outboxes.pin(a.box, many[:1])
    assert not buffer._outboxes.pin(a.box, many[:1])
    a.release(WINDOW)
    assert place(buffer, a.box, 1) == 0  # its poll freed every message
    assert not a.box.pinned and list(a.box.inflight) == [0]


def test_a_link_holds_at_most_what_its_channel_can_release(buffer: Buffer, pipes: list[Pipe]) -> None:
    """One release byte per region must fit in the socket without blocking."""
    a = pipes[0]
    for _ in range(WINDOW):
        assert place(buffer, a.box, 1) is not None
    assert place(buffer, a.box, 1) is None
    a.release(WINDOW)
    assert place(buffer, a.box, 1) is not None


class LoopThread:
    """An event loop running in a thread of its own, as a comm's loop runs
    beside the thread that closes the last comm of a process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop")
        self.thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)

    def close(self) -> None:
        self.stop()
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def watched(outboxes: Outboxes, buffer: Buffer, loop_thread: LoopThread) -> Iterator[Pipe]:
    """A release channel whose outbox ``loop_thread``'s loop watches."""
    p = Pipe(outboxes, on=loop_thread)
    yield p
    p.hang_up()


@pytest.mark.parametrize("loop_state", ["running", "stopped", "closed"])
def test_the_watching_loop_frees_releases_and_the_channel_closes_once_from_any_thread(
    buffer: Buffer, watched: Pipe, loop_thread: LoopThread, loop_state: str
) -> None:
    """A link's loop frees what its receiver releases as the bytes arrive,
    with no call from the sender; when another thread ends the link, the
    watch stops and the channel's descriptor is closed, whether that loop still
    runs, has stopped or is closed."""
    box = watched.box
    assert place(buffer, box, 1000) == 0
    assert buffer._outboxes.pin(box, [memoryview(b"frame")])
    watched.release(2)
    assert wait_for(lambda: not box.inflight and not box.pinned)
    if loop_state != "running":
        loop_thread.stop()
    if loop_state == "closed":
        loop_thread.loop.close()
    ended = Ended()
    buffer._outboxes.retire(box, ended)  # nothing in flight: it closes now, from this thread
    assert box.closed and ended.n == 1
    assert wait_for(lambda: let_go(box))


def test_a_receiver_that_hangs_up_unwatches_its_channel(buffer: Buffer, watched: Pipe) -> None:
    """End of file on a watched channel frees the link's regions and ends the
    watch at once (a level-triggered reader left on it would spin)."""
    box = watched.box
    assert place(buffer, box, 1000) == 0
    watched.hang_up()  # the receiver died
    assert wait_for(lambda: box.closed and let_go(box))
    assert not box.inflight


def test_a_retired_link_keeps_what_its_receiver_may_read_until_it_is_released(
    buffer: Buffer, watched: Pipe
) -> None:
    """A comm that closes right after a write: its region and its frame read
    in place stay reserved, and the link's end (its hold on the host) waits,
    until the receiver releases them; then all goes at once, on the loop."""
    box = watched.box
    frame = memoryview(bytearray(b"frame"))
    assert place(buffer, box, 1000) == 0 and buffer._outboxes.pin(box, [frame])
    ended = threading.Event()
    buffer._outboxes.retire(box, ended.set)
    assert not ended.is_set() and not box.closed
    assert list(box.pinned) == [[frame]] and buffer.in_use() == 1024
    watched.release(2)  # the receiver has read both
    assert ended.wait(10)
    assert box.closed and not box.pinned and buffer.in_use() == 0
    assert wait_for(lambda: let_go(box))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.integers(1, SIZE // 3)), max_size=60))
def test_regions_in_flight_never_overlap(
    outboxes: Outboxes, buffer: Buffer, ops: list[tuple[int, bool, int]]
) -> None:
    pipes = [Pipe(outboxes) for _ in range(2)]
    sent: list[list[tuple[int, int]]] = [[], []]  # per link, in send order
    try:
        for link, release, n in ops:
            p = pipes[link]
            if release and sent[link]:
                p.release()
                sent[link].pop(0)
                continue
            offset = place(buffer, p.box, n)
            if offset is not None:
                sent[link].append((offset, offset + n))
            inflight = sorted(r for regions in sent for r in regions)
            assert all(0 <= lo < hi <= SIZE for lo, hi in inflight)
            assert all(a[1] <= b[0] for a, b in zip(inflight, inflight[1:])), inflight
    finally:
        for p in pipes:
            p.hang_up()
            ended = Ended()
            for _ in range(2):  # release bytes, then the end of file
                buffer._outboxes.retire(p.box, ended)
            assert p.box.closed and ended.n == 1
    assert buffer.in_use() == 0


@contextmanager
def receiver(directory: Directory, buffer: Buffer) -> Iterator[tuple[Inbox, int]]:
    """A receiver's inbox on ``buffer`` (opened by name, as a peer opens it),
    and the sender's end of its release channel (non-blocking)."""
    peer = PeerBuffer(directory, buffer.name, ME, SIZE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    channel = Channel(ours)
    try:
        inbox = Inbox(peer, channel)
        channel.drop()  # the handshake's use
        yield inbox, theirs.fileno()
    finally:
        theirs.close()
        peer.close()


def test_write_then_copy_out_is_byte_exact_and_releases(
    directory: Directory, buffer: Buffer, pipes: list[Pipe]
) -> None:
    """The receiver's side: the peer's buffer opened by name and mapped
    read-only, a region copied out into two pieces, then released."""
    a = pipes[0]
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8)
    offset = buffer.place(a.box, data.nbytes)
    assert offset is not None
    buffer.write(offset, [memoryview(data[:1000]), memoryview(data[1000:])])
    with receiver(directory, buffer) as (inbox, read):
        out = [np.empty(100_000, np.uint8), np.empty(200_000, np.uint8)]
        inbox.copy(offset, data.nbytes, out)
        np.testing.assert_array_equal(np.concatenate(out), data)
        assert os.read(read, 10) == b"\0"  # one release byte for one region
        inbox.close()
        assert inbox.peer is not None
        assert os.read(read, 10) == b""  # then end of file
        assert not inbox.peer.map().flags.writeable


def test_a_copy_that_starts_after_its_link_closed_reads_nothing(
    directory: Directory, buffer: Buffer, pipes: list[Pipe]
) -> None:
    """A copy queued for an offload thread may start after its comm has
    closed: the sender has then freed what it described (end of file on
    the channel), so the copy must not read it, and the read must fail."""
    a = pipes[0]
    offset = buffer.place(a.box, 1000)
    assert offset is not None
    buffer.write(offset, [memoryview(b"x" * 1000)])
    with receiver(directory, buffer) as (inbox, read):
        inbox.close()  # the comm closed while the copy waited for a thread
        assert os.read(read, 10) == b""  # the sender sees end of file now
        out = np.zeros(1000, np.uint8)
        with pytest.raises(CommClosedError, match="closed before"):
            inbox.copy(offset, 1000, [out])
        assert not out.any()
        with pytest.raises(CommClosedError, match="closed before"):
            inbox.read_in_place(os.getpid(), [(out.ctypes.data, out)])


def test_a_region_is_not_freed_under_its_write(buffer: Buffer, pipes: list[Pipe]) -> None:
    """A receiver hanging up frees everything its link held; a region still
    being written (by an offload thread, or while another loop's link
    polls) is freed only once that write ends: given to another link
    before, two writes would share it."""
    a, b = pipes
    offset = buffer.place(a.box, SIZE // 2)
    assert offset == 0  # its write has not ended
    assert place(buffer, b.box, SIZE // 2) == SIZE // 2
    a.hang_up()
    assert place(buffer, b.box, SIZE // 2) is None  # full: polls a, end of file...
    assert a.box.closed and not a.box.inflight
    assert buffer.in_use() == SIZE  # ...but a's region is still being written
    buffer.write(offset, [memoryview(bytes(SIZE // 2))])  # the write ends: freed
    assert buffer.in_use() == SIZE // 2
    assert place(buffer, b.box, SIZE // 2) == 0


def test_a_write_the_buffer_was_destroyed_before_does_nothing(directory: Directory) -> None:
    """A shielded write of a cancelled stream may start only after the
    process's last comm destroyed the buffer: nobody will read the region,
    so the write copies nothing and raises nothing."""
    outboxes = Outboxes()
    b = Buffer(directory, SIZE, outboxes)
    b.fill()
    pipe = Pipe(outboxes)
    offset = b.place(pipe.box, 100)
    assert offset is not None
    outboxes.close_all()
    b.destroy()
    b.write(offset, [memoryview(b"x" * 100)])
    pipe.hang_up()


class _ClosesMidCopy(np.ndarray):
    """A destination whose size, asked for during the copy, closes the inbox
    first: a comm closing while a copy is under way in another thread."""

    inbox: Inbox
    seen: list[object]

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        if not self.seen:
            self.inbox.close()
            try:
                self.seen.append(os.read(self.reader, 1))
            except BlockingIOError as e:
                self.seen.append(e)
        return int(self.size * self.itemsize)


def test_a_copy_under_way_keeps_the_channel_open_until_it_ends(
    directory: Directory, buffer: Buffer
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    channel = Channel(ours)
    peer = PeerBuffer(directory, buffer.name, ME, SIZE)
    try:
        inbox = Inbox(peer, channel)
        channel.drop()
        dst = np.empty(4096, np.uint8).view(_ClosesMidCopy)
        dst.inbox, dst.seen, dst.reader = inbox, [], theirs.fileno()  # type: ignore[attr-defined]
        inbox.copy(0, 4096, [dst])
        # While copying: no end of file, so the sender cannot reuse the
        # region; after it: end of file, and no release.
        assert isinstance(dst.seen[0], BlockingIOError), dst.seen
        assert os.read(theirs.fileno(), 10) == b""
        assert ours.fileno() == -1  # and our end is closed
    finally:
        theirs.close()
        peer.close()


# -- what a peer names, refused on what was opened -----------------------------


def _plant(directory: Directory, kind: str, what: str, outside: Path) -> str:
    name = new_name(kind)
    path = os.path.join(directory.path, name)
    if what == "symlink":
        os.symlink(outside, path)
    elif what == "hard-link":
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.posix_fallocate(fd, 0, SIZE)
        os.close(fd)
        os.link(path, os.path.join(directory.path, new_name(kind)))
    elif what == "group-readable":
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.posix_fallocate(fd, 0, SIZE)
        os.fchmod(fd, 0o640)
        os.close(fd)
    elif what == "other-uid":
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.posix_fallocate(fd, 0, SIZE)
        os.fchown(fd, 65534, 65534)
        os.close(fd)
    elif what == "directory":
        os.mkdir(path, 0o700)
    elif what == "regular":
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.close(fd)
    elif what == "fifo":
        os.mkfifo(path, 0o600)
    elif what == "group-fifo":
        os.mkfifo(path, 0o600)
        os.chmod(path, 0o620)
    elif what == "missing":
        pass
    else:
        raise AssertionError(what)
    return name


def _remove_planted(directory: Directory) -> None:
    for name in ours(directory.path):
        directory.unlink(name)


needs_root = pytest.mark.skipif(not is_root(), reason="chown to another uid needs root (CI runs as root)")


@pytest.mark.parametrize(
    "what, problem",
    [
        ("symlink", "Too many levels of symbolic links"),
        ("hard-link", "2 hard links"),
        ("group-readable", "not owner-only"),
        pytest.param("other-uid", "owned by uid 65534", marks=needs_root),
        ("directory", "not a regular file"),
        ("missing", "No such file"),
    ],
)
def test_a_peer_buffer_that_is_not_a_plain_file_of_ours_is_refused(
    directory: Directory, tmp_path: Path, what: str, problem: str
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"o" * SIZE)
    name = _plant(directory, "b", what, outside)
    try:
        with pytest.raises((DescriptorError, OSError), match=problem):
            PeerBuffer(directory, name, ME, SIZE)
    finally:
        _remove_planted(directory)
    assert outside.read_bytes() == b"o" * SIZE


def _opens_within(seconds: float, opener: object, unblock: str, directory: Directory) -> object:
    """Run ``opener()`` in a thread; what it returned or raised, or "hung"
    if it was still blocked after ``seconds`` (then the FIFO ``unblock`` is
    opened for writing, so that the thread ends)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(opener())  # type: ignore[operator]
        except Exception as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=run, name="opener")
    t.start()
    t.join(seconds)
    if not t.is_alive():
        return out[0]
    fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK, dir_fd=directory.fd)
    t.join()
    os.close(fd)
    return "hung"


@pytest.mark.parametrize("kind", ["b", "p"])
def test_a_fifo_named_as_a_buffer_or_probe_is_refused_without_blocking(
    directory: Directory, kind: str
) -> None:
    name = _plant(directory, kind, "fifo", Path("/nonexistent"))
    try:
        if kind == "b":
            got = _opens_within(3, lambda: PeerBuffer(directory, name, ME, SIZE), name, directory)
        else:
            got = _opens_within(3, lambda: read_probe(directory, name, ME), name, directory)
    finally:
        _remove_planted(directory)
    assert got != "hung"
    if kind == "b":
        assert isinstance(got, DescriptorError) and "not a regular file" in str(got)
    else:
        assert got is None


# -- release sockets: only the peer's ------------------------------------------


def test_the_window_fits_in_a_release_socket_without_blocking() -> None:
    """WINDOW entries a direction may have unreleased: their bytes, written
    one by one, must never block the receiver (twice over, on this host)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.setblocking(False)
        for _ in range(2 * WINDOW):
            a.send(b"\0")


def test_a_release_socket_connects_only_to_the_peer() -> None:
    """Both ends check the kernel's record of who is at the other end: a
    socket named for another process, or held by one, is refused."""
    name, listener = listen()
    me = current_owner()
    other = Owner(me.pid + 1, me.start, me.ns, me.boot)
    with listener:
        with pytest.raises(DescriptorError, match="is not a release socket of the peer"):
            connect(name, other)  # the name is not the peer's
        with pytest.raises(DescriptorError, match="not a dask-shm name"):
            connect("/tmp/x", me)
        channel = connect(name, me)
        assert accept(listener, other) is None  # we connected, not "other": closed
        assert channel.read() == 0  # our end sees it hung up
        channel.drop()
        channel = connect(name, me)
        theirs = accept(listener, me)
        assert theirs is not None
        channel.release()
        assert theirs.read() == 1
        for c in (channel, theirs):
            c.drop()
    with pytest.raises(ConnectionRefusedError):
        connect(name, me)  # nobody listens any more
    assert accept(listener, me) is None  # an accept that fails is no link, not an error


def test_a_buffer_smaller_than_announced_is_refused_before_it_is_mapped(
    directory: Directory, buffer: Buffer
) -> None:
    """Mapping past a file's end would raise SIGBUS at the first read."""
    peer = PeerBuffer(directory, buffer.name, ME, 2 * SIZE)
    try:
        with pytest.raises(DescriptorError, match=f"holds {SIZE} bytes, not the {2 * SIZE}"):
            peer.map()
        assert peer.view is None
    finally:
        peer.close()


@pytest.mark.parametrize("size", [0, -1, 1 << 48, 2.0, "4096", None, True])
def test_an_implausible_announced_size_is_refused(
    directory: Directory, buffer: Buffer, size: object
) -> None:
    with pytest.raises(DescriptorError, match="invalid size"):
        PeerBuffer(directory, buffer.name, ME, size)


# -- the host: one buffer per process, gone with its last user ---------------


def test_the_host_keeps_one_buffer_until_its_last_user_leaves() -> None:
    a = Host.acquire(SHM_DIR, SIZE)
    b = Host.acquire(SHM_DIR, SIZE)
    assert a is b and a.buffer is not None
    name = a.buffer.name
    assert ours() == sorted([name, a.probe])  # and one probe per process
    buf = a.fill()
    assert buf is a.buffer and a.fill() is buf  # filled once
    assert buf.view is not None and os.stat(os.path.join(SHM_DIR, name)).st_blocks * 512 >= SIZE
    a.release()
    assert ours() == sorted([name, a.probe])
    b.release()
    assert ours() == []
    assert buf.view is None and a.directory.fd == -1


def test_a_host_without_a_buffer_sends_over_tcp() -> None:
    """``buffer-size: 0``: the process receives through shared memory but
    sends nothing through it."""
    host = Host.acquire(SHM_DIR, 0)
    try:
        assert host.buffer is None and host.fill() is None and ours() == [host.probe]
    finally:
        host.release()
