"""Every size a request names is checked against a limit before anything is allocated: one test
per limit, each with the exact status and message a request over it gets, and the state it
leaves (unchanged)."""

from __future__ import annotations

import json
import os
import signal
import time

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

import ps
from ps import limits as ps_limits
from ps.cli import main
from ps.errors import short_message
from ps.limits import Limits
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc, server_pb2, server_pb2_grpc, tensor_pb2

D = Limits()  # the defaults the `cluster` fixture's processes run with (no PS_* variables are set)
F32 = tensor_pb2.FLOAT32


def hint(name: str) -> str:
    return D.hint(name)


def status(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call that must fail."""
    try:
        result = call(*args, **kw)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details()
    pytest.fail("the call succeeded")


@pytest.fixture(scope="module")
def scheduler(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        yield scheduler_pb2_grpc.SchedulerStub(ch)


@pytest.fixture(scope="module")
def shard(cluster):
    """A raw stub on one server, its address, and a model 'm' (tensor 'w', 100 zeros) held there alone."""
    with ps.Client(cluster.address) as client:
        address = client.cluster().servers[0].address
        with grpc.insecure_channel(address) as ch:
            stub = server_pb2_grpc.ParameterServerStub(ch)
            stub.CreateModel(server_pb2.CreateModelRequest(model="m", replace=True, slices=[
                server_pb2.SliceSpec(tensor="w", shape=[100], dtype=F32, offset=0, length=100)]), timeout=10)
            yield stub, address


def shard_state(stub) -> bytes:
    """Everything a shard holds: its models' stats and the values of 'm'."""
    stats = stub.Stats(server_pb2.StatsRequest(), timeout=10)
    models = sorted((m.model, m.slices, m.params, m.bytes, m.pushes, m.max_version) for m in stats.models)
    values = b"".join(r.chunk.values.data for r in stub.Pull(server_pb2.PullRequest(model="m"), timeout=10))
    return repr((models, stats.bytes)).encode() + values


def scheduler_state(stub) -> bytes:
    view = stub.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=10)
    servers = [(s.server_id, s.address, s.state, s.bytes, list(s.models)) for s in view.servers]
    jobs = stub.ListJobs(scheduler_pb2.ListJobsRequest(), timeout=10)
    return repr((servers, list(view.models), len(view.workers), [j.job_id for j in jobs.jobs])).encode()


# -- parameter servers -----------------------------------------------------------------------------
def test_create_model_beyond_max_bytes_is_refused_before_allocating(shard):
    stub, _ = shard
    before = shard_state(stub)
    held = stub.Stats(server_pb2.StatsRequest()).bytes
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model="huge", slices=[
        server_pb2.SliceSpec(tensor="w", shape=[10**12], dtype=F32, offset=0, length=10**12)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert msg == (f"create model 'huge': needs {4 * 10**12} bytes, this shard holds {held} of its limit "
                   f"{D.max_bytes} {hint('max_bytes')}")
    assert shard_state(stub) == before


def test_a_shape_whose_product_wraps_int64_is_counted_exactly(shard):
    """2**32 x 2**32 elements is 2**64, which np.prod(..., int64) wraps to 0."""
    stub, _ = shard
    before = shard_state(stub)
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model="wrap", slices=[
        server_pb2.SliceSpec(tensor="w", shape=[1 << 32, 1 << 32], dtype=F32, offset=0, length=(1 << 62))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "needs 18446744073709551616 bytes" in msg
    assert shard_state(stub) == before


def test_create_model_with_more_slices_than_max_slices(shard):
    stub, _ = shard
    before = shard_state(stub)
    n = D.max_slices + 1
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model="many", slices=[
        server_pb2.SliceSpec(tensor="w", shape=[n], dtype=F32, offset=i, length=1) for i in range(n)]))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"create model 'many': slices: {n} exceeds the limit {D.max_slices} {hint('max_slices')}")
    assert shard_state(stub) == before


def test_create_model_with_more_tensors_than_max_tensors(shard):
    stub, _ = shard
    before = shard_state(stub)
    n = D.max_tensors + 1
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model="wide", slices=[
        server_pb2.SliceSpec(tensor=f"t{i}", shape=[1], dtype=F32, offset=0, length=1) for i in range(n)]))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"create model 'wide': tensors: {n} exceeds the limit {D.max_tensors} "
                           f"{hint('max_tensors')}")
    assert shard_state(stub) == before


