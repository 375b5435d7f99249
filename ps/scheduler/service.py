"""The Scheduler gRPC service (thin over ``Cluster`` and ``Jobs``) and the scheduler process.

The process serves gRPC with asyncio (grpc.aio). Calls that wait (WatchJob followers,
LeaseTask long polls) are coroutines that park on an asyncio event, so any number of them
holds no thread; per-member calls (heartbeats, leases, results, shard maps) are short
coroutines on the loop; the rest (submit, listings, relays) run in a small thread pool. So
followers cannot take capacity from heartbeats, leases and shard-map calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from concurrent import futures

import grpc

from google.protobuf import json_format

from ps import checkpoint, limits, rpc, security, sharding, sparse
from ps.errors import InvalidArgument, NotFound, PermissionDenied, PSError, Unavailable, abort
from ps.scheduler.cluster import Cluster, ShardMap
from ps.scheduler.jobs import EVAL, INSPECT, TERMINAL, Job, Jobs, Retention, consistency
from ps.spec import ACCUMULATOR_OPTIMIZER, accumulator
from ps.data_policy import DataPolicy
from ps.scheduler import access
from ps.scheduler.checkpoints import Checkpointer, default_dir as default_checkpoint_dir
from ps.scheduler.replication import Replication
from ps.tensor import CodecError, dtype_code, numpy_dtype
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc, server_pb2

log = logging.getLogger("ps.scheduler")
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


def shard_map_to_proto(m: ShardMap) -> scheduler_pb2.ShardMap:
    return scheduler_pb2.ShardMap(
        model=m.model, servers=list(m.servers),
        tensors=[scheduler_pb2.TensorInfo(name=t.name, shape=list(t.shape), dtype=dtype_code(t.dtype))
                 for t in m.tensors],
        slices=[scheduler_pb2.SliceAssignment(tensor=s.tensor, offset=s.offset, length=s.length, shard=s.shard)
                for s in m.slices],
        optimizer=m.optimizer, max_slice_bytes=m.max_slice_bytes,
        replicas=[scheduler_pb2.ReplicaSet(servers=list(r)) for r in m.replicas], version=m.version,
        replication=m.replication, owner=m.owner,
        tables=[json_format.ParseDict(t, server_pb2.TableSpec()) for t in m.tables])


def tensor_specs_from_proto(infos) -> list[sharding.TensorSpec]:
    out = []
    for t in infos:
        try:
            dt = numpy_dtype(t.dtype)
        except CodecError as e:
            raise InvalidArgument(f"tensor '{t.name}': {e}") from None
        out.append(sharding.TensorSpec(t.name, tuple(t.shape), dt.name))
    return out


def metrics_to_proto(m: dict) -> scheduler_pb2.JobMetrics:
    return scheduler_pb2.JobMetrics(epoch=m["epoch"], steps=m["steps"], train_loss=m["train_loss"],
                                    test_loss=m["test_loss"], test_accuracy=m["test_accuracy"],
                                    samples_per_s=m["samples_per_s"], seconds=m["seconds"], samples=m["samples"],
                                    duplicates=m["duplicates"], staleness_updates=m.get("staleness_updates", ()),
                                    staleness_clocks=m.get("staleness_clocks", ()))


def job_to_proto(job: Job, summary: bool = False) -> scheduler_pb2.JobInfo:
    """A job's record; a summary (ListJobs) leaves out the spec and the preprocessing statistics."""
    return scheduler_pb2.JobInfo(job_id=job.job_id, name=job.name, state=job.state, error=job.error,
                                 spec_json="" if summary else job.spec_json, metrics=metrics_to_proto(job.metrics),
                                 submitted_at=job.submitted_at, tasks_done=job.tasks_done,
                                 tasks_total=job.tasks_total,
                                 prep_json="" if summary or job.prep is None else json.dumps(job.prep),
                                 owner=job.owner)


#: a follower is sent what happened in this window as one batch
FOLLOWER_BATCH_S = 0.2


def coalesce(events: list) -> list:
    """Of a batch of job events, every one but the superseded progress events: a "task" event
    is dropped when a later event of the batch carries the counts and metrics after it."""
    return [e for i, e in enumerate(events) if e.kind != "task" or i == len(events) - 1]


def event_to_proto(e) -> scheduler_pb2.JobEvent:
    """A job event as sent to followers (built once per event, whatever the number of followers)."""
    if e.wire is None:
        e.wire = scheduler_pb2.JobEvent(seq=e.seq, time=e.time, kind=e.kind, state=e.state, message=e.message,
                                        metrics=metrics_to_proto(e.metrics), tasks_done=e.tasks_done,
                                        tasks_total=e.tasks_total)
    return e.wire


