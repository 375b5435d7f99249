"""Sparse tables through real servers: rows spread over the shards by id, initial rows that depend
on the seed and the id alone, per-row optimizers equal to one table fed the same pushes, exactly
once, messages cut to size, per-table stats, and bad input refused with nothing changed."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import ps
from ps import sharding, sparse
from ps.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from ps.server.sparse import RowInit, SparseTable, TableSpec, initial_rows
from ps.tensor import dtype_code
from ps.v1 import server_pb2, tensor_pb2

pytestmark = pytest.mark.timeout(300)
WIDTH = 8


@pytest.fixture(scope="module")
def cluster():
    with ps.LocalCluster(servers=2) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with cluster.client() as c:
        yield c


def table_rows(client, model, table):
    return {s.address: {t.name: t.rows for m in client.stats(s.address).models if m.model == model
                        for t in m.tables} for s in client.cluster().servers}


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "lr": 0.5}, {"name": "adagrad", "lr": 0.1},
                                       {"name": "adam", "lr": 0.01}, {"name": "ftrl", "lr": 0.1, "l1": 0.5}])
def test_rows_over_two_servers_equal_one_table_fed_the_same_pushes(client, optimizer):
    init = ps.Init("normal", (), std=0.1, seed=7)
    model = client.create_model(f"emb-{optimizer['name']}", {"emb": ps.SparseTable(WIDTH, init)}, optimizer=optimizer,
                                replace=True)
    reference = SparseTable(TableSpec("emb", WIDTH, init=RowInit("normal", 7, std=0.1)), optimizer)
    rng = np.random.default_rng(0)
    ids = rng.integers(-2**62, 2**62, 50, dtype=np.int64)
    np.testing.assert_array_equal(model.pull_rows("emb", ids), initial_rows(RowInit("normal", 7, std=0.1), ids, WIDTH))
    np.testing.assert_array_equal(model.pull_rows("emb", ids), reference.pull(ids))
    applied = 0
    for step in range(5):
        batch = rng.choice(ids, 80)  # repeats: their gradients are summed first
        grads = rng.normal(size=(80, WIDTH)).astype(np.float32)
        applied += model.push_rows("emb", batch, grads)
        reference.push(batch, grads, "ref", step + 1)
    shards = sharding.row_shards(ids, 2)
    assert applied == 5 * len(set(shards.tolist()))  # one message per shard per push: all applied
    np.testing.assert_allclose(model.pull_rows("emb", ids), reference.pull(ids), rtol=1e-6, atol=1e-7)
    held = table_rows(client, model.name, "emb")
    assert sorted(held[a]["emb"] for a in held) == sorted(np.bincount(shards, minlength=2).tolist())
    client.delete_model(model.name)


def test_a_replayed_push_is_acknowledged_and_not_applied(client):
    model = client.create_model("once", {"emb": ps.SparseTable(WIDTH)}, optimizer={"name": "sgd", "lr": 1.0},
                                replace=True)
    ids = np.array([3, 3, 11], np.int64)
    shard = int(sharding.row_shards(np.array([3]), 2)[0])
    stub = client.server(model.shards[shard])
    mine = ids[sharding.row_shards(ids, 2) == shard]
    req = server_pb2.PushRowsRequest(model="once", table="emb", client_id="c1", seq=10, ids=sparse.encode_ids(mine),
                                     grads=tensor_pb2.Tensor(dtype=dtype_code(np.float32), shape=[len(mine), WIDTH],
                                                             data=np.ones((len(mine), WIDTH), np.float32).tobytes()))
    assert stub.PushRows(req, timeout=10).applied
    assert not stub.PushRows(req, timeout=10).applied          # the same (client, seq): a retry
    assert not stub.PushRows(server_pb2.PushRowsRequest(**{**_fields(req), "seq": 9}), timeout=10).applied
    np.testing.assert_array_equal(model.pull_rows("emb", np.array([3]))[0], np.full(WIDTH, -2.0, np.float32))
    client.delete_model("once")


def _fields(msg) -> dict:
    return {f.name: v for f, v in msg.ListFields()}


def test_big_batches_are_cut_into_messages_that_fit(client):
    model = client.create_model("wide", {"emb": ps.SparseTable(64)}, optimizer={"name": "sgd", "lr": 1.0},
                                replace=True)
    ids = np.arange(100_000, dtype=np.int64) * 7919  # 100k rows x 64 floats: 25.6 MB, over a 16 MiB message
    assert model.push_rows("emb", ids, np.ones((len(ids), 64), np.float32)) >= 2 * 2
    rows = model.pull_rows("emb", ids)
    assert rows.shape == (100_000, 64)
    np.testing.assert_array_equal(rows, np.full((100_000, 64), -1.0, np.float32))
    assert sum(v["emb"] for v in table_rows(client, "wide", "emb").values()) == 100_000
    client.delete_model("wide")


def test_bad_input_gets_a_clear_error_and_changes_nothing(client):
    model = client.create_model("bad", {"emb": ps.SparseTable(WIDTH), "w": np.zeros(4, np.float32)},
                                optimizer={"name": "sgd", "lr": 1.0}, replace=True)
    ids = np.array([1, 2, 3], np.int64)
    model.push_rows("emb", ids, np.ones((3, WIDTH), np.float32))
    before = model.pull_rows("emb", ids)
    with pytest.raises(NotFound, match="has no sparse table 'nope'"):
        model.pull_rows("nope", ids)
    with pytest.raises(InvalidArgument, match=r"gradients of shape \[3, 7\], expected \[3, 8\]"):
        model.push_rows("emb", ids, np.ones((3, 7), np.float32))
    with pytest.raises(InvalidArgument, match="outside the int64 range"):
        model.pull_rows("emb", np.array([2**63], np.uint64))
    with pytest.raises(InvalidArgument, match="ids must be a 1-D array of integers"):
        model.pull_rows("emb", np.array([1.5]))
    stub = client.server(model.shards[0])
    for req, text in ((server_pb2.PullRowsRequest(model="bad", table="emb", ids=b"1234567"), "8 bytes each"),
                      (server_pb2.PushRowsRequest(model="bad", table="emb", client_id="x", seq=1,
                                                  ids=sparse.encode_ids(np.array([2])),
                                                  grads=tensor_pb2.Tensor(dtype=dtype_code(np.float32),
                                                                          shape=[1, WIDTH + 1],
                                                                          data=bytes(4 * (WIDTH + 1)))), "expected [1, 8]"),
                      (server_pb2.PushRowsRequest(model="bad", table="emb", client_id="x", seq=2,
                                                  ids=sparse.encode_ids(np.array([2, 4])),
                                                  grads=tensor_pb2.Tensor(dtype=dtype_code(np.float32), shape=[2, WIDTH],
                                                                          data=np.full((2, WIDTH), np.nan,
                                                                                       np.float32).tobytes())),
                       "finite")):
        method = stub.PullRows if isinstance(req, server_pb2.PullRowsRequest) else stub.PushRows
        with pytest.raises(grpc.RpcError) as err:
            method(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details(), err.value
    np.testing.assert_array_equal(model.pull_rows("emb", ids), before)
    client.delete_model("bad")


def test_what_sparse_tables_do_not_do_yet_is_refused_not_lost(client, tmp_path):
    with pytest.raises(InvalidArgument, match="sparse tables are not replicated yet: replicas must be 1, got 2"):
        client.create_model("r2", {"emb": ps.SparseTable(4)}, replicas=2)
    model = client.create_model("ck", {"emb": ps.SparseTable(4)}, replace=True)
    assert model.replicas == [[a] for a in model.shards] or all(len(r) == 1 for r in model.replicas)
    with pytest.raises(FailedPrecondition, match="checkpoints of sparse tables are not written yet"):
        client.call(client.server(model.shards[0]).Checkpoint,
                    server_pb2.CheckpointRequest(model="ck", url=str(tmp_path), shard="s0"), "checkpoint")
    with pytest.raises(InvalidArgument, match="ftrl updates sparse tables only"):
        client.create_model("mixed", {"emb": ps.SparseTable(4), "w": np.zeros(4, np.float32)}, optimizer="ftrl")
    with pytest.raises(InvalidArgument, match="not supported by sparse tables|unknown optimizer 'momentum'"):
        client.create_model("mom", {"emb": ps.SparseTable(4)}, optimizer="momentum")
    assert not {"mixed", "mom", "r2"} & set(client.cluster().models)
    client.delete_model("ck")


def test_a_user_reads_and_pushes_only_its_own_tables():
    with ps.LocalCluster(servers=1, auth=True, users={"bob": ""}) as c, c.client() as alice, \
            ps.Client(c.address, token=c.tokens["bob"]) as bob:
        model = alice.create_model("a", {"emb": ps.SparseTable(4)}, optimizer={"name": "sgd", "lr": 1.0})
        ids = np.array([1, 2], np.int64)
        model.push_rows("emb", ids, np.ones((2, 4), np.float32))
        stub = bob.server(model.shards[0])
        for call in (lambda: stub.PullRows(server_pb2.PullRowsRequest(model="a", table="emb",
                                                                      ids=sparse.encode_ids(ids)), timeout=10),
                     lambda: stub.PushRows(server_pb2.PushRowsRequest(
                         model="a", table="emb", client_id="b", seq=1, ids=sparse.encode_ids(ids),
                         grads=tensor_pb2.Tensor(dtype=dtype_code(np.float32), shape=[2, 4],
                                                 data=np.ones((2, 4), np.float32).tobytes())), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "('user')" in err.value.details()
        with pytest.raises(PermissionDenied):
            bob.model("a")
        np.testing.assert_array_equal(model.pull_rows("emb", ids), -np.ones((2, 4), np.float32))


def test_status_shows_rows_and_bytes_per_table(cluster, client):
    import json
    import subprocess
    import sys
    model = client.create_model("shown", {"emb": ps.SparseTable(WIDTH)}, replace=True)
    model.pull_rows("emb", np.arange(1000, dtype=np.int64))
    out = subprocess.run([sys.executable, "-m", "ps", "status", cluster.address], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sparse table shown/emb: 1000 rows, " in out.stdout
    out = subprocess.run([sys.executable, "-m", "ps", "status", cluster.address, "--json"], capture_output=True,
                         text=True, timeout=60)
    tables = json.loads(out.stdout.strip().splitlines()[-1])["tables"]
    shown = [t for t in tables if t["model"] == "shown"]
    assert [(t["table"], t["rows"]) for t in shown] == [("emb", 1000)]
    assert shown[0]["bytes"] >= 1000 * WIDTH * 4
    client.delete_model("shown")


def test_rows_untouched_for_evict_after_steps_are_dropped_by_the_server(client):
    from conftest import wait_for
    model = client.create_model("ev", {"emb": ps.SparseTable(WIDTH, evict_after=2)}, replace=True)
    old = np.array([1], np.int64)
    shard = int(sharding.row_shards(old, 2)[0])
    new = next(np.array([i], np.int64) for i in range(2, 100) if sharding.row_shards(np.array([i]), 2)[0] == shard)
    model.push_rows("emb", old, np.ones((1, WIDTH), np.float32))
    for _ in range(3):  # the table's clock moves on; `old` is not touched
        model.push_rows("emb", new, np.ones((1, WIDTH), np.float32))
    address = model.shards[shard]
    rows = lambda: {t.name: t.rows for m in client.stats(address).models if m.model == "ev" for t in m.tables}["emb"]
    wait_for(lambda: rows() == 1, timeout=30, what="the untouched row evicted (by the server's heartbeat loop)")
    np.testing.assert_array_equal(model.pull_rows("emb", old), np.zeros((1, WIDTH), np.float32))  # initial again
    client.delete_model("ev")


def test_a_shard_over_its_memory_limit_refuses_new_rows_naming_the_limit():
    with ps.LocalCluster(servers=1, server_args=["--max-bytes", "200KiB"]) as c, c.client() as client:
        model = client.create_model("big", {"emb": ps.SparseTable(64)}, optimizer={"name": "sgd", "lr": 1.0})
        pushed = 0
        with pytest.raises(ps.ResourceExhausted, match="over its limit 204800 .*sparse tables grow with every new id"):
            for i in range(100):
                ids = np.arange(i * 100, (i + 1) * 100, dtype=np.int64)
                model.push_rows("emb", ids, np.ones((100, 64), np.float32))
                pushed += 100
        assert 0 < pushed < 10_000
        held = {t.name: t.rows for m in client.stats(model.shards[0]).models for t in m.tables}["emb"]
        assert held == pushed  # the refused push stored nothing
