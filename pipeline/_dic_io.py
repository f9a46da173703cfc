"""Files of the DIC stages: volumes in, phi_field.nc / spam TSV / nodes.csv / strain TIFFs and CSV out.

The TSV is spam's own format (the columns ``spam-ldic`` writes), so spam's
command-line tools (``spam-regularStrain``, ``spam-passPhiField``,
``spam-deformImage`` ...) work on our fields and ours read theirs
(through ``spam.helpers.readCorrelationTSV``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from twin.errors import InputFileError
from twin.io import atomic_path, streamed_netcdf, write_netcdf

TSV_HEADER = ("NodeNumber\tZpos\tYpos\tXpos\tFzz\tFzy\tFzx\tZdisp\tFyz\tFyy\tFyx\tYdisp\tFxz\tFxy\tFxx\tXdisp"
              "\terror\titerations\treturnStatus\tdeltaPhiNorm")
AXES = ("z", "y", "x")


def write_tsv(path: str | Path, nodes: np.ndarray, phi: np.ndarray, return_status: np.ndarray,
              error: np.ndarray | None = None, iterations: np.ndarray | None = None,
              delta_phi_norm: np.ndarray | None = None) -> Path:
    """Write a Φ field (or a single registration, one node) in spam's TSV format."""
    n = len(nodes)
    zeros = np.zeros(n)
    cols = [np.arange(n), nodes[:, 0], nodes[:, 1], nodes[:, 2]]
    for i in range(3):
        cols += [phi[:, i, 0], phi[:, i, 1], phi[:, i, 2], phi[:, i, 3]]
    cols += [zeros if error is None else error, zeros if iterations is None else iterations, return_status,
             zeros if delta_phi_norm is None else delta_phi_norm]
    with atomic_path(path) as tmp:
        np.savetxt(tmp, np.array(cols, dtype=float).T, fmt="%.7f", delimiter="\t", comments="", header=TSV_HEADER)
    return Path(path)


def read_tsv(path: str | Path) -> dict:
    """Read a spam TSV through ``spam.helpers.readCorrelationTSV``: nodes, dims, phi, return_status."""
    import spam.helpers

    from pipeline._spam_compat import spam_call

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    with spam_call(1, "readCorrelationTSV"):
        data = spam.helpers.readCorrelationTSV(str(path), readConvergence=True)
    if data is None:
        raise InputFileError(path, "not a spam correlation TSV")
    return {"nodes": data["fieldCoords"], "dims": tuple(int(d) for d in data["fieldDims"]),
            "phi": data["PhiField"], "return_status": data["returnStatus"]}


def field_dataset(nodes: np.ndarray, dims, phi: np.ndarray, *, converged: np.ndarray, background: np.ndarray,
                  replaced: np.ndarray, voxel_size_um: float, strain=None, attrs: dict | None = None) -> xr.Dataset:
    """The node-grid dataset of ``phi_field.nc``.

    Node variables (dims z, y, x, coordinates in µm): ``displacement``
    (component, z, y, x) in voxels, ``F`` (row, col, z, y, x), ``converged``,
    ``background``, ``replaced``. Strain variables live at the Q8 cell centres
    (dims z_cell, y_cell, x_cell): ``volumetric_strain`` (det F − 1),
    ``deviatoric_strain``, ``axial_strain`` (e_zz).
    """
    dims = tuple(int(d) for d in dims)
    grid = nodes.reshape(*dims, 3)
    coords = {"z": grid[:, 0, 0, 0] * voxel_size_um, "y": grid[0, :, 0, 1] * voxel_size_um,
              "x": grid[0, 0, :, 2] * voxel_size_um}
    disp = np.moveaxis(phi[:, :3, 3].reshape(*dims, 3), -1, 0).astype(np.float32)
    F = np.moveaxis(phi[:, :3, :3].reshape(*dims, 3, 3), (-2, -1), (0, 1)).astype(np.float32)
    ds = xr.Dataset(
        {
            "displacement": (("component", *AXES), disp, {"units": "voxel", "long_name": "Lagrangian displacement from the reference"}),
            "F": (("row", "col", *AXES), F, {"long_name": "deformation gradient of the node's Φ"}),
            "converged": (AXES, converged.reshape(dims).astype(np.uint8), {"long_name": "spam returnStatus == 2 and window inside"}),
            "background": (AXES, background.reshape(dims).astype(np.uint8), {"long_name": "too little texture, not correlated"}),
            "replaced": (AXES, replaced.reshape(dims).astype(np.uint8), {"long_name": "replaced from converged neighbours"}),
        },
        coords={**coords, "component": list(AXES), "row": list(AXES), "col": list(AXES),
                "z_px": ("z", grid[:, 0, 0, 0]), "y_px": ("y", grid[0, :, 0, 1]), "x_px": ("x", grid[0, 0, :, 2])},
        attrs={"voxel_size_um": voxel_size_um, "convention": "spam Phi: im1(X) = im2(Phi X); displacement = Phi translation",
               **(attrs or {})},
    )
    if strain is not None:
        c = strain.cell_centres
        cell = ("z_cell", "y_cell", "x_cell")
        ds = ds.assign_coords(z_cell=c[:, 0, 0, 0] * voxel_size_um, y_cell=c[0, :, 0, 1] * voxel_size_um,
                              x_cell=c[0, 0, :, 2] * voxel_size_um)
        ds["volumetric_strain"] = (cell, strain.volumetric.astype(np.float32), {"long_name": "det F - 1 (Q8)"})
        ds["deviatoric_strain"] = (cell, strain.deviatoric.astype(np.float32))
        ds["axial_strain"] = (cell, strain.axial.astype(np.float32), {"long_name": "e_zz (Q8), along the electrode normal"})
    return ds


