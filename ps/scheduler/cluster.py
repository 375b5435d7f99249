"""The scheduler's cluster view as a pure state machine: server membership and shard maps.

Events (register, heartbeat, tick) come in with the time they happen at; every state
change is recorded with its reason in ``transitions``, so "why is shard 2 down?" has an
answer. No sockets here: the gRPC service feeds it, tests drive it event by event.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ps import sharding
from ps.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ps.scheduler.transitions import TransitionLog

UP, DOWN = "up", "down"


@dataclass
class Server:
    server_id: str
    address: str
    state: str
    last_seen: float
    bytes: int = 0
    models: list[str] = field(default_factory=list)


@dataclass
class Worker:
    worker_id: str
    name: str
    device: str
    last_seen: float


@dataclass(frozen=True)
class ShardMap:
    """Where a model lives: shard i is ``servers[i]``."""

    model: str
    servers: tuple[str, ...]
    tensors: tuple[sharding.TensorSpec, ...]
    slices: tuple[sharding.Slice, ...]
    max_slice_bytes: int
    optimizer: object = None  # the ps.v1.OptimizerConfig the model was created with


class Cluster:
    """Membership and shard maps. Thread-safe; every method takes ``now`` explicitly."""

    def __init__(self, heartbeat_interval: float = 1.0, server_timeout: float = 5.0):
        self.heartbeat_interval = heartbeat_interval
        self.server_timeout = server_timeout
        self.servers: dict[str, Server] = {}
        self.maps: dict[str, ShardMap] = {}
        self.transitions = TransitionLog()
        self.workers: dict[str, Worker] = {}
        self._next = 0
        self._next_worker = 0
        self._lock = threading.RLock()

    def register(self, address: str, now: float) -> Server:
        """A server announces itself; the same address keeps its id (a restarted server)."""
        if not address or ":" not in address:
            raise InvalidArgument(f"register server: address must be host:port, got '{address}'")
        with self._lock:
            for s in self.servers.values():
                if s.address == address:
                    was = s.state
                    s.state, s.last_seen, s.models, s.bytes = UP, now, [], 0
                    self.transitions.record(now, s.server_id, f"{was} -> up", f"registered again from {address}")
                    return s
            sid = f"server-{self._next}"
            self._next += 1
            s = self.servers[sid] = Server(sid, address, UP, now)
            self.transitions.record(now, sid, "new -> up", f"registered from {address}")
            return s

    def heartbeat(self, server_id: str, now: float, nbytes: int, models: list[str]) -> bool:
        """Record a heartbeat; False when the server is unknown or was declared down."""
        with self._lock:
            s = self.servers.get(server_id)
            if s is None or s.state == DOWN:
                return False
            s.last_seen, s.bytes, s.models = now, nbytes, list(models)
            return True

    def tick(self, now: float) -> list[Server]:
        """Declare down every server silent for longer than server_timeout; return them."""
        downed = []
        with self._lock:
            for s in self.servers.values():
                if s.state == UP and now - s.last_seen > self.server_timeout:
                    s.state = DOWN
                    self.transitions.record(now, s.server_id, "up -> down",
                                 f"no heartbeat for {now - s.last_seen:.1f} s (timeout {self.server_timeout:g} s)")
                    downed.append(s)
        return downed

    def register_worker(self, name: str, device: str, now: float) -> Worker:
        with self._lock:
            wid = f"worker-{self._next_worker}"
            self._next_worker += 1
            w = self.workers[wid] = Worker(wid, name, device or "cpu", now)
            self.transitions.record(now, wid, "new -> up", f"registered: {name} on {w.device}")
            return w

    def worker_heartbeat(self, worker_id: str, now: float) -> bool:
        with self._lock:
            w = self.workers.get(worker_id)
            if w is None:
                return False
            w.last_seen = now
            return True

    def deregister_worker(self, worker_id: str, now: float) -> Worker | None:
        """A worker leaving on purpose; returns it (None if unknown)."""
        with self._lock:
            w = self.workers.pop(worker_id, None)
            if w is not None:
                self.transitions.record(now, worker_id, "up -> left", "deregistered")
            return w

    def expire_workers(self, now: float, timeout: float) -> list[Worker]:
        """Forget workers silent for longer than ``timeout``; return them."""
        with self._lock:
            gone = [w for w in self.workers.values() if now - w.last_seen > timeout]
            for w in gone:
                del self.workers[w.worker_id]
                self.transitions.record(now, w.worker_id, "up -> gone", f"no heartbeat for {now - w.last_seen:.1f} s")
            return gone

    def up_servers(self) -> list[Server]:
        with self._lock:
            return [s for s in sorted(self.servers.values(), key=lambda s: int(s.server_id.split("-")[1]))
                    if s.state == UP]

    def plan(self, model: str, tensors: list[sharding.TensorSpec], max_slice_bytes: int,
             replace: bool = False, optimizer: object = None) -> ShardMap:
        """The model's shard map over the servers that are up (the existing one if identical)."""
        if not model:
            raise InvalidArgument("plan model: the model name is empty")
        if not tensors:
            raise InvalidArgument(f"plan model '{model}': it has no tensors")
        with self._lock:
            old = self.maps.get(model)
            if old is not None and not replace:
                if old.tensors == tuple(tensors):
                    return old
                raise AlreadyExists(f"model '{model}' already exists with different tensors; "
                                    f"delete it first or pass replace=True")
            servers = self.up_servers()
            if not servers:
                raise FailedPrecondition(
                    "no parameter servers are up: start one with `paramserver server --scheduler HOST:PORT`")
            try:
                slices = sharding.plan(tensors, len(servers), max_slice_bytes)
            except ValueError as e:
                raise InvalidArgument(f"plan model '{model}': {e}") from None
            m = ShardMap(model, tuple(s.address for s in servers), tuple(tensors), tuple(slices),
                         max_slice_bytes, optimizer)
            self.maps[model] = m
            return m

    def shard_map(self, model: str) -> ShardMap:
        with self._lock:
            m = self.maps.get(model)
        if m is None:
            raise NotFound(f"model '{model}' is not known to the scheduler")
        return m

    def drop(self, model: str) -> bool:
        with self._lock:
            return self.maps.pop(model, None) is not None
