"""Security: a cluster with mutual TLS and tokens trains; strangers are refused with an error that
names the cause and change nothing; every RPC checks the token and its role; users reach only their
own jobs and models, within their quotas; jobs read data only under the allowed roots."""

from __future__ import annotations

import datetime

import grpc
import numpy as np
import pytest

import ps
from ps import certs, rpc, security
from ps.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from ps.security import PERMISSIONS, ROLES, TLS, AuthTable, Security, SecurityError
from ps.tensor import dtype_code
from ps.v1 import scheduler_pb2, server_pb2

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    with ps.LocalCluster(servers=2, workers=2, tls=True, auth=True, users={"bob": ""}) as c:
        yield c


@pytest.fixture(scope="module")
def alice(cluster):
    with ps.Client(cluster.address, tls=cluster.tls, token=cluster.token) as c:
        yield c


@pytest.fixture(scope="module")
def bob(cluster):
    with ps.Client(cluster.address, tls=cluster.tls, token=cluster.tokens["bob"]) as c:
        yield c


@pytest.fixture(scope="module")
def admin(cluster):
    with ps.Client(cluster.address, tls=cluster.tls, token=cluster.tokens["admin"]) as c:
        yield c


@pytest.fixture(scope="module")
def trained(cluster, alice):
    """alice's job, trained on the TLS cluster (the demo's model and data)."""
    job = alice.submit({"epochs": 5, "name": "tls-demo", "keep_params": True})
    model = job.wait()
    return job, model


def snapshot(admin: ps.Client) -> dict:
    """What the cluster holds: members, models, jobs and each server's models and update counts."""
    view = admin.cluster()
    jobs = admin.call(admin.scheduler.ListJobs, scheduler_pb2.ListJobsRequest(), "list jobs").jobs
    return {"servers": sorted((s.server_id, s.address, s.state) for s in view.servers),
            "models": sorted(view.models), "workers": sorted(w.worker_id for w in view.workers),
            "jobs": sorted((j.job_id, j.state, j.owner) for j in jobs),
            "shards": {s.address: sorted((m.model, m.pushes, m.max_version) for m in admin.stats(s.address).models)
                       for s in view.servers}}


# -- 1. transport -----------------------------------------------------------------------------------------
def test_tls_cluster_trains_the_demo(trained):
    job, model = trained
    assert model.metrics["test_accuracy"] >= 0.9
    info = job.info()
    assert info.state == "succeeded" and info.owner == "user"
    assert info.tasks_done == info.tasks_total


def test_strangers_are_refused_naming_the_cause_and_change_nothing(cluster, admin, trained, tmp_path):
    before = snapshot(admin)
    with pytest.raises(Unavailable, match="speaks TLS and this process does not"):
        ps.Client(cluster.address, tls=False, token=cluster.token, connect_timeout=10)

    other = tmp_path / "other-ca"
    certs.make(other, ["127.0.0.1"])
    with pytest.raises(Unavailable, match="does not trust our certificate's CA"):
        ps.Client(cluster.address, tls=TLS(cert=str(other / "user.crt"), key=str(other / "user.key"),
                                           ca=str(cluster.certs / "ca.crt")), token=cluster.token, connect_timeout=10)
    with pytest.raises(Unavailable, match="its certificate is not trusted: unable to get local issuer"):
        ps.Client(cluster.address, tls=TLS.from_dir(other), token=cluster.token, connect_timeout=10)

    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    crt, key = certs.make_cert(tmp_path, "old", cluster.certs, days=1, now=long_ago, client_only=True)
    expired = TLS(cert=str(crt), key=str(key), ca=str(cluster.certs / "ca.crt"))
    with pytest.raises(SecurityError, match=r"old.crt expired on .*: make a new one"):
        ps.Client(cluster.address, tls=expired, token=cluster.token, connect_timeout=10)
    # presented anyway (grpc itself does not look at its own certificate's dates), the server refuses it
    creds = grpc.ssl_channel_credentials(root_certificates=(cluster.certs / "ca.crt").read_bytes(),
                                         private_key=key.read_bytes(), certificate_chain=crt.read_bytes())
    with grpc.secure_channel(cluster.address, creds) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/ps.v1.Scheduler/GetCluster")(b"", timeout=10,
                                                      metadata=[("authorization", f"Bearer {cluster.token}")])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert snapshot(admin) == before


