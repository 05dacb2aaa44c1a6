"""Run the balancer on gunicorn; this module (and :mod:`softlb.aio`'s worker) import gunicorn.

:func:`serve` embeds gunicorn the way its ``examples/standalone_app.py`` does: a
:class:`~gunicorn.app.base.BaseApplication` whose fields are set before ``super().__init__()``
and that passes gunicorn only settings it knows. Workers are softlb's event loop
(:mod:`softlb.aio`, the default) or, with ``--engine threads``, gunicorn's stock ``gthread``
worker (one process, a pool of threads, so a slow backend ties up a thread, not a process).

Nothing that owns a thread or a socket is made before the fork. The master parses the config and
binds the listening socket; the WSGI app — pool, health checker thread, backend connections — is
built by :meth:`SoftLBServer.load`, which gunicorn calls in each worker after ``fork()``
(``preload_app`` is off), because threads started before a fork do not exist in the child.

Stopping follows SPEC §1: SIGTERM *and* SIGINT stop accepting, let in-flight requests finish
for up to the graceful timeout, and the master exits 0. Plain gunicorn treats SIGINT as a quick
shutdown that cuts requests off; here a first Ctrl-C drains, a second one during the drain quits
at once (gunicorn's own rule while stopping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger as _GunicornLogger
from gunicorn.http.errors import (
    InvalidHeader,
    LimitRequestHeaders,
    LimitRequestLine,
    UnsupportedTransferCoding,
)

from softlb.config import Config, TimeoutsConfig, load_config
from softlb.errors import ConfigError
from softlb.gthread import install as install_client_timeouts

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_THREADS",
    "DEFAULT_WORKERS",
    "ENGINES",
    "GRACEFUL_TIMEOUT",
    "BindError",
    "ServeOptions",
    "SoftLBServer",
    "banner",
    "backends_text",
    "bindable_together",
    "check_bindable",
    "serve",
    "startup_warnings",
]

#: One worker process by default. With more, the workers share their state through a SQLite
#: file in a runtime directory unless the config names a store (SPEC §7).
DEFAULT_WORKERS: Final = 1
#: Threads per worker: how many requests one worker proxies at once. Each one waiting on a slow
#: backend holds a thread, so this is higher than a CPU-bound app would use; the backend
#: connection pools are sized to match.
DEFAULT_THREADS: Final = 16
#: The engines ``softlb serve --engine`` runs, and the gunicorn worker class of each: one event
#: loop per worker (uvloop + httptools, :mod:`softlb.aio`), or gunicorn's threaded worker.
ENGINES: Final = {
    "eventloop": "softlb.aio.Worker",
    "threads": "gthread",
}
DEFAULT_ENGINE: Final = "eventloop"
#: Seconds in-flight requests get to finish after SIGTERM/SIGINT (SPEC §1).
GRACEFUL_TIMEOUT: Final = 30.0
#: Seconds an idle client connection is kept open: nginx's ``keepalive_timeout`` is 75 s, but a
#: gthread worker holds a file descriptor per idle connection; 5 s covers a page and its assets.
KEEPALIVE: Final = 5
#: Floor of gunicorn's worker timeout (the master kills a worker silent for that long). A gthread
#: worker's main loop keeps reporting while its threads wait on backends, so this only catches a
#: wedged worker; it is kept well above the backend read timeout anyway.
WORKER_TIMEOUT_MIN: Final = 60
#: Added to the backend read timeout to get the worker timeout.
WORKER_TIMEOUT_SLACK: Final = 30

#: The longest request line and header field gunicorn's parser reads (its MAX_REQUEST_LINE
#: and default field size): the threaded engine refuses longer ones with 414 and 431.
GUNICORN_LINE_CEILING: Final = 8190

_STATE_MEMORY: Final = "memory"

log = logging.getLogger("softlb.server")

WSGIApp = Callable[..., Iterable[bytes]]


class BindError(Exception):
    """The listen address cannot be bound (in use, not permitted, not a local address)."""


@dataclass(frozen=True)
class ServeOptions:
    """How :func:`serve` runs gunicorn; every field has the default ``softlb serve`` uses.

    ``bind`` is ``HOST:PORT`` (an IPv6 host in brackets); ``None`` means the config's listen
    address. ``engine`` is a key of :data:`ENGINES`; ``threads`` applies to the threaded engine
    only. ``certfile``/``keyfile`` override the config's ``tls``. ``access_log`` (a path or
    ``"-"``) overrides the config's ``access_log``.
    """

    bind: str | None = None
    workers: int = DEFAULT_WORKERS
    threads: int = DEFAULT_THREADS
    graceful_timeout: float = GRACEFUL_TIMEOUT
    access_log: str | None = None
    engine: str = DEFAULT_ENGINE
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.graceful_timeout < 0:
            raise ValueError(f"graceful_timeout must be >= 0, got {self.graceful_timeout}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("certfile and keyfile go together")


# --------------------------------------------------------------------------- before starting


def _split_bind(bind: str) -> tuple[str, int]:
    """``("::1", 8080)`` from ``"[::1]:8080"``; the address was validated by parse_listen."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def _url_host(host: str) -> str:
    """The host part of a URL for ``host``: brackets around IPv6 addresses."""
    return f"[{host}]" if ":" in host else host


