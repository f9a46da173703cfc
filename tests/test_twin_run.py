"""The whole twin end to end on `tiny`: every contract file, stable metric names, regression bounds, reuse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from validation.tolerances import load_bounds, violations

pytestmark = pytest.mark.slow

CONTRACT_FILES = [
    "schedule.csv", "timeseries.nc", "rehearsal.json", "timeline.png", "lithiation.nc",
    "metrics.json", "metrics.nc", "report.html", "scenario.toml", "run.json",
    "T0/phantom.nc", "T0/scan.nx", "T0/volume.nc", "T0/volume.tif", "T0/labels.nc", "T0/labels.tif",
    "T1/phi_field.nc", "T1/nodes.csv", "T1/phi_field.tsv", "cumulative.nc", "trajectories.csv",
]
REQUIRED_METRICS = [
    "schedule.n_scans", "electrochem.discharge_capacity_mAh", "recon.delta_pearson.T0", "recon.delta_pearson.mean",
    "segmentation.dice_si.T0", "segmentation.dice_si.mean", "dic.displacement_rmse_vx.T1", "dic.displacement_rmse_vx.max",
    "dic.volumetric_strain_mae.T1", "dic.volumetric_strain_mae.max", "dic.volumetric_strain_bias.T1",
    "dic.converged_fraction.T1", "tracking.axial_displacement_rmse_um", "runtime_s.reconstruction",
]


def _run(out):
    return subprocess.run([sys.executable, "-m", "twin", "run", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    res = _run(out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_every_contract_file_is_written(tiny_run):
    missing = [f for f in CONTRACT_FILES if not (tiny_run / f).is_file()]
    assert not missing


def test_metrics_have_the_stable_names_and_are_finite(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert [m for m in REQUIRED_METRICS if m not in metrics] == []
    assert metrics["schedule.n_scans"] == 10  # the seed's T0...T9


def test_accuracy_stays_within_the_regression_bounds(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    problems = violations(metrics, load_bounds())
    assert not problems, "\n".join(problems)


def test_error_budget_substitutes_the_truth_and_adds_up(tiny_run):
    from validation.budget import BUDGET_METRICS, ORACLES, REMAINDER

    record = json.loads((tiny_run / "budget.json").read_text())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    ablations = record["ablations"]
    assert list(ablations) == [s for s, _ in ORACLES]
    # the oracles really substitute the truth: the true δ correlates perfectly, the true labels score Dice 1
    assert ablations["reconstruction"]["recon.delta_pearson.mean"] == pytest.approx(1.0, abs=1e-6)
    assert ablations["segmentation"]["segmentation.dice_si.mean"] == pytest.approx(1.0)
    assert ablations["holograms"]["dic.noise_floor_vx"] < metrics["dic.noise_floor_vx"]  # no photon noise
    for m in BUDGET_METRICS:
        parts = [metrics[f"budget.{s}.{m}"] for s in [s for s, _ in ORACLES] + [REMAINDER]]
        assert sum(parts) == pytest.approx(metrics[m], rel=1e-9)
    for m in ("dic.displacement_rmse_vx.max", "dic.volumetric_strain_mae.max"):
        assert metrics[f"budget.segmentation.{m}"] == 0.0  # DIC never reads the segmentation
    assert (tiny_run / "budget" / "holograms" / "metrics.json").is_file()


def test_a_rerun_reuses_every_stage(tiny_run):
    res = _run(tiny_run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report.html" in res.stdout and "dic.displacement_rmse_vx.max" in res.stdout and "budget: holograms" in res.stdout
    nodes = json.loads((tiny_run / "run.json").read_text())["nodes"]
    assert nodes and {n["status"] for n in nodes} == {"reused"}
