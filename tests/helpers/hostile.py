"""Backends and clients that misbehave on purpose, on raw sockets, for testing the engines.

Everything here talks to 127.0.0.1 only, is a context manager that closes what it opened, and
waits for nothing without a bound:

- :class:`RawClient`: one client connection that sends exactly the bytes a test gives it and
  parses answers itself (pipelined answers, a ``100 Continue``, bytes after a ``101``, an
  early close), optionally over TLS.
- :class:`IdleClients`: many connections that send part of a request head (or nothing, or a
  whole request) and then stay silent: slowloris, idle keep-alive.
- :class:`UpgradeEchoBackend`: answers an upgrade request (its body read first) with ``101
  Switching Protocols``, sends a greeting, then echoes every byte back: a WebSocket server as
  seen by a proxy. It declines ``h2c`` with a ``200``.
- :class:`EarlyAnswerBackend`: answers as soon as it has the request head (``413`` by
  default), closes its sending side and never reads the body: nginx's ``client_max_body_size``.
- :func:`reset_step`: a :class:`~tests.helpers.raw_backend.RawBackend` script step that
  aborts the connection (TCP RST) instead of answering.
- :class:`TLSBackend`: a small https backend (200 ``tls ok``) with a certificate the test gives.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = [
    "EarlyAnswerBackend",
    "IdleClients",
    "RawClient",
    "RawResponse",
    "TLSBackend",
    "UPGRADE_REQUEST",
    "UpgradeEchoBackend",
    "reset_step",
]

#: How long any single wait in this module may last unless the caller says otherwise.
DEFAULT_TIMEOUT = 5.0
#: A WebSocket opening handshake (RFC 6455 §1.2).
UPGRADE_REQUEST = (
    b"GET /chat HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
#: Largest head RawClient accepts from a server before calling it broken.
MAX_HEAD = 256 * 1024


@dataclass
class RawResponse:
    """One answer as it came off the wire."""

    status: int
    reason: str
    #: Header fields in order, names as sent, repeated fields kept.
    headers: list[tuple[str, str]]
    body: bytes
    #: The raw head, status line to the blank line included.
    head: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        lowered = name.lower()
        return next((v for n, v in self.headers if n.lower() == lowered), None)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]


class RawClient:
    """One TCP (or TLS) connection to 127.0.0.1:``port`` that sends bytes as given.

    Reads keep their own buffer, so pipelined answers and the bytes after a ``101`` are read
    in order. Every read waits at most ``timeout`` seconds (per call) and raises
    ``TimeoutError`` after it.
    """

    def __init__(
        self,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
        rcvbuf: int | None = None,
    ) -> None:
        self.port = port
        self.timeout = timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket = sock
        self._buf = b""
        self._senders: list[threading.Thread] = []

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and wait (bounded) for background senders to notice."""
        with contextlib.suppress(OSError):
            self.sock.close()
        for thread in self._senders:
            thread.join(DEFAULT_TIMEOUT)

    # ------------------------------------------------------------------------- sending

    def send(self, data: bytes) -> None:
        """Send all of ``data`` now."""
        self.sock.sendall(data)

    def send_in_background(self, data: bytes, piece: int = 64 * 1024) -> threading.Thread:
        """Send ``data`` from a thread, piece by piece, stopping quietly if the peer closes.

        For uploads the other side may answer (and close) before reading: the test reads the
        answer meanwhile. :meth:`close` joins the thread.
        """

        def run() -> None:
            with contextlib.suppress(OSError):
                for start in range(0, len(data), piece):
                    self.sock.sendall(data[start : start + piece])

        thread = threading.Thread(target=run, name=f"RawClient-{self.port}-send", daemon=True)
        self._senders.append(thread)
        thread.start()
        return thread

    # ------------------------------------------------------------------------- reading

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _fill(self, deadline: float) -> bool:
        """Read more into the buffer; False at end of stream. TimeoutError at ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing more from 127.0.0.1:{self.port} in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        except TimeoutError:
            raise TimeoutError(f"nothing more from 127.0.0.1:{self.port} in time") from None
        if not data:
            return False
        self._buf += data
        return True

    def _line(self, deadline: float) -> bytes:
        while b"\r\n" not in self._buf:
            if len(self._buf) > MAX_HEAD:
                raise AssertionError(f"line longer than {MAX_HEAD} bytes")
            if not self._fill(deadline):
                raise ConnectionError(f"closed mid-line; got {self._buf[:200]!r}")
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _exactly(self, count: int, deadline: float) -> bytes:
        while len(self._buf) < count:
            if not self._fill(deadline):
                raise ConnectionError(f"closed after {len(self._buf)} of {count} body bytes")
        data, self._buf = self._buf[:count], self._buf[count:]
        return data

    def read_head(self, timeout: float | None = None) -> RawResponse:
        """Read one status line and header block (no body). ConnectionError if closed first."""
        deadline = self._deadline(timeout)
        while b"\r\n\r\n" not in self._buf:
            if len(self._buf) > MAX_HEAD:
                raise AssertionError(f"answer head longer than {MAX_HEAD} bytes")
            if not self._fill(deadline):
                raise ConnectionError(f"closed before a whole head; got {self._buf[:200]!r}")
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/"):
            raise AssertionError(f"not an HTTP status line: {lines[0]!r}")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return RawResponse(int(code), reason, headers, b"", head + b"\r\n\r\n")

    def read_response(self, *, method: str = "GET", timeout: float | None = None) -> RawResponse:
        """Read one whole answer (head and body, framed per RFC 9112 §6.3) to a ``method``."""
        deadline = self._deadline(timeout)
        response = self.read_head(timeout=max(0.0, deadline - time.monotonic()))
        status = response.status
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return response
        encoding = (response.header("Transfer-Encoding") or "").lower()
        length = response.header("Content-Length")
        if "chunked" in encoding:
            body = bytearray()
            while True:
                size = int(self._line(deadline).split(b";")[0].strip(), 16)
                if size == 0:
                    while self._line(deadline):  # trailers, up to the blank line
                        pass
                    break
                body += self._exactly(size, deadline)
                self._exactly(2, deadline)
            response.body = bytes(body)
        elif length is not None:
            response.body = self._exactly(int(length), deadline)
        else:  # delimited by the close
            while self._fill(deadline):
                pass
            response.body, self._buf = self._buf, b""
        return response

    def recv_exactly(self, count: int, timeout: float | None = None) -> bytes:
        """The next ``count`` bytes (buffered first): for raw bytes after a ``101``."""
        return self._exactly(count, self._deadline(timeout))

    def wait_closed(self, timeout: float | None = None) -> bytes:
        """Wait until the peer closes (EOF or reset); return any bytes that came first.

        TimeoutError if the connection is still open after ``timeout``.
        """
        deadline = self._deadline(timeout)
        while self._fill(deadline):
            pass
        data, self._buf = self._buf, b""
        return data

    def drain_slowly(self, piece: int, interval: float, duration: float) -> int:
        """Read ``piece`` bytes every ``interval`` seconds for ``duration``; return the total.

        A slow reader: the server must hold back rather than buffer what it cannot send.
        """
        total = len(self._buf)
        self._buf = b""
        stop = time.monotonic() + duration
        self.sock.settimeout(self.timeout)
        while time.monotonic() < stop:
            data = self.sock.recv(piece)
            if not data:
                break
            total += len(data)
            time.sleep(interval)
        return total


class IdleClients:
    """``count`` connections to 127.0.0.1:``port``, each sent ``payload`` and then left idle.

    ``payload=b""`` opens bare connections; half a request head makes slowloris; a whole
    request with ``answered=True`` (each answer read before the next connection opens, so
    one request is in flight at a time) makes idle keep-alive connections. Everything is
    closed on exit.
    """

    def __init__(
        self,
        port: int,
        count: int,
        payload: bytes = b"",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        answered: bool = False,
    ) -> None:
        self.port = port
        self.clients: list[RawClient] = []
        #: With ``answered``, the answer each connection got to ``payload``.
        self.responses: list[RawResponse] = []
        try:
            for _ in range(count):
                client = RawClient(port, timeout=timeout)
                self.clients.append(client)
                if payload:
                    client.send(payload)
                if answered:
                    self.responses.append(client.read_response())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    def __enter__(self) -> IdleClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Acceptor:
    """A listening socket on 127.0.0.1 and a thread per accepted connection (base class)."""

    def __init__(self, name: str) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._name = name
        self._stop = threading.Event()
        self._lock = threading.Lock()  # protects _socks, _threads and the subclass records
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept, name=f"{name}-{self.port}")
        self._thread.daemon = True
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(DEFAULT_TIMEOUT)
            thread = threading.Thread(
                target=self._serve_and_close, args=(sock,), name=f"{self._name}-conn"
            )
            thread.daemon = True
            with self._lock:
                self._socks.append(sock)
                self._threads.append(thread)
            thread.start()

    def _serve_and_close(self, sock: socket.socket) -> None:
        try:
            self.serve(sock)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting, wake every connection thread and join them (bounded)."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(DEFAULT_TIMEOUT)
        for thread in threads:
            thread.join(DEFAULT_TIMEOUT)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """The request head (to the blank line included) and the bytes read after it; ``buf``:
    bytes already read."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a whole head")
        buf += data
        if len(buf) > MAX_HEAD:
            raise ConnectionError("head too long")
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


