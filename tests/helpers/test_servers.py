"""Tests proving that the TestBackend helper behaves as its path table says."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import urllib3

from tests.helpers.servers import (
    COOKIES,
    GZIP_PLAIN,
    HOP_RESPONSE_HEADERS,
    RefusingURL,
    TestBackend,
    body_chunks,
    body_sha256,
    closed_port,
    free_port,
    wait_for_port,
)


@pytest.fixture
def client() -> Iterator[urllib3.PoolManager]:
    """A urllib3 client that neither retries nor follows redirects, closed at teardown."""
    manager = urllib3.PoolManager(retries=False, timeout=10.0)
    try:
        yield manager
    finally:
        manager.clear()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection and return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = bytearray()
        while data := sock.recv(65536):
            received.extend(data)
    return bytes(received)


def test_default_answer(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """A plain GET gets "ok from <port>" and X-Backend, and is recorded."""
    response = client.request("GET", backend.url + "/some/path?x=1", headers={"X-Test": "1"})
    assert response.status == 200
    assert response.data == f"ok from {backend.port}".encode()
    assert response.headers["X-Backend"] == str(backend.port)
    record = backend.last
    assert (record.method, record.target, record.body) == ("GET", "/some/path?x=1", b"")
    assert record.header("x-test") == "1"
    assert backend.request_count == 1


def test_records_target_and_headers_exactly(backend: TestBackend) -> None:
    """The target is recorded as on the wire (no "//" collapsing), headers in order with repeats."""
    raw_exchange(
        backend.port,
        b"GET //a/%2Fb/%7e?q=a%20b HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\n"
        b"Connection: close\r\n\r\n",
    )
    record = backend.last
    assert record.target == "//a/%2Fb/%7e?q=a%20b"
    assert record.headers == [
        ("Host", "h"),
        ("X-Dup", "1"),
        ("x-dup", "2"),
        ("Connection", "close"),
    ]
    assert record.header_values("X-DUP") == ["1", "2"]


def test_keep_alive(backend: TestBackend) -> None:
    """Two requests on one connection are served on it (HTTP/1.1 keep-alive)."""
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)
    try:
        for _ in range(2):
            conn.request("GET", "/")
            assert conn.getresponse().read() == f"ok from {backend.port}".encode()
    finally:
        conn.close()
    first, second = backend.requests
    assert first.client_port == second.client_port
    assert backend.connections == 1


def test_echo(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/echo answers with what it received, as JSON."""
    response = client.request("PUT", backend.url + "/echo/x?y=1", body=b"hello", headers={"A": "b"})
    echo = json.loads(response.data)
    assert echo["method"] == "PUT"
    assert echo["target"] == "/echo/x?y=1"
    assert ["A", "b"] in echo["headers"]
    assert echo["body_length"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert echo["backend"] == backend.port
    assert backend.last.body == b"hello"


def test_chunked_request_body_is_decoded(backend: TestBackend) -> None:
    """A chunked request body (with extensions and trailers) is decoded and recorded."""
    answer = raw_exchange(
        backend.port,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\nX-T: tail\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    record = backend.last
    assert record.body == b"hello world0123456789"
    assert record.body_length == 21
    assert record.trailers == [("X-T", "tail")]


def test_chunked_request_from_urllib3(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """A generator body sent by urllib3 with chunked=True arrives whole."""
    pieces = [b"a" * 70_000, b"", b"b" * 10, b"c"]
    response = client.request(
        "POST", backend.url + "/echo", body=iter(pieces), chunked=True, preload_content=True
    )
    assert response.status == 200
    assert backend.last.body == b"".join(pieces)
    assert backend.last.header("Transfer-Encoding") == "chunked"


def test_upload_is_hashed_not_stored(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/upload records length and SHA-256 but keeps no body."""
    body = bytes(range(256)) * 1000
    response = client.request("POST", backend.url + "/upload", body=body)
    assert json.loads(response.data)["body_length"] == len(body)
    record = backend.last
    assert record.body == b""
    assert record.body_length == len(body)
    assert record.body_sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("code", [200, 201, 204, 301, 302, 304, 404, 500, 503])
def test_status(backend: TestBackend, client: urllib3.PoolManager, code: int) -> None:
    """/status/<code> answers with that status; 3xx carry Location; 204/304 have no body."""
    response = client.request("GET", backend.url + f"/status/{code}", redirect=False)
    assert response.status == code
    if code in (204, 304):
        assert response.data == b""
    else:
        assert response.data == f"status {code}".encode()
    assert response.headers.get("Location") == ("/elsewhere" if 300 <= code < 400 else None)


def test_head_has_no_body(backend: TestBackend) -> None:
    """HEAD gets the headers of GET and no body, and the connection stays usable."""
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)
    try:
        conn.request("HEAD", "/status/200")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == "10"
        assert response.read() == b""
        conn.request("GET", "/")
        assert conn.getresponse().read() == f"ok from {backend.port}".encode()
    finally:
        conn.close()


def test_slow(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/slow/<seconds> waits before answering."""
    started = time.monotonic()
    response = client.request("GET", backend.url + "/slow/0.3")
    assert response.data == b"slow"
    assert time.monotonic() - started >= 0.3


def test_drop(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/drop reads the request, then closes without a byte of answer."""
    with pytest.raises(urllib3.exceptions.ProtocolError):
        client.request("POST", backend.url + "/drop", body=b"payload")
    assert backend.last.body == b"payload"
    assert raw_exchange(backend.port, b"GET /drop HTTP/1.1\r\nHost: h\r\n\r\n") == b""


def test_reset(backend: TestBackend) -> None:
    """/reset aborts the connection with a TCP RST."""
    with pytest.raises(ConnectionResetError):
        raw_exchange(backend.port, b"GET /reset HTTP/1.1\r\nHost: h\r\n\r\n")
    assert backend.last.target == "/reset"


def test_reset_mid_body(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/reset-mid-body announces 1000000 bytes, sends 1000 and closes."""
    response = client.request("GET", backend.url + "/reset-mid-body", preload_content=False)
    try:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000000"
        with pytest.raises(urllib3.exceptions.ProtocolError):
            response.read()
    finally:
        response.release_conn()


@pytest.mark.parametrize("nbytes", [0, 1, 65_536, 1_000_003])
@pytest.mark.parametrize("kind", ["big", "chunked"])
def test_big_and_chunked(
    backend: TestBackend, client: urllib3.PoolManager, kind: str, nbytes: int
) -> None:
    """/big/<n> and /chunked/<n> stream the body_chunks() pattern with the right framing."""
    response = client.request("GET", backend.url + f"/{kind}/{nbytes}", preload_content=False)
    try:
        if kind == "big":
            assert response.headers["Content-Length"] == str(nbytes)
        else:
            assert response.headers["Transfer-Encoding"] == "chunked"
        digest = hashlib.sha256()
        received = 0
        for piece in response.stream(65536):
            digest.update(piece)
            received += len(piece)
    finally:
        response.release_conn()
    assert received == nbytes
    assert digest.hexdigest() == body_sha256(nbytes)


def test_body_chunks_are_bounded() -> None:
    """body_chunks() yields pieces of at most 64 KiB adding up to the requested size."""
    pieces = list(body_chunks(200_000))
    assert max(len(p) for p in pieces) == 65_536
    assert sum(len(p) for p in pieces) == 200_000


def test_gzip(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/gzip sends a gzip-compressed body with Content-Encoding: gzip."""
    response = client.request("GET", backend.url + "/gzip", decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.data != GZIP_PLAIN
    assert gzip.decompress(response.data) == GZIP_PLAIN


def test_cookies(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/cookies sends two separate Set-Cookie headers."""
    response = client.request("GET", backend.url + "/cookies")
    assert response.headers.getlist("Set-Cookie") == list(COOKIES)


def test_hop(backend: TestBackend) -> None:
    """/hop sends every hop-by-hop header and X-Public, then closes the connection."""
    answer = raw_exchange(backend.port, b"GET /hop HTTP/1.1\r\nHost: h\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    received = [tuple(line.split(": ", 1)) for line in lines]
    for pair in HOP_RESPONSE_HEADERS:
        assert pair in received
    assert body == b"hop"


def test_health_probes_counted_apart(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """/health answers health_status and counts in .probes, not in .requests."""
    assert client.request("GET", backend.url + "/health").data == b"healthy"
    backend.health_status = 503
    response = client.request("GET", backend.url + "/health")
    assert response.status == 503
    assert backend.probes == 2
    assert backend.request_count == 0
    client.request("GET", backend.url + "/")
    assert (backend.probes, backend.request_count) == (2, 1)
    backend.clear()
    assert (backend.probes, backend.request_count) == (0, 0)


def test_stop_does_not_wait_for_idle_or_slow_connections() -> None:
    """stop() returns promptly with an idle keep-alive connection and a /slow request open."""
    with TestBackend() as backend:
        idle = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)
        slow = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)

        def slow_request() -> None:  # answered early or cut off by stop(): either is fine
            with contextlib.suppress(OSError, http.client.HTTPException):
                slow.request("GET", "/slow/30")
                slow.getresponse().read()

        thread = threading.Thread(target=slow_request)
        try:
            idle.request("GET", "/")
            idle.getresponse().read()
            thread.start()
            deadline = time.monotonic() + 5
            while backend.request_count < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            backend.stop()
            assert time.monotonic() - started < 3
            thread.join(5)
            assert not thread.is_alive()
            backend.stop()  # idempotent
        finally:
            idle.close()
            slow.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", backend.port), timeout=1).close()


def test_repr(backend: TestBackend, client: urllib3.PoolManager) -> None:
    """The repr shows the URL, the state and the counters."""
    client.request("GET", backend.url + "/")
    assert repr(backend) == (
        f"<TestBackend {backend.url} running: 1 requests, 0 probes, 1 connections>"
    )
    backend.stop()
    assert "stopped" in repr(backend)


def test_backends_fixture(backends: list[TestBackend]) -> None:
    """The backends fixture gives three running servers on distinct ports."""
    assert len({b.port for b in backends}) == 3


def test_refused_url(refused_url: str, client: urllib3.PoolManager) -> None:
    """Nothing listens behind refused_url: the connection is refused."""
    with pytest.raises(urllib3.exceptions.NewConnectionError):
        client.request("GET", refused_url + "/")


def test_refusing_url_and_closed_port() -> None:
    """RefusingURL is an http URL string with its .port; closed_port() refuses connections."""
    url = RefusingURL()
    assert url == f"http://127.0.0.1:{url.port}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port()), timeout=1).close()


def test_wait_for_port(backend: TestBackend) -> None:
    """wait_for_port() returns for a listening port and times out for a free one."""
    wait_for_port("127.0.0.1", backend.port, timeout=2)
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free_port(), timeout=0.2)