def _local_host(host: str) -> str:
    """A host a browser on this machine can reach for a socket bound to ``host``."""
    if host == "0.0.0.0":
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check_bindable(bind: str) -> None:
    """Raise :class:`BindError` (one line) if nothing could listen on ``bind`` right now.

    gunicorn itself retries a busy address five times, a second apart, then logs several lines;
    trying first gives the user one clear line at once. The socket is bound the way gunicorn
    binds it (``SO_REUSEADDR``) and closed again, so a port in TIME_WAIT is not refused.
    """
    host, port = _split_bind(bind)
    # The family gunicorn picks: IPv6 for an IPv6 literal, IPv4 for anything else.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {bind}: unknown host ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = "the port is already in use (is another softlb or server running?)"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "the address is not one of this machine's"
        else:
            why = exc.strerror or str(exc)
        raise BindError(f"cannot listen on {bind}: {why}") from None


def bindable_together(first: str, second: str) -> bool:
    """Whether two addresses, each bindable alone (:func:`check_bindable`), can be listened
    on at once: ``False`` when they are one address by another name (``localhost`` and
    ``127.0.0.1``, a host name and the address it resolves to) or one covers the other."""
    sockets: list[socket.socket] = []
    try:
        for bind in (first, second):
            host, port = _split_bind(bind)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1)  # (two sockets bound to one address clash only once listening)
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE
    finally:
        for sock in sockets:
            sock.close()
    return True


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def backends_text(config: Config) -> str:
    """The config's backends as the banner and ``softlb check`` count them: ``3 backends``,
    or ``1 backend + 2 resolved names`` when some are ``resolve`` servers, whose count of
    backends is only known once their names are looked up (SPEC §2)."""
    names = sum(1 for spec in config.servers if spec.resolve)
    fixed = _plural(len(config.servers) - names, "backend")
    return f"{fixed} + {_plural(names, 'resolved name')}" if names else fixed


def banner(config: Config, options: ServeOptions, *, version: str) -> str:
    """The one line ``softlb serve`` prints before gunicorn's logs."""
    bind = options.bind or config.listen
    host, port = _split_bind(bind)
    scheme = "https" if options.certfile or config.tls else "http"
    local = f"{scheme}://{_url_host(_local_host(host))}:{port}"
    where = f"{scheme}://{_url_host(host)}:{port}"
    if local != where:
        where += " (all interfaces)"
    per_worker = "event loop" if options.engine == "eventloop" else f"{options.threads} threads"
    shape = (
        f"{config.algorithm}, {backends_text(config)}, "
        f"{_plural(options.workers, 'worker')} × {per_worker}"
    )
    prefix = config.admin.prefix.rstrip("/")
    admin = local
    if config.admin.listen is not None:  # its own address (TLS, when on, is on every listener)
        admin_host, admin_port = _split_bind(config.admin.listen)
        admin = f"{scheme}://{_url_host(_local_host(admin_host))}:{admin_port}"
        if _local_host(admin_host) != admin_host:
            return (
                f"softlb {version} serving on {where} ({shape}); admin at {admin}{prefix}/ "
                "(all interfaces)"
            )
    return f"softlb {version} serving on {where} ({shape}); admin at {admin}{prefix}/"


