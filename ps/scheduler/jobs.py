"""Jobs, tasks and leases as a pure state machine (no sockets; every event carries ``now``).

A job runs epoch by epoch: the training split is cut into ``shards`` train tasks per epoch,
which any worker may lease and run concurrently (asynchronous SGD: no barrier between
workers). When an epoch's train tasks are all done, its eval task (the held-out split) and
the next epoch's train tasks are queued. The job succeeds when the last epoch's eval is done.
A lease that is not extended by its worker's heartbeat expires and the task goes back to
the queue; a late result from an expired lease is dropped.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass, field

from ps.errors import FailedPrecondition, NotFound
from ps.scheduler.transitions import TransitionLog

QUEUED, STARTING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "starting", "running", "succeeded", "failed", "cancelled")
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PENDING, LEASED, DONE = "pending", "leased", "done"


@dataclass
class Task:
    task_id: str
    job_id: str
    kind: str          # train | eval
    epoch: int
    shard: int
    shards: int
    state: str = PENDING
    lease_id: str = ""
    worker_id: str = ""
    expires: float = 0.0
    attempts: int = 0


@dataclass
class Event:
    seq: int
    time: float
    kind: str
    state: str
    message: str = ""
    metrics: dict = field(default_factory=dict)
    tasks_done: int = 0
    tasks_total: int = 0


@dataclass
class Job:
    job_id: str
    name: str
    spec_json: str
    prep: dict
    epochs: int
    shards: int
    lease_timeout: float
    submitted_at: float
    state: str = QUEUED
    error: str = ""
    started_at: float = 0.0
    tasks: dict[str, Task] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    metrics: dict = field(default_factory=lambda: {"epoch": 0, "steps": 0, "samples": 0, "train_loss": math.nan,
                                                   "test_loss": math.nan, "test_accuracy": math.nan,
                                                   "samples_per_s": 0.0, "seconds": 0.0})
    epoch_loss: dict[int, list[float]] = field(default_factory=dict)  # epoch -> [loss_sum, samples]
    warned_idle: bool = False
    queued_epochs: int = 0  # epochs whose train tasks have been queued

    @property
    def tasks_total(self) -> int:
        return self.epochs * (self.shards + 1)

    @property
    def tasks_done(self) -> int:
        return sum(t.state == DONE for t in self.tasks.values())


class Jobs:
    """Every job and task; thread-safe. ``changed`` is notified on every new event."""

    def __init__(self, wall_clock=None):
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()  # pending task ids, oldest first
        self.transitions = TransitionLog()
        self.changed = threading.Condition(threading.RLock())
        self._ids = itertools.count(1)
        self._leases = itertools.count(1)
        self._wall = wall_clock

    # -- helpers -----------------------------------------------------------------
    def _event(self, job: Job, now: float, kind: str, message: str = "") -> None:
        job.events.append(Event(len(job.events) + 1, now, kind, job.state, message, dict(job.metrics),
                                job.tasks_done, job.tasks_total))
        self.changed.notify_all()

    def _set_state(self, job: Job, state: str, now: float, reason: str) -> None:
        self.transitions.record(now, job.job_id, f"{job.state} -> {state}", reason)
        job.state = state
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
                self._enqueue(job, "train", epoch, s)
            job.queued_epochs = epoch + 1

    def _lookahead(self) -> bool:
        """With nothing pending, let an idle worker start the next epoch of a running job whose
        current epoch's tasks are all leased (asynchronous SGD needs no epoch barrier; the
        eval of an epoch still waits for that epoch's train tasks). At most one epoch ahead."""
        for job in self.jobs.values():
            if job.state != RUNNING or job.queued_epochs >= job.epochs:
                continue
            last = job.queued_epochs - 1
            older_done = all(t.state == DONE for t in job.tasks.values() if t.kind == "train" and t.epoch < last)
            if older_done and all(t.state != PENDING for t in job.tasks.values() if t.epoch == last):
                self._enqueue_epoch(job, last + 1)
                return True
        return False

    def _enqueue(self, job: Job, kind: str, epoch: int, shard: int) -> None:
        """Queue a task; evals go first so an epoch's accuracy is measured close to its end."""
        tid = f"{job.job_id}/{kind}-{epoch}" + (f"-{shard}" if kind == "train" else "")
        job.tasks[tid] = Task(tid, job.job_id, kind, epoch, shard, job.shards)
        if kind == "eval":
            self.queue.appendleft(tid)
        else:
            self.queue.append(tid)

    # -- job lifecycle -------------------------------------------------------------
    def submit(self, name: str, spec_json: str, prep: dict, epochs: int, lease_timeout: float,
               now: float) -> Job:
        with self.changed:
            job_id = f"job-{next(self._ids)}"
            job = Job(job_id, name, spec_json, prep, epochs, int(prep["shards"]), lease_timeout, now)
            self.jobs[job_id] = job
            self.transitions.record(now, job_id, "new -> queued", "submitted")
            self._event(job, now, "state", "submitted")
            return job

    def mark_starting(self, job_id: str, now: float) -> Job:
        with self.changed:
            job = self.get(job_id)
            self._set_state(job, STARTING, now, "creating its parameters on the servers")
            return job

    def start(self, job_id: str, now: float) -> None:
        """Parameters exist on the servers: queue epoch 0."""
        with self.changed:
            job = self.get(job_id)
            if job.state != STARTING:
                return
            job.started_at = now
            self._enqueue_epoch(job, 0)
            self._set_state(job, RUNNING, now, f"{job.shards} train tasks per epoch, {job.epochs} epochs")

    def warn_idle(self, have_workers: bool, now: float) -> list[Job]:
        """Running jobs with pending work and no worker to lease it get one warning event each
        (again after workers came and went), so a client sees why nothing moves."""
        warned = []
        with self.changed:
            for job in self.jobs.values():
                if have_workers or job.state != RUNNING:
                    job.warned_idle = False
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
                self._drop_tasks(job)
                self._set_state(job, FAILED, now, error)
            return job

    def cancel(self, job_id: str, now: float) -> Job:
        with self.changed:
            job = self.get(job_id)
            if job.state in TERMINAL:
                raise FailedPrecondition(f"job '{job_id}' already {job.state}")
            self._drop_tasks(job)
            self._set_state(job, CANCELLED, now, "cancelled by a client")
            return job

    def _drop_tasks(self, job: Job) -> None:
        self.queue = deque(t for t in self.queue if self.jobs[self._job_of(t)] is not job)

    @staticmethod
    def _job_of(task_id: str) -> str:
        return task_id.split("/", 1)[0]

    # -- tasks -------------------------------------------------------------------
    def lease(self, worker_id: str, now: float) -> tuple[Task, Job] | None:
        """The oldest pending task of a running job, leased to ``worker_id``."""
        with self.changed:
            while self.queue or self._lookahead():
                tid = self.queue.popleft()
                job = self.jobs[self._job_of(tid)]
                task = job.tasks[tid]
                if job.state != RUNNING or task.state != PENDING:
                    continue
                task.state, task.worker_id = LEASED, worker_id
                task.lease_id = f"lease-{next(self._leases)}"
                task.expires = now + job.lease_timeout
                task.attempts += 1
                self.transitions.record(now, tid, "pending -> leased", f"to {worker_id} as {task.lease_id}")
                return task, job
            return None

    def extend(self, worker_id: str, now: float) -> list[str]:
        """A worker's heartbeat: extend its leases; return the ones it must abandon."""
        abandon = []
        with self.changed:
            for job in self.jobs.values():
                for t in job.tasks.values():
                    if t.worker_id == worker_id and t.state == LEASED:
                        if job.state == RUNNING:
                            t.expires = max(t.expires, now + job.lease_timeout)
                        else:
                            abandon.append(t.task_id)
        return abandon

    def expire(self, now: float) -> list[Task]:
        """Return expired leases' tasks to the front of the queue."""
        expired = []
        with self.changed:
            for job in self.jobs.values():
                if job.state != RUNNING:
                    continue
                for t in job.tasks.values():
                    if t.state == LEASED and now > t.expires:
                        self.transitions.record(now, t.task_id, "leased -> pending",
                                     f"lease {t.lease_id} of {t.worker_id} expired")
                        t.state, t.worker_id, t.lease_id = PENDING, "", ""
                        self.queue.appendleft(t.task_id)
                        expired.append(t)
                        self._event(job, now, "task", f"lease on {t.task_id} expired: task re-queued")
        return expired

    def release_worker(self, worker_id: str, now: float) -> None:
        """A worker said goodbye (or was declared dead): its tasks go back to the queue."""
        with self.changed:
            for job in self.jobs.values():
                for t in job.tasks.values():
                    if t.worker_id == worker_id and t.state == LEASED:
                        t.expires = now - 1
        self.expire(now)

    def complete(self, task_id: str, lease_id: str, now: float, *, error: str = "", samples: int = 0,
                 steps: int = 0, loss_sum: float = 0.0, correct: int = 0, seconds: float = 0.0) -> bool:
        """A worker's result. False when its lease is no longer valid (the result is dropped)."""
        with self.changed:
            job = self.jobs.get(self._job_of(task_id))
            task = job.tasks.get(task_id) if job else None
            if task is None or task.state != LEASED or task.lease_id != lease_id or job.state != RUNNING:
                return False
            if error:
                task.state = DONE
                self.fail(job.job_id, f"{task.kind} task {task_id} failed on {task.worker_id}: {error}", now)
                return True
            task.state = DONE
            self.transitions.record(now, task_id, "leased -> done", f"by {task.worker_id}")
            m = job.metrics
            if task.kind == "train":
                m["samples"] += samples
                m["steps"] += steps
                acc = job.epoch_loss.setdefault(task.epoch, [0.0, 0])
                acc[0] += loss_sum
                acc[1] += samples
                m["seconds"] = now - job.started_at
                m["samples_per_s"] = m["samples"] / m["seconds"] if m["seconds"] > 0 else 0.0
                if all(t.state == DONE for t in job.tasks.values() if t.kind == "train" and t.epoch == task.epoch):
                    m["train_loss"] = acc[0] / max(acc[1], 1)
                    self._enqueue(job, "eval", task.epoch, 0)
                    self._enqueue_epoch(job, task.epoch + 1)
                self._event(job, now, "task", f"{task_id} done")
            else:
                m["epoch"] = max(m["epoch"], task.epoch + 1)
                m["test_loss"] = loss_sum / max(samples, 1)
                m["test_accuracy"] = correct / samples if samples else math.nan
                m["seconds"] = now - job.started_at
                self._event(job, now, "epoch", f"epoch {task.epoch + 1}/{job.epochs}: test accuracy "
                                               f"{m['test_accuracy']:.4f}")
                if task.epoch + 1 == job.epochs:
                    self._set_state(job, SUCCEEDED, now, f"test accuracy {m['test_accuracy']:.4f}")
            return True

    def events_after(self, job_id: str, after: int) -> tuple[list[Event], bool]:
        """Events with seq > after, and whether the job has ended."""
        with self.changed:
            job = self.get(job_id)
            return job.events[after:], job.state in TERMINAL
