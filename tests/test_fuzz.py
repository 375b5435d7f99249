"""Fuzz every RPC of the scheduler and of a parameter server with hypothesis.

The requests are generated from the service descriptors: each method's input type is walked
field by field (recursively) and every field gets a strategy for its type, biased to extremes:
huge and negative numbers, NaN and inf, empty and 1 MB strings, repeated fields with thousands
of entries, plus names and ids that exist on the process (so calls get past the lookups), and
raw bytes that are not a message at all (sent through a generic channel with identity
serializers). Streaming calls are fuzzed too: client streams send generated sequences, and
server streams are read for a few messages under a short deadline, then cancelled.

Each role runs in its own process under an address-space limit (RLIMIT_AS), so an allocation a
request asks for and a limit should have refused fails the test instead of swapping. A role
passes when no call ends with UNKNOWN (an exception no handler caught) or with a status message
too long for grpc's metadata, its log shows no uncaught exception, it still answers grpc health,
a sentinel created before the fuzz (and never named by it) is exactly as it was, and SIGTERM
still stops it within its grace period.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import ps
from ps import rpc
from ps.v1 import optimizer_pb2, scheduler_pb2, server_pb2, tensor_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: calls per role (CI runs the default)
CALLS = int(os.environ.get("PS_FUZZ_CALLS", "5000"))
#: address space each role may map: an allocation beyond it fails the test instead of swapping.
#: The roles' memory limits default to half of what it leaves (see ps.limits.memory_available).
ADDRESS_SPACE = 3 << 30
#: serve_until_signal's grace, and what SIGTERM may take on top of it (interpreter shutdown)
GRACE_S, EXIT_SLACK_S = 5.0, 3.0
#: hypothesis seed (default: a fresh one each run, shown with any failure)
SEED = int(os.environ.get("PS_FUZZ_SEED", str(int.from_bytes(os.urandom(4), "little"))))
#: calls in flight at once (the fuzz hammers; it does not wait for each call)
CONCURRENCY = 4
BIG = 1 << 20

# -- what the fuzz never names: the sentinels it checks afterwards ------------------------------
SENTINEL_MODEL = "sentinel"            # on the server
SENTINEL_SERVER = "127.0.0.1:1"        # a registered server's address (nothing listens there)
SENTINEL_SERVER_ID = "server-0"
SENTINEL_MAP = "sentinel-map"
SENTINEL_JOB = "job-1"
SENTINELS = {SENTINEL_MODEL, SENTINEL_SERVER, SENTINEL_SERVER_ID, SENTINEL_MAP, SENTINEL_JOB}


# -- strategies built from the descriptors --------------------------------------------------------
INT_RANGES = {
    FD.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), FD.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FD.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), FD.TYPE_UINT32: (0, (1 << 32) - 1),
    FD.TYPE_FIXED32: (0, (1 << 32) - 1), FD.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FD.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1), FD.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FD.TYPE_UINT64: (0, (1 << 64) - 1), FD.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    extremes = sorted({v for v in (0, 1, -1, 2, 7, 1023, 1024, 4096, 1 << 20, (1 << 31) - 1, 1 << 31, 1 << 32,
                                   (1 << 53) + 1, 10**12, 10**15, (1 << 62), (1 << 63) - 1, 1 << 63,
                                   (1 << 64) - 1, -(1 << 31), -(1 << 63), -1000) if lo <= v <= hi})
    return st.one_of(st.sampled_from(extremes), st.integers(max(lo, -1000), min(hi, 1000)), st.integers(lo, hi))


FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308,
                                    -1e308, 5e-324, 3.4e38, 1e-3]), st.floats())

#: a 1 MB ASCII string and a 1 MB string of 2-byte characters (a byte limit is not a length limit)
BIG_STRINGS = st.sampled_from(["x" * BIG, "é" * (BIG // 2)])
TEXT = st.one_of(st.text(max_size=20), st.text(min_size=250, max_size=300), st.sampled_from(["", " ", "\x00",
                                                                                           "../etc", "a" * 257]))


def safe_names(*names: str) -> st.SearchStrategy[str]:
    assert not SENTINELS & set(names)
    return st.sampled_from(names)


def not_sentinel(s: str) -> bool:
    return s not in SENTINELS


def free_of_sentinels(raw: bytes) -> bool:
    """Bytes that name no sentinel: a byte overwritten in DeleteJob(job_id="job-2") can make it "job-1"."""
    return not any(name.encode() in raw for name in SENTINELS)


class Builder:
    """Strategies for the messages of one service: per field type, with per-field overrides."""

    def __init__(self, module, names: dict[str, st.SearchStrategy], overrides: dict):
        self.module = module
        self.names = names            # string field name -> strategy of names that exist
        self.overrides = overrides    # (message name, field name) or message name -> strategy
        self._cache: dict[tuple[str, bool], st.SearchStrategy] = {}

    def string(self, field, small: bool) -> st.SearchStrategy[str]:
        parts = [TEXT]
        if field.name in self.names:
            parts = [self.names[field.name]] * 3 + parts
        if not small:
            parts.append(BIG_STRINGS)
        return st.one_of(parts).filter(not_sentinel)

    def scalar(self, field, small: bool) -> st.SearchStrategy:
        t = field.type
        if t in INT_RANGES:
            return integers(*INT_RANGES[t])
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return FLOATS
        if t == FD.TYPE_BOOL:
            return st.booleans()
        if t == FD.TYPE_STRING:
            return self.string(field, small)
        if t == FD.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.just(b"") if small else st.just(b"\x7f" * BIG))
        if t == FD.TYPE_ENUM:
            return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 50))
        if t == FD.TYPE_MESSAGE:
            return self.message(field.message_type, small=True)
        raise AssertionError(f"no strategy for {field.full_name}")

    def field(self, field, small: bool) -> st.SearchStrategy:
        over = self.overrides.get((field.containing_type.name, field.name))
        if over is not None:
            return over
        elem = self.scalar(field, small)
        if not field.is_repeated:
            return elem
        many = st.tuples(self.scalar(field, True), st.integers(1000, 5000)).map(lambda p: [p[0]] * p[1])
        return st.one_of(st.lists(elem, max_size=4), many) if not small else st.lists(elem, max_size=3)

    def message(self, desc, small: bool = False) -> st.SearchStrategy:
        key = (desc.full_name, small)
        if key in self._cache:
            return self._cache[key]
        cls = getattr(self.module, desc.name, None) or _class_of(desc)
        self._cache[key] = st.deferred(lambda: strat)  # recursion guard
        fields = {f.name: self.field(f, small) for f in desc.fields}
        # Each field may be left unset (proto3 optional, or just absent).
        strat = st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))
        if desc.name in self.overrides:  # well-formed requests that get past the checks, half the time
            strat = st.one_of(self.overrides[desc.name], strat)
        self._cache[key] = strat
        return strat


def _class_of(desc):
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(desc)


def _build(cls, kw: dict):
    msg = cls()
    for name, value in kw.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        try:
            if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                for entry in value:  # a map: its generated entries' key/value pairs
                    target = getattr(msg, name)
                    if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                        target[entry.key].CopyFrom(entry.value)
                    else:
                        target[entry.key] = entry.value
            elif f.is_repeated:
                getattr(msg, name).extend(value)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError):
            pass  # a value this field cannot hold (the proto library refuses it client-side)
    return msg


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """A serialized message with bytes overwritten and maybe truncated: almost a message."""
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


def calls_for(service, builder: Builder, extra: dict | None = None):
    """A strategy of (method, request or requests, raw) for every method of ``service``."""
    options = []
    for m in service.methods:
        req = (extra or {}).get(m.name) or builder.message(m.input_type)
        if m.client_streaming:
            seq = st.one_of(st.lists(req, max_size=4),
                            st.tuples(req, st.integers(50, 400)).map(lambda p: [p[0]] * p[1]))
            options.append(st.tuples(st.just(m), seq, st.just(False)))
        else:
            options.append(st.tuples(st.just(m), req, st.just(False)))
        garbage = st.one_of(
            st.binary(max_size=300),
            st.tuples(req, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
                      st.none() | st.integers(0, 200))
            .map(lambda p: mutate(p[0].SerializeToString(), p[1], p[2]))).filter(free_of_sentinels)
        if m.client_streaming:
            garbage = st.lists(garbage, min_size=1, max_size=3)
        options.append(st.tuples(st.just(m), garbage, st.just(True)))
    return st.one_of(options)


# -- running one call ------------------------------------------------------------------------------
def _ident(b):
    return b


class Caller:
    """Runs generated calls against one address, CONCURRENCY at a time, and records failures."""

    def __init__(self, address: str, service_name: str):
        self.channel = grpc.insecure_channel(address, options=rpc.message_options(64 << 20))
        self.service = service_name
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="fuzz")
        self.slots = threading.BoundedSemaphore(CONCURRENCY * 4)
        self.failures: list[str] = []
        self.codes: dict[str, int] = {}
        self.by_method: dict[str, dict[str, int]] = {}
        self.calls = 0
        self._lock = threading.Lock()

    def submit(self, method, request, raw: bool) -> None:
        self.slots.acquire()
        self.calls += 1
        fut = self.pool.submit(self._call, method, request, raw)
        fut.add_done_callback(lambda f: self.slots.release())

    def _call(self, m, request, raw: bool) -> None:
        path = f"/{self.service}/{m.name}"
        ser = _ident if raw else (lambda msg: msg.SerializeToString())
        code = "OK"
        try:
            if m.client_streaming and m.server_streaming:
                it = self.channel.stream_stream(path, request_serializer=ser, response_deserializer=_ident)(
                    iter(request), timeout=5)
                self._drain(it)
            elif m.client_streaming:
                self.channel.stream_unary(path, request_serializer=ser, response_deserializer=_ident)(
                    iter(request), timeout=10)
            elif m.server_streaming:
                it = self.channel.unary_stream(path, request_serializer=ser, response_deserializer=_ident)(
                    request, timeout=2)
                self._drain(it)
            else:
                self.channel.unary_unary(path, request_serializer=ser, response_deserializer=_ident)(
                    request, timeout=10)
        except grpc.RpcError as e:
            code = e.code().name
            details = e.details() or ""
            bad = code == "UNKNOWN" or "metadata size exceeds" in details
            if bad:
                self._fail(m.name, request, raw, f"{code}: {details[:300]}")
        except Exception as e:  # noqa: BLE001 - the fuzz's own failure, reported like the rest
            self._fail(m.name, request, raw, f"client error {type(e).__name__}: {e}")
            code = "CLIENT"
        with self._lock:
            self.codes[code] = self.codes.get(code, 0) + 1
            per = self.by_method.setdefault(m.name, {})
            per[code] = per.get(code, 0) + 1

    @staticmethod
    def _drain(it, n: int = 3) -> None:
        try:
            for i, _ in enumerate(it):
                if i + 1 >= n:
                    break
        finally:
            it.cancel()
        code = it.code()
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, None):
            raise it

    def _fail(self, method: str, request, raw: bool, what: str) -> None:
        shown = repr(request if raw else (request if not isinstance(request, list) else request[:2]))
        with self._lock:
            self.failures.append(f"{method} ({'raw bytes' if raw else 'message'}) -> {what}\n"
                                 f"    request: {shown[:600]}")

    def finish(self) -> None:
        self.pool.shutdown(wait=True)
        self.channel.close()


def fuzz(caller: Caller, calls: st.SearchStrategy, n: int) -> None:
    @hypothesis_seed(SEED)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(call=calls)
    def one(call):
        method, request, raw = call
        caller.submit(method, request, raw)

    one()
    caller.finish()


# -- the role processes ----------------------------------------------------------------------------
def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


class Role:
    """``python -m ps ROLE ...`` under RLIMIT_AS, without the huge-page re-exec."""

    def __init__(self, name: str, args: list[str], workdir: Path, limited: bool = True):
        self.name = name
        self.log = workdir / f"{name}.log"
        port_file = workdir / f"{name}.port"
        env = dict(os.environ, PS_NO_REEXEC="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "ps", *args, "--host", "127.0.0.1", "--port", "0",
                                           "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT,
                                          env=env, preexec_fn=_limit_address_space if limited else None)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def uncaught(self) -> list[str]:
        """Tracebacks in the log (bytes that are not a request get INVALID_ARGUMENT, and no traceback)."""
        text = self.log.read_text(errors="replace")
        out = []
        for block in re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text):  # one log record each
            if "Traceback" in block or "Exception in thread" in block or "Exception calling application" in block:
                out.append(block[:1500])
        return out

    def sigterm(self) -> float:
        """Seconds from SIGTERM to the process's exit (it must exit 0)."""
        start = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            rc = self.popen.wait(timeout=GRACE_S + 30)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
            time.sleep(2)
            self.kill()
            pytest.fail(f"{self.name} did not exit within {GRACE_S + 30:g} s of SIGTERM:\n"
                        f"{self.log.read_text()[-6000:]}")
        took = time.monotonic() - start
        assert rc == 0, f"{self.name} exited {rc} after SIGTERM:\n{self.log.read_text()[-3000:]}"
        return took

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def report(role: Role, caller: Caller, exit_s: float) -> str:
    line = (f"{role.name}: {caller.calls} calls, statuses {dict(sorted(caller.codes.items()))}, "
            f"SIGTERM exit in {exit_s:.2f} s")
    print(line)
    for name, codes in sorted(caller.by_method.items()):
        print(f"  {name}: {dict(sorted(codes.items()))}")
    return line


