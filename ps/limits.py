"""Limits on every size, shape, count and length a request names, checked before anything is
allocated or looped over.

A request over a limit gets RESOURCE_EXHAUSTED (a count or a size that costs memory) or
INVALID_ARGUMENT (a value outside what makes sense, e.g. a negative length) whose message names
the field, the value and the limit, and changes nothing:

    pull from 'm': ranges: 65537 exceeds the limit 65536 (set --max-slices / PS_MAX_SLICES)

Every limit is a setting of the scheduler or the servers (a flag, or a ``PS_*`` environment
variable; see ``paramserver server --help``). The defaults fit one host; the memory-sized ones
follow what this process may use (the least of the host's physical memory, its cgroup's memory
limit and what RLIMIT_AS leaves): a shard holds up to half of it (``max_bytes``), the scheduler
relays up to a quarter (``max_fetch_bytes``).

A process configures its limits once (``configure``); code that has no settings of its own to
hand (``JobSpec.check``, the synthetic data generators) reads ``current()``, which is the
configured limits or, in a process that configured none (a worker, a client), the defaults with
any ``PS_*`` environment variable applied.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass, field

from ps.errors import InvalidArgument, ResourceExhausted

#: roles whose command takes a limit as a flag
SCHEDULER, SERVER = "scheduler", "server"


def _setting(default=None, *, flag: str, env: str, roles: tuple[str, ...], help: str, size: bool = False,
             default_factory=None, shown: str | None = None):
    """A Limits field and how it is set: flag, environment variable, roles, meaning (``shown``:
    the default as --help shows it, for one computed at start-up)."""
    meta = {"flag": flag, "env": env, "roles": roles, "help": help, "size": size, "shown": shown}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def memory_available() -> int:
    """Bytes this process may use: the smallest of the host's physical memory, the cgroup (v2
    or v1) memory limit of its container and, under an address-space limit (RLIMIT_AS), what
    that limit leaves beyond the address space already mapped."""
    candidates = []
    try:
        candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "unlimited" (a huge number)
            candidates.append(int(text))
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            candidates.append(max(0, soft - _mapped_bytes()))
    except (ImportError, OSError, ValueError):
        pass
    return min(candidates) if candidates else 8 << 30


def _mapped_bytes() -> int:
    """This process's address space (VmSize), 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_memory_limit() -> int:
    """Half of ``memory_available()``: room for the copies a request makes on its way in and out."""
    return memory_available() // 2


