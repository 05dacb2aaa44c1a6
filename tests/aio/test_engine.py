"""The event-loop engine in-process (softlb.aio.serve.running) in front of real backends.

Each test talks to the engine over a real socket (http.client or raw bytes) and asserts on
what the backend received as well as on what the client got back.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from softlb.aio.engine import Limits
from softlb.aio.serve import running
from softlb.wsgi import Application
from tests.helpers.raw_backend import CLOSE, SILENT, RawBackend
from tests.helpers.servers import RefusingURL, TestBackend, body_sha256

Served = Callable[..., tuple[Application, int]]


@pytest.fixture
def serve(make_app: Callable[..., Application]) -> Iterator[Served]:
    """Start an Application (health checks off) on the event-loop engine; yields a factory
    ``serve(limits=None, **config) -> (app, port)``."""
    stack: list[Any] = []

    def start(limits: Limits | None = None, **config: Any) -> tuple[Application, int]:
        app = make_app(**config)
        context = running(app, limits=limits, drain_timeout=1.0)
        _, port = context.__enter__()
        stack.append(context)
        return app, port

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def get(port: int, target: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(kw.pop("method", "GET"), target, **kw)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, *, wait: float = 2.0, until: bytes | None = None) -> bytes:
    """Send ``data`` on a new connection; what came back until close, ``until`` or ``wait``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                more = sock.recv(65536)
            except TimeoutError:
                break
            if not more:
                break
            got += more
            if until is not None and until in got:
                break
        return got


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    """What ``sock`` receives until ``marker`` has come, the peer closes or resets, or the
    socket's timeout passes."""
    got = b""
    with contextlib.suppress(OSError):
        while marker not in got:
            more = sock.recv(65536)
            if not more:
                break
            got += more
    return got


def servers_json(port: int) -> list[dict[str, Any]]:
    status, _, body = get(port, "/_softlb/servers")
    assert status == 200
    servers: list[dict[str, Any]] = json.loads(body)["servers"]
    return servers


# -- forwarding --------------------------------------------------------------------------


