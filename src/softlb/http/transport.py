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

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from softlb.http.upstream import TimeoutValue

__all__ = ["Transport", "TransportResponse"]


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
