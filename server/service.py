"""The ParameterServer gRPC service (thin: decode, validate, call the shard store, encode)
and the server process: listen, register with the scheduler, heartbeat."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Iterator

import grpc
import numpy as np

from ps import initializers, rpc, sharding, wire
from ps.errors import InvalidArgument, NotFound, PSError, ResourceExhausted, abort
from ps import limits as ps_limits
from ps.limits import Limits
from ps.optimizer_config import OptimizerConfig
from ps.server.shard import ShardStore, SliceRequest
from ps.tensor import CodecError, decode_1d, dtype_code, numpy_dtype
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc, server_pb2, server_pb2_grpc

log = logging.getLogger("ps.server")
SERVICE_NAME = server_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name


def _decode(chunk, model: str, what: str) -> np.ndarray:
    try:
        return decode_1d(chunk.values, f"{what} '{model}/{chunk.tensor}' at offset {chunk.offset}")
    except CodecError as e:
        raise InvalidArgument(str(e)) from None


class ParameterServerServicer(server_pb2_grpc.ParameterServerServicer):
    """gRPC front of a ShardStore."""

    def __init__(self, store: ShardStore, chunk_bytes: int = rpc.DEFAULT_CHUNK_BYTES, limits: Limits | None = None):
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.limits = limits or store.limits
        self.started = time.time()

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
            nbytes = self.store.create(request.model, slices, config, replace=request.replace)
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
        try:
            for req in request_iterator:
                self._names("assign to", req)
                values = _decode(req.chunk, req.model, "assign to")
                self.store.assign(req.model, req.chunk.tensor, req.chunk.offset, values)
                n += 1
        except PSError as e:
            abort(context, e)
        return server_pb2.AssignResponse(chunks=n)

    def _apply(self, req: server_pb2.PushRequest):
        self._names("push to", req)
        self.limits.check_name("push to: client_id", req.client_id)
        grad = _decode(req.chunk, req.model, "push to")
        return self.store.push(req.model, req.client_id, req.seq, req.chunk.tensor, req.chunk.offset,
                               grad, req.grad_scale or 1.0)

    def Push(self, request_iterator, context):
        applied = dup = 0
        try:
            for req in request_iterator:
                _, ok = self._apply(req)
                applied += ok
                dup += not ok
        except PSError as e:
            abort(context, e)
        return server_pb2.PushResponse(applied=applied, duplicates=dup)

    def PushPull(self, request_iterator, context) -> Iterator[bytes]:
        try:
            for req in request_iterator:
                sl, ok = self._apply(req)
                c = req.chunk
                resp = self.store.read_slice(sl, c.offset, len(c.values.data) // sl.param.itemsize,
                                             lambda view, version: wire.encode_pull_response(
                                                 c.tensor, c.offset, c.values.dtype, view, version, duplicate=not ok))
                del req, c  # the request's buffer goes now, not after the response is sent
                yield resp
        except PSError as e:
            abort(context, e)

    def Pull(self, request, context) -> Iterator[bytes]:
        max_chunk = request.max_chunk_bytes or self.chunk_bytes
        lim = self.limits
        try:
            lim.check_name("pull from: model name", request.model)
            lim.check_chunk_bytes(f"pull from '{request.model}'", request.max_chunk_bytes)
            lim.check_count(f"pull from '{request.model}': ranges", len(request.ranges), "max_slices")
            lim.check_names(f"pull from '{request.model}': tensor name", (r.tensor for r in request.ranges))
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
            freed = self.store.delete(request.model)
        except InvalidArgument as e:
            abort(context, e)
        except NotFound:
            return server_pb2.DeleteModelResponse(deleted=False)
        log.info("deleted model '%s': %d bytes freed", request.model, freed)
        return server_pb2.DeleteModelResponse(deleted=True, bytes_freed=freed)

    def Stats(self, request, context):
        resp = server_pb2.StatsResponse(uptime_s=time.time() - self.started)
        total = 0
        for m in self.store.models():
            slices = list(m.slices)
            nbytes = sum(s.nbytes for s in slices)
            total += nbytes
            resp.models.add(model=m.name, slices=len(slices), params=sum(s.length for s in slices),
                            bytes=nbytes, pushes=sum(s.pushes for s in slices),
                            pulls=sum(s.pulls for s in slices),
                            max_version=max((s.version for s in slices), default=0),
                            min_version=min((s.version for s in slices), default=0),
                            optimizer=m.optimizer.config.name)
        resp.bytes = total
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
        self.interval = 1.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def register(self, deadline_s: float) -> None:
        resp = rpc.retry_unavailable(
            lambda: self.stub.RegisterServer(scheduler_pb2.RegisterServerRequest(address=self.advertise),
                                             timeout=rpc.DEFAULT_TIMEOUT_S),
            f"registering with the scheduler at {self.scheduler}", deadline_s, address=self.scheduler)
        self.server_id, self.interval = resp.server_id, resp.heartbeat_interval_s or 1.0
        log.info("registered with scheduler %s as %s (advertising %s)", self.scheduler, self.server_id,
                 self.advertise)

    def start(self) -> None:
        self.register(self.connect_timeout)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            models = self.store.models()
            req = scheduler_pb2.HeartbeatRequest(server_id=self.server_id,
                                                 bytes=sum(m.nbytes for m in models),
                                                 models=[m.name for m in models])
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
        flow_window: int = rpc.DEFAULT_FLOW_WINDOW, limits: Limits | None = None) -> None:
    """The `paramserver server` process: serve until SIGTERM/SIGINT. ``limits``: what requests may
    name (default: ps.limits.current()); ``max_bytes`` and ``max_message_bytes`` override its own."""
    rpc.tune_malloc(arena_max=1)
    limits = dataclasses.replace(limits or ps_limits.current(), max_message_bytes=max_message_bytes,
                                 **({} if max_bytes is None else {"max_bytes": max_bytes}))
    ps_limits.configure(limits)
    store = ShardStore(limits=limits)
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", flow_window)] if flow_window else []
    server = rpc.make_server(threads, max_message_bytes, window)
    wire.add_shard_servicer(ParameterServerServicer(store), server)
    rpc.add_health_and_reflection(server, [SERVICE_NAME])
    bound = rpc.bind(server, host, port)
    server.start()
    address = advertise or f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound}"
    log.info("parameter server listening on %s:%d", host, bound)
    link = SchedulerLink(scheduler, address, store, connect_timeout)
    try:
        link.start()
    except PSError as e:
        log.error("%s", e)
        server.stop(0)
        raise SystemExit(2) from None
    rpc.write_port_file(port_file, bound)
    rpc.serve_until_signal(server, on_stop=link.close)
