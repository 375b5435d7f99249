"""Clear answers when a peer is missing, and the small things a new user trips on."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

import ps
from ps.demo import demo_spec

from conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ps_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ps", *args]


@pytest.mark.parametrize("role", ["worker", "server"])
@pytest.mark.parametrize("address,reason", [
    (f"127.0.0.1:{free_port()}", "nothing answers there: is it running, and is the address right?"),
    ("no-such-host.invalid:7070", "the host name 'no-such-host.invalid' does not resolve"),
], ids=["nobody-listening", "unresolvable"])
def test_a_member_that_cannot_reach_its_scheduler_says_so_while_it_retries(role, address, reason):
    extra = ["--port", "0"] if role == "server" else []
    start = time.monotonic()
    out = subprocess.run(ps_cmd(role, "--scheduler", address, "--connect-timeout", "7", *extra),
                         capture_output=True, text=True, timeout=60, env={**__import__("os").environ,
                                                                          "PS_NO_REEXEC": "1"})
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    waiting = [line for line in out.stderr.splitlines() if "WARNING" in line and address in line]
    assert len(waiting) >= 2, out.stderr          # said within a few seconds, and again while retrying
    assert all(reason in line for line in waiting), out.stderr
    assert reason in out.stderr.splitlines()[-1]   # and the last word, when it gives up, says why
    assert "Traceback" not in out.stderr
    assert elapsed < 30


def test_submit_follow_says_plainly_that_it_lost_the_scheduler(tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(demo_spec("mlp", epochs=2).to_json())
    with ps.LocalCluster(servers=1) as c:   # no workers: the job waits, the follower follows
        follower = subprocess.Popen(ps_cmd("submit", str(spec), "--scheduler", c.address, "--follow",
                                           "--reconnect-for", "2"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # the submit's answer reached it (a job merely listed may still have its reply in flight)
        assert follower.stdout.readline().strip() == "submitted job-1"
        c.scheduler.kill()
        out, err = follower.communicate(timeout=60)
    assert follower.returncode == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith(f"lost the scheduler at {c.address} while following job-1 "
                                f"(Unavailable: not back after 2 s)")
    assert lines[-1].endswith(f"`paramserver follow job-1 --scheduler {c.address}` picks the job up again")


def test_progress_into_a_file_is_a_line_per_epoch_not_a_redrawn_bar():
    out = subprocess.run(ps_cmd("demo", "--epochs", "3"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\r" not in out.stdout
    epochs = [line for line in out.stderr.splitlines() if line.startswith("job-1: epoch ")]
    assert [line.split(":")[1].strip().split(" ")[1] for line in epochs] == ["1/3", "2/3", "3/3"]


def test_usage_names_the_paramserver_command():
    out = subprocess.run(ps_cmd("submit"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("Usage: paramserver submit")


def test_a_worker_leaving_on_sigterm_is_logged_as_leaving_not_as_lost():
    with ps.LocalCluster(servers=1, workers=1) as c:
        w = c.workers[0]
        w.popen.send_signal(signal.SIGTERM)
        assert w.popen.wait(30) == 0
        wait_for(lambda: " left; its tasks go back to the queue" in c.logs()["scheduler"],
                 what="the scheduler to log the worker leaving")
        with ps.Client(c.address) as client:
            assert list(client.cluster().workers) == []
        assert "is gone: no heartbeat" not in c.logs()["scheduler"]


def test_follow_picks_up_a_submitted_job_and_reports_its_result(tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(demo_spec("mlp", epochs=2).to_json())
    with ps.LocalCluster(servers=1, workers=1) as c:
        out = subprocess.run(ps_cmd("submit", str(spec), "--scheduler", c.address, "--json"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        job_id = json.loads(out.stdout.splitlines()[-1])["job_id"]
        out = subprocess.run(ps_cmd("follow", job_id, "--scheduler", c.address, "--json"),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.splitlines()[-1])
        assert (result["job_id"], result["state"], result["epoch"]) == (job_id, "succeeded", 2)
        assert result["test_accuracy"] > 0.5
        missing = subprocess.run(ps_cmd("follow", "job-99", "--scheduler", c.address),
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "job 'job-99' not found" in missing.stderr
