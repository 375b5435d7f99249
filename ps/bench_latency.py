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
            Client(cluster.address, local=False) as streaming, EchoCeiling(size, 1, size) as ceiling:
        model = client.create_model("latency", {"w": np.zeros(n, np.float32)}, optimizer={"name": "sgd", "lr": 1e-6})
        streamed = streaming.model("latency")
        grad, out = {"w": np.full(n, 1e-3, np.float32)}, {"w": np.empty(n, np.float32)}
        unary = ceiling.channels[0].unary_unary(ECHO_UNARY)
        payload = ceiling.payload[:size]
        ours, theirs, streamed_ = [], [], []
        for _ in range(ROUNDS):  # alternate, so a busy moment does not land on one side only
            ours += _samples(lambda: model.push_pull(grad, out=out), seconds / ROUNDS / 3)
            theirs += _samples(lambda: unary(payload, timeout=10), seconds / ROUNDS / 3)
            streamed_ += _samples(lambda: streamed.push_pull(grad, out=out), seconds / ROUNDS / 3)
    result = {"size_bytes": 4 * n, "calls": len(ours),
              "p50_us": _us(ours, 50), "p99_us": _us(ours, 99),
              "grpc_p50_us": _us(theirs, 50), "grpc_p99_us": _us(theirs, 99),
              "streamed_p50_us": _us(streamed_, 50), "streamed_p99_us": _us(streamed_, 99)}
    result["p50_vs_grpc"] = round(result["p50_us"] / result["grpc_p50_us"], 3)
    result["streamed_p50_vs_grpc"] = round(result["streamed_p50_us"] / result["grpc_p50_us"], 3)
    echo(f"push_pull of {4 * n:,} bytes, 1 server: p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us "
         f"(shared memory); streamed over gRPC: p50 {result['streamed_p50_us']:.0f} us, p99 "
         f"{result['streamed_p99_us']:.0f} us")
    echo(f"raw grpcio unary echo of the same bytes: p50 {result['grpc_p50_us']:.0f} us, p99 "
         f"{result['grpc_p99_us']:.0f} us")
    echo(f"p50 / raw grpc: {result['p50_vs_grpc']:.2f} (streamed: {result['streamed_p50_vs_grpc']:.2f})")
    return result
