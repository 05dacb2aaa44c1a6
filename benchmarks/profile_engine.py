"""Where the event-loop engine's CPU goes per request, next to the floor's, on one pinned core.

Run it from a checkout: ``python benchmarks/profile_engine.py`` (about 5 minutes). It starts
the two nginx backends of ``run.py`` and ``softlb serve`` (its default engine, the event loop,
1 worker, least_connections: ``run.py``'s ``softlb-1w-lc``) pinned to CPU 1, and loads it with
``taskset -c 0 wrk -t1 -c16 -dS --latency`` on ``/small`` (``--body big``: ``/big``), after a
2 s warm-up, three ways, each on a fresh process:

1. *plain*: the CPU per request from /proc, unprofiled: the worker process (``/proc/PID/stat``,
   all its threads), its main thread (the event loop: ``schedstat``, in ns) and the whole
   tree with the gunicorn master (``run.py``'s number); also the loop thread's run-queue wait
   and involuntary context switches per request;
2. *perf* (when ``perf`` works; ``--no-perf``): ``perf record -e cpu-clock`` on the worker,
   from CPU 0, split by where the CPU executes: the kernel, the Python interpreter (the
   Python code), uvloop + libuv, httptools + llhttp, the C accelerators of asyncio, libc;
   shares of the samples, times the plain run's CPU per request;
3. *cprofile*: ``cProfile`` in the worker, on its main thread, between two ``SIGUSR2`` the
   script sends (the default, cheap clock: wall time). Each function's own time goes to a
   bucket (rules on file and qualified name); builtins and stdlib helpers of no bucket go to
   their callers' buckets; the top functions by own time are listed.

The profiler is put into ``softlb serve`` without touching softlb: this script re-runs itself
as a launcher (``_launch-softlb serve ...``) that wraps ``softlb.server.gunicorn_settings`` to
chain a ``post_worker_init`` hook, which adds a ``SIGUSR2`` handler to the worker's event loop
(the first signal starts a ``cProfile.Profile``, the second stops it and dumps it).

The same three runs are made of the floor, ``peers/bare_uvloop.py`` (``run.py``'s
``bare-uvloop``: a bare proxy on the same uvloop and httptools), unless ``--no-floor``.

**From the profile to µs per request.** cProfile sees Python functions and the builtins
they call, but not Cython methods (uvloop's transport writes, ``loop.create_future``,
httptools' ``feed_data``: their time is their Python caller's own time) nor uvloop's loop
between two Python callbacks (epoll, the ``recv()`` before each ``data_received``, dispatch).
Its clock is wall time: during the profiled run the nginx backends are made ``SCHED_BATCH``,
so that, woken by the proxy's request, they do not preempt it at once (which would count
their work in the own time of the function that wrote to them), and what run-queue wait is
left is taken out in proportion (the window's CPU ÷ CPU + wait, from ``schedstat``). Each
bucket is then charged cProfile's cost for its calls (calibrated here, per call), and what
the profiled thread used beyond that and the plain run's CPU is taken as a uniform slowdown
of everything; the thread's CPU that cProfile did not see is uvloop's loop outside Python.
So the buckets plus that add up to the plain run's CPU of the event-loop thread; they are
estimates (an honest ±20 % each), the perf split is not. Each kind of run is repeated
(``--repeat``, 3) and the medians are reported.

Markdown and JSON (every raw number) go to ``benchmarks/results/profile-engine-*.md`` /
``.json`` (``--no-save``: print only). Every wait has a deadline; every process started here
is stopped by its PID (process group) whatever happens.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import cProfile
import datetime
import json
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (benchmarks/ is not a package)
from profiling import Func, caller_attribution  # noqa: E402

CONNECTIONS = 16
#: perf's sampling frequency (Hz): some 5,000 samples of the worker in an 8 s run.
PERF_HZ = 999
TARGETS = ("softlb", "floor")
LABELS = {
    "softlb": "softlb serve (event loop, 1 worker, least_connections)",
    "floor": "bare uvloop + httptools proxy (peers/bare_uvloop.py, the floor)",
}

# --------------------------------------------------------------------------- in the worker


def _install_toggle(loop: Any) -> None:
    """SIGUSR2 on ``loop``: the first starts a cProfile.Profile, the next stops and dumps it."""
    out = Path(os.environ["BENCH_PROFILE_OUT"])
    state: dict[str, cProfile.Profile] = {}

    def toggle() -> None:
        profile = state.pop("profile", None)
        if profile is None:
            state["profile"] = profile = cProfile.Profile()
            profile.enable()
            return
        profile.disable()
        profile.dump_stats(str(out / "window.tmp"))
        os.replace(out / "window.tmp", out / "window.pstats")

    loop.add_signal_handler(signal.SIGUSR2, toggle)


def _launch_softlb(argv: list[str]) -> int:
    """``softlb serve ...`` with the toggle chained to its ``post_worker_init`` hook."""
    import softlb.server as server
    from softlb.cli import main as softlb_main

    settings_of = server.gunicorn_settings

    def settings(config: Any, options: Any) -> dict[str, Any]:
        out = settings_of(config, options)
        chained = out.get("post_worker_init")

        def post_worker_init(worker: Any) -> None:
            if chained is not None:
                chained(worker)
            _install_toggle(worker.loop)  # softlb.aio.Worker made its loop before this hook

        out["post_worker_init"] = post_worker_init
        return out

    server.gunicorn_settings = settings  # serve() looks it up when it runs
    return softlb_main(argv)


def _launch_floor(argv: list[str]) -> int:
    """``peers/bare_uvloop.py PORT URL...`` with the toggle on its loop."""
    import asyncio

    import uvloop

    sys.path.insert(0, str(harness.PEERS_DIR))
    import bare_uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    _install_toggle(loop)
    bare_uvloop.serve(loop, int(argv[0]), argv[1:])
    return 0


# --------------------------------------------------------------------------- /proc


def _schedstat(pid: int) -> tuple[int, int, int]:
    """(ns on the CPU, ns waiting on a run queue, time slices) of thread ``pid``."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        on_cpu, waited, slices = (int(x) for x in f.read().split()[:3])
    return on_cpu, waited, slices


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of thread ``pid``."""
    out = {}
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                key, value = line.split(":")
                out[key] = int(value)
    return out["voluntary_ctxt_switches"], out["nonvoluntary_ctxt_switches"]


def _snapshot(root: int, worker: int, backends: list[int]) -> dict[str, Any]:
    stat = harness._proc_stat(worker)
    on_cpu, waited, slices = _schedstat(worker)
    voluntary, involuntary = _switches(worker)
    return {
        "time": time.monotonic(),
        "tree": harness.process_tree(root),
        "backends": [harness.process_tree(pid) for pid in backends],
        "cpu1": harness.cpu_ticks(harness.TARGET_CPU),
        "worker_ticks": stat[1] if stat else 0,
        "main_ns": on_cpu,
        "wait_ns": waited,
        "slices": slices,
        "voluntary": voluntary,
        "involuntary": involuntary,
    }


def _window(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict[str, Any]:
    n = max(requests, 1)
    wall = after["time"] - before["time"]
    ours = harness.cpu_seconds(before["tree"], after["tree"]) + sum(
        harness.cpu_seconds(b, a)
        for b, a in zip(before["backends"], after["backends"], strict=True)
    )
    busy = (after["cpu1"][0] - before["cpu1"][0]) / harness.CLK_TCK
    steal = (after["cpu1"][2] - before["cpu1"][2]) / harness.CLK_TCK
    return {
        # CPU the hypervisor gave other machines while CPU 1 wanted it, in % of wall time
        "steal_pct": steal / wall * 100 if wall else 0.0,
        # CPU other processes took on the proxy's CPU during the run, in % of its wall time
        "others_pct": max(busy - ours, 0.0) / wall * 100 if wall else 0.0,
        "requests": requests,
        "wall_s": after["time"] - before["time"],
        "tree_cpu_us": harness.cpu_seconds(before["tree"], after["tree"]) * 1e6 / n,
        "worker_cpu_us": (after["worker_ticks"] - before["worker_ticks"])
        / harness.CLK_TCK
        * 1e6
        / n,
        "loop_cpu_us": (after["main_ns"] - before["main_ns"]) / 1e3 / n,
        "loop_wait_us": (after["wait_ns"] - before["wait_ns"]) / 1e3 / n,
        "loop_cpu_s": (after["main_ns"] - before["main_ns"]) / 1e9,
        "loop_wait_s": (after["wait_ns"] - before["wait_ns"]) / 1e9,
        "involuntary_per_req": (after["involuntary"] - before["involuntary"]) / n,
        "voluntary_per_req": (after["voluntary"] - before["voluntary"]) / n,
    }


# --------------------------------------------------------------------------- perf

#: Shared objects by name, to the part of the process they are.
DSO_GROUPS: list[tuple[str, str]] = [
    ("[kernel", "kernel (syscalls, loopback TCP, scheduler)"),
    ("libpython", "Python interpreter (the Python code)"),
    ("python3", "Python interpreter (the Python code)"),
    ("loop.cpython", "uvloop + libuv (C)"),
    ("parser.cpython", "httptools + llhttp (C)"),
    ("_asyncio", "asyncio's C accelerators (Future, Task)"),
    ("libc.so", "libc (malloc, memcpy...)"),
    ("ld-linux", "libc (malloc, memcpy...)"),
]


def _dso_group(dso: str) -> str:
    return next((label for key, label in DSO_GROUPS if key in dso), f"other ({dso})")


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    done = harness.run_quiet(["perf", "stat", "-e", "cpu-clock", "true"], timeout=30)
    return done.returncode == 0


#: Kernel functions under which the system calls of an event loop run, by what they do
#: (inclusive samples: a function and all it calls).
SYSCALLS: list[tuple[str, str]] = [
    ("do_syscall_64", "all system calls"),
    ("tcp_sendmsg", "TCP send (write, writev; on loopback it runs the receiver's TCP input)"),
    ("tcp_recvmsg", "TCP receive (read)"),
    ("do_epoll_wait", "epoll_wait"),
    ("do_epoll_ctl", "epoll_ctl (pause/resume reading, new sockets)"),
]


def _perf_report(data: Path) -> dict[str, Any]:
    """Shares of the samples by part of the process, by system call, and the top symbols."""
    base = ["perf", "report", "-i", str(data), "--stdio", "-q", "-g", "none"]
    inclusive = harness.run_quiet([*base, "--children", "--sort", "sym"], timeout=300).stdout
    syscalls: Counter[str] = Counter()
    for line in inclusive.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+[\d.]+%\s+\[k\]\s+(\S+)", line)
        if m:
            label = next((lb for rx, lb in SYSCALLS if re.fullmatch(rx, m.group(2))), None)
            if label is not None:
                syscalls[label] += float(m.group(1))
    base.append("--no-children")
    by_dso = harness.run_quiet([*base, "--sort", "dso"], timeout=300).stdout
    groups: Counter[str] = Counter()
    for line in by_dso.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
        if m:
            groups[_dso_group(m.group(2))] += float(m.group(1))
    by_sym = harness.run_quiet([*base, "--sort", "dso,sym", "--percent-limit", "0.4"], 300)
    symbols = []
    for line in by_sym.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$", line)
        if m:
            symbols.append({"pct": float(m.group(1)), "dso": m.group(2), "symbol": m.group(4)})
    return {"groups": dict(groups), "syscalls": dict(syscalls), "symbols": symbols[:20]}


# --------------------------------------------------------------------------- cProfile


#: Bucket of a function, by a fragment of its file's path and its qualified name (a regex
#: that must match the whole name; None: any). The first rule that matches wins. Functions
#: of no rule (builtins, the stdlib) or of the bucket "" count for their callers' buckets.
PARSE = "httptools: request parsing + its callbacks"
HANDLING = "request handling (engine glue, deadlines, routing)"
RETRY = "retry bookkeeping (softlb.retry: Attempts, may_resend)"
FIELDS = "forwarded head building (fields, X-Forwarded-*)"
RELAY = "upstream answer parsing + relay to the client"
CONNS = "upstream connections: take idle, start, release"
POOL = "backend pool: pick, lease, release + strategy"
EVENTS = "events, metrics, stats, access log"
WRITES = "transport writes: uvloop write + the send syscall (the Python functions around them)"
TASKS = "asyncio task/future machinery (create_task, futures, loop.time)"
OTHER = "other"
#: Not a bucket of the profile: uvloop's loop outside Python, from the unprofiled CPU.
LOOP = "uvloop's loop outside Python (epoll, recv before data_received, dispatch)"

RULES: list[tuple[str, str | None, str]] = [
    # uvloop's transport methods (and httptools' feed_data, loop.create_future...) are Cython
    # methods, which cProfile does not see: their time is their Python caller's own time.
    # These callers do little else than write (UpstreamConnection.start also resets some 15
    # fields and makes the answer head's future).
    ("softlb/aio/engine.py", r"ClientConnection\.(write|writelines)", WRITES),
    ("softlb/aio/upstream.py", r"UpstreamConnection\.(write|start)", WRITES),
    ("bare_uvloop.py", r"Upstream\.send|Client\.send", WRITES),
    # the engine (src/softlb/aio)
    (
        "softlb/aio/engine.py",
        r"ClientConnection\.(data_received|on_message_begin|on_url|on_header"
        r"|on_headers_complete|on_body|on_message_complete)|_Request\.__init__",
        PARSE,
    ),
    ("softlb/aio/engine.py", r"Engine\.(_fields|_exchange\.<locals>\.head)", FIELDS),
    (
        "softlb/aio/engine.py",
        r"Engine\.(_relay|_finish|_relay\.<locals>\..*)|_answer_head",
        RELAY,
    ),
    ("softlb/aio/engine.py", None, HANDLING),
    (
        "softlb/aio/upstream.py",
        r"UpstreamConnection\.(data_received|on_status|on_header|on_headers_complete|on_body"
        r"|on_message_complete|_finish|take_body|take_pieces|stream)|UpstreamAnswer\..*",
        RELAY,
    ),
    ("softlb/aio/upstream.py", None, CONNS),
    ("softlb/http/headers.py", None, ""),  # helpers of both heads: their callers'
    ("softlb/retry.py", None, RETRY),
    ("softlb/pool.py", None, POOL),
    ("softlb/backend.py", None, POOL),
    ("softlb/balancers/", None, POOL),
    ("softlb/sticky.py", None, POOL),
    ("softlb/queueing.py", None, POOL),
    ("softlb/wsgi.py", r"LoadBalancer\.answered", EVENTS),
    ("softlb/events.py", None, EVENTS),
    ("softlb/metrics.py", None, EVENTS),
    ("softlb/stats.py", None, EVENTS),
    ("softlb/access_log.py", None, EVENTS),
    ("prometheus_client/", None, EVENTS),
    ("logging/", None, EVENTS),
    ("softlb/", None, OTHER + " softlb"),
    # the floor (peers/bare_uvloop.py)
    (
        "bare_uvloop.py",
        r"Client\.(data_received|on_message_begin|on_url|on_header|on_body"
        r"|on_message_complete|forward)|Client\.__init__",
        PARSE,
    ),
    ("bare_uvloop.py", r"named|nodelay", ""),  # helpers: their callers'
    ("bare_uvloop.py", r"Client\.on_headers_complete|Request\.__init__", FIELDS),
    ("bare_uvloop.py", r"Upstream\.(start|send|pause|connection_made)|Backend\..*", CONNS),
    ("bare_uvloop.py", r"Upstream\..*", RELAY),
    ("bare_uvloop.py", r"Proxy\..*", POOL),
    ("bare_uvloop.py", None, HANDLING),
    # asyncio's Python parts
    ("asyncio/", None, TASKS),
]

#: Builtins by a fragment of their name (cProfile's ``~`` file), to a bucket of their own.
BUILTINS: list[tuple[str, str]] = [
    ("'write' of 'uvloop", WRITES),
    ("'writelines' of 'uvloop", WRITES),
    ("'pause_reading' of 'uvloop", WRITES),
    ("'resume_reading' of 'uvloop", WRITES),
    ("'close' of 'uvloop", WRITES),
    ("'abort' of 'uvloop", WRITES),
    ("'create_task' of 'uvloop", TASKS),
    ("'create_future' of 'uvloop", TASKS),
    ("'call_soon' of 'uvloop", TASKS),
    ("'call_later' of 'uvloop", TASKS),
    ("'time' of 'uvloop", TASKS),
    ("_asyncio", TASKS),
]


class Qualnames:
    """Qualified names of functions, from their file's source (cProfile knows co_name only)."""

    def __init__(self) -> None:
        self._files: dict[str, dict[int, str]] = {}

    def __call__(self, func: Func) -> str:
        path, line, name = func
        if path not in self._files:
            self._files[path] = self._read(path)
        return self._files[path].get(line, name)

    @staticmethod
    def _read(path: str) -> dict[int, str]:
        try:
            tree = ast.parse(Path(path).read_text())
        except (OSError, SyntaxError, ValueError):
            return {}
        names: dict[int, str] = {}

        comprehensions = {
            ast.ListComp: "<listcomp>",
            ast.SetComp: "<setcomp>",
            ast.DictComp: "<dictcomp>",
            ast.GeneratorExp: "<genexpr>",
            ast.Lambda: "<lambda>",
        }

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                kind = comprehensions.get(type(child))
                if kind is not None:  # named after the function it is in
                    names.setdefault(child.lineno, prefix.removesuffix(".<locals>.") + "." + kind)
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    qual = prefix + child.name
                    for line in [child.lineno] + [d.lineno for d in child.decorator_list]:
                        names[line] = qual
                    visit(child, qual + ".<locals>.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
                else:
                    visit(child, prefix)

        visit(tree, "")
        return names


def _bucket_of(func: Func, qualname: Qualnames) -> str | None:
    path, _, name = func
    if path == "~":
        return next((b for key, b in BUILTINS if key in name), None)
    # A comprehension, generator expression or lambda counts as the function it is in.
    qual = re.sub(r"\.<(listcomp|setcomp|dictcomp|genexpr|lambda)>$", "", qualname(func))
    for fragment, pattern, bucket in RULES:
        if fragment in path and (pattern is None or re.fullmatch(pattern, qual)):
            return bucket or None  # "": its callers'
    return None


def _short(func: Func, qualname: Qualnames) -> str:
    path, line, name = func
    if path == "~":
        return name
    for marker in ("site-packages/", "/src/", "/benchmarks/peers/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = path.split("/", 1)[1]
            break
    return f"{path}:{line} {qualname(func)}"


def buckets(stats: pstats.Stats) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Own seconds, calls and calls of builtins per bucket; a function of no bucket counts
    for its callers'."""
    table: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
    qualname = Qualnames()
    owner = caller_attribution(
        table,
        lambda func: _bucket_of(func, qualname),
        lambda func: f"{OTHER}: {_short(func, qualname)}",
        f"{OTHER} (recursion)",
    )

    seconds: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    builtin_calls: Counter[str] = Counter()
    for func, (_, ncalls, own, _, _) in table.items():
        if _profiler_toggles(func):
            continue
        for label, fraction in owner(func, 2).items():
            seconds[label] += own * fraction
        for label, fraction in owner(func, 1).items():
            calls[label] += ncalls * fraction
            if func[0] == "~":
                builtin_calls[label] += ncalls * fraction
    return seconds, calls, builtin_calls


def _profiler_toggles(func: Func) -> bool:
    return func[0] == "~" and "_lsprof.Profiler" in func[2]


def top_functions(stats: pstats.Stats, requests: int, limit: int = 25) -> list[dict[str, Any]]:
    table: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
    qualname = Qualnames()
    total = sum(v[2] for v in table.values()) or 1.0
    rows = []
    for func, (_, ncalls, own, cum, _) in sorted(table.items(), key=lambda kv: -kv[1][2]):
        if _profiler_toggles(func):
            continue
        rows.append(
            {
                "function": _short(func, qualname),
                "bucket": _bucket_of(func, qualname) or "(its callers')",
                "calls_per_req": ncalls / requests,
                "own_us_per_req": own * 1e6 / requests,
                "cum_us_per_req": cum * 1e6 / requests,
                "own_share": own / total,
            }
        )
        if len(rows) == limit:
            break
    return rows


def calibrate(rounds: int = 7, n: int = 200_000) -> dict[str, float]:
    """CPU seconds cProfile adds per profiled call, for a Python function and for a builtin."""

    def leaf() -> None:
        pass

    def python_calls() -> None:
        for _ in range(n):
            leaf()

    def builtin_calls() -> None:
        x: list[int] = []
        for _ in range(n):
            len(x)

    out = {}
    for name, work in (("python", python_calls), ("builtin", builtin_calls)):
        best = float("inf")
        for _ in range(rounds):
            started = time.thread_time()
            work()
            plain = time.thread_time() - started
            profile = cProfile.Profile()
            started = time.thread_time()
            profile.enable()
            work()
            profile.disable()
            best = min(best, (time.thread_time() - started - plain) / n)
        out[name] = max(best, 0.0)
    return out


def _profile_numbers(
    stats: pstats.Stats, window: dict[str, Any], cost: dict[str, float], plain_us: float
) -> dict[str, Any]:
    """The profile's buckets per request: raw (profiled) and estimated unprofiled.

    ``plain_us``: the event-loop thread's CPU per request without the profiler. The seen
    (wall) time counts as CPU in the window's proportion of CPU to CPU + run-queue wait; each
    bucket is charged the calibrated cost of its calls (``cost``); what the profiled thread
    used beyond the plain run's and those charges is taken as a uniform slowdown (cache
    misses...) of everything, seen or not. The CPU cProfile did not see (uvloop's loop between
    two Python callbacks) is the thread's CPU minus the seen CPU, under the same slowdown."""
    requests = max(window["requests"], 1)
    seconds, calls, builtin_calls = buckets(stats)
    seen = sum(seconds.values())
    cpu, wait = window["loop_cpu_s"], window["loop_wait_s"]
    cpu_share = cpu / (cpu + wait) if cpu + wait else 1.0
    charged = {
        label: (n - builtin_calls[label]) * cost["python"] + builtin_calls[label] * cost["builtin"]
        for label, n in calls.items()
    }
    profiled = window["loop_cpu_us"] * requests / 1e6  # seconds, like the rest
    direct = sum(charged.values())
    slowdown = (profiled - direct) / (plain_us * requests / 1e6) if plain_us else 1.0
    estimate = {
        label: max(sec * cpu_share - charged.get(label, 0.0), 0.0) / slowdown * 1e6 / requests
        for label, sec in seconds.items()
    }
    unseen = max(profiled - seen * cpu_share, 0.0)
    return {
        "requests": requests,
        "seen_us": seen * 1e6 / requests,
        "seen_cpu_us": seen * cpu_share * 1e6 / requests,
        "cpu_share": cpu_share,
        "wait_us": window["loop_wait_us"],
        "calls_per_req": sum(calls.values()) / requests,
        "charged_us": direct * 1e6 / requests,
        "slowdown": slowdown,
        "outside_us": unseen / slowdown * 1e6 / requests,
        "raw_us": {k: v * 1e6 / requests for k, v in seconds.items()},
        "calls": {k: v / requests for k, v in calls.items()},
        "estimate_us": estimate,
        "top": top_functions(stats, requests),
    }


# --------------------------------------------------------------------------- runs


def _start(target: str, ctx: Any, port: int, mode: str, dump: Path) -> tuple[Any, int]:
    """Start ``target``; (its Proc, the PID of the process that serves: the worker)."""
    python = str(ctx.softlb_venv / "bin" / "python")
    if target == "softlb":
        config = harness.softlb_config(ctx, port)
        argv = [python, str(Path(__file__).resolve()), "_launch-softlb", "serve"]
        argv += ["--config", str(config), "--workers", "1"]
    else:
        argv = [python, str(Path(__file__).resolve()), "_launch-floor", str(port)]
        argv += ctx.backend_urls
    env = {**os.environ, "BENCH_PROFILE_OUT": str(dump)}
    proc = harness.Proc(f"{target}-{mode}-{port}", argv, ctx.tmp, env=env)
    harness.wait_ready(proc, f"http://127.0.0.1:{port}/small")
    if target == "floor":
        return proc, proc.pid
    workers = harness.children(proc.pid)
    if len(workers) != 1:
        raise RuntimeError(f"expected one softlb worker, found {workers}")
    return proc, workers[0]


@contextlib.contextmanager
def _backends_batch(ctx: Any) -> Any:
    """The nginx backends as SCHED_BATCH: woken by the proxy's request they no longer preempt
    it at once (CFS wakeup preemption), so that the profiler's wall clock does not count
    their work as the own time of the proxy function that wrote to them."""
    pids = [pid for proc in ctx.backends for pid in harness.process_tree(proc.pid)]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def measure(target: str, mode: str, ctx: Any, seconds: int, body: str) -> dict[str, Any]:
    """One fresh process of ``target``, warmed up, then one measured wrk run in ``mode``."""
    port = harness.free_port()
    dump = ctx.tmp / f"{target}-{mode}-{port}"
    dump.mkdir()
    proc, worker = _start(target, ctx, port, mode, dump)
    url = f"http://127.0.0.1:{port}/{body}"
    out: dict[str, Any] = {"target": target, "mode": mode}
    batch = _backends_batch(ctx) if mode == "cprofile" else contextlib.nullcontext()
    perf = None
    try:
        harness.wrk(url, CONNECTIONS, harness.WARMUP_S)
        if mode == "perf":
            argv = ["taskset", "-c", str(harness.LOAD_CPU), "perf", "record", "-q"]
            argv += ["-e", "cpu-clock", "-g", "-F", str(PERF_HZ), "-p", str(worker)]
            argv += ["-o", str(dump / "perf.data"), "--", "sleep", str(seconds)]
            with (dump / "perf.log").open("wb") as log:
                perf = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            time.sleep(0.2)
        with batch:
            if mode == "cprofile":
                os.kill(worker, signal.SIGUSR2)
                time.sleep(0.3)
            backends = [b.pid for b in ctx.backends]
            before = _snapshot(proc.pid, worker, backends)
            load = harness.wrk(url, CONNECTIONS, seconds)
            after = _snapshot(proc.pid, worker, backends)
            if mode == "cprofile":
                os.kill(worker, signal.SIGUSR2)
        out.update(rps=load["rps"], p50_ms=load["p50_ms"], p99_ms=load["p99_ms"])
        out["errors"] = load["non2xx"] + load["socket_errors"]
        out["window"] = _window(before, after, load["requests"])
        if perf is not None:
            perf.wait(timeout=seconds + 30)
        deadline = time.monotonic() + 60
        while mode == "cprofile" and not (dump / "window.pstats").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no profile from {target}:\n{proc.log_tail()}")
            time.sleep(0.1)
    finally:
        if perf is not None and perf.poll() is None:
            perf.kill()
            perf.wait(5)
        proc.stop()
    if mode == "perf":
        out["perf"] = _perf_report(dump / "perf.data")
    if mode == "cprofile":
        out["pstats"] = str(dump / "window.pstats")
    return out


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else 0.0


def summarize(runs: list[dict[str, Any]], cost: dict[str, float]) -> dict[str, Any]:
    """Medians over the repeats of one target's plain, perf and cprofile runs."""
    plain = [r for r in runs if r["mode"] == "plain"]
    perf = [r for r in runs if r["mode"] == "perf"]
    prof = [r for r in runs if r["mode"] == "cprofile"]
    keys = ("tree_cpu_us", "worker_cpu_us", "loop_cpu_us", "loop_wait_us", "involuntary_per_req")
    out: dict[str, Any] = {
        "plain": {k: _median([r["window"][k] for r in plain]) for k in keys},
        "rps": _median([r["rps"] for r in plain]),
        "p99_ms": _median([r["p99_ms"] for r in plain]),
        "errors": sum(r["errors"] for r in runs),
        "others_pct": max(r["window"]["others_pct"] for r in runs),
    }
    loop_us = out["plain"]["loop_cpu_us"]
    if perf:
        groups = {g for r in perf for g in r["perf"]["groups"]}
        shares: dict[str, float] = Counter()
        for g in groups:
            pct = _median([r["perf"]["groups"].get(g, 0.0) for r in perf])
            shares["other" if g.startswith("other (") and pct < 0.5 else g] += pct
        calls = {c for r in perf for c in r["perf"].get("syscalls", {})}
        sys_pct = {c: _median([r["perf"]["syscalls"].get(c, 0.0) for r in perf]) for c in calls}
        out["perf"] = {
            "syscalls_pct": sys_pct,
            "syscalls_us": {c: p / 100 * out["plain"]["worker_cpu_us"] for c, p in sys_pct.items()},
            "shares_pct": shares,
            "us": {g: pct / 100 * out["plain"]["worker_cpu_us"] for g, pct in shares.items()},
            "symbols": perf[0]["perf"]["symbols"],
        }
    if prof:
        numbers = [
            _profile_numbers(pstats.Stats(r["pstats"]), r["window"], cost, loop_us) | {"run": r}
            for r in prof
        ]
        labels = {label for n in numbers for label in n["estimate_us"]}
        estimate = {lb: _median([n["estimate_us"].get(lb, 0.0) for n in numbers]) for lb in labels}
        out["profile"] = {
            "estimate_us": estimate,
            "raw_us": {lb: _median([n["raw_us"].get(lb, 0.0) for n in numbers]) for lb in labels},
            "calls": {lb: _median([n["calls"].get(lb, 0.0) for n in numbers]) for lb in labels},
            "loop_outside_us": _median([n["outside_us"] for n in numbers]),
            "profiled_cpu_us": _median([r["window"]["loop_cpu_us"] for r in prof]),
            "profiled_rps": _median([r["rps"] for r in prof]),
            "charged_us": _median([n["charged_us"] for n in numbers]),
            "slowdown": _median([n["slowdown"] for n in numbers]),
            "wait_us": _median([n["wait_us"] for n in numbers]),
            "calls_per_req": _median([n["calls_per_req"] for n in numbers]),
            "seen_us": _median([n["seen_us"] for n in numbers]),
            "cpu_share": _median([n["cpu_share"] for n in numbers]),
            # the run whose profiled CPU is the median's, for its top functions
            "top": sorted(numbers, key=lambda n: n["run"]["window"]["loop_cpu_us"])[
                len(numbers) // 2
            ]["top"],
        }
    return out


BUCKET_ORDER = [PARSE, HANDLING, RETRY, FIELDS, RELAY, CONNS, POOL, EVENTS, WRITES, TASKS]


def _bucket_rows(profile: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """(estimate µs, raw µs, calls) per bucket of the table, others folded into 'other'."""
    rows: dict[str, list[float]] = {b: [0.0, 0.0, 0.0] for b in [*BUCKET_ORDER, OTHER]}
    for label, us in profile["estimate_us"].items():
        key = label if label in rows else OTHER
        rows[key][0] += us
        rows[key][1] += profile["raw_us"].get(label, 0.0)
        rows[key][2] += profile["calls"].get(label, 0.0)
    return {k: (v[0], v[1], v[2]) for k, v in rows.items()}


def report(summary: dict[str, dict[str, Any]], cost: dict[str, float], args: Any) -> str:
    names = [t for t in TARGETS if t in summary]
    head = " | ".join(names)
    lines = [
        f"/{args.body}, `wrk -t1 -c{CONNECTIONS} -d{args.seconds}s` from CPU 0, the proxy and "
        f"both nginx backends on CPU 1; medians of {args.repeat} runs of each kind, each on a "
        f"fresh process. softlb = {LABELS['softlb']}; floor = {LABELS['floor']}.",
        "",
        "**Unprofiled CPU per request** (µs; /proc):",
        "",
        f"| | {head} |",
        "|---|" + "---:|" * len(names),
    ]

    def row(label: str, fmt: str, get: Any) -> None:
        values = []
        for n in names:
            try:
                values.append(fmt.format(get(summary[n])))
            except (KeyError, TypeError):
                values.append("—")
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("req/s", "{:,.0f}", lambda s: s["rps"])
    row(
        "others % (most CPU other processes took on CPU 1 in any run, in % of its time)",
        "{:.0f}",
        lambda s: s["others_pct"],
    )
    row("p99 ms", "{:.2f}", lambda s: s["p99_ms"])
    row("process tree (run.py's CPU ms/req, in µs)", "{:.1f}", lambda s: s["plain"]["tree_cpu_us"])
    row("the worker process", "{:.1f}", lambda s: s["plain"]["worker_cpu_us"])
    row("its event-loop thread", "{:.1f}", lambda s: s["plain"]["loop_cpu_us"])
    row(
        "its event-loop thread: waiting for the CPU (run queue)",
        "{:.1f}",
        lambda s: s["plain"]["loop_wait_us"],
    )
    row(
        "involuntary context switches / request",
        "{:.2f}",
        lambda s: s["plain"]["involuntary_per_req"],
    )
    if any("perf" in summary[n] for n in names):
        groups = sorted(
            {g for n in names for g in summary[n].get("perf", {}).get("us", {})},
            key=lambda g: -max(summary[n].get("perf", {}).get("us", {}).get(g, 0) for n in names),
        )
        lines += [
            "",
            "**Where the worker's CPU executes** (perf, `cpu-clock` samples of the worker "
            "process; µs per request = share × the plain run's worker CPU):",
            "",
            f"| part | {' | '.join(f'{n} µs | {n} %' for n in names)} |",
            "|---|" + "---:|---:|" * len(names),
        ]
        for g in groups:
            cells = []
            for n in names:
                p = summary[n].get("perf")
                if p is None:
                    cells += ["—", "—"]
                else:
                    cells += [f"{p['us'].get(g, 0.0):.1f}", f"{p['shares_pct'].get(g, 0.0):.1f}%"]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    if any(summary[n].get("perf", {}).get("syscalls_us") for n in names):
        lines += [
            "",
            "**The system calls** (perf call chains: the samples under each kernel function, "
            "with all it calls; on loopback a TCP send also runs the receiving socket's TCP "
            "input, so the backends' and wrk's receive side is counted here; µs per request as "
            "above):",
            "",
            f"| kernel function | {' | '.join(f'{n} µs | {n} %' for n in names)} |",
            "|---|" + "---:|---:|" * len(names),
        ]
        for label in [lb for _, lb in SYSCALLS]:
            cells = []
            for n in names:
                p = summary[n].get("perf", {})
                cells += [
                    f"{p.get('syscalls_us', {}).get(label, 0.0):.1f}",
                    f"{p.get('syscalls_pct', {}).get(label, 0.0):.1f}%",
                ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any("profile" in summary[n] for n in names):
        lines += [
            "",
            "**The event-loop thread's CPU by bucket** (cProfile; *≈ µs* is the estimate "
            "without the profiler, *raw* the profiled wall time per request; builtins count "
            "for their caller's bucket unless named):",
            "",
            f"| bucket | {' | '.join(f'{n} ≈ µs | {n} raw µs | {n} calls' for n in names)} |",
            "|---|" + "---:|---:|---:|" * len(names),
        ]
        tables = {n: _bucket_rows(summary[n]["profile"]) for n in names if "profile" in summary[n]}
        for bucket in [*BUCKET_ORDER, OTHER]:
            cells = []
            for n in names:
                est, raw, calls = tables.get(n, {}).get(bucket, (0.0, 0.0, 0.0))
                cells += [f"{est:.1f}", f"{raw:.1f}", f"{calls:.0f}"]
            lines.append(f"| {bucket} | " + " | ".join(cells) + " |")
        cells = []
        for n in names:
            p = summary[n].get("profile")
            cells += [f"{p['loop_outside_us']:.1f}" if p else "—", "—", "—"]
        lines.append(f"| {LOOP} | " + " | ".join(cells) + " |")
        cells = []
        for n in names:
            cells += [f"**{summary[n]['plain']['loop_cpu_us']:.1f}**", "", ""]
        lines.append("| **the event-loop thread, unprofiled** | " + " | ".join(cells) + " |")
        lines += [
            "",
            "The profiler's cost and how the estimate takes it out (cProfile's cost per call, "
            f"calibrated in this script's process: {cost['python'] * 1e9:.0f} ns for a Python "
            f"function, {cost['builtin'] * 1e9:.0f} ns for a builtin; see the docstring):",
            "",
            f"| | {head} |",
            "|---|" + "---:|" * len(names),
        ]
        row("profiled calls / request", "{:.0f}", lambda s: s["profile"]["calls_per_req"])
        row("profiled req/s", "{:,.0f}", lambda s: s["profile"]["profiled_rps"])
        row(
            "event-loop thread CPU µs/req, profiled",
            "{:.1f}",
            lambda s: s["profile"]["profiled_cpu_us"],
        )
        row("… unprofiled (plain run)", "{:.1f}", lambda s: s["plain"]["loop_cpu_us"])
        row(
            "the calibrated cost of its calls, charged to their buckets",
            "{:.1f}",
            lambda s: s["profile"]["charged_us"],
        )
        row(
            "the rest, as a uniform slowdown of everything (factor)",
            "{:.2f}",
            lambda s: s["profile"]["slowdown"],
        )
        row(
            "event-loop thread's run-queue wait µs/req, profiled (backends SCHED_BATCH)",
            "{:.1f}",
            lambda s: s["profile"]["wait_us"],
        )
        row("time seen by cProfile µs/req (wall)", "{:.1f}", lambda s: s["profile"]["seen_us"])
        row(
            "CPU share of the window (CPU ÷ CPU + run queue)",
            "{:.2f}",
            lambda s: s["profile"]["cpu_share"],
        )
        for n in names:
            p = summary[n].get("profile")
            if not p:
                continue
            lines += [
                "",
                f"**Top {len(p['top'])} functions by own time: {n}** (profiled µs per request, "
                "wall clock, with the profiler's cost; the median run):",
                "",
                "| function | bucket | calls/req | own µs/req | cum µs/req | share |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for t in p["top"]:
                fn = t["function"].replace("|", "\\|")
                lines.append(
                    f"| `{fn}` | {t['bucket']} | {t['calls_per_req']:.2f} | "
                    f"{t['own_us_per_req']:.2f} | {t['cum_us_per_req']:.2f} | "
                    f"{t['own_share']:.1%} |"
                )
    for n in names:
        p = summary[n].get("perf")
        if not p:
            continue
        lines += [
            "",
            f"**Top symbols (perf): {n}**",
            "",
            "| % of samples | object | symbol |",
            "|---:|---|---|",
        ]
        lines += [f"| {s['pct']:.1f} | {s['dso']} | `{s['symbol']}` |" for s in p["symbols"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_launch-softlb"]:
        return _launch_softlb(argv[1:])
    if argv[:1] == ["_launch-floor"]:
        return _launch_floor(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="seconds of load per run (8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind; median (3)")
    parser.add_argument("--body", choices=harness.BODIES, default="small", help="(small)")
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix), help="softlb's venv")
    parser.add_argument("--no-floor", action="store_true", help="profile softlb only")
    parser.add_argument("--no-perf", action="store_true", help="skip the perf runs")
    parser.add_argument("--no-save", action="store_true", help="print only, save nothing")
    parser.add_argument(
        "--keep-pstats", type=Path, metavar="DIR", help="copy the cProfile dumps there"
    )
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.repeat < 1:
        parser.error("--seconds and --repeat must be at least 1")
    venv = args.venv.resolve()
    if not (venv / "bin" / "softlb").exists():
        sys.exit(f"profile_engine.py: no softlb in {venv}; pass --venv of softlb's venv")
    harness.ensure_tools(["nginx", "wrk"])
    modes = ["plain", "cprofile"]
    if not args.no_perf:
        if perf_works():
            modes.insert(1, "perf")
        else:
            print("perf does not work here: no perf runs", file=sys.stderr, flush=True)
    targets = ["softlb"] if args.no_floor else list(TARGETS)
    os.sched_setaffinity(0, {harness.LOAD_CPU})
    signal.signal(signal.SIGTERM, harness._terminate)
    print("calibrating cProfile's cost per call...", flush=True)
    cost = calibrate()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    with tempfile.TemporaryDirectory(prefix="softlb-profile-engine-") as tmp:
        ctx = harness.Context(Path(tmp), venv, args.seconds, args.repeat)
        try:
            harness.start_backends(ctx)
            for rep in range(args.repeat):
                for target in targets if rep % 2 == 0 else targets[::-1]:
                    for mode in modes:
                        r = measure(target, mode, ctx, args.seconds, args.body)
                        runs[target].append(r)
                        w = r["window"]
                        print(
                            f"[{time.monotonic() - started:4.0f} s] {rep + 1}/{args.repeat} "
                            f"{target:6} {mode:8} {r['rps']:8,.0f} req/s  worker "
                            f"{w['worker_cpu_us']:5.1f} µs/req  loop thread "
                            f"{w['loop_cpu_us']:5.1f} µs/req  others {w['others_pct']:3.0f}%"
                            f"  steal {w['steal_pct']:3.0f}%"
                            + (f"  ERRORS {r['errors']}" if r["errors"] else ""),
                            flush=True,
                        )
            # Once more at the end, the cheaper of the two: a busy moment only inflates it.
            again = calibrate()
            cost = {kind: min(cost[kind], again[kind]) for kind in cost}
            summary = {t: summarize(runs[t], cost) for t in targets}
            if args.keep_pstats:
                args.keep_pstats.mkdir(parents=True, exist_ok=True)
                for t in targets:
                    for i, r in enumerate(x for x in runs[t] if x["mode"] == "cprofile"):
                        shutil.copy(r["pstats"], args.keep_pstats / f"{t}-{i + 1}.pstats")
        finally:
            harness.Proc.stop_all()
    text = report(summary, cost, args)
    title = f"# softlb event-loop engine profile, {stamp}"
    text = f"{title}\n\n{text}\n\n(ran in {(time.monotonic() - started) / 60:.1f} min)"
    print()
    print(text)
    if not args.no_save:
        harness.RESULTS_DIR.mkdir(exist_ok=True)
        out = harness.RESULTS_DIR / f"profile-engine-{stamp}.md"
        out.write_text(text + "\n")
        for target_runs in runs.values():
            for r in target_runs:
                r.pop("pstats", None)
        payload = {
            "args": {"seconds": args.seconds, "repeat": args.repeat, "body": args.body},
            "calibration_s_per_call": cost,
            "summary": summary,
            "runs": runs,
        }
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"\nsaved {out} and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
