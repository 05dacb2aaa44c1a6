"""One contract for every upstream client (:class:`softlb.http.transport.Transport`).

Each test runs over every client, against a scripted raw-socket backend
(:mod:`tests.helpers.raw_backend`) over plain TCP or TLS (a ``trustme`` CA):

* ``wire``: :class:`~softlb.http.wire.ProxyUpstream`, the proxy's own HTTP/1.1 client;
* ``urllib3``: :class:`~softlb.http.upstream.Upstream` to an ``http://`` backend;
* ``urllib3-tls``: :class:`~softlb.http.upstream.Upstream` to an ``https://`` backend;
* ``router`` and ``router-tls``: :func:`~softlb.http.transport.proxy_transport`, the
  :class:`~softlb.http.transport.SchemeRouter` the proxy uses (wire for ``http://``, urllib3
  for ``https://``);
* ``eventloop`` and ``eventloop-tls``: the event-loop engine's
  :class:`~softlb.aio.upstream.UpstreamPool`, driven on a loop of its own.

The tests talk to a client only through :class:`Adapter` ("send this request; give me the
status, headers, body, or the error class"), so another client (the event-loop engine's
async one) joins the suite as one more :func:`client` parameter and one more adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest
import trustme

from softlb.aio.engine import new_event_loop
from softlb.aio.upstream import UpstreamPool
from softlb.errors import UpstreamBroken, UpstreamConnectError, UpstreamError, UpstreamTimeout
from softlb.http.transport import Transport, TransportResponse, proxy_transport
from softlb.http.upstream import TimeoutValue, Upstream
from softlb.http.wire import ProxyUpstream
from tests.helpers.raw_backend import CLOSE, SILENT, RawBackend, Step

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Outcome:
    """What a client made of one exchange: the answer, or how far it got and the error."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: type[UpstreamError] | None = None

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None


class Adapter(Protocol):
    """A client under test, as the suite drives it."""

    name: str
    tls: ssl.SSLContext | None

    def send(
        self,
        url: str,
        method: str,
        target: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
        *,
        chunked: bool = False,
        timeout: TimeoutValue = None,
    ) -> Outcome: ...

    def close(self) -> None: ...


class SyncAdapter:
    """A blocking :class:`Transport`: request, then the body through ``chunks()``."""

    def __init__(self, name: str, transport: Transport, tls: ssl.SSLContext | None) -> None:
        self.name = name
        self.transport = transport
        self.tls = tls

    def send(
        self,
        url: str,
        method: str,
        target: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
        *,
        chunked: bool = False,
        timeout: TimeoutValue = None,
    ) -> Outcome:
        try:
            resp: TransportResponse = self.transport.request(
                url, method, target, {} if headers is None else headers, body,
                chunked=chunked, timeout=timeout,
            )  # fmt: skip
        except UpstreamError as exc:
            return Outcome(error=type(exc))
        outcome = Outcome(resp.status, list(resp.headers))
        pieces = []
        try:
            for piece in resp.chunks():
                pieces.append(piece)
        except UpstreamError as exc:
            resp.close(False)
            outcome.body = b"".join(pieces)
            outcome.error = type(exc)
            return outcome
        resp.close(True)
        outcome.body = b"".join(pieces)
        return outcome

    def close(self) -> None:
        self.transport.close()


class LoopAdapter:
    """The event-loop engine's client (:class:`~softlb.aio.upstream.UpstreamPool`) on a loop
    of its own thread: ``request()``, then the body with ``read_body()``."""

    def __init__(self, name: str, tls: ssl.SSLContext | None, client_tls: ssl.SSLContext) -> None:
        self.name = name
        self.tls = tls
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = UpstreamPool(
            self.loop, connect_timeout=2.0, read_timeout=5.0, max_idle=4, ssl_context=client_tls
        )

    def send(
        self,
        url: str,
        method: str,
        target: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
        *,
        chunked: bool = False,
        timeout: TimeoutValue = None,
    ) -> Outcome:
        read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout

        async def exchange() -> Outcome:
            try:
                options = {} if read_timeout is None else {"read_timeout": read_timeout}
                conn = await self.pool.request(
                    url, method, target, headers or {}, body, chunked=chunked, **options
                )
            except UpstreamError as exc:
                return Outcome(error=type(exc))
            answer = conn.answer
            assert answer is not None
            outcome = Outcome(
                answer.status,
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers],
            )
            try:
                outcome.body = await self.pool.read_body(conn)
            except UpstreamError as exc:
                outcome.error = type(exc)
            return outcome

        return asyncio.run_coroutine_threadsafe(exchange(), self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.pool.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


CLIENTS = ["wire", "urllib3", "urllib3-tls", "router", "router-tls", "eventloop", "eventloop-tls"]


@pytest.fixture(params=CLIENTS)
def client(
    request: pytest.FixtureRequest, server_tls: ssl.SSLContext, ca_file: str
) -> Iterator[Adapter]:
    """Each client under test, with short timeouts."""
    options: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 5.0, "maxsize": 4}
    adapter: Adapter
    if request.param == "wire":
        adapter = SyncAdapter("wire", ProxyUpstream(**options), None)
    elif request.param == "urllib3":
        adapter = SyncAdapter("urllib3", Upstream(**options), None)
    elif request.param.startswith("router"):
        # The proxy's transport as the composition root builds it: http:// to the wire
        # client, https:// to urllib3, behind one SchemeRouter.
        router = proxy_transport(ca_certs=ca_file, **options)
        tls = server_tls if request.param.endswith("-tls") else None
        adapter = SyncAdapter(request.param, router, tls)
    elif request.param.startswith("eventloop"):
        trusting = ssl.create_default_context(cafile=ca_file)
        tls = server_tls if request.param.endswith("-tls") else None
        adapter = LoopAdapter(request.param, tls, trusting)
    else:
        adapter = SyncAdapter("urllib3-tls", Upstream(ca_certs=ca_file, **options), server_tls)
    yield adapter
    adapter.close()