def check_role(role: Role, caller: Caller, before, after) -> None:
    problems = list(caller.failures)
    problems += [f"uncaught exception in {role.name}'s log:\n{b}" for b in role.uncaught()]
    if before != after:
        problems.append(f"{role.name}'s sentinel changed:\n  before: {before}\n  after:  {after}")
    assert not problems, (f"{len(problems)} problem(s) (PS_FUZZ_SEED={SEED} repeats this run):\n"
                          + "\n".join(problems[:20]))


# -- the parameter server --------------------------------------------------------------------------
def server_builder() -> Builder:
    names = {"model": safe_names("target", "ghost", ""), "tensor": safe_names("w", "b", "", "nope"),
             "client_id": safe_names("fuzz", "fuzz2", "")}
    floats_data = st.one_of(
        st.tuples(st.sampled_from([1, 2]), st.integers(0, 64)).flatmap(
            lambda p: st.tuples(st.just(p[0]), st.just(p[1]),
                                st.binary(min_size=p[1] * (4 if p[0] == 1 else 8),
                                          max_size=p[1] * (4 if p[0] == 1 else 8)))),
        st.tuples(st.sampled_from([1, 2]), st.integers(0, 64)).map(
            lambda p: (p[0], p[1], np.arange(p[1], dtype=np.float32 if p[0] == 1 else np.float64).tobytes())))
    tensors = floats_data.map(lambda p: tensor_pb2.Tensor(dtype=p[0], shape=[p[1]], data=p[2]))
    chunks = st.builds(lambda t, o, v: tensor_pb2.Chunk(tensor=t, offset=o, values=v),
                       names["tensor"], st.one_of(st.integers(0, 5000), integers(-(1 << 63), (1 << 63) - 1)), tensors)
    consistent_slice = st.tuples(
        names["tensor"], st.lists(st.integers(0, 40), min_size=0, max_size=3), st.sampled_from([1, 2, 1, 3, 0]),
        st.sampled_from(["", "zeros", "constant", "normal", "uniform", "glorot_uniform", "he_normal", "bogus"]),
        FLOATS, FLOATS, integers(0, (1 << 64) - 1)).map(_slice_spec)
    b = Builder(server_pb2, names, {})
    b.overrides = {
        ("PushRequest", "chunk"): st.one_of(chunks, b.message(tensor_pb2.Chunk.DESCRIPTOR, small=True)),
        ("AssignRequest", "chunk"): st.one_of(chunks, b.message(tensor_pb2.Chunk.DESCRIPTOR, small=True)),
        ("CreateModelRequest", "slices"): st.one_of(
            st.lists(consistent_slice, max_size=4),
            st.lists(b.message(server_pb2.SliceSpec.DESCRIPTOR, small=True), max_size=3),
            st.tuples(consistent_slice, st.integers(1000, 100_000)).map(lambda p: [p[0]] * p[1])),
        ("CreateModelRequest", "optimizer"): st.one_of(
            st.sampled_from(["sgd", "adam", "adamw", "rmsprop", "adagrad", "momentum", "nesterov", "x"]).map(
                lambda n: optimizer_pb2.OptimizerConfig(name=n)),
            b.message(optimizer_pb2.OptimizerConfig.DESCRIPTOR, small=True)),
        "PushRequest": st.builds(
            lambda o, n, scale, seq, cid: server_pb2.PushRequest(
                model="target", client_id=cid, seq=seq, grad_scale=scale, chunk=tensor_pb2.Chunk(
                    tensor="w", offset=o, values=tensor_pb2.Tensor(dtype=1, shape=[n], data=np.full(
                        n, 0.5, np.float32).tobytes()))),
            st.integers(0, (1 << 20) - 64), st.integers(0, 64), st.sampled_from([0.0, 1.0, 0.5, 3.0]),
            st.integers(0, 50), st.sampled_from(["fuzz", "fuzz2", "fuzz3"])),
        "AssignRequest": st.builds(
            lambda o, n: server_pb2.AssignRequest(model="target", chunk=tensor_pb2.Chunk(
                tensor="b", offset=o, values=tensor_pb2.Tensor(dtype=2, shape=[n], data=np.zeros(n).tobytes()))),
            st.integers(0, 64), st.integers(0, 64)),
        "PullRequest": st.builds(
            lambda ranges, chunk: server_pb2.PullRequest(model="target", ranges=ranges, max_chunk_bytes=chunk),
            st.lists(st.builds(lambda t, o, n: server_pb2.Range(tensor=t, offset=o, length=n),
                               st.sampled_from(["w", "b"]), st.integers(0, 64), st.integers(0, 1 << 20)), max_size=3),
            st.sampled_from([0, 1024, 4096, 1 << 20, 16 << 20])),
        "DeleteModelRequest": st.sampled_from(["ghost", "", "target2"]).map(
            lambda m: server_pb2.DeleteModelRequest(model=m)),
        # 'target' stays for pushes and pulls to reach (the fuzz creates and deletes 'target2')
        ("CreateModelRequest", "model"): st.one_of(safe_names("target2", "ghost", ""), TEXT, BIG_STRINGS),
        ("DeleteModelRequest", "model"): st.one_of(safe_names("target2", "ghost", ""), TEXT, BIG_STRINGS),
        ("Range", "offset"): st.one_of(st.integers(0, 1 << 20), integers(-(1 << 63), (1 << 63) - 1)),
        ("Range", "length"): st.one_of(st.integers(0, 1 << 20), integers(-(1 << 63), (1 << 63) - 1)),
    }
    return b