@dataclass(frozen=True)
class Limits:
    """Every limit on what a request may name. Each field's metadata gives its flag, its
    environment variable and the roles that take it."""

    max_name_bytes: int = _setting(
        256, flag="--max-name-bytes", env="PS_MAX_NAME_BYTES", roles=(SCHEDULER, SERVER),
        help="Longest name, in UTF-8 bytes: a model, tensor, job, task, lease, server, worker or client id, "
             "an address, a worker's name or device.")
    max_dims: int = _setting(
        32, flag="--max-dims", env="PS_MAX_DIMS", roles=(SCHEDULER, SERVER),
        help="Most dimensions a tensor's shape may have.")
    max_tensors: int = _setting(
        4096, flag="--max-tensors", env="PS_MAX_TENSORS", roles=(SCHEDULER, SERVER),
        help="Most tensors in one model.")
    max_slices: int = _setting(
        65536, flag="--max-slices", env="PS_MAX_SLICES", roles=(SCHEDULER, SERVER),
        help="Most slices a model may be cut into (a plan, the slices created on one shard) and most "
             "ranges one pull may name.")
    max_models: int = _setting(
        1024, flag="--max-models", env="PS_MAX_MODELS", roles=(SCHEDULER, SERVER),
        help="Most models a shard holds, or the scheduler keeps shard maps for, or a heartbeat may list.")
    max_bytes: int = _setting(
        flag="--max-bytes", env="PS_MAX_BYTES", roles=(SERVER,), size=True, default_factory=default_memory_limit,
        shown="half the memory this process may use (physical, cgroup or RLIMIT_AS, whichever is least)",
        help="Bytes of parameters plus optimizer state a shard holds, all models together.")
    max_model_bytes: int = _setting(
        1 << 40, flag="--max-model-bytes", env="PS_MAX_MODEL_BYTES", roles=(SCHEDULER,), size=True,
        help="Largest model (bytes of parameters) the scheduler plans; the servers hold it, each within its "
             "own --max-bytes.")
    max_fetch_bytes: int = _setting(
        flag="--max-fetch-bytes", env="PS_MAX_FETCH_BYTES", roles=(SCHEDULER,), size=True,
        default_factory=lambda: memory_available() // 4,
        shown="a quarter of the memory this process may use (physical, cgroup or RLIMIT_AS, whichever is least)",
        help="Bytes of weights the scheduler relays at once (FetchWeights holds a whole model; all calls "
             "together).")
    min_chunk_bytes: int = _setting(
        1024, flag="--min-chunk-bytes", env="PS_MIN_CHUNK_BYTES", roles=(SCHEDULER, SERVER), size=True,
        help="Smallest max_chunk_bytes a Pull or FetchWeights may ask for (the largest is the message limit "
             "less 64 KiB).")
    max_servers: int = _setting(
        1024, flag="--max-servers", env="PS_MAX_SERVERS", roles=(SCHEDULER,),
        help="Most parameter servers the scheduler knows (up or down).")
    max_workers: int = _setting(
        4096, flag="--max-workers", env="PS_MAX_WORKERS", roles=(SCHEDULER,),
        help="Most workers registered with the scheduler at once.")
    max_text_bytes: int = _setting(
        1 << 20, flag="--max-text-bytes", env="PS_MAX_TEXT_BYTES", roles=(SCHEDULER,), size=True,
        help="Longest free text, in UTF-8 bytes: a job spec, a task's error or result.")
    max_epochs: int = _setting(
        100_000, flag="--max-epochs", env="PS_MAX_EPOCHS", roles=(SCHEDULER,),
        help="Most epochs a job spec may ask for.")
    max_batch_size: int = _setting(
        1 << 20, flag="--max-batch-size", env="PS_MAX_BATCH_SIZE", roles=(SCHEDULER,),
        help="Largest batch_size a job spec may ask for.")
    max_shards: int = _setting(
        100_000, flag="--max-shards", env="PS_MAX_SHARDS", roles=(SCHEDULER,),
        help="Most workers, and most training-split parts (data.shards), a job spec may ask for.")
    max_synthetic_values: int = _setting(
        1 << 28, flag="--max-synthetic-values", env="PS_MAX_SYNTHETIC_VALUES", roles=(SCHEDULER,),
        help="Most values (n x features, and features x classes) a synthetic: data URI may generate "
             "(workers read PS_MAX_SYNTHETIC_VALUES too).")
    #: set by --max-message-bytes / PS_MAX_MESSAGE_BYTES (a setting of its own, not declared here)
    max_message_bytes: int = 16 << 20

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"limit {f.name} must be an integer >= 0, got {v!r}")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Limits":
        """The defaults, with any PS_* variable that is set applied, then ``overrides`` (None: unset)."""
        env = os.environ if environ is None else environ
        kw = {}
        for f in dataclasses.fields(cls):
            name = f.metadata.get("env")
            if name and env.get(name, "").strip():
                try:
                    kw[f.name] = parse_size(env[name]) if f.metadata["size"] else int(env[name])
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r}: expected " +
                                     ("a size such as 64MiB" if f.metadata["size"] else "an integer")) from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def max_chunk_bytes(self) -> int:
        """The largest max_chunk_bytes a Pull or FetchWeights may ask for: a chunk's message must fit."""
        return max(self.min_chunk_bytes, self.max_message_bytes - (64 << 10))

    # -- checks: each raises the error a request over the limit gets --------------------------------
    def hint(self, name: str) -> str:
        """'(set --flag / PS_ENV)' for a limit."""
        meta = {f.name: f.metadata for f in dataclasses.fields(self)}[name]
        if not meta:
            return "(set --max-message-bytes / PS_MAX_MESSAGE_BYTES)"
        return f"(set {meta['flag']} / {meta['env']})"

    def check_count(self, what: str, value: int, limit_name: str, exc=ResourceExhausted) -> None:
        """``what`` (a field, prefixed by what the request does) may be at most the limit."""
        limit = getattr(self, limit_name)
        if value > limit:
            raise exc(f"{what}: {value} exceeds the limit {limit} {self.hint(limit_name)}")

    def check_name(self, what: str, name: str) -> None:
        """A name no longer than max_name_bytes (INVALID_ARGUMENT: no sane name is that long)."""
        if len(name) * 4 > self.max_name_bytes:  # UTF-8 takes at most 4 bytes a character
            n = len(name.encode())
            if n > self.max_name_bytes:
                raise InvalidArgument(f"{what}: {n} bytes exceeds the limit {self.max_name_bytes} "
                                      f"{self.hint('max_name_bytes')}")

    def check_names(self, what: str, names) -> None:
        for name in names:
            self.check_name(what, name)

    def check_text(self, what: str, text: str) -> None:
        """Free text no longer than max_text_bytes (RESOURCE_EXHAUSTED)."""
        if len(text) * 4 > self.max_text_bytes:
            n = len(text.encode())
            if n > self.max_text_bytes:
                raise ResourceExhausted(f"{what}: {n} bytes exceeds the limit {self.max_text_bytes} "
                                        f"{self.hint('max_text_bytes')}")

    def check_shape(self, what: str, shape) -> int:
        """A tensor shape: at most max_dims dimensions, none negative. Returns its element count
        (an exact integer: no int64 overflow)."""
        self.check_count(f"{what}: shape dimensions", len(shape), "max_dims", InvalidArgument)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{what}: negative dimension in shape {list(shape)}")
        return math.prod(shape)

    def check_chunk_bytes(self, what: str, value: int) -> None:
        """A requested max_chunk_bytes (0: the default) within [min_chunk_bytes, max_chunk_bytes]."""
        if value == 0:
            return
        if value < self.min_chunk_bytes:
            raise InvalidArgument(f"{what}: max_chunk_bytes {value} is below the limit {self.min_chunk_bytes} "
                                  f"{self.hint('min_chunk_bytes')}")
        if value > self.max_chunk_bytes:
            raise InvalidArgument(f"{what}: max_chunk_bytes {value} exceeds the limit {self.max_chunk_bytes} "
                                  f"(the message limit less 64 KiB) {self.hint('max_message_bytes')}")

    def check_synthetic(self, what: str, n: int, features: int, classes: int | None = None, *,
                        ids: int | None = None, width: str = "features") -> None:
        """A synthetic: generator's size: n x features (for ``synthetic:ctr``, ``width="fields"``:
        n x fields), features x classes and ``ids`` (ctr's teacher weights), each
        max_synthetic_values at most."""
        for label, value in ((f"n x {width}", n * features),
                             ("features x classes", None if classes is None else features * classes),
                             ("ids", ids)):
            if value is not None and value > self.max_synthetic_values:
                raise ResourceExhausted(f"{what}: {label} = {value} exceeds the limit {self.max_synthetic_values} "
                                        f"{self.hint('max_synthetic_values')}")

    def check_synthetic_uri(self, what: str, uri: str) -> None:
        """``check_synthetic`` for a ``synthetic:KIND?n=...&features=...&classes=...`` URI, or a
        ``synthetic:ctr?n=...&fields=...&ids=...`` one (the generator's defaults for what it
        leaves out); other faults are the generator's to report."""
        from urllib.parse import parse_qsl
        kind, _, query = uri.partition(":")[2].partition("?")
        given = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in ("n", "features", "classes", "fields", "ids"):
                try:
                    given[key] = int(float(value)) if "e" in value.lower() else int(value)
                except (ValueError, OverflowError):
                    raise InvalidArgument(f"{what}: parameter '{key}' must be a whole number, "
                                          f"got '{value[:40]}'") from None
        if kind == "ctr":
            size = {**SYNTHETIC_CTR_DEFAULTS, **given}
            self.check_synthetic(what, size["n"], size["fields"], ids=size["ids"], width="fields")
            return
        self.check_synthetic(what, given.get("n", SYNTHETIC_DEFAULTS["n"]),
                             given.get("features", SYNTHETIC_DEFAULTS["features"]),
                             given.get("classes", SYNTHETIC_DEFAULTS["classes"]) if kind == "classification" else None)