class Waiters:
    """Wakes coroutines parked on a key (a job id, or "" for new work) when the state machines,
    running in any thread, report a change: one asyncio.Event per key, replaced when set."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._events: dict[str, asyncio.Event] = {}

    def event(self, key: str) -> asyncio.Event:
        """The event to await for ``key`` (take it BEFORE checking the state, so no change is missed)."""
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        return ev

    def _wake(self, key: str) -> None:
        ev = self._events.pop(key, None)
        if ev is not None:
            ev.set()

    def notify(self, key: str) -> None:
        """Thread-safe."""
        self.loop.call_soon_threadsafe(self._wake, key)

    def wake_all(self) -> None:
        """Wake every parked call (on the loop's thread)."""
        for key in list(self._events):
            self._wake(key)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cluster: Cluster, clock=time.monotonic, jobs: Jobs | None = None,
                 retention: Retention = Retention(), store=None, checkpoint_dir: str = "",
                 quotas: access.Quotas = access.Quotas(), data_policy: DataPolicy = DataPolicy()):
        self.cluster = cluster
        self.quotas = quotas
        #: where jobs' data may be read from; checkpoints go only under the checkpoint dir when it is restricted
        self.data_policy = data_policy
        self.clock = clock
        self.retention = retention
        self.jobs = jobs or Jobs(max_events=retention.events)
        self.store = store         # a ps.scheduler.state.StateStore, or None: nothing survives a restart
        self.address = ""          # our own address, for the client the scheduler uses itself
        self.wake = threading.Event()
        self.waiters: Waiters | None = None  # set once the event loop runs
        self.followers = 0
        self.closing = False       # set on shutdown: parked calls end instead of waiting on
        self._client = None
        self._client_lock = threading.Lock()
        # a change of replica set is saved as soon as it is made
        self.replication = Replication(cluster, self.client, saved=lambda m: self.save(jobs=False, cluster=True),
                                       on_shard_lost=self._shard_lost)
        self.checkpoints = Checkpointer(self.jobs, self.client, checkpoint_dir or default_checkpoint_dir(
            None if store is None else str(store.dir)), self.clock, saved=self._save_quietly)
        self.checkpoint_policy = (data_policy if data_policy.unrestricted
                                  else DataPolicy.from_values([self.checkpoints.base_dir]))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake parked calls on ``loop`` when jobs change."""
        self.waiters = Waiters(loop)
        self.jobs.listeners.append(self.waiters.notify)

    def save(self, jobs: bool = True, cluster: bool = False) -> None:
        """Write what changed (in jobs and/or the cluster) to the state before answering a call whose
        effect must survive a restart. Raises StateError (UNAVAILABLE) when it cannot be written."""
        if self.store is not None:
            self.store.save(self.jobs if jobs else None, self.cluster if cluster else None, self.clock())

    def _save_quietly(self, cluster: bool = False) -> None:
        """Save from a background thread: a failure is logged, and the next save tries again."""
        try:
            self.save(cluster=cluster)
        except PSError as e:
            log.error("%s", e)

    def _check_checkpoint_url(self, url: str, field: str) -> None:
        """With data roots set, checkpoints are read and written only under the checkpoint dir."""
        try:
            self.checkpoint_policy.check(url, field)
        except PermissionDenied:
            raise PermissionDenied(f"'{field}': {url[:300]} is not under the checkpoint dir "
                                   f"{self.checkpoints.base_dir}: with --data-root set, checkpoints are read and "
                                   f"written only there (--checkpoint-dir)") from None

    def _own_job(self, context, job_id: str, what: str) -> None:
        """End the call with PERMISSION_DENIED unless its caller may act on job ``job_id`` (when it exists)."""
        job = self.jobs.jobs.get(job_id)
        if job is not None:
            try:
                security.check_owner(security.caller(context), job.owner, f"{what} '{job_id}'")
            except PSError as e:
                abort(context, e)

    def _own_model(self, who, model: str, what: str) -> None:
        """Raise PermissionDenied unless ``who`` may act on ``model`` (when it exists)."""
        m = self.cluster.maps.get(model)
        if m is not None:
            security.check_owner(who, m.owner, f"{what} '{model}'")

    def close_client(self) -> None:
        """Close the scheduler's own client: calls it has in flight (a repair, a drain, a relay to a
        server that does not answer) end now, so a stopping scheduler does not wait out their deadlines."""
        with self._client_lock:
            client, self._client = self._client, None
            self.closing = True
        if client is not None:
            client.close()

    def client(self):
        """One long-lived client (to ourselves and the servers) for creating, relaying and freeing
        jobs' parameters, instead of new channels for every call."""
        with self._client_lock:
            if self._client is None:
                if self.closing:
                    raise Unavailable("the scheduler is stopping")
                from ps.client import Client
                self._client = Client(self.address, connect_timeout=10)
            return self._client

    @limits.entry_check(limits.check_register_server)
    def RegisterServer(self, request, context):
        try:
            s = self.cluster.register(request.address, self.clock(), request.instance)
            self.save(jobs=False, cluster=True)
        except PSError as e:
            abort(context, e)
        for old in list(self.cluster.servers.values()):
            if old.address == s.address and old is not s and old.state == "down":
                log.warning("server %s at %s is down: a new server registered from its address (restarted)",
                            old.server_id, old.address)
        log.info("server %s registered from %s", s.server_id, s.address)
        self.replication.draining.discard(s.address)
        self.replication.wake.set()  # a restarted server's old replicas are gone; a new one can take replicas
        return scheduler_pb2.RegisterServerResponse(server_id=s.server_id,
                                                    heartbeat_interval_s=self.cluster.heartbeat_interval,
                                                    cluster_id=self.cluster.cluster_id,
                                                    incarnation=self.cluster.incarnation)

    @limits.entry_check(limits.check_heartbeat)
    async def Heartbeat(self, request, context):
        known = self.cluster.heartbeat(request.server_id, self.clock(), request.bytes, list(request.models),
                                       request.cluster_id)
        return scheduler_pb2.HeartbeatResponse(known=known)

    def GetCluster(self, request, context):
        now = self.clock()
        view = scheduler_pb2.ClusterView(models=sorted(self.cluster.maps), cluster_id=self.cluster.cluster_id,
                                         incarnation=self.cluster.incarnation)
        for s in sorted(self.cluster.servers.values(), key=lambda s: int(s.server_id.split("-")[1])):
            view.servers.add(server_id=s.server_id, address=s.address,
                             state="drained" if s.state == "up" and s.address in self.cluster.draining else s.state,
                             last_heartbeat_age_s=now - s.last_seen, bytes=s.bytes, models=s.models)
        for w in list(self.cluster.workers.values()):
            view.workers.add(worker_id=w.worker_id, name=w.name, device=w.device,
                             last_heartbeat_age_s=now - w.last_seen)
        for m, i in self.replication.under_replicated():
            view.under_replicated.add(model=m.model, shard=i, servers=[a for sid, a in m.members(i)
                                                                       if self.replication._live(sid, a)],
                                      wanted=m.replication)
        return view

    @limits.entry_check(limits.check_plan_model)
    def PlanModel(self, request, context):
        try:
            who = security.caller(context)
            owner = security.owner_for(who, request.owner)
            self._own_model(who, request.model, "plan model")
            tensors = tensor_specs_from_proto(request.tensors)
            sparse.check_tables(request.tables, f"plan model '{request.model}'")
            tables = tuple(json_format.MessageToDict(t, preserving_proto_field_name=True) for t in request.tables)
            access.check_param_bytes(self.quotas, owner, self.cluster.maps, request.model, tensors)
            m = self.cluster.plan(request.model, tensors, request.max_slice_bytes or sharding.DEFAULT_MAX_SLICE_BYTES,
                                  replace=request.replace, optimizer=request.optimizer,
                                  replicas=request.replicas, owner=owner, tables=tables)
            self.save(jobs=False, cluster=True)
        except PSError as e:
            abort(context, e)
        return shard_map_to_proto(m)

    @limits.entry_check(limits.check_model_name("get shard map"))
    async def GetShardMap(self, request, context):
        try:
            m = self.cluster.shard_map(request.model)
            security.check_owner(security.caller(context), m.owner, f"get shard map of '{request.model}'")
            return shard_map_to_proto(m)
        except PSError as e:
            await context.abort(e.code, str(e))

    @limits.entry_check(limits.check_model_name("drop model"))
    def DropModel(self, request, context):
        try:
            self._own_model(security.caller(context), request.model, "drop model")
            dropped = self.cluster.drop(request.model)
            self.save(jobs=False, cluster=True)
        except PSError as e:
            abort(context, e)
        return scheduler_pb2.DropModelResponse(dropped=dropped)

    # -- replication -------------------------------------------------------------------
    @limits.entry_check(limits.check_model_name("report replica lost"))
    def ReportReplicaLost(self, request, context):
        try:
            version = self.replication.lost(request.model, request.primary, request.backup)
        except PSError as e:
            abort(context, e)
        return scheduler_pb2.ReportReplicaLostResponse(map_version=version)

    def DrainServer(self, request, context):
        timeout = request.timeout_s or 60.0
        if not 0 < timeout <= 3600 or ":" not in request.address or len(request.address) > 255:
            abort(context, InvalidArgument(f"drain server: need host:port and 0 < timeout_s <= 3600, got "
                                           f"'{request.address[:255]}' and {request.timeout_s}"))
        try:
            moved, models = self.replication.drain(request.address, timeout)
        except PSError as e:
            abort(context, e)
        return scheduler_pb2.DrainServerResponse(shards_moved=moved, models=models)

    # -- jobs ----------------------------------------------------------------------
    @limits.entry_check(limits.check_submit_job)
    def SubmitJob(self, request, context):
        from ps.spec import JobSpec, SpecError
        manifest = None
        who = security.caller(context)
        owner = who.name if who is not None else ""
        if request.resume_from:
            try:
                self._check_checkpoint_url(request.resume_from, "resume_from")
                manifest = checkpoint.read_manifest(request.resume_from)
                security.check_owner(who, manifest.get("owner", ""), f"resume from {request.resume_from}: the job")
                if "spec_json" not in manifest or "prep" not in manifest or "params" not in manifest:
                    raise InvalidArgument(f"resume from {request.resume_from}: a checkpoint of a model, not of a job "
                                          f"(its manifest has no spec): use Client.restore_model")
            except PSError as e:
                abort(context, e)
            except OSError as e:
                abort(context, Unavailable(f"resume from {request.resume_from}: {type(e).__name__}: {e}"))
        try:
            # schema checks only: the data is a worker's to read
            spec = JobSpec.from_json(request.spec_json or (manifest or {}).get("spec_json", ""))
        except SpecError as e:
            abort(context, InvalidArgument(str(e)))
        try:
            self.data_policy.check_spec(spec)
            if spec.checkpoint_dir:
                self._check_checkpoint_url(spec.checkpoint_dir, "checkpoint_dir")
            access.check_submit(self.quotas, owner, list(self.jobs.jobs.values()), spec)
        except PSError as e:
            abort(context, e)
        if manifest is not None:
            if manifest["epoch"] >= spec.epochs:
                abort(context, InvalidArgument(f"resume from {request.resume_from}: it has {manifest['epoch']} epochs "
                                               f"done, the spec asks for {spec.epochs}: nothing left to run"))
            job = self.jobs.submit(spec.name, spec.to_json(), manifest["prep"], spec.epochs, spec.lease_timeout_s,
                                   self.clock(), request_id=request.request_id, keep_params=spec.keep_params,
                                   params=manifest["params"], start_epoch=manifest["epoch"],
                                   resume_from=request.resume_from, owner=owner)
            self.wake.set()
        else:
            job = self.jobs.submit(spec.name, spec.to_json(), None, spec.epochs, spec.lease_timeout_s, self.clock(),
                                   request_id=request.request_id, keep_params=spec.keep_params, owner=owner)
        try:
            self.save()
        except PSError as e:
            abort(context, e)
        log.info("job %s (%s) submitted: %d epochs; a worker inspects its data first", job.job_id, spec.name,
                 spec.epochs)
        return job_to_proto(job)

    @limits.entry_check(limits.check_job_id("checkpoint job"))
    def CheckpointJob(self, request, context):
        self._own_job(context, request.job_id, "checkpoint job")
        if len(request.url) > 4096:
            abort(context, InvalidArgument("checkpoint job: url longer than 4096 characters"))
        try:
            if request.url:
                self._check_checkpoint_url(request.url, "url")
            url, manifest = self.checkpoints.take(request.job_id, request.url)
        except PSError as e:
            abort(context, e)
        except OSError as e:
            abort(context, Unavailable(f"checkpoint job '{request.job_id}': writing the manifest to "
                                       f"{request.url or 'the checkpoint dir'}: {type(e).__name__}: {e}"))
        return scheduler_pb2.CheckpointJobResponse(url=url, bytes=manifest["bytes"], epoch=manifest["epoch"])

    def _shard_lost(self, model: str, shard: int, servers: list[str]) -> None:
        """Every replica of a shard is gone: the job training that model cannot go on."""
        job = self.jobs.jobs.get(model)
        if job is None or job.state in TERMINAL:
            return
        hint = (f"resume it from its last checkpoint: paramserver submit --resume {job.checkpoint}" if job.checkpoint
                else "it has no checkpoint (set checkpoint_every_epochs in its spec)")
        self.jobs.fail(model, f"shard {shard} of its parameters is lost: every server holding it is down "
                              f"({', '.join(servers)}); {hint}", self.clock())
        self._save_quietly()

    # Locking rule: no handler holds ``jobs.changed`` across an abort or anything else that waits
    # on the event loop (the loop's coroutines take that lock too: it would deadlock).

    @limits.entry_check(limits.check_job_exists("get job"))
    def GetJob(self, request, context):
        self._own_job(context, request.job_id, "get job")
        with self.jobs.changed:
            job = self.jobs.jobs.get(request.job_id)
            info = None if job is None else job_to_proto(job)
        if info is None:
            abort(context, NotFound(f"job '{request.job_id}' not found"))
        return info

    @limits.entry_check(limits.check_list_jobs)
    def ListJobs(self, request, context):
        size = request.page_size or 100
        if not 0 < size <= 1000:
            abort(context, InvalidArgument(f"list jobs: page_size must be in [1, 1000], got {request.page_size}"))
        who = security.caller(context)
        try:
            page, token = self.jobs.page(size, request.page_token,
                                         owner=who.name if who is not None and who.role == security.USER else None)
        except PSError as e:
            abort(context, e)
        with self.jobs.changed:
            return scheduler_pb2.ListJobsResponse(jobs=[job_to_proto(j, summary=True) for j in page],
                                                  next_page_token=token)

    @limits.entry_check(limits.check_job_id("cancel job"))
    def CancelJob(self, request, context):
        self._own_job(context, request.job_id, "cancel job")
        try:
            job = self.jobs.cancel(request.job_id, self.clock())
            self.save()
        except PSError as e:
            abort(context, e)
        log.info("job %s cancelled", job.job_id)
        self._free(job)
        return job_to_proto(job)

    @limits.entry_check(limits.check_job_id("delete job"))
    def DeleteJob(self, request, context):
        self._own_job(context, request.job_id, "delete job")
        try:
            job = self.jobs.delete(request.job_id, self.clock())
            self.save()
        except PSError as e:
            abort(context, e)
        freed = self._free_now(job)
        log.info("job %s deleted%s", job.job_id, "" if freed else " (its parameters could not all be freed)")
        return scheduler_pb2.DeleteJobResponse(deleted=True, params_freed=freed)

    @limits.entry_check(limits.check_watch_job)
    async def WatchJob(self, request, context):
        job = self.jobs.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job '{request.job_id}' not found")
        try:
            security.check_owner(security.caller(context), job.owner, f"watch job '{request.job_id}'")
        except PSError as e:
            await context.abort(e.code, str(e))
        if self.followers >= self.retention.followers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"watch job '{request.job_id}': {self.followers} followers already, the limit "
                                f"is {self.retention.followers} (--max-followers / PS_MAX_FOLLOWERS)")
        self.followers += 1
        try:
            after = request.after
            while True:
                wake = self.waiters.event(request.job_id)
                try:
                    events, ended = self.jobs.events_after(request.job_id, after)
                except PSError:
                    return  # the job was deleted
                if events:
                    after = events[-1].seq
                for e in coalesce(events):
                    yield event_to_proto(e)
                if (ended and not events) or self.closing:
                    return
                if events:
                    # A burst of task events reaches each follower as one message (the last carries
                    # the counts), not one each: followers cost at most a few sends a second each.
                    await asyncio.sleep(FOLLOWER_BATCH_S)
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), 10.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.followers -= 1

    @limits.entry_check(limits.check_fetch_weights)
    def FetchWeights(self, request, context):
        from ps.v1 import server_pb2, tensor_pb2
        try:
            self._own_model(security.caller(context), request.model, "fetch weights of")
            model = self.client().model(request.model)
            left = context.time_remaining()
            if left is not None:  # answer within the caller's deadline, failing over or not
                model.failover_timeout = max(0.0, min(model.failover_timeout, left - 1.0))
            weights = model.pull()
        except PSError as e:
            abort(context, e)
        max_chunk = request.max_chunk_bytes or rpc.DEFAULT_CHUNK_BYTES
        for name, a in weights.items():
            flat = a.reshape(-1)
            for o, n in sharding.chunks(0, flat.size, flat.itemsize, max_chunk):
                yield server_pb2.PullResponse(chunk=tensor_pb2.Chunk(tensor=name, offset=o, values=tensor_pb2.Tensor(
                    dtype=dtype_code(flat.dtype), shape=[n], data=flat[o:o + n].tobytes())))

    def _free_now(self, job: Job) -> bool:
        """Free a job's parameters on every server and forget its shard map; False if a server
        could not be reached (the map is kept then, so a later try can finish the job)."""
        if job.params_freed:
            return True
        try:
            if consistency(job)[0] == "bsp":
                try:
                    self.client().delete_model(accumulator(job.job_id))
                except NotFound:
                    pass  # freed before, or never created
            self.client().delete_model(job.job_id)
        except PSError as e:
            if self.cluster.maps.get(job.job_id) is None:
                job.params_freed = True
                self.jobs.touch(job.job_id)
                return True
            log.warning("job %s: could not free its parameters: %s", job.job_id, e)
            return False
        job.params_freed = True
        self.jobs.touch(job.job_id)
        log.info("job %s: parameters freed on every server", job.job_id)
        return True

    def _free(self, job: Job) -> None:
        """Free a job's parameters on every server (in the background)."""
        threading.Thread(target=self._free_now, args=(job,), name=f"free-{job.job_id}", daemon=True).start()

    # -- workers -------------------------------------------------------------------
    @limits.entry_check(limits.check_register_worker)
    async def RegisterWorker(self, request, context):
        w = self.cluster.register_worker(request.name, request.device, self.clock())
        try:
            self.save(jobs=False, cluster=True)
        except PSError as e:
            await context.abort(e.code, str(e))
        log.info("worker %s registered: %s on %s", w.worker_id, w.name, w.device)
        return scheduler_pb2.RegisterWorkerResponse(worker_id=w.worker_id,
                                                    heartbeat_interval_s=self.cluster.heartbeat_interval,
                                                    cluster_id=self.cluster.cluster_id,
                                                    incarnation=self.cluster.incarnation)

    @limits.entry_check(limits.check_worker_id("worker heartbeat"))
    async def WorkerHeartbeat(self, request, context):
        known = self.cluster.worker_heartbeat(request.worker_id, self.clock(), request.cluster_id)
        abandon = self.jobs.extend(request.worker_id, self.clock()) if known else []
        return scheduler_pb2.WorkerHeartbeatResponse(known=known, cancelled_tasks=abandon)

    @limits.entry_check(limits.check_worker_id("deregister worker"))
    async def DeregisterWorker(self, request, context):
        w = self.cluster.deregister_worker(request.worker_id, self.clock())
        if w is not None:
            log.info("worker %s (%s) left; its tasks go back to the queue", w.worker_id, w.name)
            self.jobs.release_worker(w.worker_id, self.clock())
        return scheduler_pb2.DeregisterWorkerResponse(known=w is not None)

    @limits.entry_check(limits.check_worker_id("lease task"))
    async def LeaseTask(self, request, context):
        if request.worker_id not in self.cluster.workers:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker '{request.worker_id}' is not registered (the scheduler restarted?): "
                                f"register again")
        wait = request.wait_s
        if not 0 <= wait <= self.retention.max_lease_wait_s:  # NaN too
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"lease task: wait_s must be in [0, {self.retention.max_lease_wait_s:g}], "
                                f"got {wait}")
        deadline = self.clock() + wait
        while True:
            wake = self.waiters.event("")
            self.cluster.worker_heartbeat(request.worker_id, self.clock())
            leased = self.jobs.lease(request.worker_id, self.clock())
            if leased is not None:
                break
            remaining = deadline - self.clock()
            if remaining <= 0 or self.closing:
                return scheduler_pb2.LeaseTaskResponse(retry_after_s=0.1)
            try:
                await asyncio.wait_for(wake.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        task, job = leased
        try:
            self.save()
        except PSError as e:  # not answered: the lease expires and the task goes back to the queue
            await context.abort(e.code, str(e))
        log.info("task %s leased to %s", task.task_id, request.worker_id)
        return scheduler_pb2.LeaseTaskResponse(task=scheduler_pb2.Task(
            task_id=task.task_id, lease_id=task.lease_id, job_id=job.job_id, kind=task.kind, epoch=task.epoch,
            shard=task.shard, shards=job.eval_shards if task.kind == EVAL else task.shards, spec_json=job.spec_json,
            prep_json="" if job.prep is None else json.dumps(job.prep), lease_timeout_s=job.lease_timeout,
            clock_step=self.jobs.clock_step(task.task_id)))

    @limits.entry_check(limits.check_clock)
    async def Clock(self, request, context):
        """An ssp/bsp train task's clock: answer as soon as it may go on (or lead a bsp step), else after
        wait_s with who it is waiting for; the worker asks again until its own deadline."""
        wait = request.wait_s
        if not 0 <= wait <= self.retention.max_lease_wait_s:  # NaN too
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"clock: wait_s must be in [0, {self.retention.max_lease_wait_s:g}], got {wait}")
        key = f"clock:{request.task_id.split('/', 1)[0]}"
        deadline = self.clock() + wait
        applied = request.applied
        while True:
            wake = self.waiters.event(key)
            try:
                d = self.jobs.clock(request.task_id, request.lease_id, request.steps, self.clock(), applied,
                                    workers=len(self.cluster.workers), closed_step=request.closed_step)
            except PSError as e:
                await context.abort(e.code, str(e))
            applied = False  # reported once; a poll again only waits for the next step
            remaining = deadline - self.clock()
            if d.proceed or d.lead or remaining <= 0 or self.closing:
                break
            try:
                await asyncio.wait_for(wake.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return scheduler_pb2.ClockResponse(proceed=d.proceed, lead=d.lead, step=d.step, contributors=d.contributors,
                                           members=d.members, waiting_for=d.waiting_for, staleness=d.staleness,
                                           fast=d.fast)

    @limits.entry_check(limits.check_complete_task)
    async def CompleteTask(self, request, context):
        result = None
        if request.result_json:
            try:
                result = json.loads(request.result_json)
                _check_inspection(result)
            except (ValueError, TypeError, KeyError) as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"complete task '{request.task_id}': result_json: {e}")
        elif request.task_id.endswith("/" + INSPECT) and not request.error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"complete task '{request.task_id}': an inspect task's result_json is empty")
        ok = self.jobs.complete(request.task_id, request.lease_id, self.clock(), error=request.error,
                                samples=request.samples, steps=request.steps, loss_sum=request.loss_sum,
                                correct=request.correct, seconds=request.seconds, duplicates=request.duplicates,
                                result=result, staleness=request.staleness,
                                clock_staleness=request.clock_staleness)
        if ok:
            try:
                self.save()
            except PSError as e:
                await context.abort(e.code, str(e))
        job = self.jobs.jobs.get(request.task_id.split("/", 1)[0])
        if request.error:
            log.error("task %s failed on %s: %s", request.task_id, request.worker_id, request.error)
        if request.duplicates:
            log.warning("task %s: the servers skipped %d gradient chunk(s) of %s as already applied",
                        request.task_id, request.duplicates, request.worker_id)
        if ok and job is not None and job.state in TERMINAL:
            log.info("job %s %s: %s", job.job_id, job.state, job.error or
                     f"test accuracy {job.metrics['test_accuracy']:.4f}")
            if job.state != "succeeded":
                self._free(job)
        if ok and job is not None and job.prep is not None and job.state == "queued":
            self.wake.set()  # inspected: create its parameters
        return scheduler_pb2.CompleteTaskResponse(accepted=ok)

    # -- background ----------------------------------------------------------------
    def start_jobs(self, stop: threading.Event) -> None:
        """Create inspected jobs' parameters on the servers, then let their tasks go."""
        while not stop.is_set():
            self.wake.wait(0.5)
            self.wake.clear()
            for job in self.jobs.ready():
                if not self.cluster.up_servers():
                    continue
                self.jobs.mark_starting(job.job_id, self.clock())
                try:
                    self._create_parameters(job)
                except (PSError, ValueError) as e:
                    log.error("job %s: could not create its parameters: %s", job.job_id, e)
                    self.jobs.fail(job.job_id, f"could not create its parameters: {e}", self.clock())
                    self._save_quietly()
                    continue
                self.jobs.start(job.job_id, self.clock())
                log.info("job %s running", job.job_id)
                self._save_quietly()

    def _create_parameters(self, job: Job) -> None:
        """Only shapes and seeds travel: each shard computes its slices from the Init specs."""
        from ps.initializers import Init
        spec = json.loads(job.spec_json)
        replicas = min(spec.get("replicas", 0), len(self.cluster.up_servers(confirmed=True)))
        inits = {name: Init(**fields) for name, fields in job.params.items()}
        if spec.get("consistency") == "bsp":
            # Where each step's gradients are summed before the step's leader has each server apply
            # their mean (ApplyAccumulated): SGD with lr 1 adds the negated gradients the workers push.
            zeros = {name: dataclasses.replace(init, kind="zeros") for name, init in inits.items()}
            self.client().create_model(accumulator(job.job_id), zeros, optimizer=ACCUMULATOR_OPTIMIZER,
                                       replace=True, replicas=replicas, owner=job.owner)
        tables = {}
        for name, fields in (job.prep or {}).get("tables", {}).items():
            t = sparse.TableSpec.from_dict(fields)
            tables[name] = sparse.SparseTable(t.width, t.init, t.dtype, t.admit_after, t.evict_after)
        if tables:
            replicas = 1  # sparse tables are not replicated yet
        if job.resume_from:
            self.client().restore_model(job.job_id, job.resume_from, replace=True, replicas=replicas, owner=job.owner)
            return
        self.client().create_model(job.job_id, {**inits, **tables}, optimizer=spec["optimizer"], replace=True,
                                   replicas=replicas, owner=job.owner)

    def tidy(self) -> None:
        """Retention: drop old job records, free succeeded jobs' parameters when their time is up."""
        now = self.clock()
        for job in self.jobs.params_due(now, self.retention.params_s):
            self._free_now(job)
        for job in self.jobs.retire(now, self.retention.keep_jobs, self.retention.keep_jobs_s):
            log.info("job %s (%s, ended %.0f s ago) dropped by retention", job.job_id, job.state,
                     now - job.finished_at)
            self._free_now(job)


