"""The WSGI reverse proxy, and :func:`create_app`, the whole balancer as one WSGI app.

Mount it under any WSGI server::

    gunicorn 'softlb.wsgi:create_app("config.json")'

:class:`LoadBalancer` is the proxy alone, over a :class:`~softlb.pool.Pool` you build
yourself; :class:`Application` (what :func:`create_app` returns) adds the health checker, the
admin API and the status page from a config file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Final, Protocol

from softlb.access_log import AccessLog, wall_clock_of
from softlb.backend import Backend
from softlb.errors import (
    ConfigError,
    NoBackendAvailable,
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
)
from softlb.events import ACCESS, RETRIED
from softlb.http.headers import (
    BadFraming,
    check_request_framing,
    downstream_response_headers,
    request_target,
    upstream_request_headers,
)
from softlb.http.transport import Transport, TransportResponse
from softlb.http.upstream import CHUNK_SIZE, SMALL_BODY
from softlb.http.wire import ProxyUpstream
from softlb.logs import failure_text, warn_if_serial
from softlb.pool import Lease, Pool
from softlb.retry import IDEMPOTENT_METHODS, failure_kind, may_resend, may_retry
from softlb.stats import ProxyStats
from softlb.sticky import StickySessions

if TYPE_CHECKING:
    from softlb.config import Config
    from softlb.discovery import Resolver
    from softlb.health import HealthChecker
    from softlb.state.sync import SharedState

__all__ = [
    "IDEMPOTENT_METHODS",
    "Application",
    "LoadBalancer",
    "UpstreamRequest",
    "create_app",
]

log = logging.getLogger("softlb.proxy")

Environ = dict[str, Any]


class StartResponse(Protocol):
    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]: ...


#: Statuses whose answers never have a body (RFC 9110 §6.4.1), besides every answer to HEAD.
_BODILESS: Final = frozenset({204, 304})


class ClientBodyError(Exception):
    """The client's request body ended early or could not be read."""


