"""A shard's parameter store: models, their slices and optimizer state, updated in place.

Pure core, no gRPC: the servicer decodes and hands arrays here. Every method validates
before it touches state, so a rejected call leaves the store exactly as it was.
Pushes to different slices run in parallel; pushes to one slice are serialised by its lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ps import initializers
from ps.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from ps.limits import Limits, current as current_limits
from ps.optimizer_config import OptimizerConfig
from ps.server.optimizers import Optimizer, make_optimizer
from ps.tensor import count_nonfinite

PARAM_DTYPES = (np.dtype("float32"), np.dtype("float64"))


@dataclass
class SliceState:
    """Elements [offset, offset + length) of one tensor, its optimizer state and update count."""

    tensor: str
    offset: int
    length: int
    param: np.ndarray
    state: dict[str, np.ndarray]
    version: int = 0
    pushes: int = 0
    pulls: int = 0
    # client id -> [seq, end of the last chunk applied for that seq, step used by that push, when
    # (monotonic) that client last pushed here]; pruned by age (ShardStore.dedup_ttl_s)
    applied: dict[str, list] = field(default_factory=dict)
    pruned_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stop(self) -> int:
        return self.offset + self.length

    @property
    def nbytes(self) -> int:
        return self.param.nbytes + sum(a.nbytes for a in self.state.values())


@dataclass
class TensorMeta:
    shape: tuple[int, ...]
    dtype: np.dtype
    slices: list[SliceState] = field(default_factory=list)  # sorted by offset
    starts: list[int] = field(default_factory=list)


@dataclass
class SliceRequest:
    """What CreateModel asks for, decoded: one slice and how to fill it."""

    tensor: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    length: int
    init: initializers.Init | None = None


class ModelState:
    """One model's slices on this shard, and its optimizer."""

    def __init__(self, name: str, optimizer: Optimizer, tensors: dict[str, TensorMeta]):
        self.name = name
        self.optimizer = optimizer
        self.tensors = tensors

    @property
    def slices(self):
        for meta in self.tensors.values():
            yield from meta.slices

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slices)

    def locate(self, tensor: str, offset: int, length: int, what: str) -> SliceState:
        """The slice holding [offset, offset + length) entirely, or a precise error."""
        meta = self.tensors.get(tensor)
        if meta is None:
            raise NotFound(f"{what}: model '{self.name}' has no tensor '{tensor}' on this shard")
        i = bisect.bisect_right(meta.starts, offset) - 1
        if length < 0 or i < 0 or offset + length > meta.slices[i].stop:
            held = ", ".join(f"[{s.offset}, {s.stop})" for s in meta.slices[:8])
            if len(meta.slices) > 8:
                held += f" and {len(meta.slices) - 8} more slices"
            raise InvalidArgument(f"{what}: range [{offset}, {offset + length}) of '{self.name}/{tensor}' "
                                  f"is not held by this shard (it holds {held})")
        return meta.slices[i]


def check_chunk(model: ModelState, tensor: str, offset: int, values: np.ndarray, what: str) -> SliceState:
    """Validate a 1-D chunk against the slice it targets; return that slice."""
    sl = model.locate(tensor, offset, values.size, what)
    expected = model.tensors[tensor].dtype
    if values.dtype != expected:
        raise InvalidArgument(f"{what} '{model.name}/{tensor}' [{offset}, {offset + values.size}): "
                              f"expected {expected}, got {values.dtype}")
    return sl


def check_finite(values: np.ndarray, what: str) -> None:
    """Reject NaN/inf, naming how many and the first."""
    bad = count_nonfinite(values)
    if bad:
        first = int(np.argmin(np.isfinite(values)))
        raise InvalidArgument(f"{what}: {bad} non-finite value(s), first at element {first}: "
                              f"{float(values[first])}")


