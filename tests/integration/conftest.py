"""Run softlb (or plain gunicorn) in real subprocesses, and always stop them.

:func:`launch` starts a command in its own session (so that a test can send the whole process
group a Ctrl-C, as a terminal does), with its output in a file, and waits until its port
accepts connections. Every process it started is stopped at teardown by PID: SIGTERM, then
SIGKILL, the master's workers included. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.helpers.servers import wait_for_port

#: How long a balancer may take to start listening, and to exit once told to.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0

SOFTLB = [sys.executable, "-m", "softlb"]
#: The console scripts installed next to this interpreter.
BIN = Path(sys.executable).parent


def children(pid: int) -> list[int]:
    """The PIDs of the live processes whose parent is ``pid`` (gunicorn's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after ")".
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` from /proc, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def thread_count(pid: int) -> int:
    """How many threads ``pid`` runs (``Threads`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


class Running:
    """One launched process: its Popen, port and output."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int | None, log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.log = log
        self.known_children: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def workers(self, count: int = 1, timeout: float = START_TIMEOUT) -> list[int]:
        """The master's worker PIDs, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = children(self.pid)
            self.known_children.update(found)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} workers not found: {found}\n{self.output()}")
            time.sleep(0.05)

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the master, or to its whole process group (a terminal's Ctrl-C)."""
        self.known_children.update(children(self.pid))
        if group:
            os.killpg(self.pid, sig)
        else:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; return its status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None

    def stop(self) -> None:
        """Make sure the process and its workers are gone (teardown)."""
        if self.proc.poll() is None:
            self.known_children.update(children(self.pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.known_children:  # a worker whose master was killed
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class Launcher:
    """Starts processes whose output goes to files in ``directory``; :meth:`close` stops them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Running] = []
        self.logs: list[IO[bytes]] = []

    def __call__(
        self,
        argv: list[str],
        *,
        port: int | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Running:
        """Start ``argv``; if ``wait``, return once ``port`` accepts connections."""
        log = self.directory / f"output-{len(self.started)}.log"
        handle = log.open("wb")
        self.logs.append(handle)
        proc = subprocess.Popen(
            argv,
            cwd=cwd or self.directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running = Running(proc, port, log)
        self.started.append(running)
        if wait and port is not None:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    wait_for_port("127.0.0.1", port, timeout=0.5)
                    break
                except TimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(
                            f"{argv} did not start listening on {port}:\n{running.output()}"
                        ) from None
        return running

    def close(self) -> None:
        """Stop every process started, then close the output files."""
        try:
            for running in self.started:
                running.stop()
        finally:
            for handle in self.logs:
                handle.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start a command (see :class:`Launcher`); everything started is stopped at teardown."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a JSON config in tmp_path (config.json unless ``name`` says otherwise)."""

    def write(data: object, name: str = "config.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return path

    return write
