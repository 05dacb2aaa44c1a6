"""Talking to backends: pooled urllib3 connections, and the one place urllib3's errors are
translated into softlb's.

No other softlb module imports urllib3. Everything that can go wrong on the way to a backend
leaves this module as one of :class:`~softlb.errors.UpstreamConnectError` (nothing was sent),
:class:`~softlb.errors.UpstreamTimeout` (no answer in time) or
:class:`~softlb.errors.UpstreamBroken` (the connection failed after the request went out).
"""

from __future__ import annotations

import errno
import http.client
import importlib.metadata
import inspect
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeAlias, cast

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
from softlb.errors import UpstreamBroken, UpstreamConnectError, UpstreamError, UpstreamTimeout

__all__ = [
    "CHUNK_SIZE",
    "CLIENT_USER_AGENT",
    "SMALL_BODY",
    "ClientResponse",
    "TimeoutValue",
    "Upstream",
    "UpstreamResponse",
    "encode_form",
]

#: Size of the pieces a streamed body is read and written in. 64 KiB matches the socket
#: buffers on Linux and keeps a 100 MiB body at a constant, small memory cost.
CHUNK_SIZE: Final = 64 * 1024

#: Bodies with a Content-Length up to this size are read whole: one write to the client,
#: the backend connection back in its pool at once, and a request body that can be sent
#: again on a retry. Larger ones are streamed.
SMALL_BODY: Final = 64 * 1024

#: User-Agent of health probes, so backends can tell them from client traffic in their logs.
PROBE_USER_AGENT: Final = f"softlb-health/{__version__}"

#: User-Agent that :class:`softlb.client.BalancedClient` sends when the caller gives none:
#: urllib3's own default (a drop-in for ``PoolManager`` says the same), with softlb added.
CLIENT_USER_AGENT: Final = (
    f"python-urllib3/{importlib.metadata.version('urllib3')} softlb/{__version__}"
)

#: A timeout as callers give it: seconds for both connect and read, a ``(connect, read)``
#: pair (``None`` in either place for no limit; requests' convention), a
#: :class:`urllib3.Timeout`, or ``None`` for the :class:`Upstream`'s own.
TimeoutValue: TypeAlias = "float | tuple[float | None, float | None] | urllib3.Timeout | None"


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


