"""The Scheduler gRPC service (thin over ``Cluster``) and the scheduler process."""

from __future__ import annotations

import json
import logging
import threading
import time

from ps import rpc, sharding
from ps.errors import FailedPrecondition, InvalidArgument, PSError, abort
from ps.scheduler.cluster import Cluster, ShardMap
from ps.scheduler.jobs import QUEUED, TERMINAL, Job, Jobs
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


def metrics_to_proto(m: dict) -> scheduler_pb2.JobMetrics:
    return scheduler_pb2.JobMetrics(epoch=m["epoch"], steps=m["steps"], train_loss=m["train_loss"],
                                    test_loss=m["test_loss"], test_accuracy=m["test_accuracy"],
                                    samples_per_s=m["samples_per_s"], seconds=m["seconds"], samples=m["samples"])


def job_to_proto(job: Job) -> scheduler_pb2.JobInfo:
    return scheduler_pb2.JobInfo(job_id=job.job_id, name=job.name, state=job.state, error=job.error,
                                 spec_json=job.spec_json, metrics=metrics_to_proto(job.metrics),
                                 submitted_at=job.submitted_at, tasks_done=job.tasks_done,
                                 tasks_total=job.tasks_total, prep_json=json.dumps(job.prep))


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cluster: Cluster, clock=time.monotonic, jobs: Jobs | None = None):
        self.cluster = cluster
        self.clock = clock
        self.jobs = jobs or Jobs()
        self.address = ""          # our own address, for the client the scheduler uses itself
        self.wake = threading.Event()
        self._client = None
        self._client_lock = threading.Lock()

    def client(self):
        """One long-lived client (to ourselves and the servers) for creating, relaying and freeing
        jobs' parameters, instead of new channels for every call."""
        with self._client_lock:
            if self._client is None:
                from ps.client import Client
                self._client = Client(self.address, connect_timeout=10)
            return self._client

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
        for w in list(self.cluster.workers.values()):
            view.workers.add(worker_id=w.worker_id, name=w.name, device=w.device,
                             last_heartbeat_age_s=now - w.last_seen)
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

    # -- jobs ----------------------------------------------------------------------
    def SubmitJob(self, request, context):
        from ps.spec import JobSpec, SpecError, prepare
        try:
            spec = JobSpec.from_json(request.spec_json)
            prep = prepare(spec)
        except SpecError as e:
            abort(context, InvalidArgument(str(e)))
        job = self.jobs.submit(spec.name, spec.to_json(), prep, spec.epochs, spec.lease_timeout_s, time.time())
        log.info("job %s (%s) submitted: %d train examples, %d tasks per epoch, %d epochs", job.job_id,
                 spec.name, prep["n_train"], prep["shards"], spec.epochs)
        self.wake.set()
        return job_to_proto(job)

    def _job(self, job_id, context) -> Job:
        try:
            return self.jobs.get(job_id)
        except PSError as e:
            abort(context, e)

    def GetJob(self, request, context):
        with self.jobs.changed:
            return job_to_proto(self._job(request.job_id, context))

    def ListJobs(self, request, context):
        with self.jobs.changed:
            return scheduler_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in self.jobs.jobs.values()])

    def CancelJob(self, request, context):
        try:
            job = self.jobs.cancel(request.job_id, time.time())
        except PSError as e:
            abort(context, e)
        log.info("job %s cancelled", job.job_id)
        self._free(job)
        return job_to_proto(job)

    def WatchJob(self, request, context):
        self._job(request.job_id, context)
        after = request.after
        while context.is_active():
            events, ended = self.jobs.events_after(request.job_id, after)
            for e in events:
                after = e.seq
                yield scheduler_pb2.JobEvent(seq=e.seq, time=e.time, kind=e.kind, state=e.state, message=e.message,
                                             metrics=metrics_to_proto(e.metrics), tasks_done=e.tasks_done,
                                             tasks_total=e.tasks_total)
            if ended and not events:
                return
            with self.jobs.changed:
                if len(self.jobs.get(request.job_id).events) <= after:
                    self.jobs.changed.wait(1.0)

    def FetchWeights(self, request, context):
        from ps.v1 import server_pb2, tensor_pb2
        try:
            weights = self.client().model(request.model).pull()
        except PSError as e:
            abort(context, e)
        max_chunk = request.max_chunk_bytes or rpc.DEFAULT_CHUNK_BYTES
        for name, a in weights.items():
            flat = a.reshape(-1)
            for o, n in sharding.chunks(0, flat.size, flat.itemsize, max_chunk):
                yield server_pb2.PullResponse(chunk=tensor_pb2.Chunk(tensor=name, offset=o, values=tensor_pb2.Tensor(
                    dtype=dtype_code(flat.dtype), shape=[n], data=flat[o:o + n].tobytes())))

    def _free(self, job: Job) -> None:
        """Free a job's parameters on every server (in the background)."""
        def run():
            try:
                self.client().delete_model(job.job_id)
                log.info("job %s: parameters freed on every server", job.job_id)
            except PSError as e:
                log.warning("job %s: could not free its parameters: %s", job.job_id, e)
        threading.Thread(target=run, name=f"free-{job.job_id}", daemon=True).start()

    # -- workers -------------------------------------------------------------------
    def RegisterWorker(self, request, context):
        w = self.cluster.register_worker(request.name, request.device, self.clock())
        log.info("worker %s registered: %s on %s", w.worker_id, w.name, w.device)
        return scheduler_pb2.RegisterWorkerResponse(worker_id=w.worker_id,
                                                    heartbeat_interval_s=self.cluster.heartbeat_interval)

    def WorkerHeartbeat(self, request, context):
        known = self.cluster.worker_heartbeat(request.worker_id, self.clock())
        abandon = self.jobs.extend(request.worker_id, time.time()) if known else []
        return scheduler_pb2.WorkerHeartbeatResponse(known=known, cancelled_tasks=abandon)

    def LeaseTask(self, request, context):
        if request.worker_id not in self.cluster.workers:
            abort(context, FailedPrecondition(f"worker '{request.worker_id}' is not registered "
                                              f"(the scheduler restarted?): register again"))
        self.cluster.worker_heartbeat(request.worker_id, self.clock())
        leased = self.jobs.lease(request.worker_id, time.time())
        if leased is None:
            return scheduler_pb2.LeaseTaskResponse(retry_after_s=0.1)
        task, job = leased
        log.info("task %s leased to %s", task.task_id, request.worker_id)
        return scheduler_pb2.LeaseTaskResponse(task=scheduler_pb2.Task(
            task_id=task.task_id, lease_id=task.lease_id, job_id=job.job_id, kind=task.kind, epoch=task.epoch,
            shard=task.shard, shards=task.shards, spec_json=job.spec_json, prep_json=json.dumps(job.prep),
            lease_timeout_s=job.lease_timeout))

    def CompleteTask(self, request, context):
        ok = self.jobs.complete(request.task_id, request.lease_id, time.time(), error=request.error,
                                samples=request.samples, steps=request.steps, loss_sum=request.loss_sum,
                                correct=request.correct, seconds=request.seconds)
        job = self.jobs.jobs.get(request.task_id.split("/", 1)[0])
        if request.error:
            log.error("task %s failed on %s: %s", request.task_id, request.worker_id, request.error)
        if ok and job is not None and job.state in TERMINAL:
            log.info("job %s %s: %s", job.job_id, job.state, job.error or
                     f"test accuracy {job.metrics['test_accuracy']:.4f}")
            if job.state != "succeeded":
                self._free(job)
        return scheduler_pb2.CompleteTaskResponse(accepted=ok)

    # -- background ----------------------------------------------------------------
    def start_jobs(self, stop: threading.Event) -> None:
        """Create queued jobs' parameters on the servers, then let their tasks go."""
        while not stop.is_set():
            self.wake.wait(0.5)
            self.wake.clear()
            for job in [j for j in list(self.jobs.jobs.values()) if j.state == QUEUED]:
                if not self.cluster.up_servers():
                    continue
                self.jobs.mark_starting(job.job_id, time.time())
                try:
                    self._create_parameters(job)
                except (PSError, ValueError) as e:
                    log.error("job %s: could not create its parameters: %s", job.job_id, e)
                    self.jobs.fail(job.job_id, f"could not create its parameters: {e}", time.time())
                    continue
                self.jobs.start(job.job_id, time.time())
                log.info("job %s running", job.job_id)

    def _create_parameters(self, job: Job) -> None:
        from ps.spec import JobSpec, build_model
        spec = JobSpec.from_json(job.spec_json)
        model = build_model(spec, tuple(job.prep["input_shape"]))
        params = model.init_params(spec.seed)
        self.client().create_model(job.job_id, params, optimizer=spec.optimizer, replace=True)


