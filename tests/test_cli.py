"""The `paramserver` command and process lifecycle: health, status, local, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import ps
from ps.demo import demo_spec
from ps.spec import JobSpec, SpecError

from conftest import wait_for, wait_for_tasks

PARAMSERVER = [sys.executable, "-m", "ps"]


@pytest.fixture(scope="module")
def cluster():
    with ps.LocalCluster(servers=2, workers=2) as c:
        yield c


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PARAMSERVER, *args], capture_output=True, text=True, timeout=timeout)


def test_status_shows_a_server_that_stopped_heartbeating_as_down():
    with ps.LocalCluster(servers=2, scheduler_args=["--heartbeat-interval", "0.2", "--server-timeout", "2"]) as c:
        with ps.Client(c.address) as client:
            client.create_model("m", {"w": np.zeros(1000, np.float32)})
            wait_for(lambda: all(s.models == ["m"] for s in client.cluster().servers), what="heartbeats with models")
            out = run("status", c.address)
            assert out.returncode == 0, out.stderr
            assert "2 of 2 servers up" in out.stdout and " m" in out.stdout
            c.servers[1].kill()
            wait_for(lambda: [s.state for s in client.cluster().servers] == ["up", "down"],
                     what="the killed server to be marked down")
            table = run("status", c.address).stdout
            assert "1 of 2 servers up" in table
            assert [line.split()[2] for line in table.splitlines()[1:3]] == ["up", "down"]
            view = json.loads(run("status", c.address, "--json").stdout.strip().splitlines()[-1])
            assert [s["state"] for s in view["servers"]] == ["up", "down"]


def test_sigterm_stops_a_server_and_the_scheduler_cleanly():
    with ps.LocalCluster(servers=1) as c:
        server, scheduler = c.servers[0], c.scheduler
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(timeout=30) == 0
        scheduler.popen.send_signal(signal.SIGTERM)
        assert scheduler.popen.wait(timeout=30) == 0
        assert "received SIGTERM: shutting down" in server.log.read_text()


def test_health_exits_zero_only_when_serving(cluster):
    ok = run("health", cluster.address)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    dead = run("health", "127.0.0.1:1", "--timeout", "2")
    assert dead.returncode == 1 and "health check of 127.0.0.1:1" in dead.stderr


def test_a_worker_serves_health_checks_for_probes_when_asked():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ps.LocalCluster(servers=1, workers=0) as c:
        worker = c.add_worker(["--health-port", str(port)])
        wait_for(lambda: run("health", f"127.0.0.1:{port}", "--timeout", "2").stdout.strip() == "SERVING",
                 what="the worker's health port to report SERVING")
        worker.stop()
        assert worker.popen.returncode == 0


def test_status_of_an_unreachable_scheduler_names_it():
    out = run("status", "127.0.0.1:1")
    assert out.returncode == 1
    assert "could not reach the scheduler at 127.0.0.1:1" in out.stderr


def test_a_server_without_a_scheduler_gives_up_with_a_message_instead_of_hanging():
    out = run("server", "--scheduler", "127.0.0.1:1", "--port", "0", "--connect-timeout", "1")
    assert out.returncode == 2
    assert "registering with the scheduler at 127.0.0.1:1: still unreachable after 1 s" in out.stderr


def test_local_runs_a_cluster_until_interrupted():
    proc = subprocess.Popen([*PARAMSERVER, "local", "--servers", "1"], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("scheduler at 127.0.0.1:")
        address = first.split()[2]
        with ps.Client(address) as client:
            assert [s.state for s in client.cluster().servers] == ["up"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "stopped." in proc.stdout.read()
        assert run("health", address, "--timeout", "1").returncode == 1
    finally:
        proc.kill()


def test_a_worker_stopped_with_sigterm_finishes_its_task_and_the_job_succeeds():
    with ps.LocalCluster(servers=1, workers=2) as c, ps.Client(c.address) as client:
        job = client.submit(demo_spec("mlp", epochs=6))
        wait_for_tasks(job, 2)
        c.workers[0].popen.send_signal(signal.SIGTERM)
        assert c.workers[0].popen.wait(timeout=60) == 0
        assert job.wait(progress=False).metrics["test_accuracy"] >= 0.9
        log = (c.workers[0].log).read_text()
        assert "received SIGTERM: finishing the current task, then exiting" in log


def test_submit_follow_and_jobs_from_the_shell(cluster, tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text('name = "toml-job"\nepochs = 2\nbatch_size = 32\n'
                    '[data]\nuri = "builtin:digits"\nscale = "standard"\n'
                    '[optimizer]\nname = "adam"\nlr = 0.002\n')
    out = run("submit", str(spec), "--scheduler", cluster.address, "--follow", "--json",
              "--save", str(tmp_path / "model"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "succeeded" and result["epoch"] == 2 and result["test_accuracy"] > 0.85
    assert ps.load_model(tmp_path / "model").metrics["test_accuracy"] == result["test_accuracy"]
    listing = json.loads(run("jobs", "--scheduler", cluster.address, "--json").stdout.strip().splitlines()[-1])
    assert {"job_id": result["job_id"], "state": "succeeded", "name": "toml-job"}.items() <= \
        next(j for j in listing["jobs"] if j["job_id"] == result["job_id"]).items()


def test_a_bad_spec_file_is_refused_before_anything_is_submitted(cluster, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"loss": "hinge"}))
    out = run("submit", str(spec), "--scheduler", cluster.address)
    assert out.returncode == 2
    assert "spec.loss: unknown loss 'hinge'" in out.stderr


def test_specs_load_from_toml_and_json_with_the_same_result(tmp_path):
    spec = demo_spec("cnn")
    (tmp_path / "s.json").write_text(spec.to_json())
    assert JobSpec.load(tmp_path / "s.json") == spec
    with pytest.raises(SpecError, match="spec.data.urx: unknown field"):
        JobSpec.from_dict({"data": {"urx": "x"}})
    with pytest.raises(SpecError, match="spec file '.*missing.toml' does not exist"):
        JobSpec.load(tmp_path / "missing.toml")
