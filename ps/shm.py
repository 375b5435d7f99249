"""Shared-memory segments for the same-host fast path (PushPullLocal): a client and a server on one
host exchange a push_pull's gradient and weight bytes through a POSIX shared-memory segment the
client creates, and only the control message crosses gRPC (see TensorPipe's shm transport, which is
how torch RPC moves tensors between processes of one host).

The client owns its segments: it creates them (mode 0600, named ``ps-`` and 32 random hex digits)
and unlinks them when it closes; if it dies, Python's resource tracker unlinks them. A server only
attaches to a segment a request names, checks every range against its size, and copies gradients
out of it before validating them (so a client cannot change them between the check and the update).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from multiprocessing import shared_memory

import numpy as np

from ps.errors import FailedPrecondition, InvalidArgument

NAME = re.compile(r"ps-[0-9a-f]{32}")
#: a FAILED_PRECONDITION message starting with this says "use gRPC instead", nothing worse
UNREACHABLE = "local segment"
#: segments this process created (a server in the same process must leave their tracking alone)
_CREATED: set[str] = set()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a number beyond any pid, as in names of another kind, counts
    as alive: such a segment is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; or no pid at all
        return True
    return True


_reaped = False


def reap() -> int:
    """Unlink segments left by clients that died without their resource tracker (a process group
    killed at once): a name's first 8 hex digits are its creator's pid. Returns how many."""
    n = 0
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return 0
    for name in names:
        if NAME.fullmatch(name) and not _alive(int(name[3:11], 16)):
            try:
                os.unlink(f"/dev/shm/{name}")
                n += 1
            except OSError:
                pass
    return n


class Segment:
    """A segment this process created: ``array(dtype, at, count)`` views its bytes. Named ``ps-``,
    the creator's pid as 8 hex digits, then 24 random ones (see ``reap``)."""

    def __init__(self, size: int):
        global _reaped
        if not _reaped:  # once a process: what dead clients left behind
            _reaped = True
            reap()
        self.name = f"ps-{os.getpid() & 0xFFFFFFFF:08x}{uuid.uuid4().hex[:24]}"
        self._shm = shared_memory.SharedMemory(name=self.name, create=True, size=max(int(size), 1))
        self.size = self._shm.size
        #: closed by its owner (``close``): whoever kept it must make a new one
        self.closed = False
        _CREATED.add(self.name)

    def array(self, dtype, at: int, count: int) -> np.ndarray:
        return np.frombuffer(self._shm.buf, dtype, count, at)

    def close(self) -> None:
        """Unmap and unlink (views taken from it must be gone)."""
        self.closed = True
        _CREATED.discard(self.name)
        try:
            self._shm.close()
            self._shm.unlink()
        except (FileNotFoundError, BufferError):
            pass


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open a segment another process owns, without this process's resource tracker taking it over
    (before Python 3.13 it would unlink the client's segment when this process exits)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    shm = shared_memory.SharedMemory(name=name)
    if name in _CREATED:  # ours: the tracker's one record of it is the creator's, keep it
        return shm
    from multiprocessing import resource_tracker
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 - the documented workaround
    return shm


class Attached:
    """The segments a server has opened, the most recently used kept open (``keep`` of them). A
    segment its client has unlinked (it closed or died) is unmapped at the next sweep, at most a
    second later on the next request: a mapping would keep the dead client's memory alive."""

    def __init__(self, keep: int = 64, sweep_s: float = 1.0):
        self.keep = keep
        self.sweep_s = sweep_s
        self._open: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def sweep(self) -> int:
        """Unmap segments whose name is gone from /dev/shm; returns how many."""
        with self._lock:
            gone = [n for n in self._open if not os.path.exists(f"/dev/shm/{n}")]
            shms = [self._open.pop(n) for n in gone]
            self._swept = time.monotonic()
        for shm in shms:
            _close(shm)
        return len(shms)

    def __len__(self) -> int:
        return len(self._open)

    def get(self, name: str, what: str) -> shared_memory.SharedMemory:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InvalidArgument(f"{what}: segment must be 'ps-' and 32 hex digits, got {name[:80]!r}")
        if time.monotonic() - self._swept > self.sweep_s:
            self.sweep()
        with self._lock:
            shm = self._open.get(name)
            if shm is not None:
                self._open.move_to_end(name)
                return shm
        try:
            shm = _attach(name)
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise FailedPrecondition(f"{UNREACHABLE} '{name}' cannot be opened here ({type(e).__name__}): "
                                     f"not the client's host, or not its user") from None
        with self._lock:
            self._open[name] = shm
            while len(self._open) > self.keep:
                _, old = self._open.popitem(last=False)
                _close(old)
        return shm

    def forget(self, name: str) -> None:
        with self._lock:
            shm = self._open.pop(name, None)
        if shm is not None:
            _close(shm)

    def close(self) -> None:
        with self._lock:
            shms, self._open = list(self._open.values()), OrderedDict()
        for shm in shms:
            _close(shm)


def _close(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a view still in use (a request in flight): the mapping goes with the object
        pass


def view(shm: shared_memory.SharedMemory, dtype: np.dtype, at: int, count: int, what: str) -> np.ndarray:
    """``count`` elements of ``dtype`` at byte ``at`` of the segment, checked against its size."""
    end = at + count * dtype.itemsize
    if at < 0 or count < 0 or end > shm.size:
        raise InvalidArgument(f"{what}: bytes [{at}, {end}) lie outside the segment's {shm.size}")
    if at % dtype.itemsize:
        raise InvalidArgument(f"{what}: byte offset {at} is not a multiple of {dtype} ({dtype.itemsize} bytes)")
    return np.frombuffer(shm.buf, dtype, count, at)
