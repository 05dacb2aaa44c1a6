"""What the event-loop engine promises for idle, slow and half-open clients, measured (issue 10).

Each step starts a fresh ``softlb serve`` (its default engine, the event loop; 1 worker;
least_connections; pinned to CPU 1 with its backends, the clients on CPU 0) and watches the
worker's VmRSS every 20 ms and its VmHWM before and after:

``idle``
    N (10,000) client connections each send one request, read the answer and stay open,
    idle (keep-alive). RSS growth of the worker, and the latency of normal requests (each on
    a new connection) meanwhile. Needs N + ~300 file descriptors in this process and in the
    worker: the script raises its soft ``RLIMIT_NOFILE`` (the worker inherits it), so the hard
    limit (``ulimit -Hn``) must allow that.
``halfopen``
    50 connections send half a request head each and stall; normal requests meanwhile, then
    how long until the engine answers the stalled ones ``408`` (``timeouts.client_header``).
``slowread``
    One client reads a 200 MiB answer at ~640 KiB/s for 10 s (then hangs up).
``slowupload``
    One client uploads as fast as it can for 10 s to a backend that swallows ~640 KiB/s
    (``peers/sink.py``, which reads every body to its end before it answers).
``gib``
    ``run.py``'s memory step: 1 GiB down and 1 GiB up with curl.

Targets (issue 10): idle ≤ 100 MiB growth; < 20 MiB for each stream; a normal request next
to the half-open ones < 0.2 s. Prints Markdown and saves ``results/conns-YYYY-MM-DD-HHMM.md``
and ``.json``. All traffic on 127.0.0.1; every loop is bounded in count and time; every
process started here runs in a process group of its own and is stopped by its PID. Not part
of CI. About 1.5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # benchmarks/run.py: processes, backends, the 1 GiB step

STEPS = ("idle", "halfopen", "slowread", "slowupload", "gib")
MIB = 1 << 20
MID_SIZE = 200 * MIB
#: What a slow client reads, and a slow backend swallows, per second.
SLOW_RATE = 640 * 1024
SLOW_SECONDS = 10.0
SAMPLE_S = 0.02
#: How many connections are opened (and sent their request) at once.
BATCH = 500
IDLE_DEADLINE_S = 120.0
HEADER_TIMEOUT_S = 4.0
REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
HALF_HEAD = b"GET /small HTTP/1.1\r\nHost: bench\r\nUser-Ag"

TARGETS = {
    "idle": ("RSS growth, {n:,} idle keep-alive connections", 100.0),
    "slowread": ("RSS growth, 200 MiB read at 640 KiB/s", 20.0),
    "slowupload": ("RSS growth, upload to a backend swallowing 640 KiB/s", 20.0),
}

# --------------------------------------------------------------------------- measuring


class Watch:
    """VmRSS of one process every 20 ms (peak) plus VmHWM before/after, on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = run.memory_kib(pid)
        self.peak = self.before["VmRSS"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, run.memory_kib(self.pid)["VmRSS"])

    def now_kib(self) -> int:
        return run.memory_kib(self.pid)["VmRSS"]

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(2)
        after = run.memory_kib(self.pid)
        growth = max(self.peak - self.before["VmRSS"], after["VmHWM"] - self.before["VmHWM"])
        return {
            "rss_before_kib": self.before["VmRSS"],
            "rss_peak_kib": self.peak,
            "rss_after_kib": after["VmRSS"],
            "hwm_before_kib": self.before["VmHWM"],
            "hwm_after_kib": after["VmHWM"],
            "growth_kib": growth,
        }


