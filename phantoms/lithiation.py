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
s(k) = ½ erfc((k − t)/w) (0 or 1 beyond 6 w of t; evaluated by cubic Hermite
interpolation of a table, within 1e-12 of scipy's erfc, at a tenth of its
cost); its level t is found by Newton iterations (inside a bisection bracket) so that the mean
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
from numba import get_num_threads, njit, prange

from scipy.special import erfc

from phantoms.optics import X_FULL
from phantoms.phases import Phase

LITHIATED_X_MIN = 0.05  # x above which a front voxel is labelled LixSi rather than delithiated a-Si
SATURATED = 6.0  # |key − t| / w beyond which the front profile is 0 or 1 to 1e-17 (erfc(6) = 2e-17)
PROFILE_NODES = 4096  # intervals of the table of ½ erfc on [−SATURATED, SATURATED]: Hermite error ~ h⁴/384 < 1e-12
_Z = np.linspace(-SATURATED, SATURATED, PROFILE_NODES + 1)
PROFILE = np.column_stack([0.5 * erfc(_Z), -np.exp(-_Z**2) / np.sqrt(np.pi)])  # ½ erfc(z) and its derivative
_CRYSTALLINE, _LITHIATED, _AMORPHOUS = int(Phase.SI_CRYSTALLINE), int(Phase.SI_LITHIATED), int(Phase.SI_AMORPHOUS)


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
    return _front_level(np.ascontiguousarray(key, dtype=np.float64), float(fraction), float(width), PROFILE)


@njit(cache=True, error_model="numpy", inline="always")
def _profile(z, table):
    """½ erfc(z) and its derivative: cubic Hermite interpolation of ``table`` (PROFILE, an argument: numba
    caches no function that reads a large global array), the derivative linear; 1 and 0 beyond ∓SATURATED."""
    if z <= -SATURATED:
        return 1.0, 0.0
    if z >= SATURATED:
        return 0.0, 0.0
    u = (z + SATURATED) * (PROFILE_NODES / (2 * SATURATED))
    i = min(int(u), PROFILE_NODES - 1)
    s = u - i
    h = 2 * SATURATED / PROFILE_NODES
    f0, d0, f1, d1 = table[i, 0], table[i, 1], table[i + 1, 0], table[i + 1, 1]
    r = 1.0 - s
    value = (1 + 2 * s) * r * r * f0 + s * r * r * h * d0 + s * s * (3 - 2 * s) * f1 - s * s * r * h * d1
    return value, r * d0 + s * d1


@njit(cache=True, error_model="numpy")
def _front_level(key, fraction, width, table):
    if key.size == 0 or fraction <= 0:
        return -np.inf
    if fraction >= 1:
        return np.inf
    if width <= 0:
        n = int(round(fraction * key.size))
        return -np.inf if n == 0 else float(np.sort(key)[n - 1])
    # Newton on the increasing, smooth m(t) = mean(s) − fraction, kept inside a bisection bracket. Keys more
    # than SATURATED front widths behind the front count exactly 1 (an integer count), and the rest are summed
    # in blocks of 256: m is resolved to well below 1e-12 on particles of millions of voxels.
    lo, hi = key.min() - 8 * width, key.max() + 8 * width
    t = np.quantile(key, fraction)
    n = key.size
    for _ in range(100):
        behind = 0
        partial = 0.0
        slope = 0.0
        for b0 in range(0, n, 256):
            block = 0.0
            for k in key[b0:b0 + 256]:
                z = (k - t) / width
                if z <= -SATURATED:
                    behind += 1
                else:
                    value, derivative = _profile(z, table)
                    block += value
                    slope -= derivative
            partial += block
        m = (behind + partial) / n - fraction
        if abs(m) < 1e-12:
            break
        if m < 0:
            lo = t
        else:
            hi = t
        slope /= n * width
        t = t - m / slope if slope > 0 else np.nan
        if not lo < t < hi:
            t = 0.5 * (lo + hi)
        if hi - lo < 1e-12:
            break
    return t


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
    _check_fractions(fraction, max_fraction)
    x = np.empty(np.shape(key))
    phase = np.empty(np.shape(key), np.uint8)
    _lithiate_particle(np.ascontiguousarray(key, dtype=np.float64), float(fraction), float(max_fraction), float(width),
                       PROFILE, x, phase)
    return x, phase


