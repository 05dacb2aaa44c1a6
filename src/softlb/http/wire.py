"""The proxy's HTTP/1.1 client for ``http://`` backends: pooled keep-alive sockets, one
``sendall()`` per request, the answer's head parsed from one ``recv()``.

Why not urllib3 here: a profile of ``softlb serve`` (benchmarks/README.md) found that the
client side of a small proxied request cost about as much as all of gunicorn, and that most
of it was machinery a proxy does not need: ``http.client``'s ``email.parser`` header parsing,
urllib3's response and header-dict objects, a ``poll()`` before every reuse of a pooled
connection and two ``settimeout()`` calls per request (each a system call that releases the
GIL). This module does what the proxy needs and nothing else:

* the request head is built as one string, checked in one pass, and sent with the body (when
  it is in memory) in one ``sendall()``; the socket timeout is set once per connection;
* the answer's head is split with ``str`` methods, fields validated with one regular
  expression each; framing follows RFC 9112 §6.3 (no body for HEAD, 1xx, 204 and 304;
  ``Transfer-Encoding`` and ``Content-Length`` together, or conflicting lengths, are an
  error; otherwise the body runs to the end of the connection); 1xx interim answers are
  skipped;
* a pooled connection is checked with one non-blocking peek before reuse (closed by the
  backend, or bytes nobody asked for: either way it is dropped); when a *reused* connection
  still fails before the first byte of an answer, the request goes once more on a fresh
  connection if it may be resent (Go's ``net/http`` Transport rule), and the backend is not
  blamed for it.

Everything that goes wrong leaves as :class:`~softlb.errors.UpstreamConnectError`,
:class:`~softlb.errors.UpstreamTimeout` or :class:`~softlb.errors.UpstreamBroken`, as from
:class:`~softlb.http.upstream.Upstream` (urllib3), which serves ``https://`` backends beside
it (:class:`~softlb.http.transport.SchemeRouter`) and the client-side balancer.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import struct
import sys
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Final
from urllib.parse import urlsplit

from softlb.errors import UpstreamBroken, UpstreamConnectError, UpstreamError, UpstreamTimeout
from softlb.http.upstream import (
    CHUNK_SIZE,
    TimeoutValue,
    timeout_pair,
)
from softlb.retry import may_resend

__all__ = ["MAX_HEAD", "MAX_INTERIM", "ProxyUpstream", "WireResponse"]

#: Largest status line + header block accepted from a backend (nginx's default is 4-8 KiB,
#: and answers 502 above it, as softlb does above this).
MAX_HEAD: Final = 64 * 1024

#: Most interim (1xx) answers accepted before the final one, as Go's Transport.
MAX_INTERIM: Final = 5

#: Size of one ``recv()`` for an answer's head and for chunked bodies.
_RECV: Final = 64 * 1024

#: Most bytes asked of one ``recv()`` when streaming a body: the kernel hands over what it
#: has, so a trickle is not held back. Larger reads (256 KiB, 1 MiB) measured no faster on
#: /big (256 KiB) under ``softlb serve``.
_STREAM_RECV: Final = 64 * 1024

#: Longest chunk-size line or trailer line of a chunked answer, and most trailer lines.
_MAX_LINE: Final = 8 * 1024
_MAX_TRAILERS: Final = 100

_TCHAR: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN: Final = re.compile(f"{_TCHAR}+")
#: Controls that may not appear in a head at all (tab, CR and LF are checked apart).
_BAD_HEAD_CHAR: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: What may not appear in a request target on the wire (controls, space, DEL).
_BAD_TARGET: Final = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE: Final = re.compile(r"[\r\n\x00]")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

#: Methods whose requests carry a body by definition: without one, ``Content-Length: 0`` is
#: sent, as ``http.client`` does.
_METHODS_WITH_BODY: Final = frozenset({"POST", "PUT", "PATCH"})

_NO_BODY: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_UNTIL_CLOSE: Final = 3

_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)

#: Whether socket timeouts are the kernel's (see :meth:`_Conn.set_timeout`).
_KERNEL_TIMEOUTS: Final = (
    sys.platform.startswith("linux") and struct.calcsize("@l") == 8 and bool(_DONTWAIT)
)

#: What a read or write that ran out of time raises: Python's own timeout, or the kernel's
#: (``EAGAIN`` on a blocking socket with ``SO_RCVTIMEO``).
_TIMEOUTS: Final = (TimeoutError, BlockingIOError)


class _ProtocolError(Exception):
    """The backend's answer is not valid HTTP/1.1."""


