"""The pristine electrode: Cu foil, irregular Si particles, CBD at necks, pores, fragments, separator.

Particles are shrunk, noise-perturbed cells of a Laguerre (power) tessellation
of a random sphere packing: the packing sets the lognormal size distribution,
the cells make faceted, irregular grains (jet-milled Si is angular, Figs S11,
S16-S17), and shrinking every cell about its seed by the same gauge level packs
them to the recipe's Si volume fraction (57 % at the seed's loading), far beyond
the ~38 % that random sequential addition of convex bodies can reach, without
any overlap: each voxel belongs to one cell.

No library builds this: PoreSpy (not a dependency) packs spheres only,
``scipy.spatial.Voronoi`` has no weights and gives polyhedra, not voxels. The
power cell of a voxel (the seed of least power |X − s|² − w) is found by
:func:`phantoms._voxelize.power_cells` among the few seeds that can own a block.

Gauge of a convex cell about its seed: for y = X − s_i,
g(y) = max_j (y·n_ij) / h_ij over the facet planes {y·n_ij = h_ij}, with
n_ij = d/|d|, h_ij = (|d|² − w_j + w_i) / (2|d|), d = s_j − s_i. Redundant
planes do not change g, so the K nearest seeds plus the Cu and top planes
suffice. A particle is {g' < k} with g' = g mixed with a rounded gauge and
multiplied by smooth noise; k is the quantile that gives the target fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import edt
from scipy import fft, ndimage
from scipy.spatial import cKDTree

from phantoms import _voxelize, optics
from phantoms.phases import Phase
from twin.errors import ScenarioError

N_FACET_CANDIDATES = 16  # nearest seeds whose bisector planes bound a cell
RSA_PACKING = 0.30  # sphere packing fraction of the seeds (random sequential addition reaches ~0.38)
SHAPE_NOISE = 0.10  # relative amplitude of the smooth surface perturbation of the gauge
BAND_CUTOFF = 1e-8  # a Gaussian transfer below this is dropped (float32 resolves 6e-8 of a field's scale)


@dataclass(frozen=True)
class Recipe:
    """Volume fractions of the electrode from the slurry recipe, loading and densities (seed Note 1).

    Attributes
    ----------
    coating_density_g_cm3
        Areal loading / thickness.
    si, cbd_solid, cbd_domain, pore
        Volume fractions of the electrode layer; the CBD domain includes its nanopores.
    """

    coating_density_g_cm3: float
    si: float
    cbd_solid: float
    cbd_domain: float
    pore: float


def recipe_fractions(sample) -> Recipe:
    """Volume fractions from ``sample`` (mass fractions, areal loading, thickness, CBD nanoporosity).

    φ_Si = w_Si ρ_coat / ρ_Si, φ_CBD,solid = ρ_coat Σ w_k / ρ_k (binder, carbon
    black, SWCNT), φ_CBD,domain = φ_CBD,solid / (1 − p_CBD),
    ρ_coat = loading / thickness.

    Raises
    ------
    ScenarioError
        When Si and CBD do not fit in the layer (loading too high for the thickness).
    """
    rho = sample.areal_loading_mg_cm2 * 1e-3 / (sample.electrode_thickness_um * 1e-4)
    si = sample.si_mass_fraction * rho / optics.RHO_C_SI
    solid = rho * (sample.binder_mass_fraction / optics.RHO_PAA + sample.carbon_black_mass_fraction / optics.RHO_CARBON_BLACK
                   + sample.swcnt_mass_fraction / optics.RHO_SWCNT)
    domain = solid / (1.0 - sample.cbd_nanoporosity)
    if si + domain >= 0.95:
        raise ScenarioError(
            f"sample.areal_loading_mg_cm2: {sample.areal_loading_mg_cm2} mg/cm² on sample.electrode_thickness_um = "
            f"{sample.electrode_thickness_um} µm gives Si {si:.2f} + CBD {domain:.2f} of the volume (CBD nanoporosity "
            f"{sample.cbd_nanoporosity}); they must leave >= 5 % pores")
    return Recipe(rho, si, solid, domain, 1.0 - si - domain)


@dataclass
class Microstructure:
    """The pristine electrode on the voxel grid (z, y, x); z = 0 at the bottom of the Cu foil.

    Attributes
    ----------
    phase
        uint8 :class:`~phantoms.phases.Phase` labels (T0: crystalline Si, no SEI).
    particle
        int32 instance labels, 0 = none; cracked particles keep one label for their fragments.
    cbd_porosity
        float32 local electrolyte fraction inside CBD voxels (0 elsewhere): the CBD texture.
    surface_distance
        float32 distance of each Si voxel to its particle's surface (cracks included), voxels: the
        core–shell key; None when the sample's mechanism is pathway (one key held, not two).
    band_distance
        float32 distance of each Si voxel to its particle's nearest lithiation band plane, voxels: the
        pathway key; None for core–shell. The band planes are drawn either way, so both mechanisms get
        the same electrode from the same seed.
    particles
        One row per particle: id, centre (voxels and µm), volume, equivalent diameter, depth
        below the electrode top, cracked, fragment.
    voxel_size_um, z_cu, z_top
        Voxel edge and the first voxel layer of the electrode / of the separator.
    recipe
        Target volume fractions.
    """

    phase: np.ndarray
    particle: np.ndarray
    cbd_porosity: np.ndarray
    surface_distance: np.ndarray | None
    band_distance: np.ndarray | None
    particles: pd.DataFrame
    voxel_size_um: float
    z_cu: int
    z_top: int
    recipe: Recipe


def distance_to_background(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels, float32) of every voxel to the nearest voxel of another label.

    ``mask`` is boolean (distance to the nearest False voxel, as
    ``scipy.ndimage.distance_transform_edt``) or integer labels (each labelled
    voxel: distance to the nearest voxel not of its label, 0 included; 0 voxels
    get 0). The volume's border is not background. Computed by ``edt``
    (seung-lab): ~4× faster than scipy's and it holds only the float32 output,
    where scipy holds ~24 bytes per voxel. A volume without background gets inf.
    """
    return edt.edt(np.ascontiguousarray(mask), black_border=False)


