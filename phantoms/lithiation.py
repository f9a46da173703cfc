"""Lithiation inside each particle: core–shell or pathway, conserving the particle's lithiated fraction.

Both mechanisms order a particle's voxels by a *key* and lithiate the lowest
keys first (seed Fig S14):

* core–shell: key = distance to the particle's own surface (cracks included:
  electrolyte enters them), so the front advances inwards from every surface of
  the real shape, not a sphere formula;
* pathway: key = distance to the nearest band plane along the {111} planes of
  the particle's random crystal orientation (with sub-voxel edge roughness),
  so bands span the particle and widen with lithiation (Figs S15, S17).

The front is a smoothed step of width w (``sample.front_width_um``):
s(k) = ½ erfc((k − t)/w); its level t is found by Newton iterations (inside a bisection bracket) so that the mean
of s over the particle equals the history's maximum fraction f_max exactly (to
1e-12); with w = 0 the n = round(f_max N) lowest keys are taken (exact to one
voxel). Local Li content is x = 3.75 (f / f_max) s: on charge (f = f_max) the
front region is Li15Si4; on delithiation the amorphous single-phase region
loses Li uniformly, and at f = 0 it remains as delithiated a-Si (its own phase),
so a discharged particle differs from a pristine one. The mean of x/3.75 over
the particle is therefore f for every scan, both mechanisms.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import erfc

from phantoms.optics import X_FULL
from phantoms.phases import Phase

LITHIATED_X_MIN = 0.05  # x above which a front voxel is labelled LixSi rather than delithiated a-Si


def front_level(key: np.ndarray, fraction: float, width: float) -> float:
    """The front level t such that mean(½ erfc((key − t)/w)) = fraction (w > 0), or the rank threshold (w = 0).

    Parameters
    ----------
    key
        1-D keys of one particle's voxels (voxels).
    fraction
        Target lithiated fraction in [0, 1].
    width
        Front width w, voxels.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: must be in [0, 1], got {fraction}")
    if key.size == 0 or fraction <= 0:
        return -np.inf
    if fraction >= 1:
        return np.inf
    if width <= 0:
        n = int(round(fraction * key.size))
        srt = np.sort(key)
        return -np.inf if n == 0 else float(srt[n - 1])
    # Newton on the increasing, smooth m(t) = mean(s) − fraction, kept inside a bisection bracket
    lo, hi = float(key.min()) - 8 * width, float(key.max()) + 8 * width
    t = float(np.quantile(key, fraction))
    for _ in range(100):
        z = (key - t) / width
        m = 0.5 * erfc(z).mean() - fraction
        if abs(m) < 1e-12:
            break
        if m < 0:
            lo = t
        else:
            hi = t
        slope = np.exp(-z * z).mean() / (width * np.sqrt(np.pi))
        t = t - m / slope if slope > 0 else np.nan
        if not lo < t < hi:
            t = 0.5 * (lo + hi)
        if hi - lo < 1e-12:
            break
    return t


def front_profile(key: np.ndarray, level: float, width: float) -> np.ndarray:
    """s(key) ∈ [0, 1]: 1 behind the front (key < level), 0 ahead; smoothed over ``width`` voxels."""
    if not np.isfinite(level):
        return np.full(key.shape, 1.0 if level > 0 else 0.0)
    if width <= 0:
        return (key <= level).astype(float)
    return 0.5 * erfc((key - level) / width)


def lithiate_particle(key: np.ndarray, fraction: float, max_fraction: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Li content x and phase of one particle's voxels.

    Parameters
    ----------
    key
        Mechanism key of each voxel (see module docstring), voxels.
    fraction
        Lithiated fraction now, f ∈ [0, 1].
    max_fraction
        Largest fraction reached so far (f_max ≥ f): sets the region the front has swept.
    width
        Front width, voxels.

    Returns
    -------
    x : float array
        Li per Si, mean(x)/3.75 = f.
    phase : uint8 array
        SI_CRYSTALLINE ahead of the front, SI_LITHIATED (x > 0.05) or SI_AMORPHOUS behind it.
    """
    if max_fraction < fraction - 1e-12:
        raise ValueError(f"max_fraction ({max_fraction}) must be >= fraction ({fraction})")
    phase = np.full(key.shape, Phase.SI_CRYSTALLINE, np.uint8)
    if max_fraction <= 0:
        return np.zeros(key.shape), phase
    level = front_level(key, max_fraction, width)
    s = front_profile(key, level, width)
    if width <= 0 and 0 < max_fraction < 1:
        # ties at the threshold: keep exactly round(f N) voxels (lowest index first)
        n = int(round(max_fraction * key.size))
        s = np.zeros(key.shape)
        s[np.argsort(key, kind="stable")[:n]] = 1.0
    x = X_FULL * (fraction / max_fraction) * s
    swept = s >= 0.5
    phase[swept] = np.where(x[swept] > LITHIATED_X_MIN, Phase.SI_LITHIATED, Phase.SI_AMORPHOUS)
    return x, phase


def lithiate(particle: np.ndarray, key: np.ndarray, fractions: dict[int, float], max_fractions: dict[int, float],
             width_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """Apply :func:`lithiate_particle` to every labelled particle of a volume.

    Parameters
    ----------
    particle
        int32 labels (0 = no particle).
    key
        float mechanism key per voxel (``Microstructure.surface_distance`` or ``band_distance``).
    fractions, max_fractions
        Per particle id: f now and f_max so far (ids missing: 0).
    width_vox
        Front width, voxels.

    Returns
    -------
    x : float32 volume of Li per Si (0 outside Si)
    si_phase : uint8 volume (SI_* inside particles, 255 elsewhere)
    """
    x = np.zeros(particle.shape, np.float32)
    si_phase = np.full(particle.shape, 255, np.uint8)
    for i, sl in enumerate(ndimage.find_objects(particle)):
        if sl is None:
            continue
        pid = i + 1
        own = particle[sl] == pid
        xp, php = lithiate_particle(key[sl][own].astype(float), fractions.get(pid, 0.0),
                                    max(max_fractions.get(pid, 0.0), fractions.get(pid, 0.0)), width_vox)
        x[sl][own] = xp
        si_phase[sl][own] = php
    return x, si_phase
