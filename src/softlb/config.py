"""The JSON config file: read it, check every key, and return frozen dataclasses.

:func:`load_config` reads a file, :func:`parse_config` validates data already decoded. Both raise
one :class:`~softlb.errors.ConfigError` whose ``problems`` hold one line per problem, all of them
at once, each shaped ``<key path>: <what is wrong>; <what is allowed>``::

    health_check.intervall: unknown key (did you mean "interval"?); allowed: path, interval, ...
    servers[2].weight: must be an integer from 1 to 10000, got 0

The contract is SPEC §2. Where it is silent this module does what an nginx or HAProxy user
expects, and says so where the rule is written: unknown keys are errors (a typo must never be
silently ignored), so is a key given twice in one JSON object, and so is a setting given under
both its canonical name and an alias (``listen`` and ``listenPort``), since either one silently
winning would hide a mistake.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from softlb.backend import MAX_WEIGHT, normalize_url, validate_weight
from softlb.balancers import BALANCERS
from softlb.balancers.hashing import parse_hash_key
from softlb.durations import _show, parse_duration
from softlb.errors import ConfigError, InvalidBackend
from softlb.probe import parse_status_ranges
from softlb.state.base import MAX_SLOTS

__all__ = [
    "ALGORITHMS",
    "AdminConfig",
    "BackendTlsConfig",
    "Config",
    "ACCESS_LOG_FORMATS",
    "HealthCheckConfig",
    "LimitsConfig",
    "MAX_RETRIES",
    "ServerSpec",
    "StickyConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "access_log_problem",
    "load_config",
    "parse_config",
    "listens_clash",
    "parse_listen",
    "tls_problem",
]

#: Every balancing algorithm a config may name, exactly as it must be spelled.
ALGORITHMS: tuple[str, ...] = (
    "least_connections",
    "round_robin",
    "weighted_round_robin",
    "random",
    "power_of_two_choices",
    "consistent_hash",
    "peak_ewma",
)

#: Largest ``retries`` accepted. Each retry goes to another backend, so more than a handful
#: turns one failing request into a retry storm across the pool; nginx's
#: ``proxy_next_upstream_tries`` and HAProxy's ``retries`` are typically set to 1-3.
MAX_RETRIES: Final = 10

#: Longest ``cluster`` name: it prefixes every key in a shared store, so keep it short.
MAX_CLUSTER_LENGTH: Final = 100


#: Where a listen address without a host binds: every interface, as nginx does for ``listen 80``.
_ALL_INTERFACES: Final = "0.0.0.0"

_TOP_KEYS: Final = (
    "listen",
    "algorithm",
    "servers",
    "health_check",
    "hash_key",
    "retries",
    "slow_start",
    "timeouts",
    "admin",
    "state",
    "cluster",
    "access_log",
    "access_log_format",
    "tls",
    "backend_tls",
    "limits",
    "sticky",
)
#: Alternative names the seed project used, mapped to the setting they stand for.
_LISTEN_NAMES: Final = ("listen", "listenPort", "port")
_INTERVAL_ALIAS: Final = "healthCheckInterval"
_TOP_ALIASES: Final = ("listenPort", "port", _INTERVAL_ALIAS)
_SERVER_KEYS: Final = ("url", "weight", "max_connections", "resolve")
_HEALTH_KEYS: Final = (
    "path",
    "interval",
    "timeout",
    "rise",
    "fall",
    "expected_status",
    "initial_state",
    "enabled",
)
_TIMEOUT_KEYS: Final = (
    "connect",
    "read",
    "client_header",
    "keepalive",
    "tunnel",
    "client_body",
    "queue",
)
_ADMIN_KEYS: Final = ("token", "prefix", "seed_routes", "allow", "listen")
_TLS_KEYS: Final = ("certfile", "keyfile")
_BACKEND_TLS_KEYS: Final = ("ca_file",)
_LIMIT_KEYS: Final = ("max_connections", "max_header_bytes")
_STICKY_KEYS: Final = ("cookie",)

#: The access log's line formats (SPEC §2).
ACCESS_LOG_FORMATS: Final = ("csv", "combined", "json")

#: Bounds of ``limits.*``: a worker holds at most this many client connections, and a request
#: head may be this large (nginx's large_client_header_buffers tops out around these sizes).
_MAX_CONNECTIONS_RANGE: Final = (1, 1_000_000)
_MAX_HEADER_BYTES_RANGE: Final = (1024, 1_048_576)
#: Most requests in flight one server's ``max_connections`` may allow.
_MAX_BACKEND_CONNECTIONS: Final = 100_000

# RFC 9110 §5.6.2 token: what a header name (and an RFC 6265 cookie name) may be made of.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT_DIGITS: Final = re.compile(r"[0-9]{1,5}")
_CLUSTER: Final = re.compile(r"[A-Za-z0-9_.:-]+")
_SIMPLE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")

_LISTEN_ALLOWED: Final = 'use "HOST:PORT", ":PORT" or a port number, like "127.0.0.1:8080"'
_STATE_ALLOWED: Final = (
    'use "memory", "sqlite:///relative/path", "sqlite:////absolute/path" or "redis://HOST:PORT/DB"'
)
_HASH_KEY_ALLOWED: Final = 'use "client_ip", "path", "header:NAME" or "cookie:NAME"'

_T = TypeVar("_T")


class _Invalid(Exception):
    """One problem with one value; the message has no key path, the caller adds it."""


class _Missing:
    """Type of :data:`_MISSING`, the marker for "this key is not in the file"."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


