"""What shared state costs: per lease, per store operation, and in requests/s.

Run it from a checkout (``python benchmarks/bench_state.py``); it takes about two minutes and
prints three markdown tables:

1. **per lease** — microseconds per pick + lease + release (least connections) of a bare
   :class:`~softlb.pool.Pool`, and of a pool bound by :class:`~softlb.state.sync.SharedState`
   to each store: ``memory``; ``sqlite`` and ``redis`` with the host's in-flight
   :class:`~softlb.state.slots.SlotTable` as the pool's count sink, and the state thread
   running as it does in a worker (polling every 0.25 s, reading the slot table every 0.1 s).
   No store is called per request: what a request pays is the count sink's writes to the
   memory-mapped table. Each cell is the best of many batches of 2,000 leases, the cells
   taking turns (as in ``bench_pick.py``), with the garbage collector off while timing.
2. **per store operation** — the median microseconds of what the state thread and the admin
   API do: read the version (every poll), read the membership of 100 backends, read the
   health verdicts, one whole :meth:`SharedState.poll`, and an add + remove.
3. **requests/s** of ``softlb serve --workers 2`` with its default SQLite store against
   ``--workers 2`` with ``"state": "memory"`` (and ``--workers 1`` for reference), in front of
   one nginx backend (``return 200``), loaded by ``wrk -t1 -c32 -d5s`` after a 1 s warm-up,
   each configuration run ``--repeat`` times in turn (median shown). With two CPUs or more,
   wrk runs on CPU 0 and the balancer and nginx on CPU 1 (``taskset``), as ``run.py`` does.

Redis comes from a ``redis-server`` this script starts on a free 127.0.0.1 port (and stops);
without one (or without redis-py) the redis column is skipped. Without ``wrk`` or ``nginx``
part 3 is skipped. Every process this script starts is stopped by its PID (its process group:
each runs in a session of its own), whatever happens; every wait is bounded. All traffic is on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softlb.backend import Backend
from softlb.pool import Pool
from softlb.state import MemoryStore, StateStore
from softlb.state.slots import SlotTable
from softlb.state.sqlite import SqliteStore
from softlb.state.sync import SharedState

BATCH = 2_000
IN_FLIGHT = 32
KEYS = [f"10.0.{i >> 8 & 255}.{i & 255}" for i in range(BATCH)]
#: (label, backends, in flight) of the per-lease columns.
COLUMNS = (("3 backends", 3, 1), ("100 backends", 100, 1), (f"100, {IN_FLIGHT} in flight", 100, 32))
STORES = ("bare pool", "memory", "sqlite", "redis")
OPS_RUNS = 300
LOAD_CPU, TARGET_CPU = 0, 1
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
Batch = Callable[[], float]

# --------------------------------------------------------------------------- processes


class Proc:
    """A process in a session of its own; :meth:`stop` ends its group by the leader's PID."""

    running: list[Proc] = []  # noqa: RUF012  # every process started and not yet stopped

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        Proc.running.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self in Proc.running:
            Proc.running.remove(self)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        # Whatever is left of its group (a worker whose master was killed): the group is the
        # session this script created for it, so its id is the leader's PID.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(cls.running):
            proc.stop()


