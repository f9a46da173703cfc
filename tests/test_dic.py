"""DIC: registration, hierarchical LDIC, filtering, composition, deforming — against analytic truth and spam itself.

Synthetic volumes: a smoothed random field (texture of ~3-8 voxels) plus a few
bright blobs, deformed by a known displacement with ``map_coordinates``
(cubic) so the truth is exact. spam's own real data (snow) is the independent check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dic import (
    DICError,
    DICSettings,
    compose_fields,
    correlate_pair,
    deform_with_field,
    filter_field,
    make_grid,
    register,
)


def texture(shape, rng, *, scale_px=2.0, blobs=20) -> np.ndarray:
    """Smoothed Gaussian noise (correlation length ~ 2.4 σ = 5 voxels) plus bright spheres of radius 2-5 voxels."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), scale_px)
    f = (f - f.mean()) / f.std()
    zz, yy, xx = np.indices(shape)
    for _ in range(blobs):
        c = rng.uniform(0, shape)
        r = rng.uniform(2, 5)
        f += 1.5 * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r * r)
    return f.astype(np.float32)


def warp(f: np.ndarray, u, *, iterations: int = 8) -> np.ndarray:
    """Deformed image g with g(X + u(X)) = f(X): solves X = x − u(X) by fixed point, samples f (cubic)."""
    x = np.indices(f.shape).reshape(3, -1).astype(float)
    X = x.copy()
    for _ in range(iterations):
        X = x - u(X)
    return ndi.map_coordinates(f, X, order=3, mode="nearest").reshape(f.shape).astype(np.float32)


def affine_u(F, t, centre):
    """Displacement of the affine map x = F (X − c) + c + t."""
    F, t, centre = np.asarray(F, float), np.asarray(t, float), np.asarray(centre, float)
    return lambda X: (F - np.eye(3)) @ (X - centre[:, None]) + t[:, None]


FAST = dict(processes=1, max_iterations=300, retry_max_iterations=(300,), retry_margins_px=(5, 10))


def test_warp_helper_moves_material_points():
    """The test generator itself: a blob at X appears at X + u in the deformed image."""
    f = np.zeros((32, 32, 32), np.float32)
    f[10, 12, 14] = 1
    f = ndi.gaussian_filter(f, 1.5)
    g = warp(f, lambda X: np.array([2.0, -1.0, 0.5])[:, None] + 0 * X)
    com = np.array(ndi.center_of_mass(g))
    np.testing.assert_allclose(com, [12.0, 11.0, 14.5], atol=0.02)


def test_register_recovers_affine_phi():
    rng = np.random.default_rng(0)
    f = texture((48, 48, 48), rng)
    F = np.array([[1.008, 0.003, 0.0], [0.0, 0.995, 0.004], [-0.002, 0.0, 1.005]])
    t = np.array([0.7, -0.35, 0.45])
    centre = (np.array(f.shape) - 1) / 2
    g = warp(f, affine_u(F, t, centre))
    result = register(f, g, None, DICSettings(registration_max_iterations=500))
    assert result["returnStatus"] == 2
    np.testing.assert_allclose(result["centre"], centre)
    # measured: |ΔF| 3.5e-4, |Δt| 5e-3 voxel; the bounds are 1e-3 and 0.05 voxel
    assert np.abs(result["Phi"][:3, :3] - F).max() < 1e-3
    assert np.abs(result["Phi"][:3, 3] - t).max() < 0.05
    # with a mask (the electrode), Φ is returned at the mask's centre of mass: translation = u(centre)
    mask = np.zeros(f.shape, bool)
    mask[8:30, 10:40, 6:36] = True
    masked = register(f, g, mask, DICSettings(registration_max_iterations=500))
    assert masked["returnStatus"] == 2
    expected = affine_u(F, t, centre)(masked["centre"][:, None])[:, 0]
    assert np.abs(masked["Phi"][:3, 3] - expected).max() < 0.02  # measured 0.006; Φ read at the image centre: 0.04