# --------------------------------------------------------------------------- the dataclasses


@dataclass(frozen=True)
class ServerSpec:
    """One backend listed in the config: its URL (already normalized) and weight.

    ``max_connections`` caps the requests in flight to it from one host (``None``: no cap);
    ``resolve`` makes every address its host name resolves to a backend of its own (SPEC §2).
    """

    url: str
    weight: int = 1
    max_connections: int | None = None
    resolve: bool = False


@dataclass(frozen=True)
class HealthCheckConfig:
    """How backends are probed (SPEC §4): ``GET path`` every ``interval`` seconds.

    ``expected_status`` holds inclusive ``(low, high)`` ranges of the statuses that count as a
    pass; ``rise`` passes in a row put a backend back in rotation, ``fall`` failures take it out.
    """

    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    expected_status: tuple[tuple[int, int], ...] = ((200, 399),)
    initial_state: str = "up"
    enabled: bool = True

    def status_ok(self, status: int) -> bool:
        """Whether a probe answered with ``status`` passes."""
        return any(low <= status <= high for low, high in self.expected_status)


@dataclass(frozen=True)
class TimeoutsConfig:
    """Seconds allowed to connect to a backend, and to wait for each read of its answer;
    and, for the event-loop engine, the client side's: the whole request head
    (``client_header``), an idle keep-alive connection (``keepalive``), an idle upgraded
    connection (``tunnel``), a pause in a request body (``client_body``), and the wait for a
    backend at its ``max_connections`` (``queue``; 0 means do not wait)."""

    connect: float = 2.0
    read: float = 30.0
    client_header: float = 10.0
    keepalive: float = 5.0
    tunnel: float = 3600.0
    client_body: float = 30.0
    queue: float = 5.0


@dataclass(frozen=True)
class AdminConfig:
    """The admin API: bearer ``token`` (``None`` = no auth), URL ``prefix``, seed routes on/off,
    the addresses that may call it without a token besides loopback (``allow``, normalized
    networks like ``"10.0.0.0/8"``), and its own ``listen`` address (``HOST:PORT``) if any."""

    token: str | None = None
    prefix: str = "/_softlb"
    seed_routes: bool = True
    allow: tuple[str, ...] = ()
    listen: str | None = None


@dataclass(frozen=True)
class TlsConfig:
    """The listener's certificate chain and private key, PEM files (SPEC §2 ``tls``)."""

    certfile: str
    keyfile: str


@dataclass(frozen=True)
class BackendTlsConfig:
    """How ``https://`` backends are checked (``backend_tls``): ``ca_file``, a PEM file of
    the authorities their certificates must chain to; ``None``: the system's CAs (which
    OpenSSL's ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` can point elsewhere)."""

    ca_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies backends (certificate and host name) against
        :attr:`ca_file`, or the system's CAs."""
        return ssl.create_default_context(cafile=self.ca_file)


@dataclass(frozen=True)
class LimitsConfig:
    """Client connections per worker, and the largest request head in bytes."""

    max_connections: int = 10_000
    max_header_bytes: int = 65_536


@dataclass(frozen=True)
class StickyConfig:
    """Sticky sessions: the cookie that names the backend a client sticks to."""

    cookie: str


@dataclass(frozen=True)
class Config:
    """A whole validated config. Every field has the default SPEC §2 gives it.

    ``state`` is ``None`` when the file does not set it, so that the CLI can choose by the
    number of workers (``memory`` for one, a SQLite file for several). ``source`` is the
    file the config came from, if any, for messages.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    algorithm: str = "least_connections"
    servers: tuple[ServerSpec, ...] = ()
    health_check: HealthCheckConfig = HealthCheckConfig()
    hash_key: str = "client_ip"
    retries: int = 2
    slow_start: float = 0.0
    timeouts: TimeoutsConfig = TimeoutsConfig()
    admin: AdminConfig = AdminConfig()
    state: str | None = None
    cluster: str = "softlb"
    #: File (or ``"-"``, stdout) the proxy writes a line to per answered request.
    access_log: str | None = None
    #: ``csv`` (what ``softlb simulate --csv`` replays), ``combined`` or ``json``.
    access_log_format: str = "csv"
    tls: TlsConfig | None = None
    backend_tls: BackendTlsConfig = BackendTlsConfig()
    limits: LimitsConfig = LimitsConfig()
    sticky: StickyConfig | None = None
    source: str | None = None

    @property
    def listen(self) -> str:
        """The listen address as ``HOST:PORT``, an IPv6 host in brackets (``[::1]:8080``)."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


# --------------------------------------------------------------------------- message helpers


def _got(value: object) -> str:
    """``got <value>`` for a message, showing the value as it looks in JSON."""
    return f"got {_show(value)}"


def _key_text(key: object) -> str:
    """A key as it appears in a path: bare when simple, JSON-quoted otherwise."""
    if isinstance(key, str) and _SIMPLE_KEY.fullmatch(key):
        return key
    return _show(key) if isinstance(key, str) else _show(str(key))


def _join(path: str, key: object) -> str:
    """The path of ``key`` inside the object at ``path`` (``""`` is the top level)."""
    return f"{path}.{_key_text(key)}" if path else _key_text(key)