#: ps.worker.datasets.synthetic's defaults (a spec may leave them out of its URI)
SYNTHETIC_DEFAULTS = {"n": 10_000, "features": 20, "classes": 2}
#: ps.worker.datasets.ctr's defaults (``synthetic:ctr``)
SYNTHETIC_CTR_DEFAULTS = {"n": 10_000, "fields": 8, "ids": 100_000}


def parse_size(text: str) -> int:
    """'64MiB', '4MB', '1GiB', '1024' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "k": 1 << 10, "m": 1 << 20,
             "g": 1 << 30, "t": 1 << 40}
    t = str(text).strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in units:
        raise ValueError(f"'{text}' is not a size: use e.g. 64MiB, 4MB or 1048576")
    value = float(num) * units[unit]
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is not a size: use e.g. 64MiB, 4MB or 1048576")
    return int(value)


_lock = threading.Lock()
_current: Limits | None = None


def configure(limits: Limits) -> Limits:
    """Set this process's limits (a scheduler or server does so once, from its settings)."""
    global _current
    with _lock:
        _current = limits
    return limits


def current() -> Limits:
    """This process's limits: the configured ones, else the defaults with PS_* variables applied."""
    global _current
    with _lock:
        if _current is None:
            _current = Limits.from_env()
        return _current


