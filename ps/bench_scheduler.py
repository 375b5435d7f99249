"""`paramserver bench scheduler`: a real scheduler process driven over real gRPC by N
lightweight simulated workers (register, heartbeat every second, lease and complete tiny
tasks) and F followers of a running job; reports heartbeat and lease latency, the
scheduler's CPU per heartbeat and whether any member was marked down.

The simulated members run as coroutines on grpc.aio channels in this process, so the load
generator shares the machine with the scheduler: on a small machine its own CPU is part of
what bends the curve (the report says how busy this process was)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import time
from typing import Callable

import grpc

from ps.v1 import scheduler_pb2, scheduler_pb2_grpc

#: what a simulated worker reports for the job's inspect task: 20 train tasks per epoch, one parameter
_INSPECTION = {"prep": {"shards": 20, "n_train": 20_000, "n_test": 1_000, "input_shape": [1], "output_shape": [1],
                        "scaler": {"kind": "none"}},
               "params": {"w": {"kind": "zeros", "shape": [1], "dtype": "float32"}}}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _drive(address: str, members: int, followers: int, seconds: float, task_s: float,
                 scheduler_pid: int) -> dict:
    loop = asyncio.get_running_loop()
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, members // 250))]
    stubs = [scheduler_pb2_grpc.SchedulerStub(ch) for ch in channels]
    spec = {"name": "bench-scheduler", "epochs": 100_000, "workers": members, "lease_timeout_s": 60.0,
            "data": {"uri": "synthetic:classification?n=1000"}}
    job = await stubs[0].SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)), timeout=30)
    heartbeats: list[float] = []
    leases: list[float] = []
    counts = {"registered": 0, "tasks": 0, "events": 0, "errors": 0}
    measuring = asyncio.Event()
    stop = asyncio.Event()

    async def member(i: int) -> None:
        stub = stubs[i % len(stubs)]
        await asyncio.sleep(random.random())  # spread registrations and heartbeats over a second
        wid = (await stub.RegisterWorker(scheduler_pb2.RegisterWorkerRequest(name=f"sim-{i}", device="cpu"),
                                         timeout=30)).worker_id
        counts["registered"] += 1
        task, done_at = None, 0.0
        tick = loop.time()
        while not stop.is_set():
            try:
                t0 = time.perf_counter()
                await stub.WorkerHeartbeat(scheduler_pb2.WorkerHeartbeatRequest(worker_id=wid), timeout=30)
                if measuring.is_set():
                    heartbeats.append(time.perf_counter() - t0)
                if task is not None and loop.time() >= done_at:
                    result = json.dumps(_INSPECTION) if task.kind == "inspect" else ""
                    await stub.CompleteTask(scheduler_pb2.CompleteTaskRequest(
                        worker_id=wid, task_id=task.task_id, lease_id=task.lease_id, samples=1000, steps=1,
                        correct=900, loss_sum=100.0, result_json=result), timeout=30)
                    counts["tasks"] += 1
                    task = None
                if task is None:
                    t0 = time.perf_counter()
                    resp = await stub.LeaseTask(scheduler_pb2.LeaseTaskRequest(worker_id=wid), timeout=30)
                    if measuring.is_set():
                        leases.append(time.perf_counter() - t0)
                    if resp.HasField("task"):
                        task, done_at = resp.task, loop.time() + task_s
            except grpc.aio.AioRpcError:
                counts["errors"] += 1
            tick += 1.0
            await asyncio.sleep(max(0.0, tick - loop.time()))

    async def follower(i: int) -> None:
        stub = stubs[i % len(stubs)]
        call = stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job.job_id))
        try:
            async for _ in call:
                counts["events"] += 1
                if stop.is_set():
                    break
        except grpc.aio.AioRpcError:
            if not stop.is_set():
                counts["errors"] += 1
        finally:
            call.cancel()

    tasks = [asyncio.create_task(member(i)) for i in range(members)]
    tasks += [asyncio.create_task(follower(i)) for i in range(followers)]
    deadline = loop.time() + 60 + members / 100
    while counts["registered"] < members and loop.time() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # warm up: every member heartbeating
    cpu0, own0, wall0, events0 = (_cpu_seconds(scheduler_pid), resource.getrusage(resource.RUSAGE_SELF),
                                  time.perf_counter(), counts["events"])
    measuring.set()
    await asyncio.sleep(seconds)
    measuring.clear()
    cpu1, own1, wall1 = _cpu_seconds(scheduler_pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    wall = wall1 - wall0
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    return {"members": members, "followers": followers, "registered": counts["registered"],
            "heartbeats_per_s": len(heartbeats) / wall, "heartbeat_p50_ms": _percentile(heartbeats, 0.5) * 1e3,
            "heartbeat_p99_ms": _percentile(heartbeats, 0.99) * 1e3,
            "lease_p50_ms": _percentile(leases, 0.5) * 1e3, "lease_p99_ms": _percentile(leases, 0.99) * 1e3,
            "cpu_per_heartbeat_us": (cpu1 - cpu0) / max(len(heartbeats), 1) * 1e6,
            "scheduler_cpu": (cpu1 - cpu0) / wall, "load_generator_cpu": own / wall,
            "tasks_completed": counts["tasks"], "follower_events_per_s": (counts["events"] - events0) / wall,
            "rpc_errors": counts["errors"], "seconds": wall}


def scheduler(members: int, followers: int, seconds: float = 10.0, task_s: float = 5.0,
              echo: Callable[[str], None] = print) -> dict:
    """Drive a fresh scheduler (with one server, for the job's parameters) and report."""
    from ps.local import LocalCluster
    with LocalCluster(servers=1, scheduler_args=["--log-level", "warning"]) as cluster:
        result = asyncio.run(_drive(cluster.address, members, followers, seconds, task_s,
                                    cluster.scheduler.popen.pid))
        log = cluster.scheduler.log.read_text(errors="replace")
    result["marked_down"] = log.count(" is down: ") + log.count(" is gone: ")
    echo(f"{members} members, {followers} followers: heartbeat p50 {result['heartbeat_p50_ms']:.1f} ms, "
         f"p99 {result['heartbeat_p99_ms']:.1f} ms; lease p99 {result['lease_p99_ms']:.1f} ms; "
         f"{result['cpu_per_heartbeat_us']:.0f} us of scheduler CPU per heartbeat "
         f"(scheduler {result['scheduler_cpu']:.2f} cores, load generator {result['load_generator_cpu']:.2f}); "
         f"marked down: {result['marked_down']}")
    return result
