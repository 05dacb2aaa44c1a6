"""softlb.gthread's head deadlines on real socket pairs (the engine-level tests run them under
``softlb serve --engine threads``: tests/engine/test_eventloop.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from softlb.gthread import HeadDeadlines


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the server's side, the client's side) of one connection."""
    server, client = socket.socketpair()
    client.settimeout(2.0)
    yield server, client
    server.close()
    client.close()


def conn(sock: socket.socket, *, initialized: bool = True) -> SimpleNamespace:
    """What HeadDeadlines reads of gunicorn's TConn."""
    return SimpleNamespace(sock=sock, initialized=initialized)


def test_a_head_past_its_deadline_gets_408_and_the_shutdown(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    deadlines = HeadDeadlines(0.2)
    watched = conn(server)
    deadlines.watch(watched)
    assert deadlines.expire(time.monotonic()) == 0  # not yet
    assert deadlines.expire(time.monotonic() + 0.3) == 1
    answer = b""
    while chunk := client.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b"\r\n\r\n408 Request Timeout: the request head took too long\n")
    assert server.recv(10) == b""  # the reading side is shut: a blocked read wakes
    assert deadlines.done(watched) is False  # its thread then learns it was timed out


@pytest.mark.parametrize("case", ["nothing sent", "tls"])
def test_a_connection_that_sent_nothing_or_speaks_tls_is_closed_without_a_word(
    pair: tuple[socket.socket, socket.socket], case: str
) -> None:
    server, client = pair
    if case == "tls":  # no plain-text answer on a TLS connection
        deadlines, watched = HeadDeadlines(0.2, tls=True), conn(server)
    else:  # gunicorn's thread was still waiting for the first byte
        deadlines, watched = HeadDeadlines(0.2), conn(server, initialized=False)
    deadlines.watch(watched)
    assert deadlines.expire(time.monotonic() + 1) == 1
    assert client.recv(4096) == b""


def test_a_head_done_in_time_is_left_alone(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    deadlines = HeadDeadlines(0.2)
    for settle in ("done", "done_socket"):
        watched = conn(server)
        deadlines.watch(watched)
        if settle == "done":
            assert deadlines.done(watched) is True
        else:
            deadlines.done_socket(server)
        assert deadlines.expire(time.monotonic() + 1) == 0
    server.sendall(b"still open")
    assert client.recv(100) == b"still open"


def test_the_deadline_counts_from_the_queue_but_leaves_one_interval(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A connection that waited for a thread past the deadline is still given one interval
    (its head may be whole in the socket); one that did not wait gets the whole timeout."""
    server, _ = pair
    deadlines = HeadDeadlines(1.0)
    waited = conn(server)
    deadlines.queued(waited)
    waited._softlb_since -= 5.0  # queued 5 s ago
    now = time.monotonic()
    deadlines.watch(waited)
    assert deadlines.expire(now + deadlines.interval / 2) == 0
    assert deadlines.expire(now + deadlines.interval + 0.05) == 1
    fresh = conn(server)
    deadlines.queued(fresh)
    deadlines.watch(fresh)
    assert deadlines.expire(time.monotonic() + 0.8) == 0
    assert deadlines.expire(time.monotonic() + 1.1) == 1
