"""Parameter servers over real gRPC: push, pull, push_pull, exactly-once, bad input, health."""

from __future__ import annotations

import itertools
import re
import threading

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import ps
from ps import initializers, rpc
from ps.tensor import dtype_code, encode
from ps.v1 import server_pb2, server_pb2_grpc, tensor_pb2

from conftest import versions, wait_for


@pytest.fixture(params=[(False, 0), (False, None), (True, None)], ids=["streamed", "grpc", "shared-memory"])
def client(cluster, request):
    """Each test three times: pushes streamed over gRPC, over gRPC as a client on another host sends them
    (small ones in one unary call each), and through shared memory (servers on this host)."""
    local, batch_bytes = request.param
    with ps.Client(cluster.address, local=local, batch_bytes=batch_bytes) as c:
        yield c


def sgd_model(client, name, values, lr=0.5, **kw):
    return client.create_model(name, values, optimizer={"name": "sgd", "lr": lr}, replace=True, **kw)


def test_push_applies_sgd_on_the_servers_and_pull_reassembles(client):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 70)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    # A small slice limit cuts 'w' into many slices over both shards.
    model = sgd_model(client, "sgd", {"w": w, "b": b}, max_slice_bytes=4096)
    assert {s.shard for s in model.slices if s.tensor == "w"} == {0, 1}
    gw, gb = rng.standard_normal(w.shape).astype(np.float32), np.ones(70, np.float32)
    model.push({"w": gw, "b": gb})
    got = model.pull()
    np.testing.assert_array_equal(got["w"], w - np.float32(0.5) * gw)
    np.testing.assert_array_equal(got["b"], b - np.float32(0.5))
    assert model.version == 1
    fresh = model.push_pull({"w": gw, "b": gb})
    np.testing.assert_array_equal(fresh["w"], w - np.float32(0.5) * gw - np.float32(0.5) * gw)
    assert model.version == 2
    model.delete()


def test_initializers_give_the_same_values_however_the_tensor_is_sharded(client):
    init = ps.Init("glorot_uniform", (257, 129), seed=7)
    model = client.create_model("init", {"w": init, "n": ps.Init("normal", (1000,), std=0.1, seed=3),
                                         "c": ps.Init("constant", (5,), value=2.5)},
                                replace=True, max_slice_bytes=2048)
    assert len({s.shard for s in model.slices}) == 2
    got = model.pull()
    np.testing.assert_array_equal(got["w"], initializers.full(init, "w"))
    np.testing.assert_array_equal(got["c"], np.full(5, 2.5, np.float32))
    limit = np.sqrt(6 / (257 + 129))
    assert np.abs(got["w"]).max() <= limit and got["w"].std() > limit / 2
    assert abs(float(got["n"].std()) - 0.1) < 0.01
    model.delete()


def test_a_256_mib_tensor_pushes_and_pulls_with_default_settings(client):
    n = 256 * 2**20 // 4
    model = client.create_model("big", {"w": ps.Init("zeros", (n,))}, optimizer={"name": "sgd", "lr": 1.0},
                                replace=True)
    grad = np.arange(n, dtype=np.float32)
    fresh = model.push_pull({"w": grad})
    assert fresh["w"][0] == 0 and fresh["w"][-1] == -(n - 1)
    np.testing.assert_array_equal(fresh["w"], -grad)
    del fresh
    model.push({"w": grad})
    np.testing.assert_array_equal(model.pull()["w"], -2 * grad)
    model.delete()


def raw_push(stub, model, tensor, offset, values, client_id="raw", seq=1, **kw):
    req = server_pb2.PushRequest(model=model, client_id=client_id, seq=seq,
                                 chunk=tensor_pb2.Chunk(tensor=tensor, offset=offset, values=encode(values)), **kw)
    return stub.Push(iter([req]), timeout=10)


@pytest.fixture
def raw(client):
    """A plain grpc stub on shard 0 and a model whose tensors all live there."""
    model = sgd_model(client, "raw", {"w": np.zeros(8, np.float32)}, lr=1.0)
    address = model.shards[model.slices[0].shard]
    assert all(model.shards[s.shard] == address for s in model.slices)
    with grpc.insecure_channel(address) as ch:
        yield server_pb2_grpc.ParameterServerStub(ch), model, ch
    model.delete()


def test_retried_push_is_applied_once(raw):
    stub, model, _ = raw
    g = np.ones(8, np.float32)
    assert raw_push(stub, "raw", "w", 0, g, seq=1).applied == 1
    again = raw_push(stub, "raw", "w", 0, g, seq=1)
    assert (again.applied, again.duplicates) == (0, 1)
    np.testing.assert_array_equal(model.pull()["w"], -g)
    assert raw_push(stub, "raw", "w", 0, g, seq=2).applied == 1
    np.testing.assert_array_equal(model.pull()["w"], -2 * g)
    assert raw_push(stub, "raw", "w", 0, g, seq=1).duplicates == 1
    np.testing.assert_array_equal(model.pull()["w"], -2 * g)