def _check_inspection(result) -> None:
    """The shape of an inspect task's result: {"prep": {..., "shards": n, "eval_shards": m}, "params": {name:
    Init fields}}."""
    from ps.initializers import Init
    if not isinstance(result, dict) or not isinstance(result.get("prep"), dict) \
            or not isinstance(result.get("params"), dict) or not result["params"]:
        raise ValueError("expected an object with 'prep' and a non-empty 'params'")
    for key, default in (("shards", None), ("eval_shards", 1)):
        n = result["prep"].get(key, default)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
            raise ValueError(f"prep.{key} must be an integer in [1, 100000], got {n!r}")
    for name, fields in result["params"].items():
        if not isinstance(fields, dict):
            raise ValueError(f"params['{name}'] must be an object")
        Init(**fields)


def _watch_membership(servicer: SchedulerServicer, stop: threading.Event, clock) -> None:
    cluster = servicer.cluster
    while not stop.wait(cluster.heartbeat_interval / 2):
        for s in cluster.tick(clock()):
            log.warning("server %s at %s is down: no heartbeat for %.1f s", s.server_id, s.address,
                        clock() - s.last_seen)
            servicer.replication.wake.set()
        for w in cluster.expire_workers(clock(), cluster.server_timeout):
            log.warning("worker %s (%s) is gone: no heartbeat; its tasks go back to the queue", w.worker_id, w.name)
            servicer.jobs.release_worker(w.worker_id, clock())
        for t in servicer.jobs.expire(clock()):
            log.warning("lease on task %s expired: re-queued", t.task_id)
        for job in servicer.jobs.warn_idle(bool(cluster.workers), clock()):
            log.warning("job %s is waiting: no workers are registered", job.job_id)
        servicer.tidy()
        servicer._save_quietly(cluster=True)  # what changed outside a call: downs, expiries, retention