def test_create_model_with_more_dims_than_max_dims(shard):
    stub, _ = shard
    before = shard_state(stub)
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model="deep", slices=[
        server_pb2.SliceSpec(tensor="w", shape=[1] * (D.max_dims + 1), dtype=F32, offset=0, length=1)]))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           f"create model 'deep': tensor 'w': shape dimensions: {D.max_dims + 1} exceeds the limit "
                           f"{D.max_dims} {hint('max_dims')}")
    assert shard_state(stub) == before


@pytest.mark.parametrize("name", ["x" * 257, "é" * 129], ids=["ascii", "two-byte"])
def test_names_longer_than_max_name_bytes(shard, name):
    """The limit is on UTF-8 bytes: 129 two-byte characters are 258 bytes."""
    stub, _ = shard
    before = shard_state(stub)
    n = len(name.encode())
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model=name, slices=[
        server_pb2.SliceSpec(tensor="w", shape=[1], dtype=F32, offset=0, length=1)]))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           f"create model: model name: {n} bytes exceeds the limit {D.max_name_bytes} "
                           f"{hint('max_name_bytes')}")
    code, msg = status(stub.Push, iter([server_pb2.PushRequest(
        model="m", client_id=name, seq=1, chunk=tensor_pb2.Chunk(tensor="w", values=tensor_pb2.Tensor(
            dtype=F32, shape=[100], data=np.ones(100, np.float32).tobytes())))]))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           f"push to: client_id: {n} bytes exceeds the limit {D.max_name_bytes} "
                           f"{hint('max_name_bytes')}")
    assert shard_state(stub) == before


