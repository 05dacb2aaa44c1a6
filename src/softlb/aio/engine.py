"""The event-loop data plane: one asyncio loop (uvloop when installed) serves every client
connection of a worker; requests are parsed by httptools (llhttp) and proxied through
:class:`~softlb.aio.upstream.UpstreamPool` without touching a thread.

What it shares with the threaded engine is everything above the wire: the
:class:`~softlb.app.Application` (pool, strategies, health checker, shared state, events,
stats, access log), the retry rules of :mod:`softlb.retry`, the header rules of
:mod:`softlb.http.headers` and the admin API, which runs as the same WSGI app on a small
thread pool (it is not on the proxied path).

What it adds, because an event loop can (SPEC §3): slow and idle clients cost memory, not a
thread (``timeouts.client_header``, ``timeouts.keepalive``, ``limits.max_connections``,
``limits.max_header_bytes``), bodies relayed with backpressure both ways, pipelined requests
answered in order, ``Expect: 100-continue``, ``Upgrade`` tunnels (WebSocket) after a backend's
``101``, and TLS on the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

import httptools

from softlb.admin import BODY_TOO_LARGE, SEED_ADD, SEED_REMOVE
from softlb.aio.upstream import (
    HIGH_WATER,
    LOW_WATER,
    BackendAddress,
    UpstreamAnswer,
    UpstreamConnection,
    UpstreamPool,
)
from softlb.errors import NoBackendAvailable, UpstreamError
from softlb.http.headers import (
    HOP_BY_HOP_BYTES,
    HOST_PATTERN,
    PLAIN_HTTP_TO_TLS,
    _origin_form,
    connection_token_bytes,
    connection_tokens,
    is_plain_http_start,
)
from softlb.http.upstream import SMALL_BODY
from softlb.retry import Attempts, failure_kind, may_resend

if TYPE_CHECKING:
    from softlb.app import Application
    from softlb.config import Config
    from softlb.pool import Lease, PoolEvent

__all__ = ["Engine", "Limits"]

log = logging.getLogger("softlb.proxy")

_HOP: Final = HOP_BY_HOP_BYTES
#: Request fields the engine writes itself (X-Forwarded-*), or never sends on (Expect: the
#: engine answers 100-continue; framing: re-made per hop).
_FORWARDED_NAMES: Final = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
#: The X-Forwarded-* names spelled with ``_`` for one or both dashes: many WSGI and CGI
#: servers read ``X_Forwarded_For`` as the very field the engine replaced, so a client could
#: forge it past the proxy. Dropped, as nginx drops every name with ``_`` by default.
_FORWARDED_LOOKALIKES: Final = frozenset(
    x + first + forwarded + second + what
    for x, forwarded, what in (name.split(b"-") for name in _FORWARDED_NAMES)
    for first in (b"-", b"_")
    for second in (b"-", b"_")
) - set(_FORWARDED_NAMES)
_REPLACED: Final = frozenset(
    {*_FORWARDED_NAMES, *_FORWARDED_LOOKALIKES, b"expect", b"content-length"}
)
_UNREMOVABLE: Final = frozenset({b"host", b"content-length"})
_DROPPED: Final = _HOP | _REPLACED
#: What a request's Connection header may name and still leave the field block made while
#: its head was parsed as it is: fields dropped anyway (X-Forwarded-For is not: naming it
#: drops the client's value too).
_NAMED_ANYWAY: Final = (_DROPPED | _UNREMOVABLE) - {b"x-forwarded-for"}

#: Request field names that are more than passed on, for the one pass over a request's head
#: (ClientConnection.on_headers_complete); every other field goes to the backend as it came.
_HOST: Final = 1
_TRANSFER_ENCODING: Final = 2
_CONTENT_LENGTH: Final = 3
_EXPECT: Final = 4
_FORWARDED_FOR: Final = 5
_CONNECTION: Final = 6
_IDEMPOTENCY_KEY: Final = 7
_DROP: Final = 8
_SPECIAL: Final[dict[bytes, int]] = {
    **dict.fromkeys(_DROPPED, _DROP),
    b"host": _HOST,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-length": _CONTENT_LENGTH,
    b"expect": _EXPECT,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"connection": _CONNECTION,
    b"idempotency-key": _IDEMPOTENCY_KEY,
}
#: The usual methods' names, not decoded anew for each request.
_METHOD_NAMES: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
}
_PROTOCOLS: Final = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_METHODS_WITH_BODY: Final = frozenset({"POST", "PUT", "PATCH"})

_REASONS: Final = {
    100: "Continue",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class Limits:
    """The engine's timeouts (seconds) and limits, from the config's ``timeouts`` and
    ``limits`` (SPEC §2)."""

    __slots__ = (
        "client_body",
        "client_header",
        "keepalive",
        "max_connections",
        "max_header_bytes",
        "tunnel",
    )

    def __init__(
        self,
        *,
        client_header: float = 10.0,
        keepalive: float = 5.0,
        client_body: float = 30.0,
        tunnel: float = 3600.0,
        max_connections: int = 10_000,
        max_header_bytes: int = 65_536,
    ) -> None:
        self.client_header = client_header
        self.keepalive = keepalive
        self.client_body = client_body
        self.tunnel = tunnel
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        """The limits a config's ``timeouts`` and ``limits`` set."""
        timeouts = config.timeouts
        return cls(
            client_header=timeouts.client_header,
            keepalive=timeouts.keepalive,
            client_body=timeouts.client_body,
            tunnel=timeouts.tunnel,
            max_connections=config.limits.max_connections,
            max_header_bytes=config.limits.max_header_bytes,
        )


_UNSUPPORTED_CODING: Final = "only Transfer-Encoding: chunked is supported"
#: llhttp's errors for a request's Transfer-Encoding other than ``chunked`` alone (``gzip``,
#: ``identity``, ``chunked, chunked``, the field twice): SPEC §3's 501, not a 400.
_LLHTTP_BAD_CODING: Final = frozenset(
    {"Request has invalid `Transfer-Encoding`", "Invalid `Transfer-Encoding` header value"}
)


#: A request line with an extension method (``BREW /pot HTTP/1.1``), one llhttp's fixed list of
#: methods refuses: a token as gunicorn's threaded engine accepts one (no lower-case letters,
#: no ``#``, 3 to 20 characters), followed by a space.
_EXTENSION_METHOD: Final = re.compile(rb"([!$%&'*+\-.^_`|~0-9A-Z]{3,20}) ")
#: The start of such a method, cut off by the end of a read.
_METHOD_START: Final = re.compile(rb"[!$%&'*+\-.^_`|~0-9A-Z]{1,20}")
#: The method llhttp parses in an extension method's place; the request keeps its own.
_STAND_IN: Final = b"GET"
#: A valid Host field value (RFC 9112 §3.2); anything else gets 400.
_HOST_VALUE: Final = re.compile(HOST_PATTERN.encode())
#: Host values that matched it (clients repeat theirs on every request, and the match costs
#: more than a set lookup), up to _HOSTS_SEEN_MAX of them, each of 255 bytes at most.
_HOSTS_SEEN: set[bytes] = set()
_HOSTS_SEEN_MAX: Final = 1024


def _llhttp_knows(method: bytes) -> bool:
    """Whether llhttp parses ``method`` (so a request with it cannot be what it refused)."""
    try:
        httptools.HttpRequestParser(object()).feed_data(method + b" / HTTP/1.1\r\n\r\n")
    except httptools.HttpParserInvalidMethodError:
        return False
    except httptools.HttpParserError:
        pass
    return True


