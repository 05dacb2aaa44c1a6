"""Real HTTP backends for tests: the behaviours pytest-httpserver cannot produce.

:class:`TestBackend` is a keep-alive HTTP/1.1 server on 127.0.0.1 (stdlib only) that records
every request exactly as it arrived and answers according to the request path, so one server
serves every test:

=========================  ===============================================================
path                       answer
=========================  ===============================================================
anything else              200, body ``ok from <port>``, header ``X-Backend: <port>``
``/echo...``               200, JSON: method, target, headers, body_length, body_sha256, ...
``/status/<code>``         that status; no body for 204, 304 and HEAD; 3xx add ``Location``
``/slow/<seconds>``        sleeps (interrupted by stop()), then 200 ``slow``
``/drop``                  reads the request, closes the connection without answering
``/reset``                 reads the request, aborts the connection (TCP RST)
``/reset-mid-body``        200 with ``Content-Length: 1000000``, sends 1000 bytes, closes
``/big/<nbytes>``          nbytes of :func:`body_chunks` with Content-Length, 64 KiB at a time
``/chunked/<nbytes>``      the same with ``Transfer-Encoding: chunked``
``/gzip``                  :data:`GZIP_PLAIN` gzip-compressed, ``Content-Encoding: gzip``
``/cookies``               two separate ``Set-Cookie`` headers (:data:`COOKIES`)
``/hop``                   hop-by-hop headers (:data:`HOP_RESPONSE_HEADERS`), then closes
``/health``                ``health_status`` (200 ``healthy``); counted in ``.probes`` only
``/upload...``             200 JSON like /echo; the body is hashed and never stored
=========================  ===============================================================

Request bodies (Content-Length or chunked, decoded here) are always read in full before
answering, and every request except ``/health`` is recorded before its answer is sent, so a
test that got an answer (or an error) can look at :attr:`TestBackend.requests` at once.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = [
    "CHUNK_SIZE",
    "COOKIES",
    "GZIP_PLAIN",
    "HOP_RESPONSE_HEADERS",
    "RecordedRequest",
    "RefusingURL",
    "TestBackend",
    "body_chunks",
    "body_sha256",
    "closed_port",
    "free_port",
    "wait_for_port",
]

#: Size of the pieces /big, /chunked and /upload are written or read in.
CHUNK_SIZE = 64 * 1024

#: One chunk of the deterministic body pattern of /big and /chunked (bytes 0..255 repeated).
_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)

#: The plain text /gzip sends, compressed.
GZIP_PLAIN = b"softlb gzip test body\n" * 200

#: The Set-Cookie values /cookies sends, in order, as separate headers.
COOKIES = ("a=1; Path=/", "b=2; Path=/; HttpOnly")

#: The headers /hop answers with, in order: every hop-by-hop kind, plus one that must survive.
HOP_RESPONSE_HEADERS = (
    ("Connection", "close, X-Private"),
    ("X-Private", "secret"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Trailer", "X-T"),
    ("Upgrade", "h2c"),
    ("X-Public", "yes"),
)

#: Length announced and length actually sent by /reset-mid-body.
RESET_ANNOUNCED = 1_000_000
RESET_SENT = 1000


def body_chunks(nbytes: int) -> Iterator[bytes]:
    """Yield the body /big/<nbytes> and /chunked/<nbytes> send, one 64 KiB piece at a time."""
    remaining = nbytes
    while remaining > 0:
        piece = _PATTERN if remaining >= CHUNK_SIZE else _PATTERN[:remaining]
        remaining -= len(piece)
        yield piece


def body_sha256(nbytes: int) -> str:
    """Return the hex SHA-256 of the body /big/<nbytes> and /chunked/<nbytes> send."""
    digest = hashlib.sha256()
    for piece in body_chunks(nbytes):
        digest.update(piece)
    return digest.hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the backend received it."""

    method: str
    #: The request target exactly as on the wire (http.server's ``self.path`` collapses "//").
    target: str
    #: Header fields in the order received, repeated fields kept, names as sent.
    headers: list[tuple[str, str]]
    #: The decoded body; always b"" for /upload (see body_length and body_sha256).
    body: bytes
    body_length: int
    body_sha256: str
    #: Trailer fields of a chunked body, in order.
    trailers: list[tuple[str, str]] = field(default_factory=list)
    #: "HTTP/1.1" or "HTTP/1.0".
    version: str = "HTTP/1.1"
    #: The client's (the proxy's) port: requests with the same one shared a connection.
    client_port: int = 0

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (any case), or None."""
        lowered = name.lower()
        return next((v for n, v in self.headers if n.lower() == lowered), None)

    def header_values(self, name: str) -> list[str]:
        """Return every value of header ``name`` (any case), in order."""
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]

    def has_header(self, name: str) -> bool:
        """Return True if header ``name`` (any case) was received."""
        return self.header(name) is not None


class _BodyError(Exception):
    """The request body could not be read (client gone or malformed framing)."""


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, so stop() never waits on them."""

    daemon_threads = True
    block_on_close = False  # we join our own threads, after waking them up
    backend: TestBackend

    def __init__(self, backend: TestBackend) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.open_connections: set[socket.socket] = set()
        self.reset_connections: set[socket.socket] = set()
        self.handler_threads: list[threading.Thread] = []
        self.accepted = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"TestBackend-{self.server_address[1]}-conn",
            daemon=True,
        )
        with self.lock:
            self.accepted += 1
            self.open_connections.add(request)
            self.handler_threads = [t for t in self.handler_threads if t.is_alive()]
            self.handler_threads.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.open_connections.discard(request)
            reset = request in self.reset_connections
            self.reset_connections.discard(request)
        if reset:  # SO_LINGER 0 is set: close() sends RST, no FIN first
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients that go away mid-answer are part of what is tested."""

    def abort_connections(self) -> None:
        """Wake every handler blocked on a connection (idle keep-alive, stalled writes)."""
        with self.lock:
            connections = list(self.open_connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: no access log on stderr."""

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):  # any method, including made-up ones
            return self._dispatch
        raise AttributeError(name)

    # ------------------------------------------------------------------------- reading

    def _read_body(self, sink: Callable[[bytes], None]) -> list[tuple[str, str]]:
        """Feed the request body to ``sink`` piece by piece; return the chunked trailers."""
        encoding = self.headers.get("Transfer-Encoding", "")
        if "chunked" in encoding.lower():
            return self._read_chunked(sink)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return []
        try:
            remaining = int(length_text)
        except ValueError:
            raise _BodyError(f"bad Content-Length {length_text!r}") from None
        while remaining > 0:
            data = self.rfile.read(min(remaining, CHUNK_SIZE))
            if not data:
                raise _BodyError("client closed the connection mid-body")
            sink(data)
            remaining -= len(data)
        return []

    def _read_chunked(self, sink: Callable[[bytes], None]) -> list[tuple[str, str]]:
        """Decode a chunked body (RFC 9112 §7.1): sizes in hex, extensions ignored."""
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise _BodyError("truncated chunk size line")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BodyError(f"bad chunk size line {line!r}") from None
            if size == 0:
                break
            remaining = size
            while remaining > 0:
                data = self.rfile.read(min(remaining, CHUNK_SIZE))
                if not data:
                    raise _BodyError("client closed the connection mid-chunk")
                sink(data)
                remaining -= len(data)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyError("chunk not followed by CRLF")
        trailers: list[tuple[str, str]] = []
        while True:
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n"):
                return trailers
            if not line.endswith(b"\n"):
                raise _BodyError("truncated trailer section")
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name.strip(), value.strip()))

    # ------------------------------------------------------------------------- routing

    def _dispatch(self) -> None:
        backend = self.server.backend
        words = self.requestline.split()
        target = words[1] if len(words) >= 2 else self.path
        path = target.split("?", 1)[0]
        if not path.startswith("/"):  # absolute-form: keep only the path
            after = path.split("://", 1)[-1]
            path = "/" + after.split("/", 1)[1] if "/" in after else "/"

        if path == "/health":
            try:
                self._read_body(lambda _data: None)
            except _BodyError:
                self.close_connection = True
                return
            with backend._lock:
                backend._probes += 1
            status = backend.health_status
            self._answer(status, b"healthy" if status == 200 else b"unhealthy")
            return

        digest = hashlib.sha256()
        received = bytearray()
        length = 0
        store = not path.startswith("/upload")  # uploads are hashed, never kept

        def sink(data: bytes) -> None:
            nonlocal length
            digest.update(data)
            length += len(data)
            if store:
                received.extend(data)

        try:
            trailers = self._read_body(sink)
        except _BodyError:
            self.close_connection = True
            return
        record = RecordedRequest(
            method=self.command,
            target=target,
            headers=list(self.headers.items()),
            body=bytes(received),
            body_length=length,
            body_sha256=digest.hexdigest(),
            trailers=trailers,
            version=self.request_version,
            client_port=self.client_address[1],
        )
        backend._record(record)
        self._route(path, record)

    def _route(self, path: str, record: RecordedRequest) -> None:
        port = self.server.server_address[1]
        if path.startswith(("/echo", "/upload")):
            self._answer(200, self._echo_json(record), content_type="application/json")
        elif path.startswith("/status/"):
            self._status(path[len("/status/") :])
        elif path.startswith("/slow/"):
            try:
                seconds = float(path[len("/slow/") :])
            except ValueError:
                self._answer(400, b"bad duration")
                return
            self.server.backend._stopping.wait(seconds)
            self._answer(200, b"slow")
        elif path == "/drop":
            self.close_connection = True  # FIN without a byte of answer
        elif path == "/reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self.server.lock:
                self.server.reset_connections.add(self.connection)
        elif path == "/reset-mid-body":
            self.send_response(200)
            self.send_header("Content-Length", str(RESET_ANNOUNCED))
            self.end_headers()
            self.wfile.write(_PATTERN[:RESET_SENT])
            self.close_connection = True
        elif path.startswith(("/big/", "/chunked/")):
            self._stream(path)
        elif path == "/gzip":
            self._answer(
                200,
                gzip.compress(GZIP_PLAIN, mtime=0),
                extra=[("Content-Encoding", "gzip")],
            )
        elif path == "/cookies":
            self._answer(200, b"cookies", extra=[("Set-Cookie", c) for c in COOKIES])
        elif path == "/hop":
            self._answer(200, b"hop", extra=list(HOP_RESPONSE_HEADERS))
            self.close_connection = True  # as its Connection: close says
        else:
            self._answer(200, f"ok from {port}".encode(), extra=[("X-Backend", str(port))])

    # ------------------------------------------------------------------------- writing

    def _answer(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra or ():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _status(self, text: str) -> None:
        try:
            status = int(text)
        except ValueError:
            self._answer(400, b"bad status")
            return
        if not 200 <= status <= 599:
            self._answer(400, b"status must be 200-599")
            return
        extra = [("Location", "/elsewhere")] if 300 <= status <= 399 else []
        if status in (204, 304):  # no body, and 204 must not carry Content-Length
            self.send_response(status)
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            return
        self._answer(status, f"status {status}".encode(), extra=extra)

    def _stream(self, path: str) -> None:
        kind, _, size_text = path[1:].partition("/")
        try:
            nbytes = int(size_text)
        except ValueError:
            self._answer(400, b"bad size")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if kind == "big":
            self.send_header("Content-Length", str(nbytes))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        for piece in body_chunks(nbytes):
            if kind == "big":
                self.wfile.write(piece)
            else:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        if kind == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def _echo_json(self, record: RecordedRequest) -> bytes:
        return json.dumps(
            {
                "backend": self.server.server_address[1],
                "method": record.method,
                "target": record.target,
                "version": record.version,
                "headers": [list(pair) for pair in record.headers],
                "trailers": [list(pair) for pair in record.trailers],
                "body_length": record.body_length,
                "body_sha256": record.body_sha256,
            }
        ).encode()


class TestBackend:
    """A real HTTP/1.1 backend on 127.0.0.1 that records what it receives.

    Started on creation; usable as a context manager; :meth:`stop` is idempotent and wakes
    handlers blocked on idle keep-alive connections or in /slow, so it never hangs.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self) -> None:
        self._lock = threading.Lock()  # protects _requests and _probes
        self._requests: list[RecordedRequest] = []
        self._probes = 0
        self._stopping = threading.Event()
        #: Status /health answers with; set it to make the health probe fail.
        self.health_status = 200
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"TestBackend-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        state = "stopped" if self._stopping.is_set() else "running"
        return (
            f"<TestBackend {self.url} {state}: {self.request_count} requests, "
            f"{self.probes} probes, {self.connections} connections>"
        )

    def __enter__(self) -> TestBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far except /health probes, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many requests were received, /health probes excluded."""
        with self._lock:
            return len(self._requests)

    @property
    def last(self) -> RecordedRequest:
        """The most recent request (not probe); AssertionError if there was none."""
        with self._lock:
            assert self._requests, f"{self.url} received no request"
            return self._requests[-1]

    @property
    def probes(self) -> int:
        """How many /health requests were received."""
        with self._lock:
            return self._probes

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted (probes included)."""
        with self._server.lock:
            return self._server.accepted

    def clear(self) -> None:
        """Forget the requests and probes recorded so far."""
        with self._lock:
            self._requests.clear()
            self._probes = 0

    def stop(self) -> None:
        """Stop serving, close every connection and the listening socket; idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.abort_connections()
        self._thread.join(5)
        with self._server.lock:
            threads = list(self._server.handler_threads)
        for thread in threads:
            thread.join(5)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port() -> int:
    """Return a port on 127.0.0.1 where nothing listens: connecting to it is refused."""
    return free_port()


class RefusingURL(str):
    """``http://127.0.0.1:PORT`` for a port where nothing listens; ``.port`` is PORT."""

    port: int

    def __new__(cls) -> RefusingURL:
        port = closed_port()
        url = super().__new__(cls, f"http://127.0.0.1:{port}")
        url.port = port
        return url


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once something accepts TCP connections on host:port; TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from exc
            time.sleep(0.05)
