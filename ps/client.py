"""The user's API: ``Client`` talks to the scheduler, ``Model`` pushes and pulls a model's
tensors across every shard in parallel, cut into chunks, and reassembles them.

    client = ps.Client("127.0.0.1:7070")
    model = client.create_model("mlp", {"w": np.zeros((784, 10), "float32")}, optimizer={"name": "adam"})
    weights = model.push_pull({"w": grad})
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Mapping

import grpc
import numpy as np

from ps import local_link, rpc, sharding, wire
from ps.errors import DeadlineExceeded, InvalidArgument, NotFound, PSError, Unavailable, from_rpc_error
from ps.initializers import Init
from ps.optimizer_config import OptimizerConfig, clip_norm_scale
from ps.spec import MAX_STEP_WAIT_S
from ps.tensor import count_nonfinite, dtype_code, numpy_dtype, to_little_endian
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc, server_pb2, tensor_pb2

#: how many times a submit is retried after UNAVAILABLE (it carries a request id)
RETRIES = 3
#: a shard's stream failing with these is retried on the shard's (new) primary: pushes are deduplicated
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
#: a server that answers "not the primary" / "no such model" is retried this long for the map to move on
STALE_MAP_WAIT_S = 5.0
#: bsp steps a model handle remembers being answered about (steps are asked about in order: a few suffice)
STEPS_REMEMBERED = 64
#: apply_accumulated asks again after this long (doubling up to the max) while a server is too busy to wait
BUSY_PAUSE_S, MAX_BUSY_PAUSE_S = 0.002, 0.05

log = logging.getLogger("ps.client")


def _security(tls, token: str | None):
    """This process's security settings, with ``tls`` and ``token`` in place of its own where given."""
    import os

    from ps import security
    changes = {} if token is None else {"token": token}
    if tls is False:
        changes["tls"] = None
    elif isinstance(tls, (str, os.PathLike)):
        changes["tls"] = security.TLS.from_dir(tls)
    elif isinstance(tls, security.TLS):
        changes["tls"] = tls
    elif tls is not None:
        raise InvalidArgument(f"tls: expected a ps.security.TLS, a certs directory or False, got {tls!r}")
    return security.current().with_(**changes)


