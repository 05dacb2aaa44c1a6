"""The status page of issue #13, served by a real Application on 127.0.0.1 with real backends:
the figures behind it (GET {prefix}/status), the PATCH its controls send, and the page itself
in a real headless browser (Debian's chromium) when one is installed.

The browser test skips when chromium is absent, except under ``CI=1``, where it fails: CI
installs chromium, so a skip there would hide a page whose script no longer runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from werkzeug.serving import BaseWSGIServer, make_server

from softlb.backend import Backend
from softlb.config import parse_config
from softlb.health import HealthChecker, ProbeResult
from softlb.pool import Pool
from softlb.status_page import format_seconds, render_status_page
from softlb.wsgi import Application
from tests.helpers.servers import RefusingURL, TestBackend

#: Flags that make Debian's chromium work headless as root on a machine without a display,
#: and keep it from calling home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

#: Longest a test waits for something to happen (health checks, the browser).
DEADLINE = 10.0


@dataclass
class Served:
    """An Application served over HTTP on 127.0.0.1, with its three backends."""

    app: Application
    base: str  # http://127.0.0.1:PORT
    up: TestBackend
    draining: TestBackend
    down: str  # nothing listens there


def request(
    served: Served,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Send one request to the served app; return the status and the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(served.base + path, data=data, method=method)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
        err.close()
    return status, json.loads(raw) if raw else None


def status_of(served: Served) -> dict[str, Any]:
    """GET /_softlb/status, checked to answer 200."""
    code, document = request(served, "GET", "/_softlb/status")
    assert code == 200
    return dict(document)


def server_of(document: dict[str, Any], url: str) -> dict[str, Any]:
    """The entry of ``url`` in a status document's servers."""
    return dict(next(s for s in document["servers"] if s["url"] == url))