@pytest.fixture
def serve(client: Adapter) -> Iterator[Callable[..., RawBackend]]:
    """Start a raw backend the client speaks to (TLS for the TLS client); closed afterwards."""
    started: list[RawBackend] = []

    def start(script: list[Step], **options: Any) -> RawBackend:
        backend = RawBackend(list(script), tls=client.tls, **options)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


def names_seen(backend: RawBackend, index: int = -1) -> list[str]:
    """The header names of a request the backend received, lower-cased, in order."""
    lines = backend.requests[index].header_lines
    return [line.split(b":", 1)[0].decode().lower() for line in lines]


def pieces(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"x" * n
        sent += n


def test_both_clients_are_transports(ca_file: str) -> None:
    """Both implementations satisfy the Transport protocol (checked by mypy, and at runtime)."""
    clients: list[Transport] = [
        ProxyUpstream(),
        Upstream(ca_certs=ca_file),
        proxy_transport(ca_certs=ca_file),
    ]
    for transport in clients:
        assert isinstance(transport, Transport)
        transport.close()


# -- framing of the answer -------------------------------------------------------------------


def test_length_framed_answer(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """A Content-Length body is read exactly; status and headers come back as sent."""
    backend = serve([b"HTTP/1.1 201 Made\r\nX-One: 1\r\nContent-Length: 5\r\n\r\nhello"])
    got = client.send(backend.url, "GET", "/a?b=c")
    assert (got.status, got.body, got.error) == (201, b"hello", None)
    assert [(n.lower(), v) for n, v in got.headers] == [("x-one", "1"), ("content-length", "5")]
    assert backend.requests[0].request_line == b"GET /a?b=c HTTP/1.1"


def test_chunked_answer_is_dechunked(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """A chunked body arrives de-chunked, extensions and trailers dropped."""
    backend = serve(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        ]
    )
    got = client.send(backend.url, "GET")
    assert (got.status, got.body, got.error) == (200, b"hello world", None)


def test_answer_until_close(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """Neither length nor chunked: the body runs to the end of the connection."""
    backend = serve([b"HTTP/1.1 200 OK\r\n\r\nall of it"], close_after_answer=True)
    got = client.send(backend.url, "GET")
    assert (got.status, got.body, got.error) == (200, b"all of it", None)


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 9\r\n\r\n'),
    ],
)
def test_answers_without_a_body_keep_the_connection(
    client: Adapter, serve: Callable[..., RawBackend], method: str, answer: bytes
) -> None:
    """HEAD, 204 and 304 have no body whatever the headers say; the connection is reused."""
    backend = serve([answer, OK])
    got = client.send(backend.url, method)
    assert (got.body, got.error) == (b"", None)
    again = client.send(backend.url, "GET")
    assert (again.status, again.body) == (200, b"ok")
    assert backend.connections == 1


# -- request framing and headers ---------------------------------------------------------------


def test_headers_go_out_as_given_and_the_input_is_not_changed(
    client: Adapter, serve: Callable[..., RawBackend]
) -> None:
    """Nothing is added but Host; no User-Agent, Accept-Encoding or hop-by-hop header; and
    the caller's dict is the same afterwards (a failover sends it to the next backend)."""
    backend = serve([OK])
    headers = {"X-Custom": "1", "Accept": "*/*"}
    before = dict(headers)
    assert client.send(backend.url, "GET", headers=headers).status == 200
    assert headers == before
    assert sorted(names_seen(backend)) == ["accept", "host", "x-custom"]


def test_host_given_is_kept(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """A Host in the headers is what the backend sees."""
    backend = serve([OK])
    client.send(backend.url, "GET", headers={"Host": "app.example"})
    assert b"host: app.example" in backend.requests[0].head.lower()


@pytest.mark.parametrize("chunked", [False, True])
def test_request_bodies_are_framed(
    client: Adapter, serve: Callable[..., RawBackend], chunked: bool
) -> None:
    """Bytes go with a Content-Length; a stream of unknown length goes chunked."""
    backend = serve([OK])
    body: bytes | Iterator[bytes] = pieces(200_000) if chunked else b"payload"
    got = client.send(backend.url, "POST", body=body, chunked=chunked)
    assert got.status == 200
    seen = backend.requests[0]
    assert seen.body == (b"x" * 200_000 if chunked else b"payload")
    framing = "transfer-encoding" if chunked else "content-length"
    assert framing in names_seen(backend)
    assert ("content-length" in names_seen(backend)) is not chunked


# -- early answers, stale connections, failures ---------------------------------------------------


EARLY_413 = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n"
)


def answer_early_and_linger(sock: socket.socket) -> None:
    """Answer 413 right after the head, then close the way nginx and gunicorn do: stop
    writing, read and drop what still comes (for up to 2 s), then close."""
    sock.sendall(EARLY_413)
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(2)
    deadline = time.monotonic() + 2
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline and sock.recv(1 << 16):
            pass


def test_early_answer_is_returned(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """A backend that answers 413 after the head, without reading the body, then closes:
    the client returns the 413, not an error (nginx passes it on too)."""
    backend = serve([answer_early_and_linger], read_body=False, close_after_answer=True)
    total = 4 * 1024 * 1024
    got = client.send(
        backend.url, "POST", headers={"Content-Length": str(total)}, body=pieces(total)
    )
    assert (got.status, got.body, got.error) == (413, b"too big\n", None)


def test_stale_pooled_connection_is_not_an_error(
    client: Adapter, serve: Callable[..., RawBackend]
) -> None:
    """A pooled connection the backend closed while idle is replaced, not reported."""
    backend = serve([OK], close_after_answer=True)
    assert client.send(backend.url, "GET").status == 200
    time.sleep(0.05)  # the backend's close reaches this side
    got = client.send(backend.url, "GET")
    assert (got.status, got.body, got.error) == (200, b"ok", None)
    assert backend.connections == 2


def test_read_timeout(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """No answer within the read timeout: UpstreamTimeout, soon after it."""
    backend = serve([SILENT])
    started = time.monotonic()
    got = client.send(backend.url, "GET", timeout=(2.0, 0.3))
    assert got.error is UpstreamTimeout
    assert time.monotonic() - started < 3


def stall_after_chunked_head(sock: socket.socket) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_read_timeout_inside_the_body(client: Adapter, serve: Callable[..., RawBackend]) -> None:
    """A backend that stalls after a chunked head: the head comes back, then UpstreamTimeout."""
    backend = serve([stall_after_chunked_head])
    got = client.send(backend.url, "GET", timeout=(2.0, 0.3))
    assert (got.status, got.error) == (200, UpstreamTimeout)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ],
    ids=["bad-chunk", "short-length", "cut-chunk"],
)
def test_broken_body_is_upstream_broken(
    client: Adapter, serve: Callable[..., RawBackend], answer: bytes
) -> None:
    """A bad chunk, or a close before the declared end: UpstreamBroken while reading."""
    backend = serve([answer], close_after_answer=True)
    got = client.send(backend.url, "GET")
    assert (got.status, got.error) == (200, UpstreamBroken)


def test_refused_connection(client: Adapter) -> None:
    """Nothing listening: UpstreamConnectError (nothing was sent)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scheme = "http" if client.tls is None else "https"
    got = client.send(f"{scheme}://127.0.0.1:{port}", "GET")
    assert got.error is UpstreamConnectError


def test_closed_without_an_answer_is_broken_not_a_connect_failure(
    client: Adapter, serve: Callable[..., RawBackend]
) -> None:
    """The backend read the request, then closed: UpstreamBroken (the request may have had
    its effect, so a POST must not be retried as if nothing had been sent)."""
    backend = serve([CLOSE])
    got = client.send(backend.url, "POST", body=b"order=1")
    assert got.error is UpstreamBroken
    assert backend.requests[0].body == b"order=1"


def reset_after_reading(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0) after reading the request, without answering."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_reset_without_an_answer_is_broken_not_a_connect_failure(
    client: Adapter, serve: Callable[..., RawBackend]
) -> None:
    """The same with a TCP reset (over TLS: no close_notify, the socket just dies)."""
    backend = serve([reset_after_reading])
    got = client.send(backend.url, "POST", body=b"order=1")
    assert got.error is UpstreamBroken
