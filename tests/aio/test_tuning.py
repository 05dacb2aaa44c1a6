"""softlb.aio.tuning: glibc's allocator thresholds and the collector, each in a fresh process.

The allocator's effect is read back from glibc itself (``malloc_info``'s count of blocks
served by their own mmap), so these tests fail if the thresholds are not set.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt and malloc_info are glibc's",
)

#: In a fresh interpreter: optionally tune, then hold 8 blocks of 512 KiB (above glibc's
#: default 128 KiB mmap threshold, below softlb's 1 MiB) and count the blocks glibc mmapped
#: for them.
_PROBE = r"""
import ctypes, json, os, re, sys, tempfile
from softlb.aio.tuning import tune_malloc
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "info.xml")
def mmapped():
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    xml = open(path).read()
    return int(re.search(r'<total type="mmap" count="(\d+)"', xml).group(1))
done = tune_malloc() if sys.argv[1] == "tune" else {}
before = mmapped()
held = [bytearray(512 * 1024) for _ in range(8)]
print(json.dumps({"done": done, "mmapped": mmapped() - before}))
"""


def _probe(mode: str, **env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop("GLIBC_TUNABLES", None)
    environ.pop("SOFTLB_TUNING", None)
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@glibc
def test_untuned_process_mmaps_large_blocks() -> None:
    # The baseline the tuning changes: glibc's default serves 512 KiB blocks by mmap.
    result = _probe("plain")
    assert result["done"] == {}
    assert isinstance(result["mmapped"], int) and result["mmapped"] >= 8


@glibc
def test_tune_malloc_keeps_large_blocks_on_the_heap() -> None:
    result = _probe("tune")
    assert result["done"] == {"mmap_threshold": 1 << 20, "trim_threshold": 32 << 20}
    assert result["mmapped"] == 0


@glibc
def test_operator_environment_wins() -> None:
    result = _probe("tune", MALLOC_MMAP_THRESHOLD_="131072")
    assert result["done"] == {"trim_threshold": 32 << 20}
    assert isinstance(result["mmapped"], int) and result["mmapped"] >= 8
    tunables = _probe("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert tunables["done"] == {"mmap_threshold": 1 << 20}


@glibc
def test_softlb_tuning_off_changes_nothing() -> None:
    result = _probe("tune", SOFTLB_TUNING="off")
    assert result["done"] == {}
    assert isinstance(result["mmapped"], int) and result["mmapped"] >= 8


_GC_PROBE = r"""
import gc, json
from softlb.aio.tuning import tune_gc
before = gc.get_freeze_count()
changed = tune_gc(4321)
print(json.dumps({"changed": changed, "frozen": gc.get_freeze_count() - before,
                  "threshold": gc.get_threshold()}))
"""


@pytest.mark.parametrize("setting", ["", "off"])
def test_tune_gc(setting: str) -> None:
    environ = dict(os.environ, SOFTLB_TUNING=setting)
    out = subprocess.run(
        [sys.executable, "-c", _GC_PROBE],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    if setting == "off":
        assert result["changed"] is False and result["frozen"] == 0
        assert result["threshold"][0] == 700
    else:
        assert result["changed"] is True and result["frozen"] > 1000
        assert result["threshold"][0] == 4321
