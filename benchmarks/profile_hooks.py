"""gunicorn hooks that measure where a gthread worker's CPU goes; used by profile_serve.py.

``post_worker_init`` wraps the worker's ``handle`` (one call per request on a gthread worker:
read and parse the request, call the app, write the answer) and its WSGI app, and adds up the
CPU time of the calling thread (``time.thread_time()``: user + system) spent in each. With
``BENCH_PROFILE=cprofile-cpu`` every request thread also runs a ``cProfile.Profile`` on that
same clock while in ``handle``; with ``cprofile-wall``, on cProfile's own (wall) clock.

Two paths are answered by the wrapper instead of the app:

* ``GET /_bench/reset`` starts a new measurement window (counters and profiles);
* ``GET /_bench/dump`` writes the window to ``$BENCH_PROFILE_OUT/window.json`` (and
  ``window.pstats`` with cProfile), with the worker's and its main thread's CPU from /proc.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_generation = 0
_threads: list[dict[str, Any]] = []  # one dict per request thread and generation
_window: dict[str, Any] = {}


def _task_ticks(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _process_ticks() -> int:
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _reset() -> None:
    global _generation
    with _lock:
        _generation += 1
        _threads.clear()
        _window.update(
            started=time.monotonic(),
            process_ticks=_process_ticks(),
            main_ticks=_task_ticks(os.getpid()),
        )


def _dump(out: Path) -> dict[str, Any]:
    tck = os.sysconf("SC_CLK_TCK")
    with _lock:
        threads = list(_threads)
        result = {
            "wall_s": time.monotonic() - _window["started"],
            "process_cpu_s": (_process_ticks() - _window["process_ticks"]) / tck,
            "main_thread_cpu_s": (_task_ticks(os.getpid()) - _window["main_ticks"]) / tck,
            "handle_cpu_s": sum(t["handle"] for t in threads),
            "app_cpu_s": sum(t["app"] for t in threads),
            "handle_calls": sum(t["calls"] for t in threads),
            "requests": sum(t["requests"] for t in threads),
            "threads": len(threads),
        }
    profiles = [t["profile"] for t in threads if t["profile"] is not None]
    if profiles:
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(str(out / "window.pstats"))
    (out / "window.json").write_text(json.dumps(result, indent=1))
    return result


def post_worker_init(worker: Any) -> None:
    mode = os.environ.get("BENCH_PROFILE", "timing")
    out = Path(os.environ["BENCH_PROFILE_OUT"])
    local = threading.local()
    handle = worker.handle
    app = worker.wsgi
    thread_time = time.thread_time

    def state() -> dict[str, Any]:
        mine = getattr(local, "state", None)
        if mine is None or mine["generation"] != _generation:
            if mode == "cprofile-cpu":
                profile = cProfile.Profile(thread_time)
            elif mode == "cprofile-wall":
                profile = cProfile.Profile()  # its own C clock: cheap, but wall time
            else:
                profile = None
            mine = {"generation": _generation, "handle": 0.0, "app": 0.0, "calls": 0}
            mine.update(requests=0, profile=profile)
            with _lock:
                _threads.append(mine)
            local.state = mine
        return mine

    def timed_handle(conn: Any) -> Any:
        mine = state()
        profile = mine["profile"]
        started = thread_time()
        if profile is not None:
            profile.enable()
        try:
            return handle(conn)
        finally:
            if profile is not None:
                profile.disable()
            mine["handle"] += thread_time() - started
            mine["calls"] += 1

    def timed_app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_bench/"):
            if path == "/_bench/reset":
                _reset()
                body = b"reset\n"
            else:
                body = json.dumps(_dump(out)).encode()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]
        mine = state()
        started = thread_time()
        try:
            return app(environ, start_response)
        finally:
            mine["app"] += thread_time() - started
            mine["requests"] += 1

    worker.handle = timed_handle
    worker.wsgi = timed_app
    _reset()
