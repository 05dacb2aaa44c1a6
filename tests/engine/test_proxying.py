"""Proxying basics (SPEC §3) on both engines, asserted on what the client got and what the
backend saw."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import pytest

from tests.engine.conftest import Balancer, StartBalancer
from tests.helpers.hostile import EarlyAnswerBackend, reset_step
from tests.helpers.raw_backend import RawBackend
from tests.helpers.servers import (
    COOKIES,
    RefusingURL,
    TestBackend,
    body_chunks,
    body_sha256,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

#: Percent-encoding that a normalizing proxy would touch: an encoded slash, a bad escape.
RAW_TARGET = "/a%2fb?x=%zz"


@pytest.fixture(scope="module")
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


@pytest.fixture(scope="module")
def shared(module_balancer: StartBalancer, backend: TestBackend) -> Balancer:
    """One balancer per engine in front of ``backend``, for the tests that only send requests."""
    return module_balancer({"servers": [backend.url], "timeouts": {"read": "500ms"}})


def assert_short_error(body: bytes) -> None:
    """An error body that says why, without a traceback or a server's HTML page."""
    assert body.strip(), "empty error body"
    assert b"Traceback" not in body
    assert b"<html" not in body.lower()


@pytest.mark.parametrize("method", ["GET", "PURGE", "BREW", "MKWORKSPACE", "X-SYNC_2"])
def test_method_and_target_reach_the_backend_byte_for_byte(
    shared: Balancer, backend: TestBackend, method: str
) -> None:
    """Any method, and a target with %2f and a bad escape, arrive unchanged."""
    status, _, _ = shared.request(method, RAW_TARGET)
    assert status == 200
    assert (backend.last.method, backend.last.target) == (method, RAW_TARGET)


def test_extension_method_with_a_body_then_another_request_on_the_connection(
    shared: Balancer, backend: TestBackend
) -> None:
    """A method llhttp does not know carries its body to the backend, and the connection goes
    on parsing the next request as usual (the event loop re-parses it with a stand-in)."""
    with shared.raw(timeout=5.0) as client:
        client.send(b"BREW /pot HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert client.read_response().status == 200
        assert (backend.last.method, backend.last.target, backend.last.body) == (
            "BREW", "/pot", b"hello"
        )  # fmt: skip
        client.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.read_response().status == 200
        assert (backend.last.method, backend.last.target) == ("GET", "/after")
        for piece in (b"BR", b"EW /split HTTP/1.1\r\nHost: x\r\n\r\n"):  # a method cut in two
            client.send(piece)
            time.sleep(0.05)
        assert client.read_response().status == 200
        assert (backend.last.method, backend.last.target) == ("BREW", "/split")


@pytest.mark.parametrize("line", [b"brew / HTTP/1.1", b"BR\x01W / HTTP/1.1", b"XY / HTTP/1.1"])
def test_a_method_that_is_not_a_conventional_token_is_a_400(
    shared: Balancer, backend: TestBackend, line: bytes
) -> None:
    """Lower case, a control byte, or fewer than 3 characters: 400 on both engines (gunicorn's
    rule for methods), and nothing reaches the backend."""
    before = backend.request_count
    with shared.raw(timeout=5.0) as client:
        client.send(line + b"\r\nHost: x\r\n\r\n")
        assert client.read_response().status == 400
    assert backend.request_count == before


def test_host_kept_and_forwarded_headers_set(shared: Balancer, backend: TestBackend) -> None:
    """Host is kept; X-Forwarded-For gets the client appended; -Proto and -Host are replaced."""
    status, _, _ = shared.get(
        "/echo",
        headers={
            "Host": "site.example:8443",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
        },
    )
    assert status == 200
    seen = backend.last
    assert seen.header_values("Host") == ["site.example:8443"]
    chain = [
        hop.strip() for value in seen.header_values("X-Forwarded-For") for hop in value.split(",")
    ]
    assert chain == ["203.0.113.7", "127.0.0.1"]
    assert seen.header_values("X-Forwarded-Proto") == ["http"]
    assert seen.header_values("X-Forwarded-Host") == ["site.example:8443"]


def test_underscored_forwarded_lookalikes_are_dropped(
    shared: Balancer, backend: TestBackend
) -> None:
    """``X_Forwarded_For`` and the like (``_`` for a dash) never reach the backend: WSGI and
    CGI servers read them as the X-Forwarded-* fields the proxy set, so a client could forge
    its address past the proxy (nginx drops names with ``_`` by default)."""
    status, _, _ = shared.get(
        "/echo",
        headers={
            "X_Forwarded_For": "198.51.100.1",
            "x-forwarded_proto": "https",
            "X_Forwarded-Host": "evil.example",
            "X_Custom_Field": "kept",
        },
    )
    assert status == 200
    names = {name.lower().replace("_", "-"): name for name, _ in backend.last.headers}
    assert names["x-forwarded-for"] == "X-Forwarded-For"
    assert names["x-forwarded-proto"] == "X-Forwarded-Proto"
    assert names["x-forwarded-host"] == "X-Forwarded-Host"
    assert backend.last.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert all("198.51.100.1" not in value for _, value in backend.last.headers)


def test_hop_by_hop_request_headers_removed(shared: Balancer, backend: TestBackend) -> None:
    """Connection, the headers it names, and the other hop-by-hop headers stop at the proxy."""
    status, _, _ = shared.get(
        "/echo",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "Trailer": "X-T",
            "X-Keep-Me": "yes",
        },
    )
    assert status == 200
    seen = backend.last
    for name in (
        "X-Drop-Me",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Proxy-Authorization",
        "Trailer",
    ):
        assert not seen.has_header(name), (name, seen.headers)
    assert "x-drop-me" not in (seen.header("Connection") or "").lower()
    assert seen.header("X-Keep-Me") == "yes"


