"""The same-host control link: a client's shared-memory calls (``ps.shm``) to a server on its own
host carried over a Unix socket instead of gRPC.

A gRPC call costs about as much Python on each side as the whole of a small push_pull's work; over
a socket of its own a call is one write and one read each way. The server listens on an abstract
Unix socket (Linux: no file to clean up, gone with the process) with a random name, which it
tells a client in its first PushPullLocal (or ApplyAccumulated) reply over gRPC. The client then
connects and sends the same request bytes over the link, and gets the same reply bytes back. A call
frame's kind names the method it stands in for (``CALL``: PushPullLocal, ``APPLY``:
ApplyAccumulated, bsp's per-step call).

Who may use it: only a process of the server's own user (checked with SO_PEERCRED on both ends,
the trust the shared-memory segments, mode 0600, already rest on); with an auth file, the client
first sends its bearer token, and the link then allows exactly what gRPC would: the token must
admit it to the gRPC method each call stands in for (``ps.security.admit``), and a user may touch
only its own models (the servicer checks).

Frames both ways: a 4-byte little-endian payload length, a 1-byte kind, the payload.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
from typing import Callable

import grpc

from ps import security
from ps.errors import PSError, ResourceExhausted, short_message

log = logging.getLogger("ps.link")

_FRAME = struct.Struct("<IB")
HELLO, CALL, APPLY = 1, 2, 3  # client -> server: the bearer token (may be empty), a request of a method
OK, ERROR = 0, 1          # server -> client: a reply; a status code (1 byte) and its message
#: requests are control messages (ranges of a segment): far below this
MAX_FRAME_BYTES = 1 << 20
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class LinkClosed(ConnectionError):
    """The other end went away (or broke the protocol) mid-call."""


class LinkError(grpc.RpcError):
    """A status the server sent back: code() and details() as a grpc.RpcError has them, so callers
    handle a link's refusal exactly as the same refusal over gRPC."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LinkBroken(LinkError):
    """UNAVAILABLE for a call whose link broke mid-call: the server itself is not in question, and
    the call is retried over gRPC at once."""

    def __init__(self, details: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _send(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    sock.sendall(_FRAME.pack(len(payload), kind) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise LinkClosed("the link closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[int, bytes]:
    n, kind = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if n > MAX_FRAME_BYTES:
        raise ResourceExhausted(f"local link: a frame of {n} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return kind, _recv_exact(sock, n) if n else b""


def _send_error(sock: socket.socket, code: grpc.StatusCode, message: str) -> None:
    _send(sock, ERROR, bytes([code.value[0]]) + short_message(message).encode())


def peer_uid(sock: socket.socket) -> int:
    return _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))[1]


class LinkServer:
    """Accepts links on an abstract Unix socket; serves each on a thread of its own.

    ``methods``: by call frame kind, (the gRPC method it stands in for, /package.Service/Method, whose
    permissions a caller's token must have; ``handle(request bytes, identity)``, which returns the
    reply bytes or raises PSError, sent back as its status: the link stays up). A link is admitted
    by the method of kind ``CALL``. ``auth``: the process's AuthTable (None: every caller of this user)."""

    def __init__(self, methods: dict[int, tuple[str, Callable[[bytes, object], bytes]]], auth=None):
        self.methods, self.auth = methods, auth
        self.method = methods[CALL][0]
        self.name = f"ps-link-{os.getpid():x}-{secrets.token_hex(12)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        #: calls served over links, in all (tests and stats read it)
        self.calls = 0
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="link", daemon=True).start()

    def _hello(self, conn: socket.socket) -> tuple[bool, object, str | None]:
        """(admitted, the caller's identity: None without auth, its token); a refused caller has been
        told why."""
        uid = peer_uid(conn)
        if uid != os.getuid():
            log.warning("refused a local link from uid %d (this server runs as uid %d)", uid, os.getuid())
            return False, None, None
        kind, raw = _recv(conn)
        if kind != HELLO:
            _send_error(conn, grpc.StatusCode.INVALID_ARGUMENT, f"local link: expected a hello frame, got kind {kind}")
            return False, None, None
        token = raw.decode(errors="replace") or None
        who = None
        if self.auth is not None:
            who, why = security.admit(self.auth, self.method, token)
            if why is not None:
                _send_error(conn, why[0], f"local link: {why[1]}")
                return False, None, None
        _send(conn, OK)
        return True, who, token

    def _serve(self, conn: socket.socket) -> None:
        try:
            admitted, who, token = self._hello(conn)
            if not admitted:
                return
            admitted = {CALL: who}  # by kind: who the token speaks for on that kind's method
            while True:
                kind, payload = _recv(conn)
                if kind not in self.methods:
                    _send_error(conn, grpc.StatusCode.INVALID_ARGUMENT, f"local link: expected a call frame, "
                                                                        f"got kind {kind}")
                    return
                method, handle = self.methods[kind]
                if kind not in admitted:
                    admitted[kind], why = (None, None) if self.auth is None else security.admit(self.auth, method, token)
                    if why is not None:
                        del admitted[kind]
                        _send_error(conn, why[0], f"local link: {why[1]}")
                        continue
                try:
                    reply = handle(payload, admitted[kind])
                except PSError as e:
                    _send_error(conn, e.code, str(e))
                    continue
                except Exception as e:  # a bug: said as gRPC would say it, and logged
                    log.exception("local link call failed")
                    _send_error(conn, grpc.StatusCode.INTERNAL, f"local link: {type(e).__name__}: {e}")
                    continue
                with self._lock:
                    self.calls += 1
                _send(conn, OK, reply)
        except ResourceExhausted as e:
            _send_quietly(conn, e)
        except (LinkClosed, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        for s in (self._sock, *conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _send_quietly(conn: socket.socket, e: PSError) -> None:
    try:
        _send_error(conn, e.code, str(e))
    except OSError:
        pass


class Link:
    """A client's link to one server: call() sends a request's bytes and returns the reply's,
    one call at a time (a lock orders callers on other threads)."""

    def __init__(self, name: str, token: str | None, timeout: float = 10.0):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect("\0" + name)
            if peer_uid(sock) != os.getuid():  # never hand a token to a process of another user
                raise LinkClosed(f"local link {name} is served by another user")
            _send(sock, HELLO, (token or "").encode())
            self._reply(sock)
        except BaseException:
            sock.close()
            raise
        self.name = name
        self._sock = sock
        self._timeout: float | None = timeout
        self._lock = threading.Lock()
        self._long = False  # the call holding the link may be held by the server

    @staticmethod
    def _reply(sock: socket.socket) -> bytes:
        try:
            kind, payload = _recv(sock)
        except ResourceExhausted as e:
            raise LinkClosed(str(e)) from None
        if kind == OK:
            return payload
        if kind == ERROR and payload:
            raise LinkError(_BY_VALUE.get(payload[0], grpc.StatusCode.UNKNOWN), payload[1:].decode(errors="replace"))
        raise LinkClosed(f"local link: a reply of kind {kind}")

    def call(self, request: bytes, timeout: float | None = None, kind: int = CALL, long: bool = False) -> bytes | None:
        """The reply to ``request`` (of the method of frame ``kind``); LinkError for a status the server
        sent, LinkClosed (or another OSError, a timeout among them) when the link broke: the call may or
        may not have been applied, and the link is of no more use. Calls from other threads wait their
        turn, but not behind a ``long`` one (which the server may hold, as a bsp step waiting for its
        members): then None at once, nothing sent (the caller goes over gRPC)."""
        if self._long:
            return None
        self._lock.acquire()
        self._long = long
        try:
            if self._timeout != timeout:
                self._sock.settimeout(timeout)
                self._timeout = timeout
            _send(self._sock, kind, request)
            return self._reply(self._sock)
        finally:
            self._long = False
            self._lock.release()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
