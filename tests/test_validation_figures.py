"""Validation figures render from small inputs with a known truth; the charged scan comes from the schedule alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import xarray as xr
from matplotlib.image import imread

from validation.figures import resolution_figure, trajectories_figure
from validation.metrics import most_charged_scan


def _not_blank(path):
    img = imread(path)
    return img.shape[0] > 100 and img.shape[1] > 100 and float(np.std(img[..., :3])) > 0.02


def test_trajectory_figure_uses_the_true_displacement(tmp_path):
    n = 12
    disp = np.zeros((3, n, n, n), np.float32)
    disp[0] = 0.5  # uniform axial displacement, voxels
    xr.Dataset({"displacement": (("component", "z", "y", "x"), disp)}).to_netcdf(tmp_path / "T1.nc", engine="h5netcdf")
    rows = pd.DataFrame({"scan": ["T0", "T1", "T0", "T1"], "z0_px": [3.0, 3.0, 8.0, 8.0], "y0_px": 5.0, "x0_px": 5.0,
                         "dz_um": [0.0, 0.21, 0.0, 0.19], "height_um": [1.0, 1.0, 3.0, 3.0]})
    out = trajectories_figure(rows, {"T1": tmp_path / "T1.nc"}, 0.4, tmp_path / "trajectories.png")
    assert _not_blank(out)


def test_resolution_figure_renders_a_profile(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    mask = (yy - 32) ** 2 + (xx - 32) ** 2 < 18**2
    image = ndi.gaussian_filter(mask.astype(float), 1.5)[None].repeat(3, 0)
    metrics = {"recon.resolution_n_edges": 30, "recon.resolution_fwhm_nm": 1410.0, "recon.resolution_fwhm_std_nm": 50.0,
               "truth.resolution_fwhm_nm": 400.0, "truth.resolution_edge_fwhm_nm": 800.0}
    out = resolution_figure({"image": image, "mask": mask[None].repeat(3, 0), "slices": np.arange(3)}, metrics, 0.4,
                            tmp_path / "resolution.png")
    assert _not_blank(out)


def test_most_charged_scan_is_the_one_with_most_charge(tmp_path):
    pd.DataFrame({"name": ["T0", "T1", "T2", "T3"], "cell_id": 0, "charge_mah": [0.0, 0.01, 0.02, 0.015]}).to_csv(
        tmp_path / "schedule.csv", index=False)
    assert most_charged_scan(tmp_path / "schedule.csv") == "T2"
