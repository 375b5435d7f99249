"""Members come back within seconds of a scheduler that was away for long: their channels retry
with a backoff capped at 1 s (grpc's default grows to two minutes)."""

from __future__ import annotations

import time

import ps
from ps.local import Process

from conftest import wait_for
from test_peers import free_port


def test_members_reregister_within_seconds_of_a_scheduler_back_after_a_long_outage(tmp_path):
    port = free_port()
    with ps.LocalCluster(servers=1, workers=1, scheduler_args=["--port", str(port)]) as c:
        address = c.address
        c.scheduler.kill()
        time.sleep(20)  # the outage itself (what is measured starts after it)
        again = Process("scheduler-again", ["scheduler", "--host", "127.0.0.1", "--port", str(port)], tmp_path)
        c.processes.append(again)
        again.wait_port(time.monotonic() + 30)
        back = time.monotonic()
        with ps.Client(address) as client:
            wait_for(lambda: len([s for s in client.cluster().servers if s.state == "up"]) == 1
                     and len(client.cluster().workers) == 1, timeout=30, interval=0.1,
                     what="the server and the worker to register with the new scheduler")
        took = time.monotonic() - back
        print(f"members back {took:.1f} s after the scheduler")
        assert took < 10, f"members took {took:.1f} s to come back"  # 1 s backoff, on a busy 2-core machine
