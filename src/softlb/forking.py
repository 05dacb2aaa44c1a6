"""What softlb does in a child process made by ``fork()``: one hook for the whole package.

gunicorn forks its workers from a master that may already hold softlb's objects (``--preload``,
or ``softlb serve``, which builds the app before it forks). A child must not share its
parent's locks (a lock a parent's thread held at the fork stays locked for ever), open
files (a ``flock`` belongs to the open file) or connections, and the threads of the parent
did not come along. Each module that owns such a thing registers a callback here, and this
module installs the one :func:`os.register_at_fork` hook that runs them, in two phases:

1. :data:`RESOURCES` — locks, files, connections and caches are dropped or made fresh
   (the shared-state stores and slot tables, the logging checks);
2. :data:`SERVICES` — what runs on top of them starts again (each
   :class:`~softlb.app.Application`'s health checker, state poller and resolver).

Within a phase, callbacks run in the order they were registered. An exception in one is
printed and the others still run: a child that cannot reset one thing should still serve.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Final

__all__ = ["RESOURCES", "SERVICES", "after_fork_in_child", "run_after_fork"]

#: The first phase: fresh locks, files and connections.
RESOURCES: Final = 0
#: The second phase: threads and services started again on the fresh resources.
SERVICES: Final = 1

_callbacks: list[tuple[int, Callable[[], None]]] = []


def after_fork_in_child(callback: Callable[[], None], phase: int = RESOURCES) -> None:
    """Call ``callback()`` in every child made by ``fork()`` from now on, in ``phase``."""
    if phase not in (RESOURCES, SERVICES):
        raise ValueError(f"phase must be RESOURCES (0) or SERVICES (1), got {phase!r}")
    _callbacks.append((phase, callback))


def run_after_fork() -> None:
    """Run the registered callbacks, phase by phase (the hook does this in each child)."""
    for phase in (RESOURCES, SERVICES):
        for registered, callback in list(_callbacks):
            if registered != phase:
                continue
            try:
                callback()
            except Exception:  # one failed reset must not stop the others
                print(f"softlb: after fork, {callback!r} failed:", file=sys.stderr)
                traceback.print_exc()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=run_after_fork)
