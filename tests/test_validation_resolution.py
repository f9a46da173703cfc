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