BAD_PUSHES = [
    (dict(model="nope", tensor="w", offset=0, values=np.ones(8, np.float32)),
     grpc.StatusCode.NOT_FOUND, "model 'nope' not found on this shard"),
    (dict(model="raw", tensor="zz", offset=0, values=np.ones(8, np.float32)),
     grpc.StatusCode.NOT_FOUND, "model 'raw' has no tensor 'zz' on this shard"),
    (dict(model="raw", tensor="w", offset=0, values=np.ones(8, np.float64)),
     grpc.StatusCode.INVALID_ARGUMENT, "push to 'raw/w' [0, 8): expected float32, got float64"),
    (dict(model="raw", tensor="w", offset=4, values=np.ones(8, np.float32)),
     grpc.StatusCode.INVALID_ARGUMENT, "range [4, 12) of 'raw/w' is not held by this shard (it holds [0, 8))"),
    (dict(model="raw", tensor="w", offset=0, values=np.array([1, np.nan, 1, 1, np.inf, 1, 1, 1], np.float32)),
     grpc.StatusCode.INVALID_ARGUMENT, "push to 'raw/w' [0, 8): 2 non-finite value(s), first at element 1: nan"),
    (dict(model="raw", tensor="w", offset=0, values=np.ones((2, 4), np.float32)),
     grpc.StatusCode.INVALID_ARGUMENT, "expected a 1-D chunk, got shape [2, 4]"),
]


@pytest.mark.parametrize("bad,code,message", BAD_PUSHES, ids=["unknown-model", "unknown-tensor", "wrong-dtype",
                                                              "range-not-held", "non-finite", "not-1d"])
def test_bad_push_is_rejected_with_a_precise_status_and_changes_nothing(raw, bad, code, message):
    stub, model, _ = raw
    before = model.pull()
    with pytest.raises(grpc.RpcError) as err:
        raw_push(stub, **bad, seq=100)
    assert err.value.code() == code
    assert message in err.value.details()
    after = model.pull()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert raw_push(stub, "raw", "w", 0, np.zeros(8, np.float32), seq=101).applied == 1  # still serving


