"""Client-side balancing: your program spreads its own requests over three backends.

No proxy in between: a :class:`~softlb.Pool` with a :class:`~softlb.HealthChecker` lives in
this process, and :class:`~softlb.client.BalancedClient` (urllib3's request API with a path
instead of a URL) sends each request to a backend the pool picks. The same pool then serves
a requests session and an httpx client, if those libraries are installed
(``pip install softlb[requests,httpx]``).

Run it with ``python examples/client_side.py``: it starts three small backends on free
ports, makes requests, stops one backend to show failover and the health checker taking it
out of rotation, and stops everything. It needs no network and exits within a few seconds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from softlb import HealthChecker, Pool
from softlb.client import BalancedClient


class Handler(BaseHTTPRequestHandler):
    """Answers every GET with the name of the backend that served it."""

    protocol_version = "HTTP/1.1"  # keep-alive, so the client reuses its connections

    def do_GET(self) -> None:
        body = f"hello from backend {self.server.server_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """No access log on the terminal."""


class DemoBackend(ThreadingHTTPServer):
    """A backend on a free port of 127.0.0.1, serving from threads until :meth:`stop`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        """Stop listening and cut the kept-alive connections, as a crashed server would."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.thread.join()


def with_requests(pool: Pool) -> None:
    try:
        import requests

        from softlb.contrib.requests_adapter import BalancedAdapter
    except ImportError:
        print("requests is not installed: skipped")
        return
    with requests.Session() as session:
        # "service" is only a name for the prefix: the adapter picks the real host.
        session.mount("http://service/", BalancedAdapter(pool))
        for _ in range(2):
            response = session.get("http://service/", timeout=5)
            print(f"requests: {response.status_code} answered by {response.raw.url}")


def with_httpx(pool: Pool) -> None:
    try:
        import httpx

        from softlb.contrib.httpx_transport import BalancedTransport
    except ImportError:
        print("httpx is not installed: skipped")
        return
    with httpx.Client(transport=BalancedTransport(pool), base_url="http://service") as client:
        for _ in range(2):
            response = client.get("/")
            print(f"httpx:    {response.status_code} answered: {response.text.strip()}")


def main() -> None:
    # softlb logs each failed try and each backend taken out of rotation as a warning.
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s", stream=sys.stdout)
    backends = [DemoBackend() for _ in range(3)]
    pool = Pool([backend.url for backend in backends], balancer="round_robin")
    # Probes every 0.2 s here so the demo is quick; 2-5 s is usual. fall=1: one failed probe
    # or one failed request takes a backend out.
    checker = HealthChecker(pool, path="/", interval=0.2, timeout=1.0, rise=2, fall=1)
    try:
        with checker, BalancedClient(pool, retries=2) as client:
            print("BalancedClient, round robin over three backends:")
            for _ in range(3):
                resp = client.request("GET", "/")
                print(f"  {resp.status} answered by {resp.url}: {resp.data.decode().strip()}")

            url = backends[0].url
            backends[0].stop()
            print(f"stopped {url}; requests fail over to the others:")
            for _ in range(3):
                resp = client.request("GET", "/")
                print(f"  {resp.status} answered by {resp.url}")
            deadline = time.monotonic() + 5
            while pool.get(url).healthy and time.monotonic() < deadline:
                time.sleep(0.05)
            print(f"health: {url} is {'up' if pool.get(url).healthy else 'out of rotation'}")

            with_requests(pool)
            with_httpx(pool)
            for backend in pool.backends:
                print(f"  {backend}")
    finally:
        for backend in backends:
            backend.stop()


if __name__ == "__main__":
    main()
