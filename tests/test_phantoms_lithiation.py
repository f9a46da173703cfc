"""Lithiation mechanisms: per-particle conservation, the core-shell sphere front, delithiation leftovers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from phantoms.lithiation import front_level, lithiate, lithiate_particle
from phantoms.optics import X_FULL
from phantoms.phases import Phase


def _random_shape(seed: int, n: int = 24) -> np.ndarray:
    """An irregular blob: thresholded smooth noise, largest component, padded with background."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 3.0)
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    blob = (field - 0.02 * r) > np.quantile(field - 0.02 * r, 0.8)
    lab, k = ndimage.label(blob)
    blob = lab == 1 + np.argmax(np.bincount(lab.ravel())[1:])
    return np.pad(blob, 1)


def _keys(mask: np.ndarray, mechanism: str, seed: int) -> np.ndarray:
    if mechanism == "core_shell":
        return ndimage.distance_transform_edt(mask)
    rng = np.random.default_rng(seed)
    pts = np.argwhere(mask).astype(float)
    normals = rng.standard_normal((3, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    centre = pts.mean(axis=0)
    key = np.zeros(mask.shape)
    key[mask] = np.abs((pts - centre) @ normals.T).min(axis=1)
    return key


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), f_max=st.floats(0.0, 1.0), ratio=st.floats(0.0, 1.0),
       width=st.sampled_from([0.0, 0.3, 0.5, 1.5]), mechanism=st.sampled_from(["core_shell", "pathway"]))
def test_lithiated_fraction_is_conserved_on_random_shapes(seed, f_max, ratio, width, mechanism):
    """mean(x)/3.75 equals f exactly for smooth fronts; the lithiated *phase* volume is within one voxel
    layer (the particle's surface voxel count) of f·N for both mechanisms."""
    mask = _random_shape(seed)
    key = _keys(mask, mechanism, seed)
    f = f_max * ratio
    x, phase = lithiate_particle(key[mask], f, f_max, width)
    n = mask.sum()
    tol = 1e-6 if width > 0 else 0.5 / n
    assert x.mean() / X_FULL == pytest.approx(f, abs=tol)
    swept = np.isin(phase, [Phase.SI_LITHIATED, Phase.SI_AMORPHOUS]).sum()
    surface_layer = (mask & ~ndimage.binary_erosion(mask)).sum()
    assert abs(swept - f_max * n) <= surface_layer


@pytest.mark.parametrize("f", [0.1, 0.3, 0.6, 0.9])
def test_core_shell_front_of_a_sphere_sits_at_r_one_minus_f_cube_root(f):
    """For a sphere of radius R the sharp front lies at R (1 − f)^(1/3) (within a voxel)."""
    R, n = 20.0, 45
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    mask = r <= R
    key = ndimage.distance_transform_edt(mask)
    x, phase = lithiate_particle(key[mask], f, f, 0.0)
    crystalline_r = r[mask][phase == Phase.SI_CRYSTALLINE]
    lithiated_r = r[mask][phase == Phase.SI_LITHIATED]
    front = 0.5 * (crystalline_r.max() + lithiated_r.min())
    r_eq = (3 * mask.sum() / (4 * np.pi)) ** (1 / 3)  # the voxelized sphere's own radius
    assert front == pytest.approx(r_eq * (1 - f) ** (1 / 3), abs=1.0)
    assert np.all(x[phase == Phase.SI_LITHIATED] == X_FULL)


def test_delithiated_particle_keeps_amorphous_bands_and_differs_from_pristine():
    mask = _random_shape(3)
    key = _keys(mask, "pathway", 3)[mask]
    x, phase = lithiate_particle(key, 0.0, 0.4, 0.5)
    assert np.all(x == 0)
    assert (phase == Phase.SI_AMORPHOUS).mean() == pytest.approx(0.4, abs=0.1)
    x, phase = lithiate_particle(key, 0.2, 0.4, 0.0)  # half delithiated, sharp front: uniform x where swept
    assert set(np.unique(x[phase == Phase.SI_LITHIATED]).round(6)) == {round(X_FULL / 2, 6)}
    with pytest.raises(ValueError, match="max_fraction"):
        lithiate_particle(key, 0.5, 0.4, 0.5)


def test_front_level_bounds_and_volume_function():
    key = np.arange(10.0)
    assert front_level(key, 0.0, 1.0) == -np.inf
    assert front_level(key, 1.0, 1.0) == np.inf
    with pytest.raises(ValueError, match="fraction"):
        front_level(key, 1.5, 1.0)
    labels = np.zeros((6, 6, 6), np.int32)
    labels[1:3, 1:5, 1:5] = 1
    labels[3:5, 1:5, 1:5] = 2
    keyv = ndimage.distance_transform_edt(labels > 0)
    x, si_phase = lithiate(labels, keyv, {1: 0.5, 2: 0.25}, {1: 0.5, 2: 0.25}, 0.0)
    for pid, f in ((1, 0.5), (2, 0.25)):
        assert x[labels == pid].mean() / X_FULL == pytest.approx(f)
    assert np.all(si_phase[labels == 0] == 255)


@settings(max_examples=20, deadline=None)
@given(z=st.lists(st.floats(-8.0, 8.0), min_size=1, max_size=200))
def test_tabulated_front_profile_is_half_erfc(z):
    """The interpolated profile equals scipy's ½ erfc (an independent implementation) to 1e-12."""
    from scipy.special import erfc

    from phantoms.lithiation import PROFILE, _profile

    values = np.array([_profile(v, PROFILE)[0] for v in z])
    assert np.abs(values - 0.5 * erfc(np.asarray(z))).max() < 1e-12


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.sampled_from([0.0, 0.7, 2.0]))
def test_lithiate_volume_equals_each_particle_alone(seed, width):
    """The volume pass (particles grouped by label, in parallel) gives each particle what lithiate_particle gives
    its voxels taken in index order; voxels of no particle stay 0 / 255."""
    rng = np.random.default_rng(seed)
    labels, n = ndimage.label(ndimage.gaussian_filter(rng.standard_normal((20, 22, 24)), 1.5) > 0.1)
    key = rng.random(labels.shape).astype(np.float32) * 10
    f_max = dict(zip(range(1, n + 1), rng.uniform(0, 1, n)))
    f = {pid: fm * rng.uniform(0, 1) for pid, fm in f_max.items()}
    x, si_phase = lithiate(labels, key, f, f_max, width)
    for pid in range(1, n + 1):
        own = labels == pid
        xp, php = lithiate_particle(key[own].astype(float), f[pid], f_max[pid], width)
        np.testing.assert_array_equal(x[own], xp.astype(np.float32))
        np.testing.assert_array_equal(si_phase[own], php)
    assert np.all(x[labels == 0] == 0) and np.all(si_phase[labels == 0] == 255)
