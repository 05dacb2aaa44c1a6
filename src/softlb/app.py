"""The composition root: the whole balancer built from a config, in one place.

:func:`create_app` reads a config and returns an :class:`Application`: the
:class:`~softlb.pool.Pool` and its strategy, the :class:`~softlb.health.HealthChecker` with
its probe, the shared state (memory, SQLite or Redis), the upstream transport, the proxy
(:class:`~softlb.wsgi.LoadBalancer`), the admin API and status page, the event log and the
resolver of ``resolve`` servers. Nothing below this module builds another layer's objects
or knows about ``fork()``; the engines (:mod:`softlb.aio`, gunicorn's threads) serve the
:class:`Application` they are given.

The application is a WSGI app, so it mounts under any WSGI server::

    gunicorn 'softlb.app:create_app("config.json")'
    gunicorn 'softlb.wsgi:create_app("config.json")'   # the same; the name users know

One hook (:func:`softlb.forking.after_fork_in_child`, phase ``SERVICES``) makes each live
application usable again in a child made by ``fork()``, after the stores and slot tables
below it dropped what the parent had opened.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from softlb.access_log import AccessLog
from softlb.backend import Backend
from softlb.errors import ConfigError
from softlb.forking import SERVICES, after_fork_in_child
from softlb.http.probe import HttpProbe
from softlb.http.transport import proxy_transport
from softlb.logs import warn_if_serial
from softlb.pool import Pool, PoolEvent
from softlb.sticky import StickySessions
from softlb.wsgi import Environ, LoadBalancer, StartResponse

if TYPE_CHECKING:
    from softlb.config import Config
    from softlb.discovery import Resolver
    from softlb.health import HealthChecker
    from softlb.http.transport import Transport
    from softlb.state.sync import SharedState

__all__ = ["Application", "create_app"]


class Application:
    """The whole balancer as a WSGI app: pool, health checker, proxy, admin API and shared
    state, from a :class:`~softlb.config.Config`.

    ``state`` overrides the config's ``state`` (``softlb serve --workers N`` passes the
    SQLite file it made); with neither, the ``SOFTLB_STATE`` environment variable, else
    ``memory``.

    Threads (the health checker, the state poller, the event dispatcher), connections and
    shared files are made in the process that serves requests: :meth:`start` runs on creation
    and again in a child after ``fork()``, so the app is safe under ``gunicorn --preload`` as
    well as without it.

    State changes (backends added, removed, drained, going down or up, ejected; requests that
    found no backend) are logged to ``softlb.events`` through the pool's event hooks
    (:func:`softlb.logs.install_event_logging`), as text or, with ``log_format="json"``, one
    JSON object per line; ``log_format`` defaults to the ``SOFTLB_LOG_FORMAT`` environment
    variable, else ``"text"``.
    """

    def __init__(
        self,
        config: Config,
        *,
        threads: int | None = None,
        start: bool = True,
        state: str | None = None,
        log_format: str | None = None,
    ) -> None:
        from softlb.admin import AdminApi
        from softlb.balancers import balancer_by_name
        from softlb.health import DEFAULT_WORKERS, HealthChecker

        self.config = config
        self.state_url = state or config.state or os.environ.get("SOFTLB_STATE") or "memory"
        source = "log_format" if log_format else "SOFTLB_LOG_FORMAT"
        log_format = log_format or os.environ.get("SOFTLB_LOG_FORMAT") or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"{source}: {log_format!r} is not a log format; allowed: text, json")
        self.log_format = log_format
        self._event_log: Callable[[], None] | None = None  # uninstalls the event log
        self.pool = Pool(
            [
                Backend(s.url, s.weight, max_connections=s.max_connections)
                for s in config.servers
                if not s.resolve
            ],
            balancer=balancer_by_name(config.algorithm),
            slow_start=config.slow_start,
        )
        #: Servers with ``resolve``: one backend per address, found in each process.
        self.resolved = [s for s in config.servers if s.resolve]
        self.resolver: Resolver | None = None
        self._unwatch: Callable[[], None] | None = None
        hc = config.health_check
        self.checker: HealthChecker | None = None
        if hc.enabled:
            # The composition root picks the probe (the checker's own default is the same
            # one, for library users who build a HealthChecker by hand).
            probe = HttpProbe(
                path=hc.path,
                timeout=hc.timeout,
                expected_status=hc.expected_status,
                ca_certs=config.backend_tls.ca_file,
                maxsize=DEFAULT_WORKERS,
            )
            self.checker = HealthChecker(
                self.pool,
                path=hc.path,
                interval=hc.interval,
                timeout=hc.timeout,
                rise=hc.rise,
                fall=hc.fall,
                expected_status=hc.expected_status,
                initial_state=hc.initial_state,
                log_changes=False,  # the event log says it (see start())
                probe=probe,
            )
        self.threads = threads or int(os.environ.get("SOFTLB_THREADS", "0") or 0) or 16
        self.proxy = LoadBalancer(
            self.pool,
            retries=config.retries,
            hash_key=config.hash_key,
            upstream=self._transport(),
            access_log=(
                AccessLog(config.access_log, config.access_log_format)
                if config.access_log
                else None
            ),
            sticky=(
                StickySessions(config.sticky.cookie, secret=config.cluster, secure=bool(config.tls))
                if config.sticky is not None
                else None
            ),
            queue_timeout=config.timeouts.queue,
        )
        self.admin = AdminApi(
            self.pool,
            prefix=config.admin.prefix,
            token=config.admin.token,
            seed_routes=config.admin.seed_routes,
            stats=self.proxy.stats,
            checker=self.checker,
            allow=config.admin.allow,
        )
        #: The port of ``admin.listen``: the admin API is served there only (SPEC §2).
        self.admin_port: int | None = None
        if config.admin.listen is not None:
            self.admin_port = int(config.admin.listen.rpartition(":")[2])
        self.state: SharedState | None = None
        self._pid: int | None = None  # the process whose threads are running
        self._server_checked = False  # whether this process's WSGI server was looked at
        self._start_lock = threading.Lock()
        # Whoever removes a backend (the admin API, shared state, the resolver), the proxy
        # closes its pooled connections to it: one subscriber of the pool's event stream.
        self.pool.subscribe(self._forget, ("removed",))
        _FORK_WATCH.add(self)
        if start:
            self.start()

    def _forget(self, event: PoolEvent) -> None:
        if event.url is not None:
            self.proxy.upstream.forget(event.url)

    def _open_state(self) -> SharedState:
        from softlb.state import MAX_SLOTS, open_store
        from softlb.state.sync import PROXY_COLUMNS, SharedState, node_name, slot_path

        store = open_store(self.state_url, cluster=self.config.cluster)
        slots = None
        if store.kind != "memory":
            from softlb.state.slots import SlotTable

            slots = SlotTable(
                slot_path(self.state_url, self.config.cluster, node_name()),
                columns=MAX_SLOTS + PROXY_COLUMNS,  # the backends, then the proxy counters
            )
        state = SharedState(
            self.pool,
            store,
            checker=self.checker,
            seed=[(s.url, s.weight) for s in self.config.servers if not s.resolve],
            slots=slots,
            stats=self.proxy.stats,
        )
        if slots is not None:
            # max_connections counts the host's requests in flight, every worker's.
            def others(backend: Backend, table: Any = slots) -> int:
                slot = backend._slot
                return table.in_flight_of_others(slot) if slot is not None else 0

            self.pool.others_in_flight = others
        return state

    def start(self) -> None:
        """Start the event log, the shared state and the health checker in this process;
        idempotent."""
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            if self._event_log is None:  # kept across a fork: the child's pool has the hooks
                from softlb.logs import install_event_logging

                self._event_log = install_event_logging(self.pool, json=self.log_format == "json")
            self.state = self._open_state()
            self.admin.state = self.state
            if self.checker is not None:
                if self.state.store.kind != "memory":
                    self.checker.set_active(False)  # until this process wins the prober lease
                self.checker.start()
            self.state.start()
            self._unwatch = self.proxy.stats.watch(self.pool, self.checker)
            if self.resolved:
                from softlb.discovery import Resolver

                self.resolver = Resolver(
                    self.pool,
                    self.resolved,
                    self.config.health_check.interval,
                )
                self.resolver.start()

    def _transport(self) -> Transport:
        """The WSGI proxy's upstream client, with the config's timeouts; ``https://``
        backends are checked against ``backend_tls.ca_file`` (the event loop's
        :class:`~softlb.aio.engine.Engine` reads the same key for its own client)."""
        config = self.config
        return proxy_transport(
            connect_timeout=config.timeouts.connect,
            read_timeout=config.timeouts.read,
            maxsize=self.threads,
            ca_certs=config.backend_tls.ca_file,
        )

    def after_fork(self) -> None:
        """In a child made by ``fork()``: fresh locks, connections and shared state, and the
        threads started again if they ran in the parent (they did not come along)."""
        was_running = self._pid is not None
        self._start_lock = threading.Lock()
        self.pool.after_fork()
        self.proxy.upstream = self._transport()
        self.pool.count_sink = None
        self.state = self.admin.state = None  # the parent's; a new one is opened on start
        self.resolver = None  # its thread did not come along; start() makes a new one
        self._unwatch = None
        if self.checker is not None:
            self.checker.after_fork()
        self._pid = None
        self._server_checked = False
        if was_running:
            self.start()

    def stop(self) -> None:
        """Stop the threads, give shared resources back and close backend connections."""
        if self.resolver is not None:
            self.resolver.stop()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.state is not None:
            self.state.stop()
        if self.checker is not None:
            self.checker.stop()
        self.proxy.close()
        self.pool.close()  # the last events are logged, then the dispatcher thread ends
        self._pid = None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if not self._server_checked:  # once: a warning if gunicorn serves one request at a time
            self._server_checked = True
            warn_if_serial(environ)
        if _head_size(environ) > self.config.limits.max_header_bytes:  # (the event loop's own
            # check ran before the head was whole; a WSGI server hands over a parsed head)
            return self.proxy.refuse(start_response, 431, "the request head is too large")
        if self.admin_port is not None:
            # admin.listen: the admin API on its own address, the proxy everywhere else.
            if _local_port(environ) == self.admin_port:
                return self.admin(environ, start_response)
            return self.proxy(environ, start_response)
        if self.admin.matches(environ.get("PATH_INFO") or "/"):
            return self.admin(environ, start_response)
        return self.proxy(environ, start_response)

    def __repr__(self) -> str:
        return (
            f"<Application {self.pool!r} state={self.state_url} admin={self.config.admin.prefix}>"
        )


def _head_size(environ: Environ) -> int:
    """The request head's size as ``limits.max_header_bytes`` counts it (SPEC §2), from what
    a WSGI server parsed: the request line (method, target, ``HTTP/1.1``, two spaces and
    CRLF), each field as ``Name: value`` and CRLF, and the empty line. Repeated fields come
    joined with commas, so each counts once."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if target is None:
        query = environ.get("QUERY_STRING")
        target = (environ.get("PATH_INFO") or "/") + ("?" + query if query else "")
    size = len(environ.get("REQUEST_METHOD") or "") + len(target) + 14
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            size += len(key) - 1 + len(value)  # "HTTP_" off; ": " and CRLF on
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            size += len(key) + 4 + len(value)
    return size


