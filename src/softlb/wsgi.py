"""The WSGI reverse proxy: :class:`LoadBalancer`, over a :class:`~softlb.pool.Pool` you build
yourself.

The whole balancer from a config file (pool, health checker, shared state, admin API and this
proxy) is built by the composition root, :mod:`softlb.app`. Its :func:`~softlb.app.create_app`
and :class:`~softlb.app.Application` are importable from here too, so the command users
know keeps working::

    gunicorn 'softlb.wsgi:create_app("config.json")'
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from softlb.access_log import AccessLog, wall_clock_of
from softlb.errors import (
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
)
from softlb.events import ACCESS
from softlb.http.headers import (
    BadFraming,
    check_request_framing,
    close_after,
    connection_tokens,
    downstream_response_headers,
    request_target,
    upstream_request_headers,
)
from softlb.http.transport import (
    Exchange,
    Transport,
    UpstreamRequest,
    proxy_transport,
    round_trip,
)
from softlb.http.upstream import CHUNK_SIZE, SMALL_BODY
from softlb.pool import Lease, Pool
from softlb.retry import (
    IDEMPOTENT_METHODS,
    Attempts,
    ClientAbort,
    failure_kind,
    failure_text,
    may_resend,
)
from softlb.stats import ProxyStats
from softlb.sticky import StickySessions

if TYPE_CHECKING:
    from softlb.app import Application, create_app

__all__ = [
    "IDEMPOTENT_METHODS",
    "Application",
    "LoadBalancer",
    "UpstreamRequest",
    "create_app",
]

#: Names this module gives from :mod:`softlb.app`, the layer above it (imported on first use,
#: so the proxy does not depend on its composition root).
_FROM_APP: Final = frozenset({"Application", "create_app"})


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        return getattr(importlib.import_module("softlb.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger("softlb.proxy")

Environ = dict[str, Any]


class StartResponse(Protocol):
    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]: ...


#: Statuses whose answers never have a body (RFC 9110 §6.4.1), besides every answer to HEAD.
_BODILESS: Final = frozenset({204, 304})


class ClientBodyError(ClientAbort):
    """The client's request body ended early or could not be read (the client's fault: the
    backend it was being sent to is not blamed). ``status``: the answer, ``400``, or ``408``
    for a pause longer than ``timeouts.client_body`` (the server's read timed out)."""

    def __init__(self, why: str, status: int = 400) -> None:
        super().__init__(why)
        self.status = status


ErrorHandler = Callable[[Environ, ProxyError], tuple[int, list[tuple[str, str]], bytes]]
Rewrite = Callable[[UpstreamRequest, Environ], None]


def default_error_page(
    environ: Environ, error: ProxyError
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer for a request that could not be proxied: its status and a one-line reason.

    The backend's address is not shown to the client; it is in the log.
    """
    status = error.status
    why = {
        503: "no backend is available",
        504: "the backend did not answer in time",
    }.get(status, "no backend could be reached" if isinstance(error, UpstreamConnectError)
          else "the backend connection failed")  # fmt: skip
    body = f"{status} {error.reason}: {why}\n".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]
    return status, headers, body


class _Body:
    """The client's request body as the upstream call wants it, and whether it can be resent.

    Bodies up to :data:`SMALL_BODY` are read before a backend is picked, as nginx's
    ``proxy_request_buffering`` does: with a Content-Length they are read at once; a chunked
    one is read ahead up to that size, and if it ends there it goes out with a Content-Length.
    Either way it can be sent again on a retry, and a client's bad chunk or short body is a
    400 before any backend is contacted. Larger ones are streamed straight from the client
    (a chunked one after the part read ahead); once streaming has started they cannot be
    sent again. :class:`~softlb.http.headers.BadFraming` is raised for framing the proxy
    refuses (:func:`~softlb.http.headers.check_request_framing`).
    """

    __slots__ = ("_ahead", "_input", "_remaining", "chunked", "data", "started")

    def __init__(self, environ: Environ) -> None:
        self.data: bytes | None = None
        self.chunked = False
        self.started = False
        self._remaining = 0
        self._ahead = b""  # the start of a large chunked body, read ahead
        self._input = environ.get("wsgi.input")
        length = check_request_framing(environ)
        if length is None:
            ahead = self._read_ahead()
            if len(ahead) <= SMALL_BODY:
                self.data = ahead  # the whole body: sent with a Content-Length
            else:
                self.chunked = True
                self._remaining = -1  # read to the end of the (de-chunked) input
                self._ahead = ahead
        elif length <= SMALL_BODY:
            data = self._read_exactly(length) if length else b""
            if len(data) != length:
                raise ClientBodyError("request body shorter than its Content-Length")
            self.data = data
        else:
            self._remaining = length

    def _read_ahead(self) -> bytes:
        """Up to :data:`SMALL_BODY` + 1 bytes of a chunked body (fewer: that is all of it)."""
        parts: list[bytes] = []
        size = 0
        for _ in range(SMALL_BODY + 2):  # bounded: each read returns at least one byte
            piece = self._read(SMALL_BODY + 1 - size)
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
            if size > SMALL_BODY:
                break
        return b"".join(parts)

    def _read_exactly(self, length: int) -> bytes:
        """``length`` bytes of a Content-Length body, fewer only if the client stopped."""
        data = self._read(length)
        if len(data) >= length or not data:
            return data
        parts = [data]
        size = len(data)
        while size < length:  # a server whose read() returns what it has (not PEP 3333's)
            piece = self._read(length - size)
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
        return b"".join(parts)

    @property
    def replayable(self) -> bool:
        return not self.started

    def source(self) -> bytes | Iterable[bytes] | None:
        if self.data is not None:
            return self.data
        if self._remaining == 0 and not self.chunked:
            return None
        return self._stream()

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the client's body; the client's failures are its own."""
        source = self._input
        if source is None:
            return b""
        try:
            data: bytes = source.read(size)
        except TimeoutError as exc:  # the socket's timeout: timeouts.client_body (softlb.gthread)
            raise ClientBodyError("the request body paused too long", status=408) from exc
        except Exception as exc:  # a reset, a bad chunk (gunicorn's ParseException)
            raise ClientBodyError(f"reading the request body failed: {exc!r}") from exc
        return data

    def _stream(self) -> Iterator[bytes]:
        self.started = True
        if self._input is None:
            return
        read = self._read
        remaining = self._remaining
        if remaining < 0:
            if self._ahead:
                yield self._ahead
            while True:
                chunk = read(CHUNK_SIZE)
                if not chunk:
                    return
                yield chunk
        while remaining > 0:
            chunk = read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise ClientBodyError("client closed the connection during the request body")
            remaining -= len(chunk)
            yield chunk


class _StreamedAnswer:
    """The WSGI iterable of a streamed answer: passes chunks on; closing it ends the
    :class:`~softlb.http.transport.Exchange` (lease and connection).

    A failure in the middle of the body is re-raised, so the WSGI server drops the client's
    connection: the status is already sent, and the client must see a truncated answer, never
    a second status.
    """

    __slots__ = ("_complete", "_done", "_exchange", "_failure", "_first", "_rest", "sent")

    def __init__(
        self,
        exchange: Exchange,
        done: Callable[[Lease, int, bool], None] | None = None,
        *,
        first: bytes = b"",
        rest: Iterator[bytes] | None = None,
    ) -> None:
        self._exchange = exchange
        self._complete = False
        self._failure: str | None = None
        self._done = done  # told of the released lease, bytes sent, complete (log, metrics)
        self.sent = 0
        # The first piece, read before the status went out (see _prepare_answer), and the
        # iterator it came from.
        self._first = first
        self._rest = rest

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                first, self._first = self._first, b""
                self.sent += len(first)
                yield first
            rest = self._rest if self._rest is not None else self._exchange.response.chunks()
            for piece in rest:
                self.sent += len(piece)
                yield piece
        except UpstreamError as exc:
            self._failure = failure_kind(exc)
            url = self._exchange.backend.url
            log.warning("backend %s: answer cut short: %s", url, failure_text(exc, url))
            raise
        self._complete = True

    def close(self) -> None:
        exchange = self._exchange
        if exchange.closed:
            return
        exchange.close(complete=self._complete, failure=self._failure)
        if self._done is not None:
            self._done(exchange.lease, self.sent, self._complete)


#: What :func:`_prepare_answer` returns: the exchange, the whole body (``None`` when it
#: streams), the first piece and the iterator of the rest.
_Prepared: TypeAlias = tuple[Exchange, bytes | None, bytes, Iterator[bytes] | None]


def _prepare_answer(exchange: Exchange) -> _Prepared:
    """What of an answer is read before its status goes out, inside the retry loop of
    :func:`~softlb.http.transport.round_trip`: a small body whole (the exchange then ends),
    else the first piece, so that a backend that stalls or breaks there still gets a 502/504
    or a retry, not a truncated answer or the WSGI server's own error page."""
    resp = exchange.response
    if resp.status in _BODILESS or resp.status < 200:
        exchange.close(complete=resp.length in (0, None))
        return exchange, b"", b"", None
    if resp.length is not None and resp.length <= SMALL_BODY:
        data = resp.read_small()
        exchange.close(complete=True)
        return exchange, data, b"", None
    rest = iter(resp.chunks())
    first = next(rest, b"")
    if not first:  # the body ended at once
        exchange.close(complete=True)
        return exchange, b"", b"", None
    return exchange, None, first, rest


def _prepare_head_answer(exchange: Exchange) -> _Prepared:
    """:func:`_prepare_answer` for the answer to HEAD: no body, whatever its headers say."""
    resp = exchange.response
    exchange.close(complete=resp.length in (0, None))
    return exchange, b"", b"", None


class LoadBalancer:
    """A WSGI app that forwards every request to a backend of ``pool``.

    Requests are forwarded as the client sent them — method, raw path and query, body,
    headers but the hop-by-hop ones — and answers come back as the backend gave them,
    streamed both ways. A request that cannot be connected is tried on another backend (any
    method); one that failed after it was sent is tried again only if its method is
    idempotent or it carries ``Idempotency-Key``; at most ``retries`` more backends are tried.
    What cannot be served gets 502, 503 or 504. Each retry is published to the pool's
    ``retried`` hooks (:meth:`Pool.on() <softlb.pool.Pool.on>`) with the failed backend and
    the failure.

    ``rewrite(request, environ)``, if given, may change the method, target or headers of
    each :class:`UpstreamRequest` before it is sent (default: nothing changes).
    ``error_handler(environ, error)`` makes the answer for a request that could not be
    proxied; if ``None``, the default (:func:`default_error_page`) answers with the error's
    status and a one-line plain-text reason. Every failed try is logged either way.
    ``hash_key`` says what request attribute feeds the hashing strategies: ``client_ip``,
    ``path``, ``header:NAME`` or ``cookie:NAME``.
    ``max_connections`` is how many idle connections are kept per backend: the server's
    thread count is right.

    A client's bad request (malformed framing, a body cut short, no ``Host`` in HTTP/1.1) is
    answered 400, an unsupported ``Transfer-Encoding`` 501, and the connection closed, before
    any byte reaches a backend and without counting against one (SPEC §3). A backend that
    answers before reading the whole body (an early 413 or 401) has that answer passed on.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        retries: int = 2,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        hash_key: str = "client_ip",
        max_connections: int = 10,
        rewrite: Rewrite | None = None,
        error_handler: ErrorHandler | None = None,
        upstream: Transport | None = None,
        stats: ProxyStats | None = None,
        access_log: AccessLog | None = None,
        sticky: StickySessions | None = None,
        queue_timeout: float = 0.0,
    ) -> None:
        from softlb.balancers.hashing import parse_hash_key

        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.pool = pool
        self.retries = retries
        self.hash_kind, self.hash_name = parse_hash_key(hash_key)
        self.rewrite = rewrite
        self.error_handler = error_handler or default_error_page
        #: The upstream client: any :class:`~softlb.http.transport.Transport`; by default a
        #: :func:`~softlb.http.transport.proxy_transport` with these timeouts.
        self.upstream: Transport = upstream or proxy_transport(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            maxsize=max_connections,
        )
        self.stats = stats or ProxyStats()
        #: Where a CSV row per answered request goes (``softlb simulate --csv`` replays it).
        self.access_log = access_log
        #: Sticky sessions (a cookie naming the backend), or ``None``.
        self.sticky = sticky
        #: Seconds a request may wait for a backend at its ``max_connections``.
        self.queue_timeout = queue_timeout
        self._environ_header = (
            "HTTP_" + self.hash_name.upper().replace("-", "_") if self.hash_name else ""
        )

    # -- request key for hashing ---------------------------------------------------------

    def request_key(self, environ: Environ) -> str | None:
        """The value :attr:`hash_key` names for this request (``None`` if it has none)."""
        kind = self.hash_kind
        if kind == "client_ip":
            value: str | None = environ.get("REMOTE_ADDR")
        elif kind == "path":
            value = environ.get("PATH_INFO") or "/"
        elif kind == "header":
            value = environ.get(self._environ_header)
        else:
            value = None
            raw = environ.get("HTTP_COOKIE")
            if raw:
                try:
                    morsel = SimpleCookie(raw).get(self.hash_name or "")
                except CookieError:
                    morsel = None
                value = morsel.value if morsel is not None else None
        return value or None

    # -- the proxy -----------------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        connection = environ.get("HTTP_CONNECTION")
        if connection is not None and "close" in connection_tokens((connection,)):
            # RFC 9112 §9.6: "close" among other tokens ends the connection too; gunicorn
            # looks only for a value that is "close" alone.
            close_after(start_response)
        try:
            return self._proxy(environ, start_response, started)
        except BadFraming as exc:
            return self.refuse(start_response, exc.status, str(exc))
        except ClientBodyError as exc:
            return self.refuse(start_response, exc.status, str(exc))
        except Exception:  # never a traceback to the client
            log.exception("internal error while proxying %s", environ.get("PATH_INFO"))
            return self._plain(start_response, 500, "500 Internal Server Error\n")

    def _proxy(
        self, environ: Environ, start_response: StartResponse, started: float
    ) -> Iterable[bytes]:
        method: str = environ["REQUEST_METHOD"]
        target = request_target(environ)
        request = UpstreamRequest(method, target, upstream_request_headers(environ))
        # gunicorn answers "100 Continue" itself when it reads the body; the backend must not.
        request.headers.pop("Expect", None)
        if self.rewrite is not None:
            self.rewrite(request, environ)
        body = _Body(environ)
        access_log = self.access_log
        if self.pool.balancer.uses_key or access_log is not None:
            key = self.request_key(environ)
        else:
            key = None
        sticky = self.sticky
        wanted = sticky.find(self.pool, environ.get("HTTP_COOKIE")) if sticky else None
        attempts = Attempts(
            self.pool,
            key,
            method=method,
            target=request.target,
            resend=may_resend(method, "Idempotency-Key" in request.headers),
            retries=self.retries,
            prefer=wanted,
            wait=self.queue_timeout,
            on_retry=self.stats.retried,
        )
        try:
            exchange, data, first, rest = round_trip(
                attempts,
                self.upstream,
                request,
                body,
                _prepare_head_answer if method == "HEAD" else _prepare_answer,
                chunked=body.chunked,
            )
        except ProxyError as error:  # nothing could answer: 502, 503 or 504
            made = self._error(environ, start_response, error)
            if access_log is not None:
                self.log_made_answer(
                    error.status, key, method, target, time.perf_counter() - started,
                    0 if method == "HEAD" else len(made[0]),
                    client=environ.get("REMOTE_ADDR") or "",
                    protocol=environ.get("SERVER_PROTOCOL") or "HTTP/1.1",
                    referer=environ.get("HTTP_REFERER"),
                    user_agent=environ.get("HTTP_USER_AGENT"),
                )  # fmt: skip
            return made
        lease = exchange.lease
        resp = exchange.response
        self.stats.observe(time.perf_counter() - started)
        first_byte = self.pool.clock() - lease.started
        headers = downstream_response_headers(resp.headers)
        if sticky is not None and lease.backend is not wanted:
            headers.append(("Set-Cookie", sticky.set_cookie(lease.backend)))
        status_line = f"{resp.status} {resp.reason}"
        status = resp.status

        def done(lease: Lease, sent: int, complete: bool) -> None:
            self.answered(
                lease, key, status=status, first_byte=first_byte, complete=complete,
                method=method, target=target, bytes_sent=sent,
                client=environ.get("REMOTE_ADDR") or "",
                protocol=environ.get("SERVER_PROTOCOL") or "HTTP/1.1",
                referer=environ.get("HTTP_REFERER"),
                user_agent=environ.get("HTTP_USER_AGENT"),
            )  # fmt: skip

        if data is not None:
            done(lease, len(data), True)
            start_response(status_line, headers)
            return (data,) if data else ()
        answer = _StreamedAnswer(exchange, done, first=first, rest=rest)
        try:
            start_response(status_line, headers)
        except BaseException:
            answer.close()  # the server refused the answer: free the lease and connection
            raise
        return answer

    def answered(  # noqa: PLR0917  # positional calls: it runs per request
        self,
        lease: Lease,
        key: str | None,
        status: int,
        first_byte: float,
        complete: bool,
        method: str,
        target: str | bytes,
        bytes_sent: int,
        client: str = "",
        protocol: str = "HTTP/1.1",
        referer: str | None = None,
        user_agent: str | None = None,
        request_seconds: float | None = None,
    ) -> None:
        """One request a backend answered, once its lease is released: the per-backend
        response metrics, the access log line and the pool's ``access`` hooks. Both engines
        call it, with plain values.

        ``first_byte`` is the seconds from the pick to the answer's head; ``complete`` says
        the whole body went out (else the time to the last byte is not counted). ``target``
        may be the bytes the client sent, decoded (latin-1) only when a log line or an
        ``access`` hook reads it.
        ``request_seconds``: the request's own duration to its answer's head, for an engine
        that counts it here rather than when the head came (:meth:`ProxyStats.response
        <softlb.stats.ProxyStats.response>`).
        """
        now = self.pool.clock()
        started = lease.started
        total = now - started if now > started else 0.0  # (not max(): a call, per request)
        url = lease.backend.url
        self.stats.response(url, status, first_byte, total if complete else None, request_seconds)
        access_log = self.access_log
        hooked = ACCESS in self.pool._wanted  # (pool.wants(ACCESS), inline: per request)
        text = ""
        if access_log is not None or hooked:
            text = target if isinstance(target, str) else target.decode("latin-1")
        if access_log is not None:
            access_log.record(
                wall_clock_of(lease.started, now), key, total, url,
                client=client, method=method, target=text, protocol=protocol,
                status=status, bytes_sent=bytes_sent, referer=referer,
                user_agent=user_agent, duration=total,
            )  # fmt: skip
        if hooked:
            self.pool.publish(
                ACCESS, lease.backend, f"{method} {text} {status} {total * 1000:.1f} ms"
            )

    def log_made_answer(  # noqa: PLR0917  # the access log's fields
        self,
        status: int,
        key: str | None,
        method: str,
        target: str,
        duration: float,
        bytes_sent: int,
        *,
        client: str = "",
        protocol: str = "HTTP/1.1",
        referer: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """The access log's line for an answer the proxy made itself because no backend
        could answer (502, 503, 504), as nginx logs every request: no backend (``null`` in
        JSON, ``-`` in the combined format; the CSV format, which replays backends' answers,
        skips it). ``duration``: seconds from the request's arrival to the answer;
        ``bytes_sent``: its body's. Both engines call it; nothing happens without an access
        log."""
        access_log = self.access_log
        if access_log is None:
            return
        access_log.record(
            time.time() - duration, key, None, None,
            client=client, method=method, target=target, protocol=protocol, status=status,
            bytes_sent=bytes_sent, referer=referer, user_agent=user_agent, duration=duration,
        )  # fmt: skip

    def _error(
        self, environ: Environ, start_response: StartResponse, error: ProxyError
    ) -> tuple[bytes]:
        self.stats.error(error.status)
        status, headers, body = self.error_handler(environ, error)
        start_response(f"{status} {_REASONS.get(status, error.reason)}", headers)
        return (body,)

    def refuse(self, start_response: StartResponse, status: int, why: str) -> Iterable[bytes]:
        """The answer to a client's bad request (400, 431, 501), which closes the connection:
        the rest of what the client sent cannot be trusted to be the next request. Nothing is
        counted against a backend."""
        close_after(start_response)
        return self._plain(start_response, status, f"{status} {_REASONS[status]}: {why}\n")

    @staticmethod
    def _plain(start_response: StartResponse, status: int, text: str) -> Iterable[bytes]:
        body = text.encode()
        start_response(
            f"{status} {_REASONS.get(status, '')}",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return (body,)

    def close(self) -> None:
        """Close the pooled backend connections and the access log."""
        self.upstream.close()
        if self.access_log is not None:
            self.access_log.close()

    def __repr__(self) -> str:
        return f"<LoadBalancer {self.pool!r} retries={self.retries}>"


_REASONS: Final = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