class Client:
    """A connection to a cluster's scheduler, and to its servers as models need them."""

    def __init__(self, address: str, *, timeout: float = rpc.DEFAULT_TIMEOUT_S,
                 chunk_bytes: int = rpc.DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES,
                 connect_timeout: float = 10.0, client_id: str | None = None,
                 inflight_chunks: int = rpc.DEFAULT_INFLIGHT_CHUNKS, failover_timeout: float = 30.0,
                 tls=None, token: str | None = None, local: bool | None = None,
                 batch_bytes: int | None = None, link: bool | None = None):
        """``tls``: a ``ps.security.TLS``, a directory ``paramserver certs`` wrote (its user certificate
        and CA), or False for none; ``token``: the bearer token to send. Either left None comes from
        the PS_TLS_* / PS_TOKEN_FILE variables (or the command's flags). ``local``: push_pull to a
        server on this host through shared memory (``ps.shm``; default on, PS_LOCAL=0 turns it off);
        a server elsewhere is found out on the first call and reached over gRPC from then on.
        ``link``: send those same-host calls over the server's Unix socket (``ps.local_link``) once it
        names one, instead of gRPC (default on; PS_LOCAL_LINK=0 turns it off).
        ``batch_bytes``: a push or push_pull whose part for a shard on another host is at most this size
        goes to it in one unary call (PushBatch) instead of a stream (0: always a stream; default 64 KiB, or
        chunk_bytes if smaller)."""
        if chunk_bytes + (64 << 10) > max_message_bytes:
            raise ValueError(f"chunk_bytes ({chunk_bytes}) must leave 64 KiB of headroom under "
                             f"max_message_bytes ({max_message_bytes})")
        if inflight_chunks < 1:
            raise ValueError(f"inflight_chunks must be at least 1, got {inflight_chunks}")
        rpc.tune_malloc()  # chunk buffers from the heap, not a page-faulting mmap each
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.inflight_chunks = inflight_chunks
        if batch_bytes is None:
            batch_bytes = min(rpc.DEFAULT_BATCH_BYTES, chunk_bytes)
        if not 0 <= batch_bytes <= chunk_bytes:
            raise ValueError(f"batch_bytes must be in [0, chunk_bytes = {chunk_bytes}], got {batch_bytes}")
        self.batch_bytes = batch_bytes
        #: how long a model's call keeps retrying while a shard fails over to another replica
        self.failover_timeout = failover_timeout
        self.max_message_bytes = max_message_bytes
        self.client_id = client_id or uuid.uuid4().hex
        self.security = _security(tls, token)
        self._channel = rpc.channel(address, max_message_bytes, self.security)
        rpc.wait_ready(self._channel, address, "scheduler", connect_timeout, self.security)
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._servers: dict[str, tuple[grpc.Channel, wire.ShardStub]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="ps-client")
        # Exactly-once: the shards keep, per slice, the highest (client id, seq) applied and take
        # anything not above it for a retry. So seq is one counter for the whole client, whatever
        # handle a push goes through, and a model's pushes from this client are sent one at a time
        # (a later seq must never reach a slice before an earlier one).
        self._seqs = itertools.count(1)
        self._push_locks: dict[str, threading.Lock] = {}
        import os
        self.local = (os.environ.get("PS_LOCAL", "1") != "0") if local is None else bool(local)
        self.link = (os.environ.get("PS_LOCAL_LINK", "1") != "0") if link is None else bool(link)
        #: shared-memory segments by (model, shard, layout), and the servers that cannot open them
        self._segments: dict[tuple, tuple] = {}
        self._remote: set[str] = set()
        #: same-host links (ps.local_link) by server address; a name instead: that link could not be opened
        self._links: dict[str, object] = {}

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        with self._lock:
            segments, self._segments = list(self._segments.values()), {}
            links, self._links = list(self._links.values()), {}
        for link in links:
            if hasattr(link, "close"):
                link.close()
        for segment, _ in segments:
            segment.close()
        for ch, _ in self._servers.values():
            ch.close()
        self._channel.close()

    def call(self, method: Callable, request, what: str, peer: str | None = None, timeout: float | None = None):
        """One unary call; a failure raises the PSError matching its status, naming the peer."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, peer or self.address, what) from None

    def server(self, address: str) -> wire.ShardStub:
        with self._lock:
            if address not in self._servers:
                ch = rpc.channel(address, self.max_message_bytes, self.security)
                self._servers[address] = (ch, wire.ShardStub(ch))
            return self._servers[address][1]

    def _call_local(self, address: str, stub, req: server_pb2.LocalPushPullRequest,
                    timeout: float) -> server_pb2.LocalPushPullResponse:
        """A PushPullLocal call: over the server's same-host link once it named one, else over gRPC."""
        return self._call_linked(address, stub.PushPullLocal, req, server_pb2.LocalPushPullResponse, timeout,
                                 local_link.CALL)

    def _call_linked(self, address: str, method, req, reply, timeout: float, kind: int, long: bool = False):
        """A call of gRPC ``method`` (whose reply, of class ``reply``, may name the server's same-host link):
        over that link once the server named one, else over gRPC. A link that breaks mid-call is dropped and
        the call fails with LinkBroken (UNAVAILABLE; ``_stream`` retries it over gRPC at once; exactly-once
        makes a retry of an applied call harmless). ``long``: the server may hold it (a bsp step waiting for
        its members); a call that would wait behind such a one goes over gRPC instead."""
        link = self._links.get(address)
        if isinstance(link, local_link.Link):
            try:
                got = link.call(req.SerializeToString(), timeout, kind, long)
                if got is not None:
                    return reply.FromString(got)
            except OSError as e:  # the link broke (a status the server sent is a LinkError: a grpc.RpcError)
                with self._lock:
                    if self._links.get(address) is link:
                        del self._links[address]
                link.close()
                raise local_link.LinkBroken(f"the local link to {address} broke: {e or type(e).__name__}") from None
        resp = method(req, timeout=timeout)
        if resp.link and resp.link != link and self.link and self.local:
            self._open_link(address, resp.link)
        return resp

    def _open_link(self, address: str, name: str) -> None:
        with self._lock:
            current = self._links.get(address)
        if getattr(current, "name", None) == name:  # another thread opened it meanwhile
            return
        try:
            link = local_link.Link(name, self.security.token)
        except (OSError, local_link.LinkError) as e:  # another network namespace, a refused token
            log.info("server %s: no local link (%s): gRPC for its calls", address, e)
            link = name
        with self._lock:
            old = self._links.get(address)
            self._links[address] = link
        if hasattr(old, "close"):
            old.close()

    def release(self, model: str) -> int:
        """Close this client's shared-memory segments for ``model`` (one per shard it reached on this
        host); returns how many. Its handles keep working: a later same-host call makes a new segment.
        For a long-lived client done with a model (a worker moving to the next job): segments are
        otherwise kept until the client closes. Call it with no call on the model in flight."""
        with self._lock:
            keys = [k for k in self._segments if k[0] == model]
            found = [self._segments.pop(k)[0] for k in keys]
        for segment in found:
            segment.close()
        return len(found)

    def next_seq(self) -> int:
        """The next push sequence number of this client (strictly increasing, thread-safe)."""
        with self._lock:
            return next(self._seqs)

    def push_lock(self, model: str) -> threading.Lock:
        """The lock that keeps this client's pushes to ``model`` in seq order, shared by its handles."""
        with self._lock:
            return self._push_locks.setdefault(model, threading.Lock())

    def map(self, fn: Callable, items: Iterable) -> list:
        """fn over items in parallel (one task per shard); the first error is raised. One item runs
        in the calling thread (a thread hop costs a small call a fifth of its time)."""
        items = list(items)
        if len(items) == 1:
            return [fn(*items[0])]
        return [f.result() for f in [self._pool.submit(fn, *it) for it in items]]

    def cluster(self) -> scheduler_pb2.ClusterView:
        return self.call(self.scheduler.GetCluster, scheduler_pb2.GetClusterRequest(), "get cluster view")

    def stats(self, address: str) -> server_pb2.StatsResponse:
        return self.call(self.server(address).Stats, server_pb2.StatsRequest(), "stats", address)

    def create_model(self, name: str, tensors: Mapping[str, np.ndarray | Init | dict],
                     optimizer: OptimizerConfig | Mapping | str = "sgd", *, replace: bool = False,
                     max_slice_bytes: int | None = None, replicas: int = 0,
                     restore: tuple | None = None, owner: str = "") -> "Model":
        """Create a model's parameters on the servers: arrays are uploaded, Init specs are
        computed on each shard. ``replicas``: servers holding each slice (0: the scheduler's
        default, 2 when two or more servers are up). ``restore``: ``ps.checkpoint.load``'s
        (manifest, arrays, slices): the slices take the checkpoint's values, optimizer state,
        versions and exactly-once records (see ``restore_model``). ``owner``: with auth, a member or
        admin creating a model for a user (the scheduler, a job's). Returns its handle."""
        if isinstance(optimizer, str):
            optimizer = {"name": optimizer}
        try:
            config = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig.from_dict(dict(optimizer))
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"create model '{name}': optimizer: {e}") from None
        from ps import sparse
        specs, inits, arrays, tables = [], {}, {}, []
        for tname, value in tensors.items():
            if isinstance(value, sparse.SparseTable):
                tables.append(sparse.to_proto(value.spec(tname)))
                continue
            if isinstance(value, dict):
                value = Init(**value)
            if isinstance(value, Init):
                inits[tname] = value
                specs.append(sharding.TensorSpec(tname, value.shape, np.dtype(value.dtype).name))
            else:
                a = np.asarray(value)
                if a.dtype.kind != "f":
                    a = a.astype(np.float32)
                arrays[tname] = a
                specs.append(sharding.TensorSpec(tname, a.shape, a.dtype.name))
        request = scheduler_pb2.PlanModelRequest(
            model=name, replace=replace, max_slice_bytes=max_slice_bytes or self.chunk_bytes,
            optimizer=config.to_proto(), replicas=replicas, owner=owner,
            tensors=[scheduler_pb2.TensorInfo(name=t.name, shape=list(t.shape), dtype=dtype_code(t.dtype))
                     for t in specs], tables=tables)
        smap = self.call(self.scheduler.PlanModel, request, f"plan model '{name}'")
        model = Model(self, smap)
        try:
            shards = [(i,) for i in range(len(model.shards))]
            self.map(lambda shard: model._create_on(shard, inits, replace), shards)
            if restore is not None:
                model._restore(restore)
            # only once every primary holds its slices (a replaced model is dropped whole on each server)
            self.map(model._replicate_on, [s for s in shards if len(model.replicas[s[0]]) > 1
                                           and model._slices_of(s[0])])
            if arrays:
                model.assign(arrays)
        except PSError:
            model.delete()
            raise
        return model

    def restore_model(self, name: str, url: str, *, replace: bool = False, replicas: int = 0,
                      owner: str = "") -> "Model":
        """Create model ``name`` from the checkpoint at ``url`` (a directory with manifest.json, any
        fsspec URL): parameters, optimizer state and each slice's update count, so the optimizer
        continues exactly where it was (Adam's bias correction included)."""
        from ps import checkpoint
        loaded = checkpoint.load(url)
        manifest = loaded[0]
        zeros = {t["name"]: Init("zeros", tuple(t["shape"]), t["dtype"]) for t in manifest["tensors"]}
        return self.create_model(name, zeros, optimizer=manifest["optimizer"], replace=replace, replicas=replicas,
                                 restore=loaded, owner=owner)

    def model(self, name: str) -> "Model":
        """A handle on a model that exists (created by this or another client)."""
        smap = self.call(self.scheduler.GetShardMap, scheduler_pb2.GetShardMapRequest(model=name),
                         f"get shard map of '{name}'")
        return Model(self, smap)

    def delete_model(self, name: str) -> None:
        self.model(name).delete()

    def submit(self, spec, request_id: str | None = None) -> "Job":
        """Submit a training job (a ps.JobSpec, a dict or JSON text); returns its handle.

        The request carries an id (``request_id``, a fresh one by default), and a lost reply is
        retried with it: the scheduler returns the job that request created, never a second one."""
        req = scheduler_pb2.SubmitJobRequest(spec_json=_spec_json(spec), request_id=request_id or uuid.uuid4().hex)
        for attempt in range(RETRIES + 1):
            try:
                return Job(self, self.scheduler.SubmitJob(req, timeout=self.timeout))
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or attempt == RETRIES:
                    raise from_rpc_error(e, self.address, "submit job") from None
                time.sleep(0.2 * 2 ** attempt)

    def resume(self, checkpoint: str, spec=None, request_id: str | None = None) -> "Job":
        """Submit a job that continues from ``checkpoint`` (a URL ``Job.checkpoint`` returned, or one
        a periodic checkpoint wrote): its parameters, optimizer state and epochs done. ``spec``: run
        with this spec instead of the checkpoint's (same model; e.g. more epochs)."""
        req = scheduler_pb2.SubmitJobRequest(spec_json=_spec_json(spec) if spec is not None else "",
                                             resume_from=checkpoint, request_id=request_id or uuid.uuid4().hex)
        return Job(self, self.call(self.scheduler.SubmitJob, req, f"resume from {checkpoint}",
                                   timeout=max(self.timeout, 60)))

    def drain(self, address: str, timeout: float = 60.0) -> scheduler_pb2.DrainServerResponse:
        """Move every slice off the server at ``address`` (to other replicas and servers) so it can stop."""
        return self.call(self.scheduler.DrainServer, scheduler_pb2.DrainServerRequest(address=address,
                                                                                      timeout_s=timeout),
                         f"drain {address}", timeout=timeout + 10)

    def jobs(self, page_size: int = 100) -> list["Job"]:
        """Every job the scheduler keeps, newest first (summaries: ``Job.info()`` fetches the rest)."""
        out, token = [], ""
        while True:
            resp = self.call(self.scheduler.ListJobs, scheduler_pb2.ListJobsRequest(page_size=page_size,
                                                                                    page_token=token), "list jobs")
            out.extend(Job(self, info) for info in resp.jobs)
            token = resp.next_page_token
            if not token:
                return out

    def delete_job(self, job_id: str) -> bool:
        """Forget a job: cancel it if it runs, free its parameters on every server, drop its record.
        Returns whether its parameters were freed everywhere."""
        resp = self.call(self.scheduler.DeleteJob, scheduler_pb2.DeleteJobRequest(job_id=job_id),
                         f"delete job '{job_id}'", timeout=max(self.timeout, 60))
        return resp.params_freed

    def job(self, job_id: str) -> "Job":
        job = Job(self, scheduler_pb2.JobInfo(job_id=job_id))
        job.info()
        return job


