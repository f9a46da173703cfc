"""Spatial resolution of the reconstruction against the simulation's known system blur (seed Fig S8).

Metrics (flat dotted names for ``metrics.json``):

* ``recon.resolution_fwhm_nm``: the Fig S8 procedure
  (:func:`pipeline.resolution.edge_resolution`: profiles along the normals of
  many edges of many particles, smoothing spline, derivative, FWHM, averaged)
  on the T0 reconstruction's ``delta`` (the quantitative volume: histogram
  equalization of ``volume`` is a non-linear grey-value map that would distort
  edge profiles), with the T0 segmentation as particle mask; also
  ``recon.resolution_fwhm_std_nm`` and ``recon.resolution_n_edges``.
* ``truth.resolution_fwhm_nm``: the FWHM of the blur the instrument model
  imposes in the sample plane: the Gaussian of FWHM
  ``hypot(s z₂/(z₁+z₂), PSF)`` (source size s demagnified to the sample plane,
  detector PSF referred to the sample plane; ``twin.instrument``), convolved
  with the pixel aperture (a box of one voxel: the phantom is voxelised and
  each detector pixel integrates its area), mean over the distances the
  reconstruction used. The FWHM of a Gaussian of FWHM w convolved with a box
  of width p has no closed form; it is found numerically (:func:`system_fwhm_nm`).
* ``truth.resolution_edge_fwhm_nm``: the same edge procedure on the true δ
  blurred by the known Gaussian: what the procedure itself reports for a
  perfect reconstruction (sampling and voxelised edges included), so the
  reconstruction's own widening is the difference.

Phase retrieval (Paganin's low-pass) and FBP interpolation widen edges beyond
the system blur; the gap between ``recon.`` and ``truth.`` is the
reconstruction's contribution.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage
import xarray as xr

from pipeline.resolution import EdgeResolution, TooFewEdgesError, edge_resolution
from pipeline.segmentation import si_from_labels
from twin.warnings import TwinWarning

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def gaussian_blur_fwhm_um(scenario, distance_m: float) -> float:
    """FWHM (µm) of the Gaussian intensity blur ``twin.instrument`` applies at one effective distance.

    The source (KB focus, FWHM s) is imaged into the sample plane demagnified
    by z₂/(z₁+z₂); the detector PSF is given in the sample plane; independent
    Gaussian blurs add in quadrature: w = √((s z₂/(z₁+z₂))² + PSF²).
    """
    from twin.instrument import cone_geometry

    b = scenario.beamline
    z1, z2, _ = cone_geometry(distance_m, b.focus_to_detector_m)
    return math.hypot(b.source_size_fwhm_um * z2 / (z1 + z2), b.detector_psf_fwhm_um)


def system_fwhm_nm(gaussian_fwhm_nm: float, pixel_nm: float) -> float:
    """FWHM (nm) of a Gaussian of FWHM ``gaussian_fwhm_nm`` convolved with a box of width ``pixel_nm``.

    The convolution is ½[erf((x + p/2)/(√2 σ)) − erf((x − p/2)/(√2 σ))]; its
    half-maximum point is found by bisection on x ≥ 0 (it is monotone there).
    Limits: p → 0 gives the Gaussian FWHM, σ → 0 gives p.
    """
    from scipy.special import erf

    if gaussian_fwhm_nm <= 0:
        return float(pixel_nm)
    sigma = gaussian_fwhm_nm / FWHM_PER_SIGMA
    if pixel_nm <= 0:
        return float(gaussian_fwhm_nm)

    def lsf(x):
        return 0.5 * (erf((x + pixel_nm / 2) / (math.sqrt(2) * sigma)) - erf((x - pixel_nm / 2) / (math.sqrt(2) * sigma)))

    half = lsf(0.0) / 2
    lo, hi = 0.0, pixel_nm + 10 * sigma
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if lsf(mid) > half else (lo, mid)
    return float(2 * 0.5 * (lo + hi))


def _distances_used_m(scenario, volume_attrs: dict) -> list[float]:
    used = volume_attrs.get("distances_m")
    if used is None:
        return [float(d) for d in scenario.beamline.propagation_distances_m]
    return [float(d) for d in np.atleast_1d(used)]


def _electrode_slices(mask: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th z slice that holds segmented particles (Cu and separator slices carry no particle edges)."""
    has = np.flatnonzero(mask.any(axis=(1, 2)))
    return has[::step]