def _squash(name: str) -> str:
    """Fold case and separators so that ``healthCheck``, ``health-check`` and ``health_check``
    compare equal."""
    return re.sub(r"[-_\s]", "", name).lower()


#: What users of other proxies call a key: the suggestion for them, before any close spelling
#: (``backends`` is nearer ``backend_tls`` in letters than ``servers`` in meaning).
_SYNONYMS: Final = {
    "backends": "servers",
    "backend": "servers",
    "upstreams": "servers",
    "upstream": "servers",
}


def _suggest(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` for the choice closest to ``word``, or ``""`` if none is close."""
    if not isinstance(word, str):
        return ""
    options = list(choices)
    same = [c for c in options if _squash(c) == _squash(word)]
    synonym = [c for c in options if c == _SYNONYMS.get(word.lower())]
    close = same or synonym or difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, so that messages do not leak it."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"


# --------------------------------------------------------------------------- value checkers
# Each takes the raw value, returns the checked one or raises _Invalid with a message that has
# no key path; _Checker.field() adds the path and records the problem.


def _integer(value: object, low: int, high: int | None = None) -> int:
    """An int (bools and floats refused) from ``low`` to ``high`` inclusive."""
    bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer {bounds}, {_got(value)}")
    if value < low or (high is not None and value > high):
        raise _Invalid(f"must be an integer {bounds}, {_got(value)}")
    return value


def _boolean(value: object) -> bool:
    """``true`` or ``false``; ``0``, ``1`` and ``"yes"`` are refused."""
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, {_got(value)}")
    return value


def _choice(value: object, allowed: tuple[str, ...], what: str) -> str:
    """One of ``allowed``, spelled exactly."""
    listing = ", ".join(allowed)
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, {_got(value)}; allowed: {listing}")
    if value not in allowed:
        hint = _suggest(value, allowed)
        raise _Invalid(f"{_show(value)} is not a known {what}{hint}; allowed: {listing}")
    return value


def _http_path(value: object) -> str:
    """A request target for a probe: starts with ``/``, no spaces or control characters."""
    if not isinstance(value, str):
        raise _Invalid(f'must be a string, {_got(value)}; use a path like "/health"')
    if not value.startswith("/"):
        raise _Invalid(f'{_show(value)} does not start with "/"; use a path like "/health"')
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value) or "#" in value:
        raise _Invalid(
            f"{_show(value)} contains spaces, control characters or '#'; "
            'use a path like "/health" (percent-encode anything else)'
        )
    return value


def _status_ranges(value: object) -> tuple[tuple[int, int], ...]:
    """Statuses that pass a probe: the grammar of :func:`softlb.probe.parse_status_ranges`."""
    try:
        return parse_status_ranges(value)  # type: ignore[arg-type]  # it checks any value
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _hash_key(value: object) -> str:
    """``client_ip``, ``path``, ``header:NAME`` or ``cookie:NAME``: the grammar of
    :func:`softlb.balancers.hashing.parse_hash_key`, with a spelling hint."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, {_got(value)}; {_HASH_KEY_ALLOWED}")
    try:
        parse_hash_key(value)
    except ValueError as exc:
        kind = value.partition(":")[0]
        if kind in ("header", "cookie"):
            raise _Invalid(str(exc)) from None
        hint = _suggest(value, ("client_ip", "path"))
        raise _Invalid(f"{_show(value)} is not a hash key{hint}; {_HASH_KEY_ALLOWED}") from None
    return value


def _token(value: object) -> str | None:
    """An admin bearer token: ``null`` (no auth) or visible ASCII without spaces.

    The value is never echoed in a message: it is a secret.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"must be a string or null, got {_kind(value)}")
    if not value:
        raise _Invalid("is empty; use a non-empty string, or null for no authentication")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        raise _Invalid(
            "contains spaces, control or non-ASCII characters, which cannot travel in an "
            "Authorization header; use printable ASCII, e.g. the output of `openssl rand -hex 32`"
        )
    return value


def _kind(value: object) -> str:
    """The JSON type of a value, without showing the value (for secrets)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def _prefix(value: object) -> str:
    """The admin URL prefix: ``/something``, a trailing ``/`` dropped; ``/`` alone refused.

    ``/`` would put every path under the admin API and leave nothing to proxy.
    """
    if not isinstance(value, str):
        raise _Invalid(f'must be a string, {_got(value)}; use a path like "/_softlb"')
    if not value.startswith("/"):
        raise _Invalid(f'{_show(value)} does not start with "/"; use a path like "/_softlb"')
    prefix = value.rstrip("/")
    if not prefix:
        raise _Invalid(f'{_show(value)} would hide every proxied path; use a path like "/_softlb"')
    bad_char = any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix)
    segments = prefix[1:].split("/")
    if bad_char or any(c in prefix for c in "?#%") or any(s in ("", ".", "..") for s in segments):
        raise _Invalid(
            f"{_show(value)} is not a plain path; "
            'use letters, digits and "-._~" between slashes, like "/_softlb"'
        )
    return prefix


def _state(value: object) -> str | None:
    """Where shared state lives; only the shape is checked, nothing is connected to."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, {_got(value)}; {_STATE_ALLOWED}")
    text = value.strip()
    if text == "memory":
        return text
    if text.startswith("sqlite:"):
        file_path = text[len("sqlite:///") :] if text.startswith("sqlite:///") else ""
        if not file_path or file_path.endswith("/"):
            raise _Invalid(
                f"{_show(value)} has no file path; use "
                '"sqlite:///relative/path" or "sqlite:////absolute/path" (three or four slashes)'
            )
        return text
    if text.startswith(("redis://", "rediss://")):
        _check_redis(text)
        if importlib.util.find_spec("redis") is None:
            raise _Invalid(
                f"{_show(_redact(text))} needs the redis client, which is not installed; "
                'run: pip install "softlb[redis]"'
            )
        return text
    hint = _suggest(text.split(":", 1)[0], ("memory", "sqlite", "redis", "rediss"))
    raise _Invalid(f"{_show(_redact(text))} is not a supported store{hint}; {_STATE_ALLOWED}")


def _check_redis(url: str) -> None:
    """Check that a ``redis://`` URL has a host, a valid port if any, and a numeric DB if any."""
    shown = _show(_redact(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _Invalid(f"{shown} has an invalid port; use a port from 1 to 65535") from None
    if not parts.hostname:
        raise _Invalid(f'{shown} has no host; use "redis://HOST:PORT/DB"')
    if port == 0:
        raise _Invalid(f"{shown} has an invalid port; use a port from 1 to 65535")
    database = parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise _Invalid(f'{shown} has a database that is not a number; use "redis://HOST:PORT/0"')


def _access_log(value: object) -> str | None:
    """A file path for the CSV access log, or null for none."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise _Invalid(f"must be a file path (a non-empty string) or null, {_got(value)}")
    if value.endswith(("/", os.sep)):
        raise _Invalid(f'{_show(value)} is a directory; name a file, like "access.csv"')
    return value


def _cluster(value: object) -> str:
    """A name made of letters, digits and ``_.:-``, used to prefix keys in a shared store."""
    allowed = f'use 1 to {MAX_CLUSTER_LENGTH} of letters, digits and "_.:-"'
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, {_got(value)}; {allowed}")
    if not _CLUSTER.fullmatch(value) or len(value) > MAX_CLUSTER_LENGTH:
        raise _Invalid(f"{_show(value)} is not a valid cluster name; {allowed}")
    return value


# --------------------------------------------------------------------------- listen


def parse_listen(
    value: object, *, key: str = "listen", allow_port_zero: bool = False
) -> tuple[str, int]:
    """Return ``(host, port)`` for a listen address, or raise :class:`ConfigError` (one line).

    Accepted, as in nginx's ``listen``: ``"HOST:PORT"``, ``"[IPv6]:PORT"``, ``":PORT"`` or a
    bare port (an int or a digit string); the last two, and a host of ``*``, mean every IPv4
    interface (``0.0.0.0``). HOST is an IPv4 address or a host name; an IPv6 address needs its
    brackets so that its colons are not mistaken for the port's.

    Port 0 ("pick any free port") is refused by default, as nginx refuses it: clients could not
    find a balancer listening on an unknown port. ``allow_port_zero=True`` accepts it, for
    tests and tools that read the port back from the socket.
    """
    low = 0 if allow_port_zero else 1
    try:
        return _listen(value, low)
    except _Invalid as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _listen(value: object, low_port: int) -> tuple[str, int]:
    """The work of :func:`parse_listen`, raising :class:`_Invalid`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _ALL_INTERFACES, _port(value, low_port)
    if not isinstance(value, str):
        raise _Invalid(f"{_show(value)} is not a listen address; {_LISTEN_ALLOWED}")
    text = value.strip()
    if _PORT_DIGITS.fullmatch(text) or text.isdigit():
        return _ALL_INTERFACES, _port_text(text, low_port)
    if text.startswith("["):
        address, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise _Invalid(
                f'{_show(value)} has no port; write an IPv6 address as "[ADDRESS]:PORT", '
                'like "[::1]:8080"'
            )
        try:
            host = str(ipaddress.IPv6Address(address))
        except ValueError:
            raise _Invalid(
                f"{_show(value)} does not hold an IPv6 address in brackets; "
                'write it like "[::1]:8080"'
            ) from None
        return host, _port_text(port_text, low_port)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise _Invalid(f"{_show(value)} has no port; {_LISTEN_ALLOWED}")
    if ":" in host:
        raise _Invalid(
            f"{_show(value)} looks like an IPv6 address without brackets; "
            'write it like "[::1]:8080"'
        )
    port = _port_text(port_text, low_port)
    if host in ("", "*"):
        return _ALL_INTERFACES, port
    if not _valid_host(host):
        raise _Invalid(f"{_show(value)} does not start with a valid host; {_LISTEN_ALLOWED}")
    return host, port


#: Host names that are loopback on every machine (RFC 6761), as an address for comparing.
_LOOPBACK_NAMES: Final = {"localhost": "127.0.0.1", "localhost.": "127.0.0.1"}


def listens_clash(first: str, second: str) -> bool:
    """Whether two listen addresses (:func:`parse_listen`'s forms) would take the same port on
    one interface: the same port, and the same address, or one of them every interface
    (``0.0.0.0`` or ``::``). Names other than ``localhost`` are not looked up: ``softlb
    serve`` finds those by binding both (:func:`softlb.server.bindable_together`)."""
    try:
        host_a, port_a = parse_listen(first, allow_port_zero=True)
        host_b, port_b = parse_listen(second, allow_port_zero=True)
    except ConfigError:
        return False
    if port_a != port_b or port_a == 0:
        return False
    host_a = _LOOPBACK_NAMES.get(host_a.lower(), host_a)
    host_b = _LOOPBACK_NAMES.get(host_b.lower(), host_b)
    wildcard = {_ALL_INTERFACES, "::"}
    if host_a in wildcard or host_b in wildcard:
        # 0.0.0.0 and an IPv6 address are apart (Linux binds them both), "::" takes IPv4 too
        return (":" in host_a) == (":" in host_b) or "::" in (host_a, host_b)
    return host_a == host_b


def _valid_host(host: str) -> bool:
    """Whether ``host`` is an IPv4 address or an RFC 1123 host name."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _port_text(text: str, low: int) -> int:
    """A port written as ASCII digits (at most five, so that int() never sees a huge string)."""
    if not _PORT_DIGITS.fullmatch(text):
        shown = _show(text) if len(text) <= 20 else "that"
        raise _Invalid(f"port {shown} is not a number from {low} to 65535; {_LISTEN_ALLOWED}")
    return _port(int(text), low)


def _port(number: int, low: int) -> int:
    """A port number from ``low`` (1, or 0 when allowed) to 65535."""
    if not low <= number <= 65535:
        raise _Invalid(f"port {_show(number)} is out of range; use a port from {low} to 65535")
    return number


# --------------------------------------------------------------------------- the walk


class _Checker:
    """Collects every problem found while walking the config, so all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        """Record one problem at ``path``."""
        self.problems.append(f"{path}: {message}")

    def field(self, path: str, value: object, check: Callable[[object], _T]) -> _T | _Missing:
        """Run ``check`` on ``value``; on failure record the problem and return ``_MISSING``."""
        try:
            return check(value)
        except _Invalid as exc:
            self.add(path, str(exc))
        except ConfigError as exc:  # parse_duration / parse_listen already name the key
            self.problems.extend(exc.problems)
        return _MISSING

    def duration(self, path: str, value: object, *, allow_zero: bool) -> float | _Missing:
        """A duration (see :func:`~softlb.durations.parse_duration`) at ``path``."""
        return self.field(path, value, lambda v: parse_duration(v, key=path, allow_zero=allow_zero))

    def mapping(
        self,
        path: str,
        value: object,
        allowed: tuple[str, ...],
        *,
        example: str,
        aliases: tuple[str, ...] = (),
    ) -> dict[str, object] | None:
        """Check that ``value`` is an object with only known keys; return the known ones.

        Unknown keys and keys repeated in the JSON text are recorded as problems with their
        full path; the known keys are returned so that their values are still checked.
        """
        if not isinstance(value, Mapping):
            self.add(path, f"must be an object like {example}, {_got(value)}")
            return None
        for duplicate in getattr(value, "duplicates", ()):
            self.add(_join(path, duplicate), "is given more than once; write each key once")
        names = allowed + aliases
        listing = ", ".join(allowed)
        if aliases:
            listing += f" (and the aliases {', '.join(aliases)})"
        known: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str) and key in names:
                known[key] = item
            else:
                hint = _suggest(key, names)
                self.add(_join(path, key), f"unknown key{hint}; allowed: {listing}")
        return known


class _JSONObject(dict[str, object]):
    """A decoded JSON object that remembers which keys its text repeated.

    ``json`` keeps the last of repeated keys without a word; the config walk reports them
    instead, with their path, because two values for one key in a config is always a mistake.
    """

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, object]]) -> _JSONObject:
    """``object_pairs_hook`` for :func:`json.loads` that records repeated keys."""
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        obj.duplicates = tuple(repeated)
    return obj


def _servers(c: _Checker, value: object) -> tuple[ServerSpec, ...] | _Missing:
    """The ``servers`` list: URL strings or ``{"url": ..., "weight": N}``, no URL twice."""
    if not isinstance(value, (list, tuple)):
        c.add(
            "servers",
            f'must be a list of URLs or {{"url": ..., "weight": N}} objects, {_got(value)}',
        )
        return _MISSING
    specs: list[ServerSpec] = []
    first_index: dict[str, int] = {}
    ok = True
    for index, item in enumerate(value):
        path = f"servers[{index}]"
        url_path = path
        raw_url: object
        weight: int | _Missing = 1
        extra: dict[str, object] = {}
        if isinstance(item, str):
            raw_url = item
        elif isinstance(item, Mapping):
            fields = c.mapping(
                path, item, _SERVER_KEYS, example='{"url": "http://10.0.0.1:8000", "weight": 2}'
            )
            assert fields is not None  # item is a Mapping
            url_path = f"{path}.url"
            if "url" not in fields:
                c.add(url_path, 'is missing; every server object needs a "url"')
                ok = False
                continue
            raw_url = fields["url"]
            if "weight" in fields:
                weight = c.field(f"{path}.weight", fields["weight"], _weight)
            if "max_connections" in fields:
                extra["max_connections"] = c.field(
                    f"{path}.max_connections",
                    fields["max_connections"],
                    lambda v: _integer(v, 1, _MAX_BACKEND_CONNECTIONS),
                )
            if "resolve" in fields:
                extra["resolve"] = c.field(f"{path}.resolve", fields["resolve"], _boolean)
        else:
            c.add(
                path,
                f'must be a URL string or an object {{"url": ..., "weight": N}}, {_got(item)}',
            )
            ok = False
            continue
        url = c.field(url_path, raw_url, _url)
        if (
            isinstance(url, _Missing)
            or isinstance(weight, _Missing)
            or any(isinstance(v, _Missing) for v in extra.values())
        ):
            ok = False
            continue
        if extra.get("resolve") and _is_ip_literal(url):
            c.add(
                f"{path}.resolve",
                f"{_show(url)} names an IP address; resolve needs a host name to look up, "
                'like "http://web.internal:8000"',
            )
            ok = False
            continue
        if url in first_index:
            c.add(
                path,
                f"{_show(url)} is listed twice (also servers[{first_index[url]}]); "
                "list each backend once and use its weight to send it more traffic",
            )
            ok = False
            continue
        first_index[url] = index
        specs.append(ServerSpec(url=url, weight=weight, **extra))  # type: ignore[arg-type]
    if len(specs) > MAX_SLOTS:
        c.add("servers", f"lists {len(specs)} backends; a pool holds at most {MAX_SLOTS}")
        ok = False
    return tuple(specs) if ok else _MISSING


def _is_ip_literal(url: str) -> bool:
    """Whether the host of a normalized backend URL is an IP address."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _url(value: object) -> str:
    """A backend URL, normalized by :func:`~softlb.backend.normalize_url`."""
    try:
        return normalize_url(value)
    except InvalidBackend as exc:
        # Show the URL the way every other message shows values: JSON-quoted and shortened.
        message = str(exc).replace(repr(value), _show(value))
        raise _Invalid(f'{message}; use a URL like "http://10.0.0.1:8000"') from None


def _weight(value: object) -> int:
    """A backend weight, checked by :func:`~softlb.backend.validate_weight`."""
    try:
        return validate_weight(value)
    except InvalidBackend:
        raise _Invalid(f"must be an integer from 1 to {MAX_WEIGHT}, {_got(value)}") from None


def _health_check(
    c: _Checker, value: object, alias_interval: object
) -> HealthCheckConfig | _Missing:
    """The ``health_check`` object, with ``healthCheckInterval`` folded in as its interval."""
    fields: dict[str, object] = {}
    before = len(c.problems)
    if value is not _MISSING:
        checked = c.mapping(
            "health_check",
            value,
            _HEALTH_KEYS,
            example='{"path": "/health", "interval": "5s"} ({"enabled": false} turns checks off)',
        )
        fields = checked or {}  # not an object: still check healthCheckInterval below
    values: dict[str, object] = {}
    if alias_interval is not _MISSING:
        if "interval" in fields:
            c.add(
                _INTERVAL_ALIAS,
                "sets the same thing as health_check.interval; keep only one of them",
            )
        else:
            values["interval"] = c.duration(_INTERVAL_ALIAS, alias_interval, allow_zero=False)
    checks: dict[str, Callable[[object], object]] = {
        "path": _http_path,
        "rise": lambda v: _integer(v, 1),
        "fall": lambda v: _integer(v, 1),
        "expected_status": _status_ranges,
        "initial_state": lambda v: _choice(v, ("up", "down"), "initial state"),
        "enabled": _boolean,
    }
    for name, raw in fields.items():
        path = f"health_check.{name}"
        if name in ("interval", "timeout"):
            values[name] = c.duration(path, raw, allow_zero=False)
        else:
            values[name] = c.field(path, raw, checks[name])
    if len(c.problems) != before:
        return _MISSING
    return HealthCheckConfig(**values)  # type: ignore[arg-type]  # each value checked above


def _timeouts(c: _Checker, value: object) -> TimeoutsConfig | _Missing:
    """The ``timeouts`` object: durations above zero (``queue`` may be zero: no waiting)."""
    fields = c.mapping("timeouts", value, _TIMEOUT_KEYS, example='{"connect": "2s", "read": "30s"}')
    if fields is None:
        return _MISSING
    before = len(c.problems)
    values = {
        name: c.duration(f"timeouts.{name}", raw, allow_zero=name == "queue")
        for name, raw in fields.items()
    }
    if len(c.problems) != before:
        return _MISSING
    return TimeoutsConfig(**values)  # type: ignore[arg-type]  # each value checked above


def _admin(c: _Checker, value: object) -> AdminConfig | _Missing:
    """The ``admin`` object: ``token``, ``prefix`` and ``seed_routes``."""
    fields = c.mapping(
        "admin", value, _ADMIN_KEYS, example='{"token": "s3cret", "prefix": "/_softlb"}'
    )
    if fields is None:
        return _MISSING
    checks: dict[str, Callable[[object], object]] = {
        "token": _token,
        "prefix": _prefix,
        "seed_routes": _boolean,
        "listen": lambda v: _join_listen(parse_listen(v, key="admin.listen")),
    }
    before = len(c.problems)
    values: dict[str, object] = {}
    for name, raw in fields.items():
        if name == "allow":
            values[name] = _allow(c, raw)
        else:
            values[name] = c.field(f"admin.{name}", raw, checks[name])
    if len(c.problems) != before:
        return _MISSING
    return AdminConfig(**values)  # type: ignore[arg-type]  # each value checked above


def _join_listen(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _allow(c: _Checker, value: object) -> tuple[str, ...] | _Missing:
    """``admin.allow``: a list of IP addresses or CIDR blocks, normalized as networks."""
    example = '["10.0.0.0/8", "192.168.1.5"]'
    if not isinstance(value, (list, tuple)):
        c.add(
            "admin.allow",
            f"must be a list of addresses or CIDR blocks like {example}, {_got(value)}",
        )
        return _MISSING
    networks: list[str] = []
    ok = True
    for index, item in enumerate(value):
        path = f"admin.allow[{index}]"
        if not isinstance(item, str):
            c.add(path, f"must be an address or CIDR block as a string, {_got(item)}")
            ok = False
            continue
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            c.add(path, f"{_show(item)} is not an IP address or CIDR block; use one like {example}")
            ok = False
            continue
        networks.append(str(network))
    return tuple(networks) if ok else _MISSING


def _tls(c: _Checker, value: object) -> TlsConfig | _Missing:
    """``tls``: ``certfile`` and ``keyfile``, both PEM files that exist and can be read."""
    example = '{"certfile": "cert.pem", "keyfile": "key.pem"}'
    fields = c.mapping("tls", value, _TLS_KEYS, example=example)
    if fields is None:
        return _MISSING
    before = len(c.problems)
    for name in _TLS_KEYS:
        if name not in fields:
            c.add(f"tls.{name}", f"is missing; tls needs both, like {example}")
    values = {name: c.field(f"tls.{name}", raw, _readable_file) for name, raw in fields.items()}
    if len(c.problems) != before:
        return _MISSING
    tls = TlsConfig(**values)  # type: ignore[arg-type]  # each value checked above
    why = _tls_pair_problem(tls)
    if why is not None:
        c.add("tls", why)
        return _MISSING
    return tls


def _backend_tls(c: _Checker, value: object) -> BackendTlsConfig | _Missing:
    """``backend_tls``: ``ca_file``, a PEM file of CA certificates that OpenSSL can load."""
    example = '{"ca_file": "backend-ca.pem"}'
    fields = c.mapping("backend_tls", value, _BACKEND_TLS_KEYS, example=example)
    if fields is None:
        return _MISSING
    if "ca_file" not in fields:
        return BackendTlsConfig()
    ca_file = c.field("backend_tls.ca_file", fields["ca_file"], _readable_file)
    if isinstance(ca_file, _Missing):
        return _MISSING
    backend_tls = BackendTlsConfig(ca_file=ca_file)
    try:
        backend_tls.ssl_context()
    except ssl.SSLError as exc:
        c.add(
            "backend_tls.ca_file",
            f"{_show(ca_file)} holds no CA certificate in PEM ({exc.reason or exc})",
        )
        return _MISSING
    except OSError as exc:
        c.add("backend_tls.ca_file", f"cannot read {_show(ca_file)}: {exc.strerror or exc}")
        return _MISSING
    return backend_tls


def tls_problem(certfile: str, keyfile: str) -> str | None:
    """Why ``certfile`` and ``keyfile`` cannot serve TLS, or ``None``: what the config's
    ``tls`` is checked for, for the same files given another way (``--certfile/--keyfile``)."""
    for path in (certfile, keyfile):
        try:
            _readable_file(path)
        except _Invalid as exc:
            return str(exc)
    return _tls_pair_problem(TlsConfig(certfile, keyfile))


def access_log_problem(path: str) -> str | None:
    """Why the access log cannot be written to ``path``, or ``None`` (``"-"``, stdout, can).

    The file is opened for appending, and so created when missing, as ``nginx -t`` opens its
    logs: a directory that does not exist or cannot be written, or a file that cannot take
    lines, is found before the server starts instead of losing every line silently.
    """
    if path == "-":
        return None
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"cannot write the access log to {_show(path)}: {exc.strerror or exc}"
    return None


def _tls_pair_problem(tls: TlsConfig) -> str | None:
    """Why the certificate and key cannot serve TLS (as ``nginx -t`` checks), or ``None``.

    A key with a password is refused rather than prompted for: a server must start unattended.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile, password=lambda: b"")
    except ssl.SSLError as exc:
        return (
            f"{_show(tls.certfile)} and {_show(tls.keyfile)} are not a certificate chain and "
            f"its unencrypted private key in PEM ({exc.reason or exc})"
        )
    except OSError as exc:
        return f"cannot read the certificate or key: {exc.strerror or exc}"
    return None


def _readable_file(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise _Invalid(f"must be a file path (a non-empty string), {_got(value)}")
    if not os.path.isfile(value):
        raise _Invalid(f"{_show(value)}: no such file")
    if not os.access(value, os.R_OK):
        raise _Invalid(f"{_show(value)}: cannot read it (permission denied)")
    return value


def _limits(c: _Checker, value: object) -> LimitsConfig | _Missing:
    """``limits``: ``max_connections`` per worker and ``max_header_bytes``, integers."""
    fields = c.mapping(
        "limits",
        value,
        _LIMIT_KEYS,
        example='{"max_connections": 10000, "max_header_bytes": 65536}',
    )
    if fields is None:
        return _MISSING
    ranges = {
        "max_connections": _MAX_CONNECTIONS_RANGE,
        "max_header_bytes": _MAX_HEADER_BYTES_RANGE,
    }
    before = len(c.problems)
    values: dict[str, object] = {}
    for name, raw in fields.items():
        low, high = ranges[name]
        values[name] = c.field(
            f"limits.{name}", raw, functools.partial(_integer, low=low, high=high)
        )
    if len(c.problems) != before:
        return _MISSING
    return LimitsConfig(**values)  # type: ignore[arg-type]  # each value checked above


def _sticky(c: _Checker, value: object) -> StickyConfig | _Missing:
    """``sticky``: the ``cookie`` that names a client's backend."""
    example = '{"cookie": "SERVERID"}'
    fields = c.mapping("sticky", value, _STICKY_KEYS, example=example)
    if fields is None:
        return _MISSING
    if "cookie" not in fields:
        c.add("sticky.cookie", f"is missing; sticky sessions need a cookie name, like {example}")
        return _MISSING
    cookie = c.field("sticky.cookie", fields["cookie"], _cookie_name)
    if isinstance(cookie, _Missing):
        return _MISSING
    return StickyConfig(cookie=cookie)


def _cookie_name(value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or len(value) > 128:
        raise _Invalid(
            f"must be a cookie name (letters, digits and !#$%&'*+.^_`|~-), {_got(value)}"
        )
    return value