def test_initializers_with_values_a_draw_would_overflow(shard):
    stub, _ = shard
    before = shard_state(stub)
    code, msg = status(stub.CreateModel, server_pb2.CreateModelRequest(model="inf", slices=[
        server_pb2.SliceSpec(tensor="w", shape=[4], dtype=F32, offset=0, length=4,
                             init=server_pb2.Initializer(kind="uniform", low=-1e308, high=1e308))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg == ("initializer 'uniform': low must be a finite number of magnitude at most 2.13e+37 (float32), "
                   "got -1e+308")
    assert shard_state(stub) == before


def test_pull_with_more_ranges_than_max_slices(shard):
    stub, _ = shard
    before = shard_state(stub)
    n = D.max_slices + 1
    code, msg = status(stub.Pull, server_pb2.PullRequest(model="m", ranges=[server_pb2.Range(tensor="w", length=1)] * n))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"pull from 'm': ranges: {n} exceeds the limit {D.max_slices} {hint('max_slices')}")
    assert shard_state(stub) == before


@pytest.mark.parametrize("value,bound", [(-1, "below"), (1, "below"), (D.max_chunk_bytes + 1, "exceeds")])
def test_pull_max_chunk_bytes_outside_its_limits(shard, value, bound):
    stub, _ = shard
    before = shard_state(stub)
    code, msg = status(stub.Pull, server_pb2.PullRequest(model="m", max_chunk_bytes=value))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    if bound == "below":
        assert msg == (f"pull from 'm': max_chunk_bytes {value} is below the limit {D.min_chunk_bytes} "
                       f"{hint('min_chunk_bytes')}")
    else:
        assert msg == (f"pull from 'm': max_chunk_bytes {value} exceeds the limit {D.max_chunk_bytes} "
                       f"(the message limit less 64 KiB) (set --max-message-bytes / PS_MAX_MESSAGE_BYTES)")
    assert shard_state(stub) == before


def test_a_malformed_assign_is_invalid_argument_and_sigterm_still_stops_the_shard():
    """grpc leaves a client-stream call whose message does not deserialize unretired now and then,
    and server.stop() then waits for it forever: a shard sent one could not be stopped."""
    with ps.LocalCluster(servers=1) as c:
        with ps.Client(c.address) as client:
            address = client.cluster().servers[0].address
        with grpc.insecure_channel(address) as ch:
            assign = ch.stream_unary("/ps.v1.ParameterServer/Assign", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
            for _ in range(20):
                code, msg = status(assign, iter([b"\xff\xff"]), timeout=5)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert msg.startswith("malformed AssignRequest: Error parsing message")
        server = c.servers[0].popen
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert time.monotonic() - start < 5.0


@pytest.fixture(scope="module")
def tight():
    """A scheduler and one server with small count limits (flags), and max_dims from PS_MAX_DIMS."""
    old = os.environ.get("PS_MAX_DIMS")
    os.environ["PS_MAX_DIMS"] = "3"
    try:
        c = ps.LocalCluster(servers=1, server_args=["--max-models", "2"],
                            scheduler_args=["--max-models", "2", "--max-servers", "3", "--max-workers", "2"])
    finally:
        if old is None:
            del os.environ["PS_MAX_DIMS"]
        else:
            os.environ["PS_MAX_DIMS"] = old
    with c, ps.Client(c.address) as client, grpc.insecure_channel(c.address) as ch:
        yield c, client, scheduler_pb2_grpc.SchedulerStub(ch)


def test_more_models_than_max_models_on_a_shard_and_in_the_scheduler(tight):
    c, client, stub = tight
    address = client.cluster().servers[0].address
    with grpc.insecure_channel(address) as ch:
        shard = server_pb2_grpc.ParameterServerStub(ch)
        for name in ("a", "b"):
            shard.CreateModel(server_pb2.CreateModelRequest(model=name, replace=True, slices=[
                server_pb2.SliceSpec(tensor="w", shape=[4], dtype=F32, offset=0, length=4)]), timeout=10)
        before = shard_state_of(shard)
        code, msg = status(shard.CreateModel, server_pb2.CreateModelRequest(model="c", slices=[
            server_pb2.SliceSpec(tensor="w", shape=[4], dtype=F32, offset=0, length=4)]))
        assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "create model 'c': models on this shard: 3 "
                               "exceeds the limit 2 (set --max-models / PS_MAX_MODELS)")
        shard.CreateModel(server_pb2.CreateModelRequest(model="a", replace=True, slices=[  # replacing is not more
            server_pb2.SliceSpec(tensor="w", shape=[4], dtype=F32, offset=0, length=4)]), timeout=10)
        assert shard_state_of(shard) == before
    for name in ("p", "q"):
        stub.PlanModel(scheduler_pb2.PlanModelRequest(model=name, tensors=[
            scheduler_pb2.TensorInfo(name="w", shape=[4], dtype=F32)]), timeout=10)
    before = scheduler_state(stub)
    code, msg = status(stub.PlanModel, scheduler_pb2.PlanModelRequest(model="r", tensors=[
        scheduler_pb2.TensorInfo(name="w", shape=[4], dtype=F32)]))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "plan model 'r': models: 3 exceeds the limit 2 (set --max-models / PS_MAX_MODELS)")
    assert scheduler_state(stub) == before


def shard_state_of(stub) -> list:
    return sorted((m.model, m.params, m.bytes) for m in stub.Stats(server_pb2.StatsRequest(), timeout=10).models)


def test_a_limit_set_by_its_environment_variable(tight):
    """PS_MAX_DIMS=3 reached both processes (the flags' envvar)."""
    c, client, stub = tight
    before = scheduler_state(stub)
    code, msg = status(stub.PlanModel, scheduler_pb2.PlanModelRequest(model="d4", tensors=[
        scheduler_pb2.TensorInfo(name="w", shape=[1, 1, 1, 1], dtype=F32)]))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "plan model 'd4': tensor 'w': shape dimensions: 4 "
                           "exceeds the limit 3 (set --max-dims / PS_MAX_DIMS)")
    assert scheduler_state(stub) == before


def test_more_servers_and_workers_than_the_scheduler_takes(tight):
    """Counted last in this module: the fake servers registered here stay up for a while."""
    c, client, stub = tight
    stub.RegisterServer(scheduler_pb2.RegisterServerRequest(address="127.0.0.1:1"), timeout=10)
    stub.RegisterServer(scheduler_pb2.RegisterServerRequest(address="127.0.0.1:2"), timeout=10)
    before = scheduler_state(stub)
    code, msg = status(stub.RegisterServer, scheduler_pb2.RegisterServerRequest(address="127.0.0.1:3"))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "register server: servers known: 4 exceeds the "
                           "limit 3 (set --max-servers / PS_MAX_SERVERS)")
    stub.RegisterServer(scheduler_pb2.RegisterServerRequest(address="127.0.0.1:2"), timeout=10)  # known: fine
    for _ in range(2):
        stub.RegisterWorker(scheduler_pb2.RegisterWorkerRequest(name="w", device="cpu"), timeout=10)
    before = scheduler_state(stub)
    code, msg = status(stub.RegisterWorker, scheduler_pb2.RegisterWorkerRequest(name="w", device="cpu"))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "register worker: workers registered: 3 exceeds "
                           "the limit 2 (set --max-workers / PS_MAX_WORKERS)")
    assert scheduler_state(stub) == before


