"""Checkpoints of jobs: on demand (CheckpointJob, ``paramserver checkpoint JOB``) and periodic
(``checkpoint_every_s`` / ``checkpoint_every_epochs`` in the job's spec).

A checkpoint is a directory (any fsspec URL): every shard's primary writes its slices there
(``ps.checkpoint.take``: safetensors, atomically), then the scheduler writes ``manifest.json``
naming each file and its size, with what a resumed job needs: the spec, the preprocessing
statistics, the parameters' specs and the epochs finished. A job resumed from it (SubmitJob's
``resume_from``) skips the inspection, restores its parameters, optimizer state and update
counts from the files, and starts at the next epoch.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from ps import checkpoint
from ps.errors import FailedPrecondition, PSError
from ps.scheduler.jobs import RUNNING, SUCCEEDED, Job, Jobs

log = logging.getLogger("ps.scheduler.checkpoints")


def default_dir(state_dir: str | None) -> str:
    """Where checkpoints go when neither the job's spec nor ``--checkpoint-dir`` says."""
    import os
    return os.path.join(state_dir, "checkpoints") if state_dir else os.path.join(os.getcwd(), "checkpoints")


class Checkpointer:
    """Takes jobs' checkpoints; ``client()`` is the scheduler's own ps.Client, ``saved()`` persists jobs."""

    def __init__(self, jobs: Jobs, client, base_dir: str, clock=time.monotonic, saved=lambda: None):
        self.jobs = jobs
        self._client = client
        self.base_dir = base_dir
        self.clock = clock
        self.saved = saved
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def url_for(self, job: Job) -> str:
        spec = json.loads(job.spec_json)
        base = (spec.get("checkpoint_dir") or self.base_dir).rstrip("/")
        return f"{base}/{job.job_id}/epoch-{job.finished:04d}-{time.strftime('%Y%m%dT%H%M%S')}"

    def take(self, job_id: str, url: str = "") -> tuple[str, dict]:
        """Checkpoint a job whose parameters exist (running, or succeeded and kept); returns (url, manifest)."""
        job = self.jobs.get(job_id)
        if job.state not in (RUNNING, SUCCEEDED) or job.params_freed:
            raise FailedPrecondition(f"checkpoint job '{job_id}': it is {job.state}"
                                     + (" and its parameters were freed" if job.params_freed else "")
                                     + ": only a running job, or a succeeded one whose parameters are kept, has "
                                       "parameters to write")
        with self._lock:
            if job_id in self._busy:
                raise FailedPrecondition(f"checkpoint job '{job_id}': a checkpoint of it is being written now")
            self._busy.add(job_id)
        try:
            url = url or self.url_for(job)
            epoch = job.finished  # what a job resumed from it starts after: the epochs finished in order
            t0 = time.monotonic()
            manifest = checkpoint.take(self._client(), job_id, url, {
                "job_id": job.job_id, "name": job.name, "owner": job.owner, "spec_json": job.spec_json, "prep": job.prep,
                "params": job.params, "epoch": epoch, "steps": job.metrics["steps"],
                "samples": job.metrics["samples"]})
            self.jobs.checkpointed(job_id, url, epoch, self.clock())
            self.saved()
            log.info("job %s: checkpoint of epoch %d written to %s (%d bytes, %.2f s)", job_id, epoch, url,
                     manifest["bytes"], time.monotonic() - t0)
            return url, manifest
        finally:
            with self._lock:
                self._busy.discard(job_id)

    def due(self, now: float) -> list[Job]:
        """Running jobs whose spec asks for a checkpoint now."""
        out = []
        with self.jobs.changed:
            for job in self.jobs.jobs.values():
                if job.state != RUNNING or job.job_id in self._busy:
                    continue
                spec = json.loads(job.spec_json)
                every_s, every_epochs = spec.get("checkpoint_every_s", 0), spec.get("checkpoint_every_epochs", 0)
                since = job.checkpointed_at or job.started_at
                if (every_s and now - since >= every_s) or \
                        (every_epochs and job.finished - job.checkpoint_epoch >= every_epochs):
                    out.append(job)
        return out

    def run(self, stop: threading.Event) -> None:
        """Periodic checkpoints; a failed one is a warning on the job, not a failure of it."""
        while not stop.wait(0.5):
            for job in self.due(self.clock()):
                try:
                    self.take(job.job_id)
                except PSError as e:
                    log.warning("job %s: periodic checkpoint failed: %s", job.job_id, e)
                    # counted as an attempt (the next is due a period later), with the reason for followers
                    self.jobs.checkpointed(job.job_id, "", job.finished, self.clock(), error=str(e))
