"""The scheduler's durable state: jobs, tasks, leases, events, members, shard maps and id
counters in one SQLite file under the state dir (``paramserver scheduler --state-dir`` /
``PS_STATE_DIR``), so a restarted scheduler (kill -9 included) resumes where it was.

What is written, and when: the state machines (``Jobs``, ``Cluster``) mark what they change;
``StateStore.save`` writes just that, in one transaction, and the service saves before it answers
every call whose effect must survive (submit, cancel, delete, a lease, an accepted result, a plan
or drop of a model, a registration). Heartbeats and lease extensions are not written: on load
every member's last heartbeat and every lease's expiry is set to now (monotonic clocks do not
survive a restart), so each gets its full timeout again.

Durability: WAL journal, ``synchronous=NORMAL``. A commit is in the operating system's page cache
before the call that made it answers, so a killed scheduler (kill -9, OOM, a crash) loses nothing
it acknowledged; only a crash of the machine itself (power loss, kernel panic) can take back the
last commits. FULL would fsync every commit: measured on the project's CI VM (virtio disk,
SQLite 3.40, a commit of two small rows), NORMAL took 60-90 us a commit and FULL 280-450 us,
and leases and results are written from the event loop, so NORMAL it is.

Layout: a job's row holds its scalar fields, metrics and counters (rewritten when it changes);
its spec, preprocessing and parameter specs are a second column, written when they change; its
tasks and its (bounded) events are rows of their own, so a lease writes one task row and one job
row, whatever the number of tasks and events the job has. Everything is JSON (no pickle); a shard
map's optimizer, a ps.v1.OptimizerConfig, is its serialized bytes in base64.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from ps import sharding
from ps.errors import Unavailable
from ps.scheduler.clocks import STEPS_PER_INCARNATION
from ps.scheduler.cluster import Cluster, Server, ShardMap, Worker
from ps.scheduler.jobs import Event, Job, Jobs, Task

log = logging.getLogger("ps.scheduler.state")

SCHEMA = 1
FILE = "state.db"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks (job_id);
CREATE TABLE IF NOT EXISTS events (job_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
                                   PRIMARY KEY (job_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS servers (server_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS maps (model TEXT PRIMARY KEY, body TEXT NOT NULL);
"""

#: a Job's fields that travel in its spec column (the rest, but tasks and events, in its body)
_SPEC_FIELDS = ("name", "spec_json", "prep", "params", "epochs", "shards", "lease_timeout", "submitted_at",
                "keep_params", "request_id", "owner")
#: Job fields that are not saved: rebuilt from the tasks on load, or per process
_DERIVED = ("tasks", "events", "pending_in", "undone_in", "max_events")
#: monotonic times, saved as wall-clock times
_MONOTONIC = ("started_at", "finished_at", "checkpointed_at")


class StateError(Unavailable):
    """The state dir cannot be used (locked by another scheduler, unreadable, not writable)."""


def default_dir() -> Path:
    """Where `paramserver scheduler` keeps its state unless told: the user's state dir
    (``~/.local/state/paramserver/scheduler`` on Linux)."""
    try:
        import platformdirs
        return Path(platformdirs.user_state_dir("paramserver")) / "scheduler"
    except ImportError:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return Path(base) / "paramserver" / "scheduler"


