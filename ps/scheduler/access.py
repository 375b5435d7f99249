"""What a caller may do on the scheduler beyond its role (ps.security checks that): a user acts only
on its own jobs and models, within its quotas; members and admins act on anything. Without an auth
file every caller is anonymous (None) and everything is allowed, as on a laptop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ps import security
from ps.errors import ResourceExhausted
from ps.scheduler.jobs import TERMINAL
from ps.security import QUOTAS


@dataclass(frozen=True)
class Quotas:
    """Every user's quotas unless its auth-file line sets its own; 0: no limit."""

    param_bytes: int = 0     # bytes of parameters of all its models together (one replica)
    jobs: int = 0            # jobs queued or running at once
    tasks_per_job: int = 0   # tasks one job may take (epochs x (shards + evaluation parts))

    def of(self, owner: str) -> dict[str, int]:
        """The quotas that bind ``owner`` (a user's name): {} for members, admins, and without auth."""
        auth = security.current().auth
        who = auth.named(owner) if auth is not None and owner else None
        if who is None or who.role != security.USER:
            return {}
        limits = {q: getattr(self, q) for q in QUOTAS}
        limits.update(who.quotas)
        return {q: v for q, v in limits.items() if v}


def param_bytes(tensors) -> int:
    return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in tensors)


def check_param_bytes(quotas: Quotas, owner: str, maps, model: str, tensors) -> None:
    """Planning ``model`` (``tensors``) for ``owner`` must keep its models within its param_bytes quota."""
    limit = quotas.of(owner).get("param_bytes")
    if not limit:
        return
    held = sum(param_bytes(m.tensors) for m in maps.values() if m.owner == owner and m.model != model)
    asked = param_bytes(tensors)
    if held + asked > limit:
        raise ResourceExhausted(f"plan model '{model}': over the param_bytes quota of '{owner}': {held} bytes held "
                                f"+ {asked} asked > {limit}; delete a model or ask for a larger quota")


def check_submit(quotas: Quotas, owner: str, jobs, spec) -> None:
    """A job of ``spec`` submitted by ``owner`` must fit its jobs and tasks_per_job quotas."""
    limits = quotas.of(owner)
    if limits.get("tasks_per_job"):
        # at most: the held-out split is evaluated in up to one part per worker wanted
        shards = spec.data.shards or 2 * spec.workers
        tasks = spec.epochs * (shards + spec.workers)
        if tasks > limits["tasks_per_job"]:
            raise ResourceExhausted(f"submit job: over the tasks_per_job quota of '{owner}': {spec.epochs} epochs x "
                                    f"({shards} shards + up to {spec.workers} evaluation parts) = {tasks} "
                                    f"tasks > {limits['tasks_per_job']}")
    if limits.get("jobs"):
        active = sum(1 for j in jobs if j.owner == owner and j.state not in TERMINAL)
        if active >= limits["jobs"]:
            raise ResourceExhausted(f"submit job: over the jobs quota of '{owner}': {active} jobs queued or "
                                    f"running, at most {limits['jobs']}; wait for one to end or cancel one")