def _local_port(environ: Environ) -> int | None:
    """The local port the request arrived on: from the connection itself where the server
    gives it (gunicorn's ``gunicorn.socket``), else ``SERVER_PORT`` (which a Host header can
    set, so only where nothing better is known)."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            return int(sock.getsockname()[1])
        except (OSError, IndexError, TypeError, ValueError):
            return None
    try:
        return int(environ.get("SERVER_PORT") or 0)
    except ValueError:
        return None


#: Every live Application, so that a forked child can make each one usable again.
_FORK_WATCH: weakref.WeakSet[Application] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for app in list(_FORK_WATCH):
        app.after_fork()


after_fork_in_child(_after_fork_in_child, SERVICES)


def create_app(config: str | os.PathLike[str] | Config | None = None) -> Application:
    """Build the balancer's WSGI app from a config file path or a :class:`Config`.

    With no argument the path comes from the ``SOFTLB_CONFIG`` environment variable. A bad
    config raises :class:`~softlb.errors.ConfigError` listing every problem.

    Unless the program has set up logging, softlb's lines go to stderr with time and level
    (:func:`softlb.logs.configure_logging`). The app logs that the WSGI server's bind, not the
    config's ``listen``, decides where it listens, and warns on its first request if gunicorn
    serves one request at a time (:func:`softlb.logs.warn_if_serial`).
    """
    from softlb.config import Config, load_config
    from softlb.logs import configure_logging

    configure_logging()

    if config is None:
        path = os.environ.get("SOFTLB_CONFIG")
        if not path:
            raise ConfigError(
                "no config given: call create_app('config.json') or set SOFTLB_CONFIG"
            )
        config = path
    if not isinstance(config, Config):
        config = load_config(config)
    app = Application(config)
    logging.getLogger("softlb.server").info(
        "balancer ready (%s, %d backends, config %s); the WSGI server's bind decides where it "
        "listens, not the config's listen (%s)",
        config.algorithm,
        len(config.servers),
        config.source,
        config.listen,
    )
    return app
