"""Benchmark: hologram simulation per projection ÷ bare ASTRA line integrals of the same volume (target ≤ 2).

Both are measured in this run on the quickstart grid (200 nm voxels, 128 × 128 lateral)
with fewer angles to keep the run short; per-projection costs do not depend on the number
of angles. Prints JSON.

    python benchmarks/bench_instrument.py
"""

from __future__ import annotations

import json
import time

import numpy as np


def _phantom(shape, rng):
    nz, ny, nx = shape
    z, y, x = np.mgrid[:nz, :ny, :nx]
    delta = np.full(shape, 3.1e-7, np.float32)
    beta = np.full(shape, 1.3e-10, np.float32)
    for _ in range(20):
        c = rng.uniform([0, 0, 0], shape)
        inside = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < rng.uniform(6, 14) ** 2
        delta[inside], beta[inside] = 5.5e-7, 1.16e-9
    return delta, beta


def main(n_projections: int = 100) -> dict:
    from twin.instrument import Instrument, LineIntegrals
    from twin.scenario import load_scenario

    sc = load_scenario("quickstart", [f"beamline.n_projections={n_projections}"])
    shape = sc.volume_shape
    delta, beta = _phantom(shape, np.random.default_rng(0))
    inst = Instrument(sc)
    g = inst.geometry
    projector = LineIntegrals(shape, g.n_columns, np.deg2rad(g.angles_deg))
    t0 = time.perf_counter()
    projector(delta)
    bare_s = time.perf_counter() - t0
    projector.close()
    t0 = time.perf_counter()
    inst.simulate(delta, beta, rng=np.random.default_rng(1))
    sim_s = time.perf_counter() - t0
    n_dist = len(g.distances_m)
    return {
        "volume_shape": list(shape),
        "detector": [g.n_rows, g.n_columns],
        "n_projections": n_projections,
        "n_distances": n_dist,
        "bare_astra_line_integrals_s_per_projection": bare_s / n_projections,
        "simulation_s_per_projection_all_distances": sim_s / n_projections,
        "ratio_simulation_over_bare_astra": sim_s / bare_s,
        # the forward model needs two volumes projected (δ and β): the floor of this ratio is 2
        "ratio_simulation_over_bare_astra_delta_and_beta": sim_s / (2 * bare_s),
        "ratio_simulation_per_distance_over_bare_astra": sim_s / n_dist / bare_s,
        "target_ratio": 2.0,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
