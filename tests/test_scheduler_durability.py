"""The scheduler's state survives a restart, kill -9 included: jobs, tasks, leases, events,
members, shard maps and id counters come back from its state dir, and members that registered
with another state (a scheduler started empty) register again."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import ps
from ps.demo import demo_spec
from ps.errors import Unavailable
from ps.scheduler.cluster import Cluster
from ps.scheduler.jobs import Jobs
from ps.scheduler.state import StateError, StateStore
from ps.sharding import TensorSpec
from ps.v1 import optimizer_pb2

from conftest import versions, wait_for

PREP = {"shards": 3, "n_train": 300}


def _task_view(job):
    return {tid: (t.kind, t.epoch, t.shard, t.state, t.lease_id, t.worker_id, t.attempts, t.rank)
            for tid, t in job.tasks.items()}


def _event_view(job):
    return [(e.seq, e.kind, e.state, e.message, e.tasks_done, e.tasks_total) for e in job.events]


def _reopen(path, now: float, max_events: int = 1000) -> tuple[StateStore, Jobs, Cluster]:
    store = StateStore(path)
    jobs, cluster = Jobs(max_events=max_events), Cluster()
    store.load(jobs, cluster, now)
    return store, jobs, cluster


def test_jobs_round_trip_with_every_task_state_and_their_counters_continue(tmp_path):
    store, jobs, cluster = _reopen(tmp_path, now=0.0)
    done = jobs.submit("done", '{"n": 1}', PREP, epochs=1, lease_timeout=10.0, now=0.0, request_id="req-done")
    jobs.mark_starting(done.job_id, 0.5)
    jobs.start(done.job_id, 1.0)
    while (leased := jobs.lease("w0", 1.5)) is not None:
        t, _ = leased
        assert jobs.complete(t.task_id, t.lease_id, 2.0, samples=100, steps=4, loss_sum=50.0, correct=90)
    assert done.state == "succeeded"
    cancelled = jobs.submit("cancelled", '{"n": 2}', PREP, epochs=2, lease_timeout=10.0, now=2.5)
    jobs.mark_starting(cancelled.job_id, 2.5)
    jobs.start(cancelled.job_id, 2.5)
    held, _ = jobs.lease("w4", 2.5)
    jobs.cancel(cancelled.job_id, 2.5)                    # w4 has not yet heard of the cancel
    running = jobs.submit("running", '{"n": 3}', PREP, epochs=3, lease_timeout=10.0, now=3.0)
    jobs.mark_starting(running.job_id, 3.0)
    jobs.start(running.job_id, 3.5)
    a, _ = jobs.lease("w1", 4.0)                       # done
    b, _ = jobs.lease("w2", 4.0)                       # leased, expires, back at the queue's front
    c, _ = jobs.lease("w3", 4.0)                       # still leased at the restart
    assert jobs.complete(a.task_id, a.lease_id, 5.0, samples=100, steps=4, loss_sum=30.0, staleness=[1, 2, 1])
    jobs.extend("w3", now=14.0)
    assert [t.task_id for t in jobs.expire(now=15.0)] == [b.task_id]
    inspecting = jobs.submit("inspecting", '{"n": 4}', None, epochs=2, lease_timeout=10.0, now=16.0)
    starting = jobs.submit("starting", '{"n": 5}', PREP, epochs=2, lease_timeout=10.0, now=16.0)
    jobs.mark_starting(starting.job_id, 16.5)            # killed while its parameters were being created
    queue_before = [tid for tid in jobs.queue if (j := jobs.jobs.get(tid.split("/")[0])) and
                    j.tasks.get(tid) is not None and j.tasks[tid].state == "pending"]
    before = {j.job_id: (j.state, j.error, _task_view(j), _event_view(j), j.tasks_done, j.queued_epochs, j.finished)
              for j in jobs.jobs.values()}
    metrics = {j.job_id: dict(j.metrics) for j in jobs.jobs.values()}
    jobs.flush(store, now=19.0)
    store.close()

    store, again, _ = _reopen(tmp_path, now=1000.0)       # another process: another monotonic clock
    assert store.incarnation == 2
    for job_id, (state, error, tasks, events, tasks_done, queued, finished) in before.items():
        job = again.jobs[job_id]
        if job_id != starting.job_id:
            assert (job.state, job.error, _task_view(job), job.tasks_done, job.queued_epochs, job.finished) == \
                   (state, error, tasks, tasks_done, queued, finished), job_id
        assert _event_view(job)[:len(events)] == events, job_id
        numbers = {k: v for k, v in job.metrics.items() if not isinstance(v, list)}
        assert numbers == pytest.approx({k: metrics[job_id][k] for k in numbers}, nan_ok=True), job_id
        histograms = {k: v for k, v in job.metrics.items() if isinstance(v, list)}
        assert histograms == {k: metrics[job_id][k] for k in histograms}, job_id
    assert [m["staleness_updates"] for m in metrics.values() if m["staleness_updates"]] == [[1, 2, 1]]
    # a job creating its parameters goes back to the queue, with its inspection, to create them again
    back = again.jobs[starting.job_id]
    assert back.state == "queued" and back.prep == PREP and [j.job_id for j in again.ready()] == [starting.job_id]
    assert [e.state for e in back.events if e.kind == "state"][-2:] == ["starting", "queued"]
    # jobs that had not ended are told the scheduler restarted; the seq continues
    last = again.jobs[running.job_id].events[-1]
    assert last.seq == before[running.job_id][3][-1][0] + 1 and "scheduler restarted (incarnation 2)" in last.message
    assert _event_view(again.jobs[done.job_id]) == before[done.job_id][3]
    # pending tasks are queued again in their order (the inspection first, then the expired one)
    assert list(again.queue) == queue_before
    assert queue_before[:2] == [f"{inspecting.job_id}/inspect", b.task_id]
    # the lease held across the restart is still good, with a fresh expiry
    assert again.jobs[running.job_id].tasks[c.task_id].expires == 1000.0 + 10.0
    assert again.extend("w4", 1001.0) == [held.task_id]   # the cancelled job's holder learns to abandon it
    assert again.complete(c.task_id, c.lease_id, 1001.0, samples=100, steps=4, loss_sum=20.0)
    assert again.jobs[running.job_id].metrics["samples"] == 200
    # counters continue: no id is handed out twice
    assert again.submit("next", "{}", PREP, epochs=1, lease_timeout=10.0, now=1002.0).job_id == "job-6"
    assert again.lease("w9", 1003.0)[0].task_id == f"{inspecting.job_id}/inspect"
    assert again.jobs[inspecting.job_id].tasks[f"{inspecting.job_id}/inspect"].lease_id == "lease-9"
    # a retried submit still finds the job its request created
    assert again.submit("done", "{}", PREP, epochs=1, lease_timeout=10.0, now=1004.0,
                        request_id="req-done").job_id == done.job_id
    again.flush(store, now=1005.0)
    store.close()
    store, third, _ = _reopen(tmp_path, now=50.0)
    assert store.incarnation == 3 and third.jobs[running.job_id].tasks[c.task_id].state == "done"
    assert third.next_job == 7 and third.next_lease == 10


def test_an_epoch_half_evaluated_at_a_restart_reports_from_both_halves(tmp_path):
    store, jobs, _ = _reopen(tmp_path, now=0.0)
    job = jobs.submit("parts", "{}", {**PREP, "eval_shards": 2}, epochs=1, lease_timeout=10.0, now=0.0)
    jobs.mark_starting(job.job_id, 0.5)
    jobs.start(job.job_id, 1.0)
    for _ in range(3):
        t, _ = jobs.lease("w0", 1.5)
        jobs.complete(t.task_id, t.lease_id, 2.0, samples=100, steps=4, loss_sum=50.0)
    first, _ = jobs.lease("w0", 2.5)
    second, _ = jobs.lease("w1", 2.5)
    assert jobs.complete(first.task_id, first.lease_id, 3.0, samples=45, loss_sum=9.0, correct=40)
    jobs.flush(store, now=4.0)
    store.close()
    store, again, _ = _reopen(tmp_path, now=100.0)
    back = again.jobs[job.job_id]
    assert back.epoch_eval == {0: [9.0, 40, 45, 1]} and back.state == "running"
    assert again.complete(second.task_id, second.lease_id, 101.0, samples=45, loss_sum=4.5, correct=41)
    assert back.state == "succeeded" and back.metrics["test_accuracy"] == 81 / 90
    assert back.metrics["test_loss"] == pytest.approx(13.5 / 90) and back.tasks_done == back.tasks_total == 5
    store.close()


def test_a_deleted_job_and_old_events_leave_the_state(tmp_path):
    store, jobs, _ = _reopen(tmp_path, now=0.0, max_events=5)
    job = jobs.submit("j", "{}", PREP, epochs=50, lease_timeout=10.0, now=0.0)
    jobs.mark_starting(job.job_id, 0.0)
    jobs.start(job.job_id, 0.0)
    for i in range(6):
        t, _ = jobs.lease("w", float(i))
        jobs.complete(t.task_id, t.lease_id, float(i), samples=1)
        jobs.flush(store, now=float(i))
    gone = jobs.submit("gone", "{}", None, epochs=1, lease_timeout=10.0, now=7.0)
    jobs.flush(store, now=7.0)
    jobs.delete(gone.job_id, 8.0)
    jobs.flush(store, now=8.0)
    db = sqlite3.connect(tmp_path / "state.db")
    assert [r[0] for r in db.execute("SELECT seq FROM events WHERE job_id = ? ORDER BY seq", (job.job_id,))] == \
        [e.seq for e in job.events]
    assert db.execute("SELECT count(*) FROM jobs WHERE job_id = ?", (gone.job_id,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM tasks WHERE job_id = ?", (gone.job_id,)).fetchone()[0] == 0
    db.close()


def test_members_maps_and_their_counters_round_trip(tmp_path):
    store, _, cluster = _reopen(tmp_path, now=0.0)
    a = cluster.register("h:1", now=0.0)
    b = cluster.register("h:2", now=0.0)
    cluster.register("h:3", now=0.0)
    cluster.tick(now=0.0)
    w = cluster.register_worker("w", "gpu:0", now=0.0)
    gone = cluster.register_worker("gone", "cpu", now=0.0)
    cluster.deregister_worker(gone.worker_id, now=1.0)
    m = cluster.plan("m", [TensorSpec("w", (1000, 3)), TensorSpec("b", (3,), "float64")], 4096,
                     optimizer=optimizer_pb2.OptimizerConfig(name="adam", lr=0.01), replicas=2)
    m2 = cluster.plan("m2", [TensorSpec("w", (10,))], 4096, replicas=1)
    cluster.drop("m2")
    moved = dataclasses.replace(m, replicas=((b.address, a.address), (a.address,), (b.address,)),
                                version=m.version + 1)
    cluster.maps["m"] = moved  # a change of replicas (the replication logic's) is a new map object
    cluster.servers["server-2"].state = "down"
    store.save(cluster=cluster, now=2.0)
    store.close()

    store, _, again = _reopen(tmp_path, now=500.0)
    assert again.cluster_id == cluster.cluster_id and again.incarnation == 2
    assert {s.server_id: (s.address, s.state, s.last_seen) for s in again.servers.values()} == \
        {"server-0": ("h:1", "up", 500.0), "server-1": ("h:2", "up", 500.0), "server-2": ("h:3", "down", 500.0)}
    assert {x.worker_id: (x.name, x.device, x.last_seen) for x in again.workers.values()} == \
        {w.worker_id: ("w", "gpu:0", 500.0)}
    assert list(again.maps) == ["m"] and again.maps["m"] == moved and m2.model not in again.maps
    assert again.maps["m"].optimizer == optimizer_pb2.OptimizerConfig(name="adam", lr=0.01)
    assert (again.maps["m"].version, again.maps["m"].replication) == (2, 2)
    assert again.register("h:9", now=501.0).server_id == "server-3"
    assert again.register_worker("x", "cpu", now=501.0).worker_id == "worker-2"
    assert [s.server_id for s in again.up_servers()] == ["server-0", "server-1", "server-3"]


def test_a_heartbeat_from_another_state_is_not_known():
    c = Cluster()
    s = c.register("h:1", now=0.0)
    w = c.register_worker("w", "cpu", now=0.0)
    assert c.heartbeat(s.server_id, 1.0, 0, [], cluster_id=c.cluster_id)
    assert c.heartbeat(s.server_id, 1.0, 0, [])  # a member that has none yet
    assert not c.heartbeat(s.server_id, 1.0, 0, [], cluster_id="another-state")
    assert c.worker_heartbeat(w.worker_id, 1.0, cluster_id=c.cluster_id)
    assert not c.worker_heartbeat(w.worker_id, 1.0, cluster_id="another-state")
    assert not c.worker_heartbeat("worker-77", 1.0, cluster_id=c.cluster_id)
    assert Cluster().cluster_id != c.cluster_id  # a scheduler without a state dir is a new state each start


def test_one_scheduler_at_a_time_per_state_dir(tmp_path):
    first = StateStore(tmp_path)
    with pytest.raises(StateError, match="is in use by another scheduler"):
        StateStore(tmp_path)
    first.close()
    StateStore(tmp_path).close()


# -- real processes ------------------------------------------------------------------------
def _reachable(client, timeout: float = 10.0):
    """The cluster view, once the client's channel has reconnected to a scheduler that came back."""
    def view():
        try:
            return client.cluster()
        except Unavailable:
            return None
    return wait_for(view, timeout=timeout, what=f"the scheduler at {client.address} to answer")


