"""What only the event-loop engine promises (SPEC §3): idle and slow clients cost no service,
client timeouts and header limits, keep-alive expiry, pipelining, Expect: 100-continue, and
Upgrade tunnels."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from tests.engine.conftest import Balancer, StartBalancer
from tests.helpers.hostile import UPGRADE_REQUEST, IdleClients, RawClient, UpgradeEchoBackend
from tests.helpers.servers import TestBackend

pytestmark = pytest.mark.integration

#: Short client timeouts and a small header limit, so the tests are quick.
CLIENT_LIMITS = {
    "timeouts": {"client_header": "500ms", "keepalive": "300ms", "client_body": "500ms"},
    "limits": {"max_header_bytes": 4096},
}


@pytest.fixture(scope="module")
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


@pytest.fixture(scope="module")
def plain(module_balancer: StartBalancer, backend: TestBackend) -> Balancer:
    """A balancer with the default limits and timeouts."""
    lb = module_balancer({"servers": [backend.url]})
    assert lb.get("/warm-up")[0] == 200
    return lb


@pytest.fixture(scope="module")
def limited(module_balancer: StartBalancer, backend: TestBackend) -> Balancer:
    """A balancer with :data:`CLIENT_LIMITS`."""
    lb = module_balancer({"servers": [backend.url], **CLIENT_LIMITS})
    assert lb.get("/warm-up")[0] == 200
    return lb


def timed_get(lb: Balancer) -> float:
    """Seconds a GET on a new connection takes, connection included; asserts its 200."""
    started = time.monotonic()
    with lb.raw(timeout=2.0) as client:
        client.send(b"GET /timed HTTP/1.1\r\nHost: example.test\r\n\r\n")
        response = client.read_response()
    elapsed = time.monotonic() - started
    assert response.status == 200, response
    return elapsed


@pytest.mark.eventloop_only("a thread per connection is held by each half-open client")
def test_half_open_connections_do_not_delay_others(plain: Balancer) -> None:
    """50 connections that sent half a request head and went silent: a normal request is
    still answered in under 0.2 s."""
    with IdleClients(plain.port, 50, b"GET /never HTTP/1.1\r\nHost: exa"):
        assert timed_get(plain) < 0.2


def test_unfinished_head_gets_408_and_close(limited: Balancer) -> None:
    """A head not finished within timeouts.client_header (500ms) gets 408, then the close."""
    with limited.raw(timeout=3.0) as client:
        started = time.monotonic()
        client.send(b"GET /slowloris HTTP/1.1\r\nHost: example.test\r\n")
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        client.wait_closed(timeout=2.0)
    assert 0.4 <= elapsed < 2.5


def test_stalled_body_gets_408_and_close(limited: Balancer, backend: TestBackend) -> None:
    """A body that stops for longer than timeouts.client_body (500ms) gets 408, then the
    close; the backend's failures stay 0."""
    with limited.raw(timeout=3.0) as client:
        client.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10\r\n\r\nab")
        started = time.monotonic()
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        client.wait_closed(timeout=2.0)
    assert 0.4 <= elapsed < 2.5
    assert limited.servers()[backend.url]["failures"] == 0


def test_stalled_admin_body_gets_408(limited: Balancer) -> None:
    """An admin call whose body stops for longer than timeouts.client_body: 408 in JSON on
    both engines (the admin API read the threaded engine's timeout as a broken body: 400)."""
    with limited.raw(timeout=3.0) as client:
        client.send(
            b"POST /_softlb/servers HTTP/1.1\r\nHost: example.test\r\n"
            b'Content-Length: 10\r\n\r\n{"url"'
        )
        response = client.read_response()
    assert response.status == 408, response
    assert "error" in json.loads(response.body)


