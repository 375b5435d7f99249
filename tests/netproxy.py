"""A TCP proxy for fault tests: it forwards a gRPC (HTTP/2) connection byte for byte and, when
armed, cuts it at the first reply the server starts to send, so the client loses a reply whose
request the server has already handled."""

from __future__ import annotations

import socket
import threading

_HEADERS = 0x1


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except OSError:
            return None
        if not part:
            return None
        buf += part
    return bytes(buf)


class ReplyCutter:
    """``127.0.0.1:port`` -> ``target``. ``arm()``: the next HTTP/2 HEADERS frame the server sends
    on a request stream (the start of a reply: for a call with one response, sent once the
    handler has returned) is dropped and the connection closed; ``cut`` is set when it happened."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self.cut = threading.Event()
        self._armed = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self) -> None:
        self.cut.clear()
        self._armed.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._copy, args=(client, server), daemon=True).start()
            threading.Thread(target=self._frames, args=(server, client), daemon=True).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        """Client -> server, as it comes."""
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        self._close(src, dst)

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        """Server -> client, frame by frame (a server sends no connection preface, only frames)."""
        while True:
            header = _read_exact(src, 9)
            if header is None:
                break
            length = int.from_bytes(header[:3], "big")
            kind = header[3]
            stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            payload = _read_exact(src, length) if length else b""
            if payload is None:
                break
            if kind == _HEADERS and stream and self._armed.is_set():
                self._armed.clear()
                self.cut.set()
                break
            try:
                dst.sendall(header + payload)
            except OSError:
                break
        self._close(src, dst)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._close(*self._socks)
