"""Scores of the DIC products against the phantom's exact displacement.

The truth is ``phantom.nc``'s ``displacement`` (component, z, y, x): the
Lagrangian displacement in voxels, from T0, of the material point at each
voxel of the T0 grid — the same convention as spam's Φ from T0 to Ti. It is
interpolated (trilinear, ``scipy.ndimage.map_coordinates``) at the DIC node
positions here, without the phantom package's API.

Metrics (flat dotted names for ``metrics.json``):

* ``dic.displacement_rmse_vx.T<i>``: RMS over textured nodes and components of
  u_DIC − u_true (cumulative T0 → Ti), and ``dic.displacement_rmse_{z,y,x}_vx.T<i>``;
* ``dic.volumetric_strain_mae.T<i>`` / ``_bias``: mean |·| and mean of
  ε_v,DIC − ε_v,true over Q8 cells, where ε_v,true is spam's Q8 strain of the
  true displacement sampled at the same nodes (the truth at the DIC's
  resolution); likewise ``dic.axial_strain_mae`` / ``_bias``;
* ``dic.converged_fraction.T<i>``: converged / textured nodes of the final
  level of the increment T(i-1) → Ti; ``dic.converged_fraction_level<k>.T<i>``
  per level;
* ``dic.noise_floor_vx``: displacement scatter of the double-scan increment;
  ``dic.error_to_noise_ratio.T<i>`` = rmse_Ti / (noise_floor · √i): near 1
  when the double-scan baseline predicts the true error of a chain of i
  increments;
* ``tracking.axial_displacement_rmse_um``: tracked particle axial displacement
  against the true displacement at the particle's T0 centre of mass, over the
  tracks found; ``tracking.tracked_fraction``: the share of (particle, scan > T0)
  tracks found (a particle is lost where no match lies within its radius of
  where the DIC puts it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import xarray as xr


def true_displacement_at(phantom_path: str | Path, points_px: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``phantom.nc``'s ``displacement`` (voxels) at points (N, 3) given in voxels.

    Outside the volume the border value (``mode="nearest"``). Only the z planes that bracket a point
    are read (the file is chunked by planes): DIC nodes and particle centres need a few planes of
    each node spacing, not the 12 bytes per voxel of the whole field.
    """
    import h5netcdf  # not xarray: opening the file through it cost ~0.1 s, 36 times a run on `tiny`

    points = np.asarray(points_px, dtype=np.float64).reshape(-1, 3)
    with h5netcdf.File(phantom_path, "r") as f:
        field = f.variables["displacement"]
        dims = field.dimensions
        nz = field.shape[dims.index("z")]
        z = np.clip(points[:, 0], 0, nz - 1)
        below = np.minimum(np.floor(z).astype(int), max(nz - 2, 0))
        planes = np.unique(np.concatenate([below, np.minimum(below + 1, nz - 1)]))
        disp = field[tuple(planes if d == "z" else slice(None) for d in dims)]
    disp = np.transpose(disp, [dims.index(d) for d in ("component", "z", "y", "x")]).astype(np.float64)
    # the planes stacked: a point between planes k and k + 1 lies between their rows, at the same fraction
    local = points.copy()
    local[:, 0] = np.searchsorted(planes, below) + (z - below)
    return np.stack([ndi.map_coordinates(disp[c], local.T, order=1, mode="nearest") for c in range(3)], axis=1)


def _scan_number(name: str) -> int:
    return int(name[1:])


