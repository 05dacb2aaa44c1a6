"""A backend's answer is delimited by its own framing, and only by it (SPEC §3: the answer
goes back unchanged), on both engines: bytes after a whole answer never join it, and an
answer whose end is the connection's end is cut, not complete, when the connection is reset."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tests.engine.conftest import StartBalancer
from tests.helpers.raw_backend import RawBackend

pytestmark = pytest.mark.integration

#: An answer and, in the same send, a second one nobody asked for: what a backend sends that
#: answered early and then took the request's unread body for a next request.
TWO_ANSWERS = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nerror"
    b"HTTP/1.1 200 OK\r\nX-Second: yes\r\nContent-Length: 7\r\n\r\nsuccess"
)
#: A whole answer followed by bytes that are no answer at all.
ANSWER_AND_JUNK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\x00junk\r\n"


@pytest.mark.parametrize(
    ("sent", "status", "reason", "body"),
    [
        (TWO_ANSWERS, 500, "Internal Server Error", b"error"),
        (ANSWER_AND_JUNK, 200, "OK", b"ok"),
    ],
    ids=["a-second-answer", "junk"],
)
def test_bytes_after_a_whole_answer_are_not_part_of_it(
    balancer: StartBalancer, sent: bytes, status: int, reason: str, body: bytes
) -> None:
    """The client gets the first answer exactly as its Content-Length delimits it (never
    the second one's status, a joined reason or joined bodies, never a 502), the backend is
    not charged, and the connection that carried the extra bytes is not used again."""
    with RawBackend([sent]) as raw:
        lb = balancer({"servers": [raw.url], "retries": 0})
        for n in range(2):
            with lb.raw(timeout=5.0) as client:
                client.send(b"GET /x%d HTTP/1.1\r\nHost: example.test\r\n\r\n" % n)
                response = client.read_response()
            assert (response.status, response.reason, response.body) == (status, reason, body)
            assert response.header("X-Second") is None
        assert lb.servers()[raw.url]["failures"] == 0
        assert raw.connections == 2, "a connection with bytes after its answer was reused"


def _reset_mid_body(sock: socket.socket) -> None:
    """An answer delimited by the connection's end: its head, part of its body, then a
    reset (RST) instead of the end."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst half, ")
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _end_after_body(sock: socket.socket) -> None:
    """The same answer, ended properly: the backend closes after the whole body."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe whole body")
    sock.shutdown(socket.SHUT_WR)


def test_reset_during_a_close_delimited_answer_is_a_cut_answer(balancer: StartBalancer) -> None:
    """A reset ends a body delimited by the connection's end too early: the client's
    connection is closed without the chunked answer's last chunk, so it sees the answer cut
    (SPEC §3), and the backend is charged. A close after the body ends the answer well."""
    with RawBackend([_reset_mid_body, _end_after_body]) as raw:
        lb = balancer({"servers": [raw.url], "retries": 0})
        with lb.raw(timeout=5.0) as client:
            client.send(b"GET /cut HTTP/1.1\r\nHost: example.test\r\n\r\n")
            head = client.read_head()
            rest = client.wait_closed(timeout=5.0)
        assert head.status == 200
        assert (head.header("Transfer-Encoding") or "").lower() == "chunked"
        assert b"first half" in rest
        assert not rest.endswith(b"0\r\n\r\n"), rest
        assert lb.servers()[raw.url]["failures"] == 1
        with lb.raw(timeout=5.0) as client:
            client.send(b"GET /whole HTTP/1.1\r\nHost: example.test\r\n\r\n")
            whole = client.read_response()
        assert (whole.status, whole.body) == (200, b"the whole body")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n\x1f\x8bgz",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n\x1f\x8b\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["gzip", "gzip-chunked", "length-and-chunked"],
)
def test_an_answer_framed_past_chunked_alone_is_a_502(
    balancer: StartBalancer, answer: bytes
) -> None:
    """A Transfer-Encoding other than chunked alone cannot be relayed as it stands (the
    field is per hop: dropped, it would hand the client coded bytes unlabelled), and one
    with a Content-Length beside it "ought to be handled as an error" (RFC 9112 §6.3):
    a 502 on both engines, as nginx answers, never the body."""
    with RawBackend([answer]) as raw:
        lb = balancer({"servers": [raw.url], "retries": 0})
        with lb.raw(timeout=5.0) as client:
            client.send(b"GET /coded HTTP/1.1\r\nHost: example.test\r\n\r\n")
            response = client.read_response()
        assert response.status == 502, response
        assert b"\x1f\x8b" not in response.body and b"ok" not in response.body