def can_pin() -> bool:
    """Whether there are two CPUs to share out, and taskset to do it."""
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(argv: list[str], cpu: int) -> list[str]:
    """``argv`` run on one CPU when :func:`can_pin`, else as it is."""
    return ["taskset", "-c", str(cpu), *argv] if can_pin() else argv


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, utime + stime in ticks)`` of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_cpu(root: int) -> dict[int, int]:
    """CPU ticks used so far by ``root`` and every live descendant, by pid."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            stats[int(entry)] = stat
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = stats[pid][1]
            todo.extend(child for child, (parent, _) in stats.items() if parent == pid)
    return tree


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str | None]:
    """A redis-server of our own, no persistence; yields its URL (None: not available)."""
    executable = shutil.which("redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        executable = None
    if executable is None:
        yield None
        return
    port = free_port()
    argv = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(tmp)]
    proc = Proc("redis", argv, tmp, dict(os.environ))
    try:
        deadline = time.monotonic() + 10
        while not redis_ping(port):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{proc.output()}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


# --------------------------------------------------------------------------- 1. per lease


def make_pool(n: int) -> Pool:
    servers = [Backend(f"http://10.1.{i >> 8 & 255}.{i & 255}:8000") for i in range(n)]
    return Pool(servers, balancer="least_connections")


def open_store(kind: str, tmp: Path, redis_url: str | None) -> StateStore:
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(str(tmp / "state.db"), cluster=cluster)
    from softlb.state.redis import RedisStore

    assert redis_url is not None
    return RedisStore.from_url(redis_url, cluster=cluster)


def bind(
    pool: Pool, kind: str, tmp: Path, redis_url: str | None, *, start: bool = True
) -> SharedState:
    """Bind ``pool`` to a store as a worker does (slot table for the shared stores) and start
    it, the state thread included; with ``start=False`` only seed the store (one poll)."""
    store = open_store(kind, tmp, redis_url)
    slots = None
    if kind != "memory":
        slots = SlotTable(str(tmp / f"{kind}-{uuid.uuid4().hex[:8]}.slots"))
    state = SharedState(
        pool,
        store,
        seed=[(b.url, b.weight) for b in pool.backends],
        slots=slots,
        node=f"bench-{kind}",
    )
    if not start:
        state.poll()
        return state
    return state.start()


def idle_batch(pool: Pool) -> Batch:
    def run() -> float:
        lease = pool.lease
        start = time.perf_counter()
        for key in KEYS:
            with lease(key):
                pass
        return time.perf_counter() - start

    return run


def busy_batch(pool: Pool) -> Batch:
    window = deque(pool.lease(key) for key in KEYS[:IN_FLIGHT])

    def run() -> float:
        lease = pool.lease
        push, pop = window.append, window.popleft
        start = time.perf_counter()
        for key in KEYS:
            push(lease(key))
            pop().release()
        return time.perf_counter() - start

    return run


def measure(cells: dict[tuple[str, str], Batch], seconds: float) -> dict[tuple[str, str], float]:
    """Best µs per lease of every cell, the cells timed in turn until ``seconds`` passed."""
    for batch in cells.values():
        batch()  # warm up
    best = dict.fromkeys(cells, float("inf"))
    deadline = time.perf_counter() + seconds
    rounds = 0
    gc.disable()
    try:
        while rounds < 3 or time.perf_counter() < deadline:
            for cell, batch in cells.items():
                best[cell] = min(best[cell], batch())
            rounds += 1
    finally:
        gc.enable()
    return {cell: elapsed / BATCH * 1e6 for cell, elapsed in best.items()}


def lease_table(tmp: Path, redis_url: str | None, seconds: float) -> str:
    stores = [s for s in STORES if s != "redis" or redis_url]
    cells: dict[tuple[str, str], Batch] = {}
    states: list[SharedState] = []
    try:
        for store in stores:
            for label, n, in_flight in COLUMNS:
                pool = make_pool(n)
                if store != "bare pool":
                    states.append(bind(pool, store, tmp, redis_url))
                cells[store, label] = busy_batch(pool) if in_flight > 1 else idle_batch(pool)
        timings = measure(cells, seconds)
    finally:
        for state in states:
            with contextlib.suppress(Exception):
                state.store.clear()
            state.stop()
    lines = [
        "**per lease** — µs per pick + lease + release, least connections "
        f"(best of batches of {BATCH:,}, cells interleaved for {seconds:g} s)",
        "",
        "| store | " + " | ".join(label for label, _, _ in COLUMNS) + " | vs bare pool (100) |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    bare = timings["bare pool", COLUMNS[1][0]]
    for store in stores:
        row = [timings[store, label] for label, _, _ in COLUMNS]
        extra = row[1] - bare
        versus = "—" if store == "bare pool" else f"{extra:+.2f} µs ({row[1] / bare:.2f}x)"
        lines.append(f"| {store} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {versus} |")
    if not redis_url:
        lines.append("\n(redis skipped: no redis-server or no redis-py)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. per operation


def median_us(call: Callable[[], object], runs: int = OPS_RUNS) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def ops_table(tmp: Path, redis_url: str | None) -> str:
    kinds = [k for k in ("memory", "sqlite", "redis") if k != "redis" or redis_url]
    rows: dict[str, dict[str, float]] = {}
    for kind in kinds:
        pool = make_pool(100)
        state = bind(pool, kind, tmp, redis_url, start=False)  # no thread: only these calls
        store = state.store
        try:
            serial = itertools.count()

            def add_remove(store: StateStore = store, serial: Iterator[int] = serial) -> None:
                url = f"http://10.9.0.{next(serial) % 250}:8000"
                store.add(url, 1)
                store.remove(url)

            rows[kind] = {
                "version() (every poll)": median_us(store.version),
                "membership() of 100": median_us(store.membership),
                "health()": median_us(store.health),
                "SharedState.poll()": median_us(state.poll),
                "add + remove": median_us(add_remove, 100),
            }
        finally:
            with contextlib.suppress(Exception):
                store.clear()
            state.stop()
    ops = list(next(iter(rows.values())))
    lines = [
        "**per store operation** — median µs (background thread and admin API, never a request)",
        "",
        "| operation | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{rows[k][op]:.1f}" for k in kinds) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 3. requests/s

NGINX = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "softlb bench_state: a small answer\\n"; }}
    }}
}}
"""

#: (label, workers, state in the config or None for serve's default)
SERVE_CONFIGS = (
    ("--workers 2, sqlite (the default)", 2, None),
    ('--workers 2, "memory"', 2, "memory"),
    ('--workers 1, "memory" (reference)', 1, "memory"),
)


