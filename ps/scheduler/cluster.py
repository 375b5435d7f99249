"""The scheduler's cluster view as a pure state machine: server membership and shard maps.

Events (register, heartbeat, tick) come in with the time they happen at; every state
change is recorded with its reason in ``transitions``, so "why is shard 2 down?" has an
answer. No sockets here: the gRPC service feeds it, tests drive it event by event.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
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
    #: heard from since this scheduler started (a member loaded from the saved state is not, until
    #: its first heartbeat: it gets no new replicas before then)
    confirmed: bool = True
    #: the token the server process registered with (a retry from the same process keeps its id)
    instance: str = ""


@dataclass
class Worker:
    worker_id: str
    name: str
    device: str
    last_seen: float


@dataclass(frozen=True)
class ShardMap:
    """Where a model lives: shard i is held by ``replicas[i]`` (primary first); ``servers[i]`` is
    that primary, where clients push and pull. ``version`` moves on with every change of replicas."""

    model: str
    servers: tuple[str, ...]
    tensors: tuple[sharding.TensorSpec, ...]
    slices: tuple[sharding.Slice, ...]
    max_slice_bytes: int
    optimizer: object = None  # the ps.v1.OptimizerConfig the model was created with
    replicas: tuple[tuple[str, ...], ...] = ()
    version: int = 1
    replication: int = 1  # wanted replicas per shard
    #: the server ids behind ``replicas`` (a server restarted on the same address is a new member)
    ids: tuple[tuple[str, ...], ...] = ()
    owner: str = ""  # the user whose model it is ("": no auth)
    #: sparse tables (ps.v1.TableSpec as dicts): every shard holds the rows ps.sharding.row_shards gives it
    tables: tuple = ()

    def __post_init__(self):
        if not self.replicas:  # one replica each: the primaries
            object.__setattr__(self, "replicas", tuple((a,) for a in self.servers))

    def with_replicas(self, members) -> "ShardMap":
        """The next version of this map, shard i held by ``members[i]``, (server id, address) pairs,
        primary first."""
        members = [tuple(r) for r in members]
        replicas = tuple(tuple(a for _, a in r) for r in members)
        return dataclasses.replace(self, servers=tuple(r[0] if r else "" for r in replicas), replicas=replicas,
                                   ids=tuple(tuple(i for i, _ in r) for r in members), version=self.version + 1)

    def members(self, shard: int) -> list[tuple[str, str]]:
        """Shard's (server id, address) pairs, primary first."""
        return list(zip(self.ids[shard], self.replicas[shard])) if self.ids else \
            [("", a) for a in self.replicas[shard]]