def in_words(exc: BaseException) -> str:
    """Why a probe failed, in words: the operating system's reason when there is one
    (``"connection refused"``, ``"name or service not known"``), never urllib3's reprs."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:  # the innermost system error says it best
        if isinstance(cause, OSError) and cause.strerror and not isinstance(cause, TimeoutError):
            return cause.strerror[:1].lower() + cause.strerror[1:]
    for cause in chain:
        if isinstance(cause, NewConnectionError):  # a ConnectTimeoutError only by ancestry
            continue
        if isinstance(cause, (TimeoutError, ReadTimeoutError, ConnectTimeoutError)):
            return "no answer in time"
        if isinstance(cause, http.client.RemoteDisconnected):
            return "the connection closed before an answer"
    return _short(exc)


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
    """Keep-alive connection pools to backends and the calls that use them: a
    :class:`~softlb.http.transport.Transport`.

    ``maxsize`` is how many idle connections each backend's pool keeps (set it to the
    server's thread count); more are opened when needed and dropped afterwards, never
    waited for. urllib3's own retries and redirects are off: the proxy decides.
    ``ca_certs`` is a PEM file of the authorities that ``https://`` backends' certificates
    are checked against (default: the system's).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        maxsize: int = 10,
        ca_certs: str | None = None,
    ) -> None:
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.maxsize = maxsize
        #: PEM file of the certificate authorities that ``https://`` backends' certificates
        #: are checked against; ``None``: the system's (urllib3's default).
        self.ca_certs = ca_certs
        self._lock = threading.Lock()
        # protected by _lock (writes; reads are a plain dict lookup):
        self._pools: dict[str, tuple[urllib3.HTTPConnectionPool, str]] = {}

    def _pool_for(self, backend_url: str) -> tuple[urllib3.HTTPConnectionPool, str]:
        entry = self._pools.get(backend_url)
        if entry is None:
            with self._lock:
                entry = self._pools.get(backend_url)
                if entry is None:
                    tls: dict[str, Any] = {}
                    if self.ca_certs is not None and backend_url.startswith("https://"):
                        tls["ca_certs"] = self.ca_certs
                    pool = urllib3.connection_from_url(
                        backend_url,
                        maxsize=self.maxsize,
                        block=False,
                        retries=False,
                        timeout=self.timeout,
                        **tls,
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
        timeout: TimeoutValue = None,
    ) -> UpstreamResponse:
        """Send one request and return the answer's status and headers, body unread.

        ``target`` is the path and query as the client sent them; a backend URL with a path
        (``http://host/api``) gets it prepended. ``body`` is bytes, an iterable of bytes
        (streamed, with ``chunked=True`` when its length is unknown) or ``None``.
        ``timeout`` overrides the connect and read timeouts for this request only.
        """
        timeout_obj = self.timeout if timeout is None else _as_timeout(timeout)
        pool, base = self._pool_for(backend_url)
        # urllib3 and http.client add User-Agent and Accept-Encoding when a request has none;
        # a proxy must not invent headers the client did not send. On a copy: the caller's
        # dict goes on to the next backend of a failover, which may be an http:// one that
        # would send the marker itself as a header.
        names = {name.lower() for name in headers}
        if "user-agent" not in names or "accept-encoding" not in names:
            headers = dict(headers)
            if "user-agent" not in names:
                headers["User-Agent"] = SKIP_HEADER
            if "accept-encoding" not in names:
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
        if isinstance(conn, urllib3.connection.HTTPSConnection) and "send" not in vars(conn):
            setattr(conn, "send", _early_answer_send(conn.send))  # noqa: B010 - a method
        try:
            resp = pool._make_request(
                conn,
                method,
                target,
                body=body,
                headers=headers,
                timeout=timeout_obj,
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


def _early_answer_send(send: Callable[[Any], None]) -> Callable[[Any], None]:
    """``send`` of a TLS connection, with the peer's close reported as ``BrokenPipeError``.

    A backend may answer before it has read the whole request body (an early 413 or 401)
    and close. urllib3 then reads that answer if sending failed with ``EPIPE`` or
    ``ECONNRESET``, as over plain TCP; over TLS the same close shows as ``SSLEOFError`` or
    ``SSLZeroReturnError``, which it would report as a failure instead.
    """

    def send_or_broken_pipe(data: Any) -> None:
        try:
            send(data)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            raise BrokenPipeError(errno.EPIPE, f"the backend closed the TLS stream: {exc}") from exc

    return send_or_broken_pipe


def _as_timeout(value: TimeoutValue) -> urllib3.Timeout:
    """A :class:`urllib3.Timeout` from any :data:`TimeoutValue` but ``None``."""
    if isinstance(value, urllib3.Timeout):
        return value
    if isinstance(value, tuple):
        connect, read = value
        return urllib3.Timeout(connect=connect, read=read)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return urllib3.Timeout(connect=value, read=value)
    raise TypeError(
        f"timeout must be seconds, a (connect, read) pair or a urllib3.Timeout, got {value!r}"
    )


def timeout_pair(
    value: TimeoutValue, default: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    """``(connect, read)`` seconds from any :data:`TimeoutValue` (``None``: no limit);
    ``default`` fills in what ``value`` leaves unset."""
    if value is None:
        return default
    timeout = _as_timeout(value)
    return (
        _seconds(timeout.connect_timeout, default[0]),
        _seconds(timeout.read_timeout, default[1]),
    )


def _seconds(value: object, default: float | None) -> float | None:
    if value is None:
        return None
    return float(value) if isinstance(value, (int, float)) else default


def encode_form(fields: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its Content-Type for form ``fields``, as urllib3's
    ``request()`` encodes them (a value may be a ``(filename, data[, mime type])`` tuple)."""
    return urllib3.encode_multipart_formdata(fields)


#: What reading a response body can raise below urllib3's own error tree.
_READ_ERRORS: Final = (HTTPError, OSError, http.client.HTTPException)

#: Whether this urllib3 has ``BaseHTTPResponse(version_string=...)`` (2.3 and later).
_HAS_VERSION_STRING: Final = (
    "version_string" in inspect.signature(urllib3.BaseHTTPResponse.__init__).parameters
)


class ClientResponse(urllib3.BaseHTTPResponse):
    """A backend's answer as a :class:`urllib3.BaseHTTPResponse`, for client-side balancing.

    Everything urllib3's own response offers works the same — ``status``, ``headers``,
    ``data``, ``json()``, ``read()``, ``stream()``, ``release_conn()``, use as a file — over
    the response urllib3 made, with two differences:

    * errors while reading the body come out as softlb's
      (:class:`~softlb.errors.UpstreamTimeout`, :class:`~softlb.errors.UpstreamBroken`);
    * ``on_done`` is called exactly once, when the request is over as far as the backend is
      concerned: with ``None`` when the body has been read to the end or the response is
      closed or released before that (the caller's choice, not the backend's failure), or
      with the error when reading failed. :mod:`softlb.client` ends the request's lease there.

    A body that was not read to the end is never left on a pooled connection: closing or
    releasing the response early drops that connection. Answers without a body (HEAD, 204,
    304) are done at once. Not thread-safe, like urllib3's own responses: one reader.

    :attr:`wrap_error`, when set, turns a softlb error met while reading into the exception
    to raise instead (chained to it); the requests adapter raises requests' own exceptions so.
    """

    #: Makes the exception raised when reading the body fails (default: the softlb error).
    wrap_error: Callable[[UpstreamError], BaseException] | None = None

    def __init__(
        self,
        answer: UpstreamResponse,
        *,
        request_url: str,
        decode_content: bool = True,
        on_done: Callable[[UpstreamError | None], None] | None = None,
    ) -> None:
        # Upstream.request makes it with HTTPConnectionPool._make_request: an HTTPResponse.
        inner = cast(urllib3.HTTPResponse, answer._resp)
        self._inner = inner  # first: close() (from __del__) must work on a half-made object
        self._backend = answer._backend
        self._on_done = on_done
        self._done = False
        self._body: bytes | None = None
        options: dict[str, Any] = {}
        if _HAS_VERSION_STRING:
            options["version_string"] = getattr(inner, "version_string", "HTTP/1.1")
        super().__init__(
            headers=inner.headers,
            status=inner.status,
            version=inner.version,
            reason=inner.reason,
            decode_content=decode_content,
            request_url=request_url,
            **options,
        )
        if inner.length_remaining == 0:  # HEAD, 204, 304, Content-Length: 0
            self.read()

    # -- the end of the request ------------------------------------------------------------

    def _finish(self, error: UpstreamError | None) -> None:
        """End the request once: free or drop the connection, then tell ``on_done``."""
        if self._done:
            return
        self._done = True
        inner = self._inner
        try:
            if error is not None or not inner.isclosed():
                inner.close()  # a half-read connection must never carry another request
            inner.release_conn()
        finally:
            if self._on_done is not None:
                self._on_done(error)

    def _failed(self, exc: BaseException) -> BaseException:
        """End the request with the softlb error for ``exc``; return what to raise."""
        error = translate(exc, self._backend, sent=True)
        error.__cause__ = exc
        self._finish(error)
        if self.wrap_error is None:
            return error
        wrapped = self.wrap_error(error)
        wrapped.__cause__ = error
        return wrapped

    def _after_read(self) -> None:
        if not self._done and self._inner.isclosed():
            self._finish(None)

    def _guard_iter(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except _READ_ERRORS as exc:
                raise self._failed(exc)  # noqa: B904 - chained inside
            yield chunk
        self._after_read()

    # -- reading ---------------------------------------------------------------------------

    @property
    def data(self) -> bytes:
        """The whole body (decoded unless ``decode_content=False``), read and kept once."""
        if self._body is not None:
            return self._body
        return self.read(cache_content=True)

    def read(
        self,
        amt: int | None = None,
        decode_content: bool | None = None,
        cache_content: bool = False,
    ) -> bytes:
        """Up to ``amt`` bytes of the body (all of it when ``None``); ``b""`` at the end."""
        decode = self.decode_content if decode_content is None else decode_content
        try:
            data = self._inner.read(amt, decode_content=decode)
        except _READ_ERRORS as exc:
            raise self._failed(exc)  # noqa: B904 - chained inside
        if amt is None and cache_content:
            self._body = data
        self._after_read()
        return data

    def read1(self, amt: int | None = None, decode_content: bool | None = None) -> bytes:
        """At most ``amt`` bytes, with at most one read from the connection."""
        decode = self.decode_content if decode_content is None else decode_content
        try:
            data = self._inner.read1(amt, decode_content=decode)
        except _READ_ERRORS as exc:
            raise self._failed(exc)  # noqa: B904 - chained inside
        self._after_read()
        return data

    def stream(
        self, amt: int | None = 2**16, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        """The body in pieces of up to ``amt`` bytes, as they arrive."""
        decode = self.decode_content if decode_content is None else decode_content
        return self._guard_iter(self._inner.stream(amt, decode_content=decode))

    def read_chunked(
        self, amt: int | None = None, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        """The body of a chunked answer, chunk by chunk (urllib3's ``read_chunked``)."""
        decode = self.decode_content if decode_content is None else decode_content
        return self._guard_iter(self._inner.read_chunked(amt, decode_content=decode))

    def __iter__(self) -> Iterator[bytes]:
        return self._guard_iter(iter(self._inner))

    # -- the connection --------------------------------------------------------------------

    def release_conn(self) -> None:
        """End the request; the connection is pooled again if the body was read to the end."""
        self._finish(None)

    def drain_conn(self) -> None:
        """Read and discard the rest of the body, so the connection can be pooled again."""
        if not self._done:
            self._inner.drain_conn()
            self._finish(None)

    def close(self) -> None:
        """End the request, dropping the connection if the body was not read to the end."""
        if getattr(self, "_done", True):  # done, or a half-made object
            return
        self._finish(None)

    def shutdown(self) -> None:
        """Shut the connection's socket down for reading, from another thread (urllib3 2.3+)."""
        self._inner.shutdown()

    @property
    def closed(self) -> bool:
        inner = getattr(self, "_inner", None)
        return inner is None or self._done or inner.closed

    @property
    def connection(self) -> Any:
        """The connection the answer is read from, until it is released."""
        return self._inner.connection

    @property
    def url(self) -> str | None:
        """The URL the request went to: the chosen backend's URL and the request's path."""
        return self._request_url

    @url.setter
    def url(self, url: str | None) -> None:
        self._request_url = url

    @property
    def _original_response(self) -> http.client.HTTPResponse | None:
        # requests reads this to put the answer's Set-Cookie headers in the session's jar.
        return self._inner._original_response

    @property
    def length_remaining(self) -> int | None:  # type: ignore[override]
        """Bytes of the body still to come, when the answer said how many."""
        return self._inner.length_remaining

    def isclosed(self) -> bool:
        """Whether the body has been read to the end or the response closed."""
        return self.closed

    def tell(self) -> int:
        """Bytes of the body read from the connection so far (before decoding)."""
        return self._inner.tell()

    def fileno(self) -> int:
        return self._inner.fileno()

    def flush(self) -> None:
        self._inner.flush()

    def readable(self) -> bool:
        return True

    def supports_chunked_reads(self) -> bool:
        return self._inner.supports_chunked_reads()

    def __repr__(self) -> str:
        state = "done" if self._done else "reading"
        return f"<ClientResponse {self.status} from {self._backend} [{state}]>"