def write_nodes_csv(path: str | Path, nodes: np.ndarray, phi: np.ndarray, *, converged, background, replaced,
                    return_status, voxel_size_um: float) -> Path:
    """One row per node: position (voxels and µm), displacement (voxels), flags."""
    u = phi[:, :3, 3]
    table = np.column_stack([np.arange(len(nodes)), nodes, nodes * voxel_size_um, u, converged, background, replaced,
                             return_status])
    header = "node,z_px,y_px,x_px,z_um,y_um,x_um,u_z_px,u_y_px,u_x_px,converged,background,replaced,return_status"
    fmt = ["%d"] + ["%.3f"] * 6 + ["%.6f"] * 3 + ["%d"] * 4
    with atomic_path(path) as tmp:
        np.savetxt(tmp, table, fmt=fmt, delimiter=",", header=header, comments="")
    return Path(path)


def write_strain_files(out_dir: str | Path, prefix: str, strain, voxel_size_um: float) -> list[Path]:
    """Strain TIFFs (as ``spam-regularStrain`` names them) and a CSV table (seed Note 5, step 6)."""
    import tifffile

    out_dir = Path(out_dir)
    written = []
    for name, array in (("vol", strain.volumetric), ("dev", strain.deviatoric), ("ezz", strain.axial)):
        path = out_dir / f"{prefix}-{name}-Q8.tif"
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, array.astype("<f4"), photometric="minisblack")
        written.append(path)
    c = strain.cell_centres.reshape(-1, 3)
    e = strain.e.reshape(-1, 3, 3)
    table = np.column_stack([c * voxel_size_um, strain.volumetric.ravel(), strain.deviatoric.ravel(),
                             e[:, 0, 0], e[:, 1, 1], e[:, 2, 2], e[:, 0, 1], e[:, 0, 2], e[:, 1, 2]])
    path = out_dir / f"{prefix}-strain-Q8.csv"
    with atomic_path(path) as tmp:
        np.savetxt(tmp, table, fmt="%.7g", delimiter=",", comments="",
                   header="z_um,y_um,x_um,volumetric,deviatoric,e_zz,e_yy,e_xx,e_zy,e_zx,e_yx")
    written.append(path)
    return written


def write_dataset(ds: xr.Dataset, path: str | Path) -> Path:
    return write_netcdf(ds, path)


@contextlib.contextmanager
def residuals_file(path: str | Path, scans: list[str], shape: tuple[int, int, int], *, first: str,
                   noise_threshold: float, voxel_size_um: float) -> Iterator:
    """``residuals.nc`` to fill residual by residual (``twin.io.streamed_netcdf``); yields its variables by name.

    ``residual`` (scan, z, y, x; float16: Ti − ``first`` deformed by Φ₀ᵢ), ``residual_double_scan``
    (float16) and ``texture_mask`` (uint8); the file is what ``write_netcdf`` makes of the same dataset.
    """
    zyx = ("z", "y", "x")
    variables = {"residual": (("scan", *zyx), np.float16, {"long_name": f"Ti - {first} deformed by Phi_0i"}),
                 "residual_double_scan": (zyx, np.float16, {}), "texture_mask": (zyx, np.uint8, {})}
    with streamed_netcdf(path, {"scan": len(scans), "z": shape[0], "y": shape[1], "x": shape[2]}, variables,
                         coords={"scan": (np.array(scans), {})}) as f:
        f.attrs.update(noise_threshold=noise_threshold, voxel_size_um=voxel_size_um)
        yield f.variables
