"""The same-host fast path: push and push_pull through a shared-memory segment (ps.shm), gRPC
carrying only control; the same updates as the streamed path, exactly once, and a transparent
fall back to gRPC where the server cannot open the client's segment."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest

import ps
from ps.v1 import server_pb2, server_pb2_grpc


def model_on(client, name):
    return client.create_model(name, {"w": np.zeros((300, 7), np.float32), "b": np.zeros(7, np.float64)},
                               optimizer={"name": "sgd", "lr": 1.0}, replace=True, max_slice_bytes=2048)


def test_shared_memory_and_grpc_apply_the_same_updates_exactly_once(cluster):
    rng = np.random.default_rng(1)
    grads = [{"w": rng.standard_normal((300, 7)).astype(np.float32), "b": rng.standard_normal(7)} for _ in range(4)]
    with ps.Client(cluster.address, local=True) as fast, ps.Client(cluster.address, local=False) as slow:
        a, b = model_on(fast, "shm-a"), model_on(slow, "shm-b")
        for g in grads:
            got_a, got_b = a.push_pull(g), b.push_pull(g)
            for k in g:
                np.testing.assert_array_equal(got_a[k], got_b[k])
        a.push(grads[0])
        b.push(grads[0])
        # shared memory was used: one segment per shard, and every server could open it
        assert len(fast._segments) == len(a.shards) and not fast._remote and not slow._segments
        expected = -sum(g["w"].astype(np.float64) for g in grads) - grads[0]["w"]
        np.testing.assert_allclose(a.pull()["w"], expected, rtol=1e-5, atol=1e-5)  # float32 sums
        np.testing.assert_array_equal(a.pull()["w"], b.pull()["w"])
        # a retry of the last push (same seq) is recognised per range and not applied again
        fast._seqs = iter([fast.next_seq() - 1])
        a.push(grads[1])
        assert a.duplicates == len(a.slices)
        np.testing.assert_array_equal(a.pull()["w"], b.pull()["w"])
        assert {s.max_version for s in a.stats()} == {5}
        a.delete()
        b.delete()


def test_released_segments_are_unlinked_and_the_models_handles_make_new_ones(cluster):
    with ps.Client(cluster.address) as c:
        a, b = model_on(c, "released"), model_on(c, "kept")
        one = {"w": np.ones((300, 7), np.float32), "b": np.ones(7)}
        a.push_pull(one)
        b.push_pull(one)
        names = {k: seg.name for k, (seg, _) in c._segments.items()}
        mine = [n for k, n in names.items() if k[0] == "released"]
        assert mine and all(os.path.exists(f"/dev/shm/{n}") for n in names.values())
        assert c.release("released") == len(mine) == len(a.shards)
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in mine)
        assert all(os.path.exists(f"/dev/shm/{n}") for k, n in names.items() if k[0] == "kept")
        got = a.push_pull(one)  # the handle goes on, through new segments
        np.testing.assert_array_equal(got["w"], np.full((300, 7), -2.0, np.float32))
        assert {seg.name for k, (seg, _) in c._segments.items() if k[0] == "released"}.isdisjoint(mine)
        a.delete()  # deleting a model releases its segments too
        assert not [k for k in c._segments if k[0] == "released"]
        assert c.release("released") == 0
        b.delete()


def test_a_worker_moving_to_the_next_job_releases_the_last_ones_segments():
    from ps.demo import demo_spec
    with ps.LocalCluster(servers=2, workers=1) as c, ps.Client(c.address) as client:
        prefix = f"ps-{c.workers[0].popen.pid & 0xFFFFFFFF:08x}"

        def workers_segments():
            return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
        first = client.submit(demo_spec("mlp", epochs=1))
        first.wait(progress=False, timeout=120)
        after_first = workers_segments()
        assert len(after_first) == 2  # one per shard of the first job's model
        second = client.submit(demo_spec("mlp", epochs=1, seed=1))
        second.wait(progress=False, timeout=120)
        after_second = workers_segments()
        assert len(after_second) == 2 and not set(after_first) & set(after_second)


def test_a_server_that_cannot_open_the_segment_is_reached_over_grpc_from_then_on(cluster):
    with ps.Client(cluster.address, local=True) as client:
        model = model_on(client, "shm-fallback")
        for shard in range(len(model.shards)):  # as if the servers were on another host: no such segment there
            segment, _ = model._segment(shard)
            os.unlink(f"/dev/shm/{segment.name}")
        g = {"w": np.ones((300, 7), np.float32), "b": np.ones(7)}
        fresh = model.push_pull(g)
        np.testing.assert_array_equal(fresh["w"], -1)
        assert client._remote == set(model.shards) and model.duplicates == 0
        model.push(g)  # straight over gRPC now
        np.testing.assert_array_equal(model.pull()["w"], -2)
        assert {s.max_version for s in model.stats()} == {2}
        model.delete()


@pytest.mark.parametrize("change,code,message", [
    ({"segment": "../../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT,
     "push_pull (local) to: segment must be 'ps-' and 32 hex digits, got '../../etc/passwd'"),
    ({"segment": "ps-" + "0" * 32}, grpc.StatusCode.FAILED_PRECONDITION,
     "local segment 'ps-00000000000000000000000000000000' cannot be opened here (FileNotFoundError): not the "
     "client's host, or not its user"),
    ({"at": 1 << 20}, grpc.StatusCode.INVALID_ARGUMENT, "lie outside the segment's"),
    ({"at": 2, "length": 32}, grpc.StatusCode.INVALID_ARGUMENT, "byte offset 2 is not a multiple of float32"),
])
def test_a_bad_local_request_is_refused_and_changes_nothing(cluster, change, code, message):
    with ps.Client(cluster.address, local=True) as client:
        model = client.create_model("shm-bad", {"w": np.zeros(64, np.float32)}, optimizer="sgd", replace=True)
        shard = model.slices[0].shard
        segment, layout = model._segment(shard)
        (s, at), = layout.items()
        req = server_pb2.LocalPushPullRequest(model="shm-bad", client_id="c", seq=1, segment=segment.name, pull=True,
                                              ranges=[server_pb2.LocalRange(tensor="w", offset=0, length=64, at=at,
                                                                            dtype=1)])
        if "segment" in change:
            req.segment = change["segment"]
        if "at" in change:
            req.ranges[0].at = change["at"]
            req.ranges[0].length = change.get("length", 64)
        with grpc.insecure_channel(model.shards[shard]) as ch:
            with pytest.raises(grpc.RpcError) as e:
                server_pb2_grpc.ParameterServerStub(ch).PushPullLocal(req, timeout=10)
        assert e.value.code() == code
        assert message in e.value.details()
        assert {st.max_version for st in model.stats()} == {0}  # nothing applied
        np.testing.assert_array_equal(model.pull()["w"], 0)
        model.delete()


def test_a_server_unmaps_the_segments_of_clients_that_are_gone():
    from ps import shm
    attached = shm.Attached(keep=4, sweep_s=3600)
    kept, gone = shm.Segment(4096), shm.Segment(4096)
    try:
        for seg in (kept, gone):
            attached.get(seg.name, "test")
        assert len(attached) == 2
        gone.close()  # the client closed (or died: its resource tracker unlinks it)
        assert attached.sweep() == 1 and len(attached) == 1
        assert attached.get(kept.name, "test") is not None  # the live one stays mapped
        more = [shm.Segment(64) for _ in range(5)]
        for seg in more:  # beyond keep: the least recently used ones are unmapped
            attached.get(seg.name, "test")
        assert len(attached) == 4
    finally:
        attached.close()
        for seg in [kept, *locals().get("more", [])]:
            seg.close()


def test_segments_left_by_a_dead_client_are_reaped_and_live_ones_kept():
    import subprocess
    import sys

    from ps import shm
    # a client process that dies by SIGKILL together with its resource tracker leaves its segment
    code = ("import os, signal, time; from ps import shm; s = shm.Segment(4096); print(s.name, flush=True); "
            "os.killpg(0, signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, start_new_session=True)
    left = out.stdout.strip()
    assert shm.NAME.fullmatch(left) and os.path.exists(f"/dev/shm/{left}")
    mine = shm.Segment(4096)
    try:
        assert shm.reap() >= 1
        assert not os.path.exists(f"/dev/shm/{left}") and os.path.exists(f"/dev/shm/{mine.name}")
    finally:
        mine.close()
