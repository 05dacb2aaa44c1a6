"""An httpx transport that balances over a softlb :class:`~softlb.pool.Pool`.

Give it to an :class:`httpx.Client` with a made-up base URL; every request goes to a
backend the pool picks, with the path and query kept::

    client = httpx.Client(transport=BalancedTransport(pool), base_url="http://service")
    client.get("/users/1")                     # GET /users/1 on one of the pool's backends

The host name (``service`` here) is only a name: it is never resolved and not sent (each
backend gets its own ``Host``, unless the request sets another one). Needs
``pip install softlb[httpx]``. Synchronous clients only (``httpx.Client``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "softlb.contrib.httpx_transport needs httpx: pip install softlb[httpx]"
    ) from exc

from softlb.client import BalancedClient, ClientResponse
from softlb.contrib import client_for
from softlb.errors import (
    NoBackendAvailable,
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from softlb.http.upstream import CHUNK_SIZE
from softlb.pool import Pool

__all__ = ["BalancedTransport"]

RequestKey = Callable[[httpx.Request], str | None]


class BalancedTransport(httpx.BaseTransport):
    """Sends an :class:`httpx.Client`'s requests through a :class:`~softlb.client.BalancedClient`.

    ``target`` is a :class:`~softlb.pool.Pool` (the transport makes a client for it from
    ``client_options``, the keyword arguments of :class:`~softlb.client.BalancedClient`,
    and closes it with the httpx client) or a client to share. ``key(request)``, if given,
    returns the value the hashing strategies hash.

    What the client does, the transport does: the same picking, in-flight counting, latency
    and failure records, retry rules and retry budget. httpx reads the body after the
    transport has returned, so a failure while reading it is not retried; the request stays
    counted in flight until the body has been read or the response closed. Bodies come back
    as the backend sent them and httpx decodes them, as with its own transport.

    Errors are httpx's own, with the softlb error as their ``__cause__``: no backend, or none
    could be connected, :class:`httpx.ConnectError`; no answer within the read timeout (or
    the body stalled), :class:`httpx.ReadTimeout`; connection broken after sending,
    :class:`httpx.ReadError`. The timeouts are httpx's ``connect`` and ``read``.
    """

    def __init__(
        self,
        target: Pool | BalancedClient,
        *,
        key: RequestKey | None = None,
        **client_options: Any,
    ) -> None:
        self.client, self._owns_client = client_for(target, client_options)
        self.key = key

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to a backend of the pool; the response's body streams."""
        headers: dict[str, str] = {}
        lowered: dict[str, str] = {}  # lower-cased name -> the spelling kept in headers
        for name, value in request.headers.multi_items():
            kept = lowered.setdefault(name.lower(), name)
            headers[kept] = f"{headers[kept]}, {value}" if kept in headers else value
        host = lowered.get("host")
        if host is not None and headers[host] == request.url.netloc.decode("ascii"):
            del headers[host]  # httpx's own, naming the made-up host: the backend gets its own
        body: Any
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = request.stream  # a streaming upload: sent once, as it is read
        timeouts = request.extensions.get("timeout") or {}
        try:
            raw = self.client.send(
                request.method,
                request.url.raw_path.decode("ascii"),
                headers,
                body if body != b"" else None,
                preload_content=False,
                decode_content=False,
                timeout=(timeouts.get("connect"), timeouts.get("read")) if timeouts else None,
                key=self.key(request) if self.key is not None else None,
            )
        except (NoBackendAvailable, UpstreamError) as exc:
            raise _httpx_error(exc, request) from exc
        return httpx.Response(
            status_code=raw.status,
            headers=list(raw.headers.iteritems()),
            stream=_ResponseStream(raw, request),
            extensions={
                "http_version": b"HTTP/1.0" if raw.version == 10 else b"HTTP/1.1",
                "reason_phrase": (raw.reason or "").encode("latin-1"),
            },
        )

    def close(self) -> None:
        """Close the client's connections if the transport made the client."""
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"<BalancedTransport {self.client!r}>"


class _ResponseStream(httpx.SyncByteStream):
    """A backend's body for httpx, read as httpx asks; closing it ends the request."""

    def __init__(self, raw: ClientResponse, request: httpx.Request) -> None:
        self._raw = raw
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._raw.stream(CHUNK_SIZE, decode_content=False)
        except UpstreamError as exc:
            raise _httpx_error(exc, self._request) from exc

    def close(self) -> None:
        self._raw.close()


def _httpx_error(error: ProxyError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for a softlb error."""
    message = str(error)
    if isinstance(error, UpstreamTimeout):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(error, UpstreamError) and not isinstance(error, UpstreamConnectError):
        return httpx.ReadError(message, request=request)
    return httpx.ConnectError(message, request=request)