def wait_until_down(served: Served) -> dict[str, Any]:
    """Poll the status until the refusing backend is down with a reason (bounded)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        entry = server_of(status_of(served), served.down)
        if not entry["healthy"] and entry["health"]["down_since"] is not None:
            return entry
        assert time.monotonic() < deadline, f"backend never went down: {entry}"
        time.sleep(0.05)


@pytest.fixture
def served() -> Iterator[Served]:
    """A real Application on a free port: one backend up, one drained, one refusing
    connections (down after its first probe); a few requests went through."""
    up, draining = TestBackend(), TestBackend()
    down = RefusingURL()
    app = Application(
        parse_config(
            {
                "servers": [up.url, draining.url, down],
                "health_check": {"path": "/", "interval": 0.2, "timeout": 1, "fall": 1},
            }
        )
    )
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    result = Served(app, f"http://127.0.0.1:{server.server_port}", up, draining, down)
    try:
        wait_until_down(result)
        code, _ = request(
            result, "PATCH", "/_softlb/servers", {"url": draining.url, "draining": True}
        )
        assert code == 200
        for _ in range(6):
            assert request(result, "GET", "/echo")[0] == 200
        yield result
    finally:
        server.shutdown()
        thread.join(DEADLINE)
        server.server_close()
        app.stop()
        up.stop()
        draining.stop()


# --------------------------------------------------------------------------- the figures


def test_status_json_has_the_page_figures(served: Served) -> None:
    """GET /status gives per backend the latency, answers by class, the last check and, for
    the dead one, since when and why it is down; and the queue."""
    document = status_of(served)
    assert abs(document["time"] - time.time()) < 5
    assert document["queue"] == {
        "waiting": 0,
        "oldest_wait": 0.0,
        "queued": 0,
        "timed_out": 0,
        "wait_seconds": 0.0,
    }
    up = server_of(document, served.up.url)
    assert up["healthy"] and not up["draining"]
    assert up["responses"] == {"2xx": 6, "3xx": 0, "4xx": 0, "5xx": 0}
    assert up["latency_seconds"] > 0
    assert 0 < up["first_byte_p50"] <= up["last_byte_p50"] <= 10
    assert up["health"]["check_ok"] is True
    assert 0 <= document["time"] - up["health"]["checked_at"] < DEADLINE
    assert up["health"]["down_since"] is None

    down = server_of(document, served.down)
    assert down["healthy"] is False
    assert down["health"]["check_ok"] is False
    assert down["health"]["down_reason"] == down["health"]["check_detail"] != ""
    assert down["health"]["down_since"] <= document["time"]
    assert down["responses"] == {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    assert down["latency_seconds"] is None and down["first_byte_p50"] is None

    drained = server_of(document, served.draining.url)
    assert drained["draining"] is True
    assert drained["healthy"] is True  # draining is not down: no "down since"
    assert drained["health"]["down_since"] is None


def test_page_shows_the_figures_without_javascript(served: Served) -> None:
    """The HTML as served (before any script runs) has the figures and the controls."""
    with urllib.request.urlopen(served.base + "/_softlb/", timeout=DEADLINE) as resp:
        page = resp.read().decode()
    assert "down since " in page
    assert '<span class="pill draining">draining</span>' in page
    assert f'data-action="drain" data-url="{served.draining.url}" data-draining="false"' in page
    assert f'data-action="drain" data-url="{served.up.url}" data-draining="true"' in page
    assert page.count('data-action="weight"') == 3
    assert "pass " in page  # the up backend's last check
    assert "oldest " in page  # the queue card


# --------------------------------------------------------------------------- the controls


def test_controls_patch_as_the_page_sends_it(served: Served) -> None:
    """The request the page's fetch() sends (PATCH {prefix}/servers, JSON, same Origin) drains,
    undrains and sets a weight; a bad weight gets a 400 with a JSON error and changes nothing."""
    page_headers = {"Content-Type": "application/json", "Origin": served.base}
    url = served.up.url
    code, entry = request(
        served, "PATCH", "/_softlb/servers", {"url": url, "draining": True}, page_headers
    )
    assert code == 200
    assert entry["draining"] is True
    assert server_of(status_of(served), url)["draining"] is True
    code, entry = request(
        served, "PATCH", "/_softlb/servers", {"url": url, "draining": False}, page_headers
    )
    assert (code, entry["draining"]) == (200, False)
    body = {"url": url, "weight": 7}
    code, entry = request(served, "PATCH", "/_softlb/servers", body, page_headers)
    assert (code, entry["weight"]) == (200, 7)
    code, entry = request(
        served, "PATCH", "/_softlb/servers", {"url": url, "weight": 0}, page_headers
    )
    assert code == 400
    assert "weight" in entry["error"]
    assert server_of(status_of(served), url)["weight"] == 7


def test_controls_from_another_site_are_refused(served: Served) -> None:
    """The same PATCH from a page of another origin gets 403 and changes nothing."""
    headers = {"Content-Type": "application/json", "Origin": "http://evil.example"}
    body = {"url": served.up.url, "draining": True}
    code, entry = request(served, "PATCH", "/_softlb/servers", body, headers)
    assert code == 403
    assert "error" in entry
    assert server_of(status_of(served), served.up.url)["draining"] is False


# --------------------------------------------------------------------------- in a browser


def chromium() -> str:
    """The chromium binary; skips without one, fails under CI=1 (CI installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "1":
            pytest.fail("chromium is not installed and CI=1 requires it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the page is untested")
    return found


def run_chromium(binary: str, *args: str) -> str:
    """Run headless chromium with a fresh profile; return what it printed on stdout."""
    with tempfile.TemporaryDirectory(prefix="softlb-chromium-") as profile:
        done = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=30,
            check=False,
            text=True,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_in_chromium(served: Served) -> None:
    """In a real browser the page's script runs under its CSP, polls /status and fills the
    table: the dead backend's "down since" and reason, the draining mark, the controls."""
    binary = chromium()
    started = time.monotonic()
    # Virtual time runs the page's timers and waits for its fetch() calls: two polls.
    page = served.base + "/_softlb/"
    dom = run_chromium(binary, "--virtual-time-budget=2500", "--dump-dom", page)
    assert time.monotonic() - started < 20
    # Set only by the script, after a successful poll (the server sends "snapshot").
    assert '<span id="live" class="live ok">live, every 2 s</span>' in dom
    down = server_of(status_of(served), served.down)
    assert "down since " in dom
    assert f": {down['health']['down_reason']}" in dom
    assert '<span class="pill draining">draining</span>' in dom
    assert ">Undrain</button>" in dom and ">Drain</button>" in dom
    # The rows are the script's: after two polls it shows rates ("0.0"), the server "–".
    assert '<td class="num">0.0</td>' in dom
    assert "p50 " in dom


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ending in a NUL byte, read by chromium on fd 3 and written on fd 4), so that a
    test can click the page's buttons. Every call waits at most :data:`DEADLINE` seconds."""

    def __init__(self, binary: str) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="softlb-chromium-")
        theirs_in, self._out = os.pipe()
        self._in, theirs_out = os.pipe()
        # Above fd 4, so that putting one end on 3 cannot overwrite the other.
        for fd in (theirs_in, theirs_out):
            high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            if fd == theirs_in:
                theirs_in = high
            else:
                theirs_out = high
        # bash puts the two pipe ends on fds 3 and 4, where chromium looks for them.
        script = f'exec "$0" "$@" 3<&{theirs_in} 4>&{theirs_out}'
        self._proc = subprocess.Popen(
            [
                "/bin/bash",
                "-c",
                script,
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile.name}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(theirs_in, theirs_out),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(theirs_in)
        os.close(theirs_out)
        self._buffer = b""
        self._id = 0
        self._session: str | None = None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once :meth:`open` attached one) and return its result."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + DEADLINE
        while True:
            while b"\0" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\0")
                reply = json.loads(raw)
                if reply.get("id") == self._id:  # events and other answers are skipped
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return dict(reply["result"])
            left = deadline - time.monotonic()
            assert left > 0, f"chromium did not answer {method} in {DEADLINE}s"
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk

    def open(self, url: str) -> None:
        """Open ``url`` in a new tab and direct later commands to it."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def wait_for(self, expression: str) -> Any:
        """Evaluate ``expression`` until it is truthy (bounded by :data:`DEADLINE`)."""
        deadline = time.monotonic() + DEADLINE
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            time.sleep(0.02)

    def close(self) -> None:
        """Close the browser and wait for it."""
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close")
        try:
            self._proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._out)
        os.close(self._in)
        self._profile.cleanup()


def wait_for(condition: Any, what: str) -> None:
    """Call ``condition()`` until it is true (bounded by :data:`DEADLINE`)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_page_controls_in_chromium(backend: TestBackend) -> None:
    """A person's clicks: logged in with Basic auth (the admin token as password, typed in the
    address), the page polls, Drain drains, Undrain undrains, Set changes the weight, and a
    weight out of range is refused on the page without a request."""
    binary = chromium()
    token = "page-t0ken"
    app = Application(
        parse_config(
            {
                "servers": [backend.url],
                "health_check": {"enabled": False},
                "admin": {"token": token},
            }
        )
    )
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    browser = Browser(binary)
    member = app.pool.backends[0]
    drain = f"document.querySelector(\"button[data-action=drain][data-url='{backend.url}']\")"
    note = 'document.getElementById("action")'
    try:
        browser.open(f"http://admin:{token}@127.0.0.1:{server.server_port}/_softlb/")
        browser.wait_for('document.getElementById("live").className === "live ok"')

        browser.js(f"{drain}.click()")
        wait_for(lambda: member.draining, "drained by the button")
        browser.wait_for(f'{drain}.textContent === "Undrain"')
        assert browser.js(f"{note}.textContent") == f"{backend.url}: draining, weight 1"
        browser.js(f"{drain}.click()")
        wait_for(lambda: not member.draining, "undrained by the button")

        weight = 'document.querySelector("input.weight")'
        browser.js(f'{weight}.value = "5"; {weight}.nextSibling.click()')
        wait_for(lambda: member.weight == 5, "weight set by the field")
        browser.wait_for(f'{note}.textContent.endsWith("weight 5")')
        browser.js(f'{weight}.value = "0"; {weight}.nextSibling.click()')
        assert browser.js(f"{note}.className") == "error"
        assert "from 1 to 10000" in browser.js(f"{note}.textContent")
        assert member.weight == 5
    finally:
        browser.close()
        server.shutdown()
        thread.join(DEADLINE)
        server.server_close()
        app.stop()