def test_hop_by_hop_response_headers_removed(shared: Balancer) -> None:
    """The backend's hop-by-hop headers (and the one its Connection names) do not reach the
    client; the others do."""
    status, headers, body = shared.get("/hop")
    assert (status, body) == (200, b"hop")
    for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert headers.get(name) is None, (name, headers.items())
    assert "x-private" not in (headers.get("Connection") or "").lower()
    assert headers.get("X-Public") == "yes"


def test_repeated_set_cookie_kept(shared: Balancer) -> None:
    """Two Set-Cookie headers stay two headers, in order."""
    status, headers, _ = shared.get("/cookies")
    assert status == 200
    assert headers.get_all("Set-Cookie") == list(COOKIES)


def test_chunked_upload(shared: Balancer) -> None:
    """A chunked request body of 1 MiB reaches the backend whole."""
    status, _, body = shared.request("POST", "/upload", body=body_chunks(MiB), encode_chunked=True)
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["body_length"], seen["body_sha256"]) == (MiB, body_sha256(MiB))


def test_download_2_mib(shared: Balancer) -> None:
    """A 2 MiB answer arrives whole."""
    status, _, body = shared.get(f"/big/{2 * MiB}")
    assert status == 200
    assert len(body) == 2 * MiB
    assert hashlib.sha256(body).hexdigest() == body_sha256(2 * MiB)


@pytest.mark.parametrize(
    ("method", "target", "code"),
    [("HEAD", "/big/1000", 200), ("GET", "/status/204", 204), ("GET", "/status/304", 304)],
    ids=["HEAD", "204", "304"],
)
def test_answers_without_a_body(shared: Balancer, method: str, target: str, code: int) -> None:
    """HEAD, 204 and 304 carry no body: the next answer on the connection is parsed cleanly."""
    conn = shared.connection()
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (code, b"")
        if method == "HEAD":
            assert resp.headers.get("Content-Length") == "1000"
        conn.request("GET", "/after")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read().startswith(b"ok from")
    finally:
        conn.close()


def test_threaded_engine_drops_upgrade(shared: Balancer, backend: TestBackend) -> None:
    """The threaded engine cannot hand over a socket: Upgrade and Connection: upgrade are
    dropped as hop-by-hop, and the request is served as a plain one."""
    if shared.engine != "threads":
        pytest.skip("the event loop forwards Upgrade (test_eventloop.py)")
    status, _, _ = shared.get("/echo", headers={"Connection": "Upgrade", "Upgrade": "h2c"})
    assert status == 200
    assert not backend.last.has_header("Upgrade")
    assert "upgrade" not in (backend.last.header("Connection") or "").lower()


