"""A real ``redis-server`` for tests, and the pytest fixtures that start it.

:class:`RedisServer` runs ``redis-server`` on a free 127.0.0.1 port with no persistence, in a
temporary directory, and waits until it answers PING. It can be stopped, restarted on the same
port (it comes back empty: nothing is saved) and paused with SIGSTOP.

Fixtures (register with ``pytest_plugins = ["tests.helpers.redis_server"]``):

* ``redis_server`` — one server for the whole session; ``redis_url`` — its URL. Tests share it,
  so each test keeps to its own ``cluster`` name.
* ``redis_isolated`` — a server of the test's own, for tests that stop, restart or flush it.

Without ``redis-server`` on PATH these fixtures skip the test, unless the environment variable
``CI`` is set: CI must run them, so there they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from tests.helpers.servers import free_port

__all__ = [
    "RedisServer",
    "redis_isolated",
    "redis_server",
    "redis_url",
    "require_redis_server",
]

#: Seconds to wait for a started server to answer PING, and for a stopped one to exit.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

#: Times to try another port when the free one was taken before redis-server bound it.
_PORT_ATTEMPTS = 3


def require_redis_server() -> str:
    """The path of ``redis-server``; skip the test if there is none (fail when ``CI`` is set)."""
    path = shutil.which("redis-server")
    if path is None:
        reason = (
            "redis-server is not installed (apt-get install redis-server; see .ci/install-redis)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run the Redis tests", pytrace=False)
        pytest.skip(reason)
    return path


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING on host:port (plain socket: no client needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, started by the constructor.

    ``url`` is ``redis://127.0.0.1:PORT/0``; ``stop()`` ends it by PID, ``restart()`` starts
    a new (empty) one on the same port, ``pause()``/``resume()`` freeze and thaw it.
    """

    host = "127.0.0.1"

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable or require_redis_server()
        self._tmp = tempfile.TemporaryDirectory(prefix="softlb-redis-")
        self.dir = Path(self._tmp.name)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        try:
            for attempt in range(_PORT_ATTEMPTS):
                try:
                    self._start(free_port())
                    break
                except RuntimeError:
                    if attempt == _PORT_ATTEMPTS - 1:
                        raise
        except BaseException:
            self._tmp.cleanup()
            raise

    # -- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- life cycle -----------------------------------------------------------------------

    def _start(self, port: int) -> None:
        self.port = port
        log = self.dir / "redis.log"
        args = [self.executable, "--port", str(port), "--bind", self.host]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        args += ["--protected-mode", "yes", "--dir", str(self.dir), "--logfile", str(log)]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for pytest does not reach it first
        )
        self._process = process
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.host, port):
            if process.poll() is not None or time.monotonic() >= deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {port}:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """End the server by PID (SIGTERM, then SIGKILL after STOP_TIMEOUT); idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # a paused server ignores SIGTERM
                os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop, then start a new server on the same port: it comes back with no data."""
        self.stop()
        self._start(self.port)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted but nothing answers."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT)."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<RedisServer [{self.url}, {state}]>"


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests keep apart by ``cluster`` name."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session's redis-server."""
    return redis_server.url


@pytest.fixture
def redis_isolated() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to stop, restart, pause or flush."""
    with RedisServer() as server:
        yield server
