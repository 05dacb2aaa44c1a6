"""softlb's event-loop engine in one process, without gunicorn: what ``softlb serve``'s
worker runs (the same app, Engine, loop and tuning), for ``bench_instr.py``, whose
``callgrind_control`` reaches the process valgrind started but not a worker gunicorn forked.

Usage: ``python engine_alone.py CONFIG PORT``; serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from softlb.aio.engine import Engine, new_event_loop
from softlb.aio.tuning import tune_gc, tune_malloc
from softlb.app import create_app


async def serve(config: str, port: int) -> None:
    app = create_app(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = Engine(app, loop)
    engine.listen(socket.create_server(("127.0.0.1", port), backlog=4096))
    tune_gc()
    await stop.wait()
    engine.stop_accepting()
    await engine.drain(1.0)
    engine.close()
    app.stop()


def main() -> None:
    tune_malloc()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(sys.argv[1], int(sys.argv[2])))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