def parse_config(data: object, *, source: str | None = None) -> Config:
    """Validate decoded JSON ``data`` and return a :class:`Config`.

    Every problem is found before anything is raised: the :class:`ConfigError` lists them all,
    one line each. Absent keys take their defaults; ``source`` (the file name) is kept in
    :attr:`Config.source` and names the file when the top level is not an object. No other
    exception escapes, whatever ``data`` holds.
    """
    if not isinstance(data, Mapping):
        where = source or "config"
        raise ConfigError(
            f'{where}: the top level must be a JSON object like {{"servers": [...]}}, '
            f"got {_kind(data)}"
        )
    c = _Checker()
    top = c.mapping("", data, _TOP_KEYS, example="{}", aliases=_TOP_ALIASES)
    assert top is not None  # data is a Mapping
    values: dict[str, object] = {}

    given = [name for name in _LISTEN_NAMES if name in top]
    for extra in given[1:]:
        c.add(extra, f"sets the same thing as {given[0]} (the listen address); keep only one")
    if given:
        listen = c.field(given[0], top[given[0]], lambda v: parse_listen(v, key=given[0]))
        if not isinstance(listen, _Missing):
            values["listen_host"], values["listen_port"] = listen

    simple: dict[str, Callable[[object], object]] = {
        "algorithm": lambda v: _choice(v, tuple(BALANCERS), "algorithm"),
        "hash_key": _hash_key,
        "retries": lambda v: _integer(v, 0, MAX_RETRIES),
        "slow_start": lambda v: parse_duration(v, key="slow_start"),
        "state": _state,
        "cluster": _cluster,
        "access_log": _access_log,
        "access_log_format": lambda v: _choice(v, ACCESS_LOG_FORMATS, "access log format"),
    }
    for name, check in simple.items():
        if name in top:
            values[name] = c.field(name, top[name], check)
    if "servers" in top:
        values["servers"] = _servers(c, top["servers"])
    if "health_check" in top or _INTERVAL_ALIAS in top:
        values["health_check"] = _health_check(
            c, top.get("health_check", _MISSING), top.get(_INTERVAL_ALIAS, _MISSING)
        )
    if "timeouts" in top:
        values["timeouts"] = _timeouts(c, top["timeouts"])
    if "admin" in top:
        values["admin"] = _admin(c, top["admin"])
    if "tls" in top:
        values["tls"] = _tls(c, top["tls"])
    if "backend_tls" in top:
        values["backend_tls"] = _backend_tls(c, top["backend_tls"])
    if "limits" in top:
        values["limits"] = _limits(c, top["limits"])
    if "sticky" in top:
        values["sticky"] = _sticky(c, top["sticky"])
    admin = values.get("admin")
    if isinstance(admin, AdminConfig) and admin.listen is not None:
        proxy = (values.get("listen_host", "127.0.0.1"), values.get("listen_port", 8080))
        main = _join_listen(proxy)  # type: ignore[arg-type]
        if admin.listen == main:
            c.add("admin.listen", f"is the proxy's own listen address {main}; give it another")
        elif listens_clash(admin.listen, main):
            c.add(
                "admin.listen",
                f"{admin.listen} takes the port of the proxy's listen address {main} on the "
                "same interface; give it another port",
            )

    if c.problems:
        raise ConfigError(c.problems)
    return Config(source=source, **values)  # type: ignore[arg-type]  # each value checked above


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the JSON config file at ``path``.

    Raises :class:`ConfigError` with one line when the file cannot be read or is not JSON
    (``config.json: not valid JSON: line 3 column 5: Expecting ',' delimiter``), and with every
    problem when its content is wrong (see :func:`parse_config`).
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{name}: cannot read config file: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{name}: not valid UTF-8 at line {line}; save it as UTF-8") from None
    if not text.strip():
        raise ConfigError(
            f'{name}: file is empty; a config is a JSON object like {{"servers": []}}'
        )
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{name}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{name}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise ConfigError(f"{name}: not valid JSON: {exc}") from None
    return parse_config(data, source=name)
