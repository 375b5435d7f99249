"""Consistency models: "asp" (no waiting), "ssp" (bounded staleness) and "bsp" (one update per step
from every worker's gradient): the clocks' state machine alone, then jobs on real clusters."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import ps
from ps.demo import demo_spec
from ps.errors import FailedPrecondition, InvalidArgument
from ps.scheduler.clocks import Clocks
from ps.spec import JobSpec, SpecError, accumulator
from ps.v1 import scheduler_pb2

from conftest import task_batches, versions, wait_for, wait_for_tasks


# -- the clocks' state machine -------------------------------------------------------------------
def ssp(staleness: int, members=("t0", "t1")) -> Clocks:
    c = Clocks()
    for i, t in enumerate(members):
        c.join("job-1", 0, t, f"w{i}", "ssp", staleness, now=0.0, expected=len(members))
    return c


def test_ssp_lets_a_member_run_at_most_s_clocks_ahead_of_the_slowest():
    c = ssp(2)
    for steps in (1, 2):
        d = c.tick("t0", steps, 1.0)
        assert d.proceed and d.staleness == steps
    d = c.tick("t0", 3, 1.0)
    assert not d.proceed and d.waiting_for == "t1 on w1 at clock 0"
    assert c.tick("t1", 1, 1.0).proceed
    d = c.tick("t0", 3, 1.0)  # asked again: the slowest is at 1 now
    assert d.proceed and d.staleness == 2 and d.observed == [2]


def test_ssp_with_zero_staleness_steps_in_lockstep():
    c = ssp(0)
    assert not c.tick("t0", 1, 1.0).proceed
    d = c.tick("t1", 1, 1.0)
    assert d.proceed and d.staleness == 0
    assert c.tick("t0", 1, 1.0).proceed


def test_a_member_that_leaves_stops_holding_the_others_and_says_so():
    c = ssp(1)
    c.tick("t0", 1, 1.0)
    assert not c.tick("t0", 2, 1.0).proceed
    msg = c.leave("t1", "lease lease-7 of w1 expired", 2.0)
    assert msg == ("epoch 1: the staleness bound shrinks to 1 live member(s): t1 on w1 left "
                   "(lease lease-7 of w1 expired)")
    assert c.tick("t0", 2, 2.0).proceed
    assert c.leave("t0", "done", 3.0) == ""  # nobody left to tell


def bsp(members=("t0", "t1"), expected=None, grace=10.0) -> Clocks:
    c = Clocks()
    for i, t in enumerate(members):
        c.join("job-1", 0, t, f"w{i}", "bsp", 0, now=0.0, expected=expected or len(members), grace=grace)
    return c


def test_bsp_the_last_to_arrive_leads_and_the_others_wait_until_it_applied():
    c = bsp()
    d = c.tick("t0", 1, 1.0)
    assert not d.proceed and not d.lead and d.waiting_for == "t1 on w1 to push its gradient"
    d = c.tick("t1", 1, 1.0)
    assert d.lead and d.step == 0 and d.contributors == 2
    d = c.tick("t0", 1, 1.5)  # polling again: still waiting, now for the leader
    assert not d.proceed and d.waiting_for == "t1 on w1 to apply step 0"
    d = c.tick("t1", 1, 2.0, applied=True)
    assert d.proceed and d.fast  # every task of the epoch is a member from its start: they may step alone
    assert c.tick("t0", 1, 2.0).proceed  # the step it waited on is applied
    assert c.tick("t1", 1, 2.0, applied=True).proceed  # a leader's report again (lost answer): same answer
    with pytest.raises(FailedPrecondition, match="does not lead"):
        c.tick("t0", 2, 2.0, applied=True)


def test_bsp_a_leader_that_leaves_hands_its_step_to_a_member_that_arrived():
    c = bsp(("t0", "t1", "t2"))
    c.tick("t0", 1, 1.0)
    c.tick("t1", 1, 1.0)
    assert c.tick("t2", 1, 1.0).lead
    msg = c.leave("t2", "lease lease-3 of w2 expired", 5.0)
    assert "the barrier shrinks to 2 live member(s): t2 on w2 left" in msg
    d = c.tick("t0", 1, 5.0)
    assert d.lead and d.contributors == 3  # t2's gradient is in the accumulator: it counts
    assert not c.tick("t1", 1, 5.0).proceed


def test_bsp_members_step_on_the_servers_while_the_clock_is_steady_and_it_catches_up_when_one_falls_back():
    """``fast`` while every task of the epoch is a member since its start and none left but done. A member
    that comes back to the clock says which steps it saw applied on the servers; the clock catches up."""
    c = bsp(("t0", "t1"))
    for t in ("t0", "t1"):
        c.tick(t, 1, 1.0)
    assert c.tick("t1", 1, 1.0, applied=True).fast and c.tick("t0", 1, 1.0).fast
    # steps 1 to 6 applied on the servers; t0 misses t1 at step 7 and comes back here
    d = c.tick("t0", 8, 2.0, closed_step=7)
    assert c.clocks[("job-1", 0)].step == 7 and d.waiting_for == "t1 on w1 to push its gradient"
    assert c.transitions[-1].reason == "steps 1 to 6 on the servers (reported by t0)"
    d = c.tick("t1", 8, 2.5, closed_step=7)  # t1 comes too: the barrier is whole, the last to arrive leads
    assert d.lead and d.step == 7 and d.contributors == 2
    assert c.tick("t1", 8, 2.6, applied=True).proceed
    # a member that waited here at step 7 while the other closed it on the servers is let go by its report
    c.tick("t0", 9, 3.0, closed_step=8)
    assert not c.tick("t0", 9, 3.0).proceed
    assert c.tick("t1", 10, 3.5, closed_step=9).waiting_for == "t0 on w0 to push its gradient"
    assert c.tick("t0", 9, 3.5).proceed  # step 8, its own, is behind the clock now
    with pytest.raises(InvalidArgument, match="closed_step 999999999999 is not a step of this clock"):
        c.tick("t0", 10, 4.0, closed_step=999_999_999_999)
    # a member that leaves but done, or joins after the first step, ends the steady run for the epoch
    c.leave("t1", "lease lease-2 of w1 expired", 5.0)
    assert not c.tick("t0", 10, 5.0).fast
    late = bsp(("t0",), expected=2)
    late.tick("t0", 1, 1.0, workers=1)
    late.tick("t0", 1, 1.0, applied=True)
    late.join("job-1", 0, "t1", "w1", "bsp", 0, now=2.0, expected=2)
    assert not late.tick("t1", 1, 2.0).fast


def test_bsp_waits_for_the_epochs_tasks_to_be_leased_then_goes_on_without_them():
    c = bsp(("t0",), expected=2, grace=10.0)
    d = c.tick("t0", 1, 1.0, workers=2)
    assert not d.lead and d.waiting_for.startswith("1 more train task(s) of epoch 1 to be leased")
    assert c.tick("t0", 1, 11.0, workers=2).lead  # after the grace: alone


def test_bsp_does_not_wait_for_tasks_no_live_worker_can_lease():
    c = bsp(("t0",), expected=2, grace=10.0)
    assert c.tick("t0", 1, 1.0, workers=1).lead


def test_after_a_scheduler_restart_steps_are_new_ids_and_a_report_of_a_step_applied_before_is_an_arrival():
    """Clocks are not saved. A restarted scheduler's bsp steps start above its previous incarnation's (the
    servers apply each step's update once per id: an id used before would be skipped as a retry), and a
    running task's report of a step applied before the restart arrives at the rebuilt clock's step."""
    from ps.scheduler.clocks import STEPS_PER_INCARNATION
    from ps.scheduler.jobs import Jobs
    jobs = Jobs()
    job = jobs.submit("j", '{"consistency": "bsp"}', {"shards": 2}, epochs=1, lease_timeout=10.0, now=0.0)
    jobs.mark_starting(job.job_id, 0.0)
    jobs.start(job.job_id, 0.0)
    a, _ = jobs.lease("w0", 1.0)
    b, _ = jobs.lease("w1", 1.0)
    jobs.clocks = Clocks(jobs.transitions)           # what a restart leaves: no clocks ...
    jobs.clocks.first_step = 2 * STEPS_PER_INCARNATION  # ... under incarnation 2
    d = jobs.clock(a.task_id, a.lease_id, 5, 20.0, applied=True)  # it led step 4 before the restart
    assert not d.proceed and not d.lead and d.waiting_for.startswith("1 more train task(s) of epoch 1")
    d = jobs.clock(b.task_id, b.lease_id, 5, 20.0)   # waiting for step 4 to be applied, it arrives again
    assert d.lead and d.step == 2 * STEPS_PER_INCARNATION and d.contributors == 2
    assert jobs.clock(b.task_id, b.lease_id, 5, 21.0, applied=True).proceed
    assert jobs.clock(a.task_id, a.lease_id, 5, 21.0).proceed


def test_after_a_scheduler_restart_an_ssp_task_counts_its_steps_from_zero():
    c = Clocks()
    c.join("job-1", 0, "t0", "w0", "ssp", 1, now=0.0, expected=2, rejoin=True)
    assert c.tick("t0", 7, 1.0).step == 7
    c.join("job-1", 0, "t1", "w1", "ssp", 1, now=1.0, expected=2, rejoin=True)  # from 0, not t0's clock 7
    assert c.tick("t1", 6, 1.0).step == 6
    assert c.tick("t0", 7, 1.0).proceed              # 7 <= 6 + 1
    d = c.tick("t0", 9, 2.0)
    assert not d.proceed and d.waiting_for == "t1 on w1 at clock 6"


def test_clock_of_a_task_that_is_not_a_member_is_refused():
    with pytest.raises(FailedPrecondition, match="not a member of a clock"):
        Clocks().tick("job-1/train-0-0", 1, 0.0)


# -- the spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"consistency": "sync"}, "spec.consistency: 'sync' is not supported (supported: asp, ssp, bsp)"),
    ({"consistency": "ssp", "staleness": -1}, "spec.staleness: expected an integer in [0, 1000], got -1"),
    ({"consistency": "bsp", "workers": 2, "data": {"shards": 4}},
     "spec.data.shards: a bsp job gives each of its 2 workers one fixed shard per epoch: expected 0 or 2, got 4"),
    ({"dtype": "float16"}, "spec.dtype: expected one of float32, float64, got 'float16'"),
])
def test_bad_consistency_settings_name_the_field(change, message):
    d = demo_spec("mlp").to_dict()
    d.update(change)
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(d)
    assert str(e.value) == message


# -- jobs on a cluster ---------------------------------------------------------------------------
def spec_for(mode: str, **kw) -> ps.JobSpec:
    spec = demo_spec("mlp", epochs=kw.pop("epochs", 3))
    spec.consistency = mode
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def bsp_reference(spec: ps.JobSpec, workers: int) -> tuple[dict[str, np.ndarray], int, int]:
    """A single process that, each step, averages the W workers' batch gradients (each worker on
    its fixed shard, in the order a worker draws its batches) and applies the optimizer once.
    Returns the parameters, the steps and the gradients computed (the workers' batches)."""
    from ps.server.optimizers import make_optimizer
    from ps.trained import scale
    from ps.worker.inspect import build_model, load_data, prepare
    from ps.worker.preprocess import batches, shard_ranges, train_test_split
    prep = prepare(spec)
    ds = load_data(spec)
    model = build_model(spec, tuple(prep["input_shape"]))
    train_idx, _ = train_test_split(len(ds.x), spec.data.test_fraction, spec.seed)
    x, y = scale(prep, ds.x)[train_idx], ds.y.astype(np.int64)[train_idx]
    params = model.init_params(spec.seed, np.float64)
    opt = make_optimizer(dict(spec.optimizer))
    state = {k: opt.init_state(v.size, v.dtype) for k, v in params.items()}
    step = batches_done = 0
    for epoch in range(spec.epochs):
        per_worker = []
        for shard, (lo, hi) in enumerate(shard_ranges(len(x), workers)):
            seed = spec.seed * 1_000_003 + shard
            per_worker.append([(lo + idx, seed + 7919 * (epoch + 1) + i)
                               for i, idx in enumerate(batches(hi - lo, spec.batch_size, seed, epoch))])
        for i in range(max(len(b) for b in per_worker)):
            grads = [model.loss_and_grads(np, params, x[rows], y[rows], spec.loss, train=True, rng_seed=rs)[1]
                     for b in per_worker if i < len(b) for rows, rs in [b[i]]]
            step += 1
            batches_done += len(grads)
            for k in params:
                mean = sum(g[k] for g in grads) / len(grads)
                opt.apply(params[k].reshape(-1), np.ascontiguousarray(mean).reshape(-1), state[k], step)
    return params, step, batches_done


def test_bsp_equals_one_process_averaging_the_workers_gradients_each_step():
    spec = spec_for("bsp", epochs=2, dtype="float64", eval_every=2)
    with ps.LocalCluster(servers=2, workers=2) as cluster, ps.Client(cluster.address) as client:
        job = client.submit(spec)
        trained = job.wait(progress=False, timeout=300)
        m = job.info().metrics
        epochs = [e.message for e in job.events() if e.kind == "epoch"]
        assert epochs == ["epoch 1/2: trained (evaluated every 2 epochs)",
                          f"epoch 2/2: test accuracy {m.test_accuracy:.4f}"]
        # The accumulator is left empty after every step.
        acc = client.model(accumulator(job.job_id)).pull()
        assert all(not v.any() for v in acc.values())
        updates = versions(client, job.job_id)
        # Each epoch's first step (and a shard's extra batch) went through the scheduler's clock; every
        # other step the servers applied when the second worker's gradient came, with no scheduler call.
        member_steps = max(s.member_steps for s in client.model(accumulator(job.job_id)).stats())
        batches = task_batches(job.info(), spec.batch_size)
    ref, steps, gradients = bsp_reference(spec, workers=2)
    assert member_steps == spec.epochs * (min(batches) - 1) > 0
    # One update per step: the servers' version is the number of steps, every slice alike, and each
    # gradient was computed on weights holding every earlier step's update (staleness 0, counted once each).
    assert m.steps == steps and updates == {steps}
    assert list(m.staleness_updates) == [gradients] and list(m.staleness_clocks) == [gradients]
    for k, v in ref.items():
        assert trained.weights[k].dtype == np.float64
        np.testing.assert_allclose(trained.weights[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("staleness", [0, 1])
def test_ssp_never_lets_a_worker_run_more_than_s_clocks_ahead_even_of_a_stopped_one(staleness):
    spec = spec_for("ssp", epochs=6, staleness=staleness)
    with ps.LocalCluster(servers=2, workers=2) as cluster, ps.Client(cluster.address) as client:
        job = client.submit(spec)
        wait_for_tasks(job, 2)
        slow = cluster.workers[0].popen.pid
        os.kill(slow, signal.SIGSTOP)  # a worker that stops for a second: the other must wait for it
        try:
            time.sleep(1.0)  # how long it is stopped (the fault itself, not a wait for a condition)
        finally:
            os.kill(slow, signal.SIGCONT)
        trained = job.wait(progress=False, timeout=300)
        m = job.info().metrics
        assert job.status() == "succeeded"
        assert trained.metrics["test_accuracy"] >= 0.9
        # Every step was counted once in each histogram; none ran more than s clocks ahead.
        assert sum(m.staleness_clocks) == m.steps == sum(m.staleness_updates)
        assert len(m.staleness_clocks) == staleness + 1 and m.staleness_clocks[staleness] > 0
        # Each gradient was computed on weights holding every step of the other worker's that the bound
        # requires (its clock - s), and the other runs at most s + 1 steps past this one's clock meanwhile:
        # between those weights and its own update at most 2s + 1 of its steps were applied. One step more
        # means the weights missed a step the bound requires.
        assert len(m.staleness_updates) <= 2 * staleness + 2, list(m.staleness_updates)
        assert versions(client, job.job_id) == {m.steps}


def test_asp_reports_the_staleness_it_saw_and_counts_every_push(tmp_path):
    from ps.histogram import summary
    from ps.tblog import read_scalars
    spec = spec_for("asp", epochs=3)
    with ps.LocalCluster(servers=2, workers=2) as cluster, ps.Client(cluster.address) as client:
        job = client.submit(spec)
        job.wait(progress=False, timeout=300, logdir=str(tmp_path))
        m = job.info().metrics
        # TensorBoard: the histogram's mean and max per epoch, the last epoch's from the job's final counts
        tb = read_scalars(tmp_path / job.job_id)
        mean, top = summary(m.staleness_updates)
        assert [s for s, _ in tb["staleness/updates/max"]] == [1, 2, 3]
        assert tb["staleness/updates/max"][-1][1] == top
        assert tb["staleness/updates/mean"][-1][1] == pytest.approx(mean, rel=1e-6)
        assert sum(m.staleness_updates) == m.steps and len(m.staleness_clocks) == 0
        # the overlap of compute and push_pull: every gradient misses at least its worker's previous push
        assert m.staleness_updates[0] < m.steps
        assert versions(client, job.job_id) == {m.steps}


def test_bsp_goes_on_without_a_worker_that_died_and_says_so():
    spec = spec_for("bsp", epochs=8, lease_timeout_s=3.0)
    with ps.LocalCluster(servers=2, workers=2) as cluster, ps.Client(cluster.address) as client:
        job = client.submit(spec)
        victim = cluster.workers[0]
        wait_for(lambda: "task job-1/train-1-" in victim.log.read_text(), 120, what="a train task of epoch 2")
        victim.kill()  # a member of epoch 2's barrier dies
        job.wait(progress=False, timeout=300)
        assert job.status() == "succeeded"
        messages = [e.message for e in job.events()]
        assert any("the barrier shrinks to 1 live member(s)" in msg and "expired" in msg for msg in messages), \
            messages
        info = job.info()
        applied = versions(client, job.job_id)
    # One update a step: every step a finished task led was applied once, plus at most those the dead
    # worker led in the task it never finished (its shard ran again on the other worker).
    batches = max(task_batches(info, spec.batch_size))
    assert info.tasks_done == info.tasks_total and len(applied) == 1
    assert info.metrics.steps <= min(applied) <= info.metrics.steps + batches, (info.metrics.steps, applied)


def test_a_bsp_worker_held_up_past_its_lease_is_dropped_and_its_late_gradient_does_not_count():
    """A worker stopped (SIGSTOP) until its lease expires: the barrier goes on without it; when it runs
    again its gradient, tagged with a step already applied, is refused, and its task is dropped."""
    spec = spec_for("bsp", epochs=8, lease_timeout_s=2.0)
    with ps.LocalCluster(servers=2, workers=2) as cluster, ps.Client(cluster.address) as client:
        job = client.submit(spec)
        victim = cluster.workers[0]
        wait_for(lambda: "task job-1/train-1-" in victim.log.read_text(), 120, what="a train task of epoch 2")
        os.kill(victim.popen.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: any("the barrier shrinks to 1 live member(s)" in e.message for e in job.events()),
                     60, what="the stopped worker's lease to expire")
        finally:
            os.kill(victim.popen.pid, signal.SIGCONT)
        job.wait(progress=False, timeout=300)
        info = job.info()
        applied = versions(client, job.job_id)
        # it drops the task at its next word with the clock; or, stopped in its task's last step (which the
        # servers applied: stepping there, it asks the clock only every quarter lease), its result is refused
        wait_for(lambda: any(s in victim.log.read_text() for s in (" abandoned: its lease ended",
                                                                    "(result dropped: lease expired")), 60,
                 what="the stopped worker to drop its task")
    assert (info.state, info.tasks_done) == ("succeeded", info.tasks_total), info.error
    batches = max(task_batches(info, spec.batch_size))
    assert len(applied) == 1 and info.metrics.steps <= min(applied) <= info.metrics.steps + batches, \
        (applied, info.metrics.steps, batches)


def test_a_bsp_worker_stopped_briefly_makes_the_other_fall_back_to_the_clock_and_every_step_counts_once():
    """Steps on the servers: a worker stopped (SIGSTOP) for longer than a step waits on the servers but
    less than its lease. The other one stops waiting, falls back to the clock (and watches the servers in
    turn); the stopped one comes back, and the job goes on with every step applied once, counted once."""
    from ps.bench import train_spec
    spec = train_spec(3)
    spec.consistency, spec.batch_size, spec.lease_timeout_s = "bsp", 256, 8.0  # a step waits 4 s on the servers
    with ps.LocalCluster(servers=2, workers=2, scheduler_args=["--server-timeout", "12"]) as cluster, \
            ps.Client(cluster.address) as client:
        job = client.submit(spec)

        def member_steps():
            try:
                return max((s.member_steps for s in client.model(accumulator(job.job_id)).stats()), default=0)
            except ps.errors.NotFound:  # not created yet
                return 0
        wait_for(lambda: member_steps() >= 3, 120, what="the workers to step on the servers")
        victim, other = cluster.workers
        os.kill(victim.popen.pid, signal.SIGSTOP)
        try:
            time.sleep(6.0)  # how long it is stopped (the fault itself): more than the 4 s wait, less than the lease
        finally:
            os.kill(victim.popen.pid, signal.SIGCONT)
        trained = job.wait(progress=False, timeout=300)
        info = job.info()
        applied = versions(client, job.job_id)
        fast = member_steps()
        batches = task_batches(info, spec.batch_size)
        log = other.log.read_text()
    assert info.state == "succeeded" and info.tasks_done == info.tasks_total
    assert "was not applied on the servers within 4.0 s (a member is missing)" in log
    assert applied == {info.metrics.steps} and info.metrics.steps == spec.epochs * max(batches)
    assert info.metrics.duplicates == 0  # no reply was lost: asking about a step again is not a retry
    # each epoch's first step at the clock; the others on the servers (the one that fell back carried along)
    assert 3 <= fast <= spec.epochs * (min(batches) - 1)
    assert trained.metrics["test_accuracy"] > 0.5


def test_a_clock_call_without_a_lease_is_refused_and_changes_nothing():
    with ps.LocalCluster(servers=1, workers=0) as cluster, ps.Client(cluster.address) as client:
        import grpc
        with pytest.raises(grpc.RpcError) as e:
            client.scheduler.Clock(scheduler_pb2.ClockRequest(worker_id="w", task_id="job-9/train-0-0",
                                                              lease_id="lease-1", steps=1), timeout=10)
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert e.value.details() == "clock of job-9/train-0-0: lease lease-1 is not held (it expired or the job ended)"
        with pytest.raises(grpc.RpcError) as e:
            client.scheduler.Clock(scheduler_pb2.ClockRequest(worker_id="w", task_id="t", lease_id="l", steps=-1),
                                   timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "clock of t: steps must be >= 0, got -1"
        assert client.jobs() == []
