"""Replication: a server's death (kill -9) loses no acknowledged update. Real processes; exact
counts (a counter model gains exactly 1 per acknowledged push), bit-equal replicas."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import ps
from ps.demo import demo_spec
from ps.v1 import server_pb2

from conftest import versions, wait_for

#: fast failure detection, so the tests spend their time on the work, not on waiting
FAST = ["--heartbeat-interval", "0.25", "--server-timeout", "1.5"]


def counter(client, name, shards=3, replicas=0):
    """One small tensor per shard (each placed whole): SGD, lr 1, gradient -1 => +1 per push."""
    return client.create_model(name, {f"c{i}": np.zeros(8, np.float64) for i in range(shards)},
                               optimizer={"name": "sgd", "lr": 1.0}, replicas=replicas)


def minus_one(shards=3):
    return {f"c{i}": -np.ones(8, np.float64) for i in range(shards)}


def server_process(cluster, address):
    port = int(address.rsplit(":", 1)[1])
    return next(p for p in cluster.servers if p.port == port)


def pull_from(client, address, model, tensor, n, offset=0):
    """Elements [offset, offset + n) of a float64 tensor as one replica holds them (Pull is served by
    backups too)."""
    out = np.empty(n, np.float64)
    for r in client.server(address).Pull(server_pb2.PullRequest(model=model, ranges=[
            server_pb2.Range(tensor=tensor, offset=offset, length=n)]), timeout=10):
        a = r.chunk.offset - offset
        out[a:a + len(r.chunk.values.data) // 8] = np.frombuffer(r.chunk.values.data)
    return out


def assert_replicas_identical(client, model):
    """Every replica of every shard holds bit-identical values and the same update count."""
    m = client.model(model)
    for shard, servers in enumerate(m.replicas):
        for s in m._slices_of(shard):
            held = [pull_from(client, a, model, s.tensor, s.length, s.offset) for a in servers]
            for a, values in zip(servers[1:], held[1:]):
                assert values.tobytes() == held[0].tobytes(), f"{model}/{s.tensor}: {a} differs from {servers[0]}"


def test_each_slice_is_on_two_servers_and_backups_stay_identical():
    with ps.LocalCluster(servers=3, scheduler_args=FAST) as cluster, ps.Client(cluster.address) as client:
        model = counter(client, "ctr")
        assert [len(r) for r in model.replicas] == [2, 2, 2]
        assert {r[0] for r in model.replicas} == set(model.shards) and len(set(model.shards)) == 3
        for _ in range(30):
            model.push(minus_one())
            model.push_pull(minus_one())
        assert model.pushes == 60
        assert_replicas_identical(client, "ctr")
        stats = {a: client.stats(a) for a in model.shards}
        assert sorted((m.slices, m.backup_slices, m.max_version) for s in stats.values() for m in s.models) == \
            [(1, 1, 60)] * 3
        # a push to a backup is refused with the reason, and changes nothing
        backup = model.replicas[0][1]
        with pytest.raises(Exception, match="backup of that slice, not its primary"):
            client.server(backup).Push(iter([server_pb2.PushRequest(
                model="ctr", client_id="x", seq=1, chunk=ps.v1.tensor_pb2.Chunk(
                    tensor=model._slices_of(0)[0].tensor, offset=0,
                    values=ps.tensor.encode(-np.ones(8, np.float64))))]), timeout=10)
        assert_replicas_identical(client, "ctr")
        one = client.create_model("single", {"w": np.zeros(4)}, replicas=1)
        assert [len(r) for r in one.replicas] == [1, 1, 1]


def test_counter_loses_no_acknowledged_push_when_a_server_is_killed():
    """Two clients push 5,000 times each; a server is killed with -9 half-way. The value of every
    element equals the pushes acknowledged, exactly: nothing acknowledged is lost, nothing is
    applied twice."""
    with ps.LocalCluster(servers=3, scheduler_args=FAST) as cluster:
        clients = [ps.Client(cluster.address) for _ in range(2)]
        counter(clients[0], "ctr")
        handles = [c.model("ctr") for c in clients]
        half = threading.Event()
        errors = []

        def run(h):
            try:
                for i in range(5000):
                    h.push_pull(minus_one()) if i % 2 else h.push(minus_one())
                    if h.pushes == 2500:
                        half.set()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                half.set()
        threads = [threading.Thread(target=run, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        assert half.wait(300)
        victim = handles[0].shards[1]
        server_process(cluster, victim).kill()
        for t in threads:
            t.join(600)
        assert not errors, errors
        acknowledged = sum(h.pushes for h in handles)
        assert acknowledged == 10_000
        model = clients[0].model("ctr")
        assert victim not in {a for r in model.replicas for a in r}
        values = model.pull()
        for name, v in values.items():
            np.testing.assert_array_equal(v, np.full(8, float(acknowledged)), err_msg=name)
        # re-replicated onto the two servers left: every shard on both, identical
        wait_for(lambda: not clients[0].cluster().under_replicated and
                 all(len(r) == 2 for r in clients[0].model("ctr").replicas), 30, what="re-replication")
        assert_replicas_identical(clients[0], "ctr")
        for c in clients:
            c.close()


def test_a_job_survives_a_server_kill_and_its_model_the_next():
    """A demo job on 3 servers (2 replicas each): kill -9 one server mid-job; the job succeeds.
    Then the finished model survives the death of a second server and can still be saved."""
    with ps.LocalCluster(servers=3, workers=2, scheduler_args=FAST) as cluster, \
            ps.Client(cluster.address) as client:
        spec = demo_spec("mlp", epochs=20)  # long enough to be running still when the event arrives
        spec.keep_params = True
        job = client.submit(spec)
        for ev in job.events(timeout=300):
            if ev.tasks_done >= 3:
                break
        model = client.model(job.job_id)
        server_process(cluster, model.shards[0]).kill()
        trained = job.wait(progress=False, timeout=300)
        assert trained.metrics["test_accuracy"] >= 0.95
        # every acknowledged push applied exactly once, across the failover (a retry is skipped)
        assert versions(client, job.job_id) == {job.info().metrics.steps}
        wait_for(lambda: not client.cluster().under_replicated, 30, what="re-replication")
        before = job.weights()
        survivors = {a for r in client.model(job.job_id).replicas for a in r}
        server_process(cluster, sorted(survivors)[0]).kill()
        wait_for(lambda: sorted(survivors)[0] not in {a for r in client.model(job.job_id).replicas for a in r},
                 30, what="promotion after the second kill")
        after = job.weights()
        for k in before:
            assert before[k].tobytes() == after[k].tobytes(), k


def test_a_restarted_server_is_a_new_member_and_a_drained_one_holds_nothing(tmp_path):
    with ps.LocalCluster(servers=3, scheduler_args=FAST) as cluster, ps.Client(cluster.address) as client:
        model = counter(client, "ctr")
        for _ in range(20):
            model.push(minus_one())
        view = client.cluster()
        drained = model.shards[2]
        # another client pushes all through the drain: no push fails, none is lost, and a stream is
        # retried at most once (the drained primary refuses, the next try finds the new one)
        other = ps.Client(cluster.address)
        busy, stop = other.model("ctr"), threading.Event()
        pusher = threading.Thread(target=lambda: [busy.push(minus_one()) for _ in iter(stop.is_set, True)])
        pusher.start()
        wait_for(lambda: busy.pushes >= 20, 30, what="pushes before the drain")
        resp = client.scheduler.DrainServer(ps.v1.scheduler_pb2.DrainServerRequest(address=drained, timeout_s=60),
                                            timeout=90)
        pushed_during = busy.pushes
        wait_for(lambda: busy.pushes >= pushed_during + 20, 30, what="pushes after the drain")
        stop.set()
        pusher.join(60)
        assert busy.most_retries <= 1 and busy.failovers >= 1
        assert resp.models == ["ctr"] and resp.shards_moved == 2
        after = client.model("ctr")
        assert drained not in {a for r in after.replicas for a in r}
        assert [m.model for m in client.stats(drained).models] == []
        assert next(s.state for s in client.cluster().servers if s.address == drained) == "drained"
        for _ in range(20):
            model.push(minus_one())  # the old handle finds the new primaries
        np.testing.assert_array_equal(client.model("ctr").pull()["c2"], np.full(8, 40.0 + busy.pushes))
        assert model.pushes == 40
        assert {s.server_id for s in view.servers} == {s.server_id for s in client.cluster().servers}

        # kill -9 a server and start a new, empty one on its address: a new member, never taken
        # for the old one; the model loses nothing and is whole again on the servers up
        victim = client.model("ctr").shards[0]
        old_id = next(s.server_id for s in client.cluster().servers if s.address == victim and s.state == "up")
        server_process(cluster, victim).kill()
        port = victim.rsplit(":", 1)[1]
        cluster._spawn("server-restarted", ["server", "--scheduler", cluster.address, "--host", "127.0.0.1",
                                            "--port", port]).wait_port(time.monotonic() + 60)
        new = wait_for(lambda: next((s for s in client.cluster().servers if s.address == victim and s.state == "up"
                                     and s.server_id != old_id), None), 30, what="the restarted server")
        assert int(new.server_id.split("-")[1]) > int(old_id.split("-")[1])
        assert next(s.state for s in client.cluster().servers if s.server_id == old_id) == "down"
        for _ in range(10):
            model.push(minus_one())
        np.testing.assert_array_equal(client.model("ctr").pull()["c0"], np.full(8, 50.0 + busy.pushes))
        assert model.pushes == 50
        other.close()
        wait_for(lambda: not client.cluster().under_replicated, 30, what="re-replication")
        assert_replicas_identical(client, "ctr")


def test_with_no_server_to_spare_status_shows_the_shards_under_replicated():
    """2 servers, 2 replicas: after one dies nothing can take its copies; the survivor serves every
    shard alone, and `paramserver status` says which shards lack a replica."""
    import subprocess
    from test_peers import ps_cmd
    with ps.LocalCluster(servers=2, scheduler_args=FAST) as cluster, ps.Client(cluster.address) as client:
        model = counter(client, "ctr", shards=2)
        for _ in range(10):
            model.push(minus_one(2))
        victim, survivor = model.shards
        server_process(cluster, victim).kill()
        for _ in range(10):
            model.push(minus_one(2))
        assert model.shards == [survivor, survivor] and model.pushes == 20
        np.testing.assert_array_equal(client.model("ctr").pull()["c0"], np.full(8, 20.0))
        out = subprocess.run(ps_cmd("status", cluster.address), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = sorted(l for l in out.stdout.splitlines() if l.startswith("under-replicated"))
        assert lines == [f"under-replicated: ctr shard {i}: 1 of 2 replicas ({survivor})" for i in range(2)]


def test_a_promoted_backup_refuses_a_gradient_of_a_step_its_primary_closed():
    """A bsp step applied from an accumulator is closed on its backups too (replicated, with who closed
    it and the update count a promoted backup tells an empty step by): after the primary's kill -9, a
    gradient tagged with that step is refused, its closer's retry is acknowledged (once), and a step
    led again with nothing summed applies nothing."""
    from ps.spec import ACCUMULATOR_OPTIMIZER
    rng = np.random.default_rng(3)
    w = rng.standard_normal(2000)
    with ps.LocalCluster(servers=3, scheduler_args=FAST) as cluster, ps.Client(cluster.address) as client:
        model = client.create_model("bspr", {"w": w}, optimizer={"name": "adam", "lr": 0.01}, max_slice_bytes=4096)
        acc = client.create_model("bspr.acc", {"w": np.zeros_like(w)}, optimizer=ACCUMULATOR_OPTIMIZER,
                                  max_slice_bytes=4096)
        assert acc.replicas == model.replicas and all(len(r) == 2 for r in acc.replicas)
        assert len({s.shard for s in acc.slices}) == 3
        g = rng.standard_normal(2000)
        acc.push({"w": -g}, seq=5)
        assert model.apply_accumulated("bspr.acc", 1, seq=5)
        weights = model.pull()["w"]
        for s in acc.slices:
            assert not pull_from(client, acc.replicas[s.shard][1], "bspr.acc", "w", s.length, s.offset).any()
        primary, backup = acc.replicas[0]
        server_process(cluster, primary).kill()
        wait_for(lambda: not client.cluster().under_replicated and
                 primary not in {a for r in client.model("bspr.acc").replicas for a in r}, 60, what="failover")
        assert client.model("bspr.acc").replicas[0][0] == backup
        with ps.Client(cluster.address) as late:
            with pytest.raises(ps.errors.Aborted, match="step 5 was applied from this accumulator without it"):
                late.model("bspr.acc").push({"w": -g}, seq=5)
        assert not client.model("bspr.acc").pull()["w"].any()
        # the promoted replicas know who closed step 5: its closer's retry (through a handle that never heard
        # back, as after a reply lost in the failover) is acknowledged once, not applied; asked again through
        # the handle that counted it, nothing more is counted
        retry = client.model("bspr")
        assert retry.apply_accumulated("bspr.acc", 1, seq=5) is True
        assert (retry.pushes, retry.duplicates) == (1, len(model.slices))
        assert model.apply_accumulated("bspr.acc", 1, seq=5) is True
        assert (model.pushes, model.duplicates) == (1, 0)
        assert model.apply_accumulated("bspr.acc", 1, seq=6) is True  # nothing summed: nothing applied or counted
        np.testing.assert_array_equal(model.pull()["w"], weights)
        assert versions(client, "bspr") == {1} and model.pushes == 1
        acc.push({"w": -g}, seq=7)
        assert model.apply_accumulated("bspr.acc", 1, seq=7)
        assert versions(client, "bspr") == {2} and model.pushes == 2
        assert_replicas_identical(client, "bspr")


@pytest.mark.parametrize("mode", ["bsp", "ssp"])
def test_a_bsp_or_ssp_job_survives_a_server_kill_and_applies_every_step_once(mode):
    """bsp's accumulator fails over with the parameters (both on the same replicas): every step the
    job counted was applied once, on the promoted replicas too."""
    with ps.LocalCluster(servers=3, workers=2, scheduler_args=FAST) as cluster, \
            ps.Client(cluster.address) as client:
        spec = demo_spec("mlp", epochs=12)
        spec.consistency, spec.staleness = mode, 1
        job = client.submit(spec)
        wait_for(lambda: job.info().metrics.steps >= 20, timeout=120, what="the job to train a few steps")
        server_process(cluster, client.model(job.job_id).shards[0]).kill()
        trained = job.wait(progress=False, timeout=300)
        m = job.info().metrics
        assert trained.metrics["test_accuracy"] >= 0.9
        assert versions(client, job.job_id) == {m.steps}


def test_a_server_drained_mid_job_leaves_the_job_to_succeed():
    """`paramserver drain` while a demo job trains on 3 servers: the job never notices beyond a
    retry, succeeds, and the drained server ends up holding nothing."""
    with ps.LocalCluster(servers=3, workers=2, scheduler_args=FAST) as cluster, \
            ps.Client(cluster.address) as client:
        job = client.submit(demo_spec("mlp", epochs=20))  # long enough to be running still when the event arrives
        for ev in job.events(timeout=300):
            if ev.tasks_done >= 3:
                break
        drained = client.model(job.job_id).shards[1]
        resp = client.drain(drained, timeout=60)
        assert list(resp.models) == [job.job_id] and resp.shards_moved == 2
        trained = job.wait(progress=False, timeout=300)
        assert trained.metrics["test_accuracy"] >= 0.95
        assert versions(client, job.job_id) == {job.info().metrics.steps}  # each acknowledged push once
        assert [m.model for m in client.stats(drained).models] == []
        assert drained not in {a for r in client.model(job.job_id).replicas for a in r}
