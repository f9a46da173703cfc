"""Pre-beamtime rehearsal: the protocol of Fig S6 on the PyBaMM cell, its outputs and a Monte Carlo of beamtimes.

:func:`rehearse` runs the nominal beamtime (one cell, scheduled refills, no
random events) and writes into a directory:

* ``schedule.csv``: one row per scan (name, cell id, start/end in h, phase,
  voltage and current just before the OCV pause, charge passed, mean
  lithiated fraction, status);
* ``timeseries.nc``: voltage, current, charge and protocol state on a 30 s
  grid, with the scan windows;
* ``lithiation.nc``: ``lithiated_fraction`` (scan, depth_um, radius_um), the
  contract the phantom stage consumes;
* ``rehearsal.json``: a summary (capacities, the seed's nomenclature check,
  the pre-test rule and spares, solver statistics);
* ``timeline.png``: voltage and current with scans shaded, and a Gantt row for
  the beamline and the cell;
* with ``monte_carlo_runs > 0``: ``montecarlo.csv`` (one row per random
  beamtime) and ``montecarlo.png`` (histograms).

The stage function :func:`compute_rehearsal` is the same, once per run.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from twin.beamtime import (BeamtimeResult, ProtocolTimes, Realities, monte_carlo, pretest_failure_posterior, run_beamtime,
                           spares_needed)
from twin.electrochem import Cell, PybammCell, SegmentCache
from twin.errors import StageError
from twin.io import atomic_path, write_netcdf

STATE_CODES = {"idle": 0, "ocv": 1, "scan": 2, "charge-CC": 3, "charge-CV": 4, "discharge": 5}
# Seed Note 3: T1-T6 while charging, T7 and T8 while discharging, T9 the double scan; Fig S19 pairs T8 with T9,
# so T7 is the one timer scan of the discharge and T8, T9 the back-to-back scans at the cut-off.
SEED_NOMENCLATURE = {"charge": 6, "discharge": 1, "double": 1}


def rehearse(scenario, out_dir: str | Path, *, monte_carlo_runs: int = 0, rng: np.random.Generator | None = None,
             cell: Cell | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Rehearse the beamtime of ``scenario`` and write its files into ``out_dir``.

    Parameters
    ----------
    scenario
        Reads ``cell``, ``protocol``, ``run.seed`` and the Si electrode's
        ``sample.electrode_thickness_um``, ``sample.particle_median_diameter_um``,
        ``sample.particle_diameter_log_sigma``.
    out_dir
        Directory for the outputs (created).
    monte_carlo_runs
        Random beamtimes to simulate after the nominal one (0: none).
    rng
        Generator for the Monte Carlo (default: from ``run.seed``).
    cell
        The cell model; default :class:`twin.electrochem.PybammCell` of the scenario.
    progress
        ``progress(task, done, total)`` for long work.

    Returns
    -------
    dict
        The summary also written to ``rehearsal.json``.

    Raises
    ------
    StageError
        When the cell model fails; the partial schedule is written first and
        marked incomplete in ``rehearsal.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = rng if rng is not None else np.random.default_rng(scenario.run.seed)
    start = time.perf_counter()
    if progress:
        progress("building the cell", 0, 1)
    cells = SegmentCache(cell if cell is not None else PybammCell(scenario))
    times = ProtocolTimes.from_scenario(scenario.protocol, cells.cell.capacity_mah)
    nominal = run_beamtime(times, cells, Realities.from_scenario(scenario.protocol, random=False), single_series=True)
    nominal_s = time.perf_counter() - start
    weights = np.asarray(cells.cell.radius_weights, float)
    x0 = cells.cell.initial_lithiated_fraction
    summary = _summary(scenario, nominal, cells, times, nominal_s)
    _write_schedule(out / "schedule.csv", nominal, weights, x0)
    _write_timeseries(out / "timeseries.nc", nominal)
    _write_lithiation(out / "lithiation.nc", nominal, cells.cell, x0, scenario)
    _plot_timeline(out / "timeline.png", nominal, scenario.name)
    if progress:
        progress("nominal rehearsal", 1, 1)
    if nominal.error is None and monte_carlo_runs > 0:
        realities = Realities.from_scenario(scenario.protocol, random=True, series_duration_s=summary["series_duration_h"] * 3600)
        mc_start = time.perf_counter()
        done = [0]

        def tick():
            done[0] += 1
            if progress and (done[0] % 10 == 0 or done[0] == monte_carlo_runs):
                progress("Monte Carlo beamtimes", done[0], monte_carlo_runs)

        rows = monte_carlo(times, cells, realities, monte_carlo_runs, rng, progress=tick)
        summary["monte_carlo"] = _write_monte_carlo(out, rows, time.perf_counter() - mc_start, realities)
        summary["segment_cache"] = {"solves": cells.solves, "reuses": cells.hits}
    with atomic_path(out / "rehearsal.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=_json_default))
    if nominal.error is not None:
        raise StageError(f"rehearsal incomplete (partial schedule written to {out / 'schedule.csv'}): {nominal.error}")
    return summary


def compute_rehearsal(ctx) -> None:
    """Stage ``rehearsal`` (once): the nominal rehearsal's files, lithiation.nc included, into ``ctx.out_dir``."""
    rehearse(ctx.scenario, ctx.out_dir, monte_carlo_runs=0, rng=ctx.rng)


