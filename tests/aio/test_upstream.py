"""The event-loop engine's backend connection on its own: the head of an answer as the fast
path reads it (``on_head``, :attr:`~softlb.aio.upstream.UpstreamConnection.answer`) and as
``exchange()`` awaits it (:meth:`~softlb.aio.upstream.UpstreamConnection.wait_head`, a future
made only when asked for)."""

from __future__ import annotations

import asyncio

import pytest

from softlb.aio.engine import new_event_loop
from softlb.aio.upstream import UpstreamConnection, UpstreamPool
from softlb.errors import UpstreamBroken
from tests.helpers.raw_backend import CLOSE, RawBackend

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
GET = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"


async def _head_announced(conn: UpstreamConnection) -> None:
    """Start an exchange and wait for its on_head callback (head came, or failure)."""
    came = asyncio.get_running_loop().create_future()
    conn.start(GET, head_request=False, upgrade=False)
    conn.on_head = lambda _conn: came.set_result(None)
    await asyncio.wait_for(came, 5)


def test_wait_head_after_the_head_came_is_resolved_at_once() -> None:
    loop = new_event_loop()

    async def main() -> None:
        pool = UpstreamPool(loop, connect_timeout=2.0, read_timeout=5.0)
        with RawBackend([OK]) as backend:
            conn = await pool.connect(backend.url)
            assert conn.answer is None
            await _head_announced(conn)
            answer = conn.answer
            assert answer is not None and answer.status == 200
            head = conn.wait_head()
            assert head.done() and head.result() is answer
            assert conn.wait_head() is head  # one future per exchange
            assert conn.take_body() == b"hi"
            conn.release(reusable=True)
            # The next exchange on the same connection starts without a head.
            again = pool.take_idle(backend.url)
            assert again is conn
            conn.start(GET, head_request=False, upgrade=False)
            assert conn.answer is None
            waiting = conn.wait_head()
            assert not waiting.done()
            assert (await asyncio.wait_for(waiting, 5)).status == 200
            conn.release(reusable=False)
        pool.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_wait_head_after_a_failure_raises_it() -> None:
    loop = new_event_loop()

    async def main() -> None:
        pool = UpstreamPool(loop, connect_timeout=2.0, read_timeout=5.0)
        with RawBackend([b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"]) as backend:
            conn = await pool.connect(backend.url)
            await _head_announced(conn)
            assert conn.answer is None
            assert isinstance(conn.failed, UpstreamBroken)
            with pytest.raises(UpstreamBroken, match="invalid answer"):
                await asyncio.wait_for(conn.wait_head(), 5)
        with RawBackend([CLOSE]) as backend:
            conn = await pool.connect(backend.url)
            await _head_announced(conn)
            with pytest.raises(UpstreamBroken):
                await asyncio.wait_for(conn.wait_head(), 5)
        pool.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_released_connections_are_kept_up_to_max_idle_and_not_after_close() -> None:
    """A finished keep-alive exchange puts its connection back for reuse, up to ``max_idle``
    per backend; one more is closed, and so is every one released after the pool closed."""
    loop = new_event_loop()

    async def main() -> None:
        pool = UpstreamPool(loop, connect_timeout=2.0, read_timeout=5.0, max_idle=1)
        with RawBackend([OK, OK, OK]) as backend:
            first, second, third = [await pool.connect(backend.url) for _ in range(3)]
            for conn in (first, second, third):
                await _head_announced(conn)
                assert conn.complete
            first.release(reusable=True)
            second.release(reusable=True)  # one idle connection is kept already
            assert not first.closed and second.closed
            assert pool.take_idle(backend.url) is first
            assert pool.take_idle(backend.url) is None
            pool.close()
            third.release(reusable=True)
            assert third.closed
            assert pool.take_idle(backend.url) is None
        first.release(reusable=False)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
