"""Does :mod:`softlb.worker`'s gthread subclass pay for its use of gunicorn internals? (issue #12)

Runs ``softlb serve --workers 1 --engine threads --threads 16`` twice over, under
``run.py``'s load (two nginx backends and the proxy pinned to CPU 1, ``wrk -t1`` on CPU 0,
``/small`` and ``/big``, 16 and 64 connections, keep-alive):

``subclass``
    ``softlb serve`` as it is: up to commit 2b231d5, ``worker_class =
    "softlb.worker.SoftLBWorker"``; since the subclass was removed (it did not pay), stock
    gthread too, so re-running the comparison means checking out 2b231d5;
``stock``
    the same CLI with gunicorn's stock ``gthread`` worker class, through
    ``peers/softlb_gthread.py`` (the product has no switch for it).

Each round runs both, the order alternating from round to round (``--rounds``, 3), every cell
once per round, a fresh process per target and round (warmed up for 2 s). Reports req/s, p99
and CPU ms/req (utime + stime of the process tree / requests) per round and their medians,
and *others %* as run.py does (a cell where other processes took more than 20 % of a CPU is
run once more, the quieter run kept; at most one cell in ten).

The rule (benchmarks/README.md): the subclass stays only if it cuts the median CPU ms per
``/small`` request by >= 3 %, with the spread of the runs (max - min of the per-round gains)
smaller than the gain, in both connection counts. Saves ``results/worker-YYYY-MM-DD-HHMM.md``
and ``.json``. All traffic on 127.0.0.1, every process stopped by its PID. Not part of CI.
About 5 minutes with the defaults. Wrap it in ``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # benchmarks/run.py: processes, backends, wrk, CPU accounting

#: The gain in CPU ms per /small request the subclass must show to stay (issue #12).
MIN_GAIN_PCT = 3.0


def _stock(ctx: run.Context, port: int) -> tuple[list[str], dict[str, str]]:
    """``softlb serve --engine threads`` with gunicorn's stock gthread: peers/softlb_gthread.py."""
    config = run.softlb_config(ctx, port)
    argv = [str(ctx.softlb_venv / "bin" / "python"), str(run.PEERS_DIR / "softlb_gthread.py")]
    argv += ["serve", "--config", str(config), "--workers", "1"]
    argv += ["--engine", "threads", "--threads", str(run.THREADS)]
    return argv, {}


TARGETS = {
    "subclass": run.Target(
        "subclass",
        "SoftLBWorker",
        "softlb",
        True,
        run._softlb(1, "least_connections", "threads"),
    ),
    "stock": run.Target("stock", "stock gthread", "softlb", True, _stock),
}


def gain_pct(subclass: float, stock: float) -> float:
    """How much less CPU per request the subclass used than stock gthread, in % of stock."""
    return (stock - subclass) / stock * 100


