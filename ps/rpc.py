"""gRPC plumbing every role shares: message limits, channels, servers with health and reflection."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps.errors import DeadlineExceeded, Unavailable

log = logging.getLogger("ps")

#: payload bytes per chunk message; every larger transfer is split into chunks of this size.
#: Each message in flight costs a process several times its size (grpc's receive slices, the
#: Python bytes joined from them, the encoded reply and grpc's copy of it), so this sets a
#: server's transient memory: 2 MiB keeps a shard's peak RSS ~25 MiB above its parameters and
#: state, where 8 MiB took ~70 MiB, at the same push_pull throughput (see the README figures)
DEFAULT_CHUNK_BYTES = 2 << 20
#: a shard's part of a push / push_pull up to this size goes over gRPC in one unary call (PushBatch):
#: below it, a stream's thread hand-offs cost more than the bytes (``paramserver bench latency``)
DEFAULT_BATCH_BYTES = 64 << 10
#: push_pull chunks a client sends ahead of the replies it has read, per shard stream: two keep
#: the wire busy while the shard updates one; more only add buffered memory at both ends
DEFAULT_INFLIGHT_CHUNKS = 2
#: servers' fixed HTTP/2 stream window: bounds what grpc buffers for a stream whose client sends
#: ahead without waiting for replies (Assign, Push, raw clients); with grpc's adaptive
#: (BDP-probed) window, creating a 64 MiB Adam model now and then took a shard's peak RSS from
#: ~175 to ~195 MiB. It is what ps.Client's push_pull keeps in flight per stream anyway, so it
#: costs push_pull nothing measurable on loopback. 0 restores grpc's adaptive window (links
#: whose bandwidth x delay exceeds it).
DEFAULT_FLOW_WINDOW = DEFAULT_INFLIGHT_CHUNKS * DEFAULT_CHUNK_BYTES
#: gRPC's receive limit on every channel and server: a chunk plus headroom for its header
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
#: deadline for one unary call
DEFAULT_TIMEOUT_S = 30.0


def tune_malloc(mmap_threshold: int | None = 32 << 20, trim_threshold: int | None = 32 << 20,
                arena_max: int | None = None) -> bool:
    """glibc malloc settings for processes that move multi-megabyte messages.

    Keep message buffers in the heap instead of a fresh mmap per message, whose pages fault in
    one by one at several times the cost of the copy itself (measured: encoding 64 MiB of
    chunks took 29 ms, 4 ms with this); freed buffers stay for the next message, up to
    ``trim_threshold`` bytes (a shard that trimmed and re-faulted its heap after every push
    spent ~10% more CPU per push_pull for the same peak RSS). ``ps.Client`` calls it with the
    defaults; servers add ``arena_max=1`` (one malloc arena instead of one per RPC thread, each
    holding freed buffers: a shard's RSS under push_pull ~190 MiB -> ~115 MiB at no cost in
    throughput). Returns False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = {-1: trim_threshold, -3: mmap_threshold, -8: arena_max}  # M_TRIM_THRESHOLD, M_MMAP_..., M_ARENA_MAX
    try:
        return all(libc.mallopt(k, v) == 1 for k, v in settings.items() if v is not None)
    except AttributeError:
        return False


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_hugepage_malloc(argv: list[str]) -> None:
    """Restart this process (same pid, same arguments) with glibc's malloc asking for
    transparent huge pages on large allocations, unless that is already so.

    Each multi-megabyte message buffer is a fresh mapping; with 4 KiB pages its first touch
    costs thousands of page faults, with 2 MiB pages a handful (measured: encoding 64 MiB of
    chunks 28 ms -> 6 ms; a shard's CPU per 64 MiB push_pull 50 ms -> 38 ms, RSS unchanged).
    glibc reads the tunable only at start-up, hence the exec. Set PS_NO_REEXEC=1 to opt out."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables
            or os.environ.get("PS_NO_REEXEC")):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGEPAGE_TUNABLE])))
    os.execve(sys.executable, [sys.executable, "-m", "ps", *argv], env)


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


#: longest wait between a channel's attempts to reach a peer that went away: grpc's default grows
#: to two minutes, so members came back 10 s after a scheduler that had been away for 20 s
MAX_RECONNECT_BACKOFF_MS = 1000


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security=None) -> grpc.Channel:
    """A channel to ``address`` with ``security`` (a ps.security.Security; default: this process's):
    TLS when it has TLS settings, its bearer token on every call when it has one."""
    from ps import security as sec
    return (security or sec.current()).secure_channel(address, options=message_options(max_message_bytes) + [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ])


#: how often a process waiting for a peer says so in its log
WAITING_LOG_INTERVAL_S = 3.0


def unreachable_reason(address: str, security=None) -> str:
    """Why ``address`` (host:port) may not answer: a host name that does not resolve, a TLS
    handshake that fails (and why), or no one listening."""
    import socket

    from ps import tls_probe
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        return f"the host name '{host}' does not resolve ({getattr(e, 'strerror', None) or e})"
    return tls_probe.diagnose(address, security) or "nothing answers there: is it running, and is the address right?"


#: how soon a connection that has not come up is checked for a TLS mismatch, which no wait cures
TLS_CHECK_AFTER_S = 0.5


def wait_ready(ch: grpc.Channel, address: str, role: str, timeout: float, security=None) -> None:
    """Block until ``ch`` connects, or raise Unavailable naming the peer and what was waited for.
    While it waits it logs a warning every few seconds saying what it waits for and why. A TLS
    handshake the peer refuses (or one side without TLS) ends the wait at once, naming the cause."""
    from ps import tls_probe
    ready = grpc.channel_ready_future(ch)
    start = time.monotonic()
    end, checked = start + timeout, False
    while True:
        try:
            step = WAITING_LOG_INTERVAL_S if checked else TLS_CHECK_AFTER_S
            ready.result(timeout=max(0.0, min(step, end - time.monotonic())))
            return
        except grpc.FutureTimeoutError:
            if not checked:
                checked = True
                mismatch = tls_probe.diagnose(address, security)
                if mismatch:
                    ready.cancel()
                    raise Unavailable(f"could not connect to the {role} at {address}: {mismatch}") from None
                if time.monotonic() - start < WAITING_LOG_INTERVAL_S:
                    continue
            left = end - time.monotonic()
            if left <= 0:
                ready.cancel()
                raise Unavailable(f"could not reach the {role} at {address} within {timeout:g} s: "
                                  f"{unreachable_reason(address, security)}") from None
            log.warning("cannot reach the %s at %s yet: %s (still trying for %.0f s)", role, address,
                        unreachable_reason(address, security), left)


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, extra=()) -> list[tuple[str, int]]:
    return message_options(max_message_bytes) + [("grpc.so_reuseport", 0)] + list(extra)


def make_server(threads: int = 32, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, extra=(),
                security=None) -> grpc.Server:
    """A grpc server that checks callers' tokens when ``security`` (default: this process's) has an auth file."""
    from ps import security as sec
    return grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
                       options=server_options(max_message_bytes, extra),
                       interceptors=(security or sec.current()).interceptors())


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register grpc.health.v1 (SERVING for "" and each service) and server reflection."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def add_health_and_reflection_aio(server: grpc.aio.Server, service_names: Iterable[str]):
    """``add_health_and_reflection`` for a grpc.aio server."""
    from grpc_health.v1.health import aio as health_aio
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


def bind(server: grpc.Server, host: str, port: int, security=None) -> int:
    """Listen on host:port (port 0 picks a free one), with TLS when ``security`` (default: this
    process's) has it; return the bound port."""
    from ps import security as sec
    bound = (security or sec.current()).add_port(server, f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}: is the port in use?")
    return bound


def write_port_file(path: str | None, port: int) -> None:
    """Atomically write the bound port, so a parent that started us with --port 0 can find it."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)


def check_health(address: str, service: str = "", timeout: float = 5.0, security=None) -> str:
    """The health status name of ``service`` at ``address`` (SERVING, NOT_SERVING, ...); over TLS
    when ``security`` (default: this process's) has it (health needs no token)."""
    from ps import tls_probe
    with channel(address, security=security) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"health check of {address}: no answer within {timeout:g} s") from None
            raise Unavailable(f"health check of {address}: {e.code().name}: {e.details()}"
                              + (f" ({why})" if (why := tls_probe.diagnose(address, security)) else "")) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def serve_until_signal(server: grpc.Server, on_stop: Callable[[], None] | None = None,
                       grace: float = 5.0, ready: Callable[[], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting, let calls in flight finish and run on_stop.
    ``ready`` runs once the signals are caught (announce the port there: a SIGTERM that comes as soon
    as the port is known must stop us cleanly, not kill us)."""
    stop = threading.Event()

    def handler(signum, frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if ready is not None:
        ready()
    while not stop.wait(0.5):
        pass
    if on_stop is not None:
        on_stop()
    server.stop(grace).wait()


async def serve_until_signal_aio(server: grpc.aio.Server, on_stop: Callable[[], None] | None = None,
                                 grace: float = 5.0, ready: Callable[[], None] | None = None) -> None:
    """``serve_until_signal`` for a grpc.aio server running on the current event loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def handler(signum):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
    if ready is not None:
        ready()
    await stop.wait()
    if on_stop is not None:
        on_stop()
    await server.stop(grace)


def retry_unavailable(fn: Callable[[], object], what: str, deadline_s: float, interval: float = 0.5,
                      address: str | None = None):
    """Call fn until it does not raise UNAVAILABLE, up to deadline_s; then raise Unavailable naming ``what``.
    Every few seconds of waiting is logged, with why ``address`` (the peer) does not answer."""
    start = time.monotonic()
    end, said = start + deadline_s, start
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= end:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    raise Unavailable(f"{what}: still unreachable after {deadline_s:g} s: "
                                      f"{unreachable_reason(address) if address else e.details()}") from None
                raise
            if time.monotonic() - said >= WAITING_LOG_INTERVAL_S:
                said = time.monotonic()
                log.warning("%s: unreachable for %.0f s: %s (still trying for %.0f s)", what, said - start,
                            unreachable_reason(address) if address else e.details(), end - said)
        time.sleep(interval)


# -- requests that are not messages --------------------------------------------------------------------
class Malformed:
    """What a tolerant deserializer returns for bytes that are not the request message: grpc
    answers a deserializer that raises with INTERNAL (grpc.aio: UNKNOWN) and logs a traceback,
    and for a client stream it never retires the call, so server.stop() waited forever."""

    __slots__ = ("error", "type_name")

    def __init__(self, error: Exception, type_name: str):
        self.error = error
        self.type_name = type_name

    def message(self) -> str:
        return f"malformed {self.type_name}: {self.error}"


def tolerant_deserializer(decode: Callable[[bytes], object], type_name: str, errors=None):
    """``decode`` returning Malformed instead of raising ``errors`` (default: protobuf's DecodeError)."""
    if errors is None:
        from google.protobuf.message import DecodeError
        errors = DecodeError

    def deserialize(data: bytes):
        try:
            return decode(data)
        except errors as e:
            return Malformed(e, type_name)
    return deserialize


def _abort_malformed(context, request: Malformed):
    """End the call with INVALID_ARGUMENT naming the problem (a coroutine on a grpc.aio context)."""
    from ps.errors import short_message
    return context.abort(grpc.StatusCode.INVALID_ARGUMENT, short_message(request.message()))


def _checked(requests, context):
    for req in requests:
        if type(req) is Malformed:
            _abort_malformed(context, req)
        yield req


def rejecting_malformed(behavior, client_streaming: bool = False):
    """``behavior`` (a handler: sync or async, unary or streaming response; a sync one may take a
    request stream), ending the call with INVALID_ARGUMENT at the first request that is Malformed."""
    import functools
    import inspect

    if client_streaming:
        @functools.wraps(behavior)
        def stream(request_iterator, context):
            return behavior(_checked(request_iterator, context), context)
        return stream
    if inspect.isasyncgenfunction(behavior):
        @functools.wraps(behavior)
        async def agen(request, context):
            if type(request) is Malformed:
                await _abort_malformed(context, request)
            async for item in behavior(request, context):
                yield item
        return agen
    if inspect.iscoroutinefunction(behavior):
        @functools.wraps(behavior)
        async def coro(request, context):
            if type(request) is Malformed:
                await _abort_malformed(context, request)
            return await behavior(request, context)
        return coro
    if inspect.isgeneratorfunction(behavior):
        @functools.wraps(behavior)
        def gen(request, context):
            if type(request) is Malformed:
                _abort_malformed(context, request)
            yield from behavior(request, context)
        return gen

    @functools.wraps(behavior)
    def sync(request, context):
        if type(request) is Malformed:
            _abort_malformed(context, request)
        return behavior(request, context)
    return sync


def add_servicer(servicer, server, service, deserializers: dict | None = None,
                 serializers: dict | None = None) -> None:
    """Register ``servicer`` for ``service`` (a ServiceDescriptor) on a grpc or grpc.aio server,
    like the generated add_*Servicer_to_server, except that bytes that are not a request end the
    call with INVALID_ARGUMENT naming the problem. ``deserializers`` / ``serializers``: per method
    name, codecs to use instead of the generated classes (a deserializer must return Malformed
    for bytes it cannot decode)."""
    from google.protobuf import message_factory

    handlers = {}
    for m in service.methods:
        decode = (deserializers or {}).get(m.name) or tolerant_deserializer(
            message_factory.GetMessageClass(m.input_type).FromString, m.input_type.name)
        encode = (serializers or {}).get(m.name) or (lambda msg: msg.SerializeToString())
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(rejecting_malformed(getattr(servicer, m.name), m.client_streaming),
                                request_deserializer=decode, response_serializer=encode)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service.full_name, handlers)
