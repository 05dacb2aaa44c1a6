"""Property-based tests (Hypothesis) for the rules every input must meet: the config loader
never fails other than with a one-line-per-problem ConfigError, the one grammar of
``expected_status`` and ``hash_key`` agrees between the config and the library, and a client's
framing can never make the event-loop engine blame a backend or answer 5xx.

Example counts are bounded so the whole file runs in a few seconds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlb.aio.serve import running
from softlb.balancers.hashing import parse_hash_key
from softlb.config import parse_config
from softlb.errors import ConfigError
from softlb.probe import parse_status_ranges
from softlb.wsgi import Application
from tests.helpers.raw_backend import RawBackend

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
config_keys = st.sampled_from(
    [
        "listen", "algorithm", "servers", "health_check", "hash_key", "retries", "slow_start",
        "timeouts", "admin", "state", "cluster", "access_log", "access_log_format", "tls",
        "limits", "sticky", "listenPort", "healthCheckInterval", "nonsense",
    ]
)  # fmt: skip


@FAST
@given(st.dictionaries(config_keys, json_values, max_size=6))
def test_config_loader_never_fails_otherwise(data: dict[str, Any]) -> None:
    """Any JSON object is a Config or a ConfigError whose every problem is one line that
    starts with a key path."""
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert "\n" not in line
            assert ": " in line


status_items = st.one_of(
    st.integers(min_value=0, max_value=1000),
    st.from_regex(r"[0-9]{3}(-[0-9]{3})?|[0-9]xx|[a-z0-9 ,-]{0,8}", fullmatch=True),
)


@FAST
@given(st.one_of(status_items, st.lists(status_items, max_size=3)))
def test_expected_status_has_one_grammar(value: Any) -> None:
    """The config accepts an expected_status exactly when the health checker's parser does,
    and both read it the same."""
    try:
        ranges = parse_status_ranges(value)
    except ValueError:
        with pytest.raises(ConfigError):
            parse_config({"health_check": {"expected_status": value}})
        return
    config = parse_config({"health_check": {"expected_status": value}})
    assert config.health_check.expected_status == ranges


@FAST
@given(st.from_regex(r"(header|cookie|client_ip|path|x)(:[ A-Za-z0-9_-]{0,8})?", fullmatch=True))
def test_hash_key_has_one_grammar(value: str) -> None:
    """The config accepts a hash_key exactly when the strategy's parser does."""
    try:
        parse_hash_key(value)
    except ValueError:
        with pytest.raises(ConfigError):
            parse_config({"hash_key": value})
        return
    assert parse_config({"hash_key": value}).hash_key == value


# -- the event-loop engine and a client's framing -----------------------------------------------


@pytest.fixture(scope="module")
def engine_port() -> Iterator[tuple[int, RawBackend, Application]]:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend([ok]) as backend:
        app = Application(
            parse_config(
                {"servers": [backend.url], "health_check": {"enabled": False}, "retries": 0}
            )
        )
        try:
            with running(app, drain_timeout=1.0) as (_, port):
                yield port, backend, app
        finally:
            app.stop()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the whole request is sent: a short body ends here
        got = b""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and b"\r\n\r\n" not in got:
            try:
                more = sock.recv(4096)
            except (TimeoutError, ConnectionResetError):
                break
            if not more:
                break
            got += more
        return got


framing_values = st.one_of(
    st.integers(min_value=-5, max_value=2**70).map(str),
    st.from_regex(r"[0-9 +\-,a-z]{0,12}", fullmatch=True),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    length=st.none() | framing_values,
    encoding=st.none()
    | st.sampled_from(
        ["chunked", "gzip, chunked", "chunked, chunked", "identity", " chunked", "CHUNKED"]
    ),
    body=st.binary(max_size=40),
)
def test_client_framing_never_blames_a_backend(
    engine_port: tuple[int, RawBackend, Application],
    length: str | None,
    encoding: str | None,
    body: bytes,
) -> None:
    """Whatever Content-Length and Transfer-Encoding a client sends, the answer is the
    backend's 200 or the engine's 4xx/501 — never another 5xx — and the backend is never
    charged a failure."""
    port, _, app = engine_port
    head = b"POST /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if length is not None:
        head += b"Content-Length: " + length.encode() + b"\r\n"
    if encoding is not None:
        head += b"Transfer-Encoding: " + encoding.encode() + b"\r\n"
    answer = _exchange(port, head + b"\r\n" + body)
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status == 200 or 400 <= status < 500 or status == 501, answer[:100]
    assert app.pool.backends[0].failures == 0


def test_framing_answers(engine_port: tuple[int, RawBackend, Application]) -> None:
    """The property above can pass by answering nothing: these must get an answer."""
    port, _, _ = engine_port
    assert _exchange(
        port, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"
    ).startswith(b"HTTP/1.1 200")
    bad = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\nab"
    assert _exchange(port, bad).startswith(b"HTTP/1.1 400")