class _ClientError(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class _Request:
    """One request as parsed so far, and its body: buffered, or streamed to a backend."""

    __slots__ = (
        "body",
        "body_size",
        "chunked",
        "complete",
        "conn",
        "error",
        "expect_continue",
        "fields",
        "has_key",
        "headers",
        "keep_alive",
        "length",
        "method",
        "on_body",
        "sink",
        "started",
        "tail",
        "upgrade",
        "url",
        "version",
        "waiter",
    )

    def __init__(self, conn: ClientConnection | None = None) -> None:
        self.conn = conn
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True
        self.body: list[bytes] = []
        self.body_size = 0
        self.length: int | None = None
        self.chunked = False
        self.complete = False
        self.error: _ClientError | None = None
        self.expect_continue = False
        #: The header block for the backend when it was made in the pass over the head.
        self.fields: bytes | None = None
        self.has_key = False  # an Idempotency-Key header came
        self.upgrade = False
        #: What came after an upgrade request's message: the new protocol's first bytes,
        #: sent on after the backend's 101, or the next request when it declines.
        self.tail = b""
        self.sink: Callable[[bytes], None] | None = None
        self.on_body: Callable[[], None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.started = time.perf_counter()

    def header(self, lname: bytes) -> bytes | None:
        for name, value in self.headers:
            if len(name) == len(lname) and name.lower() == lname:
                return value
        return None

    def take_body(self) -> bytes:
        body = self.body
        self.body = []
        return body[0] if len(body) == 1 else b"".join(body)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self.on_body is not None:
            self.on_body()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order, one at a time."""

    def __init__(self, engine: Engine, *, admin_only: bool = False, tls: bool = False) -> None:
        self.engine = engine
        self.loop = engine.loop
        self.admin_only = admin_only
        self.scheme = "https" if tls else "http"
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ("", 0)
        self.local = ("", 0)
        self.queue: deque[_Request] = deque()
        self.current: _Request | None = None  # being parsed
        self.busy = False
        self.closing = False
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self.head_bytes = 0
        self.upstream: UpstreamConnection | None = None  # while its answer streams to us
        self.tunnel: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        #: The fields after a request's own that this connection adds to each (peer, scheme).
        self._forwarded = b""
        self._forwarded_proto = b""
        self._default_host = b""
        self._deadline = 0.0
        self._deadline_kind = ""
        self._lost: asyncio.Future[None] | None = None
        #: The extension method of the request being parsed with a stand-in one.
        self._extension: bytes | None = None
        self._held = b""
        #: A bodiless upgrade request whose tail (what came after it) waits for its answer:
        #: nothing more is read until then, so that the tail is parsed before later bytes.
        self._tail_of: _Request | None = None

    def lost_future(self) -> asyncio.Future[None]:
        """A future that resolves when the connection has closed."""
        if self._lost is None:
            self._lost = self.loop.create_future()
            if self.closed:
                self._lost.set_result(None)
        return self._lost

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.local = (str(local[0]), int(local[1]))
        self._forwarded_fields()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.engine._opened(self)
        self._set_deadline("header", self.engine.limits.client_header)

    def _forwarded_fields(self) -> None:
        peer = self.peer[0].encode()
        self._forwarded_proto = b"X-Forwarded-Proto: %b\r\n" % self.scheme.encode()
        self._forwarded = (b"X-Forwarded-For: %b\r\n" % peer if peer else b"") + (
            self._forwarded_proto
        )
        port = self.local[1]
        default = 443 if self.scheme == "https" else 80
        self._default_host = self.local[0].encode() + (b"" if port == default else b":%d" % port)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            self._set_deadline("tunnel", self.engine.limits.tunnel)
            tunnel.write(data)
            return
        at_start = self.current is None  # data begins a request (or its leading CRLFs)
        if self._held:  # the first bytes of an extension method, held for the rest of it
            data, self._held = self._held + data, b""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            extension = _EXTENSION_METHOD.match(data) if at_start else None
            if extension is None and at_start and _METHOD_START.fullmatch(data):
                self.parser = httptools.HttpRequestParser(self)
                self.current = None
                self._held = data  # (at most 20 bytes)
                return
            if extension is None or _llhttp_knows(extension.group(1)):
                # Not a token, or a later request of this read (pipelined) failed.
                self._client_error(_ClientError(400, "malformed request: invalid method"))
                return
            # A method llhttp does not know (SPEC §3: any method is forwarded): the request is
            # parsed again from its start with a stand-in method, and keeps its own.
            self.parser = httptools.HttpRequestParser(self)
            self.current = None
            self._extension = extension.group(1)
            self.data_received(_STAND_IN + data[extension.end(1) :])
        except httptools.HttpParserUpgrade as exc:
            # The request asked to switch protocols. httptools ends its message at the head
            # (it skips an upgrade request's body), and the parser stops for good.
            rest = data[int(exc.args[0]) :]
            request = self.queue[-1] if self.queue else None
            if request is not None:
                request.upgrade = True
                if (
                    request.error is None
                    and request.method != "CONNECT"
                    and (request.chunked or request.length)
                ):
                    self._read_upgrade_body(request, rest)
                    return
                # What follows a bodiless upgrade request: the new protocol's first bytes,
                # sent on after the backend's 101, or the next request if it declines (_done).
                request.tail += rest
                self._tail_of = request
            self.parser = httptools.HttpRequestParser(self)
            self._pause_reading()
        except _ClientError as exc:
            self._client_error(exc)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _ClientError):
                self._client_error(cause)
            elif str(exc) in _LLHTTP_BAD_CODING:  # a coding llhttp refuses before our check
                self._client_error(_ClientError(501, _UNSUPPORTED_CODING))
            else:
                self._client_error(_ClientError(400, f"malformed request: {exc}"))

    def _read_upgrade_body(self, request: _Request, rest: bytes) -> None:
        """Read an upgrade request's body by its framing, as any other (RFC 9110 §7.8: the
        upgrade takes effect after the request message), with llhttp: a new parser is given
        a stand-in head with the same framing, then the bytes after the real one
        (:class:`_UpgradeBody`). Sent to the backend with the request, the body is never
        held back for a 101 that may not come (a backend waiting for it would time out and
        be blamed for the client's request). What follows the body is read as the next
        request, so a client that sends the new protocol before the 101 cannot be joined
        (:meth:`Engine._relay`)."""
        request.complete = False  # (httptools told on_message_complete at the head)
        self.current = request
        framing = (
            b"Transfer-Encoding: chunked\r\n"
            if request.chunked
            else b"Content-Length: %d\r\n" % (request.length or 0)
        )
        self.parser = httptools.HttpRequestParser(_UpgradeBody(self))
        self.parser.feed_data(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n")
        self._set_deadline("body", self.engine.limits.client_body)
        if rest:
            self.data_received(rest)

    def read_past(self, request: _Request) -> bool:
        """Whether bytes after ``request`` (the one being answered) have been parsed: the
        start of another request, a whole one, or an extension method's first bytes."""
        return self.current is not None or len(self.queue) > 1 or bool(self._held)

    def eof_received(self) -> bool | None:
        request = self.current
        if request is not None and request.method and not request.complete:
            request.error = _ClientError(400, "the client closed the connection mid-request")
            request.wake()
        if not self.busy:
            return None  # nothing to answer: close
        self.closing = True
        return True  # half-closed: the answer being made may still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._clear_deadline()
        self.engine._closed(self)
        for request in (self.current, *self.queue):
            if request is not None and not request.complete:
                request.error = request.error or _ClientError(400, "client went away")
                request.wake()
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self.tunnel is not None:
            self.tunnel.abort()
            self.tunnel = None
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True
        upstream = self.upstream or self.tunnel
        if upstream is not None:
            upstream.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        upstream = self.upstream or self.tunnel
        if upstream is not None:
            upstream.resume()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request(self)
        self.head_bytes = 0
        if self._deadline_kind != "header":  # _set_deadline("header", ...), inline: per request
            self._deadline_kind = "header"
            self._deadline = self.loop.time() + self.engine.limits.client_header

    def on_url(self, url: bytes) -> None:
        request = self.current
        assert request is not None
        request.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.engine.limits.max_header_bytes:
            raise _ClientError(431, "the request head is too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        assert request is not None
        if request.method:
            return  # a trailer field of a chunked body: not forwarded
        request.headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.engine.limits.max_header_bytes:
            raise _ClientError(431, "the request head is too large")

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        parser = self.parser
        method = parser.get_method()
        if self._extension is not None:  # (parsed with a stand-in: data_received)
            method, self._extension = self._extension, None
        # The whole head as SPEC §2 counts it: the request line (method, target, two spaces,
        # "HTTP/1.1", CRLF), the fields (counted as they came) and the empty line.
        if self.head_bytes + len(method) + 14 > self.engine.limits.max_header_bytes:
            raise _ClientError(431, "the request head is too large")
        request.method = _METHOD_NAMES.get(method) or method.decode("ascii", "replace")
        keep_alive = request.keep_alive = parser.should_keep_alive()
        # One pass: the request's framing and checks, and its header block for the backend
        # (Engine._fields, which makes it when the Connection header names other fields).
        host_seen = 0
        host = b""
        lines: list[bytes] = []
        forwarded_for: list[bytes] | None = None
        connection: list[bytes] | None = None
        dropped = False
        for name, value in request.headers:
            lname = name.lower()
            kind = _SPECIAL.get(lname)
            if kind is None:
                lines += (name, b": ", value, b"\r\n")
            elif kind == _HOST:
                host_seen += 1
                host = value.rstrip(b" \t")  # (llhttp keeps trailing whitespace)
                if host not in _HOSTS_SEEN:
                    if _HOST_VALUE.fullmatch(host) is None:
                        request.error = _ClientError(
                            400, "the Host header is not a valid host[:port]"
                        )
                    elif len(_HOSTS_SEEN) < _HOSTS_SEEN_MAX and len(host) <= 255:
                        _HOSTS_SEEN.add(host)
                lines += (name, b": ", host, b"\r\n")
            elif kind == _TRANSFER_ENCODING:
                if value.strip().lower() != b"chunked" or request.chunked:
                    request.error = _ClientError(501, _UNSUPPORTED_CODING)
                request.chunked = True
            elif kind == _CONTENT_LENGTH:
                request.length = int(value)  # llhttp checked: digits, below 2^64, no conflict
            elif kind == _EXPECT:
                if value.strip().lower() == b"100-continue":
                    request.expect_continue = True
            elif kind == _FORWARDED_FOR:
                if forwarded_for is None:
                    forwarded_for = []
                forwarded_for.append(value)
            elif kind == _CONNECTION:
                if connection is None:
                    connection = []
                connection.append(value)
            elif kind == _IDEMPOTENCY_KEY:
                request.has_key = True
                lines += (name, b": ", value, b"\r\n")
            else:
                dropped = True  # a hop-by-hop field (Proxy-Connection among them)
        if not keep_alive or connection is not None or dropped:
            # llhttp keeps a connection alive by default only from HTTP/1.1 on (1.0, 0.9 and
            # 2.0 need Connection or Proxy-Connection: keep-alive) and parses no 1.x above
            # 1.1: kept alive with neither field, a request is HTTP/1.1 (request.version's
            # default), told without get_http_version(), a str.format call (per request).
            request.version = parser.get_http_version()
            # Upgrade with Connection: upgrade (or CONNECT), known before the body: the
            # body goes to the backend by its framing like any other (RFC 9110 §7.8).
            request.upgrade = parser.should_upgrade()
            if request.chunked and request.version == "1.0":
                # RFC 9112 §6.1: faulty framing, whatever the coding
                request.error = _ClientError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if connection is None or connection_token_bytes(connection) <= _NAMED_ANYWAY:
            if forwarded_for is None:
                lines.append(self._forwarded)
            else:
                peer = self.peer[0].encode()
                if peer:
                    forwarded_for.append(peer)
                lines += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
                lines.append(self._forwarded_proto)
            lines += (b"X-Forwarded-Host: ", host or self._default_host, b"\r\n")
            if not host_seen:  # HTTP/1.0 without one: the backend gets the one it was sent
                lines += (b"Host: ", self._default_host, b"\r\n")  # to (nginx's $host)
            request.fields = b"".join(lines)
        if request.length is not None and request.length >= 1 << 63:
            request.error = _ClientError(400, "Content-Length is too large")
        if request.version == "1.1" and host_seen != 1:
            request.error = request.error or _ClientError(
                400, "an HTTP/1.1 request needs exactly one Host header"
            )
        if request.error is not None:
            request.keep_alive = False
        if request.length == 0 or (request.length is None and not request.chunked):
            request.complete = True  # no body; httptools still calls on_message_complete
        self.queue.append(request)
        if not request.complete:  # (else on_message_complete follows at once)
            self._set_deadline("body", self.engine.limits.client_body)
        if len(self.queue) > 1:
            self._pause_reading()  # pipelined: read no further until the ones ahead are answered
        if not self.busy:
            self._next()

    def on_body(self, body: bytes) -> None:
        request = self.current
        assert request is not None
        self._set_deadline("body", self.engine.limits.client_body)
        request.body_size += len(body)
        sink = request.sink
        if sink is not None:
            sink(body)
            return
        request.body.append(body)
        if request.body_size > SMALL_BODY:
            self._pause_reading()
        request.wake()

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None
        self.current = None
        request.complete = True
        if self.busy:
            self._deadline_kind = ""  # being answered: the backend's read timeout applies
        else:
            self._set_deadline("idle", self.engine.limits.keepalive)
        if request.waiter is not None or request.on_body is not None:  # (the call: per request)
            request.wake()

    # -- answering ------------------------------------------------------------------------

    def _next(self) -> None:
        if self.busy or self.closed or not self.queue:
            return
        self.busy = True
        request = self.queue[0]
        if request.complete and request.error is None and not request.upgrade:
            # Started from the loop's ready queue, not inside the read that completed the
            # head: the loop's reads first, then the requests they brought, in one batch (as
            # a task's first step would run), costs less CPU than each request's work inside
            # its read.
            self.loop.call_soon(self._start, request)
        else:
            self.task = self.loop.create_task(self._answer(request))

    def _start(self, request: _Request) -> None:
        try:
            if self.engine.start_forward(self, request):
                return  # on its way without a task (Engine.start_forward)
        except Exception:
            log.exception("internal error while starting %s", request.url[:200])
        self.task = self.loop.create_task(self._answer(request))

    async def _answer(
        self,
        request: _Request,
        first: Lease | None = None,
        started: UpstreamConnection | None = None,
    ) -> None:
        try:
            if request.error is not None:  # refused by the parser; an admin call's in JSON
                as_json = self._admin_call(request)
                self.send_error(
                    request.error.status, request.error.why, close=True, as_json=as_json
                )
            elif first is None and self.engine.is_admin(request, self):
                await self.engine.admin(self, request)
            else:
                await self.engine.forward(self, request, first=first, started=started)
        except Exception:  # never a traceback to the client
            log.exception("internal error while proxying %s", request.url[:200])
            self.send_error(500, "internal error", close=True)
        finally:
            self._done(request)

    def _admin_call(self, request: _Request) -> bool:
        """Whether a request the parser refused was an admin call, as far as its head
        tells (its answer is then JSON, SPEC §5); ``False`` for a head too broken to say."""
        if not request.url:
            return self.admin_only
        try:
            return self.engine.is_admin(request, self)
        except Exception:  # a target that does not decode: not a path of the admin API
            return False

    def _done(self, request: _Request) -> None:
        self.busy = False
        self.task = None
        if self.queue and self.queue[0] is request:
            self.queue.popleft()
        if self.closed or self.tunnel is not None:
            return
        if not request.keep_alive or self.closing or self.engine.stopping:
            self.close()
            return
        if not request.complete:
            # The answer went out before the body was read (an early answer, an error):
            # what is left of the body cannot be told from the next request. Close, as nginx.
            self.close()
            return
        if request.upgrade:
            if request.method == "CONNECT":
                self.close()  # what follows a CONNECT is never HTTP
                return
            # The upgrade was declined (any answer but 101): the connection goes on in
            # HTTP/1.1 (RFC 9110 §7.8), as under nginx; what came after a bodiless upgrade
            # request is read as the next request, by the parser that replaced the stopped one.
            if self._tail_of is request:
                self._tail_of = None
            tail, request.tail = request.tail, b""
            if tail and not self.queue:
                self._set_deadline("idle", self.engine.limits.keepalive)
                self._resume_reading()
                self.data_received(tail)
                return
        if self.queue:
            self._next()
        else:  # _set_deadline("idle", ...), inline: per request
            self._deadline_kind = "idle"
            self._deadline = self.loop.time() + self.engine.limits.keepalive
        if self.reading_paused:  # (the call only when it has something to do: per request)
            self._resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, pieces: list[bytes]) -> None:
        """Several pieces in one go (a vectored write where the loop has one), no copies."""
        if self.transport is not None and not self.closed:
            self.transport.writelines(pieces)

    def send_error(
        self, status: int, why: str, *, close: bool = False, as_json: bool = False
    ) -> None:
        """A short answer made by the engine itself: plain text, or ``{"error": why}`` with
        ``as_json`` (the admin API's errors, SPEC §5)."""
        reason = _REASONS.get(status, "Error")
        if as_json:
            body = (json.dumps({"error": why}, indent=2) + "\n").encode()
            kind = "application/json"
        else:
            body = f"{status} {reason}: {why}\n".encode()
            kind = "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
        )
        if close:
            head += "Connection: close\r\n"
            self.closing = True
        self.write(head.encode() + b"\r\n" + body)

    def close(self) -> None:
        self._clear_deadline()
        if self.transport is not None and not self.closed:
            self.closing = True
            self.transport.close()

    def _client_error(self, error: _ClientError) -> None:
        """A request the parser refused: its body (400, with the backend exchange cut) or a
        new head (answered in turn, then the connection closes)."""
        self._pause_reading()
        request = self.current
        if request is not None and request.method and not request.complete:
            request.error = error
            request.keep_alive = False
            request.wake()
            return
        bad = request if request is not None else _Request()
        bad.error = error
        bad.keep_alive = False
        bad.complete = True
        self.current = None
        self.queue.append(bad)
        if not self.busy:
            self._next()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._tail_of is not None:
            return  # until the upgrade request's answer: its tail first (_done, _tunnel)
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- deadlines, checked by the engine's sweep -----------------------------------------

    def _set_deadline(self, kind: str, seconds: float) -> None:
        """Set the connection's one deadline: ``header`` (408), ``body`` (408), ``idle``
        (close quietly), ``tunnel`` (close) or ``""`` (none: an answer is being made, the
        backend's read timeout applies). Only two numbers change: the engine's sweep
        (:meth:`Engine._sweep`) looks at every connection a few times per shortest timeout,
        so a request costs no timer of its own."""
        self._deadline_kind = kind
        if kind:
            self._deadline = self.loop.time() + seconds

    def _clear_deadline(self) -> None:
        self._deadline_kind = ""

    def on_deadline(self, now: float) -> None:
        """The sweep found the deadline passed."""
        kind = self._deadline_kind
        if self.closed or not kind or now < self._deadline:
            return
        if kind == "header":
            if self.busy:
                return  # a pipelined head waits behind an answer: not the client's fault
            self._deadline_kind = ""
            if self.current is not None and self.current.method == "":
                self._client_error(_ClientError(408, "the request head took too long"))
            elif self.current is None and not self.queue:
                self.close()  # a connection that never sent a byte
            return
        if kind == "body":
            request = self.current
            if request is not None and request.method and not request.complete:
                self._deadline_kind = ""
                request.error = _ClientError(408, "the request body paused too long")
                request.keep_alive = False
                request.wake()
                if not self.busy:
                    self.send_error(408, "the request body paused too long", close=True)
                    self.close()
            return
        if kind == "tunnel" or (kind == "idle" and not self.busy):
            self.close()


class _Listener:
    __slots__ = ("admin_only", "sock", "ssl")

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext | None, admin_only: bool):
        self.sock = sock
        self.ssl = ssl_context
        self.admin_only = admin_only