class ShardStore:
    """Every model this shard holds."""

    def __init__(self, max_bytes: int | None = None, limits: Limits | None = None,
                 dedup_ttl_s: float = 3600.0, clock=time.monotonic):
        self.limits = limits or current_limits()
        #: bytes of parameters + optimizer state this shard may hold (default: the limits' max_bytes)
        self.max_bytes = self.limits.max_bytes if max_bytes is None else max_bytes
        self._models: dict[str, ModelState] = {}
        self._lock = threading.Lock()
        #: a client's exactly-once record on a slice is dropped once it has not pushed there for
        #: this long (a retry comes within seconds; worker churn must not grow the records forever)
        self.dedup_ttl_s = dedup_ttl_s
        self._clock = clock

    def model(self, name: str) -> ModelState:
        m = self._models.get(name)
        if m is None:
            raise NotFound(f"model '{name}' not found on this shard")
        return m

    def models(self) -> list[ModelState]:
        with self._lock:
            return list(self._models.values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.models())

    def create(self, name: str, slices: list[SliceRequest], config: OptimizerConfig | dict,
               replace: bool = False) -> int:
        """Allocate and initialise a model's slices; returns bytes allocated."""
        if not name:
            raise InvalidArgument("create model: the model name is empty")
        lim = self.limits
        lim.check_name("create model: model name", name)
        lim.check_count(f"create model '{name}': slices", len(slices), "max_slices")
        try:
            optimizer = make_optimizer(config)
        except ValueError as e:
            raise InvalidArgument(f"create model '{name}': {e}") from None
        tensors: dict[str, TensorMeta] = {}
        for req in slices:
            self._check_slice(name, req)
            meta = tensors.setdefault(req.tensor, TensorMeta(req.shape, req.dtype))
            if meta.shape != req.shape or meta.dtype != req.dtype:
                raise InvalidArgument(f"create model '{name}': tensor '{req.tensor}' is declared as both "
                                      f"{meta.dtype}{list(meta.shape)} and {req.dtype}{list(req.shape)}")
            meta.slices.append(req)  # placeholder, replaced by SliceState below
        lim.check_count(f"create model '{name}': tensors", len(tensors), "max_tensors")
        need = 0
        for tname, meta in tensors.items():
            meta.slices.sort(key=lambda r: r.offset)
            for a, b in zip(meta.slices, meta.slices[1:]):
                if a.offset + a.length > b.offset:
                    raise InvalidArgument(f"create model '{name}': slices [{a.offset}, {a.offset + a.length}) and "
                                          f"[{b.offset}, {b.offset + b.length}) of '{tname}' overlap")
            need += sum(r.length for r in meta.slices) * meta.dtype.itemsize * (1 + len(optimizer.state_names))
        with self._lock:
            if name in self._models and not replace:
                raise AlreadyExists(f"model '{name}' already exists on this shard")
            if name not in self._models:
                lim.check_count(f"create model '{name}': models on this shard", len(self._models) + 1, "max_models")
            # a replaced model is freed only once its successor exists: both are held meanwhile
            held = sum(m.nbytes for m in self._models.values())
            if self.max_bytes is not None and held + need > self.max_bytes:
                raise ResourceExhausted(f"create model '{name}': needs {need} bytes, this shard holds {held} "
                                        f"of its limit {self.max_bytes} {lim.hint('max_bytes')}")
            for meta in tensors.values():
                meta.slices = [self._allocate(r, optimizer) for r in meta.slices]
                meta.starts = [s.offset for s in meta.slices]
            self._models[name] = ModelState(name, optimizer, tensors)
        return need

    def _check_slice(self, name: str, r: SliceRequest) -> None:
        what = f"create model '{name}': tensor '{r.tensor}'"
        if not r.tensor:
            raise InvalidArgument(f"create model '{name}': a slice has an empty tensor name")
        self.limits.check_name(f"create model '{name}': tensor name", r.tensor)
        if r.dtype not in PARAM_DTYPES:
            raise InvalidArgument(f"{what}: parameters must be float32 or float64, got {r.dtype}")
        size = self.limits.check_shape(what, r.shape)  # exact: np.prod would wrap around int64
        if r.offset < 0 or r.length < 0 or r.offset + r.length > size:
            raise InvalidArgument(f"{what}: slice [{r.offset}, {r.offset + r.length}) is outside its "
                                  f"{size} elements")

    @staticmethod
    def _allocate(r: SliceRequest, optimizer: Optimizer) -> SliceState:
        if r.init is None or r.init.kind == "zeros":
            param = np.zeros(r.length, r.dtype)
        else:
            param = initializers.values(r.init, r.tensor, r.offset, r.length).astype(r.dtype, copy=False)
        return SliceState(r.tensor, r.offset, r.length, param, optimizer.init_state(r.length, r.dtype))

    def delete(self, name: str) -> int:
        with self._lock:
            m = self._models.pop(name, None)
        if m is None:
            raise NotFound(f"model '{name}' not found on this shard")
        return m.nbytes

    def assign(self, name: str, tensor: str, offset: int, values: np.ndarray) -> None:
        """Overwrite parameter values (optimizer state is left as it is)."""
        m = self.model(name)
        what = "assign to"
        sl = check_chunk(m, tensor, offset, values, what)
        check_finite(values, f"assign to '{name}/{tensor}' at offset {offset}")
        a = offset - sl.offset
        with sl.lock:
            sl.param[a:a + values.size] = values

    def push(self, name: str, client_id: str, seq: int, tensor: str, offset: int, grad: np.ndarray,
             grad_scale: float = 1.0) -> tuple[SliceState, bool]:
        """Apply one gradient chunk; returns (slice, applied). A retried chunk is not applied again."""
        m = self.model(name)
        what = "push to"
        sl = check_chunk(m, tensor, offset, grad, what)
        if not client_id:
            raise InvalidArgument(f"push to '{name}/{tensor}': client_id is empty (needed to apply each push once)")
        if not np.isfinite(grad_scale) or grad_scale < 0:
            raise InvalidArgument(f"push to '{name}/{tensor}': grad_scale must be a finite number >= 0, "
                                  f"got {grad_scale}")
        check_finite(grad, f"push to '{name}/{tensor}' [{offset}, {offset + grad.size})")
        a, b = offset - sl.offset, offset - sl.offset + grad.size
        with sl.lock:
            now = self._clock()
            rec = sl.applied.get(client_id)
            if rec is not None and (seq < rec[0] or (seq == rec[0] and offset < rec[1])):
                rec[3] = now
                return sl, False
            if rec is not None and seq == rec[0]:
                step = rec[2]  # a later chunk of a push that already counted as this slice's update
                rec[1], rec[3] = offset + grad.size, now
            else:
                sl.version += 1
                step = sl.version
                sl.applied[client_id] = [seq, offset + grad.size, step, now]
                if now - sl.pruned_at > self.dedup_ttl_s / 4:
                    self._prune(sl, now)
            m.optimizer.apply(sl.param[a:b], grad, {k: v[a:b] for k, v in sl.state.items()}, step,
                              grad_scale or 1.0)
            sl.pushes += 1
        return sl, True

    def _prune(self, sl: SliceState, now: float) -> None:
        """Drop the records of clients silent on this slice for longer than dedup_ttl_s (under its lock)."""
        old = [cid for cid, rec in sl.applied.items() if now - rec[3] > self.dedup_ttl_s]
        for cid in old:
            del sl.applied[cid]
        sl.pruned_at = now

    @staticmethod
    def read_slice(sl: SliceState, offset: int, length: int, encode):
        """``encode(view, version)`` of [offset, offset + length), under the slice's lock so the
        encoder's copy is the only one and never torn by a concurrent update."""
        a = offset - sl.offset
        with sl.lock:
            sl.pulls += 1
            return encode(sl.param[a:a + length], sl.version)
