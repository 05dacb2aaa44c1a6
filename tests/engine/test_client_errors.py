"""A client's bad request is the client's fault (SPEC §3), on both engines: 400 or 501, the
connection closed, nothing counted against the backend, and the site still serves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.engine.conftest import Balancer, StartBalancer
from tests.helpers.servers import TestBackend

pytestmark = pytest.mark.integration

#: A chunked body whose first chunk size is negative.
NEGATIVE_CHUNK = (
    b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-5\r\nhello\r\n0\r\n\r\n"
)
#: Two Content-Length fields that disagree.
CONFLICTING_LENGTHS = (
    b"POST /upload HTTP/1.1\r\nHost: example.test\r\n"
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
)
#: A length of 2^64 + 5: wraps to 5 in a 64-bit parser.
HUGE_LENGTH = (
    b"POST /upload HTTP/1.1\r\nHost: example.test\r\n"
    b"Content-Length: 18446744073709551621\r\n\r\nhello"
)
#: A coding other than chunked alone.
GZIP_CHUNKED = (
    b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)
#: Transfer-Encoding in HTTP/1.0, which cannot have it (RFC 9112 §6.1: faulty framing).
CHUNKED_IN_HTTP10 = (
    b"POST /upload HTTP/1.0\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)
#: The same, kept alive by a Connection or a Proxy-Connection field (llhttp honours both).
CHUNKED_IN_HTTP10_KEPT = CHUNKED_IN_HTTP10.replace(b"Host:", b"Connection: keep-alive\r\nHost:")
CHUNKED_IN_HTTP10_PROXY_KEPT = CHUNKED_IN_HTTP10.replace(
    b"Host:", b"Proxy-Connection: keep-alive\r\nHost:"
)
#: HTTP/1.1 without Host.
NO_HOST = b"GET /no-host HTTP/1.1\r\nUser-Agent: test\r\n\r\n"


@pytest.fixture(scope="module")
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


@pytest.fixture(scope="module")
def shared(module_balancer: StartBalancer, backend: TestBackend) -> Balancer:
    return module_balancer({"servers": [backend.url]})


def refused(lb: Balancer, request: bytes, *, closes: bool = True) -> int:
    """Send ``request`` on a new connection; return the status, after checking (if
    ``closes``) that the balancer then closed the connection."""
    with lb.raw(timeout=5.0) as client:
        client.send(request)
        status = client.read_response().status
        if closes:
            client.wait_closed(timeout=3.0)
    return status


@pytest.mark.parametrize(
    "request_bytes",
    [
        NEGATIVE_CHUNK,
        CONFLICTING_LENGTHS,
        CHUNKED_IN_HTTP10,
        CHUNKED_IN_HTTP10_KEPT,
        CHUNKED_IN_HTTP10_PROXY_KEPT,
    ],
    ids=[
        "chunk-size--5",
        "two-lengths",
        "chunked-in-http-1.0",
        "chunked-in-http-1.0-keep-alive",
        "chunked-in-http-1.0-proxy-keep-alive",
    ],
)
def test_bad_framing_is_400_and_no_backend_failure(
    shared: Balancer, backend: TestBackend, request_bytes: bytes
) -> None:
    """Ten badly framed requests get 400 each; the backend's failures stay 0, and the site
    still serves."""
    statuses = [refused(shared, request_bytes) for _ in range(10)]
    assert statuses == [400] * 10
    assert shared.servers()[backend.url]["failures"] == 0
    status, _, body = shared.get("/still-there")
    assert (status, body) == (200, f"ok from {backend.port}".encode())


def test_unsupported_transfer_coding_is_501(shared: Balancer, backend: TestBackend) -> None:
    """Transfer-Encoding: gzip, chunked gets 501, never reaches the backend, and the
    connection is closed (the body's end cannot be known: reading on would smuggle it)."""
    before = backend.request_count
    assert refused(shared, GZIP_CHUNKED) == 501
    assert backend.request_count == before
    assert shared.servers()[backend.url]["failures"] == 0


def test_http11_without_host_is_400(shared: Balancer, backend: TestBackend) -> None:
    """An HTTP/1.1 request without Host gets 400 and is not forwarded."""
    assert refused(shared, NO_HOST, closes=False) == 400
    assert "/no-host" not in [seen.target for seen in backend.requests]


@pytest.mark.parametrize("field", [b"Connection", b"Proxy-Connection"])
def test_http10_kept_alive_without_host_is_forwarded(
    shared: Balancer, backend: TestBackend, field: bytes
) -> None:
    """HTTP/1.0 needs no Host, also when a Connection or Proxy-Connection field keeps it
    alive (the engine tells the version without asking the parser only for a request kept
    alive with neither field)."""
    with shared.raw(timeout=5.0) as client:
        client.send(b"GET /old-client HTTP/1.0\r\n%b: keep-alive\r\n\r\n" % field)
        assert client.read_response().status == 200
    assert backend.last.target == "/old-client"


def test_content_length_above_2_to_the_63_is_400_before_the_backend(
    balancer: StartBalancer,
) -> None:
    """Content-Length 2^64+5 gets 400, and the backend sees no byte of it (not even a
    connection)."""
    with TestBackend() as fresh:
        lb = balancer({"servers": [fresh.url]})
        assert refused(lb, HUGE_LENGTH) == 400
        assert (fresh.connections, fresh.request_count) == (0, 0)
        assert lb.servers()[fresh.url]["failures"] == 0


@pytest.mark.parametrize("host", [b"a b", b"a/b", b"site.example:http", b"[::1"])
def test_invalid_host_is_400_and_not_forwarded(
    shared: Balancer, backend: TestBackend, host: bytes
) -> None:
    """A Host that is no ``host[:port]`` gets 400 (RFC 9112 §3.2: a server MUST), is never
    forwarded, and blames no backend."""
    before = backend.request_count
    with shared.raw(timeout=5.0) as client:
        client.send(b"GET /bad-host HTTP/1.1\r\nHost: %b\r\n\r\n" % host)
        assert client.read_response().status == 400
    assert backend.request_count == before
    assert shared.servers()[backend.url]["failures"] == 0


def test_a_host_refused_stays_refused_beside_valid_ones(
    shared: Balancer, backend: TestBackend
) -> None:
    """Valid Host values are remembered, refused ones are not: the same bad value is refused
    every time, before and after a valid value that starts like it."""
    statuses = []
    for host in (b"cache.example/x", b"cache.example", b"cache.example/x", b"cache.example"):
        with shared.raw(timeout=5.0) as client:
            client.send(b"GET /cached-host HTTP/1.1\r\nHost: %b\r\n\r\n" % host)
            statuses.append(client.read_response().status)
    assert statuses == [400, 200, 400, 200]


@pytest.mark.parametrize(
    ("sent", "seen"),
    [
        (b"[::1]:8080", "[::1]:8080"),
        (b"10.0.0.1", "10.0.0.1"),
        (b"site.example:8443   ", "site.example:8443"),  # trailing whitespace is not the value
    ],
)
def test_valid_host_is_forwarded(
    shared: Balancer, backend: TestBackend, sent: bytes, seen: str
) -> None:
    """IP literals, addresses and names with a port pass, without trailing whitespace."""
    with shared.raw(timeout=5.0) as client:
        client.send(b"GET /good-host HTTP/1.1\r\nHost: %b\r\n\r\n" % sent)
        assert client.read_response().status == 200
    assert backend.last.header_values("Host") == [seen]
    assert backend.last.header_values("X-Forwarded-Host") == [seen]