def _check_fractions(fraction: float, max_fraction: float) -> None:
    if max_fraction < fraction - 1e-12:
        raise ValueError(f"max_fraction ({max_fraction}) must be >= fraction ({fraction})")
    if not (0.0 <= fraction and max_fraction <= 1.0):
        raise ValueError(f"fraction: must be in [0, 1], got f = {fraction}, f_max = {max_fraction}")


@njit(cache=True, error_model="numpy")
def _lithiate_particle(key, fraction, max_fraction, width, table, x, phase):
    """:func:`lithiate_particle` into ``x`` and ``phase`` (1-D, as ``key``)."""
    phase[:] = _CRYSTALLINE
    x[:] = 0.0  # first the front profile s ∈ [0, 1], then x = 3.75 (f / f_max) s
    if max_fraction <= 0:
        return
    if width <= 0 and max_fraction < 1:
        # the n = round(f N) lowest keys, ties broken by the lower index (a stable sort)
        for i in np.argsort(key, kind="mergesort")[:int(round(max_fraction * key.size))]:
            x[i] = 1.0
    else:
        level = _front_level(key, max_fraction, width, table)  # +inf when f_max = 1
        for i in range(key.size):
            x[i] = 1.0 if level == np.inf else _profile((key[i] - level) / width, table)[0]
    ratio = X_FULL * (fraction / max_fraction)
    for i in range(key.size):
        swept = x[i] >= 0.5
        x[i] = ratio * x[i]
        if swept:
            phase[i] = _LITHIATED if x[i] > LITHIATED_X_MIN else _AMORPHOUS


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
    n_ids = int(particle.max(initial=0)) + 1
    f = np.zeros(n_ids)
    f_max = np.zeros(n_ids)
    for pid in range(1, n_ids):
        f[pid] = fractions.get(pid, 0.0)
        f_max[pid] = max(max_fractions.get(pid, 0.0), f[pid])
        _check_fractions(f[pid], f_max[pid])
    x = np.zeros(particle.shape, np.float32)
    si_phase = np.full(particle.shape, 255, np.uint8)
    _lithiate_all(np.ascontiguousarray(particle).reshape(-1), np.ascontiguousarray(key).reshape(-1), f, f_max,
                  float(width_vox), PROFILE, x.reshape(-1), si_phase.reshape(-1), get_num_threads())
    return x, si_phase


@njit(cache=True, parallel=True, error_model="numpy")
def _lithiate_all(particle, key, fractions, max_fractions, width, table, x, si_phase, threads):
    """:func:`_lithiate_particle` of every label of the flat ``particle``, particles in parallel; each particle's
    voxels in increasing flat index (the order of ``key[sl][particle[sl] == pid]``)."""
    n_ids = fractions.size
    starts = np.zeros(n_ids + 1, np.int64)
    for i in range(particle.size):
        starts[particle[i] + 1] += 1
    starts[1] = 0  # label 0 (no particle) holds no members
    for pid in range(n_ids):
        starts[pid + 1] += starts[pid]
    members = np.empty(starts[n_ids], np.int64)  # the particles' voxel indices grouped by label (a counting sort)
    fill = starts[:n_ids].copy()
    for i in range(particle.size):
        if particle[i] > 0:
            members[fill[particle[i]]] = i
            fill[particle[i]] += 1
    # particles largest first, dealt to the ``threads`` (numba.get_num_threads(): called inside, it would keep
    # numba from caching the function) in turn: the threads get about equal work
    largest_first = np.argsort(starts[:n_ids] - starts[1:])
    for thread in prange(threads):
        for pid in largest_first[thread::threads]:
            _lithiate_members(members[starts[pid]:starts[pid + 1]], key, fractions[pid], max_fractions[pid], width,
                              table, x, si_phase)


@njit(cache=True, error_model="numpy")
def _lithiate_members(own, key, fraction, max_fraction, width, table, x, si_phase):
    """:func:`_lithiate_particle` of the voxels ``own`` (flat indices) of the flat volumes."""
    if own.size == 0:
        return
    k = np.empty(own.size)
    for j in range(own.size):
        k[j] = key[own[j]]
    xp = np.empty(own.size)
    php = np.empty(own.size, np.uint8)
    _lithiate_particle(k, fraction, max_fraction, width, table, xp, php)
    for j in range(own.size):
        x[own[j]] = xp[j]
        si_phase[own[j]] = php[j]