# -- entry checks of the scheduler's calls ----------------------------------------------------------
# Each takes the servicer, the request and the limits, and raises the PSError the call ends with.
# ``entry_check`` runs one before its handler (sync, generator, coroutine or async generator).

def entry_check(check):
    """Decorate a servicer method so that ``check(servicer, request, current())`` runs first; a
    PSError it raises ends the call with that status, before the handler runs. A check may return
    a function, called when the call ends (to give back what it reserved). A MemoryError the
    handler raises ends the call with RESOURCE_EXHAUSTED, not UNKNOWN."""
    import functools
    import inspect

    from ps.errors import PSError, abort, short_message

    def out_of_memory(method) -> ResourceExhausted:
        return ResourceExhausted(f"{method.__name__}: out of memory on this process")

    def done(release) -> None:
        if callable(release):
            release()

    def decorate(method):
        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def agen(self, request, context):
                try:
                    release = check(self, request, current())
                except PSError as e:
                    await context.abort(e.code, short_message(str(e)))
                try:
                    async for item in method(self, request, context):
                        yield item
                except MemoryError:
                    e = out_of_memory(method)
                    await context.abort(e.code, str(e))
                finally:
                    done(release)
            return agen
        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def coro(self, request, context):
                try:
                    release = check(self, request, current())
                except PSError as e:
                    await context.abort(e.code, short_message(str(e)))
                try:
                    return await method(self, request, context)
                except MemoryError:
                    e = out_of_memory(method)
                    await context.abort(e.code, str(e))
                finally:
                    done(release)
            return coro
        if inspect.isgeneratorfunction(method):
            # a generator itself: grpc.aio tells sync streaming handlers by that, and would run a
            # plain function that returns a generator on its event loop (where abort deadlocks)
            @functools.wraps(method)
            def gen(self, request, context):
                try:
                    release = check(self, request, current())
                except PSError as e:
                    abort(context, e)
                try:
                    yield from method(self, request, context)
                except MemoryError:
                    abort(context, out_of_memory(method))
                finally:
                    done(release)
            return gen

        @functools.wraps(method)
        def sync(self, request, context):
            try:
                release = check(self, request, current())
            except PSError as e:
                abort(context, e)
            try:
                return method(self, request, context)
            except MemoryError:
                abort(context, out_of_memory(method))
            finally:
                done(release)
        return sync
    return decorate


def _field(req, name, default=None):
    """A request field that may not exist in every version of the proto."""
    try:
        return getattr(req, name)
    except AttributeError:
        return default


def check_register_server(svc, req, lim: Limits) -> None:
    lim.check_name("register server: address", req.address)
    lim.check_name("register server: instance", req.instance)
    servers = list(svc.cluster.servers.values())
    if len(servers) >= lim.max_servers and all(s.address != req.address for s in servers):
        lim.check_count("register server: servers known", len(servers) + 1, "max_servers")


