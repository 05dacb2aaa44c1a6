"""Tests for softlb.access_log: the csv, combined and json formats, files and stdout (SPEC §2)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from softlb.access_log import FIELDS, AccessLog, wall_clock_of
from softlb.simulate import simulate

#: 2026-12-04 18:39:42.250 UTC.
ARRIVAL = 1796409582.25

#: nginx's combined format plus $upstream_addr $upstream_response_time, as a pattern.
COMBINED = re.compile(
    r"^(?P<addr>\S+) - (?P<user>\S+) "
    r"\[(?P<time>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) "(?P<referer>[^"]*)" '
    r'"(?P<agent>[^"]*)" (?P<upstream>\S+) (?P<upstream_time>\S+)$'
)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test with the process's time zone set to UTC (``$time_local`` follows it)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def full(log: AccessLog, **overrides: Any) -> None:
    """Record one typical proxied request, with ``overrides``."""
    values: dict[str, Any] = {
        "client": "192.0.2.7",
        "method": "GET",
        "target": "/a?b=1",
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes_sent": 512,
        "referer": "https://example.com/",
        "user_agent": "curl/8.5.0",
        "duration": 0.0145,
    }
    values.update(overrides)
    log.record(ARRIVAL, "u1", 0.0123, "http://10.0.0.1:8000", **values)
    log.close()


# ---------------------------------------------------------------------------------------- csv


def test_csv_rows_are_byte_compatible(tmp_path: Path) -> None:
    """The default format writes exactly what softlb 0.x wrote: header, then
    time,key,latency,backend with six decimals, quoted as CSV when needed."""
    path = tmp_path / "logs" / "access.csv"
    log = AccessLog(path)
    log.record(ARRIVAL, "u1", 0.0123, "http://10.0.0.1:8000")
    log.record(ARRIVAL + 1, None, 1.5, "http://10.0.0.2:8000")
    log.record(ARRIVAL + 2, 'a,"b"', 0.0, "http://10.0.0.1:8000")
    log.close()
    assert path.read_bytes() == (
        b"time,key,latency,backend\n"
        b"1796409582.250000,u1,0.012300,http://10.0.0.1:8000\n"
        b"1796409583.250000,,1.500000,http://10.0.0.2:8000\n"
        b'1796409584.250000,"a,""b""",0.000000,http://10.0.0.1:8000\n'
    )


def test_csv_keeps_appending_without_a_second_header(tmp_path: Path) -> None:
    """A second log on the same file (a restart) appends rows, not another header."""
    path = tmp_path / "access.csv"
    for n in range(2):
        log = AccessLog(path, "csv")
        log.record(ARRIVAL + n, f"k{n}", 0.1, "http://10.0.0.1:8000")
        log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(FIELDS)
    assert [line.split(",")[1] for line in lines[1:]] == ["k0", "k1"]


def test_csv_skips_answers_no_backend_gave(tmp_path: Path) -> None:
    """A 503 made by the proxy has no backend to replay: no row (and so no file yet)."""
    path = tmp_path / "access.csv"
    log = AccessLog(path)
    log.record(ARRIVAL, None, None, None, status=503)
    log.close()
    assert not path.exists()


def test_csv_replays_in_the_simulator(tmp_path: Path) -> None:
    """Rows written with every keyword argument still replay in softlb simulate --csv."""
    path = tmp_path / "access.csv"
    log = AccessLog(path)
    for i in range(5):
        log.record(
            ARRIVAL + i / 10,
            f"u{i}",
            0.01,
            f"http://10.0.0.{i % 2 + 1}:8000",
            client="127.0.0.1",
            method="GET",
            target="/",
            status=200,
        )
    log.close()
    report = simulate("recorded", csv_path=str(path), strategies=["round_robin"], seed=1)
    assert report.result("round_robin").answered == 5


# ----------------------------------------------------------------------------------- combined


def test_combined_line(tmp_path: Path, utc: None) -> None:
    """nginx's combined line, then the upstream's host:port and its time in seconds."""
    path = tmp_path / "access.log"
    full(AccessLog(path, "combined"))
    assert path.read_text() == (
        '192.0.2.7 - - [04/Dec/2026:18:39:42 +0000] "GET /a?b=1 HTTP/1.1" 200 512 '
        '"https://example.com/" "curl/8.5.0" 10.0.0.1:8000 0.012\n'
    )
    assert COMBINED.match(path.read_text().rstrip("\n"))


