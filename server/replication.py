"""Primary-backup replication, the primary's side: one ordered link per backup.

A primary applies an update to a slice under the slice's lock and, still under it, queues the
update on the link of each of the slice's backups (ShardStore._forward). Each link has one
sender thread that sends what is queued, in order, batched into one ``Replicate`` call, and
waits for the answer before sending more: the backup applies a slice's updates in the order the
primary did, with the same exactly-once records and the same step numbers, so replicas stay
bit-identical. The update's future resolves when the backup has applied it, and only then does
the primary acknowledge the push.

A backup that cannot be reached for ``lost_after_s`` (or that refuses an update) is lost: the
primary reports it to the scheduler (which takes it out of the replica set and re-replicates)
and stops forwarding to it; the updates queued for it resolve once that report went through,
as every live replica then has them. If the report fails too, they fail, and so do the pushes
that wait on them (the client retries them with the same sequence number).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import grpc

from ps import rpc, wire
from ps.errors import Unavailable
from ps.v1 import server_pb2

log = logging.getLogger("ps.server.replication")

#: one Replicate call carries at most this many bytes of updates (more wait for the next call)
MAX_BATCH_BYTES = 8 << 20
#: a backup unreachable this long is reported lost
LOST_AFTER_S = 2.0
#: how often a link's own thread looks for updates that no waiting push is sending
IDLE_POLL_S = 0.005


class BackupLink:
    """The ordered queue of updates for one backup. The pushes waiting on them send them (drive),
    one batch at a time; a thread of its own sends what nobody drives."""

    def __init__(self, replicator: "Replicator", backup: str):
        self.replicator = replicator
        self.backup = backup
        self.channel = rpc.channel(backup, replicator.max_message_bytes)
        self._call = self.channel.unary_unary(f"/{wire.SERVICE}/Replicate", request_serializer=bytes,
                                              response_deserializer=server_pb2.ReplicateResponse.FromString)
        self._queue: deque = deque()  # (model name, optimizer bytes, op bytes, future)
        self._cond = threading.Condition()
        self.lost: Exception | None = None  # set once the backup is lost: nothing more is sent
        self.reported = False  # ... and whether the scheduler took it out of the replica sets
        self._closed = False
        self._sending = False  # a thread is delivering a batch (one at a time: that keeps the order)
        self._thread = threading.Thread(target=self._run, name=f"replicate-{backup}", daemon=True)
        self._thread.start()

    def send(self, model: str, optimizer: bytes, op: bytes) -> Future:
        fut: Future = Future()
        fut.link = self  # whoever waits on it drives the link (drive)
        with self._cond:
            if self.lost is None and not self._closed:
                self._queue.append((model, optimizer, op, fut))
                return fut
        # lost: nothing more goes to this backup until it is given a snapshot again (a fresh link)
        if self.reported:
            fut.set_result(False)
        else:
            fut.set_exception(self.lost or Unavailable(f"replicate to backup {self.backup}: this server is stopping"))
        return fut

    def _take(self, wait: float | None) -> list | None:
        """Queued updates of one model, in order, up to MAX_BATCH_BYTES (at least one), and the
        sender's role with them; None when there is nothing to send or another thread sends.
        ``wait``: seconds to wait for something (the background thread), None: do not wait."""
        with self._cond:
            if wait is not None and not (self._queue and not self._sending) and not self._closed:
                self._cond.wait(wait)
            if self._sending or not self._queue or self._closed:
                return None
            self._sending = True
            first = self._queue.popleft()
            batch, size = [first], len(first[2])
            while self._queue and self._queue[0][0] == first[0] and size + len(self._queue[0][2]) <= MAX_BATCH_BYTES:
                item = self._queue.popleft()
                batch.append(item)
                size += len(item[2])
            return batch

    def _send(self, batch: list) -> bool:
        """Deliver one batch and resolve its futures; False once the backup is lost."""
        model, optimizer = batch[0][0], batch[0][1]
        request = wire.encode_replicate(model, optimizer, self.replicator.address, [b[2] for b in batch])
        error = self._deliver(request, model)
        if error is not None:
            self._lose(error, batch)
            return False
        with self._cond:
            self._sending = False
            self._cond.notify_all()
        for b in batch:
            b[3].set_result(True)
        return True

    def drive(self) -> None:
        """Send what is queued from the calling thread (a push waiting for its backups), unless
        another thread is sending: the update needs no hand-over to the link's thread and back."""
        while (batch := self._take(None)) is not None:
            if not self._send(batch):
                return

    def _run(self) -> None:
        """The background sender, for updates nobody drives (it looks every few milliseconds)."""
        while not self._closed and self.lost is None:
            batch = self._take(IDLE_POLL_S)
            if batch is not None and not self._send(batch):
                return

    def _deliver(self, request: bytes, model: str) -> Exception | None:
        """Send one batch, retrying while the backup is unreachable for up to lost_after_s; the
        error that makes it lost, or None."""
        deadline = time.monotonic() + self.replicator.lost_after_s
        while True:
            try:
                self._call(request, timeout=self.replicator.timeout_s)
                return None
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline or self._closed:
                    return Unavailable(f"replicate '{model}' to backup {self.backup}: {e.code().name}: {e.details()}")
                time.sleep(0.05)

    def _lose(self, error: Exception, batch: list) -> None:
        with self._cond:
            self.lost = error
            pending = batch + list(self._queue)
            self._queue.clear()
        log.warning("%s", error)
        ok = self.reported = self.replicator.on_lost(self.backup, str(error))
        for b in pending:
            if ok:
                b[3].set_result(False)  # the backup is out of the replica set: the live ones have it
            else:
                b[3].set_exception(error)
        self.channel.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for b in pending:
            b[3].set_exception(Unavailable(f"replicate to backup {self.backup}: this server is stopping"))
        self.channel.close()


class Replicator:
    """A primary's links to its backups (``ShardStore.forward``).

    ``on_lost(backup, error) -> bool`` is called (from the link's thread) when a backup is lost:
    it stops forwarding to it and tells the scheduler; True when the scheduler took it out of the
    replica sets."""

    def __init__(self, address: str, on_lost: Callable[[str, str], bool], *,
                 max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES, timeout_s: float = rpc.DEFAULT_TIMEOUT_S,
                 lost_after_s: float = LOST_AFTER_S):
        self.address = address
        self.on_lost = on_lost
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self.lost_after_s = lost_after_s
        self._links: dict[str, BackupLink] = {}
        self._lock = threading.Lock()

    def forward(self, backup: str, model, op: bytes, fresh: bool = False) -> Future:
        """Queue ``op`` for ``backup``; the future resolves once the backup applied it (True) or was
        dropped from the replica set (False). A lost backup gets nothing more, unless ``fresh`` (a
        snapshot that resyncs it) starts a new link."""
        optimizer = model.optimizer_wire
        with self._lock:
            link = self._links.get(backup)
            if link is None or (fresh and link.lost is not None):
                link = self._links[backup] = BackupLink(self, backup)
        return link.send(model.name, optimizer, op)

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