class Cluster:
    """Membership and shard maps. Thread-safe; every method takes ``now`` explicitly.

    ``cluster_id`` names the state this view belongs to (it is saved with it and survives a
    restart); members get it when they register and send it back with every heartbeat, and a
    heartbeat that carries another one is not known, so its member registers again (the
    scheduler started on an empty state). ``incarnation`` counts the starts on this state.
    Ids come from counters that are saved too, so they are never handed out twice."""

    def __init__(self, heartbeat_interval: float = 1.0, server_timeout: float = 5.0, cluster_id: str = ""):
        self.heartbeat_interval = heartbeat_interval
        self.server_timeout = server_timeout
        self.servers: dict[str, Server] = {}
        self.maps: dict[str, ShardMap] = {}
        self.transitions = TransitionLog()
        self.workers: dict[str, Worker] = {}
        self.cluster_id = cluster_id or uuid.uuid4().hex
        self.incarnation = 1
        self.next_server = 0   # server-N
        self.next_worker = 0   # worker-N
        self.dirty_workers: set[str] = set()  # worker ids registered or gone since the last save
        #: addresses of servers drained (`paramserver drain`): they get no new models or replicas
        #: until a server registers there again
        self.draining: set[str] = set()
        self._lock = threading.RLock()

    def register(self, address: str, now: float, instance: str = "") -> Server:
        """A server announces itself and gets a new id. A member still listed up at that address is
        a process that restarted: it is declared down;
        entries of that address that were down already are forgotten, so restarts do not pile up."""
        if not address or ":" not in address:
            raise InvalidArgument(f"register server: address must be host:port, got '{address}'")
        with self._lock:
            for s in self.servers.values():
                if instance and s.address == address and s.state == UP and s.instance == instance:
                    s.last_seen, s.confirmed = now, True  # the same process again: a retry after a lost reply
                    self.transitions.record(now, s.server_id, "up -> up", f"registered again from {address} "
                                                                           f"(the same process)")
                    return s
            for old in [s for s in self.servers.values() if s.address == address]:
                if old.state == UP:
                    old.state = DOWN
                    self.transitions.record(now, old.server_id, "up -> down",
                                            "re-registered from the same address (restarted)")
                else:
                    del self.servers[old.server_id]
                    self.transitions.record(now, old.server_id, "down -> forgotten",
                                            f"a new server registered from {address}")
            sid = f"server-{self.next_server}"
            self.next_server += 1
            s = self.servers[sid] = Server(sid, address, UP, now, instance=instance)
            self.transitions.record(now, sid, "new -> up", f"registered from {address}")
            return s

    def known_state(self, cluster_id: str) -> bool:
        """Whether a member's ``cluster_id`` (empty: it has none yet) belongs to this state."""
        return not cluster_id or cluster_id == self.cluster_id

    def heartbeat(self, server_id: str, now: float, nbytes: int, models: list[str], cluster_id: str = "") -> bool:
        """Record a heartbeat; False when the server is unknown, was declared down, or registered
        with another state (``cluster_id``)."""
        if not self.known_state(cluster_id):
            return False
        with self._lock:
            s = self.servers.get(server_id)
            if s is None or s.state == DOWN:
                return False
            s.last_seen, s.bytes, s.models = now, nbytes, list(models)
            s.confirmed = True
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

    def mark_down(self, address: str, now: float, reason: str) -> Server | None:
        """Declare the server up at ``address`` down before its heartbeats run out (it was found
        unreachable); returns it (None if none is up there)."""
        with self._lock:
            for s in self.servers.values():
                if s.address == address and s.state == UP:
                    s.state = DOWN
                    self.transitions.record(now, s.server_id, "up -> down", reason)
                    return s
        return None

    def register_worker(self, name: str, device: str, now: float) -> Worker:
        with self._lock:
            wid = f"worker-{self.next_worker}"
            self.next_worker += 1
            w = self.workers[wid] = Worker(wid, name, device or "cpu", now)
            self.dirty_workers.add(wid)
            self.transitions.record(now, wid, "new -> up", f"registered: {name} on {w.device}")
            return w

    def worker_heartbeat(self, worker_id: str, now: float, cluster_id: str = "") -> bool:
        """Record a worker's heartbeat; False when it is unknown or registered with another state."""
        if not self.known_state(cluster_id):
            return False
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
                self.dirty_workers.add(worker_id)
                self.transitions.record(now, worker_id, "up -> left", "deregistered")
            return w

    def expire_workers(self, now: float, timeout: float) -> list[Worker]:
        """Forget workers silent for longer than ``timeout``; return them."""
        with self._lock:
            gone = [w for w in self.workers.values() if now - w.last_seen > timeout]
            for w in gone:
                del self.workers[w.worker_id]
                self.dirty_workers.add(w.worker_id)
                self.transitions.record(now, w.worker_id, "up -> gone", f"no heartbeat for {now - w.last_seen:.1f} s")
            return gone

    def adopt(self, servers: list[Server], workers: list[Worker], maps: list[ShardMap], next_server: int,
              next_worker: int, now: float) -> None:
        """Take back members and maps loaded from a saved state (a restart). Every member gets a
        full timeout from ``now`` to heartbeat (monotonic clocks do not survive a restart)."""
        with self._lock:
            for s in servers:
                s.last_seen, s.confirmed = now, False
                self.servers[s.server_id] = s
            for w in workers:
                w.last_seen = now
                self.workers[w.worker_id] = w
            for m in maps:
                self.maps[m.model] = m
            self.next_server = max(next_server, self.next_server, *(int(s.server_id.split("-")[1]) + 1 for s in servers))
            self.next_worker = max(next_worker, self.next_worker, *(int(w.worker_id.split("-")[1]) + 1 for w in workers))

    def up_servers(self, confirmed: bool = False) -> list[Server]:
        """Servers up (``confirmed``: and heard from since this scheduler started), by id."""
        with self._lock:
            return [s for s in sorted(self.servers.values(), key=lambda s: int(s.server_id.split("-")[1]))
                    if s.state == UP and (s.confirmed or not confirmed)]

    def plan(self, model: str, tensors: list[sharding.TensorSpec], max_slice_bytes: int,
             replace: bool = False, optimizer: object = None, replicas: int = 0, owner: str = "",
             tables: tuple = ()) -> ShardMap:
        """The model's shard map over the servers that are up (the existing one if identical).

        One shard per server; shard i's replicas are servers i, i+1, ... (``replicas`` of them; 0:
        2 when two or more servers are up, else 1), so every server is primary of one shard and
        backup of the shards before it."""
        if not model:
            raise InvalidArgument("plan model: the model name is empty")
        if not tensors and not tables:
            raise InvalidArgument(f"plan model '{model}': it has no tensors and no sparse tables")
        with self._lock:
            old = self.maps.get(model)
            if old is not None and not replace:
                if old.tensors == tuple(tensors) and old.tables == tuple(tables):
                    return old
                raise AlreadyExists(f"model '{model}' already exists with different tensors; "
                                    f"delete it first or pass replace=True")
            servers = [s for s in self.up_servers(confirmed=True) if s.address not in self.draining]
            if not servers:
                raise FailedPrecondition(
                    "no parameter servers are up: start one with `paramserver server --scheduler HOST:PORT`")
            if tables and replicas > 1:
                raise InvalidArgument(f"plan model '{model}': sparse tables are not replicated yet: replicas must "
                                      f"be 1, got {replicas}")
            want = replicas or (1 if tables else min(2, len(servers)))
            if want < 1 or want > len(servers):
                raise InvalidArgument(f"plan model '{model}': replicas must be in [1, {len(servers)}] (the servers "
                                      f"up), got {replicas}")
            try:
                slices = sharding.plan(tensors, len(servers), max_slice_bytes)
            except ValueError as e:
                raise InvalidArgument(f"plan model '{model}': {e}") from None
            n = len(servers)
            sets = [[servers[(i + k) % n] for k in range(want)] for i in range(n)]
            version = old.version + 1 if old is not None else 1
            m = ShardMap(model, tuple(s.address for s in servers), tuple(tensors), tuple(slices), max_slice_bytes,
                         optimizer, replicas=tuple(tuple(s.address for s in r) for r in sets), version=version,
                         replication=want, ids=tuple(tuple(s.server_id for s in r) for r in sets), owner=owner,
                         tables=tuple(tables))
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
