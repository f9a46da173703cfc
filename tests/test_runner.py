"""The cached stage runner: keys, reuse, exact invalidation, atomicity, corruption, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _dummy_stages as dummy
from twin.parallel import executor
from twin.runner import MANIFEST, Cache, Runner, publish, run_together
from twin.scenario import load_scenario

SUMMARY = [("summary", None)]


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "counter"
    monkeypatch.setenv(dummy.COUNTER_ENV, str(path))
    return path


def make_runner(tmp_path, overrides=(), **kw):
    sc = load_scenario("tiny", list(overrides))
    return Runner(sc, dummy.dummy_stages(), tmp_path / "cache", **kw)


def test_first_run_computes_every_node_once(tmp_path, counter):
    make_runner(tmp_path).run(SUMMARY)
    assert dummy.executions(counter) == {
        "source": 1, "scaled[T0]": 1, "scaled[T1]": 1, "scaled[T2]": 1,
        "noise[T0]": 1, "noise[T1]": 1, "noise[T2]": 1, "summary": 1,
    }


def test_rerun_reuses_everything(tmp_path, counter):
    make_runner(tmp_path).run(SUMMARY)
    runner = make_runner(tmp_path)
    runner.run(SUMMARY)
    assert sum(dummy.executions(counter).values()) == 8
    assert {r.status for r in runner.reports} == {"reused"}


@pytest.mark.parametrize(
    ("override", "recomputed"),
    [
        # a field read by the first stage recomputes everything downstream of it
        ("sample.voxel_size_um=0.5", {"source", "scaled[T0]", "scaled[T1]", "scaled[T2]",
                                      "noise[T0]", "noise[T1]", "noise[T2]", "summary"}),
        # a field of the middle stage leaves the source alone
        ("reconstruction.delta_beta=300", {"scaled[T0]", "scaled[T1]", "scaled[T2]",
                                           "noise[T0]", "noise[T1]", "noise[T2]", "summary"}),
        ("beamline.exposure_s=0.05", {"noise[T0]", "noise[T1]", "noise[T2]", "summary"}),
        # a field no stage reads recomputes nothing
        ("segmentation.epochs=3", set()),
    ],
)
def test_changing_a_field_recomputes_exactly_downstream(tmp_path, counter, override, recomputed):
    make_runner(tmp_path).run(SUMMARY)
    before = dummy.executions(counter)
    make_runner(tmp_path, [override]).run(SUMMARY)
    after = dummy.executions(counter)
    assert {k for k in after if after[k] != before.get(k, 0)} == recomputed


def test_force_recomputes_one_stage_only(tmp_path, counter):
    make_runner(tmp_path).run(SUMMARY)
    before = dummy.executions(counter)
    make_runner(tmp_path, force=["scaled"]).run(SUMMARY)
    after = dummy.executions(counter)
    assert {k for k in after if after[k] != before[k]} == {"scaled[T0]", "scaled[T1]", "scaled[T2]"}


def test_unknown_forced_stage_is_named(tmp_path):
    with pytest.raises(Exception, match="scaeld"):
        make_runner(tmp_path, force=["scaeld"])


_KEY_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
import _dummy_stages as dummy
from twin.runner import Runner
from twin.scenario import load_scenario
r = Runner(load_scenario("tiny"), dummy.dummy_stages(), {cache!r})
print(json.dumps([r.key(("summary", None)), r.key(("noise", "T1"))]))
"""


def test_keys_are_stable_across_processes(tmp_path):
    runner = make_runner(tmp_path)
    here = [runner.key(("summary", None)), runner.key(("noise", "T1"))]
    script = _KEY_SCRIPT.format(tests=str(Path(__file__).parent), cache=str(tmp_path / "cache"))
    env = dict(os.environ, PYTHONHASHSEED="123")
    there = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      check=True, env=env).stdout)
    assert here == there


def _entry_file(tmp_path, runner, stage, item, name):
    return runner.cache.entry(stage, runner.key((stage, item))) / name


