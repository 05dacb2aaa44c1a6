"""Slow and idle clients cost memory, not service (SPEC §3): the worker's resident memory
(/proc) under 1,000 idle keep-alive connections and under a slow reader of a 50 MB answer."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.engine.conftest import Balancer, StartBalancer
from tests.helpers.hostile import IdleClients
from tests.helpers.raw_backend import RawBackend
from tests.helpers.servers import TestBackend

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB

#: How much a worker may grow: SPEC's "about 1 MiB per connection" for one slow reader, with
#: room for the allocator; 1,000 idle connections must cost well under this in all.
RSS_BUDGET_KIB = 10 * KiB

GET = b"GET /idle HTTP/1.1\r\nHost: example.test\r\n\r\n"

#: A whole answer in one send. TestBackend sends head and body apart, and on a reused
#: connection Nagle's algorithm on its side meets the proxy's delayed ACK: 40 ms a request.
ONE_SEND_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def backend() -> Iterator[TestBackend]:
    with TestBackend() as server:
        yield server


def warm_up(lb: Balancer, count: int = 20) -> None:
    """A few requests first, so that what is measured is growth, not the first use."""
    for n in range(count):
        assert lb.get(f"/warm-{n}")[0] == 200


def timed_get(lb: Balancer) -> float:
    started = time.monotonic()
    status, _, _ = lb.get("/timed", timeout=2.0)
    assert status == 200
    return time.monotonic() - started


@pytest.mark.eventloop_only("a threaded worker cannot hold 1,000 idle connections")
def test_1000_idle_keepalive_connections_cost_little(balancer: StartBalancer) -> None:
    """1,000 keep-alive connections, each after one request, left idle: the worker grows by
    well under 10 MiB, and a new request is still answered at once."""
    with RawBackend([ONE_SEND_ANSWER]) as quick:
        lb = balancer({"servers": [quick.url]})
        warm_up(lb)
        before = lb.rss_kib()
        started = time.monotonic()
        with IdleClients(lb.port, 1000, GET, answered=True) as idle:
            opened = time.monotonic() - started
            assert [response.status for response in idle.responses] == [200] * 1000
            growth = lb.rss_kib() - before
            print(f"worker RSS growth: {growth} KiB; 1,000 requests in {opened:.1f} s")  # -rP
            assert growth < RSS_BUDGET_KIB, f"worker grew {growth} KiB for 1,000 idle clients"
            assert timed_get(lb) < 0.2
            first = idle.clients[0]  # still open, still usable
            first.send(GET)
            assert first.read_response().status == 200


def test_slow_reader_of_a_big_answer_does_not_grow_the_worker(
    balancer: StartBalancer, backend: TestBackend
) -> None:
    """A client reading a 50 MB answer 64 KiB every 10 ms: the worker holds back instead of
    buffering, growing by less than 10 MiB, and serves others meanwhile."""
    lb = balancer({"servers": [backend.url]})
    warm_up(lb, 5)
    before = lb.rss_kib()
    size = 50 * 1000 * 1000
    with lb.raw(timeout=5.0, rcvbuf=64 * KiB) as client:
        client.send(b"GET /big/%d HTTP/1.1\r\nHost: example.test\r\n\r\n" % size)
        head = client.read_head()
        assert head.status == 200
        read = client.drain_slowly(64 * KiB, 0.01, 1.5)
        growth = lb.rss_kib() - before
        print(f"worker RSS growth: {growth} KiB")  # shown with -rP
        assert MiB < read < size // 2, f"read {read} bytes: not a slow read"
        assert growth < RSS_BUDGET_KIB, f"worker grew {growth} KiB for one slow reader"
        assert timed_get(lb) < 0.5
    assert lb.get("/after")[0] == 200
