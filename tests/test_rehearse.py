"""`twin rehearse` and the `rehearsal` stage: files, contracts, validation, failure handling."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from twin.electrochem import LinearCell, Step
from twin.errors import ScenarioError, StageError
from twin.rehearse import compute_rehearsal, rehearse
from twin.runner import StageContext
from twin.scenario import load_scenario


def _read_schedule(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _linear_cell(sc) -> LinearCell:
    # Capacity from the scenario's disk; a linear OCV from 2.55 to 4.15 V over the capacity (so the discharge to 2.5 V,
    # with its 83 mV IR drop at C/6, stops before the charge runs negative); 15 kΩ.
    from twin.electrochem import cell_capacity_mah

    cap = cell_capacity_mah(sc)
    return LinearCell(ocv0_v=2.55, ocv_slope_v_per_mah=1.6 / cap, resistance_kohm=15.0, capacity_mah=cap, anode_capacity_mah=3.14 * cap,
                      depth_um=np.linspace(0, sc.sample.electrode_thickness_um, 6))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The real command, PyBaMM and all: `twin rehearse quickstart --monte-carlo 40`."""
    out = tmp_path_factory.mktemp("rehearse")
    proc = subprocess.run([sys.executable, "-m", "twin", "rehearse", "quickstart", "--out", str(out), "--monte-carlo", "40"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_cli_writes_every_file(cli_run):
    out, stdout = cli_run
    for name in ("schedule.csv", "timeseries.nc", "rehearsal.json", "timeline.png", "lithiation.nc", "montecarlo.csv", "montecarlo.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind
    assert "written to" in stdout


def test_nominal_quickstart_gives_the_seed_nomenclature(cli_run):
    out, _ = cli_run
    rows = _read_schedule(out / "schedule.csv")
    assert [r["name"] for r in rows] == [f"T{i}" for i in range(10)]
    phases = [r["phase"] for r in rows]
    assert phases[0] == "pristine"
    assert all(p.startswith("charge") for p in phases[1:7])
    assert phases[7] == "discharge" and phases[8:] == ["relaxation", "relaxation"]
    assert all(r["status"] == "acquired" for r in rows)
    summary = json.loads((out / "rehearsal.json").read_text())
    assert summary["complete"] and summary["seed_nomenclature"]["matches"]
    assert summary["seconds"] < 120


def test_timeseries_shows_cc_cv_discharge_and_no_current_in_scans(cli_run):
    out, _ = cli_run
    ts = xr.open_dataset(out / "timeseries.nc", engine="h5netcdf")
    summary = json.loads((out / "rehearsal.json").read_text())
    one_c_ua = summary["nominal_capacity_mah"] * 1e3
    state, v, i = ts["state"].values, ts["voltage_v"].values, ts["current_ua"].values
    leak_ua = load_scenario("quickstart").cell.leakage_current_ua
    assert np.allclose(i[state == 3], one_c_ua / 3, rtol=1e-6)
    assert np.allclose(v[state == 4], 4.3, atol=1e-5)
    assert np.all(i[state == 4] > leak_ua - 1e-9)  # the leakage keeps the CV tail up (Fig S4)
    assert np.allclose(i[state == 5], -one_c_ua / 6, rtol=1e-6)
    assert np.all(i[(state == 1) | (state == 2)] == 0)
    for a, b in zip(ts["scan_start_h"].values, ts["scan_end_h"].values):
        inside = (ts["time_h"].values > a + 1e-6) & (ts["time_h"].values < b - 1e-6)
        assert np.all(state[inside] == 2)
    ts.close()


def test_schedule_charge_is_the_integral_of_the_current(cli_run):
    out, _ = cli_run
    ts = xr.open_dataset(out / "timeseries.nc", engine="h5netcdf")
    t_s = ts["time_h"].values * 3600
    q_mah = ts["charge_mah"].values
    integral = np.concatenate([[0.0], np.cumsum(np.diff(t_s) * 0.5 * (ts["current_ua"].values[1:] + ts["current_ua"].values[:-1]))]) / 3.6e6  # µA s -> mAh
    for row in _read_schedule(out / "schedule.csv"):
        start = float(row["start_h"]) * 3600
        # The 30-s grid trapezoid of the current misses the corners of the steps: measured 0.05 µAh; bound 0.5 µAh.
        assert float(row["charge_mah"]) == pytest.approx(np.interp(start, t_s, integral), abs=5e-4)
        assert float(row["charge_mah"]) == pytest.approx(np.interp(start, t_s, q_mah), abs=5e-4)
    ts.close()


def test_lithiation_contract(cli_run):
    out, _ = cli_run
    da = xr.open_dataset(out / "lithiation.nc", engine="h5netcdf")["lithiated_fraction"]
    sc = load_scenario("quickstart")
    assert da.dims == ("scan", "depth_um", "radius_um")
    assert list(da["scan"].values) == [f"T{i}" for i in range(10)]
    assert da["depth_um"].values[0] == 0 and da["depth_um"].values[-1] == pytest.approx(sc.sample.electrode_thickness_um)
    assert np.all(np.diff(da["radius_um"].values) > 0)
    x = da.values
    assert np.all((x >= 0) & (x <= 1))
    assert np.all(x[0] == 0)  # T0 pristine
    means = x.mean(axis=(1, 2))
    assert np.all(np.diff(means[:7]) > 0)  # lithiating through T1..T6
    assert np.all(np.diff(means[6:9]) < 0)  # delithiating T6 -> T7 -> T8
    rows = _read_schedule(out / "schedule.csv")
    assert float(rows[6]["mean_lithiated_fraction"]) > 0.1


def test_monte_carlo_outputs(cli_run):
    out, _ = cli_run
    rows = _read_schedule(out / "montecarlo.csv")
    assert len(rows) == 40
    mc = json.loads((out / "rehearsal.json").read_text())["monte_carlo"]
    complete = np.array([int(r["complete_series"]) for r in rows])
    assert mc["expected_complete_series"] == pytest.approx(complete.mean())
    assert mc["p_at_least_one_complete_series"] == pytest.approx(np.mean(complete >= 1))
    assert sum(mc["lost_scans_distribution"].values()) == 40
    assert all(0 <= float(r["utilization"]) <= 1 for r in rows)
    # 1 + 3 cells at most: never more complete series than cells.
    assert complete.max() <= 1 + load_scenario("quickstart").protocol.spare_cells


def test_stage_function_writes_the_contract_files(tmp_path, monkeypatch):
    sc = load_scenario("quickstart")
    import twin.rehearse as mod

    monkeypatch.setattr(mod, "PybammCell", _linear_cell)  # the stage's wiring, without PyBaMM's cost
    ctx = StageContext(stage="rehearsal", item=None, scenario=sc, out_dir=tmp_path, inputs={}, seed=sc.run.seed, key="k")
    compute_rehearsal(ctx)
    for name in ("schedule.csv", "timeseries.nc", "rehearsal.json", "timeline.png", "lithiation.nc"):
        assert (tmp_path / name).exists()
    da = xr.open_dataset(tmp_path / "lithiation.nc", engine="h5netcdf")["lithiated_fraction"]
    rows = _read_schedule(tmp_path / "schedule.csv")
    # The stand-in lithiates uniformly: X = charge / anode capacity, exactly.
    for row, x in zip(rows, da.values):
        assert np.allclose(x, float(row["charge_mah"]) / (3.14 * _linear_cell(sc).capacity_mah), atol=1e-12)


class _FailingCell(LinearCell):
    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.calls, self.fail_at = 0, fail_at

    def advance(self, state, step: Step):
        self.calls += 1
        if self.calls == self.fail_at:
            raise StageError("solver diverged")
        return super().advance(state, step)


def test_solver_failure_names_step_and_time_and_leaves_a_partial_schedule(tmp_path):
    sc = load_scenario("quickstart")
    base = _linear_cell(sc)
    # advances: T0 pause, T0 scan, CC, T1 pause, T1 scan, then the 6th (CC again) fails
    cell = _FailingCell(6, ocv0_v=base.ocv0_v, ocv_slope_v_per_mah=base.ocv_slope_v_per_mah, resistance_kohm=15.0,
                        capacity_mah=base.capacity_mah, anode_capacity_mah=base.anode_capacity_mah)
    with pytest.raises(StageError, match=r"charge-CC step at t = \d+\.\d+ h: solver diverged"):
        rehearse(sc, tmp_path, cell=cell)
    rows = _read_schedule(tmp_path / "schedule.csv")
    assert [r["name"] for r in rows] == ["T0", "T1"] and all(r["status"] == "acquired" for r in rows)
    summary = json.loads((tmp_path / "rehearsal.json").read_text())
    assert summary["complete"] is False and "solver diverged" in summary["error"]


@pytest.mark.parametrize("override, field", [
    ("cell.leakage_current_ua=20", "cell.leakage_current_ua"),
    ("protocol.beamtime_h=2", "protocol.beamtime_h"),
    ("protocol.pretest_required_consistent=6", "protocol.pretest_required_consistent"),
    ('protocol.failure_mode_shares={short_circuit=0.5}', "protocol.failure_mode_shares"),
    ("protocol.cv_current_threshold_c_rate=0.5", "protocol.cv_current_threshold_c_rate"),
])
def test_protocols_that_cannot_finish_are_refused(override, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        load_scenario("quickstart", [override])


def test_cli_exits_2_on_invalid_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twin", "rehearse", "quickstart", "--out", str(tmp_path),
                           "--set", "cell.leakage_current_ua=50"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cell.leakage_current_ua" in proc.stderr
    assert not (tmp_path / "schedule.csv").exists()


def test_pristine_ocv_is_recorded_for_t0(tmp_path):
    sc = load_scenario("quickstart")
    cell = _linear_cell(sc)
    rehearse(sc, tmp_path, cell=cell)
    t0 = _read_schedule(tmp_path / "schedule.csv")[0]
    assert float(t0["voltage_v"]) == pytest.approx(cell.ocv0_v) and float(t0["current_ua"]) == 0
    assert math.isclose(float(t0["mean_lithiated_fraction"]), 0.0)