def _slice_spec(p):
    tensor, shape, dtype, kind, a, bb, seed = p
    size = int(np.prod(shape)) if shape else 1
    off = min(size, 3)
    init = server_pb2.Initializer(kind=kind, value=a, mean=a, std=bb, low=a, high=bb, seed=seed)
    return server_pb2.SliceSpec(tensor=tensor, shape=shape, dtype=dtype, offset=off, length=max(0, size - off),
                                init=init)


def test_fuzz_parameter_server(tmp_path):
    with ps.LocalCluster(servers=0) as cluster:
        role = Role("server", ["server", "--scheduler", cluster.address], tmp_path)
        try:
            with ps.Client(cluster.address) as client:
                ps_limits_hint = client.cluster()  # the server registered
                assert ps_limits_hint.servers
                rng = np.random.default_rng(0)
                client.create_model(SENTINEL_MODEL, {"w": rng.standard_normal((300, 70)).astype(np.float32),
                                                     "b": rng.standard_normal(70)},
                                    optimizer={"name": "adam", "lr": 0.01}, max_slice_bytes=16 << 10)
                sentinel = client.model(SENTINEL_MODEL)
                sentinel.push({"w": np.ones((300, 70), np.float32), "b": np.ones(70)})
                # The shard's memory limit defaults to half of what RLIMIT_AS leaves it.
                with grpc.insecure_channel(role.address) as ch:
                    with pytest.raises(grpc.RpcError) as err:
                        ch.unary_unary("/ps.v1.ParameterServer/CreateModel")(server_pb2.CreateModelRequest(
                            model="2gib", slices=[server_pb2.SliceSpec(tensor="w", shape=[1 << 29], dtype=1,
                                                                       offset=0, length=1 << 29)]
                        ).SerializeToString(), timeout=10)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                limit = int(re.search(r"of its limit (\d+)", err.value.details()).group(1))
                assert ADDRESS_SPACE // 4 < limit < ADDRESS_SPACE // 2, err.value.details()
                # the fuzz's way into deep code: a model it may push to, pull from, replace or delete
                client.create_model("target", {"w": np.zeros(1 << 20, np.float32), "b": np.zeros(64)},
                                    optimizer={"name": "sgd", "lr": 0.1})

                def snapshot():
                    """The sentinel's Stats (pulls apart: each snapshot's own pull adds to them) and a
                    digest of its weights."""
                    [stats] = [m for m in client.stats(role.address).models if m.model == SENTINEL_MODEL]
                    pulls, stats.pulls = stats.pulls, 0
                    weights = {k: hashlib.sha256(v.tobytes()).hexdigest()[:16] for k, v in sentinel.pull().items()}
                    return str(stats).replace("\n", " "), pulls, weights
                first = snapshot()
                before = snapshot()
                per_snapshot = before[1] - first[1]
                caller = Caller(role.address, "ps.v1.ParameterServer")
                service = server_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
                started = time.monotonic()
                fuzz(caller, calls_for(service, server_builder()), CALLS)
                fuzz_s = time.monotonic() - started
                assert rpc.check_health(role.address) == "SERVING"
                after = snapshot()
                after = (after[0], after[1] - per_snapshot, after[2])
            stop_and_check(role, caller, before, after, fuzz_s)
        finally:
            role.kill()


