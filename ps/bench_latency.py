"""`paramserver bench latency`: the round trip of a small push_pull (1 KiB of float32 by default, one
server) against a raw grpcio unary echo of the same bytes to a plain grpc server process, measured
call by call in alternating rounds of the same run; percentiles in microseconds."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ps.bench import ECHO_UNARY, ROUNDS, EchoCeiling


def _samples(fn: Callable[[], object], seconds: float, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(out) < 100:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _us(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1e6, 1)


def latency(size: int = 1024, seconds: float = 6.0, echo: Callable[[str], None] = print) -> dict:
    from ps.client import Client
    from ps.local import LocalCluster
    n = max(size // 4, 1)
    with LocalCluster(servers=1) as cluster, Client(cluster.address) as client, \
            Client(cluster.address, local=False) as remote, \
            Client(cluster.address, local=False, batch_bytes=0) as streaming, EchoCeiling(size, 1, size) as ceiling:
        model = client.create_model("latency", {"w": np.zeros(n, np.float32)}, optimizer={"name": "sgd", "lr": 1e-6})
        # the same push_pull as a client on this host sends it (through shared memory), as one on another
        # host does (one unary call, up to batch_bytes), and as a stream (what a bigger model's shards get)
        paths = {"": model, "unary_": remote.model("latency"), "streamed_": streaming.model("latency")}
        grad, out = {"w": np.full(n, 1e-3, np.float32)}, {"w": np.empty(n, np.float32)}
        unary = ceiling.channels[0].unary_unary(ECHO_UNARY)
        payload = ceiling.payload[:size]
        times = {key: [] for key in (*paths, "grpc_")}
        share = seconds / ROUNDS / (len(paths) + 1)
        for _ in range(ROUNDS):  # alternate, so a busy moment does not land on one side only
            for key, m in paths.items():
                times[key] += _samples(lambda: m.push_pull(grad, out=out), share)
            times["grpc_"] += _samples(lambda: unary(payload, timeout=10), share)
    result = {"size_bytes": 4 * n, "calls": len(times[""]), "batch_bytes": client.batch_bytes}
    for key, samples in times.items():
        result[f"{key}p50_us"], result[f"{key}p99_us"] = _us(samples, 50), _us(samples, 99)
    for key in paths:
        result[f"{key}p50_vs_grpc"] = round(result[f"{key}p50_us"] / result["grpc_p50_us"], 3)
    echo(f"push_pull of {4 * n:,} bytes, 1 server: p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us "
         f"(same host: shared memory); as from another host, one unary call: p50 {result['unary_p50_us']:.0f} us; "
         f"streamed: p50 {result['streamed_p50_us']:.0f} us")
    echo(f"raw grpcio unary echo of the same bytes: p50 {result['grpc_p50_us']:.0f} us, p99 "
         f"{result['grpc_p99_us']:.0f} us")
    echo(f"p50 / raw grpc: {result['p50_vs_grpc']:.2f} (unary: {result['unary_p50_vs_grpc']:.2f}, streamed: "
         f"{result['streamed_p50_vs_grpc']:.2f})")
    return result
