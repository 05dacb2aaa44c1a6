"""The admin API under a client's bad framing and ``Expect: 100-continue`` (SPEC §3 and §5), on
both engines: the proxy's framing rules hold for admin writes too, the error is JSON, the
connection is closed, and nothing changes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.engine.conftest import Balancer, StartBalancer
from tests.helpers.servers import TestBackend

pytestmark = pytest.mark.integration

#: The backend the refused writes below try to add.
NEWCOMER = "http://127.0.0.1:9"
BODY = json.dumps({"url": NEWCOMER}).encode()


def _chunked_write(path: bytes, coding: bytes, chunks: bytes) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: " + coding + b"\r\n\r\n" + chunks
    )


#: A whole, well-formed chunked body of BODY.
GOOD_CHUNKS = b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
#: A chunk size that is not hexadecimal.
BAD_CHUNKS = b"zz\r\n" + BODY + b"\r\n0\r\n\r\n"


@pytest.fixture(scope="module")
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


@pytest.fixture(scope="module")
def shared(module_balancer: StartBalancer, backend: TestBackend) -> Balancer:
    return module_balancer({"servers": [backend.url]})


@pytest.mark.parametrize("path", [b"/_softlb/servers", b"/upload_server"])
@pytest.mark.parametrize(
    ("coding", "chunks", "status"),
    [
        (b"gzip, chunked", GOOD_CHUNKS, 501),
        (b"chunked, chunked", GOOD_CHUNKS, 501),
        (b"chunked", BAD_CHUNKS, 400),
    ],
    ids=["gzip-chunked", "chunked-twice", "bad-chunk-size"],
)
def test_badly_framed_admin_write_is_refused_in_json(
    shared: Balancer,
    backend: TestBackend,
    engine: str,
    path: bytes,
    coding: bytes,
    chunks: bytes,
    status: int,
) -> None:
    """A write whose framing the proxy would refuse gets the same status on the admin API,
    as a JSON error (never a 500, never a traceback), the connection closes, and the backend
    is not added. (gunicorn's own parser refuses ``chunked, chunked`` before the app sees
    it: the threads engine's answer is then its plain-text one.)"""
    with shared.raw(timeout=5.0) as client:
        client.send(_chunked_write(path, coding, chunks))
        response = client.read_response()
        client.wait_closed(timeout=3.0)
    assert response.status == status, response.body
    if not (engine == "threads" and coding == b"chunked, chunked"):
        assert (response.header("Content-Type") or "").startswith("application/json")
        assert "error" in json.loads(response.body)
    assert NEWCOMER not in shared.servers()
    assert list(shared.servers()) == [backend.url]


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "chunked, chunked", "identity"])
def test_every_coding_but_chunked_alone_is_501_when_proxied(
    shared: Balancer, backend: TestBackend, coding: str
) -> None:
    """SPEC §3: anything but ``chunked`` alone gets 501 (gunicorn's own parser says 400 for
    codings that do not end in chunked; the threads engine answers 501 as the event loop
    does), with the status's own reason phrase, and nothing reaches the backend."""
    before = backend.request_count
    with shared.raw(timeout=5.0) as client:
        client.send(_chunked_write(b"/upload", coding.encode(), GOOD_CHUNKS))
        response = client.read_response()
        client.wait_closed(timeout=3.0)
    assert (response.status, response.reason) == (501, "Not Implemented")
    assert backend.request_count == before
    assert shared.servers()[backend.url]["failures"] == 0


@pytest.mark.parametrize("path", [b"/_softlb/servers", b"/upload_server"])
def test_admin_write_with_expect_100_continue_gets_the_interim_answer(
    balancer: StartBalancer, backend: TestBackend, path: bytes
) -> None:
    """A client that waits for ``100 Continue`` before sending its body (curl does, for a
    second) gets it at once from the admin API too, then its 201."""
    lb = balancer({"servers": [backend.url]})
    with lb.raw(timeout=5.0) as client:
        client.send(
            b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)
        )
        interim = client.read_head(timeout=0.5)  # the body is not sent until it comes
        client.send(BODY)
        final = client.read_response()
    assert interim.status == 100
    assert final.status == 201, final.body
    assert NEWCOMER in lb.servers()
