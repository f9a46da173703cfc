"""``twin bench``: run every ``benchmarks/bench_*.py`` and gather their ratios into one table and JSON.

Each benchmark is a script that measures its figures as ratios against a
reference timed in the same run (the machine is shared and noisy) and prints
one JSON object last. Scripts run one at a time in their own process so they
do not disturb each other's timings or memory peaks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from twin.errors import StageNotAvailable

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def last_json_object(text: str) -> dict:
    """The JSON object that ends a script's output (it may print other lines before)."""
    decoder = json.JSONDecoder()
    text = text.rstrip()
    for start in (i for i in range(len(text) - 1, -1, -1) if text[i] == "{"):
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if end == len(text) and isinstance(obj, dict):
            return obj
    raise ValueError("no JSON object at the end of the output")


def run_benchmarks(names: list[str] | None = None, timeout_s: float = 1800, progress=None) -> dict[str, dict]:
    """Run the benchmark scripts (all, or those whose name contains one of ``names``)."""
    if not BENCH_DIR.is_dir():
        raise StageNotAvailable(f"{BENCH_DIR}: benchmarks ship with the source checkout, not with an installed wheel")
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if any(n in s.stem for n in names)]
    results: dict[str, dict] = {}
    for script in scripts:
        if progress:
            progress(script.stem)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s)
        entry: dict = {"wall_s": time.perf_counter() - start}
        if proc.returncode != 0:
            entry["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        else:
            try:
                entry.update(last_json_object(proc.stdout))
            except ValueError as exc:
                entry["error"] = [str(exc)]
        results[script.stem.removeprefix("bench_")] = entry
    return results