def report(raw: dict[str, Any], rounds: int) -> tuple[str, dict[str, Any]]:
    """Per-round and median tables, and the verdict of the rule."""
    lines = [
        "| body | conns | worker | req/s (rounds) | req/s | p99 ms | CPU ms/req (rounds) "
        "| CPU ms/req | others % |",
        "|---|---:|---|---|---:|---:|---|---:|---:|",
    ]
    verdict: dict[str, Any] = {}
    for body in run.BODIES:
        for conns in run.CONNECTIONS:
            lines += run.round_rows(raw, body, conns, list(TARGETS))
            sub = raw.get("subclass", {}).get(body, {}).get(conns, [])
            stock = raw.get("stock", {}).get(body, {}).get(conns, [])
            if sub and stock and len(sub) == len(stock):
                gains = [
                    gain_pct(a["cpu_ms_per_req"], b["cpu_ms_per_req"])
                    for a, b in zip(sub, stock, strict=True)
                ]
                median_gain = gain_pct(
                    statistics.median(r["cpu_ms_per_req"] for r in sub),
                    statistics.median(r["cpu_ms_per_req"] for r in stock),
                )
                verdict[f"{body}-c{conns}"] = {
                    "gains_pct": gains,
                    "median_gain_pct": median_gain,
                    "spread_pct": max(gains) - min(gains),
                }
    lines += [
        "",
        "Gain = CPU ms/req saved by the subclass, in % of stock gthread's (per round, and of "
        "the medians); spread = max - min of the per-round gains.",
        "",
        "| cell | gain per round % | median gain % | spread % |",
        "|---|---|---:|---:|",
    ]
    for cell, v in verdict.items():
        per_round = " / ".join(f"{g:+.1f}" for g in v["gains_pct"])
        lines.append(
            f"| {cell} | {per_round} | {v['median_gain_pct']:+.1f} | {v['spread_pct']:.1f} |"
        )
    small = [v for cell, v in verdict.items() if cell.startswith("small-")]
    pays = bool(small) and all(
        v["median_gain_pct"] >= MIN_GAIN_PCT and v["spread_pct"] < v["median_gain_pct"]
        for v in small
    )
    lines += [
        "",
        f"**Verdict** ({rounds} rounds): the subclass "
        + ("pays: keep it" if pays else "does not pay: use the stock gthread worker")
        + f" (rule: median CPU ms/req gain on /small >= {MIN_GAIN_PCT:.0f} % with a spread "
        "smaller than the gain, at 16 and 64 connections).",
    ]
    return "\n".join(lines), {"cells": verdict, "pays": pays}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order alternating (3)")
    parser.add_argument(
        "--venv", type=Path, default=Path(sys.prefix), help="softlb's virtualenv (this one)"
    )
    parser.add_argument("--retry-noisy", type=float, default=20.0, metavar="PCT")
    parser.add_argument("--no-save", action="store_true", help="print only, save nothing")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.venv / "bin" / "softlb").exists():
        sys.exit(f"bench_worker.py: no softlb in {args.venv}; pass --venv")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench_worker.py: needs 2 CPUs")
    run.ensure_tools(["nginx", "wrk"])
    os.sched_setaffinity(0, {run.LOAD_CPU})
    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    with tempfile.TemporaryDirectory(prefix="softlb-bench-worker-") as tmp:
        raw, order_log, env = run.alternating_rounds(
            TARGETS, Path(tmp), args.venv.resolve(), duration=args.duration,
            rounds=args.rounds, retry_noisy=args.retry_noisy, started=started,
        )  # fmt: skip
    table, verdict = report(raw, args.rounds)
    worst = max(
        run.noise(r) for t in raw.values() for b in t.values() for c in b.values() for r in c
    )
    text = "\n".join(
        [
            f"# softlb threads engine: SoftLBWorker vs stock gthread, {env['date']}",
            "",
            *[
                f"- **{k}**: {v}"
                for k, v in env.items()
                if k not in ("date", "peers venv", "haproxy")
            ],
            f"- **order**: {'; '.join(' then '.join(o) for o in order_log)}",
            f"- **others %** (most CPU other processes took in any cell, proxy's or wrk's CPU): "
            f"{worst:.0f}",
            "",
            table,
            "",
            f"(ran in {(time.monotonic() - started) / 60:.1f} min)",
        ]
    )
    print()
    print(text)
    if not args.no_save:
        if worst >= 20:
            print(f"\nnot saved: the machine was busy (others {worst:.0f} % >= 20 %)")
            return 0
        run.RESULTS_DIR.mkdir(exist_ok=True)
        md = run.RESULTS_DIR / f"worker-{stamp}.md"
        md.write_text(text + "\n")
        payload = {
            "environment": env,
            "args": {"duration": args.duration, "rounds": args.rounds},
            "order": order_log,
            "runs": raw,
            "verdict": verdict,
            "others_pct_max": worst,
        }
        md.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"\nsaved {md} and {md.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