def _is_loopback(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Loopback, IPv4-mapped loopback (``::ffff:127.0.0.1``, as a dual-stack socket reports
    an IPv4 client) included: the addresses the admin API lets in without ``allow``."""
    if network.is_loopback:
        return True
    if isinstance(network, ipaddress.IPv6Network):
        first = network.network_address.ipv4_mapped
        last = network.broadcast_address.ipv4_mapped
        return first is not None and last is not None and first.is_loopback and last.is_loopback
    return False


def admin_exposure_warning(config: Config) -> str | None:
    """A warning when clients beyond loopback may change the backends without a password:
    no ``admin.token`` and an ``admin.allow`` wider than loopback (SPEC §5)."""
    if config.admin.token is not None:
        return None
    wide = [net for net in config.admin.allow if not _is_loopback(ipaddress.ip_network(net))]
    if not wide:
        return None
    return (
        f"softlb: warning: admin.allow lets {', '.join(wide)} call the admin API without a "
        "token: those clients can add, drain and remove backends; set admin.token"
    )


def startup_warnings(config: Config, options: ServeOptions) -> list[str]:
    """One line for each setting that likely does not do what the user wants."""
    warnings = []
    exposure = admin_exposure_warning(config)
    if exposure is not None:
        warnings.append(exposure)
    if options.workers > 1 and config.state == _STATE_MEMORY:
        warnings.append(
            f'softlb: warning: --workers {options.workers} with state "memory": each worker '
            "keeps its own pool state (membership, health, in-flight counts), and an admin "
            "change reaches only the worker that served it; leave state unset to share it"
        )
    return warnings


def _redact_password(url: str) -> str:
    """``url`` with the password of its userinfo (``redis://:secret@host``) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def default_state(config: Config, options: ServeOptions) -> tuple[str, list[str]]:
    """The store the workers use, and the files to delete at exit (made for this run only).

    The config's ``state`` if set; else ``$SOFTLB_STATE``; else ``memory`` for one worker and,
    for several, a SQLite
    file in a runtime directory named after this process, so each run starts from the
    config's servers.
    """
    if config.state is not None:
        return config.state, []
    from_environment = os.environ.get("SOFTLB_STATE")
    if from_environment:
        return from_environment, []
    if options.workers <= 1:
        return _STATE_MEMORY, []
    from softlb.state.sync import remove_stale_runs, runtime_dir

    remove_stale_runs()  # files of earlier runs that did not end cleanly
    path = os.path.join(runtime_dir(), f"{config.cluster}-{os.getpid()}.db")
    files = [path, path + "-wal", path + "-shm", f"{path}.{config.cluster}.slots"]
    return f"sqlite:///{path}", files


# --------------------------------------------------------------------------- worker hooks
# gunicorn calls these by name from its config; each must take exactly the arguments it is given.


def _post_worker_init(worker: Any) -> None:
    """In a worker, after the app was built: make SIGINT drain like SIGTERM.

    A Ctrl-C in a terminal reaches every process of the group, the workers too; gunicorn's
    workers take SIGINT as "quit now" and would cut in-flight requests off before the master's
    graceful SIGTERM arrives.

    Under gunicorn's gthread worker (``--engine threads``), also: both signals close the
    listening sockets at once (SPEC §1: a new connection is refused, never left in the listen
    backlog while in-flight requests drain), a request gunicorn's own parser refuses gets
    a plain-text answer instead of gunicorn's HTML page (SPEC §3), and the client timeouts
    ``client_header`` and ``client_body`` hold (:mod:`softlb.gthread`).
    """
    queue = getattr(worker, "method_queue", None)
    if queue is None or not callable(getattr(worker, "set_accept_enabled", None)):
        signal.signal(signal.SIGINT, worker.handle_exit)
        signal.siginterrupt(signal.SIGINT, False)
        return
    gunicorn_util.write_error = _plain_error
    handle_error = worker.handle_error

    def handle_coding_error(req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        handle_error(req, client, addr, _spec_error(exc))

    worker.handle_error = handle_coding_error
    # timeouts.client_header and client_body (SPEC §2), which gthread has none of.
    config = getattr(worker.wsgi, "config", None)
    timeouts = getattr(config, "timeouts", None)
    install_client_timeouts(
        worker,
        timeouts if isinstance(timeouts, TimeoutsConfig) else TimeoutsConfig(),
        tls=bool(worker.cfg.is_ssl),
    )

    def stop(sig: int, frame: Any) -> None:
        worker.handle_exit(sig, frame)
        # On the worker's own loop, not in the signal handler: the poller is not re-entrant.
        queue.defer(_close_listeners, worker)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
        signal.siginterrupt(sig, False)


def _spec_error(exc: BaseException) -> BaseException:
    """The error gunicorn's answer is made from, as SPEC §2-3 (and the event loop) answer:
    ``501`` for a request ``Transfer-Encoding`` other than ``chunked`` alone, where
    gunicorn's parser says 400 when the codings do not end in ``chunked`` or repeat it (400
    stays for HTTP/1.0: a coding there is a smuggling pattern, RFC 9112 §6.1); ``431`` for a
    request line longer than ``limits.max_header_bytes``, where gunicorn says 414."""
    if isinstance(exc, LimitRequestLine):
        too_long: BaseException = LimitRequestHeaders("the request line is too long")
        return too_long
    if isinstance(exc, InvalidHeader) and exc.hdr == "TRANSFER-ENCODING":
        req = exc.req
        if req is not None and tuple(req.version) >= (1, 1):
            codings = ", ".join(v for n, v in req.headers if n == "TRANSFER-ENCODING")
            coding_error: BaseException = UnsupportedTransferCoding(codings[:40])
            return coding_error
    return exc


def _close_listeners(worker: Any) -> None:
    """Stop a gthread worker accepting and close its listening sockets."""
    try:
        worker.set_accept_enabled(False)
    except Exception:  # gthread already stopped accepting
        log.debug("accepting was already off")
    for listener in worker.sockets:
        try:
            listener.close()
        except OSError:
            log.debug("listener already closed")


def _plain_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with a one-line plain-text body instead of HTML, and
    the status's own reason phrase (gunicorn says "Bad Request" for its 501)."""
    with contextlib.suppress(ValueError):  # (a status Python does not know: gunicorn's phrase)
        reason = HTTPStatus(status_int).phrase
    text = f"{status_int} {reason}: {mesg}\n" if mesg else f"{status_int} {reason}\n"
    body = text.encode("latin-1", "replace")
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


def _worker_exit(server: Any, worker: Any) -> None:
    """In a worker that is leaving: stop the health checker and close backend connections."""
    if getattr(worker, "app_stopped", False):
        return  # the event-loop worker stopped the app itself, after its drain
    app = getattr(worker, "wsgi", None)
    stop = getattr(app, "stop", None)
    if callable(stop):
        try:
            stop()
        except Exception:  # the worker is exiting anyway; say why, never mask its exit
            log.exception("error while stopping the app in worker %s", os.getpid())


class GunicornLogger(_GunicornLogger):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's own log lines (starting, workers booting and exiting, signals), as JSON
    objects too with ``SOFTLB_LOG_FORMAT=json``, so that every line on standard error is one
    (:class:`softlb.logs.JsonFormatter`)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if os.environ.get("SOFTLB_LOG_FORMAT", "") == "json":
            from softlb.logs import JsonFormatter

            for logger in (self.error_log, self.access_log):
                for handler in logger.handlers:
                    handler.setFormatter(JsonFormatter())


class _Arbiter(Arbiter):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's master, with SIGINT as graceful as SIGTERM (SPEC §1), and a second SIGINT
    during the drain stopping the workers at once (a second Ctrl-C, docs/deployment.rst)."""

    stopping = False

    def handle_int(self) -> None:
        self.handle_term()

    def stop(self, graceful: bool = True) -> None:
        self.stopping = True
        super().stop(graceful)

    def signal(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGINT and self.stopping:
            # The master waits for the draining workers without reading its signal queue:
            # act here, in the handler.
            self.kill_workers(signal.SIGQUIT)
            return
        super().signal(sig, frame)


# --------------------------------------------------------------------------- the application


class SoftLBServer(BaseApplication):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn, embedded: runs the app ``factory`` builds, one per worker, after the fork.

    ``settings`` are gunicorn settings by name; any this gunicorn version does not know is
    skipped, so that one softlb runs on every gunicorn it supports.
    """

    def __init__(
        self,
        factory: Callable[[], WSGIApp],
        settings: dict[str, Any],
        *,
        reload: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.factory = factory
        self.settings = settings
        #: Called on SIGHUP (gunicorn's reload, before it starts new workers): the settings
        #: of the config read again, or ``None`` to keep the running ones.
        self.on_reload = reload
        self._loaded = False
        self.master_pid = os.getpid()
        super().__init__(prog="softlb")

    def load_config(self) -> None:
        if self._loaded and self.on_reload is not None:
            settings = self.on_reload()
            if settings is not None:
                self.settings = settings
        self._loaded = True
        known = self.cfg.settings
        for name, value in self.settings.items():
            if name in known and value is not None:
                self.cfg.set(name, value)

    def load(self) -> WSGIApp:
        """Build the app; gunicorn calls this in each worker after ``fork()``."""
        return self.factory()

    def run(self) -> int:
        """Run until stopped; return the master's exit status.

        A worker never returns from here: it leaves with ``os._exit()`` once gunicorn is done
        with it, as ``multiprocessing`` children do, so that nothing the caller does after
        :func:`serve` (stopping the demo's backends, ``finally`` blocks, ``atexit``) runs in a
        forked copy of the master.
        """
        try:
            _Arbiter(self).run()
        except SystemExit as exc:
            status = _exit_status(exc.code)
        except RuntimeError as exc:  # what BaseApplication.run() reports: bad worker class...
            print(f"softlb: error: {exc}", file=sys.stderr)
            status = 1
        else:
            status = 0
        if os.getpid() != self.master_pid:
            _flush()
            os._exit(status)
        return status


def reload_config(config: Config, options: ServeOptions, *, shared: bool) -> Config | None:
    """The config file read again for a reload (SIGHUP), or ``None`` (logged in one line) when
    it cannot be read or is not valid: the running config then stays, as nginx keeps its
    workers when ``nginx -s reload`` finds an error. ``shared``: the backends live in a
    shared store, which stays the truth for them (SPEC §7): a change of ``servers`` is said
    not to apply."""
    path = config.source
    if path is None:
        log.warning("reload: the config was not read from a file; nothing to read again")
        return None
    try:
        fresh = load_config(path)
    except ConfigError as exc:
        log.error(
            "reload: %s is not valid, the running config stays: %s", path, "; ".join(exc.problems)
        )
        return None
    if options.access_log is not None:
        fresh = dataclasses.replace(fresh, access_log=options.access_log)
    if shared and fresh.servers != config.servers:
        log.warning(
            "reload: the backends live in the shared state store, which stays their truth "
            "(SPEC §7); change them with the admin API, the config's servers only seed an "
            "empty store"
        )
    log.info("reload: %s read again (%s)", path, backends_text(fresh))
    return fresh


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        # A closed stream or a broken pipe: there is nothing more to say anyway.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def gunicorn_settings(config: Config, options: ServeOptions) -> dict[str, Any]:
    """The gunicorn settings :func:`serve` runs with."""
    worker_timeout = max(WORKER_TIMEOUT_MIN, math.ceil(config.timeouts.read) + WORKER_TIMEOUT_SLACK)
    tls = config.tls
    certfile = options.certfile or (tls.certfile if tls is not None else None)
    keyfile = options.keyfile or (tls.keyfile if tls is not None else None)
    binds = [options.bind or config.listen]
    admin_listen = config.admin.listen
    if admin_listen is not None:
        binds.append(admin_listen)
    return {
        "bind": binds,
        # The event loop (softlb.aio.Worker), or gunicorn's stock gthread worker: a subclass
        # saving syscalls per request did not pay for its use of gunicorn internals (issue #12,
        # benchmarks/bench_worker.py).
        "worker_class": ENGINES[options.engine],
        "workers": options.workers,
        "threads": options.threads,
        "preload_app": False,  # the app is built in each worker, after the fork
        "graceful_timeout": math.ceil(options.graceful_timeout),
        "timeout": worker_timeout,
        "keepalive": math.ceil(config.timeouts.keepalive),
        # limits.max_connections (SPEC §2): gthread stops accepting at it, so more clients
        # wait in the kernel's backlog, as on the event loop (which reads the config itself).
        "worker_connections": config.limits.max_connections,
        # limits.max_header_bytes (SPEC §2) is checked by the app on the whole head; gunicorn
        # reads a request line and each field up to it too, below its own 8190-byte ceiling.
        "limit_request_line": min(config.limits.max_header_bytes, GUNICORN_LINE_CEILING),
        "limit_request_field_size": min(config.limits.max_header_bytes, GUNICORN_LINE_CEILING),
        # X-Forwarded-Proto is softlb's to set (SPEC §3): gunicorn must not take the client's.
        "forwarded_allow_ips": "",
        "certfile": certfile,
        "keyfile": keyfile,
        "accesslog": None,  # softlb's own access log names the backend (--access-log)
        "errorlog": "-",
        "logger_class": "softlb.server.GunicornLogger",  # JSON lines with SOFTLB_LOG_FORMAT
        "loglevel": "info",
        "proc_name": "softlb",
        "post_worker_init": _post_worker_init,
        "worker_exit": _worker_exit,
        # gunicorn >= 25.1 opens a control socket at one fixed path per user; two balancers on
        # one machine would fight over it, and softlb has its own admin API.
        "control_socket_disable": True,
    }


def _configure_logging() -> None:
    """Send softlb's own log lines to stderr in gunicorn's format (JSON with
    ``SOFTLB_LOG_FORMAT=json``), unless logging is set up."""
    from softlb.logs import configure_logging

    configure_logging()


def serve(
    config: Config,
    options: ServeOptions | None = None,
    *,
    factory: Callable[[], WSGIApp] | None = None,
) -> int:
    """Run the balancer for ``config`` on gunicorn until SIGTERM/SIGINT; return the exit status.

    ``factory`` builds the WSGI app in each worker; by default it is
    ``Application(config, threads=options.threads)``. The banner and any warnings are printed
    first. The listen address should have been checked with :func:`check_bindable`.
    """
    options = options or ServeOptions()
    if options.access_log is not None:
        config = dataclasses.replace(config, access_log=options.access_log)
    state, scratch = default_state(config, options)
    running = [config]  # the config the next workers are built from (SIGHUP reads it again)
    reload = None
    if factory is None:
        threads = options.threads

        def factory() -> WSGIApp:
            from softlb.app import Application

            return Application(running[0], threads=threads, state=state)

        def reload() -> dict[str, Any] | None:
            fresh = reload_config(running[0], options, shared=state != _STATE_MEMORY)
            if fresh is None:
                return None
            running[0] = fresh
            return gunicorn_settings(fresh, options)

    from softlb import __version__

    print(banner(config, options, version=__version__), flush=True)
    for line in startup_warnings(config, options):
        print(line, file=sys.stderr, flush=True)
    _configure_logging()
    if options.workers > 1 and state != _STATE_MEMORY:
        shown = _redact_password(state)
        print(f"softlb: {options.workers} workers share their state in {shown}", flush=True)
    try:
        status = SoftLBServer(factory, gunicorn_settings(config, options), reload=reload).run()
    finally:  # only the master gets here: workers leave run() through os._exit()
        for path in scratch:
            with contextlib.suppress(OSError):
                os.unlink(path)
    if status in (Arbiter.WORKER_BOOT_ERROR, Arbiter.APP_LOAD_ERROR):
        print(
            "softlb: error: the worker could not start the balancer; the log above says why",
            file=sys.stderr,
            flush=True,
        )
    return status