def _members(client) -> tuple[list[str], list[str]]:
    view = client.cluster()
    return sorted(s.server_id for s in view.servers if s.state == "up"), sorted(w.worker_id for w in view.workers)


def test_a_running_job_survives_a_kill_9_of_the_scheduler():
    with ps.LocalCluster(servers=2, workers=2) as c, ps.Client(c.address) as client, \
            ps.Client(c.address) as watcher:
        earlier = client.submit(demo_spec("mlp", epochs=1))
        earlier.wait(progress=False)
        job = client.submit(demo_spec("mlp", epochs=10))
        followed: dict = {}

        def follow():
            try:
                followed["model"] = watcher.job(job.job_id).wait(progress=False)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                followed["error"] = e
        follower = threading.Thread(target=follow)
        follower.start()
        wait_for(lambda: (i := job.info()).state == "running" and i.tasks_done >= 1, timeout=60,
                 what="the job to run and finish a task")
        servers, workers = _members(client)
        view = client.cluster()
        c.kill_scheduler()
        down_at = time.monotonic()
        c.start_scheduler()
        assert time.monotonic() - down_at < 10
        after = _reachable(client)
        assert (after.cluster_id, after.incarnation) == (view.cluster_id, view.incarnation + 1)
        # members heartbeat under the ids they had (the servers report the job's parameters again)
        wait_for(lambda: _members(client) == (servers, workers) and all(
            job.job_id in s.models for s in client.cluster().servers), timeout=5,
            what="the servers and workers to heartbeat to the restarted scheduler")
        model = job.wait(progress=False)
        assert job.status() == "succeeded" and model.metrics["test_accuracy"] >= 0.9
        # the tasks that finished while it was away were reported once it was back: each push counted once
        assert versions(client, job.job_id) == {job.info().metrics.steps}
        follower.join(60)
        assert "error" not in followed, followed.get("error")
        assert followed["model"].metrics["test_accuracy"] == model.metrics["test_accuracy"]
        listed = {j.job_id: j.summary.state for j in client.jobs()}
        assert listed == {earlier.job_id: "succeeded", job.job_id: "succeeded"}
        nxt = client.submit(demo_spec("mlp", epochs=1))
        assert nxt.job_id == "job-3"
        nxt.cancel()
        assert _members(client) == (servers, workers)  # nobody registered again, nobody was dropped
        log = c.logs()["scheduler"]
        assert " is gone" not in log and " is down" not in log, log[-3000:]
        assert "scheduler restarted (incarnation 2)" in "".join(e.message for e in job.events())


