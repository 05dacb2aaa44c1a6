"""Talking to backends: pooled urllib3 connections, and the one place urllib3's errors are
translated into softlb's.

No other softlb module imports urllib3. Everything that can go wrong on the way to a backend
leaves this module as one of :class:`~softlb.errors.UpstreamConnectError` (nothing was sent),
:class:`~softlb.errors.UpstreamTimeout` (no answer in time) or
:class:`~softlb.errors.UpstreamBroken` (the connection failed after the request went out).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from typing import Final

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import SKIP_HEADER

from softlb._version import __version__
from softlb.backend import Backend
from softlb.errors import UpstreamBroken, UpstreamConnectError, UpstreamError, UpstreamTimeout
from softlb.health import ProbeResult, StatusRanges, parse_status_ranges

__all__ = ["CHUNK_SIZE", "SMALL_BODY", "HttpProbe", "Upstream", "UpstreamResponse"]

#: Size of the pieces a streamed body is read and written in. 64 KiB matches the socket
#: buffers on Linux and keeps a 100 MiB body at a constant, small memory cost.
CHUNK_SIZE: Final = 64 * 1024

#: Bodies with a Content-Length up to this size are read whole: one write to the client,
#: the backend connection back in its pool at once, and a request body that can be sent
#: again on a retry. Larger ones are streamed.
SMALL_BODY: Final = 64 * 1024

#: User-Agent of health probes, so backends can tell them from client traffic in their logs.
PROBE_USER_AGENT: Final = f"softlb-health/{__version__}"


def translate(exc: BaseException, backend: str, *, sent: bool) -> UpstreamError:
    """The softlb error for a urllib3 or socket error seen while talking to ``backend``.

    ``sent`` says whether the request may have reached the backend; a failure to connect is
    always reported as :class:`UpstreamConnectError`, whatever ``sent`` says.
    """
    if isinstance(exc, NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        refused = isinstance(cause, ConnectionRefusedError)
        what = "connection refused" if refused else "connect failed"
        return UpstreamConnectError(f"{what}: {backend}", backend=backend)
    if isinstance(exc, ConnectTimeoutError):
        return UpstreamConnectError(f"connect timed out: {backend}", backend=backend)
    if isinstance(exc, (ReadTimeoutError, socket.timeout, TimeoutError)):
        return UpstreamTimeout(f"backend did not answer in time: {backend}", backend=backend)
    if isinstance(exc, (ssl.SSLError, urllib3.exceptions.SSLError)):
        return UpstreamConnectError(f"TLS handshake failed: {backend}", backend=backend)
    if isinstance(exc, ProtocolError) and isinstance(exc.__context__, ConnectionRefusedError):
        return UpstreamConnectError(f"connection refused: {backend}", backend=backend)
    if not sent or isinstance(exc, urllib3.exceptions.PoolError):
        return UpstreamConnectError(f"could not send to {backend}: {exc}", backend=backend)
    return UpstreamBroken(f"connection to {backend} failed: {_short(exc)}", backend=backend)


def _short(exc: BaseException) -> str:
    """A one-line description of a urllib3 error without its nested reprs."""
    inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc
    return type(inner).__name__ if not str(inner) else f"{type(inner).__name__}: {inner}"


class UpstreamResponse:
    """A backend's answer whose body has not been read yet.

    Read it with :meth:`read_small` (the whole body, for short answers) or :meth:`chunks`
    (streamed); then :meth:`close`. Errors while reading come out as softlb errors.
    """

    __slots__ = ("_backend", "_resp", "headers", "length", "reason", "status")

    def __init__(self, resp: urllib3.BaseHTTPResponse, backend: str) -> None:
        self._resp = resp
        self._backend = backend
        self.status: int = resp.status
        self.reason: str = resp.reason or http.client.responses.get(resp.status, "")
        #: Every header line, repeated ones included.
        self.headers: list[tuple[str, str]] = list(resp.headers.iteritems())
        length = resp.length_remaining
        self.length: int | None = length

    def read_small(self) -> bytes:
        """The whole body (call only when :attr:`length` is known and small)."""
        try:
            data = self._resp.read(decode_content=False)
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            raise translate(exc, self._backend, sent=True) from exc
        return data

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The body as it arrives, in pieces of at most ``size`` bytes, undecoded."""
        read = self._resp.read
        try:
            while True:
                data = read(size, decode_content=False)
                if not data:
                    return
                yield data
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            raise translate(exc, self._backend, sent=True) from exc

    def close(self, complete: bool) -> None:
        """Give the connection back to its pool if the body was read to the end, else drop it."""
        resp = self._resp
        if not complete:
            resp.close()  # a half-read connection must never carry another request
        resp.release_conn()


