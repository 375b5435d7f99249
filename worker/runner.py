"""The stateless worker: register, lease a task, pull weights, compute gradients batch by
batch and push them (asynchronous SGD), report, repeat. It holds nothing durable: kill it
and its leased task goes back to the queue."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from ps.client import Client, Model
from ps.errors import Aborted, PSError, Unavailable
from ps.histogram import bump
from ps.spec import SpecError, accumulator
from ps.v1 import scheduler_pb2

log = logging.getLogger("ps.worker")

#: an idle worker's LeaseTask waits this long at the scheduler for work (a long poll: no busy polling)
LEASE_WAIT_S = 5.0
#: a failed task's message, as reported to the scheduler, is cut to this many characters
MAX_ERROR_CHARS = 2000
#: an ssp/bsp task's clock call waits this long at the scheduler before asking again
CLOCK_WAIT_S = 5.0
#: a bsp member stepping on the servers waits at most this long (and half a lease) for the others' gradients
STEP_WAIT_S = 10.0
#: ... and one that fell back to the clock asks the servers this long in turn with the clock
POLL_S = 0.5
# The key a step's loss pair travels under, beside its gradients, on the way to the host (no parameter has it).
_LOSS = "\x00loss"


def _step_id(epoch: int, step: int) -> int:
    """The id of a bsp step's update (its leader's) and of its members' gradients (in the accumulator)."""
    return (epoch << 40) + step + 1


class TaskAbandoned(Exception):
    """The task's job was cancelled, or the worker is stopping: drop it without a result."""


@dataclass
class JobContext:
    """What a worker keeps per job between tasks (all of it rebuilt from the spec if lost)."""

    spec: object
    prep: dict
    model: object          # ps.worker.model.Sequential
    handle: Model          # the job's parameters on the servers
    x_train: object        # scaled, on the worker's device
    y_train: object
    x_test: object
    y_test: object
    #: push_pull writes fresh weights into these two sets in turn (fresh arrays every step cost
    #: their page faults): the set being written is never the one the next batch computes with
    bufs: list = None
    #: bsp: (the accumulator, the step leaders' client and its handle on the parameters)
    bsp: tuple | None = None
    xp: object = np  # the array module (page-locked weight buffers with CuPy)

    def __post_init__(self):
        from ps.worker.xp import empty_host
        self.bufs = [{k: empty_host(self.xp, s.shape, s.dtype) for k, s in self.handle.specs.items()}
                     for _ in range(2)]


