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

from ps import initializers, wire
from ps.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ps.limits import Limits, current as current_limits
from ps.optimizer_config import SPARSE_ONLY, OptimizerConfig, config_name
from ps.spec import ACCUMULATOR_OPTIMIZER, MAX_STEP_WAIT_S
from ps.server.optimizers import Optimizer, make_optimizer
from ps.server.sparse import SparseTable, TableSpec
from ps.tensor import CodecError, count_nonfinite, decode_1d, dtype_code, encode
from ps.v1 import server_pb2, tensor_pb2

PARAM_DTYPES = (np.dtype("float32"), np.dtype("float64"))
_ACCUMULATOR = OptimizerConfig.from_dict(ACCUMULATOR_OPTIMIZER)
#: ApplyAccumulated with members: the most members a step may wait for, the longest a call may wait,
#: and how many calls may wait at once on a shard (each holds a thread; the rest answer at once)
MAX_STEP_MEMBERS = 1 << 16
MAX_STEP_WAITERS = 16


@dataclass
class Applied:
    """What an ApplyAccumulated call did on this shard (see ShardStore.apply_accumulated)."""

    applied: int = 0     # ranges it applied
    duplicates: int = 0  # ranges whose step this member's call applied before (a retry)
    empty: int = 0       # ranges it closed with nothing applied (nothing summed since the last step)
    version: int = 0     # the lowest version among the ranges' model slices afterwards
    closed: bool = False  # every range's step is closed
    closer: bool = False  # the first range's step was applied by ``member``'s call
    busy: bool = False    # not closed, and it could not wait (MAX_STEP_WAITERS calls were waiting)


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
    #: replication: whether clients push here (the primary) or only the primary does (a backup), the
    #: backups this primary forwards every update to, and per backup the future of the last update
    #: forwarded (a retried push waits on it: it is acknowledged only once the backups have it)
    primary: bool = True
    backups: tuple[str, ...] = ()
    forwarded: dict = field(default_factory=dict)
    #: a bsp accumulator's slice: the last step applied from it; a gradient tagged with an id up to
    #: it is too late (its step is over) and is refused instead of landing in the next step's sum.
    #: ``closed_version``: its version then (the same now: no gradient was summed since)
    closed: int = 0
    closed_version: int = 0
    closed_by: str = ""
    member_steps: int = 0  # steps applied from it when the last of ``members`` gradients came (Stats)

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

    def __init__(self, name: str, optimizer: Optimizer, tensors: dict[str, TensorMeta],
                 tables: dict[str, SparseTable] | None = None):
        self.name = name
        self.optimizer = optimizer
        self.tensors = tensors
        #: sparse tables: this shard's rows of each (ps.sharding.row_shards decides which)
        self.tables = tables or {}
        #: the optimizer as a serialized ps.v1.OptimizerConfig (replication requests carry it)
        self.optimizer_wire = optimizer.config.to_proto().SerializeToString()

    @property
    def slices(self):
        for meta in self.tensors.values():
            yield from meta.slices

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slices)

    def table(self, name: str, what: str) -> SparseTable:
        t = self.tables.get(name)
        if t is None:
            raise NotFound(f"{what}: model '{self.name}' has no sparse table '{name}' (its tables: "
                           f"{', '.join(sorted(self.tables)) or 'none'})")
        return t

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
        #: replication: a ps.server.replication.Replicator, whose ``forward(backup address, model,
        #: serialized ReplicaOp, fresh)`` queues an update for a backup; None: no backups here
        self.replicator = None
        #: bsp steps on the servers: notified whenever an accumulator slice closes a step
        self._closing = threading.Condition()
        self.step_waiters = 0  # calls waiting in _await_closed now (under _closing; at most MAX_STEP_WAITERS)

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

    def table_bytes(self) -> int:
        """Bytes the sparse tables of every model hold (rows, their optimizer state, the index)."""
        return sum(t.stats()["bytes"] for m in self.models() for t in m.tables.values())

    def evict_tables(self) -> int:
        """Drop every table's rows untouched for its evict_after steps; returns rows dropped."""
        return sum(t.evict() for m in self.models() for t in m.tables.values())

    def create(self, name: str, slices: list[SliceRequest], config: OptimizerConfig | dict,
               replace: bool = False, tables: list[TableSpec] = ()) -> int:
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
        if slices and config_name(config) in SPARSE_ONLY:
            raise InvalidArgument(f"create model '{name}': {config_name(config)} updates sparse tables only: put "
                                  f"the dense tensors in a model of their own, or use another optimizer")
        tensors: dict[str, TensorMeta] = {}
        for req in slices:
            self._check_slice(name, req)
            meta = tensors.setdefault(req.tensor, TensorMeta(req.shape, req.dtype))
            if meta.shape != req.shape or meta.dtype != req.dtype:
                raise InvalidArgument(f"create model '{name}': tensor '{req.tensor}' is declared as both "
                                      f"{meta.dtype}{list(meta.shape)} and {req.dtype}{list(req.shape)}")
            meta.slices.append(req)  # placeholder, replaced by SliceState below
        lim.check_count(f"create model '{name}': tensors", len(tensors), "max_tensors")
        lim.check_count(f"create model '{name}': sparse tables", len(tables), "max_tensors")
        sparse = {t.name: SparseTable(t, config) for t in tables}  # InvalidArgument for an optimizer rows lack
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
            self._models[name] = ModelState(name, optimizer, tensors, sparse)
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

    def assign(self, name: str, tensor: str, offset: int, values: np.ndarray, *, waits: list | None = None,
               replica: bool = False) -> None:
        """Overwrite parameter values (optimizer state is left as it is); forwarded to backups as push is."""
        m = self.model(name)
        what = "replicate assign to" if replica else "assign to"
        sl = check_chunk(m, tensor, offset, values, what)
        check_finite(values, f"assign to '{name}/{tensor}' at offset {offset}")
        a = offset - sl.offset
        with sl.lock:
            self._check_role(sl, name, replica, what)  # under the lock: a demotion may be under way
            sl.param[a:a + values.size] = values
            self._forward_assign(m, sl, offset, values, waits)

    def _forward_assign(self, m: ModelState, sl: SliceState, offset: int, values: np.ndarray,
                        waits: list | None) -> None:
        """Forward an assign of ``values`` at ``offset`` to the slice's backups (under its lock)."""
        if sl.backups and self.replicator is not None:
            op = server_pb2.ReplicaOp(assign=server_pb2.AssignRequest(model=m.name, chunk=tensor_pb2.Chunk(
                tensor=sl.tensor, offset=offset, values=encode(values)))).SerializeToString()
            self._forward(m, sl, op, waits)

    def push(self, name: str, client_id: str, seq: int, tensor: str, offset: int, grad: np.ndarray,
             grad_scale: float = 1.0, *, waits: list | None = None, replica: bool = False
             ) -> tuple[SliceState, bool]:
        """Apply one gradient chunk; returns (slice, applied). A retried chunk is not applied again.

        On a primary with backups the update is forwarded to them, in the order applied, and the
        futures to wait on before acknowledging it are appended to ``waits`` (for a retried chunk:
        those of the slice's last forwarded update). ``replica``: the push comes from the primary."""
        m = self.model(name)
        what = "replicate push to" if replica else "push to"
        sl = check_chunk(m, tensor, offset, grad, what)
        if not client_id:
            raise InvalidArgument(f"push to '{name}/{tensor}': client_id is empty (needed to apply each push once)")
        if not np.isfinite(grad_scale) or grad_scale < 0:
            raise InvalidArgument(f"push to '{name}/{tensor}': grad_scale must be a finite number >= 0, "
                                  f"got {grad_scale}")
        check_finite(grad, f"push to '{name}/{tensor}' [{offset}, {offset + grad.size})")
        a, b = offset - sl.offset, offset - sl.offset + grad.size
        with sl.lock:
            # under the lock: a slice demoted (another replica takes over) between the lookup and
            # here must not apply an update its backups will never see
            self._check_role(sl, name, replica, what)
            now = self._clock()
            rec = sl.applied.get(client_id)
            if rec is not None and (seq < rec[0] or (seq == rec[0] and offset < rec[1])):
                rec[3] = now
                if waits is not None:
                    waits.extend(sl.forwarded.values())
                return sl, False
            if seq <= sl.closed:
                raise Aborted(f"{what} '{name}/{tensor}' [{offset}, {offset + grad.size}): step {seq} was applied "
                              f"from this accumulator without it (its sender came too late: it left the step)")
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
            if sl.backups and self.replicator is not None:
                op = wire.replica_push_op(wire.encode_push(name, client_id, seq, grad_scale, tensor, offset,
                                                           dtype_code(grad.dtype), grad))
                self._forward(m, sl, op, waits)
        return sl, True

    def apply_accumulated(self, name: str, acc_name: str, contributors: int, client_id: str, seq: int,
                          ranges: list[tuple[str, int, int]], *, members: int = 0, wait_s: float = 0.0,
                          member: str = "", waits: list | None = None) -> "Applied":
        """bsp: apply the mean of the gradients summed in the accumulator model ``acc_name`` (sliced like
        ``name``, see ACCUMULATOR_OPTIMIZER; over those tagged with ``seq``, or ``contributors``) to each
        whole slice at ``ranges``, as a push under (client_id, seq), then zero the accumulator's slice
        and close the step, here and on its backups: gradients tagged with it are refused from then on.
        A step closed already is not applied again, and its accumulator is left alone (it may hold the
        next step's gradients). An accumulator slice that took no gradient since its last step applies
        nothing (``empty``). ``members`` (ps-lite's synchronous mode, every member calls): apply a range
        only once that many gradients tagged with ``seq`` are summed there, then wait up to ``wait_s``
        for every range's step to close. ``member``: who calls; the step's closer (whose call applied
        its first range) counts its update. Everything is checked before anything changes."""
        what = f"apply accumulated '{acc_name}' to"
        if contributors < 1:
            raise InvalidArgument(f"{what} '{name}': contributors must be >= 1, got {contributors}")
        if not 0 <= members <= MAX_STEP_MEMBERS:
            raise InvalidArgument(f"{what} '{name}': members must be in [0, {MAX_STEP_MEMBERS}], got {members}")
        if not 0 <= wait_s <= MAX_STEP_WAIT_S:  # NaN too
            raise InvalidArgument(f"{what} '{name}': wait_s must be in [0, {MAX_STEP_WAIT_S:g}] seconds, got {wait_s}")
        m, acc = self.model(name), self.model(acc_name)
        if acc.optimizer.config != _ACCUMULATOR:
            raise InvalidArgument(f"{what} '{name}': '{acc_name}' is not an accumulator (its optimizer is "
                                  f"{acc.optimizer.config.name}, not {ACCUMULATOR_OPTIMIZER})")
        pairs = []
        for tensor, offset, length in ranges:
            sl = m.locate(tensor, offset, length, what)
            a = acc.locate(tensor, offset, length, what)
            for s, model in ((sl, name), (a, acc_name)):
                if (s.offset, s.length) != (offset, length):
                    raise InvalidArgument(f"{what} '{name}': [{offset}, {offset + length}) of '{tensor}' is not a "
                                          f"whole slice of '{model}' (its slice there is [{s.offset}, {s.stop}))")
            if a.param.dtype != sl.param.dtype:
                raise InvalidArgument(f"{what} '{name}/{tensor}': the accumulator holds {a.param.dtype}, the "
                                      f"model {sl.param.dtype}")
            self._check_role(sl, name, False, what)  # again under each lock below: a demotion may be under way
            self._check_role(a, acc_name, False, what)
            pairs.append((sl, a))
        out = Applied()
        for sl, a in pairs:
            # under the accumulator slice's lock throughout: a gradient that comes meanwhile waits, then
            # finds the step closed (lock order: accumulator, then model; nothing takes them the other way)
            with a.lock:
                self._check_role(a, acc_name, False, what)
                if seq <= a.closed:  # closed before: a retry, a member late to a step the others closed
                    if a.closed == seq and member and a.closed_by == member:  # its own call applied it
                        out.duplicates += 1
                    self._wait_forwarded(sl, waits)
                    continue
                # the members' gradients tagged with this step's id, whole: the mean is over those that came
                # (``contributors``, the scheduler's count, for untagged pushes)
                tagged = sum(1 for rec in a.applied.values() if rec[0] == seq and rec[1] >= a.stop)
                if members and tagged < members:
                    continue  # not all here yet: the call of the member whose gradient completes it applies it
                by = member
                if a.version != a.closed_version:
                    sl, ok = self.push(name, client_id, seq, sl.tensor, sl.offset, a.param / (tagged or contributors),
                                       waits=waits)
                    out.applied += ok
                    out.duplicates += not ok  # applied, and its step not closed: a failover between the two
                    a.member_steps += bool(members)
                elif self._seen(sl, client_id, seq):
                    out.duplicates += 1
                    self._wait_forwarded(sl, waits)
                else:
                    # nothing summed since the last step (its leader applied it, then the scheduler restarted
                    # and its rebuilt clock led a step again): a mean of nothing is not an update
                    out.empty += 1
                    by = ""
                self._close(acc, a, seq, by, waits)
        if members and wait_s > 0 and not all(a.closed >= seq for _, a in pairs):
            out.busy = not self._await_closed([a for _, a in pairs], seq, wait_s)
            for sl, a in pairs:
                if a.closed >= seq:
                    self._wait_forwarded(sl, waits)  # answered once the backups have the update too
        out.closed = all(a.closed >= seq for _, a in pairs)
        out.busy = out.busy and not out.closed
        first = pairs[0][1] if pairs else None
        out.closer = bool(member) and first is not None and first.closed == seq and first.closed_by == member
        out.version = min((sl.version for sl, _ in pairs), default=0)
        return out

    def _await_closed(self, accs: list[SliceState], seq: int, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for every one of ``accs`` to close step ``seq``. At most MAX_STEP_WAITERS
        calls wait at once (each holds a thread): False for one that could not wait at all."""
        deadline = time.monotonic() + wait_s
        with self._closing:
            if self.step_waiters >= MAX_STEP_WAITERS:
                return False
            self.step_waiters += 1
            try:
                while not all(a.closed >= seq for a in accs):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._closing.wait(left)
            finally:
                self.step_waiters -= 1
        return True

    @staticmethod
    def _wait_forwarded(sl: SliceState, waits: list | None) -> None:
        """Have the caller wait for what ``sl`` forwarded to its backups last (its update, for a retry)."""
        if waits is not None:
            with sl.lock:
                waits.extend(sl.forwarded.values())

    def _seen(self, sl: SliceState, client_id: str, seq: int) -> bool:
        """Whether (client_id, seq) was applied to the whole slice before."""
        with sl.lock:
            rec = sl.applied.get(client_id)
            return rec is not None and (rec[0] > seq or (rec[0] == seq and rec[1] >= sl.stop))

    def _close(self, acc: ModelState, a: SliceState, seq: int, by: str, waits: list | None) -> None:
        """Zero an accumulator's slice and close its step ``seq``, applied by ``by``'s call ("": nothing was
        applied), under its lock, here and on its backups; wake the calls waiting for it."""
        a.param.fill(0)
        a.closed, a.closed_version, a.closed_by = max(a.closed, seq), a.version, by
        if a.backups and self.replicator is not None:
            op = server_pb2.ReplicaOp(close=server_pb2.CloseStep(tensor=a.tensor, offset=a.offset, step=seq, by=by))
            self._forward(acc, a, op.SerializeToString(), waits)
        with self._closing:
            self._closing.notify_all()

    def close_step(self, name: str, tensor: str, offset: int, step: int, by: str = "") -> None:
        """A backup: its primary applied step ``step`` from this accumulator slice (see ``_close``)."""
        what = "replicate close of"
        a = self.model(name).locate(tensor, offset, 0, what)
        if a.offset != offset:
            raise InvalidArgument(f"{what} '{name}/{tensor}': offset {offset} does not start a slice (the slice "
                                  f"there is [{a.offset}, {a.stop}))")
        with a.lock:
            self._check_role(a, name, True, what)
            self._close(self.model(name), a, step, by, None)

    def _check_role(self, sl: SliceState, name: str, replica: bool, what: str) -> None:
        if replica and sl.primary:
            raise FailedPrecondition(f"{what} '{name}/{sl.tensor}' [{sl.offset}, {sl.stop}): this server is its "
                                     f"primary, not a backup (a primary that was replaced is still forwarding)")
        if not replica and not sl.primary:
            raise FailedPrecondition(f"{what} '{name}/{sl.tensor}' [{sl.offset}, {sl.stop}): this server holds a "
                                     f"backup of that slice, not its primary (the shard map changed: fetch it again)")

    def _forward(self, m: ModelState, sl: SliceState, op: bytes, waits: list | None, fresh: bool = False) -> None:
        """Queue ``op`` (a serialized ps.v1.ReplicaOp) for each backup of ``sl`` (under its lock, so
        the backups see the slice's updates in the order they were applied)."""
        for b in sl.backups:
            fut = self.replicator.forward(b, m, op, fresh)
            sl.forwarded[b] = fut
            if waits is not None:
                waits.append(fut)

    def drop_backup(self, backup: str) -> list[str]:
        """Stop forwarding to ``backup`` (it was lost); returns the models that had it as a backup."""
        models = []
        for m in self.models():
            hit = False
            for sl in m.slices:
                with sl.lock:
                    if backup in sl.backups:
                        sl.backups = tuple(b for b in sl.backups if b != backup)
                        sl.forwarded.pop(backup, None)
                        hit = True
            if hit:
                models.append(m.name)
        return models

    # -- replication and checkpoints -------------------------------------------------------
    def snapshot(self, sl: SliceState, shape: tuple[int, ...]) -> server_pb2.SliceSnapshot:
        """The slice's whole state (copied under its lock)."""
        with sl.lock:
            return self._snapshot(sl, shape)

    @staticmethod
    def _snapshot(sl: SliceState, shape: tuple[int, ...]) -> server_pb2.SliceSnapshot:
        snap = server_pb2.SliceSnapshot(tensor=sl.tensor, shape=list(shape), offset=sl.offset, length=sl.length,
                                        param=encode(sl.param), version=sl.version, pushes=sl.pushes)
        for k, v in sl.state.items():
            encode(v, snap.state[k])
        snap.closed, snap.closed_version, snap.closed_by = sl.closed, sl.closed_version, sl.closed_by
        for cid, (seq, end, step, _) in sl.applied.items():
            snap.applied.add(client_id=cid, seq=seq, end=end, step=step)
        return snap

    def set_replicas(self, name: str, ranges: list[tuple[str, int, int]], backups: list[str]) -> tuple[list, int]:
        """Make this server the primary of the slices of ``name`` at ``ranges`` (tensor, offset, length),
        forwarding to ``backups`` from now on: each backup first gets a snapshot of each slice, queued
        under the slice's lock so every later update follows it. Returns the futures to wait on and
        the snapshot bytes queued."""
        m = self.model(name)
        what = "set replicas of"
        slices = []
        for tensor, offset, length in ranges:
            sl = m.locate(tensor, offset, length, what)
            if (sl.offset, sl.length) != (offset, length):
                raise InvalidArgument(f"{what} '{name}/{tensor}': [{offset}, {offset + length}) is not a whole "
                                      f"slice (this server's slice there is [{sl.offset}, {sl.stop}))")
            slices.append(sl)
        if backups and self.replicator is None:
            raise FailedPrecondition(f"{what} '{name}': this store does not replicate")
        waits, sent = [], 0
        for sl in slices:
            with sl.lock:
                sl.primary, sl.backups = True, tuple(backups)
                sl.forwarded = {}
                if backups:
                    snap = self._snapshot(sl, m.tensors[sl.tensor].shape)
                    op = server_pb2.ReplicaOp(install=snap).SerializeToString()
                    self._forward(m, sl, op, waits, fresh=True)
                    sent += len(op) * len(backups)
        return waits, sent

    def demote(self, name: str, ranges: list[tuple[str, int, int]]) -> list:
        """Stop being the primary of the slices at ``ranges`` (another replica takes over): pushes to
        them are refused from now on. Returns the futures of what was forwarded to the backups,
        which the new primary must have before it starts."""
        m = self.model(name)
        waits = []
        for tensor, offset, length in ranges:
            sl = m.locate(tensor, offset, length, "demote")
            with sl.lock:
                sl.primary, sl.backups = False, ()
                waits.extend(sl.forwarded.values())
                sl.forwarded = {}
        return waits

    def install(self, name: str, config: OptimizerConfig | dict, snap: server_pb2.SliceSnapshot,
                restore: bool = False) -> int:
        """A backup takes a slice's whole state from its primary (creating the model, or the slice,
        if new), as a backup; or (``restore``) a slice takes its state from a checkpoint and keeps
        its role. Returns the bytes now held for it."""
        what = f"install slice of '{name}'"
        try:
            param = decode_1d(snap.param, f"{what}: '{snap.tensor}' parameters")
            state = {k: decode_1d(v, f"{what}: '{snap.tensor}' state '{k}'") for k, v in snap.state.items()}
        except CodecError as e:
            raise InvalidArgument(str(e)) from None
        shape = tuple(snap.shape)
        req = SliceRequest(snap.tensor, shape, param.dtype, snap.offset, snap.length)
        self._check_slice(name, req)
        if param.dtype not in PARAM_DTYPES:
            raise InvalidArgument(f"{what}: parameters must be float32 or float64, got {param.dtype}")
        if param.size != snap.length:
            raise InvalidArgument(f"{what}: '{snap.tensor}' has {param.size} values for a slice of {snap.length}")
        with self._lock:
            m = self._models.get(name)
            if m is None:
                self.limits.check_count(f"{what}: models on this shard", len(self._models) + 1, "max_models")
                try:
                    m = ModelState(name, make_optimizer(config), {})
                except ValueError as e:
                    raise InvalidArgument(f"{what}: {e}") from None
                self._models[name] = m
            names = set(m.optimizer.state_names)
            if set(state) != names or any(v.size != snap.length or v.dtype != param.dtype for v in state.values()):
                raise InvalidArgument(f"{what}: '{snap.tensor}' optimizer state {sorted(state)} does not match "
                                      f"{m.optimizer.config.name}'s {sorted(names)} of {snap.length} {param.dtype}")
            meta = m.tensors.setdefault(snap.tensor, TensorMeta(shape, param.dtype))
            if meta.shape != shape or meta.dtype != param.dtype:
                raise InvalidArgument(f"{what}: tensor '{snap.tensor}' is {meta.dtype}{list(meta.shape)} here, "
                                      f"not {param.dtype}{list(shape)}")
            same = next((s for s in meta.slices if (s.offset, s.length) == (snap.offset, snap.length)), None)
            if restore and same is None:
                raise NotFound(f"{what}: restore onto '{snap.tensor}' [{snap.offset}, {snap.offset + snap.length}): "
                               f"no such slice here (create the model first)")
            if restore and same is not None and same.primary and same.backups:
                raise FailedPrecondition(f"{what}: '{snap.tensor}' [{snap.offset}, {snap.offset + snap.length}) is "
                                         f"a primary with backups here: restore before replicating")
            # a backup's new slice; or a restore (from a checkpoint) onto a slice, which keeps its role
            sl = SliceState(snap.tensor, snap.offset, snap.length, param.copy(), {k: v.copy() for k, v in state.items()},
                            version=snap.version, pushes=snap.pushes, closed=snap.closed,
                            closed_version=snap.closed_version, closed_by=snap.closed_by,
                            primary=restore and same is not None and same.primary)
            now = self._clock()
            sl.applied = {r.client_id: [r.seq, r.end, r.step, now] for r in snap.applied}
            kept = [s for s in meta.slices if (s.offset, s.length) != (sl.offset, sl.length)]
            if any(s.offset < sl.stop and sl.offset < s.stop for s in kept):
                raise InvalidArgument(f"{what}: '{snap.tensor}' [{sl.offset}, {sl.stop}) overlaps a different slice "
                                      f"held here")
            held = sum(x.nbytes for x in self._models.values() for x in x.slices)
            if self.max_bytes is not None and held + sl.nbytes > self.max_bytes:
                raise ResourceExhausted(f"{what}: needs {sl.nbytes} bytes, this shard holds {held} of its limit "
                                        f"{self.max_bytes} {self.limits.hint('max_bytes')}")
            meta.slices = sorted(kept + [sl], key=lambda s: s.offset)
            meta.starts = [s.offset for s in meta.slices]
        return sl.nbytes

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
