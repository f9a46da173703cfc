"""Sweeps: grids and Latin-hypercube points, shared stages computed once, resumable sweep.nc."""

from __future__ import annotations

import json

import numpy as np
import pytest

import _dummy_stages as dummy
from pipeline.segmentation import configure_tensorflow
from twin.errors import ScenarioError
from twin.sweep import Param, parse_param, sweep_points, run_sweep

# share the CI cores; the Dask workers this file starts get the same TensorFlow threads (TF_NUM_*_THREADS), as
# U-Nets trained on another number of threads differ (Eigen splits its reductions by thread)
configure_tensorflow(threads=1)
TENSORFLOW_THREADS = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


@pytest.fixture
def counter(tmp_path, monkeypatch):
    path = tmp_path / "counter"
    monkeypatch.setenv(dummy.COUNTER_ENV, str(path))
    return path


def _total(runner):
    return {"summary.total": json.loads((runner.output("summary") / "summary.json").read_text())["total"]}


def _sweep(tmp_path, params, **kw):
    return run_sweep("tiny", [parse_param(p) for p in params], tmp_path / "sweep", stages=dummy.dummy_stages,
                     targets=[("summary", None)], metrics_of=_total, **kw)


def test_parse_param_values_lists_and_ranges():
    assert parse_param("reconstruction.delta_beta=120,170,300.5").values == (120, 170, 300.5)
    assert parse_param("dic.node_spacing_px=[20,10],[30, 15]").values == ([20, 10], [30, 15])
    assert parse_param("sample.mechanism=core_shell,pathway").values == ("core_shell", "pathway")
    p = parse_param("beamline.exposure_s=0.01:0.04")
    assert (p.low, p.high) == (0.01, 0.04)
    for bad in ("nokey", "a.b=", "a.b=3:1", "a.b=x:y"):
        with pytest.raises(ScenarioError):
            parse_param(bad)


def test_latin_hypercube_points_stay_in_range_and_follow_the_seed():
    params = [Param("beamline.exposure_s", low=0.01, high=0.04), Param("reconstruction.delta_beta", low=100, high=500)]
    a = sweep_points(params, 8, seed=3)
    assert len(a) == 8
    for p in a:
        assert 0.01 <= p["beamline.exposure_s"] <= 0.04 and 100 <= p["reconstruction.delta_beta"] <= 500
    # Latin hypercube: each of the 8 strata of each range holds exactly one point
    strata = sorted(int((p["reconstruction.delta_beta"] - 100) / 400 * 8) for p in a)
    assert strata == list(range(8))
    assert a == sweep_points(params, 8, seed=3)
    assert a != sweep_points(params, 8, seed=4)


def test_grid_sweep_shares_stages_between_points(tmp_path, counter):
    ds = _sweep(tmp_path, ["reconstruction.delta_beta=100,200,300", "beamline.exposure_s=0.01,0.02"])
    assert dict(ds.sizes) == {"reconstruction.delta_beta": 3, "beamline.exposure_s": 2}
    runs = dummy.executions(counter)
    assert runs["source"] == 1  # reads neither swept field: once for the whole sweep
    assert runs["scaled[T0]"] == 3  # once per delta_beta, shared by both exposures
    assert runs["noise[T0]"] == 6 and runs["summary"] == 6
    assert np.isfinite(ds["summary.total"].values).all()
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    # the summary scales with delta_beta (the dummy multiplies by it) apart from the added noise
    assert not np.allclose(ds["summary.total"].values[0], ds["summary.total"].values[2])


def test_invalid_point_fails_before_anything_runs(tmp_path, counter):
    with pytest.raises(ScenarioError, match="reconstruction.delta_beta: must be > 0"):
        _sweep(tmp_path, ["reconstruction.delta_beta=100,-5"])
    assert not counter.exists()


