"""Digital volume correlation with spam, as in the seed's Supplementary Note 5 (Fig S7).

For each consecutive pair of scans (T(i-1), Ti):

1. **eye registration**: an automatic rigid first guess (phase correlation,
   :func:`skimage.registration.phase_cross_correlation`) replacing the seed's
   manual alignment;
2. **registration** ``spam.DIC.register`` (12-DOF Φ) about the centre of mass
   of the textured electrode (max 3000 iterations, ‖δΦ‖ < 1e-4); both steps run
   on the pair binned by a power of 2 to at most ``dic.registration_max_voxels``
   (2²⁴: unbinned up to 256³; by 8 at the seed's size, where whole-volume
   registration would hold ~14 float32 volumes), Φ then expressed on the full grid;
3. **hierarchical local DIC** ``spam.DIC.ldic`` at node spacings
   ``dic.node_spacing_px`` (seed: 100, 70, 35 px), each level seeded by the
   previous one: non-converged and incoherent nodes are replaced from their
   converged neighbours (``estimateLocalQuadraticCoherency`` and
   ``interpolatePhiField``, as ``spam-filterPhiField`` does), the filtered
   field is passed to the next level's nodes (``interpolatePhiField``, as
   ``spam-passPhiField`` does), and the final level is filtered too. A level
   where most textured nodes fail is repeated with the seed's retry policy
   (margins 10/20/30/40 px, iterations 1000/2000/3000), every attempt recorded.

Then, over the whole series, the increments are **composed multiplicatively**
(:func:`compose_fields`): Φ₀→ᵢ = Φᵢ₋₁→ᵢ ∘ … ∘ Φ₀→₁, each increment evaluated at
the material point's displaced position. Strains come from
:mod:`pipeline.strain`, residual maps from :func:`residual_map`.

Conventions: volumes are (z, y, x); Φ is spam's 4×4 matrix mapping the
reference to the deformed image, ``im1(X) = im2(Φ·X)``, so its translation at
a node is the Lagrangian displacement u(X) in voxels (the contract of
``phantom.nc``'s ``displacement``). A node *converged* only when spam returns
``returnStatus == 2`` and its displaced window stays inside the volume.

References
----------
Stamati, O. et al. (2020) spam: Software for Practical Analysis of Materials.
J. Open Source Softw. 5(51), 2286. doi:10.21105/joss.02286
Masullo, A. & Theunissen, R. (2016) Adaptive vector validation in image
velocimetry to minimise the influence of outlier clusters. Exp. Fluids 57, 33.
doi:10.1007/s00348-015-2110-0
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from scipy.interpolate import RegularGridInterpolator

from pipeline._spam_compat import resolve_processes, spam_call
from twin.errors import StageError

log = logging.getLogger("pipeline.dic")

CONVERGED = 2  # spam's returnStatus for "achieved the ‖δΦ‖ tolerance"
BACKGROUND = -5  # spam's returnStatus for a skipped (masked) window
RETRY_MIN_GAIN = 0.02  # a retry gaining less converged fraction than this ends the retries of a level


class DICError(StageError):
    """The correlation failed (e.g. no node converged); a diagnostic file is named in the message."""


# Settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DICSettings:
    """Parameters of the correlation, from the scenario's ``dic`` section (seed Note 5)."""

    node_spacing_px: tuple[int, ...] = (100, 70, 35)
    window_half_size_px: tuple[int, ...] | None = None
    registration_max_iterations: int = 3000
    registration_max_voxels: int = 2**24
    max_iterations: int = 3000
    delta_phi_tolerance: float = 1e-4
    margin_px: int = 3
    retry_margins_px: tuple[int, ...] = (10, 20, 30, 40)
    retry_max_iterations: tuple[int, ...] = (1000, 2000, 3000)
    filter_neighbours: int = 9
    coherency_threshold: float = 0.1
    min_converged_fraction: float = 0.5
    processes: int | None = None
    interpolation_order: int = 1

    @classmethod
    def from_scenario(cls, scenario) -> DICSettings:
        d = scenario.dic
        return cls(
            node_spacing_px=tuple(d.node_spacing_px),
            window_half_size_px=None if d.window_half_size_px is None else tuple(d.window_half_size_px),
            registration_max_iterations=d.registration_max_iterations,
            registration_max_voxels=d.registration_max_voxels,
            max_iterations=d.max_iterations,
            delta_phi_tolerance=d.delta_phi_tolerance,
            margin_px=d.margin_px,
            retry_margins_px=tuple(d.retry_margins_px),
            retry_max_iterations=tuple(d.retry_max_iterations),
            filter_neighbours=d.filter_neighbours,
            coherency_threshold=d.coherency_threshold,
            min_converged_fraction=d.min_converged_fraction,
            processes=d.processes,
            interpolation_order=d.interpolation_order,
        )

    def half_windows(self) -> list[int]:
        """Half window per level, px (default: half the node spacing, as spam's docs advise)."""
        if self.window_half_size_px is not None:
            return list(self.window_half_size_px)
        return [max(2, s // 2) for s in self.node_spacing_px]

    def attempts(self) -> list[tuple[int, int]]:
        """(search margin px, max iterations) of each try of a level.

        First ``(margin_px, retry_max_iterations[0])``, then the seed's retries:
        margins 10/20/30/40 px with iterations 1000/2000/3000 (the last
        repeated); every iteration count is capped at ``max_iterations``. A
        margin enlarges spam's search window to (2·hws + 1 + 2·margin)³, so the
        retries cost more per iteration; they run only when a level fails, and
        nodes that never converge cost their full iteration budget.
        """
        its = list(self.retry_max_iterations)
        its += [its[-1]] * max(0, len(self.retry_margins_px) - len(its))
        pairs = [(self.margin_px, its[0])] + list(zip(self.retry_margins_px, its))
        return [(m, min(i, self.max_iterations)) for m, i in pairs]


# Grid and mask -------------------------------------------------------------------------


def make_grid(shape: tuple[int, int, int], node_spacing_px: int, half_window_px: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A regular node grid whose correlation windows all lie inside the volume.

    ``spam.DIC.makeGrid`` starts at one spacing from the origin and runs to the
    far edge, so windows there are zero-padded by spam and may "converge" to
    absurd displacements; this grid is centred and keeps every window (plus a
    2-voxel guard for interpolation) inside.

    Returns
    -------
    nodes : (N, 3) float array
        Node positions (z, y, x), voxels, in C order of the grid.
    dims : tuple
        Number of nodes along z, y, x.
    """
    axes = []
    guard = half_window_px + 2
    for n in shape:
        span = n - 1 - 2 * guard
        if span < 0:
            raise ValueError(f"volume side {n} voxels is too small for half window {half_window_px} px")
        count = span // node_spacing_px + 1
        start = guard + (span - (count - 1) * node_spacing_px) // 2
        axes.append(start + node_spacing_px * np.arange(count))
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    return grid, tuple(len(a) for a in axes)


def texture_mask(volume: np.ndarray, *, half_window_px: int, fraction: float = 0.3) -> np.ndarray:
    """Voxels with enough texture to correlate (True), e.g. the electrode, not the electrolyte above it.

    The local standard deviation of the lightly smoothed volume (σ = 1 voxel, to
    damp pixel noise) over a cube of the correlation window is compared with
    ``fraction`` of its 75th percentile: a high percentile would be set by the
    few very contrasted windows (the Cu foil's edge) and mask the electrode, the
    median by a thick textureless headroom. Written by hand because spam only
    masks by mean grey value or by a given mask.
    """
    size = 2 * half_window_px + 1
    # in place where possible: at most three float32 volumes at once (this is DIC's memory peak at large sizes)
    smooth = ndi.gaussian_filter(volume, 1.0, output=np.float32)
    mean = ndi.uniform_filter(smooth, size)
    np.multiply(smooth, smooth, out=smooth)
    std = ndi.uniform_filter(smooth, size)
    del smooth
    np.multiply(mean, mean, out=mean)
    std -= mean
    del mean
    np.maximum(std, 0, out=std)
    np.sqrt(std, out=std)
    return std > fraction * np.percentile(std, 75)


# Results -------------------------------------------------------------------------------


@dataclass
class LevelResult:
    """One level of the hierarchical LDIC after filtering."""

    node_spacing_px: int
    half_window_px: int
    nodes: np.ndarray  # (N, 3) z, y, x voxels
    dims: tuple[int, int, int]
    phi: np.ndarray  # (N, 4, 4) filtered; NaN translation on background nodes
    return_status: np.ndarray  # spam's, of the kept attempt
    converged: np.ndarray  # bool: status 2 and displaced window inside the volume
    background: np.ndarray  # bool: too little texture, not correlated
    replaced: np.ndarray  # bool: value replaced from neighbours by the filter
    error: np.ndarray
    iterations: np.ndarray
    delta_phi_norm: np.ndarray
    attempts: list[dict] = field(default_factory=list)
    from_coarser: np.ndarray | None = None  # bool: replaced nodes that kept the coarser level's value

    @property
    def converged_fraction(self) -> float:
        """Converged nodes / textured (non-background) nodes."""
        textured = ~self.background
        return float(self.converged[textured].mean()) if textured.any() else 0.0


@dataclass
class PairResult:
    """The correlation of one pair of volumes."""

    registration_phi: np.ndarray
    registration_centre: np.ndarray
    registration_status: int
    eye_shift_px: np.ndarray
    levels: list[LevelResult]
    seconds: float

    @property
    def final(self) -> LevelResult:
        return self.levels[-1]

    def summary(self) -> dict:
        """JSON-able diagnostic: registration and every attempt at every level."""
        return {
            "eye_shift_px": self.eye_shift_px.tolist(),
            "registration": {"phi": self.registration_phi.tolist(), "centre_px": self.registration_centre.tolist(),
                             "return_status": int(self.registration_status)},
            "levels": [{"node_spacing_px": lv.node_spacing_px, "half_window_px": lv.half_window_px,
                        "n_nodes": int(len(lv.nodes)), "n_background": int(lv.background.sum()),
                        "converged_fraction": lv.converged_fraction,
                        "converged_fraction_all_nodes": float(lv.converged.mean()), "n_replaced": int(lv.replaced.sum()),
                        "n_from_coarser_level": int(0 if lv.from_coarser is None else lv.from_coarser.sum()),
                        "attempts": lv.attempts} for lv in self.levels],
            "seconds": self.seconds,
        }


# The steps ------------------------------------------------------------------------------


def registration_binning(shape: tuple[int, int, int], max_voxels: int) -> int:
    """The smallest power of 2 binning ``shape`` to at most ``max_voxels`` voxels."""
    factor = 1
    while math.prod(n // factor for n in shape) > max_voxels and min(shape) // (2 * factor) >= 8:
        factor *= 2
    return factor


def bin_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``³ blocks (the far edges cropped to whole blocks); binned voxel i covers full-resolution
    voxels ``factor·i … factor·i + factor − 1``, centred at ``factor·i + (factor − 1)/2``."""
    if factor == 1:
        return volume
    nz, ny, nx = (n // factor for n in volume.shape)
    cropped = volume[:nz * factor, :ny * factor, :nx * factor].astype(np.float32, copy=False)
    return cropped.reshape(nz, factor, ny, factor, nx, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def eye_registration(reference: np.ndarray, deformed: np.ndarray) -> np.ndarray:
    """Rigid first guess: the shift (z, y, x) in voxels of ``deformed`` relative to ``reference``.

    Phase correlation with 1/10-voxel upsampling replaces the seed's manual
    "eye" alignment; spam's own ``spam-ereg`` is a Qt GUI.
    """
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(deformed, reference, upsample_factor=10, normalization=None)
    return np.asarray(shift, dtype=float)


def register(reference: np.ndarray, deformed: np.ndarray, mask: np.ndarray | None, settings: DICSettings,
             *, phi_init: np.ndarray | None = None) -> dict:
    """``spam.DIC.register`` (12 DOF) about the centre of mass of ``mask``.

    Returns spam's dictionary plus ``"centre"`` (z, y, x voxels) where Φ is expressed.
    """
    import spam.DIC

    margin = 1 + int(0.1 * min(reference.shape))  # spam's default, made explicit to locate the centre below
    with spam_call(1, "spam.DIC.register"):
        result = spam.DIC.register(
            reference, deformed, im1mask=mask, returnPhiMaskCentre=mask is not None, PhiInit=phi_init,
            margin=margin, maxIterations=settings.registration_max_iterations,
            deltaPhiMin=settings.delta_phi_tolerance, interpolationOrder=1, verbose=False,
        )
    centre = (np.array(reference.shape) - 1) / 2.0
    if mask is not None:
        # spam returns Φ at the centre of mass of the mask inside its margin crop
        inner = mask[(slice(margin, -margin),) * 3]
        if inner.any():
            centre = np.array(ndi.center_of_mass(inner), dtype=float) + margin
    result["centre"] = centre
    return result


def phi_at_points(phi: np.ndarray, centre: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A single Φ measured at ``centre`` applied to ``points``: (N, 4, 4), via ``spam.DIC.applyRegistrationToPoints``."""
    import spam.DIC

    with spam_call(1, "applyRegistrationToPoints"):
        return spam.DIC.applyRegistrationToPoints(phi.copy(), centre, points, applyF="all", nProcesses=1)


def _inside(nodes: np.ndarray, phi: np.ndarray, shape, half_window_px: int) -> np.ndarray:
    """Nodes whose displaced window lies inside the volume (and whose Φ is finite)."""
    pos = nodes + phi[:, :3, 3]
    ok = np.all(np.isfinite(phi.reshape(len(phi), -1)), axis=1)
    hi = np.array(shape) - 1 - half_window_px
    with np.errstate(invalid="ignore"):
        ok &= np.all((pos >= half_window_px) & (pos <= hi), axis=1)
    return ok


def filter_field(nodes: np.ndarray, phi: np.ndarray, good: np.ndarray, ignore: np.ndarray, *,
                 n_neighbours: int = 9, coherency_threshold: float = 0.1, processes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Replace bad nodes of a Φ field from their good neighbours, as ``spam-filterPhiField`` does.

    Good nodes whose local quadratic coherency (``spam.DIC.estimateLocalQuadraticCoherency``,
    neighbour radius 4 × node spacing as the script's default) exceeds
    ``coherency_threshold`` become bad too; bad nodes get the inverse-distance
    average of the Φ of their ``n_neighbours`` nearest good nodes
    (``spam.DIC.interpolatePhiField``). Ignored (background) nodes are left as they are.

    Returns
    -------
    phi : (N, 4, 4) array
        The filtered field.
    replaced : (N,) bool
        Nodes whose Φ was replaced.
    """
    import spam.DIC

    good = good & ~ignore
    phi = phi.copy()
    # spam's LQC doubles its radius until > 27 neighbours: it needs more than 27 points.
    if good.sum() > 27:
        spacing = _grid_spacing(nodes)
        with spam_call(processes, "estimateLocalQuadraticCoherency"):
            lqc = spam.DIC.estimateLocalQuadraticCoherency(
                nodes[good], phi[good, :3, 3], neighbourRadius=4 * float(np.mean(spacing)), nProcesses=processes)
        idx = np.flatnonzero(good)
        good[idx[lqc >= coherency_threshold]] = False
    bad = ~good & ~ignore
    if bad.any():
        if not good.any():
            raise DICError("no converged node to filter the field from")
        k = int(min(n_neighbours, good.sum()))
        with spam_call(processes, "interpolatePhiField"):
            phi[bad] = spam.DIC.interpolatePhiField(nodes[good], phi[good], nodes[bad], nNeighbours=k,
                                                    interpolateF="all", nProcesses=processes)
    return phi, bad


def pass_field(nodes: np.ndarray, phi: np.ndarray, valid: np.ndarray, new_nodes: np.ndarray, *,
               processes: int = 1) -> np.ndarray:
    """Interpolate a (filtered) Φ field onto the next level's nodes (``spam.DIC.interpolatePhiField``, 8 nearest)."""
    import spam.DIC

    k = int(min(8, valid.sum()))
    with spam_call(processes, "interpolatePhiField"):
        return spam.DIC.interpolatePhiField(nodes[valid], phi[valid], new_nodes, nNeighbours=k,
                                            interpolateF="all", nProcesses=processes)


def ldic_level(reference: np.ndarray, deformed: np.ndarray, nodes: np.ndarray, dims, phi_init: np.ndarray,
               mask: np.ndarray | None, node_spacing_px: int, half_window_px: int, settings: DICSettings,
               processes: int, *, seeded: bool = False) -> LevelResult:
    """One LDIC level with the retry policy, then filtered.

    Tries (margin, iterations) from :meth:`DICSettings.attempts` until the
    converged fraction of textured nodes reaches ``min_converged_fraction``,
    or until a retry after the first one gains less than ``RETRY_MIN_GAIN``
    (the failures are then texture-limited: larger margins only cost time);
    keeps the best attempt. Every attempt is recorded in ``attempts``.
    With ``seeded`` (``phi_init`` comes from a coarser level), replaced nodes
    with no good node within two spacings keep ``phi_init``.
    """
    import spam.DIC

    attempts, best = [], None
    for margin, iterations in settings.attempts():
        start = time.perf_counter()
        with spam_call(processes, "spam.DIC.ldic"):
            phi, status, error, its, dpn = spam.DIC.ldic(
                reference, deformed, nodes, [half_window_px] * 3, processes=processes, im1mask=mask,
                PhiField=phi_init.copy(), margin=[-margin, margin] * 3, maskCoverage=0.5,
                maxIterations=iterations, deltaPhiMin=settings.delta_phi_tolerance,
                interpolationOrder=settings.interpolation_order)
        background = status == BACKGROUND
        converged = (status == CONVERGED) & _inside(nodes, phi, reference.shape, half_window_px)
        textured = ~background
        fraction = float(converged[textured].mean()) if textured.any() else 0.0
        attempts.append({"margin_px": margin, "max_iterations": iterations, "converged_fraction": fraction,
                         "n_converged": int(converged.sum()), "n_textured": int(textured.sum()),
                         "seconds": time.perf_counter() - start})
        log.info("ldic ns=%d hws=%d margin=%d its=%d: %.0f%% of %d textured nodes converged",
                 node_spacing_px, half_window_px, margin, iterations, 100 * fraction, textured.sum())
        improvement = fraction - (best[0] if best is not None else 0.0)
        if best is None or fraction > best[0]:
            best = (fraction, phi, status, error, its, dpn, converged, background)
        if fraction >= settings.min_converged_fraction:
            break
        if len(attempts) >= 3 and improvement < RETRY_MIN_GAIN:
            # texture-limited, not range-limited: wider searches cost (2·hws+1+2m)³ and do not help
            attempts[-1]["stopped"] = f"gained {improvement:.3f} < {RETRY_MIN_GAIN} converged fraction: retries stopped"
            break
    _, phi, status, error, its, dpn, converged, background = best
    result = LevelResult(node_spacing_px, half_window_px, nodes, tuple(dims), phi, status, converged, background,
                         np.zeros(len(nodes), bool), error, its, dpn, attempts)
    if not converged.any():
        return result  # the caller writes the diagnostic and raises
    result.phi, result.replaced = filter_field(nodes, phi, converged, background, n_neighbours=settings.filter_neighbours,
                                               coherency_threshold=settings.coherency_threshold, processes=processes)
    if seeded:
        # Where converged nodes are sparse (texture-limited windows), an average of far-away nodes is worse than
        # the coarser level's value that seeded this one: keep that where no good node is within 2 spacings.
        from scipy.spatial import cKDTree

        good = ~result.replaced & ~background
        far = result.replaced & (cKDTree(nodes[good]).query(nodes, k=1)[0] > 2 * node_spacing_px)
        result.phi[far] = phi_init[far]
        result.from_coarser = far
    result.phi[background] = np.nan
    return result


def correlate_pair(reference: np.ndarray, deformed: np.ndarray, settings: DICSettings, *,
                   diagnostic_path: str | Path | None = None) -> PairResult:
    """Eye registration, registration and hierarchical LDIC of one pair of volumes.

    Parameters
    ----------
    reference, deformed
        3D grey-level volumes (z, y, x) of the same shape.
    settings
        :class:`DICSettings`.
    diagnostic_path
        Where to write ``summary()`` as JSON if no node converges at some level.

    Raises
    ------
    DICError
        No node converged at a level (after every retry); the diagnostic is written first.
    """
    if reference.shape != deformed.shape or reference.ndim != 3:
        raise ValueError(f"volumes must be 3D and of the same shape, got {reference.shape} and {deformed.shape}")
    start = time.perf_counter()
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    deformed = np.ascontiguousarray(deformed, dtype=np.float32)
    processes = resolve_processes(settings.processes)
    hws = settings.half_windows()
    mask = texture_mask(reference, half_window_px=hws[-1])
    factor = registration_binning(reference.shape, settings.registration_max_voxels)
    binned = [bin_volume(v, factor) for v in (reference, deformed)]
    shift = eye_registration(*binned)
    phi_eye = np.eye(4)
    phi_eye[:3, 3] = shift
    reg_mask = mask if factor == 1 else bin_volume(mask.astype(np.float32), factor) > 0.5
    reg = register(*binned, reg_mask, settings, phi_init=phi_eye)
    del binned, reg_mask
    # on the full grid: the same F, translation × factor, about the binned centre's full-resolution position
    reg_phi = reg["Phi"].copy() if reg["returnStatus"] > 0 else phi_eye  # a diverged registration is not trusted
    reg_phi[:3, 3] *= factor
    shift = shift * factor
    reg_centre = (reg["centre"] * factor + (factor - 1) / 2 if reg["returnStatus"] > 0
                  else (np.array(reference.shape) - 1) / 2.0)
    levels: list[LevelResult] = []
    previous = None
    for spacing, half in zip(settings.node_spacing_px, hws):
        nodes, dims = make_grid(reference.shape, spacing, half)
        if previous is None:
            phi_init = phi_at_points(reg_phi, reg_centre, nodes)
        else:
            valid = ~previous.background & np.isfinite(previous.phi[:, 0, 3])
            phi_init = pass_field(previous.nodes, previous.phi, valid, nodes, processes=processes)
        level = ldic_level(reference, deformed, nodes, dims, phi_init, mask, spacing, half, settings, processes,
                           seeded=previous is not None)
        levels.append(level)
        if not level.converged.any():
            pair = PairResult(reg_phi, reg_centre, int(reg["returnStatus"]), shift, levels, time.perf_counter() - start)
            where = ""
            if diagnostic_path is not None:
                _write_json(pair.summary(), diagnostic_path)
                where = f"; diagnostic written to {diagnostic_path}"
            raise DICError(f"LDIC at node spacing {spacing} px: no node converged after "
                           f"{len(level.attempts)} attempts (margins {list(settings.retry_margins_px)}){where}")
        previous = level
    return PairResult(reg_phi, reg_centre, int(reg["returnStatus"]), shift, levels, time.perf_counter() - start)


# Composition ---------------------------------------------------------------------------


def _grid_spacing(nodes: np.ndarray) -> np.ndarray:
    return np.array([np.diff(np.unique(nodes[:, i]))[0] if len(np.unique(nodes[:, i])) > 1 else 1.0 for i in range(3)])


def interpolate_phi(nodes: np.ndarray, dims, phi: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of the 12 components of a gridded Φ field at arbitrary points (linear extrapolation outside)."""
    axes = [np.unique(nodes[:, i]) for i in range(3)]
    values = phi[:, :3, :].reshape(*dims, 12)
    interp = RegularGridInterpolator(axes, values, method="linear", bounds_error=False, fill_value=None)
    out = np.tile(np.eye(4), (len(points), 1, 1))
    out[:, :3, :] = interp(points).reshape(-1, 3, 4)
    return out


def compose_fields(nodes: np.ndarray, dims, phi_first: np.ndarray, phi_next: np.ndarray) -> np.ndarray:
    """Φ₀→₂ = Φ₁→₂ ∘ Φ₀→₁ for fields on the same node grid.

    The material point at node X moves to x₁ = X + u₀₁(X); the increment is
    evaluated there (trilinear interpolation of Φ₁→₂, whose nodes are the same
    grid in the T1 configuration), not at X:

        u₀₂(X) = u₀₁(X) + u₁₂(x₁),    F₀₂(X) = F₁₂(x₁) · F₀₁(X).

    Written by hand: spam composes single Φs (matrix product) but not fields.
    """
    x1 = nodes + phi_first[:, :3, 3]
    finite = np.all(np.isfinite(x1), axis=1)
    inc = np.full_like(phi_first, np.nan)
    if finite.any():
        inc[finite] = interpolate_phi(nodes, dims, phi_next, x1[finite])
    out = np.tile(np.eye(4), (len(nodes), 1, 1))
    out[:, :3, :3] = np.einsum("nij,njk->nik", inc[:, :3, :3], phi_first[:, :3, :3])
    out[:, :3, 3] = phi_first[:, :3, 3] + inc[:, :3, 3]
    return out


def compose_series(nodes: np.ndarray, dims, increments: list[np.ndarray]) -> list[np.ndarray]:
    """Cumulative Φ₀→ᵢ for i = 1..n from the increments Φ₀→₁, Φ₁→₂, ... (all on one grid)."""
    cumulative = [increments[0]]
    for inc in increments[1:]:
        cumulative.append(compose_fields(nodes, dims, cumulative[-1], inc))
    return cumulative


# Deforming and residuals -----------------------------------------------------------------


def deform_with_field(volume: np.ndarray, nodes: np.ndarray, dims, phi: np.ndarray, *, fixed_point_iterations: int = 4,
                      slab_voxels: int = 1 << 18) -> np.ndarray:
    """Deform ``volume`` (the reference) into the deformed configuration with a Φ field.

    For each voxel x of the output, the reference point X with X + u(X) = x is
    found by fixed-point iteration X ← x − u(X) on the trilinearly interpolated
    node displacements (``scipy.ndimage.map_coordinates`` on the node grid,
    padded by one linearly extrapolated layer so affine fields stay exact up to
    the volume edge), then ``volume`` is sampled there (linear). This is the
    fast path for ``spam.DIC.applyPhiField`` (minutes on 128³ there, seconds
    here); both agree on a small case (tests/test_dic.py). NaN displacements
    (background nodes) are filled from the nearest finite node first. Output
    planes are computed ``slab_voxels`` at a time (at least one plane), so the
    iteration's coordinates (~71 bytes per voxel) are held for one slab only:
    ~19 MB by default, where the whole volume at once took 19 float32 volumes
    (as fast: 3.2–3.7 s on 96×192×192 with slabs of 2¹⁶ to 2²³ voxels).
    """
    disp = phi[:, :3, 3].reshape(*dims, 3).copy()
    bad = ~np.all(np.isfinite(disp), axis=-1)
    if bad.all():
        raise DICError("cannot deform: the Φ field has no finite node")
    if bad.any():
        idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
        disp = disp[tuple(idx)]
    for axis in range(3):  # one extrapolated node layer on each side
        if disp.shape[axis] >= 2:
            first = 2 * np.take(disp, [0], axis) - np.take(disp, [1], axis)
            last = 2 * np.take(disp, [-1], axis) - np.take(disp, [-2], axis)
        else:
            first = last = disp
        disp = np.concatenate([first, disp, last], axis=axis)
    components = [np.ascontiguousarray(disp[..., c], dtype=np.float32) for c in range(3)]
    spacing = _grid_spacing(nodes)
    origin = nodes.min(axis=0) - spacing
    scale = (1.0 / spacing).astype(np.float32)[:, None]
    offset = (origin / spacing).astype(np.float32)[:, None]
    volume = np.asarray(volume, dtype=np.float32)
    nz, ny, nx = volume.shape
    out = np.empty(volume.shape, np.float32)
    step = max(1, slab_voxels // (ny * nx))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        grid = np.indices((z1 - z0, ny, nx), dtype=np.float32).reshape(3, -1)
        grid[0] += z0
        ref = grid.copy()
        for _ in range(fixed_point_iterations):
            index = ref * scale - offset
            u = np.stack([ndi.map_coordinates(c, index, order=1, mode="nearest") for c in components])
            ref = grid - u
        out[z0:z1] = ndi.map_coordinates(volume, ref, order=1, mode="nearest").reshape(z1 - z0, ny, nx)
    return out


def residual_map(reference: np.ndarray, target: np.ndarray, nodes: np.ndarray, dims, phi: np.ndarray) -> np.ndarray:
    """Residual ``target − reference deformed by Φ`` (seed Note 5, step 7), same units as the volumes."""
    deformed = deform_with_field(reference, nodes, dims, phi)
    return np.subtract(target.astype(np.float32, copy=False), deformed, out=deformed)


def noise_threshold(residual: np.ndarray, *, blur_sigma_px: float = 2.0, percentile: float = 99.0,
                    mask: np.ndarray | None = None) -> float:
    """Noise baseline from a double-scan residual (seed Fig S19): Gaussian blur σ, |·|, a high percentile."""
    blurred = np.abs(ndi.gaussian_filter(residual.astype(np.float32), blur_sigma_px))
    values = blurred[mask] if mask is not None else blurred
    return float(np.percentile(values, percentile))


def _write_json(obj, path) -> None:
    from twin.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1, default=float))


# Writing and stages -------------------------------------------------------------------------


def write_pair(out_dir: str | Path, pair: PairResult, voxel_size_um: float, *, processes: int = 1,
               attrs: dict | None = None) -> dict:
    """Write one pair's products into ``out_dir``.

    Files: ``phi_field.nc`` (final filtered level, Q8 strains), ``phi_field.tsv``
    (spam's format; filtered nodes carry returnStatus 1 as ``spam-filterPhiField``
    writes them), ``registration.tsv``, ``nodes.csv``, ``increment-{vol,dev,ezz}-Q8.tif``,
    ``increment-strain-Q8.csv`` and ``dic.json`` (registration, every attempt of every level).
    Returns the summary written to ``dic.json``.
    """
    from pipeline import _dic_io as io
    from pipeline.strain import strain_field

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lv = pair.final
    status = np.where(lv.replaced, 1, lv.return_status)
    strain = strain_field(lv.nodes, lv.dims, lv.phi[:, :3, 3], processes=processes)
    summary = pair.summary()
    ds = io.field_dataset(lv.nodes, lv.dims, lv.phi, converged=lv.converged, background=lv.background,
                          replaced=lv.replaced, voxel_size_um=voxel_size_um, strain=strain,
                          attrs={"node_spacing_px": lv.node_spacing_px, "half_window_px": lv.half_window_px,
                                 "converged_fraction": lv.converged_fraction, **(attrs or {})})
    io.write_dataset(ds, out_dir / "phi_field.nc")
    io.write_tsv(out_dir / "phi_field.tsv", lv.nodes, lv.phi, status, lv.error, lv.iterations, lv.delta_phi_norm)
    io.write_tsv(out_dir / "registration.tsv", pair.registration_centre[None], pair.registration_phi[None],
                 np.array([pair.registration_status]))
    io.write_nodes_csv(out_dir / "nodes.csv", lv.nodes, lv.phi, converged=lv.converged, background=lv.background,
                       replaced=lv.replaced, return_status=lv.return_status, voxel_size_um=voxel_size_um)
    io.write_strain_files(out_dir, "increment", strain, voxel_size_um)
    _write_json(summary, out_dir / "dic.json")
    return summary


def _scan_index(name: str) -> int:
    if not (isinstance(name, str) and name[:1] == "T" and name[1:].isdigit()):
        raise StageError(f"dic: scan names must be T0, T1, ..., got {name!r}")
    return int(name[1:])


def compute_dic(ctx) -> None:
    """Stage ``dic`` (per scan Ti, i >= 1): the increment T(i-1) → Ti.

    Reads ``reconstruction[T(i-1)]/volume.nc`` and ``reconstruction[Ti]/volume.nc``
    (variable ``volume``); scenario fields: section ``dic``, ``sample.voxel_size_um``.
    Writes what :func:`write_pair` writes; on total failure ``dic_diagnostic.json``
    is kept beside the error message.
    """
    others = [item for (stage, item) in ctx.inputs if stage == "reconstruction" and item != ctx.item]
    if len(others) != 1:
        raise StageError(f"dic [{ctx.item}]: needs reconstruction of the previous scan and of {ctx.item}, got {sorted(ctx.inputs)}")
    previous = others[0]
    correlate_files(Path(ctx.input("reconstruction", previous)) / "volume.nc",
                    Path(ctx.input("reconstruction", ctx.item)) / "volume.nc", ctx.out_dir, ctx.scenario,
                    attrs={"reference_scan": previous, "deformed_scan": ctx.item})


def correlate_files(reference_path: str | Path, deformed_path: str | Path, out_dir: str | Path, scenario,
                    *, attrs: dict | None = None) -> dict:
    """Correlate two volume files (``.nc`` with ``volume``, or ``.tif``) and write :func:`write_pair`'s files.

    The voxel size comes from the reference's attributes, else ``sample.voxel_size_um``.
    Used by the ``dic`` stage and by ``twin dic REF VOLUME``. Returns the summary.

    Raises
    ------
    InputFileError
        A volume that cannot be read, or volumes of different shapes.
    DICError
        No node converged at some level (``dic_diagnostic.json`` is written in ``out_dir``).
    """
    from twin.io import read_volume
    from twin.errors import InputFileError

    reference, voxel = read_volume(reference_path)
    deformed, _ = read_volume(deformed_path)
    if reference.shape != deformed.shape:
        raise InputFileError(deformed_path, f"shape {deformed.shape} differs from the reference {reference_path} {reference.shape}")
    voxel = voxel or scenario.sample.voxel_size_um
    settings = DICSettings.from_scenario(scenario)
    for spacing, half in zip(settings.node_spacing_px, settings.half_windows()):
        try:
            make_grid(reference.shape, spacing, half)
        except ValueError as exc:
            raise InputFileError(reference_path, f"shape {reference.shape}: {exc} (dic.node_spacing_px = "
                                 f"{list(settings.node_spacing_px)})") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pair = correlate_pair(reference, deformed, settings, diagnostic_path=out_dir / "dic_diagnostic.json")
    return write_pair(out_dir, pair, voxel, processes=resolve_processes(settings.processes), attrs=attrs)


def compute_dic_composition(ctx) -> None:
    """Stage ``dic_composition`` (once): cumulative Φ₀→ᵢ, strains, residuals and the noise baseline.

    Inputs: ``dic[Ti]/phi_field.nc`` for every Ti (i >= 1) and
    ``reconstruction[Ti]/volume.nc`` for every Ti (i >= 0), all declared as
    inputs of this node (the scans are read from the declared inputs). Scenario:
    section ``dic``, ``sample.voxel_size_um``.

    Writes ``cumulative.nc`` (dims scan × node grid, as ``phi_field.nc``),
    ``T<i>-{vol,dev,ezz}-Q8.tif`` and ``T<i>-strain-Q8.csv`` relative to T0,
    ``residuals.nc`` (``residual``: Ti − T0 deformed by Φ₀→ᵢ, float16; and for the
    double scan ``residual_double_scan``), ``noise_baseline.json``.
    """
    import xarray as xr

    from pipeline import _dic_io as io
    from pipeline.strain import strain_field

    scans = sorted({item for (stage, item) in ctx.inputs if stage == "dic"}, key=_scan_index)
    if not scans:
        raise StageError("dic_composition: no dic[Ti] inputs declared")
    settings = DICSettings.from_scenario(ctx.scenario)
    processes = resolve_processes(settings.processes)
    increments, dims, nodes, converged = [], None, None, []
    for scan in scans:
        path = Path(ctx.input("dic", scan)) / "phi_field.nc"
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            grid = np.stack(np.meshgrid(ds["z_px"].values, ds["y_px"].values, ds["x_px"].values, indexing="ij"), -1)
            these_dims = grid.shape[:3]
            phi = np.tile(np.eye(4), (int(np.prod(these_dims)), 1, 1))
            phi[:, :3, 3] = np.moveaxis(ds["displacement"].values, 0, -1).reshape(-1, 3)
            phi[:, :3, :3] = np.moveaxis(ds["F"].values, (0, 1), (-2, -1)).reshape(-1, 3, 3)
            phi[(ds["background"].values.ravel() == 1)] = np.nan
            converged.append(ds["converged"].values.ravel() == 1)
            voxel = float(ds.attrs["voxel_size_um"])
        if nodes is None:
            nodes, dims = grid.reshape(-1, 3).astype(float), these_dims
        elif these_dims != dims or not np.allclose(grid.reshape(-1, 3), nodes):
            raise StageError(f"dic_composition: {path} is on a different node grid from dic[{scans[0]}]")
        increments.append(phi)
    cumulative = compose_series(nodes, dims, increments)
    out = Path(ctx.out_dir)
    datasets = []
    path_ok = np.ones(len(nodes), bool)
    for scan, phi, conv in zip(scans, cumulative, converged):
        path_ok &= conv  # converged in every increment so far (same node index: nodes move < a spacing)
        strain = strain_field(nodes, dims, phi[:, :3, 3], processes=processes)
        background = ~np.isfinite(phi[:, 0, 3])
        datasets.append(io.field_dataset(nodes, dims, phi, converged=path_ok & ~background, background=background,
                                         replaced=np.zeros(len(nodes), bool), voxel_size_um=voxel, strain=strain))
        io.write_strain_files(out, scan, strain, voxel)
    cum = xr.concat(datasets, dim="scan").assign_coords(scan=scans)
    cum.attrs.update(reference_scan="T0", composition="Phi_0i = Phi_(i-1)i o ... o Phi_01, increments evaluated at displaced points")
    io.write_dataset(cum, out / "cumulative.nc")

    # Residuals and the noise baseline (double scan: the last two scans). Two volumes are held at a time and
    # each residual goes to residuals.nc as it is made: memory does not grow with the number of scans.
    from twin.io import read_volume

    def volume(scan):
        return read_volume(Path(ctx.input("reconstruction", scan)) / "volume.nc")[0]

    first = f"T{_scan_index(scans[0]) - 1}"
    reference = volume(first)
    mask = texture_mask(reference, half_window_px=settings.half_windows()[-1])
    double = scans[-1]
    before_double = f"T{_scan_index(double) - 1}"
    noise_residual = residual_map(reference if before_double == first else volume(before_double), volume(double),
                                  nodes, dims, increments[-1])
    blur = ctx.scenario.dic.residual_blur_sigma_px
    threshold = noise_threshold(noise_residual, blur_sigma_px=blur, percentile=ctx.scenario.dic.noise_percentile, mask=mask)
    per_scan = {}
    with io.residuals_file(out / "residuals.nc", scans, reference.shape, first=first, noise_threshold=threshold,
                           voxel_size_um=voxel) as residuals:
        residuals["residual_double_scan"][...] = noise_residual.astype(np.float16)
        residuals["texture_mask"][...] = mask.astype(np.uint8)
        del noise_residual
        for i, (scan, phi) in enumerate(zip(scans, cumulative)):
            r = residual_map(reference, volume(scan), nodes, dims, phi)
            blurred = ndi.gaussian_filter(r, blur)
            np.abs(blurred, out=blurred)
            per_scan[scan] = {"residual_rms": float(np.sqrt(np.mean(r[mask] ** 2))),
                              "significant_fraction": float(np.mean(blurred[mask] > threshold))}
            del blurred
            residuals["residual"][i] = r.astype(np.float16)
    noise_inc = increments[-1][converged[-1], :3, 3]
    baseline = {
        "double_scan": [before_double, double], "reference_scan": first,
        "blur_sigma_px": blur, "percentile": ctx.scenario.dic.noise_percentile,
        "threshold": threshold,
        "double_scan_displacement_std_vx": np.nanstd(noise_inc, axis=0).tolist() if len(noise_inc) else None,
        "per_scan": per_scan,
    }
    _write_json(baseline, out / "noise_baseline.json")
