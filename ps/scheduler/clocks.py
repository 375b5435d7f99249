"""Consistency clocks: how far ahead of the slowest worker a worker of an "ssp" or "bsp" job may run, as
a pure state machine (no sockets; every event carries ``now``), in the style of ``ps.scheduler.jobs``.

A job's train tasks of one epoch are the *members* of that epoch's clock. A member joins when its task
is leased and leaves when the task is done, its lease expires or the job ends; every join and leave is
recorded with its reason in ``transitions``, and a leave that others were waiting on is returned as a
message for the job's events ("the barrier shrinks to 1 live member: ...").

SSP (staleness s): a member reports its clock c (training steps it has finished in this task, plus the
clock the epoch was at when it joined) and may start its next step while c <= min(live clocks) + s.
The staleness recorded when it proceeds is c - min(live clocks), so it never exceeds s; s = 0 makes the
members step in lockstep.

BSP: each step, every live member first adds its gradient to the job's accumulator (a model on the
servers that sums what is pushed to it) and then *arrives* at the barrier. When every live member has
arrived, the last one to arrive is the step's *leader*: it has each server apply the mean of the
gradients accumulated there to the job's parameters and clear them (ApplyAccumulated; once: the
update's id is the step number, so a leader that takes over from one that died cannot apply it
twice) and reports the step *applied*; then every member proceeds and pulls the new weights. A
leader that leaves before reporting hands the step to another waiting member. ``contributors`` is the
number of members that arrived this step, live or not (the servers average over the gradients tagged
with the step that reached them, and refuse one that comes after the step was applied).

A bsp clock is *steady* while every train task of its epoch is a member that joined before its first
step was applied, and none left but done: then a decision says ``fast``, and the members may step on
the servers alone (ps-lite's synchronous mode: each pushes its gradient and calls ApplyAccumulated with
``members``; the servers apply the step once all gradients are summed), with no call here. A member
that falls back here (a member is missing, or its shard has batches the others do not) reports
``closed_step``, the step after the last one it saw applied, and the clock catches up to it first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ps.errors import FailedPrecondition, InvalidArgument
from ps.scheduler.transitions import TransitionLog

MODES = ("ssp", "bsp")
#: bsp steps one scheduler incarnation's clock may take in an epoch (ids of its steps' updates stay
#: below the next incarnation's: see Clocks.first_step)
STEPS_PER_INCARNATION = 1 << 24


@dataclass
class Member:
    task_id: str
    worker_id: str
    base: int = 0          # the epoch's clock when it joined: its clock is base + steps reported
    clock: int = 0
    arrived: int = -1      # bsp: the barrier step it last arrived at ...
    pushed: int = -1       # ... and its steps then (asked again with those, it is told about that step)


@dataclass
class Decision:
    """What a member that reported its clock does now."""

    proceed: bool = False
    lead: bool = False      # bsp: apply this step's accumulated gradients, then report applied
    step: int = 0           # bsp: the barrier step (the id of the leader's push); ssp: the member's clock
    contributors: int = 0   # bsp: gradients in the accumulator this step
    members: int = 0        # live members now
    waiting_for: str = ""   # who holds it back: "job-1/train-0-1 on worker-2 at clock 4"
    staleness: int = 0      # clocks ahead of the slowest live member when it proceeded
    observed: list[int] = field(default_factory=list)  # staleness to count in the job's histogram
    fast: bool = False      # bsp: the clock is steady and complete: the members may step on the servers alone


@dataclass
class Clock:
    """One job's clock for one epoch."""

    job_id: str
    epoch: int
    mode: str
    staleness: int
    members: dict[str, Member] = field(default_factory=dict)
    step: int = 0                  # bsp: the barrier step now being gathered
    arrived: set[str] = field(default_factory=set)   # bsp: who pushed this step (may include members gone)
    leader: str = ""               # bsp: who applies this step ("": none chosen yet)
    expected: int = 0              # bsp: the epoch's train tasks ...
    finished: int = 0              # ... those done ...
    full_by: float = 0.0           # ... and until when a step waits for the ones not leased yet
    first: int = 0                 # bsp: the step it started at
    steady: bool = True            # bsp: no member left but done, none joined after the first step

    def min_clock(self) -> int:
        return min((m.clock for m in self.members.values()), default=0)

    def slowest(self) -> Member | None:
        return min(self.members.values(), key=lambda m: (m.clock, m.task_id), default=None)