def test_killed_sweep_resumes_from_what_finished(tmp_path, counter, monkeypatch):
    calls = {"n": 0}

    def dying_metrics(runner):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the sweep is interrupted while handling the third point
        return _total(runner)

    with pytest.raises(KeyboardInterrupt):
        run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200,300,400")], tmp_path / "sweep",
                  stages=dummy.dummy_stages, targets=[("summary", None)], metrics_of=dying_metrics)
    import xarray as xr

    partial = xr.load_dataset(tmp_path / "sweep" / "sweep.nc", engine="h5netcdf")
    assert np.isfinite(partial["summary.total"].values).sum() == 2
    before = dummy.executions(counter)
    ds = _sweep(tmp_path, ["reconstruction.delta_beta=100,200,300,400"])
    after = dummy.executions(counter)
    recomputed = {k for k in after if after[k] != before.get(k, 0)}
    # only the point that never finished its nodes (400) is computed; 300's nodes were cached before the kill
    assert recomputed == {"scaled[T0]", "scaled[T1]", "scaled[T2]", "noise[T0]", "noise[T1]", "noise[T2]", "summary"}
    assert np.isfinite(ds["summary.total"].values).all()
    np.testing.assert_array_equal(ds["summary.total"].values[:2], partial["summary.total"].values[:2])


def test_sweep_runs_on_a_separately_started_dask_scheduler(tmp_path, counter):
    """A scheduler and two workers started as their own processes on loopback, as a user would on a cluster."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(dummy)
    address, procs = _start_dask(tmp_path, 2)
    try:
        remote = _sweep(tmp_path / "remote", ["reconstruction.delta_beta=100,200"],
                        overrides=[f'run.scheduler="{address}"'])
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    local = _sweep(tmp_path / "local", ["reconstruction.delta_beta=100,200"])
    np.testing.assert_array_equal(remote["summary.total"].values, local["summary.total"].values)


#: ``tiny`` cut to three scans, 40² px and 2-epoch U-Nets: the real stages end to end in about a minute a point.
MICRO = ["protocol.max_charge_scans=1", "protocol.final_scans=1", "sample.lateral_size_um=16",
         "beamline.detector_pixels=40", "beamline.n_projections=60", "segmentation.epochs=2",
         "segmentation.n_training_slices=4", "segmentation.second_model_from_scan=2", "segmentation.baselines=[]"]


@pytest.mark.slow
def test_a_delta_beta_by_node_spacing_sweep_of_the_real_stages_runs_on_a_separately_started_scheduler(tmp_path):
    """The real twin, not dummies: 2 δ/β × 2 node spacings on a scheduler and two workers started as their own processes."""
    address, procs = _start_dask(tmp_path, 2)
    try:
        remote = run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,300"),
                                    parse_param("dic.node_spacing_px=[12,8],[16,12]")], tmp_path / "remote",
                           overrides=MICRO + [f'run.scheduler="{address}"'])
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    for name in ("dic.displacement_rmse_vx.max", "dic.volumetric_strain_mae.max", "segmentation.dice_si.mean",
                 "recon.delta_pearson.mean", "tracking.axial_displacement_rmse_um"):
        assert np.isfinite(remote[name].values).all(), name
    # shared: truth and holograms once (3 scans), reconstruction and U-Nets per δ/β, DIC (2 pairs) per point
    cache = tmp_path / "remote" / "cache"
    assert {stage: len(list((cache / stage).glob("[0-9a-f]*"))) for stage in
            ("truth", "holograms", "reconstruction", "segmentation_training", "dic")} == {
        "truth": 3, "holograms": 3, "reconstruction": 6, "segmentation_training": 2, "dic": 8}
    assert remote.attrs["sharing_ratio"] < 0.8  # 1 if nothing were shared; this sweep in-process measured 0.52
    # the same point in this process gives every score the same, the U-Nets trained in the workers included (their
    # layers are seeded; from Python's `random`, which the workers' event loops draw from too, they differed) as
    # long as TensorFlow runs on as many threads here as there
    local = run_sweep("tiny", [parse_param("reconstruction.delta_beta=300"), parse_param("dic.node_spacing_px=[16,12]")],
                      tmp_path / "local", overrides=MICRO)
    scores = [name for name in local.data_vars if not name.startswith("runtime_s.") and name != "computed_nodes"]
    assert len(scores) > 50 and set(scores) <= set(remote.data_vars)
    for name in scores:
        np.testing.assert_array_equal(local[name].values.item(), remote[name].values[1, 1], err_msg=name)


def _join_total(runner):
    return {"join.total": float(np.load(runner.output("join") / "chunk.npy").sum())}


def _start_dask(tmp_path, n_workers: int):
    """A scheduler and workers (with nannies) as their own processes on loopback; returns (address, processes)."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    dask_cli = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    assert dask_cli, "the `dask` command of dask.distributed is not installed"
    log = tmp_path / "scheduler.log"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"))]
    deadline = time.time() + 60
    address = None
    while address is None:
        assert time.time() < deadline, log.read_text()
        found = re.search(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)", log.read_text())
        address = found.group(1) if found else None
        time.sleep(0.2)
    procs.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", str(n_workers), "--nthreads", "1",
                                   "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, **TENSORFLOW_THREADS}))
    return address, procs