@pytest.mark.parametrize("mode", ["bsp", "ssp"])
def test_a_bsp_or_ssp_job_survives_a_kill_9_of_the_scheduler_and_applies_every_step_once(mode):
    """Its workers call the scheduler every step (the clock): while it is away they wait for it; once
    it is back the rebuilt clock goes on, and every step its workers counted was applied once."""
    with ps.LocalCluster(servers=2, workers=2) as c, ps.Client(c.address) as client:
        spec = demo_spec("mlp", epochs=12)
        spec.consistency, spec.staleness = mode, 1
        job = client.submit(spec)
        wait_for(lambda: job.info().metrics.steps >= 20, timeout=120, what="the job to train a few steps")
        c.kill_scheduler()
        c.start_scheduler()
        _reachable(client)
        model = job.wait(progress=False, timeout=300)
        m = job.info().metrics
        assert job.status() == "succeeded" and model.metrics["test_accuracy"] >= 0.9
        assert versions(client, job.job_id) == {m.steps}
        assert m.duplicates == 0


def test_every_job_survives_a_restart_and_an_empty_state_makes_members_register_again(tmp_path):
    with ps.LocalCluster(servers=2, workers=1) as c, ps.Client(c.address) as client:
        done = client.submit(demo_spec("mlp", epochs=1))
        done.wait(progress=False)
        cancelled = client.submit(demo_spec("mlp", epochs=50))
        cancelled.cancel()
        before = {j.job_id: j.summary.state for j in client.jobs()}
        assert before == {done.job_id: "succeeded", cancelled.job_id: "cancelled"}
        old = client.cluster()
        members = _members(client)

        c.restart_scheduler()
        _reachable(client)
        assert {j.job_id: j.summary.state for j in client.jobs()} == before
        assert client.cluster().cluster_id == old.cluster_id and _members(client) == members

        c.kill_scheduler()
        c.start_scheduler(state_dir=tmp_path / "empty")
        _reachable(client)
        assert client.jobs() == [] and client.cluster().cluster_id != old.cluster_id
        wait_for(lambda: [len(x) for x in _members(client)] == [2, 1], timeout=10,
                 what="the members to register with the empty scheduler")
        # every member holds the id it got from the new state (its last registration), none an old one
        servers, workers = _members(client)
        held = []
        new_cluster = client.cluster().cluster_id[:8]
        for p in c.servers + c.workers:
            # told by a heartbeat, or (a worker) by a refused lease: either way it registered again
            last = re.findall(r"registered with scheduler \S+ as (\S+) \(.*cluster (\w+)", p.log.read_text())[-1]
            assert last[1] == new_cluster, p.name
            held.append(last[0])
        assert sorted(held) == sorted(servers + workers)
        # a new state's ids start again: job-1 is a new job, not the one the workers ran before
        job = client.submit(demo_spec("mlp", epochs=1))
        assert job.job_id == "job-1" and job.wait(progress=False).metrics["epoch"] == 1


def test_submit_follow_goes_on_through_a_scheduler_restart(tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(demo_spec("mlp", epochs=6).to_json())
    with ps.LocalCluster(servers=2, workers=1) as c, ps.Client(c.address) as client:
        follower = subprocess.Popen([sys.executable, "-m", "ps", "submit", str(spec), "--scheduler", c.address,
                                     "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: (jobs := client.jobs()) and jobs[0].info().tasks_done >= 1, timeout=60,
                     what="the job to finish a task")
            c.restart_scheduler()
            out, err = follower.communicate(timeout=120)
        finally:
            follower.kill()
    assert follower.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["job_id"], result["state"], result["epoch"]) == ("job-1", "succeeded", 6)
    assert "lost the scheduler at" in err and "reconnecting" in err