def test_hierarchical_ldic_recovers_quadratic_axial_field():
    """u_z grows quadratically with height (as swelling accumulates towards the separator); lateral rigid shift."""
    rng = np.random.default_rng(1)
    n = 56
    f = texture((n, 48, 48), rng)

    def u(X):
        return np.stack([0.6 + 2.0 * (X[0] / n) ** 2, 0.3 + 0 * X[0], -0.4 + 0 * X[0]])

    g = warp(f, u)
    pair = correlate_pair(f, g, DICSettings(node_spacing_px=(16, 8), **FAST))
    assert [lv.node_spacing_px for lv in pair.levels] == [16, 8]
    final = pair.final
    assert final.converged_fraction > 0.9  # measured 1.0
    err = final.phi[:, :3, 3] - u(final.nodes.T).T
    rmse = np.sqrt(np.mean(err**2))
    assert rmse < 0.1  # measured 0.046 voxel with 9³ windows: about 2x margin
    # every attempt is recorded
    assert all(len(lv.attempts) >= 1 and "margin_px" in lv.attempts[0] for lv in pair.levels)


def test_binned_registration_is_the_full_resolution_first_guess():
    """The registration of a pair binned by 2 (forced by registration_max_voxels), expressed on the full grid
    (translation × 2 about the binned centre's full-resolution position), reads the known affine map as well as a
    first guess needs, and the LDIC seeded with it is as accurate as with the unbinned registration."""
    from pipeline.dic import bin_volume, registration_binning

    assert registration_binning((56, 48, 48), 2**24) == 1 and registration_binning((56, 48, 48), 56 * 48 * 48 // 8) == 2
    assert registration_binning((800, 2048, 2048), 2**24) == 8
    block = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    assert bin_volume(np.tile(block, (3, 3, 3)), 2).ravel().tolist() == [3.5] * 27

    rng = np.random.default_rng(3)
    f = texture((56, 48, 48), rng)
    F = np.array([[1.01, 0.002, 0.0], [0.0, 0.996, 0.003], [0.0, 0.0, 1.004]])
    t = np.array([1.3, -0.6, 0.8])
    centre = (np.array(f.shape) - 1) / 2
    u = affine_u(F, t, centre)
    g = warp(f, u)
    pairs = {m: correlate_pair(f, g, DICSettings(node_spacing_px=(16, 8), registration_max_voxels=m, **FAST))
             for m in (2**24, f.size // 8)}
    binned = pairs[f.size // 8]
    expected = u(binned.registration_centre[:, None])[:, 0]
    # measured 0.027 voxel and 1.5e-3 (unbinned: 0.008, 2.5e-4); a first guess, the LDIC refines it
    assert np.abs(binned.registration_phi[:3, 3] - expected).max() < 0.1
    assert np.abs(binned.registration_phi[:3, :3] - F).max() < 0.005
    rmse = {m: np.sqrt(np.mean((p.final.phi[:, :3, 3] - u(p.final.nodes.T).T) ** 2)) for m, p in pairs.items()}
    assert rmse[f.size // 8] < 0.1 and abs(rmse[f.size // 8] - rmse[2**24]) < 0.005  # measured 0.0445 both


def test_ldic_on_spam_snow_recovers_known_phi():
    """Independent data: spam's real x-ray tomography of snow, deformed by a known affine Φ."""
    from pipeline._spam_compat import load_snow

    snow = load_snow()[18:82, 18:82, 18:82].astype(np.float32)
    snow = (snow - snow.mean()) / snow.std()
    F = np.array([[1.01, 0.0, 0.0], [0.0, 1.0, 0.005], [0.0, 0.0, 0.995]])
    t = np.array([1.3, -0.6, 0.8])
    centre = (np.array(snow.shape) - 1) / 2
    u = affine_u(F, t, centre)
    g = warp(snow, u)
    pair = correlate_pair(snow, g, DICSettings(node_spacing_px=(20, 12), **FAST))
    assert np.abs(pair.registration_phi[:3, :3] - F).max() < 1e-3  # measured 2.9e-4
    final = pair.final
    ok = final.converged
    assert ok.mean() > 0.8  # measured 1.0
    err = final.phi[ok, :3, 3] - u(final.nodes[ok].T).T
    assert np.sqrt(np.mean(err**2)) < 0.1  # measured 0.053 voxel (12³ windows on 12-px spacing): ~2x margin


def test_no_convergence_raises_with_diagnostic(tmp_path):
    rng = np.random.default_rng(3)
    a, b = texture((40, 40, 40), rng), texture((40, 40, 40), rng)  # unrelated volumes
    diag = tmp_path / "diag.json"
    s = DICSettings(node_spacing_px=(12,), processes=1, max_iterations=50, margin_px=2, retry_max_iterations=(50,),
                    retry_margins_px=(3, 6, 9))
    # the second retry gains nothing over the first: the texture, not the search range, limits; margin 9 is skipped
    with pytest.raises(DICError, match="no node converged after 3 attempts") as info:
        correlate_pair(a, b, s, diagnostic_path=diag)
    assert str(diag) in str(info.value)
    summary = json.loads(diag.read_text())
    attempts = summary["levels"][0]["attempts"]
    assert [a["margin_px"] for a in attempts] == [2, 3, 6]
    assert all(a["converged_fraction"] == 0.0 for a in attempts)
    assert "retries stopped" in attempts[-1]["stopped"]


def test_filter_replaces_planted_outlier():
    nodes, dims = make_grid((60, 60, 60), 8, 3)
    u = 0.5 + 0.01 * nodes  # smooth (linear) field
    phi = np.tile(np.eye(4), (len(nodes), 1, 1))
    phi[:, :3, 3] = u
    centre = len(nodes) // 2
    bad = phi.copy()
    bad[centre, :3, 3] += [3.0, -2.0, 4.0]  # a "converged" outlier
    good = np.ones(len(nodes), bool)
    out, replaced = filter_field(nodes, bad, good, np.zeros(len(nodes), bool))
    assert replaced[centre]
    assert replaced.sum() <= 3  # the coherency test flags the outlier, not the smooth field
    np.testing.assert_allclose(out[centre, :3, 3], u[centre], atol=0.05)
    # non-converged nodes are replaced from converged neighbours
    good2 = good.copy()
    good2[[3, centre]] = False
    out2, replaced2 = filter_field(nodes, bad, good2, np.zeros(len(nodes), bool))
    assert replaced2[3] and replaced2[centre]
    np.testing.assert_allclose(out2[3, :3, 3], u[3], atol=0.1)


def _field(nodes, u):
    phi = np.tile(np.eye(4), (len(nodes), 1, 1))
    phi[:, :3, 3] = u(nodes.T).T
    return phi


def test_composition_evaluates_increment_at_displaced_point():
    nodes, dims = make_grid((80, 80, 80), 6, 3)
    u1 = lambda X: np.stack([2.0 + 0.02 * X[0], 1.0 + 0 * X[0], -1.5 + 0 * X[0]])  # noqa: E731
    u2 = lambda X: np.stack([0.001 * X[0] ** 2, 0.01 * X[2], 0 * X[0]])  # noqa: E731  nonlinear: position matters
    composed = compose_fields(nodes, dims, _field(nodes, u1), _field(nodes, u2))
    X = nodes.T
    exact = u1(X) + u2(X + u1(X))
    inner = np.all((nodes > 12) & (nodes < 62), axis=1)
    err = composed[inner, :3, 3] - exact.T[inner]
    # linear interpolation of a·z² between nodes h apart errs by at most a·h²/4 = 0.001·36/4 = 0.009 voxel
    assert np.abs(err).max() <= 0.009 + 1e-9
    naive = (u1(X) + u2(X)).T[inner]
    assert np.abs(naive - exact.T[inner]).max() > 0.1  # a node-by-node sum would fail this test


@settings(max_examples=25, deadline=None)
@given(t1=st.lists(st.floats(-3, 3), min_size=3, max_size=3), t2=st.lists(st.floats(-3, 3), min_size=3, max_size=3),
       s1=st.floats(-0.02, 0.02), s2=st.floats(-0.02, 0.02))
def test_composition_of_affine_fields_is_the_matrix_product(t1, t2, s1, s2):
    """Affine fields compose exactly (trilinear interpolation reproduces them): Φ₀₂ = Φ₁₂ Φ₀₁ about any point."""
    nodes, dims = make_grid((40, 40, 40), 8, 2)
    c = np.array([20.0, 20.0, 20.0])
    F1 = np.eye(3) + s1 * np.array([[1, 0.5, 0], [0, -1, 0], [0.3, 0, 0.5]])
    F2 = np.eye(3) + s2 * np.array([[0, 0, 1], [0.2, 1, 0], [0, 0.4, -1]])

    def field(F, t):
        phi = np.tile(np.eye(4), (len(nodes), 1, 1))
        phi[:, :3, :3] = F
        phi[:, :3, 3] = ((F - np.eye(3)) @ (nodes - c).T).T + t
        return phi

    composed = compose_fields(nodes, dims, field(F1, t1), field(F2, t2))
    # x = F2 (F1 (X − c) + t1) + t2 + c about c  ⇒  u = (F2F1 − I)(X − c) + F2 t1 + t2
    exact = ((F2 @ F1 - np.eye(3)) @ (nodes - c).T).T + F2 @ np.asarray(t1) + np.asarray(t2)
    np.testing.assert_allclose(composed[:, :3, 3], exact, atol=1e-9)
    np.testing.assert_allclose(composed[:, :3, :3], np.broadcast_to(F2 @ F1, (len(nodes), 3, 3)), atol=1e-12)


def test_fast_deform_equals_spam_apply_phi_field():
    import spam.DIC

    from pipeline._spam_compat import spam_call

    rng = np.random.default_rng(4)
    f = texture((24, 24, 24), rng, blobs=5)
    nodes, dims = make_grid(f.shape, 6, 3)
    F = np.eye(3) + np.array([[0.01, 0.002, 0], [0, -0.005, 0.003], [0.001, 0, 0.004]])
    c, t = np.full(3, 11.5), np.array([0.6, -0.4, 0.3])
    phi = np.tile(np.eye(4), (len(nodes), 1, 1))
    phi[:, :3, :3] = F
    phi[:, :3, 3] = ((F - np.eye(3)) @ (nodes - c).T).T + t
    mine = deform_with_field(f, nodes, dims, phi)
    with spam_call(1, "applyPhiField"):
        theirs = spam.DIC.applyPhiField(f, nodes, phi, nProcesses=1)
    inner = (slice(3, -3),) * 3
    # measured max difference 2e-6 (float32 rounding) on a texture of unit std; spam fills 0 outside, we repeat the edge
    assert np.abs(mine - theirs)[inner].max() < 1e-4


def test_deform_slab_by_slab_is_the_whole_volume_deform_in_a_fraction_of_the_memory():
    import tracemalloc

    rng = np.random.default_rng(5)
    f = texture((48, 40, 36), rng, blobs=5)
    nodes, dims = make_grid(f.shape, 8, 4)
    phi = np.tile(np.eye(4), (len(nodes), 1, 1))
    phi[:, :3, 3] = 0.5 + 0.02 * nodes + 0.3 * np.sin(nodes / 9.0)
    whole = deform_with_field(f, nodes, dims, phi, slab_voxels=f.size)
    for slab_voxels in (1, 40 * 36 * 5, 40 * 36 * 7 + 1):  # one plane, slabs that do not divide the height
        np.testing.assert_array_equal(deform_with_field(f, nodes, dims, phi, slab_voxels=slab_voxels), whole)
    peaks = {}
    for slab_voxels in (f.size, 40 * 36):
        tracemalloc.start()
        deform_with_field(f, nodes, dims, phi, slab_voxels=slab_voxels)
        peaks[slab_voxels] = tracemalloc.get_traced_memory()[1] / f.nbytes
        tracemalloc.stop()
    # measured: 19.1 volumes of temporaries at once, 1.49 plane by plane (the output and one plane's; 1.35 at 64³)
    assert peaks[40 * 36] < 1.6 and peaks[f.size] > 10


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(*[st.integers(20, 90)] * 3), spacing=st.integers(3, 20), half=st.integers(2, 8))
def test_grid_windows_inside_volume(shape, spacing, half):
    if min(shape) < 2 * half + 5:
        return
    nodes, dims = make_grid(shape, spacing, half)
    assert len(nodes) == np.prod(dims)
    assert np.all(nodes - half >= 0) and np.all(nodes + half <= np.array(shape) - 1)
    for i in range(3):
        steps = np.diff(np.unique(nodes[:, i]))
        assert steps.size == 0 or np.all(steps == spacing)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_tsv_round_trip_through_spam_reader(seed, tmp_path_factory):
    from pipeline._dic_io import read_tsv, write_tsv

    rng = np.random.default_rng(seed)
    nodes, dims = make_grid((30, 40, 50), 7, 3)
    phi = np.tile(np.eye(4), (len(nodes), 1, 1))
    phi[:, :3, :] += rng.uniform(-0.5, 0.5, (len(nodes), 3, 4)) * [[0.01] * 3 + [10]]
    status = rng.choice([-5, -2, 1, 2], len(nodes)).astype(float)
    path = tmp_path_factory.mktemp("tsv") / "f.tsv"
    write_tsv(path, nodes, phi, status)
    back = read_tsv(path)
    assert back["dims"] == dims
    np.testing.assert_allclose(back["nodes"], nodes)
    np.testing.assert_allclose(back["phi"], phi, atol=1e-6)  # 7 decimals in the file
    np.testing.assert_array_equal(back["return_status"], status)


def test_failed_level_is_retried_with_the_next_margin_and_iterations():
    """Attempts allowed 1 iteration cannot converge on a nonlinear field; the retry with 300 iterations does."""
    rng = np.random.default_rng(6)
    n = 40
    f = texture((n, n, n), rng)
    g = warp(f, lambda X: np.stack([0.3 + 1.5 * (X[0] / n) ** 2, 0 * X[0], 0.2 * np.sin(X[1] / 8)]))
    s = DICSettings(node_spacing_px=(10,), processes=1, max_iterations=300, margin_px=3, retry_margins_px=(5, 7),
                    retry_max_iterations=(1, 300), min_converged_fraction=0.5)
    level = correlate_pair(f, g, s).final
    first, second, retry = level.attempts
    assert [(a["margin_px"], a["max_iterations"]) for a in level.attempts] == [(3, 1), (5, 1), (7, 300)]
    assert first["converged_fraction"] < 0.5 and second["converged_fraction"] < 0.5 <= retry["converged_fraction"]
    assert level.converged_fraction == retry["converged_fraction"]  # the better attempt is kept


@pytest.mark.parametrize("half_window_px", [2, 4, 7])
def test_texture_mask_equals_its_plain_formula(half_window_px):
    """The in-place texture mask (three float32 volumes at most) against the formula written plainly."""
    from pipeline.dic import texture_mask

    rng = np.random.default_rng(half_window_px)
    volume = (ndi.gaussian_filter(rng.standard_normal((40, 50, 60)), 2) + (rng.random((40, 50, 60)) > 0.7)).astype(np.float32)
    volume[:, :, 40:] = 0.1  # a textureless region
    smooth = ndi.gaussian_filter(volume, 1.0)
    size = 2 * half_window_px + 1
    mean = ndi.uniform_filter(smooth, size)
    std = np.sqrt(np.maximum(ndi.uniform_filter(smooth * smooth, size) - mean * mean, 0))
    expected = std > 0.3 * np.percentile(std, 75)
    assert np.array_equal(texture_mask(volume, half_window_px=half_window_px), expected)
    assert not expected[:, :, 48:].any() and expected[:, :, :30].mean() > 0.9
