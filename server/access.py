"""Which models a caller may touch on this server. The role checks are ps.security's interceptor;
here, a user (with auth on) reaches only models the scheduler's map says are its own, and creates
or replicates only what that map puts on this server, so the scheduler's quotas bind it too.
Members (the scheduler, workers, other servers) and admins reach every model."""

from __future__ import annotations

import threading
from typing import Callable

import grpc

from ps import security
from ps.errors import PermissionDenied
from ps.v1 import scheduler_pb2


class ModelGuard:
    """``fetch_map(model)`` returns the scheduler's ShardMap (a ps.v1 ShardMap) or raises grpc.RpcError;
    ``address`` is this server's advertised address, as the maps name it."""

    def __init__(self, fetch_map: Callable[[str], scheduler_pb2.ShardMap], address: str):
        self.fetch_map = fetch_map
        self.address = address
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def user(context) -> security.Identity | None:
        """The caller when it is a user (whose access to models is checked), else None."""
        who = security.caller(context)
        return who if who is not None and who.role == security.USER else None

    def _map(self, model: str, what: str) -> scheduler_pb2.ShardMap:
        try:
            m = self.fetch_map(model)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise PermissionDenied(f"{what}: the scheduler has no map of model '{model}': a user's model is "
                                       f"planned there first (ps.Client.create_model does)") from None
            raise PermissionDenied(f"{what}: cannot ask the scheduler who owns model '{model}': "
                                   f"{e.code().name}: {e.details()}") from None
        with self._lock:
            self._owners[model] = m.owner
        return m

    def forget(self, model: str) -> None:
        """The model was created again or deleted: its owner is asked afresh."""
        with self._lock:
            self._owners.pop(model, None)

    def check(self, who: security.Identity | None, model: str, what: str) -> None:
        """Raise PermissionDenied unless user ``who`` (None: not a user) owns ``model``."""
        if who is None:
            return
        with self._lock:
            owner = self._owners.get(model)
        if owner is None:
            owner = self._map(model, what).owner
        security.check_owner(who, owner, f"{what}: model '{model}'")

    def _mine(self, m: scheduler_pb2.ShardMap) -> set[int]:
        return {i for i, r in enumerate(m.replicas) if self.address in r.servers}

    def check_create(self, who: security.Identity | None, model: str, slices, what: str, tables=()) -> None:
        """A user creates only its own model's slices that the map puts on this server, with the map's
        shapes and types."""
        if who is None:
            return
        m = self._map(model, what)
        security.check_owner(who, m.owner, f"{what}: model '{model}'")
        mine = self._mine(m)
        planned = {(s.tensor, s.offset, s.length) for s in m.slices if s.shard in mine}
        tensors = {t.name: (tuple(t.shape), t.dtype) for t in m.tensors}
        if sorted(t.SerializeToString(deterministic=True) for t in tables) != \
                sorted(t.SerializeToString(deterministic=True) for t in m.tables):
            raise PermissionDenied(f"{what}: its sparse tables are not those of the scheduler's map "
                                   f"(version {m.version})")
        for s in slices:
            if (s.tensor, s.offset, s.length) not in planned or tensors.get(s.tensor) != (tuple(s.shape), s.dtype):
                raise PermissionDenied(f"{what}: slice {s.tensor}[{s.offset}:{s.offset + s.length}] is not one the "
                                       f"scheduler's map (version {m.version}) puts on this server")

    def check_replicas(self, who: security.Identity | None, model: str, backups, demote: bool, what: str) -> None:
        """A user may have this server replicate its model only to the backups the map names."""
        if who is None:
            return
        if demote:
            raise PermissionDenied(f"{what}: only the scheduler demotes a primary")
        m = self._map(model, what)
        security.check_owner(who, m.owner, f"{what}: model '{model}'")
        allowed = {a for i in self._mine(m) for a in m.replicas[i].servers}
        for b in backups:
            if b not in allowed:
                raise PermissionDenied(f"{what}: {b} is not a replica of this server's shards of '{model}' in the "
                                       f"scheduler's map (version {m.version})")
