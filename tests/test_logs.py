"""softlb's log (softlb.logs): one style, one line per change, and where the lines go.

The unit tests feed events and records to the formatters; the gunicorn tests run the balancer
under plain gunicorn in a subprocess (issue #14, items 2, 3 and 5) and read what it printed.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from softlb import logs
from softlb.errors import UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from softlb.events import Event
from softlb.logs import EventLogger, JsonFormatter, failure_text, warn_if_serial
from tests.helpers.servers import TestBackend, free_port
from tests.integration.conftest import Launcher

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
A = "http://10.0.0.1:8000"

#: gunicorn's environ for one request: its sync worker (threads 1) and its gthread with 16.
SYNC = {"SERVER_SOFTWARE": "gunicorn/27.0.1", "wsgi.multithread": False, "wsgi.run_once": False}
THREADED = {**SYNC, "wsgi.multithread": True}

#: A line as softlb writes it by default: gunicorn's time, pid and level, then logger: message.
TEXT_LINE = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[LEVEL\] LOGGER: MESSAGE"


def line_pattern(level: str, logger: str, message: str) -> re.Pattern[str]:
    """A regex for one whole text line of softlb's default format."""
    return re.compile(
        TEXT_LINE.replace("LEVEL", level)
        .replace("LOGGER", re.escape(logger))
        .replace("MESSAGE", message),
        re.MULTILINE,
    )


# -- the wording ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (UpstreamConnectError(f"connection refused: {A}", backend=A), "connection refused"),
        (UpstreamConnectError(f"connect timed out: {A}", backend=A), "connect timed out"),
        (
            UpstreamTimeout(f"backend did not answer in time: {A}", backend=A),
            "backend did not answer in time",
        ),
        (
            UpstreamBroken(f"connection to {A} failed: closed before answering", backend=A),
            "the connection closed before an answer",
        ),
        (
            UpstreamBroken(f"invalid answer from {A}: bad status line", backend=A),
            "invalid answer: bad status line",
        ),
    ],
)
def test_failure_text_names_no_url(error: Exception, words: str) -> None:
    """A failed try is described in words, without the backend's URL (the line names it once)."""
    assert failure_text(error) == words


def test_ejection_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A passive ejection is one line (its ejected event), not also its health event."""
    hook = EventLogger(logging.getLogger("softlb.events"))
    detail = "passive: 3 requests in a row failed, the last: could not connect"
    with caplog.at_level(logging.INFO, logger="softlb.events"):
        hook(Event("health", A, f"down: {detail}", 1.0))
        hook(Event("ejected", A, detail, 1.0))
        hook(Event("health", A, "down: shared: HTTP 503", 2.0))  # adopted from another process
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"backend {A} is down: 3 requests in a row failed, the last: could not connect",
        ),
        ("WARNING", f"backend {A} is down: shared: HTTP 503"),
    ]


def test_json_formatter() -> None:
    """JSON lines: an event's own JSON as it is, any other record as time/level/logger/message."""
    formatter = JsonFormatter()
    plain = logging.LogRecord("softlb.server", logging.WARNING, __file__, 1, "x %s", ("y",), None)
    document = json.loads(formatter.format(plain))
    assert document["level"] == "warning"
    assert document["logger"] == "softlb.server"
    assert document["message"] == "x y"
    assert document["time"].endswith("Z")
    event = logging.LogRecord("softlb.events", logging.INFO, __file__, 1, "%s", ('{"a": 1}',), None)
    event.softlb_event = {"event": "added"}
    assert formatter.format(event) == '{"a": 1}'


# -- the serial-server warning --------------------------------------------------------------------


@pytest.fixture
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """warn_if_serial() as in a process that has not seen a request yet."""
    monkeypatch.setattr(logs, "_serial_checked", False)


