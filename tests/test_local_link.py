"""The same-host link (ps.local_link): after its first shared-memory call over gRPC, a client sends
the same calls over the server's Unix socket; the same updates, exactly once, the same refusals as
gRPC (tokens, roles, owners), and back to gRPC when the link breaks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest

import ps
from ps import local_link
from ps.errors import PermissionDenied
from ps.v1 import server_pb2


def sgd_model(client, name, n=1000, lr=0.5):
    return client.create_model(name, {"w": np.zeros(n, np.float32)}, optimizer={"name": "sgd", "lr": lr},
                               replace=True)


def on_a_link(client, name, lr=0.5):
    """A model of 1000 zeros after two push_pulls of ones from ``client``: the first over gRPC, whose
    reply named the server's link, the second over that link. (model, the client's link)"""
    model = sgd_model(client, name, lr=lr)
    for _ in range(2):
        model.push_pull({"w": np.ones(1000, np.float32)})
    return model, client._links[model.shards[0]]


def updates(model) -> int:
    return max(m.max_version for m in model.stats())


def link_calls(client) -> int:
    return sum(client.stats(s.address).link_calls for s in client.cluster().servers)


def test_calls_after_the_first_go_over_the_link_and_apply_exactly_once(cluster):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    with ps.Client(cluster.address) as c, ps.Client(cluster.address, local=False) as remote:
        model = sgd_model(c, "linked")
        before = link_calls(c)
        for g in grads:
            got = model.push_pull({"w": g})
        address = model.shards[0]
        assert isinstance(c._links[address], local_link.Link)
        # the first call went over gRPC (its reply named the link), the other four over the link
        assert link_calls(c) - before == len(grads) - 1
        expected = -0.5 * sum(g.astype(np.float64) for g in grads)
        np.testing.assert_allclose(got["w"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(remote.model("linked").pull()["w"], got["w"])
        assert updates(model) == len(grads)
        # a retried push (same seq) over the link: acknowledged as a duplicate, not applied
        c._seqs = iter([c.next_seq() - 1])
        model.push({"w": grads[0]})
        assert (model.pushes, model.duplicates) == (len(grads) + 1, 1)
        assert updates(model) == len(grads)
        model.delete()


def test_a_bsp_step_apply_goes_over_the_link_after_its_first_call(cluster):
    """ApplyAccumulated, bsp's one call per step, takes the link too (the leader's handle never calls
    PushPullLocal: its first ApplyAccumulated reply names the link); a malformed one gets a status."""
    from ps.spec import ACCUMULATOR_OPTIMIZER
    with ps.Client(cluster.address) as c, ps.Client(cluster.address, client_id="job:bsp") as leader:
        model = sgd_model(c, "stepped", lr=1.0)
        acc = c.create_model("stepped.acc", {"w": np.zeros(1000, np.float32)}, optimizer=ACCUMULATOR_OPTIMIZER,
                             replace=True)
        handle = leader.model("stepped")
        before = link_calls(c)
        for step in range(1, 4):
            acc.push({"w": -np.ones(1000, np.float32)}, seq=step)
            assert handle.apply_accumulated("stepped.acc", 1, seq=step)
        address = model.shards[0]
        assert isinstance(leader._links[address], local_link.Link)
        # 3 pushes (the first over gRPC) and 3 applies (the first over gRPC)
        assert link_calls(c) - before == 4
        np.testing.assert_array_equal(model.pull()["w"], np.full(1000, -3.0, np.float32))
        assert updates(model) == 3 and handle.pushes == 3
        with pytest.raises(local_link.LinkError) as e:
            leader._links[address].call(b"\xff\xff\xff", 10, local_link.APPLY)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an ApplyAccumulatedRequest" in e.value.details()
        acc.push({"w": -np.ones(1000, np.float32)}, seq=4)
        assert handle.apply_accumulated("stepped.acc", 1, seq=4)  # the link still serves
        assert updates(model) == 4
        acc.delete()
        model.delete()


def test_a_broken_link_is_dropped_and_the_call_retried_over_grpc_once(cluster):
    with ps.Client(cluster.address) as c:
        model, link = on_a_link(c, "broken-link", lr=1.0)
        one = np.ones(1000, np.float32)
        link._sock.shutdown(socket.SHUT_RDWR)  # as if the server's end went away
        refreshed = []
        model.refresh = lambda: refreshed.append(1) or False  # a failover would poll the shard map
        got = model.push_pull({"w": one})
        np.testing.assert_array_equal(got["w"], -3 * one)  # applied once, not lost, not twice
        assert model.failovers == 1 and model.duplicates == 0
        assert refreshed == []  # retried over gRPC at once: the server was never in question
        assert c._links[model.shards[0]] is not link  # a new link, named by the retry's gRPC reply
        model.delete()


def test_a_call_whose_reply_was_lost_on_the_link_is_retried_over_grpc_and_applied_once(cluster, monkeypatch):
    with ps.Client(cluster.address) as c:
        model, link = on_a_link(c, "lost-link-reply", lr=1.0)
        one = np.ones(1000, np.float32)
        real = link.call

        def lost(request, timeout=None, kind=local_link.CALL, long=False):  # applied; the reply never arrives
            real(request, timeout, kind, long)
            raise local_link.LinkClosed("the link closed")
        monkeypatch.setattr(link, "call", lost)
        got = model.push_pull({"w": one})
        np.testing.assert_array_equal(got["w"], -3 * one)
        assert model.failovers == 1 and model.duplicates == 1  # the retry's range: recognised, not applied
        assert model.pushes == 3 and updates(model) == 3
        model.delete()


def test_malformed_and_oversized_frames_get_a_status_and_the_server_keeps_serving(cluster):
    with ps.Client(cluster.address) as c:
        model = sgd_model(c, "frames")
        model.push_pull({"w": np.ones(1000, np.float32)})
        name = c._links[model.shards[0]].name
        raw = local_link.Link(name, None)
        with pytest.raises(local_link.LinkError) as e:
            raw.call(b"\xff\xff\xff")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a LocalPushPullRequest" in e.value.details()
        with pytest.raises(local_link.LinkError) as e:  # a request naming a segment that does not exist
            raw.call(server_pb2.LocalPushPullRequest(model="frames", segment="ps-" + "0" * 32, only_pull=True,
                                                     ranges=[server_pb2.LocalRange(tensor="w", length=1)])
                     .SerializeToString())
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # a frame over the limit: refused by status, and that link is closed
        raw._sock.sendall(local_link._FRAME.pack(local_link.MAX_FRAME_BYTES + 1, local_link.CALL))
        with pytest.raises(local_link.LinkError) as e:
            local_link.Link._reply(raw._sock)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds the limit" in e.value.details()
        raw.close()
        got = model.push_pull({"w": np.ones(1000, np.float32)})  # the client's own link still serves
        np.testing.assert_allclose(got["w"], -1.0)
        assert updates(model) == 2
        model.delete()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_a_process_of_another_user_is_refused(cluster):
    with ps.Client(cluster.address) as c:
        model = sgd_model(c, "other-user")
        model.push_pull({"w": np.ones(1000, np.float32)})
        name = c._links[model.shards[0]].name
        code = ("import os, socket, struct, sys\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect('\\0' + sys.argv[1])\n"
                "try:\n"
                "    s.sendall(struct.pack('<IB', 0, 1)); print(len(s.recv(100)))\n"
                "except (ConnectionResetError, BrokenPipeError):\n"
                "    print(0)\n")
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "0"  # closed without a reply
        assert updates(model) == 1
        model.delete()


@pytest.fixture(scope="module")
def auth_cluster():
    with ps.LocalCluster(servers=1, auth=True, users={"bob": ""}) as c:
        yield c


def test_with_auth_a_link_takes_only_a_valid_token_and_a_user_only_its_own_models(auth_cluster):
    cl = auth_cluster
    with ps.Client(cl.address, token=cl.token) as alice, ps.Client(cl.address, token=cl.tokens["bob"]) as bob:
        model, link = on_a_link(alice, "alices")
        assert isinstance(link, local_link.Link)
        for token, why in ((None, "no bearer token"), ("not-a-token", "not one this process accepts")):
            with pytest.raises(local_link.LinkError) as e:
                local_link.Link(link.name, token)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.value.details()
        # bob's link opens, but alice's model is not his: the same refusal as over gRPC
        bobs = local_link.Link(link.name, cl.tokens["bob"])
        req = server_pb2.LocalPushPullRequest(model="alices", segment="ps-" + "0" * 32, only_pull=True,
                                              ranges=[server_pb2.LocalRange(tensor="w", length=1)])
        with pytest.raises(local_link.LinkError) as e:
            bobs.call(req.SerializeToString())
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "alices" in e.value.details()
        with pytest.raises(PermissionDenied):
            bob.model("alices").push_pull({"w": np.ones(1000, np.float32)})
        step = server_pb2.ApplyAccumulatedRequest(model="alices", accumulator="alices", contributors=1,
                                                  client_id="b", seq=1, ranges=[server_pb2.Range(tensor="w", length=1000)])
        with pytest.raises(local_link.LinkError) as e:  # nor is it his to step
            bobs.call(step.SerializeToString(), 10, local_link.APPLY)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "alices" in e.value.details()
        bobs.close()
        assert updates(model) == 2
        np.testing.assert_allclose(model.pull()["w"], -1.0)
        model.delete()
