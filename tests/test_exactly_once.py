"""Every acknowledged push is applied exactly once: across model handles, concurrent jobs and
workers, and when a reply is lost and the push retried. Exact counts, not accuracy."""

from __future__ import annotations

import numpy as np
import pytest

import ps
from ps.demo import demo_spec

from netproxy import ReplyCutter


def counter(client, name, n=4, optimizer=None):
    """A model whose value counts the pushes applied to it: SGD with lr 1 and a gradient of -1."""
    return client.create_model(name, {"c": np.zeros(n, np.float64)},
                               optimizer=optimizer or {"name": "sgd", "lr": 1.0}, replace=True)


def minus_one(n=4):
    return {"c": -np.ones(n, np.float64)}


def test_pushes_through_fresh_handles_are_all_applied(cluster, client):
    """A worker takes a new handle per task; the shards' exactly-once records must not take its
    pushes for retries of the previous handle's (180 pushes gave 6 updates once)."""
    counter(client, "fresh-handles")
    for i in range(60):
        handle = client.model("fresh-handles")
        handle.push(minus_one())
        handle.push_pull(minus_one())
        handle.push(minus_one())
        assert (handle.pushes, handle.duplicates) == (3, 0)
    np.testing.assert_array_equal(client.model("fresh-handles").pull()["c"], np.full(4, 180.0))
    stats = [s for s in client.model("fresh-handles").stats() if s.slices]
    assert [(s.min_version, s.max_version) for s in stats] == [(180, 180)]


def test_two_handles_pushing_at_once_from_one_client_lose_nothing(cluster, client):
    import threading
    counter(client, "two-handles", n=300_000)  # several chunks per push
    handles = [client.model("two-handles") for _ in range(2)]

    def run(h):
        for _ in range(25):
            h.push(minus_one(300_000))
    threads = [threading.Thread(target=run, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(h.duplicates for h in handles) == 0
    np.testing.assert_array_equal(client.model("two-handles").pull()["c"], np.full(300_000, 50.0))


@pytest.mark.parametrize("n_jobs", [2, 3])
def test_concurrent_jobs_apply_every_acknowledged_push_once_per_slice(n_jobs):
    """Jobs running at once on 2 workers: a worker comes back to each job many times with a new
    handle. For every slice of every job, the server's update count equals the pushes that the
    workers got acknowledged (the job's `steps`), and no push was taken for a duplicate."""
    with ps.LocalCluster(servers=2, workers=2) as c, ps.Client(c.address) as client:
        jobs = [client.submit(demo_spec("mlp", epochs=3, seed=s)) for s in range(n_jobs)]
        for job in jobs:
            job.wait(progress=False, timeout=300)
        for job in jobs:
            m = job.metrics()
            assert m["steps"] > 0 and m["duplicates"] == 0
            slices = [(s.min_version, s.max_version) for addr in {a for a in client.model(job.job_id).shards}
                      for s in client.stats(addr).models if s.model == job.job_id]
            assert len(slices) == 2
            assert slices == [(m["steps"], m["steps"])] * 2, (job.job_id, m["steps"], slices)


@pytest.fixture
def proxied():
    """One server reached only through a proxy that can cut a reply (it advertises the proxy). The
    client's shared-memory calls go over gRPC, not over the server's same-host link, which would
    bypass the proxy (a link's lost replies are tests/test_local_link.py's)."""
    proxy = ReplyCutter()
    with ps.LocalCluster(servers=0) as c:
        server = c.add_server(extra=["--advertise", proxy.address])
        proxy.target = ("127.0.0.1", server.port)
        c.wait_servers(1, __import__("time").monotonic() + 30)
        with ps.Client(c.address, link=False) as client:
            yield client, proxy
    proxy.close()


def test_a_push_whose_reply_was_lost_is_retried_and_applied_once(proxied):
    client, proxy = proxied
    model = counter(client, "lost-reply", n=600_000)  # 4.8 MB: three chunks
    model.push(minus_one(600_000))
    proxy.arm()
    model.push(minus_one(600_000))        # applied, then the reply is cut: retried with the same seq
    assert proxy.cut.is_set()
    assert model.pushes == 2
    assert model.duplicates == 3          # the retry's three chunks were recognised, not applied
    np.testing.assert_array_equal(model.pull()["c"], np.full(600_000, 2.0))
    assert [s.max_version for s in model.stats()] == [2]


def test_a_push_pull_whose_reply_was_lost_is_retried_and_applied_once(proxied):
    client, proxy = proxied
    model = counter(client, "lost-pushpull", n=600_000, optimizer={"name": "adam", "lr": 0.1})
    reference = counter(client, "reference", n=600_000, optimizer={"name": "adam", "lr": 0.1})
    g = np.linspace(-1, 1, 600_000)
    for m in (model, reference):
        m.push_pull({"c": g})
    proxy.arm()
    fresh = model.push_pull({"c": g})    # cut at the first reply chunk: retried with the same seq
    assert proxy.cut.is_set()
    expected = reference.push_pull({"c": g})
    assert model.pushes == 2 and model.duplicates >= 1
    np.testing.assert_array_equal(fresh["c"], expected["c"])   # Adam's step advanced exactly once
    assert [s.max_version for s in model.stats()] == [2]


def test_exactly_once_records_of_silent_clients_are_pruned_and_recent_ones_kept():
    """Worker churn must not grow a slice's records forever; a retry within the TTL is still caught."""
    from ps.server.shard import ShardStore, SliceRequest
    now = [0.0]
    store = ShardStore(dedup_ttl_s=100, clock=lambda: now[0])
    store.create("m", [SliceRequest("w", (4,), np.dtype("float64"), 0, 4)], {"name": "sgd", "lr": 1.0})
    sl = store.model("m").tensors["w"].slices[0]
    for i in range(50):
        assert store.push("m", f"client-{i}", 1, "w", 0, np.ones(4))[1]
    now[0] = 60.0
    assert store.push("m", "late", 1, "w", 0, np.ones(4))[1]
    now[0] = 130.0
    assert store.push("m", "client-0", 2, "w", 0, np.ones(4))[1]
    assert set(sl.applied) == {"client-0", "late"}
    assert not store.push("m", "late", 1, "w", 0, np.ones(4))[1]   # its retry is still recognised
    assert sl.version == 52