def run(host: str = "0.0.0.0", port: int = 7070, threads: int = 32, heartbeat_interval: float = 1.0,
        server_timeout: float = 5.0, port_file: str | None = None,
        max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES, retention: Retention = Retention(),
        state_dir: str | None = None, checkpoint_dir: str = "", quotas: access.Quotas = access.Quotas(),
        data_policy: DataPolicy = DataPolicy()) -> None:
    """The `paramserver scheduler` process: serve until SIGTERM/SIGINT. With ``state_dir`` its state
    is kept there (ps.scheduler.state) and a restart resumes it; without, it lives in memory only."""
    asyncio.run(_serve(host, port, threads, heartbeat_interval, server_timeout, port_file, max_message_bytes,
                       retention, state_dir, checkpoint_dir, quotas, data_policy))


async def _serve(host, port, threads, heartbeat_interval, server_timeout, port_file, max_message_bytes,
                 retention, state_dir=None, checkpoint_dir="", quotas=access.Quotas(),
                 data_policy: DataPolicy = DataPolicy()) -> None:
    cluster = Cluster(heartbeat_interval, server_timeout)
    jobs = Jobs(max_events=retention.events)
    store = None
    if state_dir is not None:
        from ps.scheduler.state import StateStore
        store = StateStore(state_dir)  # raises StateError (another scheduler holds it, unreadable)
        store.load(jobs, cluster, time.monotonic())
    pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc")
    server = grpc.aio.server(migration_thread_pool=pool, options=rpc.server_options(max_message_bytes),
                             interceptors=security.current().interceptors(aio=True))
    servicer = SchedulerServicer(cluster, jobs=jobs, retention=retention, store=store, checkpoint_dir=checkpoint_dir,
                                 quotas=quotas, data_policy=data_policy)
    servicer.attach(asyncio.get_running_loop())
    rpc.add_servicer(servicer, server, scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"])
    await rpc.add_health_and_reflection_aio(server, [SERVICE_NAME])
    bound = rpc.bind(server, host, port)
    await server.start()
    stop = threading.Event()
    servicer.address = f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{bound}"
    threading.Thread(target=_watch_membership, args=(servicer, stop, servicer.clock), name="membership",
                     daemon=True).start()
    threading.Thread(target=servicer.start_jobs, args=(stop,), name="job-starter", daemon=True).start()
    threading.Thread(target=servicer.replication.run, args=(stop,), name="replication", daemon=True).start()
    threading.Thread(target=servicer.checkpoints.run, args=(stop,), name="checkpoints", daemon=True).start()
    log.info("scheduler listening on %s:%d", host, bound)
    def on_stop():
        stop.set()
        servicer.replication.stopping.set()
        servicer.closing = True  # followers' streams end and long polls answer now, not after the grace
        servicer.waiters.wake_all()
        servicer.close_client()
    await rpc.serve_until_signal_aio(server, on_stop=on_stop, ready=lambda: rpc.write_port_file(port_file, bound))
    servicer._save_quietly(cluster=True)
    pool.shutdown(wait=False)
