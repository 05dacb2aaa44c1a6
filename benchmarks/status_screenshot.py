"""Make docs/_static/status-page.png: the admin status page under load, one backend draining and
one down, as a real headless chromium shows it.

Run it from a checkout (``python benchmarks/status_screenshot.py [--out PATH]``); it needs
Debian's ``chromium`` and takes about ten seconds. Everything runs on 127.0.0.1: three small
stdlib backends (answers of 5 to 60 ms, a few 404s and 500s), a fourth address where nothing
listens, a real :class:`~softlb.wsgi.Application` (health checks every second, the two
backends in rotation limited to 4 connections each so that requests queue) served by
werkzeug, and a few client threads that keep it busy while the browser polls the page.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

from softlb.config import parse_config
from softlb.wsgi import Application

ROOT = Path(__file__).resolve().parent.parent
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


class Handler(BaseHTTPRequestHandler):
    """Answers like a small app: mostly 200 after a few ms, a 404 or a 500 now and then."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            status = 200
        else:
            time.sleep(random.uniform(0.005, 0.06))
            roll = random.random()
            status = 404 if roll < 0.06 else 500 if roll < 0.08 else 302 if roll < 0.1 else 200
        body = b"ok\n"
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load(base: str, stop: threading.Event) -> None:
    """Keep sending requests through the balancer until ``stop``."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(base + "/app", timeout=5) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            err.close()
        except OSError:
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/_static/status-page.png")
    parser.add_argument("--size", default="1500,940", help="browser window, WIDTH,HEIGHT")
    args = parser.parse_args()
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 1

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    backends = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(3)]
    for server in backends:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in backends]
    dead = f"http://127.0.0.1:{free_port()}"
    app = Application(
        parse_config(
            {
                "servers": [
                    {"url": urls[0], "max_connections": 4},
                    {"url": urls[1], "max_connections": 4},
                    urls[2],
                    dead,
                ],
                "algorithm": "least_connections",
                "health_check": {"path": "/health", "interval": 1, "timeout": 1, "fall": 2},
            }
        )
    )
    http = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{http.server_port}"
    stop = threading.Event()
    try:
        request = urllib.request.Request(
            base + "/_softlb/servers",
            data=b'{"url": "%s", "draining": true}' % urls[2].encode(),
            method="PATCH",
        )
        urllib.request.urlopen(request, timeout=5).close()
        for _ in range(12):
            threading.Thread(target=load, args=(base, stop), daemon=True).start()
        time.sleep(4)  # some traffic, and the dead one found down
        with tempfile.TemporaryDirectory(prefix="softlb-chromium-") as profile:
            subprocess.run(
                [
                    binary,
                    *FLAGS,
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=4500",
                    f"--screenshot={args.out}",
                    base + "/_softlb/",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
    finally:
        stop.set()
        http.shutdown()
        app.stop()
        for server in backends:
            server.shutdown()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