# --------------------------------------------------------------------------- the parts


def test_checker_report_keeps_last_check_and_down_since() -> None:
    """HealthChecker.report: the last probe and its result; since when and why it is down,
    which clears once it is back."""
    results = [ProbeResult(False, "HTTP 503"), ProbeResult(True, "HTTP 200")]
    pool = Pool([Backend("http://10.0.0.1:8000")])
    now = [1000.0]
    checker = HealthChecker(pool, rise=1, fall=1, probe=lambda b: results.pop(0), jitter=0)
    checker.wall_clock = lambda: now[0]
    backend = pool.backends[0]
    assert checker.report(backend).checked_at is None
    checker.probe_once(backend)
    report = checker.report(backend.url)
    assert (report.checked_at, report.check_ok, report.check_detail) == (1000.0, False, "HTTP 503")
    assert (report.down_since, report.down_reason) == (1000.0, "HTTP 503")
    now[0] = 1010.0
    checker.probe_once(backend)
    report = checker.report(backend)
    assert (report.checked_at, report.check_ok, report.down_since) == (1010.0, True, None)
    assert report.as_dict()["down_reason"] is None


def test_render_down_since_and_latency() -> None:
    """The server-side render says since when and why a backend is down, and its latency."""
    status = {
        "time": 3725.0,
        "servers": [
            {
                "url": "http://10.0.0.1:8000",
                "healthy": False,
                "latency_seconds": 0.0123,
                "health": {"down_since": 3600.0, "down_reason": "timeout", "checked_at": 3724.0},
            }
        ],
    }
    page = render_status_page(status, prefix="/_softlb", nonce="n")
    assert "down since 01:00:00 UTC (2m 5s): timeout" in page
    assert "fail 1s ago" in page
    assert "12.3 ms" in page


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "–"), (0.00085, "850 µs"), (0.0123, "12.3 ms"), (0.5, "500 ms"), (1.25, "1.25 s")],
)
def test_format_seconds(seconds: float | None, text: str) -> None:
    """Latencies read as people write them."""
    assert format_seconds(seconds) == text
