"""Particle tracking (seed Fig S9) and particle-centred VOI strain curves (Figs S12, S20).

Tracking: each Si particle of the T0 segmentation is followed through the scans as the
centre of mass of its non-lithiated (still Si-labelled) phase. Particles are
the regions of :func:`split_particles` (a packed electrode's Si is one
connected component: touching particles are split by spam's watershed). In
scan Ti the particle's T0 voxels are shifted by the DIC displacement at its
centre (cumulative Φ₀→ᵢ), and the Ti particle that most of them land on is
taken as the particle; its centre of mass gives the trajectory. The seed plots the
axial (z) displacement against height above the current collector.

VOIs: cubes of edge ``validation.voi_size_um`` centred on chosen particles'
T0 centres; the mean Q8 volumetric and axial strain of the cells inside, per
scan, relative to T0.

Written by hand: spam's ``spam.label`` tracks labelled grains with ``ddic``,
which needs grey-level windows per grain; the seed tracks segmented phases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import xarray as xr

from pipeline.segmentation import si_from_labels
from twin.errors import InputFileError, StageError
from twin.io import atomic_path, write_netcdf


#: Default of ``validation.particle_watershed_level``, voxels (tiny's tracking error: 0.98 µm at 0.5, 1.78 µm at
#: spam's own default 1; docs/dic.md).
WATERSHED_LEVEL_VOX = 0.5


def split_particles(si_mask: np.ndarray, *, watershed_level: float = WATERSHED_LEVEL_VOX) -> np.ndarray:
    """Label image (int32, 0 = background) of the particles of a Si mask.

    In a packed electrode touching particles form one connected component, so
    the mask is split by ``spam.label.watershed`` (ITK's morphological watershed
    on the distance map; maxima shallower than ``watershed_level`` voxels are
    merged). ``watershed_level = 0`` keeps the connected components.
    """
    if watershed_level <= 0 or not si_mask.any():
        return ndi.label(si_mask)[0].astype(np.int32)
    import spam.label

    from pipeline._spam_compat import spam_call

    with spam_call(1, "label.watershed"):
        return np.asarray(spam.label.watershed(si_mask, watershedLevel=watershed_level), np.int32)


def particles(labels: np.ndarray, *, min_voxels: int = 27) -> tuple[np.ndarray, np.ndarray]:
    """Label ids of the particles of at least ``min_voxels`` in a label image, and their centres (N, 3) voxels."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0, int), np.zeros((0, 3))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ids = np.arange(1, n + 1)[sizes >= min_voxels]
    centres = np.array(ndi.center_of_mass(labels > 0, labels, ids), dtype=float).reshape(-1, 3)
    return ids, centres


def track(particle_labels: dict[str, np.ndarray], displacement_at, *, min_voxels: int = 27) -> list[dict]:
    """Trajectories of the T0 particles.

    Parameters
    ----------
    particle_labels
        Scan name → particle label image (z, y, x; 0 = background) from
        :func:`split_particles`, ``"T0"`` first.
    displacement_at
        ``displacement_at(scan, points (N, 3) voxels) -> (N, 3)`` cumulative DIC
        displacement T0 → scan in voxels (NaN where unknown).
    min_voxels
        Smaller T0 particles are not tracked (see :func:`particles`).

    Returns
    -------
    list of dict
        One row per particle and scan: ``particle``, ``scan``, ``z0_px`` … (T0
        centre), ``z_px`` … (centre in the scan), ``dz_px`` (NaN if lost).
    """
    scans = list(particle_labels)
    labels0 = particle_labels[scans[0]]
    ids, centres0 = particles(labels0, min_voxels=min_voxels)
    rows = []
    voxels0 = ndi.find_objects(labels0)
    for scan in scans:
        if scan == scans[0]:
            for pid, c in zip(ids, centres0):
                rows.append(_row(pid, scan, c, c))
            continue
        labels_i = particle_labels[scan]
        n_i = int(labels_i.max())
        centres_i = np.array(ndi.center_of_mass(labels_i > 0, labels_i, np.arange(1, n_i + 1)), float).reshape(-1, 3)
        shifts = displacement_at(scan, centres0) if len(centres0) else np.zeros((0, 3))
        for pid, c0, shift in zip(ids, centres0, shifts):
            sl = voxels0[pid - 1]
            local = np.argwhere(labels0[sl] == pid) + [s.start for s in sl]
            centre = np.full(3, np.nan)
            if np.all(np.isfinite(shift)):
                moved = np.rint(local + shift).astype(int)
                inside = np.all((moved >= 0) & (moved < np.array(labels_i.shape)), axis=1)
                hit = labels_i[tuple(moved[inside].T)]
                hit = hit[hit > 0]
                if hit.size:
                    candidate = centres_i[np.bincount(hit).argmax() - 1]
                    # a match farther from where the DIC puts the particle than its own radius is another particle
                    # (or a fragment of it): the particle is lost in this scan rather than tracked wrongly
                    if np.linalg.norm(candidate - (c0 + shift)) <= (3 * len(local) / (4 * np.pi)) ** (1 / 3):
                        centre = candidate
            rows.append(_row(pid, scan, c0, centre))
    return rows