# -- the scheduler ---------------------------------------------------------------------------------
def test_plan_model_beyond_max_model_bytes(scheduler):
    before = scheduler_state(scheduler)
    code, msg = status(scheduler.PlanModel, scheduler_pb2.PlanModelRequest(model="huge", tensors=[
        scheduler_pb2.TensorInfo(name="w", shape=[10**6, 10**6], dtype=F32)]))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"plan model 'huge': parameter bytes: {4 * 10**12} exceeds the limit {D.max_model_bytes} "
                           f"{hint('max_model_bytes')}")
    assert scheduler_state(scheduler) == before


def test_plan_model_of_an_empty_tensor_no_array_could_have(scheduler):
    """0 x 2**31 x 2**31 holds nothing, but numpy (a client pulling it) cannot make that array."""
    before = scheduler_state(scheduler)
    code, msg = status(scheduler.PlanModel, scheduler_pb2.PlanModelRequest(model="void", tensors=[
        scheduler_pb2.TensorInfo(name="w", shape=[0, 1 << 31, 1 << 31], dtype=F32)]))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                           f"plan model 'void': tensor 'w': shape [0, 2147483648, 2147483648]: its dimensions other "
                           f"than 0 span {1 << 64} bytes, which exceeds the limit {D.max_model_bytes} "
                           f"{hint('max_model_bytes')}")
    assert scheduler_state(scheduler) == before


def test_plan_model_into_more_slices_than_max_slices(scheduler):
    before = scheduler_state(scheduler)
    code, msg = status(scheduler.PlanModel, scheduler_pb2.PlanModelRequest(model="fine", max_slice_bytes=4, tensors=[
        scheduler_pb2.TensorInfo(name="w", shape=[10**6], dtype=F32)]))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"plan model 'fine': slices over 2 servers: {10**6} exceeds the limit {D.max_slices} "
                           f"{hint('max_slices')}")
    assert scheduler_state(scheduler) == before


def test_plan_model_with_more_tensors_than_max_tensors(scheduler):
    before = scheduler_state(scheduler)
    n = D.max_tensors + 1
    code, msg = status(scheduler.PlanModel, scheduler_pb2.PlanModelRequest(model="wide", tensors=[
        scheduler_pb2.TensorInfo(name=f"t{i}", shape=[1], dtype=F32) for i in range(n)]))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"plan model 'wide': tensors: {n} exceeds the limit {D.max_tensors} {hint('max_tensors')}")
    assert scheduler_state(scheduler) == before


def test_heartbeat_listing_more_models_than_max_models(scheduler):
    before = scheduler_state(scheduler)
    sid = scheduler.GetCluster(scheduler_pb2.GetClusterRequest()).servers[0].server_id
    n = D.max_models + 1
    code, msg = status(scheduler.Heartbeat, scheduler_pb2.HeartbeatRequest(server_id=sid, bytes=1,
                                                                            models=["m"] * n))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"heartbeat from '{sid}': models: {n} exceeds the limit {D.max_models} {hint('max_models')}")
    assert scheduler_state(scheduler) == before


def test_submit_job_with_a_spec_beyond_max_text_bytes(scheduler):
    before = scheduler_state(scheduler)
    text = json.dumps({"name": "x" * D.max_text_bytes})
    code, msg = status(scheduler.SubmitJob, scheduler_pb2.SubmitJobRequest(spec_json=text))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"submit job: spec_json: {len(text)} bytes exceeds the limit {D.max_text_bytes} "
                           f"{hint('max_text_bytes')}")
    code, msg = status(scheduler.SubmitJob, scheduler_pb2.SubmitJobRequest(spec_json="[" * 100_000))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "submit job: spec_json: nested deeper than 64 levels")
    assert scheduler_state(scheduler) == before