def _read_body(sock: socket.socket, head: bytes, buf: bytes) -> tuple[bytes, bytes]:
    """The request body that ``head`` frames (``Content-Length`` or chunked; none without
    either) and the bytes read after it; ``buf``: bytes already read after the head."""

    def more() -> bytes:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the whole body")
        return data

    fields = head.lower()
    if b"\r\ntransfer-encoding: chunked\r\n" in fields:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += more()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n" not in buf:  # no trailer fields: the empty line ends it
                    buf += more()
                return body, buf.split(b"\r\n", 1)[1]
            while len(buf) < size + 2:
                buf += more()
            body, buf = body + buf[:size], buf[size + 2 :]
    length = 0
    for line in fields.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < length:
        buf += more()
    return buf[:length], buf[length:]


class UpgradeEchoBackend(_Acceptor):
    """Answers a request that asks for an upgrade with ``101 Switching Protocols``, sends
    :attr:`greeting`, then echoes every byte it receives until the other side closes. It reads
    a request's body by its framing first (RFC 9110 §7.8: the upgrade takes effect after the
    request message), as a WebSocket or h2c server does.

    A plain request (no ``Upgrade`` field), or one asking for a protocol in :attr:`declined`,
    gets a keep-alive ``200`` whose body is ``plain`` (``declined: `` and the request's body
    for an upgrade it declines), and the connection waits for the next request, as a web
    server that also speaks WebSocket does.

    :attr:`heads` and :attr:`bodies` are the requests received, :attr:`connections` the
    number of the connection each came on (0, 1, ... in order of accepting);
    :attr:`tunnels_closed` counts connections whose tunnel the other side ended (EOF or
    reset), so a test can see the proxy let go of the backend side too.

    ``early_101``: answer an upgrade with ``101`` as soon as its head is in, before its body
    (which then comes back in the echo, as the new protocol's first bytes would).
    ``decline_after``: seconds to wait before declining an upgrade.
    """

    greeting = b"hello from the backend\n"
    #: Upgrade values answered with a 200 instead of a 101.
    declined = (b"h2c",)

    def __init__(self, *, early_101: bool = False, decline_after: float = 0.0) -> None:
        self.early_101 = early_101
        self.decline_after = decline_after
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections: list[int] = []
        self.tunnels_closed = 0
        self._accepted = 0
        super().__init__("UpgradeEchoBackend")

    def serve(self, sock: socket.socket) -> None:
        with self._lock:
            number = self._accepted
            self._accepted += 1
        rest = b""
        while True:
            head, rest = _read_head(sock, rest)
            fields = head.lower()
            upgrade = b"\r\nupgrade:" in fields
            body = b""
            if not (upgrade and self.early_101):
                body, rest = _read_body(sock, head, rest)
            with self._lock:
                self.heads.append(head)
                self.bodies.append(body)
                self.connections.append(number)
            if not upgrade:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            elif any(b"\r\nupgrade: " + name + b"\r\n" in fields for name in self.declined):
                self._stop.wait(self.decline_after)
                answer = b"declined: " + body
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (
                    len(answer), answer
                ))  # fmt: skip
            else:
                break
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" + self.greeting
        )
        if rest:
            sock.sendall(rest)
        sock.settimeout(30)  # longer than any tunnel test; close() wakes it
        try:
            while not self._stop.is_set():
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(data)
        except ConnectionResetError:
            pass
        with self._lock:
            self.tunnels_closed += 1