def gaussian_filter_fft(volume: np.ndarray, sigma_vox: float, *, pad_z: int = 0) -> np.ndarray:
    """Gaussian filter (σ in voxels) of a 3-D volume by FFT, float32: periodic, except along z with ``pad_z`` zero
    planes at each end.

    The transfer function is the continuous Gaussian's, exp(−2π²σ²f²), on the DFT grid, and
    only the frequencies where it is at least BAND_CUTOFF are transformed (:func:`_bands`): for
    σ of a few voxels and more most of the spectrum is dropped, unread and unwritten. At σ ~ 1 a
    real FFT pair (scipy.fft, all cores) costs about a fifth of ``scipy.ndimage.gaussian_filter``'s passes.
    """
    if pad_z:
        volume = np.pad(volume, ((pad_z, pad_z),) + ((0, 0),) * (volume.ndim - 1))
    shape = volume.shape
    bands = _bands(shape, sigma_vox)
    spectrum = fft.rfft(volume.astype(np.float32, copy=False), axis=2, workers=-1)[..., bands[2][0]]
    del volume
    for ax in (1, 0):
        spectrum = fft.fft(spectrum, axis=ax, workers=-1, overwrite_x=True)[(slice(None),) * ax + (bands[ax][0],)]
    spectrum *= _transfer(bands)
    out = _irfftn_band(spectrum, bands, shape)
    return out[pad_z:shape[0] - pad_z] if pad_z else out