@dataclass
class UpstreamRequest:
    """What is about to be sent to a backend; a ``rewrite`` hook may change any field."""

    method: str
    target: str
    headers: dict[str, str]


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
        except Exception as exc:  # a timeout, a reset, a bad chunk (gunicorn's ParseException)
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
    """The WSGI iterable of a streamed answer: passes chunks on, releases the lease at the end.

    A failure in the middle of the body is re-raised, so the WSGI server drops the client's
    connection: the status is already sent, and the client must see a truncated answer, never
    a second status.
    """

    __slots__ = ("_complete", "_done", "_failure", "_first", "_lease", "_resp", "_rest", "sent")

    def __init__(
        self,
        resp: TransportResponse,
        lease: Lease,
        done: Callable[[Lease, int, bool], None] | None = None,
        *,
        first: bytes = b"",
        rest: Iterator[bytes] | None = None,
    ) -> None:
        self._resp = resp
        self._lease = lease
        self._complete = False
        self._failure: str | None = None
        self._done = done  # told of the released lease, bytes sent, complete (log, metrics)
        self.sent = 0
        # The first piece, read before the status went out (see LoadBalancer._proxy), and
        # the iterator it came from.
        self._first = first
        self._rest = rest

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                first, self._first = self._first, b""
                self.sent += len(first)
                yield first
            for piece in self._rest if self._rest is not None else self._resp.chunks():
                self.sent += len(piece)
                yield piece
        except UpstreamError as exc:
            self._failure = failure_kind(exc)
            url = self._lease.backend.url
            log.warning("backend %s: answer cut short: %s", url, failure_text(exc, url))
            raise
        self._complete = True

    def close(self) -> None:
        self._resp.close(self._complete)
        self._lease.release(self._failure)
        if self._done is not None:
            self._done(self._lease, self.sent, self._complete)


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
        #: :class:`~softlb.http.wire.ProxyUpstream` with these timeouts.
        self.upstream: Transport = upstream or ProxyUpstream(
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
        try:
            return self._proxy(environ, start_response, started)
        except BadFraming as exc:
            return self._client_error(start_response, exc.status, str(exc))
        except ClientBodyError as exc:
            return self._client_error(start_response, 400, str(exc))
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
        resend = may_resend(method, "Idempotency-Key" in request.headers)
        tried: list[Backend] = []
        error: ProxyError | None = None
        sticky = self.sticky
        wanted = sticky.find(self.pool, environ.get("HTTP_COOKIE")) if sticky else None
        while True:
            try:
                lease = self.pool.lease(key, exclude=tried, prefer=wanted, wait=self.queue_timeout)
            except NoBackendAvailable as exc:
                error = error or exc
                break
            backend = lease.backend
            resp: TransportResponse | None = None
            first = b""
            rest: Iterator[bytes] | None = None
            try:
                resp = self.upstream.request(
                    backend.url,
                    request.method,
                    request.target,
                    request.headers,
                    body.source(),
                    chunked=body.chunked,
                )
                if method == "HEAD" or resp.status in _BODILESS or resp.status < 200:
                    data: bytes | None = b""
                    resp.close(complete=resp.length in (0, None))
                elif resp.length is not None and resp.length <= SMALL_BODY:
                    data = resp.read_small()
                    resp.close(complete=True)
                else:
                    # The first piece before the status goes out: a backend that stalls or
                    # breaks here still gets a 502/504 (or a retry), not a truncated answer
                    # or the WSGI server's own error page.
                    rest = iter(resp.chunks())
                    first = next(rest, b"")
                    data = None
                    if not first:  # the body ended at once
                        data = b""
                        resp.close(complete=True)
            except UpstreamError as exc:
                if resp is not None:
                    resp.close(complete=False)
                lease.release(failure_kind(exc))
                tried.append(backend)
                error = exc
                log.warning(
                    "backend %s failed %s %s: %s",
                    backend.url,
                    method,
                    request.target,
                    failure_text(exc, backend.url),
                )
                if may_retry(
                    exc,
                    resend=resend,
                    replayable=body.replayable,
                    tried=len(tried),
                    limit=self.retries,
                ):
                    self.stats.retried()
                    self.pool.publish(
                        RETRIED,
                        backend,
                        f"{method} {request.target}: {failure_text(exc, backend.url)}",
                    )
                    continue
                break
            except ClientBodyError:
                lease.release()  # the client's fault, not the backend's: no failure recorded
                raise
            except BaseException:
                lease.release("error")
                raise
            self.stats.observe(time.perf_counter() - started)
            first_byte = self.pool.clock() - lease.started
            headers = downstream_response_headers(resp.headers)
            if sticky is not None and lease.backend is not wanted:
                headers.append(("Set-Cookie", sticky.set_cookie(lease.backend)))
            status_line = f"{resp.status} {resp.reason}"
            status = resp.status

            def done(
                lease: Lease,
                sent: int,
                complete: bool,
                status: int = status,
                first_byte: float = first_byte,
            ) -> None:
                self.answered(
                    lease, key, status=status, first_byte=first_byte, complete=complete,
                    method=method, target=target, bytes_sent=sent,
                    client=environ.get("REMOTE_ADDR") or "",
                    protocol=environ.get("SERVER_PROTOCOL") or "HTTP/1.1",
                    referer=environ.get("HTTP_REFERER"),
                    user_agent=environ.get("HTTP_USER_AGENT"),
                )  # fmt: skip

            if data is not None:
                lease.release()
                done(lease, len(data), True)
                start_response(status_line, headers)
                return (data,) if data else ()
            answer = _StreamedAnswer(resp, lease, done, first=first, rest=rest)
            try:
                start_response(status_line, headers)
            except BaseException:
                answer.close()  # the server refused the answer: free the lease and connection
                raise
            return answer
        return self._error(environ, start_response, error)

    def answered(
        self,
        lease: Lease,
        key: str | None,
        *,
        status: int,
        first_byte: float,
        complete: bool,
        method: str,
        target: str,
        bytes_sent: int,
        client: str = "",
        protocol: str = "HTTP/1.1",
        referer: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """One request a backend answered, once its lease is released: the per-backend
        response metrics, the access log line and the pool's ``access`` hooks. Both engines
        call it, with plain values.

        ``first_byte`` is the seconds from the pick to the answer's head; ``complete`` says
        the whole body went out (else the time to the last byte is not counted).
        """
        now = self.pool.clock()
        total = max(now - lease.started, 0.0)
        url = lease.backend.url
        self.stats.response(url, status, first_byte, total if complete else None)
        access_log = self.access_log
        if access_log is not None:
            access_log.record(
                wall_clock_of(lease.started, now), key, total, url,
                client=client, method=method, target=target, protocol=protocol,
                status=status, bytes_sent=bytes_sent, referer=referer,
                user_agent=user_agent, duration=total,
            )  # fmt: skip
        if self.pool.wants(ACCESS):
            self.pool.publish(
                ACCESS, lease.backend, f"{method} {target} {status} {total * 1000:.1f} ms"
            )

    def _error(
        self, environ: Environ, start_response: StartResponse, error: ProxyError
    ) -> Iterable[bytes]:
        self.stats.error(error.status)
        status, headers, body = self.error_handler(environ, error)
        start_response(f"{status} {_REASONS.get(status, error.reason)}", headers)
        return (body,)

    def _client_error(
        self, start_response: StartResponse, status: int, why: str
    ) -> Iterable[bytes]:
        """The answer to a client's bad request (400, 501), which closes the connection: the
        rest of what the client sent cannot be trusted to be the next request. Nothing is
        counted against a backend."""
        # gunicorn ignores a Connection header from the app (PEP 3333 forbids hop-by-hop
        # headers there) but its Response, the object start_response is bound to, has
        # force_close().
        force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
        if callable(force_close):
            force_close()
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
    501: "Not Implemented",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Application:
    """The whole balancer as a WSGI app: pool, health checker, proxy, admin API and shared
    state, from a :class:`~softlb.config.Config`.

    ``state`` overrides the config's ``state`` (``softlb serve --workers N`` passes the
    SQLite file it made); with neither, the ``SOFTLB_STATE`` environment variable, else
    ``memory``.

    Threads (the health checker, the state poller, the event dispatcher), connections and
    shared files are made in the process that serves requests: :meth:`start` runs on creation
    and again in a child after ``fork()``, so the app is safe under ``gunicorn --preload`` as
    well as without it.

    State changes (backends added, removed, drained, going down or up, ejected; requests that
    found no backend) are logged to ``softlb.events`` through the pool's event hooks
    (:func:`softlb.logs.install_event_logging`), as text or, with ``log_format="json"``, one
    JSON object per line; ``log_format`` defaults to the ``SOFTLB_LOG_FORMAT`` environment
    variable, else ``"text"``.
    """

    def __init__(
        self,
        config: Config,
        *,
        threads: int | None = None,
        start: bool = True,
        state: str | None = None,
        log_format: str | None = None,
    ) -> None:
        from softlb.admin import AdminApi
        from softlb.balancers import balancer_by_name
        from softlb.health import HealthChecker

        self.config = config
        self.state_url = state or config.state or os.environ.get("SOFTLB_STATE") or "memory"
        source = "log_format" if log_format else "SOFTLB_LOG_FORMAT"
        log_format = log_format or os.environ.get("SOFTLB_LOG_FORMAT") or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"{source}: {log_format!r} is not a log format; allowed: text, json")
        self.log_format = log_format
        self._event_log: Callable[[], None] | None = None  # uninstalls the event log
        self.pool = Pool(
            [
                Backend(s.url, s.weight, max_connections=s.max_connections)
                for s in config.servers
                if not s.resolve
            ],
            balancer=balancer_by_name(config.algorithm),
            slow_start=config.slow_start,
        )
        #: Servers with ``resolve``: one backend per address, found in each process.
        self.resolved = [s for s in config.servers if s.resolve]
        self.resolver: Resolver | None = None
        self._unwatch: Callable[[], None] | None = None
        hc = config.health_check
        self.checker: HealthChecker | None = None
        if hc.enabled:
            self.checker = HealthChecker(
                self.pool,
                path=hc.path,
                interval=hc.interval,
                timeout=hc.timeout,
                rise=hc.rise,
                fall=hc.fall,
                expected_status=hc.expected_status,
                initial_state=hc.initial_state,
                log_changes=False,  # the event log says it (see start())
            )
        self.threads = threads or int(os.environ.get("SOFTLB_THREADS", "0") or 0) or 16
        self.proxy = LoadBalancer(
            self.pool,
            retries=config.retries,
            connect_timeout=config.timeouts.connect,
            read_timeout=config.timeouts.read,
            hash_key=config.hash_key,
            max_connections=self.threads,
            access_log=(
                AccessLog(config.access_log, config.access_log_format)
                if config.access_log
                else None
            ),
            sticky=(
                StickySessions(config.sticky.cookie, secret=config.cluster, secure=bool(config.tls))
                if config.sticky is not None
                else None
            ),
            queue_timeout=config.timeouts.queue,
        )
        self.admin = AdminApi(
            self.pool,
            prefix=config.admin.prefix,
            token=config.admin.token,
            seed_routes=config.admin.seed_routes,
            stats=self.proxy.stats,
            checker=self.checker,
            on_remove=self.proxy.upstream.forget,
            allow=config.admin.allow,
        )
        #: The port of ``admin.listen``: the admin API is served there only (SPEC §2).
        self.admin_port: int | None = None
        if config.admin.listen is not None:
            self.admin_port = int(config.admin.listen.rpartition(":")[2])
        self.state: SharedState | None = None
        self._pid: int | None = None  # the process whose threads are running
        self._server_checked = False  # whether this process's WSGI server was looked at
        self._start_lock = threading.Lock()
        _FORK_WATCH.add(self)
        if start:
            self.start()

    def _open_state(self) -> SharedState:
        from softlb.state import MAX_SLOTS, open_store
        from softlb.state.sync import PROXY_COLUMNS, SharedState, node_name, slot_path

        store = open_store(self.state_url, cluster=self.config.cluster)
        slots = None
        if store.kind != "memory":
            from softlb.state.slots import SlotTable

            slots = SlotTable(
                slot_path(self.state_url, self.config.cluster, node_name()),
                columns=MAX_SLOTS + PROXY_COLUMNS,  # the backends, then the proxy counters
            )
        state = SharedState(
            self.pool,
            store,
            checker=self.checker,
            seed=[(s.url, s.weight) for s in self.config.servers],
            slots=slots,
            stats=self.proxy.stats,
        )
        state.on_remove = self.proxy.upstream.forget
        if slots is not None:
            # max_connections counts the host's requests in flight, every worker's.
            def others(backend: Backend, table: Any = slots) -> int:
                slot = backend._slot
                return table.in_flight_of_others(slot) if slot is not None else 0

            self.pool.others_in_flight = others
        return state

    def start(self) -> None:
        """Start the event log, the shared state and the health checker in this process;
        idempotent."""
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            if self._event_log is None:  # kept across a fork: the child's pool has the hooks
                from softlb.logs import install_event_logging

                self._event_log = install_event_logging(self.pool, json=self.log_format == "json")
            self.state = self._open_state()
            self.admin.state = self.state
            if self.checker is not None:
                if self.state.store.kind != "memory":
                    self.checker.set_active(False)  # until this process wins the prober lease
                self.checker.start()
            self.state.start()
            self._unwatch = self.proxy.stats.watch(self.pool, self.checker)
            if self.resolved:
                from softlb.discovery import Resolver

                self.resolver = Resolver(
                    self.pool,
                    self.resolved,
                    self.config.health_check.interval,
                    on_remove=self.proxy.upstream.forget,
                )
                self.resolver.start()

    def _after_fork(self) -> None:
        """In a child made by ``fork()``: fresh locks, connections and shared state, and the
        threads started again if they ran in the parent (they did not come along)."""
        was_running = self._pid is not None
        self._start_lock = threading.Lock()
        self.pool._after_fork()
        self.proxy.upstream = ProxyUpstream(
            connect_timeout=self.config.timeouts.connect,
            read_timeout=self.config.timeouts.read,
            maxsize=self.threads,
        )
        self.admin.on_remove = self.proxy.upstream.forget
        self.pool.count_sink = None
        self.state = self.admin.state = None  # the parent's; a new one is opened on start
        self.resolver = None  # its thread did not come along; start() makes a new one
        self._unwatch = None
        if self.checker is not None:
            self.checker._after_fork()
        self._pid = None
        self._server_checked = False
        if was_running:
            self.start()

    def stop(self) -> None:
        """Stop the threads, give shared resources back and close backend connections."""
        if self.resolver is not None:
            self.resolver.stop()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.state is not None:
            self.state.stop()
        if self.checker is not None:
            self.checker.stop()
        self.proxy.close()
        self.pool.close()  # the last events are logged, then the dispatcher thread ends
        self._pid = None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if not self._server_checked:  # once: a warning if gunicorn serves one request at a time
            self._server_checked = True
            warn_if_serial(environ)
        if self.admin_port is not None:
            # admin.listen: the admin API on its own address, the proxy everywhere else.
            if _local_port(environ) == self.admin_port:
                return self.admin(environ, start_response)
            return self.proxy(environ, start_response)
        if self.admin.matches(environ.get("PATH_INFO") or "/"):
            return self.admin(environ, start_response)
        return self.proxy(environ, start_response)

    def __repr__(self) -> str:
        return (
            f"<Application {self.pool!r} state={self.state_url} admin={self.config.admin.prefix}>"
        )


def _local_port(environ: Environ) -> int | None:
    """The local port the request arrived on: from the connection itself where the server
    gives it (gunicorn's ``gunicorn.socket``), else ``SERVER_PORT`` (which a Host header can
    set, so only where nothing better is known)."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            return int(sock.getsockname()[1])
        except (OSError, IndexError, TypeError, ValueError):
            return None
    try:
        return int(environ.get("SERVER_PORT") or 0)
    except ValueError:
        return None


#: Every live Application, so that a forked child can make each one usable again.
_FORK_WATCH: weakref.WeakSet[Application] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for app in list(_FORK_WATCH):
        app._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def create_app(config: str | os.PathLike[str] | Config | None = None) -> Application:
    """Build the balancer's WSGI app from a config file path or a :class:`Config`.

    With no argument the path comes from the ``SOFTLB_CONFIG`` environment variable. A bad
    config raises :class:`~softlb.errors.ConfigError` listing every problem.

    Unless the program has set up logging, softlb's lines go to stderr with time and level
    (:func:`softlb.logs.configure_logging`). The app logs that the WSGI server's bind, not the
    config's ``listen``, decides where it listens, and warns on its first request if gunicorn
    serves one request at a time (:func:`softlb.logs.warn_if_serial`).
    """
    from softlb.config import Config, load_config
    from softlb.logs import configure_logging

    configure_logging()

    if config is None:
        path = os.environ.get("SOFTLB_CONFIG")
        if not path:
            raise ConfigError(
                "no config given: call create_app('config.json') or set SOFTLB_CONFIG"
            )
        config = path
    if not isinstance(config, Config):
        config = load_config(config)
    app = Application(config)
    logging.getLogger("softlb.server").info(
        "balancer ready (%s, %d backends, config %s); the WSGI server's bind decides where it "
        "listens, not the config's listen (%s)",
        config.algorithm,
        len(config.servers),
        config.source,
        config.listen,
    )
    return app
