"""The pristine electrode of the ``tiny`` scenario: fractions, reproducibility, geometry."""

import numpy as np
import pytest
import scipy.ndimage as ndimage
from hypothesis import given, settings
from hypothesis import strategies as st

from phantoms.microstructure import generate_microstructure, recipe_fractions
from phantoms.phases import Phase, si_mask
from twin.errors import ScenarioError
from twin.scenario import load_scenario


@pytest.fixture(scope="module")
def tiny():
    sc = load_scenario("tiny")
    return sc, generate_microstructure(sc.sample, np.random.default_rng(7))


def test_recipe_fractions_from_loading_and_densities():
    """3 mg/cm² over 20 µm = 1.5 g/cm³; 89 wt% Si at 2.329 g/cm³ is 57.3 % of the volume."""
    r = recipe_fractions(load_scenario("tiny").sample)
    assert r.coating_density_g_cm3 == pytest.approx(1.5)
    assert r.si == pytest.approx(0.89 * 1.5 / 2.329)
    assert r.cbd_domain == pytest.approx(r.cbd_solid / 0.5)
    with pytest.raises(ScenarioError, match="areal_loading_mg_cm2"):
        recipe_fractions(load_scenario("tiny", ["sample.areal_loading_mg_cm2=6.0"]).sample)


def test_volume_fractions_match_targets(tiny):
    """Si within 0.03 (cracks and the narrow pores of 400 nm voxels limit the fragments that fill the rest),
    CBD within 0.005 (a quantile), pores the rest."""
    sc, ms = tiny
    el = ms.phase[ms.z_cu:ms.z_top]
    assert si_mask(el).mean() == pytest.approx(ms.recipe.si, abs=0.03)
    assert (el == Phase.CBD).mean() == pytest.approx(ms.recipe.cbd_domain, abs=0.005)
    assert 0.1 < (el == Phase.ELECTROLYTE).mean() < 0.3
    assert np.all(ms.phase[:ms.z_cu] == Phase.COPPER)
    assert np.all(ms.phase[ms.z_top:] == Phase.SEPARATOR)
    assert ms.phase.shape == sc.volume_shape == (70, 64, 64)


def test_no_particle_touches_the_current_collector_and_labels_are_consistent(tiny):
    _, ms = tiny
    assert not np.any(ms.particle[:ms.z_cu])
    assert np.array_equal(ms.particle > 0, si_mask(ms.phase))
    assert set(np.unique(ms.particle)) - {0} == set(ms.particles["id"])


def test_particles_are_irregular_lognormal_and_cracked_near_the_top(tiny):
    sc, ms = tiny
    big = ms.particles[~ms.particles["fragment"]]
    # whole particles (not cut by the field of view) have the scenario's median diameter within 25 %
    assert big["equivalent_diameter_um"].median() == pytest.approx(sc.sample.particle_median_diameter_um, rel=0.25)
    # not spheres: a sphere fills its bounding box to π/6 = 0.52 at most... faceted grains fill more or less
    from scipy import ndimage
    fills = []
    for pid, sl in zip(big["id"], [ndimage.find_objects(ms.particle)[i - 1] for i in big["id"]]):
        box = ms.particle[sl] == pid
        fills.append(box.mean())
    assert np.std(fills) > 0.03
    cracked = ms.particles[ms.particles["cracked"]]
    assert len(cracked) > 0
    assert cracked["depth_um"].median() < big["depth_um"].median()


def test_same_seed_is_bit_identical_and_other_seed_differs(tiny):
    sc, ms = tiny
    again = generate_microstructure(sc.sample, np.random.default_rng(7))
    other = generate_microstructure(sc.sample, np.random.default_rng(8))
    for name in ("phase", "particle", "cbd_porosity", "surface_distance", "band_distance"):
        assert np.array_equal(getattr(ms, name), getattr(again, name)), name
    assert not np.array_equal(ms.particle, other.particle)
    assert (ms.phase != other.phase).mean() > 0.2
    # the other mechanism: the same electrode from the same seed, holding its own lithiation key only
    other_mechanism = "core_shell" if sc.sample.mechanism == "pathway" else "pathway"
    twin = generate_microstructure(sc.sample.model_copy(update={"mechanism": other_mechanism}), np.random.default_rng(7))
    for name in ("phase", "particle", "cbd_porosity"):
        assert np.array_equal(getattr(ms, name), getattr(twin, name)), name
    held = {m: (x.surface_distance is not None, x.band_distance is not None) for m, x in
            ((sc.sample.mechanism, ms), (other_mechanism, twin))}
    assert held == {"core_shell": (True, False), "pathway": (False, True)}


