"""Process tuning for an event-loop worker: the C allocator and Python's garbage collector.

Both are set once per worker process, after the fork and after the app is built, by
:class:`softlb.aio.worker.Worker`. Neither changes what the engine does, only what it costs:

- :func:`tune_malloc` keeps glibc's allocator from giving memory back to the kernel and
  taking it again for every large buffer. A 256 KiB answer passes through a few bytes objects
  of 64-256 KiB; by default glibc serves blocks above 128 KiB with ``mmap`` and returns them
  with ``munmap`` (or trims the heap's top with ``brk``), so each one costs page faults and
  zeroed pages. Measured on ``/big`` (256 KiB, c16, 1 worker): proxy CPU 0.457 ms → 0.212 ms
  per request, 0.32 → 0.57 of nginx's throughput (``docs/performance.rst``).
- :func:`tune_gc` moves what the app built at start-up out of the collector's sight
  (:func:`gc.freeze`) and lets the youngest generation grow before a collection, so a worker's
  collections are rare and short. With both, p99 latency at /small c64 went from 3.31 to 2.58
  times nginx's in a side-by-side run.

An operator who sets glibc's own variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES``) keeps them: :func:`tune_malloc` leaves a
setting alone that the environment already chose. ``SOFTLB_TUNING=off`` turns both off.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys

__all__ = ["GC_THRESHOLD", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_gc", "tune_malloc"]

#: glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap, not from their own mmap: a worker's largest
#: buffers (a 256 KiB read, the joined pieces of an answer) stay below it.
MMAP_THRESHOLD = 1 << 20
#: Free memory at the heap's top kept before glibc gives it back to the kernel.
TRIM_THRESHOLD = 32 << 20
#: Allocations (minus deallocations) of container objects before a young-generation collection
#: (Python's default: 700).
GC_THRESHOLD = 5000


def _disabled() -> bool:
    return os.environ.get("SOFTLB_TUNING", "").strip().lower() in {"off", "0", "no", "false"}


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> dict[str, int]:
    """Set glibc's mmap and trim thresholds for this process; return what was set.

    Setting either fixes it (glibc otherwise moves the mmap threshold as blocks are freed).
    Does nothing, and returns ``{}``, off glibc (musl, macOS, Windows), under
    ``SOFTLB_TUNING=off``, or for a threshold the environment already sets
    (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES`` naming
    ``glibc.malloc.mmap_threshold``/``glibc.malloc.trim_threshold``).
    """
    if _disabled() or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    done: dict[str, int] = {}
    for name, param, value, tunable in (
        ("mmap_threshold", _M_MMAP_THRESHOLD, mmap_threshold, "glibc.malloc.mmap_threshold"),
        ("trim_threshold", _M_TRIM_THRESHOLD, trim_threshold, "glibc.malloc.trim_threshold"),
    ):
        if f"MALLOC_{name.upper()}_" in os.environ or tunable in tunables:
            continue  # the operator's choice
        if mallopt(param, value) == 1:
            done[name] = value
    return done


def tune_gc(threshold: int = GC_THRESHOLD) -> bool:
    """Freeze what exists now out of the collector's work and raise the young generation's
    threshold to ``threshold``; return whether anything was changed.

    Call it once the app is built: its pool, config and modules are long-lived, and a full
    collection that walks them all is what made the longest pauses. Under
    ``SOFTLB_TUNING=off`` it does nothing.
    """
    if _disabled():
        return False
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
    return True