class Others:
    """How much CPU other processes of the machine took during a step, in % of wall time, on
    the proxy's CPU (minus softlb and the backends) and on the clients' (minus this process)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.wall = time.monotonic()
        self.busy = [run.cpu_ticks(cpu)[0] for cpu in (run.TARGET_CPU, run.LOAD_CPU)]
        self.trees = [run.process_tree(r) for r in roots]
        self.ours = self._self_cpu()

    @staticmethod
    def _self_cpu() -> float:
        return sum(
            getattr(resource.getrusage(who), f)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for f in ("ru_utime", "ru_stime")
        )

    def stop(self) -> tuple[float, float]:
        wall = max(time.monotonic() - self.wall, 1e-3)
        busy = [
            (run.cpu_ticks(cpu)[0] - b) / run.CLK_TCK
            for cpu, b in zip((run.TARGET_CPU, run.LOAD_CPU), self.busy, strict=True)
        ]
        server = sum(
            run.cpu_seconds(before, run.process_tree(r))
            for r, before in zip(self.roots, self.trees, strict=True)
        )
        clients = self._self_cpu() - self.ours
        return (
            max(busy[0] - server, 0.0) / wall * 100,
            max(busy[1] - clients, 0.0) / wall * 100,
        )


def probe(base_port: int, count: int, path: str = "/small") -> dict[str, Any]:
    """``count`` normal requests one after another, each on a new connection: seconds each."""
    times: list[float] = []
    errors: list[str] = []
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", base_port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
        except OSError as exc:
            errors.append(str(exc) or type(exc).__name__)
        finally:
            conn.close()
        times.append(time.perf_counter() - started)
    return {
        "count": count,
        "p50_ms": statistics.median(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "errors": errors[:5],
        "error_count": len(errors),
    }


# --------------------------------------------------------------------------- softlb


class Setup:
    """The backends, the config softlb takes, and how to start softlb."""

    def __init__(self, ctx: run.Context, engine: str | None, idle: int) -> None:
        self.ctx = ctx
        self.engine = engine
        self.idle = idle
        self.notes: list[str] = []
        self.extra = self._limits()

    def _limits(self) -> dict[str, Any]:
        """The timeouts and limits the steps want, if this softlb takes them (SPEC §2)."""
        wanted = {
            "timeouts": {"keepalive": "600s", "client_header": f"{HEADER_TIMEOUT_S:g}s"},
            "limits": {"max_connections": self.idle + 200},
        }
        config = run.softlb_config(self.ctx, run.free_port(), **wanted)
        softlb = str(self.ctx.softlb_venv / "bin" / "softlb")
        done = run.run_quiet([softlb, "check", "--config", str(config)], timeout=60)
        if done.returncode == 0:
            return wanted
        self.notes.append(
            "this softlb does not take `timeouts.keepalive`, `timeouts.client_header` and "
            "`limits.max_connections` yet: the engine's defaults apply (keep-alive 5 s, "
            "client header 10 s, 10,000 connections), so the idle connections are fewer than "
            "asked and some may be closed before they are counted"
        )
        self.idle = min(self.idle, 9_800)
        return {}

    @contextlib.contextmanager
    def softlb(self, servers: list[str] | None = None) -> Iterator[tuple[int, int, int]]:
        """Start ``softlb serve`` (1 worker); yield (port, master PID, worker PID)."""
        port = run.free_port()
        config = run.softlb_config(self.ctx, port, servers=servers, **self.extra)
        argv = [str(self.ctx.softlb_venv / "bin" / "softlb"), "serve", "--config", str(config)]
        argv += ["--workers", "1"]
        if self.engine is not None:
            argv += ["--engine", self.engine]
        if self.engine == "threads":
            argv += ["--threads", str(run.THREADS)]
        proc = run.Proc(f"softlb-{port}", argv, self.ctx.tmp)
        try:
            run.wait_ready(proc, f"http://127.0.0.1:{port}/small")
            workers = run.children(proc.pid)
            if len(workers) != 1:
                raise RuntimeError(f"expected one softlb worker, found {workers}")
            probe(port, 100)  # warm: imports, pools, buffers
            probe(port, 20, "/big")
            time.sleep(0.3)
            yield port, proc.pid, workers[0]
        finally:
            proc.stop()


def _result(watch: Watch, others: Others, **extra: Any) -> dict[str, Any]:
    out = watch.stop()
    out["others_pct"] = others.stop()
    out.update(extra)
    return out


# --------------------------------------------------------------------------- steps


def _read_answers(socks: list[socket.socket], deadline: float) -> int:
    """Read one /small answer on each socket (sent already); return how many came whole."""
    sel = selectors.DefaultSelector()
    got: dict[int, bytearray] = {}
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
        got[sock.fileno()] = bytearray()
    complete = 0
    pending = len(socks)
    try:
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                buf = got[sock.fileno()]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                buf += data
                head, sep, body = bytes(buf).partition(b"\r\n\r\n")
                done = sep and len(body) >= len(run.SMALL_BODY)
                if done or not data:
                    sel.unregister(sock)
                    pending -= 1
                    complete += bool(done and head.startswith(b"HTTP/1.1 200"))
    finally:
        sel.close()
    return complete


def step_idle(setup: Setup) -> dict[str, Any]:
    """N connections, one request each, then idle; RSS growth and a normal request's latency."""
    n = setup.idle
    socks: list[socket.socket] = []
    with setup.softlb() as (port, master, worker):
        watch, others = Watch(worker), Others([master, *(p.pid for p in setup.ctx.backends)])
        started = time.monotonic()
        deadline = started + IDLE_DEADLINE_S
        served = 0
        try:
            while len(socks) < n and time.monotonic() < deadline:
                batch = []
                for _ in range(min(BATCH, n - len(socks))):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.sendall(REQUEST)
                    sock.setblocking(False)
                    batch.append(sock)
                socks += batch
                served += _read_answers(batch, deadline)
            opened_s = time.monotonic() - started
            time.sleep(1.0)  # let the worker settle: every connection is idle now
            idle_rss = watch.now_kib()
            worker_fds = len(os.listdir(f"/proc/{worker}/fd"))
            latency = probe(port, 20)
            # A connection the engine closed is readable (EOF) now.
            sel = selectors.DefaultSelector()
            for sock in socks:
                sel.register(sock, selectors.EVENT_READ)
            closed = len(sel.select(timeout=0))
            sel.close()
        finally:
            for sock in socks:
                sock.close()
        result = _result(
            watch,
            others,
            connections=len(socks),
            served=served,
            open_seconds=opened_s,
            rss_idle_kib=idle_rss,
            worker_fds=worker_fds,
            closed_by_server=closed,
            latency=latency,
        )
        time.sleep(0.5)
        result["rss_closed_kib"] = watch.now_kib()
    result["ok"] = result["growth_kib"] <= TARGETS["idle"][1] * 1024 and served == n
    return result