class Worker:
    """One worker process's loop."""

    def __init__(self, scheduler: str, device: str = "cpu", name: str | None = None,
                 connect_timeout: float = 60.0, health_port: int = 0, stop: threading.Event | None = None):
        from ps.worker.xp import get_xp
        self.device = device
        self.xp = get_xp(device)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.client = Client(scheduler, connect_timeout=connect_timeout)
        self.stop = stop or threading.Event()  # set: finish the current task, then leave
        self.abandon: set[str] = set()
        self.jobs: dict[str, JobContext] = {}
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="push")
        self._lease_call = None  # the LeaseTask long poll in flight
        self.worker_id = ""
        self.cluster_id = ""  # the scheduler state we registered with: heartbeats carry it back
        self.interval = 1.0
        self._registering = threading.Lock()
        self.health = self._serve_health(health_port) if health_port else None
        self._register()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def _serve_health(self, port: int):
        """grpc.health.v1 on ``port`` (for probes): SERVING while the scheduler answers our heartbeats."""
        from ps import rpc
        server = rpc.make_server(threads=2)
        servicer = rpc.add_health_and_reflection(server, [])
        rpc.bind(server, "0.0.0.0", port)
        server.start()
        self._set_health(servicer, False)
        log.info("health checks served on port %d", port)
        return server, servicer

    @staticmethod
    def _set_health(servicer, serving: bool) -> None:
        from grpc_health.v1 import health_pb2
        servicer.set("", health_pb2.HealthCheckResponse.SERVING if serving
                     else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _healthy(self, serving: bool) -> None:
        if self.health is not None:
            self._set_health(self.health[1], serving)

    def _register(self, stale: str | None = None) -> None:
        """Register (again); ``stale``: the id the scheduler did not know, so that of the heartbeat
        thread and the lease loop, which may both find out, only one registers again."""
        with self._registering:
            if stale is not None and stale != self.worker_id:
                return  # the other one did already
            resp = self.client.call(self.client.scheduler.RegisterWorker,
                                    scheduler_pb2.RegisterWorkerRequest(name=self.name, device=self.device),
                                    "register worker")
            self.worker_id, self.interval = resp.worker_id, resp.heartbeat_interval_s or 1.0
            if self.cluster_id and resp.cluster_id != self.cluster_id:
                # A scheduler on another state: its job ids start again, so what we kept per job is not theirs.
                self.jobs = {}
            self.cluster_id = resp.cluster_id
        self._healthy(True)
        log.info("registered with scheduler %s as %s (%s; cluster %s, incarnation %d)", self.client.address,
                 self.worker_id, self.device, resp.cluster_id[:8] or "-", resp.incarnation)

    def _beat(self) -> None:
        failures = 0
        while not self.stop.wait(self.interval):
            wid = self.worker_id
            try:
                resp = self.client.scheduler.WorkerHeartbeat(
                    scheduler_pb2.WorkerHeartbeatRequest(worker_id=wid, cluster_id=self.cluster_id),
                    timeout=self.interval * 3)
            except grpc.RpcError as e:
                failures += 1
                log.warning("heartbeat to scheduler %s failed: %s", self.client.address, e.details())
                if failures >= 3:
                    self._healthy(False)
                continue
            failures = 0
            self._healthy(resp.known)
            if resp.cancelled_tasks:
                self.abandon.update(resp.cancelled_tasks)
            if not resp.known:
                log.warning("the scheduler does not know us: registering again")
                try:
                    self._register(stale=wid)
                except PSError as e:
                    log.warning("%s", e)

    def run(self) -> None:
        """Lease and run tasks until ``stop`` is set."""
        while not self.stop.is_set():
            wid = self.worker_id
            try:
                call = self._lease_call = self.client.scheduler.LeaseTask.future(
                    scheduler_pb2.LeaseTaskRequest(worker_id=wid, wait_s=LEASE_WAIT_S),
                    timeout=LEASE_WAIT_S + 10)
                if self.stop.is_set():
                    call.cancel()
                resp = call.result()
            except grpc.FutureCancelledError:
                return  # stopping: request_stop() ended the long poll
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    try:
                        self._register(stale=wid)
                    except PSError as why:
                        log.warning("%s", why)
                        self.stop.wait(1.0)
                else:
                    log.warning("lease from scheduler %s failed: %s", self.client.address, e.details())
                    self.stop.wait(1.0)
                continue
            if not resp.HasField("task"):
                self.stop.wait(resp.retry_after_s or 0.1)
                continue
            self._run_task(resp.task)

    def _run_task(self, task: scheduler_pb2.Task) -> None:
        log.info("task %s leased (%s)", task.task_id, task.lease_id)
        start = time.perf_counter()
        result = {}
        error = ""
        try:
            if task.kind == "inspect":
                result = self._inspect(task)
            else:
                ctx = self._context(task)
                result = self._train(ctx, task) if task.kind == "train" else self._eval(ctx, task)
        except TaskAbandoned as e:
            log.info("task %s abandoned: %s", task.task_id, e)
            return
        except SpecError as e:  # the job's spec does not fit its data: the message names the field
            error = str(e)
            log.error("task %s: %s", task.task_id, e)
        except Exception as e:  # noqa: BLE001 - any failure of the computation fails the job, with its message
            error = f"{type(e).__name__}: {e}"
            log.exception("task %s failed", task.task_id)
        if len(error) > MAX_ERROR_CHARS:  # a job's error travels in every listing of it: keep it readable
            error = (f"{error[:MAX_ERROR_CHARS]}... ({len(error) - MAX_ERROR_CHARS} more characters in "
                     f"{self.name}'s log)")
        req = scheduler_pb2.CompleteTaskRequest(worker_id=self.worker_id, task_id=task.task_id,
                                                lease_id=task.lease_id, error=error,
                                                seconds=time.perf_counter() - start, **result)
        # A scheduler that is away (restarting) keeps our lease in its state: retry the report until
        # it is back, or the lease would have run out anyway.
        deadline, delay = time.monotonic() + max(task.lease_timeout_s, 30.0), 0.1
        while True:
            try:
                resp = self.client.scheduler.CompleteTask(req, timeout=30)
                log.info("task %s %s in %.2f s%s", task.task_id, "failed" if error else "done", req.seconds,
                         "" if resp.accepted else " (result dropped: lease expired or job ended)")
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(2 * delay, 1.0)
                    continue
                log.warning("could not report task %s: %s", task.task_id, e.details())
            return

    def _inspect(self, task: scheduler_pb2.Task) -> dict:
        """The job's first task: read its data, check it against the spec, report what the
        scheduler needs to start it (preprocessing statistics, parameter initializer specs)."""
        from ps.spec import JobSpec
        from ps.worker.inspect import inspect
        return {"result_json": json.dumps(inspect(JobSpec.from_json(task.spec_json)))}

    def _context(self, task: scheduler_pb2.Task) -> JobContext:
        ctx = self.jobs.get(task.job_id)
        if ctx is not None:
            return ctx
        from ps.spec import JobSpec
        from ps.worker.inspect import build_model, load_data
        from ps.trained import scale
        from ps.worker.preprocess import one_hot, train_test_split
        spec = JobSpec.from_json(task.spec_json)
        prep = json.loads(task.prep_json)
        ds = load_data(spec)
        model = build_model(spec, tuple(prep["input_shape"]))
        train_idx, test_idx = train_test_split(len(ds.x), spec.data.test_fraction, spec.seed)
        x = scale(prep, ds.x)
        y = ds.y
        if spec.loss == "softmax_cross_entropy":
            y = y.astype(np.int64)
        elif spec.data.one_hot:
            y = one_hot(y.astype(np.int64), int(np.prod(prep["output_shape"]))).astype(np.float32)
        else:
            y = y.astype(np.float32)
        xp = self.xp
        ctx = JobContext(spec, prep, model, self.client.model(task.job_id),
                         xp.asarray(x[train_idx]), xp.asarray(y[train_idx]),
                         xp.asarray(x[test_idx]), xp.asarray(y[test_idx]), xp=xp)
        if self.jobs:  # keep one job's data and buffers: workers move on with the queue
            from ps.worker.xp import release_pinned
            release_pinned()
            for job_id, old in self.jobs.items():
                if old.bsp is not None:
                    old.bsp[1].close()
                for model in (job_id, accumulator(job_id)):  # and their shared-memory segments
                    self.client.release(model)
        self.jobs = {task.job_id: ctx}
        return ctx

    def _to_device(self, weights: dict) -> dict:
        return {k: self.xp.asarray(v) for k, v in weights.items()}

    def _check(self, task: scheduler_pb2.Task) -> None:
        if task.task_id in self.abandon:
            raise TaskAbandoned("its job was cancelled")

    def _train(self, ctx: JobContext, task: scheduler_pb2.Task) -> dict:
        """One train task: the batches of its shard of the training split, each a gradient pushed
        as the job's consistency says (``_steps_asp``, ``_steps_ssp``, ``_steps_bsp``)."""
        from ps.worker.preprocess import batches, shard_ranges
        xp, spec = self.xp, ctx.spec
        lo, hi = shard_ranges(len(ctx.x_train), task.shards)[task.shard]
        seed = spec.seed * 1_000_003 + task.shard
        sums = {"loss_sum": 0.0, "samples": 0, "staleness": []}

        def gradients(i: int, idx: np.ndarray, params: dict) -> dict:
            """Batch ``i``'s gradients (host arrays), counting its loss and samples."""
            from ps.worker.xp import pinned_to_host
            self._check(task)
            rows = xp.asarray(idx + lo)
            x, params, ids = self._rows_for(ctx, ctx.x_train[rows], params)
            loss, grads, _ = ctx.model.loss_and_grads(xp, params, x, ctx.y_train[rows], spec.loss, train=True,
                                                      rng_seed=seed + 7919 * (task.epoch + 1) + i, lazy=True)
            if ids is not None:  # the rows' gradients go to their tables now; the rest as the mode says
                for name in ctx.model.tables():
                    g = grads.pop(name)
                    if len(ids):
                        ctx.handle.push_rows(name, ids, np.asarray(g) if xp is np else xp.asnumpy(g))
            # the step's copies land in page-locked buffers of their own slot (a push_pull may still be
            # reading the previous step's): handed to the push as they are, no second copy. On a GPU the
            # loss comes back in the same copy: the step's one wait for the device.
            lazy_loss = getattr(loss, "ndim", 0) == 1  # the device pair of a lazy loss
            host = pinned_to_host(xp, {**grads, _LOSS: loss} if lazy_loss else grads, slot=i % 2)
            if lazy_loss:
                loss = float(host.pop(_LOSS)[0])
            sums["loss_sum"] += loss * len(idx)
            sums["samples"] += len(idx)
            return host

        steps = getattr(self, f"_steps_{spec.consistency}")
        # the updates the servers acknowledged for this task, and the chunks they took for retries
        n, duplicates = steps(ctx, task, batches(hi - lo, spec.batch_size, seed, task.epoch), gradients, sums)
        if duplicates:
            log.warning("task %s: the servers skipped %d gradient chunk(s) as already applied", task.task_id,
                        duplicates)
        return {"samples": sums["samples"], "steps": n, "loss_sum": sums["loss_sum"], "duplicates": duplicates,
                "staleness": sums["staleness"], "clock_staleness": sums.get("clock_staleness", [])}

    def _rows_for(self, ctx: JobContext, x, params: dict):
        """For a model whose first layer reads ids: (the batch as positions in its distinct ids, ``params``
        with the rows of those ids pulled from each table, the ids); else (x, params, None)."""
        if not ctx.model.reads_ids:
            return x, params, None
        ids, local = ctx.model.gather(self.xp, x)
        params = dict(params)
        for name, table in ctx.model.tables().items():
            rows = ctx.handle.pull_rows(name, ids) if len(ids) else np.zeros((0, table.width), np.dtype(table.dtype))
            params[name] = self.xp.asarray(rows)
        return local, params, ids

    def _steps_asp(self, ctx: JobContext, task, batches, gradients, sums: dict) -> tuple[int, int]:
        """No waiting: each batch is computed while the previous push_pull is in flight. Returns the
        updates the servers acknowledged and the chunks they skipped as retries (the same for each mode);
        counts each gradient's staleness in ``sums``."""
        handle, bufs, staleness = ctx.handle, ctx.bufs, sums["staleness"]
        before = (handle.pushes, handle.duplicates)
        params = self._to_device(handle.pull())
        version = handle.version  # of the weights the next gradient is computed on
        pending: tuple[Future, int] | None = None  # the push_pull in flight, and the version its gradient saw
        for i, idx in enumerate(batches):
            host = gradients(i, idx, params)
            computed_on = version
            if pending is not None:
                # Overlap: this batch was computed while the previous push_pull was in flight.
                params = self._to_device(self._pushed(handle, pending, staleness))
                version = handle.version
            pending = (self._pusher.submit(handle.push_pull, host, out=bufs[i % 2]), computed_on)
        if pending is not None:
            self._pushed(handle, pending, staleness)
        return handle.pushes - before[0], handle.duplicates - before[1]

    @staticmethod
    def _pushed(handle: Model, pending: tuple[Future, int], staleness: list) -> dict:
        """A push_pull's weights, counting the updates applied between the weights its gradient was
        computed on and its own update (the handle's version is now that update's; with the overlap,
        one of them is always this worker's previous push)."""
        future, computed_on = pending
        weights = future.result()
        bump(staleness, handle.version - computed_on - 1)
        return weights

    def _steps_ssp(self, ctx: JobContext, task, batches, gradients, sums: dict) -> tuple[int, int]:
        """push_pull each gradient, then report the clock and wait while ``staleness`` clocks ahead of
        the slowest. The next gradient's weights must hold every member's steps below (this clock - s):
        the slowest pushed those before it reported them. The push_pull's weights were read before this
        decision, after the previous one, so they hold those steps unless the previous decision left the
        bound no room (staleness s then): only then are they read again."""
        handle, bound, staleness = ctx.handle, ctx.spec.staleness, sums["staleness"]
        before = (handle.pushes, handle.duplicates)
        params = self._to_device(handle.pull())
        version = handle.version
        tight = True  # no decision yet: what the weights hold is not known
        for i, idx in enumerate(batches):
            host = gradients(i, idx, params)
            params = self._to_device(handle.push_pull(host, out=ctx.bufs[i % 2]))
            bump(staleness, handle.version - version - 1)
            version = handle.version
            d = self._clock(task, i + 1)
            if tight:
                params = self._to_device(handle.pull(out=ctx.bufs[i % 2]))
                version = handle.version
            tight = d.staleness >= bound
        return handle.pushes - before[0], handle.duplicates - before[1]

    def _steps_bsp(self, ctx: JobContext, task, batches, gradients, sums: dict) -> tuple[int, int]:
        """Each step: add the gradient to the job's accumulator, tagged with the step's id; the step's mean
        (over the gradients tagged with it) is applied to the parameters once, on the servers; pull.

        Who applies it: while the clock says every train task of the epoch is a live member that started
        with it (``fast``), every member calls ApplyAccumulated with ``members`` after its push, and the
        servers apply the step once all gradients are summed and answer each member (ps-lite's
        synchronous mode: no scheduler call on a step's way). Otherwise (the first step, a member
        missing, steps some members' shards do not have) each member reports to the clock and the last
        to arrive leads: it has the servers apply what is summed. A member whose step is not applied on
        the servers within ``STEP_WAIT_S`` (one is missing), or whose gradient came too late, falls
        back to the clock for the rest of its task. While stepping alone it still asks the clock,
        every quarter lease, whether its lease is held (a worker held up past it must not go on).

        A gradient that comes after its step was applied without it (its worker was held up past its
        lease) is refused, not summed into the next. A task's acknowledged updates are the steps whose
        first slice its call applied (one caller a step)."""
        from math import ceil

        from ps.worker.preprocess import shard_ranges
        if ctx.bsp is None:
            leader = Client(self.client.address, client_id=f"{task.job_id}:bsp")
            ctx.bsp = (self.client.model(accumulator(task.job_id)), leader, leader.model(task.job_id))
        acc, _, apply_to = ctx.bsp
        handle, staleness, me = ctx.handle, sums["staleness"], self.client.client_id
        before = (apply_to.pushes, apply_to.duplicates)
        params = self._to_device(handle.pull(out=ctx.bufs[0]))
        version = handle.version
        # the steps every train task of the epoch pushes (a shard with a batch more has it alone)
        together = min(ceil((hi - lo) / ctx.spec.batch_size) for lo, hi in shard_ranges(len(ctx.x_train), task.shards))
        wait = min(STEP_WAIT_S, task.lease_timeout_s / 2)
        step = task.clock_step  # the barrier step this task's next gradient is for
        closed = reported = summed = 0  # the step after the last one seen applied; steps the clock heard of
        fast = fell_back = False
        confirmed = time.monotonic()
        for i, idx in enumerate(batches):
            host = gradients(i, idx, params)
            alone = fast and i < together
            if alone and time.monotonic() - confirmed > task.lease_timeout_s / 4:
                self._clock(task, reported, closed=closed, wait=False)  # TaskAbandoned if the lease is gone
                confirmed = time.monotonic()
            seq = _step_id(task.epoch, step)
            try:  # SGD with lr 1 on the accumulator: it adds
                acc.push({k: np.negative(v) for k, v in host.items()}, seq=seq)
                summed += 1
            except Aborted as e:  # its step is over: the barrier went on without it (the clock says why)
                log.warning("task %s: gradient %d not summed: %s", task.task_id, i, e)
                alone, fell_back = False, True
            if alone and apply_to.apply_accumulated(acc.name, task.shards, seq, members=task.shards, wait_s=wait,
                                                    member=me):
                step += 1
            else:
                if alone:
                    log.info("task %s: step %d was not applied on the servers within %.1f s (a member is missing): "
                             "the clock leads its steps from now on", task.task_id, step, wait)
                    fell_back = True
                poll = None
                if fell_back and i < together:  # the others may still step on the servers alone: watch there too

                    def poll(at: int) -> bool:  # the step the clock has this task waiting at
                        return apply_to.apply_accumulated(acc.name, task.shards, _step_id(task.epoch, at),
                                                          members=task.shards, wait_s=POLL_S, member=me)
                d = self._clock(task, i + 1, closed=closed, servers=poll, step=step)
                reported = i + 1
                confirmed = time.monotonic()
                while d.lead:  # each server applies the mean of the sum it holds and zeroes it: no gradient moves
                    apply_to.apply_accumulated(acc.name, d.contributors, _step_id(task.epoch, d.step), member=me)
                    # led again only by a scheduler restarted meanwhile: its rebuilt clock's step is another id, and
                    # what it finds accumulated is what the step before the restart had not applied (or nothing)
                    d = self._clock(task, i + 1, applied=True)
                step = d.step + 1
                fast = d.fast and not fell_back
            closed = step
            params = self._to_device(handle.pull(out=ctx.bufs[(i + 1) % 2]))
            bump(staleness, handle.version - version - 1)
            version = handle.version
        sums["clock_staleness"] = [summed] if summed else []
        return apply_to.pushes - before[0], apply_to.duplicates - before[1]

    def _clock(self, task: scheduler_pb2.Task, steps: int, applied: bool = False, closed: int = 0,
               wait: bool = True, servers: Callable[[int], bool] | None = None,
               step: int = 0) -> scheduler_pb2.ClockResponse:
        """Report this task's clock and wait until it may go on (or must lead a bsp step). Gives up
        after 4 lease timeouts (at least a minute), naming the task it was waiting for. ``closed``: bsp,
        the step after the last one seen applied. ``wait=False``: only ask (a poll with the steps the
        clock last heard: is the lease still held?). ``servers(at)``: bsp, whether the servers closed the
        barrier step the clock has this task waiting at (``step`` until it answers; its members stepping
        there alone), asked in turn with the clock: then it goes on past that step."""
        start = time.monotonic()
        limit = max(4 * task.lease_timeout_s, 60.0)
        req = scheduler_pb2.ClockRequest(worker_id=self.worker_id, task_id=task.task_id, lease_id=task.lease_id,
                                         steps=steps, applied=applied, closed_step=closed,
                                         wait_s=CLOCK_WAIT_S if wait and servers is None else 0.0)
        waiting_for = "the other members"
        while True:
            self._check(task)
            try:
                resp = self.client.call(self.client.scheduler.Clock, req, "clock", timeout=CLOCK_WAIT_S + 30)
            except Unavailable:  # a scheduler that is away (restarting) keeps our lease: ask again when it is back
                resp = None
                waiting_for = f"the scheduler at {self.client.address} to be back"
                self.stop.wait(0.2)
            except Aborted as e:  # our lease expired (we were held up) or the job ended
                raise TaskAbandoned(f"its lease ended: {e}") from None
            if resp is not None:
                if resp.proceed or resp.lead or not wait:
                    return resp
                waiting_for = resp.waiting_for or "the other members"
                step = resp.step  # where the clock counts this arrival (it may have moved past our gradient's)
            if servers is not None:
                asked = time.monotonic()
                if servers(step):
                    return scheduler_pb2.ClockResponse(proceed=True, step=step)
                self.stop.wait(max(0.0, POLL_S - (time.monotonic() - asked)))  # answered at once (the step not closed)
            waited = time.monotonic() - start
            if waited > limit:
                raise RuntimeError(f"waited {waited:.0f} s at clock {steps} of {task.task_id} for {waiting_for}")
            if resp is not None:
                req.applied = False

    def _eval(self, ctx: JobContext, task: scheduler_pb2.Task) -> dict:
        """Loss and correct answers on the task's part of the held-out split (its ``shard`` of ``shards``)."""
        from ps.worker.losses import LOSSES
        from ps.worker.preprocess import shard_ranges
        xp, spec = self.xp, ctx.spec
        params = self._to_device(ctx.handle.pull())
        loss_fn = LOSSES[spec.loss]
        lo, hi = shard_ranges(len(ctx.x_test), max(task.shards, 1))[task.shard]
        loss_sum, correct = 0.0, 0
        for start in range(lo, hi, 1024):
            self._check(task)
            stop = min(start + 1024, hi)
            x, batch_params, _ = self._rows_for(ctx, ctx.x_test[start:stop], params)
            out = ctx.model.forward(xp, batch_params, x, train=False)
            loss, _, ok = loss_fn(xp, out, ctx.y_test[start:stop])
            loss_sum += float(loss) * (stop - start)
            correct += int(ok or 0)
        return {"samples": hi - lo, "loss_sum": loss_sum, "correct": correct}

    def request_stop(self) -> None:
        """Finish the current task, then leave (a long poll for the next task ends now)."""
        self.stop.set()
        call = self._lease_call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        self.stop.set()
        self._pusher.shutdown(wait=True)
        if self.worker_id:
            try:  # leaving on purpose: the scheduler re-queues our leases now and logs us as leaving
                self.client.scheduler.DeregisterWorker(
                    scheduler_pb2.DeregisterWorkerRequest(worker_id=self.worker_id), timeout=2)
                log.info("deregistered from scheduler %s", self.client.address)
            except grpc.RpcError as e:
                log.warning("could not deregister from scheduler %s: %s", self.client.address, e.details())
        if self.health is not None:
            self.health[0].stop(0)
        self.client.close()


def run(scheduler: str, device: str = "cpu", name: str | None = None, connect_timeout: float = 60.0,
        health_port: int = 0) -> None:
    """The `paramserver worker` process: run tasks until SIGTERM/SIGINT (finishing the current one)."""
    import signal
    stop = threading.Event()
    worker = None

    def handler(signum, frame):
        log.info("received %s: finishing the current task, then exiting", signal.Signals(signum).name)
        stop.set()
        if worker is not None:
            worker.request_stop()
    # before registering: a signal that comes while we start up still leaves (and deregisters) cleanly
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    worker = Worker(scheduler, device, name, connect_timeout, health_port, stop=stop)
    try:
        worker.run()
    finally:
        worker.close()