def stop_and_check(role, caller, before, after, fuzz_s: float) -> None:
    """After the fuzz: SIGTERM stops the role within its grace, every call got a proper status,
    and the sentinel state is what it was."""
    exit_s = role.sigterm()
    print(f"{role.name} fuzz: {fuzz_s:.1f} s")
    report(role, caller, exit_s)
    check_role(role, caller, before, after)
    assert exit_s <= GRACE_S + EXIT_SLACK_S, f"SIGTERM took {exit_s:.1f} s"
    assert caller.calls >= CALLS


# -- the scheduler ---------------------------------------------------------------------------------
def spec_json() -> st.SearchStrategy[str]:
    """Job specs: valid ones with one or two fields made extreme, and text that is barely JSON."""
    from ps.demo import demo_spec
    base = demo_spec("mlp").to_dict()
    extreme = st.one_of(integers(-(1 << 63), (1 << 63) - 1), FLOATS, TEXT, st.none(), st.booleans(),
                        st.just([]), st.just({}), st.just([1] * 5000), st.just("x" * 5000))
    fields = st.sampled_from(["name", "epochs", "batch_size", "workers", "seed", "lease_timeout_s", "loss",
                              "optimizer", "model", "keep_params", "consistency", "metrics", "data"])
    data_fields = st.sampled_from(["uri", "shards", "test_fraction", "reshape", "scale", "label", "format"])
    uris = st.one_of(
        st.builds(lambda k, n, f, c: f"synthetic:{k}?n={n}&features={f}&classes={c}",
                  st.sampled_from(["classification", "regression", "x"]),
                  st.sampled_from(["1e12", "-1", "0", "1e400", "nan", "10", str(1 << 62)]),
                  st.sampled_from(["1e9", "0", "3", "-5"]), st.sampled_from(["1e9", "2", "0"])),
        st.sampled_from(["builtin:digits", "builtin:nope", "/dev/zero", "file:///etc/passwd", "", "synthetic:"]))

    def patch(p):
        d = json.loads(json.dumps(base))
        (f1, v1), (f2, v2), uri = p
        d[f1] = v1
        d.setdefault("data", {})
        if isinstance(d["data"], dict):
            d["data"][f2] = v2
            if f2 == "uri":
                d["data"]["uri"] = uri
        try:
            return json.dumps(d, allow_nan=True)
        except (TypeError, ValueError):
            return "{}"
    specs = st.tuples(st.tuples(fields, extreme), st.tuples(data_fields, extreme), uris).map(patch)
    return st.one_of(specs, TEXT, st.sampled_from(["[" * 100_000, "{\"a\":" * 50_000 + "1", "null", "[]", "1e999",
                                                  '{"model": [' + '{"type": "dense", "units": 1000000000},' * 3
                                                  + '{"type": "dense", "units": 10}]}']), BIG_STRINGS)