SPEC_LIMITS = [
    ({"epochs": D.max_epochs + 1}, f"spec.epochs: {D.max_epochs + 1} exceeds the limit {D.max_epochs} "
                                   f"{hint('max_epochs')}"),
    ({"batch_size": D.max_batch_size + 1}, f"spec.batch_size: {D.max_batch_size + 1} exceeds the limit "
                                           f"{D.max_batch_size} {hint('max_batch_size')}"),
    ({"workers": D.max_shards + 1}, f"spec.workers: {D.max_shards + 1} exceeds the limit {D.max_shards} "
                                    f"{hint('max_shards')}"),
    ({"data": {"shards": D.max_shards + 1}}, f"spec.data.shards: expected an integer >= 0 (0: 2 per worker), at most "
                                             f"the limit {D.max_shards} {hint('max_shards')}, got {D.max_shards + 1}"),
    ({"name": "x" * 300}, f"spec.name: 300 bytes exceeds the limit {D.max_name_bytes} {hint('max_name_bytes')}"),
    ({"data": {"uri": "synthetic:classification?n=1e9&features=20"}},
     f"spec.data.uri: n x features = {20 * 10**9} exceeds the limit {D.max_synthetic_values} "
     f"{hint('max_synthetic_values')}"),
    ({"data": {"uri": "synthetic:classification?n=10&features=100000&classes=100000"}},
     f"spec.data.uri: features x classes = {10**10} exceeds the limit {D.max_synthetic_values} "
     f"{hint('max_synthetic_values')}"),
    ({"lease_timeout_s": float("nan")}, "spec.lease_timeout_s: expected a positive number, got nan"),
    ({"eval_every": 0}, "spec.eval_every: expected an integer >= 1 (epochs between evaluations), got 0"),
]


@pytest.mark.parametrize("change,message", SPEC_LIMITS, ids=["epochs", "batch-size", "workers", "shards", "name",
                                                             "synthetic-n", "synthetic-classes", "lease-nan",
                                                             "eval-every"])
def test_job_specs_over_a_limit(scheduler, change, message):
    from ps.demo import demo_spec
    spec = demo_spec("mlp").to_dict()
    for k, v in change.items():
        if isinstance(v, dict):
            spec[k].update(v)
        else:
            spec[k] = v
    before = scheduler_state(scheduler)
    code, msg = status(scheduler.SubmitJob, scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert scheduler_state(scheduler) == before


def test_watch_job_after_an_event_the_job_has_not_had(scheduler, client):
    from ps.demo import demo_spec
    job = scheduler.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=demo_spec("mlp").to_json()))
    scheduler.CancelJob(scheduler_pb2.CancelJobRequest(job_id=job.job_id))
    events = list(scheduler.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job.job_id), timeout=10))
    last = events[-1].seq
    for after in (-1, last + 1, 1 << 62):
        code, msg = status(scheduler.WatchJob, scheduler_pb2.WatchJobRequest(job_id=job.job_id, after=after),
                           timeout=10)
        assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, f"watch job '{job.job_id}': after must be in "
                               f"[0, {last}] (the last event's seq), got {after}")
    code, msg = status(scheduler.WatchJob, scheduler_pb2.WatchJobRequest(job_id="job-none"), timeout=10)
    assert (code, msg) == (grpc.StatusCode.NOT_FOUND, "job 'job-none' not found")
    assert list(scheduler.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job.job_id), timeout=10)) == events


def test_fetch_weights_max_chunk_bytes_below_its_limit(scheduler):
    code, msg = status(scheduler.FetchWeights, scheduler_pb2.FetchWeightsRequest(model="m", max_chunk_bytes=-1),
                       timeout=10)
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, f"fetch weights of 'm': max_chunk_bytes -1 is below "
                           f"the limit {D.min_chunk_bytes} {hint('min_chunk_bytes')}")


def test_fetch_weights_of_a_model_beyond_max_fetch_bytes(scheduler):
    """A relay holds the whole model in the scheduler: a planned model bigger than max_fetch_bytes
    is refused before anything is pulled."""
    n = D.max_fetch_bytes // 4 + 1
    scheduler.PlanModel(scheduler_pb2.PlanModelRequest(model="relay", tensors=[
        scheduler_pb2.TensorInfo(name="w", shape=[n], dtype=F32)]), timeout=10)
    try:
        before = scheduler_state(scheduler)
        code, msg = status(scheduler.FetchWeights, scheduler_pb2.FetchWeightsRequest(model="relay"), timeout=10)
        assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"fetch weights of 'relay': parameter bytes: {4 * n} (with 0 in use now) "
                               f"exceeds the limit {D.max_fetch_bytes} {hint('max_fetch_bytes')}")
        assert scheduler_state(scheduler) == before
    finally:
        scheduler.DropModel(scheduler_pb2.DropModelRequest(model="relay"), timeout=10)