def _watch_membership(servicer: SchedulerServicer, stop: threading.Event, clock) -> None:
    cluster = servicer.cluster
    while not stop.wait(cluster.heartbeat_interval / 2):
        for s in cluster.tick(clock()):
            log.warning("server %s at %s is down: no heartbeat for %.1f s", s.server_id, s.address,
                        clock() - s.last_seen)
        for w in cluster.expire_workers(clock(), cluster.server_timeout):
            log.warning("worker %s (%s) is gone: no heartbeat; its tasks go back to the queue", w.worker_id, w.name)
            servicer.jobs.release_worker(w.worker_id, time.time())
        for t in servicer.jobs.expire(time.time()):
            log.warning("lease on task %s expired: re-queued", t.task_id)
        for job in servicer.jobs.warn_idle(bool(cluster.workers), time.time()):
            log.warning("job %s is waiting: no workers are registered", job.job_id)


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
    servicer.address = f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{bound}"
    threading.Thread(target=_watch_membership, args=(servicer, stop, servicer.clock), name="membership",
                     daemon=True).start()
    threading.Thread(target=servicer.start_jobs, args=(stop,), name="job-starter", daemon=True).start()
    log.info("scheduler listening on %s:%d", host, bound)
    rpc.write_port_file(port_file, bound)
    rpc.serve_until_signal(server, on_stop=stop.set)