def test_flipped_byte_is_detected_and_recomputed(tmp_path, counter):
    runner = make_runner(tmp_path)
    runner.run(SUMMARY)
    target = _entry_file(tmp_path, runner, "scaled", "T1", "scaled.npy")
    good = target.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    assert not runner.cache.is_valid("scaled", runner.key(("scaled", "T1")))
    before = dummy.executions(counter)
    make_runner(tmp_path).run(SUMMARY)
    after = dummy.executions(counter)
    # only the corrupted node is recomputed: its key (and so its dependants' keys) is unchanged
    assert {k for k in after if after[k] != before[k]} == {"scaled[T1]"}
    assert target.read_bytes() == good


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "extra_file", "remove_file"])
def test_damaged_entries_are_never_trusted(tmp_path, counter, damage):
    runner = make_runner(tmp_path)
    runner.run(SUMMARY)
    entry = runner.cache.entry("scaled", runner.key(("scaled", "T0")))
    if damage == "truncate":
        f = entry / "scaled.npy"
        f.write_bytes(f.read_bytes()[:40])
    elif damage == "delete_manifest":
        (entry / MANIFEST).unlink()
    elif damage == "extra_file":
        (entry / "stray.txt").write_text("x")
    else:
        (entry / "meta.json").unlink()
    assert not runner.cache.is_valid("scaled", runner.key(("scaled", "T0")))
    make_runner(tmp_path).run(SUMMARY)
    assert dummy.executions(counter)["scaled[T0]"] == 2


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import _dummy_stages as dummy
from twin.runner import Runner
from twin.scenario import load_scenario
Runner(load_scenario("tiny"), dummy.dummy_stages(slow=True), {cache!r}).run([("source", None)])
"""


def test_stage_killed_mid_write_leaves_nothing_trusted(tmp_path, counter):
    cache = tmp_path / "cache"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.time() + 60
    while not (counter / "writing").exists():
        assert proc.poll() is None, "writer exited early"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    runner = make_runner(tmp_path)
    key = runner.key(("source", None))
    assert not runner.cache.is_valid("source", key)
    assert not runner.cache.entry("source", key).exists()
    assert list((cache / "source").glob(".tmp-*")), "the killed write should have left only a temporary directory"
    runner.run(SUMMARY)  # the real stages now compute normally
    assert runner.cache.is_valid("source", key)
    assert dummy.executions(counter)["source"] == 2
    assert Cache(cache).sweep_tmp() == 1


def _values(tmp_path, overrides=()):
    runner = make_runner(tmp_path, overrides)
    out = runner.run([("noise", i) for i in dummy.ITEMS])
    return [np.load(out[("noise", i)] / "noisy.npy") for i in dummy.ITEMS]


def test_same_seed_gives_identical_outputs(tmp_path, counter):
    a = _values(tmp_path / "a", ["run.seed=7"])
    b = _values(tmp_path / "b", ["run.seed=7"])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_different_seeds_differ_and_items_get_their_own_streams(tmp_path, counter):
    a = _values(tmp_path / "a", ["run.seed=7"])
    b = _values(tmp_path / "b", ["run.seed=8"])
    assert not np.array_equal(a[0], b[0])
    # the noise stage draws independently per item even though its inputs are identical
    assert not np.array_equal(a[0] - a[1], np.zeros_like(a[0]))


def test_seed_is_part_of_every_key(tmp_path):
    a = make_runner(tmp_path, ["run.seed=1"]).key(("source", None))
    b = make_runner(tmp_path, ["run.seed=2"]).key(("source", None))
    assert a != b


def test_parallel_execution_on_dask_matches_serial(tmp_path, counter):
    import cloudpickle

    cloudpickle.register_pickle_by_value(dummy)
    serial = _values(tmp_path / "serial")
    sc = load_scenario("tiny", ["run.workers=2"])
    with executor(sc.run) as parallel_map:
        runner = Runner(sc, dummy.dummy_stages(), tmp_path / "dask" / "cache", executor=parallel_map)
        out = runner.run([("noise", i) for i in dummy.ITEMS])
    for i, expected in zip(dummy.ITEMS, serial):
        np.testing.assert_array_equal(np.load(out[("noise", i)] / "noisy.npy"), expected)


def test_runners_run_together_compute_a_shared_node_once_and_the_first_reports_it(tmp_path, counter):
    first = make_runner(tmp_path, ["reconstruction.delta_beta=100"])
    second = make_runner(tmp_path, ["reconstruction.delta_beta=200"])
    finished = []
    out = run_together([(first, SUMMARY), (second, SUMMARY)], runner_done=finished.append)
    runs = dummy.executions(counter)
    assert runs["source"] == 1 and runs["scaled[T0]"] == 2 and runs["summary"] == 2
    assert finished == [0, 1]  # in this process: the first runner's nodes first

    def reports(runner, stage):
        return [(r.status, r.seconds > 0) for r in runner.reports if r.stage == stage]

    assert reports(first, "source") == [("computed", True)] and reports(second, "source") == [("reused", False)]
    assert reports(second, "summary") == [("computed", True)]
    assert out[0][SUMMARY[0]] != out[1][SUMMARY[0]]
    # the same as running them one after the other
    again = make_runner(tmp_path, ["reconstruction.delta_beta=200"])
    assert again.run(SUMMARY) == out[1] and {r.status for r in again.reports} == {"reused"}


def test_publish_exposes_files_without_manifest(tmp_path, counter):
    runner = make_runner(tmp_path)
    path = runner.run([("scaled", "T2")])[("scaled", "T2")]
    written = publish(path, tmp_path / "out")
    assert sorted(p.name for p in written) == ["meta.json", "scaled.npy"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == {"item": "T2"}


def test_manifest_records_provenance(tmp_path, counter):
    runner = make_runner(tmp_path)
    path = runner.run([("source", None)])[("source", None)]
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["fields"] == {"sample.voxel_size_um": 0.4}
    assert manifest["provenance"]["seed"] == runner.scenario.run.seed
    assert manifest["provenance"]["scenario"]["name"] == "tiny"
    assert "numpy" in manifest["provenance"]["versions"]


def test_a_stage_not_built_says_so_and_leaves_no_entry(tmp_path):
    from twin.errors import StageNotAvailable
    from twin.runner import Stage, not_built

    sc = load_scenario("tiny")
    runner = Runner(sc, [Stage("later", 1, (), not_built("later", 99))], tmp_path / "cache")
    with pytest.raises(StageNotAvailable, match=r"'later' is not built yet \(issue #99\)"):
        runner.run([("later", None)])
    assert not list((tmp_path / "cache" / "later").iterdir())


def test_a_failing_stage_is_named_and_leaves_no_entry(tmp_path):
    from twin.errors import StageError
    from twin.runner import Stage

    def boom(ctx):
        (ctx.out_dir / "partial.bin").write_bytes(b"x")
        raise RuntimeError("solver diverged")

    runner = Runner(load_scenario("tiny"), [Stage("fragile", 1, (), boom, items=lambda r: ["T4"])], tmp_path / "cache")
    with pytest.raises(StageError, match=r"stage 'fragile' \[T4\] failed: RuntimeError: solver diverged"):
        runner.run([("fragile", "T4")])
    assert not list((tmp_path / "cache" / "fragile").iterdir())