def check_heartbeat(svc, req, lim: Limits) -> None:
    lim.check_name("heartbeat: server_id", req.server_id)
    what = f"heartbeat from '{req.server_id}'"
    lim.check_count(f"{what}: models", len(req.models), "max_models")
    lim.check_names(f"{what}: model name", req.models)
    if req.bytes < 0:
        raise InvalidArgument(f"{what}: bytes must be >= 0, got {req.bytes}")


def check_model_name(what: str):
    def check(svc, req, lim: Limits) -> None:
        lim.check_name(f"{what}: model name", req.model)
    return check


def check_plan_model(svc, req, lim: Limits) -> None:
    """Every size a plan names, before anything is planned: tensors, their shapes and bytes, the
    slices the plan would cut them into over the servers that are up, the maps kept."""
    from ps import sharding
    from ps.tensor import CodecError, numpy_dtype
    lim.check_name("plan model: model name", req.model)
    what = f"plan model '{req.model}'"
    lim.check_count(f"{what}: tensors", len(req.tensors), "max_tensors")
    lim.check_count(f"{what}: sparse tables", len(req.tables), "max_tensors")
    lim.check_names(f"{what}: table name", (t.name for t in req.tables))
    if req.max_slice_bytes < 0:
        raise InvalidArgument(f"{what}: max_slice_bytes must be >= 0 (0: the default), got {req.max_slice_bytes}")
    slice_bytes = req.max_slice_bytes or sharding.DEFAULT_MAX_SLICE_BYTES
    shards = max(1, len(svc.cluster.up_servers()))
    total = slices = 0
    for t in req.tensors:
        lim.check_name(f"{what}: tensor name", t.name)
        tw = f"{what}: tensor '{t.name}'"
        n = lim.check_shape(tw, t.shape)
        try:
            item = numpy_dtype(t.dtype).itemsize
        except CodecError as e:
            raise InvalidArgument(f"{tw}: {e}") from None
        span = math.prod(max(d, 1) for d in t.shape) * item
        if n == 0 and span > lim.max_model_bytes:  # empty, but no array of that shape can exist
            raise InvalidArgument(f"{tw}: shape {list(t.shape)}: its dimensions other than 0 span {span} bytes, "
                                  f"which exceeds the limit {lim.max_model_bytes} {lim.hint('max_model_bytes')}")
        total += n * item
        lim.check_count(f"{what}: parameter bytes", total, "max_model_bytes")
        slices += sharding.slice_count(n, item, shards, slice_bytes)
        lim.check_count(f"{what}: slices over {shards} servers", slices, "max_slices")
    if req.model not in svc.cluster.maps:
        lim.check_count(f"{what}: models", len(svc.cluster.maps) + 1, "max_models")
    if req.HasField("optimizer"):
        from ps.optimizer_config import OptimizerConfig
        try:
            OptimizerConfig.from_proto(req.optimizer)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"{what}: optimizer: {e}") from None


