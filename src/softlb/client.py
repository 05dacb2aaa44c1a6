"""Client-side balancing: make requests through a :class:`~softlb.pool.Pool` from your program.

:class:`BalancedClient` has the request API of urllib3's ``PoolManager`` with a path instead of
a URL: each request goes to a backend the pool picks, is counted in flight on it until its
answer has been read, and feeds the backend's latency and failures back to the pool (so peak
EWMA and a :class:`~softlb.health.HealthChecker`'s passive checks see client traffic). A failed
request is tried on another backend by the proxy's rules (:mod:`softlb.wsgi`, SPEC §3), as
long as a :class:`RetryBudget` allows::

    with BalancedClient(pool) as client:
        resp = client.request("GET", "/users/1")
        resp.status, resp.headers["Content-Type"], resp.json()

The adapters for requests (:mod:`softlb.contrib.requests_adapter`) and httpx
(:mod:`softlb.contrib.httpx_transport`) call :meth:`BalancedClient.send`, so all three share
one retry loop.
"""

from __future__ import annotations

import json as jsonlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Final, TypeAlias, cast
from urllib.parse import urlencode

from softlb.errors import UpstreamError
from softlb.http.transport import Exchange, UpstreamRequest, round_trip
from softlb.http.upstream import (
    CHUNK_SIZE,
    CLIENT_USER_AGENT,
    ClientResponse,
    TimeoutValue,
    Upstream,
    UpstreamResponse,
    encode_form,
)
from softlb.pool import Lease, Pool, PoolEvent
from softlb.retry import Attempts, failure_kind, may_resend

__all__ = [
    "DEFAULT_BUDGET_WINDOW",
    "DEFAULT_MIN_RETRIES_PER_SECOND",
    "DEFAULT_RETRY_RATIO",
    "BalancedClient",
    "ClientResponse",
    "RetryBudget",
]

log = logging.getLogger("softlb.client")

#: Share of requests that may be retried on top of the floor: 20 %, the default of Finagle's
#: ``RetryBudget`` (``percentCanRetry = 0.2``) and of Envoy's ``retry_budget``
#: (``budget_percent``). Under a total outage, load on the backends grows by at most this much.
DEFAULT_RETRY_RATIO: Final = 0.2

#: Retries allowed per second whatever the traffic, so that a client that has just started or
#: sends little can still retry. Envoy's ``min_retry_concurrency`` defaults to 3 (a floor on
#: concurrent retries); Finagle's ``minRetriesPerSec`` is a rate and defaults to 10. We keep
#: Finagle's rate form with Envoy's more cautious number.
DEFAULT_MIN_RETRIES_PER_SECOND: Final = 3.0

#: Seconds a request's credit (and a retry's debit) counts for: Finagle's default ``ttl``.
DEFAULT_BUDGET_WINDOW: Final = 10.0

#: Credit is counted in integer tokens so that ratios add up exactly; one request deposits
#: this many. Finagle's ``TokenRetryBudget.ScaleFactor``.
_SCALE: Final = 1000

#: The window is kept in this many slices; a credit expires when its slice leaves the window,
#: between 0.9 and 1.0 window after it was made. Finagle's ``WindowedAdder`` uses 10 slices.
_SLICES: Final = 10

#: Methods whose query string carries ``fields`` (urllib3's ``_encode_url_methods``).
_URL_FIELD_METHODS: Final = frozenset({"DELETE", "GET", "HEAD", "OPTIONS"})

Body: TypeAlias = "bytes | bytearray | memoryview | str | IO[bytes] | IO[str] | Iterable[bytes]"