def wait_ready(proc: Proc, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not answer on {url}:\n{proc.output()[-2000:]}")
        time.sleep(0.1)


def wrk(url: str, connections: int, seconds: int) -> dict[str, Any]:
    argv = pinned(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"], LOAD_CPU)
    done = subprocess.run(
        [*argv, "--timeout", "10s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    text = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{text}")
    total = re.search(r"(\d+) requests in", text)
    result: dict[str, Any] = {"rps": float(rps[1]), "requests": int(total[1]) if total else 0}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
        result[f"p{pct}"] = float(m[1]) * scale[m[2]] if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    result["errors"] = (int(errors[1]) if errors else 0) + (
        sum(int(g) for g in sockets.groups()) if sockets else 0
    )
    return result


def serve_table(tmp: Path, connections: int, seconds: int, repeat: int) -> str:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if nginx is None or shutil.which("wrk") is None:
        return "**requests/s** — skipped: needs nginx and wrk"
    tmp.chmod(0o755)  # nginx started as root runs its worker as "nobody"
    backend_port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX.format(tmp=tmp, port=backend_port))
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp)}
    backend = Proc("nginx", pinned([nginx, "-e", "stderr", "-c", str(conf)], TARGET_CPU), tmp, env)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in SERVE_CONFIGS}
    try:
        wait_ready(backend, f"http://127.0.0.1:{backend_port}/")
        for round_ in range(repeat):
            for label, workers, state in SERVE_CONFIGS:
                port = free_port()
                config: dict[str, Any] = {
                    "listen": f"127.0.0.1:{port}",
                    "servers": [f"http://127.0.0.1:{backend_port}"],
                    "health_check": {"path": "/"},
                }
                if state is not None:
                    config["state"] = state
                path = tmp / f"softlb-{workers}-{state}.json"
                path.write_text(json.dumps(config))
                argv = [sys.executable, "-m", "softlb", "serve", "--config", str(path)]
                argv += ["--workers", str(workers), "--threads", "16"]
                proc = Proc(
                    f"softlb-{round_}-{workers}-{state}", pinned(argv, TARGET_CPU), tmp, env
                )
                try:
                    url = f"http://127.0.0.1:{port}/"
                    wait_ready(proc, url)
                    if workers > 1 and state is None:
                        assert "share their state in sqlite:" in proc.output(), proc.output()
                    wrk(url, connections, 1)  # warm up: connections, pools, the slot table
                    before = tree_cpu(proc.pid)
                    result = wrk(url, connections, seconds)
                    after = tree_cpu(proc.pid)
                    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
                    result["cpu_us"] = ticks / CLK_TCK / max(result["requests"], 1) * 1e6
                    result["load"] = os.getloadavg()[0]
                    runs[label].append(result)
                finally:
                    proc.stop()
    finally:
        backend.stop()
    medians = {
        label: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for label, rs in runs.items()
    }
    reference = medians[SERVE_CONFIGS[1][0]]["rps"]
    lines = [
        f"**requests/s** — softlb serve in front of one nginx (`return 200`), "
        f"wrk -t1 -c{connections} -d{seconds}s, median of {repeat} runs"
        + (
            f" (wrk on CPU {LOAD_CPU}; softlb and nginx on CPU {TARGET_CPU})"
            if can_pin()
            else " (not pinned)"
        ),
        "",
        "| configuration | req/s | each run | vs memory, 2 workers | CPU µs per request "
        "| p50 ms | p99 ms | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for label, median in medians.items():
        each = ", ".join(f"{r['rps']:.0f}" for r in runs[label])
        lines.append(
            f"| {label} | {median['rps']:.0f} | {each} | {median['rps'] / reference:.2f} | "
            f"{median['cpu_us']:.0f} | {median['p50']:.2f} | {median['p99']:.2f} | "
            f"{median['errors']:.0f} |"
        )
    loads = [r["load"] for rs in runs.values() for r in rs]
    lines.append(
        f"\nCPU µs per request: utime + stime of the balancer's processes (master and workers) "
        f"over the run, divided by the requests served; it does not depend on what else the "
        f"machine runs as much as req/s does. Load average during the runs: "
        f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: object) -> None:
    Proc.stop_all()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per-lease timing (15)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per configuration (3)")
    parser.add_argument("--skip-serve", action="store_true", help="skip part 3 (wrk)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    print(
        f"softlb bench_state: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"{os.uname().machine}\n"
    )
    with tempfile.TemporaryDirectory(prefix="softlb-bench-state-") as name:
        tmp = Path(name)
        try:
            with redis_server(tmp) as redis_url:
                print(lease_table(tmp, redis_url, args.seconds), end="\n\n", flush=True)
                print(ops_table(tmp, redis_url), end="\n\n", flush=True)
            if not args.skip_serve:
                serve_dir = tmp / "serve"
                serve_dir.mkdir()
                table = serve_table(serve_dir, args.connections, args.duration, args.repeat)
                print(table, end="\n\n")
        finally:
            Proc.stop_all()
    print(f"(ran in {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
