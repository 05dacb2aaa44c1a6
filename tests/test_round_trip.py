"""The one loop of tries (:class:`softlb.retry.Attempts`) and its blocking driver
(:func:`softlb.http.transport.round_trip`), against real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator

import pytest

from softlb.client import RetryBudget
from softlb.errors import NoBackendAvailable, QueueTimeout, UpstreamBroken, UpstreamConnectError
from softlb.http.transport import Exchange, SchemeRouter, UpstreamRequest, round_trip
from softlb.http.wire import ProxyUpstream
from softlb.pool import Lease, Pool, PoolEvent
from softlb.retry import Attempts, ClientAbort, may_resend
from tests.helpers.hostile import reset_step
from tests.helpers.raw_backend import RawBackend
from tests.helpers.servers import RefusingURL, TestBackend


class Body:
    """A request body as round_trip wants it: bytes, replayable."""

    def __init__(self, data: bytes | None = None, *, replayable: bool = True) -> None:
        self.data = data
        self._replayable = replayable

    @property
    def replayable(self) -> bool:
        return self._replayable

    def source(self) -> bytes | Iterable[bytes] | None:
        return self.data


def cut_short_step(sock: object) -> None:
    """RawBackend script step: promise 10 bytes of body, send 3, close."""
    import socket

    assert isinstance(sock, socket.socket)
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    sock.close()


@pytest.fixture
def transport() -> Iterator[ProxyUpstream]:
    upstream = ProxyUpstream(connect_timeout=1.0, read_timeout=2.0, maxsize=4)
    yield upstream
    upstream.close()


def attempts_for(pool: Pool, method: str = "GET", **kw: object) -> Attempts:
    return Attempts(
        pool,
        method=method,
        target="/x",
        resend=may_resend(method, False),
        retries=kw.pop("retries", 2),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def read_whole(exchange: Exchange) -> tuple[int, bytes]:
    data = exchange.response.read_small()
    exchange.close(complete=True)
    return exchange.response.status, data


def test_fails_over_from_a_refused_backend_and_owns_nothing_after(
    transport: ProxyUpstream, refused_url: str, backend: TestBackend
) -> None:
    """A refused connection is tried elsewhere; the failure is recorded on the refused
    backend, published as ``retried``, and both leases end."""
    pool = Pool([refused_url, backend.url], balancer="round_robin")
    retried: list[str] = []
    pool.subscribe(lambda e: retried.append(e.url or ""), ("retried",))
    attempts = attempts_for(pool)
    status, body = round_trip(
        attempts, transport, UpstreamRequest("GET", "/x", {"Host": "h"}), Body(), read_whole
    )
    assert status == 200
    assert body
    assert [b.url for b in attempts.tried] == [refused_url]
    assert retried == [refused_url]
    refused, good = pool.get(refused_url), pool.get(backend.url)
    assert (refused.failures, refused.active, good.requests, good.active) == (1, 0, 1, 0)


def test_a_post_that_reached_a_resetting_backend_is_not_sent_again(
    transport: ProxyUpstream, backend: TestBackend
) -> None:
    """A POST whose connection broke after it was sent is not retried: the last failure is
    raised, and the other backend never sees it."""
    with RawBackend([reset_step]) as resetting:
        pool = Pool([resetting.url, backend.url], balancer="round_robin")
        attempts = attempts_for(pool, "POST")
        with pytest.raises(UpstreamBroken):
            round_trip(
                attempts,
                transport,
                UpstreamRequest("POST", "/x", {"Host": "h"}),
                Body(b"once"),
                read_whole,
            )
        assert backend.request_count == 0
        assert pool.get(resetting.url).failures == 1
        assert attempts.next() is None  # stopped: nothing more is tried


def test_nothing_to_try_raises_no_backend(transport: ProxyUpstream) -> None:
    """An empty pool: NoBackendAvailable, and nothing was tried."""
    attempts = attempts_for(Pool([]))
    with pytest.raises(NoBackendAvailable):
        round_trip(attempts, transport, UpstreamRequest("GET", "/", {}), Body(), read_whole)
    assert attempts.tried == []


def test_every_backend_refusing_raises_the_last_failure_after_the_retries(
    transport: ProxyUpstream,
) -> None:
    """Three refusing backends, retries=1: two are tried, then UpstreamConnectError."""
    urls = [RefusingURL() for _ in range(3)]
    pool = Pool(urls, balancer="round_robin")
    attempts = attempts_for(pool, retries=1)
    with pytest.raises(UpstreamConnectError):
        round_trip(attempts, transport, UpstreamRequest("GET", "/", {}), Body(), read_whole)
    assert len(attempts.tried) == 2
    assert sum(pool.get(u).failures for u in urls) == 2


def test_a_spent_budget_stops_the_retries(
    transport: ProxyUpstream,
    refused_url: str,
    backend: TestBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a budget that allows no retry, a refused first try is the answer."""
    pool = Pool([refused_url, backend.url], balancer="round_robin")
    attempts = attempts_for(pool, budget=RetryBudget(ratio=0, min_per_second=0))
    with (
        caplog.at_level(logging.WARNING, logger="softlb.proxy"),
        pytest.raises(UpstreamConnectError),
    ):
        round_trip(attempts, transport, UpstreamRequest("GET", "/", {}), Body(), read_whole)
    assert backend.request_count == 0
    assert "retry budget is spent" in caplog.text