def test_combined_time_local_follows_the_time_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$time_local`` is local time with its offset, English month names."""
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        path = tmp_path / "access.log"
        full(AccessLog(path, "combined"))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    match = COMBINED.match(path.read_text().rstrip("\n"))
    assert match is not None
    assert match["time"] == "04/Dec/2026:13:39:42 -0500"


def test_combined_escapes_what_a_client_controls(tmp_path: Path, utc: None) -> None:
    """Quotes, backslashes, control and non-ASCII characters become \\xHH as nginx writes
    them, so a client cannot end a field or forge a second line; absent values are "-"."""
    path = tmp_path / "access.log"
    full(
        AccessLog(path, "combined"),
        referer=None,
        user_agent='evil" 200 "x\\\n127.0.0.1 - - é',
        target="/ä",
    )
    text = path.read_text()
    assert text.count("\n") == 1
    match = COMBINED.match(text.rstrip("\n"))
    assert match is not None
    assert match["referer"] == "-"
    assert match["agent"] == "evil\\x22 200 \\x22x\\x5C\\x0A127.0.0.1 - - \\xC3\\xA9"
    assert match["request"] == "GET /\\xC3\\xA4 HTTP/1.1"


def test_combined_without_a_backend(tmp_path: Path, utc: None) -> None:
    """An answer the proxy made itself (503): upstream address and time are "-"."""
    path = tmp_path / "access.log"
    log = AccessLog(path, "combined")
    log.record(ARRIVAL, client="::1", method="GET", target="/", status=503, bytes_sent=20)
    log.close()
    match = COMBINED.match(path.read_text().rstrip("\n"))
    assert match is not None
    assert (match["addr"], match["status"], match["upstream"], match["upstream_time"]) == (
        "::1",
        "503",
        "-",
        "-",
    )


def test_combined_upstream_without_port(tmp_path: Path, utc: None) -> None:
    """A backend URL without a port is logged with its scheme's default port."""
    path = tmp_path / "access.log"
    log = AccessLog(path, "combined")
    log.record(ARRIVAL, None, 0.5, "https://api.internal", method="GET", target="/", status=200)
    log.close()
    match = COMBINED.match(path.read_text().rstrip("\n"))
    assert match is not None
    assert (match["upstream"], match["upstream_time"]) == ("api.internal:443", "0.500")


# --------------------------------------------------------------------------------------- json


def test_json_line(tmp_path: Path) -> None:
    """One object per line with the documented keys and values."""
    path = tmp_path / "access.jsonl"
    full(AccessLog(path, "json"))
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "time": "2026-12-04T18:39:42.250Z",
        "client": "192.0.2.7",
        "method": "GET",
        "target": "/a?b=1",
        "status": 200,
        "bytes": 512,
        "backend": "http://10.0.0.1:8000",
        "upstream_time_ms": 12.3,
        "duration_ms": 14.5,
        "referer": "https://example.com/",
        "user_agent": "curl/8.5.0",
    }


def test_json_absent_values_are_null_and_lines_stay_single(tmp_path: Path) -> None:
    """No backend, referer or agent: null; a newline in a header value cannot split the line."""
    path = tmp_path / "access.jsonl"
    log = AccessLog(path, "json")
    log.record(ARRIVAL, method="GET", target="/", status=502, user_agent="a\nb")
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert (obj["backend"], obj["upstream_time_ms"], obj["referer"]) == (None, None, None)
    assert obj["user_agent"] == "a\nb"


# ------------------------------------------------------------------------ stdout, threads, errors


@pytest.mark.parametrize("log_format", ["csv", "combined", "json"])
def test_dash_writes_to_stdout_at_once(
    log_format: str, capsys: pytest.CaptureFixture[str], utc: None
) -> None:
    """ "-" writes to standard output, flushed line by line (seen before any close)."""
    log = AccessLog("-", log_format)
    log.record(ARRIVAL, "k", 0.01, "http://10.0.0.1:8000", method="GET", target="/", status=200)
    log.record(ARRIVAL, "k", 0.01, "http://10.0.0.1:8000", method="GET", target="/", status=200)
    out = capsys.readouterr().out.splitlines()
    if log_format == "csv":  # the header once, before the first row
        assert out[0] == ",".join(FIELDS)
        out = out[1:]
    assert len(out) == 2
    assert out[0] == out[1]
    log.close()  # standard output stays usable
    print("after")
    assert capsys.readouterr().out == "after\n"


def test_unknown_format_is_refused() -> None:
    """A format name that does not exist is a ValueError naming the choices."""
    with pytest.raises(ValueError, match="csv, combined, json"):
        AccessLog("-", "apache")


def test_lines_from_many_threads_stay_whole(tmp_path: Path) -> None:
    """Eight threads logging at once: every line complete, none lost."""
    path = tmp_path / "access.jsonl"
    log = AccessLog(path, "json")

    def write(n: int) -> None:
        for i in range(200):
            log.record(ARRIVAL, None, 0.001, "http://10.0.0.1:8000", target=f"/{n}/{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    log.close()
    targets = [json.loads(line)["target"] for line in path.read_text().splitlines()]
    assert sorted(targets) == sorted(f"/{n}/{i}" for n in range(8) for i in range(200))


def test_a_write_error_does_not_raise(tmp_path: Path) -> None:
    """A log that cannot be written (its directory is a file) never fails the request."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = AccessLog(blocker / "access.log", "combined")
    log.record(ARRIVAL, None, 0.1, "http://10.0.0.1:8000")
    log.close()
    assert blocker.read_text() == ""


def test_wall_clock_of() -> None:
    """A monotonic reading 2 s ago is the Unix time 2 s ago."""
    now = time.monotonic()
    assert abs(wall_clock_of(now - 2, now) - (time.time() - 2)) < 0.5
