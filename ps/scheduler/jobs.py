"""Jobs, tasks and leases as a pure state machine (no sockets; every event carries ``now``).

A job starts with one ``inspect`` task: a worker reads the job's data, checks it against the
spec and reports the preprocessing statistics and the model's parameter specs (the scheduler
itself never reads data or builds models). Its parameters are then created on the servers,
and the job runs epoch by epoch: the training split is cut into ``shards`` train tasks per
epoch, which any worker may lease and run concurrently (asynchronous SGD: no barrier between
workers). When an epoch's train tasks are all done, its eval tasks (the held-out split, in
``eval_shards`` parts that workers evaluate side by side) and the next epoch's train tasks are
queued; the epoch's test metrics come from the sums of its parts. The job succeeds when every
task of every epoch is done (the last epoch's evaluation gives its metrics).
A lease that is not extended by its worker's heartbeat expires and the task goes back to
the queue; a late result from an expired lease is dropped.

``now`` is a monotonic clock (leases, ages); events carry wall-clock time for people. Every
per-heartbeat and per-lease operation touches only the worker's own leases or the job at
hand, never every task, so the cost per call does not grow with the number of jobs.

Durability (``ps.scheduler.state``): every mutation marks what it changed (the job, its tasks, its
new events) dirty; ``flush`` writes just that, in one transaction, and the service flushes before it
answers any call whose effect must survive a restart. ``adopt`` takes back a loaded state.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from ps.errors import Aborted, FailedPrecondition, NotFound
from ps.histogram import bump, merge
from ps.scheduler.clocks import Clocks, Decision
from ps.scheduler.transitions import TransitionLog

QUEUED, STARTING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "starting", "running", "succeeded", "failed", "cancelled")
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PENDING, LEASED, DONE = "pending", "leased", "done"
INSPECT, TRAIN, EVAL = "inspect", "train", "eval"


@dataclass(frozen=True)
class Retention:
    """How long the scheduler keeps what jobs leave behind, and how much it lets followers and
    long polls hold (the defaults of `paramserver scheduler`'s flags)."""

    #: ended jobs kept (newest first); older records are dropped with their events
    keep_jobs: int = 1000
    #: ended jobs are dropped this long after they ended
    keep_jobs_s: float = 7 * 24 * 3600.0
    #: a succeeded job's parameters are freed on the servers this long after it ended,
    #: unless its spec says keep_params
    params_s: float = 24 * 3600.0
    #: events kept per job (older ones are dropped; seq numbers keep counting)
    events: int = 1000
    #: WatchJob streams open at once (each costs memory, not a thread)
    followers: int = 10_000
    #: longest LeaseTask long poll
    max_lease_wait_s: float = 10.0


@dataclass
class Task:
    task_id: str
    job_id: str
    kind: str          # inspect | train | eval
    epoch: int
    shard: int
    shards: int
    state: str = PENDING
    lease_id: str = ""
    worker_id: str = ""
    expires: float = 0.0
    attempts: int = 0
    rank: int = 0      # its place in the queue when pending (lower first): the queue's order survives a restart


@dataclass
class Event:
    seq: int
    time: float        # wall clock
    kind: str
    state: str
    message: str = ""
    metrics: dict = field(default_factory=dict)
    tasks_done: int = 0
    tasks_total: int = 0
    wire: object = field(default=None, compare=False, repr=False)  # its ps.v1.JobEvent, built once for all followers


def _new_metrics() -> dict:
    return {"epoch": 0, "steps": 0, "samples": 0, "train_loss": math.nan, "test_loss": math.nan,
            "test_accuracy": math.nan, "samples_per_s": 0.0, "seconds": 0.0, "duplicates": 0,
            "staleness_updates": [], "staleness_clocks": []}


def _copy_metrics(m: dict) -> dict:
    """A snapshot of a job's metrics (its histograms are lists that go on counting)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in m.items()}


def consistency(job: "Job") -> tuple[str, int]:
    """(mode, staleness bound) from the job's spec: "asp" | "ssp" | "bsp"."""
    cached = job.__dict__.get("_consistency")
    if cached is None:
        import json
        spec = json.loads(job.spec_json)
        cached = job.__dict__["_consistency"] = (spec.get("consistency", "asp"), int(spec.get("staleness", 0)))
    return cached


def eval_every(job: "Job") -> int:
    """Epochs between evaluations on the held-out split, from the job's spec (the last is always evaluated)."""
    cached = job.__dict__.get("_eval_every")
    if cached is None:
        import json
        cached = job.__dict__["_eval_every"] = max(1, int(json.loads(job.spec_json).get("eval_every", 1)))
    return cached


@dataclass
class Job:
    job_id: str
    name: str
    spec_json: str
    prep: dict | None        # None until the inspect task reports
    epochs: int
    shards: int
    lease_timeout: float
    submitted_at: float      # wall clock
    max_events: int = Retention.events
    keep_params: bool = False
    request_id: str = ""
    state: str = QUEUED
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0  # monotonic, when it reached a terminal state
    params: dict = field(default_factory=dict)  # tensor name -> ps.initializers.Init fields
    params_freed: bool = False
    owner: str = ""          # the user who submitted it ("": no auth)
    resume_from: str = ""    # the checkpoint this job continues from ("": a new job)
    start_epoch: int = 0     # the first epoch it runs (a resumed job: the epochs its checkpoint had done)
    checkpoint: str = ""     # the last checkpoint written
    checkpoint_epoch: int = 0
    checkpointed_at: float = 0.0  # monotonic, when the last checkpoint was attempted
    tasks: dict[str, Task] = field(default_factory=dict)
    events: deque = field(default_factory=deque)
    next_event: int = 1
    metrics: dict = field(default_factory=_new_metrics)
    epoch_loss: dict[int, list[float]] = field(default_factory=dict)  # epoch -> [loss_sum, samples]
    warned_idle: bool = False
    queued_epochs: int = 0   # epochs whose train tasks have been queued
    tasks_done: int = 0      # train and eval tasks done
    epoch_eval: dict[int, list[float]] = field(default_factory=dict)  # epoch -> [loss_sum, correct, samples, parts]
    pending_in: Counter = field(default_factory=Counter)   # epoch -> pending train tasks
    undone_in: Counter = field(default_factory=Counter)    # epoch -> train tasks not done
    evaluated: int = 0       # the epochs the test metrics are of (the latest evaluated epoch, counted from 1)
    finished: int = 0        # epochs finished in order (train, and eval if evaluated): what a checkpoint holds

    def __post_init__(self):
        self.events = deque(self.events, maxlen=self.max_events)

    @property
    def eval_shards(self) -> int:
        """Eval tasks per epoch: the held-out split in parts evaluated side by side (the inspect task
        decides, from the split's size and the workers wanted; 1 before it has reported)."""
        return int((self.prep or {}).get("eval_shards", 1))

    def evaluates(self, epoch: int) -> bool:
        """Whether the epoch (from 0) is evaluated: every ``eval_every``-th, and the last."""
        return epoch + 1 >= self.epochs or (epoch + 1) % eval_every(self) == 0

    def tasks_before(self, epoch: int) -> int:
        """Train and eval tasks of the epochs before ``epoch``."""
        evaluated = epoch // eval_every(self) + (epoch >= self.epochs and self.epochs % eval_every(self) != 0)
        return epoch * self.shards + evaluated * self.eval_shards

    @property
    def tasks_total(self) -> int:
        return self.tasks_before(self.epochs)


class Jobs:
    """Every job and task; thread-safe. ``changed`` is notified on every new event, and each
    listener is called with the job id (and with "" when there is new work to lease)."""

    def __init__(self, wall_clock: Callable[[], float] = time.time, max_events: int = Retention.events):
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()  # pending task ids, oldest first
        self.transitions = TransitionLog()
        self.changed = threading.Condition(threading.RLock())
        self.listeners: list[Callable[[str], None]] = []
        self.max_events = max_events
        self.next_job = 1      # job-N: ids are never reused, across restarts too (the counters are saved)
        self.next_lease = 1    # lease-N
        self._front, self._back = -1, 0                 # queue ranks handed out at its front and its back
        self._wall = wall_clock
        self._leased: dict[str, Task] = {}              # task id -> task, every task under lease
        self._by_worker: dict[str, set[str]] = {}       # worker id -> task ids it holds
        self._requests: dict[str, str] = {}             # submit request id -> job id
        self.clocks = Clocks(self.transitions)          # ssp/bsp jobs' clocks (not saved: members join again)
        # Dirty tracking for flush(): what changed since the last write of the state.
        self._dirty: dict[str, set[str]] = {}           # job id -> its changed task ids (the job row changed too)
        self._dirty_spec: set[str] = set()              # jobs whose spec/prep/params changed
        self._dirty_reset: set[str] = set()             # jobs whose task set was cut (rewrite all their tasks)
        self._deleted: set[str] = set()                 # jobs forgotten
        self.saved_seq: dict[str, int] = {}             # job id -> the last event seq written

    # -- helpers -----------------------------------------------------------------
    def _touch(self, job: Job, task_id: str | None = None) -> None:
        """Mark ``job`` (and one of its tasks) changed, for the next flush."""
        tasks = self._dirty.get(job.job_id)
        if tasks is None:
            tasks = self._dirty[job.job_id] = set()
        if task_id is not None:
            tasks.add(task_id)

    def touch(self, job_id: str) -> None:
        """Mark a job changed from outside (e.g. its parameters were freed)."""
        with self.changed:
            job = self.jobs.get(job_id)
            if job is not None:
                self._touch(job)

    def _notify(self, key: str) -> None:
        self.changed.notify_all()
        for listener in self.listeners:
            listener(key)

    def _event(self, job: Job, now: float, kind: str, message: str = "") -> None:
        job.events.append(Event(job.next_event, self._wall(), kind, job.state, message, _copy_metrics(job.metrics),
                                job.tasks_done, job.tasks_total))
        job.next_event += 1
        self._touch(job)
        self._notify(job.job_id)

    def _set_state(self, job: Job, state: str, now: float, reason: str) -> None:
        self.transitions.record(now, job.job_id, f"{job.state} -> {state}", reason)
        job.state = state
        if state in TERMINAL:
            job.finished_at = now
            self._drop_tasks(job)
        self._event(job, now, "state", reason)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job '{job_id}' not found")
        return job

    def _enqueue_epoch(self, job: Job, epoch: int) -> None:
        """Queue an epoch's train tasks (once)."""
        if epoch < job.epochs and epoch >= job.queued_epochs:
            for s in range(job.shards):
                self._enqueue(job, TRAIN, epoch, s)
            job.queued_epochs = epoch + 1

    def _lookahead(self) -> bool:
        """With nothing pending, let an idle worker start the next epoch of a running job whose
        current epoch's tasks are all leased (asynchronous SGD needs no epoch barrier; the
        eval of an epoch still waits for that epoch's train tasks). At most one epoch ahead."""
        for job in self.jobs.values():
            if job.state != RUNNING or job.queued_epochs >= job.epochs or consistency(job)[0] != "asp":
                continue  # ssp/bsp: an epoch's members share a clock; the next epoch waits for it
            last = job.queued_epochs - 1
            older_done = all(job.undone_in[e] == 0 for e in range(max(last, 0)))
            if older_done and job.pending_in[last] == 0:
                self._enqueue_epoch(job, last + 1)
                return True
        return False

    @staticmethod
    def _task_id(job: Job, kind: str, epoch: int, shard: int) -> str:
        return f"{job.job_id}/{kind}" + (f"-{epoch}" if kind != INSPECT else "") + (
            f"-{shard}" if kind == TRAIN or (kind == EVAL and job.eval_shards > 1) else "")

    def _finished(self, job: Job, epoch: int) -> bool:
        """Whether every train task of the epoch is done, and its evaluation when it has one."""
        if epoch >= job.queued_epochs or job.undone_in[epoch]:
            return False
        if not job.evaluates(epoch):
            return True
        evals = (job.tasks.get(self._task_id(job, EVAL, epoch, part)) for part in range(job.eval_shards))
        return all(t is not None and t.state == DONE for t in evals)

    def _advance_epoch(self, job: Job, epoch: int) -> None:
        """The epoch (from 0) has finished: ``metrics["epoch"]`` is the latest finished, ``job.finished`` the
        epochs finished in order. Under asp a later epoch can finish before an earlier one (a task whose
        worker died runs again, an eval still out), and a checkpoint, resumed after the epochs it says it
        holds, must say only those finished in order."""
        job.metrics["epoch"] = max(job.metrics["epoch"], epoch + 1)
        self._count_finished(job)

    def _count_finished(self, job: Job) -> None:
        while job.finished < job.epochs and self._finished(job, job.finished):
            job.finished += 1

    def _enqueue(self, job: Job, kind: str, epoch: int, shard: int) -> None:
        """Queue a task; inspect and eval tasks go first (an epoch's accuracy is measured close to its end)."""
        tid = self._task_id(job, kind, epoch, shard)
        task = job.tasks[tid] = Task(tid, job.job_id, kind, epoch, shard,
                                     job.eval_shards if kind == EVAL else job.shards)
        if kind == TRAIN:
            job.pending_in[epoch] += 1
            job.undone_in[epoch] += 1
            self._to_back(task)
        else:
            self._to_front(task)
        self._touch(job, tid)
        self._notify("")

    def _to_back(self, task: Task) -> None:
        task.rank, self._back = self._back, self._back + 1
        self.queue.append(task.task_id)

    def _to_front(self, task: Task) -> None:
        task.rank, self._front = self._front, self._front - 1
        self.queue.appendleft(task.task_id)

    # -- job lifecycle -------------------------------------------------------------
    def submit(self, name: str, spec_json: str, prep: dict | None, epochs: int, lease_timeout: float,
               now: float, *, request_id: str = "", keep_params: bool = False, params: dict | None = None,
               start_epoch: int = 0, resume_from: str = "", owner: str = "") -> Job:
        """A new job (or, for a request id seen before, the job that request created). Without
        ``prep`` the job's first task inspects its data; with it (and ``params``), the job is ready to
        start, at ``start_epoch`` (a job resumed from the checkpoint ``resume_from``)."""
        with self.changed:
            if request_id and request_id in self._requests and self._requests[request_id] in self.jobs:
                return self.jobs[self._requests[request_id]]
            job_id = f"job-{self.next_job}"
            self.next_job += 1
            job = Job(job_id, name, spec_json, prep, epochs, int(prep["shards"]) if prep else 0, lease_timeout,
                      self._wall(), max_events=self.max_events, keep_params=keep_params, request_id=request_id,
                      params=dict(params or {}), resume_from=resume_from, start_epoch=start_epoch,
                      checkpoint_epoch=start_epoch, owner=owner)
            if start_epoch:
                job.metrics["epoch"] = job.finished = start_epoch
                job.tasks_done = job.tasks_before(start_epoch)
            self.jobs[job_id] = job
            self._dirty_spec.add(job_id)
            if request_id:
                self._requests[request_id] = job_id
            self.transitions.record(now, job_id, "new -> queued", "submitted")
            self._event(job, now, "state", f"resumed from {resume_from} after epoch {start_epoch}" if resume_from
                        else "submitted")
            if prep is None:
                self._enqueue(job, INSPECT, 0, 0)
            return job

    def inspected(self, job: Job, result: dict, now: float) -> None:
        """The inspect task's result: the preprocessing statistics and the parameters' specs."""
        job.prep = dict(result["prep"])
        job.params = dict(result["params"])
        job.shards = int(job.prep["shards"])
        self._dirty_spec.add(job.job_id)
        self._event(job, now, "task", f"data inspected: {job.prep.get('n_train', '?')} training examples, "
                                      f"{job.shards} train tasks per epoch")

    def ready(self) -> list[Job]:
        """Queued jobs whose data has been inspected: their parameters can be created."""
        with self.changed:
            return [j for j in self.jobs.values() if j.state == QUEUED and j.prep is not None]

    def mark_starting(self, job_id: str, now: float) -> Job:
        with self.changed:
            job = self.get(job_id)
            self._set_state(job, STARTING, now, "creating its parameters on the servers")
            return job

    def start(self, job_id: str, now: float) -> None:
        """Parameters exist on the servers: queue the first epoch (0, or a resumed job's next)."""
        with self.changed:
            job = self.get(job_id)
            if job.state != STARTING:
                return
            job.started_at = now
            job.queued_epochs = max(job.queued_epochs, job.start_epoch)
            self._enqueue_epoch(job, job.start_epoch)
            self._set_state(job, RUNNING, now, f"{job.shards} train tasks per epoch, {job.epochs} epochs")

    def checkpointed(self, job_id: str, url: str, epoch: int, now: float, error: str = "") -> None:
        """A checkpoint of the job was written to ``url`` after ``epoch`` epochs (or, with ``error``, failed)."""
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None:
                return
            job.checkpointed_at, job.checkpoint_epoch = now, epoch
            if url:
                job.checkpoint = url
            self._event(job, now, "warning" if error else "checkpoint",
                        f"checkpoint failed: {error}" if error else f"checkpoint of epoch {epoch} written to {url}")

    def warn_idle(self, have_workers: bool, now: float) -> list[Job]:
        """Jobs with pending work and no worker to lease it get one warning event each
        (again after workers came and went), so a client sees why nothing moves."""
        warned = []
        with self.changed:
            for job in self.jobs.values():
                waiting = job.state == RUNNING or (job.state == QUEUED and job.prep is None)
                if have_workers or not waiting:
                    if job.warned_idle:
                        job.warned_idle = False
                        self._touch(job)
                    continue
                if not job.warned_idle:
                    job.warned_idle = True
                    self._event(job, now, "warning", "no workers are registered with the scheduler: start one "
                                                     "with `paramserver worker --scheduler HOST:PORT`")
                    warned.append(job)
        return warned

    def fail(self, job_id: str, error: str, now: float) -> Job:
        with self.changed:
            job = self.get(job_id)
            if job.state not in TERMINAL:
                job.error = error
                self._set_state(job, FAILED, now, error)
            return job

    def cancel(self, job_id: str, now: float) -> Job:
        with self.changed:
            job = self.get(job_id)
            if job.state in TERMINAL:
                raise FailedPrecondition(f"job '{job_id}' already {job.state}")
            self._set_state(job, CANCELLED, now, "cancelled by a client")
            return job

    def _drop_tasks(self, job: Job) -> None:
        """A job that ended keeps its counters, not its tasks; tasks still leased stay known (as
        leased) until their worker's next heartbeat tells it to abandon them."""
        self.queue = deque(t for t in self.queue if self._job_of(t) != job.job_id)
        job.tasks = {tid: t for tid, t in job.tasks.items() if t.state == LEASED}
        self.clocks.drop_job(job.job_id)
        self._dirty_reset.add(job.job_id)
        self._touch(job)

    def delete(self, job_id: str, now: float) -> Job:
        """Forget a job (cancelling it first if it has not ended); returns it."""
        with self.changed:
            job = self.get(job_id)
            if job.state not in TERMINAL:
                self._set_state(job, CANCELLED, now, "deleted by a client")
            self._forget(job, now, "deleted by a client")
            self._notify(job.job_id)
            return job

    def _forget(self, job: Job, now: float, reason: str) -> None:
        for t in list(job.tasks.values()):
            self._unlease(t)
        del self.jobs[job.job_id]
        self._dirty.pop(job.job_id, None)
        self._dirty_spec.discard(job.job_id)
        self._dirty_reset.discard(job.job_id)
        self._deleted.add(job.job_id)
        self.saved_seq.pop(job.job_id, None)
        if job.request_id:
            self._requests.pop(job.request_id, None)
        self.transitions.record(now, job.job_id, f"{job.state} -> forgotten", reason)

    def retire(self, now: float, keep: int, keep_s: float) -> list[Job]:
        """Forget ended jobs beyond the newest ``keep`` and those ended more than ``keep_s`` ago."""
        with self.changed:
            ended = sorted((j for j in self.jobs.values() if j.state in TERMINAL), key=lambda j: j.finished_at)
            excess = max(0, len(ended) - keep)
            drop = [j for i, j in enumerate(ended) if i < excess or now - j.finished_at > keep_s]
            for job in drop:
                self._forget(job, now, "retention")
            return drop

    def params_due(self, now: float, after_s: float) -> list[Job]:
        """Succeeded jobs whose parameters have been kept ``after_s`` and did not ask to keep them."""
        with self.changed:
            return [j for j in self.jobs.values() if j.state == SUCCEEDED and not j.keep_params
                    and not j.params_freed and now - j.finished_at >= after_s]

    def page(self, size: int, token: str, owner: str | None = None) -> tuple[list[Job], str]:
        """Jobs newest first (``owner``'s only, when given), ``size`` at a time; the token names where
        the next page starts."""
        with self.changed:
            ordered = sorted((j for j in self.jobs.values() if owner is None or j.owner == owner),
                             key=lambda j: int(j.job_id.split("-")[1]), reverse=True)
            if token:
                try:
                    below = int(token)
                except ValueError:
                    raise FailedPrecondition(f"list jobs: page_token '{token[:40]}' is not one this scheduler "
                                             f"gave out") from None
                ordered = [j for j in ordered if int(j.job_id.split("-")[1]) < below]
            page = ordered[:size]
            more = len(ordered) > size
            return page, (page[-1].job_id.split("-")[1] if more and page else "")

    @staticmethod
    def _job_of(task_id: str) -> str:
        return task_id.split("/", 1)[0]

    # -- tasks -------------------------------------------------------------------
    def _unlease(self, t: Task, reason: str = "", now: float = 0.0) -> None:
        shrunk = self.clocks.leave(t.task_id, reason or "its job ended", now)
        if shrunk:
            job = self.jobs.get(t.job_id)
            if job is not None:
                self._event(job, now, "warning", shrunk)  # a warning: followers see every one
            self._notify(f"clock:{t.job_id}")
        self._leased.pop(t.task_id, None)
        held = self._by_worker.get(t.worker_id)
        if held is not None:
            held.discard(t.task_id)
            if not held:
                del self._by_worker[t.worker_id]

    def lease(self, worker_id: str, now: float) -> tuple[Task, Job] | None:
        """The oldest pending task of a job that can run it, leased to ``worker_id``."""
        with self.changed:
            while self.queue or self._lookahead():
                tid = self.queue.popleft()
                job = self.jobs.get(self._job_of(tid))
                task = job.tasks.get(tid) if job is not None else None
                if task is None or task.state != PENDING:
                    continue
                if job.state != (QUEUED if task.kind == INSPECT else RUNNING):
                    continue
                task.state, task.worker_id = LEASED, worker_id
                task.lease_id = f"lease-{self.next_lease}"
                self.next_lease += 1
                task.expires = now + job.lease_timeout
                task.attempts += 1
                if task.kind == TRAIN:
                    job.pending_in[task.epoch] -= 1
                    mode, staleness = consistency(job)
                    if mode != "asp":
                        self.clocks.join(job.job_id, task.epoch, tid, worker_id, mode, staleness, now,
                                         expected=job.shards, grace=job.lease_timeout)
                        self._notify(f"clock:{job.job_id}")
                self._leased[tid] = task
                self._by_worker.setdefault(worker_id, set()).add(tid)
                self._touch(job, tid)
                self.transitions.record(now, tid, "pending -> leased", f"to {worker_id} as {task.lease_id}")
                return task, job
            return None

    def extend(self, worker_id: str, now: float) -> list[str]:
        """A worker's heartbeat: extend its leases; return the ones it must abandon."""
        abandon = []
        with self.changed:
            for tid in list(self._by_worker.get(worker_id, ())):
                t = self._leased[tid]
                job = self.jobs.get(t.job_id)
                if job is not None and job.state not in TERMINAL:
                    t.expires = max(t.expires, now + job.lease_timeout)
                else:
                    abandon.append(tid)
                    self._unlease(t)
                    if job is not None:
                        job.tasks.pop(tid, None)
                        self._touch(job, tid)
        return abandon

    def expire(self, now: float) -> list[Task]:
        """Return expired leases' tasks to the front of the queue."""
        expired = []
        with self.changed:
            for t in [t for t in self._leased.values() if now > t.expires]:
                job = self.jobs.get(t.job_id)
                if job is None or job.state in TERMINAL:
                    continue  # the worker learns to abandon it at its next heartbeat
                self.transitions.record(now, t.task_id, "leased -> pending",
                                        f"lease {t.lease_id} of {t.worker_id} expired")
                self._unlease(t, f"lease {t.lease_id} of {t.worker_id} expired", now)
                t.state, t.worker_id, t.lease_id = PENDING, "", ""
                if t.kind == TRAIN:
                    job.pending_in[t.epoch] += 1
                self._to_front(t)
                self._touch(job, t.task_id)
                expired.append(t)
                self._event(job, now, "task", f"lease on {t.task_id} expired: task re-queued")
            if expired:
                self._notify("")
        return expired

    def release_worker(self, worker_id: str, now: float) -> None:
        """A worker said goodbye (or was declared dead): its tasks go back to the queue."""
        with self.changed:
            for tid in self._by_worker.get(worker_id, ()):
                self._leased[tid].expires = now - 1
        self.expire(now)

    def complete(self, task_id: str, lease_id: str, now: float, *, error: str = "", samples: int = 0,
                 steps: int = 0, loss_sum: float = 0.0, correct: int = 0, seconds: float = 0.0,
                 duplicates: int = 0, result: dict | None = None, staleness: list[int] | tuple = (),
                 clock_staleness: list[int] | tuple = ()) -> bool:
        """A worker's result. False when its lease is no longer valid (the result is dropped).
        ``clock_staleness``: a bsp task's gradients summed, by clocks of staleness (all at 0)."""
        with self.changed:
            job = self.jobs.get(self._job_of(task_id))
            task = job.tasks.get(task_id) if job else None
            if task is None or task.state != LEASED or task.lease_id != lease_id:
                return False
            self._unlease(task, f"failed: {error}" if error else "done", now)
            self._touch(job, task_id)
            if job.state in TERMINAL:
                job.tasks.pop(task_id, None)
                return False
            task.state = DONE
            if error:  # an inspect task's error is the spec's own field-naming message
                self.fail(job.job_id, error if task.kind == INSPECT else
                          f"{task.kind} task {task_id} failed on {task.worker_id}: {error}", now)
                return True
            self.transitions.record(now, task_id, "leased -> done", f"by {task.worker_id}")
            m = job.metrics
            if task.kind == INSPECT:
                self.inspected(job, result or {}, now)
                return True
            job.tasks_done += 1
            if task.kind == TRAIN:
                job.undone_in[task.epoch] -= 1
                m["samples"] += samples
                m["steps"] += steps
                m["duplicates"] += duplicates
                merge(m.setdefault("staleness_updates", []), staleness)
                merge(m.setdefault("staleness_clocks", []), clock_staleness)
                acc = job.epoch_loss.setdefault(task.epoch, [0.0, 0])
                acc[0] += loss_sum
                acc[1] += samples
                m["seconds"] = now - job.started_at
                m["samples_per_s"] = m["samples"] / m["seconds"] if m["seconds"] > 0 else 0.0
                if job.undone_in[task.epoch] == 0:
                    m["train_loss"] = acc[0] / max(acc[1], 1)
                    del job.epoch_loss[task.epoch]  # the epoch is done: keep the job's record bounded
                    if job.evaluates(task.epoch):
                        for part in reversed(range(job.eval_shards)):  # each goes to the front: part 0 first
                            self._enqueue(job, EVAL, task.epoch, part)
                    else:
                        self._advance_epoch(job, task.epoch)
                        self._event(job, now, "epoch", f"epoch {task.epoch + 1}/{job.epochs}: trained (evaluated "
                                                       f"every {eval_every(job)} epochs)")
                    self._enqueue_epoch(job, task.epoch + 1)
                self._event(job, now, "task", f"{task_id} done")
            else:
                part = job.epoch_eval.setdefault(task.epoch, [0.0, 0, 0, 0])
                part[0] += loss_sum
                part[1] += correct
                part[2] += samples
                part[3] += 1
                if part[3] < job.eval_shards:
                    return True  # the epoch's other parts of the held-out split are still being evaluated
                loss_sum, correct, samples, _ = job.epoch_eval.pop(task.epoch)
                accuracy = correct / samples if samples else math.nan
                self._advance_epoch(job, task.epoch)
                if task.epoch + 1 >= job.evaluated:  # an epoch's late evaluation does not replace a later one's
                    job.evaluated = task.epoch + 1
                    m["test_loss"] = loss_sum / max(samples, 1)
                    m["test_accuracy"] = accuracy
                m["seconds"] = now - job.started_at
                self._event(job, now, "epoch", f"epoch {task.epoch + 1}/{job.epochs}: test accuracy {accuracy:.4f}")
            # Done when every task is: under asp a later epoch can finish before a task of an earlier one
            # whose worker died (it runs again once its lease expires), and that work must not be lost.
            if job.tasks_done == job.tasks_total:
                self._set_state(job, SUCCEEDED, now, f"test accuracy {m['test_accuracy']:.4f}")
            return True

    def clock_step(self, task_id: str) -> int:
        """The barrier step of a bsp train task's clock now (0 for any other task)."""
        with self.changed:
            key = self.clocks.by_task.get(task_id)
            c = self.clocks.clocks.get(key) if key is not None else None
            return c.step if c is not None and c.mode == "bsp" else 0

    def clock(self, task_id: str, lease_id: str, steps: int, now: float, applied: bool = False,
              workers: int = 0, closed_step: int = 0) -> Decision:
        """A train task of an ssp/bsp job reports its clock (see ``ps.scheduler.clocks``): may it go on?"""
        with self.changed:
            job = self.jobs.get(self._job_of(task_id))
            task = job.tasks.get(task_id) if job else None
            if task is None or task.state != LEASED or task.lease_id != lease_id:
                # ABORTED, the one status a clock call answers only this way: the worker gives up its task on it
                raise Aborted(f"clock of {task_id}: lease {lease_id or '-'} is not held (it expired or the job ended)")
            if task.task_id not in self.clocks.by_task:  # a scheduler restarted under a running task
                mode, staleness = consistency(job)
                self.clocks.join(job.job_id, task.epoch, task_id, task.worker_id, mode, staleness, now,
                                 expected=job.shards, grace=job.lease_timeout, rejoin=True)
                # a bsp step reported applied to the scheduler that died: the rebuilt clock has no such step.
                # The member arrives at the rebuilt clock's step instead (its leader applies what is accumulated)
                applied = False
            before = self.clocks.clocks.get(self.clocks.by_task[task_id])
            state = (before.step, len(before.arrived), before.leader, before.min_clock())
            d = self.clocks.tick(task_id, steps, now, applied, workers, closed_step)
            if d.observed:
                hist = job.metrics.setdefault("staleness_clocks", [])
                for v in d.observed:
                    bump(hist, v)
                self._touch(job)
            if state != (before.step, len(before.arrived), before.leader, before.min_clock()):
                self._notify(f"clock:{job.job_id}")
            return d

    def events_after(self, job_id: str, after: int) -> tuple[list[Event], bool]:
        """Events with seq > after (those still kept), and whether the job has ended."""
        with self.changed:
            job = self.get(job_id)
            events = job.events
            first = events[0].seq if events else job.next_event
            start = max(0, after - first + 1)
            return list(itertools.islice(events, start, None)), job.state in TERMINAL

    # -- durability ------------------------------------------------------------------
    def flush(self, store, now: float) -> None:
        """Write what changed since the last flush to ``store`` (a ps.scheduler.state.StateStore),
        in one transaction; returns once it is committed."""
        store.save(jobs=self, now=now)

    def take_dirty(self) -> "Dirty":
        """What changed since the last call (the caller holds ``changed`` and writes it)."""
        d = Dirty(self._dirty, self._dirty_spec, self._dirty_reset, self._deleted, dict(self.saved_seq))
        self._dirty, self._dirty_spec, self._dirty_reset, self._deleted = {}, set(), set(), set()
        return d

    def undo_take(self, d: "Dirty") -> None:
        """A write failed: mark what ``d`` held dirty again, so the next flush retries it."""
        with self.changed:
            for job_id, tasks in d.jobs.items():
                if job_id in self.jobs:
                    self._dirty.setdefault(job_id, set()).update(tasks)
            self._dirty_spec |= {j for j in d.spec if j in self.jobs}
            self._dirty_reset |= {j for j in d.reset if j in self.jobs}
            self._deleted |= d.deleted - set(self.jobs)
            for job_id, seq in d.saved_seq.items():
                if job_id in self.saved_seq:
                    self.saved_seq[job_id] = min(self.saved_seq[job_id], seq)

    def adopt(self, jobs: list[Job], next_job: int, next_lease: int, now: float, note: str) -> None:
        """Take back jobs loaded from a saved state (a restart). Counters continue; a job that was
        creating its parameters goes back to the queue to create them again; leased tasks stay
        leased with a fresh expiry (their worker can still complete them); pending tasks are
        queued again in their order; every job that has not ended gets an event saying ``note``."""
        with self.changed:
            self.next_job = max(next_job, self.next_job, *(int(j.job_id.split("-")[1]) + 1 for j in jobs))
            self.next_lease = max(next_lease, self.next_lease)
            pending: list[Task] = []
            for job in jobs:
                self.jobs[job.job_id] = job
                if job.request_id:
                    self._requests[job.request_id] = job.job_id
                self.saved_seq[job.job_id] = job.next_event - 1
                job.pending_in, job.undone_in = Counter(), Counter()
                for t in job.tasks.values():
                    if t.kind == TRAIN and t.state != DONE:
                        job.undone_in[t.epoch] += 1
                        if t.state == PENDING:
                            job.pending_in[t.epoch] += 1
                    if t.state == LEASED:
                        t.expires = now + job.lease_timeout
                        self._leased[t.task_id] = t
                        self._by_worker.setdefault(t.worker_id, set()).add(t.task_id)
                    elif t.state == PENDING:
                        pending.append(t)
                if job.state in TERMINAL:
                    continue
                job.finished = max(job.finished, job.start_epoch)  # (a state saved before it was kept has 0)
                self._count_finished(job)
                self.transitions.record(now, job.job_id, f"saved -> {job.state}", note)
                if job.state == STARTING:
                    self._set_state(job, QUEUED, now, f"{note}; its parameters are created again")
                else:
                    self._event(job, now, "warning", f"{note}; the job resumes")
            pending.sort(key=lambda t: t.rank)
            self.queue = deque(t.task_id for t in pending)
            ranks = [t.rank for job in jobs for t in job.tasks.values()]
            self._front = min([-1, *(r - 1 for r in ranks)])
            self._back = max([0, *(r + 1 for r in ranks)])
            self._notify("")


@dataclass
class Dirty:
    """What changed in a ``Jobs`` since the last write: job id -> changed task ids (the job row
    changed too), jobs whose spec changed, whose task set was cut, that were forgotten; and the
    last event seq written per job before this take."""

    jobs: dict[str, set[str]]
    spec: set[str]
    reset: set[str]
    deleted: set[str]
    saved_seq: dict[str, int]