def step_halfopen(setup: Setup, count: int = 50) -> dict[str, Any]:
    """``count`` connections stall half-way through a request head; normal requests meanwhile."""
    socks: list[socket.socket] = []
    with setup.softlb() as (port, master, worker):
        watch, others = Watch(worker), Others([master, *(p.pid for p in setup.ctx.backends)])
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(HALF_HEAD)
                socks.append(sock)
            sent = time.monotonic()
            time.sleep(0.2)
            latency = probe(port, 20)
            # Then each stalled one should get 408 and be closed after timeouts.client_header.
            header_timeout = HEADER_TIMEOUT_S if setup.extra else 10.0
            deadline = sent + header_timeout + 5
            answers: dict[str, int] = {}
            waited: list[float] = []
            for sock in socks:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(4096):
                        data += chunk
                status = data.split(b"\r\n", 1)[0].decode("latin-1") or "(nothing)"
                if data:  # read sequentially: the largest is when the last one was closed
                    waited.append(time.monotonic() - sent)
                answers[status] = answers.get(status, 0) + 1
        finally:
            for sock in socks:
                sock.close()
        result = _result(
            watch,
            others,
            connections=count,
            latency=latency,
            answers=answers,
            closed_after_s=max(waited) if waited else None,
            header_timeout_s=header_timeout,
        )
    result["ok"] = latency["max_ms"] < 200 and not latency["error_count"]
    return result


