"""A requests transport adapter that balances over a softlb :class:`~softlb.pool.Pool`.

Mount it on a prefix made of a made-up host name; every request under that prefix goes to a
backend the pool picks, with the path and query kept::

    session = requests.Session()
    session.mount("http://service/", BalancedAdapter(pool))
    session.get("http://service/users/1")      # GET /users/1 on one of the pool's backends

The host name (``service`` here) is only a name for the prefix: it is never resolved and not
sent (each backend gets its own ``Host``, unless the request sets one). Needs
``pip install softlb[requests]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import requests
    from requests.adapters import BaseAdapter
    from requests.cookies import extract_cookies_to_jar
    from requests.models import PreparedRequest, Response
    from requests.structures import CaseInsensitiveDict
    from requests.utils import get_encoding_from_headers
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "softlb.contrib.requests_adapter needs requests: pip install softlb[requests]"
    ) from exc

from softlb.client import BalancedClient, ClientResponse
from softlb.contrib import client_for
from softlb.errors import NoBackendAvailable, ProxyError, UpstreamError, UpstreamTimeout
from softlb.http.upstream import TimeoutValue
from softlb.pool import Pool

__all__ = ["BalancedAdapter"]

RequestKey = Callable[[PreparedRequest], str | None]


class BalancedAdapter(BaseAdapter):
    """Sends a requests session's requests through a :class:`~softlb.client.BalancedClient`.

    ``target`` is a :class:`~softlb.pool.Pool` (the adapter makes a client for it from
    ``client_options``, the keyword arguments of :class:`~softlb.client.BalancedClient`,
    and closes it with the session) or a client to share between adapters. ``key(request)``,
    if given, returns the value the hashing strategies hash (a user id, a header).

    What the client does, the adapter does: the same picking, in-flight counting, latency and
    failure records, retry rules and retry budget. With ``stream=False`` (requests' default)
    the body is read inside the retry loop; with ``stream=True`` the request stays counted
    in flight until the body has been read or the response closed.

    Errors are requests' own, with the softlb error as their ``__cause__``: no backend, or
    none could be connected, :class:`requests.ConnectionError`; no answer within the read
    timeout, :class:`requests.ReadTimeout`; connection broken after sending,
    :class:`requests.ConnectionError`. While a streamed body is read they are those requests
    raises there (:class:`requests.exceptions.ChunkedEncodingError`, or
    :class:`requests.ConnectionError` for a timeout).

    The backend's URL decides between HTTP and HTTPS; requests' ``verify``, ``cert`` and
    ``proxies`` are not used. Redirects are requests' business, as always: a relative
    ``Location`` comes back through the adapter.
    """

    def __init__(
        self,
        target: Pool | BalancedClient,
        *,
        key: RequestKey | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__()
        self.client, self._owns_client = client_for(target, client_options)
        self.key = key

    def send(  # noqa: PLR0917 - requests' BaseAdapter.send signature
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: TimeoutValue = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> Response:
        """Send ``request`` to a backend of the pool and return requests' response."""
        headers = {
            name: value.decode("latin-1") if isinstance(value, bytes) else value
            for name, value in request.headers.items()
        }
        body: Any = request.body  # bytes, str, a file, an iterable or None: all sendable
        try:
            raw = self.client.send(
                request.method or "GET",
                request.path_url,
                headers,
                body,
                preload_content=not stream,
                decode_content=not stream,  # requests decodes a stream itself, as it reads it
                timeout=timeout,
                key=self.key(request) if self.key is not None else None,
            )
        except (NoBackendAvailable, UpstreamError) as exc:
            raise _request_error(exc, request) from exc
        return self._build_response(request, raw, preloaded=not stream)

    def _build_response(
        self, request: PreparedRequest, raw: ClientResponse, *, preloaded: bool
    ) -> Response:
        # What requests.adapters.HTTPAdapter.build_response does, over our urllib3 response.
        response = Response()
        response.status_code = raw.status
        response.headers = CaseInsensitiveDict(raw.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = raw
        response.reason = raw.reason or ""
        url = request.url or ""
        response.url = url.decode("utf-8") if isinstance(url, bytes) else url
        extract_cookies_to_jar(response.cookies, request, raw)
        response.request = request
        # Digest auth resends through response.connection; requests types it as its HTTPAdapter.
        response.connection = self  # type: ignore[assignment]
        if preloaded:
            # The body was read (and decoded) inside the retry loop; requests would otherwise
            # try to stream it again from the finished urllib3 response.
            response._content = raw.data
            response._content_consumed = True
        else:
            raw.wrap_error = _stream_error
        return response

    def close(self) -> None:
        """Close the client's connections if the adapter made the client."""
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"<BalancedAdapter {self.client!r}>"


def _request_error(error: ProxyError, request: PreparedRequest) -> requests.RequestException:
    """The requests exception for a request that got no answer."""
    if isinstance(error, UpstreamTimeout):
        return requests.ReadTimeout(str(error), request=request)
    return requests.ConnectionError(str(error), request=request)


def _stream_error(error: UpstreamError) -> BaseException:
    """The requests exception for a streamed body that could not be read to the end."""
    if isinstance(error, UpstreamTimeout):
        return requests.ConnectionError(str(error))
    return requests.exceptions.ChunkedEncodingError(str(error))
