"""The access log has a line for every answer, the proxy's own 502 and 503 too (nginx logs
every request), on both engines: no backend (``null`` in JSON, ``-`` in the combined
format), the body's size, and the time the request took."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.engine.conftest import StartBalancer
from tests.helpers.servers import free_port

pytestmark = pytest.mark.integration


def _lines(path: Path, count: int) -> list[str]:
    """The log's lines once it has ``count`` (each worker appends whole lines)."""
    deadline = time.monotonic() + 5.0
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.05)
    return lines


@pytest.mark.parametrize("log_format", ["json", "combined"])
def test_answers_the_proxy_made_are_logged(
    balancer: StartBalancer, tmp_path: Path, log_format: str
) -> None:
    """A 502 (the only backend refuses connections) and a 503 (no backend left) each get
    their line, with no backend; the CSV format, which replays backends' answers, has none."""
    log = tmp_path / f"access-{log_format}.log"
    dead = f"http://127.0.0.1:{free_port()}"
    lb = balancer(
        {"servers": [dead], "retries": 0, "access_log": str(log),
         "access_log_format": log_format},
    )  # fmt: skip
    status, _, refused = lb.get("/refused", headers={"User-Agent": "probe/2"})
    assert status == 502
    status, _, _ = lb.request("DELETE", "/_softlb/servers", json.dumps({"url": dead}).encode())
    assert status == 200
    status, _, none = lb.get("/nothing-left")
    assert status == 503
    lines = _lines(log, 2)
    assert len(lines) == 2, lines
    if log_format == "json":
        first, second = (json.loads(line) for line in lines)
        assert (first["target"], first["status"], first["backend"]) == ("/refused", 502, None)
        assert (first["bytes"], first["user_agent"]) == (len(refused), "probe/2")
        assert first["upstream_time_ms"] is None and first["duration_ms"] >= 0
        assert (second["target"], second["status"], second["bytes"]) == (
            "/nothing-left", 503, len(none),
        )  # fmt: skip
    else:
        assert f'"GET /refused HTTP/1.1" 502 {len(refused)} "-" "probe/2" - -' in lines[0]
        assert f'"GET /nothing-left HTTP/1.1" 503 {len(none)} "-" "-" - -' in lines[1]