def test_more_slow_clients_than_threads_are_timed_out(
    balancer: StartBalancer, backend: TestBackend
) -> None:
    """Four clients that send half a head, and two that stop in their body, against two
    threads (``--threads 2``; the event loop has none to take): each gets 408 after its
    timeout (500ms) instead of holding a thread for ever (gunicorn's threaded worker has no
    such timeouts of its own), and a normal request sent after them is answered once they
    have been let go of."""
    lb = balancer({"servers": [backend.url], **CLIENT_LIMITS}, "--threads", "2")
    assert lb.get("/warm-up")[0] == 200
    heads = [lb.raw(timeout=4.0) for _ in range(4)]
    bodies = [lb.raw(timeout=4.0) for _ in range(2)]
    try:
        for client in heads:
            client.send(b"GET /never HTTP/1.1\r\nHost: exa")
        for client in bodies:
            client.send(b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 9\r\n\r\nab")
        time.sleep(0.1)
        started = time.monotonic()
        with lb.raw(timeout=4.0) as normal:
            normal.send(b"GET /normal HTTP/1.1\r\nHost: example.test\r\n\r\n")
            assert normal.read_response().status == 200
        assert time.monotonic() - started < 3.0
        assert [client.read_response().status for client in heads + bodies] == [408] * 6
    finally:
        for client in heads + bodies:
            client.close()
    assert lb.servers()[backend.url]["failures"] == 0
    assert "/up" not in [seen.target for seen in backend.requests]


@pytest.mark.parametrize(
    "fields",
    [
        [b"X-Big: " + b"a" * 8192],  # one field above the limit
        [b"X-Part-%d: %b" % (i, b"b" * 900) for i in range(6)],  # each small, 5.5 KiB in all
    ],
    ids=["one-field", "many-fields"],
)
def test_head_above_max_header_bytes_gets_431(
    limited: Balancer, backend: TestBackend, fields: list[bytes]
) -> None:
    """A head above limits.max_header_bytes (4096), whole or summed over its fields: 431 on
    both engines, with a plain answer, and nothing forwarded."""
    with limited.raw(timeout=3.0) as client:
        client.send(
            b"GET /too-big HTTP/1.1\r\nHost: example.test\r\n%b\r\n\r\n" % b"\r\n".join(fields)
        )
        response = client.read_response()
    assert response.status == 431
    assert b"<html" not in response.body.lower() and b"too large" in response.body.lower()
    assert "/too-big" not in [seen.target for seen in backend.requests]


def test_head_just_below_max_header_bytes_is_forwarded(
    limited: Balancer, backend: TestBackend
) -> None:
    """A 4,000-byte head (request line, fields, empty line) against 4096: forwarded."""
    line = b"GET /fits HTTP/1.1\r\n"
    fields = b"Host: example.test\r\nX-Pad: "
    pad = 4000 - len(line) - len(fields) - len(b"\r\n\r\n")
    head = line + fields + b"p" * pad + b"\r\n\r\n"
    assert len(head) == 4000
    with limited.raw(timeout=3.0) as client:
        client.send(head)
        assert client.read_response().status == 200
    assert backend.last.target == "/fits"


def test_idle_keepalive_connection_closed(limited: Balancer) -> None:
    """A keep-alive connection idle for timeouts.keepalive (300ms; gunicorn's threaded worker
    takes whole seconds, so 1 s there) is closed."""
    with limited.raw(timeout=3.0) as client:
        client.send(b"GET /once HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert client.read_response().status == 200
        started = time.monotonic()
        assert client.wait_closed(timeout=2.0) == b""
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2.0


@pytest.mark.eventloop_only("gunicorn's threaded worker does not promise pipelining order")
def test_pipelined_requests_answered_in_order(plain: Balancer) -> None:
    """Three GETs in one send, the first the slowest: three answers, in request order."""
    with plain.raw(timeout=5.0) as client:
        client.send(
            b"GET /slow/0.3 HTTP/1.1\r\nHost: example.test\r\n\r\n"
            b"GET /echo?n=2 HTTP/1.1\r\nHost: example.test\r\n\r\n"
            b"GET /status/201 HTTP/1.1\r\nHost: example.test\r\n\r\n"
        )
        first, second, third = (client.read_response() for _ in range(3))
    assert (first.status, first.body) == (200, b"slow")
    assert second.status == 200
    assert json.loads(second.body)["target"] == "/echo?n=2"
    assert (third.status, third.body) == (201, b"status 201")


@pytest.mark.eventloop_only("SPEC promises Expect: 100-continue for the event loop")
def test_expect_100_continue_does_not_stall(plain: Balancer) -> None:
    """A client that waits for 100 Continue before its body gets it (or the final answer)
    at once, and the body then goes through."""
    size = 100_000
    with plain.raw(timeout=5.0) as client:
        client.send(
            b"POST /upload HTTP/1.1\r\nHost: example.test\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % size
        )
        first = client.read_head(timeout=1.0)
        if first.status != 100:  # a final answer instead: allowed, the body is not needed
            assert first.status >= 200
            return
        client.send(b"e" * size)
        final = client.read_response()
    assert final.status == 200
    assert json.loads(final.body)["body_length"] == size


# --------------------------------------------------------------------------- Upgrade


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[UpgradeEchoBackend]:
    with UpgradeEchoBackend() as server:
        yield server


@pytest.fixture(scope="module")
def tunnel(module_balancer: StartBalancer, echo_backend: UpgradeEchoBackend) -> Balancer:
    """A balancer in front of the echo backend, with the default timeouts."""
    return module_balancer({"servers": [echo_backend.url]})


@pytest.fixture(scope="module")
def short_tunnel(module_balancer: StartBalancer, echo_backend: UpgradeEchoBackend) -> Balancer:
    """The same with timeouts.tunnel 1s."""
    return module_balancer({"servers": [echo_backend.url], "timeouts": {"tunnel": "1s"}})


def open_tunnel(lb: Balancer) -> RawClient:
    """Connect, upgrade, read the backend's greeting; return the open RawClient."""
    client = lb.raw(timeout=5.0)
    try:
        client.send(UPGRADE_REQUEST)
        head = client.read_head()
        assert head.status == 101, head
        assert (head.header("Upgrade") or "").lower() == "websocket"
        greeting = UpgradeEchoBackend.greeting
        assert client.recv_exactly(len(greeting)) == greeting
    except BaseException:
        client.close()
        raise
    return client


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_websocket_upgrade_joins_both_ways(
    tunnel: Balancer, echo_backend: UpgradeEchoBackend
) -> None:
    """Upgrade and Connection: upgrade reach the backend; after its 101, bytes flow both ways
    unchanged; the client's close reaches the backend."""
    closed_before = echo_backend.tunnels_closed
    client = open_tunnel(tunnel)
    with client:
        for payload in (b"ping", bytes(range(256)) * 256):
            client.send(payload)
            assert client.recv_exactly(len(payload)) == payload
    head = echo_backend.heads[-1].decode("latin-1").lower()
    assert "\r\nupgrade: websocket\r\n" in head
    connection = [line for line in head.split("\r\n") if line.startswith("connection:")]
    assert connection and "upgrade" in connection[0]
    wait_for_tunnel_close(echo_backend, closed_before)


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_upgrade_on_a_new_connection_when_an_idle_one_is_pooled(
    tunnel: Balancer, echo_backend: UpgradeEchoBackend
) -> None:
    """A plain request first leaves an idle pooled connection to the backend: the upgrade
    request that follows (on a new client connection, so it is the first thing read there)
    still goes out with Upgrade and Connection: upgrade, gets the tunnel, and blames no one."""
    failures_before = tunnel.servers()[echo_backend.url]["failures"]
    assert tunnel.get("/plain")[::2] == (200, b"plain")
    closed_before = echo_backend.tunnels_closed
    with open_tunnel(tunnel) as client:
        client.send(b"ping")
        assert client.recv_exactly(4) == b"ping"
    head = echo_backend.heads[-1].decode("latin-1").lower()
    assert head.startswith("get /chat ") and "\r\nupgrade: websocket\r\n" in head
    wait_for_tunnel_close(echo_backend, closed_before)
    assert tunnel.servers()[echo_backend.url]["failures"] == failures_before


def wait_for_tunnel_close(echo_backend: UpgradeEchoBackend, closed_before: int) -> None:
    """Wait (2 s at most) until the backend saw one more tunnel end than ``closed_before``."""
    deadline = time.monotonic() + 2.0
    while echo_backend.tunnels_closed == closed_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert echo_backend.tunnels_closed > closed_before, "the backend's side stayed open"


H2C_UPGRADE = (
    b"POST /h2 HTTP/1.1\r\nHost: example.test\r\nUpgrade: h2c\r\n"
    b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ("length", b"hello"),
        ("chunked", b"hello"),
        ("length", bytes(range(256)) * 1200),  # above the read-ahead: streamed
        ("chunked", bytes(range(256)) * 1200),
        ("none", b""),
    ],
    ids=["length", "chunked", "length-streamed", "chunked-streamed", "bodiless"],
)
def test_upgrade_request_with_a_body_declined_by_the_backend(
    tunnel: Balancer, echo_backend: UpgradeEchoBackend, framing: str, body: bytes
) -> None:
    """An upgrade request with a body (h2c, which the backend declines with a 200): the body
    reaches the backend by its framing, with the request; the answer reaches the client; no
    one is blamed; and the connection goes on in HTTP/1.1 with the request pipelined after it
    (RFC 9110 §7.8, as nginx). A body held back for a 101 that never comes made the backend
    time out and be charged a failure (the hardening issue's "a client ejects backends")."""
    failures_before = tunnel.servers()[echo_backend.url]["failures"]
    if framing == "none":
        message = H2C_UPGRADE + b"\r\n"
    elif framing == "length":
        message = H2C_UPGRADE + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    else:
        half = len(body) // 2
        chunks = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (
            half, body[:half], len(body) - half, body[half:]
        )  # fmt: skip
        message = H2C_UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    with tunnel.raw(timeout=5.0) as client:
        client.send_in_background(message + b"GET /next HTTP/1.1\r\nHost: example.test\r\n\r\n")
        first = client.read_response()
        assert (first.status, first.body) == (200, b"declined: " + body)
        second = client.read_response()
        assert (second.status, second.body) == (200, b"plain")
    head = echo_backend.heads[-2].lower()
    assert head.startswith(b"post /h2 ") and b"\r\nupgrade: h2c\r\n" in head
    assert echo_backend.bodies[-2] == body
    assert echo_backend.heads[-1].lower().startswith(b"get /next ")
    assert tunnel.servers()[echo_backend.url]["failures"] == failures_before


WEBSOCKET_WITH_BODY = (
    b"POST /chat HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nContent-Length: 5\r\n\r\nhello"
)


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_upgrade_request_with_a_body_then_the_tunnel(
    tunnel: Balancer, echo_backend: UpgradeEchoBackend
) -> None:
    """An upgrade request with a body that the backend accepts: the backend reads the body by
    its framing, then answers 101, and the tunnel carries bytes both ways."""
    closed_before = echo_backend.tunnels_closed
    with tunnel.raw(timeout=5.0) as client:
        client.send(WEBSOCKET_WITH_BODY)
        head = client.read_head()
        assert head.status == 101, head
        greeting = UpgradeEchoBackend.greeting
        assert client.recv_exactly(len(greeting)) == greeting
        client.send(b"ping")
        assert client.recv_exactly(4) == b"ping"
    assert echo_backend.bodies[-1] == b"hello"
    wait_for_tunnel_close(echo_backend, closed_before)


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_bytes_before_the_101_after_an_upgrade_body_get_400(
    tunnel: Balancer, echo_backend: UpgradeEchoBackend
) -> None:
    """Bytes a client sends right after an upgrade request with a body, before the 101, are
    read as the next request and cannot be tunnelled byte for byte: 400 and the connection
    closed, with no failure charged to the backend that accepted."""
    failures_before = tunnel.servers()[echo_backend.url]["failures"]
    with tunnel.raw(timeout=5.0) as client:
        client.send(WEBSOCKET_WITH_BODY + b"early")
        response = client.read_response()
        assert response.status == 400, response
        assert b"before the 101" in response.body
        client.wait_closed(timeout=2.0)
    assert echo_backend.bodies[-1] == b"hello"
    assert tunnel.servers()[echo_backend.url]["failures"] == failures_before


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_declined_upgrade_request_does_not_leave_its_backend_connection_pooled(
    tunnel: Balancer, echo_backend: UpgradeEchoBackend
) -> None:
    """After a declined upgrade request with a body, the next request goes on a new backend
    connection: a backend whose parser skipped the upgrade request's body would read it as
    the next request."""
    with tunnel.raw(timeout=5.0) as client:
        client.send(H2C_UPGRADE + b"Content-Length: 5\r\n\r\nhello")
        assert client.read_response().body == b"declined: hello"
        client.send(b"GET /after HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert client.read_response().body == b"plain"
    assert echo_backend.heads[-1].lower().startswith(b"get /after ")
    assert echo_backend.connections[-1] != echo_backend.connections[-2]


@pytest.fixture(scope="module")
def early_backend() -> Iterator[UpgradeEchoBackend]:
    """Answers 101 as soon as an upgrade request's head is in; declines h2c after 0.6 s."""
    with UpgradeEchoBackend(early_101=True, decline_after=0.6) as server:
        yield server


@pytest.fixture(scope="module")
def early(module_balancer: StartBalancer, early_backend: UpgradeEchoBackend) -> Balancer:
    return module_balancer({"servers": [early_backend.url]})


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_101_before_a_streamed_body_ends_passes_the_rest_through(
    early: Balancer, early_backend: UpgradeEchoBackend
) -> None:
    """A backend may answer 101 before a (streamed, Content-Length) body has ended: the rest
    of the body goes through the tunnel byte for byte, then the new protocol's bytes; the
    backend is not blamed. (The client decides when its body ends: blaming the backend let
    a client eject WebSocket backends.)"""
    failures_before = early.servers()[early_backend.url]["failures"]
    body = bytes(range(256)) * 800  # 200 KiB: above the read-ahead, streamed
    head = (
        b"POST /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with early.raw(timeout=5.0) as client:
        client.send(head + body[:70_000])
        answer = client.read_head()
        assert answer.status == 101, answer
        greeting = UpgradeEchoBackend.greeting
        assert client.recv_exactly(len(greeting)) == greeting
        client.send(body[70_000:] + b"ping")
        assert client.recv_exactly(len(body) + 4) == body + b"ping"
    assert early.servers()[early_backend.url]["failures"] == failures_before


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_101_in_a_streamed_chunked_body_is_502_and_blames_no_one(
    early: Balancer, early_backend: UpgradeEchoBackend
) -> None:
    """The same with a chunked body: the proxy sent it in chunks of its own making, which the
    client's cannot continue, so the client gets 502, and no failure is counted."""
    failures_before = early.servers()[early_backend.url]["failures"]
    head = (
        b"POST /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with early.raw(timeout=5.0) as client:
        client.send(head + b"%x\r\n%b\r\n" % (70_000, b"x" * 70_000))
        response = client.read_response()
        assert response.status == 502, response
        assert b"chunked" in response.body
    assert early.servers()[early_backend.url]["failures"] == failures_before


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_pipelined_requests_around_a_declined_upgrade_stay_in_order(
    early: Balancer, early_backend: UpgradeEchoBackend
) -> None:
    """A, a bodiless upgrade request the backend declines after 0.6 s, and B in one send,
    then C 0.3 s later: four answers in that order. (The upgrade request's tail, B, must be
    read before C: reading went on after A's answer and lost B.)"""
    first = (
        b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n"
        + H2C_UPGRADE
        + b"\r\nGET /b HTTP/1.1\r\nHost: example.test\r\n\r\n"
    )
    with early.raw(timeout=5.0) as client:
        client.send(first)
        time.sleep(0.3)
        client.send(b"GET /c HTTP/1.1\r\nHost: example.test\r\n\r\n")
        bodies = [client.read_response().body for _ in range(4)]
    assert bodies == [b"plain", b"declined: ", b"plain", b"plain"]
    targets = [head.split(b" ")[1] for head in early_backend.heads[-4:]]
    assert targets == [b"/a", b"/h2", b"/b", b"/c"]


@pytest.mark.eventloop_only("the threaded engine cannot hand over a socket: it drops Upgrade")
def test_idle_tunnel_closed_after_timeouts_tunnel(
    short_tunnel: Balancer, echo_backend: UpgradeEchoBackend
) -> None:
    """A tunnel idle for timeouts.tunnel (1s) is closed, on the backend's side too."""
    closed_before = echo_backend.tunnels_closed
    client = open_tunnel(short_tunnel)
    with client:
        started = time.monotonic()
        client.wait_closed(timeout=4.0)
        elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 4.0
    wait_for_tunnel_close(echo_backend, closed_before)


def test_request_line_above_max_header_bytes_gets_431(
    limited: Balancer, backend: TestBackend
) -> None:
    """A request line alone above limits.max_header_bytes: 431 on both engines, as SPEC §2
    counts it with the head (gunicorn's parser said 414 under the threads engine)."""
    with limited.raw(timeout=3.0) as client:
        client.send(b"GET /%b HTTP/1.1\r\nHost: example.test\r\n\r\n" % (b"t" * 5000))
        response = client.read_response()
    assert (response.status, response.reason) == (431, "Request Header Fields Too Large")
    assert b"<html" not in response.body.lower()
    assert not any(seen.target.startswith("/ttt") for seen in backend.requests)


def test_max_connections_leaves_more_clients_in_the_backlog(
    balancer: StartBalancer, backend: TestBackend
) -> None:
    """limits.max_connections 2, on both engines: two clients held by a 1 s answer are
    served at once; a third waits in the kernel's backlog until one of them is done, then
    is served (never refused)."""
    lb = balancer({"servers": [backend.url], "limits": {"max_connections": 2}})
    started = time.monotonic()
    finished: dict[int, float] = {}

    def client(n: int) -> None:
        with lb.raw(timeout=10.0) as raw:
            raw.send(b"GET /slow/1 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            assert raw.read_response().status == 200
        finished[n] = time.monotonic() - started

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(15)
    assert sorted(finished) == [0, 1, 2]
    assert finished[0] < 1.8 and finished[1] < 1.8
    assert finished[2] >= 1.8, finished