@pytest.mark.slow
def test_sweep_completes_when_a_dask_worker_is_killed_mid_node(tmp_path, counter):
    """SIGKILL the worker process that is computing a node: Dask reschedules it, the sweep completes, results equal."""
    import os
    import signal
    import threading
    import time

    import cloudpickle

    cloudpickle.register_pickle_by_value(dummy)
    address, procs = _start_dask(tmp_path, 2)
    result, failure = {}, []

    def sweep():
        try:
            result["ds"] = run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200")], tmp_path / "remote",
                                     stages=dummy.stalling_stages, targets=[("join", None)], metrics_of=_join_total,
                                     overrides=[f'run.scheduler="{address}"'])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    try:
        thread = threading.Thread(target=sweep)
        thread.start()
        marker = counter / "stalled"
        deadline = time.time() + 120
        while not marker.exists() or not marker.read_text():
            assert time.time() < deadline and thread.is_alive(), failure
            time.sleep(0.1)
        victim = int(marker.read_text())
        assert victim != os.getpid(), "the stalled node ran in the test process, not on a Dask worker"
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive() and not failure, failure
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    local = run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200")], tmp_path / "local",
                      stages=dummy.chunked_stages, targets=[("join", None)], metrics_of=_join_total)
    np.testing.assert_array_equal(result["ds"]["join.total"].values, local["join.total"].values)