def test_complete_task_with_an_error_beyond_max_text_bytes_or_negative_counts(scheduler):
    before = scheduler_state(scheduler)
    n = D.max_text_bytes + 1
    code, msg = status(scheduler.CompleteTask, scheduler_pb2.CompleteTaskRequest(
        worker_id="worker-0", task_id="job-1/inspect", lease_id="lease-1", error="e" * n))
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED, f"complete task 'job-1/inspect': error: {n} bytes "
                           f"exceeds the limit {D.max_text_bytes} {hint('max_text_bytes')}")
    code, msg = status(scheduler.CompleteTask, scheduler_pb2.CompleteTaskRequest(
        worker_id="worker-0", task_id="job-1/train-0-0", lease_id="lease-1", samples=-5))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "complete task 'job-1/train-0-0': samples must be >= 0, "
                           "got -5")
    assert scheduler_state(scheduler) == before


def test_bytes_that_are_not_a_request_are_invalid_argument_not_unknown(scheduler, cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        get_job = ch.unary_unary("/ps.v1.Scheduler/GetJob", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
        code, msg = status(get_job, b"\xff\xff", timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("malformed GetJobRequest: Error parsing message")


# -- in-process: the generator, the settings, the messages -----------------------------------------
def test_the_synthetic_generator_refuses_before_drawing():
    from ps.worker.datasets import open_uri
    with pytest.raises(ValueError) as err:
        open_uri("synthetic:classification?n=1e9")
    assert str(err.value) == (f"synthetic:classification: n x features = {20 * 10**9} exceeds the limit "
                              f"{D.max_synthetic_values} {hint('max_synthetic_values')}")


def test_limits_come_from_the_environment_and_default_to_half_the_memory_left():
    lim = Limits.from_env({"PS_MAX_SLICES": "7", "PS_MAX_BYTES": "64MiB", "PS_MAX_TEXT_BYTES": ""})
    assert (lim.max_slices, lim.max_bytes, lim.max_text_bytes) == (7, 64 << 20, D.max_text_bytes)
    with pytest.raises(ValueError, match="PS_MAX_SLICES='x': expected an integer"):
        Limits.from_env({"PS_MAX_SLICES": "x"})
    available = ps_limits.memory_available()
    assert 0 < D.max_bytes <= available // 2 + (1 << 20) and 0 < D.max_fetch_bytes <= available // 4 + (1 << 20)


@pytest.mark.parametrize("role", ["server", "scheduler"])
def test_every_limit_of_a_role_is_a_flag_with_its_variable(role):
    out = CliRunner().invoke(main, [role, "--help"], terminal_width=400).output
    import dataclasses
    for f in dataclasses.fields(Limits):
        if role in f.metadata.get("roles", ()):
            assert f.metadata["flag"] in out and f.metadata["env"] in out, f.name


def test_status_messages_are_cut_to_what_grpc_metadata_carries():
    assert short_message("x" * 100) == "x" * 100
    cut = short_message("é" * 100_000)
    assert cut.endswith("more characters)") and len(cut.encode()) * 3 < 8192


def test_replacing_a_model_counts_the_old_one_until_the_new_one_exists():
    """Both are allocated at once for a moment, so the shard's memory limit must allow for both."""
    from ps.errors import ResourceExhausted
    from ps.server.shard import ShardStore, SliceRequest
    sl = [SliceRequest("w", (1000,), np.dtype("float32"), 0, 1000)]
    need = ShardStore(max_bytes=1 << 20).create("probe", sl, {"name": "sgd"})
    store = ShardStore(max_bytes=2 * need - 1)
    store.create("m", sl, {"name": "sgd"})
    store.assign("m", "w", 0, np.full(1000, 7.0, np.float32))
    with pytest.raises(ResourceExhausted, match=f"needs {need} bytes, this shard holds {need} of its limit"):
        store.create("m", sl, {"name": "sgd"}, replace=True)
    assert store.model("m").tensors["w"].slices[0].param[0] == 7.0   # the old model is untouched
    store.delete("m")
    store.create("m", sl, {"name": "sgd"}, replace=True)
