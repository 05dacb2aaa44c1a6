"""Tests for softlb.backend: URL normalisation, weight validation and a backend's statistics."""

from __future__ import annotations

import math

import pytest

from softlb.backend import EWMA_DECAY_SECONDS, MAX_WEIGHT, Backend, normalize_url, validate_weight
from softlb.errors import InvalidBackend


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("http://example.com", "http://example.com"),
        ("http://example.com/", "http://example.com"),
        ("HTTP://Example.COM:8080/", "http://example.com:8080"),
        ("https://10.0.0.1:443/api/", "https://10.0.0.1:443/api"),
        ("http://localhost:8081", "http://localhost:8081"),
        ("  http://localhost:8081\n", "http://localhost:8081"),
        ("http://host/base/path//", "http://host/base/path"),
        ("http://host/Mixed/Case", "http://host/Mixed/Case"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://[2001:DB8::1]/", "http://[2001:db8::1]"),
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
        ("http://[0:0::1]:80/", "http://[::1]:80"),
        ("http://backend-1.svc.cluster.local:65535", "http://backend-1.svc.cluster.local:65535"),
        ("http://host:1", "http://host:1"),
        ("http://host:080", "http://host:80"),
        ("http://192.168.0.10", "http://192.168.0.10"),
        ("http://" + "a" * 63 + ".example", "http://" + "a" * 63 + ".example"),
    ],
)
def test_normalize_url_accepts(url: str, normalized: str) -> None:
    """Good URLs get a lower-case scheme and host and lose any trailing slash."""
    assert normalize_url(url) == normalized


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://exa mple.com", "whitespace or control characters"),
        ("http://host\x00:80", "whitespace or control characters"),
        ("http://host\x7f", "whitespace or control characters"),
        ("http://host:99999", "port 99999 is out of range; use a port from 1 to 65535"),
        ("http://host:0", "port 0 is out of range; use a port from 1 to 65535"),
        ("http://host:", "':' with no port after it"),
        ("http://[::1]]:80", "is malformed"),
        ("http://::1:80", "an IPv6 address must be in brackets"),
        ("http://[not-v6]:80", "is malformed"),
        ("http://999.999.999.999", "not a valid IPv4 address"),
        ("http://10.0.0", "not a valid IPv4 address"),
        ("http://-leading.example", "not a valid host name"),
        ("http://under_score", "not a valid host name"),
        ("http://a..b", "not a valid host name"),
        ("http://" + "a" * 64 + ".example", "not a valid host name"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://[fe80::1]:80", "link-local"),
        ("http://[::ffff:169.254.1.1]", "link-local"),
        ("http://[fe80::1%25eth0]", "zone"),
        ("http://host:abc", "is malformed"),
        ("http://[::1", "is malformed"),
        ("ftp://host", "must start with http:// or https:// (got ftp://)"),
        ("example.com", "must start with http:// or https://"),
        ("localhost:8080", "the scheme is missing; write http://localhost:8080"),
        ("//host:8080", "must start with http:// or https://"),
        ("http://", "has no host"),
        ("http:///path", "has no host"),
        ("http://user:secret@host", "must not carry credentials"),
        ("http://user@host", "must not carry credentials"),
        ("http://host/?q=1", "must not have a query or fragment"),
        ("http://host/#top", "must not have a query or fragment"),
        ("http://host?", "must not have a query or fragment"),
        ("http://host#", "must not have a query or fragment"),
    ],
)
def test_normalize_url_rejects_and_names_the_url(url: str, message: str) -> None:
    """A bad URL raises InvalidBackend whose message quotes the URL and says what is wrong."""
    with pytest.raises(InvalidBackend) as info:
        normalize_url(url)
    assert message in str(info.value)
    assert repr(url) in str(info.value)


def test_a_huge_host_is_refused_with_a_short_message() -> None:
    """A 10,000-character host is refused, and the message quotes only the URL's start."""
    for url in ("http://" + "a" * 10_000, "http://" + "a." * 130 + "com"):
        with pytest.raises(InvalidBackend) as info:
            normalize_url(url)
        assert len(str(info.value)) < 300
        assert "characters" in str(info.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "backend URL is empty"),
        ("   ", "backend URL is empty"),
        (None, "backend URL must be a string, got NoneType"),
        (8080, "backend URL must be a string, got int"),
        (b"http://host", "backend URL must be a string, got bytes"),
    ],
)
def test_normalize_url_rejects_empty_and_non_strings(url: object, message: str) -> None:
    """An empty or non-string URL raises InvalidBackend saying so."""
    with pytest.raises(InvalidBackend, match=message):
        normalize_url(url)


def test_invalid_backend_is_a_value_error() -> None:
    """InvalidBackend can be caught as ValueError by code that knows nothing of softlb."""
    with pytest.raises(ValueError, match="has no host"):
        Backend("http://")


@pytest.mark.parametrize("weight", [1, 2, 100, MAX_WEIGHT])
def test_validate_weight_accepts(weight: int) -> None:
    """Integers from 1 to MAX_WEIGHT are returned unchanged."""
    assert validate_weight(weight) == weight