def test_the_points_of_a_sweep_run_side_by_side_on_dask(tmp_path, counter):
    """Nodes go to the cluster when their inputs are ready, not point after point: two 1-s nodes on two workers overlap."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(dummy)
    ds = run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200")], tmp_path / "sweep",
                   stages=dummy.timed_stages, targets=[("timed", None)], metrics_of=lambda runner: {"ran": 1.0},
                   overrides=["run.workers=2"])
    assert ds["ran"].values.tolist() == [1.0, 1.0]
    (first_start, first_end), (second_start, _) = dummy.intervals(counter)
    assert second_start < first_end  # one after the other, the second would start after the first ended


def test_a_serial_sweep_finishes_its_points_in_order(tmp_path, counter):
    finished = []
    run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200,300")], tmp_path / "sweep",
              stages=dummy.timed_stages, targets=[("timed", None)], metrics_of=lambda runner: {"ran": 1.0},
              progress=lambda done, total, point: finished.append(point["reconstruction.delta_beta"]))
    assert finished == [100, 200, 300]
    starts = [start for start, _ in dummy.intervals(counter)]
    ends = [end for _, end in dummy.intervals(counter)]
    assert all(s >= e for s, e in zip(starts[1:], ends[:-1]))  # in this process: one at a time


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_point_leaves_nans_and_its_error_and_the_other_points_finish(tmp_path, counter, workers):
    import cloudpickle

    cloudpickle.register_pickle_by_value(dummy)
    ds = run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200,300"), parse_param("beamline.exposure_s=0.01,0.02")],
                   tmp_path / "sweep", stages=dummy.diverging_stages, targets=[("summary", None)], metrics_of=_total,
                   overrides=[f"run.workers={workers}"])
    totals = ds["summary.total"].values
    assert np.isfinite(totals[[0, 2]]).all() and np.isnan(totals[1]).all()
    failures = json.loads(ds.attrs["failed_points"])
    assert sorted(f["point"]["beamline.exposure_s"] for f in failures) == [0.01, 0.02]
    assert all(f["point"]["reconstruction.delta_beta"] == 200 and "diverged at delta_beta 200" in f["error"]
               for f in failures)
    runs = dummy.executions(counter)
    assert runs["noise[T0]"] == 4 and runs["summary"] == 4  # nothing downstream of a failed node ran
    assert (tmp_path / "sweep" / "sweep.png").is_file()


def test_twin_sweep_exits_1_naming_the_points_that_failed(tmp_path, monkeypatch, capsys):
    import sys

    import xarray as xr

    from twin import cli, sweep

    def half_failed(*args, **kwargs):
        ds = xr.Dataset({"m": ("reconstruction.delta_beta", [1.0, np.nan])}, coords={"reconstruction.delta_beta": [100, 200]})
        ds.attrs.update(n_points=2, failed_points=json.dumps([{"point": {"reconstruction.delta_beta": 200},
                                                               "error": "stage 'dic' [T3] failed: no node converged"}]))
        return ds

    monkeypatch.setattr(sweep, "run_sweep", half_failed)
    monkeypatch.setattr(sys, "argv", ["twin", "sweep", "tiny", "--param", "reconstruction.delta_beta=100,200",
                                      "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "1 of 2 points failed" in err and "reconstruction.delta_beta=200: stage 'dic' [T3] failed" in err


def test_sharing_ratio_compares_the_sweep_with_its_points_run_alone(tmp_path, counter):
    """2 δ/β × 2 exposures over a 10-node DAG of equal, sleep-dominated nodes: 23 of 40 node runs are needed."""
    ds = run_sweep("tiny", [parse_param("reconstruction.delta_beta=100,200"), parse_param("beamline.exposure_s=0.01,0.02")],
                   tmp_path / "sweep", stages=dummy.chunked_stages, targets=[("join", None)], metrics_of=_join_total)
    assert int(np.nansum(ds["computed_nodes"].values)) == 1 + 3 * 2 + 3 * 4 + 4
    alone = ds["runtime_s.point_alone"].values
    assert np.all(alone >= ds["runtime_s.point"].values) and np.ptp(alone) < 0.5 * alone.mean()
    assert 0.4 < ds.attrs["sharing_ratio"] < 0.75  # 23 / 40 = 0.575 for equal nodes


def test_best_setting_is_the_smallest_error_the_largest_score_and_the_smallest_absolute_bias():
    from twin.sweep import best_index

    values = np.array([0.3, -0.05, 0.1, -0.4])
    assert best_index("dic.volumetric_strain_bias.T3", values) == 1
    assert best_index("dic.volumetric_strain_mae.max", values) == 3
    assert best_index("segmentation.dice_si.mean", values) == 0
    assert best_index("dic.displacement_rmse_vx.max", np.array([np.nan, 0.2, 0.1])) == 2


def test_plan_shows_which_nodes_a_delta_beta_by_node_spacing_sweep_shares(tmp_path):
    """The real DAG's keys: truth and holograms once for all points, reconstruction, segmentation and the image scores
    once per δ/β, DIC and validation for every point (what issue 9 asks of sharing); only the rehearsal runs."""
    from twin.sweep import format_plan, plan_sweep

    params = [parse_param("reconstruction.delta_beta=100,300"), parse_param("dic.node_spacing_px=[12,8],[16,12]")]
    plan = plan_sweep("tiny", params, tmp_path)
    n = plan["truth"].distinct  # the scans of the schedule
    assert n == 10
    assert plan["truth"].nodes == 4 * n and plan["holograms"].distinct == n
    assert plan["reconstruction"].distinct == 2 * n and plan["segmentation"].distinct == 2 * n
    assert plan["segmentation_training"].distinct == 2 and plan["image_scores"].distinct == 2
    assert plan["particle_labels"].distinct == 2 * n
    assert plan["dic"].distinct == 4 * (n - 1) and plan["tracking"].distinct == 4 and plan["validation"].distinct == 4
    assert plan["holograms"].seconds == pytest.approx(plan["holograms"].seconds_alone / 4)
    assert plan["dic"].seconds == pytest.approx(plan["dic"].seconds_alone)
    assert not plan["validation"].modelled and plan["validation"].seconds == 0
    assert plan["rehearsal"].cached == 1 and plan["holograms"].cached == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["rehearsal"]
    assert "4 points" in format_plan(plan) and "sharing ratio" in format_plan(plan)