def resolution_metrics(scenario, truth_nc: Path, volume_nc: Path, labels_nc: Path, *,
                       slice_step: int = 6) -> tuple[dict[str, float], dict]:
    """Measured and true resolution of one scan (use T0, as the seed does).

    Parameters
    ----------
    scenario : twin.scenario.Scenario
        Reads ``beamline.*`` (blur) and ``sample.voxel_size_um``.
    truth_nc, volume_nc, labels_nc : Path
        ``phantom.nc`` (true ``delta``, ``phase``), ``volume.nc`` (``delta``), ``labels.nc`` (``labels``, 1 = Si).
    slice_step : int
        Every ``slice_step``-th electrode slice is measured (run time; hundreds of edges remain on ``tiny``).

    Returns
    -------
    metrics : dict
        ``recon.resolution_fwhm_nm``, ``recon.resolution_fwhm_std_nm``, ``recon.resolution_n_edges``,
        ``truth.resolution_fwhm_nm``, ``truth.resolution_edge_fwhm_nm``.
    example : dict
        One profile of the reconstruction for the figure (``image``, ``mask``, slice index).

    A segmentation with too few Si outlines to measure (fewer than 10 usable edge profiles) gives NaN
    ``recon.resolution_fwhm_nm`` and ``_std_nm`` and a :class:`twin.warnings.TwinWarning`, not an error.
    """
    from phantoms.phases import si_mask

    voxel_nm = scenario.sample.voxel_size_um * 1e3
    # Volumes stay float32 (the slices measured are made float64): at `paper` size a float64 copy is 27 GB each.
    with xr.open_dataset(volume_nc, engine="h5netcdf") as ds:
        rec = ds["delta"].values.astype(np.float32, copy=False)
        attrs = dict(ds.attrs)
    with xr.open_dataset(labels_nc, engine="h5netcdf") as ds:
        labels = si_from_labels(ds["labels"].values)
    with xr.open_dataset(truth_nc, engine="h5netcdf") as ds:
        true_delta = ds["delta"].values.astype(np.float32, copy=False)
        true_si = si_mask(ds["phase"].values)

    gauss_nm = 1e3 * float(np.mean([gaussian_blur_fwhm_um(scenario, d) for d in _distances_used_m(scenario, attrs)]))
    metrics = {"truth.resolution_fwhm_nm": system_fwhm_nm(gauss_nm, voxel_nm),
               "truth.resolution_gaussian_fwhm_nm": gauss_nm}

    z = _electrode_slices(labels, slice_step)
    try:
        measured = edge_resolution(rec[z].astype(np.float64), pixel_size_nm=voxel_nm, mask=labels[z])
    except TooFewEdgesError as few:
        # a segmentation with (almost) no Si leaves no edges to measure: the other scores still stand
        warnings.warn(f"recon.resolution_fwhm_nm: not measured, the segmentation's Si outlines give {few.n_edges} "
                      f"usable edge profiles ({few})", TwinWarning, stacklevel=2)
        measured = EdgeResolution(float("nan"), float("nan"), few.n_edges)
    metrics.update({"recon.resolution_fwhm_nm": measured.fwhm_nm, "recon.resolution_fwhm_std_nm": measured.fwhm_std_nm,
                    "recon.resolution_n_edges": float(measured.n_edges)})

    zt = _electrode_slices(true_si, slice_step)
    sigma_px = gauss_nm / FWHM_PER_SIGMA / voxel_nm
    # the instrument blurs each projection, i.e. across the rotation axis and along z: a 3-D Gaussian in the volume
    # scipy filters in float64 internally: only the stored result is rounded to float32
    blurred = scipy.ndimage.gaussian_filter(true_delta, sigma_px) if sigma_px > 0 else true_delta
    del true_delta
    reference = edge_resolution(blurred[zt].astype(np.float64), pixel_size_nm=voxel_nm, mask=true_si[zt])
    metrics["truth.resolution_edge_fwhm_nm"] = reference.fwhm_nm
    return metrics, {"image": rec, "mask": labels, "slices": z}
