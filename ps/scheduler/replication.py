"""The scheduler's side of replication: every shard of every model on ``replication`` live servers.

Shard i of a model is held by a replica set, primary first (ShardMap.members). One loop keeps
the sets whole:

1. Promotion. A replica whose server is down (no heartbeat for the server timeout), restarted
   (a new member registered from its address) or being drained leaves the set; if it was the
   primary, the next replica becomes primary. The new primary is told first (SetReplicas: it
   takes the primary's role and resyncs the remaining backups from its own state), then the map
   moves to a new version, so a client that fetches it finds a primary that accepts its pushes.
   Every acknowledged push is on every live replica (the primary waits for its backups), so the
   new primary has it; a push it has not seen was never acknowledged, and the client retries it
   with the same (client id, seq).
2. Re-replication. A set with fewer replicas than wanted gets the least loaded up server that
   holds none of it: the primary sends it a snapshot of each slice and forwards every later
   update, then the map lists it.

A primary that loses a backup between two passes reports it (``lost``): the backup leaves the
set at once, so the primary can acknowledge what its live replicas hold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

from ps.errors import FailedPrecondition, NotFound, PSError, Unavailable
from ps.scheduler.cluster import UP, Cluster, ShardMap

log = logging.getLogger("ps.scheduler.replication")

#: a server reported lost by a primary is declared down when a health check gets no answer in this long
PROBE_TIMEOUT_S = 1.0


def _ranges(m: ShardMap, shard: int) -> list:
    """The ps.v1.Range of every slice of ``shard``."""
    from ps.v1 import server_pb2
    return [server_pb2.Range(tensor=s.tensor, offset=s.offset, length=s.length) for s in m.slices if s.shard == shard]


class Replication:
    """Repairs replica sets; ``client()`` is the scheduler's own ps.Client, ``saved(map)`` persists a map."""

    def __init__(self, cluster: Cluster, client: Callable[[], object],
                 saved: Callable[[ShardMap], None] | None = None, timeout_s: float = 60.0,
                 on_shard_lost: Callable[[str, int, list[str]], None] | None = None):
        self.cluster = cluster
        self.on_shard_lost = on_shard_lost or (lambda model, shard, servers: None)
        self._client = client
        self.saved = saved or (lambda m: None)
        self.saved_cluster = lambda: self.saved(None)
        self.timeout_s = timeout_s
        self.wake = threading.Event()
        self.draining = cluster.draining    # addresses drained: no longer live, never chosen
        self._lost_logged: set[tuple[str, int]] = set()
        self._repair_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self.stopping = threading.Event()  # set on shutdown: a drain in progress gives up

    # -- what is live --------------------------------------------------------------------
    def _live(self, sid: str, address: str) -> bool:
        if address in self.draining:
            return False
        s = self.cluster.servers.get(sid) if sid else next(
            (s for s in self.cluster.servers.values() if s.address == address and s.state == UP), None)
        return s is not None and s.state == UP and s.address == address

    def _update(self, model: str, shard: int, members: list[tuple[str, str]]) -> ShardMap | None:
        """Shard's replica set becomes ``members`` in the current map (a new version)."""
        with self.cluster._lock:
            m = self.cluster.maps.get(model)
            if m is None:
                return None
            sets = [m.members(i) for i in range(len(m.replicas))]
            sets[shard] = list(members)
            m = self.cluster.maps[model] = m.with_replicas(sets)
        self.saved(m)
        return m

    def under_replicated(self) -> list[tuple[ShardMap, int]]:
        """(map, shard) of every shard with fewer live replicas than wanted."""
        out = []
        for m in list(self.cluster.maps.values()):
            for i in range(len(m.replicas)):
                live = [x for x in m.members(i) if self._live(*x)]
                if len(live) < m.replication:
                    out.append((m, i))
        return out

    # -- events ----------------------------------------------------------------------------
    def lost(self, model: str, primary: str, backup: str) -> int:
        """A primary could not reach a backup: take the backup out of the sets that primary leads.
        Returns the map version; FailedPrecondition when ``primary`` leads no shard of the model
        any more (it was replaced: its pushes must fail, and their clients find the new primary)."""
        with self.cluster._lock:
            m = self.cluster.maps.get(model)
            if m is None:
                raise NotFound(f"model '{model}' is not known to the scheduler")
            sets = [m.members(i) for i in range(len(m.replicas))]
            led = [i for i, r in enumerate(sets) if r and r[0][1] == primary]
            if not led:
                raise FailedPrecondition(f"replica lost: {primary} is not the primary of any shard of '{model}' "
                                         f"(map version {m.version}): fetch the shard map again")
            changed = False
            for i in led:
                if any(a == backup for _, a in sets[i][1:]):
                    sets[i] = [sets[i][0]] + [x for x in sets[i][1:] if x[1] != backup]
                    changed = True
            if changed:
                m = self.cluster.maps[model] = m.with_replicas(sets)
        if changed:
            self.saved(m)
            log.warning("model '%s': backup %s lost by primary %s: out of its replica sets (map version %d)",
                        model, backup, primary, m.version)
            self.wake.set()
            threading.Thread(target=self._probe, args=(backup,), name=f"probe-{backup}", daemon=True).start()
        return m.version

    def _probe(self, address: str) -> None:
        """A server a primary could not reach for seconds: if it does not answer a health check
        either, it is declared down now rather than at its heartbeat timeout, so the shards it
        leads are promoted sooner."""
        from ps import rpc
        try:
            rpc.check_health(address, timeout=PROBE_TIMEOUT_S)
            return
        except PSError as e:
            why = str(e)
        s = self.cluster.mark_down(address, time.monotonic(), f"unreachable: a primary lost it as a backup and {why}")
        if s is not None:
            log.warning("server %s at %s is down: a primary could not reach it, nor could a health check", s.server_id,
                        address)
            self.saved_cluster()
            self.wake.set()

    def run(self, stop: threading.Event) -> None:
        """The repair loop: on every wake-up and every heartbeat interval."""
        while not stop.is_set():
            self.wake.wait(self.cluster.heartbeat_interval)
            self.wake.clear()
            try:
                self.repair()
            except Exception:  # noqa: BLE001 - the loop must survive whatever one pass meets
                log.exception("replica repair pass failed")

    # -- repair ----------------------------------------------------------------------------
    def _demote(self, m: ShardMap, shard: int, address: str) -> None:
        """A primary that is alive but leaving (drained): it stops taking pushes for the shard, once
        what it forwarded reached the backups, before another replica is promoted."""
        from ps.v1 import server_pb2
        ranges = _ranges(m, shard)
        if not ranges:
            return
        client = self._client()
        try:
            client.call(client.server(address).SetReplicas, server_pb2.SetReplicasRequest(
                model=m.model, ranges=ranges, demote=True, map_version=m.version + 1),
                f"demote '{m.model}' shard {shard}", address, timeout=self.timeout_s)
        except PSError as e:
            log.warning("model '%s' shard %d: could not demote %s: %s", m.model, shard, address, e)

    def _set_replicas(self, m: ShardMap, shard: int, members: list[tuple[str, str]]) -> bool:
        """Tell shard's new primary its backups (it sends them snapshots); False if it failed."""
        from ps.v1 import server_pb2
        ranges = _ranges(m, shard)
        if not ranges:
            return True  # a shard without slices (a model smaller than the cluster)
        client = self._client()
        primary = members[0][1]
        try:
            client.call(client.server(primary).SetReplicas, server_pb2.SetReplicasRequest(
                model=m.model, ranges=ranges, backups=[a for _, a in members[1:]], map_version=m.version + 1),
                f"set replicas of '{m.model}' shard {shard}", primary, timeout=self.timeout_s)
            return True
        except PSError as e:
            log.warning("model '%s' shard %d: could not make %s primary with backups %s: %s", m.model, shard,
                        primary, [a for _, a in members[1:]], e)
            return False

    def repair(self) -> None:
        """One pass: promote (every shard), then re-replicate (every shard)."""
        with self._repair_lock:
            for m in list(self.cluster.maps.values()):
                for i in range(len(m.replicas)):
                    members = m.members(i)
                    live = [x for x in members if self._live(*x)]
                    if live == members:
                        continue
                    if not live:
                        if (m.model, i) not in self._lost_logged:
                            self._lost_logged.add((m.model, i))
                            log.error("model '%s' shard %d: every replica is gone (%s); its slices are lost "
                                      "(resume the job from a checkpoint)", m.model, i,
                                      ", ".join(a for _, a in members))
                            self.on_shard_lost(m.model, i, [a for _, a in members])
                        continue
                    t0 = time.monotonic()
                    old = members[0]
                    if old not in live and old[1] in self.draining:
                        self._demote(m, i, old[1])  # alive: it must stop acknowledging before another leads
                    if self._set_replicas(m, i, live):
                        new = self._update(m.model, i, live)
                        if new is not None:
                            m = new
                            log.warning("model '%s' shard %d: primary %s, backups %s (was %s; map version %d, "
                                        "%.2f s)", m.model, i, live[0][1], [a for _, a in live[1:]],
                                        [a for _, a in members], m.version, time.monotonic() - t0)
            load = Counter(sid for m in self.cluster.maps.values() for r in m.ids for sid in r)
            for m in list(self.cluster.maps.values()):
                for i in range(len(m.replicas)):
                    m = self.cluster.maps.get(m.model, m)
                    members = m.members(i)
                    if len(members) >= m.replication or not members:
                        continue
                    held = {a for _, a in members}
                    spare = sorted((s for s in self.cluster.up_servers(confirmed=True)
                                    if s.address not in held and s.address not in self.draining),
                                   key=lambda s: (load[s.server_id], s.server_id))
                    if not spare:
                        continue
                    new = members + [(spare[0].server_id, spare[0].address)]
                    t0 = time.monotonic()
                    if self._set_replicas(m, i, new):
                        load[spare[0].server_id] += 1
                        m = self._update(m.model, i, new) or m
                        log.info("model '%s' shard %d: re-replicated onto %s (%.2f s; map version %d)", m.model, i,
                                 spare[0].address, time.monotonic() - t0, m.version)

    # -- drain -----------------------------------------------------------------------------
    def holds(self, address: str) -> list[str]:
        """Models with a replica on ``address``."""
        return sorted(m.model for m in self.cluster.maps.values() if any(address in r for r in m.replicas))

    def drain(self, address: str, timeout_s: float) -> tuple[int, list[str]]:
        """Move every replica off ``address`` (promoting others, re-replicating elsewhere), then free
        its models there. Returns (shards moved, models). Raises FailedPrecondition when a shard
        has nowhere to go before the deadline."""
        if not any(s.address == address and s.state == UP for s in self.cluster.servers.values()):
            raise NotFound(f"drain: no server is up at {address}")
        if not self._drain_lock.acquire(blocking=False):
            raise FailedPrecondition(f"drain {address}: another drain is in progress; one at a time")
        try:
            return self._drain(address, timeout_s)
        finally:
            self._drain_lock.release()

    def _drain(self, address: str, timeout_s: float) -> tuple[int, list[str]]:
        from ps.v1 import server_pb2
        models = self.holds(address)
        shards = sum(1 for m in self.cluster.maps.values() for r in m.replicas if address in r)
        others = [s.address for s in self.cluster.up_servers(confirmed=True)
                  if s.address != address and s.address not in self.draining]
        if shards and not others:
            raise FailedPrecondition(f"drain {address}: it holds {shards} shard replica(s) of {len(models)} model(s) "
                                     f"and no other server is up to take them: start one first")
        self.draining.add(address)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self.repair()
                left = self.holds(address)
                if not left:
                    break
                if self.stopping.is_set():
                    raise Unavailable(f"drain {address}: the scheduler is stopping ({len(left)} model(s) still "
                                      f"have a replica there)")
                if time.monotonic() > deadline:
                    raise FailedPrecondition(f"drain {address}: {len(left)} model(s) still have a replica there "
                                             f"after {timeout_s:g} s ({', '.join(left[:5])}): no other server "
                                             f"could take them")
                self.stopping.wait(0.2)
            client = self._client()
            for name in models:
                try:
                    client.call(client.server(address).DeleteModel, server_pb2.DeleteModelRequest(model=name),
                                f"free drained model '{name}'", address)
                except PSError as e:
                    log.warning("drain %s: could not free '%s' there: %s", address, name, e)
        except BaseException:
            self.draining.discard(address)
            raise
        log.info("drained %s: %d shard replicas of %d models moved", address, shards, len(models))
        return shards, models