@pytest.mark.parametrize(
    "weight",
    [0, -1, MAX_WEIGHT + 1, 10**100, True, False, 1.0, 2.5, math.nan, math.inf, "3", None, [1]],
)
def test_validate_weight_rejects(weight: object) -> None:
    """Bools, floats, strings, zero, negatives and huge numbers are refused with the value."""
    with pytest.raises(InvalidBackend) as info:
        validate_weight(weight)
    assert f"weight must be an integer from 1 to {MAX_WEIGHT}" in str(info.value)
    assert str(weight)[:20] in str(info.value)


def test_backend_defaults() -> None:
    """A new backend is healthy, not draining, idle, at full weight and without latency."""
    backend = Backend("HTTP://Example.com:8000/")
    assert backend.url == "http://example.com:8000"
    assert backend.weight == 1
    assert backend.eff_weight == 1.0
    assert (backend.active, backend.requests, backend.failures) == (0, 0, 0)
    assert backend.consecutive_failures == 0
    assert backend.healthy
    assert not backend.draining
    assert backend.in_rotation
    assert backend.latency is None


def test_backend_validates_its_weight() -> None:
    """Backend() refuses a bad weight with the same message as validate_weight."""
    with pytest.raises(InvalidBackend, match="got 0"):
        Backend("http://host", weight=0)
    assert Backend("http://host", weight=7).eff_weight == 7.0


@pytest.mark.parametrize(
    ("healthy", "draining", "in_rotation"),
    [(True, False, True), (False, False, False), (True, True, False), (False, True, False)],
)
def test_in_rotation_needs_healthy_and_not_draining(
    healthy: bool, draining: bool, in_rotation: bool
) -> None:
    """A backend is in rotation only when it is healthy and not draining."""
    backend = Backend("http://host")
    backend.healthy, backend.draining = healthy, draining
    assert backend.in_rotation is in_rotation


def test_backend_has_no_instance_dict() -> None:
    """Backends use __slots__, so a typo in an attribute name fails instead of being stored."""
    backend = Backend("http://host")
    with pytest.raises(AttributeError):
        backend.helthy = False  # type: ignore[attr-defined]


def test_as_dict_reports_the_admin_figures() -> None:
    """as_dict() holds exactly the figures the admin API shows."""
    backend = Backend("http://host:1", weight=3)
    backend.active, backend.requests, backend.failures = 2, 10, 1
    assert backend.as_dict() == {
        "url": "http://host:1",
        "weight": 3,
        "healthy": True,
        "draining": False,
        "active": 2,
        "requests": 10,
        "failures": 1,
    }


@pytest.mark.parametrize(
    ("healthy", "draining", "word"),
    [(True, False, "healthy"), (False, False, "down"), (True, True, "draining")],
)
def test_backend_repr(healthy: bool, draining: bool, word: str) -> None:
    """The repr shows URL, weight, state and counters at a glance."""
    backend = Backend("http://host:1", weight=2)
    backend.healthy, backend.draining = healthy, draining
    backend.active, backend.requests, backend.failures = 1, 5, 2
    assert repr(backend) == (
        f"<Backend http://host:1 weight=2 {word} | 1 in flight, 5 requests, 2 failures>"
    )


def test_first_latency_sample_is_taken_as_is() -> None:
    """The first sample becomes the estimate."""
    backend = Backend("http://host")
    backend.observe_latency(0.25, now=100.0)
    assert backend.latency == 0.25


def test_slower_sample_replaces_the_estimate_at_once() -> None:
    """A sample above the estimate is the new estimate (the "peak" of peak-EWMA)."""
    backend = Backend("http://host")
    backend.observe_latency(0.01, now=100.0)
    backend.observe_latency(2.0, now=100.5)
    assert backend.latency == 2.0


def test_faster_sample_is_blended_by_elapsed_time() -> None:
    """A lower sample pulls the estimate down with weight 1 - exp(-dt/tau)."""
    backend = Backend("http://host")
    backend.observe_latency(1.0, now=100.0)
    backend.observe_latency(0.0, now=100.0 + EWMA_DECAY_SECONDS)
    assert backend.latency == pytest.approx(math.exp(-1.0))


def test_faster_sample_at_the_same_instant_changes_nothing() -> None:
    """With no time elapsed a lower sample has no weight."""
    backend = Backend("http://host")
    backend.observe_latency(1.0, now=100.0)
    backend.observe_latency(0.1, now=100.0)
    assert backend.latency == 1.0


def test_a_slow_spell_is_forgotten_over_a_few_time_constants() -> None:
    """After 3 tau of fast samples, a 1 s peak has decayed to about 5 % of itself."""
    backend = Backend("http://host")
    backend.observe_latency(1.0, now=100.0)
    for second in range(1, 31):
        backend.observe_latency(0.01, now=100.0 + second)
    expected = 0.01 + 0.99 * math.exp(-30 / EWMA_DECAY_SECONDS)
    assert backend.latency == pytest.approx(expected)
    assert backend.latency is not None and backend.latency < 0.07


def test_latency_time_constant_can_be_given() -> None:
    """observe_latency honours a custom tau."""
    backend = Backend("http://host")
    backend.observe_latency(1.0, now=100.0)
    backend.observe_latency(0.0, now=101.0, tau=1.0)
    assert backend.latency == pytest.approx(math.exp(-1.0))