def test_target_headers_and_forwarded_fields(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    status, _, _body = get(
        port,
        "/echo/a%2fb?x=%zz",
        headers={"X-Forwarded-For": "10.9.8.7", "Connection": "X-Secret", "X-Secret": "s"},
    )
    assert status == 200
    seen = backend.last
    assert seen.target == "/echo/a%2fb?x=%zz"
    assert seen.header("Host") == f"127.0.0.1:{port}"
    assert seen.header("X-Forwarded-For") == "10.9.8.7, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{port}"
    assert not seen.has_header("X-Secret")
    assert not seen.has_header("Connection")


def test_repeated_set_cookie_and_hop_by_hop_answer(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    data = raw(port, b"GET /cookies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.count(b"Set-Cookie:") >= 2
    data = raw(port, b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"keep-alive:" not in head
    assert b"x-hop" not in head or b"connection: x-hop" not in head


def test_big_download_and_chunked_answer(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    size = 3 * 1024 * 1024 + 7
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for kind in ("big", "chunked"):
        conn.request("GET", f"/{kind}/{size}")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200
        assert len(body) == size
        import hashlib

        assert hashlib.sha256(body).hexdigest() == body_sha256(size)
    conn.close()


def test_uploads_by_length_and_chunked(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    for size in (10, 200_000):
        status, _, _ = get(port, "/echo", method="POST", body=b"u" * size)
        assert status == 200
        assert backend.last.body == b"u" * size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/echo", body=iter([b"a" * 70_000, b"b" * 70_000]), encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert backend.last.body == b"a" * 70_000 + b"b" * 70_000
    assert backend.last.header("Transfer-Encoding") == "chunked"  # streamed past the read-ahead
    conn.request("POST", "/echo", body=iter([b"small"]), encode_chunked=True)
    assert conn.getresponse().status == 200
    assert backend.last.body == b"small"
    assert backend.last.header("Content-Length") == "5"  # read ahead whole: sent with a length
    conn.close()


def test_head_and_bodiless_statuses(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("HEAD", "/big/5000")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b""
    for status in (204, 304):
        conn.request("GET", f"/status/{status}")
        resp = conn.getresponse()
        assert resp.status == status
        assert resp.read() == b""
    conn.request("GET", "/x")  # the connection is still in step
    assert conn.getresponse().read().startswith(b"ok from")
    conn.close()


def test_pipelined_requests_are_answered_in_order(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    data = raw(
        port,
        b"GET /echo/1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /slow/0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /echo/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        wait=5,
    )
    assert data.count(b"HTTP/1.1 200") == 3
    assert data.index(b"/echo/1") < data.index(b"slow") < data.index(b"/echo/3")


def test_expect_continue_gets_100_then_the_answer(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        assert b"HTTP/1.1 200" in sock.recv(65536)
    assert backend.last.body_length == 5
    assert not backend.last.has_header("Expect")


def test_http10_client_gets_a_close_delimited_answer(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    data = raw(port, b"GET /chunked/1000 HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert len(body) == 1000


# -- failures ----------------------------------------------------------------------------


def test_retry_after_refused_and_errors(serve: Served, backend: TestBackend) -> None:
    refused = RefusingURL()
    _, port = serve(servers=[refused, backend.url], algorithm="round_robin")
    for _ in range(4):
        status, _, body = get(port, "/x")
        assert status == 200
        assert body.startswith(b"ok from")
    _, port = serve(servers=[refused])
    status, _, body = get(port, "/x")
    assert status == 502
    assert b"502" in body
    _, port = serve(servers=[])
    assert get(port, "/x")[0] == 503


def test_read_timeout_is_504(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url], timeouts={"read": "200ms"}, retries=0)
    status, _, body = get(port, "/slow/2")
    assert status == 504
    assert b"in time" in body


def test_stale_pooled_connection_is_retried_unblamed(serve: Served) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([answer], close_after_answer=True) as raw_backend:
        _, port = serve(servers=[raw_backend.url], retries=0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/x")
            assert conn.getresponse().read() == b"ok"
            time.sleep(0.05)  # the backend's FIN arrives while the connection is idle
        conn.close()
        assert servers_json(port)[0]["failures"] == 0


def test_post_after_reset_is_not_retried(serve: Served) -> None:
    with RawBackend([CLOSE]) as one, RawBackend([CLOSE]) as two:
        _, port = serve(servers=[one.url, two.url], algorithm="round_robin")
        status, _, _ = get(port, "/x", method="POST", body=b"data")
        assert status == 502
        assert len(one.requests) + len(two.requests) == 1
        status, _, _ = get(port, "/x")
        assert status == 502
        assert len(one.requests) + len(two.requests) == 3  # GET went to both


def test_answer_cut_after_head_closes_the_client(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/reset-mid-body")
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()


def test_early_answer_is_passed_on(serve: Served) -> None:
    """A backend that answers 413 after the head, without reading the 4 MB body: the client
    gets that 413 (nginx's behaviour), and the backend is not blamed."""
    early = (
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo much"
    )
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def backend() -> None:
        with contextlib.suppress(OSError):
            sock, _ = listener.accept()
            with sock:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += sock.recv(4096)
                sock.sendall(early)
                time.sleep(0.3)

    thread = threading.Thread(target=backend, daemon=True)
    thread.start()
    _, port = serve(servers=[f"http://127.0.0.1:{listener.getsockname()[1]}"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n")

        def upload() -> None:
            with contextlib.suppress(OSError):
                for _ in range(60):
                    sock.sendall(b"x" * 65536)

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        got = recv_until(sock, b"too much")
    thread.join(5)
    listener.close()
    assert got.startswith(b"HTTP/1.1 413"), got[:100]
    assert servers_json(port)[0]["failures"] == 0


# -- the client's faults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551621\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775808\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ],
)
def test_bad_requests_never_reach_or_blame_a_backend(
    serve: Served, request_bytes: bytes, status: int
) -> None:
    with RawBackend([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]) as raw_backend:
        _, port = serve(servers=[raw_backend.url])
        for _ in range(4):
            data = raw(port, request_bytes)
            assert data.startswith(b"HTTP/1.1 %d" % status), data[:80]
            assert b"connection: close" in data.lower()
        assert raw_backend.requests == []
        assert servers_json(port)[0]["failures"] == 0
        assert servers_json(port)[0]["healthy"] is True


def test_bad_chunk_after_the_read_ahead_cuts_the_exchange(
    serve: Served, backend: TestBackend
) -> None:
    _, port = serve(servers=[backend.url])
    body = b"10000\r\n" + b"z" * 0x10000 + b"\r\n" + b"10000\r\n" + b"z" * 0x10000 + b"\r\nzz\r\n"
    data = raw(
        port, b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    assert data == b"" or data.startswith(b"HTTP/1.1 400")
    assert servers_json(port)[0]["failures"] == 0


# -- slow and idle clients -----------------------------------------------------------------------


def test_half_open_heads_do_not_stall_others(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    socks = []
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
        started = time.monotonic()
        status, _, _ = get(port, "/x")
        assert status == 200
        assert time.monotonic() - started < 0.5
    finally:
        for sock in socks:
            sock.close()


def test_slow_head_gets_408_and_idle_keepalive_is_closed(
    serve: Served, backend: TestBackend
) -> None:
    limits = Limits(client_header=0.3, keepalive=0.3)
    _, port = serve(limits=limits, servers=[backend.url])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data = sock.recv(1000)
        assert data.startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"ok from" not in answer:
            answer += sock.recv(1000)
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(1000) == b""  # closed by the engine after the keep-alive timeout
        assert 0.2 < time.monotonic() - started < 3


@pytest.mark.parametrize("path", [b"/", b"/" + b"p" * 1500])
def test_max_header_bytes_counts_the_whole_head(
    serve: Served, backend: TestBackend, path: bytes
) -> None:
    """SPEC §2: request line + fields + the empty line. A head of exactly the limit is
    served; one byte more is 431."""
    _, port = serve(limits=Limits(max_header_bytes=2000), servers=[backend.url])
    start = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
    for size, status in ((2000, b"200"), (2001, b"431")):
        head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
        assert len(head) == size
        got = raw(port, head, until=b"\r\n")
        assert got.startswith(b"HTTP/1.1 " + status), (size, got[:60])


def test_head_above_the_limit_gets_431(serve: Served, backend: TestBackend) -> None:
    _, port = serve(limits=Limits(max_header_bytes=2048), servers=[backend.url])
    data = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431")
    assert backend.request_count == 0


def test_max_connections_leaves_later_clients_in_the_backlog(
    serve: Served, backend: TestBackend
) -> None:
    _, port = serve(limits=Limits(max_connections=2), servers=[backend.url])
    first = socket.create_connection(("127.0.0.1", port), timeout=5)
    second = socket.create_connection(("127.0.0.1", port), timeout=5)
    first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" in first.recv(1000)
    second.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" in second.recv(1000)
    third = socket.create_connection(("127.0.0.1", port), timeout=5)  # kernel backlog
    third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    third.settimeout(0.3)
    with pytest.raises(TimeoutError):
        third.recv(1000)
    first.close()
    third.settimeout(5)
    assert b"200" in third.recv(1000)
    second.close()
    third.close()


# -- upgrade ----------------------------------------------------------------------------------


def test_websocket_upgrade_is_tunnelled(serve: Served) -> None:
    def ws_backend(sock: socket.socket) -> None:
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n"
        )
        for _ in range(3):
            data = sock.recv(1000)
            if not data:
                return
            sock.sendall(b"echo:" + data)

    with RawBackend([ws_backend]) as raw_backend:
        _, port = serve(servers=[raw_backend.url])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1000)
            assert head.startswith(b"HTTP/1.1 101")
            assert b"upgrade: websocket" in head.lower()
            for word in (b"one", b"two"):
                sock.sendall(word)
                assert sock.recv(1000) == b"echo:" + word
        seen = raw_backend.requests[0].head.lower()
        assert b"upgrade: websocket" in seen
        assert b"connection: upgrade" in seen


def test_idle_tunnel_is_closed(serve: Served) -> None:
    def ws_backend(sock: socket.socket) -> None:
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            sock.recv(1000)

    with RawBackend([ws_backend]) as raw_backend:
        _, port = serve(limits=Limits(tunnel=0.3), servers=[raw_backend.url])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
            assert sock.recv(1000).startswith(b"HTTP/1.1 101")
            started = time.monotonic()
            assert sock.recv(1000) == b""
            assert time.monotonic() - started < 3


def test_unasked_101_is_a_502(serve: Served) -> None:
    with RawBackend([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"]) as raw_backend:
        _, port = serve(servers=[raw_backend.url], retries=0)
        assert get(port, "/x")[0] == 502


# -- admin ------------------------------------------------------------------------------------


def test_admin_api_on_the_engine(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[])
    status, _, body = get(
        port, "/_softlb/servers", method="POST", body=json.dumps({"url": backend.url})
    )
    assert status == 201, body
    assert get(port, "/x")[0] == 200
    assert [s["url"] for s in servers_json(port)] == [backend.url]
    status, headers, _ = get(port, "/_softlb/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")


def test_concurrent_clients_share_pooled_connections(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    errors: list[BaseException] = []

    def client() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(25):
                conn.request("GET", "/x")
                assert conn.getresponse().read().startswith(b"ok from")
            conn.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert errors == []
    assert servers_json(port)[0]["requests"] == 200
    assert backend.connections <= 16


def test_silent_backend_with_post_is_504_once(serve: Served) -> None:
    with RawBackend([SILENT]) as raw_backend:
        _, port = serve(servers=[raw_backend.url], timeouts={"read": "200ms"})
        assert get(port, "/x", method="POST", body=b"x")[0] == 504
        assert len(raw_backend.requests) == 1


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_listener_and_https_backend(make_app: Callable[..., Application]) -> None:
    """HTTPS on the listener (a trustme certificate) and an https:// backend whose
    certificate is checked against a private CA."""
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"tls ok {self.headers.get('X-Forwarded-Proto')}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    backend_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(backend_ctx)
    backend.socket = backend_ctx.wrap_socket(backend.socket, server_side=True)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        app = make_app(servers=[f"https://127.0.0.1:{backend.server_port}"], retries=0)
        listener_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(listener_ctx)
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        with running(app, ssl_context=listener_ctx, upstream_ssl=trusting) as (_, port):
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=trusting)
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"tls ok https")
            conn.close()
        strict = ssl.create_default_context()  # does not know the private CA
        with running(app, upstream_ssl=strict) as (_, port):
            assert get(port, "/")[0] == 502
    finally:
        backend.shutdown()
        backend.server_close()


def test_tls_connections_in_their_handshake_count_toward_max_connections(
    make_app: Callable[..., Application], backend: TestBackend
) -> None:
    """Connections to a TLS listener that have not finished (or begun) their handshake count
    toward limits.max_connections, as the others do: two silent ones fill a limit of 2, so a
    third client waits in the backlog until client_header (0.5 s) ends one of them, then is
    served. Uncounted, any number of silent sockets could be held open."""
    import ssl

    import trustme

    ca = trustme.CA()
    listener_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(listener_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    app = make_app(servers=[backend.url])
    limits = Limits(max_connections=2, client_header=0.5)
    with running(app, ssl_context=listener_ctx, limits=limits) as (_, port):
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.1)
            started = time.monotonic()
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=client_ctx)
            conn.request("GET", "/")
            assert conn.getresponse().status == 200
            conn.close()
            assert time.monotonic() - started >= 0.3  # it waited for a silent one to go
        finally:
            for sock in silent:
                sock.close()


def test_answer_broken_before_a_byte_went_out_is_a_502(serve: Served) -> None:
    """A bad first chunk right behind the head: nothing reached the client yet, so it gets a
    clean 502 (and the backend is charged), never a cut answer."""
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    with RawBackend([bad], close_after_answer=True) as raw_backend:
        _, port = serve(servers=[raw_backend.url], retries=0)
        assert get(port, "/x")[0] == 502
        assert servers_json(port)[0]["failures"] == 1


@pytest.mark.parametrize("log_format", ["json", "combined", "csv"])
def test_access_log_and_response_metrics(
    serve: Served, backend: TestBackend, tmp_path: Any, log_format: str
) -> None:
    """Each answered request is one access-log line naming the backend, and counted in
    softlb_backend_responses_total by status class."""
    path = tmp_path / "access.log"
    _, port = serve(servers=[backend.url], access_log=str(path), access_log_format=log_format)
    assert get(port, "/x", headers={"User-Agent": "probe/1", "Referer": "http://r/"})[0] == 200
    assert get(port, "/status/503")[0] == 503
    _, _, metrics = get(port, "/_softlb/metrics")
    text = metrics.decode()
    assert f'softlb_backend_responses_total{{backend="{backend.url}",code="2xx"}} 1.0' in text
    assert f'softlb_backend_responses_total{{backend="{backend.url}",code="5xx"}} 1.0' in text
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [
            line
            for line in path.read_text().splitlines()
            if backend.url.split("//")[1] in line or backend.url in line
        ]
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    assert len(lines) == 2, path.read_text()
    if log_format == "json":
        entry = json.loads(lines[0])
        assert (entry["method"], entry["target"], entry["status"]) == ("GET", "/x", 200)
        assert entry["backend"] == backend.url
        assert (entry["referer"], entry["user_agent"]) == ("http://r/", "probe/1")
        assert entry["bytes"] > 0 and entry["client"] == "127.0.0.1"
    elif log_format == "combined":
        assert '"GET /x HTTP/1.1" 200' in lines[0]
        assert '"http://r/" "probe/1"' in lines[0]


def test_each_request_counts_once_whole_or_streamed(serve: Served, backend: TestBackend) -> None:
    """A small answer (relayed whole, the request counted with it) and a large one (streamed,
    the request counted when its head came) each count once in the request duration
    histogram and once among the backend's answers; a 502 counts in neither."""
    app, port = serve(servers=[backend.url])
    size = 1024 * 1024
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for target in ("/x", f"/big/{size}", "/y", f"/chunked/{size}"):
        conn.request("GET", target)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    snapshot = app.proxy.stats.snapshot()
    assert snapshot["requests"] == 4
    assert snapshot["bucket_counts"][-1] == 0  # none took longer than the last bucket
    assert sum(snapshot["bucket_counts"]) == 4  # type: ignore[arg-type]
    _, _, metrics = get(port, "/_softlb/metrics")
    text = metrics.decode()
    assert "softlb_request_duration_seconds_count 4.0" in text
    assert f'softlb_backend_responses_total{{backend="{backend.url}",code="2xx"}} 4.0' in text


@pytest.mark.parametrize("ending", ["close", "pause"])
def test_abandoned_streamed_upload_frees_its_lease(serve: Served, ending: str) -> None:
    """A body too large to read ahead is being streamed to the backend when the client
    closes, or pauses past client_body (408): the exchange is cut, the lease released (the
    backend's ``active`` back to 0) and nothing is blamed on the backend."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([ok]) as raw_backend:
        _, port = serve(servers=[raw_backend.url], timeouts={"client_body": "0.5s"})
        chunk = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head + chunk * 3)
            deadline = time.monotonic() + 5
            while not raw_backend.connections and time.monotonic() < deadline:
                time.sleep(0.02)  # the exchange has started: the body is being streamed
            assert raw_backend.connections == 1
            if ending == "pause":
                assert sock.recv(100).startswith(b"HTTP/1.1 408 ")
        deadline = time.monotonic() + 5
        while servers_json(port)[0]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        server = servers_json(port)[0]
        assert server["active"] == 0
        assert server["failures"] == 0 and server["healthy"]


@pytest.mark.parametrize(
    "coding",
    [b"gzip", b"identity", b"chunked, chunked", b"chunked\r\nTransfer-Encoding: chunked"],
    ids=["gzip", "identity", "chunked-twice", "two-fields"],
)
def test_every_coding_but_chunked_alone_is_501(
    serve: Served, backend: TestBackend, coding: bytes
) -> None:
    """SPEC §3: anything but ``chunked`` alone gets 501 and closes, also the codings llhttp
    refuses itself (which it reports as a parse error); nothing reaches the backend."""
    _, port = serve(servers=[backend.url])
    before = backend.request_count
    got = raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 501 "), got[:80]
    assert b"Connection: close\r\n" in got
    assert backend.request_count == before
    assert servers_json(port)[0]["failures"] == 0


def test_admin_body_above_a_mib_is_a_json_413(serve: Served, backend: TestBackend) -> None:
    """An admin call whose body the engine stops reading (over 1 MiB) gets the admin API's
    JSON error, like one refused by the admin app itself, and changes nothing."""
    _, port = serve(servers=[backend.url])
    body = b"x" * (1100 * 1024)  # of 2 MiB declared: the engine stops reading before the end
    head = b"POST /_softlb/servers HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (
        2 * len(body)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):  # the engine may close before taking it all
            sock.sendall(head + body)
        got = recv_until(sock, b"}")
    head_part, _, payload = got.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413 "), got[:80]
    assert b"Content-Type: application/json" in head_part
    assert "larger than" in json.loads(payload)["error"]
    assert [s["url"] for s in servers_json(port)] == [backend.url]


def test_sticky_cookie_keeps_a_client_on_its_backend(
    serve: Served, backends: list[TestBackend]
) -> None:
    _, port = serve(
        servers=[b.url for b in backends], algorithm="round_robin", sticky={"cookie": "SRV"}
    )
    status, headers, body = get(port, "/x")
    assert status == 200
    cookie = headers["set-cookie"]
    assert cookie.startswith("SRV=") and "HttpOnly" in cookie
    value = cookie.split(";", 1)[0]
    assert "127.0.0.1" not in value  # opaque, not the address
    first = body
    for _ in range(6):
        status, headers, body = get(port, "/x", headers={"Cookie": value})
        assert (status, body) == (200, first)
        assert "set-cookie" not in headers
    # A cookie naming no backend in rotation: balanced afresh, and the cookie set again.
    status, headers, _ = get(port, "/x", headers={"Cookie": "SRV=0123456789abcdef"})
    assert status == 200
    assert headers["set-cookie"].startswith("SRV=")


def test_max_connections_queues_then_503(serve: Served, backend: TestBackend) -> None:
    """One request at a time to the backend: a second waits in the queue and is served when
    the first ends; with a queue timeout shorter than the wait, it gets 503."""
    _, port = serve(servers=[{"url": backend.url, "max_connections": 1}], timeouts={"queue": "3s"})
    results: list[tuple[int, float]] = []

    def slow() -> None:
        started = time.monotonic()
        results.append((get(port, "/slow/0.5")[0], time.monotonic() - started))

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(10)
    assert sorted(r[0] for r in results) == [200, 200]
    assert max(r[1] for r in results) >= 0.85  # the second waited for the first
    _, port = serve(
        servers=[{"url": backend.url, "max_connections": 1}], timeouts={"queue": "200ms"}
    )
    holder = threading.Thread(target=lambda: get(port, "/slow/1"))
    holder.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert get(port, "/x")[0] == 503
    assert time.monotonic() - started < 0.9
    holder.join(5)


def test_http10_keep_alive_is_answered_in_kind(serve: Served, backend: TestBackend) -> None:
    _, port = serve(servers=[backend.url])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            answer = b""
            while b"ok from" not in answer:
                answer += sock.recv(4096)
            assert b"connection: keep-alive" in answer.lower()


# -- the answer's head, as the upstream connection builds it ----------------------------------


def test_answer_fields_drop_hop_by_hop_and_connection_named(serve: Served) -> None:
    answer = (
        b"HTTP/1.1 200 Fine\r\nX-A: 1\r\nConnection: keep-alive, X-Named\r\nKeep-Alive: t=5\r\n"
        b"X-Named: secret\r\nTrailer: X-T\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nUpgrade: h2c\r\nX-B:\r\n\r\nok"
    )
    with RawBackend([answer]) as backend:
        _, port = serve(servers=[backend.url])
        data = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until=b"\r\n\r\nok")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 Fine",
        b"X-A: 1",
        b"Content-Length: 2",
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
        b"X-B: ",
    ]
    assert body == b"ok"


def test_answer_connection_close_drops_a_field_named_close(serve: Served) -> None:
    """``Connection: close`` names a field too (RFC 9110 §7.6.1): one called Close goes, as
    every field the Connection header names, on the usual path for Connection values too."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: x\r\nX-Kept: 1\r\n"
    answer += b"Content-Length: 2\r\n\r\nok"
    with RawBackend([answer]) as backend:
        _, port = serve(servers=[backend.url])
        data = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until=b"\r\n\r\nok")
    head = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head == [b"HTTP/1.1 200 OK", b"X-Kept: 1", b"Content-Length: 2"]


def test_answer_content_length_survives_a_connection_header_naming_it(serve: Served) -> None:
    """A backend whose Connection header names Content-Length keeps its framing: the body goes
    to the client in the backend's framing, so the client needs the length to find the next
    answer on its keep-alive connection."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Gone\r\nX-Gone: 1\r\n"
    answer += b"Content-Length: 5\r\n\r\nhello"
    with RawBackend([answer, answer]) as backend:
        _, port = serve(servers=[backend.url])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for _ in range(2):  # the second answer is read on the same client connection
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(4096)
                head, _, body = data.partition(b"\r\n\r\n")
                assert b"content-length: 5" in head.lower()
                assert b"x-gone" not in head.lower()
                while len(body) < 5:
                    body += sock.recv(4096)
                assert body == b"hello"


def test_answer_trailers_and_interim_answers_are_not_forwarded(serve: Served) -> None:
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n"
    )
    with RawBackend([answer]) as backend:
        _, port = serve(servers=[backend.url])
        for _ in range(2):  # the second goes on the pooled connection
            status, headers, body = get(port, "/")
            assert (status, body) == (200, b"ok")
            assert "link" not in headers
            assert "x-trailer" not in headers
            assert "x-other" not in headers
            assert headers["x-a"] == "1"


@pytest.mark.parametrize("split", [False, True])
def test_answer_head_above_the_limit_is_a_502(serve: Served, split: bool) -> None:
    from softlb.aio.upstream import MAX_HEAD

    # Fields counted as name + value + 4 each: "a:" lines are 4 bytes on the wire, counted 5.
    small = b"a:\r\n" * (MAX_HEAD // 5 + 1)
    fits = b"X-Fits: " + b"v" * (MAX_HEAD - 1000) + b"\r\n"

    def send(fields: bytes) -> Callable[[socket.socket], None]:
        def answer(sock: socket.socket) -> None:
            head = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"
            if split:
                for at in range(0, len(head), 4096):
                    sock.sendall(head[at : at + 4096])
                    time.sleep(0.001)
            else:
                sock.sendall(head)

        return answer

    with RawBackend([send(small), send(fits)]) as backend:
        _, port = serve(servers=[backend.url], retries=0)
        status, _, _ = get(port, "/")
        assert status == 502
        status, headers, body = get(port, "/")
        assert (status, body) == (200, b"ok")
        assert len(headers["x-fits"]) == MAX_HEAD - 1000


# -- the request's header block, made in the pass over its head ---------------------------------


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        (  # no Connection header: the fields as sent, less hop-by-hop and X-Forwarded-*
            b"Host: x.example\r\nUser-Agent: t\r\nX-Forwarded-For: 10.0.0.1\r\n"
            b"x-forwarded-for: 10.0.0.2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: e\r\n"
            b"Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
            b"Proxy-Authorization: x\r\nIdempotency-Key: k1\r\nAccept: */*\r\n",
            [
                b"Host: x.example",
                b"User-Agent: t",
                b"Idempotency-Key: k1",
                b"Accept: */*",
                b"X-Forwarded-For: 10.0.0.1, 10.0.0.2, 127.0.0.1",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: x.example",
            ],
        ),
        (  # Connection names only fields that go anyway
            b"Connection: keep-alive, TE, Host\r\nHOST: h\r\nTE: trailers\r\nX-A: 1\r\n",
            [
                b"HOST: h",
                b"X-A: 1",
                b"X-Forwarded-For: 127.0.0.1",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: h",
            ],
        ),
        (  # Connection names a field that would go, and X-Forwarded-For
            b"Host: h\r\nConnection: X-Private, x-forwarded-for\r\nX-Private: p\r\n"
            b"X-Forwarded-For: 10.0.0.1\r\nX-A: 1\r\n",
            [
                b"Host: h",
                b"X-A: 1",
                b"X-Forwarded-For: 127.0.0.1",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: h",
            ],
        ),
        (  # Connection: close names no field that is there
            b"Host: h\r\nConnection: close\r\nX-A: 1\r\n",
            [
                b"Host: h",
                b"X-A: 1",
                b"X-Forwarded-For: 127.0.0.1",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: h",
            ],
        ),
    ],
)
def test_request_fields_for_the_backend(
    serve: Served, request_fields: bytes, expected: list[bytes]
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([answer]) as backend:
        _, port = serve(servers=[backend.url])
        data = raw(port, b"GET /p HTTP/1.1\r\n" + request_fields + b"\r\n", until=b"\r\n\r\nok")
        assert data.startswith(b"HTTP/1.1 200"), data[:80]
        assert backend.requests[0].header_lines == expected


def test_http10_request_without_host_gets_the_listeners_address(serve: Served) -> None:
    """An HTTP/1.0 request without Host: the backend (spoken to in HTTP/1.1, which needs
    one) gets the address the client reached, as X-Forwarded-Host and as Host (nginx's
    $host); it got no Host at all."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([answer]) as backend:
        _, port = serve(servers=[backend.url])
        data = raw(port, b"GET /p HTTP/1.0\r\nX-A: 1\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200"), data[:80]
        assert backend.requests[0].header_lines == [
            b"X-A: 1",
            b"X-Forwarded-For: 127.0.0.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: 127.0.0.1:%d" % port,
            b"Host: 127.0.0.1:%d" % port,
        ]


def test_http10_request_without_host_gets_one_on_the_slow_path_too(serve: Served) -> None:
    """The same when a Connection header names a field (the head is made again, by
    Engine._fields): the named field goes, a Host comes."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([answer]) as backend:
        _, port = serve(servers=[backend.url])
        data = raw(port, b"GET /p HTTP/1.0\r\nX-A: 1\r\nX-B: 2\r\nConnection: X-A\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200"), data[:80]
        lines = backend.requests[0].header_lines
        assert b"X-A: 1" not in lines and b"X-B: 2" in lines
        assert b"Host: 127.0.0.1:%d" % port in lines


def test_post_with_idempotency_key_is_retried(serve: Served) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([CLOSE]) as one, RawBackend([answer]) as two:
        _, port = serve(servers=[one.url, two.url], algorithm="round_robin")
        for _ in range(2):
            status, _, body = get(
                port, "/x", method="POST", body=b"data", headers={"idempotency-KEY": "k"}
            )
            assert (status, body) == (200, b"ok")


# -- the fast path (Engine.start_forward): a request on an idle pooled connection ----------


OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_reused_connection_closed_under_a_request_is_retried_on_a_fresh_one(
    serve: Served,
) -> None:
    """The backend takes the second request on its kept-alive connection and closes it without
    a byte of answer (its keep-alive ended as the request came): the request goes again on a
    fresh connection, the backend is not blamed, and no retry is spent (retries 0)."""
    with RawBackend([OK_KEEP_ALIVE, CLOSE, OK_KEEP_ALIVE]) as raw_backend:
        _, port = serve(servers=[raw_backend.url], retries=0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(2):
            conn.request("GET", "/x")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"ok")
        conn.close()
        assert [r.connection for r in raw_backend.requests] == [1, 1, 2]
        assert servers_json(port)[0]["failures"] == 0


def test_a_bad_answer_on_a_pooled_connection_fails_over(serve: Served) -> None:
    """A backend answers garbage on its pooled connection: that try is charged to it and the
    request goes to the other backend, as any first try's failure."""
    garbage = b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"
    with RawBackend([OK_KEEP_ALIVE, garbage]) as bad, RawBackend([OK_KEEP_ALIVE]) as good:
        _, port = serve(servers=[bad.url, good.url], algorithm="round_robin", retries=1)
        for _ in range(2):  # one each: both now have an idle pooled connection
            assert get(port, "/x")[:3:2] == (200, b"ok")
        assert get(port, "/x")[:3:2] == (200, b"ok")  # bad's turn: garbage, then good
        assert len(bad.requests) == 2 and len(good.requests) == 2
        failures = {s["url"]: s["failures"] for s in servers_json(port)}
        assert failures == {bad.url: 1, good.url: 0}


@pytest.mark.parametrize("pooled", [True, False], ids=["fast-path", "new-connection"])
def test_an_internal_error_while_relaying_is_a_500_and_frees_the_lease(
    serve: Served, monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    """A bug in the relay of a whole answer reaches the client as a plain 500 (never a
    traceback, never a hung connection), and the request is no longer counted in flight:
    on the fast path (a pooled connection waits) and on the general one (a new connection)."""
    from softlb.aio.engine import Engine

    with RawBackend([OK_KEEP_ALIVE]) as raw_backend:
        _, port = serve(servers=[raw_backend.url])
        if pooled:
            assert get(port, "/x")[0] == 200  # a pooled connection now waits

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(Engine, "_relay_whole", broken)
        status, headers, body = get(port, "/x")
        assert (status, headers.get("connection")) == (500, "close")
        assert body.startswith(b"500 Internal Server Error")
        monkeypatch.undo()
        assert servers_json(port)[0]["active"] == 0
        assert get(port, "/x")[:3:2] == (200, b"ok")


def test_an_internal_error_while_starting_falls_back_to_the_general_path(
    serve: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the fast path's start leaves nothing held (the lease released, the pooled
    connection it took closed) and the request is served by the general path (here the bug
    strikes once, so it answers)."""
    from softlb.aio.upstream import UpstreamConnection

    with RawBackend([OK_KEEP_ALIVE]) as raw_backend:
        _, port = serve(servers=[raw_backend.url])
        assert get(port, "/x")[0] == 200
        real = UpstreamConnection.start
        calls: list[UpstreamConnection] = []

        def once(conn: UpstreamConnection, *args: Any, **kwargs: Any) -> None:
            calls.append(conn)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            real(conn, *args, **kwargs)

        monkeypatch.setattr(UpstreamConnection, "start", once)
        assert get(port, "/x")[:3:2] == (200, b"ok")
        assert len(calls) == 2  # the fast path's try, then the general path's
        assert calls[0].closed and calls[1] is not calls[0]
        monkeypatch.undo()
        assert servers_json(port)[0]["active"] == 0


def test_an_internal_error_at_the_end_of_a_streamed_answer_cuts_it_and_frees_the_lease(
    serve: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer whose body comes after its head (so it streams) on the fast path: a bug when
    it ends cuts the client's connection (its head went out) instead of leaving the client
    waiting for ever, and the request is no longer counted in flight."""
    from softlb.aio.engine import Engine

    def slow_body(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(0.1)
        sock.sendall(b"cd")

    with RawBackend([OK_KEEP_ALIVE, slow_body]) as raw_backend:
        _, port = serve(servers=[raw_backend.url])
        assert get(port, "/x")[0] == 200  # a pooled connection now waits

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(Engine, "_finish", broken)
        began = time.monotonic()
        got = raw(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", wait=5.0)
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        assert got.endswith(b"\r\n\r\nabcd")
        assert time.monotonic() - began < 2.0  # closed, not left to raw()'s 5 s
        monkeypatch.undo()
        assert servers_json(port)[0]["active"] == 0