def _row(pid, scan, c0, c) -> dict:
    return {"particle": int(pid), "scan": scan, "z0_px": c0[0], "y0_px": c0[1], "x0_px": c0[2],
            "z_px": c[0], "y_px": c[1], "x_px": c[2], "dz_px": c[0] - c0[0], "dy_px": c[1] - c0[1], "dx_px": c[2] - c0[2]}


def voi_curves(cumulative: xr.Dataset, centres_um: np.ndarray, edge_um: float) -> list[dict]:
    """Mean volumetric and axial strain in cubes of ``edge_um`` around each centre (z, y, x µm), per scan."""
    rows = []
    zc, yc, xc = (cumulative[c].values for c in ("z_cell", "y_cell", "x_cell"))
    for k, centre in enumerate(centres_um):
        sel = [np.abs(axis - c) <= edge_um / 2 for axis, c in zip((zc, yc, xc), centre)]
        rows.append({"voi": k, "scan": "T0", "z_um": centre[0], "y_um": centre[1], "x_um": centre[2],
                     "volumetric_strain": 0.0, "axial_strain": 0.0, "n_cells": int(np.prod([s.sum() for s in sel]))})
        for scan in cumulative["scan"].values.tolist():
            sub = cumulative.sel(scan=scan)
            block = np.ix_(*sel)
            vol = sub["volumetric_strain"].values[block]
            ax = sub["axial_strain"].values[block]
            rows.append({"voi": k, "scan": scan, "z_um": centre[0], "y_um": centre[1], "x_um": centre[2],
                         "volumetric_strain": float(np.nanmean(vol)) if np.isfinite(vol).any() else np.nan,
                         "axial_strain": float(np.nanmean(ax)) if np.isfinite(ax).any() else np.nan,
                         "n_cells": int(np.isfinite(vol).sum())})
    return rows


def choose_voi_particles(centres_px: np.ndarray, sizes: np.ndarray, n: int = 4) -> np.ndarray:
    """Indices of ``n`` particles spread through the depth (the largest in each depth quantile), as Fig S12 picks them."""
    if len(centres_px) == 0:
        return np.zeros(0, int)
    order = np.argsort(centres_px[:, 0])
    chosen = []
    for part in np.array_split(order, min(n, len(order))):
        chosen.append(part[np.argmax(sizes[part])])
    return np.array(chosen, int)


def _write_rows(path: Path, rows: list[dict]) -> None:
    keys = list(rows[0]) if rows else ["empty"]
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(",".join(keys) + "\n")
            for r in rows:
                fh.write(",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")


def _read_label_image(path: Path, name: str) -> tuple[xr.DataArray, dict]:
    """Variable ``name`` of a label file (loaded) and the file's attributes."""
    if not path.is_file():
        raise InputFileError(path, "no such file")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            if name not in ds:
                raise InputFileError(path, f"no variable {name!r} (has {sorted(ds.data_vars)})")
            return ds[name].load(), dict(ds.attrs)
    except InputFileError:
        raise
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"cannot read it ({type(exc).__name__}: {exc})") from None


def read_particle_labels(path: Path) -> np.ndarray:
    """The ``particle_labels`` image (int32) of a ``particle_labels.nc``."""
    return _read_label_image(path, "particle_labels")[0].values.astype(np.int32)