class StateStore:
    """The state in ``directory``/state.db. One scheduler at a time: the directory is locked
    (``flock`` on ``lock``) while it is open. One connection, shared by every thread under a lock."""

    def __init__(self, directory: str | os.PathLike, wall_clock=time.time):
        self.dir = Path(directory).expanduser()
        self._wall = wall_clock
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(self.dir / "lock", "a+")
        except OSError as e:
            raise StateError(f"scheduler state dir {self.dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lockfile.seek(0)
            holder = self._lockfile.read().strip() or "?"
            self._lockfile.close()
            raise StateError(f"scheduler state dir {self.dir} is in use by another scheduler (pid {holder}); "
                             f"stop it, or give this one another --state-dir") from None
        self._lockfile.seek(0)
        self._lockfile.truncate()
        self._lockfile.write(str(os.getpid()))
        self._lockfile.flush()
        path = self.dir / FILE
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_TABLES)
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.Error as e:
            self._lockfile.close()
            raise StateError(f"scheduler state {path}: {e}: move it away to start on an empty state") from None
        if int(meta.get("schema", SCHEMA)) > SCHEMA:
            raise StateError(f"scheduler state {path} was written by a newer paramserver (schema "
                             f"{meta['schema']}, this one reads {SCHEMA})")
        self.cluster_id = meta.get("cluster_id") or uuid.uuid4().hex
        self.incarnation = int(meta.get("incarnation", 0))
        self._servers: dict[str, tuple] = {}   # server id -> (address, state) as last written
        self._maps: dict[str, ShardMap] = {}    # model -> the map object last written

    def close(self) -> None:
        with self._lock:
            self.db.close()
            self._lockfile.close()

    # -- load ------------------------------------------------------------------------
    def load(self, jobs: Jobs, cluster: Cluster, now: float) -> None:
        """Start on this state: count the start (``incarnation``), and fill ``jobs`` and ``cluster``
        with what was saved (both empty before). Writes what the restart changed."""
        with self._lock:
            self.incarnation += 1
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
            offset = now - self._wall()  # wall -> monotonic
            loaded = [self._job(job_id, spec, body, offset, jobs.max_events)
                      for job_id, spec, body in self.db.execute("SELECT job_id, spec, body FROM jobs")]
            by_id = {j.job_id: j for j in loaded}
            for task_id, job_id, body in self.db.execute("SELECT task_id, job_id, body FROM tasks"):
                if job_id in by_id:
                    by_id[job_id].tasks[task_id] = Task(**json.loads(body))
            for job_id, body in self.db.execute("SELECT job_id, body FROM events ORDER BY job_id, seq"):
                if job_id in by_id:
                    by_id[job_id].events.append(Event(**json.loads(body)))
            servers = [Server(server_id=sid, last_seen=now, **json.loads(body))
                       for sid, body in self.db.execute("SELECT server_id, body FROM servers")]
            workers = [Worker(worker_id=wid, last_seen=now, **json.loads(body))
                       for wid, body in self.db.execute("SELECT worker_id, body FROM workers")]
            maps = [map_from_json(body) for (body,) in self.db.execute("SELECT body FROM maps")]
        loaded.sort(key=lambda j: int(j.job_id.split("-")[1]))
        cluster.cluster_id, cluster.incarnation = self.cluster_id, self.incarnation
        cluster.adopt(servers, workers, maps, int(meta.get("next_server", 0)), int(meta.get("next_worker", 0)), now)
        jobs.adopt(loaded, int(meta.get("next_job", 1)), int(meta.get("next_lease", 1)), now,
                   f"the scheduler restarted (incarnation {self.incarnation})")
        jobs.clocks.first_step = self.incarnation * STEPS_PER_INCARNATION
        self._servers = {s.server_id: (s.address, s.state) for s in servers}
        self._maps = dict(cluster.maps)
        self.save(jobs, cluster, now, meta_too=True)
        log.info("scheduler state %s: incarnation %d, cluster %s: %d jobs, %d servers, %d workers, %d models",
                 self.dir, self.incarnation, self.cluster_id, len(loaded), len(servers), len(workers), len(maps))

    def _job(self, job_id: str, spec: str, body: str, offset: float, max_events: int) -> Job:
        fields = {**json.loads(spec), **json.loads(body)}
        for name in _MONOTONIC:
            fields[name] = fields[name] + offset if fields.get(name) else 0.0
        for name in ("epoch_loss", "epoch_eval"):  # JSON object keys are strings: the epochs are ints
            fields[name] = {int(k): v for k, v in fields.get(name, {}).items()}
        known = {f.name for f in dataclasses.fields(Job)} - set(_DERIVED)
        job = Job(job_id=job_id, max_events=max_events, **{k: v for k, v in fields.items() if k in known})
        job.events = deque(maxlen=max_events)
        return job

    # -- save ------------------------------------------------------------------------
    def save(self, jobs: Jobs | None = None, cluster: Cluster | None = None, now: float | None = None,
             meta_too: bool = False) -> None:
        """Write what changed in ``jobs`` and/or ``cluster`` since the last save, in one transaction.
        Returns once it is committed: whatever was marked before the call is then on disk, even
        when another thread's save wrote it. Raises StateError when the write fails (what it held
        stays marked, and the next save tries again)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            offset = self._wall() - now  # monotonic -> wall
            rows: list[tuple[str, tuple]] = []
            taken = None
            if jobs is not None:
                with jobs.changed:
                    taken = jobs.take_dirty()
                    rows += self._job_rows(jobs, taken, offset)
                    rows.append(_meta("next_job", jobs.next_job))
                    rows.append(_meta("next_lease", jobs.next_lease))
            if cluster is not None:
                rows += self._cluster_rows(cluster)
            if meta_too:
                rows += [_meta("schema", SCHEMA), _meta("cluster_id", self.cluster_id),
                         _meta("incarnation", self.incarnation)]
            try:
                self.db.execute("BEGIN")
                for sql, args in rows:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if taken is not None:
                    jobs.undo_take(taken)
                if cluster is not None:  # written again next time
                    self._servers.clear()
                    self._maps.clear()
                raise StateError(f"could not write the scheduler state in {self.dir}: {e}") from None

    def _job_rows(self, jobs: Jobs, d, offset: float) -> list[tuple[str, tuple]]:
        rows = []
        for job_id in d.deleted:
            rows += [("DELETE FROM jobs WHERE job_id = ?", (job_id,)),
                     ("DELETE FROM tasks WHERE job_id = ?", (job_id,)),
                     ("DELETE FROM events WHERE job_id = ?", (job_id,))]
        for job_id, task_ids in d.jobs.items():
            job = jobs.jobs.get(job_id)
            if job is None:
                continue
            spec = json.dumps({k: getattr(job, k) for k in _SPEC_FIELDS}) if job_id in d.spec else None
            rows.append(("INSERT INTO jobs (job_id, spec, body) VALUES (?, ?, ?) ON CONFLICT (job_id) DO UPDATE "
                         "SET body = excluded.body" + (", spec = excluded.spec" if spec else ""),
                         (job_id, spec or "{}", _job_body(job, offset))))
            if job_id in d.reset:
                rows.append(("DELETE FROM tasks WHERE job_id = ?", (job_id,)))
                task_ids = set(task_ids) | set(job.tasks)
            for tid in task_ids:
                t = job.tasks.get(tid)
                if t is None:
                    rows.append(("DELETE FROM tasks WHERE task_id = ?", (tid,)))
                else:
                    rows.append(("INSERT OR REPLACE INTO tasks (task_id, job_id, body) VALUES (?, ?, ?)",
                                 (tid, job_id, json.dumps(_task_fields(t)))))
            last = jobs.saved_seq.get(job_id, 0)
            new = list(itertools.takewhile(lambda e: e.seq > last, reversed(job.events)))
            for e in reversed(new):
                rows.append(("INSERT OR REPLACE INTO events (job_id, seq, body) VALUES (?, ?, ?)",
                             (job_id, e.seq, json.dumps(_event_fields(e)))))
            if new:
                jobs.saved_seq[job_id] = new[0].seq
                if len(job.events) == job.events.maxlen:  # older ones fell out of the deque: out of the file too
                    rows.append(("DELETE FROM events WHERE job_id = ? AND seq < ?", (job_id, job.events[0].seq)))
        return rows

    def _cluster_rows(self, cluster: Cluster) -> list[tuple[str, tuple]]:
        rows = []
        with cluster._lock:
            servers = {sid: (s.address, s.state, s.bytes, list(s.models)) for sid, s in cluster.servers.items()}
            workers = {wid: cluster.workers.get(wid) for wid in cluster.dirty_workers}
            cluster.dirty_workers = set()
            maps = dict(cluster.maps)
            rows += [_meta("next_server", cluster.next_server), _meta("next_worker", cluster.next_worker)]
        for sid, (address, state, nbytes, models) in servers.items():
            if self._servers.get(sid) != (address, state):
                self._servers[sid] = (address, state)
                rows.append(("INSERT OR REPLACE INTO servers (server_id, body) VALUES (?, ?)",
                             (sid, json.dumps({"address": address, "state": state, "bytes": nbytes,
                                               "models": models}))))
        for sid in [sid for sid in self._servers if sid not in servers]:
            del self._servers[sid]
            rows.append(("DELETE FROM servers WHERE server_id = ?", (sid,)))
        for wid, w in workers.items():
            if w is None:
                rows.append(("DELETE FROM workers WHERE worker_id = ?", (wid,)))
            else:
                rows.append(("INSERT OR REPLACE INTO workers (worker_id, body) VALUES (?, ?)",
                             (wid, json.dumps({"name": w.name, "device": w.device}))))
        for model, m in maps.items():
            if self._maps.get(model) is not m:  # maps are frozen: a change is a new object
                self._maps[model] = m
                rows.append(("INSERT OR REPLACE INTO maps (model, body) VALUES (?, ?)", (model, map_to_json(m))))
        for model in [k for k in self._maps if k not in maps]:
            del self._maps[model]
            rows.append(("DELETE FROM maps WHERE model = ?", (model,)))
        return rows


def _meta(key: str, value) -> tuple[str, tuple]:
    return "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value))


def _job_body(job: Job, offset: float) -> str:
    skip = set(_SPEC_FIELDS) | set(_DERIVED) | {"job_id"}
    out = {f.name: getattr(job, f.name) for f in dataclasses.fields(Job) if f.name not in skip}
    for name in _MONOTONIC:
        out[name] = out[name] + offset if out[name] else 0.0
    return json.dumps(out)


def _task_fields(t: Task) -> dict:
    out = dataclasses.asdict(t)
    out["expires"] = 0.0  # set afresh on load
    return out


def _event_fields(e: Event) -> dict:
    return {f.name: getattr(e, f.name) for f in dataclasses.fields(Event) if f.name != "wire"}


# -- shard maps ------------------------------------------------------------------------
def map_to_json(m: ShardMap) -> str:
    """A shard map as JSON: tensors and slices as objects, the optimizer (a protobuf message) as
    its serialized bytes in base64; any other field as plain data."""
    out = {}
    for f in dataclasses.fields(ShardMap):
        v = getattr(m, f.name)
        if f.name in ("tensors", "slices"):
            out[f.name] = [dataclasses.asdict(x) for x in v]
        elif hasattr(v, "SerializeToString"):
            out[f.name] = {"$pb": v.DESCRIPTOR.full_name, "b64": base64.b64encode(v.SerializeToString()).decode()}
        else:
            out[f.name] = v
    return json.dumps(out)


def map_from_json(text: str) -> ShardMap:
    raw = json.loads(text)
    known = {f.name for f in dataclasses.fields(ShardMap)}
    kw = {}
    for name, v in raw.items():
        if name not in known:
            continue
        if name == "tensors":
            v = tuple(sharding.TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in v)
        elif name == "slices":
            v = tuple(sharding.Slice(**s) for s in v)
        elif isinstance(v, dict) and "$pb" in v:
            v = _proto(v["$pb"]).FromString(base64.b64decode(v["b64"]))
        else:
            v = _tuples(v)
        kw[name] = v
    return ShardMap(**kw)


def _proto(full_name: str):
    from google.protobuf import symbol_database

    import ps.v1.optimizer_pb2  # noqa: F401 - registers ps.v1.OptimizerConfig
    return symbol_database.Default().GetSymbol(full_name)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v
