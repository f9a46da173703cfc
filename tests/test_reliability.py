"""Reliability of the cache under faults: SIGKILL at random moments, concurrent runs sharing a cache, a full disk."""

from __future__ import annotations

import dataclasses
import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _dummy_stages as dummy
from twin.errors import StageError
from twin.io import atomic_path
from twin.runner import MANIFEST, Cache, Runner
from twin.scenario import load_scenario

TARGET = [("join", None)]
TESTS = str(Path(__file__).parent)

_RUN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import _dummy_stages as dummy
from twin.runner import Runner
from twin.scenario import load_scenario
Runner(load_scenario("tiny", {overrides!r}), dummy.chunked_stages(), {cache!r}).run([("join", None)])
"""


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "counter"
    monkeypatch.setenv(dummy.COUNTER_ENV, str(path))
    return path


def _start(cache: Path, overrides=()) -> subprocess.Popen:
    script = _RUN_SCRIPT.format(tests=TESTS, cache=str(cache), overrides=list(overrides))
    return subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), stderr=subprocess.PIPE)


def _outputs(cache: Path, overrides=()) -> dict[str, bytes]:
    """Every file of every node the target needs, by node and name (computing what is missing)."""
    runner = Runner(load_scenario("tiny", list(overrides)), dummy.chunked_stages(), cache)
    runner.run(TARGET)
    files = {}
    for report in runner.reports:
        for f in sorted(Path(report.path).iterdir()):
            if f.name != MANIFEST:
                files[f"{report.stage}[{report.item}]/{f.name}"] = f.read_bytes()
    return files


def _committed_entries_are_valid(cache: Path) -> int:
    """Every entry at its final name passes its checksums; returns how many there are."""
    c = Cache(cache)
    entries = [p for p in cache.glob("*/*") if not p.name.startswith(".")]
    bad = [str(p) for p in entries if not c.is_valid(p.parent.name, p.name)]
    assert not bad, f"corrupt entries trusted at their final names: {bad}"
    return len(entries)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_corrupt_entry_and_the_rerun_is_identical(tmp_path, counter):
    # an uninterrupted run in a subprocess: the reference, and how long a run lasts on this machine
    started = time.perf_counter()
    proc = _start(tmp_path / "reference")
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    run_s = time.perf_counter() - started
    reference = _outputs(tmp_path / "reference")
    rng = np.random.default_rng(2026)
    killed_mid_run = 0
    for trial in range(20):
        cache = tmp_path / f"cache{trial}"
        proc = _start(cache)
        time.sleep(rng.uniform(0.0, run_s))  # anywhere in start-up (~0.5-1 s) or the ten nodes (~0.1 s each)
        if proc.poll() is None:
            killed_mid_run += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if cache.exists():
            _committed_entries_are_valid(cache)
        assert _outputs(cache) == reference, f"trial {trial}: the rerun differs from an uninterrupted run"
        _committed_entries_are_valid(cache)
    assert killed_mid_run >= 10, f"only {killed_mid_run} of 20 kills landed before the run finished"


@pytest.mark.slow
def test_concurrent_runs_sharing_one_cache_agree_and_corrupt_nothing(tmp_path, counter):
    """Two runs at once (one δ/β each, sharing the source node) and a third identical to the first."""
    cache = tmp_path / "cache"
    for attempt in range(3):
        procs = [_start(cache, o) for o in ([], ["reconstruction.delta_beta=300"], [])]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()[-2000:]
        _committed_entries_are_valid(cache)
        assert not list(cache.glob("*/.tmp-*")) and not list(cache.glob("*/.trash-*"))
        assert _outputs(cache) == _outputs(tmp_path / f"alone{attempt}")
        assert _outputs(cache, ["reconstruction.delta_beta=300"]) == _outputs(tmp_path / f"alone300_{attempt}",
                                                                            ["reconstruction.delta_beta=300"])


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_a_stage_writes_is_named_and_leaves_nothing(tmp_path, counter, monkeypatch):
    def full_stage(ctx):
        (ctx.out_dir / "part.bin").write_bytes(b"x" * 1000)
        _disk_full()

    stages = dummy.chunked_stages()
    stages[0] = dataclasses.replace(stages[0], compute=full_stage)
    runner = Runner(load_scenario("tiny"), stages, tmp_path / "cache")
    with pytest.raises(StageError, match=r"stage 'source' failed: OSError: .*No space left on device"):
        runner.run(TARGET)
    assert [p for p in (tmp_path / "cache" / "source").iterdir()] == []


def test_disk_full_while_committing_is_named_and_leaves_nothing(tmp_path, counter, monkeypatch):
    runner = Runner(load_scenario("tiny"), dummy.chunked_stages(), tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr("twin.runner.file_sha256", _disk_full)
        with pytest.raises(StageError, match=r"stage 'source': could not store its output in the cache .*No space left"):
            runner.run(TARGET)
    assert [p for p in (tmp_path / "cache" / "source").iterdir()] == []
    assert _outputs(tmp_path / "cache") == _outputs(tmp_path / "fresh")  # the next run, disk freed, completes


def test_disk_full_in_an_atomic_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("{\"half\": ")
            _disk_full()
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            _disk_full()
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def _square_or_die(i: int) -> int:
    """i², except that task 3 kills the pool worker that runs it (only in a forked worker)."""
    if i == 3 and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return i * i


def test_a_spam_pool_worker_that_dies_loses_no_task(caplog):
    from pipeline._spam_compat import _WatchedPool

    with _WatchedPool(2) as pool:
        results = sorted(pool.imap_unordered(_square_or_die, range(12)))
    assert results == [i * i for i in range(12)]
    assert "spam pool worker died" in caplog.text


_KILLED_LDIC_SCRIPT = """
import multiprocessing, os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import numpy as np, scipy.ndimage as ndi
import spam.DIC
from pipeline.dic import make_grid
from pipeline._spam_compat import spam_call
from test_dic import texture

reference = texture((40, 40, 40), np.random.default_rng(1))
points = np.indices(reference.shape).astype(float)
points[0] += 1.3 + 0.02 * points[0]
deformed = ndi.map_coordinates(reference, points, order=3).astype(np.float32)
nodes, _ = make_grid(reference.shape, 4, 5)
killed = []

def kill_a_worker():
    while not killed:
        workers = multiprocessing.active_children()
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)
        time.sleep(0.005)

def ldic(processes):
    with spam_call(processes, "ldic"):
        return spam.DIC.ldic(reference, deformed, nodes, [5] * 3, processes=processes, margin=[-3, 3] * 3,
                             maxIterations=50)

serial = ldic(1)
threading.Thread(target=kill_a_worker, daemon=True).start()
pooled = ldic(2)
assert killed, "no worker was killed"
for a, b in zip(serial, pooled):
    assert np.array_equal(a, b, equal_nan=True)
print("identical", len(nodes), "nodes")
"""


def test_ldic_whose_pool_worker_is_killed_completes_with_the_serial_results():
    """The hang a sweep met once: multiprocessing.Pool waits forever for a dead worker's task.

    Run in a subprocess: its own threads only, and a hard time limit.
    """
    run = subprocess.Popen([sys.executable, "-c", _KILLED_LDIC_SCRIPT.format(tests=TESTS)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=300)  # ~5 s here; with multiprocessing.Pool it hangs
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the pool's other worker too
        run.communicate()
        pytest.fail("ldic hung after its pool worker was killed")
    assert run.returncode == 0, stderr[-3000:]
    assert "identical" in stdout
    assert "spam pool worker died" in stderr
