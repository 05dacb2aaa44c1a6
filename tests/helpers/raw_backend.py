"""A backend that answers with bytes the test scripts: for what no well-behaved HTTP server
sends (odd framing, broken heads, closes at awkward moments).

It is a real TCP server on 127.0.0.1 with a thread per connection. Each request is read
(head, then a body framed by Content-Length or chunked), recorded raw, and answered with the
next item of the script: bytes to send, :data:`CLOSE` to close the connection without an
answer, :data:`SILENT` to send nothing and keep the connection open, or a callable
``(sock) -> None`` that does what it likes with the socket.

With ``tls`` (a server-side :class:`ssl.SSLContext`, e.g. from a ``trustme`` CA) it speaks
HTTPS and its :attr:`~RawBackend.url` says so; with ``read_body=False`` it answers right after
the request head, leaving the body unread (an early 413 or 401).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: Script item: close the connection instead of answering.
CLOSE: Final = "close"
#: Script item: read the request, answer nothing, keep the connection open.
SILENT: Final = "silent"

Step = bytes | str | Callable[[socket.socket], None]


@dataclass
class RawRequest:
    """One request as it arrived: its head and body bytes, and which connection it came on."""

    head: bytes
    body: bytes
    connection: int

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:-2]


@dataclass
class RawBackend:
    """The server; ``script`` is consumed one item per request, the last item repeats.

    ``close_after_answer`` closes each connection right after its answer, without saying so
    in the answer (as a server whose keep-alive timeout has just passed would).
    """

    script: list[Step]
    close_after_answer: bool = False
    tls: ssl.SSLContext | None = None
    read_body: bool = True
    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        scheme = "http" if self.tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _next_step(self) -> Step:
        with self._lock:
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(10)
        buf = b""
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._socks.append(sock)
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                head += b"\r\n\r\n"
                body = b""
                if self.read_body:
                    body, buf = _read_body(sock, head, buf)
                with self._lock:
                    self.requests.append(RawRequest(head, body, number))
                step = self._next_step()
                if step == CLOSE:
                    return
                if step == SILENT:
                    continue
                if callable(step):
                    step(sock)
                elif isinstance(step, bytes):
                    sock.sendall(step)
                if self.close_after_answer:
                    return
        except (OSError, ValueError):  # ValueError: an ssl socket the test closed meanwhile
            return
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() at once (Linux)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> RawBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_body(sock: socket.socket, head: bytes, buf: bytes) -> tuple[bytes, bytes]:
    """The request body framed per its head, and what came after it."""
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += _recv(sock)
            line, buf = buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += _recv(sock)
            body, buf = body + buf[:size], buf[size + 2 :]
            if size == 0:
                return body, buf
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < length:
        buf += _recv(sock)
    return buf[:length], buf[length:]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("client closed during the body")
    return data