def smooth_noise(shape, sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Periodic Gaussian-filtered white noise on a 3-D grid (σ in voxels, at least 0.5), float32, unit variance in
    expectation.

    Drawn in the Fourier domain: the DFT of unit white noise on N voxels has independent complex
    Gaussian coefficients of mean |c|² = N (Hermitian: real on the planes the last axis's real
    transform keeps once, whose real part alone it reads, hence √2 there). Only the coefficients
    where the Gaussian's transfer is at least BAND_CUTOFF are drawn and transformed back. The
    scale is the expected standard deviation, √(mean |H(f)|²) over the DFT grid, not the sample's:
    fields do not depend on their own realisation.
    """
    sigma = max(sigma_vox, 0.5)
    bands = _bands(shape, sigma)
    spectrum = np.empty(tuple(len(bins) for bins, _ in bands), np.complex64)
    rng.standard_normal(dtype=np.float32, out=spectrum.view(np.float32))  # real and imaginary parts, N(0, 1) each
    expected_var = float(np.prod([np.mean(np.exp(-4 * (np.pi * sigma * fft.fftfreq(n)) ** 2)) for n in shape]))
    spectrum *= _transfer(bands) * np.float32(np.sqrt(np.prod(shape) / 2 / expected_var))
    self_conjugate = (bands[2][0] == 0) | (2 * bands[2][0] == shape[2])  # the last axis's f = 0 and Nyquist planes
    spectrum[..., self_conjugate] *= np.float32(np.sqrt(2))
    return _irfftn_band(spectrum, bands, shape)


def _bands(shape, sigma_vox: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per axis of a 3-D grid, the DFT bins (the last axis: of its real transform) where the Gaussian's transfer
    exp(−2π²σ²f²) is at least BAND_CUTOFF, and that transfer there."""
    bands = []
    for ax, n in enumerate(shape):
        f = fft.rfftfreq(n) if ax == len(shape) - 1 else fft.fftfreq(n)
        h = np.exp(-2 * (np.pi * sigma_vox * f) ** 2)
        bins = np.flatnonzero(h >= BAND_CUTOFF)
        bands.append((bins, h[bins].astype(np.float32)))
    return bands


def _transfer(bands) -> np.ndarray:
    """The separable transfer on the band's bins, float32, broadcastable over the banded spectrum."""
    return bands[0][1][:, None, None] * bands[1][1][None, :, None] * bands[2][1][None, None, :]


def _irfftn_band(spectrum: np.ndarray, bands, shape) -> np.ndarray:
    """``scipy.fft.irfftn`` of a half spectrum that is zero outside the ``bands``' bins (``spectrum``: those bins),
    float32: axis by axis, each transform over the lines that carry anything."""
    for ax in (0, 1):
        bins = bands[ax][0]
        if bins.size < shape[ax]:
            full = np.zeros(spectrum.shape[:ax] + (shape[ax],) + spectrum.shape[ax + 1:], np.complex64)
            full[(slice(None),) * ax + (bins,)] = spectrum
            spectrum = full
        spectrum = fft.ifft(spectrum, axis=ax, workers=-1, overwrite_x=True)
    # the bins of the last axis start at f = 0 and irfft zero-pads the missing ones at the top
    return fft.irfft(spectrum, n=shape[2], axis=2, workers=-1, overwrite_x=True)


def _pack_seeds(diam_vox: np.ndarray, box_lo: np.ndarray, box_hi: np.ndarray, scale: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random sequential addition of non-overlapping spheres of radius scale·d/2, largest first.

    A sphere that finds no room in 200 tries is dropped (its volume is recovered
    by the quantile on the gauge). Returns centres (n, 3) and radii (n,), voxels.
    """
    order = np.argsort(diam_vox)[::-1]
    centres, radii = [], []
    for i in order:
        r = scale * diam_vox[i] / 2
        lo, hi = box_lo.copy(), box_hi.copy()
        lo[0] += r
        hi[0] -= r
        if hi[0] <= lo[0]:
            continue
        cand = lo + rng.random((200, 3)) * (hi - lo)
        if centres:
            c, rr = np.asarray(centres), np.asarray(radii)
            d = np.linalg.norm(cand[:, None, :] - c[None], axis=2) - rr[None] - r
            ok = np.flatnonzero((d >= 0).all(axis=1))
        else:
            ok = np.array([0])
        if ok.size:
            centres.append(cand[ok[0]])
            radii.append(r)
    return np.asarray(centres), np.asarray(radii)


def _facets(seeds: np.ndarray, weights: np.ndarray, z_lo: float, z_hi: float) -> np.ndarray:
    """Per seed, the rows n_ij / h_ij of its candidate facet planes (K seeds + bottom + top), shape (n, K+2, 3)."""
    k = min(N_FACET_CANDIDATES, len(seeds) - 1)
    rows = np.zeros((len(seeds), k + 2, 3))
    if k > 0:
        _, nn = cKDTree(seeds).query(seeds, k=k + 1)
        d = seeds[nn[:, 1:]] - seeds[:, None, :]
        dist = np.linalg.norm(d, axis=2)
        h = (dist**2 - weights[nn[:, 1:]] + weights[:, None]) / (2 * dist)
        # A seed inside its neighbour's sphere would give h <= 0: impossible for a packing, guarded anyway.
        rows[:, :k] = d / dist[..., None] / np.maximum(h, 1e-6)[..., None]
    rows[:, k, 0] = -1.0 / (seeds[:, 0] - z_lo)  # the Cu plane z = z_lo
    rows[:, k + 1, 0] = 1.0 / (z_hi - seeds[:, 0])  # the top plane z = z_hi
    return rows


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


_111 = np.array([[1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, 1, 1]]) / np.sqrt(3)


def generate_microstructure(sample, rng: np.random.Generator) -> Microstructure:
    """Build the pristine electrode of a scenario's ``sample`` section.

    Parameters
    ----------
    sample
        :class:`twin.scenario.Sample` (sizes in µm, recipe, size distribution, cracks, CBD porosity).
    rng
        The only source of randomness (a stage passes ``ctx.rng``).

    Returns
    -------
    Microstructure

    Notes
    -----
    Steps: (1) volume fractions from the recipe (:func:`recipe_fractions`);
    (2) lognormal diameters D ~ LN(ln D50, σ) until their volume fills the Si
    target, packed as spheres of D·(0.30/φ_Si)^(1/3); (3) Laguerre cells with
    weights r², gauge g mixed per particle with the rounded gauge |y|/h_min
    (share β ~ U(0, 0.6)) and perturbed by smooth noise; particle = {g' < k},
    k the quantile that gives φ_Si − φ_fragments; (4) cracks: a wavy planar gap
    through the centre of a fraction of particles, with probability ∝
    exp(−depth / (thickness/4)) (calendering damages the top, Fig S16);
    (5) small irregular Si fragments in the widest pores; (6) CBD: the pore
    voxels where smoothed Si density is highest (necks, contacts), plus
    agglomerate noise, up to the recipe's CBD fraction, with a local
    nanoporosity field; (7) lithiation band planes along {111} of a random
    crystal orientation per particle (for the pathway mechanism).
    """
    a = sample.voxel_size_um
    nz = round((sample.current_collector_thickness_um + sample.electrode_thickness_um + sample.headroom_um) / a)
    n_lat = round(sample.lateral_size_um / a)
    shape = (nz, n_lat, n_lat)
    z_cu = round(sample.current_collector_thickness_um / a)
    z_top = min(nz, z_cu + round(sample.electrode_thickness_um / a))
    recipe = recipe_fractions(sample)
    target_big = recipe.si - sample.fragment_volume_fraction
    if target_big <= 0.05:
        raise ScenarioError(f"sample.fragment_volume_fraction: {sample.fragment_volume_fraction} leaves almost no large "
                            f"particles of the Si fraction {recipe.si:.3f}")

    # (2) sizes and seeds, in an extended lateral box so the field of view is statistically homogeneous
    d50 = sample.particle_median_diameter_um / a
    margin = d50
    lo = np.array([z_cu, -margin, -margin], float)
    hi = np.array([z_top, n_lat + margin, n_lat + margin], float)
    v_box = float(np.prod(hi - lo))
    diam = []
    vol = 0.0
    while vol < target_big * v_box:
        d = d50 * np.exp(sample.particle_diameter_log_sigma * rng.standard_normal())
        d = min(d, 0.95 * (z_top - z_cu))
        diam.append(d)
        vol += np.pi / 6 * d**3
    scale = (RSA_PACKING / target_big) ** (1 / 3)
    seeds, radii = _pack_seeds(np.asarray(diam), lo, hi, scale, rng)
    weights = radii**2
    facets = _facets(seeds, weights, z_cu - 0.5, z_top - 0.5)
    h_min = 1.0 / np.abs(np.linalg.norm(facets, axis=2)).max(axis=1)
    roundness = rng.uniform(0.0, 0.6, len(seeds))

    # (3) power cells and gauges, slab by slab
    ez = z_top - z_cu
    cell = np.empty((ez, n_lat, n_lat), np.int32)
    gauge = np.empty((ez, n_lat, n_lat), np.float32)
    shape_noise = smooth_noise((ez, n_lat, n_lat), 0.12 * d50, rng)
    _voxelize.power_cells(float(z_cu), seeds, weights, facets, h_min, roundness, shape_noise, SHAPE_NOISE, 8, cell, gauge)
    k = np.quantile(gauge, target_big)
    labels = np.where(gauge < k, cell, 0)
    del gauge, cell, shape_noise
    # keep the largest connected piece of each particle: noise can split off specks
    labels = _relabel(labels)

    particle = np.zeros(shape, np.int32)
    particle[z_cu:z_top] = labels
    del labels

    # (4) cracks near the top (Fig S16)
    objs = ndimage.find_objects(particle)
    ids = [i + 1 for i, s in enumerate(objs) if s is not None]
    centres = _voxelize.label_centres(particle, len(objs))[1][ids] if ids else np.zeros((0, 3))
    depth_vox = (z_top - 0.5) - centres[:, 0]
    p_crack = np.exp(-depth_vox / ((z_top - z_cu) / 4))
    p_crack *= sample.cracked_particle_fraction * len(ids) / max(p_crack.sum(), 1e-12)
    cracked = rng.random(len(ids)) < np.clip(p_crack, 0, 1)
    half_width = max(0.5, 0.075 / a)  # at least one voxel layer wide; 150 nm otherwise
    for pid, c, is_cracked in zip(ids, centres, cracked):
        if not is_cracked:
            continue
        sl = objs[pid - 1]
        sub = particle[sl]
        n = rng.standard_normal(3)
        n /= np.linalg.norm(n)
        grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1).astype(float)
        dist = np.abs((grid - c) @ n + rng.normal(0, 0.1 * d50 / 2))
        wav = 0.4 * np.sin((grid @ _random_rotation(rng)[0]) / max(1.0, 0.15 * d50))
        sub[(sub == pid) & (dist + wav < half_width)] = 0

    # (5) fragments in the widest pores. From here on the fields live on the electrode's layers and one
    # background plane either side (slice e): nothing but Cu and separator lies beyond.
    e_lo, e_hi = max(0, z_cu - 1), min(nz, z_top + 1)
    e = slice(e_lo, e_hi)
    e_shape = (e_hi - e_lo, n_lat, n_lat)
    pore = np.zeros(e_shape, bool)
    pore[z_cu - e_lo:z_top - e_lo] = particle[z_cu:z_top] == 0
    # Fragments also make up for the Si that cracks and dropped specks removed, so the total Si matches the recipe.
    n_frag_target = recipe.si * (z_top - z_cu) * n_lat * n_lat - np.count_nonzero(particle)
    fragment_ids = []
    if n_frag_target > 0:
        r_lo, r_hi = max(0.6, 0.25 / a), max(0.6, 0.6 / a)
        mean_vol = 4 / 3 * np.pi * ((r_lo + r_hi) / 2) ** 3
        n_cand = int(30 * n_frag_target / mean_vol) + 16
        cand = np.column_stack([rng.uniform(z_cu, z_top - 1, n_cand), rng.uniform(0, n_lat - 1, (n_cand, 2))])
        r_cand = rng.uniform(r_lo, r_hi, n_cand)
        centres_e = np.round(cand).astype(np.int64) - [e_lo, 0, 0]
        ok = _voxelize.fits_in_pore(centres_e, r_cand, pore)
        cand, r_cand, centres_e = cand[ok], r_cand[ok], centres_e[ok]
        # drop every candidate that would touch an earlier one (earlier ones win; no sequential pass needed)
        keep = np.ones(len(cand), bool)
        if len(cand) > 1:
            pairs = cKDTree(cand).query_pairs(2 * r_hi + 1.0, output_type="ndarray")
            close = np.linalg.norm(cand[pairs[:, 0]] - cand[pairs[:, 1]], axis=1) < r_cand[pairs[:, 0]] + r_cand[pairs[:, 1]] + 1.0
            keep[pairs[close].max(axis=1)] = False
        cand, r_cand, centres_e = cand[keep], r_cand[keep], centres_e[keep]
        frag_noise = smooth_noise(e_shape, 0.7, rng)
        owner = _voxelize.nearest_fragment(centres_e, r_cand, 2 * r_hi + 1.0, pore, frag_noise)
        del frag_noise
        # take fragments in their random order until their voxels reach the target
        counts = np.bincount(owner[owner >= 0], minlength=len(cand))
        n_take = min(len(cand), int(np.searchsorted(np.cumsum(counts), n_frag_target)) + 1)
        inside = (owner >= 0) & (owner < n_take)
        cand = cand[:n_take]
        first = int(particle.max()) + 1
        particle[e][inside] = first + owner[inside]
        fragment_ids = list(range(first, first + len(cand)))
        del owner, inside

    # Distance of Si voxels to their particle's own surface: contacts with other particles count as surface.
    surface = None
    if sample.mechanism == "core_shell":
        surface = np.zeros(shape, np.float32)
        surface[e] = distance_to_background(particle[e])  # the same distances as over the whole volume

    # (6) CBD at necks and contacts
    si = particle[e] > 0
    score = gaussian_filter_fft(si, 0.18 * d50, pad_z=int(np.ceil(4 * 0.18 * d50)))  # laterally periodic
    score += 0.12 * smooth_noise(e_shape, max(0.5, 0.4 / a), rng)  # agglomerates
    pore &= ~si
    n_cbd = int(round(recipe.cbd_domain * (z_top - z_cu) * n_lat * n_lat))
    pore_scores = score[pore]
    n_cbd = min(n_cbd, pore_scores.size)
    cbd = np.zeros(e_shape, bool)
    if n_cbd > 0:
        thresh = np.partition(pore_scores, pore_scores.size - n_cbd)[pore_scores.size - n_cbd]
        cbd = pore & (score >= thresh)
    del score, pore_scores, pore
    # One sub-voxel texture field serves the CBD's nanoporosity and the bands' edge roughness: they use disjoint voxels.
    texture = smooth_noise(e_shape, 0.7, rng)
    cbd_porosity = np.zeros(shape, np.float32)
    cbd_porosity[e] = np.where(cbd, np.clip(sample.cbd_nanoporosity + 0.15 * texture, 0.02, 0.98), 0)

    phase = np.full(shape, Phase.ELECTROLYTE, np.uint8)
    phase[:z_cu] = Phase.COPPER
    phase[z_top:] = Phase.SEPARATOR
    phase[e][cbd] = Phase.CBD
    phase[e][si] = Phase.SI_CRYSTALLINE
    del cbd, si

    # (7) lithiation band planes per particle, and each Si voxel's distance to its particle's nearest one
    n_labels = int(particle.max())
    counts, com = _voxelize.label_centres(particle, n_labels)
    rows = []
    fragment_set = set(fragment_ids)
    plane_rows, plane_starts = [], [0] * (n_labels + 2)
    for pid in range(1, n_labels + 1):
        nvox = int(counts[pid])
        plane_starts[pid + 1] = plane_starts[pid]
        if nvox == 0:
            continue
        c = com[pid]
        r_eq = (3 * nvox / (4 * np.pi)) ** (1 / 3)
        rot = _random_rotation(rng)
        families = rng.choice(4, size=rng.integers(2, 4), replace=False)
        planes = []
        for f in families:
            nrm = rot @ _111[f]
            n_par = 1 + int(r_eq // max(2.0, 1.5 / a))  # one more band per 1.5 µm of radius
            offsets = (np.arange(n_par) - (n_par - 1) / 2) * (2 * r_eq / (n_par + 1)) + rng.normal(0, 0.2 * r_eq)
            planes += [(nrm, c + o * nrm) for o in offsets]
        normals = np.array([p[0] for p in planes])
        points = np.array([p[1] for p in planes])
        plane_rows.append(np.column_stack([normals, np.einsum("bk,bk->b", points, normals)]))
        plane_starts[pid + 1] += len(planes)
        depth_um = (z_top - 0.5 - c[0]) * a
        rows.append({"id": pid, "z_vox": c[0], "y_vox": c[1], "x_vox": c[2], "z_um": c[0] * a, "y_um": c[1] * a,
                     "x_um": c[2] * a, "volume_vox": nvox, "equivalent_diameter_um": 2 * r_eq * a,
                     "depth_um": depth_um, "cracked": False, "fragment": pid in fragment_set})
    planes = np.concatenate(plane_rows) if plane_rows else np.zeros((0, 4))
    band = None
    if sample.mechanism == "pathway":
        band = np.zeros(shape, np.float32)
        band[e] = _voxelize.band_distance(particle[e], planes, np.asarray(plane_starts, np.int64), texture, 0.5, e_lo)
    table = pd.DataFrame(rows)
    if len(table):
        cracked_ids = {pid for pid, cr in zip(ids, cracked) if cr}
        table["cracked"] = table["id"].isin(cracked_ids)
    del texture
    return Microstructure(phase, particle, cbd_porosity, surface, band, table, a, z_cu, z_top, recipe)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Keep each label's largest 6-connected component and number labels 1..n in order of first appearance."""
    out = np.zeros_like(labels)
    objs = ndimage.find_objects(labels)
    n = 0
    for i, sl in enumerate(objs):
        if sl is None:
            continue
        own = labels[sl] == i + 1
        comp, nc = ndimage.label(own)
        if nc > 1:
            sizes = np.bincount(comp.ravel())[1:]
            own = comp == 1 + int(np.argmax(sizes))
        if own.sum() < 8:
            continue
        n += 1
        out[sl][own] = n
    return out
