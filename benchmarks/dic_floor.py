"""Where the DIC error of a scan pair comes from: one pair correlated from ever more realistic volumes.

For a pair T(i-1) → Ti of a scenario (tiny by default), :func:`pipeline.dic.correlate_pair`
runs on four pairs of volumes, each adding one effect, and every result is scored
at the final level's nodes against the exact relative map of the truth
(:func:`phantoms.relative`):

1. ``advected, raw δ``: the true δ of T(i-1) and the same δ carried by the exact
   map to Ti (grey values move, none changes): what the windows and the
   interpolation cost on a deformation that is not affine inside a window;
2. ``advected, equalized``: both histogram-equalized as a reconstruction is;
3. ``true δ``: the true δ of both scans, equalized (the error budget's
   ``true_delta`` oracle): adds lithiation changing the grey values of the
   material the windows follow;
4. ``reconstruction``: the reconstructed volumes the ``dic`` stage reads: adds
   noise, resolution and artefacts.

each with spam's trilinear (order 1) and cubic (order 3) interpolation. The
scenario's own upstream nodes (truth, holograms, reconstruction of the two
scans) come from, or go to, the cache.

Run: ``python benchmarks/dic_floor.py [SCENARIO] [--pair T1] [--cache DIR] [--set key=value ...]``;
prints one JSON line per row and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import xarray as xr

from phantoms import load_deformation, relative
from pipeline.dic import DICSettings, correlate_pair
from pipeline.reconstruction import equalize
from twin.io import NETCDF_ENGINE
from twin.runner import Runner
from twin.scenario import load_scenario
from twin.stages import twin_stages


def _read(path: Path, name: str) -> np.ndarray:
    with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
        return ds[name].values.astype(np.float32)


def advect(volume: np.ndarray, reference, deformed) -> np.ndarray:
    """``volume`` (imaged at the reference scan) as imaged at the deformed scan: v(φ_ref(φ_def⁻¹(x)))."""
    x = np.indices(volume.shape, dtype=float).reshape(3, -1).T
    source = reference.map(deformed.inverse(x))
    return ndi.map_coordinates(volume, source.T, order=3, mode="nearest").reshape(volume.shape).astype(np.float32)


def score(pair, reference, deformed) -> dict:
    """Displacement error of the final LDIC level at its textured nodes, voxels."""
    level = pair.levels[-1]
    truth, _ = relative(reference, deformed, level.nodes)
    measured = level.phi[:, :3, 3]
    scored = np.isfinite(measured).all(1) & ~level.background
    error = measured[scored] - truth[scored, :3, 3]
    return {
        "nodes": int(scored.sum()),
        "converged_fraction": round(float(level.converged[scored].mean()), 3),
        "displacement_rmse_vx": round(float(np.sqrt((error**2).sum(1).mean())), 3),
        "rmse_zyx_vx": np.sqrt((error**2).mean(0)).round(3).tolist(),
        "slope_zyx": [round(float(np.polyfit(truth[scored, c, 3], measured[scored, c], 1)[0]), 2) for c in range(3)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", default="tiny")
    ap.add_argument("--pair", default="T1", help="the deformed scan Ti; the reference is T(i-1)")
    ap.add_argument("--cache", default="runs/dic_floor/cache")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    sc = load_scenario(args.scenario, args.overrides)
    i = int(args.pair[1:])
    ref_scan, def_scan = f"T{i - 1}", args.pair
    runner = Runner(sc, twin_stages(), Path(args.cache))
    truth = {s: runner.output("truth", s) for s in (ref_scan, def_scan)}
    recon = {s: runner.output("reconstruction", s) for s in (ref_scan, def_scan)}
    phi_ref, phi_def = (load_deformation(truth[s] / "deformation.json") for s in (ref_scan, def_scan))
    delta = {s: _read(truth[s] / "phantom.nc", "delta") for s in (ref_scan, def_scan)}
    advected = advect(delta[ref_scan], phi_ref, phi_def)
    sources = {
        "advected, raw δ": (delta[ref_scan], advected),
        "advected, equalized": (equalize(delta[ref_scan]), equalize(advected)),
        "true δ, equalized": (equalize(delta[ref_scan]), equalize(delta[def_scan])),
        "reconstruction": tuple(_read(recon[s] / "volume.nc", "volume") for s in (ref_scan, def_scan)),
    }
    settings = DICSettings.from_scenario(sc)
    rows = []
    for name, (reference, deformed) in sources.items():
        for order in (1, 3):
            start = time.perf_counter()
            pair = correlate_pair(reference, deformed, dataclasses.replace(settings, interpolation_order=order))
            row = {"scenario": sc.name, "pair": f"{ref_scan}->{def_scan}", "volumes": name, "interpolation_order": order,
                   "seconds": round(time.perf_counter() - start, 1), **score(pair, phi_ref, phi_def)}
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    print(f"\n{'volumes':<22} order  RMSE vx  (z, y, x)              converged  seconds")
    for r in rows:
        print(f"{r['volumes']:<22} {r['interpolation_order']:>5}  {r['displacement_rmse_vx']:7.3f}  "
              f"{str(r['rmse_zyx_vx']):<24} {r['converged_fraction']:9.2f}  {r['seconds']:7.1f}")


if __name__ == "__main__":
    main()