def check_json(what: str, text: str, lim: Limits, max_depth: int = 64) -> None:
    """JSON text no longer than max_text_bytes and nested at most ``max_depth`` deep (Python's
    json raises RecursionError, not a ValueError, past ~1000)."""
    lim.check_text(what, text)
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise InvalidArgument(f"{what}: nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1


def check_submit_job(svc, req, lim: Limits) -> None:
    check_json("submit job: spec_json", req.spec_json, lim)
    lim.check_name("submit job: request_id", _field(req, "request_id", ""))


def check_job_id(what: str):
    def check(svc, req, lim: Limits) -> None:
        lim.check_name(f"{what}: job_id", req.job_id)
    return check


def check_job_exists(what: str):
    """The job id, and that the job exists: NOT_FOUND is answered here, outside the jobs lock
    (GetJob holds it while it reads the job, and a sync handler's abort on grpc.aio waits for
    the event loop, which a coroutine may be holding up on that very lock)."""
    def check(svc, req, lim: Limits) -> None:
        lim.check_name(f"{what}: job_id", req.job_id)
        svc.jobs.get(req.job_id)
    return check


def check_list_jobs(svc, req, lim: Limits) -> None:
    lim.check_name("list jobs: page_token", _field(req, "page_token", ""))


def check_watch_job(svc, req, lim: Limits) -> None:
    """``after`` names an event the job has had: from 0 (everything) to its last event's seq."""
    lim.check_name("watch job: job_id", req.job_id)
    # NotFound ends the call here: WatchJob is a coroutine, whose sync abort() of a lookup that
    # fails would be a coroutine never awaited (the stream would end OK, and empty)
    job = svc.jobs.get(req.job_id)
    last = job.next_event - 1 if hasattr(job, "next_event") else len(job.events)
    if not 0 <= req.after <= last:
        raise InvalidArgument(f"watch job '{req.job_id}': after must be in [0, {last}] (the last event's seq), "
                              f"got {req.after}")


class Budget:
    """Bytes in use across calls, up to a limit: ``take`` refuses what would pass it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.used = 0

    def take(self, what: str, n: int, lim: Limits, limit_name: str):
        """Reserve ``n`` bytes; returns the function that gives them back."""
        with self._lock:
            limit = getattr(lim, limit_name)
            if self.used + n > limit:
                raise ResourceExhausted(f"{what}: {n} (with {self.used} in use now) exceeds the limit "
                                        f"{limit} {lim.hint(limit_name)}")
            self.used += n

        def give_back():
            with self._lock:
                self.used -= n
        return give_back


#: what FetchWeights calls hold at once
RELAYED = Budget()


def check_fetch_weights(svc, req, lim: Limits):
    """A relay holds the whole model in the scheduler's memory: all relays together stay within
    max_fetch_bytes (the bytes are given back when the call ends)."""
    lim.check_name("fetch weights: model name", req.model)
    what = f"fetch weights of '{req.model}'"
    lim.check_chunk_bytes(what, req.max_chunk_bytes)
    m = svc.cluster.maps.get(req.model)
    if m is not None:
        return RELAYED.take(f"{what}: parameter bytes", sum(t.nbytes for t in m.tensors), lim, "max_fetch_bytes")
    return None


def check_register_worker(svc, req, lim: Limits) -> None:
    lim.check_name("register worker: name", req.name)
    lim.check_name("register worker: device", req.device)
    lim.check_count("register worker: workers registered", len(svc.cluster.workers) + 1, "max_workers")


def check_worker_id(what: str):
    def check(svc, req, lim: Limits) -> None:
        lim.check_name(f"{what}: worker_id", req.worker_id)
    return check


def check_complete_task(svc, req, lim: Limits) -> None:
    lim.check_name("complete task: worker_id", req.worker_id)
    lim.check_name("complete task: task_id", req.task_id)
    lim.check_name("complete task: lease_id", req.lease_id)
    what = f"complete task '{req.task_id}'"
    lim.check_text(f"{what}: error", req.error)
    check_json(f"{what}: result_json", _field(req, "result_json", ""), lim)
    for name in ("samples", "steps", "correct", "duplicates"):
        v = _field(req, name, 0)
        if v < 0:
            raise InvalidArgument(f"{what}: {name} must be >= 0, got {v}")
    if not (math.isfinite(req.seconds) and req.seconds >= 0):
        raise InvalidArgument(f"{what}: seconds must be a finite number >= 0, got {req.seconds}")
    from ps.histogram import BUCKETS
    for name in ("staleness", "clock_staleness"):
        counts = list(_field(req, name, ()))
        if len(counts) > BUCKETS or any(v < 0 for v in counts):
            raise InvalidArgument(f"{what}: {name} must be at most {BUCKETS} counts >= 0, got "
                                  f"{len(counts)} value(s), the lowest {min(counts, default=0)}")


def check_clock(svc, req, lim: Limits) -> None:
    lim.check_name("clock: worker_id", req.worker_id)
    lim.check_name("clock: task_id", req.task_id)
    lim.check_name("clock: lease_id", req.lease_id)
    if req.steps < 0:
        raise InvalidArgument(f"clock of {req.task_id}: steps must be >= 0, got {req.steps}")
    if _field(req, "closed_step", 0) < 0:
        raise InvalidArgument(f"clock of {req.task_id}: closed_step must be >= 0, got {req.closed_step}")
