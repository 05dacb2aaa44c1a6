"""A backend: one upstream server, its weight and its live statistics."""

from __future__ import annotations

import math
from typing import Final
from urllib.parse import urlsplit

from softlb.errors import InvalidBackend

__all__ = ["Backend", "normalize_url", "validate_max_connections", "validate_weight"]

#: Largest weight accepted. HAProxy caps weights at 256 and nginx leaves them unbounded; a cap
#: keeps the weighted strategies' tables small and catches typos such as 10000000.
MAX_WEIGHT: Final = 10_000

#: Default smoothing time constant of the latency EWMA kept for every backend, in seconds.
#: Finagle's and linkerd's peak-EWMA use 10 s; see :mod:`softlb.balancers.ewma`.
EWMA_DECAY_SECONDS: Final = 10.0


#: Characters RFC 3986 allows in a URL: unreserved, reserved and "%" (for escapes).
_URL_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%"
)


def normalize_url(url: object) -> str:
    """Return the canonical form of a backend URL, or raise :class:`InvalidBackend`.

    Only ``http://`` and ``https://`` URLs with a host are accepted, optionally with a port and
    a base path; the scheme and host are lower-cased and a trailing ``/`` is dropped, so that
    ``http://Example:80/`` and ``http://example:80`` name the same backend.
    """
    if not isinstance(url, str):
        raise InvalidBackend(f"backend URL must be a string, got {type(url).__name__}")
    text = url.strip()
    if not text:
        raise InvalidBackend("backend URL is empty")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise InvalidBackend(f"backend URL {url!r} contains whitespace or control characters")
    bad = "".join(sorted(set(text) - _URL_CHARS))
    if bad:
        raise InvalidBackend(f"backend URL {url!r} contains characters not allowed in a URL: {bad}")
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidBackend(f"backend URL {url!r} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidBackend(
            f"backend URL {url!r} must start with http:// or https://"
            + (f" (got {parts.scheme}://)" if parts.scheme else "")
        )
    host = parts.hostname
    if not host:
        raise InvalidBackend(f"backend URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidBackend(f"backend URL {url!r} must not carry credentials")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise InvalidBackend(f"backend URL {url!r} must not have a query or fragment")
    if ":" in host:  # IPv6 literal: keep the brackets
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"


def validate_weight(weight: object) -> int:
    """Return ``weight`` if it is an integer from 1 to :data:`MAX_WEIGHT`, else raise."""
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise InvalidBackend(f"weight must be an integer from 1 to {MAX_WEIGHT}, got {weight!r}")
    if not 1 <= weight <= MAX_WEIGHT:
        raise InvalidBackend(f"weight must be an integer from 1 to {MAX_WEIGHT}, got {weight}")
    return weight


def validate_max_connections(limit: object) -> int | None:
    """Return ``limit`` if it is ``None`` (no limit) or an integer of at least 1, else raise."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidBackend(f"max_connections must be an integer >= 1, got {limit!r}")
    return limit


class Backend:
    """One upstream server and its live statistics.

    ``url`` and ``weight`` are fixed at construction. The statistics (``active``,
    ``requests``, ``failures``, ``consecutive_failures``, ``latency``, ``healthy``) are
    maintained by the :class:`~softlb.pool.Pool` the backend belongs to, under the pool's
    lock; read them freely, they are plain attributes.
    """

    __slots__ = (
        "_ewma",
        "_ewma_at",
        "_lc_key",
        "_pool_id",
        "_ramp_from",
        "_slot",
        "active",
        "consecutive_failures",
        "draining",
        "eff_weight",
        "failures",
        "healthy",
        "max_connections",
        "requests",
        "shared_active",
        "url",
        "weight",
    )

    url: str
    weight: int
    #: Requests currently in flight (leases not yet released).
    active: int
    #: Requests completed or failed through the pool (health probes are not counted).
    requests: int
    #: Requests that ended in failure.
    failures: int
    #: Failures since the last success; reset by any success.
    consecutive_failures: int
    #: In rotation as far as health goes (active and passive checks).
    healthy: bool
    #: Taken out of rotation by an operator; in-flight requests finish.
    draining: bool
    #: At most this many requests in flight to this backend from this host (``None``: no
    #: limit). A pick skips a backend at its limit; when every eligible backend is at its
    #: limit the request waits in the pool's queue (see :meth:`Pool.lease
    #: <softlb.pool.Pool.lease>`). Give it before the backend joins a pool; change it
    #: later with :meth:`Pool.set_max_connections <softlb.pool.Pool.set_max_connections>`.
    max_connections: int | None
    #: Weight after slow start; equal to ``weight`` outside a ramp.
    eff_weight: float
    #: Requests in flight on this backend from the *other* processes sharing the pool's state
    #: (other workers of the host, other hosts); refreshed a few times a second, 0 alone.
    shared_active: int

    def __init__(self, url: str, weight: int = 1, *, max_connections: int | None = None) -> None:
        self.url = normalize_url(url)
        self.weight = validate_weight(weight)
        self.max_connections = validate_max_connections(max_connections)
        self.eff_weight = float(self.weight)
        self.active = 0
        self.shared_active = 0
        self.requests = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.healthy = True
        self.draining = False
        self._ewma = 0.0  # seconds; 0.0 means "no sample yet"
        self._ewma_at = 0.0
        self._lc_key: float | None = None  # bucket key while indexed by LeastConnections
        self._pool_id: int | None = None  # id() of the owning pool, to refuse sharing
        self._ramp_from: float | None = None  # monotonic start of a slow-start ramp
        self._slot: int | None = None  # column in the host's shared in-flight table

    @property
    def latency(self) -> float | None:
        """Peak-EWMA of response latency in seconds, or ``None`` before the first sample."""
        return self._ewma if self._ewma_at else None

    @property
    def in_rotation(self) -> bool:
        """Whether new requests may be sent here: healthy and not draining."""
        return self.healthy and not self.draining

    def observe_latency(self, seconds: float, now: float, tau: float = EWMA_DECAY_SECONDS) -> None:
        """Fold one latency sample into the peak-EWMA estimate.

        A sample above the estimate replaces it at once (the "peak"); a lower one pulls it down
        with weight ``1 - exp(-dt/tau)``, so the estimate forgets a slow spell over about
        ``tau`` seconds. The caller holds the pool's lock.
        """
        if not self._ewma_at or seconds >= self._ewma:
            self._ewma = seconds
        else:
            decay = math.exp(-max(now - self._ewma_at, 0.0) / tau)
            self._ewma = self._ewma * decay + seconds * (1.0 - decay)
        self._ewma_at = now

    def as_dict(self) -> dict[str, object]:
        """The figures the admin API reports for this backend."""
        return {
            "url": self.url,
            "weight": self.weight,
            "healthy": self.healthy,
            "draining": self.draining,
            "active": self.active,
            "requests": self.requests,
            "failures": self.failures,
        }

    def __repr__(self) -> str:
        state = "draining" if self.draining else ("healthy" if self.healthy else "down")
        return (
            f"<Backend {self.url} weight={self.weight} {state} | "
            f"{self.active} in flight, {self.requests} requests, {self.failures} failures>"
        )
