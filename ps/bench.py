"""Benchmarks behind `paramserver bench ...`: figures as ratios against a ceiling measured in
the same run, because the machines are shared and noisy."""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

from ps import rpc

ECHO_METHOD = "/ps.bench.Echo/Stream"
ECHO_UNARY = "/ps.bench.Echo/Unary"
#: pushpull alternates its two measurements this many times (best of each)
ROUNDS = 3


def _echo_stream(request_iterator, context):
    for chunk in request_iterator:
        yield chunk


def echo_server_main(argv: list[str] | None = None) -> None:
    """A plain grpcio bytes echo (no protobuf): the ceiling push_pull is compared with."""
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", required=True)
    ns = p.parse_args(argv)
    server = rpc.make_server(8)
    handler = grpc.method_handlers_generic_handler("ps.bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(_echo_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server.add_generic_rpc_handlers((handler,))
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    rpc.serve_until_signal(server, grace=0, ready=lambda: rpc.write_port_file(ns.port_file, port))


def _status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (VmRSS) or at its peak so far (VmHWM), in bytes, without the
    pages it shares with others: mapped libraries (RssFile; numba's LLVM alone is ~60 MiB of them) and
    shared-memory segments of clients (RssShmem). Both only grow, so VmHWM less their current sizes
    is the peak of the process's own memory."""
    st = _status(pid)
    return st.get(field, 0) - st.get("RssFile", 0) - st.get("RssShmem", 0)


def _timed(fn: Callable[[], None], seconds: float, min_iters: int = 3) -> float:
    """Seconds per call of fn, after one warm-up call, over at least ``seconds`` and min_iters calls."""
    fn()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


class EchoCeiling:
    """Raw grpcio bidi echo streams to ``servers`` processes: ``size`` bytes cut into chunk_bytes
    messages, one stream per server in parallel; ``once()`` sends and receives them all. ``tls``: the
    servers listen with ``server_tls`` (their certificate, and the CA callers' certificates must come
    from: mutual TLS) and this end calls with ``tls``."""

    def __init__(self, size: int, servers: int, chunk_bytes: int, tls=None, server_tls=None):
        import tempfile

        from ps import security
        from ps.local import Process
        self.workdir = Path(tempfile.mkdtemp(prefix="ps-echo-"))
        self.procs, self.channels = [], []
        self.pool = ThreadPoolExecutor(servers)  # its threads start on first use
        env = server_tls.env() if server_tls is not None else {}
        try:
            for i in range(servers):  # one by one, so that close() stops those started before a failure
                self.procs.append(Process(f"echo{i}", [], self.workdir, env=env, module="ps.bench"))
            deadline = time.monotonic() + 60
            addrs = [f"127.0.0.1:{p.wait_port(deadline)}" for p in self.procs]
        except BaseException:
            self.close()
            raise
        self.payload = os.urandom(chunk_bytes)
        per_server = size // servers
        self.counts = [per_server // chunk_bytes + (1 if per_server % chunk_bytes else 0)] * servers
        self.bytes_per_call = 2 * sum(self.counts) * chunk_bytes
        caller = security.Security(tls=tls)
        self.channels = [rpc.channel(a, security=caller) for a in addrs]
        self.calls = [ch.stream_stream(ECHO_METHOD) for ch in self.channels]

    def _stream(self, call, n: int) -> int:
        return sum(len(msg) for msg in call(iter([self.payload] * n), timeout=600))

    def once(self) -> None:
        list(self.pool.map(self._stream, self.calls, self.counts))

    def close(self) -> None:
        import shutil
        self.pool.shutdown()
        for ch in self.channels:
            ch.close()
        for p in self.procs:
            p.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "EchoCeiling":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def torch_update_rates(n: int = 16_000_000, repeats: int = 5) -> dict[str, float] | None:
    """params/s of torch's fused Adam and foreach SGD on n float32 params, one thread (None without
    torch): what ``adam_vs_torch_fused`` and ``sgd_vs_torch_foreach`` compare ours with."""
    try:
        import torch
    except ImportError:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        p = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).requires_grad_()
        p.grad = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
        rates = {}
        for name, opt in (("adam", torch.optim.Adam([p], lr=1e-3, fused=True)),
                          ("sgd", torch.optim.SGD([p], lr=1e-3, foreach=True))):
            opt.step()
            best = min(_timed(opt.step, 0.0, 1) for _ in range(repeats))
            rates[name] = n / best
        return rates
    finally:
        torch.set_num_threads(threads)


def server_update_rate(optimizer: str, n: int = 16_000_000, chunk_bytes: int = rpc.DEFAULT_CHUNK_BYTES,
                       repeats: int = 3) -> float:
    """params/s of pushes through the shard store (decode view, validation, finite check, update),
    in this process, one thread, chunks of chunk_bytes."""
    from ps.optimizer_config import OptimizerConfig
    from ps.server.shard import ShardStore, SliceRequest
    store = ShardStore()
    per = chunk_bytes // 4
    slices = [SliceRequest("w", (n,), np.dtype("float32"), o, min(per, n - o)) for o in range(0, n, per)]
    store.create("bench", slices, OptimizerConfig.from_dict({"name": optimizer, "lr": 1e-3}))
    grads = [np.frombuffer(np.random.default_rng(0).standard_normal(s.length).astype("float32").tobytes(),
                           "float32") for s in slices]
    seq = [0]

    def once():
        seq[0] += 1
        for s, g in zip(slices, grads):
            store.push("bench", "bench", seq[0], "w", s.offset, g)
    best = min(_timed(once, 0.0, 1) for _ in range(repeats))
    return n / best


def pushpull(size: int, servers: int, optimizer: str, seconds: float,
             echo: Callable[[str], None] = print, replicas: int = 1, tls: bool = False, peer: str = "",
             clients: int = 1, inflight: int = 0) -> dict:
    """`paramserver bench pushpull`: the figures, as a dict. ``tls``: the same model on a second
    cluster with mutual TLS and tokens, measured in the same rounds. ``peer="torch-rpc"``: a
    torch.distributed.rpc parameter server of as many shards (``ps.bench_torch_rpc``), SGD, the same
    sizes, measured in the same rounds. ``clients``: that many clients push_pull at once (threads of
    this process, a Client each; the torch peer likewise), and the figures are their total.
    ``inflight``: chunks a client streams ahead per shard, with the servers' stream window to match
    (0: the defaults)."""
    import contextlib

    from ps.client import Client
    from ps.local import LocalCluster
    from ps.server.optimizers import update_rate
    n = size // 4
    echo(f"model: {n:,} float32 params ({size / 2**20:.0f} MiB) over {servers} servers, optimizer {optimizer}")
    tuned: dict = {}
    server_args: list[str] = []
    if inflight:
        window = inflight * rpc.DEFAULT_CHUNK_BYTES
        tuned = {"inflight_chunks": inflight}
        server_args = ["--flow-window", str(window)]
        echo(f"{inflight} chunks in flight per stream, servers' stream window {window:,} bytes")
    with LocalCluster(servers=servers, server_args=server_args) as cluster, Client(cluster.address) as client, \
            Client(cluster.address, local=False, **tuned) as streaming, \
            EchoCeiling(size, servers, client.chunk_bytes) as ceiling_run, contextlib.ExitStack() as stack:
        model = client.create_model("bench", {"w": np.zeros(n, np.float32)},
                                    optimizer={"name": optimizer, "lr": 1e-4}, replicas=replicas)
        over_grpc = streaming.model("bench")  # the same model, every byte through gRPC (as from another host)
        secured = None
        if tls:
            secure = stack.enter_context(LocalCluster(servers=servers, tls=True, auth=True, server_args=server_args))
            secure_client = stack.enter_context(Client(secure.address, tls=secure.tls, token=secure.token))
            secured = secure_client.create_model("bench", {"w": np.zeros(n, np.float32)},
                                                 optimizer={"name": optimizer, "lr": 1e-4}, replicas=replicas)
            secure_streaming = stack.enter_context(Client(secure.address, tls=secure.tls, token=secure.token,
                                                          local=False, **tuned))
            secured_grpc = secure_streaming.model("bench")
            # grpc's own TLS cost, in the same rounds: the raw echo under the same mutual TLS
            from ps import security
            tls_ceiling = stack.enter_context(EchoCeiling(size, servers, client.chunk_bytes, tls=secure.tls,
                                                          server_tls=security.TLS.from_dir(secure.certs, "node")))
        torch_ps = None
        if peer == "torch-rpc":
            import torch

            from ps.bench_torch_rpc import TorchRpcPS
            torch_ps = stack.enter_context(TorchRpcPS(size, servers))
            torch_grad = torch.full((n,), 1e-3, dtype=torch.float32)

            def theirs():
                if clients == 1:
                    torch_ps.push_pull(torch_grad)
                    return
                done = [together.submit(torch_ps.push_pull, torch_grad) for _ in range(clients - 1)]
                torch_ps.push_pull(torch_grad)
                for f in done:
                    f.result()
        elif peer:
            raise ValueError(f"unknown peer {peer!r}: expected torch-rpc")
        single = None
        if replicas > 1:  # the same model with one replica, measured in the same rounds
            single = client.create_model("bench-r1", {"w": np.zeros(n, np.float32)},
                                         optimizer={"name": optimizer, "lr": 1e-4}, replicas=1)
        grad = {"w": np.full(n, 1e-3, np.float32)}
        out = {"w": np.empty(n, np.float32)}  # reused, as a worker reuses its weight buffers
        together = ThreadPoolExecutor(clients) if clients > 1 else None
        if together is not None:
            stack.callback(together.shutdown)
            others = [stack.enter_context(Client(cluster.address)).model("bench") for _ in range(clients - 1)]
            outs = [{"w": np.empty(n, np.float32)} for _ in others]

            def ours():
                done = [together.submit(m.push_pull, grad, out=o) for m, o in zip(others, outs)]
                model.push_pull(grad, out=out)
                for f in done:
                    f.result()
        else:
            def ours():
                model.push_pull(grad, out=out)
        # Alternate the measurements and keep the best of each, so that a busy moment on
        # a shared machine does not land on one side of a ratio only.
        per_call = per_grpc = per_echo = per_single = per_tls = per_tls_grpc = per_tls_echo = per_torch = float("inf")
        for _ in range(ROUNDS):
            per_call = min(per_call, _timed(ours, seconds / ROUNDS))
            per_grpc = min(per_grpc, _timed(lambda: over_grpc.push_pull(grad, out=out), seconds / ROUNDS))
            per_echo = min(per_echo, _timed(ceiling_run.once, seconds / ROUNDS))
            if torch_ps is not None:
                per_torch = min(per_torch, _timed(theirs, seconds / ROUNDS))
            if single is not None:
                per_single = min(per_single, _timed(lambda: single.push_pull(grad, out=out), seconds / ROUNDS))
            if secured is not None:
                per_tls = min(per_tls, _timed(lambda: secured.push_pull(grad, out=out), seconds / ROUNDS))
                per_tls_grpc = min(per_tls_grpc, _timed(lambda: secured_grpc.push_pull(grad, out=out),
                                                        seconds / ROUNDS))
                per_tls_echo = min(per_tls_echo, _timed(tls_ceiling.once, seconds / ROUNDS))
        rss = [_rss_bytes(p.popen.pid) for p in cluster.servers]
        peak = [_rss_bytes(p.popen.pid, "VmHWM") for p in cluster.servers]
        held = [sum(m.params for m in client.stats(a).models) for a in model.shards]
        chunk = client.chunk_bytes
    pushpull_gbps = 2 * size * clients / per_call / 1e9
    grpc_gbps = 2 * size / per_grpc / 1e9
    ceiling = ceiling_run.bytes_per_call / per_echo / 1e9
    echo(f"push_pull: {pushpull_gbps:.2f} GB/s ({per_call * 1e3:.0f} ms per push_pull of {size / 2**20:.0f} MiB "
         f"gradient + {size / 2**20:.0f} MiB weights; shared memory with servers on this host)")
    echo(f"push_pull streamed over gRPC (as from another host): {grpc_gbps:.2f} GB/s")
    echo(f"raw grpcio echo, {chunk / 2**20:g} MiB messages, {servers} server processes: {ceiling:.2f} GB/s")
    ratio = pushpull_gbps / ceiling
    echo(f"ratio: {ratio:.2f} (streamed: {grpc_gbps / ceiling:.2f}; shared memory / streamed: "
         f"{pushpull_gbps / grpc_gbps:.2f})" + (f" with {replicas} replicas per slice" if replicas > 1 else ""))
    extra = {}
    if single is not None:
        extra = {"replicas": replicas, "replicas_1_gbps": round(2 * size / per_single / 1e9, 3),
                      "replicated_to_single_ratio": round(per_single / per_call, 3)}
        echo(f"one replica: {extra['replicas_1_gbps']:.2f} GB/s; {replicas} replicas reach "
             f"{extra['replicated_to_single_ratio']:.2f} of it")
    if secured is not None:
        extra.update(tls_gbps=round(2 * size / per_tls / 1e9, 3), tls_to_plaintext_ratio=round(per_call / per_tls, 3),
                     tls_grpc_gbps=round(2 * size / per_tls_grpc / 1e9, 3),
                     tls_grpc_to_plaintext_grpc_ratio=round(per_grpc / per_tls_grpc, 3),
                     tls_echo_gbps=round(tls_ceiling.bytes_per_call / per_tls_echo / 1e9, 3),
                     tls_echo_to_plaintext_echo_ratio=round(per_echo / per_tls_echo, 3))
        extra["tls_grpc_vs_tls_echo"] = round(extra["tls_grpc_gbps"] / extra["tls_echo_gbps"], 3)
        echo(f"mutual TLS + tokens: {extra['tls_gbps']:.2f} GB/s = {extra['tls_to_plaintext_ratio']:.2f} "
             f"of plaintext (bulk bytes through shared memory); streamed over gRPC: {extra['tls_grpc_gbps']:.2f} "
             f"GB/s = {extra['tls_grpc_to_plaintext_grpc_ratio']:.2f} of plaintext streamed")
        echo(f"raw grpcio echo under the same mutual TLS: {extra['tls_echo_gbps']:.2f} GB/s = "
             f"{extra['tls_echo_to_plaintext_echo_ratio']:.2f} of the plaintext echo (grpc's own TLS cost); "
             f"streamed TLS push_pull reaches {extra['tls_grpc_vs_tls_echo']:.2f} of it")
    if torch_ps is not None:
        extra.update(torch_rpc_gbps=round(2 * size * clients / per_torch / 1e9, 3),
                     vs_torch_rpc=round(per_torch / per_call, 3), clients=clients)
        if clients == 1:
            extra["grpc_vs_torch_rpc"] = round(per_torch / per_grpc, 3)
        echo(f"torch.distributed.rpc parameter server ({servers} shards, TensorPipe): {extra['torch_rpc_gbps']:.2f} "
             f"GB/s; ours / torch: {extra['vs_torch_rpc']:.2f}"
             + (f" (streamed: {extra['grpc_vs_torch_rpc']:.2f})" if clients == 1 else f", {clients} clients each"))
    per_param = {"sgd": 12, "adam": 28}
    rates = {name: update_rate(name) for name in ("sgd", "adam")}
    server_path = {name: server_update_rate(name) for name in ("sgd", "adam")}
    for name in ("sgd", "adam"):
        limit = rates[name]["limit_params_per_s"]
        echo(f"{name} update on the server path: {server_path[name] / 1e6:.0f} M params/s = "
             f"{server_path[name] / limit:.2f} of the memory-bound limit {limit / 1e6:.0f} M params/s "
             f"(2 x copyto bytes/s / {per_param[name]} bytes per param)")
    theirs = torch_update_rates()
    if theirs is not None:  # alternate with ours, best of each: a busy moment must not land on one side only
        for _ in range(ROUNDS - 1):
            for name in ("sgd", "adam"):
                again = update_rate(name)
                if again["params_per_s"] > rates[name]["params_per_s"]:
                    rates[name] = again
            more = torch_update_rates()
            theirs = {k: max(v, more[k]) for k, v in theirs.items()}
        extra.update(adam_vs_torch_fused=round(rates["adam"]["params_per_s"] / theirs["adam"], 3),
                     sgd_vs_torch_foreach=round(rates["sgd"]["params_per_s"] / theirs["sgd"], 3),
                     torch_fused_adam_params_per_s=round(theirs["adam"]),
                     torch_foreach_sgd_params_per_s=round(theirs["sgd"]))
        from ps.server import jit
        echo(f"optimizers alone, one thread ({'compiled' if jit.enabled() else 'NumPy'}): adam "
             f"{rates['adam']['params_per_s'] / 1e6:.0f} M params/s = {extra['adam_vs_torch_fused']:.2f} of torch's "
             f"fused Adam ({theirs['adam'] / 1e6:.0f}); sgd {rates['sgd']['params_per_s'] / 1e6:.0f} = "
             f"{extra['sgd_vs_torch_foreach']:.2f} of torch's foreach SGD ({theirs['sgd'] / 1e6:.0f})")
    bound = [3.3 * 4 * p + 100 * 2**20 for p in held]
    echo("server RSS without shared pages, peak over the run (now): " + ", ".join(
        f"{p / 2**20:.0f} MiB ({r / 2**20:.0f} MiB), bound {b / 2**20:.0f} MiB" for p, r, b in zip(peak, rss, bound)))
    return {
        "size_bytes": size, "servers": servers, "optimizer": optimizer, "chunk_bytes": chunk,
        "pushpull_gbps": round(pushpull_gbps, 3), "grpc_ceiling_gbps": round(ceiling, 3), "ratio": round(ratio, 3),
        "pushpull_grpc_gbps": round(grpc_gbps, 3), "grpc_ratio": round(grpc_gbps / ceiling, 3),
        "local_to_grpc_ratio": round(pushpull_gbps / grpc_gbps, 3),
        "sgd_params_per_s": round(server_path["sgd"]),
        "sgd_to_limit_ratio": round(server_path["sgd"] / rates["sgd"]["limit_params_per_s"], 3),
        "adam_params_per_s": round(server_path["adam"]),
        "adam_to_limit_ratio": round(server_path["adam"] / rates["adam"]["limit_params_per_s"], 3),
        "copyto_gbps": round(rates["adam"]["copyto_bytes_per_s"] / 1e9, 2),
        "server_rss_bytes": rss, "server_peak_rss_bytes": peak, "server_rss_bound_bytes": [round(b) for b in bound],
        "server_rss_within_bound": all(p <= b for p, b in zip(peak, bound)),
        "replicas": replicas, **extra,
    }


CODEC_STEPS = ("push_encode", "push_decode", "pull_encode", "pull_decode")


def codec(chunk_bytes: int = rpc.DEFAULT_CHUNK_BYTES, iterations: int = 200,
          echo: Callable[[str], None] = print) -> dict:
    """`paramserver bench codec`: the hand-written codec (ps.wire) against the generated protobuf
    classes on one float32 chunk of the hot path, step by step: the client encodes a PushRequest,
    the server decodes it to an array (np.frombuffer), the server encodes the PullResponse from its
    weights, the client decodes that to an array. Each iteration times every step once with each
    codec, in alternating order; the figures are medians, and ``speedup`` is generated / wire
    time (above 1: the hand-written codec is faster)."""
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    from ps import wire
    from ps.v1 import server_pb2, tensor_pb2
    rpc.tune_malloc()  # as ps.Client and the servers do
    n = max(chunk_bytes // 4, 1)
    grad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    weights = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    model, cid, seq, scale, tensor, offset, version = "bench", "client-0", 12345, 0.5, "layer0/w", 3 << 20, 777
    f32 = tensor_pb2.FLOAT32

    def gen_push_encode():
        return server_pb2.PushRequest(
            model=model, client_id=cid, seq=seq, grad_scale=scale,
            chunk=tensor_pb2.Chunk(tensor=tensor, offset=offset, values=tensor_pb2.Tensor(
                dtype=f32, shape=[n], data=grad.tobytes()))).SerializeToString()

    def gen_pull_encode():
        return server_pb2.PullResponse(
            chunk=tensor_pb2.Chunk(tensor=tensor, offset=offset, values=tensor_pb2.Tensor(
                dtype=f32, shape=[n], data=weights.tobytes())), version=version).SerializeToString()

    def push_decode(decode):
        def run(buf):  # what the servicer reads of a push: every field, the gradient as an array
            r = decode(buf)
            c = r.chunk
            _ = (r.model, r.client_id, r.seq, r.grad_scale, c.tensor, c.offset, c.values.dtype, c.values.shape)
            return np.frombuffer(c.values.data, np.float32)
        return run

    def pull_decode(decode):
        def run(buf):  # what the client reads of a reply: every field, the weights as an array
            r = decode(buf)
            c = r.chunk
            _ = (r.version, r.duplicate, c.tensor, c.offset, c.values.dtype, c.values.shape)
            return np.frombuffer(c.values.data, np.float32)
        return run

    steps = {  # step -> {codec: (fn, argument)}
        "push_encode": {"wire": (lambda _: wire.encode_push(model, cid, seq, scale, tensor, offset, f32, grad), None),
                        "generated": (lambda _: gen_push_encode(), None)},
        "push_decode": {"wire": (push_decode(wire.decode_push), wire.encode_push(
                            model, cid, seq, scale, tensor, offset, f32, grad)),
                        "generated": (push_decode(server_pb2.PushRequest.FromString), gen_push_encode())},
        "pull_encode": {"wire": (lambda _: wire.encode_pull_response(tensor, offset, f32, weights, version), None),
                        "generated": (lambda _: gen_pull_encode(), None)},
        "pull_decode": {"wire": (pull_decode(wire.decode_pull_response),
                                 wire.encode_pull_response(tensor, offset, f32, weights, version)),
                        "generated": (pull_decode(server_pb2.PullResponse.FromString), gen_pull_encode())},
    }
    # The two must give the same before their speeds mean anything.
    for step, c in steps.items():
        (fw, aw), (fg, ag) = c["wire"], c["generated"]
        a, b = fw(aw), fg(ag)
        same = (a == b if step.endswith("encode") else
                np.array_equal(a, b) and np.array_equal(a, grad if step == "push_decode" else weights))
        if not same:
            raise RuntimeError(f"bench codec: {step}: the hand-written and the generated codec disagree")
    times: dict[str, dict[str, list[float]]] = {s: {"wire": [], "generated": []} for s in steps}
    for i in range(iterations + 3):  # the first 3 warm up
        for step, codecs in steps.items():
            for name in (("wire", "generated") if i % 2 else ("generated", "wire")):
                fn, arg = codecs[name]
                t = time.perf_counter()
                fn(arg)
                dt = time.perf_counter() - t
                if i >= 3:
                    times[step][name].append(dt)
    med = {s: {c: float(np.median(v)) for c, v in per.items()} for s, per in times.items()}
    result: dict = {"chunk_bytes": n * 4, "iterations": iterations,
                    "protobuf": f"{protobuf_version} ({api_implementation.Type()})"}
    echo(f"one float32 chunk of {n * 4 / 2**20:g} MiB; protobuf {result['protobuf']}; median of {iterations} "
         f"interleaved rounds; speedup = generated / wire")
    for step in CODEC_STEPS:
        w, g = med[step]["wire"], med[step]["generated"]
        result.update({f"{step}_wire_us": round(w * 1e6, 1), f"{step}_generated_us": round(g * 1e6, 1),
                       f"{step}_speedup": round(g / w, 3)})
        echo(f"{step.replace('_', ' '):12s} wire {w * 1e6:8.1f} us   generated {g * 1e6:8.1f} us   speedup {g / w:5.2f}x")
    total_w = sum(med[s]["wire"] for s in CODEC_STEPS)
    total_g = sum(med[s]["generated"] for s in CODEC_STEPS)
    result.update(total_wire_us=round(total_w * 1e6, 1), total_generated_us=round(total_g * 1e6, 1),
                  speedup=round(total_g / total_w, 3))
    echo(f"all four      wire {total_w * 1e6:8.1f} us   generated {total_g * 1e6:8.1f} us   speedup "
         f"{total_g / total_w:5.2f}x")
    return result


def train_spec(epochs: int = 6):
    """A model whose compute dominates its communication: a 256-512-512-10 MLP, batch 2048."""
    from ps.spec import DataSpec, JobSpec
    return JobSpec(name="bench-train", model=[{"type": "dense", "units": 512, "activation": "relu"},
                                              {"type": "dense", "units": 512, "activation": "relu"},
                                              {"type": "dense", "units": 10}],
                   data=DataSpec(uri="synthetic:classification?n=60000&features=256&classes=10&seed=0"),
                   optimizer={"name": "adam", "lr": 1e-3}, batch_size=2048, epochs=epochs, workers=2,
                   lease_timeout_s=60.0)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def local_train_main(spec_json: str) -> None:
    """Child process of `bench train`: the single-process loop, one BLAS thread like a worker."""
    import json
    from ps.reference import train_local
    from ps.spec import JobSpec
    r = train_local(JobSpec.from_json(spec_json))
    print(json.dumps({k: r[k] for k in ("samples_per_s", "test_accuracy", "samples", "seconds")}))


def _cluster_train(spec, workers: int) -> dict:
    """Train ``spec`` on a fresh local cluster (2 servers); its metrics, samples/s in steady state."""
    from ps.client import Client
    from ps.histogram import summary
    from ps.local import LocalCluster
    with LocalCluster(servers=2, workers=workers) as cluster, Client(cluster.address) as client:
        job = client.submit(spec)
        # Steady state: samples between the first and the last finished train task, so the
        # first task's data loading and the start-up are not counted (nor are they for the
        # single process, whose clock runs only around its training steps).
        marks = [(e.time, e.metrics.samples) for e in job.events() if e.kind == "task" and e.metrics.samples]
        metrics = job.wait(progress=False).metrics
        info = job.info().metrics
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    metrics["samples_per_s"] = (s1 - s0) / (t1 - t0) if t1 > t0 else metrics["samples_per_s"]
    metrics["staleness_updates_mean"], metrics["staleness_updates_max"] = summary(info.staleness_updates)
    metrics["staleness_clocks_max"] = summary(info.staleness_clocks)[1]
    return metrics


def torch_train_main(spec_json: str) -> None:
    """Child process of `bench train`: the same MLP, data, split, scaling, initial weights, batch order
    and Adam settings as a plain PyTorch loop on 2 threads; prints samples/s and test accuracy."""
    import json

    import torch

    from ps.spec import JobSpec
    from ps.trained import scale
    from ps.worker.inspect import build_model, load_data, prepare
    from ps.worker.preprocess import batches, train_test_split
    torch.set_num_threads(2)
    spec = JobSpec.from_json(spec_json)
    prep = prepare(spec)
    ds = load_data(spec)
    model = build_model(spec, tuple(prep["input_shape"]))
    train_idx, test_idx = train_test_split(len(ds.x), spec.data.test_fraction, spec.seed)
    x = torch.from_numpy(scale(prep, ds.x))
    y = torch.from_numpy(ds.y.astype(np.int64))
    params = model.init_params(spec.seed)
    layers = []
    for i, layer in enumerate(spec.model):  # dense layers only, as in train_spec
        w, b = params[f"{i}.dense.w"], params[f"{i}.dense.b"]
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if layer.get("activation") == "relu":
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=spec.optimizer["lr"], foreach=True)
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]
    busy, evaluating, samples = 0.0, 0.0, 0
    for epoch in range(spec.epochs):
        for idx in batches(len(train_idx), spec.batch_size, spec.seed, epoch):
            t0 = time.perf_counter()
            rows = torch.from_numpy(idx)
            loss = torch.nn.functional.cross_entropy(net(x_train[rows]), y_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            busy += time.perf_counter() - t0
            samples += len(idx)
        t0 = time.perf_counter()  # the held-out split after every epoch, as a job reports it
        with torch.no_grad():
            acc = (net(x_test).argmax(1) == y_test).float().mean().item()
        evaluating += time.perf_counter() - t0
    print(json.dumps({"samples_per_s": samples / busy, "with_eval_samples_per_s": samples / (busy + evaluating),
                      "test_accuracy": acc, "threads": 2}))


def _torch_train(spec, echo: Callable[[str], None]) -> dict:
    """One run of the PyTorch loop (``torch_train_main``) in a child process: its figures."""
    import json
    import subprocess
    out = subprocess.run([sys.executable, "-m", "ps.bench", "torch-train", spec.to_json()], check=True,
                         capture_output=True, text=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    echo(f"PyTorch loop, 2 threads (same model, data, initial weights, batch order): "
         f"{theirs['samples_per_s']:.0f} samples/s ({theirs['with_eval_samples_per_s']:.0f} counting its "
         f"evaluation after each epoch, as a job's figure does), test accuracy {theirs['test_accuracy']:.4f}")
    return theirs


def train(epochs: int = 6, echo: Callable[[str], None] = print, consistency: tuple[str, ...] = ("asp",),
          staleness: int = 3, batch: int = 0, replicas: int = 0, eval_every: int = 1) -> dict:
    """`paramserver bench train`: samples/s of 1 and 2 workers through a cluster against a
    single-process NumPy loop training the same model (all with one BLAS thread per process);
    with ``consistency``, 2 workers under each of those modes, side by side. ``batch``: each of the
    2 workers' batch (0: the loop's 2048 under asp and ssp; under bsp half of it, so that a step
    averages 2048 samples as the loop's does). ``replicas``: the jobs' (0: the default, 2 servers
    holding each slice). ``eval_every``: the jobs evaluate after every this many epochs and the last
    (``epochs``: only at the end, outside the figure's window, as the PyTorch loop's training figure)."""
    import dataclasses
    import json
    import subprocess
    spec = dataclasses.replace(train_spec(epochs), replicas=replicas, eval_every=eval_every)
    echo(f"model: MLP 256-512-512-10, batch 2048, Adam, {epochs} epochs; data: 60,000 synthetic examples "
         f"(70% train); one BLAS thread per process; {replicas or 2} replica(s) of each slice; jobs evaluate "
         + ("after every epoch" if eval_every == 1 else f"every {eval_every} epochs and after the last"))
    out = subprocess.run([sys.executable, "-m", "ps.bench", "local-train", spec.to_json()], check=True,
                         capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD))
    single = json.loads(out.stdout.strip().splitlines()[-1])
    echo(f"single process (no servers): {single['samples_per_s']:.0f} samples/s, "
         f"test accuracy {single['test_accuracy']:.4f}")
    result = {"single_samples_per_s": round(single["samples_per_s"], 1),
              "single_test_accuracy": single["test_accuracy"], "cpu_count": os.cpu_count(), "replicas": replicas or 2,
              "eval_every": eval_every}
    torch_runs: list[dict] = []  # the PyTorch loop's, before the cluster's runs and after each mode's
    try:
        import torch  # noqa: F401 - only whether it is there
    except ImportError:
        echo("(no torch: the PyTorch loop is left out; pip install -e '.[bench]')")
    else:
        torch_runs.append(_torch_train(spec, echo))
        result["torch_test_accuracy"] = torch_runs[0]["test_accuracy"]
    one = _cluster_train(spec, 1)
    echo(f"1 worker + 2 servers: {one['samples_per_s']:.0f} samples/s, test accuracy {one['test_accuracy']:.4f}")
    result.update(one_worker_samples_per_s=round(one["samples_per_s"], 1), one_worker_test_accuracy=one["test_accuracy"],
                  one_worker_to_single_ratio=round(one["samples_per_s"] / single["samples_per_s"], 3))
    for mode in consistency:
        # bsp steps on the mean of the workers' gradients: 2 x 1024 is the same step as one batch of 2048,
        # as data-parallel training splits a global batch; asp and ssp apply each worker's batch as a step
        per_worker = batch or (spec.batch_size // 2 if mode == "bsp" else spec.batch_size)
        two = _cluster_train(dataclasses.replace(spec, consistency=mode, staleness=staleness,
                                                 batch_size=per_worker), 2)
        label = f"{mode}" + (f" (s={staleness})" if mode == "ssp" else "") + (
            f", batch {per_worker} a worker" + (f" ({2 * per_worker} a step)" if mode == "bsp" else "")
            if per_worker != spec.batch_size else "")
        echo(f"2 workers + 2 servers, {label}: {two['samples_per_s']:.0f} samples/s, test accuracy "
             f"{two['test_accuracy']:.4f}; staleness in updates: mean {two['staleness_updates_mean']:.2f}, "
             f"max {two['staleness_updates_max']}" + (f"; in clocks: max {two['staleness_clocks_max']}"
                                                       if mode != "asp" else ""))
        prefix = "two_workers" if mode == "asp" else f"{mode}_two_workers"
        if torch_runs:
            # against the loop's runs just before and just after this one (the machine's speed drifts)
            torch_runs.append(_torch_train(spec, echo))
            near = torch_runs[-2:]
            for key, suffix in (("samples_per_s", ""), ("with_eval_samples_per_s", "_with_eval")):
                result[f"{prefix}_vs_torch{suffix}"] = round(
                    two["samples_per_s"] / (sum(r[key] for r in near) / len(near)), 3)
            echo(f"  against the PyTorch loop (its runs before and after): {result[f'{prefix}_vs_torch']:.2f}x "
                 f"its speed ({result[f'{prefix}_vs_torch_with_eval']:.2f}x counting its evaluation), accuracy "
                 f"{two['test_accuracy'] - result['torch_test_accuracy']:+.4f}")
        result.update({f"{prefix}_samples_per_s": round(two["samples_per_s"], 1),
                       f"{prefix}_test_accuracy": two["test_accuracy"],
                       f"{prefix}_staleness_updates_mean": round(two["staleness_updates_mean"], 3),
                       f"{prefix}_batch": per_worker,
                       f"{prefix}_to_one_worker_ratio": round(two["samples_per_s"] / one["samples_per_s"], 3)})
    if torch_runs:
        for key in ("samples_per_s", "with_eval_samples_per_s"):
            result[f"torch_{key}"] = round(sum(r[key] for r in torch_runs) / len(torch_runs), 1)
            result[f"torch_{key}_runs"] = [round(r[key], 1) for r in torch_runs]
    if "asp" in consistency:
        result["two_to_one_worker_ratio"] = result["two_workers_to_one_worker_ratio"]
        echo(f"1 worker / single process: {result['one_worker_to_single_ratio']:.2f}; "
             f"2 workers (asp) / 1 worker: {result['two_to_one_worker_ratio']:.2f}")
    return result


def kernels(device: str = "gpu:0", batch: int = 1024, repeats: int = 30,
            echo: Callable[[str], None] = print) -> dict:
    """`paramserver bench kernels`: one training step's forward + backward of the worker's model
    code against PyTorch on the same MLP (784-1024-1024-10, batch 1024), in the same run; on a
    GPU also the device-to-host rate of gradients through pinned against pageable buffers."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("bench kernels compares against PyTorch: pip install torch") from None
    from ps.worker.model import Sequential
    from ps.worker.xp import get_xp, pinned_to_host
    xp = get_xp(device)
    gpu = xp is not np
    sync = (lambda: xp.cuda.Device().synchronize()) if gpu else (lambda: None)
    model = Sequential.from_spec([{"type": "dense", "units": 1024, "activation": "relu"},
                                  {"type": "dense", "units": 1024, "activation": "relu"},
                                  {"type": "dense", "units": 10}], input_shape=(784,))
    host_params = model.init_params(0)
    params = {k: xp.asarray(v) for k, v in host_params.items()}
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((batch, 784)).astype(np.float32)
    y_host = rng.integers(0, 10, batch)
    x, y = xp.asarray(x_host), xp.asarray(y_host)

    def ours():  # as a worker's step runs it: the loss stays on the device until the step's one wait
        model.loss_and_grads(xp, params, x, y, "softmax_cross_entropy", lazy=True)
        sync()

    tdev = torch.device("cuda" if gpu else "cpu")
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 10)).to(tdev)
    tx, ty = torch.from_numpy(x_host).to(tdev), torch.from_numpy(y_host).to(tdev)

    def theirs():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(tx), ty).backward()
        if gpu:
            torch.cuda.synchronize()

    def median_ms(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    ours_ms, torch_ms = median_ms(ours), median_ms(theirs)
    name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode() if gpu else "CPU (NumPy)"
    echo(f"{name}: forward + backward, MLP 784-1024-1024-10, batch {batch}: paramserver worker {ours_ms:.3f} ms, "
         f"PyTorch {torch_ms:.3f} ms; speed relative to PyTorch {torch_ms / ours_ms:.2f}x")
    result = {"device": device, "device_name": name, "batch": batch, "worker_ms": round(ours_ms, 4),
              "torch_ms": round(torch_ms, 4), "speed_vs_torch": round(torch_ms / ours_ms, 3)}
    if gpu:
        _, grads, _ = model.loss_and_grads(xp, params, x, y, "softmax_cross_entropy")
        nbytes = sum(g.nbytes for g in grads.values())
        pinned_ms = median_ms(lambda: pinned_to_host(xp, grads))
        pageable_ms = median_ms(lambda: {k: xp.asnumpy(v) for k, v in grads.items()})
        result.update(pinned_gbps=round(nbytes / pinned_ms / 1e6, 2), pageable_gbps=round(nbytes / pageable_ms / 1e6, 2))
        echo(f"gradients to host ({nbytes / 2**20:.1f} MiB): pinned {result['pinned_gbps']} GB/s, "
             f"pageable {result['pageable_gbps']} GB/s")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["local-train"]:
        local_train_main(sys.argv[2])
    elif sys.argv[1:2] == ["torch-train"]:
        torch_train_main(sys.argv[2])
    else:
        echo_server_main()
