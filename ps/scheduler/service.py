"""The Scheduler gRPC service (thin over ``Cluster``) and the scheduler process."""

from __future__ import annotations

import logging
import threading
import time

from ps import rpc, sharding
from ps.errors import InvalidArgument, PSError, abort
from ps.scheduler.cluster import Cluster, ShardMap
from ps.tensor import CodecError, dtype_code, numpy_dtype
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("ps.scheduler")
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


def shard_map_to_proto(m: ShardMap) -> scheduler_pb2.ShardMap:
    return scheduler_pb2.ShardMap(
        model=m.model, servers=list(m.servers),
        tensors=[scheduler_pb2.TensorInfo(name=t.name, shape=list(t.shape), dtype=dtype_code(t.dtype))
                 for t in m.tensors],
        slices=[scheduler_pb2.SliceAssignment(tensor=s.tensor, offset=s.offset, length=s.length, shard=s.shard)
                for s in m.slices],
        optimizer=m.optimizer, max_slice_bytes=m.max_slice_bytes)


def tensor_specs_from_proto(infos) -> list[sharding.TensorSpec]:
    out = []
    for t in infos:
        try:
            dt = numpy_dtype(t.dtype)
        except CodecError as e:
            raise InvalidArgument(f"tensor '{t.name}': {e}") from None
        out.append(sharding.TensorSpec(t.name, tuple(t.shape), dt.name))
    return out


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cluster: Cluster, clock=time.monotonic):
        self.cluster = cluster
        self.clock = clock

    def RegisterServer(self, request, context):
        try:
            s = self.cluster.register(request.address, self.clock())
        except PSError as e:
            abort(context, e)
        log.info("server %s registered from %s", s.server_id, s.address)
        return scheduler_pb2.RegisterServerResponse(server_id=s.server_id,
                                                    heartbeat_interval_s=self.cluster.heartbeat_interval)

    def Heartbeat(self, request, context):
        known = self.cluster.heartbeat(request.server_id, self.clock(), request.bytes, list(request.models))
        return scheduler_pb2.HeartbeatResponse(known=known)

    def GetCluster(self, request, context):
        now = self.clock()
        view = scheduler_pb2.ClusterView(models=sorted(self.cluster.maps))
        for s in sorted(self.cluster.servers.values(), key=lambda s: int(s.server_id.split("-")[1])):
            view.servers.add(server_id=s.server_id, address=s.address, state=s.state,
                             last_heartbeat_age_s=now - s.last_seen, bytes=s.bytes, models=s.models)
        return view

    def PlanModel(self, request, context):
        try:
            m = self.cluster.plan(request.model, tensor_specs_from_proto(request.tensors),
                                  request.max_slice_bytes or sharding.DEFAULT_MAX_SLICE_BYTES,
                                  replace=request.replace, optimizer=request.optimizer)
        except PSError as e:
            abort(context, e)
        return shard_map_to_proto(m)

    def GetShardMap(self, request, context):
        try:
            return shard_map_to_proto(self.cluster.shard_map(request.model))
        except PSError as e:
            abort(context, e)

    def DropModel(self, request, context):
        return scheduler_pb2.DropModelResponse(dropped=self.cluster.drop(request.model))


def _watch_membership(cluster: Cluster, stop: threading.Event, clock) -> None:
    while not stop.wait(cluster.heartbeat_interval / 2):
        for s in cluster.tick(clock()):
            log.warning("server %s at %s is down: no heartbeat for %.1f s", s.server_id, s.address,
                        clock() - s.last_seen)


def run(host: str = "0.0.0.0", port: int = 7070, threads: int = 32, heartbeat_interval: float = 1.0,
        server_timeout: float = 5.0, port_file: str | None = None,
        max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES) -> None:
    """The `paramserver scheduler` process: serve until SIGTERM/SIGINT."""
    cluster = Cluster(heartbeat_interval, server_timeout)
    server = rpc.make_server(threads, max_message_bytes)
    servicer = SchedulerServicer(cluster)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    rpc.add_health_and_reflection(server, [SERVICE_NAME])
    bound = rpc.bind(server, host, port)
    server.start()
    stop = threading.Event()
    threading.Thread(target=_watch_membership, args=(cluster, stop, servicer.clock), name="membership",
                     daemon=True).start()
    log.info("scheduler listening on %s:%d", host, bound)
    rpc.write_port_file(port_file, bound)
    rpc.serve_until_signal(server, on_stop=stop.set)