class Upstream:
    """Keep-alive connection pools to backends and the calls that use them.

    ``maxsize`` is how many idle connections each backend's pool keeps (set it to the
    server's thread count); more are opened when needed and dropped afterwards, never
    waited for. urllib3's own retries and redirects are off: the proxy decides.
    """

    def __init__(
        self, *, connect_timeout: float = 2.0, read_timeout: float = 30.0, maxsize: int = 10
    ) -> None:
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.maxsize = maxsize
        self._lock = threading.Lock()
        # protected by _lock (writes; reads are a plain dict lookup):
        self._pools: dict[str, tuple[urllib3.HTTPConnectionPool, str]] = {}

    def _pool_for(self, backend_url: str) -> tuple[urllib3.HTTPConnectionPool, str]:
        entry = self._pools.get(backend_url)
        if entry is None:
            with self._lock:
                entry = self._pools.get(backend_url)
                if entry is None:
                    pool = urllib3.connection_from_url(
                        backend_url,
                        maxsize=self.maxsize,
                        block=False,
                        retries=False,
                        timeout=self.timeout,
                    )
                    base = urllib3.util.parse_url(backend_url).path or ""
                    entry = self._pools[backend_url] = (pool, base.rstrip("/"))
        return entry

    def forget(self, backend_url: str) -> None:
        """Close the pooled connections of a backend that left the pool."""
        with self._lock:
            entry = self._pools.pop(backend_url, None)
        if entry is not None:
            entry[0].close()

    def request(
        self,
        backend_url: str,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | Iterable[bytes] | None,
        *,
        chunked: bool = False,
    ) -> UpstreamResponse:
        """Send one request and return the answer's status and headers, body unread.

        ``target`` is the path and query as the client sent them; a backend URL with a path
        (``http://host/api``) gets it prepended. ``body`` is bytes, an iterable of bytes
        (streamed, with ``chunked=True`` when its length is unknown) or ``None``.
        """
        pool, base = self._pool_for(backend_url)
        # urllib3 and http.client add User-Agent and Accept-Encoding when a request has none;
        # a proxy must not invent headers the client did not send.
        if "User-Agent" not in headers:
            headers["User-Agent"] = SKIP_HEADER
        if "Accept-Encoding" not in headers:
            headers["Accept-Encoding"] = SKIP_HEADER
        if base:
            target = base + target if target.startswith("/") else f"{base}/{target}"
        # Not pool.urlopen(): it re-encodes the target (upper-cases %2f, turns a stray "%" into
        # "%25"), and a proxy must send the path byte for byte. _make_request is the part of
        # urlopen that sends and reads the status, without that rewriting and without retries.
        try:
            conn = pool._get_conn()
        except (HTTPError, OSError) as exc:
            raise translate(exc, backend_url, sent=False) from exc
        try:
            resp = pool._make_request(
                conn,
                method,
                target,
                body=body,
                headers=headers,
                timeout=self.timeout,
                chunked=chunked,
                response_conn=conn,
                preload_content=False,
                decode_content=False,
                enforce_content_length=True,
            )
        except BaseException as exc:
            conn.close()
            pool._put_conn(None)  # keep the pool's slot count; a new connection is made later
            if isinstance(exc, (HTTPError, OSError, http.client.HTTPException)):
                raise translate(exc, backend_url, sent=True) from exc
            raise
        return UpstreamResponse(resp, backend_url)

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool, _ in pools:
            pool.close()

    def __repr__(self) -> str:
        return f"<Upstream [{len(self._pools)} backends] maxsize={self.maxsize}>"


class HttpProbe:
    """The default health probe: ``GET path`` on a fresh connection, status checked.

    Connection: close on every probe, as HAProxy does, so a probe also proves that new
    connections are accepted. The body is read (up to 64 KiB) and discarded.
    """

    def __init__(
        self,
        *,
        path: str = "/",
        timeout: float = 2.0,
        expected_status: StatusRanges | str = ((200, 399),),
        maxsize: int = 8,
    ) -> None:
        self.path = path
        self.expected_status = parse_status_ranges(expected_status)
        self.timeout = urllib3.Timeout(total=timeout, connect=timeout, read=timeout)
        self._maxsize = maxsize
        self._manager = urllib3.PoolManager(num_pools=max(16, 2 * maxsize), maxsize=maxsize)
        self._headers = {"User-Agent": PROBE_USER_AGENT, "Connection": "close"}

    def __call__(self, backend: Backend) -> ProbeResult:
        try:
            resp = self._manager.request(
                "GET",
                backend.url + self.path,
                headers=self._headers,
                retries=False,
                redirect=False,
                timeout=self.timeout,
                preload_content=False,
                decode_content=False,
            )
            try:
                resp.read(SMALL_BODY, decode_content=False)
            finally:
                resp.close()
                resp.release_conn()
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            err = translate(exc, backend.url, sent=True)
            kind = {
                UpstreamConnectError: "connect failed",
                UpstreamTimeout: "timeout",
            }.get(type(err), "connection broken")
            return ProbeResult(False, f"{kind} ({_short(exc)})")
        status = resp.status
        ok = any(low <= status <= high for low, high in self.expected_status)
        return ProbeResult(ok, f"HTTP {status}")

    def reset(self) -> None:
        """Forget connections inherited from a parent process (after ``fork()``)."""
        self._manager = urllib3.PoolManager(
            num_pools=max(16, 2 * self._maxsize), maxsize=self._maxsize
        )

    def close(self) -> None:
        """Close the probe's connections."""
        self._manager.clear()
