"""``softlb demo``: three local backends and a balancer in front of them, with no setup.

The backends are stdlib :mod:`http.server` servers on 127.0.0.1, each in a thread of the
gunicorn master, on the three ports after the balancer's (8081-8083 for the default 8080) when
those are free, else on free ports; the balancer is the same embedded gunicorn as ``softlb
serve`` (one worker), round-robin so that successive requests visibly go to each backend in turn.

A demo is there to show what a load balancer is for, so each backend can be broken and healed
from outside: ``curl -X POST http://127.0.0.1:8082/break`` makes backend 2 behave like a crashed
server (every request but ``/break`` and ``/heal`` has its connection closed with no answer, its
health probe included), and the balancer takes it out of rotation and sends its traffic to the
other two; ``curl -X POST http://127.0.0.1:8082/heal`` brings it back. The demo prints both
commands with the real ports.
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
#: Probe interval of the demo: short, so that breaking a backend shows up on the status page
#: within seconds.
HEALTH_INTERVAL: Final = 2.0
HOST: Final = "127.0.0.1"
#: Good probes a healed backend needs to be back in rotation (the config's default ``rise``).
RISE: Final = HealthCheckConfig().rise
_TEXT: Final = "text/plain; charset=utf-8"
#: The paths that break and heal a demo backend (``POST`` only); every other path is served.
BREAK_PATH: Final = "/break"
HEAL_PATH: Final = "/heal"


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
        path = self.path.split("?", 1)[0]
        if path in (BREAK_PATH, HEAL_PATH):
            self._switch(path)
            return
        if self.server.broken.is_set():
            # What a crashed backend looks like from the balancer: no answer at all. The probe
            # fails, requests fail (and idempotent ones are retried on another backend).
            self.close_connection = True
            return
        if path == "/health":
            self._answer(200, b"ok\n", _TEXT)
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
            self._answer(200, text.encode(), _TEXT)

    def _switch(self, path: str) -> None:
        """``POST /break`` or ``POST /heal``: change this backend's state and say so."""
        number, port = self.server.number, self.server.server_address[1]
        if self.command != "POST":
            self.close_connection = True  # the body of a refused request is not read
            self._answer(405, f"use POST: curl -X POST {self._url(path)}\n".encode(), _TEXT)
            return
        if path == BREAK_PATH:
            self.server.broken.set()
            text = (
                f"demo backend {number} (port {port}) is broken: it drops every request until "
                f"healed with: curl -X POST {self._url(HEAL_PATH)}\n"
            )
        else:
            self.server.broken.clear()
            text = (
                f"demo backend {number} (port {port}) is healed: it answers again, and is back "
                f"in rotation after {RISE} good health checks\n"
            )
        self._answer(200, text.encode(), _TEXT)

    def _url(self, path: str) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}{path}"

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, number: int, port: int) -> None:
        self.number = number
        self.broken = threading.Event()  # set by POST /break, cleared by POST /heal
        super().__init__((HOST, port), _Handler)


class DemoBackend:
    """A tiny HTTP server on 127.0.0.1 that says which backend it is.

    It listens on ``port`` if that is free (``0``, the default, or a taken port: a free port).
    ``POST /break`` makes it drop every request, ``POST /heal`` makes it answer again; so do
    :meth:`break_` and :meth:`heal`.
    """

    def __init__(self, number: int, port: int = 0) -> None:
        self.number = number
        try:
            self._server = _Server(number, port)
        except OSError:  # taken (or not ours to bind): any free port will do for a demo
            self._server = _Server(number, 0)
        self.port: int = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"softlb-demo-backend-{number}",
            daemon=True,
        )
        self._thread.start()

    @property
    def broken(self) -> bool:
        """Whether the backend drops every request (``POST /break``) instead of answering."""
        return self._server.broken.is_set()

    def break_(self) -> None:
        """Drop every request from now on, as ``POST /break`` does."""
        self._server.broken.set()

    def heal(self) -> None:
        """Answer requests again, as ``POST /heal`` does."""
        self._server.broken.clear()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __repr__(self) -> str:
        state = " broken" if self.broken else ""
        return f"<DemoBackend {self.number} {self.url}{state}>"


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
    broken = backends[len(backends) // 2].url  # the middle one: backend 2 of 3
    lines = [
        f"softlb demo: {len(backends)} backends and a balancer in front of them",
        "",
        "  backends:   " + "  ".join(b.url for b in backends),
        f"  balancer:   {base}/          (reload it: each backend answers in turn)",
        f"  status:     {admin}/",
        f"  servers:    {admin}/servers",
        "",
        f"  try:        curl {base}/hello",
        f"  break one:  curl -X POST {broken}/break",
        "              (it stops answering: the status page marks it down, the others take its "
        "traffic)",
        f"  heal it:    curl -X POST {broken}/heal",
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
            preferred = port + number if port + number <= 65535 else 0
            backends.append(DemoBackend(number, preferred))
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