def test_texture_cbd_porosity_varies_inside_cbd(tiny):
    sc, ms = tiny
    p = ms.cbd_porosity[ms.phase == Phase.CBD]
    assert p.mean() == pytest.approx(sc.sample.cbd_nanoporosity, abs=0.02)
    assert p.std() > 0.05


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fill=st.floats(0.3, 0.995))
def test_distance_to_background_equals_scipy_edt(seed, fill):
    """The same distances as scipy's EDT (float32 precision), even for sparse background; labels: per-label EDT."""
    from phantoms.microstructure import distance_to_background

    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((23, 9, 11)) < fill) if fill < 0.9 else rng.random((23, 9, 11)) < fill
    mask[rng.integers(0, 23)] = True  # a full plane: distances reach across it
    mask[tuple(rng.integers(0, n) for n in mask.shape)] = False  # at least one background voxel
    np.testing.assert_allclose(distance_to_background(mask), ndimage.distance_transform_edt(mask), rtol=1e-6)
    labels = ndimage.label(mask)[0]
    labels[:, :, 5:] += np.where(labels[:, :, 5:] > 0, labels.max(), 0)  # each label split in two at x = 5
    expected = np.zeros(mask.shape)
    for k in np.unique(labels[labels > 0]):
        expected[labels == k] = ndimage.distance_transform_edt(labels == k)[labels == k]
    np.testing.assert_allclose(distance_to_background(labels), expected, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fill=st.floats(0.5, 0.99))
def test_a_ball_fits_in_the_pores_where_scipys_distance_transform_says(seed, fill):
    """fits_in_pore equals scipy's EDT of the pore space at the centre >= r + 1/2 (border voxels not background)."""
    from phantoms._voxelize import fits_in_pore

    rng = np.random.default_rng(seed)
    pore = rng.random((21, 17, 19)) < fill
    centres = np.column_stack([rng.integers(0, n, 200) for n in pore.shape]).astype(np.int64)
    radii = rng.uniform(0.2, 5.0, 200)
    room = ndimage.distance_transform_edt(np.pad(pore, 1, constant_values=True))[1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(fits_in_pore(centres, radii, pore), room[tuple(centres.T)] >= radii + 0.5)


@pytest.mark.parametrize("shape", [(64, 48, 80), (63, 47, 81)])  # even and odd: the Nyquist planes differ
@pytest.mark.parametrize("sigma", [0.8, 2.0, 3.5])
def test_smooth_noise_has_unit_variance_and_the_gaussian_correlation(sigma, shape):
    """White noise filtered by a Gaussian of σ has variance 1 and correlation exp(−d²/(4σ²)) at lag d. Over 16 fields,
    within 4 standard errors: one field's estimates scatter by ~√(2/N_eff), N_eff = N / (2πσ²)^(3/2) independent voxels."""
    from phantoms.microstructure import smooth_noise

    fields = [smooth_noise(shape, sigma, np.random.default_rng(seed)) for seed in range(16)]
    assert fields[0].dtype == np.float32 and fields[0].shape == shape
    n_eff = np.prod(shape) / (2 * np.pi * sigma**2) ** 1.5
    tol = 4 * np.sqrt(2 / n_eff) / np.sqrt(len(fields))
    assert np.mean([n.var() for n in fields]) == pytest.approx(1.0, abs=tol)
    for axis in range(3):
        for lag in (1, 2):
            corr = np.mean([np.mean(n * np.roll(n, lag, axis=axis)) / n.var() for n in fields])
            assert corr == pytest.approx(np.exp(-lag**2 / (4 * sigma**2)), abs=tol)


def test_fft_gaussian_filter_matches_scipy():
    """Periodic laterally as scipy's mode="wrap"; zero-padded along z as mode="constant"."""
    from phantoms.microstructure import gaussian_filter_fft

    v = np.random.default_rng(4).random((40, 32, 36)).astype(np.float32)
    expected = ndimage.gaussian_filter(v.astype(float), 2.5, mode=("constant", "wrap", "wrap"), truncate=6)
    np.testing.assert_allclose(gaussian_filter_fft(v, 2.5, pad_z=16), expected, atol=1e-6)  # measured 2e-7 (float32)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_fragments_are_the_voronoi_cells_of_their_centres_clipped_to_noisy_balls(seed):
    """The compiled painter equals the reference: owner = nearest centre by scipy's EDT, inside d ≤ r(1 + 0.25 n)."""
    from phantoms._voxelize import nearest_fragment

    rng = np.random.default_rng(seed)
    shape = (20, 18, 22)
    centres = np.column_stack([rng.integers(0, n, 12) for n in shape])
    centres = np.unique(centres, axis=0)
    radii = rng.uniform(0.6, 3.0, len(centres))
    pore = rng.random(shape) < 0.8
    noise = rng.standard_normal(shape).astype(np.float32)
    owner = nearest_fragment(centres.astype(np.int64), radii, 2 * 3.0 + 1.0, pore, noise)
    markers = np.ones(shape, bool)
    markers[tuple(centres.T)] = False
    dist, idx = ndimage.distance_transform_edt(markers, return_indices=True)
    index = np.full(shape, -1)
    index[tuple(centres.T)] = np.arange(len(centres))
    nearest = index[tuple(idx)]
    inside = pore & (dist <= radii[nearest] * (1 + 0.25 * np.clip(noise, -4, 4)))
    # ties between equidistant centres may go either way: compare where the nearest centre is unique
    d_all = np.linalg.norm(np.indices(shape).reshape(3, -1).T[:, None] - centres[None], axis=2).reshape(shape + (len(centres),))
    unique = (np.sort(d_all, axis=-1)[..., 1] - np.sort(d_all, axis=-1)[..., 0]) > 1e-9
    np.testing.assert_array_equal(np.where(inside, nearest, -1)[unique], owner[unique])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), block=st.sampled_from([1, 3, 8]))
