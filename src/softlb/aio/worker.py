"""``softlb.aio.Worker``: the event-loop engine as a gunicorn worker class.

gunicorn stays the process manager: ``--workers N``, graceful SIGTERM (and, as ``softlb
serve`` promises, SIGINT) drain, SIGHUP reload and worker restarts work as with any worker.
Each worker builds the app (:func:`softlb.app.create_app` or ``softlb serve``'s factory)
after the fork, then serves every connection of its listening sockets from one event loop
(:class:`~softlb.aio.engine.Engine`)::

    gunicorn -k softlb.aio.Worker 'softlb.wsgi:create_app("config.json")'

The app must be softlb's :class:`~softlb.app.Application`: the engine proxies through its
pool and serves its admin API; any other WSGI app is refused with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
from typing import Any

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker as _GunicornWorker

from softlb.aio.engine import Engine, new_event_loop
from softlb.aio.tuning import tune_gc, tune_malloc

with contextlib.suppress(ImportError):  # imported in the master, before the fork: no delay
    import uvloop  # noqa: F401

__all__ = ["Worker"]

#: Signals held back while the worker sets itself up.
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})

#: Seconds between two heartbeats to the gunicorn master (it restarts a worker that stays
#: silent for its ``timeout``).
_HEARTBEAT = 1.0


class Worker(_GunicornWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """A gunicorn worker whose one event loop proxies every connection (SPEC §1)."""

    def init_process(self) -> None:
        # Until this worker's own handlers are in place, a SIGTERM from the master would reach
        # the master's handlers that fork() copied, and be lost: hold the stop signals back.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        tune_malloc()  # before the app allocates: large buffers stay on the heap
        self.loop = new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.engine: Engine | None = None
        self.app_stopped = False
        self._quit_now = False
        self._wake: asyncio.Event | None = None
        super().init_process()

    def init_signals(self) -> None:
        super().init_signals()
        # The loop runs the handlers: SIGTERM and SIGINT drain (SPEC §1), SIGQUIT stops now.
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self._graceful)
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        loop.add_signal_handler(signal.SIGQUIT, self._quick)
        loop.add_signal_handler(signal.SIGUSR1, self.log.reopen_files)
        loop.add_signal_handler(signal.SIGABRT, self._abort)
        signal.siginterrupt(signal.SIGTERM, False)
        signal.siginterrupt(signal.SIGUSR1, False)

    def handle_exit(self, sig: Any = None, frame: Any = None) -> None:
        # softlb serve's post_worker_init installs this for SIGINT as a plain signal handler;
        # the loop's own handlers are put back in run(), so it only has to be safe.
        self._graceful()

    def _graceful(self) -> None:
        self.alive = False
        if self.engine is not None:
            self.engine.stop_accepting()
        if self._wake is not None:
            self._wake.set()

    def _interrupt(self) -> None:
        """SIGINT: drain as SIGTERM does; a second one (Ctrl-C again) during the drain stops
        at once."""
        if self.alive:
            self._graceful()
        else:
            self._quick()

    def _quick(self) -> None:
        self.alive = False
        self._quit_now = True
        if self._wake is not None:
            self._wake.set()

    def _abort(self) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        os._exit(1)

    def run(self) -> None:
        # post_worker_init (softlb serve) may have replaced SIGINT's handler: the loop's first.
        self.loop.add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @staticmethod
    def _raise_fd_limit(connections: int) -> None:
        """Raise the soft limit of open files toward what ``limits.max_connections`` needs
        (two descriptors a proxied connection), up to the hard limit, as nginx's
        ``worker_rlimit_nofile``; a 1024 soft limit would otherwise cap a worker far below
        its setting."""
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            wanted = 2 * connections + 256
            if hard != resource.RLIM_INFINITY:
                wanted = min(wanted, hard)
            if soft != resource.RLIM_INFINITY and soft < wanted:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ImportError, ValueError, OSError):  # not permitted, or no such limit here
            pass

    def _tls_context(self) -> ssl.SSLContext | None:
        certfile = getattr(self.cfg, "certfile", None)
        keyfile = getattr(self.cfg, "keyfile", None)
        if not certfile:
            tls = self.wsgi.config.tls
            if tls is None:
                return None
            certfile, keyfile = tls.certfile, tls.keyfile
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile or None)
        context.set_alpn_protocols(["http/1.1"])
        return context

    async def _serve(self) -> None:
        from softlb.app import Application

        app = self.wsgi
        if not isinstance(app, Application):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            self.log.error(
                "softlb.aio.Worker serves softlb's app only (softlb.wsgi:create_app), got %r",
                type(app).__name__,
            )
            # A boot error: gunicorn stops ("Worker failed to boot") instead of starting
            # another worker that would say the same.
            raise SystemExit(Arbiter.WORKER_BOOT_ERROR)
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # The loop runs and watches for signals now: a stop signal held back since the fork
        # is delivered here and handled.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        await asyncio.sleep(0)
        engine = self.engine = Engine(app, loop)
        self._raise_fd_limit(engine.limits.max_connections)
        tls = self._tls_context()
        admin_listen = app.config.admin.listen
        for listener in self.sockets:
            sock: socket.socket = getattr(listener, "sock", listener)
            admin_only = admin_listen is not None and _same_address(sock, admin_listen)
            engine.listen(sock, ssl_context=tls, admin_only=admin_only)
        tune_gc()  # the app is built: out of the collector's sight, rare young collections
        parent = self.ppid
        while self.alive:
            self.notify()
            if os.getppid() != parent:
                self.log.info("Parent changed, shutting down: %s", self)
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _HEARTBEAT)
        engine.stop_accepting()
        if not self._quit_now:
            drain = loop.create_task(engine.drain(float(self.cfg.graceful_timeout)))
            self._wake.clear()
            while not drain.done() and not self._quit_now:
                self.notify()
                woken = loop.create_task(self._wake.wait())
                await asyncio.wait(
                    {drain, woken}, timeout=_HEARTBEAT, return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
            if not drain.done():  # a second Ctrl-C (or SIGQUIT): stop now
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
                await engine.drain(0)
        else:
            await engine.drain(0)
        engine.close()
        self.app_stopped = True
        with contextlib.suppress(Exception):
            app.stop()


def _same_address(sock: socket.socket, listen: str) -> bool:
    """Whether ``sock`` is bound to ``listen`` (``HOST:PORT``, IPv6 host in brackets)."""
    host, _, port = listen.rpartition(":")
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    return bool(isinstance(bound, tuple) and str(bound[1]) == port and bound[0] == host.strip("[]"))
