"""The scheduler stays responsive whatever clients do: followers hold no thread, a retried
submit makes no second job, and everything it keeps has a lifetime."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import ps
from ps.demo import demo_spec

from conftest import wait_for


def test_200_followers_neither_starve_heartbeats_nor_miss_the_end():
    """Each WatchJob once held one of the scheduler's RPC threads for the whole job: 32 followers
    starved heartbeats and leases, and healthy servers were declared dead."""
    with ps.LocalCluster(servers=2, workers=2, scheduler_args=["--threads", "4"]) as c:
        clients = [ps.Client(c.address) for _ in range(10)]
        try:
            job = clients[0].submit(demo_spec("mlp", epochs=4))
            ends: list[str] = []
            lock = threading.Lock()

            def follow(i):
                handle = clients[i % len(clients)].job(job.job_id)
                last = None
                for last in handle.events(timeout=300):
                    pass
                with lock:
                    ends.append(last.state if last is not None else "nothing")

            threads = [threading.Thread(target=follow, args=(i,)) for i in range(200)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert ends == ["succeeded"] * 200
            assert job.status() == "succeeded"
            log = c.logs()["scheduler"]
            assert " is down" not in log and " is gone" not in log, log[-3000:]
        finally:
            for cl in clients:
                cl.close()


def test_a_retried_submit_returns_the_same_job(cluster, client):
    spec = demo_spec("mlp", epochs=1)
    first = client.submit(spec, request_id="retry-me")
    again = client.submit(spec, request_id="retry-me")
    other = client.submit(spec)
    assert again.job_id == first.job_id and other.job_id != first.job_id
    for job in (first, other):
        job.cancel()


def test_jobs_are_listed_newest_first_in_pages_of_summaries(cluster, client):
    ids = [client.submit(demo_spec("mlp", epochs=1, seed=s)).job_id for s in range(5)]
    for job_id in ids:
        client.job(job_id).cancel()
    listed = client.jobs(page_size=2)
    positions = [j.job_id for j in listed]
    assert [positions.index(i) for i in reversed(ids)] == sorted(positions.index(i) for i in ids)
    assert all(j.summary.spec_json == "" for j in listed)
    assert json.loads(client.job(ids[0]).info().spec_json)["epochs"] == 1
    with pytest.raises(ps.InvalidArgument, match=r"page_size must be in \[1, 1000\], got 5000"):
        client.call(client.scheduler.ListJobs, ps.v1.scheduler_pb2.ListJobsRequest(page_size=5000), "list")


@pytest.fixture(scope="module")
def busy():
    """A cluster that forgets ended jobs beyond the newest 20 and frees parameters at once."""
    with ps.LocalCluster(servers=2, workers=2, scheduler_args=["--keep-jobs", "20", "--keep-params-for", "0"]) as c:
        yield c


def tiny_job(seed=0, **kw):
    spec = demo_spec("mlp", epochs=1, seed=seed)
    spec.data.shards = 1
    spec.batch_size = 256
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def held_models(client) -> set[str]:
    return {m.model for s in client.cluster().servers for m in client.stats(s.address).models}


def test_delete_frees_a_jobs_parameters_everywhere_and_forgets_it(busy):
    with ps.Client(busy.address) as client:
        job = client.submit(tiny_job(keep_params=True))
        job.wait(progress=False, timeout=120)
        assert job.job_id in held_models(client)
        out = subprocess.run([sys.executable, "-m", "ps", "delete", job.job_id, "--scheduler", busy.address],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"deleted {job.job_id}"
        assert job.job_id not in held_models(client) and job.job_id not in client.cluster().models
        with pytest.raises(ps.NotFound, match=f"job '{job.job_id}' not found"):
            job.info()
        with pytest.raises(ps.NotFound, match=f"job '{job.job_id}' not found"):
            client.delete_job(job.job_id)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


@pytest.mark.slow
def test_300_short_jobs_in_a_row_leave_memory_and_listings_flat(busy):
    """Ended jobs are dropped beyond the newest 20, succeeded jobs' parameters freed at once:
    after 300 jobs the scheduler and servers hold what they held after 30, and listing jobs and
    the cluster stays fast."""
    import time
    roles = [busy.scheduler, *busy.servers]
    with ps.Client(busy.address) as client:
        rss_at_30 = None
        ids = []
        for i in range(300):
            job = client.submit(tiny_job(seed=i))
            ids.append(job.job_id)
            for _ in job.events(timeout=120):
                pass
            assert job.status() == "succeeded", job.info().error
            if i == 29:
                rss_at_30 = [_rss(p.popen.pid) for p in roles]
        rss_at_300 = [_rss(p.popen.pid) for p in roles]
        for name, a, b in zip(["scheduler", "server-0", "server-1"], rss_at_30, rss_at_300):
            assert b <= a * 1.10, f"{name}: RSS {a / 2**20:.1f} MiB after 30 jobs, {b / 2**20:.1f} MiB after 300"
        # retention runs on the scheduler's membership tick: wait for it, not for a fixed time
        wait_for(lambda: len(client.jobs()) == 20, timeout=30, what="retention to keep the newest 20 jobs")
        assert [j.job_id for j in client.jobs()] == ids[:-21:-1]
        wait_for(lambda: held_models(client) == set() and not client.cluster().models, timeout=30,
                 what="every job's parameters to be freed")
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            client.jobs()
            view = client.cluster()
            for s in view.servers:
                client.stats(s.address)
            timings.append(time.perf_counter() - t0)
        assert sorted(timings)[2] < 0.1, timings