def _slow_reader(port: int, stop: threading.Event, out: dict[str, Any]) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /mid HTTP/1.1\r\nHost: bench\r\n\r\n")
        per_tick = SLOW_RATE // 10
        received = 0
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < SLOW_SECONDS + 5:
            tick = time.monotonic()
            want = per_tick
            while want > 0:
                data = sock.recv(min(want, 65536))
                if not data:
                    raise ConnectionError("softlb closed the connection")
                if received == 0:
                    out["status"] = data.split(b"\r\n", 1)[0].decode("latin-1")
                received += len(data)
                want -= len(data)
            out["bytes"] = received
            out["seconds"] = time.monotonic() - started
            time.sleep(max(0.1 - (time.monotonic() - tick), 0))
    except OSError as exc:
        out["error"] = str(exc) or type(exc).__name__
    finally:
        sock.close()


def step_slowread(setup: Setup) -> dict[str, Any]:
    """A client reads 200 MiB at ~640 KiB/s for 10 s; softlb must not buffer what it can't send."""
    with setup.softlb() as (port, master, worker):
        watch, others = Watch(worker), Others([master, *(p.pid for p in setup.ctx.backends)])
        stop = threading.Event()
        out: dict[str, Any] = {"bytes": 0, "seconds": 0.0}
        reader = threading.Thread(target=_slow_reader, args=(port, stop, out), daemon=True)
        reader.start()
        reader.join(SLOW_SECONDS / 2)
        latency = probe(port, 10)  # others are still served meanwhile
        reader.join(SLOW_SECONDS / 2)
        stop.set()
        reader.join(5)
        result = _result(watch, others, latency=latency, **out)
    result["ok"] = (
        result["growth_kib"] < TARGETS["slowread"][1] * 1024
        and "error" not in result
        and result["bytes"] > 0
    )
    return result


def step_slowupload(setup: Setup) -> dict[str, Any]:
    """A client uploads as fast as it can for 10 s; the backend swallows ~640 KiB/s."""
    ctx = setup.ctx
    sink_port = run.free_port()
    sink = run.Proc(
        f"slow-sink-{sink_port}",
        [sys.executable, str(run.PEERS_DIR / "sink.py"), str(sink_port), str(SLOW_RATE)],
        ctx.tmp,
    )
    try:
        run.wait_ready(sink, f"http://127.0.0.1:{sink_port}/small")
        with setup.softlb([f"http://127.0.0.1:{sink_port}"]) as (port, master, worker):
            watch, others = Watch(worker), Others([master, sink.pid])
            sent = 0
            error = ""
            status = ""
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            started = time.monotonic()
            try:
                head = f"POST /sink HTTP/1.1\r\nHost: bench\r\nContent-Length: {MID_SIZE}\r\n\r\n"
                sock.sendall(head.encode())
                sock.setblocking(False)
                chunk = b"x" * 65536
                sel = selectors.DefaultSelector()
                sel.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ)
                while time.monotonic() - started < SLOW_SECONDS and sent < MID_SIZE:
                    for _, events in sel.select(timeout=0.2):
                        if events & selectors.EVENT_READ:  # an early answer: stop sending
                            data = sock.recv(4096)
                            status = data.split(b"\r\n", 1)[0].decode("latin-1") or "(closed)"
                            raise ConnectionError(f"softlb answered early: {status}")
                        with contextlib.suppress(BlockingIOError):
                            sent += sock.send(chunk[: MID_SIZE - sent])
                sel.close()
            except OSError as exc:
                error = str(exc) or type(exc).__name__
            finally:
                seconds = time.monotonic() - started
                sock.close()
            result = _result(watch, others, bytes=sent, seconds=seconds, error=error, status=status)
    finally:
        sink.stop()
    result["ok"] = result["growth_kib"] < TARGETS["slowupload"][1] * 1024 and not error
    return result


