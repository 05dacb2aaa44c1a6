"""A backend: one upstream server, its weight and its live statistics."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Final
from urllib.parse import urlsplit

from softlb.errors import InvalidBackend

__all__ = [
    "MAX_URL_LENGTH",
    "Backend",
    "normalize_url",
    "validate_max_connections",
    "validate_weight",
]

#: Largest weight accepted. HAProxy caps weights at 256 and nginx leaves them unbounded; a cap
#: keeps the weighted strategies' tables small and catches typos such as 10000000.
MAX_WEIGHT: Final = 10_000

#: Default smoothing time constant of the latency EWMA kept for every backend, in seconds.
#: Finagle's and linkerd's peak-EWMA use 10 s; see :mod:`softlb.balancers.ewma`.
EWMA_DECAY_SECONDS: Final = 10.0


#: Longest backend URL accepted. Browsers and servers cope with about 2 KiB of URL (RFC 9110
#: §4.1 recommends supporting at least 8000 octets of request target, but a backend's base
#: URL is a host and a short path); a longer one is a mistake or an attack, and it would be
#: echoed in every message and metric label.
MAX_URL_LENGTH: Final = 2048

#: Longest host name (RFC 1035 §2.3.4: 255 octets on the wire, 253 characters written out)
#: and longest label of one.
MAX_HOST_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63

#: Link-local addresses are refused as backends: 169.254.169.254 (fe80::a9fe:a9fe) is the
#: cloud metadata service, whose credentials must never be one admin call away, and a
#: link-local address means nothing without an interface anyway.
LINK_LOCAL: Final = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)

#: Characters RFC 3986 allows in a URL: unreserved, reserved and "%" (for escapes).
_URL_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%"
)

#: One label of a host name: letters, digits and hyphens, not starting or ending with a hyphen
#: (RFC 1123 §2.1; IDNs are written in their xn-- form).
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")

#: Longest URL quoted whole in a message; a longer one is shortened.
_SHOWN_MAX: Final = 80


def _shown(url: str) -> str:
    """``url`` quoted for a message, shortened when long (a 10,000-character host must not
    make a 10,000-character error)."""
    if len(url) > _SHOWN_MAX:
        return repr(url[: _SHOWN_MAX - 3] + "...")
    return repr(url)


def _split_netloc(netloc: str, shown: str) -> tuple[str, int | None]:
    """``(host, port)`` of a URL's authority without credentials; IPv6 in brackets."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise InvalidBackend(f"backend URL {shown} is malformed: an IPv6 address misses its ]")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidBackend(
                f"backend URL {shown} is malformed: {rest[:20]!r} after the IPv6 address; "
                "write http://[ADDRESS]:PORT"
            )
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = netloc.rpartition(":")
        if not sep:
            host, port_text = netloc, None
        else:
            port_text = port_text_
        if "[" in host or "]" in host:
            raise InvalidBackend(f"backend URL {shown} is malformed: stray [ or ] in the host")
        if ":" in host:
            raise InvalidBackend(
                f"backend URL {shown} is malformed: an IPv6 address must be in brackets, "
                "as in http://[::1]:8080"
            )
    if port_text is None:
        return host, None
    if not port_text:
        raise InvalidBackend(f"backend URL {shown} is malformed: ':' with no port after it")
    if not (port_text.isascii() and port_text.isdigit()):
        raise InvalidBackend(
            f"backend URL {shown} is malformed: port {port_text[:20]!r} is not a number "
            "from 1 to 65535"
        )
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidBackend(
            f"backend URL {shown} is malformed: port {int(port_text)} is out of range; "
            "use a port from 1 to 65535"
        )
    return host, port


def _check_host(host: str, shown: str) -> str:
    """The canonical spelling of a host name or IP literal, or raise InvalidBackend."""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if host.startswith("["):
        literal = host[1:-1]
        if "%" in literal:
            raise InvalidBackend(
                f"backend URL {shown} names an IPv6 zone; zones are only for link-local "
                "addresses, which cannot be backends"
            )
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise InvalidBackend(
                f"backend URL {shown} has {literal[:45]!r} in brackets, which is not an "
                "IPv6 address"
            ) from None
        canonical = f"[{address.compressed}]"
    else:
        if len(host) > MAX_HOST_LENGTH:
            raise InvalidBackend(
                f"backend URL {shown} has a host of {len(host)} characters; a host name has at "
                f"most {MAX_HOST_LENGTH}"
            )
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if labels[-1].isdigit():  # all-numeric top label: an IPv4 address or nothing
            try:
                address = ipaddress.IPv4Address(host)
            except ValueError:
                raise InvalidBackend(
                    f"backend URL {shown} has host {host[:45]!r}, which is not a valid IPv4 "
                    "address (four numbers from 0 to 255) nor a host name"
                ) from None
            canonical = str(address)
        else:
            for label in labels:
                if len(label) > MAX_LABEL_LENGTH or not _LABEL.fullmatch(label):
                    raise InvalidBackend(
                        f"backend URL {shown} has host {host[:45]!r}, which is not a valid host "
                        "name: use letters, digits and hyphens between dots (at most "
                        f"{MAX_LABEL_LENGTH} per label, no hyphen first or last), or an IP "
                        "address"
                    )
            canonical = host.lower()
    if address is not None:
        mapped = getattr(address, "ipv4_mapped", None)
        for candidate in (address, mapped):
            if candidate is not None and any(candidate in net for net in LINK_LOCAL):
                raise InvalidBackend(
                    f"backend URL {shown} names the link-local address {candidate}; "
                    "link-local addresses (169.254.0.0/16, fe80::/10, where cloud metadata "
                    "services live) cannot be backends"
                )
    return canonical


