"""`paramserver bench pushpull --tls` on a small model: every figure it prints is in its JSON, and the
TLS ones are computed from the same rounds (grpc's own TLS cost, the raw echo under the same mutual TLS,
beside ours). Figures, not speed targets: those live in the README."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)
PARAMSERVER = [sys.executable, "-m", "ps"]


def test_bench_pushpull_with_tls_reports_the_tls_echo_beside_its_own_figures():
    out = subprocess.run([*PARAMSERVER, "bench", "pushpull", "--size", "1MiB", "--seconds", "0.3", "--tls", "--json"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    result = json.loads(lines[-1])
    for key in ("pushpull_gbps", "pushpull_grpc_gbps", "grpc_ceiling_gbps", "tls_gbps", "tls_grpc_gbps",
                "tls_echo_gbps", "tls_echo_to_plaintext_echo_ratio", "tls_grpc_to_plaintext_grpc_ratio"):
        assert result[key] > 0, key
    assert result["size_bytes"] == 1 << 20 and result["servers"] == 2
    assert result["tls_grpc_vs_tls_echo"] == pytest.approx(result["tls_grpc_gbps"] / result["tls_echo_gbps"], abs=2e-3)
    assert result["tls_echo_to_plaintext_echo_ratio"] == pytest.approx(
        result["tls_echo_gbps"] / result["grpc_ceiling_gbps"], rel=0.01)
    assert any(line.startswith("raw grpcio echo under the same mutual TLS: ") for line in lines)