class EarlyAnswerBackend(_Acceptor):
    """Answers ``answer`` as soon as the request head is in, closes its sending side, and
    never reads the body; it closes the connection after ``hold`` seconds (or at close()).

    A proxy that insists on sending the whole body first stalls on the full window until
    ``hold`` passes; one that reads the answer meanwhile passes it on at once.
    """

    def __init__(
        self,
        answer: bytes = (
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 14\r\nConnection: close\r\n\r\nbody too large"
        ),
        hold: float = 4.0,
    ) -> None:
        self.answer = answer
        self.hold = hold
        self.heads: list[bytes] = []
        super().__init__("EarlyAnswerBackend")

    def serve(self, sock: socket.socket) -> None:
        head, _ = _read_head(sock)
        with self._lock:
            self.heads.append(head)
        sock.sendall(self.answer)
        sock.shutdown(socket.SHUT_WR)
        self._stop.wait(self.hold)


def reset_step(sock: socket.socket) -> None:
    """RawBackend script step: abort the connection with a TCP RST instead of answering."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _TLSHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    def do_GET(self) -> None:
        body = b"tls ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class TLSBackend:
    """An https backend on 127.0.0.1 answering every GET with 200 ``tls ok``."""

    certfile: str
    keyfile: str
    _server: ThreadingHTTPServer = field(init=False)

    def __post_init__(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certfile, self.keyfile)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _TLSHandler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port: int = server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(DEFAULT_TIMEOUT)

    def __enter__(self) -> TLSBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