# Summaries and files -----------------------------------------------------------------------


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _summary(scenario, res: BeamtimeResult, cells: SegmentCache, times: ProtocolTimes, seconds: float) -> dict[str, Any]:
    p = scenario.protocol
    scans = [s for s in res.scans if s.cell_id == 0]
    pieces = [q for q in res.pieces if q.cell_id == 0]
    charge_in = sum(q.segment.charge_until_mah(q.end_s - q.start_s) for q in pieces if q.phase.startswith("charge"))
    charge_out = -sum(q.segment.charge_until_mah(q.end_s - q.start_s) for q in pieces if q.phase == "discharge")
    first_cv = next((q.start_s / 3600 for q in pieces if q.phase == "charge-CV"), None)
    phases = [s.phase for s in scans]
    counts = {"charge": sum(ph.startswith("charge") for ph in phases), "discharge": phases.count("discharge"),
              "double": 1 if phases.count("relaxation") >= 2 else 0}
    # The seed: T1-T6 charging, T7-T8 discharging, T9 double scan (its Fig S19 pairs T8 with T9).
    series_h = (res.cells[0].end_s - res.cells[0].start_s) / 3600 if res.cells else math.nan
    pre = pretest_failure_posterior(p.pretest_cells, p.pretest_required_consistent)
    fail = p.cell_failure_probability if p.cell_failure_probability is not None else pre["mean"]
    return {
        "scenario": scenario.name,
        "complete": res.error is None and bool(res.cells) and res.cells[0].outcome == "complete",
        "error": res.error,
        "cell_model": type(cells.cell).__name__,
        "seconds": seconds,
        "nominal_capacity_mah": cells.cell.capacity_mah,
        "charge_passed_mah": charge_in,
        "discharge_capacity_mah": charge_out,
        "first_cv_h": first_cv,
        "series_duration_h": series_h,
        "beamtime_h": p.beamtime_h,
        "beamtime_shifts": p.beamtime_h / p.shift_h,
        "series_per_beamtime_max": math.floor(p.beamtime_h / (series_h + p.cell_exchange_min / 60)) if series_h > 0 else 0,
        "scans": [s.name for s in scans],
        "scan_phases": phases,
        "seed_nomenclature": {"twin": counts, "seed": SEED_NOMENCLATURE, "matches": counts == SEED_NOMENCLATURE},
        "pretest": {"cells": p.pretest_cells, "required_consistent": p.pretest_required_consistent,
                    "failure_probability_posterior_mean": pre["mean"], "failure_probability_upper_95": pre["upper"],
                    "failure_probability_used": fail,
                    "spares_needed_at_mean": spares_needed(pre["mean"], p.spare_target_probability),
                    "spares_needed_at_upper_95": spares_needed(pre["upper"], p.spare_target_probability),
                    "spare_target_probability": p.spare_target_probability},
        "segment_cache": {"solves": cells.solves, "reuses": cells.hits},
    }