class RetryBudget:
    """How many retries a client may make: ``ratio`` of its recent requests, plus a floor.

    Finagle's ``RetryBudget`` semantics, which Envoy's ``retry_budget`` and tower's ``Budget``
    share: every request calls :meth:`deposit` once and every retry needs
    :meth:`try_withdraw` to succeed. Within any ``window`` seconds, the retries allowed are
    ``min_per_second * window`` plus ``ratio`` times the requests deposited in that window.
    With the defaults (20 %, 3/s, 10 s) a client sending 100 requests a second may retry up to
    20 + 3 of them a second; one sending none still has 30 retries per 10 s. When backends
    fail for good, retries stop at the budget instead of multiplying the load by ``retries``.

    Deposits and withdrawals are forgotten after ``window`` seconds (the window moves in tenths
    of itself), so an idle spell restores the floor and an old burst of traffic does not buy
    retries for ever. The floor is spent as it comes: 30 retries may all go in the first
    second of a window. ``ratio`` may exceed 1 (2.0 allows two retries per request);
    ``ratio=0`` leaves the floor alone, and ``ratio=0, min_per_second=0`` allows no retry.

    Thread-safe: share one budget between clients to cap their retries together. ``clock``
    (seconds, monotonic) is for tests.
    """

    def __init__(
        self,
        ratio: float = DEFAULT_RETRY_RATIO,
        min_per_second: float = DEFAULT_MIN_RETRIES_PER_SECOND,
        window: float = DEFAULT_BUDGET_WINDOW,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= _SCALE or math.isnan(ratio):
            raise ValueError(f"ratio must be from 0 to {_SCALE}, got {ratio}")
        if not min_per_second >= 0 or math.isinf(min_per_second):
            raise ValueError(f"min_per_second must be a number >= 0, got {min_per_second}")
        if not 0 < window < math.inf:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        self.ratio = float(ratio)
        self.min_per_second = float(min_per_second)
        self.window = float(window)
        self.clock = clock
        # Immutable after construction. A request earns _deposit tokens, a retry costs
        # _cost; with no ratio every retry costs 1 and only the floor pays for it (Finagle).
        self._deposit = _SCALE if ratio > 0 else 0
        self._cost = max(1, int(_SCALE / ratio)) if ratio > 0 else 1
        self._reserve = int(self.min_per_second * self.window * self._cost)
        self._lock = threading.Lock()
        # protected by _lock: tokens deposited (+) and withdrawn (-) per slice, a ring, and
        # the index of the current slice (time // slice width).
        self._slices = [0] * _SLICES
        self._total = 0
        self._current = self._slice_of(clock())

    def _slice_of(self, now: float) -> int:
        return math.floor(now * _SLICES / self.window)

    def _advance(self) -> None:
        """Forget the slices that left the window; the caller holds the lock."""
        current = self._slice_of(self.clock())
        steps = current - self._current
        if steps <= 0:
            return
        for index in range(self._current + 1, self._current + 1 + min(steps, _SLICES)):
            slot = index % _SLICES
            self._total -= self._slices[slot]
            self._slices[slot] = 0
        self._current = current

    def _add(self, tokens: int) -> None:
        self._slices[self._current % _SLICES] += tokens
        self._total += tokens

    def deposit(self) -> None:
        """Count one request (not a retry): it earns ``ratio`` of a retry for ``window``."""
        if not self._deposit:
            return
        with self._lock:
            self._advance()
            self._add(self._deposit)

    def try_withdraw(self) -> bool:
        """Take one retry from the budget if it has one; ``False`` (and nothing taken) if not."""
        with self._lock:
            self._advance()
            if self._reserve + self._total < self._cost:
                return False
            self._add(-self._cost)
            return True

    @property
    def balance(self) -> int:
        """How many retries the budget would allow right now."""
        with self._lock:
            self._advance()
            return max(0, (self._reserve + self._total) // self._cost)

    def __repr__(self) -> str:
        return (
            f"<RetryBudget {self.ratio:.0%} of requests + {self.min_per_second:g}/s "
            f"over {self.window:g}s | {self.balance} retries available>"
        )


class _RequestBody:
    """A request body as the upstream call wants it, and whether it can be sent again.

    Bytes (and str, sent as UTF-8) can be sent any number of times. A file or an iterable is
    streamed; it can be sent again only if no byte of it was taken yet (a connect failure).
    """

    __slots__ = ("data", "started", "stream")

    def __init__(self, body: Body | None) -> None:
        self.data: bytes | None = None
        self.stream: Iterator[bytes] | None = None
        self.started = False
        if body is None:
            return
        if isinstance(body, str):
            self.data = body.encode("utf-8")
        elif isinstance(body, (bytes, bytearray, memoryview)):
            self.data = bytes(body)
        elif callable(getattr(body, "read", None)):
            self.stream = self._from_file(cast("IO[bytes] | IO[str]", body))
        else:
            self.stream = self._from_iterable(cast("Iterable[bytes]", body))

    @property
    def replayable(self) -> bool:
        return not self.started

    def source(self) -> bytes | Iterable[bytes] | None:
        return self.data if self.stream is None else self.stream

    def _from_file(self, file: IO[bytes] | IO[str]) -> Iterator[bytes]:
        self.started = True
        while True:
            chunk = file.read(CHUNK_SIZE)
            if not chunk:
                return
            yield chunk.encode("utf-8") if isinstance(chunk, str) else chunk

    def _from_iterable(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        self.started = True
        for chunk in chunks:
            yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header ``name`` in any case, or ``None``."""
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def _merge_headers(*layers: Mapping[str, str] | None) -> dict[str, str]:
    """Later layers override earlier ones, names compared without regard to case."""
    merged: dict[str, str] = {}
    index: dict[str, str] = {}  # lower-cased name -> the spelling kept in merged
    for layer in layers:
        for name, value in (layer or {}).items():
            previous = index.get(name.lower())
            if previous is not None:
                del merged[previous]
            merged[name] = value
            index[name.lower()] = name
    return merged


def _check_path(path: str) -> None:
    """Raise :class:`ValueError` unless ``path`` is a path and query starting with ``/``."""
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in path):
        raise ValueError(
            f"path {path!r} contains spaces or control characters: percent-encode them"
        )
    if "://" in path.split("?", 1)[0] or not path.startswith("/") or path.startswith("//"):
        raise ValueError(
            f"BalancedClient takes a path such as '/users?id=1', not {path!r}: the pool picks "
            "the backend, so the scheme and host come from the backend's URL"
        )


class BalancedClient:
    """An HTTP client that sends each request to a backend of ``pool``.

    A drop-in for the request API of urllib3's ``PoolManager``: :meth:`request` takes a
    method and a *path* (``"/users?id=1"``) and returns a urllib3 response
    (:class:`~softlb.http.upstream.ClientResponse`, a :class:`urllib3.BaseHTTPResponse`).

    Per request the pool picks a backend and counts the request in flight on it until the
    answer's body has been read (or the response closed); the backend's latency is recorded
    on success and a failure (``"connect"``, ``"timeout"`` or ``"broken"``) otherwise, so
    peak EWMA and a :class:`~softlb.health.HealthChecker`'s passive checks see this traffic.

    Retries follow the proxy's rules: a request that could not be connected is tried on
    another backend whatever its method; one that failed after it was sent (reset, closed
    without an answer, read timeout) only if its method is idempotent (GET, HEAD, OPTIONS,
    TRACE, PUT, DELETE) or it has an ``Idempotency-Key`` header. At most ``retries`` other
    backends are tried, each retry only if ``budget`` allows (``None``: a new
    :class:`RetryBudget` with the defaults; pass one instance to several clients to share
    it). A body can be sent again if it is bytes or str; a file or iterator only if it had not
    started. An HTTP answer, whatever its status, is never retried.

    ``connect_timeout`` and ``read_timeout`` are seconds; ``headers`` are sent with every
    request (the request's own win); ``maxsize`` is how many idle connections are kept per
    backend (set it to the number of threads that use the client). Thread-safe: share one
    client between threads. Close it (or use it in a ``with`` block) to close its connections.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        retries: int = 2,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        budget: RetryBudget | None = None,
        headers: Mapping[str, str] | None = None,
        maxsize: int = 10,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.pool = pool
        self.retries = retries
        self.budget = budget if budget is not None else RetryBudget()
        self.headers: dict[str, str] = dict(headers or {})
        self.upstream = Upstream(
            connect_timeout=connect_timeout, read_timeout=read_timeout, maxsize=maxsize
        )
        # Close the connections of a backend that leaves the pool. A weak reference, so that
        # the pool does not keep a client nobody uses alive.
        client = weakref.ref(self)

        def on_event(event: PoolEvent) -> None:
            me = client()
            if me is not None and event.url is not None:
                me.upstream.forget(event.url)

        self._unsubscribe: Callable[[], None] | None = pool.subscribe(on_event, ("removed",))

    # -- the urllib3-style API -----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Body | None = None,
        fields: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        preload_content: bool = True,
        decode_content: bool = True,
        timeout: TimeoutValue = None,
        key: str | None = None,
        retries: int | None = None,
        redirect: bool = False,
    ) -> ClientResponse:
        """Send ``method path`` to a backend of the pool and return its answer.

        ``path`` is the path and query string (``"/search?q=x"``); a full URL is a
        :class:`ValueError`. ``body`` is bytes, str (sent as UTF-8), a binary file or an
        iterable of bytes (streamed, chunked unless a Content-Length header is given);
        ``fields`` are encoded into the query string for GET, HEAD, DELETE and OPTIONS and as
        ``multipart/form-data`` otherwise; ``json`` is sent as ``application/json``, as
        urllib3 does. ``headers`` are added to the client's.

        With ``preload_content=True`` (the default) the body is read before returning, inside
        the retry loop: a failure while reading it is retried like one before the answer.
        With ``False`` the response streams (``stream()``, ``read(amt)``) and the request
        stays counted in flight until its body has been read or it is closed; close it.
        ``decode_content`` decodes gzip/deflate bodies. ``timeout`` is seconds, a
        ``(connect, read)`` pair or a ``urllib3.Timeout``, for this request only. ``key``
        feeds the hashing strategies (consistent hash). ``retries`` overrides the client's for
        this request. Redirects are not followed (``redirect=True`` is refused).

        Raises :class:`~softlb.errors.NoBackendAvailable` when nothing is in rotation,
        :class:`~softlb.errors.UpstreamConnectError` when no tried backend could be
        connected, :class:`~softlb.errors.UpstreamTimeout` when the backend did not answer
        in time and :class:`~softlb.errors.UpstreamBroken` when the connection failed after
        the request was sent (each after the retries the rules and the budget allowed).
        """
        _check_path(path)
        if redirect:
            raise ValueError(
                "BalancedClient does not follow redirects; the answer's Location header is "
                "in resp.headers (use resp.get_redirect_location())"
            )
        given = sum(x is not None for x in (body, fields, json))
        if given > 1:
            raise TypeError("give at most one of body, fields and json")
        extra: dict[str, str] = {}
        if json is not None:
            body = jsonlib.dumps(json, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            extra["Content-Type"] = "application/json"
        elif fields is not None:
            if method.upper() in _URL_FIELD_METHODS:
                items = fields.items() if isinstance(fields, Mapping) else fields
                query = urlencode(list(items))
                if query:
                    path += ("&" if "?" in path else "?") + query
            else:
                body, extra["Content-Type"] = encode_form(fields)
        merged = _merge_headers({"User-Agent": CLIENT_USER_AGENT}, self.headers, extra, headers)
        return self.send(
            method,
            path,
            merged,
            body,
            preload_content=preload_content,
            decode_content=decode_content,
            timeout=timeout,
            key=key,
            retries=retries,
        )

    def urlopen(self, method: str, path: str, **kw: Any) -> ClientResponse:
        """The same as :meth:`request` (urllib3's lower-level name, for drop-in use)."""
        return self.request(method, path, **kw)

    # -- the retry loop every front end shares ---------------------------------------------

    def send(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: Body | None = None,
        *,
        preload_content: bool = True,
        decode_content: bool = True,
        timeout: TimeoutValue = None,
        key: str | None = None,
        retries: int | None = None,
    ) -> ClientResponse:
        """Send a request exactly as given — no client headers added, nothing encoded.

        :meth:`request` and the requests and httpx adapters call this; it picks backends,
        retries and records outcomes as :meth:`request` describes. ``target`` is the path and
        query; ``headers`` go out as they are (the backend's ``Host`` is added unless there
        is one).
        """
        _check_path(target)
        limit = self.retries if retries is None else int(retries)
        source = _RequestBody(body)
        self.budget.deposit()
        attempts = Attempts(
            self.pool,
            key,
            method=method,
            target=target,
            resend=may_resend(method, _header(headers, "Idempotency-Key") is not None),
            retries=limit,
            budget=self.budget,
            logger=log,
        )

        def prepare(exchange: Exchange) -> ClientResponse:
            response = ClientResponse(
                cast(UpstreamResponse, exchange.response),  # what self.upstream returns
                request_url=exchange.backend.url + target,
                decode_content=decode_content,
                on_done=_ender(exchange.lease),
            )
            if preload_content:
                response.read(cache_content=True)  # kept as .data; ends the lease
            return response

        request = UpstreamRequest(method, target, dict(headers))
        return round_trip(attempts, self.upstream, request, source, prepare, timeout=timeout)

    # -- life cycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every pooled connection and stop following the pool's membership.

        Responses still being read keep their connection until they are closed.
        """
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.upstream.close()

    def __enter__(self) -> BalancedClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<BalancedClient {self.pool!r} retries={self.retries} | "
            f"budget: {self.budget.balance} retries available>"
        )


def _ender(lease: Lease) -> Callable[[UpstreamError | None], None]:
    """The ``on_done`` of a response: ends ``lease`` with the outcome of reading the body."""

    def end(error: UpstreamError | None) -> None:
        lease.release(None if error is None else failure_kind(error))

    return end
