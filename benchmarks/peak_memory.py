"""The peak resident memory a call adds: what the benchmarks' memory ratios are measured with.

On Linux the kernel's own high-water mark of the resident set (``VmHWM``) is reset before the
call (``/proc/self/clear_refs``) and read after it: exact, and it counts every page the
process touched, NumPy's, numba's and the C libraries' alike (``tracemalloc`` sees only
NumPy's, and counts pages never touched). Elsewhere the resident set is sampled every 5 ms
with psutil, which can miss a spike shorter than that.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _high_water_mark_resettable() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def peak_growth(call):
    """Run ``call()``; return its result, its wall seconds and its peak resident bytes over the resident set
    before it (what it held at its largest, the caller's own arrays not counted)."""
    process = psutil.Process()
    base = process.memory_info().rss
    if _high_water_mark_resettable():
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
        return result, seconds, _status_bytes("VmHWM") - base
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
    finally:
        done.set()
        thread.join()
    return result, seconds, max(peak[0], process.memory_info().rss) - base