def _write_schedule(path: Path, res: BeamtimeResult, weights: np.ndarray, x0: float) -> None:
    header = ["name", "cell_id", "start_h", "end_h", "phase", "voltage_v", "current_ua", "charge_mah", "mean_lithiated_fraction",
              "status"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for s in res.scans:
            mean_x = math.nan
            if s.lithiated_fraction is not None:
                mean_x = float(np.mean(_relative(s.lithiated_fraction, x0), axis=0) @ weights)
            w.writerow([s.name, s.cell_id, f"{s.start_s / 3600:.6f}", f"{s.end_s / 3600:.6f}", s.phase, f"{s.voltage_v:.6f}",
                        f"{s.current_a * 1e6:.6f}", f"{s.charge_mah:.8f}", f"{mean_x:.6f}", s.status])


def _relative(x: np.ndarray, x0: float) -> np.ndarray:
    """Lithiation gained since assembly, as a fraction of the rest to Li15Si4 (so the pristine scan reads 0)."""
    return np.clip((x - x0) / (1 - x0), 0.0, 1.0)


def _write_lithiation(path: Path, res: BeamtimeResult, cell, x0: float, scenario) -> None:
    import xarray as xr

    scans = [s for s in res.scans if s.cell_id == 0 and s.lithiated_fraction is not None]
    data = np.stack([_relative(s.lithiated_fraction, x0) for s in scans]) if scans else np.zeros((0, len(cell.depth_um), len(cell.radius_um)))
    da = xr.DataArray(data.astype(np.float32), dims=("scan", "depth_um", "radius_um"),
                      coords={"scan": [s.name for s in scans], "depth_um": np.asarray(cell.depth_um, float),
                              "radius_um": np.asarray(cell.radius_um, float)},
                      name="lithiated_fraction",
                      attrs={"long_name": "particle-averaged lithiated fraction, fraction of Li15Si4 (x = 3.75) gained since assembly",
                             "units": "1", "depth": "below the electrode's separator-side surface",
                             "imaged_state": "mid-scan", "cell_model": type(cell).__name__})
    ds = da.to_dataset()
    ds["scan_start_h"] = ("scan", np.array([s.start_s / 3600 for s in scans]))
    ds.attrs.update({"scenario": scenario.name, "seed": scenario.run.seed})
    write_netcdf(ds, path)


def _write_timeseries(path: Path, res: BeamtimeResult, step_s: float = 30.0) -> None:
    import xarray as xr

    pieces = sorted((q for q in res.pieces if q.cell_id == 0), key=lambda q: q.start_s)
    end_s = max((q.end_s for q in pieces), default=0.0)
    t = np.arange(0.0, end_s + step_s, step_s)
    v = np.full(t.shape, np.nan)
    i = np.zeros(t.shape)
    q_mah = np.zeros(t.shape)
    state = np.zeros(t.shape, np.int8)
    charge = 0.0
    for piece in pieces:
        seg = piece.segment
        inside = (t >= piece.start_s) & (t <= piece.end_s)
        local = t[inside] - piece.start_s
        v[inside] = np.interp(local, seg.time_s, seg.voltage_v)
        i[inside] = np.interp(local, seg.time_s, seg.current_a)
        q_mah[inside] = charge + np.array([seg.charge_until_mah(x) for x in local])
        state[inside] = STATE_CODES.get(piece.phase, 1)
        charge += seg.charge_until_mah(piece.end_s - piece.start_s)
    scans = [s for s in res.scans if s.cell_id == 0]
    ds = xr.Dataset(
        {"voltage_v": ("time_h", v), "current_ua": ("time_h", i * 1e6), "charge_mah": ("time_h", q_mah),
         "state": ("time_h", state, {"flag_values": list(STATE_CODES.values()), "flag_meanings": " ".join(STATE_CODES)}),
         "scan_start_h": ("scan", np.array([s.start_s / 3600 for s in scans])),
         "scan_end_h": ("scan", np.array([s.end_s / 3600 for s in scans])),
         "scan_acquired": ("scan", np.array([s.status == "acquired" for s in scans], np.int8))},
        coords={"time_h": t / 3600, "scan": [s.name for s in scans]},
        attrs={"current_sign": "positive charges the cell (lithiates Si)", "sampling_s": step_s},
    )
    write_netcdf(ds, path)


def _plot_timeline(path: Path, res: BeamtimeResult, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pieces = sorted((q for q in res.pieces if q.cell_id == 0), key=lambda q: q.start_s)
    fig, (ax, gantt) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax_i = ax.twinx()
    for piece in pieces:
        seg = piece.segment
        keep = seg.time_s <= piece.end_s - piece.start_s
        th = (piece.start_s + seg.time_s[keep]) / 3600
        ax.plot(th, seg.voltage_v[keep], color="tab:blue", lw=1.2)
        ax_i.plot(th, seg.current_a[keep] * 1e6, color="tab:red", lw=1.0)
    colors = {"pristine": "0.6", "charge-CC": "tab:orange", "charge-CV": "tab:red", "discharge": "tab:green", "relaxation": "tab:purple"}
    for s in res.scans:
        if s.cell_id != 0:
            continue
        ax.axvspan(s.start_s / 3600, s.end_s / 3600, color="0.85" if s.status == "acquired" else "mistyrose", zorder=0)
        ax.text((s.start_s + s.end_s) / 7200, 1.0, s.name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
        gantt.barh(1, (s.end_s - s.start_s) / 3600, left=s.start_s / 3600, color=colors.get(s.phase, "0.5"),
                   hatch=None if s.status == "acquired" else "xx")
    for kind, a, b in res.downtimes:
        gantt.barh(1, (b - a) / 3600, left=a / 3600, color="black")
    for piece in pieces:
        gantt.barh(0, (piece.end_s - piece.start_s) / 3600, left=piece.start_s / 3600,
                   color=colors.get(piece.phase, "0.8" if piece.phase in ("ocv", "scan") else "0.5"))
    gantt.set_yticks([0, 1], ["cell 0", "beamline"])
    from matplotlib.patches import Patch

    legend = [Patch(color=c, label=k) for k, c in colors.items()] + [Patch(color="0.8", label="OCV / scan"),
                                                                    Patch(color="black", label="beam off")]
    gantt.legend(handles=legend, ncol=7, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), frameon=False)
    gantt.set_xlim(left=0)
    ax.set_ylabel("voltage (V)", color="tab:blue")
    ax_i.set_ylabel("current (µA, + = charge)", color="tab:red")
    gantt.set_xlabel("time since beamtime start (h)")
    ax.set_title(f"rehearsal: {title}" + ("" if res.error is None else " (INCOMPLETE)"), pad=14)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _write_monte_carlo(out: Path, rows: list[dict[str, float]], seconds: float, realities: Realities) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(out / "montecarlo.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    complete = np.array([r["complete_series"] for r in rows])
    lost = np.array([r["scans_lost"] for r in rows])
    util = np.array([r["utilization"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    axes[0].hist(complete, bins=np.arange(complete.max() + 2) - 0.5, color="tab:blue")
    axes[0].set_xlabel("complete series per beamtime")
    axes[1].hist(lost, bins=np.arange(lost.max() + 2) - 0.5, color="tab:red")
    axes[1].set_xlabel("lost scans per beamtime")
    axes[2].hist(util, bins=20, color="tab:green")
    axes[2].set_xlabel("beamtime utilization")
    axes[0].set_ylabel(f"beamtimes (of {len(rows)})")
    fig.tight_layout()
    with atomic_path(out / "montecarlo.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    values, counts = np.unique(lost, return_counts=True)
    return {"runs": len(rows), "seconds": seconds, "p_at_least_one_complete_series": float(np.mean(complete >= 1)),
            "expected_complete_series": float(complete.mean()), "utilization_mean": float(util.mean()),
            "lost_scans_mean": float(lost.mean()),
            "lost_scans_distribution": {int(v): int(c) for v, c in zip(values, counts)},
            "failure_probability": realities.failure_probability, "spare_cells": realities.spare_cells}
