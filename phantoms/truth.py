"""Per-scan truth: lithiation state, optical constants and the warped volumes; the two stage functions.

Stages (wired by :mod:`twin.stages`):

* ``microstructure`` (once) → ``microstructure.nc``, ``particles.csv``.
* ``truth`` (per scan; needs ``microstructure`` and ``rehearsal``/lithiation.nc)
  → ``phantom.nc``, ``particles.csv``, ``deformation.json`` (the analytic field:
  :func:`phantoms.deformation.load_deformation`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage
from scipy.spatial import cKDTree

from phantoms import _kernels as compiled
from phantoms import _voxelize, optics
from phantoms.deformation import SUPPORT, Deformation, FoldingError
from phantoms.lithiation import lithiate
from phantoms.microstructure import Microstructure, Recipe, distance_to_background, generate_microstructure
from phantoms.phases import Phase
from twin.errors import InputFileError, ScenarioError
from twin.io import NETCDF_ENGINE, WriteBehind, atomic_path, streamed_netcdf, write_netcdf
from twin.warnings import TwinWarning

MIN_KERNEL_RADIUS_VOX = 3.0  # particles with a smaller equivalent radius get no swelling kernel
BUBBLE_GROWTH = 1.5  # a gas bubble's radius grows by this factor from its reference seed region
SWELLING_DAMPING = 0.7  # factor on a folding particle kernel's amplitude per retry
SWELLING_RETRIES = 6
RAMP_FACTOR = 2.5  # the Cu mask m(z) rises over this many times the largest local displacement within it


# --- microstructure persistence ----------------------------------------------------------
def microstructure_dataset(ms: Microstructure) -> xr.Dataset:
    """The pristine microstructure as a Dataset (what ``microstructure.nc`` holds)."""
    dims = ("z", "y", "x")
    keys = {name: (dims, getattr(ms, name), {"units": "voxel"}) for name in ("surface_distance", "band_distance")
            if getattr(ms, name) is not None}
    ds = xr.Dataset(
        {"phase": (dims, ms.phase), "particle": (dims, ms.particle), "cbd_porosity": (dims, ms.cbd_porosity), **keys},
        coords=_coords(ms.phase.shape, ms.voxel_size_um))
    ds.attrs.update({"voxel_size_um": ms.voxel_size_um, "z_cu": ms.z_cu, "z_top": ms.z_top,
                     **{f"recipe_{k}": v for k, v in vars(ms.recipe).items()}})
    return ds


def load_microstructure(directory: str | Path) -> Microstructure:
    """Read ``microstructure.nc`` and ``particles.csv`` written by :func:`compute_microstructure`."""
    directory = Path(directory)
    path = directory / "microstructure.nc"
    try:
        with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
            ds = ds.load()
        table = pd.read_csv(directory / "particles.csv")
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"cannot read the microstructure ({exc})") from None
    recipe = Recipe(**{k[len("recipe_"):]: float(v) for k, v in ds.attrs.items() if k.startswith("recipe_")})
    keys = [ds[name].values if name in ds else None for name in ("surface_distance", "band_distance")]
    return Microstructure(ds.phase.values, ds.particle.values, ds.cbd_porosity.values, *keys, table, float(ds.attrs["voxel_size_um"]), int(ds.attrs["z_cu"]),
                          int(ds.attrs["z_top"]), recipe)


def _coords(shape, a):
    return {"z": ("z", np.arange(shape[0]) * a, {"units": "µm"}), "y": ("y", np.arange(shape[1]) * a, {"units": "µm"}),
            "x": ("x", np.arange(shape[2]) * a, {"units": "µm"})}


# --- lithiation per particle ---------------------------------------------------------------
def particle_fractions(lithiation: xr.DataArray, scan: str, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """f and f_max (over the scans up to ``scan``) of each particle, from the rehearsal's lithiated_fraction.

    Parameters
    ----------
    lithiation
        DataArray (scan, depth_um, radius_um) of the contract, values in [0, 1].
    scan
        Scan name (a value of the scan coordinate).
    table
        Particles with ``depth_um`` and ``equivalent_diameter_um``.

    Notes
    -----
    Bilinear interpolation in depth and radius; outside the tabulated ranges the
    nearest edge value is used.
    """
    names = [str(s) for s in lithiation["scan"].values]
    if scan not in names:
        raise InputFileError("lithiation.nc", f"scan {scan!r} not in its scan coordinate {names}")
    i = names.index(scan)
    hist = lithiation.isel(scan=slice(0, i + 1))
    depth = np.asarray(table["depth_um"], float)
    radius = np.asarray(table["equivalent_diameter_um"], float) / 2
    values = []
    for k in range(i + 1):
        da = hist.isel(scan=k)
        for dim, q in (("depth_um", depth), ("radius_um", radius)):
            coord = da[dim].values
            if coord.size == 1:
                da = da.isel({dim: 0}).expand_dims({dim: 1})
        grid_d, grid_r = da["depth_um"].values, da["radius_um"].values
        v = da.values
        vals = _bilinear(grid_d, grid_r, v, depth, radius)
        values.append(np.clip(vals, 0.0, 1.0))
    values = np.asarray(values)
    return values[-1], values.max(axis=0)


def _bilinear(gd, gr, v, d, r):
    """Bilinear interpolation on a (possibly 1-point) rectilinear grid, clamped at its edges."""
    def weights(g, q):
        if g.size == 1:
            return np.zeros(q.size, int), np.zeros(q.size, int), np.zeros(q.size)
        q = np.clip(q, g[0], g[-1])
        j = np.clip(np.searchsorted(g, q) - 1, 0, g.size - 2)
        return j, j + 1, (q - g[j]) / (g[j + 1] - g[j])
    i0, i1, s = weights(gd, d)
    j0, j1, t = weights(gr, r)
    return ((1 - s) * (1 - t) * v[i0, j0] + s * (1 - t) * v[i1, j0] + (1 - s) * t * v[i0, j1] + s * t * v[i1, j1])


# --- the state of one scan in the reference configuration ---------------------------------
def scan_state(ms: Microstructure, sample, energy_kev: float, fractions: np.ndarray, max_fractions: np.ndarray,
               *, bubble: bool = False) -> dict:
    """Reference-configuration state of one scan: phase, lithiation x, the rules for δ and β, per-particle volume ratio.

    Parameters
    ----------
    ms
        The pristine microstructure.
    sample
        :class:`twin.scenario.Sample` (mechanism, front width, SEI thickness, expansion, CBD recipe).
    energy_kev
        Photon energy, keV.
    fractions, max_fractions
        f and f_max per row of ``ms.particles``.
    bubble
        Put a gas bubble in the electrode's largest pore (Fig S13).

    Returns
    -------
    dict with ``phase`` (uint8), ``lithiation`` (float32 x), ``optics`` (:class:`OpticsRules`: δ, β of
    every voxel from these, evaluated where sampled; ``.volumes()`` gives δ and β as volumes),
    ``volume_ratio`` (J per particle, rows of ``ms.particles``), ``measured_fraction`` (mean x / 3.75
    per particle), ``bubble`` (centre, seed radius in voxels) or None.
    """
    a = ms.voxel_size_um
    ids = np.asarray(ms.particles["id"], int)
    key = ms.surface_distance if sample.mechanism == "core_shell" else ms.band_distance
    if key is None:
        raise ScenarioError(f"sample.mechanism: {sample.mechanism!r}, but the microstructure was generated for the "
                            f"other mechanism (it holds only that one's lithiation key)")
    f = dict(zip(ids, fractions))
    fmax = dict(zip(ids, max_fractions))
    x, si_phase = lithiate(ms.particle, key, f, fmax, sample.front_width_um / a)
    phase = ms.phase.copy()
    si = ms.particle > 0
    phase[si] = si_phase[si]
    del si_phase

    oc = optics.optical_constants(energy_kev, binder=sample.binder_mass_fraction,
                                  carbon_black=sample.carbon_black_mass_fraction, swcnt=sample.swcnt_mass_fraction,
                                  cbd_nanoporosity=sample.cbd_nanoporosity, expansion=sample.lithiated_volume_expansion)

    # SEI around particles that have been lithiated at least once (Fig S14)
    lith_ids = ids[max_fractions > 0]
    sei_partial = None
    if sample.sei_thickness_um > 0 and lith_ids.size:
        lithiated = np.zeros(int(ms.particle.max()) + 1, bool)
        lithiated[lith_ids] = True
        layers = sample.sei_thickness_um / a
        reach = max(layers, 1.0)
        # only the layers within reach of the electrode can hold SEI, and their distances need no others
        lo, hi = max(0, ms.z_cu - int(np.ceil(reach)) - 1), min(phase.shape[0], ms.z_top + int(np.ceil(reach)) + 1)
        near = _within_distance(lithiated[ms.particle[lo:hi]], layers if layers >= 0.5 else 1.0)
        near &= (phase[lo:hi] == Phase.ELECTROLYTE) | (phase[lo:hi] == Phase.CBD)
        if layers >= 0.5:
            phase[lo:hi][near] = Phase.SEI
        else:  # thinner than half a voxel: its partial volume enters δ, β of the adjacent voxels
            sei_partial = np.zeros(phase.shape, bool)
            sei_partial[lo:hi] = near

    bubble_info = None
    if bubble:
        pores = np.zeros(ms.phase.shape, bool)
        pores[ms.z_cu:ms.z_top] = ~si[ms.z_cu:ms.z_top]
        room = distance_to_background(pores)
        centre = np.array(np.unravel_index(np.argmax(room), room.shape), float)
        r0 = sample.gas_bubble_radius_um / a / BUBBLE_GROWTH
        grid = np.indices(phase.shape, sparse=True)
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r0**2
        phase[inside & ~si] = Phase.GAS
        bubble_info = (centre, max(r0, 0.5))

    # J = Ω(x)/Ω_c per Si voxel, crystalline ones swelling by the same increment from 1: Ω is affine in x, so a
    # particle's (or a plane's) mean J is Ω(mean x) less the crystalline share of Ω(0) − 1
    n_ids = int(ms.particle.max()) + 1
    count, x_sum, cryst, plane_count, plane_x, plane_cryst = _voxelize.silicon_sums(
        ms.particle, x, phase, int(Phase.SI_CRYSTALLINE), n_ids - 1)
    ratio = functools.partial(optics.lixsi_volume_ratio, expansion=sample.lithiated_volume_expansion)
    n = np.maximum(count[ids], 1)
    J = ratio(x_sum[ids] / n) - cryst[ids] / n * (ratio(0.0) - 1.0)
    measured = x_sum[ids] / n / optics.X_FULL
    n_plane = np.maximum(plane_count, 1)
    swelling = (plane_count * (ratio(plane_x / n_plane) - 1.0) - plane_cryst * (ratio(0.0) - 1.0)) / (
        phase.shape[1] * phase.shape[2])
    # δ and β are not held: the rules evaluate them from phase, x and CBD porosity where the warp samples
    rules = OpticsRules.of(oc, phase, x, ms.cbd_porosity, sei_partial,
                           sample.sei_thickness_um / a if sei_partial is not None else 0.0)
    # swelling_density: slab mean of (J − 1) over Si at each z, the electrode's swelling per unit volume along z
    return {"phase": phase, "lithiation": x, "optics": rules, "volume_ratio": J, "measured_fraction": measured,
            "bubble": bubble_info, "swelling_density": swelling}


@dataclass
class OpticsRules:
    """δ and β of a scan's reference voxels, as rules rather than volumes (8 bytes per voxel not held).

    A voxel's value: CBD (1 − p) δ_solid + p δ_electrolyte (p its porosity); c-Si δ_c + δ_LixSi(x) −
    δ_LixSi(0); amorphous and lithiated Si δ_LixSi(x) (the 151-point table, linear in x); any other
    phase its constant; then, where an SEI thinner than half a voxel lines a lithiated particle,
    (1 − w) δ + w δ_SEI with w its thickness in voxels. The same for β.
    """

    lut: np.ndarray
    lixsi: np.ndarray
    consts: np.ndarray
    phase: np.ndarray
    lithiation: np.ndarray
    porosity: np.ndarray
    partial: np.ndarray

    @classmethod
    def of(cls, oc: optics.OpticalConstants, phase, lithiation, porosity, sei_partial=None, sei_weight: float = 0.0):
        """The rules of optical constants ``oc`` over these volumes (``sei_partial``: bool volume or None;
        ``sei_weight``: the thin SEI's thickness in voxels). The layout of ``consts`` is
        :func:`phantoms._kernels._optics_of`'s."""
        lut = np.array([[oc.phase_delta.get(Phase(p), 0.0), oc.phase_beta.get(Phase(p), 0.0)] for p in range(len(Phase))])
        at_0 = [float(np.interp(0.0, oc.lixsi_x, table)) for table in (oc.lixsi_delta, oc.lixsi_beta)]
        consts = np.array([oc.cbd_solid_delta, oc.cbd_solid_beta, oc.phase_delta[Phase.ELECTROLYTE],
                           oc.phase_beta[Phase.ELECTROLYTE], oc.phase_delta[Phase.SI_CRYSTALLINE],
                           oc.phase_beta[Phase.SI_CRYSTALLINE], *at_0, oc.phase_delta[Phase.SEI], oc.phase_beta[Phase.SEI],
                           sei_weight])
        partial = sei_partial if sei_partial is not None else np.zeros((0, 0, 0), bool)
        if not np.allclose(np.diff(oc.lixsi_x), oc.lixsi_x[1] - oc.lixsi_x[0]):
            raise ValueError("OpticsRules: the LixSi table must be on equally spaced x (it is indexed, not searched)")
        volumes = (np.ascontiguousarray(v) for v in (phase, lithiation, porosity, partial))  # the sampler reads them flat
        return cls(lut, np.column_stack([oc.lixsi_x, oc.lixsi_delta, oc.lixsi_beta]).astype(float), consts, *volumes)

    def sample(self, coords: np.ndarray, delta: np.ndarray, beta: np.ndarray) -> None:
        """Trilinear δ and β at reference coordinates ``coords`` (3, n) into ``delta``, ``beta`` (n,), in one pass
        (a sampler of :meth:`Deformation.warp`'s ``derived``)."""
        compiled.sample_optics(self.phase, self.lithiation, self.porosity, self.partial, self.lut, self.lixsi,
                               self.consts, coords, delta, beta)

    def scan_sampler(self, particle: np.ndarray):
        """A sampler for :meth:`Deformation.warp`'s ``derived`` writing phase, particle (instance labels
        ``particle``, nearest), lithiation (trilinear), δ and β at reference coordinates (3, n), all in one pass
        (``sample(coords, phase, particle, lithiation, delta, beta)``)."""
        particle = np.ascontiguousarray(particle)

        def sample(coords, phase, particle_out, lithiation, delta, beta):
            compiled.sample_scan(self.phase, particle, self.lithiation, self.porosity, self.partial, self.lut,
                                 self.lixsi, self.consts, coords, phase, particle_out, lithiation, delta, beta)
        return sample

    def volumes(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole reference volumes of δ and β, float32 (for tests and pictures; the truth never holds them)."""
        coords = np.indices(self.phase.shape, dtype=np.float64).reshape(3, -1)
        delta, beta = (np.empty(coords.shape[1], np.float32) for _ in range(2))
        self.sample(coords, delta, beta)
        return delta.reshape(self.phase.shape), beta.reshape(self.phase.shape)


def _within_distance(mask: np.ndarray, distance_vox: float) -> np.ndarray:
    """Voxels whose centre is within ``distance_vox`` of a True voxel's centre (boolean).

    Up to 2 voxels: a dilation by the ball of that radius (exactly the same set, at 1 byte per
    voxel); beyond, the distance transform (the ball's cost grows as its volume).
    """
    if distance_vox <= 2.0:
        r = int(np.floor(distance_vox))
        offsets = np.indices((2 * r + 1,) * 3) - r
        return ndimage.binary_dilation(mask, structure=(offsets**2).sum(axis=0) <= distance_vox**2)
    return distance_to_background(~mask) <= distance_vox


# --- deformation -----------------------------------------------------------------------------
def build_deformation(ms: Microstructure, sample, state: dict, *, prescribed: bool,
                      swelling_scale: float | np.ndarray = 1.0) -> tuple[Deformation, np.ndarray]:
    """The scan's φ from the particles' swelling, the electrode's axial response and prescribed fields.

    Parameters
    ----------
    ms, sample
        Microstructure and :class:`twin.scenario.Sample`.
    state
        :func:`scan_state` output (volume ratios, swelling profile, bubble).
    prescribed
        Include the scenario's prescribed fields (every scan after T0).
    swelling_scale
        Factor on the particles' kernel amplitudes, one or one per row of ``ms.particles`` (< 1 only for
        particles whose kernels folded the map, see :func:`truth_for_scan`).

    Returns
    -------
    The deformation, and the rows of ``ms.particles`` that have a swelling kernel in it.

    Notes
    -----
    Axial stretch λ(z) = 1 + α·s(z) (+ g (z − z_cu) a if prescribed), with s the slab
    swelling profile smoothed by a Gaussian of half the median particle radius. Each
    particle's swelling kernel then carries the rest of its volume ratio,
    (1 + a)³ = J / λ(z_c), so the material of a particle's equivalent sphere ends
    with volume ratio J (an unlithiated particle stays rigid while the electrode stretches).
    """
    a = ms.voxel_size_um
    nz = ms.phase.shape[0]
    table = ms.particles
    big = ~np.asarray(table["fragment"], bool)
    r_med = float(np.median(table["equivalent_diameter_um"][big])) / 2 / a if big.any() else 2.0
    lam = 1.0 + sample.axial_accommodation_fraction * ndimage.gaussian_filter1d(
        state["swelling_density"], max(0.5, r_med / 2), mode="constant")
    lam[:ms.z_cu] = 1.0  # the Cu foil does not stretch
    if prescribed and sample.prescribed_axial_strain_gradient_per_um:
        z_um = (np.arange(nz) - ms.z_cu) * a
        lam = lam + sample.prescribed_axial_strain_gradient_per_um * np.clip(z_um, 0, None)
    centres = table[["z_vox", "y_vox", "x_vox"]].to_numpy(float)
    radii = np.asarray(table["equivalent_diameter_um"], float) / 2 / a
    J = np.asarray(state["volume_ratio"], float)
    amp = np.cbrt(J / np.interp(centres[:, 0], np.arange(nz), lam)) - 1.0
    # Kernels of particles under MIN_KERNEL_RADIUS_VOX (fragments) would move material by < a·R, a fraction of a
    # voxel, at a large cost; their swelling still enters the axial response through the swelling profile.
    amp = amp * swelling_scale
    keep = (np.abs(amp) > 1e-9) & (radii >= MIN_KERNEL_RADIUS_VOX)
    rows = np.flatnonzero(keep)
    centres, radii, amp = centres[keep], radii[keep], amp[keep]
    if state.get("bubble") is not None:
        c, r0 = state["bubble"]
        centres = np.vstack([centres, c])
        radii = np.append(radii, r0)
        amp = np.append(amp, BUBBLE_GROWTH - 1.0)
    bumps = np.asarray(sample.prescribed_bumps if prescribed else [], float).reshape(-1, 7)
    F_h = np.asarray(sample.prescribed_deformation_gradient, float) if prescribed and sample.prescribed_deformation_gradient else np.eye(3)
    deformation = Deformation(ms.phase.shape, a, swell_centre=centres, swell_radius=radii, swell_amplitude=amp,
                              bump_centre=bumps[:, :3] / a, bump_radius=bumps[:, 3] / a, bump_vector=bumps[:, 4:] / a,
                              axial_stretch=lam, homogeneous_F=F_h, rigid_below_z=ms.z_cu - 0.5)
    deformation.rigid_ramp_vox = _rigid_ramp(deformation)  # not part of the kernels' hash: set once they are known
    return deformation, rows


def _reaching(centres: np.ndarray, radii: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Indices of the swelling kernels (centres (k, 3), radii (k,), voxels) whose support reaches any of ``voxels``."""
    if not len(centres) or not len(voxels):
        return np.zeros(0, int)
    return np.flatnonzero(cKDTree(voxels).query_ball_point(centres, SUPPORT * radii, return_length=True) > 0)


def _rigid_ramp(deformation: Deformation) -> float:
    """Width (voxels) over which the mask m(z) that keeps the Cu rigid rises: the smallest r ≥ 3 with
    r ≥ RAMP_FACTOR × the largest |Σ u_k| on the planes less than r above the Cu (sampled every second voxel
    across), so that there m′ |u| ≤ 1.875 / RAMP_FACTOR and the mask alone cannot fold the map.

    The largest displacement near the Cu, not the electrode's (a particle near the separator may move
    material by several voxels): a ramp as wide as that would take the local swelling from the deep
    particles needlessly.
    """
    nz, ny, nx = deformation.shape
    z_rigid = float(deformation.rigid_below_z)
    across = np.stack(np.meshgrid(np.arange(0, ny, 2), np.arange(0, nx, 2), indexing="ij"), -1).reshape(-1, 2)
    points = np.column_stack([np.zeros(len(across)), across]).astype(float)
    largest = 0.0
    for z in range(int(np.floor(z_rigid)) + 1, nz):
        ramp = z - z_rigid
        if ramp >= 3.0 and ramp >= RAMP_FACTOR * largest:
            return ramp
        points[:, 0] = z
        u, _ = deformation._local_sum(points, False)
        largest = max(largest, float(np.sqrt((u**2).sum(axis=1)).max()))
    return max(3.0, nz - z_rigid)


# --- the scan's dataset ------------------------------------------------------------------------
_DIMS = ("z", "y", "x")
# name → (dims, dtype, attributes) of the scan's volumes in phantom.nc
_VOLUMES = {
    "phase": (_DIMS, np.uint8, {"description": "phantoms.phases.Phase: " + ", ".join(f"{p.value} {p.name}" for p in Phase)}),
    "particle": (_DIMS, np.int32, {"description": "particle instance label, 0 = none"}),
    "lithiation": (_DIMS, np.float32, {"description": "x in LixSi", "units": "1"}),
    "delta": (_DIMS, np.float32, {"description": "refractive index decrement δ", "units": "1"}),
    "beta": (_DIMS, np.float32, {"description": "absorption index β", "units": "1"}),
    "displacement": (("component",) + _DIMS, np.float32,
                     {"units": "voxel", "description": "Lagrangian displacement of the material point at this voxel "
                      "of the pristine T0 volume when imaged at this scan (spam convention of a Φ T0 → scan); "
                      "× voxel_size_um for µm"}),
}


def truth_for_scan(ms: Microstructure, sample, energy_kev: float, fractions, max_fractions, *, scan: str,
                   scan_index: int, seed: int) -> tuple[xr.Dataset, pd.DataFrame, Deformation]:
    """Everything ``truth`` writes for one scan, in memory: the Dataset, the particle table and the deformation.

    Parameters
    ----------
    ms
        Pristine microstructure.
    sample
        :class:`twin.scenario.Sample`.
    energy_kev
        Photon energy, keV.
    fractions, max_fractions
        f and f_max per row of ``ms.particles`` (see :func:`particle_fractions`).
    scan, scan_index
        Scan name and its position (0 = pristine T0: no prescribed fields).
    seed
        Recorded in the attributes.

    Raises
    ------
    phantoms.deformation.FoldingError
        If the deformation folds anywhere (det F ≤ 0).

    See Also
    --------
    write_truth : the same written to ``phantom.nc`` slab by slab as it is made (what the stage does).
    """
    shape = ms.phase.shape
    volumes = {name: np.empty((3,) + shape if len(dims) == 4 else shape, dtype) for name, (dims, dtype, _) in _VOLUMES.items()}
    table, deformation, attrs = _scan_truth(ms, sample, energy_kev, fractions, max_fractions, scan=scan,
                                            scan_index=scan_index, seed=seed, out=volumes)
    ds = xr.Dataset({name: (dims, volumes[name], attrs_) for name, (dims, _, attrs_) in _VOLUMES.items()},
                    coords={**_coords(shape, ms.voxel_size_um), "component": ("component", ["z", "y", "x"])})
    ds.attrs.update(attrs)
    return ds, table, deformation


def write_truth(ms: Microstructure, sample, energy_kev: float, fractions, max_fractions, *, scan: str,
                scan_index: int, seed: int, path: str | Path) -> tuple[pd.DataFrame, Deformation]:
    """:func:`truth_for_scan` streamed into the netCDF file ``path`` (compressed as ``twin.io.write_netcdf`` does).

    Each volume is written slab by slab as the displacement pass and the warp make it, so
    only the microstructure and the scan's reference state are held (the warped volumes and
    the displacement, 29 bytes per voxel, never are). The file is the one
    ``write_netcdf(truth_for_scan(...)[0], path)`` writes, variable for variable (tested), and
    appears only when complete. Returns the particle table and the deformation.
    """
    shape = ms.phase.shape
    coords = {dim: (values, attrs_) for dim, (_, values, attrs_) in _coords(shape, ms.voxel_size_um).items()}
    coords["component"] = (np.array(["z", "y", "x"]), {})
    with streamed_netcdf(path, {"z": shape[0], "y": shape[1], "x": shape[2], "component": 3}, _VOLUMES,
                         coords=coords) as f:
        # gzip (43 % of the time at 256³) runs while the compiled passes make the next slabs
        with WriteBehind() as behind:
            table, deformation, attrs = _scan_truth(ms, sample, energy_kev, fractions, max_fractions, scan=scan,
                                                    scan_index=scan_index, seed=seed,
                                                    out={name: behind.into(f.variables[name]) for name in _VOLUMES})
        f.attrs.update(attrs)
    return table, deformation


def _scan_truth(ms: Microstructure, sample, energy_kev, fractions, max_fractions, *, scan, scan_index, seed, out):
    """Write the scan's volumes into ``out`` (name → array or netCDF variable); return table, deformation, attrs."""
    state = scan_state(ms, sample, energy_kev, np.asarray(fractions, float), np.asarray(max_fractions, float),
                       bubble=scan in sample.gas_bubble_scans)
    swelling_scale = np.ones(len(ms.particles))
    deformation, rows = build_deformation(ms, sample, state, prescribed=scan_index > 0)
    for attempt in range(SWELLING_RETRIES + 1):
        try:
            deformation.displacement_field(check=True, out=out["displacement"])
            break
        except FoldingError as fold:
            # Superposed particle kernels can fold where several strongly swelling neighbours compress the same
            # pore (fragments of a cracked particle, say): the kernels that reach a folded voxel are damped, the
            # others keep their amplitude (the axial response keeps the swelling volume), and the truth stays
            # exactly the field applied. A fold no particle kernel reaches (a prescribed field) is refused as is.
            folding = rows[_reaching(deformation.swell_centre[:len(rows)], deformation.swell_radius[:len(rows)],
                                     fold.voxels)]  # the particles' kernels come first, a gas bubble's last
            if attempt == SWELLING_RETRIES or not folding.size:
                raise
            swelling_scale[folding] *= SWELLING_DAMPING
            deformation, rows = build_deformation(ms, sample, state, prescribed=scan_index > 0,
                                                  swelling_scale=swelling_scale)
    damped = swelling_scale < 1.0
    if damped.any():
        warnings.warn(f"truth {scan}: particle swelling kernels folded the map; the amplitudes of {damped.sum()} of "
                      f"{len(rows)} particles' kernels were scaled down (to {swelling_scale.min():.3g} at least)",
                      TwinWarning, stacklevel=3)
    rules = state["optics"]
    names = ("phase", "particle", "lithiation", "delta", "beta")
    deformation.warp({}, out=out, derived={names: (rules.scan_sampler(ms.particle), tuple(_VOLUMES[n][1] for n in names))})
    a = ms.voxel_size_um
    attrs = {"voxel_size_um": a, "energy_kev": energy_kev, "mechanism": sample.mechanism, "seed": int(seed),
             "scan": scan, "local_swelling_scale": float(swelling_scale.min(initial=1.0)), "z_cu_voxel": ms.z_cu,
             "z_top_voxel": ms.z_top}
    table = ms.particles.copy()
    table["lithiated_fraction"] = np.asarray(fractions, float)
    table["max_lithiated_fraction"] = np.asarray(max_fractions, float)
    table["measured_fraction"] = state["measured_fraction"]
    table["volume_ratio"] = state["volume_ratio"]
    table["swelling_scale"] = swelling_scale
    table["mechanism"] = sample.mechanism
    moved = deformation.map(table[["z_vox", "y_vox", "x_vox"]].to_numpy(float)) if len(table) else np.zeros((0, 3))
    for k, ax in enumerate("zyx"):
        table[f"{ax}_scan_um"] = moved[:, k] * a
    return table, deformation, attrs


def pristine_phantom(scenario) -> tuple[xr.Dataset, pd.DataFrame, Microstructure]:
    """The T0 phantom of a scenario without any rehearsal (``twin phantom SCENARIO`` with no ``--scan``).

    The microstructure is drawn from the same random stream as the ``microstructure`` stage
    (``run.seed``, stage name), so it is the very electrode that ``twin run`` images.
    """
    from twin.runner import node_seed_sequence

    rng = np.random.default_rng(node_seed_sequence(scenario.run.seed, "microstructure", None))
    ms = generate_microstructure(scenario.sample, rng)
    zeros = np.zeros(len(ms.particles))
    ds, table, _ = truth_for_scan(ms, scenario.sample, scenario.beamline.energy_kev, zeros, zeros, scan="T0",
                                  scan_index=0, seed=scenario.run.seed)
    return ds, table, ms


# --- stages ---------------------------------------------------------------------------------
def compute_microstructure(ctx) -> None:
    """Stage ``microstructure`` (once): ``microstructure.nc`` and ``particles.csv`` into ``ctx.out_dir``.

    Reads ``sample`` and ``beamline.energy_kev``; randomness from ``ctx.rng``.
    """
    ms = generate_microstructure(ctx.scenario.sample, ctx.rng)
    ds = microstructure_dataset(ms)
    ds.attrs.update({"energy_kev": ctx.scenario.beamline.energy_kev, "seed": ctx.scenario.run.seed})
    write_netcdf(ds, Path(ctx.out_dir) / "microstructure.nc")
    _write_csv(ms.particles, Path(ctx.out_dir) / "particles.csv")


def compute_truth(ctx) -> None:
    """Stage ``truth`` (per scan ``ctx.item``): ``phantom.nc``, ``particles.csv``, ``deformation.json``.

    Inputs: ``ctx.input("microstructure")`` (microstructure.nc, particles.csv) and
    ``ctx.input("rehearsal")`` / lithiation.nc (``lithiated_fraction`` (scan, depth_um, radius_um)).
    """
    ms = load_microstructure(ctx.input("microstructure"))
    path = Path(ctx.input("rehearsal")) / "lithiation.nc"
    try:
        with xr.open_dataset(path, engine=NETCDF_ENGINE) as f:
            lith = f["lithiated_fraction"].load()
    except (OSError, KeyError, ValueError) as exc:
        raise InputFileError(path, f"cannot read lithiated_fraction ({exc})") from None
    names = [str(s) for s in lith["scan"].values]
    frac, fmax = particle_fractions(lith, ctx.item, ms.particles)
    out = Path(ctx.out_dir)
    table, deformation = write_truth(ms, ctx.scenario.sample, ctx.scenario.beamline.energy_kev, frac, fmax, scan=ctx.item,
                                     scan_index=names.index(ctx.item), seed=ctx.scenario.run.seed, path=out / "phantom.nc")
    _write_csv(table, out / "particles.csv")
    with atomic_path(out / "deformation.json") as tmp:
        tmp.write_text(json.dumps(deformation.to_dict()))


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


# --- picture -----------------------------------------------------------------------------------
def write_phantom_png(dataset: xr.Dataset, path: str | Path) -> Path:
    """Orthogonal slices of ``phase``, ``lithiation`` and ``delta``: an x–z cut through the middle and a y–x cut
    through the middle of the electrode, with µm axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    a = float(dataset.attrs["voxel_size_um"])
    nz, ny, nx = dataset["phase"].shape
    zc = int(dataset.attrs.get("z_cu_voxel", 0))
    zt = int(dataset.attrs.get("z_top_voxel", nz))
    z_mid = (zc + zt) // 2
    colours = ["#1f3b73", "#d9d9d9", "#f2a541", "#8c8c8c", "#3a7d44", "#b05fa8", "#b87333", "#6fa8dc", "#ffffff"]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(len(Phase) + 1) - 0.5, len(Phase))
    fig, axes = plt.subplots(3, 2, figsize=(10, 12), gridspec_kw={"width_ratios": [1, 1]})
    for row, name in enumerate(("phase", "lithiation", "delta")):
        v = dataset[name].values
        if name == "phase":
            kw = {"cmap": cmap, "norm": norm, "interpolation": "nearest"}
        elif name == "lithiation":
            kw = {"cmap": "magma", "vmin": 0.0, "vmax": optics.X_FULL}
        else:  # grey scale spanning the electrode (the Cu foil would saturate it)
            lo, hi = np.percentile(v[zc:zt], [0.5, 99.5])
            kw = {"cmap": "gray", "vmin": lo, "vmax": hi}
        im = axes[row, 0].imshow(v[:, ny // 2, :], origin="lower", extent=(0, nx * a, 0, nz * a), **kw)
        axes[row, 0].set(title=f"{name}: x–z cut at y = {ny // 2 * a:.1f} µm", xlabel="x (µm)", ylabel="z (µm)")
        axes[row, 1].imshow(v[z_mid], origin="lower", extent=(0, nx * a, 0, ny * a), **kw)
        axes[row, 1].set(title=f"{name}: y–x cut at z = {z_mid * a:.1f} µm", xlabel="x (µm)", ylabel="y (µm)")
        cb = fig.colorbar(im, ax=axes[row].tolist(), shrink=0.8)
        if name == "phase":
            cb.set_ticks(range(len(Phase)))
            cb.set_ticklabels([p.name.lower() for p in Phase])
    fig.suptitle(f"phantom {dataset.attrs.get('scan', '')} — {dataset.attrs.get('mechanism', '')}, "
                 f"{a * 1000:.0f} nm voxels, {dataset.attrs.get('energy_kev', '')} keV")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
