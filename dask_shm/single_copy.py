"""Single copy: a receiver copies large frames straight out of the sender's
memory with ``process_vm_readv`` (one copy, made by the kernel).

Who may read whom
    The kernel lets process R read process S's memory when R may
    ptrace-attach to S: the same user (real, effective and saved ids), S
    dumpable, R and S in the same user namespace (or R privileged over
    S's), no seccomp filter refusing the call, and Yama, where the kernel
    has it, agreeing.  Yama's ``kernel.yama.ptrace_scope`` is

    - 0: any process of the same user may read S;
    - 1 (Ubuntu's default, and several other distributions'): only S's
      descendants, or a process S has declared with
      ``prctl(PR_SET_PTRACER, ...)``.  LocalCluster workers are siblings,
      ``dask worker`` processes unrelated: none of them may read another;
    - 2: only processes with ``CAP_SYS_PTRACE``; 3: nobody.

What we do about Yama
    With ``dask-shm.single-copy`` true, a process that sets up an ``shm://``
    handshake on a host whose scope is 1 declares itself readable by any
    process of its user (``PR_SET_PTRACER_ANY``), once, as Open MPI's CMA
    component and MPICH do before they use ``process_vm_readv``.  That only
    restores scope 0's rule for this process: every other condition above
    still holds, so another user, a non-dumpable process or a seccomp filter
    still refuses.  At scope 2 and 3 nothing is declared (it would not
    help).  With ``single-copy`` false nothing is declared and nothing is
    read in place.  Whatever the settings, each link tests the permission
    for real at its handshake (:func:`reads_token`): single copy is used
    only where the read succeeded, and the buffer carries the rest.

    Why that widens nothing an ``shm://`` listener does not already give:
    any process that may ptrace us could read our memory only if it runs
    as our user, and any process that can connect to a distributed server
    (a plaintext endpoint, without authentication unless TLS is configured)
    can already make it run code of its choosing.  The README says how to
    turn it off.  A narrower declaration (``PR_SET_PTRACER`` with one pid)
    admits one process and its descendants only: enough for a LocalCluster
    (the workers' common parent), not for ``dask worker`` processes or a
    scheduler started elsewhere, so it would leave most links on the
    buffer.

A reused pid
    A descriptor names its sender by the pid the handshake proved.  If that
    process died and another took its pid, a read could reach the wrong
    process: :func:`read_frames` checks, after the copy, that the pid still
    belongs to the process with the start time the handshake recorded (a
    pid cannot be reused while its process lives, so a check afterwards
    covers the whole read).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from dask_shm.names import Owner

__all__ = [
    "YAMA_SCOPE",
    "probe_host",
    "yama_scope",
    "declare_readable",
    "reads_token",
    "read_remote",
    "read_frames",
]

logger = logging.getLogger(__name__)

#: Where Yama publishes its policy; absent where the kernel has no Yama.
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
_PR_SET_PTRACER = 0x59616D61  # "Yama"
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl_set_ptracer_any() -> int:
    """The real call: 0, or the errno it failed with."""
    ok = _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)
    return 0 if ok == 0 else ctypes.get_errno()


def yama_scope(path: str = YAMA_SCOPE) -> int | None:
    """Yama's ``ptrace_scope``, or None where the kernel has no Yama (or it
    cannot be read: then nothing is declared, and the handshake's test
    decides)."""
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"-1")
    except (OSError, ValueError):
        return None


#: This process's outcome of :func:`declare_readable` (None: not decided
#: yet).  A forked child starts undecided: the kernel keeps a declaration
#: per process, and a child does not inherit it.
_declared: str | None = None


def declare_readable(
    single_copy: bool,
    *,
    scope_path: str | None = None,
    prctl: Callable[[], int] | None = None,
) -> str:
    """Make this process readable in place by its peers where Yama's scope
    1 would refuse them (see the module docstring); once per process.

    Returns what was decided: ``"off"`` (``single-copy`` false: no call),
    ``"no-yama"``, ``"not-needed"`` (scope 0), ``"declared"``, ``"refused"``
    (scope 1, but the kernel refused the call), ``"scope-N"`` (2 or 3:
    nothing helps; the buffer carries large messages).  ``scope_path`` and
    ``prctl`` default to :data:`YAMA_SCOPE` and the real call, looked up
    when it runs.
    """
    global _declared
    if not single_copy:
        return "off"  # never remembered: a later comm may have it on
    if _declared is not None:
        return _declared
    scope = yama_scope(YAMA_SCOPE if scope_path is None else scope_path)
    if scope is None:
        outcome = "no-yama"
    elif scope == 0:
        outcome = "not-needed"
    elif scope == 1:
        err = (_prctl_set_ptracer_any if prctl is None else prctl)()
        outcome = "declared" if err == 0 else "refused"
        if err:
            logger.info(
                "dask-shm: cannot declare this process readable by its peers (%s); "
                "large messages to processes that are not its ancestors go through "
                "the shared buffer",
                os.strerror(err),
            )
    else:
        outcome = f"scope-{scope}"
    _declared = outcome
    return outcome


def _forget_after_fork() -> None:
    global _declared
    _declared = None


os.register_at_fork(after_in_child=_forget_after_fork)


def reads_token(peer: Owner, address: object, token: str) -> str | None:
    """Read ``token`` at ``address`` in the peer's memory, as the handshake
    does to test the permission for real.  None if it is there (the kernel
    lets us read the peer's frames in place); else why not, as a counter
    suffix: ``eperm`` (Yama, a non-dumpable process, another user
    namespace), ``esrch`` (the pid we see is not the peer's: another pid
    namespace), ``efault``, ``enosys`` (seccomp, an old kernel),
    ``mismatch`` (another process's memory), ``no-address``."""
    if not isinstance(address, int) or isinstance(address, bool) or address <= 0:
        return "no-address"
    got = np.zeros(len(token), dtype=np.uint8)
    try:
        read_remote(peer.pid, [(address, got)])
    except OSError as e:
        logger.debug("cannot read pid %d's memory (%s): frames go through the buffer", peer.pid, e)
        return errno.errorcode.get(e.errno or 0, "oserror").lower()
    if got.tobytes() != token.encode("ascii") or not peer.alive():
        return "mismatch"
    return None


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = getattr(_libc, "process_vm_readv", None)
if _process_vm_readv is not None:
    _process_vm_readv.restype = ctypes.c_ssize_t
#: iovecs per process_vm_readv call (Linux's IOV_MAX).
_IOV_MAX = 1024


def read_remote(pid: int, pairs: Sequence[tuple[int, np.ndarray]]) -> None:
    """Copy, for each (address, destination) pair, ``destination.nbytes``
    bytes at that address in process ``pid`` into ``destination``: one
    copy, made by the kernel, without the sender's help.  Blocking (the
    call releases the GIL); safe in any thread.

    Raises
    ------
    OSError
        ESRCH if the process is gone, EFAULT if it does not have the memory,
        EPERM if we may not read it.
    """
    if _process_vm_readv is None:
        raise OSError(errno.ENOSYS, "process_vm_readv is not available here")
    todo = deque((a, d) for a, d in pairs if d.nbytes)
    while todo:
        batch = list(itertools.islice(todo, _IOV_MAX))
        remote = (_IOVec * len(batch))(*[(a, d.nbytes) for a, d in batch])
        local = (_IOVec * len(batch))(*[(d.ctypes.data, d.nbytes) for _, d in batch])
        got = _process_vm_readv(pid, local, len(batch), remote, len(batch), 0)
        if got <= 0:
            e = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise OSError(e, os.strerror(e))
        # A partial read is legal (the kernel caps one call near 2 GiB).
        while got:
            a, d = todo[0]
            k = min(got, d.nbytes)
            got -= k
            if k == d.nbytes:
                todo.popleft()
            else:
                todo[0] = (a + k, d[k:])


def read_frames(peer: Owner, pairs: Sequence[tuple[int, np.ndarray]]) -> None:
    """:func:`read_remote` from the peer the handshake proved, then check
    that its pid still belongs to it (see the module docstring).

    Raises
    ------
    ProcessLookupError
        If the peer is gone, or its pid now belongs to another process:
        what was read may not be the peer's.
    OSError
        As :func:`read_remote`.
    """
    read_remote(peer.pid, pairs)
    if not peer.alive(strict=True):
        raise ProcessLookupError(
            errno.ESRCH,
            f"pid {peer.pid} is no longer the peer that started at {peer.start} "
            "(it exited, and its pid may have been reused)",
        )


_TARGET = """
import sys, ctypes
from dask_shm import single_copy
token = ctypes.create_string_buffer(b"dask-shm single-copy probe")
print(ctypes.addressof(token), flush=True)
for line in sys.stdin:  # "declare": as a process with an shm:// comm would
    print(single_copy.declare_readable(True), flush=True)
"""
_READER = """
import sys, numpy as np
from dask_shm import single_copy
pid, address = map(int, sys.argv[1:3])
got = np.zeros(26, dtype=np.uint8)
try:
    single_copy.read_remote(pid, [(address, got)])
    print("ok" if got.tobytes() == b"dask-shm single-copy probe" else "mismatch")
except OSError as e:
    print(e.strerror)
"""


def probe_host(timeout: float = 30) -> dict[str, str]:
    """Whether single copy works between two unrelated processes of this
    user on this host, tested for real: two short-lived children (siblings,
    as LocalCluster workers are), one reading the other's memory, before
    and after the target declares itself readable as dask-shm would.

    Returns ``{"undeclared": ..., "declared": ..., "declaration": ...}``:
    ``"ok"`` or why the read failed, and :func:`declare_readable`'s outcome
    in the target."""
    run = [sys.executable, "-c"]
    with subprocess.Popen(
        [*run, _TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as target:
        assert target.stdin is not None and target.stdout is not None
        try:
            address = target.stdout.readline().strip()

            def read() -> str:
                out = subprocess.run(
                    [*run, _READER, str(target.pid), address],
                    capture_output=True, text=True, timeout=timeout,
                )
                return out.stdout.strip() or out.stderr.strip()[-200:]

            before = read()
            target.stdin.write("declare\n")
            target.stdin.flush()
            declaration = target.stdout.readline().strip()
            after = read()
        finally:
            target.stdin.close()
            target.wait(timeout)
    return {"undeclared": before, "declared": after, "declaration": declaration}