def test_a_failure_in_prepare_is_the_backends_and_is_retried(
    transport: ProxyUpstream, backend: TestBackend
) -> None:
    """What prepare reads of the answer is inside the loop: a backend whose body breaks
    there fails over like one that refused."""
    cut = RawBackend([cut_short_step])
    with cut:
        pool = Pool([cut.url, backend.url], balancer="round_robin")
        attempts = attempts_for(pool)
        status, _ = round_trip(
            attempts, transport, UpstreamRequest("GET", "/x", {"Host": "h"}), Body(), read_whole
        )
    assert status == 200
    assert pool.get(cut.url).failures == 1
    assert pool.in_flight == 0


def test_a_client_abort_ends_the_lease_unblamed(
    transport: ProxyUpstream, backend: TestBackend
) -> None:
    """The client's fault (ClientAbort from prepare or the body) propagates; the backend's
    request is counted, not as a failure, and nothing else is tried."""
    pool = Pool([backend.url])

    def client_left(exchange: Exchange) -> None:
        raise ClientAbort("the client went away")

    attempts = attempts_for(pool)
    with pytest.raises(ClientAbort):
        round_trip(attempts, transport, UpstreamRequest("GET", "/", {}), Body(), client_left)
    member = pool.get(backend.url)
    assert (member.requests, member.failures, member.active) == (1, 0, 0)
    assert attempts.next() is None


def test_a_bug_in_prepare_is_recorded_as_the_proxys_error(
    transport: ProxyUpstream, backend: TestBackend
) -> None:
    """Any other exception ends the lease as "error" and propagates."""
    pool = Pool([backend.url])
    failures: list[str] = []
    pool.subscribe(lambda e: failures.append(e.reason), ("failure",))

    def bug(exchange: Exchange) -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        round_trip(attempts_for(pool), transport, UpstreamRequest("GET", "/", {}), Body(), bug)
    assert failures == ["error"]
    assert pool.in_flight == 0


def test_exchange_close_ends_lease_and_connection_once(
    transport: ProxyUpstream, backend: TestBackend
) -> None:
    """The exchange owns lease and connection: close() ends both, a second close nothing."""
    pool = Pool([backend.url])
    exchange = round_trip(
        attempts_for(pool), transport, UpstreamRequest("GET", "/", {}), Body(), lambda ex: ex
    )
    assert pool.in_flight == 1
    assert not exchange.closed
    exchange.response.read_small()
    exchange.close(complete=True, failure=None)
    exchange.close(complete=False, failure="broken")  # ignored
    member = pool.get(backend.url)
    assert (member.active, member.requests, member.failures) == (0, 1, 0)
    assert exchange.closed