def _describe(m: Member, clock: bool = True) -> str:
    return f"{m.task_id} on {m.worker_id}" + (f" at clock {m.clock}" if clock else "")


class Clocks:
    """Every ssp/bsp job's clocks, by (job id, epoch). Not thread-safe: the caller holds its lock."""

    def __init__(self, transitions: TransitionLog | None = None):
        self.clocks: dict[tuple[str, int], Clock] = {}
        self.by_task: dict[str, tuple[str, int]] = {}
        self.transitions = transitions if transitions is not None else TransitionLog()
        #: where a new bsp clock's steps start. A step is the id under which its leader's update is applied
        #: once; clocks are not saved, so a restarted scheduler starts above any step its previous
        #: incarnation could have reached (``STEPS_PER_INCARNATION`` times its incarnation)
        self.first_step = 0

    def join(self, job_id: str, epoch: int, task_id: str, worker_id: str, mode: str, staleness: int,
             now: float, expected: int = 1, grace: float = 0.0, rejoin: bool = False) -> None:
        """A train task of a ssp/bsp job was leased: it counts from now on. ``expected``: the epoch's
        train tasks; a bsp step waits up to ``grace`` seconds from the epoch's first join for all of them
        to be leased (so W idle workers start an epoch together), then goes on with those that are.
        ``rejoin``: a task running since before a scheduler restart (its steps so far count from 0,
        which can only make it look slower than it is: nobody runs further ahead for it)."""
        if mode not in MODES:
            raise InvalidArgument(f"consistency '{mode}' has no clock (expected one of {', '.join(MODES)})")
        key = (job_id, epoch)
        c = self.clocks.get(key)
        if c is None:
            for old in [k for k in self.clocks if k[0] == job_id and k[1] < epoch]:
                self._drop(old)  # an earlier epoch's clock whose last tasks are done or gone
            step = self.first_step if mode == "bsp" else 0
            c = self.clocks[key] = Clock(job_id, epoch, mode, staleness, expected=expected, full_by=now + grace,
                                         step=step, first=step)
        base = c.min_clock() if c.members and not rejoin else 0
        if mode == "bsp":
            base = c.step
            if rejoin or c.step != c.first:  # its batches no longer line up with the others'
                c.steady = False
        c.members[task_id] = Member(task_id, worker_id, base, base)
        self.by_task[task_id] = key
        self.transitions.record(now, f"{job_id}/clock-{epoch}", "join",
                                f"{task_id} on {worker_id} at clock {base}: {len(c.members)} live member(s)")

    def leave(self, task_id: str, reason: str, now: float) -> str:
        """A member's task ended (done, lease expired, worker gone, job ended). Returns a message for the
        job's events when members are still running (the barrier or bound shrinks), else ""."""
        key = self.by_task.pop(task_id, None)
        if key is None:
            return ""
        c = self.clocks[key]
        m = c.members.pop(task_id)
        self.transitions.record(now, f"{c.job_id}/clock-{c.epoch}", "leave",
                                f"{task_id} on {m.worker_id} ({reason}): {len(c.members)} live member(s)")
        if reason == "done":
            c.finished += 1
        else:
            c.full_by = now  # its task waits for a worker again: the others need not wait for it
            c.steady = False
        if not c.members:
            if c.finished >= c.expected:
                del self.clocks[key]
            return ""
        if c.leader == task_id:
            c.leader = ""  # another member that arrived takes the step over when it asks next
        if reason == "done":
            return ""
        what = "barrier" if c.mode == "bsp" else "staleness bound"
        return (f"epoch {c.epoch + 1}: the {what} shrinks to {len(c.members)} live member(s): {task_id} on "
                f"{m.worker_id} left ({reason})")

    def drop_job(self, job_id: str) -> None:
        for key in [k for k in self.clocks if k[0] == job_id]:
            self._drop(key)

    def _drop(self, key: tuple[str, int]) -> None:
        for t in self.clocks.pop(key).members:
            self.by_task.pop(t, None)

    def _member(self, task_id: str) -> tuple[Clock, Member]:
        key = self.by_task.get(task_id)
        if key is None:
            raise FailedPrecondition(f"task {task_id} is not a member of a clock (its lease ended or its "
                                     f"job does not use ssp/bsp)")
        c = self.clocks[key]
        return c, c.members[task_id]

    def tick(self, task_id: str, steps: int, now: float, applied: bool = False, workers: int = 0,
             closed_step: int = 0) -> Decision:
        """A member reports ``steps`` done in its task (ssp), or that it pushed its gradient of its
        ``steps``-th step to the accumulator (bsp; ``applied``: as leader, that it applied the step;
        ``closed_step``: every step below it was applied, as the member saw on the servers).
        Asked again with the same ``steps`` while it waits, it gets the same answer or a newer one.
        ``workers``: live workers in the cluster (a bsp step waits for unleased tasks only while there are
        workers that could lease them; 0: unknown)."""
        if steps < 0:
            raise InvalidArgument(f"clock of {task_id}: steps must be >= 0, got {steps}")
        c, m = self._member(task_id)
        if c.mode == "ssp":
            return self._ssp(c, m, steps)
        if closed_step > c.step:
            self._catch_up(c, m, closed_step, now)
        return self._bsp(c, m, steps, applied, now, workers)

    def _catch_up(self, c: Clock, m: Member, closed_step: int, now: float) -> None:
        """The members stepped on the servers without the clock, up to ``closed_step``: take it there."""
        if closed_step - c.step > STEPS_PER_INCARNATION:
            raise InvalidArgument(f"clock of {m.task_id}: closed_step {closed_step} is not a step of this clock "
                                  f"(at {c.step})")
        self.transitions.record(now, f"{c.job_id}/clock-{c.epoch}", "applied",
                                f"steps {c.step} to {closed_step - 1} on the servers (reported by {m.task_id})")
        c.step = closed_step
        c.arrived = set()
        c.leader = ""

    def _ssp(self, c: Clock, m: Member, steps: int) -> Decision:
        m.clock = m.base + steps
        low = c.min_clock()
        d = Decision(step=m.clock, members=len(c.members))
        if m.clock <= low + c.staleness:
            d.proceed, d.staleness = True, m.clock - low
            d.observed = [d.staleness]
        else:
            d.waiting_for = _describe(c.slowest())
        return d

    def _bsp(self, c: Clock, m: Member, steps: int, applied: bool, now: float, workers: int) -> Decision:
        d = Decision(members=len(c.members), fast=c.steady and len(c.members) == c.expected)
        if applied and m.arrived < c.step and steps == m.pushed:  # its report again (a lost answer)
            d.proceed, d.step = True, m.arrived
            return d
        if applied:
            if c.leader != m.task_id or m.arrived != c.step:
                raise FailedPrecondition(f"{m.task_id} reported barrier step {c.step} applied, but it does not "
                                         f"lead that step" + (f" ({c.leader} does)" if c.leader else ""))
            self.transitions.record(now, f"{c.job_id}/clock-{c.epoch}", "applied",
                                    f"step {c.step} by {m.task_id}: mean of {len(c.arrived)} gradient(s)")
            c.step += 1
            c.arrived = set()
            c.leader = ""
            m.clock = c.step
            d.proceed, d.step = True, c.step - 1
            return d
        if steps > m.pushed:  # a new arrival (a poll again after waiting keeps its place)
            if m.arrived == c.step:
                raise FailedPrecondition(f"{m.task_id} reported {steps} steps pushed while barrier step {c.step} "
                                         f"still waits for its step {m.pushed + 1}")
            m.arrived, m.pushed = c.step, steps
            m.clock = m.base + steps
            c.arrived.add(m.task_id)
        elif steps < m.pushed:
            raise FailedPrecondition(f"{m.task_id} reported {steps} steps pushed after {m.pushed}")
        if m.arrived < c.step:
            d.proceed, d.step = True, m.arrived
            return d
        d.step, d.contributors = c.step, len(c.arrived)
        missing = [x for t, x in sorted(c.members.items()) if t not in c.arrived]
        if missing:
            d.waiting_for = _describe(missing[0], clock=False) + " to push its gradient"
            return d
        unleased = min(c.expected - c.finished, workers or c.expected) - len(c.members)
        if unleased > 0 and now < c.full_by:
            d.waiting_for = (f"{unleased} more train task(s) of epoch {c.epoch + 1} to be leased (at most "
                             f"{c.full_by - now:.0f} s more)")
            return d
        if not c.leader:
            c.leader = m.task_id
            self.transitions.record(now, f"{c.job_id}/clock-{c.epoch}", "lead",
                                    f"step {c.step}: {m.task_id} applies {len(c.arrived)} gradient(s)")
        if c.leader == m.task_id:
            d.lead = True
        else:
            d.waiting_for = f"{c.leader} on {c.members[c.leader].worker_id} to apply step {c.step}"
        return d
