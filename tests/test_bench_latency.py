"""`paramserver bench latency` runs end to end and reports consistent percentiles."""

from __future__ import annotations

from ps.bench_latency import latency


def test_latency_reports_percentiles_of_every_path_and_the_raw_echo():
    r = latency(size=1024, seconds=0.6, echo=lambda line: None)
    assert r["size_bytes"] == 1024 and r["calls"] >= 100 and r["batch_bytes"] == 64 << 10
    for key in ("", "unary_", "grpc_", "streamed_"):
        assert 0 < r[f"{key}p50_us"] <= r[f"{key}p99_us"], r
    for key in ("", "unary_", "streamed_"):
        assert r[f"{key}p50_vs_grpc"] == round(r[f"{key}p50_us"] / r["grpc_p50_us"], 3)