def test_health_needs_tls_but_no_token(cluster, alice):
    member_tls = Security(tls=TLS.from_dir(cluster.certs, "node"))
    assert rpc.check_health(cluster.address, security=member_tls) == "SERVING"
    for server in alice.cluster().servers:
        assert rpc.check_health(server.address, security=member_tls) == "SERVING"


# -- 2. tokens and roles ----------------------------------------------------------------------------------
def test_every_method_of_every_service_has_its_roles():
    for module, service in ((scheduler_pb2, "Scheduler"), (server_pb2, "ParameterServer")):
        desc = module.DESCRIPTOR.services_by_name[service]
        assert sorted(m.name for m in desc.methods) == sorted(PERMISSIONS[desc.full_name])
        for name, roles in PERMISSIONS[desc.full_name].items():
            assert roles and roles <= set(ROLES), name


def _call(address: str, tls: TLS, method, token: str | None):
    """Call ``method`` (a MethodDescriptor) with an empty request and ``token``; the RpcError it ends with."""
    md = [] if token is None else [("authorization", f"Bearer {token}")]
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    with rpc.channel(address, security=Security(tls=tls)) as ch:
        make = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
                (True, False): ch.stream_unary, (True, True): ch.stream_stream}[kind]
        call = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        request = iter([b""]) if method.client_streaming else b""
        try:
            result = call(request, metadata=md, timeout=10)
            if method.server_streaming:
                list(result)
        except grpc.RpcError as e:
            return e
    return None


def test_every_rpc_refuses_no_token_a_wrong_token_and_the_wrong_role(cluster, admin, alice, trained):
    tokens = {"member": security.read_token(str(cluster.certs / "member.token")), "user": cluster.token,
              "admin": cluster.tokens["admin"]}
    tls = TLS.from_dir(cluster.certs, "node")
    server = alice.cluster().servers[0].address
    before = snapshot(admin)
    checked = 0
    for module, service, address in ((scheduler_pb2, "Scheduler", cluster.address),
                                     (server_pb2, "ParameterServer", server)):
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            what = f"{service}/{method.name}"
            for token, code, text in ((None, grpc.StatusCode.UNAUTHENTICATED, "no bearer token"),
                                      ("not-a-token-of-this-cluster-0123456789", grpc.StatusCode.UNAUTHENTICATED,
                                       "not one this process accepts")):
                err = _call(address, tls, method, token)
                assert err is not None and err.code() == code and text in err.details(), what
                checked += 1
            for role in set(ROLES) - PERMISSIONS[desc.full_name][method.name]:
                err = _call(address, tls, method, tokens[role])
                assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (what, role)
                assert f"role '{role}'" in err.details() and "may not call it" in err.details()
                checked += 1
    assert checked > 60
    assert snapshot(admin) == before
    logs = "\n".join(cluster.logs().values())
    assert "refused /ps.v1.Scheduler/RegisterServer" in logs
    assert not any(t in logs for t in tokens.values()), "a token was logged"