def scheduler_builder() -> Builder:
    jobs = safe_names("job-2", "job-3", "job-7", "job-x", "")
    names = {"model": safe_names("target-map", "job-2", "ghost", ""), "name": safe_names("w", "b", "worker"),
             "job_id": jobs, "worker_id": safe_names("worker-0", "worker-1", "worker-3", ""),
             "server_id": safe_names("server-1", "server-2", "server-5", ""),
             "task_id": safe_names("job-2/inspect", "job-3/inspect", "job-2/train-0-0", "job-2/eval-0", "x/y"),
             "lease_id": safe_names("lease-1", "lease-2", "lease-3", ""),
             "address": safe_names("127.0.0.1:2", "127.0.0.1:3", "nocolon", ":", "[::1]:4", "localhost:1"),
             "device": safe_names("cpu", "gpu:0", "gpu:-1", ""), "page_token": safe_names("", "1", "-5", "99", "x")}
    results = st.one_of(
        st.sampled_from(["", "{}", "[" * 5000, "null"]),
        st.builds(lambda shards, shape, kind: json.dumps(
            {"prep": {"shards": shards, "input_shape": [64], "n_train": 10, "n_test": 5, "scaler": {},
                      "output_shape": [10]},
             "params": {"0.dense.w": {"kind": kind, "shape": shape, "dtype": "float32", "seed": 0}}}),
            st.sampled_from([1, 0, -1, 100_000, 10**9, "x"]),
            st.sampled_from([[64, 10], [10**6, 10**6], [-1, 3], [], [0, 5], [2] * 40]),
            st.sampled_from(["glorot_uniform", "zeros", "bogus"])),
        TEXT)
    b = Builder(scheduler_pb2, names, {})
    b.overrides = {
        "PlanModelRequest": st.builds(
            lambda model, shapes, slice_bytes, opt, replace: scheduler_pb2.PlanModelRequest(
                model=model, max_slice_bytes=slice_bytes, replace=replace, tensors=[
                    scheduler_pb2.TensorInfo(name=f"t{i}", shape=shape, dtype=1) for i, shape in enumerate(shapes)],
                **({"optimizer": optimizer_pb2.OptimizerConfig(name=opt)} if opt else {})),
            safe_names("target-map", "m2", "m3", "job-2"),
            st.lists(st.lists(st.one_of(st.integers(0, 3000), st.sampled_from([1 << 20, 1 << 31, 1 << 40])),
                              max_size=3), min_size=1, max_size=4),
            st.sampled_from([0, 1, 4, 4096, 1 << 20, 1 << 40, -1]), st.sampled_from(["", "sgd", "adam", "nope"]),
            st.booleans()),
        ("SubmitJobRequest", "spec_json"): spec_json(),
        ("CompleteTaskRequest", "result_json"): results,
        ("PlanModelRequest", "tensors"): st.one_of(
            st.lists(st.builds(lambda n, shape, dt: scheduler_pb2.TensorInfo(name=n, shape=shape, dtype=dt),
                               safe_names("w", "b", "w", ""),
                               st.lists(st.one_of(st.integers(0, 100), integers(-(1 << 63), (1 << 63) - 1)),
                                        max_size=4),
                               st.sampled_from([1, 2, 3, 0, 9])), max_size=4),
            st.tuples(st.builds(lambda s: scheduler_pb2.TensorInfo(name="w", shape=[s], dtype=1),
                                st.integers(0, 100)), st.integers(1000, 6000)).map(lambda p: [p[0]] * p[1])),
    }
    return b