def normalize_url(url: object) -> str:
    """Return the canonical form of a backend URL, or raise :class:`InvalidBackend`.

    Only ``http://`` and ``https://`` URLs with a host are accepted, optionally with a port and
    a base path. The host must be a host name (labels of letters, digits and hyphens, 253
    characters at most), an IPv4 address or an IPv6 address in brackets, and not a link-local
    address (169.254.0.0/16, fe80::/10: the cloud metadata service); the port must be from 1
    to 65535. The scheme and host are lower-cased, IPv6 addresses written in their short
    form and a trailing ``/`` dropped, so that ``http://Example:80/`` and
    ``http://example:80`` name the same backend.
    """
    if not isinstance(url, str):
        raise InvalidBackend(f"backend URL must be a string, got {type(url).__name__}")
    text = url.strip()
    if not text:
        raise InvalidBackend("backend URL is empty")
    shown = _shown(url)
    if len(text) > MAX_URL_LENGTH:
        raise InvalidBackend(
            f"backend URL {shown} is {len(text)} characters long; at most {MAX_URL_LENGTH}"
        )
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise InvalidBackend(f"backend URL {shown} contains whitespace or control characters")
    bad = "".join(sorted(set(text) - _URL_CHARS))
    if bad:
        raise InvalidBackend(
            f"backend URL {shown} contains characters not allowed in a URL: {bad[:20]}"
        )
    if "://" not in text:
        example = text.lstrip("/")
        raise InvalidBackend(
            f"backend URL {shown} must start with http:// or https:// (the scheme is missing; "
            f"write http://{example[:60]})"
        )
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InvalidBackend(f"backend URL {shown} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidBackend(
            f"backend URL {shown} must start with http:// or https://"
            + (f" (got {parts.scheme[:20]}://)" if parts.scheme else " (the scheme is missing)")
        )
    netloc = parts.netloc
    if "@" in netloc:
        raise InvalidBackend(f"backend URL {shown} must not carry credentials")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise InvalidBackend(f"backend URL {shown} must not have a query or fragment")
    host, port = _split_netloc(netloc, shown)
    if not host or host == "[]":
        raise InvalidBackend(f"backend URL {shown} has no host")
    host = _check_host(host, shown)
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

    ``url`` is fixed at construction; ``weight`` changes only through
    :meth:`Pool.set_weight <softlb.pool.Pool.set_weight>`. The statistics (``active``,
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
        "origin",
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
    #: The configured URL this backend was discovered from (a ``"resolve": true`` server,
    #: see :mod:`softlb.discovery`), or ``None`` for a backend configured or added as is.
    origin: str | None

    def __init__(
        self,
        url: str,
        weight: int = 1,
        *,
        origin: str | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.weight = validate_weight(weight)
        self.origin = origin
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
        ewma = self._ewma
        if seconds >= ewma or not self._ewma_at:
            self._ewma = seconds
        else:
            elapsed = now - self._ewma_at  # (no max() call: this runs for every request)
            decay = math.exp(-elapsed / tau) if elapsed > 0.0 else 1.0
            self._ewma = ewma * decay + seconds * (1.0 - decay)
        self._ewma_at = now

    def as_dict(self) -> dict[str, object]:
        """The figures the admin API reports for this backend (``"from"``: its
        :attr:`origin`, only for a discovered backend)."""
        figures: dict[str, object] = {
            "url": self.url,
            "weight": self.weight,
            "healthy": self.healthy,
            "draining": self.draining,
            "active": self.active,
            "requests": self.requests,
            "failures": self.failures,
        }
        if self.origin is not None:
            figures["from"] = self.origin
        return figures

    def __repr__(self) -> str:
        state = "draining" if self.draining else ("healthy" if self.healthy else "down")
        return (
            f"<Backend {self.url} weight={self.weight} {state} | "
            f"{self.active} in flight, {self.requests} requests, {self.failures} failures>"
        )