def step_gib(setup: Setup) -> dict[str, Any]:
    """run.py's 1 GiB down / up step, on this script's engine."""
    name = run.REFERENCE if setup.engine != "threads" else run.THREADS_ROW
    out = run.memory_step(setup.ctx, name)
    for step in out.values():
        step["ok"] = step["ok"] and step["growth_kib"] < 20 * 1024
    return out


# --------------------------------------------------------------------------- report


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def report(results: dict[str, Any], setup: Setup, env: dict[str, str]) -> str:
    engine = setup.engine or "eventloop (default)"
    lines = [f"# softlb connections and memory, {env['date']}", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items() if k not in ("date", "load", "peers venv")]
    lines += [f"- **engine**: `softlb serve --workers 1`, engine {engine}"]
    lines += [f"- **note**: {note}" for note in setup.notes]
    lines += [
        "",
        "RSS is the worker's (VmRSS every 20 ms; growth = the larger of peak − before and "
        "VmHWM after − before). *others %*: CPU other processes of the machine took during the "
        "step, in % of its wall time, on the proxy's CPU / on the clients' CPU.",
        "",
        "| step | what | RSS before | RSS peak | growth MiB | normal request p50 / max ms "
        "| others % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def row(step: str, what: str, r: dict[str, Any]) -> None:
        lat = r.get("latency")
        latency = f"{lat['p50_ms']:.1f} / {lat['max_ms']:.1f}" if lat else "—"
        if lat and lat["error_count"]:
            latency += f" ({lat['error_count']} errors)"
        others = r.get("others_pct")
        noisy = f"{others[0]:.0f} / {others[1]:.0f}" if others else "—"
        lines.append(
            f"| {step} | {what} | {_mib(r['rss_before_kib'])} | {_mib(r['rss_peak_kib'])} | "
            f"{_mib(r['growth_kib'])} | {latency} | {noisy} |"
        )

    checks: list[tuple[str, str, str, bool]] = []
    if (r := results.get("idle")) and "step" not in r:
        per = r["growth_kib"] / max(r["connections"], 1)
        row(
            "idle",
            f"{r['connections']:,} keep-alive connections ({r['served']:,} answered, opened in "
            f"{r['open_seconds']:.1f} s; worker fds {r['worker_fds']:,}; "
            f"{r['closed_by_server']:,} closed by softlb; {per:.1f} KiB each; "
            f"RSS {_mib(r['rss_closed_kib'])} MiB once closed)",
            r,
        )
        what = TARGETS["idle"][0].format(n=r["connections"])
        checks.append((what, _mib(r["growth_kib"]), "≤ 100", r["ok"]))
    if (r := results.get("halfopen")) and "step" not in r:
        answers = ", ".join(f"{v} × {k}" for k, v in r["answers"].items())
        closed = f"{r['closed_after_s']:.1f} s" if r["closed_after_s"] is not None else "—"
        row(
            "halfopen",
            f"{r['connections']} connections with half a request head; then: {answers}, the "
            f"last after {closed} (client_header {r['header_timeout_s']:g} s)",
            r,
        )
        checks.append(
            (
                "a normal request next to 50 half-open connections (max of 20), ms",
                f"{r['latency']['max_ms']:.1f}",
                "< 200",
                r["ok"],
            )
        )
    if (r := results.get("slowread")) and "step" not in r:
        rate = r["bytes"] / max(r["seconds"], 1e-3) / 1024
        error = f"; error: {r['error']}" if "error" in r else ""
        row(
            "slowread",
            f"{r.get('status', '?')}; {r['bytes'] / MIB:.1f} MiB of 200 read in "
            f"{r['seconds']:.1f} s ({rate:.0f} KiB/s){error}",
            r,
        )
        checks.append((TARGETS["slowread"][0], _mib(r["growth_kib"]), "< 20", r["ok"]))
    if (r := results.get("slowupload")) and "step" not in r:
        rate = r["bytes"] / max(r["seconds"], 1e-3) / 1024
        error = f"; error: {r['error']}" if r["error"] else ""
        row(
            "slowupload",
            f"{r['bytes'] / MIB:.1f} MiB sent in {r['seconds']:.1f} s ({rate:.0f} KiB/s; the "
            f"backend swallows {SLOW_RATE // 1024} KiB/s){error}",
            r,
        )
        checks.append((TARGETS["slowupload"][0], _mib(r["growth_kib"]), "< 20", r["ok"]))
    gib = results.get("gib")
    if gib and "step" not in gib:
        for name, s in gib.items():
            mib_s = s["bytes"] / MIB / max(s["seconds"], 1e-3)
            row(f"gib {name}", f"1 GiB with curl: HTTP {s['status']}, {mib_s:,.0f} MiB/s", s)
            checks.append((f"RSS growth, 1 GiB {name}", _mib(s["growth_kib"]), "< 20", s["ok"]))
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "step" in v}
    lines += ["", "| target (issue 10) | measured | target | result |", "|---|---:|---:|---|"]
    lines += [f"| {c} | {m} | {t} | {'pass' if ok else '**FAIL**'} |" for c, m, t, ok in checks]
    if failed:
        lines += ["", "Steps that failed:", ""]
        lines += [f"- {name}: {why.splitlines()[0]}" for name, why in failed.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        sys.exit(
            f"bench_conns.py: needs {need:,} open files, the hard limit is {hard:,}: "
            f"raise it (`ulimit -Hn {need}` as root) or pass a smaller --idle"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    parser.add_argument(
        "--idle", type=int, default=10_000, metavar="N", help="idle connections (10,000)"
    )
    parser.add_argument(
        "--engine",
        choices=("eventloop", "threads"),
        help="pass --engine to softlb serve (default: none, softlb's default engine)",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(sys.prefix),
        help="virtualenv with softlb installed (default: the one running this script)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only, save nothing")
    args = parser.parse_args(argv)
    if args.idle < 1:
        parser.error("--idle must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal_stop()
    steps = args.only or list(STEPS)
    if not (args.venv / "bin" / "softlb").exists():
        sys.exit(f"bench_conns.py: no {args.venv}/bin/softlb; pass --venv PATH")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench_conns.py: needs 2 CPUs (one for the clients, one for softlb)")
    if "idle" in steps:
        raise_nofile(args.idle + 1_000)  # before softlb starts: its worker inherits it
    run.ensure_tools(["nginx", "curl"])
    os.sched_setaffinity(0, {run.LOAD_CPU})
    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="softlb-conns-") as tmp:
        ctx = run.Context(Path(tmp), args.venv.resolve(), duration=0, repeat=1)
        try:
            try:
                run.start_backends(ctx)
            except RuntimeError as exc:
                sys.exit(f"bench_conns.py: the nginx backends did not start: {exc}")
            with (ctx.tmp / "www" / "mid").open("wb") as f:  # 200 MiB, sparse
                f.truncate(MID_SIZE)
            env = run.environment(ctx)
            setup = Setup(ctx, args.engine, args.idle)
            functions = {
                "idle": step_idle,
                "halfopen": step_halfopen,
                "slowread": step_slowread,
                "slowupload": step_slowupload,
                "gib": step_gib,
            }
            for name in steps:
                print(f"[{time.monotonic() - started:4.0f} s] {name}", flush=True)
                try:
                    results[name] = functions[name](setup)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                    results[name] = {"step": name, "error": str(exc)}
                    print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
        finally:
            run.Proc.stop_all()
    text = report(results, setup, env)
    text += f"\n\n(ran in {(time.monotonic() - started) / 60:.1f} min)"
    print()
    print(text)
    if not args.no_save:
        run.RESULTS_DIR.mkdir(exist_ok=True)
        md = run.RESULTS_DIR / f"conns-{stamp}.md"
        md.write_text(text + "\n")
        payload = {"environment": env, "notes": setup.notes, "results": results}
        md.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"\nsaved {md} and {md.with_suffix('.json').name}")
    return 0


def signal_stop() -> None:
    import signal

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(f"bench_conns.py: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)


if __name__ == "__main__":
    sys.exit(main())
