"""Truth resolution: the FWHM of a Gaussian ⊗ pixel box against independent numerics and the instrument's own blur."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.scenario import load_scenario
from validation.resolution_scores import FWHM_PER_SIGMA, gaussian_blur_fwhm_um, system_fwhm_nm


@settings(max_examples=30, deadline=None)
@given(gauss_nm=st.floats(5.0, 500.0), pixel_nm=st.floats(5.0, 500.0))
def test_box_gaussian_fwhm_matches_a_sampled_convolution(gauss_nm, pixel_nm):
    """Independent reference: convolve a finely sampled Gaussian with a box numerically and read its FWHM."""
    step = min(gauss_nm, pixel_nm) / 200
    x = np.arange(-3 * (gauss_nm + pixel_nm), 3 * (gauss_nm + pixel_nm), step)
    sigma = gauss_nm / FWHM_PER_SIGMA
    g = np.exp(-0.5 * (x / sigma) ** 2)
    box = (np.abs(x) <= pixel_nm / 2).astype(float)
    conv = np.convolve(g, box, mode="same")
    above = x[conv >= conv.max() / 2]
    reference = above.max() - above.min()
    assert system_fwhm_nm(gauss_nm, pixel_nm) == pytest.approx(reference, abs=3 * step)
    # bounds: never narrower than either part, never wider than their sum
    assert max(gauss_nm, pixel_nm) - 1e-6 <= system_fwhm_nm(gauss_nm, pixel_nm) <= gauss_nm + pixel_nm


def test_limits_and_instrument_blur():
    assert system_fwhm_nm(0.0, 400.0) == 400.0
    assert system_fwhm_nm(100.0, 0.0) == 100.0
    sc = load_scenario("tiny")
    b = sc.beamline
    # sample near the focus: z2/(z1+z2) ≈ 1 - D/L, so the source is hardly demagnified
    d = b.propagation_distances_m[0]
    expected = math.hypot(b.source_size_fwhm_um * (1 - d / b.focus_to_detector_m), b.detector_psf_fwhm_um)
    assert gaussian_blur_fwhm_um(sc, d) == pytest.approx(expected, rel=1e-3)
    from twin.instrument import Instrument

    inst = Instrument(sc, volume_shape=(4, 16, 16))
    sigma_px = gaussian_blur_fwhm_um(sc, d) / FWHM_PER_SIGMA / sc.sample.voxel_size_um
    assert inst.blur_sigma_px[0] == pytest.approx(sigma_px, rel=1e-9)


def test_a_segmentation_without_si_leaves_the_resolution_unmeasured_not_the_scores_failed(tmp_path):
    """No Si segmented (a degenerate U-Net): NaN recon resolution, a warning, the truth's values and the figure."""
    import scipy.ndimage
    import xarray as xr

    from phantoms.phases import Phase
    from twin.warnings import TwinWarning
    from validation.figures import resolution_figure
    from validation.resolution_scores import resolution_metrics

    sc = load_scenario("tiny")
    z, y, x = np.mgrid[:12, :64, :64]
    si = (y - 32) ** 2 + (x - 30) ** 2 < 20**2
    phase = np.where(si, Phase.SI_CRYSTALLINE, Phase.ELECTROLYTE).astype(np.uint8)
    delta = (5e-7 * si).astype(np.float32)
    dims = ("z", "y", "x")
    xr.Dataset({"delta": (dims, delta), "phase": (dims, phase)}).to_netcdf(tmp_path / "phantom.nc", engine="h5netcdf")
    blurred = scipy.ndimage.gaussian_filter(delta, 2.0)
    xr.Dataset({"delta": (dims, blurred)}).to_netcdf(tmp_path / "volume.nc", engine="h5netcdf")
    xr.Dataset({"labels": (dims, np.zeros(si.shape, np.uint8))}).to_netcdf(tmp_path / "labels.nc", engine="h5netcdf")
    with pytest.warns(TwinWarning, match="0 usable edge profiles"):
        metrics, example = resolution_metrics(sc, tmp_path / "phantom.nc", tmp_path / "volume.nc", tmp_path / "labels.nc",
                                              slice_step=1)
    assert np.isnan(metrics["recon.resolution_fwhm_nm"]) and metrics["recon.resolution_n_edges"] == 0
    assert np.isfinite(metrics["truth.resolution_fwhm_nm"]) and np.isfinite(metrics["truth.resolution_edge_fwhm_nm"])
    assert resolution_figure(example, metrics, sc.sample.voxel_size_um, tmp_path / "resolution.png").stat().st_size > 0