# -- users reach only their own jobs and models -------------------------------------------------------------
def test_a_user_reaches_only_its_own_jobs_and_models(cluster, alice, bob, admin, trained):
    job, _ = trained
    weights = alice.model(job.job_id).pull()
    mine = bob.create_model("bobs", {"w": np.zeros(8, np.float32)}, optimizer={"name": "sgd", "lr": 1.0})
    before = snapshot(admin)
    refused = {
        "get job": lambda: bob.call(bob.scheduler.GetJob, scheduler_pb2.GetJobRequest(job_id=job.job_id), "get"),
        "cancel": lambda: bob.call(bob.scheduler.CancelJob, scheduler_pb2.CancelJobRequest(job_id=job.job_id), "c"),
        "delete": lambda: bob.call(bob.scheduler.DeleteJob, scheduler_pb2.DeleteJobRequest(job_id=job.job_id), "d"),
        "checkpoint": lambda: bob.call(bob.scheduler.CheckpointJob,
                                       scheduler_pb2.CheckpointJobRequest(job_id=job.job_id), "ckpt"),
        "watch": lambda: list(bob.scheduler.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job.job_id), timeout=10)),
        "fetch": lambda: list(bob.scheduler.FetchWeights(scheduler_pb2.FetchWeightsRequest(model=job.job_id),
                                                         timeout=10)),
        "shard map": lambda: bob.model(job.job_id),
        "drop": lambda: bob.call(bob.scheduler.DropModel, scheduler_pb2.DropModelRequest(model=job.job_id), "drop"),
        "plan over it": lambda: bob.create_model(job.job_id, {"w": np.zeros(4, np.float32)}, replace=True),
        "plan for alice": lambda: bob.create_model("for-alice", {"w": np.zeros(4, np.float32)}, owner="user"),
    }
    for what, fn in refused.items():
        with pytest.raises((PermissionDenied, grpc.RpcError)) as err:
            fn()
        code = err.value.code() if isinstance(err.value, grpc.RpcError) else err.value.code
        assert code == grpc.StatusCode.PERMISSION_DENIED, what
        assert "another user ('user')" in str(err.value) or "may not act for 'user'" in str(err.value), what
    # straight to the servers, past the scheduler
    view = alice.model(job.job_id)
    for shard in view.shards:
        stub = bob.server(shard)
        for call in (lambda: list(stub.Pull(server_pb2.PullRequest(model=job.job_id), timeout=10)),
                     lambda: stub.DeleteModel(server_pb2.DeleteModelRequest(model=job.job_id), timeout=10),
                     lambda: stub.ApplyAccumulated(server_pb2.ApplyAccumulatedRequest(
                         model=job.job_id, accumulator="bobs", contributors=1, client_id="b", seq=1), timeout=10),
                     lambda: stub.CreateModel(server_pb2.CreateModelRequest(
                         model="sneaky", slices=[server_pb2.SliceSpec(tensor="w", shape=[1 << 20], offset=0, length=1 << 20,
                                                                      dtype=dtype_code(np.float32))]), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PermissionDenied, match="belongs to another user"):
        alice.model("bobs")
    for shard in mine.shards:  # alice pushing into bob's model, straight to its server
        with pytest.raises(grpc.RpcError) as err:
            alice.server(shard).Push(iter([server_pb2.PushRequest(model="bobs", client_id="a", seq=1)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "('bob')" in err.value.details()
    assert snapshot(admin) == before
    for name, a in alice.model(job.job_id).pull().items():
        np.testing.assert_array_equal(a, weights[name])
    # bob's own model works, and lists show each user its own jobs; an admin sees all
    np.testing.assert_array_equal(mine.push_pull({"w": np.ones(8, np.float32)})["w"], -np.ones(8, np.float32))
    listed = lambda c: {j.job_id for j in c.call(c.scheduler.ListJobs, scheduler_pb2.ListJobsRequest(), "l").jobs}
    assert job.job_id in listed(alice) and job.job_id not in listed(bob) and job.job_id in listed(admin)
    bob.delete_model("bobs")


# -- quotas and data roots -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "train.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    with ps.LocalCluster(servers=1, auth=True, users={"carol": "jobs=1 param_bytes=4KiB tasks_per_job=50"},
                         scheduler_args=["--data-root", str(data), "--quota-jobs", "5"]) as c:
        c.data = data
        yield c


def test_quotas_are_enforced_naming_the_quota(limited):
    with ps.Client(limited.address, token=limited.tokens["carol"]) as carol:
        carol.create_model("a", {"w": np.zeros(512, np.float32)}, replicas=1)  # 2 KiB
        with pytest.raises(ResourceExhausted, match=r"param_bytes quota of 'carol': 2048 bytes held \+ 4096 asked > 4096"):
            carol.create_model("b", {"w": np.zeros(1024, np.float32)}, replicas=1)
        carol.create_model("a", {"w": np.zeros(1024, np.float32)}, replicas=1, replace=True)  # replacing: 4 KiB
        with pytest.raises(ResourceExhausted, match=r"tasks_per_job quota of 'carol': 100 epochs"):
            carol.submit({"epochs": 100})
        first = carol.submit({"epochs": 2})  # no workers: it stays queued
        with pytest.raises(ResourceExhausted, match=r"jobs quota of 'carol': 1 jobs queued or running, at most 1"):
            carol.submit({"epochs": 2})
        first.cancel()
        carol.submit({"epochs": 2}).cancel()  # a slot again
        assert [m for m in carol.cluster().models] == ["a"]


def test_a_job_reads_data_only_under_the_roots(limited, tmp_path):
    with ps.Client(limited.address, token=limited.token) as user:
        ok = user.submit({"epochs": 1, "data": {"uri": str(limited.data / "train.csv"), "label": "label"}})
        ok.cancel()
        for spec, field in (({"data": {"uri": "/etc/passwd", "format": "csv"}}, "data.uri"),
                            ({"data": {"uri": str(limited.data / ".." / "x.csv")}}, "data.uri"),
                            ({"data": {"uri": "http://example.com/x.csv"}}, "data.uri"),
                            ({"checkpoint_dir": str(tmp_path)}, "checkpoint_dir")):
            with pytest.raises(PermissionDenied, match=f"'{field}'"):
                user.submit(spec)
        with pytest.raises(PermissionDenied, match="'resume_from'"):
            user.call(user.scheduler.SubmitJob, scheduler_pb2.SubmitJobRequest(resume_from=str(tmp_path)), "submit")
        user.submit({"epochs": 1, "data": "builtin:digits"}).cancel()


def test_a_checkpoint_url_must_be_absolute():
    with ps.LocalCluster(servers=1) as c, ps.Client(c.address) as client:
        model = client.create_model("m", {"w": np.zeros(4, np.float32)})
        with pytest.raises(InvalidArgument, match="must be an absolute path or a URL"):
            client.call(client.server(model.shards[0]).Checkpoint,
                        server_pb2.CheckpointRequest(model="m", url="relative/dir", shard="s0"), "checkpoint")


# -- settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ("boss 0123456789abcdefXYZ", "unknown role 'boss'"),
    ("user short", "at least 16 characters"),
    ("user 0123456789abcdefXYZ bob jobs=x", "jobs: 'x' is not a size"),
    ("user 0123456789abcdefXYZ bob cpus=3", "'cpus=3' is not a quota"),
    ("user 0123456789abcdefXYZ bob\nadmin 0123456789abcdefXYZ root", "the token of 'root' is listed twice"),
])
def test_a_bad_auth_file_is_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{line}\n")
    with pytest.raises(SecurityError, match=message):
        AuthTable.load(str(path))


def test_tokens_resolve_to_their_identity(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("member m-0123456789abcdef\nuser u-0123456789abcdef alice jobs=2 param_bytes=1MiB\n")
    table = AuthTable.load(str(path))
    assert table.lookup("u-0123456789abcdef") == security.Identity("alice", "user", {"jobs": 2, "param_bytes": 1 << 20})
    assert table.lookup("m-0123456789abcdef").role == "member"
    assert table.lookup("u-0123456789abcdeF") is None
    assert table.named("alice").quotas["jobs"] == 2


def test_a_process_with_settings_that_cannot_work_exits_naming_the_file(tmp_path):
    from click.testing import CliRunner

    from ps.cli import main
    result = CliRunner().invoke(main, ["status", "127.0.0.1:1", "--tls-ca", str(tmp_path / "missing.crt")])
    assert result.exit_code == 2
    assert f"TLS CA {tmp_path / 'missing.crt'}: No such file" in result.output