def test_answer_broken_after_its_head_closes_the_client_connection(shared: Balancer) -> None:
    """A backend that dies mid-body after the head went out: the client connection is
    closed short of the announced length, never followed by a second status."""
    with shared.raw(timeout=5.0) as client:
        client.send(b"GET /reset-mid-body HTTP/1.1\r\nHost: example.test\r\n\r\n")
        head = client.read_head()
        assert head.status == 200
        rest = client.wait_closed(timeout=4.0)
    assert len(rest) < int(head.header("Content-Length") or 0)
    assert b"HTTP/1.1" not in rest


# --------------------------------------------------------------------------- errors


def test_503_without_backends(balancer: StartBalancer) -> None:
    """No backend at all: 503 with a short body that says why."""
    lb = balancer({"servers": []})
    status, _, body = lb.get("/x")
    assert status == 503
    assert_short_error(body)


def test_502_when_every_backend_refuses(balancer: StartBalancer) -> None:
    """Two backends that refuse connections: 502."""
    lb = balancer({"servers": [RefusingURL(), RefusingURL()]})
    status, _, body = lb.get("/x")
    assert status == 502
    assert_short_error(body)


def test_504_when_the_backend_is_slower_than_timeouts_read(
    balancer: StartBalancer, backend: TestBackend
) -> None:
    """A backend that takes 3 s against timeouts.read 500ms: 504 long before 3 s."""
    lb = balancer({"servers": [backend.url], "timeouts": {"read": "500ms"}})
    started = time.monotonic()
    status, _, body = lb.get("/slow/3")
    elapsed = time.monotonic() - started
    assert status == 504
    assert_short_error(body)
    assert elapsed < 2.5


def test_get_retried_after_a_reset(balancer: StartBalancer, backend: TestBackend) -> None:
    """GETs that meet a backend resetting the connection are retried on the other one."""
    with RawBackend([reset_step]) as resetting:
        lb = balancer({"servers": [resetting.url, backend.url], "algorithm": "round_robin"})
        before = backend.request_count
        answers = [lb.get(f"/retry-{n}")[0] for n in range(4)]
        assert answers == [200] * 4
        assert len(resetting.requests) >= 1
        assert backend.request_count - before == 4


def test_post_not_retried_after_a_reset(balancer: StartBalancer, backend: TestBackend) -> None:
    """A POST whose backend resets after receiving it is not sent again: 502, and the other
    backend never sees it."""
    with RawBackend([reset_step]) as resetting:
        lb = balancer({"servers": [resetting.url, backend.url], "algorithm": "round_robin"})
        before = backend.request_count
        statuses = []
        for n in range(4):
            status, _, body = lb.request("POST", f"/post-{n}", body=b"once")
            statuses.append(status)
            if status != 200:
                assert_short_error(body)
                break
        assert statuses[-1] == 502, statuses
        assert len(resetting.requests) == 1
        assert backend.request_count - before == statuses.count(200)


def test_early_answer_passed_to_the_client(balancer: StartBalancer) -> None:
    """A backend that answers 413 before reading a 4 MiB upload: the client gets the 413 at
    once, and it is not a backend failure."""
    with EarlyAnswerBackend() as early:
        lb = balancer({"servers": [early.url], "timeouts": {"read": "10s"}})
        size = 4 * MiB
        with lb.raw(timeout=3.0) as client:
            client.send(
                b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size
            )
            client.send_in_background(b"x" * size)
            response = client.read_response(timeout=3.0)
        assert (response.status, response.body) == (413, b"body too large")
        assert lb.servers()[early.url]["failures"] == 0


@pytest.mark.parametrize("value", [b"close", b"close, TE", b"TE, Close", b"x-trace,close"])
def test_connection_close_among_other_tokens_closes_after_the_answer(
    shared: Balancer, backend: TestBackend, value: bytes
) -> None:
    """``close`` is a token of Connection (RFC 9112 §9.6): with other tokens beside it, the
    answer is still the connection's last, on both engines."""
    with shared.raw(timeout=5.0) as client:
        client.send(
            b"GET /closing HTTP/1.1\r\nHost: example.test\r\nConnection: %b\r\n\r\n" % value
        )
        assert client.read_response().status == 200
        assert client.wait_closed(timeout=3.0) == b""
    assert backend.last.target == "/closing"