def test_fuzz_scheduler(tmp_path):
    role = Role("scheduler", ["scheduler", "--server-timeout", "3600", "--heartbeat-interval", "1"], tmp_path)
    try:
        from ps.demo import demo_spec
        from ps.v1 import scheduler_pb2_grpc
        with grpc.insecure_channel(role.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            sid = stub.RegisterServer(scheduler_pb2.RegisterServerRequest(address=SENTINEL_SERVER)).server_id
            assert sid == SENTINEL_SERVER_ID
            stub.Heartbeat(scheduler_pb2.HeartbeatRequest(server_id=sid, bytes=12345, models=[SENTINEL_MAP]))
            stub.PlanModel(scheduler_pb2.PlanModelRequest(
                model=SENTINEL_MAP, max_slice_bytes=4096,
                tensors=[scheduler_pb2.TensorInfo(name="w", shape=[100, 30], dtype=1),
                         scheduler_pb2.TensorInfo(name="b", shape=[30], dtype=2)]))
            job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=demo_spec("mlp").to_json()))
            assert job.job_id == SENTINEL_JOB
            stub.CancelJob(scheduler_pb2.CancelJobRequest(job_id=SENTINEL_JOB))
            # what the fuzz may name: a queued job (its inspect task can be leased and completed) and a map
            stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=demo_spec("mlp").to_json()))
            stub.PlanModel(scheduler_pb2.PlanModelRequest(
                model="target-map", tensors=[scheduler_pb2.TensorInfo(name="w", shape=[1000], dtype=1)]))

            def snapshot():
                view = stub.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=10)
                server = [(s.server_id, s.address, s.state, s.bytes, list(s.models))
                          for s in view.servers if s.server_id == SENTINEL_SERVER_ID]
                smap = stub.GetShardMap(scheduler_pb2.GetShardMapRequest(model=SENTINEL_MAP), timeout=10)
                info = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=SENTINEL_JOB), timeout=10)
                events = list(stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=SENTINEL_JOB), timeout=10))
                return server, smap.SerializeToString(), info.SerializeToString(), \
                    [e.SerializeToString() for e in events]
            before = snapshot()
            caller = Caller(role.address, "ps.v1.Scheduler")
            service = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]
            started = time.monotonic()
            fuzz(caller, calls_for(service, scheduler_builder()), CALLS)
            fuzz_s = time.monotonic() - started
            assert rpc.check_health(role.address) == "SERVING"
            after = snapshot()
        stop_and_check(role, caller, before, after, fuzz_s)
    finally:
        role.kill()
