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


def test_texture_cbd_porosity_varies_inside_cbd(tiny):
    sc, ms = tiny
    p = ms.cbd_porosity[ms.phase == Phase.CBD]
    assert p.mean() == pytest.approx(sc.sample.cbd_nanoporosity, abs=0.02)
    assert p.std() > 0.05


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fill=st.floats(0.3, 0.995), chunk=st.integers(1, 400))
def test_distance_to_background_by_slabs_equals_scipy_edt(seed, fill, chunk):
    """Exact equality with the whole-volume EDT, whatever the slab size (1 plane to all), even for sparse background."""
    from phantoms.microstructure import distance_to_background

    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((23, 9, 11)) < fill) if fill < 0.9 else rng.random((23, 9, 11)) < fill
    mask[rng.integers(0, 23)] = True  # a full plane: its distances reach across slabs
    mask[tuple(rng.integers(0, n) for n in mask.shape)] = False  # at least one background voxel
    expected = ndimage.distance_transform_edt(mask)
    np.testing.assert_array_equal(distance_to_background(mask, dtype=np.float64, chunk_voxels=chunk), expected)
