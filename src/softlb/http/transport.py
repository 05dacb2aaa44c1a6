"""The interface every upstream HTTP client of the proxy offers: :class:`Transport` and the
:class:`TransportResponse` it returns.

Two clients implement it: :class:`~softlb.http.wire.ProxyUpstream` (the proxy's own
HTTP/1.1 client for ``http://`` backends, which hands ``https://`` ones to the next) and
:class:`~softlb.http.upstream.Upstream` (urllib3, which does TLS). The WSGI proxy
(:class:`~softlb.wsgi.LoadBalancer`) takes either. One contract test suite,
``tests/http/test_transport_contract.py``, runs over every client against real sockets:
framing, early answers, stale pooled connections, timeouts and header rules.

The contract, beyond the signatures:

* ``target`` goes out byte for byte after the backend URL's base path; ``headers`` go out as
  given: nothing added but ``Host`` (when absent) and the body's framing, no User-Agent or
  Accept-Encoding, no hop-by-hop header; the caller's dict is never changed (a failover sends
  the same dict to the next backend);
* a body is bytes (sent with a Content-Length; replayable), an iterable of bytes (streamed;
  ``chunked=True`` when its length is unknown) or ``None``;
* the answer's framing follows RFC 9112 §6.3 (no body for HEAD, 204 and 304; chunked;
  Content-Length; else until the connection closes); ``headers`` are the backend's, in order;
* a backend that answers before reading the whole body (an early 413 or 401) has that
  answer returned, not an error;
* what goes wrong leaves as :class:`~softlb.errors.UpstreamConnectError` (nothing was sent),
  :class:`~softlb.errors.UpstreamTimeout` or :class:`~softlb.errors.UpstreamBroken`, from
  :meth:`Transport.request` or while reading the body; a pooled connection the backend
  closed while idle is not an error of the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from softlb.errors import UpstreamConnectError, UpstreamError
from softlb.http.upstream import TimeoutValue
from softlb.retry import Attempts, ClientAbort

if TYPE_CHECKING:
    from softlb.backend import Backend
    from softlb.pool import Lease

__all__ = [
    "Exchange",
    "ReplayableBody",
    "SchemeRouter",
    "Transport",
    "TransportResponse",
    "UpstreamRequest",
    "proxy_transport",
    "round_trip",
]

T = TypeVar("T")


@runtime_checkable
class TransportResponse(Protocol):
    """A backend's answer whose body has not been read yet.

    ``length`` is the body's size when known (0 when there is none), else ``None``. Read the
    body with :meth:`read_small` or :meth:`chunks`, then :meth:`close`.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    length: int | None

    def read_small(self) -> bytes:
        """The whole body (call only when :attr:`length` is known and small)."""
        ...

    def chunks(self, size: int = ...) -> Iterator[bytes]:
        """The body as it arrives, undecoded and de-chunked, in pieces of up to ``size``."""
        ...

    def close(self, complete: bool) -> None:
        """Pool the connection again if ``complete`` and the body was read to its end and the
        connection may carry another request; else close it."""
        ...


@runtime_checkable
class Transport(Protocol):
    """Pooled keep-alive connections to backends, and one call to send a request on them."""

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
    ) -> TransportResponse:
        """Send one request and return the answer's status and headers, body unread."""
        ...

    def forget(self, backend_url: str) -> None:
        """Close the pooled connections of a backend that left the pool."""
        ...

    def close(self) -> None:
        """Close every pooled connection."""
        ...


@dataclass
class UpstreamRequest:
    """What is about to be sent to a backend; a ``rewrite`` hook may change any field."""

    method: str
    target: str
    headers: dict[str, str]


class SchemeRouter:
    """A :class:`Transport` that hands each request to the transport of its backend's scheme
    (``{"http": ..., "https": ...}``): the implementations stand side by side, and the
    composition root chooses which speaks what. A scheme with no transport is an
    :class:`~softlb.errors.UpstreamConnectError` (nothing was sent)."""

    def __init__(self, transports: Mapping[str, Transport]) -> None:
        self.transports = {scheme.lower(): t for scheme, t in transports.items()}

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
    ) -> TransportResponse:
        """Send the request with the transport of ``backend_url``'s scheme."""
        scheme = backend_url.partition("://")[0].lower()
        transport = self.transports.get(scheme)
        if transport is None:
            raise UpstreamConnectError(
                f"no client for {scheme}:// backends: {backend_url}", backend=backend_url
            )
        return transport.request(
            backend_url, method, target, headers, body, chunked=chunked, timeout=timeout
        )

    def forget(self, backend_url: str) -> None:
        """Close the pooled connections of a backend that left the pool."""
        transport = self.transports.get(backend_url.partition("://")[0].lower())
        if transport is not None:
            transport.forget(backend_url)

    def close(self) -> None:
        """Close every transport's pooled connections."""
        for transport in {id(t): t for t in self.transports.values()}.values():
            transport.close()

    def __repr__(self) -> str:
        routes = ", ".join(f"{s}: {type(t).__name__}" for s, t in self.transports.items())
        return f"<SchemeRouter {routes}>"