def dic_metrics(composition_dir: str | Path, phantoms: Mapping[str, str | Path],
                dic_dirs: Mapping[str, str | Path] | None = None, tracking_dir: str | Path | None = None) -> dict[str, float]:
    """Score the DIC products of a run.

    Parameters
    ----------
    composition_dir
        Output of the ``dic_composition`` stage (``cumulative.nc``, ``noise_baseline.json``).
    phantoms
        Scan name → ``phantom.nc`` path (truth), for the scans to score.
    dic_dirs
        Scan name → output of the ``dic`` stage for that scan (for converged fractions per level).
    tracking_dir
        Output of the ``tracking`` stage (``trajectories.csv``), optional.
    """
    from pipeline.strain import strain_field

    metrics: dict[str, float] = {}
    composition_dir = Path(composition_dir)
    with xr.open_dataset(composition_dir / "cumulative.nc", engine="h5netcdf") as ds:
        ds = ds.load()
    grid = np.stack(np.meshgrid(ds["z_px"].values, ds["y_px"].values, ds["x_px"].values, indexing="ij"), -1)
    dims = grid.shape[:3]
    nodes = grid.reshape(-1, 3)
    rmse_by_scan = {}
    for scan in ds["scan"].values.tolist():
        if scan not in phantoms:
            continue
        sub = ds.sel(scan=scan)
        u = np.moveaxis(sub["displacement"].values, 0, -1).reshape(-1, 3).astype(float)
        truth = true_displacement_at(phantoms[scan], nodes)
        ok = np.all(np.isfinite(u), axis=1)
        if not ok.any():
            continue  # no finite node: leave the metric out rather than report NaN
        err = u[ok] - truth[ok]
        rmse = float(np.sqrt(np.mean(err**2)))
        rmse_by_scan[scan] = rmse
        metrics[f"dic.displacement_rmse_vx.{scan}"] = rmse
        for c, axis in enumerate("zyx"):
            metrics[f"dic.displacement_rmse_{axis}_vx.{scan}"] = float(np.sqrt(np.mean(err[:, c] ** 2)))
        true_strain = strain_field(nodes, dims, truth, processes=1)
        for name, measured, true in (("volumetric_strain", sub["volumetric_strain"].values, true_strain.volumetric),
                                     ("axial_strain", sub["axial_strain"].values, true_strain.axial)):
            diff = (measured - true)[np.isfinite(measured) & np.isfinite(true)]
            if diff.size:
                metrics[f"dic.{name}_mae.{scan}"] = float(np.mean(np.abs(diff)))
                metrics[f"dic.{name}_bias.{scan}"] = float(np.mean(diff))
        textured = sub["background"].values == 0
        if dic_dirs is None or scan not in dic_dirs:
            metrics[f"dic.converged_fraction.{scan}"] = float(sub["converged"].values[textured].mean()) if textured.any() else 0.0
    for scan, path in (dic_dirs or {}).items():
        summary = json.loads((Path(path) / "dic.json").read_text())
        levels = summary["levels"]
        metrics[f"dic.converged_fraction.{scan}"] = float(levels[-1]["converged_fraction"])
        for k, level in enumerate(levels):
            metrics[f"dic.converged_fraction_level{k}.{scan}"] = float(level["converged_fraction"])
    baseline_path = composition_dir / "noise_baseline.json"
    if baseline_path.exists():
        baseline = json.loads(baseline_path.read_text())
        std = baseline.get("double_scan_displacement_std_vx")
        if std is not None:
            noise = float(np.sqrt(np.mean(np.square(std))))
            metrics["dic.noise_floor_vx"] = noise
            metrics["dic.noise_threshold"] = float(baseline["threshold"])
            if noise > 0:
                for scan, rmse in rmse_by_scan.items():
                    metrics[f"dic.error_to_noise_ratio.{scan}"] = rmse / (noise * math.sqrt(_scan_number(scan)))
    for prefix in ("dic.displacement_rmse_vx", "dic.volumetric_strain_mae"):
        values = [v for k, v in metrics.items() if k.startswith(prefix + ".T")]
        if values:
            metrics[f"{prefix}.max"] = max(values)
    if tracking_dir is not None:
        metrics.update(tracking_metrics(tracking_dir, phantoms))
    return metrics


def tracking_metrics(tracking_dir: str | Path, phantoms: Mapping[str, str | Path]) -> dict[str, float]:
    """``tracking.axial_displacement_rmse_um``: tracked axial displacement vs the truth at each particle's T0 centre."""
    path = Path(tracking_dir) / "trajectories.csv"
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    if table.size == 0:
        return {}
    table = np.atleast_1d(table)
    voxel = float(json.loads((Path(tracking_dir) / "tracking.json").read_text())["voxel_size_um"])
    errors, n_rows = [], 0
    for scan in sorted(set(table["scan"].tolist()), key=_scan_number):
        if scan == "T0" or scan not in phantoms:
            continue
        rows = table[table["scan"] == scan]
        start = np.column_stack([rows["z0_px"], rows["y0_px"], rows["x0_px"]]).astype(float)
        truth = true_displacement_at(phantoms[scan], start)[:, 0]
        errors.append((rows["dz_px"].astype(float) - truth) * voxel)
        n_rows += len(rows)
    if not errors:
        return {}
    errors = np.concatenate(errors)
    errors = errors[np.isfinite(errors)]
    out = {"tracking.tracked_fraction": errors.size / n_rows}
    if errors.size:
        out["tracking.axial_displacement_rmse_um"] = float(np.sqrt(np.mean(errors**2)))
    return out
