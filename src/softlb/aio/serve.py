"""Run the event-loop engine without gunicorn, on a thread of this process: for tests, and
for programs that embed the balancer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from softlb.aio.engine import Engine, Limits, new_event_loop

if TYPE_CHECKING:
    from softlb.app import Application

__all__ = ["running"]


@contextlib.contextmanager
def running(
    app: Application,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
    drain_timeout: float = 5.0,
    upstream_ssl: ssl.SSLContext | None = None,
) -> Iterator[tuple[str, int]]:
    """Serve ``app`` with the event-loop engine on a new thread; yields ``(host, port)``.

    ``ssl_context`` makes the listener speak TLS; ``upstream_ssl`` verifies ``https://``
    backends (default: the system's CAs).

    Leaving the block stops accepting, drains for up to ``drain_timeout`` seconds and ends
    the thread (the app itself is not stopped: it is the caller's).
    """
    sock = socket.create_server((host, port), reuse_port=False)
    bound = sock.getsockname()
    loop = new_event_loop()
    ready = threading.Event()
    stopped = threading.Event()
    holder: dict[str, Engine] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            engine = Engine(app, loop, limits=limits, upstream_ssl=upstream_ssl)
            holder["engine"] = engine
            engine.listen(sock, ssl_context=ssl_context)
            ready.set()
            while not stopped.is_set():
                await asyncio.sleep(0.05)
            engine.stop_accepting()
            await engine.drain(drain_timeout)
            engine.close()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="softlb-eventloop", daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield str(bound[0]), int(bound[1])
    finally:
        stopped.set()
        thread.join(drain_timeout + 5)
        with contextlib.suppress(OSError):
            sock.close()