def test_power_cells_equal_the_lifted_kdtree_query(seed, block):
    """The per-block candidate search gives every voxel the seed of least power |X − s|² − w, as a KD-tree
    query in the lifted 4-D metric |(X, 0) − (s, √(W − w))|² does; the gauge uses that seed's facets."""
    from scipy.spatial import cKDTree

    from phantoms._voxelize import power_cells

    rng = np.random.default_rng(seed)
    shape = (13, 17, 11)
    seeds = rng.uniform(-4, 20, (25, 3)) + [3.0, 0, 0]
    weights = rng.uniform(0, 30, 25)
    facets = rng.standard_normal((25, 5, 3))
    h_min, roundness = rng.uniform(1, 3, 25), rng.uniform(0, 0.6, 25)
    noise = rng.standard_normal(shape).astype(np.float32)
    cell = np.empty(shape, np.int32)
    gauge = np.empty(shape, np.float32)
    power_cells(3.0, seeds, weights, facets, h_min, roundness, noise, 0.1, block, cell, gauge)
    X = np.indices(shape).reshape(3, -1).T + [3.0, 0, 0]
    lifted = np.column_stack([seeds, np.sqrt(weights.max() - weights)])
    _, lab = cKDTree(lifted).query(np.column_stack([X, np.zeros(len(X))]))
    np.testing.assert_array_equal(cell.reshape(-1), lab + 1)
    y = X - seeds[lab]
    g = (1 - roundness[lab]) * np.einsum("nkj,nj->nk", facets[lab], y).max(axis=1) \
        + roundness[lab] * np.linalg.norm(y, axis=1) / h_min[lab]
    np.testing.assert_allclose(gauge.reshape(-1), g * (1 + 0.1 * noise.reshape(-1)), rtol=1e-5, atol=1e-5)


def test_label_centres_and_band_distances_match_numpy():
    from phantoms._voxelize import band_distance, label_centres

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, (9, 10, 11)).astype(np.int32)
    count, centre = label_centres(labels, 4)
    for k in range(1, 4):
        np.testing.assert_allclose(centre[k], ndimage.center_of_mass(labels == k))
        assert count[k] == np.count_nonzero(labels == k)
    assert count[4] == 0
    normals = rng.standard_normal((5, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    planes = np.column_stack([normals, rng.uniform(-3, 3, 5)])
    starts = np.array([0, 0, 2, 2, 5, 5])  # particle 2 has no planes: distance 0
    noise = rng.standard_normal(labels.shape).astype(np.float32)
    out = band_distance(labels, planes, starts, noise, 0.5, 3)  # the layers from z = 3 on
    X = np.indices(labels.shape).reshape(3, -1).T + [3, 0, 0]
    for k, rows in ((1, slice(0, 2)), (3, slice(2, 5))):
        own = labels.reshape(-1) == k
        d = np.abs(X[own] @ planes[rows, :3].T - planes[rows, 3]).min(axis=1)
        np.testing.assert_allclose(out.reshape(-1)[own], np.clip(d + 0.5 * noise.reshape(-1)[own], 0, None), rtol=1e-5, atol=1e-6)
    assert np.all(out[labels == 0] == 0) and np.all(out[labels == 2] == 0)
