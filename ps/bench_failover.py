"""`paramserver bench failover`: what a kill -9 costs, measured on real processes.

- server: a client pushes to a counter model (SGD, lr 1, gradient -1: +1 per applied push) on 3
  servers with 2 replicas; the primary of a shard is killed with SIGKILL. Reported: when the new
  shard map (the promotion) was published, the longest gap between two acknowledged pushes
  after the kill (the stall clients see), when every shard had 2 replicas again, and the
  pushes acknowledged against those applied (lost: their difference; 0 is the claim).
- scheduler: a demo job on 2 servers and 2 workers; the scheduler is killed with SIGKILL mid-job
  and started again on its state 2 s later. Reported: when every member was heartbeating again
  (from the kill), and that the job succeeded.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np


def server_kill(scheduler_args: list[str], echo: Callable[[str], None] = print) -> dict:
    import ps
    from ps.local import LocalCluster
    with LocalCluster(servers=3, scheduler_args=scheduler_args) as cluster, ps.Client(cluster.address) as client:
        model = client.create_model("counter", {f"c{i}": np.zeros(8) for i in range(3)},
                                    optimizer={"name": "sgd", "lr": 1.0})
        grad = {f"c{i}": -np.ones(8) for i in range(3)}
        acks: list[float] = []
        stop = threading.Event()

        def push():
            while not stop.is_set():
                model.push(grad)
                acks.append(time.monotonic())
        pusher = threading.Thread(target=push, name="pusher")
        pusher.start()
        try:
            time.sleep(1.0)
            victim = model.shards[0]
            proc = next(p for p in cluster.servers if p.port == int(victim.rsplit(":", 1)[1]))
            version = client.model("counter").map_version
            t0 = time.monotonic()
            proc.kill()
            while client.model("counter").map_version == version:
                time.sleep(0.01)
            promoted = time.monotonic() - t0
            while client.cluster().under_replicated or any(len(r) < 2 for r in client.model("counter").replicas):
                time.sleep(0.01)
            whole = time.monotonic() - t0
            time.sleep(1.0)
        finally:
            stop.set()
            pusher.join()
        after = [a for a in acks if a > t0]
        stall = max((b - a for a, b in zip([t0] + after, after)), default=float("nan"))
        applied = {k: int(v[0]) for k, v in client.model("counter").pull().items()}
    result = {"promoted_s": round(promoted, 2), "stall_s": round(stall, 2), "rereplicated_s": round(whole, 2),
              "acknowledged": len(acks), "applied": min(applied.values()), "lost": len(acks) - min(applied.values())}
    echo(f"server kill ({' '.join(scheduler_args) or 'default timing'}): new primary published after "
         f"{result['promoted_s']:.2f} s, pushes stalled {result['stall_s']:.2f} s, 2 replicas again after "
         f"{result['rereplicated_s']:.2f} s; {result['acknowledged']} pushes acknowledged, {result['applied']} applied")
    return result


def scheduler_kill(outage_s: float = 2.0, echo: Callable[[str], None] = print) -> dict:
    import ps
    from ps.demo import demo_spec
    from ps.local import LocalCluster
    with LocalCluster(servers=2, workers=2) as cluster, ps.Client(cluster.address) as client:
        job = client.submit(demo_spec("mlp", epochs=10))
        for ev in job.events(timeout=120):
            if ev.tasks_done >= 4:
                break
        t0 = time.monotonic()
        cluster.kill_scheduler()
        time.sleep(outage_s)
        cluster.start_scheduler()
        while True:
            try:
                view = client.cluster()
                if len(view.workers) == 2 and sum(s.state == "up" for s in view.servers) == 2 and \
                        all(w.last_heartbeat_age_s < 0.5 for w in view.workers) and \
                        all(s.last_heartbeat_age_s < 0.5 for s in view.servers):
                    break
            except ps.errors.PSError:
                pass
            time.sleep(0.02)
        back = time.monotonic() - t0
        trained = job.wait(progress=False, timeout=300)
        info = job.info()
    result = {"outage_s": outage_s, "members_back_s": round(back, 2), "state": info.state,
              "test_accuracy": round(trained.metrics["test_accuracy"], 4)}
    echo(f"scheduler kill, back after {outage_s:g} s: members heartbeating again {back:.2f} s after the kill; "
         f"job {info.state} at {result['test_accuracy']:.4f}")
    return result


def failover(echo: Callable[[str], None] = print) -> dict:
    return {"server_default": server_kill([], echo),
            "server_fast": server_kill(["--heartbeat-interval", "0.25", "--server-timeout", "1.5"], echo),
            "scheduler": scheduler_kill(echo=echo)}