def test_a_body_that_cannot_be_sent_again_is_not_retried(
    transport: ProxyUpstream, backend: TestBackend
) -> None:
    """Even an idempotent method is not retried after its streamed body went out."""
    with RawBackend([reset_step]) as resetting:
        pool = Pool([resetting.url, backend.url], balancer="round_robin")
        with pytest.raises(UpstreamBroken):
            round_trip(
                attempts_for(pool, "PUT"),
                transport,
                UpstreamRequest("PUT", "/x", {"Host": "h"}),
                Body(b"streamed", replayable=False),
                read_whole,
            )
        assert backend.request_count == 0


def test_next_async_waits_in_the_queue_without_blocking_the_loop(backend: TestBackend) -> None:
    """On an event loop, a try at a full backend waits in the pool's queue (up to ``wait``)
    and gets the lease the moment another request releases one."""
    pool = Pool([backend.url])
    pool.set_max_connections(backend.url, 1)
    held = pool.lease()

    async def main() -> tuple[bool, bool]:
        attempts = attempts_for(pool, wait=2.0)
        task = asyncio.ensure_future(attempts.next_async())
        await asyncio.sleep(0.05)
        waiting = not task.done()
        held.release()
        lease = await asyncio.wait_for(task, 2.0)
        assert lease is not None
        attempts.succeeded().release()
        return waiting, True

    assert asyncio.run(main()) == (True, True)
    assert pool.in_flight == 0


def test_next_async_without_a_wait_reports_a_full_pool(backend: TestBackend) -> None:
    """wait=0: a full pool ends the tries at once with QueueTimeout as the error."""
    pool = Pool([backend.url])
    pool.set_max_connections(backend.url, 1)
    held = pool.lease()
    attempts = attempts_for(pool)
    assert asyncio.run(attempts.next_async()) is None
    assert isinstance(attempts.error, QueueTimeout)
    held.release()


@pytest.mark.parametrize("use_async", [False, True], ids=["next", "next_async"])
def test_a_lease_taken_before_the_loop_is_its_first_try(use_async: bool) -> None:
    """``first``: the loop's first try is the lease the caller took (nothing else is leased),
    and after that try fails the next one excludes its backend, as if the loop had taken it."""
    pool = Pool(["http://a:1", "http://b:1"], balancer="round_robin")
    taken = pool.try_lease()
    assert taken is not None
    attempts = attempts_for(pool, first=taken)

    def next_lease() -> Lease | None:
        return asyncio.run(attempts.next_async()) if use_async else attempts.next()

    assert next_lease() is taken
    assert pool.in_flight == 1  # the first try leased nothing more
    assert attempts.failed(UpstreamConnectError("refused", backend=taken.backend.url))
    second = next_lease()
    assert second is not None and second.backend is not taken.backend
    attempts.succeeded().release()
    assert pool.in_flight == 0
    assert taken.backend.failures == 1


def test_abort_before_next_is_a_programming_error() -> None:
    """The loop's verbs need a try under way."""
    with pytest.raises(RuntimeError, match="call next"):
        attempts_for(Pool([])).succeeded()


def test_pool_events_carry_backend_and_url() -> None:
    """A PoolEvent names its backend and URL (the transports forget connections by URL)."""
    pool = Pool([])
    seen: list[PoolEvent] = []
    pool.subscribe(seen.append, ("added", "removed"))
    added = pool.add("http://127.0.0.1:9")
    pool.remove(added)
    assert [(e.kind, e.backend, e.url) for e in seen] == [
        ("added", added, added.url),
        ("removed", added, added.url),
    ]


def test_scheme_router_refuses_a_scheme_it_has_no_client_for(backend: TestBackend) -> None:
    """A SchemeRouter with only http:// sends http:// and refuses https:// before sending."""
    http = ProxyUpstream()
    router = SchemeRouter({"HTTP": http})
    try:
        answer = router.request(backend.url, "GET", "/", {"Host": "h"}, None)
        assert answer.status == 200
        answer.read_small()
        answer.close(complete=True)
        with pytest.raises(UpstreamConnectError, match="no client for https://"):
            router.request("https://127.0.0.1:9", "GET", "/", {}, None)
        assert backend.request_count == 1
    finally:
        router.close()
