"""Figures of the validation stage, each the twin's analogue of a figure of the seed, with the truth beside it.

* ``resolution.png`` (Fig S8): one edge profile of the T0 reconstruction, its
  smoothing spline, the derivative and its FWHM, with the mean over all edges
  and the truth;
* ``strain.png``: central x–z slice of the cumulative volumetric and axial
  strain at the most charged scan, DIC against the truth (spam's Q8 strain of
  the true displacement at the same nodes);
* ``voi_strain.png`` (Fig S12): mean strain in the particle-centred VOIs
  against scan, DIC (``vois.csv``) and truth (the true Q8 strain averaged
  over the same cells);
* ``trajectories.png`` (Fig S9): axial displacement against height above the
  current collector, tracked particles (``trajectories.csv``) against the true
  displacement at their T0 centres.

``report.html`` embeds them by these names.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.interpolate
import scipy.ndimage as ndi
import xarray as xr

from twin.io import atomic_path


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def resolution_figure(example: dict, metrics: dict[str, float], voxel_size_um: float, path: Path) -> Path:
    """Fig S8 analogue: a profile across one particle edge of the middle measured slice, spline, derivative, FWHM."""
    from skimage.measure import find_contours
    from skimage.restoration import estimate_sigma

    plt = _plt()
    slices = example["slices"]
    z = int(slices[len(slices) // 2]) if len(slices) else len(example["image"]) // 2  # no Si segmented: the middle
    img, mask = example["image"][z], example["mask"][z]
    contour = max(find_contours(mask.astype(float), 0.5), key=len, default=np.zeros((0, 2)))
    smooth = ndi.gaussian_filter(mask.astype(float), 2.0)
    gy, gx = np.gradient(smooth)
    half = 10.0
    t = np.arange(-half, half + 0.5)
    noise = float(estimate_sigma(img))
    target_px = metrics["recon.resolution_fwhm_nm"] / (voxel_size_um * 1e3)
    measured = bool(np.isfinite(target_px))
    best = None  # the profile whose own FWHM is nearest the mean over all edges: a representative one
    for r, c in contour[:: max(1, len(contour) // 60)] if measured else ():
        ri, ci = int(round(r)), int(round(c))
        norm = np.hypot(gy[ri, ci], gx[ri, ci])
        if not (half <= r < img.shape[0] - half and half <= c < img.shape[1] - half) or norm < 1e-3:
            continue
        n = np.array([gy[ri, ci], gx[ri, ci]]) / norm
        rows, cols = r + t * n[0], c + t * n[1]
        profile = ndi.map_coordinates(img, [rows, cols], order=3, mode="nearest")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            spline = scipy.interpolate.UnivariateSpline(t, profile, k=3, s=t.size * noise**2)
        fine = np.linspace(t[0], t[-1], 400)
        lsf = np.abs(spline.derivative()(fine))
        i = int(np.argmax(lsf))
        # the half-maximum crossings either side of the peak (as pipeline.resolution measures them)
        below_left, below_right = np.flatnonzero(lsf[:i] < lsf[i] / 2), np.flatnonzero(lsf[i:] < lsf[i] / 2)
        if below_left.size == 0 or below_right.size == 0:
            continue
        lo, hi = fine[below_left[-1]], fine[i + below_right[0]]
        if best is None or abs(hi - lo - target_px) < abs(best[0] - target_px):
            best = (hi - lo, rows, cols, profile, spline, fine, lsf, lo, hi)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].imshow(img, cmap="gray")
    axes[0].contour(mask, [0.5], colors="y", linewidths=0.5)
    if best is not None:
        width, rows, cols, profile, spline, fine, lsf, lo, hi = best
        nm = voxel_size_um * 1e3
        axes[0].plot(cols, rows, "r-")
        ax = axes[1]
        ax.plot(t * nm, profile, "o", color="tab:orange", label="profile")
        ax.plot(fine * nm, spline(fine), color="tab:green", label="spline")
        ax2 = ax.twinx()
        ax2.plot(fine * nm, lsf, "k-", label="|derivative|")
        ax2.hlines(lsf.max() / 2, lo * nm, hi * nm, colors="r", label=f"FWHM {width * nm:.0f} nm")
        ax.set_xlabel("distance along the edge normal, nm")
        ax.set_ylabel("δ (reconstruction)")
        ax2.set_ylabel("|d profile / dx|")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"T0, slice z = {z}")
    if not measured:
        axes[1].set_title(f"not measured: the segmentation's Si outlines give {metrics['recon.resolution_n_edges']:.0f}"
                          f" usable edge profiles; truth {metrics['truth.resolution_fwhm_nm']:.0f} nm", fontsize=9)
        return _save(fig, path)
    axes[1].set_title(f"mean over {metrics['recon.resolution_n_edges']:.0f} edges: {metrics['recon.resolution_fwhm_nm']:.0f}"
                      f" ± {metrics['recon.resolution_fwhm_std_nm']:.0f} nm; truth {metrics['truth.resolution_fwhm_nm']:.0f} nm"
                      f" (edge procedure on the true δ: {metrics['truth.resolution_edge_fwhm_nm']:.0f} nm)", fontsize=9)
    return _save(fig, path)


def true_strain(cumulative: xr.Dataset, phantom_nc: Path):
    """spam's Q8 strain of the true displacement sampled at the DIC nodes of ``cumulative`` (the truth at the DIC's resolution)."""
    from pipeline.strain import strain_field
    from validation.dic_scores import true_displacement_at

    grid = np.stack(np.meshgrid(cumulative["z_px"].values, cumulative["y_px"].values, cumulative["x_px"].values,
                                indexing="ij"), -1)
    return strain_field(grid.reshape(-1, 3), grid.shape[:3], true_displacement_at(phantom_nc, grid.reshape(-1, 3)))


def strain_figure(cumulative: xr.Dataset, scan: str, true, path: Path) -> Path:
    """Central x–z slice (middle y cell) of cumulative volumetric and axial strain at ``scan``: DIC, truth
    (``true``: :func:`true_strain` of that scan), difference."""
    plt = _plt()
    sub = cumulative.sel(scan=scan)
    j = sub["volumetric_strain"].shape[1] // 2
    zc, xc = cumulative["z_cell"].values, cumulative["x_cell"].values
    extent = [xc[0], xc[-1], zc[0], zc[-1]]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7))
    for row, (name, true_values) in enumerate((("volumetric_strain", true.volumetric), ("axial_strain", true.axial))):
        dic = sub[name].values[:, j, :]
        tru = np.asarray(true_values).reshape(sub[name].shape)[:, j, :]
        lim = np.nanmax(np.abs(np.concatenate([dic.ravel(), tru.ravel()])))
        for col, (title, data) in enumerate((("DIC", dic), ("truth", tru), ("DIC − truth", dic - tru))):
            im = axes[row, col].imshow(data, origin="lower", extent=extent, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            axes[row, col].set_title(f"{name.replace('_', ' ')}: {title}", fontsize=9)
            axes[row, col].set_xlabel("x, µm")
            axes[row, col].set_ylabel("z (height), µm")
            fig.colorbar(im, ax=axes[row, col])
    fig.suptitle(f"cumulative strain T0 → {scan}, slice y = {cumulative['y_cell'].values[j]:.1f} µm")
    return _save(fig, path)


def _finite_mean(values) -> float:
    """Mean of the finite values; NaN (a gap in the plot) for a VOI that holds no DIC cell, without numpy's warning."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def voi_strain_figure(vois: pd.DataFrame, cumulative: xr.Dataset, true: dict, edge_um: float, path: Path) -> Path:
    """Fig S12 analogue: mean volumetric and axial strain of each VOI against scan, DIC (lines) and truth (dashed).

    ``true`` maps scan names to :func:`true_strain`; scans missing from it are drawn at zero strain (T0).
    """
    plt = _plt()
    scans = list(dict.fromkeys(vois["scan"]))
    zc, yc, xc = (cumulative[c].values for c in ("z_cell", "y_cell", "x_cell"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, voi in vois.groupby("voi"):
        centre = voi[["z_um", "y_um", "x_um"]].values[0]
        sel = np.ix_(*[np.abs(a - c) <= edge_um / 2 for a, c in zip((zc, yc, xc), centre)])
        x = np.arange(len(voi))
        for ax, name in zip(axes, ("volumetric_strain", "axial_strain")):
            line, = ax.plot(x, voi[name].values, "o-", label=f"VOI {k} (z = {centre[0]:.1f} µm) DIC")
            tv = [0.0 if s not in true else _finite_mean(np.asarray(getattr(true[s], name.split("_")[0])).reshape(
                cumulative["volumetric_strain"].shape[1:])[sel]) for s in voi["scan"]]
            ax.plot(x, tv, "--", color=line.get_color(), label=f"VOI {k} truth")
    for ax, name in zip(axes, ("volumetric strain", "axial strain")):
        ax.set_xticks(range(len(scans)), scans)
        ax.set_ylabel(f"mean {name} in the VOI")
        ax.axhline(0, color="0.7", lw=0.5)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"particle-centred VOIs of {edge_um:g} µm (Fig S12 analogue)")
    return _save(fig, path)


def trajectories_figure(trajectories: pd.DataFrame, phantoms: dict[str, Path], voxel_size_um: float, path: Path) -> Path:
    """Fig S9 analogue: axial displacement vs height above the current collector, tracked (dots) and true (crosses)."""
    from validation.dic_scores import true_displacement_at

    plt = _plt()
    later = [s for s in dict.fromkeys(trajectories["scan"]) if s != "T0" and s in phantoms]
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.cm.viridis(np.linspace(0, 1, max(len(later), 1)))
    for colour, scan in zip(colours, later):
        rows = trajectories[trajectories["scan"] == scan]
        start = rows[["z0_px", "y0_px", "x0_px"]].values.astype(float)
        true_dz_um = true_displacement_at(phantoms[scan], start)[:, 0] * voxel_size_um
        ax.plot(rows["dz_um"], rows["height_um"], "o", color=colour, ms=4, label=f"{scan} tracked")
        ax.plot(true_dz_um, rows["height_um"], "x", color=colour, ms=5, label=f"{scan} truth")
    ax.set_xlabel("axial displacement from T0, µm")
    ax.set_ylabel("height above the current collector at T0, µm")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("particle trajectories (Fig S9 analogue)")
    return _save(fig, path)