class _Stale(Exception):
    """A reused connection failed before any byte of the answer: it was closed while idle."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Conn:
    """One keep-alive socket to a backend."""

    __slots__ = ("reused", "sock", "timeout")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timeout: float | None = -1.0  # not set yet
        self.reused = False

    def closed_by_peer(self) -> bool:
        """Whether the backend closed (or wrote to) this idle connection: one look that
        does not wait. Either way the connection is unusable: bytes nobody asked for would
        be read as the next request's answer."""
        try:
            if _KERNEL_TIMEOUTS:  # a blocking socket: a peek that must not block
                self.sock.recv(1, socket.MSG_PEEK | _DONTWAIT)
                return True
            # A socket with a Python timeout would wait that long in recv(): ask select().
            readable, _, _ = select.select([self.sock], [], [], 0)  # pragma: no cover
            return bool(readable)  # pragma: no cover
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def set_timeout(self, seconds: float | None) -> None:
        """Limit each later read and write on the socket to ``seconds`` (``None``: no limit).

        On Linux the socket stays in blocking mode with the kernel's ``SO_RCVTIMEO`` and
        ``SO_SNDTIMEO``: Python then calls ``recv()`` and ``send()`` straight away instead
        of ``poll()`` before each, as it does for a socket with a Python-level timeout. A
        limit that expires raises ``BlockingIOError`` there; callers treat it as a timeout.
        """
        if _KERNEL_TIMEOUTS:
            whole = 0.0 if seconds is None else max(seconds, 1e-6)
            value = struct.pack("@ll", int(whole), int((whole % 1) * 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self.sock.settimeout(None)
        else:  # pragma: no cover - other platforms
            self.sock.settimeout(seconds)
        self.timeout = seconds

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Backend:
    """The address of one backend and its idle connections (last used first)."""

    __slots__ = ("base", "closed", "host", "host_header", "idle", "maxsize", "port", "url")

    def __init__(self, url: str, maxsize: int) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = 80 if parts.port is None else parts.port
        # Host as http.client writes it: the port only when it is not the scheme's default.
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = netloc if self.port == 80 else f"{netloc}:{self.port}"
        self.base = parts.path.rstrip("/")
        self.maxsize = maxsize
        self.idle: deque[_Conn] = deque()
        self.closed = False

    def put(self, conn: _Conn) -> None:
        if self.closed or len(self.idle) >= self.maxsize:
            conn.close()
            return
        conn.reused = True
        self.idle.append(conn)
        if self.closed:  # forget() ran meanwhile: do not leave it open
            self.close()

    def take(self) -> _Conn | None:
        """The most recently used idle connection that the backend has neither closed nor
        written to since its last answer (bytes nobody asked for would be read as the next
        request's answer)."""
        idle = self.idle
        while True:
            try:
                conn = idle.pop()
            except IndexError:
                return None
            if not conn.closed_by_peer():
                return conn
            conn.close()

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                conn = self.idle.pop()
            except IndexError:
                return
            conn.close()


class WireResponse:
    """A backend's answer whose body has not been read yet (the proxy's side of
    :class:`~softlb.http.upstream.UpstreamResponse`, with the same methods).

    ``headers`` are the answer's header fields in order, names as the backend spelled them.
    ``length`` is the body's size when known (0 when there is none), else ``None``.
    """

    __slots__ = (
        "_backend",
        "_buf",
        "_conn",
        "_done",
        "_mode",
        "_pos",
        "_remaining",
        "_reusable",
        "headers",
        "length",
        "reason",
        "status",
    )

    def __init__(
        self,
        *,
        backend: _Backend,
        conn: _Conn,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        mode: int,
        length: int | None,
        reusable: bool,
        rest: bytes,
    ) -> None:
        self._backend = backend
        self._conn: _Conn | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._mode = mode
        self.length = length
        self._remaining = length if length is not None else -1
        self._reusable = reusable
        self._buf = rest
        self._pos = 0
        self._done = mode == _NO_BODY

    # -- reading ---------------------------------------------------------------------------

    def read_small(self) -> bytes:
        """The whole body (call only when :attr:`length` is known and small)."""
        if self._mode != _LENGTH:
            return b"".join(self.chunks())
        remaining = self._remaining
        buf = self._buf
        if len(buf) >= remaining:  # the usual case: the body came with the head
            if len(buf) > remaining:
                self._reusable = False  # bytes after the body: the connection is unusable
            self._buf = b""
            self._remaining = 0
            self._done = True
            return buf if len(buf) == remaining else buf[:remaining]
        return b"".join(self.chunks(remaining))

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The body as it arrives, undecoded and de-chunked, in pieces of up to ``size``
        bytes (a known-length body in whatever pieces the connection delivers)."""
        try:
            if self._mode == _LENGTH:
                yield from self._length_body()
            elif self._mode == _CHUNKED:
                yield from self._chunked_body(size)
            elif self._mode == _UNTIL_CLOSE:
                yield from self._close_delimited_body()
        except _ProtocolError as exc:
            raise UpstreamBroken(
                f"invalid answer from {self._backend.url}: {exc}", backend=self._backend.url
            ) from exc
        except _TIMEOUTS as exc:
            raise UpstreamTimeout(
                f"backend did not answer in time: {self._backend.url}", backend=self._backend.url
            ) from exc
        except OSError as exc:
            raise UpstreamBroken(
                f"connection to {self._backend.url} failed: {_describe(exc)}",
                backend=self._backend.url,
            ) from exc

    def _recv(self, size: int) -> bytes:
        conn = self._conn
        if conn is None:
            raise OSError("connection closed")
        return conn.sock.recv(size)

    def _length_body(self) -> Iterator[bytes]:
        remaining = self._remaining
        buf = self._buf
        if buf:
            self._buf = b""
            if len(buf) > remaining:
                self._reusable = False
                buf = buf[:remaining]
            remaining -= len(buf)
            self._remaining = remaining
            yield buf
        while remaining > 0:
            data = self._recv(min(remaining, _STREAM_RECV))
            if not data:
                raise _ProtocolError(f"connection closed {remaining} bytes before the body's end")
            remaining -= len(data)
            self._remaining = remaining
            yield data
        self._done = True

    def _close_delimited_body(self) -> Iterator[bytes]:
        buf = self._buf
        if buf:
            self._buf = b""
            yield buf
        while True:
            data = self._recv(_STREAM_RECV)
            if not data:
                self._done = True
                return
            yield data

    def _fill(self) -> None:
        """Read more of the answer into the buffer; a close here is an error."""
        data = self._recv(_RECV)
        if not data:
            raise _ProtocolError("connection closed inside a chunked body")
        buf = self._buf
        self._buf = buf[self._pos :] + data if self._pos < len(buf) else data
        self._pos = 0

    def _line(self) -> bytes:
        """The next line of the chunked framing, without its line end."""
        while True:
            buf, pos = self._buf, self._pos
            end = buf.find(b"\n", pos)
            if end >= 0:
                if end - pos > _MAX_LINE:
                    raise _ProtocolError("chunk line too long")
                self._pos = end + 1
                return buf[pos : end - 1 if end > pos and buf[end - 1] == 13 else end]
            if len(buf) - pos > _MAX_LINE:
                raise _ProtocolError("chunk line too long")
            self._fill()

    def _take(self, most: int) -> bytes:
        """Up to ``most`` bytes: what is buffered, else one ``recv()``."""
        if self._pos >= len(self._buf):
            self._fill()
        buf, pos = self._buf, self._pos
        if pos == 0 and len(buf) <= most:
            self._buf = b""
            return buf
        piece = buf[pos : pos + most]
        self._pos = pos + len(piece)
        return piece

    def _chunked_body(self, size: int) -> Iterator[bytes]:
        while True:
            line = self._line()
            text = line.split(b";", 1)[0].strip(b" \t")
            if not text or len(text) > 16 or not _HEX.issuperset(text.decode("latin-1")):
                raise _ProtocolError(f"bad chunk size {line[:40]!r}")
            left = int(text, 16)
            if left == 0:
                break
            while left > 0:
                piece = self._take(min(left, size))
                left -= len(piece)
                yield piece
            if self._line():
                raise _ProtocolError("chunk data longer than its size")
        for _ in range(_MAX_TRAILERS + 1):  # trailer fields: dropped, like the other framing
            if not self._line():
                break
        else:
            raise _ProtocolError(f"more than {_MAX_TRAILERS} trailer fields")
        if self._pos < len(self._buf):
            self._reusable = False  # bytes after the body
        self._buf = b""
        self._done = True

    # -- the end ---------------------------------------------------------------------------

    def close(self, complete: bool) -> None:
        """Give the connection back to its pool if the body was read to its end and the
        connection may carry another request; else close it."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if complete and self._done and self._reusable:
            self._backend.put(conn)
        else:
            conn.close()

    def __repr__(self) -> str:
        return f"<WireResponse {self.status} from {self._backend.url}>"


class ProxyUpstream:
    """Keep-alive connections to ``http://`` backends for the reverse proxy: a
    :class:`~softlb.http.transport.Transport`.

    ``maxsize`` is how many idle connections are kept per backend (the server's thread
    count); more are opened when needed and closed afterwards, never waited for. ``https://``
    backends are urllib3's (:class:`~softlb.http.upstream.Upstream`), which does TLS: the
    composition root puts both behind a :class:`~softlb.http.transport.SchemeRouter`
    (:func:`~softlb.http.transport.proxy_transport`); a request for another scheme here is an
    :class:`~softlb.errors.UpstreamConnectError`.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        maxsize: int = 10,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.maxsize = maxsize
        self._lock = threading.Lock()
        # written under _lock; read with a plain dict lookup
        self._backends: dict[str, _Backend] = {}
        # Idle sockets are closed when the upstream is dropped without close(), as urllib3's
        # pools do.
        self._finalizer = weakref.finalize(self, _close_all, self._backends, self._lock)

    def _backend(self, url: str) -> _Backend:
        backend = self._backends.get(url)
        if backend is None:
            with self._lock:
                backend = self._backends.get(url)
                if backend is None:
                    backend = self._backends[url] = _Backend(url, self.maxsize)
        return backend

    def forget(self, backend_url: str) -> None:
        """Close the pooled connections of a backend that left the pool."""
        with self._lock:
            backend = self._backends.pop(backend_url, None)
        if backend is not None:
            backend.close()

    def close(self) -> None:
        """Close every pooled connection."""
        _close_all(self._backends, self._lock)

    def request(
        self,
        backend_url: str,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | Iterable[bytes] | None,
        *,
        chunked: bool = False,
        timeout: TimeoutValue = None,
    ) -> WireResponse:
        """Send one request and return the answer's status and headers, body unread.

        Same contract as :meth:`Upstream.request() <softlb.http.upstream.Upstream.request>`:
        ``target`` is sent byte for byte after the backend URL's base path; ``body`` is
        bytes, an iterable of bytes (``chunked=True`` when its length is unknown) or
        ``None``; ``headers`` are sent as given (no User-Agent or Accept-Encoding is added).
        """
        if not backend_url.startswith("http://"):
            raise UpstreamConnectError(
                f"this client speaks http:// only, not to {backend_url}", backend=backend_url
            )
        backend = self._backend(backend_url)
        connect_timeout, read_timeout = timeout_pair(
            timeout, (self.connect_timeout, self.read_timeout)
        )
        head, data, stream, chunked = _encode_request(
            backend, method, target, headers, body, chunked=chunked
        )
        resendable = stream is None and may_resend(method, "Idempotency-Key" in headers)
        fresh = False
        while True:
            conn = None if fresh else backend.take()
            if conn is None:
                conn = self._connect(backend, connect_timeout)
            if conn.timeout != read_timeout:
                try:
                    conn.set_timeout(read_timeout)
                except OSError as exc:
                    conn.close()
                    raise UpstreamConnectError(
                        f"connect failed: {backend.url} ({_describe(exc)})", backend=backend.url
                    ) from exc
            try:
                return self._exchange(
                    backend,
                    conn,
                    method=method,
                    head=head,
                    body=data,
                    stream=stream,
                    chunked=chunked,
                )
            except _Stale as exc:
                conn.close()
                if resendable and not fresh:
                    fresh = True  # once more, on a new connection
                    continue
                raise _broken(backend, exc.cause) from exc.cause
            except BaseException:
                conn.close()
                raise

    @staticmethod
    def _connect(backend: _Backend, connect_timeout: float | None) -> _Conn:
        url = backend.url
        try:
            sock = socket.create_connection((backend.host, backend.port), timeout=connect_timeout)
        except _TIMEOUTS as exc:
            raise UpstreamConnectError(f"connect timed out: {url}", backend=url) from exc
        except ConnectionRefusedError as exc:
            raise UpstreamConnectError(f"connection refused: {url}", backend=url) from exc
        except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: a bad IDNA host
            raise UpstreamConnectError(
                f"connect failed: {url} ({_describe(exc)})", backend=url
            ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # pragma: no cover - a fresh TCP socket accepts it
            sock.close()
            raise UpstreamConnectError(f"connect failed: {url} ({exc})", backend=url) from exc
        return _Conn(sock)

    @staticmethod
    def _exchange(
        backend: _Backend,
        conn: _Conn,
        *,
        method: str,
        head: bytes,
        body: bytes,
        stream: Iterable[bytes] | None,
        chunked: bool,
    ) -> WireResponse:
        sock = conn.sock
        reused = conn.reused
        complete = True  # whether the whole body went out (else the backend answered early)
        try:
            if stream is None:
                sock.sendall(head + body if len(body) <= _RECV else head)
                if len(body) > _RECV:
                    sock.sendall(body)
            else:
                sock.sendall(head)
                complete = _send_stream(sock, stream, chunked=chunked)
        except (*_TIMEOUTS, OSError) as exc:
            # A backend may answer before it has read the whole body (an early 413 or 401)
            # and close, or stop reading: the send then fails or times out with the answer
            # waiting to be read. It is passed on, as nginx does; else the failure stands.
            data = _waiting_answer(sock)
            if not data:
                if isinstance(exc, _TIMEOUTS):
                    raise UpstreamTimeout(
                        f"backend did not answer in time: {backend.url}", backend=backend.url
                    ) from exc
                if reused:
                    raise _Stale(exc) from exc
                raise _broken(backend, exc) from exc
            complete = False
        else:
            try:
                data = sock.recv(_RECV)
            except _TIMEOUTS as exc:
                raise UpstreamTimeout(
                    f"backend did not answer in time: {backend.url}", backend=backend.url
                ) from exc
            except OSError as exc:
                if reused:
                    raise _Stale(exc) from exc
                raise _broken(backend, exc) from exc
        if not data:
            if reused:
                raise _Stale(ConnectionResetError("closed before answering"))
            raise UpstreamBroken(
                f"connection to {backend.url} failed: closed before answering",
                backend=backend.url,
            )
        try:
            resp = _read_answer(backend, conn, method, data)
            if not complete:
                resp._reusable = False  # the rest of the body was never sent
            return resp
        except _ProtocolError as exc:
            raise UpstreamBroken(
                f"invalid answer from {backend.url}: {exc}", backend=backend.url
            ) from exc
        except _TIMEOUTS as exc:
            raise UpstreamTimeout(
                f"backend did not answer in time: {backend.url}", backend=backend.url
            ) from exc
        except OSError as exc:
            raise _broken(backend, exc) from exc

    def __repr__(self) -> str:
        return f"<ProxyUpstream [{len(self._backends)} backends] maxsize={self.maxsize}>"


def _close_all(backends: dict[str, _Backend], lock: threading.Lock) -> None:
    with lock:
        dropped = list(backends.values())
        backends.clear()
    for backend in dropped:
        backend.close()


def _broken(backend: _Backend, exc: BaseException) -> UpstreamError:
    return UpstreamBroken(
        f"connection to {backend.url} failed: {_describe(exc)}", backend=backend.url
    )


def _describe(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the request ---------------------------------------------------------------------------


def _encode_request(
    backend: _Backend,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | Iterable[bytes] | None,
    *,
    chunked: bool,
) -> tuple[bytes, bytes, Iterable[bytes] | None, bool]:
    """The request head as bytes, the body when it is in memory, the body's stream, and
    whether the stream goes out in chunked encoding.

    Raises ``ValueError`` for a method, target or header that cannot go on the wire, as
    ``http.client`` does.
    """
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"method {method!r} is not an HTTP token")
    base = backend.base
    if base:
        target = base + target if target.startswith("/") else f"{base}/{target}"
    if _BAD_TARGET.search(target):
        raise ValueError(f"request target {target!r} contains controls or spaces")
    lines = [f"{method} {target} HTTP/1.1"]
    present = {name.lower() for name in headers}
    framed = "content-length" in present or "transfer-encoding" in present
    if "host" not in present:
        lines.append(f"Host: {backend.host_header}")
    stream: Iterable[bytes] | None = None
    data = b""
    framing = ""
    if body is None:
        chunked = False
        if method in _METHODS_WITH_BODY and not framed:
            framing = "Content-Length: 0"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        chunked = False
        data = bytes(body)
        if not framed:
            framing = f"Content-Length: {len(data)}"
    else:
        stream = body
        if not chunked and not framed:
            chunked = True  # a stream of unknown length
        if chunked:
            if "content-length" in present:  # never both (RFC 9112 §6.2): a smuggling risk
                headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            if "transfer-encoding" not in present:
                framing = "Transfer-Encoding: chunked"
    for name in headers:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if framing:
        lines.append(framing)
    lines.append("\r\n")
    text = "\r\n".join(lines)
    # A value with a line break would smuggle a header or a request: one count over the block.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\x00" in text:
        bad = next(name for name, value in headers.items() if _BAD_VALUE.search(value))
        raise ValueError(f"invalid value for header {bad!r}: line breaks or NUL")
    return text.encode("latin-1"), data, stream, chunked


def _send_stream(sock: socket.socket, stream: Iterable[bytes], *, chunked: bool) -> bool:
    """Send a streamed body; False if the backend's final answer arrived first (an early
    413 or 401: the rest of the body is not sent, as nginx stops sending it)."""
    for piece in stream:
        if piece:
            if _answer_arrived(sock):
                return False
            sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        sock.sendall(b"0\r\n\r\n")
    return True


def _answer_arrived(sock: socket.socket) -> bool:
    """Whether a final (not 1xx) answer has begun to arrive: one look that does not wait."""
    try:
        if _KERNEL_TIMEOUTS:  # a blocking socket: a peek that must not block
            start = sock.recv(12, socket.MSG_PEEK | _DONTWAIT)
        else:  # pragma: no cover - other platforms
            readable, _, _ = select.select([sock], [], [], 0)
            start = sock.recv(12, socket.MSG_PEEK) if readable else b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False  # the next send reports it
    return len(start) >= 10 and start[9:10] != b"1"


def _waiting_answer(sock: socket.socket) -> bytes:
    """What the backend has sent so far, without waiting (``b""``: nothing)."""
    try:
        if _KERNEL_TIMEOUTS:
            return sock.recv(_RECV, _DONTWAIT)
        readable, _, _ = select.select([sock], [], [], 0)  # pragma: no cover
        return sock.recv(_RECV) if readable else b""  # pragma: no cover
    except OSError:
        return b""


# -- the answer ----------------------------------------------------------------------------


def _head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line that ends a head in ``buf``, or -1; the search starts
    at ``start`` (callers pass where the bytes new since the last search begin, less two)."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if 0 <= lf < crlf:
        return lf + 2
    return crlf + 3


def _read_answer(backend: _Backend, conn: _Conn, method: str, data: bytes) -> WireResponse:
    """Parse the answer that starts with ``data`` (reading more as needed); up to
    :data:`MAX_INTERIM` interim (1xx) answers before it are skipped."""
    sock = conn.sock
    interim = 0
    while True:
        end = _head_end(data)
        if end < 0:
            # A head in many pieces: appended in place and searched only where the new bytes
            # could complete the blank line, so a head that trickles in costs linear time.
            buf = bytearray(data)
            while end < 0:
                if len(buf) > MAX_HEAD:
                    raise _ProtocolError(f"header block larger than {MAX_HEAD // 1024} KiB")
                more = sock.recv(_RECV)
                if not more:
                    raise _ProtocolError("connection closed inside the header block")
                start = max(len(buf) - 2, 0)
                buf += more
                end = _head_end(buf, start)
            data = bytes(buf)
        if end > MAX_HEAD:
            raise _ProtocolError(f"header block larger than {MAX_HEAD // 1024} KiB")
        head, data = data[:end], data[end:]
        head_fields = _parse_head(head.decode("latin-1"))
        status = head_fields.status
        if status >= 200:
            break
        if status == 101:  # softlb never forwards Upgrade, so it cannot follow a switch
            raise _ProtocolError("101 Switching Protocols to a request that asked for none")
        interim += 1
        if interim > MAX_INTERIM:
            raise _ProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")
        if not data:
            data = sock.recv(_RECV)
            if not data:
                raise _ProtocolError("connection closed after an interim answer")
    headers = head_fields.headers
    connection = head_fields.connection
    reusable = "close" not in connection and (head_fields.http11 or "keep-alive" in connection)
    length: int | None = None
    if head_fields.lengths:
        length = _content_length(head_fields.lengths)
        if len(head_fields.lengths) > 1 or "," in head_fields.lengths[0]:
            headers = _one_length(headers, length)  # "2, 2" and repeats are passed on as "2"
    if method == "HEAD" or status in (204, 304):
        mode, length = _NO_BODY, 0
    elif head_fields.chunked is not None:
        # Only "chunked" alone is understood. With a Content-Length beside it, RFC 9112 §6.3
        # lets Transfer-Encoding win but says the answer "ought to be handled as an error" (a
        # sign of response splitting): refused, as nginx and the event loop (llhttp) do.
        if not head_fields.chunked:
            raise _ProtocolError(f"unsupported transfer coding {head_fields.codings!r}")
        if head_fields.lengths:
            raise _ProtocolError("an answer with both Content-Length and Transfer-Encoding")
        if not head_fields.http11:
            reusable = False  # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is suspect
        mode, length = _CHUNKED, None
    elif length is not None:
        mode = _LENGTH if length else _NO_BODY
    else:
        mode, reusable = _UNTIL_CLOSE, False
    if mode == _NO_BODY and data:
        reusable = False  # bytes where no body may be
    return WireResponse(
        backend=backend,
        conn=conn,
        status=status,
        reason=head_fields.reason,
        headers=headers,
        mode=mode,
        length=length,
        reusable=reusable,
        rest=data,
    )


def _content_length(values: list[str]) -> int:
    """The one length that ``Content-Length`` values (lists, repeats) agree on."""
    texts = {text.strip(" \t") for value in values for text in value.split(",")}
    if len(texts) != 1:
        raise _ProtocolError(f"conflicting Content-Length values {sorted(texts)}")
    text = texts.pop()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise _ProtocolError(f"bad Content-Length {text[:40]!r}")
    return int(text)


def _one_length(headers: list[tuple[str, str]], length: int) -> list[tuple[str, str]]:
    """``headers`` with their Content-Length fields replaced by one, where the first was."""
    result: list[tuple[str, str]] = []
    seen = False
    for name, value in headers:
        if name.lower() == "content-length":
            if seen:
                continue
            seen = True
            result.append((name, str(length)))
        else:
            result.append((name, value))
    return result


class _Head:
    """An answer's status line and header fields, with what framing and reuse depend on."""

    __slots__ = (
        "chunked",
        "codings",
        "connection",
        "headers",
        "http11",
        "lengths",
        "reason",
        "status",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        self.http11 = True
        self.headers: list[tuple[str, str]] = []
        self.lengths: list[str] = []
        self.codings: list[str] = []
        #: None without Transfer-Encoding; else whether it is exactly "chunked".
        self.chunked: bool | None = None
        self.connection: frozenset[str] = frozenset()


def _parse_head(text: str) -> _Head:
    """The status line and header fields of a head (``text``: latin-1, ends in a blank line).

    Controls other than tab are refused anywhere in the head, a CR only before LF; folded
    lines (obs-fold) are joined with a space before anything is read from them, and
    whitespace before a colon is removed (RFC 9112 §5.1, §5.2).
    """
    if _BAD_HEAD_CHAR.search(text) or text.count("\r") != text.count("\r\n"):
        raise _ProtocolError("control characters in the header block")
    lines = text.split("\n")
    status_line = lines[0].removesuffix("\r")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or len(code) != 3
        or not code.isascii()
        or not code.isdigit()
        or code[0] == "0"
    ):
        raise _ProtocolError(f"bad status line {status_line[:80]!r}")
    head = _Head()
    head.status = status = int(code)
    head.reason = reason.strip(" \t") or http.client.responses.get(status, "")
    head.http11 = version == "HTTP/1.1"
    fields: list[str] = []
    for raw in lines[1:]:
        line = raw.removesuffix("\r")
        if not line:
            continue
        if line[0] in " \t":
            if not fields:
                raise _ProtocolError("continuation line before any header")
            fields[-1] = fields[-1].rstrip(" \t") + " " + line.strip(" \t")
            continue
        fields.append(line)
    headers = head.headers
    connection: list[str] = []
    for line in fields:
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not _TOKEN.fullmatch(name):
            raise _ProtocolError(f"bad header line {line[:80]!r}")
        value = value.strip(" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == "content-length":
            head.lengths.append(value)
        elif lower == "transfer-encoding":
            head.codings.extend(c.strip(" \t").lower() for c in value.split(","))
            head.chunked = head.codings == ["chunked"]
        elif lower == "connection":
            connection.extend(c.strip(" \t").lower() for c in value.split(","))
    head.connection = frozenset(connection)
    return head
