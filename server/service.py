"""The ParameterServer gRPC service (thin: decode, validate, call the shard store, encode)
and the server process: listen, register with the scheduler, heartbeat."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from concurrent import futures
from typing import Iterator

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ps import checkpoint, initializers, local_link, rpc, security, sharding, shm, sparse, wire
from ps import limits as ps_limits
from ps.data_policy import DataPolicy
from ps.errors import (FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, PSError, ResourceExhausted,
                       Unavailable, abort)
from ps.limits import Limits
from ps.local_link import LinkServer
from ps.optimizer_config import OptimizerConfig
from ps.server.access import ModelGuard
from ps.server.replication import Replicator
from ps.server.shard import ShardStore, SliceRequest
from ps.tensor import CodecError, decode, decode_1d, dtype_code, numpy_dtype
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc, server_pb2, server_pb2_grpc, tensor_pb2

log = logging.getLogger("ps.server")
SERVICE_NAME = server_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
LOCAL_WHAT = "push_pull (local) to"


def _decode(chunk, model: str, what: str) -> np.ndarray:
    try:
        return decode_1d(chunk.values, f"{what} '{model}/{chunk.tensor}' at offset {chunk.offset}")
    except CodecError as e:
        raise InvalidArgument(str(e)) from None


class ParameterServerServicer(server_pb2_grpc.ParameterServerServicer):
    """gRPC front of a ShardStore."""

    def __init__(self, store: ShardStore, chunk_bytes: int = rpc.DEFAULT_CHUNK_BYTES, limits: Limits | None = None,
                 data_policy: DataPolicy = DataPolicy()):
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.limits = limits or store.limits
        self.started = time.time()
        #: how long a push waits for its backups to confirm it before failing
        self.replica_timeout_s = rpc.DEFAULT_TIMEOUT_S
        #: which models a user may touch (with auth on); set once the scheduler link exists
        self.guard: ModelGuard | None = None
        #: where Checkpoint may write
        self.data_policy = data_policy
        #: shared-memory segments of clients on this host (PushPullLocal)
        self.segments = shm.Attached()
        #: the same-host link those clients may call over instead of gRPC (``start_link``)
        self.link: LinkServer | None = None

    def _user(self, context):
        """The caller, when it is a user whose access to each model is checked (else None)."""
        return None if self.guard is None else self.guard.user(context)

    def _owned(self, context, what: str):
        """A check that a call's model is the calling user's (each model once per call); a no-op for
        members, admins and without auth."""
        return self._owned_by(self._user(context), what)

    def _owned_by(self, who, what: str):
        """``_owned`` for a caller known already (None, or not a user: no check)."""
        if who is not None and (self.guard is None or who.role != security.USER):
            who = None
        if who is None:
            return lambda model: None
        seen = set()

        def check(model: str) -> None:
            if model not in seen:
                self.limits.check_name(f"{what}: model name", model)  # before the scheduler is asked about it
                self.guard.check(who, model, what)
                seen.add(model)
        return check

    def _names(self, what: str, req) -> None:
        """A Push/Assign request's names, checked before any message or lookup uses them."""
        lim = self.limits
        lim.check_name(f"{what}: model name", req.model)
        lim.check_name(f"{what}: tensor name", req.chunk.tensor)

    def CreateModel(self, request, context):
        lim = self.limits
        try:
            lim.check_name("create model: model name", request.model)
            lim.check_count(f"create model '{request.model}': slices", len(request.slices), "max_slices")
            slices = []
            for s in request.slices:
                lim.check_name(f"create model '{request.model}': tensor name", s.tensor)
                lim.check_count(f"create model '{request.model}': tensor '{s.tensor}': shape dimensions",
                                len(s.shape), "max_dims", InvalidArgument)
                try:
                    dtype = numpy_dtype(s.dtype)
                except CodecError as e:
                    raise InvalidArgument(f"create model '{request.model}': tensor '{s.tensor}': {e}") from None
                shape = tuple(s.shape)
                slices.append(SliceRequest(s.tensor, shape, dtype, s.offset, s.length,
                                           initializers.Init.from_proto(s.init, shape, dtype.name)))
            config = OptimizerConfig.from_proto(request.optimizer)
            tables = sparse.check_tables(request.tables, f"create model '{request.model}'")
            if self.guard is not None:
                self.guard.check_create(self._user(context), request.model, request.slices,
                                        f"create model '{request.model}'", request.tables)
                self.guard.forget(request.model)
            nbytes = self.store.create(request.model, slices, config, replace=request.replace, tables=tables)
        except (PSError, ValueError) as e:
            abort(context, e if isinstance(e, PSError) else InvalidArgument(f"create model '{request.model}': {e}"))
        except MemoryError:  # max_bytes above what this host has left
            abort(context, ResourceExhausted(f"create model '{request.model}': out of memory; lower this "
                                             f"shard's limit {self.store.max_bytes} {lim.hint('max_bytes')}"))
        log.info("created model '%s': %d slices, %d bytes, optimizer %s", request.model,
                 len(request.slices), nbytes, config.name)
        return server_pb2.CreateModelResponse(bytes=nbytes)

    def Assign(self, request_iterator, context):
        n = 0
        waits = []
        owned = self._owned(context, "assign to")
        try:
            for req in request_iterator:
                self._names("assign to", req)
                owned(req.model)
                values = _decode(req.chunk, req.model, "assign to")
                self.store.assign(req.model, req.chunk.tensor, req.chunk.offset, values, waits=waits)
                n += 1
            self._replicated(waits, "assign")
        except PSError as e:
            abort(context, e)
        return server_pb2.AssignResponse(chunks=n)

    # -- replication ---------------------------------------------------------------------
    def SetReplicas(self, request, context):
        lim = self.limits
        what = f"set replicas of '{request.model}'"
        try:
            lim.check_name("set replicas: model name", request.model)
            lim.check_count(f"{what}: ranges", len(request.ranges), "max_slices")
            lim.check_count(f"{what}: backups", len(request.backups), "max_slices")
            lim.check_names(f"{what}: tensor name", (r.tensor for r in request.ranges))
            for b in request.backups:
                if ":" not in b or len(b) > 255:
                    raise InvalidArgument(f"{what}: backup address must be host:port, got '{b[:255]}'")
            if request.backups and self.store.model(request.model).tables:
                raise FailedPrecondition(f"{what}: sparse tables are not replicated yet")
            if self.guard is not None:
                self.guard.check_replicas(self._user(context), request.model, request.backups, request.demote, what)
            ranges = [(r.tensor, r.offset, r.length) for r in request.ranges]
            if request.demote:
                waits, sent = self.store.demote(request.model, ranges), 0
                self._replicated(waits, what)
                log.info("%s: no longer primary of %d slices (map version %d)", what, len(ranges),
                         request.map_version)
                return server_pb2.SetReplicasResponse(slices=0)
            waits, sent = self.store.set_replicas(request.model, ranges, list(request.backups))
            self._replicated(waits, what)
        except PSError as e:
            abort(context, e)
        log.info("%s: primary of %d slices, backups %s (map version %d)", what, len(ranges),
                 ", ".join(request.backups) or "none", request.map_version)
        return server_pb2.SetReplicasResponse(slices=len(ranges), bytes_sent=sent)

    def Checkpoint(self, request, context):
        what = f"checkpoint '{request.model}'"
        try:
            self.limits.check_name("checkpoint: model name", request.model)
            self.limits.check_name("checkpoint: shard name", request.shard)
            if not request.url or len(request.url) > 4096:
                raise InvalidArgument(f"{what}: url must be a non-empty fsspec URL of at most 4096 characters")
            checkpoint.check_absolute(request.url, what)
            self.data_policy.check(request.url, "checkpoint url")
            if not request.shard or "/" in request.shard or request.shard.startswith("."):
                raise InvalidArgument(f"{what}: shard name '{request.shard}' must be a plain file name")
            m = self.store.model(request.model)
            if m.tables:
                raise FailedPrecondition(f"{what}: checkpoints of sparse tables are not written yet")
            snaps = [self.store.snapshot(sl, m.tensors[sl.tensor].shape) for sl in m.slices if sl.primary]
            data = checkpoint.encode_shard(request.model, m.optimizer.config.to_dict(), snaps,
                                           {t: meta.dtype.name for t, meta in m.tensors.items()})
            name = f"{request.shard}.safetensors"
            checkpoint.write_atomic(request.url, name, data)
        except PSError as e:
            abort(context, e)
        except OSError as e:
            abort(context, Unavailable(f"{what}: writing to {request.url}: {type(e).__name__}: {e}"))
        log.info("%s: %d slices, %d bytes to %s/%s", what, len(snaps), len(data), request.url, name)
        return server_pb2.CheckpointResponse(files=[name], bytes=len(data), slices=len(snaps), versions=[
            server_pb2.SliceVersion(tensor=s.tensor, offset=s.offset, version=s.version) for s in snaps])

    def Replicate(self, request, context):
        what = f"replicate '{request.model}' from {request.primary or 'a primary'}"
        n = 0
        try:
            self.limits.check_name("replicate: model name", request.model)
            config = None
            for op in request.ops:
                kind = op.WhichOneof("op")
                if kind == "install":
                    if config is None:
                        config = OptimizerConfig.from_proto(request.optimizer)
                    self.store.install(request.model, config, op.install, restore=not request.primary)
                elif kind == "push":
                    self._apply(op.push, replica=True)
                elif kind == "assign":
                    req = op.assign
                    self._names("replicate assign to", req)
                    self.store.assign(req.model, req.chunk.tensor, req.chunk.offset,
                                      _decode(req.chunk, req.model, "replicate assign to"), replica=True)
                elif kind == "close":
                    c = op.close
                    self.limits.check_name("replicate close of: tensor name", c.tensor)
                    self.limits.check_name("replicate close of: member", c.by)
                    self.store.close_step(request.model, c.tensor, c.offset, c.step, c.by)
                else:
                    raise InvalidArgument(f"{what}: op {n} is empty")
                n += 1
        except (PSError, ValueError) as e:
            abort(context, e if isinstance(e, PSError) else InvalidArgument(f"{what}: {e}"))
        return server_pb2.ReplicateResponse(applied=n)

    def _apply(self, req: server_pb2.PushRequest, waits: list | None = None, replica: bool = False):
        what = "replicate push to" if replica else "push to"
        self._names(what, req)
        self.limits.check_name(f"{what}: client_id", req.client_id)
        grad = _decode(req.chunk, req.model, what)
        return self.store.push(req.model, req.client_id, req.seq, req.chunk.tensor, req.chunk.offset,
                               grad, req.grad_scale or 1.0, waits=waits, replica=replica)

    def _replicated(self, waits: list, what: str) -> None:
        """Wait until every backup has applied what was forwarded (or was dropped from the replica
        set); the error of one that failed otherwise."""
        if not waits:
            return
        for link in {id(f.link): f.link for f in waits if hasattr(f, "link")}.values():
            link.drive()  # send from this thread, unless another one is sending already
        done, pending = futures.wait(waits, timeout=self.replica_timeout_s)
        if pending:
            late = sorted({f.link.backup for f in pending if hasattr(f, "link")})
            raise Unavailable(f"{what}: backup(s) {', '.join(late) or '?'} did not confirm the update within "
                              f"{self.replica_timeout_s:g} s")
        for f in done:
            if f.exception() is not None:
                e = f.exception()
                raise e if isinstance(e, PSError) else Unavailable(f"{what}: {e}")

    def _pushed(self, request_iterator, context, waits: list) -> Iterator[bool]:
        """Apply each chunk of a push stream (its model checked for the caller first); yields whether
        it was new (False: a retry, skipped). The caller waits on ``waits`` once the stream ends."""
        owned = self._owned(context, "push to")
        for req in request_iterator:
            owned(req.model)
            _, ok = self._apply(req, waits)
            del req  # its buffer goes now, not after the caller's reply
            yield ok

    def Push(self, request_iterator, context):
        applied = dup = 0
        waits = []
        try:
            for ok in self._pushed(request_iterator, context, waits):
                applied += ok
                dup += not ok
            self._replicated(waits, "push")
        except PSError as e:
            abort(context, e)
        return server_pb2.PushResponse(applied=applied, duplicates=dup)

    def PushAcked(self, request_iterator, context) -> Iterator[server_pb2.PushAck]:
        waits = []
        try:
            for ok in self._pushed(request_iterator, context, waits):
                yield server_pb2.PushAck(duplicate=not ok)
            self._replicated(waits, "push")
        except PSError as e:
            abort(context, e)

    def _push_pull(self, req, waits: list) -> tuple[bytes, bool]:
        """Apply one pushed chunk: (the encoded PullResponse of the fresh weights of its range, whether it
        was new; False: a retry, skipped)."""
        sl, ok = self._apply(req, waits)
        c = req.chunk
        return self.store.read_slice(sl, c.offset, len(c.values.data) // sl.param.itemsize,
                                     lambda view, version: wire.encode_pull_response(
                                         c.tensor, c.offset, c.values.dtype, view, version, duplicate=not ok)), ok

    def PushPull(self, request_iterator, context) -> Iterator[bytes]:
        waits = []
        owned = self._owned(context, "push_pull to")
        try:
            for req in request_iterator:
                owned(req.model)
                resp, _ = self._push_pull(req, waits)
                del req  # the request's buffer goes now, not after the response is sent
                yield resp
            # the push counts once the stream ends: after the backups have applied it
            self._replicated(waits, "push_pull")
        except PSError as e:
            abort(context, e)

    def PushBatch(self, request, context) -> bytes:
        kind = "push_pull" if request.pull else "push"
        what = f"{kind} to"
        waits, pulls = [], []
        applied = dup = 0
        owned = self._owned(context, what)
        try:
            self.limits.check_count(f"{what}: chunks of a batch", len(request.chunks), "max_slices", InvalidArgument)
            for req in request.chunks:
                owned(req.model)
                if request.pull:
                    resp, ok = self._push_pull(req, waits)
                    pulls.append(resp)
                else:
                    ok = self._apply(req, waits)[1]
                applied += ok
                dup += not ok
            self._replicated(waits, kind)
        except PSError as e:
            abort(context, e)
        return wire.encode_push_batch_response(pulls, applied, dup)

    def ApplyAccumulated(self, request, context):
        try:
            resp = self._apply_accumulated(request, self._owned(context, "apply accumulated to"))
        except PSError as e:
            abort(context, e)
        if self.link is not None:
            resp.link = self.link.name
        return resp

    def _apply_accumulated(self, request, owned) -> server_pb2.ApplyAccumulatedResponse:
        what = f"apply accumulated '{request.accumulator}' to '{request.model}'"
        lim = self.limits
        waits = []
        lim.check_name("apply accumulated: model name", request.model)
        lim.check_name("apply accumulated: accumulator name", request.accumulator)
        lim.check_name(f"{what}: client_id", request.client_id)
        lim.check_count(f"{what}: ranges", len(request.ranges), "max_slices", InvalidArgument)
        lim.check_names(f"{what}: tensor name", (r.tensor for r in request.ranges))
        owned(request.model)
        owned(request.accumulator)
        lim.check_name(f"{what}: member", request.member)
        done = self.store.apply_accumulated(
            request.model, request.accumulator, request.contributors, request.client_id, request.seq,
            [(r.tensor, r.offset, r.length) for r in request.ranges], members=request.members,
            wait_s=request.wait_s, member=request.member, waits=waits)
        self._replicated(waits, "apply accumulated")
        return server_pb2.ApplyAccumulatedResponse(applied=done.applied, duplicates=done.duplicates, empty=done.empty,
                                                   version=done.version, closed=done.closed, closer=done.closer,
                                                   busy=done.busy)

    def PushPullLocal(self, request, context):
        """push_pull through a shared-memory segment of a client on this host (``ps.shm``)."""
        try:
            resp = self._local(request, self._owned(context, LOCAL_WHAT))
        except PSError as e:
            abort(context, e)
        if self.link is not None:
            resp.link = self.link.name
        return resp

    def start_link(self) -> LinkServer:
        """Listen for same-host links (``ps.local_link``): a token must be one that may call
        PushPullLocal over gRPC (and ApplyAccumulated, for that call)."""
        self.link = LinkServer({local_link.CALL: (f"/{SERVICE_NAME}/PushPullLocal", self.linked),
                                local_link.APPLY: (f"/{SERVICE_NAME}/ApplyAccumulated", self.linked_apply)},
                               security.current().auth)
        return self.link

    def linked_apply(self, request: bytes, who) -> bytes:
        """An ApplyAccumulated that came over a same-host link from ``who``."""
        try:
            req = server_pb2.ApplyAccumulatedRequest.FromString(request)
        except DecodeError as e:
            raise InvalidArgument(f"apply accumulated: the request is not an ApplyAccumulatedRequest: {e}") from None
        return self._apply_accumulated(req, self._owned_by(who, "apply accumulated to")).SerializeToString()

    def linked(self, request: bytes, who) -> bytes:
        """A PushPullLocal that came over a same-host link (``ps.local_link``) from ``who``."""
        try:
            req = server_pb2.LocalPushPullRequest.FromString(request)
        except DecodeError as e:
            raise InvalidArgument(f"{LOCAL_WHAT}: the request is not a LocalPushPullRequest: {e}") from None
        return self._local(req, self._owned_by(who, LOCAL_WHAT)).SerializeToString()

    def _local(self, request, owned) -> server_pb2.LocalPushPullResponse:
        what = LOCAL_WHAT
        lim = self.limits
        try:
            lim.check_name(f"{what}: model name", request.model)
            if not request.only_pull:
                lim.check_name(f"{what}: client_id", request.client_id)
            lim.check_count(f"{what}: ranges", len(request.ranges), "max_slices", InvalidArgument)
            lim.check_names(f"{what}: tensor name", (r.tensor for r in request.ranges))
            owned(request.model)
            segment = self.segments.get(request.segment, what)
            applied = dup = 0
            versions = []
            waits = []
            for r in request.ranges:
                where = f"{what} '{request.model}/{r.tensor}' [{r.offset}, {r.offset + r.length})"
                dtype = numpy_dtype(r.dtype)
                if request.only_pull:
                    sl = self.store.model(request.model).locate(r.tensor, r.offset, r.length, "pull (local) from")
                    if numpy_dtype(r.dtype) != sl.param.dtype:
                        raise InvalidArgument(f"{where}: dtype {dtype} but the tensor holds {sl.param.dtype}")
                else:
                    # a copy: the client's process can write the segment while it is validated and applied
                    grad = shm.view(segment, dtype, r.at, r.length, where).copy()
                    sl, ok = self.store.push(request.model, request.client_id, request.seq, r.tensor, r.offset, grad,
                                             request.grad_scale or 1.0, waits=waits)
                    applied += ok
                    dup += not ok
                if request.pull or request.only_pull:
                    out = shm.view(segment, dtype, r.at, r.length, where)
                    versions.append(self.store.read_slice(sl, r.offset, r.length,
                                                          lambda v, version: (np.copyto(out, v), version)[1]))
            self._replicated(waits, "push_pull")
        except CodecError as e:
            raise InvalidArgument(f"{what}: {e}") from None
        return server_pb2.LocalPushPullResponse(applied=applied, duplicates=dup, version=min(versions, default=0))

    def Pull(self, request, context) -> Iterator[bytes]:
        max_chunk = request.max_chunk_bytes or self.chunk_bytes
        lim = self.limits
        try:
            lim.check_name("pull from: model name", request.model)
            lim.check_chunk_bytes(f"pull from '{request.model}'", request.max_chunk_bytes)
            lim.check_count(f"pull from '{request.model}': ranges", len(request.ranges), "max_slices")
            lim.check_names(f"pull from '{request.model}': tensor name", (r.tensor for r in request.ranges))
            self._owned(context, "pull from")(request.model)
            model = self.store.model(request.model)
            if request.ranges:
                wanted = [(model.locate(r.tensor, r.offset, r.length, "pull from"), r.offset, r.length)
                          for r in request.ranges]
            else:
                wanted = [(sl, sl.offset, sl.length) for sl in model.slices]
        except PSError as e:
            abort(context, e)
        for sl, offset, length in wanted:
            code = dtype_code(sl.param.dtype)
            for o, n in sharding.iter_chunks(offset, length, sl.param.itemsize, max_chunk):
                yield self.store.read_slice(sl, o, n, lambda view, version, o=o:
                                            wire.encode_pull_response(sl.tensor, o, code, view, version))

    def DeleteModel(self, request, context):
        try:
            self.limits.check_name("delete model: model name", request.model)
            self._owned(context, "delete model")(request.model)
            freed = self.store.delete(request.model)
            if self.guard is not None:
                self.guard.forget(request.model)
        except (InvalidArgument, PermissionDenied) as e:
            abort(context, e)
        except NotFound:
            return server_pb2.DeleteModelResponse(deleted=False)
        log.info("deleted model '%s': %d bytes freed", request.model, freed)
        return server_pb2.DeleteModelResponse(deleted=True, bytes_freed=freed)

    # -- sparse tables -----------------------------------------------------------------------
    def _table(self, context, request, what: str):
        self.limits.check_name(f"{what}: model name", request.model)
        self.limits.check_name(f"{what}: table name", request.table)
        self._owned(context, what)(request.model)
        table = self.store.model(request.model).table(request.table, what)
        limit = self.store.max_bytes
        if limit is not None and (held := self.store.nbytes + self.store.table_bytes()) > limit:
            raise ResourceExhausted(f"{what}: this shard holds {held} bytes, over its limit {limit} "
                                    f"{self.limits.hint('max_bytes')}; sparse tables grow with every new id: "
                                    f"set evict_after or admit_after on the table, or add servers")
        return table

    def PullRows(self, request, context):
        what = f"pull rows of '{request.model}/{request.table}'"
        try:
            table = self._table(context, request, what)
            ids = sparse.decode_ids(request.ids, what, self._max_rows(table))
            rows = table.pull(ids)
        except PSError as e:
            abort(context, e)
        return server_pb2.PullRowsResponse(rows=tensor_pb2.Tensor(dtype=dtype_code(rows.dtype), shape=list(rows.shape),
                                                                  data=rows.tobytes()))

    def PushRows(self, request, context):
        what = f"push rows to '{request.model}/{request.table}'"
        try:
            table = self._table(context, request, what)
            self.limits.check_name(f"{what}: client_id", request.client_id)
            ids = sparse.decode_ids(request.ids, what, self._max_rows(table))
            g = request.grads
            if list(g.shape) != [len(ids), table.spec.width]:
                raise InvalidArgument(f"{what}: gradients of shape {list(g.shape)}, expected [{len(ids)}, "
                                      f"{table.spec.width}] (one row of the table's width per id)")
            try:
                grads = decode(g, "gradients")
            except CodecError as e:
                raise InvalidArgument(f"{what}: {e}") from None
            applied = table.push(ids, grads, request.client_id, request.seq, request.grad_scale or 1.0)
        except PSError as e:
            abort(context, e)
        return server_pb2.PushRowsResponse(applied=applied)

    def _max_rows(self, table) -> int:
        """Most ids one message may name: as many rows as fit in a message."""
        return max(1, self.limits.max_message_bytes // (table.spec.width * np.dtype(table.spec.dtype).itemsize))

    def Stats(self, request, context):
        resp = server_pb2.StatsResponse(uptime_s=time.time() - self.started, step_waiters=self.store.step_waiters)
        total = 0
        for m in self.store.models():
            held = list(m.slices)
            slices = [s for s in held if s.primary]
            nbytes = sum(s.nbytes for s in held)
            total += nbytes
            resp.models.add(model=m.name, slices=len(slices), params=sum(s.length for s in slices),
                            bytes=nbytes, pushes=sum(s.pushes for s in slices),
                            pulls=sum(s.pulls for s in slices),
                            max_version=max((s.version for s in slices), default=0),
                            min_version=min((s.version for s in slices), default=0),
                            member_steps=max((s.member_steps for s in slices), default=0),
                            optimizer=m.optimizer.config.name, backup_slices=len(held) - len(slices),
                            tables=[server_pb2.TableStats(name=n, rows=(st := t.stats())["rows"], bytes=st["bytes"])
                                    for n, t in m.tables.items()])
        resp.bytes = total
        resp.link_calls = self.link.calls if self.link is not None else 0
        return resp


class SchedulerLink:
    """Keeps this server registered with the scheduler: register, then heartbeat; re-register
    when the scheduler forgets us (it restarted, or declared us down)."""

    def __init__(self, scheduler: str, advertise: str, store: ShardStore, connect_timeout: float):
        self.scheduler = scheduler
        self.advertise = advertise
        self.store = store
        self.connect_timeout = connect_timeout
        self.channel = rpc.channel(scheduler)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.server_id = ""
        self.instance = uuid.uuid4().hex  # this process: a retried registration keeps its id
        self.cluster_id = ""  # the scheduler state we registered with: heartbeats carry it back
        self.interval = 1.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def register(self, deadline_s: float) -> None:
        resp = rpc.retry_unavailable(
            lambda: self.stub.RegisterServer(scheduler_pb2.RegisterServerRequest(address=self.advertise,
                                                                                 instance=self.instance),
                                             timeout=rpc.DEFAULT_TIMEOUT_S),
            f"registering with the scheduler at {self.scheduler}", deadline_s, address=self.scheduler)
        self.server_id, self.interval = resp.server_id, resp.heartbeat_interval_s or 1.0
        self.cluster_id = resp.cluster_id
        log.info("registered with scheduler %s as %s (advertising %s; cluster %s, incarnation %d)", self.scheduler,
                 self.server_id, self.advertise, resp.cluster_id[:8] or "-", resp.incarnation)

    def start(self) -> None:
        self.register(self.connect_timeout)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            dropped = self.store.evict_tables()  # sparse tables' rows untouched for their evict_after steps
            if dropped:
                log.info("evicted %d sparse table rows", dropped)
            models = self.store.models()
            req = scheduler_pb2.HeartbeatRequest(server_id=self.server_id,
                                                 bytes=sum(m.nbytes for m in models),
                                                 models=[m.name for m in models], cluster_id=self.cluster_id)
            try:
                if not self.stub.Heartbeat(req, timeout=max(self.interval * 3, 2.0)).known:
                    log.warning("scheduler %s does not know us: registering again", self.scheduler)
                    self.register(self.connect_timeout)
            except (grpc.RpcError, PSError) as e:
                log.warning("heartbeat to scheduler %s failed: %s", self.scheduler,
                            e.details() if isinstance(e, grpc.RpcError) else e)

    def close(self) -> None:
        self.stop.set()
        self.channel.close()


def run(scheduler: str, host: str = "0.0.0.0", port: int = 7000, advertise: str | None = None,
        threads: int = 32, max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES,
        max_bytes: int | None = None, port_file: str | None = None, connect_timeout: float = 60.0,
        flow_window: int = rpc.DEFAULT_FLOW_WINDOW, limits: Limits | None = None,
        data_policy: DataPolicy = DataPolicy()) -> None:
    """The `paramserver server` process: serve until SIGTERM/SIGINT. ``limits``: what requests may
    name (default: ps.limits.current()); ``max_bytes`` and ``max_message_bytes`` override its own."""
    rpc.tune_malloc(arena_max=1)
    limits = dataclasses.replace(limits or ps_limits.current(), max_message_bytes=max_message_bytes,
                                 **({} if max_bytes is None else {"max_bytes": max_bytes}))
    ps_limits.configure(limits)
    store = ShardStore(limits=limits)
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", flow_window)] if flow_window else []
    server = rpc.make_server(threads, max_message_bytes, window)
    servicer = ParameterServerServicer(store, data_policy=data_policy)
    servicer.start_link()
    wire.add_shard_servicer(servicer, server)
    rpc.add_health_and_reflection(server, [SERVICE_NAME])
    bound = rpc.bind(server, host, port)
    server.start()
    address = advertise or f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound}"
    log.info("parameter server listening on %s:%d", host, bound)
    link = SchedulerLink(scheduler, address, store, connect_timeout)
    if security.current().auth is not None:
        servicer.guard = ModelGuard(lambda model: link.stub.GetShardMap(scheduler_pb2.GetShardMapRequest(model=model),
                                                                        timeout=rpc.DEFAULT_TIMEOUT_S), address)

    def on_lost(backup: str, error: str) -> bool:
        """A backup could not be reached: stop forwarding to it, and have the scheduler take it out
        of the replica sets (the pushes waiting on it are acknowledged once that is done)."""
        ok = True
        for model in store.drop_backup(backup):
            try:
                link.stub.ReportReplicaLost(scheduler_pb2.ReportReplicaLostRequest(
                    model=model, primary=address, backup=backup, error=error[:1000]), timeout=rpc.DEFAULT_TIMEOUT_S)
            except grpc.RpcError as e:
                log.error("could not report lost backup %s of '%s' to the scheduler %s: %s", backup, model,
                          scheduler, e.details())
                ok = False
        return ok

    store.replicator = Replicator(address, on_lost, max_message_bytes=max_message_bytes)
    try:
        link.start()
    except PSError as e:
        log.error("%s", e)
        server.stop(0)
        raise SystemExit(2) from None
    def stop():
        link.close()
        store.replicator.close()
        servicer.link.close()
    rpc.serve_until_signal(server, on_stop=stop, ready=lambda: rpc.write_port_file(port_file, bound))
