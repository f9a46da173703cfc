"""Benchmark: one nominal rehearsal (PyBaMM DFN + SimPy) against 1000 Monte Carlo beamtimes that reuse its segments.

Prints JSON. The target of issue 4: time(1000 MC beamtimes) / time(one nominal rehearsal) <= 20, which holds
only because :class:`twin.electrochem.SegmentCache` never solves an electrochemical path twice. The would-be
cost without reuse is estimated from the same run: (cache look-ups in the Monte Carlo) x (mean PyBaMM solve time).

Run: ``python benchmarks/bench_rehearsal.py [scenario] [n_runs]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import numpy as np

from twin.beamtime import ProtocolTimes, Realities, monte_carlo, run_beamtime
from twin.electrochem import PybammCell, SegmentCache
from twin.rehearse import rehearse
from twin.scenario import load_scenario


def main(scenario: str = "quickstart", n_runs: int = 1000) -> dict:
    sc = load_scenario(scenario)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = rehearse(sc, out)  # builds the PyBaMM cell, solves, writes every file
        nominal_s = time.perf_counter() - t0

    # The same nominal path once more on a fresh cache, to time PyBaMM solves alone (models already built).
    cell = PybammCell(sc)
    cache = SegmentCache(cell)
    times = ProtocolTimes.from_scenario(sc.protocol, cell.capacity_mah)
    run_beamtime(times, cache, Realities.from_scenario(sc.protocol, random=False), single_series=True)  # builds models
    cache = SegmentCache(cell)
    t0 = time.perf_counter()
    run_beamtime(times, cache, Realities.from_scenario(sc.protocol, random=False), single_series=True)
    solve_s = (time.perf_counter() - t0) / cache.solves

    realities = Realities.from_scenario(sc.protocol, random=True, series_duration_s=summary["series_duration_h"] * 3600)
    solves_before, hits_before = cache.solves, cache.hits
    t0 = time.perf_counter()
    rows = monte_carlo(times, cache, realities, n_runs, np.random.default_rng(sc.run.seed))
    mc_s = time.perf_counter() - t0
    lookups = (cache.hits - hits_before) + (cache.solves - solves_before)
    result = {
        "scenario": scenario,
        "nominal_rehearsal_s": nominal_s,
        "monte_carlo_runs": n_runs,
        "monte_carlo_s": mc_s,
        "ratio_mc_over_nominal": mc_s / nominal_s,
        "target_ratio": 20.0,
        "new_pybamm_solves_in_mc": cache.solves - solves_before,
        "segment_lookups_in_mc": lookups,
        "mean_solve_s": solve_s,
        "estimated_mc_without_reuse_s": lookups * solve_s,
        "speedup_from_reuse": lookups * solve_s / mc_s,
        "expected_complete_series": float(np.mean([r["complete_series"] for r in rows])),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["quickstart"]), *(int(a) for a in sys.argv[2:3]))
