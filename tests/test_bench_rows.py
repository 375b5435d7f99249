"""`paramserver bench rows` on a tiny config: its figures are there, and the servers hold exactly
what the pushes it reports would leave (every row it touched, each updated once per push of its id)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ps
from ps import sharding
from ps.bench_rows import GRAD, MODEL, batch_ids, rows, table_name

pytestmark = pytest.mark.timeout(300)
WIDTH, BATCH = 8, 1000


def test_bench_rows_reports_its_figures_and_the_servers_hold_exactly_its_pushes():
    lines: list[str] = []
    with ps.LocalCluster(servers=2) as cluster, cluster.client() as client:
        result = rows(widths=(WIDTH,), batches=(BATCH,), seconds=0.5, as_json=True, cluster=cluster,
                      optimizer={"name": "sgd", "lr": 1.0}, echo=lines.append)
        assert json.loads(lines[-1]) == result
        assert result["servers"] == 2 and result["seconds"] == 0.5
        (case,) = result["cases"]
        assert (case["width"], case["batch"]) == (WIDTH, BATCH)
        for key in ("rows_per_s", "gbps", "grpc_gbps", "vs_grpc"):
            assert case[key] > 0, key
        assert case["vs_grpc"] == pytest.approx(case["gbps"] / case["grpc_gbps"], rel=1e-2)

        # Recount from the rounds the bench says it made: each pushes its ids once (a batch of
        # 1000 ids is one message per server), and a zero row under sgd with lr 1 and gradients
        # GRAD reads -GRAD x the times its id was pushed.
        pushed = np.concatenate([batch_ids(BATCH, r) for r in range(case["pushes"])])
        ids, times = np.unique(pushed, return_counts=True)
        assert case["push_messages"] == 2 * case["pushes"]
        model = client.model(MODEL)
        table = table_name(WIDTH)
        held = [sum(t.rows for m in client.stats(a).models if m.model == MODEL for t in m.tables if t.name == table)
                for a in model.shards]
        assert held == np.bincount(sharding.row_shards(ids, 2), minlength=2).tolist()
        np.testing.assert_array_equal(model.pull_rows(table, ids),
                                      np.repeat((-GRAD * times).astype(np.float32)[:, None], WIDTH, 1))