class Engine:
    """One worker's data plane over an :class:`~softlb.app.Application`.

    ``upstream_ssl`` verifies ``https://`` backends (default: the config's
    ``backend_tls.ca_file``, else the system's CAs, which honour ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR``).

    :meth:`listen` serves a listening socket (its own accept loop, so that at
    ``limits.max_connections`` it stops accepting and later clients wait in the kernel's
    backlog); :meth:`stop_accepting` and :meth:`drain` make the graceful stop of SPEC §1.
    """

    def __init__(
        self,
        app: Application,
        loop: asyncio.AbstractEventLoop,
        *,
        limits: Limits | None = None,
        admin_threads: int = 4,
        upstream_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.loop = loop
        self.pool = app.pool
        self.proxy = app.proxy
        config = app.config
        self.limits = limits or Limits.from_config(config)
        if upstream_ssl is None and config.backend_tls.ca_file is not None:
            upstream_ssl = config.backend_tls.ssl_context()
        self.upstreams = UpstreamPool(
            loop,
            connect_timeout=config.timeouts.connect,
            read_timeout=config.timeouts.read,
            max_idle=64,
            ssl_context=upstream_ssl,
        )
        self.connections: set[ClientConnection] = set()
        #: Accepted connections not set up yet (a TLS handshake under way): they count
        #: toward limits.max_connections too.
        self.starting = 0
        self.listeners: list[_Listener] = []
        self.accepting = False
        self.stopping = False
        self.admin_listen = config.admin.listen
        admin = app.admin
        seeds = (SEED_ADD, SEED_REMOVE) if admin.seed_routes else ()
        #: What an admin path starts with, to skip the full check for every other request.
        self._admin_starts = tuple(p.encode("latin-1") for p in (admin.prefix, *seeds))
        self._executor = ThreadPoolExecutor(admin_threads, thread_name_prefix="softlb-admin")
        self._idle_waiter: asyncio.Future[None] | None = None
        self._forget_hook()
        limits = self.limits
        shortest = min(limits.client_header, limits.keepalive, limits.client_body, limits.tunnel)
        #: Seconds between two sweeps: a deadline is met within this much of its time.
        self.sweep_interval = min(max(shortest / 5, 0.02), 1.0)
        self._sweep_handle = loop.call_later(self.sweep_interval, self._sweep)

    def _sweep(self) -> None:
        """Enforce every client connection's deadline: one timer for the whole worker instead
        of one per request (the upstream pool sweeps its read timeouts the same way)."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn._deadline_kind and now >= conn._deadline:
                conn.on_deadline(now)
        if not self.loop.is_closed():
            self._sweep_handle = self.loop.call_later(self.sweep_interval, self._sweep)

    def _forget_hook(self) -> None:
        """Backends removed by the admin API or the shared state close their idle connections
        here too, on the loop's thread."""
        loop, upstreams = self.loop, self.upstreams

        def forget(event: PoolEvent) -> None:  # on the thread that removed the backend
            if event.url is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(upstreams.forget, event.url)

        self._unsubscribe = self.pool.subscribe(forget, ("removed",))

    # -- listening ------------------------------------------------------------------------

    def listen(
        self, sock: socket.socket, *, ssl_context: ssl.SSLContext | None = None,
        admin_only: bool = False,
    ) -> None:  # fmt: skip
        sock.setblocking(False)
        listener = _Listener(sock, ssl_context, admin_only)
        self.listeners.append(listener)
        self.accepting = True
        self.loop.add_reader(sock.fileno(), self._accept, listener)

    def _accept(self, listener: _Listener) -> None:
        for _ in range(128):
            if len(self.connections) + self.starting >= self.limits.max_connections:
                self._pause_accepting()
                return
            try:
                conn, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: wait for a connection to end
                log.warning("accept failed: %s", exc.strerror or exc)
                self._pause_accepting()
                self.loop.call_later(0.1, self._resume_accepting)
                return
            conn.setblocking(False)
            self.starting += 1
            self.loop.create_task(self._start(conn, listener))

    async def _start(self, conn: socket.socket, listener: _Listener) -> None:
        tls = listener.ssl is not None

        def factory() -> ClientConnection:
            return ClientConnection(self, admin_only=listener.admin_only, tls=tls)

        try:
            if tls:
                # The first byte and the handshake share timeouts.client_header.
                began = self.loop.time()
                if not await self._starts_like_tls(conn):
                    return
                left = self.limits.client_header - (self.loop.time() - began)
                await self.loop.connect_accepted_socket(
                    factory, conn, ssl=listener.ssl, ssl_handshake_timeout=max(left, 0.1)
                )
            else:
                await self.loop.connect_accepted_socket(factory, conn)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.debug("connection not set up: %s", exc)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self.starting -= 1
            self._resume_below_limit()

    async def _starts_like_tls(self, conn: socket.socket) -> bool:
        """Whether a connection to a TLS listener starts like TLS, told from its first byte
        (peeked, so the handshake still reads it). One that starts like an HTTP request gets
        nginx's answer, ``400`` in plain text ("plain HTTP was sent to an HTTPS port"), and
        the close, instead of a handshake that fails without a word; one that sends nothing
        within ``timeouts.client_header``, or goes away, is closed. ``False``: closed here."""
        loop = self.loop
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = conn.fileno()
        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, self.limits.client_header)
            first = conn.recv(1, socket.MSG_PEEK)
        except (asyncio.TimeoutError, BlockingIOError, OSError):
            first = b""
        finally:
            loop.remove_reader(fd)
        if is_plain_http_start(first):
            with contextlib.suppress(OSError):
                conn.recv(65536)  # read what came, so that the close does not reset the answer
                conn.send(PLAIN_HTTP_TO_TLS)
                conn.shutdown(socket.SHUT_WR)
            first = b""
        if not first:
            with contextlib.suppress(OSError):
                conn.close()
            return False
        return True

    def _pause_accepting(self) -> None:
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(listener.sock.fileno())
        self.accepting = False

    def _resume_accepting(self) -> None:
        if self.accepting or self.stopping:
            return
        self.accepting = True
        for listener in self.listeners:
            with contextlib.suppress(OSError, ValueError):
                self.loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def _opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if self.stopping:
            conn.close()

    def _closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self._resume_below_limit()
        waiter = self._idle_waiter
        if waiter is not None and not waiter.done() and not any(c.busy for c in self.connections):
            waiter.set_result(None)

    def _resume_below_limit(self) -> None:
        if (
            not self.accepting
            and not self.stopping
            and len(self.connections) + self.starting < self.limits.max_connections
        ):
            self._resume_accepting()

    def stop_accepting(self) -> None:
        """Close the listening sockets now: a new connection is refused, not left hanging."""
        self.stopping = True
        self._pause_accepting()
        for listener in self.listeners:
            with contextlib.suppress(OSError):
                listener.sock.close()
        self.listeners.clear()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the requests in flight, then close what is left."""
        deadline = self.loop.time() + timeout
        while any(c.busy for c in self.connections):
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            self._idle_waiter = self.loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle_waiter, min(remaining, 0.5))
            self._idle_waiter = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.upstreams.close()

    def close(self) -> None:
        self._sweep_handle.cancel()
        self._unsubscribe()
        self.upstreams.close()
        self._executor.shutdown(wait=False)

    # -- routing --------------------------------------------------------------------------

    def is_admin(self, request: _Request, conn: ClientConnection) -> bool:
        if conn.admin_only:
            return True
        if self.admin_listen is not None:
            return False
        url = request.url
        if url[:1] == b"/" and url.find(b"%") < 0 and not url.startswith(self._admin_starts):
            return False  # the common case, decided without decoding anything
        path = url.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            path = (_origin_form(path.decode("latin-1"), request.method) or "/").encode("latin-1")
        return self.app.admin.matches(unquote_to_bytes(path).decode("latin-1"))

    # -- the admin API, on a thread ---------------------------------------------------------

    async def admin(self, conn: ClientConnection, request: _Request) -> None:
        """Serve an admin call with the WSGI admin app on the engine's small thread pool."""
        if request.expect_continue and not request.complete and request.error is None:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # (SPEC §3: never stalls a body)
        while not request.complete and request.error is None:
            if request.body_size > 1024 * 1024:
                request.error = _ClientError(413, BODY_TOO_LARGE)
                break
            conn._resume_reading()
            await _wait(request)
        if request.error is not None:  # an admin error is JSON, as the admin app's own
            conn.send_error(request.error.status, request.error.why, close=True, as_json=True)
            return
        environ = self._environ(conn, request)
        status, headers, body = await self.loop.run_in_executor(
            self._executor, _call_wsgi, self.app, environ
        )
        lines = [f"HTTP/1.1 {status}\r\n"]
        has_length = False
        for name, value in headers:
            lname = name.lower()
            if lname in ("connection", "transfer-encoding"):
                continue
            if lname == "content-length":
                has_length = True
                if request.method != "HEAD":
                    value = str(len(body))  # noqa: PLW2901  # the body as it was collected
            lines.append(f"{name}: {value}\r\n")
        if not has_length and not status.startswith(("204", "304")):
            lines.append(f"Content-Length: {len(body)}\r\n")
        if not request.keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1")
        conn.write(data if request.method == "HEAD" else data + body)

    def _environ(self, conn: ClientConnection, request: _Request) -> dict[str, Any]:
        raw = request.url.decode("latin-1")
        path, _, query = raw.partition("?")
        if not path.startswith("/"):
            path = _origin_form(path, request.method) or "/"
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query,
            "RAW_URI": raw,
            "SERVER_NAME": conn.local[0],
            "SERVER_PORT": str(conn.local[1]),
            "SERVER_PROTOCOL": f"HTTP/{request.version}",
            "REMOTE_ADDR": conn.peer[0],
            "REMOTE_PORT": str(conn.peer[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": conn.scheme,
            "wsgi.input": io.BytesIO(request.take_body()),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = text
                continue
            key = "HTTP_" + key
            if key in environ:
                environ[key] += "," + text
            else:
                environ[key] = text
        if request.chunked:
            environ["CONTENT_LENGTH"] = str(request.body_size)
        return environ

    # -- the proxy --------------------------------------------------------------------------

    def start_forward(self, conn: ClientConnection, request: _Request) -> bool:
        """Start forwarding the usual request without a task: one whose body (if any) is read
        whole, for the proxy (not the admin API), with no sticky sessions. The backend is
        leased without waiting and the request goes on an idle pooled connection; an answer
        that arrives whole is relayed from the callback the backend connection schedules
        (:meth:`_answered`), with no coroutine in between. Anything else, a first try that
        fails included, continues in :meth:`forward` with the lease and the connection
        already taken, under the same rules. ``False`` (nothing done) when the request needs
        :meth:`forward` from the start."""
        proxy = self.proxy
        if proxy.sticky is not None or request.upgrade:
            # (upgrade: llhttp tells it after on_headers_complete, which scheduled this call)
            return False
        url = request.url
        target: bytes | None
        if (
            url[:1] == b"/"
            # find(), not "in": bytes.__contains__ tries the operand as an int first and
            # builds a TypeError to throw away, ~1,800 instructions each (per request)
            and url.find(b"%") < 0
            and url.find(b"#") < 0
            and not url.startswith(self._admin_starts)
            and not conn.admin_only
        ):
            target = url  # is_admin's and _target's usual case, decided inline (per request)
        else:
            if self.is_admin(request, conn):
                return False
            target = _target(request)
            if target is None:
                return False
        pool = self.pool
        key = self._key(conn, request) if (pool.balancer.uses_key or proxy.access_log) else None
        try:
            lease = pool.try_lease(key)
        except NoBackendAvailable:
            return False
        if lease is None:
            return False  # every backend is full: forward() waits in the queue
        upstream = None
        try:
            upstream = self.upstreams.take_idle(lease.backend.url)
            if upstream is None:  # a new connection is awaited: the general path
                conn.task = self.loop.create_task(conn._answer(request, first=lease))
                return True
            fields = request.fields
            if fields is None:
                fields = self._fields(conn, request)
            method = request.method
            if request.body or method in _METHODS_WITH_BODY:
                wire, framing, body = _outgoing(request)
                data = _request_head(wire, upstream.address, target, fields, framing) + body
            else:  # no body, no framing field (_outgoing's and _request_head's, inline)
                data = b"".join((
                    method.encode("ascii"), b" ", upstream.address.base, target,
                    b" HTTP/1.1\r\n", fields, b"\r\n",
                ))  # fmt: skip
            upstream.start(data, method == "HEAD", False)
        except BaseException:
            lease.release("error")
            if upstream is not None:  # taken from the idle pool: in an unknown state now
                upstream.abort()
            raise

        # A bound method and a tuple: less than half the cost of a partial or a closure.
        upstream.on_head = self._answered
        upstream.context = (conn, request, lease, key, target)
        return True

    def _answered(self, upstream: UpstreamConnection) -> None:
        """The head of the answer to a request :meth:`start_forward` sent has come, or its
        exchange failed: the answer goes to the client (at once when it came whole, else as
        its body arrives); a failure (to retry, or a 502) and a ``101`` go on in
        :meth:`forward`."""
        conn: ClientConnection
        request: _Request
        lease: Lease
        key: str | None
        target: bytes
        conn, request, lease, key, target = upstream.context
        try:
            if upstream.failed is None:  # then the head has come (on_head's promise)
                answer = upstream._answer  # (the answer property's value then: per request)
                assert answer is not None
                if answer.status != 101:
                    seconds = time.perf_counter() - request.started
                    if upstream.complete:  # (the request is counted with its answer)
                        # Positional (key, target, extra, request_seconds): per request.
                        self._relay_whole(
                            conn, request, upstream, lease, answer, key, target, b"", seconds
                        )
                        conn._done(request)
                    else:
                        self.proxy.stats.observe(seconds)
                        self._relay_stream(
                            conn, request, upstream, lease, answer, key=key, target=target,
                            extra=b"", then=lambda: conn._done(request),
                        )  # fmt: skip
                    return
        except Exception:  # never a traceback to the client, nor into the backend's protocol
            log.exception("internal error while proxying %s", request.url[:200])
            lease.release("error")
            upstream.abort()
            conn.send_error(500, "internal error", close=True)
            conn._done(request)
            return
        conn.task = self.loop.create_task(conn._answer(request, first=lease, started=upstream))

    async def forward(
        self,
        conn: ClientConnection,
        request: _Request,
        *,
        first: Lease | None = None,
        started: UpstreamConnection | None = None,
    ) -> None:
        """Forward one request, with the retry rules of SPEC §3, and relay the answer.

        ``first`` and ``started`` go on from :meth:`start_forward`: the first try's lease, and
        the connection its exchange was started on."""
        proxy = self.proxy
        pool = self.pool
        if request.expect_continue and not request.complete:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # Read the body ahead up to SMALL_BODY, so that a small one can be sent again on a
        # retry, and a client's bad framing is caught before any byte reaches a backend.
        while not request.complete and request.error is None and request.body_size <= SMALL_BODY:
            conn._resume_reading()
            await _wait(request)
        if request.error is not None:
            conn.send_error(request.error.status, request.error.why, close=True)
            return
        target = _target(request)
        if target is None:
            conn.send_error(400, "bad request target", close=True)
            return
        key = self._key(conn, request) if (pool.balancer.uses_key or proxy.access_log) else None
        resend = may_resend(request.method, request.has_key)
        head_fields = request.fields
        if head_fields is None:
            head_fields = self._fields(conn, request)
        sticky = proxy.sticky
        wanted = None
        if sticky is not None:
            cookie = request.header(b"cookie")
            wanted = sticky.find(pool, cookie.decode("latin-1") if cookie is not None else None)
        attempts = Attempts(
            pool,
            key,
            method=request.method,
            target=target.decode("latin-1"),
            resend=resend,
            retries=proxy.retries,
            prefer=wanted,
            wait=proxy.queue_timeout,
            on_retry=proxy.stats.retried,
            first=first,
        )
        while (lease := await attempts.next_async()) is not None:
            on, started = started, None  # a connection start_forward began on: first try only
            try:
                upstream = await self._exchange(
                    lease.backend.url, request, target, head_fields, resend=resend, started=on
                )
                if upstream.failed is not None and not upstream.upgraded:
                    # The answer broke before a byte of it went to the client (a bad first
                    # chunk, a close right after the head): a 502, or another backend.
                    upstream.abort()
                    raise upstream.failed
            except UpstreamError as exc:
                # A body streamed (not read ahead whole) cannot be sent again, nor one the
                # client broke.
                replayable = request.complete and request.sink is None and request.error is None
                if attempts.failed(exc, replayable=replayable):
                    continue
                break
            except _ClientBodyFailed:
                attempts.abort(client=True)  # the client's fault: no failure recorded
                conn.send_error(request.error.status if request.error else 400,
                                request.error.why if request.error else "bad request body",
                                close=True)  # fmt: skip
                return
            except BaseException:
                attempts.abort(client=False)
                raise
            lease = attempts.succeeded()
            proxy.stats.observe(time.perf_counter() - request.started)
            cookie_line = b""
            if sticky is not None and lease.backend is not wanted:
                cookie_line = b"Set-Cookie: %b\r\n" % sticky.set_cookie(lease.backend).encode()
            try:
                await self._relay(
                    conn, request, upstream, lease, key=key, target=target, extra=cookie_line
                )
            except BaseException:  # a bug, or the task cancelled: hold nothing
                lease.release("error")
                upstream.abort()
                raise
            return
        if request.error is not None:
            conn.send_error(request.error.status, request.error.why, close=True)
            return
        error = attempts.error
        assert error is not None
        proxy.stats.error(error.status)
        status, headers, body = proxy.error_handler({"REQUEST_METHOD": request.method}, error)
        if proxy.access_log is not None:
            proxy.log_made_answer(
                status, key, request.method, target.decode("latin-1"),
                time.perf_counter() - request.started,
                0 if request.method == "HEAD" else len(body), client=conn.peer[0],
                protocol=_PROTOCOLS.get(request.version) or f"HTTP/{request.version}",
                referer=_text(request.header(b"referer")),
                user_agent=_text(request.header(b"user-agent")),
            )  # fmt: skip
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, error.reason)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if not request.keep_alive or not request.complete:
            lines.append("Connection: close\r\n")
            request.keep_alive = False
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1")
        conn.write(data if request.method == "HEAD" else data + body)

    async def _exchange(
        self,
        url: str,
        request: _Request,
        target: bytes,
        fields: bytes,
        *,
        resend: bool,
        started: UpstreamConnection | None = None,
    ) -> UpstreamConnection:
        """Send the request to ``url`` and wait for the head of its answer (the transport's
        :meth:`~softlb.aio.upstream.UpstreamPool.exchange`: a stale pooled connection is
        retried there, unblamed). A body read ahead whole goes with the head, and is kept for
        a retry on another backend; a longer one is streamed. ``started``: the exchange was
        started on that connection already (:meth:`start_forward`)."""
        method, framing, body = _outgoing(request)

        def head(address: BackendAddress) -> bytes:
            return _request_head(method, address, target, fields, framing)

        stream = None
        if not request.complete:

            def stream(upstream: UpstreamConnection) -> None:
                self._stream_body(request, upstream)

        try:
            return await self.upstreams.exchange(
                url,
                head,
                body,
                head_request=request.method == "HEAD",
                upgrade=request.upgrade,
                resend=resend,
                stream=stream,
                started=started,
            )
        except UpstreamError:
            if request.error is not None:
                raise _ClientBodyFailed from None
            raise

    def _stream_body(self, request: _Request, upstream: UpstreamConnection) -> None:
        """Send what is buffered of the body, then every later piece as it arrives, with
        backpressure: the client is not read while the backend's buffer is full."""
        conn_resume: Callable[[], None] | None = None
        chunked = request.chunked

        if chunked:

            def sink(data: bytes) -> None:
                if data:
                    upstream.write(b"%x\r\n%b\r\n" % (len(data), data))

        else:
            sink = upstream.write
        pending = request.take_body()
        if pending:
            sink(pending)
        request.sink = sink
        client = request.conn
        if client is not None:
            upstream.on_full = client._pause_reading
            upstream.on_drain = client._resume_reading
            conn_resume = client._resume_reading

        def on_more() -> None:
            if request.complete and request.error is None:
                request.on_body = None
                if chunked:
                    upstream.write(b"0\r\n\r\n")
            elif request.error is not None:
                request.on_body = None
                upstream.abort()  # the client's body broke: cut the exchange, blame nobody

        request.on_body = on_more
        if request.complete:
            on_more()
        elif conn_resume is not None and not upstream.writing_paused:
            conn_resume()

    async def _relay(
        self,
        conn: ClientConnection,
        request: _Request,
        upstream: UpstreamConnection,
        lease: Lease,
        *,
        key: str | None,
        target: bytes,
        extra: bytes = b"",
    ) -> None:
        """Write the answer's head, then its body as it arrives; release lease and connection."""
        answer = upstream.answer
        assert answer is not None  # (exchange() returns once it has come)
        status = answer.status
        if status == 101:
            if not request.upgrade:
                lease.release("broken")
                upstream.abort()
                conn.send_error(502, "the backend switched protocols unasked", close=True)
                return
            why = None
            if not request.complete:
                # A 101 before the (streamed) body ended: the rest of the body is still the
                # request's (RFC 9110 §7.8), the new protocol after it. A Content-Length body
                # goes on through the tunnel as it comes, byte for byte; a chunked one was
                # sent in chunks of this proxy's making, which the client's cannot follow.
                # Neither side is at fault: no failure is counted.
                if request.chunked:
                    why = "the backend switched protocols in the middle of a chunked body"
            elif conn.read_past(request):
                # Bytes after an upgrade request with a body came before the 101 and were read
                # as HTTP (_read_upgrade_body): they cannot be passed on byte for byte. The
                # client's doing (RFC 9110 §7.8 has it wait for the 101): no one is blamed.
                why = "bytes after an upgrade request with a body came before the 101"
            if why is not None:
                lease.release()
                upstream.abort()
                conn.send_error(400 if request.complete else 502, why, close=True)
                return
            await self._tunnel(conn, request, upstream, lease, answer)
            return
        if upstream.complete:  # the usual small answer: head and body leave in one write
            self._relay_whole(
                conn, request, upstream, lease, answer, key=key, target=target, extra=extra
            )
            return
        ended: asyncio.Future[None] = self.loop.create_future()

        def then() -> None:
            if not ended.done():
                ended.set_result(None)

        self._relay_stream(
            conn, request, upstream, lease, answer, key=key, target=target, extra=extra,
            then=then,
        )  # fmt: skip
        await ended

    def _relay_stream(
        self,
        conn: ClientConnection,
        request: _Request,
        upstream: UpstreamConnection,
        lease: Lease,
        answer: UpstreamAnswer,
        *,
        key: str | None,
        target: bytes,
        extra: bytes,
        then: Callable[[], object],
    ) -> None:
        """An answer whose body is still coming: the head now, each piece of the body as it
        arrives (the backend is not read while the client's buffer is full), then
        :meth:`_finish` and ``then()`` once it has ended."""
        head, client_chunked = self._client_head(request, answer, extra)
        conn.upstream = upstream
        first_byte = self.pool.clock() - lease.started
        conn.write(head)
        counted = [0]

        def sink(data: bytes) -> None:
            counted[0] += len(data)
            if client_chunked:
                conn.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
            else:
                conn.write(data)

        def done(error: UpstreamError | None) -> None:  # from the backend connection's callbacks
            try:
                if error is None and client_chunked:
                    conn.write(b"0\r\n\r\n")
                self._finish(
                    conn, request, upstream, lease, key=key, target=target,
                    status=answer.status, error=error, first_byte=first_byte, sent=counted[0],
                )  # fmt: skip
            except Exception:  # a bug: the answer is cut (its head went out), nothing held
                log.exception("internal error while proxying %s", request.url[:200])
                lease.release("error")
                upstream.abort()
                if conn.transport is not None:
                    conn.transport.abort()
            finally:
                then()

        pending = upstream.take_body()
        if pending:
            sink(pending)
        if conn.writing_paused:
            upstream.pause()
        upstream.stream(sink, done)

    def _client_head(
        self, request: _Request, answer: UpstreamAnswer, extra: bytes
    ) -> tuple[bytes, bool]:
        """The answer's head for the client, and whether its body goes to it in chunks (an
        HTTP/1.1 client, a body of unknown length). Marks the request not keep-alive when
        the client connection is to close after it."""
        client_chunked = False
        close = not request.keep_alive or not request.complete or self.stopping
        bodiless = request.method == "HEAD" or answer.status in (204, 304)
        if answer.length is None and not bodiless:
            if request.version == "1.1":
                client_chunked = True
            else:
                close = True
        if request.upgrade and request.method == "CONNECT":
            close = True  # what follows a CONNECT is never HTTP
        if close:
            request.keep_alive = False
        elif request.version == "1.0":
            extra += b"Connection: keep-alive\r\n"  # an HTTP/1.0 client closes without it
        # The answer's field block as the upstream connection made it (hop-by-hop fields and
        # those its Connection names dropped), the framing re-made for this hop.
        head = b"HTTP/1.1 %d %b\r\n%b%b%b%b\r\n" % (
            answer.status,
            answer.reason,
            answer.fields,
            extra,
            b"Transfer-Encoding: chunked\r\n" if client_chunked else b"",
            b"Connection: close\r\n" if close else b"",
        )
        return head, client_chunked

    def _relay_whole(  # noqa: PLR0917  # positional calls: it runs per request
        self,
        conn: ClientConnection,
        request: _Request,
        upstream: UpstreamConnection,
        lease: Lease,
        answer: UpstreamAnswer,
        key: str | None,
        target: bytes,
        extra: bytes = b"",
        request_seconds: float | None = None,
    ) -> None:
        """An answer that came whole: head and body leave in one write, then
        :meth:`_finish` (which counts ``request_seconds`` when given: the request was not
        counted when its head came)."""
        head, client_chunked = self._client_head(request, answer, extra)
        first_byte = self.pool.clock() - lease.started
        pieces = upstream.take_pieces()
        sent = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
        if client_chunked:
            pieces = [b"%x\r\n" % sent, *pieces, b"\r\n0\r\n\r\n"] if sent else [b"0\r\n\r\n"]
        transport = conn.transport
        if transport is not None and not conn.closed:  # (conn.write's check: per request)
            if not pieces:
                transport.write(head)
            elif len(pieces) == 1 and sent < 16384:
                transport.write(head + pieces[0])  # a small answer: one copy beats a list
            else:
                transport.writelines([head, *pieces])
        # Positional (key, target, status, error, first_byte, sent, request_seconds): a
        # call with keywords costs more, and this one runs for every request.
        self._finish(
            conn, request, upstream, lease, key, target, answer.status, None, first_byte, sent,
            request_seconds,
        )  # fmt: skip

    def _finish(  # noqa: PLR0917  # positional calls: it runs per request
        self,
        conn: ClientConnection,
        request: _Request,
        upstream: UpstreamConnection,
        lease: Lease,
        key: str | None,
        target: bytes,
        status: int,
        error: UpstreamError | None,
        first_byte: float,
        sent: int,
        request_seconds: float | None = None,
    ) -> None:
        """The answer ended (whole, cut by the backend, or left by the client): release the
        lease and the backend connection, and count it (metrics, access log, hooks; the
        request too when ``request_seconds`` is given)."""
        conn.upstream = None
        complete = False
        if error is not None:
            log.warning("answer from %s cut short: %s", lease.backend.url, error)
            lease.release(failure_kind(error))
            request.keep_alive = False
            if conn.transport is not None:
                conn.transport.abort()  # the head went out: the client must see a cut answer
        elif conn.closed and not upstream.complete:
            upstream.abort()
            lease.release()  # the client left: not the backend's failure
        else:
            upstream.release(request.complete or request.sink is None)  # (reusable)
            lease.release()
            complete = True
        logged = self.proxy.access_log is not None  # the only reader of referer and agent
        protocol = _PROTOCOLS.get(request.version) or f"HTTP/{request.version}"
        # Positional, in LoadBalancer.answered's order (status, first_byte, complete, method,
        # target, bytes_sent, client, protocol, referer, user_agent, request_seconds); the
        # target as bytes, decoded there only if a log line or a hook reads it.
        self.proxy.answered(
            lease, key, status, first_byte, complete, request.method, target, sent,
            conn.peer[0], protocol,
            _text(request.header(b"referer")) if logged else None,
            _text(request.header(b"user-agent")) if logged else None,
            request_seconds,
        )  # fmt: skip

    async def _tunnel(
        self,
        conn: ClientConnection,
        request: _Request,
        upstream: UpstreamConnection,
        lease: Lease,
        answer: UpstreamAnswer,
    ) -> None:
        """Join the client and the backend byte for byte after the backend's ``101``."""
        lines = [b"HTTP/1.1 101 " + (answer.reason or b"Switching Protocols") + b"\r\n"]
        for name, value in answer.headers:
            lname = name.lower()
            if lname in (b"connection", b"keep-alive", b"transfer-encoding", b"content-length"):
                continue
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"Connection: upgrade\r\n\r\n")
        conn.write(b"".join(lines))
        if upstream.upgrade_tail:
            conn.write(upstream.upgrade_tail)
        # What the client sent after its request, in the new protocol already (a body still
        # coming, if the backend did not wait for it, is passed on as it comes, unparsed).
        early, request.tail = request.tail, b""
        if conn._tail_of is request:
            conn._tail_of = None
        if early:
            upstream.write(early)
        waiter: asyncio.Future[None] = self.loop.create_future()

        def done(error: UpstreamError | None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        conn.tunnel = upstream
        upstream.on_full = conn._pause_reading
        upstream.on_drain = conn._resume_reading
        upstream.stream(conn.write, done)
        lease.release()  # the request was answered; the tunnel is not counted in flight
        conn._set_deadline("tunnel", self.limits.tunnel)
        conn._resume_reading()
        conn.busy = False
        closed = conn.lost_future()
        try:
            await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            upstream.abort()
            conn.close()

    # -- request pieces ---------------------------------------------------------------------

    def _fields(self, conn: ClientConnection, request: _Request) -> bytes:
        """The request's header block for the backend: hop-by-hop fields (and the ones the
        Connection header names) dropped, ``X-Forwarded-*`` set (SPEC §3). The pass over the
        head (:meth:`ClientConnection.on_headers_complete`) makes the same block unless the
        Connection header names a field it kept."""
        lines: list[tuple[bytes, bytes]] = []
        forwarded_for: list[bytes] = []
        connection: list[str] = []
        host = b""
        has_host = False
        for name, value in request.headers:
            lname = name.lower()
            if lname in _DROPPED:
                if lname == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif lname == b"connection":
                    connection.append(value.decode("latin-1"))
                continue
            if lname == b"host":
                host = value
                has_host = True
            lines.append((lname, b"%b: %b\r\n" % (name, value)))
        if connection:
            named = {t.encode() for t in connection_tokens(connection)} - _UNREMOVABLE
            if named:
                lines = [line for line in lines if line[0] not in named]
                if b"x-forwarded-for" in named:
                    forwarded_for = []  # the client asked for it to go no further
        out = [line for _, line in lines]
        peer = conn.peer[0].encode()
        if peer:
            forwarded_for.append(peer)
        if forwarded_for:
            out += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
        out += (b"X-Forwarded-Proto: ", conn.scheme.encode(), b"\r\n")
        if not host:
            port = conn.local[1]
            default = 443 if conn.scheme == "https" else 80
            host = conn.local[0].encode() + (b"" if port == default else b":%d" % port)
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
        if not has_host:  # (HTTP/1.0 without one, as in the pass over the head)
            out += (b"Host: ", host, b"\r\n")
        return b"".join(out)

    def _key(self, conn: ClientConnection, request: _Request) -> str | None:
        """The value ``hash_key`` names for this request, as the WSGI proxy computes it."""
        kind, name = self.proxy.hash_kind, self.proxy.hash_name
        value: str | None
        if kind == "client_ip":
            value = conn.peer[0]
        elif kind == "path":
            path = request.url.split(b"?", 1)[0]
            value = unquote_to_bytes(path).decode("latin-1") or "/"
        elif kind == "header":
            raw = request.header((name or "").lower().encode("latin-1"))
            value = raw.decode("latin-1") if raw is not None else None
        else:
            raw = request.header(b"cookie")
            value = None
            if raw is not None:
                try:
                    morsel = SimpleCookie(raw.decode("latin-1")).get(name or "")
                except CookieError:
                    morsel = None
                value = morsel.value if morsel is not None else None
        return value or None


class _UpgradeBody:
    """httptools callbacks for the parser that reads an upgrade request's body (httptools
    skips it: :meth:`ClientConnection._read_upgrade_body`). The stand-in head it is given
    first is not told to the connection; the body and its end are, and every later request
    on the connection in full, as by the connection's own parser."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.ended = False  # the upgrade request's body has ended

    def on_message_begin(self) -> None:
        if self.ended:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self.ended:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.ended:  # (before: the stand-in's fields, or trailer fields: not forwarded)
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.ended:
            self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.ended = True
        self.conn.on_message_complete()


class _ClientBodyFailed(Exception):
    """The exchange ended because the client's body broke, not the backend."""


async def _wait(request: _Request) -> None:
    loop = asyncio.get_running_loop()
    request.waiter = loop.create_future()
    await request.waiter


def _outgoing(request: _Request) -> tuple[bytes, bytes, bytes]:
    """What a request sends to a backend besides its target and fields: its method, its
    framing fields and (read whole) its body. A body read ahead whole goes with the head and
    is kept for a retry on another backend; a longer one is streamed after it."""
    method = request.method.encode("ascii")
    if request.complete:
        if request.body:
            body = request.take_body()
            request.body = [body]  # kept for a retry
        else:
            body = b""
        if body or request.method in _METHODS_WITH_BODY:
            framing = b"Content-Length: %d\r\n" % len(body)
        else:
            framing = b""
    else:
        body = b""
        if request.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b"Content-Length: %d\r\n" % (request.length or 0)
    if request.upgrade:
        value = request.header(b"upgrade") or b""
        framing += b"Upgrade: " + value + b"\r\nConnection: upgrade\r\n"
    return method, framing, body


def _request_head(
    method: bytes, address: BackendAddress, target: bytes, fields: bytes, framing: bytes
) -> bytes:
    """The request's head for the backend at ``address``."""
    return b"".join(
        (method, b" ", address.base, target, b" HTTP/1.1\r\n", fields, framing, b"\r\n")
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _target(request: _Request) -> bytes | None:
    url = request.url
    if url[:1] == b"/":
        hash_at = url.find(b"#")
        return url if hash_at < 0 else url[:hash_at]
    text = _origin_form(url.decode("latin-1"), request.method)
    return None if text is None else text.encode("latin-1")


def _call_wsgi(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run a WSGI app to the end; its status, headers and whole body."""
    answer: dict[str, Any] = {}

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        answer["status"] = status
        answer["headers"] = headers
        return lambda data: None

    result: Iterable[bytes] = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return answer.get("status", "500 Internal Server Error"), answer.get("headers", []), body


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (and not turned off with ``SOFTLB_LOOP=asyncio``),
    else asyncio's own."""
    if os.environ.get("SOFTLB_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