@pytest.mark.usefixtures("fresh_check")
@pytest.mark.parametrize(
    ("environ", "serial"),
    [
        pytest.param(SYNC, True, id="gunicorn-sync"),
        pytest.param(THREADED, False, id="gunicorn-gthread"),
        pytest.param({**SYNC, "SERVER_SOFTWARE": "werkzeug/3.0"}, False, id="not-gunicorn"),
        pytest.param({**SYNC, "wsgi.run_once": True}, False, id="run-once"),
    ],
)
def test_serial_server_is_found(
    environ: dict[str, object], serial: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Only gunicorn with wsgi.multithread false (its sync worker) gets the warning."""
    with caplog.at_level(logging.WARNING, logger="softlb.server"):
        assert warn_if_serial(environ) is serial
    assert len(caplog.records) == int(serial)


@pytest.mark.usefixtures("fresh_check")
def test_serial_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    """The warning is given once per process, on the first request only."""
    with caplog.at_level(logging.WARNING, logger="softlb.server"):
        assert warn_if_serial(SYNC)
        assert not warn_if_serial(SYNC)
    [record] = caplog.records
    assert "one request at a time" in record.getMessage()
    assert "-k gthread --threads 16" in record.getMessage()


def test_configure_logging_in_a_fresh_process() -> None:
    """With logging not set up, configure_logging() gives softlb's INFO lines time and level
    on stderr, or JSON lines; a program's own setup is left alone."""
    code = (
        "import logging, sys\n"
        "from softlb.logs import configure_logging\n"
        "if sys.argv[1] == 'mine': logging.basicConfig(format='MINE %(message)s')\n"
        "print(configure_logging(), flush=True)\n"
        "logging.getLogger('softlb.events').info('backend X added (weight 1)')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("SOFTLB_LOG_FORMAT", None)

    def run(mode: str, **extra: str) -> tuple[str, str]:
        done = subprocess.run(
            [sys.executable, "-c", code, mode],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout, done.stderr

    out, err = run("text")
    assert out == "True\n"
    assert line_pattern("INFO", "softlb.events", r"backend X added \(weight 1\)").fullmatch(
        err.strip()
    ), err
    out, err = run("text", SOFTLB_LOG_FORMAT="json")
    assert json.loads(err)["message"] == "backend X added (weight 1)"
    out, err = run("mine")
    assert out == "False\n"
    assert err == ""  # the program's root logger is at WARNING: its choice, kept


# -- under plain gunicorn -------------------------------------------------------------------------


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def gunicorn_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The worktree's softlb first; gunicorn's control socket kept in tmp_path."""
    return {
        "PYTHONPATH": str(ROOT / "src"),
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
        "SOFTLB_LOG_FORMAT": "",
        **extra,
    }


def fetch(port: int, method: str, target: str, body: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stop(running: object) -> str:
    """SIGTERM a launched gunicorn, wait for it, return its output."""
    from tests.integration.conftest import Running

    assert isinstance(running, Running)
    running.signal(signal.SIGTERM)
    assert running.wait() == 0
    return running.output()


@pytest.mark.integration
def test_plain_gunicorn_sync_worker(
    gunicorn: Launcher, tmp_path: Path, backend: TestBackend
) -> None:
    """Under `gunicorn 'softlb.wsgi:create_app(...)'` (the sync worker): softlb's lines carry
    time and level, an admin change is one INFO line, the unused listen is said at start, and
    the sync worker is warned about once (issue #14: items 2, 3 and 5)."""
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"servers": [backend.url], "health_check": {"path": "/health"}}))
    running = gunicorn(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-b",
            f"127.0.0.1:{port}",
            f'softlb.wsgi:create_app("{config}")',
        ],
        port=port,
        env=gunicorn_env(tmp_path),
    )
    added = json.dumps({"url": "http://127.0.0.1:9"})
    assert fetch(port, "GET", "/one")[0] == 200
    assert fetch(port, "POST", "/_softlb/servers", added)[0] == 201
    assert fetch(port, "GET", "/two")[0] == 200
    output = stop(running)
    assert "Traceback" not in output, output
    assert line_pattern(
        "INFO", "softlb.server", r"balancer ready .*not the config's listen \(127\.0\.0\.1:8080\)"
    ).search(output), output
    warnings = line_pattern("WARNING", "softlb.server", "gunicorn runs one request at a time.*")
    assert len(warnings.findall(output)) == 1, output
    added_lines = [line for line in output.splitlines() if "http://127.0.0.1:9 added" in line]
    assert len(added_lines) == 1, output
    assert line_pattern(
        "INFO", "softlb.events", r"backend http://127\.0\.0\.1:9 added \(weight 1\)"
    ).fullmatch(added_lines[0])


@pytest.mark.integration
def test_gunicorn_conf_example_logs_json(
    gunicorn: Launcher, tmp_path: Path, backend: TestBackend
) -> None:
    """examples/gunicorn.conf.py (gthread) sets up softlb's log: JSON lines with
    SOFTLB_LOG_FORMAT=json, and no sync-worker warning."""
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"servers": [backend.url], "health_check": {"path": "/health"}}))
    running = gunicorn(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(EXAMPLES / "gunicorn.conf.py"),
            "-b",
            f"127.0.0.1:{port}",
            "softlb.wsgi:create_app()",
        ],
        port=port,
        env=gunicorn_env(tmp_path, SOFTLB_CONFIG=str(config), SOFTLB_LOG_FORMAT="json"),
    )
    assert fetch(port, "DELETE", "/_softlb/servers", json.dumps({"url": backend.url}))[0] == 200
    output = stop(running)
    softlb_lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [d["event"] for d in softlb_lines if "event" in d] == ["removed"], output
    assert any(d.get("logger") == "softlb.server" for d in softlb_lines), output
    assert "one request at a time" not in output
    assert "[ERROR]" not in output and "Traceback" not in output, output


def test_probe_failures_in_words(refused_url: str) -> None:
    """A failed probe says the system's reason, not urllib3's exception reprs (issue #14)."""
    from softlb.backend import Backend
    from softlb.demo import DemoBackend
    from softlb.http.probe import HttpProbe

    probe = HttpProbe(timeout=2.0)
    assert probe(Backend(refused_url)).detail == "connect failed (connection refused)"
    broken = DemoBackend(1)
    try:
        broken.break_()
        detail = probe(Backend(broken.url)).detail
    finally:
        broken.stop()
    assert detail == "connection broken (the connection closed before an answer)"
