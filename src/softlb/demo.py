"""``softlb demo``: three local backends and a balancer in front of them, with no setup.

The backends are stdlib :mod:`http.server` servers on free ports of 127.0.0.1, each in a thread
of the gunicorn master; the balancer is the same embedded gunicorn as ``softlb serve`` (one
worker), round-robin so that successive requests visibly go to each backend in turn.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from softlb.config import Config, HealthCheckConfig, ServerSpec
from softlb.server import ServeOptions, serve

__all__ = ["DEFAULT_PORT", "DemoBackend", "demo_config", "run_demo"]

#: Where the demo balancer listens unless ``--port`` says otherwise.
DEFAULT_PORT: Final = 8080
#: How many demo backends are started.
BACKENDS: Final = 3
#: Probe interval of the demo: short, so that stopping a backend shows up on the status page
#: within seconds.
HEALTH_INTERVAL: Final = 2.0
HOST: Final = "127.0.0.1"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real backends do

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the demo prints its URLs
        pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Demo-Backend", str(self.server.number))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.split("?", 1)[0] == "/health":
            self._answer(200, b"ok\n", "text/plain; charset=utf-8")
            return
        number, port = self.server.number, self.server.server_address[1]
        greeting = f"Hello from demo backend {number} (port {port})"
        if "application/json" in (self.headers.get("Accept") or ""):
            body = json.dumps(
                {"message": greeting, "backend": number, "method": self.command, "path": self.path}
            ).encode()
            self._answer(200, body + b"\n", "application/json")
        else:
            text = f"{greeting}: {self.command} {self.path}\n"
            self._answer(200, text.encode(), "text/plain; charset=utf-8")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, number: int) -> None:
        self.number = number
        super().__init__((HOST, 0), _Handler)


class DemoBackend:
    """A tiny HTTP server on a free port of 127.0.0.1 that says which backend it is."""

    def __init__(self, number: int) -> None:
        self.number = number
        self._server = _Server(number)
        self.port: int = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"softlb-demo-backend-{number}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __repr__(self) -> str:
        return f"<DemoBackend {self.number} {self.url}>"


def demo_config(port: int, urls: list[str]) -> Config:
    """The demo balancer's config: ``urls`` round-robin behind 127.0.0.1:``port``."""
    return Config(
        listen_host=HOST,
        listen_port=port,
        algorithm="round_robin",
        servers=tuple(ServerSpec(url) for url in urls),
        health_check=HealthCheckConfig(path="/health", interval=HEALTH_INTERVAL),
        source="<demo>",
    )


def instructions(config: Config, backends: list[DemoBackend]) -> str:
    """What the demo prints before it starts: the URLs to try."""
    base = f"http://{HOST}:{config.listen_port}"
    admin = base + config.admin.prefix.rstrip("/")
    payload = json.dumps({"url": backends[-1].url})
    lines = [
        f"softlb demo: {len(backends)} backends and a balancer in front of them",
        "",
        "  backends:   " + "  ".join(b.url for b in backends),
        f"  balancer:   {base}/          (reload it: each backend answers in turn)",
        f"  status:     {admin}/",
        f"  servers:    {admin}/servers",
        "",
        f"  try:        curl {base}/hello",
        f"  remove one: curl -X DELETE {admin}/servers -d '{payload}'",
        f"  add it:     curl -X POST {admin}/servers -d '{payload}'",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def run_demo(port: int = DEFAULT_PORT) -> int:
    """Start the backends and the balancer; run until SIGINT/SIGTERM; return the exit status.

    The caller checks first that ``port`` can be bound (:func:`softlb.server.check_bindable`).
    """
    master = os.getpid()
    backends: list[DemoBackend] = []
    try:
        for number in range(1, BACKENDS + 1):
            backends.append(DemoBackend(number))
        config = demo_config(port, [b.url for b in backends])
        print(instructions(config, backends), flush=True)
        return serve(config, ServeOptions(workers=1))
    finally:
        # serve() returns in the master only (workers leave with os._exit), but be explicit:
        # a forked copy of these servers has no serving thread to stop.
        if os.getpid() == master:
            for backend in backends:
                backend.stop()
            sys.stdout.flush()