def compute_particle_labels(ctx) -> None:
    """Stage ``particle_labels`` (per scan): the scan's Si split into particles (:func:`split_particles`).

    Input: ``segmentation[Ti]/labels.nc`` (``labels``; Si = 1, and 2 with three classes). Scenario:
    ``validation.particle_watershed_level``. Writes ``particle_labels.nc`` (``particle_labels`` int32,
    0 = not Si; coords and ``voxel_size_um`` of the labels). A stage of its own because it depends on the
    segmentation alone: tracking and the mechanism score read it, and a DIC sweep reuses it.
    """
    level = ctx.scenario.validation.particle_watershed_level
    labels, attrs = _read_label_image(Path(ctx.input("segmentation", ctx.item)) / "labels.nc", "labels")
    split = split_particles(si_from_labels(labels.values), watershed_level=level)
    out = xr.Dataset({"particle_labels": (labels.dims, split)}, coords=labels.coords,
                     attrs={k: v for k, v in attrs.items() if k == "voxel_size_um"}
                     | {"scan": ctx.item, "watershed_level_vx": level})
    write_netcdf(out, Path(ctx.out_dir) / "particle_labels.nc")


def compute_tracking(ctx) -> None:
    """Stage ``tracking`` (once): particle trajectories and VOI strain curves.

    Inputs: ``particle_labels[Ti]/particle_labels.nc`` for every scan and
    ``dic_composition/cumulative.nc``. Scenario: ``sample.voxel_size_um``,
    ``sample.current_collector_thickness_um``, ``validation.voi_size_um``.
    Writes ``trajectories.csv`` (per particle and scan; ``height_um`` above the
    current collector, ``dz_um``), ``vois.csv`` and ``tracking.json``.
    """
    from pipeline.dic import interpolate_phi

    scans = sorted({item for (stage, item) in ctx.inputs if stage == "particle_labels"}, key=lambda s: int(s[1:]))
    if not scans or scans[0] != "T0":
        raise StageError(f"tracking: needs particle_labels[T0] and later scans, got {scans}")
    with xr.open_dataset(Path(ctx.input("dic_composition")) / "cumulative.nc", engine="h5netcdf") as ds:
        cumulative = ds.load()
    voxel = float(cumulative.attrs["voxel_size_um"])  # the volumes' own voxel size, as the DIC stages read it
    grid = np.stack(np.meshgrid(cumulative["z_px"].values, cumulative["y_px"].values, cumulative["x_px"].values,
                                indexing="ij"), -1)
    dims, nodes = grid.shape[:3], grid.reshape(-1, 3)

    def displacement_at(scan, points):
        if scan not in cumulative["scan"].values.tolist():
            return np.full((len(points), 3), np.nan)
        u = np.moveaxis(cumulative.sel(scan=scan)["displacement"].values, 0, -1).reshape(-1, 3)
        phi = np.tile(np.eye(4), (len(nodes), 1, 1))
        phi[:, :3, 3] = u
        return interpolate_phi(nodes, dims, phi, points)[:, :3, 3]

    labels = {scan: read_particle_labels(Path(ctx.input("particle_labels", scan)) / "particle_labels.nc") for scan in scans}
    rows = track(labels, displacement_at)
    labels0 = labels["T0"]
    ids, centres = particles(labels0)
    cc_um = ctx.scenario.sample.current_collector_thickness_um
    for r in rows:
        r["height_um"] = r["z0_px"] * voxel - cc_um
        r["dz_um"] = r["dz_px"] * voxel
    out = Path(ctx.out_dir)
    _write_rows(out / "trajectories.csv", rows)
    sizes = ndi.sum_labels(np.ones_like(labels0), labels0, ids) if len(ids) else np.zeros(0)
    chosen = choose_voi_particles(centres, np.asarray(sizes))
    vois = voi_curves(cumulative, centres[chosen] * voxel, ctx.scenario.validation.voi_size_um)
    _write_rows(out / "vois.csv", vois)
    with atomic_path(out / "tracking.json") as tmp:
        Path(tmp).write_text(json.dumps({"voxel_size_um": voxel, "n_particles": int(len(ids)),
                                         "voi_particles": [int(ids[c]) for c in chosen],
                                         "voi_size_um": ctx.scenario.validation.voi_size_um}, indent=1))
