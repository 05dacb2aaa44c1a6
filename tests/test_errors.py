"""Tests for softlb.errors: the error tree, the HTTP status of each error and its context."""

from __future__ import annotations

import pytest

from softlb.errors import (
    BackendExists,
    ConfigError,
    InvalidBackend,
    NoBackendAvailable,
    ProxyError,
    SoftLBError,
    UnknownBackend,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (ConfigError, (SoftLBError, ValueError)),
        (InvalidBackend, (SoftLBError, ValueError)),
        (BackendExists, (SoftLBError, KeyError)),
        (UnknownBackend, (SoftLBError, KeyError)),
        (ProxyError, (SoftLBError,)),
        (NoBackendAvailable, (ProxyError,)),
        (UpstreamError, (ProxyError,)),
        (UpstreamConnectError, (UpstreamError,)),
        (UpstreamTimeout, (UpstreamError,)),
        (UpstreamBroken, (UpstreamError,)),
    ],
)
def test_error_tree(error: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    """Each error sits where the module docstring draws it."""
    for base in bases:
        assert issubclass(error, base)


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (NoBackendAvailable, 503, "Service Unavailable"),
        (UpstreamError, 502, "Bad Gateway"),
        (UpstreamConnectError, 502, "Bad Gateway"),
        (UpstreamBroken, 502, "Bad Gateway"),
        (UpstreamTimeout, 504, "Gateway Timeout"),
    ],
)
def test_proxy_errors_know_their_status(error: type[ProxyError], status: int, reason: str) -> None:
    """Every proxy error carries the HTTP status and reason the client gets."""
    exc = error("backend slow", backend="http://a:1")
    assert (exc.status, exc.reason) == (status, reason)
    assert exc.backend == "http://a:1"
    assert str(exc) == "backend slow"


def test_proxy_error_backend_is_optional() -> None:
    """An error that concerns no particular backend has backend None."""
    assert NoBackendAvailable("nothing in rotation").backend is None


def test_config_error_lists_every_problem() -> None:
    """ConfigError keeps one line per problem and str() joins them."""
    exc = ConfigError(["servers[0]: bad URL", "retries: must be >= 0"])
    assert exc.problems == ["servers[0]: bad URL", "retries: must be >= 0"]
    assert str(exc) == "servers[0]: bad URL\nretries: must be >= 0"
    assert ConfigError("one").problems == ["one"]


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (BackendExists("backend http://a:1 is already in the pool"), "backend http://a:1 is"),
        (UnknownBackend("no backend http://a:1 in the pool"), "no backend http://a:1 in the"),
        (BackendExists(), "backend already present"),
        (UnknownBackend(), "unknown backend"),
    ],
)
def test_key_errors_print_plainly(exc: KeyError, text: str) -> None:
    """The KeyError subclasses print their message without KeyError's quotes."""
    assert str(exc).startswith(text)
    assert not str(exc).startswith("'")