def test_wrong_byte_length_is_invalid_argument(raw):
    stub, model, _ = raw
    req = server_pb2.PushRequest(model="raw", client_id="x", seq=1, chunk=tensor_pb2.Chunk(
        tensor="w", offset=0, values=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[8], data=b"\0" * 31)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter([req]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "push to 'raw/w' at offset 0: shape [8] of float32 needs 32 bytes, got 31" in err.value.details()
    np.testing.assert_array_equal(model.pull()["w"], np.zeros(8, np.float32))


def test_malformed_bytes_on_a_plain_channel_leave_the_shard_serving(raw):
    stub, model, ch = raw
    model.assign({"w": np.full(8, 3.0, np.float32)})
    garbage = b"\xff\xff\xff\xff\x0f\x12\x99garbage-that-is-not-protobuf"
    for method in ("CreateModel", "DeleteModel", "Stats"):
        call = ch.unary_unary(f"/ps.v1.ParameterServer/{method}")  # no serializer: raw bytes go out
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=10)
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    push = ch.stream_unary("/ps.v1.ParameterServer/Push")
    with pytest.raises(grpc.RpcError):
        push(iter([garbage]), timeout=10)
    np.testing.assert_array_equal(model.pull()["w"], np.full(8, 3.0, np.float32))
    assert rpc.check_health(model.shards[0]) == "SERVING"


def test_create_model_rejects_bad_specs_with_the_field_named(client):
    with pytest.raises(ps.InvalidArgument, match="unknown optimizer 'adamz'"):
        client.create_model("bad", {"w": np.zeros(3, np.float32)}, optimizer={"name": "adamz"})
    model = sgd_model(client, "dup", {"w": np.zeros(3, np.float32)})
    with pytest.raises(ps.AlreadyExists, match="model 'dup' already exists on this shard"):
        client.create_model("dup", {"w": np.zeros(3, np.float32)})
    model.delete()
    stub = server_pb2_grpc.ParameterServerStub(grpc.insecure_channel(model.shards[0]))
    bad = server_pb2.CreateModelRequest(model="ints", slices=[server_pb2.SliceSpec(
        tensor="w", shape=[4], dtype=tensor_pb2.INT32, offset=0, length=4)])
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateModel(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'w': parameters must be float32 or float64, got int32" in err.value.details()


def test_client_errors_carry_the_servers_message(client):
    model = sgd_model(client, "gone", {"w": np.zeros(5, np.float32)})
    with pytest.raises(ps.InvalidArgument, match=r"push to 'gone/w': expected shape \[5\], got \[4\]"):
        model.push({"w": np.zeros(4, np.float32)})
    with pytest.raises(ps.InvalidArgument, match=r"push to 'gone/w': 1 non-finite value\(s\)"):
        model.push({"w": np.array([0, 0, np.nan, 0, 0], np.float32)})
    stub = server_pb2_grpc.ParameterServerStub(grpc.insecure_channel(model.shards[model.slices[0].shard]))
    stub.DeleteModel(server_pb2.DeleteModelRequest(model="gone"), timeout=10)
    with pytest.raises(ps.NotFound, match="NOT_FOUND: model 'gone' not found on this shard"):
        model.push({"w": np.zeros(5, np.float32)})
    client.delete_model("gone")


def test_concurrent_pushes_to_one_slice_are_serialised(cluster):
    clients = [ps.Client(cluster.address) for _ in range(6)]
    try:
        model = sgd_model(clients[0], "race", {"w": np.zeros(1000, np.float64)}, lr=1.0)
        handles = [c.model("race") for c in clients]
        ones = {"w": np.ones(1000, np.float64)}

        def pusher(m):
            for _ in range(40):
                m.push(ones)
        threads = [threading.Thread(target=pusher, args=(m,)) for m in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_array_equal(model.pull()["w"], np.full(1000, -240.0))
        assert sum(s.max_version for s in model.stats()) == 240
        model.delete()
    finally:
        for c in clients:
            c.close()


def test_every_service_offers_health_and_reflection(cluster, client):
    addresses = [cluster.address] + [s.address for s in client.cluster().servers]
    for address in addresses:
        assert rpc.check_health(address) == "SERVING"
        with grpc.insecure_channel(address) as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert "grpc.health.v1.Health" in services
        assert services & {"ps.v1.ParameterServer", "ps.v1.Scheduler"}


def test_a_shards_small_part_goes_in_one_unary_call_and_its_retry_is_skipped(cluster):
    """From another host (no shared memory), a shard's part of up to batch_bytes travels in one
    PushBatch call; bigger parts are streamed. A retried batch is acknowledged, not applied again."""
    rng = np.random.default_rng(8)
    small, big = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(40_000).astype(np.float32)
    with ps.Client(cluster.address, local=False, batch_bytes=16 << 10) as c:
        model = sgd_model(c, "batched", {"small": small, "big": big}, lr=0.5, max_slice_bytes=64 << 10)
        calls = {"PushBatch": 0, "PushPull": 0, "PushAcked": 0}
        for address in set(model.shards):
            stub = c.server(address)
            for name in calls:
                def counted(*a, _real=getattr(stub, name), _name=name, **kw):
                    calls[_name] += 1
                    return _real(*a, **kw)
                setattr(stub, name, counted)
        g = rng.standard_normal(1000).astype(np.float32)
        fresh = model.push_pull({"small": g})
        np.testing.assert_allclose(fresh["small"], small - 0.5 * g, rtol=1e-6)
        assert calls == {"PushBatch": 1, "PushPull": 0, "PushAcked": 0}
        model.push({"small": g})
        assert calls["PushBatch"] == 2 and model.pull(["small"])["small"] == pytest.approx(small - g, rel=1e-5)
        # the retry of a batch: acknowledged, counted as a duplicate, not applied
        c._seqs = itertools.count(c.next_seq() - 1)
        model.push({"small": g})
        assert (model.pushes, model.duplicates) == (3, 1)
        np.testing.assert_allclose(model.pull(["small"])["small"], small - g, rtol=1e-5)
        # 160 KB in slices of at most 64 KiB: each shard's part is over 16 KiB, so it is streamed
        model.push_pull({"big": np.zeros_like(big)})
        assert calls["PushBatch"] == 3 and calls["PushPull"] == len({s.shard for s in model.slices if s.tensor == "big"})
        model.delete()


def test_apply_accumulated_applies_the_mean_once_clears_the_sum_and_refuses_bad_calls_changing_nothing(client):
    """bsp's step on the servers: members push negated gradients into an accumulator sliced like the
    model; one small call per shard applies their mean to the model and zeroes the accumulator."""
    from ps.spec import ACCUMULATOR_OPTIMIZER
    rng = np.random.default_rng(11)
    w = rng.standard_normal((40, 30)).astype(np.float32)
    model = sgd_model(client, "bspm", {"w": w}, lr=0.5, max_slice_bytes=1024)
    acc = client.create_model("bspm.acc", {"w": np.zeros_like(w)}, optimizer=ACCUMULATOR_OPTIMIZER, replace=True,
                              max_slice_bytes=1024)
    assert [(s.tensor, s.offset, s.length, s.shard) for s in acc.slices] == \
        [(s.tensor, s.offset, s.length, s.shard) for s in model.slices]
    assert len({s.shard for s in model.slices}) == 2
    grads = [rng.standard_normal(w.shape).astype(np.float32) for _ in range(3)]
    for g in grads:
        acc.push({"w": -g})
    model.apply_accumulated("bspm.acc", 3, seq=7)
    mean = (grads[0] + grads[1] + grads[2]) / np.float32(3)
    expected = w - np.float32(0.5) * mean
    np.testing.assert_allclose(model.pull()["w"], expected, rtol=1e-6, atol=1e-7)
    assert not acc.pull()["w"].any()
    assert (model.pushes, model.duplicates, model.version) == (1, 0, 1)
    # asked again through the same handle: answered, nothing new counted; a retry through another handle
    # (one whose first try's reply was lost): acknowledged, each slice a duplicate, not applied again
    model.apply_accumulated("bspm.acc", 3, seq=7)
    assert (model.pushes, model.duplicates) == (1, 0)
    retry = client.model("bspm")
    retry.apply_accumulated("bspm.acc", 3, seq=7)
    assert (retry.pushes, retry.duplicates, versions(client, "bspm")) == (1, len(model.slices), {1})
    np.testing.assert_allclose(model.pull()["w"], expected, rtol=1e-6, atol=1e-7)

    acc.push({"w": -grads[0]}, seq=9)  # tagged with the next step
    before = model.pull()["w"]
    sl = model.slices[0]
    with grpc.insecure_channel(model.shards[sl.shard]) as ch:
        stub = server_pb2_grpc.ParameterServerStub(ch)
        whole = server_pb2.Range(tensor="w", offset=sl.offset, length=sl.length)
        bad = [
            (dict(accumulator="bspm.acc", contributors=0, ranges=[whole]), grpc.StatusCode.INVALID_ARGUMENT,
             "apply accumulated 'bspm.acc' to 'bspm': contributors must be >= 1, got 0"),
            (dict(accumulator="bspm", contributors=1, ranges=[whole]), grpc.StatusCode.INVALID_ARGUMENT,
             "'bspm' is not an accumulator (its optimizer is sgd, not {'name': 'sgd', 'lr': 1.0})"),
            (dict(accumulator="nope", contributors=1, ranges=[whole]), grpc.StatusCode.NOT_FOUND,
             "model 'nope' not found on this shard"),
            (dict(accumulator="bspm.acc", contributors=1,
                  ranges=[whole, server_pb2.Range(tensor="w", offset=sl.offset, length=sl.length - 1)]),
             grpc.StatusCode.INVALID_ARGUMENT, f"[{sl.offset}, {sl.stop - 1}) of 'w' is not a whole slice of 'bspm'"),
        ]
        for fields, code, message in bad:
            with pytest.raises(grpc.RpcError) as err:
                stub.ApplyAccumulated(server_pb2.ApplyAccumulatedRequest(model="bspm", client_id="lead", seq=9,
                                                                         **fields), timeout=10)
            assert (err.value.code(), message in err.value.details()) == (code, True), err.value.details()
    np.testing.assert_array_equal(model.pull()["w"], before)
    np.testing.assert_array_equal(acc.pull()["w"], grads[0])
    with pytest.raises(ps.InvalidArgument, match="contributors must be an integer >= 1, got 0"):
        model.apply_accumulated("bspm.acc", 0, seq=9)
    model.apply_accumulated("bspm.acc", 1, seq=9)  # still serving
    np.testing.assert_allclose(model.pull()["w"], before - np.float32(0.5) * grads[0], rtol=1e-6, atol=1e-7)
    acc.delete()
    model.delete()


def test_gradients_tagged_with_a_step_are_averaged_by_their_count_and_a_late_one_is_refused(client):
    """bsp members tag their gradients with the step's id: the step's mean is over the gradients tagged
    with it, and one that comes after its step was applied (its sender was held up past its lease) is
    refused with ABORTED instead of landing in the next step's sum."""
    from ps.spec import ACCUMULATOR_OPTIMIZER
    rng = np.random.default_rng(12)
    w = rng.standard_normal(600).astype(np.float32)
    model = sgd_model(client, "tagged", {"w": w}, lr=1.0, max_slice_bytes=1024)
    acc = client.create_model("tagged.acc", {"w": np.zeros_like(w)}, optimizer=ACCUMULATOR_OPTIMIZER, replace=True,
                              max_slice_bytes=1024)
    g1, g2, late = (rng.standard_normal(600).astype(np.float32) for _ in range(3))
    with ps.Client(client.address, local=client.local, batch_bytes=client.batch_bytes) as other, \
            ps.Client(client.address, local=client.local, batch_bytes=client.batch_bytes) as stalled:
        acc.push({"w": -g1}, seq=5)
        other.model("tagged.acc").push({"w": -g2}, seq=5)
        model.apply_accumulated("tagged.acc", 3, seq=5)  # the scheduler counted 3 arrivals; 2 gradients came
        expected = w - (g1 + g2) / np.float32(2)
        np.testing.assert_allclose(model.pull()["w"], expected, rtol=1e-6, atol=1e-6)
        with pytest.raises(ps.errors.Aborted, match=r"step 5 was applied from this accumulator without it"):
            stalled.model("tagged.acc").push({"w": -late}, seq=5)
        assert not acc.pull()["w"].any()                 # the late gradient is not in the next step's sum
        acc.push({"w": -g1}, seq=5)                      # a retry of a gradient that was summed: skipped
        assert acc.duplicates == len(acc.slices) and not acc.pull()["w"].any()
        stalled.model("tagged.acc").push({"w": -late}, seq=6)  # the next step takes it
        model.apply_accumulated("tagged.acc", 1, seq=6)
        np.testing.assert_allclose(model.pull()["w"], expected - late, rtol=1e-5, atol=1e-5)
    acc.delete()
    model.delete()


def test_a_step_with_nothing_accumulated_applies_nothing_and_still_closes(client):
    """A scheduler that restarts between a step's apply and its report leads that step again under a new
    id; the accumulator is empty by then. A mean of nothing is no update: Adam's momentum would still move
    the weights, so nothing is applied and no push is counted, and the step is closed all the same."""
    from ps.spec import ACCUMULATOR_OPTIMIZER
    rng = np.random.default_rng(13)
    w = rng.standard_normal(3000).astype(np.float32)
    model = client.create_model("empty", {"w": w}, optimizer={"name": "adam", "lr": 0.01}, replace=True,
                                max_slice_bytes=4096)
    acc = client.create_model("empty.acc", {"w": np.zeros_like(w)}, optimizer=ACCUMULATOR_OPTIMIZER, replace=True,
                              max_slice_bytes=4096)
    g = rng.standard_normal(3000).astype(np.float32)
    acc.push({"w": -g}, seq=(1 << 24) + 1)
    assert model.apply_accumulated("empty.acc", 1, seq=(1 << 24) + 1) is True
    after_step = model.pull()["w"]
    assert not np.array_equal(after_step, w)
    assert (model.pushes, model.duplicates, versions(client, "empty")) == (1, 0, {1})

    assert model.apply_accumulated("empty.acc", 2, seq=(2 << 24) + 1) is True  # the rebuilt clock's first step
    np.testing.assert_array_equal(model.pull()["w"], after_step)
    assert (model.pushes, model.duplicates, versions(client, "empty")) == (1, 0, {1})
    with pytest.raises(ps.errors.Aborted, match=rf"step {(2 << 24) + 1} was applied from this accumulator"):
        acc.push({"w": -g}, seq=(2 << 24) + 1)
    # a leader late to a step closed since: answered closed, not counted, the sum (the next step's) left alone
    acc.push({"w": -g}, seq=(2 << 24) + 2)
    assert model.apply_accumulated("empty.acc", 1, seq=(1 << 24) + 1) is True
    assert (model.pushes, model.duplicates) == (1, 0)
    np.testing.assert_array_equal(acc.pull()["w"], g)
    assert model.apply_accumulated("empty.acc", 1, seq=(2 << 24) + 2) is True  # the next step applies as any
    assert versions(client, "empty") == {2} and model.pushes == 2
    acc.delete()
    model.delete()


def test_more_members_than_a_server_lets_wait_still_step_on_the_servers(cluster):
    """A server holds at most MAX_STEP_WAITERS waiting ApplyAccumulated calls (each takes a thread); one
    more is answered at once, ``busy``, and its client asks again until its wait is over instead of
    taking the step for missing: every member's call returns closed, the step applied once, counted once."""
    from ps.server.shard import MAX_STEP_WAITERS
    from ps.spec import ACCUMULATOR_OPTIMIZER
    members = MAX_STEP_WAITERS + 2
    w = np.arange(8, dtype=np.float32)
    with ps.Client(cluster.address) as owner:
        owner.create_model("many", {"w": w}, optimizer={"name": "sgd", "lr": 1.0}, replace=True)
        acc = owner.create_model("many.acc", {"w": np.zeros_like(w)}, optimizer=ACCUMULATOR_OPTIMIZER, replace=True)
        (sl,) = acc.slices
        leaders = [ps.Client(cluster.address, client_id="job:bsp") for _ in range(members)]
        try:
            handles = [c.model("many") for c in leaders]
            with grpc.insecure_channel(acc.shards[sl.shard]) as ch:
                stub = server_pb2_grpc.ParameterServerStub(ch)
                for i in range(members - 1):  # a gradient of ones from each member but the last, tagged with step 3
                    raw_push(stub, "many.acc", "w", 0, -np.ones(8, np.float32), client_id=f"m{i}", seq=3)
                results = {}

                def call(i):
                    results[i] = handles[i].apply_accumulated("many.acc", members, 3, members=members, wait_s=20,
                                                              member=f"m{i}")
                waiting = [threading.Thread(target=call, args=(i,)) for i in range(members - 1)]
                for t in waiting:
                    t.start()
                wait_for(lambda: owner.stats(acc.shards[sl.shard]).step_waiters == MAX_STEP_WAITERS, 30,
                         what="every waiting place on the server to be taken")
                raw_push(stub, "many.acc", "w", 0, -np.ones(8, np.float32), client_id=f"m{members - 1}", seq=3)
                call(members - 1)
                for t in waiting:
                    t.join(30)
            assert results == {i: True for i in range(members)}
            model = owner.model("many")
            np.testing.assert_array_equal(model.pull()["w"], w - 1)
            assert sum(h.pushes for h in handles) == 1 and model.version == 1  # its one slice: one update
            assert sum(h.duplicates for h in handles) == 0
        finally:
            for c in leaders:
                c.close()
        owner.model("many.acc").delete()
        owner.model("many").delete()


def test_members_step_on_the_servers_alone_applied_once_when_the_last_gradient_is_summed(client):
    """ps-lite's synchronous mode: each member pushes its tagged gradient, then calls ApplyAccumulated
    with ``members``; a shard applies the step once that many gradients are summed, every call waits
    until the step is closed, and exactly one caller (the one that applied the first slice) counts it."""
    from ps.spec import ACCUMULATOR_OPTIMIZER
    rng = np.random.default_rng(14)
    w = rng.standard_normal(3000).astype(np.float32)
    client.create_model("sync", {"w": w}, optimizer={"name": "sgd", "lr": 1.0}, replace=True, max_slice_bytes=4096)
    client.create_model("sync.acc", {"w": np.zeros_like(w)}, optimizer=ACCUMULATOR_OPTIMIZER, replace=True,
                        max_slice_bytes=4096)
    grads = [rng.standard_normal(3000).astype(np.float32) for _ in range(3)]
    kw = dict(local=client.local, batch_bytes=client.batch_bytes)
    # each member: its own client, and a client under the step leaders' shared id (whose pushes a
    # waiting call holds, as it waits under the model's push lock)
    clients = [ps.Client(client.address, **kw) for _ in range(3)]
    leading = [ps.Client(client.address, client_id="job:bsp", **kw) for _ in range(3)]
    with clients[0] as m1, clients[1] as m2, clients[2] as m3, leading[0] as leaders, leading[1], leading[2]:
        members = [m1, m2, m3]
        handles = [c.model("sync") for c in leading]
        # two of three pushed: a call waits, then answers not closed, and nothing is applied
        for m, g in zip(members[:2], grads):
            m.model("sync.acc").push({"w": -g}, seq=5)
        assert handles[0].apply_accumulated("sync.acc", 3, 5, members=3, wait_s=0.2, member=m1.client_id) is False
        np.testing.assert_array_equal(leaders.model("sync").pull()["w"], w)
        results = {}

        def call(i):
            results[i] = handles[i].apply_accumulated("sync.acc", 3, 5, members=3, wait_s=20, member=members[i].client_id)
        waiting = [threading.Thread(target=call, args=(i,)) for i in (0, 1)]
        for t in waiting:
            t.start()
        m3.model("sync.acc").push({"w": -grads[2]}, seq=5)
        call(2)  # its gradient completes the step: its call applies it, and the waiting calls are answered
        for t in waiting:
            t.join(30)
        assert results == {0: True, 1: True, 2: True}
        expected = w - (grads[0] + grads[1] + grads[2]) / np.float32(3)
        np.testing.assert_allclose(leaders.model("sync").pull()["w"], expected, rtol=1e-5, atol=1e-5)
        assert [h.pushes for h in handles] == [0, 0, 1] and versions(client, "sync") == {1}
        assert not leaders.model("sync.acc").pull()["w"].any()
        # asked again after the step closed (a member watching the servers asks until every shard has closed
        # it): answered closed, and counted by no one again, its closer included
        assert handles[2].apply_accumulated("sync.acc", 3, 5, members=3, member=m3.client_id) is True
        assert handles[0].apply_accumulated("sync.acc", 3, 5, members=3, member=m1.client_id) is True
        assert [h.pushes for h in handles] == [0, 0, 1] and versions(client, "sync") == {1}
        assert [h.duplicates for h in handles] == [0, 0, 0]
        # the closer's retry from a handle that never heard back (its reply lost) still counts, once
        again = leaders.model("sync")
        assert again.apply_accumulated("sync.acc", 3, 5, members=3, member=m3.client_id) is True
        assert again.apply_accumulated("sync.acc", 3, 5, members=3, member=m3.client_id) is True
        assert (again.pushes, versions(client, "sync")) == (1, {1})
        for bad, message in (({"members": -1}, "members must be an integer >= 0"),
                             ({"wait_s": 31.0}, "wait_s must be in [0, 30] seconds, got 31.0"),
                             ({"wait_s": float("nan")}, "wait_s must be in [0, 30] seconds, got nan")):
            with pytest.raises(ps.InvalidArgument, match=re.escape(message)):
                handles[0].apply_accumulated("sync.acc", 3, 6, **{"members": 3, "wait_s": 1.0, **bad})
        assert versions(client, "sync") == {1}
    client.model("sync.acc").delete()
    client.model("sync").delete()


@pytest.mark.parametrize("local", [False, True], ids=["grpc", "shared-memory"])
def test_chunks_smaller_than_a_slice_count_as_one_update_per_push(cluster, local):
    """With a message limit below the slice size each slice takes several chunks per push; Adam's
    step (bias correction) must still advance once per push, as if the tensor were whole. Through
    shared memory (same host) a slice is one range, applied once too, and a retry skips each."""
    from ps.server.optimizers import make_optimizer
    rng = np.random.default_rng(5)
    w = rng.standard_normal(50_000).astype(np.float64)
    grads = [rng.standard_normal(50_000) for _ in range(3)]
    config = {"name": "adam", "lr": 0.01}
    with ps.Client(cluster.address, chunk_bytes=16 << 10, max_message_bytes=1 << 20, local=local) as small:
        model = small.create_model("chunked", {"w": w}, optimizer=config, replace=True, max_slice_bytes=128 << 10)
        assert max(s.length for s in model.slices) * 8 > small.chunk_bytes
        for g in grads:
            fresh = model.push_pull({"w": g})
        model.push({"w": grads[0]})   # a fourth push, then the same one again as a retry:
        assert model.duplicates == 0
        small._seqs = itertools.count(small.next_seq() - 1)
        model.push({"w": grads[0]})
        chunks = len(model.slices) if local else sum(-(-s.length * 8 // small.chunk_bytes) for s in model.slices)
        assert (model.pushes, model.duplicates) == (5, chunks)  # every chunk of the repeat was skipped
        got = model.pull()["w"]
        model.delete()
    opt = make_optimizer(config)
    expected, state = w.copy(), opt.init_state(w.size, w.dtype)
    for step, g in enumerate(grads, 1):
        opt.apply(expected, g, state, step)
    np.testing.assert_allclose(fresh["w"], expected, rtol=1e-12)
    opt.apply(expected, grads[0], state, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_push_to_a_dead_server_raises_unavailable_naming_it():
    with ps.LocalCluster(servers=1) as c, ps.Client(c.address) as client:
        model = client.create_model("m", {"w": np.zeros(10, np.float32)})
        c.servers[0].kill()
        with pytest.raises(ps.Unavailable) as err:
            model.push({"w": np.ones(10, np.float32)})
        assert f"push to model 'm' on {model.shards[0]}: UNAVAILABLE" in str(err.value)


@pytest.mark.parametrize("window", ["1MiB", "0"], ids=["window-below-a-chunk", "grpc-adaptive-window"])
def test_servers_with_another_flow_window_move_large_models_correctly(window):
    with ps.LocalCluster(servers=2, server_args=["--flow-window", window]) as c, ps.Client(c.address) as client:
        n = 4 << 20
        model = client.create_model("w", {"w": np.zeros(n, np.float32)}, optimizer={"name": "sgd", "lr": 1.0})
        grad = np.arange(n, dtype=np.float32)
        np.testing.assert_array_equal(model.push_pull({"w": grad})["w"], -grad)


class HoldingShard:
    """An in-process shard (the real servicer and store) that holds back its first push_pull
    reply, so the test sees how many chunks a client sends before any reply comes."""

    def __init__(self, store, expect: int):
        from ps.server.service import ParameterServerServicer
        outer = self
        self.expect = expect  # chunks the client should send before its first reply
        self.cond = threading.Condition()
        self.seen = 0
        self.before_first_reply = None

        class Servicer(ParameterServerServicer):
            def PushPull(self, request_iterator, context):
                return outer.push_pull(super().PushPull, request_iterator, context)

            def PushAcked(self, request_iterator, context):
                return outer.push_pull(super().PushAcked, request_iterator, context)

        self.server = rpc.make_server(4)
        ps.wire.add_shard_servicer(Servicer(store), self.server)
        self.address = f"127.0.0.1:{rpc.bind(self.server, '127.0.0.1', 0)}"
        self.server.start()

    def push_pull(self, real, request_iterator, context):
        import queue
        q: queue.Queue = queue.Queue()

        def read():
            for req in request_iterator:
                with self.cond:
                    self.seen += 1
                    self.cond.notify_all()
                q.put(req)
            q.put(None)
        threading.Thread(target=read, daemon=True).start()
        with self.cond:
            assert self.cond.wait_for(lambda: self.seen >= self.expect, timeout=30)
            # A client that sent ahead of its replies would have delivered more chunks by now.
            self.cond.wait_for(lambda: self.seen > self.expect, timeout=0.5)
            self.before_first_reply = self.seen
        yield from real(iter(q.get, None), context)


@pytest.mark.parametrize("op", ["push_pull", "push"])
@pytest.mark.parametrize("inflight", [1, 3])
def test_push_and_push_pull_send_at_most_inflight_chunks_ahead_of_the_replies(cluster, inflight, op):
    from ps.client import Model
    from ps.optimizer_config import OptimizerConfig
    from ps.server.shard import ShardStore, SliceRequest
    from ps.v1 import scheduler_pb2
    n, chunk = 8 * 1024, 4096  # 8 chunks of 1024 float32
    store = ShardStore()
    config = OptimizerConfig.from_dict({"name": "sgd", "lr": 1.0})
    store.create("held", [SliceRequest("w", (n,), np.dtype("float32"), 0, n)], config)
    shard = HoldingShard(store, expect=inflight)
    try:
        with ps.Client(cluster.address, chunk_bytes=chunk, inflight_chunks=inflight, local=False) as client:
            smap = scheduler_pb2.ShardMap(model="held", servers=[shard.address], optimizer=config.to_proto(),
                                          tensors=[scheduler_pb2.TensorInfo(name="w", shape=[n],
                                                                             dtype=dtype_code("float32"))],
                                          slices=[scheduler_pb2.SliceAssignment(tensor="w", offset=0, length=n)])
            grad = np.arange(n, dtype=np.float32)
            model = Model(client, smap)
            if op == "push":
                model.push({"w": grad})
                fresh = model.pull()
            else:
                fresh = model.push_pull({"w": grad})
        assert shard.before_first_reply == inflight
        np.testing.assert_array_equal(fresh["w"], -grad)
        assert shard.seen == n * 4 // chunk
    finally:
        shard.server.stop(0)


def test_push_pull_and_pull_write_into_out_and_reject_a_wrong_one(client):
    model = sgd_model(client, "out", {"w": np.zeros((30, 4), np.float32), "b": np.ones(4, np.float32)}, lr=1.0)
    out = {"w": np.full((30, 4), 7, np.float32), "b": np.full(4, 7, np.float32)}
    g = {"w": np.ones((30, 4), np.float32), "b": np.ones(4, np.float32)}
    got = model.push_pull(g, out=out)
    assert got["w"] is out["w"] and got["b"] is out["b"]
    np.testing.assert_array_equal(out["w"], -1)
    np.testing.assert_array_equal(out["b"], 0)
    assert model.pull(["b"], out=out)["b"] is out["b"]
    read_only = np.zeros(4, np.float32)
    read_only.flags.writeable = False
    bad = [({"w": out["w"]}, "push_pull to 'out': out has no array for b"),
           ({**out, "w": np.zeros((30, 4), np.float64)},
            r"out\['w'\] must be a writable C-contiguous float32\[30, 4\] array, got float64\[30, 4\]"),
           ({**out, "w": np.zeros((4, 30), np.float32).T},
            r"out\['w'\] must be a writable C-contiguous float32\[30, 4\] array, got float32\[30, 4\], "
            "not C-contiguous"),
           ({**out, "b": read_only}, r"out\['b'\] must be .* array, got float32\[4\], read-only"),
           ({**out, "b": [0.0] * 4}, r"out\['b'\] must be a writable C-contiguous float32\[4\] array, got list")]
    for o, message in bad:
        with pytest.raises(ps.InvalidArgument, match=message):
            model.push_pull(g, out=o)
    np.testing.assert_array_equal(model.pull()["w"], -1)  # the rejected calls pushed nothing
    model.delete()
