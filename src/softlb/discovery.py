"""DNS discovery: a server configured with ``"resolve": true`` is every address its host has.

:class:`Resolver` looks up the host name of each such server every ``interval`` seconds (the
config's ``health_check.interval``, SPEC §2) on a small thread of its own, and keeps the pool
in line with the answer:

* each address is a backend of its own, ``http://ADDRESS:PORT`` (an IPv6 address in
  brackets; the configured URL's scheme, port and base path kept), with the server's weight,
  and :attr:`~softlb.backend.Backend.origin` set to the configured URL (the admin API shows
  it as ``"from"``); the health checker, which follows the pool, probes it from its arrival;
* an address that disappears from the answer is drained (:meth:`Pool.drain
  <softlb.pool.Pool.drain>`: no new requests, those in flight finish) and removed once it has
  no request in flight; one that comes back before that is put back in rotation;
* a backend removed by someone else (the admin API) while its address still resolves is
  added again by the next lookup: the pool follows DNS (the admin API refuses that removal).
  To keep one address out of rotation, drain it (``PATCH`` with ``"draining": true``, with one
  process); the resolver leaves a drain it did not make alone;
* a failed lookup (or an empty answer) changes nothing: the last known addresses stay, and
  the failure is logged once, until a lookup succeeds again.

The proxy keeps the client's ``Host`` header, so a backend reached by address still sees the
name the client asked for. Why a thread of its own rather than the health checker's
schedule: a lookup can block for seconds (a slow resolver), which must delay no probe, and
discovery works with health checks off.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from softlb.backend import Backend, normalize_url
from softlb.errors import BackendExists, UnknownBackend
from softlb.pool import Pool

__all__ = ["Resolvable", "ResolveFunction", "Resolver", "ServerLike", "address_url"]

log = logging.getLogger("softlb.discovery")

#: ``socket.getaddrinfo``'s shape: ``(host, port, family, type)`` to a list of
#: ``(family, type, proto, canonname, sockaddr)``, ``sockaddr[0]`` the address.
ResolveFunction = Callable[..., Sequence[tuple[Any, ...]]]


class ServerLike(Protocol):
    """A configured server: :class:`softlb.config.ServerSpec` or :class:`Resolvable`."""

    @property
    def url(self) -> str:
        """The configured URL (its host name is what is looked up)."""

    @property
    def weight(self) -> int:
        """The weight each discovered backend gets."""

    @property
    def resolve(self) -> bool:
        """Whether the host name is looked up (others are ignored by :class:`Resolver`)."""


@dataclass(frozen=True)
class Resolvable:
    """A server to discover, for library use: its URL and the weight of each address."""

    url: str
    weight: int = 1
    resolve: bool = True


def address_url(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` and the port made explicit:
    ``address_url("http://api.internal/v1", "10.0.0.7") == "http://10.0.0.7:80/v1"``."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{address}]" if ":" in address else address
    return normalize_url(f"{parts.scheme}://{host}:{port}{parts.path}")


def _default_backend(url: str, spec: ServerLike, origin: str) -> Backend:
    return Backend(url, spec.weight, origin=origin)


class _Server:
    """What the resolver knows of one configured server; only its thread touches it."""

    __slots__ = ("failing", "host", "port", "spec", "spec_url", "taken", "urls")

    def __init__(self, spec: ServerLike) -> None:
        self.spec = spec
        self.spec_url = normalize_url(spec.url)
        parts = urlsplit(self.spec_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.urls: set[str] = set()  # the backends of the last successful lookup
        self.failing = False  # the last lookup failed (logged once)
        self.taken: set[str] = set()  # addresses that are another backend (logged once)


class Resolver:
    """Keeps the backends of ``"resolve": true`` servers in line with DNS (module doc).

    ``specs`` are the configured servers; those whose ``resolve`` is false are ignored (the
    caller puts them in the pool as they are; the resolving ones it leaves out: their
    addresses are the backends). ``interval`` is the seconds between two lookups of a host;
    ``resolve`` replaces :func:`socket.getaddrinfo` (tests, a custom resolver).
    A backend the resolver removes leaves through :meth:`Pool.remove
    <softlb.pool.Pool.remove>`, so its ``removed`` event tells whoever keeps connections to
    it. ``factory(url, spec, origin)`` builds the backend
    of one address (default: ``Backend(url, spec.weight, origin=origin)``); give one to copy
    other per-server settings onto it.

    :meth:`start` runs a first lookup of every host on the calling thread, so the pool has
    its backends before the first request, then starts the thread; :meth:`stop` ends it. Or
    call :meth:`refresh` from a loop of your own. Start it in the process that serves (after
    ``fork()``), like the health checker.
    """

    def __init__(
        self,
        pool: Pool,
        specs: Iterable[ServerLike],
        interval: float = 5.0,
        *,
        resolve: ResolveFunction = socket.getaddrinfo,
        factory: Callable[[str, Any, str], Backend] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.pool = pool
        self.interval = float(interval)
        self.resolve = resolve
        self.factory = factory if factory is not None else _default_backend
        self.servers = [_Server(spec) for spec in specs if spec.resolve]
        self._leaving: dict[str, str] = {}  # drained backend URL -> its server's URL
        self._lock = threading.Lock()  # one refresh at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round -----------------------------------------------------------------------

    def lookup(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to, sorted, without duplicates; raises
        :class:`OSError` when the lookup fails."""
        answers = self.resolve(host, port, 0, socket.SOCK_STREAM)
        found = set()
        for answer in answers:
            address = str(answer[4][0])
            if "%" in address:  # an IPv6 link-local address with a zone: not a URL host
                continue
            found.add(address)
        return sorted(found)

    def refresh(self) -> None:
        """Look every host up once and apply the answers to the pool; then remove the drained
        backends that have no request in flight left."""
        with self._lock:
            for server in self.servers:
                self._refresh_one(server)
            self._reap()

    def _refresh_one(self, server: _Server) -> None:
        try:
            addresses = self.lookup(server.host, server.port)
            if not addresses:
                raise OSError("no address")
        except (OSError, UnicodeError) as exc:
            if not server.failing:
                log.warning(
                    "looking up %s for %s failed, keeping its %d known addresses: %s",
                    server.host,
                    server.spec_url,
                    len(server.urls),
                    exc,
                )
                server.failing = True
            return
        if server.failing:
            log.warning("%s resolves again", server.host)
            server.failing = False
        wanted = {address_url(server.spec_url, address) for address in addresses}
        for url in sorted(wanted):
            if url in server.urls and url in self.pool:
                continue
            self._arrive(server, url)  # new, or removed by someone else while it resolves
        for url in sorted(server.urls - wanted):
            self._leave(server, url)

    def _arrive(self, server: _Server, url: str) -> None:
        try:
            present: Backend | None = self.pool.get(url)
        except UnknownBackend:
            present = None
        if present is not None:
            if present.origin != server.spec_url:  # configured as is, or another server's
                if url not in server.taken:
                    server.taken.add(url)
                    log.info("%s (from %s) is already a backend", url, server.spec_url)
                return
            if self._leaving.pop(url, None) is not None:
                try:
                    self.pool.drain(present, False)
                except UnknownBackend:  # removed meanwhile: added again below
                    present = None
                else:
                    log.info("%s (from %s) is back", url, server.spec_url)
            if present is not None:
                server.urls.add(url)
                return
        try:
            self.pool.add(self.factory(url, server.spec, server.spec_url))
        except BackendExists:  # added by someone else meanwhile
            return
        server.urls.add(url)
        log.info("%s (from %s) added", url, server.spec_url)

    def _leave(self, server: _Server, url: str) -> None:
        server.urls.discard(url)
        try:
            backend = self.pool.get(url)
        except UnknownBackend:  # removed by an operator
            return
        if backend.origin != server.spec_url:
            return
        try:
            self.pool.drain(backend)
        except UnknownBackend:  # removed meanwhile
            return
        self._leaving[url] = server.spec_url
        log.info("%s (from %s) no longer resolves: draining", url, server.spec_url)

    def _reap(self) -> None:
        for url in list(self._leaving):
            try:
                backend = self.pool.get(url)
            except UnknownBackend:
                del self._leaving[url]
                continue
            if not backend.draining:  # an operator put it back: theirs now
                del self._leaving[url]
                continue
            if backend.active:
                continue
            del self._leaving[url]
            try:
                self.pool.remove(backend)
            except UnknownBackend:
                continue
            log.info("%s removed", url)

    @property
    def leaving(self) -> tuple[str, ...]:
        """The drained backends waiting for their requests in flight to finish."""
        return tuple(self._leaving)

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> Resolver:
        """Look every host up now, then every :attr:`interval` on a daemon thread."""
        if self._thread is not None or not self.servers:
            return self
        self.refresh()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="softlb-resolve", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # the thread must outlive any surprise
                log.exception("DNS discovery round failed")

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread (a lookup under way is waited for up to ``timeout`` seconds)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Resolver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        hosts = ", ".join(s.host for s in self.servers)
        return f"<Resolver {hosts} every {self.interval:g}s>"