def proxy_transport(
    *,
    connect_timeout: float = 2.0,
    read_timeout: float = 30.0,
    maxsize: int = 10,
    ca_certs: str | None = None,
) -> SchemeRouter:
    """The reverse proxy's transport: :class:`~softlb.http.wire.ProxyUpstream` (softlb's lean
    HTTP/1.1 client) for ``http://`` backends and urllib3's
    :class:`~softlb.http.upstream.Upstream` for ``https://`` ones (``ca_certs``: a PEM file
    of the authorities their certificates are checked against; default: the system's).
    ``maxsize`` idle connections are kept per backend."""
    from softlb.http.upstream import Upstream
    from softlb.http.wire import ProxyUpstream

    timeouts = {"connect_timeout": connect_timeout, "read_timeout": read_timeout}
    return SchemeRouter(
        {
            "http": ProxyUpstream(maxsize=maxsize, **timeouts),
            "https": Upstream(maxsize=maxsize, ca_certs=ca_certs, **timeouts),
        }
    )


class ReplayableBody(Protocol):
    """A request body as :func:`round_trip` sends it: :meth:`source` gives what to send on
    each try, :attr:`replayable` whether a second try could send it again."""

    @property
    def replayable(self) -> bool:
        """Whether the body can be sent again (read ahead whole, or none)."""
        ...

    def source(self) -> bytes | Iterable[bytes] | None:
        """The body for the next try: bytes, an iterable of bytes, or ``None``."""
        ...


class Exchange:
    """A backend's answer that owns what it holds: the pool's lease on the backend and the
    pooled connection the answer is read from (Go's one-owner rule: whoever has the
    :class:`Exchange` ends both, with :meth:`close`, exactly once)."""

    __slots__ = ("_closed", "lease", "response")

    def __init__(self, response: TransportResponse, lease: Lease) -> None:
        self.response = response
        self.lease = lease
        self._closed = False

    @property
    def backend(self) -> Backend:
        """The backend that answered."""
        return self.lease.backend

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def close(self, *, complete: bool, failure: str | None = None) -> None:
        """End the exchange: the connection goes back to its pool if ``complete`` (the body
        was read to its end), else it is closed; the lease ends with ``failure`` recorded if
        one is named. Only the first call counts."""
        if self._closed:
            return
        self._closed = True
        try:
            self.response.close(complete=complete)
        finally:
            self.lease.release(failure)

    def __repr__(self) -> str:
        return f"<Exchange {self.backend.url} {self.response.status}>"


def round_trip(
    attempts: Attempts,
    transport: Transport,
    request: UpstreamRequest,
    body: ReplayableBody,
    prepare: Callable[[Exchange], T],
    *,
    chunked: bool = False,
    timeout: TimeoutValue = None,
) -> T:
    """Send a request to the backends ``attempts`` picks, until one answers or the rules
    of SPEC §3 say stop; return ``prepare(exchange)`` for the answer.

    ``prepare`` runs inside the loop, so what it reads of the answer (a small body read
    whole, the first piece of a streamed one) can still fail over: an
    :class:`~softlb.errors.UpstreamError` from it closes the exchange's connection and counts
    as the backend's failure. From the moment ``prepare`` returns, its result owns the
    exchange (and must :meth:`~Exchange.close` it). When nothing could answer, the last
    failure is raised (:attr:`Attempts.error`). A :class:`~softlb.retry.ClientAbort` from
    sending the body or from ``prepare`` ends the lease unblamed and propagates; any other
    exception ends it as the proxy's ``"error"``.
    """
    while (lease := attempts.next()) is not None:
        response: TransportResponse | None = None
        try:
            response = transport.request(
                lease.backend.url,
                request.method,
                request.target,
                request.headers,
                body.source(),
                chunked=chunked,
                timeout=timeout,
            )
            prepared = prepare(Exchange(response, lease))
        except UpstreamError as exc:
            if response is not None:
                response.close(complete=False)
            if attempts.failed(exc, replayable=body.replayable):
                continue
            break
        except ClientAbort:
            if response is not None:
                response.close(complete=False)
            attempts.abort(client=True)
            raise
        except BaseException:
            if response is not None:
                response.close(complete=False)
            attempts.abort(client=False)
            raise
        attempts.succeeded()
        return prepared
    assert attempts.error is not None
    raise attempts.error