class _Credits:
    """How many chunks of one push_pull stream may be unanswered: the request generator takes
    a credit per chunk, each response gives one back. Bounds what both ends buffer per stream
    to a few chunks whatever grpc's flow-control window has grown to."""

    def __init__(self, n: int):
        self._cond = threading.Condition()
        self._n = n
        self._closed = False

    def take(self) -> bool:
        """Wait for a credit; False once the stream is over (stop sending)."""
        with self._cond:
            self._cond.wait_for(lambda: self._n > 0 or self._closed)
            if self._closed:
                return False
            self._n -= 1
            return True

    def give(self) -> None:
        with self._cond:
            self._n += 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Model:
    """A handle on one model's parameters, sharded across the servers."""

    def __init__(self, client: Client, smap: scheduler_pb2.ShardMap):
        self.client = client
        self.name = smap.model
        self.shards: list[str] = []       # shard i's primary
        self.replicas: list[list[str]] = []  # shard i's servers, primary first
        self.map_version = 0
        self._adopt(smap)
        #: how long a call keeps retrying while a shard fails over (default: the client's)
        self.failover_timeout = client.failover_timeout
        #: retries of shard streams while shards failed over (server lost, primary moved), in all,
        #: and the most that one stream needed
        self.failovers = 0
        self.most_retries = 0
        self.specs = {t.name: sharding.TensorSpec(t.name, tuple(t.shape), numpy_dtype(t.dtype).name)
                      for t in smap.tensors}
        self.optimizer = OptimizerConfig.from_proto(smap.optimizer)
        self.slices = [sharding.Slice(s.tensor, s.offset, s.length, s.shard) for s in smap.slices]
        #: sparse tables: name -> ps.v1.TableSpec (every shard holds the rows row_shards gives it)
        self.tables = {t.name: t for t in smap.tables}
        self.version = 0
        #: pushes the servers acknowledged through this handle
        self.pushes = 0
        #: gradient chunks the servers skipped as already applied. A retry after a lost reply
        #: makes these by design; on a first attempt one means a push was taken for a retry
        #: (logged as a warning): an update was lost
        self.duplicates = 0
        #: bsp steps this handle's apply_accumulated was answered about (the latest few), each True once
        #: counted: a step counts once per handle however often a member asks about it (a member watching the
        #: servers asks until every shard has closed it), and what its own answered calls applied are no retries
        self._steps_seen: dict[int, bool] = {}
        self._push_lock = client.push_lock(self.name)
        #: local calls' requests and where their ranges lie in the segment, by (shard, tensors, push, pull)
        self._plans: dict[tuple, tuple] = {}
        #: bytes of a shard's slices of some tensors, and their chunks, by (shard, tensors)
        self._sizes: dict[tuple, int] = {}
        self._chunk_lists: dict[tuple, tuple] = {}

    def __repr__(self) -> str:
        return f"Model({self.name!r}, tensors={len(self.specs)}, shards={len(self.shards)})"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.specs.items()}

    def _on_shards(self, fn: Callable[[int], object], names: Iterable[str] | None = None) -> list:
        """fn(shard) in parallel for every shard holding a slice of ``names`` (all tensors: None);
        their results in shard order."""
        wanted = None if names is None else set(names)
        shards = sorted({s.shard for s in self.slices if wanted is None or s.tensor in wanted})
        return self.client.map(fn, [(i,) for i in shards])

    def _slices_of(self, shard: int, names: Iterable[str] | None = None) -> list[sharding.Slice]:
        wanted = None if names is None else set(names)
        return [s for s in self.slices if s.shard == shard and (wanted is None or s.tensor in wanted)]

    def _segment(self, shard: int):
        """This client's shared-memory segment for ``shard``'s slices of the model, and each slice's
        byte offset in it (created on first use, shared by the client's handles on the model)."""
        from ps import shm
        slices = tuple(self._slices_of(shard))
        key = (self.name, shard, slices)
        with self.client._lock:
            found = self.client._segments.get(key)
        if found is not None and not found[0].closed:
            return found
        at, layout = 0, {}
        for s in slices:
            item = self.specs[s.tensor].itemsize
            at = -(-at // 64) * 64  # each range cache-line aligned
            layout[s] = at
            at += s.length * item
        found = (shm.Segment(at), layout)
        with self.client._lock:
            self.client._segments[key] = found
        return found

    def _plan(self, shard: int, names: tuple[str, ...], push: bool, pull: bool):
        """What a local call on ``shard`` for ``names`` sends, built once: the request (its seq and
        grad_scale set per call), the segment and where each range lies in it, and the call's deadline."""
        key = (shard, names, push, pull)
        plan = self._plans.get(key)
        if plan is None or plan[1].closed:  # its segment was released (Client.release): a new one
            segment, layout = self._segment(shard)
            req = server_pb2.LocalPushPullRequest(model=self.name, client_id=self.client.client_id,
                                                  segment=segment.name, pull=pull, only_pull=not push)
            ranges = []
            for s in self._slices_of(shard, names):
                dtype = np.dtype(self.specs[s.tensor].dtype)
                req.ranges.add(tensor=s.tensor, offset=s.offset, length=s.length, at=layout[s], dtype=dtype_code(dtype))
                # where, not views: a view kept would stop the segment from being unmapped at close
                ranges.append((s.tensor, s.offset, s.offset + s.length, dtype, layout[s]))
            plan = self._plans[key] = (req, segment, ranges, self._stream_timeout(dict.fromkeys(names)))
        return plan

    def _local(self, stub, shard: int, flat: dict[str, np.ndarray] | None, seq: int, scale: float,
               out: dict[str, np.ndarray] | None):
        """push (and with ``out``, pull) ``shard``'s part through shared memory, or with ``flat`` None
        only pull ``out``'s tensors; None when its server cannot open the segment (another host): the
        caller streams over gRPC, now and from then on. Returns (duplicate ranges, version)."""
        from ps import shm
        address = self.shards[shard]
        req, segment, ranges, timeout = self._plan(shard, tuple(out if flat is None else flat), flat is not None,
                                                   out is not None)
        if flat is not None:
            for tensor, a, b, dtype, at in ranges:
                np.copyto(segment.array(dtype, at, b - a), flat[tensor][a:b])
            req.seq, req.grad_scale = seq, scale
        try:
            resp = self.client._call_local(address, stub, req, timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and (e.details() or "").startswith(shm.UNREACHABLE):
                with self.client._lock:
                    self.client._remote.add(address)
                log.info("server %s cannot open this client's shared memory: gRPC from now on", address)
                return None
            raise
        if out is not None:
            flats = {k: v.reshape(-1) for k, v in out.items()}
            for tensor, a, b, dtype, at in ranges:
                np.copyto(flats[tensor][a:b], segment.array(dtype, at, b - a))
        return resp.duplicates, resp.version

    def _fits_batch(self, shard: int, names) -> bool:
        """Whether ``shard``'s slices of ``names`` are small enough to push in one unary PushBatch."""
        key = (shard, tuple(names))
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = sum(s.length * self.specs[s.tensor].itemsize
                                          for s in self._slices_of(shard, key[1]))
        return size <= self.client.batch_bytes

    def _batched(self, stub, shard: int, flat: dict[str, np.ndarray], seq: int, scale: float,
                 out: dict[str, np.ndarray] | None) -> tuple[int, int]:
        """push (and with ``out``, pull) ``shard``'s part in one PushBatch call; (duplicate chunks, version)."""
        pushes = list(self._push_requests(shard, flat, seq, scale))
        resp = stub.PushBatch(wire.encode_push_batch(pushes, out is not None), timeout=self._stream_timeout(flat))
        if out is None:
            return resp.duplicates, 0
        version, _ = self._receive(resp.chunks, out)
        return resp.duplicates, version

    def _goes_local(self, shard: int) -> bool:
        return self.client.local and self.shards[shard] not in self.client._remote

    def _chunks(self, shard: int, names=None) -> tuple[tuple[str, int, int, int], ...]:
        """(tensor, offset, length, dtype code) of each chunk of ``shard``'s slices of ``names`` (all
        tensors: None), in order; worked out once per handle, as the layout never changes."""
        key = (shard, None if names is None else tuple(names))
        found = self._chunk_lists.get(key)
        if found is None:
            found = self._chunk_lists[key] = tuple(
                (s.tensor, o, n, dtype_code(self.specs[s.tensor].dtype)) for s in self._slices_of(shard, names)
                for o, n in sharding.chunks(s.offset, s.length, self.specs[s.tensor].itemsize, self.client.chunk_bytes))
        return found

    def _create_on(self, shard: int, inits: Mapping[str, Init], replace: bool) -> None:
        req = server_pb2.CreateModelRequest(model=self.name, replace=replace, optimizer=self.optimizer.to_proto(),
                                            tables=list(self.tables.values()))
        for s in self._slices_of(shard):
            spec = self.specs[s.tensor]
            init = inits.get(s.tensor)
            msg = req.slices.add(tensor=s.tensor, shape=list(spec.shape), dtype=dtype_code(spec.dtype),
                                 offset=s.offset, length=s.length)
            if init is not None:
                msg.init.CopyFrom(init.to_proto())
        address = self.shards[shard]
        self.client.call(self.client.server(address).CreateModel, req, f"create model '{self.name}'", address)

    # -- sparse tables -----------------------------------------------------------------------
    def _rows_per_message(self, table: str, what: str) -> tuple[server_pb2.TableSpec, int]:
        t = self.tables.get(table)
        if t is None:
            raise NotFound(f"{what}: model '{self.name}' has no sparse table '{table}' (its tables: "
                           f"{', '.join(sorted(self.tables)) or 'none'})")
        itemsize = numpy_dtype(t.dtype).itemsize if t.dtype else 4
        return t, max(1, self.client.chunk_bytes // (t.width * itemsize))

    @staticmethod
    def _ids(ids, what: str) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or not (a.dtype.kind in "iu" or a.size == 0):
            raise InvalidArgument(f"{what}: ids must be a 1-D array of integers, got {a.dtype} of shape {a.shape}")
        if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
            raise InvalidArgument(f"{what}: id {int(a.max())} is outside the int64 range")
        return a.astype(np.int64, copy=False)

    def pull_rows(self, table: str, ids) -> np.ndarray:
        """The rows of ``ids`` (int64; repeats allowed) of sparse table ``table``: (len(ids), width),
        in the order asked. A row never pushed reads as its initial row."""
        from ps import sparse
        what = f"pull rows of '{self.name}/{table}'"
        t, per_message = self._rows_per_message(table, what)
        ids = self._ids(ids, what)
        out = np.empty((len(ids), t.width), numpy_dtype(t.dtype) if t.dtype else np.float32)
        groups = sharding.split_rows(ids, len(self.shards))

        def one(shard):
            pos = groups[shard]
            stub = self.client.server(self.shards[shard])
            for start in range(0, len(pos), per_message):
                part = pos[start:start + per_message]
                resp = self.client.call(stub.PullRows, server_pb2.PullRowsRequest(
                    model=self.name, table=table, ids=sparse.encode_ids(ids[part])), what, self.shards[shard])
                out[part] = np.frombuffer(resp.rows.data, out.dtype).reshape(len(part), t.width)
        self.client.map(one, [(i,) for i in range(len(self.shards)) if len(groups[i])])
        return out

    def push_rows(self, table: str, ids, grads, grad_scale: float = 1.0) -> int:
        """Push row gradients ``grads`` (len(ids), width) for ``ids`` of sparse table ``table``; the
        gradients of a repeated id are summed, then the optimizer updates each row once. Exactly once,
        like dense pushes (each message carries this client's next seq). Returns messages applied."""
        from ps import sparse
        what = f"push rows to '{self.name}/{table}'"
        t, per_message = self._rows_per_message(table, what)
        ids = self._ids(ids, what)
        g = np.asarray(grads)
        if g.shape != (len(ids), t.width):
            raise InvalidArgument(f"{what}: gradients of shape {list(g.shape)}, expected [{len(ids)}, {t.width}] "
                                  f"(one row of the table's width per id)")
        g = to_little_endian(np.ascontiguousarray(g, numpy_dtype(t.dtype) if t.dtype else np.float32))
        groups = sharding.split_rows(ids, len(self.shards))
        with self._push_lock:  # this client's seqs reach each table in order
            batches = {shard: [(pos[start:start + per_message], self.client.next_seq())
                               for start in range(0, len(pos), per_message)]
                       for shard, pos in enumerate(groups) if len(pos)}

            def one(shard):
                stub, applied = self.client.server(self.shards[shard]), 0
                for part, seq in batches[shard]:
                    rows = g[part]
                    resp = self.client.call(stub.PushRows, server_pb2.PushRowsRequest(
                        model=self.name, table=table, client_id=self.client.client_id, seq=seq,
                        ids=sparse.encode_ids(ids[part]), grad_scale=grad_scale,
                        grads=tensor_pb2.Tensor(dtype=dtype_code(rows.dtype), shape=list(rows.shape),
                                                data=rows.tobytes())), what, self.shards[shard])
                    applied += resp.applied
                return applied
            return sum(self.client.map(one, [(shard,) for shard in batches]))

    def _restore(self, loaded: tuple) -> None:
        """Install a checkpoint's slices on the primaries (before they have backups)."""
        from ps import checkpoint
        _, arrays, slices = loaded
        per_shard = checkpoint.snapshots_for(self.slices, self.specs, arrays, slices)

        def one(shard):
            address = self.shards[shard]
            batch, size = [], 0
            for snap in per_shard[shard] + [None]:
                n = snap.ByteSize() if snap is not None else 0
                if batch and (snap is None or size + n > self.client.chunk_bytes * 4):
                    self.client.call(self.client.server(address).Replicate, server_pb2.ReplicateRequest(
                        model=self.name, optimizer=self.optimizer.to_proto(),
                        ops=[server_pb2.ReplicaOp(install=x) for x in batch]), f"restore '{self.name}'", address)
                    batch, size = [], 0
                if snap is not None:
                    batch.append(snap)
                    size += n
        self.client.map(one, [(i,) for i in per_shard])

    def _replicate_on(self, shard: int) -> None:
        """Have shard's primary send its slices to the shard's backups and keep them in step."""
        address = self.shards[shard]
        req = server_pb2.SetReplicasRequest(model=self.name, backups=self.replicas[shard][1:],
                                            map_version=self.map_version,
                                            ranges=[server_pb2.Range(tensor=s.tensor, offset=s.offset, length=s.length)
                                                    for s in self._slices_of(shard)])
        self.client.call(self.client.server(address).SetReplicas, req, f"replicate model '{self.name}'", address)

    def _flat(self, arrays: Mapping[str, np.ndarray], what: str, finite: bool) -> dict[str, np.ndarray]:
        """Validate against the model's tensors; return flat little-endian arrays in each param's dtype."""
        out = {}
        for tname, a in arrays.items():
            spec = self.specs.get(tname)
            if spec is None:
                raise InvalidArgument(f"{what} model '{self.name}': unknown tensor '{tname}' "
                                      f"(it has {', '.join(self.specs)})")
            a = np.asarray(a)
            if a.shape != spec.shape:
                raise InvalidArgument(f"{what} '{self.name}/{tname}': expected shape {list(spec.shape)}, "
                                      f"got {list(a.shape)}")
            a = to_little_endian(a.astype(spec.dtype, copy=False)).reshape(-1)
            bad = count_nonfinite(a) if finite else 0
            if bad:
                raise InvalidArgument(f"{what} '{self.name}/{tname}': {bad} non-finite value(s)")
            out[tname] = a
        return out

    def _stream(self, shard: int, what: str, run: Callable[[wire.ShardStub], object]):
        """Run one shard's stream; returns (run's result, the attempt that gave it).

        A shard that is unreachable, or that says it is no longer the primary of (or no longer holds)
        the slices, is failing over: the shard map is fetched again and the stream retried on the
        shard's new primary, for up to ``Client.failover_timeout`` (pushes carry client id and seq, so
        a retried push lands once)."""
        deadline = None
        attempt = 0
        while True:
            address = self.shards[shard]
            try:
                result = run(self.client.server(address))
                if attempt:
                    with self.client._lock:
                        self.failovers += attempt
                        self.most_retries = max(self.most_retries, attempt)
                return result, attempt
            except grpc.RpcError as e:
                code = e.code()
                now = time.monotonic()
                if deadline is None:
                    first = now
                    deadline = now + self.failover_timeout
                    if code != grpc.StatusCode.UNAVAILABLE:  # a live server that does not hold the slices:
                        deadline = now + min(self.failover_timeout, STALE_MAP_WAIT_S)  # a map moving on
                if code not in FAILOVER_CODES or now > deadline:
                    err = from_rpc_error(e, address, f"{what} model '{self.name}'")
                    if code in FAILOVER_CODES and attempt:
                        err = type(err)(f"{err} (gave up after {attempt} retries over {now - first:.1f} s "
                                        f"of failover)")
                    raise err from None
                attempt += 1
                if isinstance(e, local_link.LinkBroken):
                    continue  # the server is not in question, only its local link: retried over gRPC at once
                self._await_move(shard, address, code == grpc.StatusCode.UNAVAILABLE, deadline)

    def _await_move(self, shard: int, address: str, unreachable: bool, deadline: float) -> None:
        """Poll the shard map until shard's primary is no longer ``address`` (the scheduler promoted
        another replica), so the retry goes where the slices are now. An unreachable server is
        tried again after at most a second anyway (a blip, not a death); the deadline ends it."""
        start = time.monotonic()
        pause = 0.02
        while True:
            self.refresh()
            if self.shards[shard] != address:
                return
            now = time.monotonic()
            if now > deadline or (unreachable and now - start >= 1.0):
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def refresh(self) -> bool:
        """Fetch the shard map again; True when it moved on (primaries or replicas changed)."""
        try:
            smap = self.client.call(self.client.scheduler.GetShardMap,
                                    scheduler_pb2.GetShardMapRequest(model=self.name), f"get shard map of '{self.name}'")
        except (Unavailable, DeadlineExceeded):
            return False
        if smap.version == self.map_version:
            return False
        self._adopt(smap)
        return True

    def _adopt(self, smap: scheduler_pb2.ShardMap) -> None:
        self.shards = list(smap.servers)
        self.replicas = [list(r.servers) for r in smap.replicas] or [[a] for a in smap.servers]
        self.map_version = smap.version

    def _push_requests(self, shard: int, flat: dict[str, np.ndarray], seq: int, scale: float,
                       credits: _Credits | None = None):
        cid = self.client.client_id
        for tensor, o, n, dtype in self._chunks(shard, flat):
            if credits is not None and not credits.take():
                return
            yield wire.encode_push(self.name, cid, seq, scale, tensor, o, dtype, flat[tensor][o:o + n])

    def _next_seq(self, grads: Mapping[str, np.ndarray], what: str) -> tuple[dict[str, np.ndarray], int, float]:
        flat = self._flat(grads, what, finite=True)
        scale = 1.0
        if self.optimizer.clip_norm:
            scale = clip_norm_scale(flat.values(), self.optimizer.clip_norm)
        return flat, self.client.next_seq(), scale

    def _acknowledged(self, seq: int, results: list[tuple[int, int]], what: str, shared_seq: bool = False) -> None:
        """Count a push every shard acknowledged; ``results``: (duplicate chunks, attempt) per shard.
        ``shared_seq``: other processes may send under this id too (a bsp step's leaders), so a
        duplicate on a first attempt is one of them having applied it, not a lost update."""
        self.pushes += 1
        dup = sum(d for d, _ in results)
        self.duplicates += dup
        first = sum(d for d, attempt in results if attempt == 0)
        if first and not shared_seq:
            log.warning("%s model '%s': the servers took %d chunk(s) of push %d (client %s) for retries of an "
                        "earlier push and did not apply them", what, self.name, first, seq, self.client.client_id)

    def push(self, grads: Mapping[str, np.ndarray], seq: int | None = None) -> None:
        """Apply gradients on the servers (asynchronously with respect to other clients).

        ``seq``: this push's id for the servers' exactly-once check instead of the client's next one
        (with the client's id, an update any process sends under that id and seq is applied once:
        a bsp step's leader uses the step's number, so another that takes the step over cannot apply it
        twice). Ids must grow from push to push."""
        if seq is not None:
            self._check_seq(seq, "push to")
        with self._push_lock:
            flat, next_seq, scale = self._next_seq(grads, "push to")
            if seq is None:
                seq = next_seq

            def one(stub, shard):
                if self._goes_local(shard):
                    done = self._local(stub, shard, flat, seq, scale, None)
                    if done is not None:
                        return done[0]
                if self._fits_batch(shard, flat):
                    return self._batched(stub, shard, flat, seq, scale, None)[0]
                # one acknowledgement per chunk: at most inflight_chunks ahead of the shard's replies
                credits = _Credits(self.client.inflight_chunks)
                try:
                    dup = 0
                    for ack in stub.PushAcked(self._push_requests(shard, flat, seq, scale, credits),
                                              timeout=self._stream_timeout(flat)):
                        dup += ack.duplicate
                        credits.give()
                    return dup
                finally:
                    credits.close()

            results = self._on_shards(lambda shard: self._stream(shard, "push to", lambda stub: one(stub, shard)), flat)
            self._acknowledged(seq, results, "push to")

    def _check_seq(self, seq, what: str) -> None:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 < seq < 1 << 64:
            raise InvalidArgument(f"{what} '{self.name}': seq must be an integer in [1, 2**64), got {seq!r}")

    def apply_accumulated(self, accumulator: str, contributors: int, seq: int, *, members: int = 0,
                          wait_s: float = 0.0, member: str | None = None) -> bool:
        """bsp: apply the mean of the gradients summed in the model ``accumulator`` (created like this one
        with ``ps.spec.ACCUMULATOR_OPTIMIZER``; members push negated gradients to it, tagged with ``seq``:
        the mean is over those, or over ``contributors`` when none is tagged) and zero it. Each
        shard does it in place from one small call: nothing but the call crosses the network. Applied
        once per (this client, ``seq``), as ``push`` with a seq is; a step closed already is not applied
        again, nor is one whose accumulator took no gradient since the last (a zero step would still move
        momentum).

        ``members`` (every member of the step calls this after pushing its gradient): a shard applies a
        slice once that many gradients tagged with ``seq`` are summed there, and the call waits up to
        ``wait_s`` for the whole step to close (holding this client's pushes to the model meanwhile: a
        member calls from a client of its own). Returns whether it did (every shard's part is applied).

        Counts as one push of this handle when the call of ``member`` (default: this client's id) is the
        one that applied the step on the model's first slice: of all the calls for a step, exactly one
        (and a retry of it whose first try's reply was lost). A step is counted once per handle, and asked
        about again (a call that found other shards not yet closed, asked once more) the ranges its own
        answered calls applied are not duplicates. A server too busy to hold the call (``busy``: as many
        calls as it lets wait already do) answers at once; the call asks again until ``wait_s`` is over."""
        what = "apply accumulated to"
        self._check_seq(seq, what)
        for name, v, least in (("contributors", contributors, 1), ("members", members, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
                raise InvalidArgument(f"{what} '{self.name}': {name} must be an integer >= {least}, got {v!r}")
        if not 0 <= wait_s <= MAX_STEP_WAIT_S:  # NaN too
            raise InvalidArgument(f"{what} '{self.name}': wait_s must be in [0, {MAX_STEP_WAIT_S:g}] seconds, "
                                  f"got {wait_s}")
        member = self.client.client_id if member is None else member
        first = min(self.slices, key=lambda s: (s.shard, s.tensor, s.offset)) if self.slices else None
        deadline = time.monotonic() + wait_s
        pause = BUSY_PAUSE_S

        def one(stub, shard, wait_s):
            ranges = [server_pb2.Range(tensor=s.tensor, offset=s.offset, length=s.length)
                      for s in sorted(self._slices_of(shard), key=lambda s: (s.tensor, s.offset))]
            req = server_pb2.ApplyAccumulatedRequest(model=self.name, accumulator=accumulator,
                                                     contributors=int(contributors), client_id=self.client.client_id,
                                                     seq=int(seq), ranges=ranges, members=int(members),
                                                     wait_s=float(wait_s), member=member)
            # on this host over the server's link once it named one (a bsp step's one call: its latency counts)
            resp = self.client._call_linked(self.shards[shard], stub.ApplyAccumulated, req,
                                            server_pb2.ApplyAccumulatedResponse, self.client.timeout + wait_s,
                                            local_link.APPLY, long=members > 0 and wait_s > 0)
            versions.append(resp.version)
            closed.append(resp.closed)
            busy.append(resp.busy)
            if first is not None and shard == first.shard:
                closer.append(resp.closer)
            return resp.duplicates

        with self._push_lock:
            while True:
                versions, closed, closer, busy = [], [], [], []  # this round's answers (``one`` fills them)
                left = max(0.0, deadline - time.monotonic())
                results = self._on_shards(lambda shard: self._stream(shard, what, lambda stub: one(stub, shard, left)))
                self.version = min(versions, default=self.version)
                seen = self._steps_seen.get(seq)
                if seen is None:  # ranges this member's own earlier call applied: that call's reply was lost
                    self.duplicates += sum(d for d, _ in results)
                if any(closer) and not seen:
                    self.pushes += 1
                self._steps_seen[seq] = bool(seen) or any(closer)
                if len(self._steps_seen) > STEPS_REMEMBERED:
                    del self._steps_seen[next(iter(self._steps_seen))]
                # a server whose waiting calls were all taken answered at once: ask again until wait_s is over
                if all(closed) or not any(busy) or time.monotonic() + pause >= deadline:
                    return all(closed)
                time.sleep(pause)
                pause = min(2 * pause, MAX_BUSY_PAUSE_S)

    def _out(self, names: Iterable[str], out: Mapping[str, np.ndarray] | None, what: str) -> dict[str, np.ndarray]:
        """Arrays to receive the weights of ``names``: fresh ones, or the caller's ``out`` after checking
        each is there, of the tensor's shape and dtype, C-contiguous and writable."""
        if out is None:
            return {k: np.empty(self.specs[k].shape, self.specs[k].dtype) for k in names}
        names = list(names)
        missing = [k for k in names if k not in out]
        if missing:
            raise InvalidArgument(f"{what} '{self.name}': out has no array for {', '.join(missing)}")
        for k in names:
            a, spec = out[k], self.specs[k]
            if not isinstance(a, np.ndarray):
                got = type(a).__name__
            elif a.shape != spec.shape or a.dtype != spec.dtype or not a.flags.c_contiguous or not a.flags.writeable:
                got = (f"{a.dtype}{list(a.shape)}" + ("" if a.flags.c_contiguous else ", not C-contiguous")
                       + ("" if a.flags.writeable else ", read-only"))
            else:
                continue
            raise InvalidArgument(f"{what} '{self.name}': out['{k}'] must be a writable C-contiguous "
                                  f"{spec.dtype}{list(spec.shape)} array, got {got}")
        return {k: out[k] for k in names}

    def push_pull(self, grads: Mapping[str, np.ndarray],
                  out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Apply gradients, and get back the fresh weights of the same tensors, in one round trip.

        ``out``: arrays to write the weights into (one per pushed tensor, as ``pull`` returns them)
        instead of fresh ones; reusing them spares the page faults of new memory every step."""
        with self._push_lock:
            flat, seq, scale = self._next_seq(grads, "push_pull to")
            out = self._out(flat, out, "push_pull to")
            versions = []

            def one(stub, shard):
                if self._goes_local(shard):
                    done = self._local(stub, shard, flat, seq, scale, out)
                    if done is not None:
                        versions.append(done[1])
                        return done[0]
                if self._fits_batch(shard, flat):
                    dup, version = self._batched(stub, shard, flat, seq, scale, out)
                    versions.append(version)
                    return dup
                credits = _Credits(self.client.inflight_chunks)
                try:
                    responses = stub.PushPull(self._push_requests(shard, flat, seq, scale, credits),
                                              timeout=self._stream_timeout(flat))
                    version, dup = self._receive(responses, out, credits)
                finally:
                    credits.close()
                versions.append(version)
                return dup

            results = self._on_shards(lambda shard: self._stream(shard, "push_pull to",
                                                                 lambda stub: one(stub, shard)), flat)
            self._acknowledged(seq, results, "push_pull to")
            self.version = min(versions, default=self.version)
            return out

    def pull(self, names: Iterable[str] | None = None,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Fresh weights of every tensor (or of ``names``), reassembled from all shards (into ``out``'s
        arrays when given, as for push_pull)."""
        names = list(self.specs) if names is None else list(names)
        for n in names:
            if n not in self.specs:
                raise InvalidArgument(f"pull from model '{self.name}': unknown tensor '{n}' "
                                      f"(it has {', '.join(self.specs)})")
        out = self._out(names, out, "pull from")
        versions = []

        def one(shard):
            if self._goes_local(shard):
                def local(stub):
                    done = self._local(stub, shard, None, 0, 1.0, out)
                    if done is not None:
                        versions.append(done[1])
                    return done
                if self._stream(shard, "pull from", local)[0] is not None:
                    return
            req = server_pb2.PullRequest(model=self.name, max_chunk_bytes=self.client.chunk_bytes,
                                         ranges=[server_pb2.Range(tensor=s.tensor, offset=s.offset,
                                                                  length=s.length)
                                                 for s in self._slices_of(shard, names)])
            self._stream(shard, "pull from", lambda stub: versions.append(
                self._receive(stub.Pull(req, timeout=self._stream_timeout(out)), out)[0]))
        self._on_shards(one, names)
        self.version = min(versions, default=self.version)
        return out

    def _receive(self, responses, out: dict[str, np.ndarray], credits: _Credits | None = None) -> tuple[int, int]:
        """Copy streamed chunks into ``out``; return the lowest slice version seen and how many
        chunks were marked duplicate (push_pull: pushed chunks the shard had already applied)."""
        version = None
        duplicates = 0
        flats = {k: v.reshape(-1) for k, v in out.items()}
        for resp in responses:
            c = resp.chunk
            dst = flats[c.tensor]
            data = np.frombuffer(c.values.data, dtype=dst.dtype)
            dst[c.offset:c.offset + data.size] = data
            version = resp.version if version is None else min(version, resp.version)
            duplicates += resp.duplicate
            if credits is not None:
                credits.give()
        return version or 0, duplicates

    def assign(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite parameter values (optimizer state is kept)."""
        flat = self._flat(values, "assign to", finite=True)

        def requests(shard):
            for tensor, o, n, dtype in self._chunks(shard, flat):
                yield server_pb2.AssignRequest(model=self.name, chunk=tensor_pb2.Chunk(
                    tensor=tensor, offset=o,
                    values=tensor_pb2.Tensor(dtype=dtype, shape=[n], data=flat[tensor][o:o + n].tobytes())))

        self._on_shards(lambda shard: self._stream(shard, "assign to", lambda stub: stub.Assign(
            requests(shard), timeout=self._stream_timeout(flat))), flat)

    def stats(self) -> list[server_pb2.ModelStats]:
        """This model's statistics on each shard."""
        out = []
        for address in self.shards:
            out.extend(m for m in self.client.stats(address).models if m.model == self.name)
        return out

    def delete(self) -> None:
        """Free the model on every server and forget its shard map."""
        errors = []

        def one(address):
            try:
                self.client.call(self.client.server(address).DeleteModel,
                                 server_pb2.DeleteModelRequest(model=self.name), f"delete model '{self.name}'",
                                 address)
            except Unavailable as e:
                errors.append(e)
        self.client.map(one, [(a,) for a in sorted({a for r in self.replicas for a in r if a})])
        self.client.call(self.client.scheduler.DropModel, scheduler_pb2.DropModelRequest(model=self.name),
                         f"drop model '{self.name}'")
        self.client.release(self.name)
        if errors:
            raise errors[0]

    def _stream_timeout(self, arrays: Mapping[str, np.ndarray]) -> float:
        """A deadline that grows with the bytes moved (at no less than 50 MB/s)."""
        nbytes = sum(self.specs[k].nbytes for k in arrays)
        return self.client.timeout + nbytes / 50e6


class JobFailed(PSError):
    """The job ended in state failed; the message is the job's error."""


class JobCancelled(PSError):
    """The job was cancelled."""


def _metrics(m: scheduler_pb2.JobMetrics) -> dict:
    return {"epoch": m.epoch, "steps": m.steps, "samples": m.samples, "train_loss": m.train_loss,
            "test_loss": m.test_loss, "test_accuracy": m.test_accuracy, "samples_per_s": m.samples_per_s,
            "seconds": m.seconds, "duplicates": m.duplicates}


def _progress_line(m: scheduler_pb2.JobMetrics) -> str:
    parts = [f"epoch {m.epoch}"]
    if np.isfinite(m.train_loss):
        parts.append(f"loss {m.train_loss:.4f}")
    if np.isfinite(m.test_accuracy):
        parts.append(f"test acc {m.test_accuracy:.4f}")
    if m.samples_per_s:
        parts.append(f"{m.samples_per_s:.0f} samples/s")
    return " ".join(parts)


#: how long Job.events / Job.wait keep trying to reach a scheduler that went away mid-follow
RECONNECT_S = 60.0


class Job:
    """A handle on a submitted training job."""

    def __init__(self, client: Client, info: scheduler_pb2.JobInfo):
        self.client = client
        self.job_id = info.job_id
        self._info = info

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, state={self._info.state!r})"

    @property
    def summary(self) -> scheduler_pb2.JobInfo:
        """The job's record as last fetched (from ``Client.jobs``: without spec and preprocessing)."""
        return self._info

    def info(self) -> scheduler_pb2.JobInfo:
        self._info = self.client.call(self.client.scheduler.GetJob, scheduler_pb2.GetJobRequest(job_id=self.job_id),
                                      f"get job '{self.job_id}'")
        return self._info

    def status(self) -> str:
        """queued | starting | running | succeeded | failed | cancelled"""
        return self.info().state

    def metrics(self) -> dict:
        return _metrics(self.info().metrics)

    def checkpoint(self, url: str = "", full: bool = False):
        """Write a checkpoint of the job now (to ``url``, or under its checkpoint dir); returns its URL
        (``full``: the whole CheckpointJobResponse: url, bytes, epoch)."""
        resp = self.client.call(self.client.scheduler.CheckpointJob,
                                scheduler_pb2.CheckpointJobRequest(job_id=self.job_id, url=url),
                                f"checkpoint job '{self.job_id}'", timeout=max(self.client.timeout, 120))
        return resp if full else resp.url

    def cancel(self) -> None:
        self._info = self.client.call(self.client.scheduler.CancelJob,
                                      scheduler_pb2.CancelJobRequest(job_id=self.job_id), f"cancel job '{self.job_id}'")

    def events(self, timeout: float | None = None,
               reconnect_s: float = RECONNECT_S) -> Iterator[scheduler_pb2.JobEvent]:
        """Progress events as they happen, until the job ends. A scheduler that goes away (it
        restarts, and resumes from its state) is followed again from the last event seen, for up to
        ``reconnect_s`` seconds of absence; then Unavailable says that it was lost."""
        what = f"watch job '{self.job_id}'"
        end = None if timeout is None else time.monotonic() + timeout
        after, state, lost_since, delay = 0, "", None, 0.1
        while True:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"{what} on {self.client.address}: the job did not end in {timeout:g} s")
            why = "the stream ended before the job did"  # the scheduler is shutting down
            try:
                for ev in self.client.scheduler.WatchJob(scheduler_pb2.WatchJobRequest(job_id=self.job_id,
                                                                                       after=after), timeout=left):
                    after, state, lost_since, delay = ev.seq, ev.state, None, 0.1
                    yield ev
                if state in ("succeeded", "failed", "cancelled"):
                    return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(e, self.client.address, what) from None
                why = e.details()
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                log.warning("lost the scheduler at %s while following %s (%s): reconnecting for up to %g s",
                            self.client.address, self.job_id, why, reconnect_s)
            if now - lost_since >= reconnect_s:
                raise Unavailable(f"{what} on {self.client.address}: lost the scheduler ({why}): not back after "
                                  f"{reconnect_s:g} s")
            time.sleep(min(delay, reconnect_s - (now - lost_since)))
            delay = min(2 * delay, 1.0)

    def wait(self, progress: bool = True, timeout: float | None = None, logdir: str | None = None,
             reconnect_s: float = RECONNECT_S):
        """Follow the job to its end, drawing a progress bar; return the trained model
        (``ps.TrainedModel``). Raises JobFailed / JobCancelled; Unavailable when the scheduler went
        away for longer than ``reconnect_s`` (see ``events``)."""
        from tqdm import tqdm
        writer = None
        if logdir:
            from ps.tblog import EventWriter
            writer = EventWriter(logdir, self.job_id)
        # On a terminal a bar redrawn in place; in a file or pipe, where every redraw would be a
        # new line, one line per epoch instead.
        lines = progress and not sys.stderr.isatty()
        bar = tqdm(total=0, unit="task", desc=self.job_id, disable=not progress or lines, dynamic_ncols=True,
                   mininterval=0.5)
        try:
            for ev in self.events(timeout, reconnect_s):
                m = ev.metrics
                if ev.kind == "warning" or (lines and ev.kind == "epoch"):
                    text = ev.message if ev.kind == "warning" else f"{ev.message}; {_progress_line(m)}"
                    if lines:
                        print(f"{self.job_id}: {text}", file=sys.stderr, flush=True)
                    else:
                        bar.write(f"{self.job_id}: {text}", file=sys.stderr)
                bar.total = ev.tasks_total
                bar.n = ev.tasks_done
                bar.set_postfix_str(_progress_line(m), refresh=True)
                if writer is not None and ev.kind == "epoch":
                    writer.scalars(m.epoch, {"train/loss": m.train_loss, "test/loss": m.test_loss,
                                             "test/accuracy": m.test_accuracy,
                                             "train/samples_per_s": m.samples_per_s})
                    writer.staleness(m.epoch, {"staleness/updates": m.staleness_updates,
                                               "staleness/clocks": m.staleness_clocks})
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        info = self.info()
        if info.state == "failed":
            raise JobFailed(f"job {self.job_id} failed: {info.error}")
        if info.state == "cancelled":
            raise JobCancelled(f"job {self.job_id} was cancelled")
        return self.model()

    def weights(self) -> dict[str, np.ndarray]:
        """The job's current parameters, relayed by the scheduler from the servers (so only the
        scheduler need be reachable)."""
        smap = self.client.call(self.client.scheduler.GetShardMap,
                                scheduler_pb2.GetShardMapRequest(model=self.job_id), f"get shard map of '{self.job_id}'")
        model = Model(self.client, smap)
        out = {k: np.empty(v.shape, v.dtype) for k, v in model.specs.items()}
        try:
            model._receive(self.client.scheduler.FetchWeights(
                scheduler_pb2.FetchWeightsRequest(model=self.job_id, max_chunk_bytes=self.client.chunk_bytes),
                timeout=model._stream_timeout(out)), out)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.client.address, f"fetch weights of '{self.job_id}'") from None
        return out

    def model(self):
        """The trained model (weights, spec, preprocessing, metrics), runnable locally."""
        import json

        from ps.trained import TrainedModel
        info = self.info()
        return TrainedModel(json.loads(info.spec_json), json.loads(info.prep_json), self.weights(),
                            _metrics(info.metrics), self.job_id)

    def save(self, path: str) -> str:
        """Save weights (safetensors) and spec (JSON) to the directory ``path``."""
        return str(self.model().save(path))


def _spec_json(spec) -> str:
    from ps.spec import JobSpec, SpecError
    try:
        if isinstance(spec, str):
            return JobSpec.from_json(spec).to_json()
        if isinstance(spec, dict):
            return JobSpec.from_dict(spec).to_json()
        spec.check()
        return spec.to_json()
    except SpecError as e:
        raise InvalidArgument(str(e)) from None
