"""The deformation truth: exact F at arbitrary points, warps that move moments as predicted, fold refusal,
spam-consistent strains, exact inverses."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantoms.deformation import Deformation, FoldingError, decompose_F, load_deformation, relative

SHAPE = (32, 36, 40)


def _affine_F(draw_values):
    F = np.eye(3) + np.asarray(draw_values).reshape(3, 3)
    return F


f_entries = st.lists(st.floats(-0.15, 0.15), min_size=9, max_size=9)
points = st.lists(st.tuples(*[st.floats(-50, 90)] * 3), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None)
@given(entries=f_entries, pts=points)
def test_homogeneous_F_is_returned_exactly_at_arbitrary_points(entries, pts):
    F = _affine_F(entries)
    d = Deformation(SHAPE, 0.2, homogeneous_F=F)
    P = np.asarray(pts, float)
    centre = (np.asarray(SHAPE) - 1) / 2
    np.testing.assert_array_equal(d.gradient(P), np.broadcast_to(F, (len(P), 3, 3)))
    np.testing.assert_allclose(d.displacement(P), (P - centre) @ F.T + centre - P, atol=1e-12)
    phi = d.phi(P)
    np.testing.assert_array_equal(phi[:, :3, :3], np.broadcast_to(F, (len(P), 3, 3)))
    np.testing.assert_allclose(phi[:, 3], np.broadcast_to([0, 0, 0, 1], (len(P), 4)))
    np.testing.assert_allclose(d.inverse(d.map(P)), P, atol=1e-9)


def test_warped_volume_moments_shift_as_predicted():
    """A Gaussian blob warped by an affine map: its centroid goes to φ(c), its covariance to F Σ Fᵀ."""
    F = np.array([[1.08, 0.04, 0.0], [0.0, 0.95, 0.03], [0.02, 0.0, 1.05]])
    d = Deformation(SHAPE, 0.2, homogeneous_F=F)
    g = np.indices(SHAPE).reshape(3, -1).T.astype(float)
    c = np.array([15.0, 17.0, 21.0])
    sigma = np.diag([3.0, 2.5, 3.5]) ** 2
    blob = np.exp(-0.5 * np.einsum("ni,ij,nj->n", g - c, np.linalg.inv(sigma), g - c)).reshape(SHAPE)
    warped = d.warp({"blob": (blob, 3)})["blob"].reshape(-1)
    w = warped / warped.sum()
    centroid = w @ g
    cov = (g - centroid).T @ ((g - centroid) * w[:, None])
    np.testing.assert_allclose(centroid, d.map(c[None])[0], atol=0.01)
    np.testing.assert_allclose(cov, F @ sigma @ F.T, rtol=0.02, atol=0.05)


def _swelling(amp=0.3, shape=SHAPE):
    return Deformation(shape, 0.2, swell_centre=[[14, 18, 15], [16, 17, 27]], swell_radius=[5.0, 4.0],
                       swell_amplitude=[amp, 0.2], bump_centre=[[8, 10, 10]], bump_radius=[7.0],
                       bump_vector=[[1.0, -0.5, 0.3]],
                       axial_stretch=1 + 0.2 * np.exp(-((np.arange(shape[0]) - 16) / 6) ** 2),
                       homogeneous_F=[[1.02, 0.01, 0], [0, 0.99, 0], [0, 0.01, 1.0]])


@pytest.mark.parametrize("rigid", [None, 9.5])
def test_gradient_matches_finite_differences_and_grid_matches_points(rigid):
    d = _swelling()
    d.rigid_below_z = rigid
    X = np.random.default_rng(0).uniform(2, 30, (300, 3))
    h = 1e-5
    Fn = np.stack([(d.map(X + h * e) - d.map(X - h * e)) / (2 * h) for e in np.eye(3)], axis=-1)
    np.testing.assert_allclose(d.gradient(X), Fn, atol=1e-7)
    u = d.displacement_field()
    idx = np.random.default_rng(1).integers(0, SHAPE, (200, 3))
    np.testing.assert_allclose(u[:, idx[:, 0], idx[:, 1], idx[:, 2]].T, d.displacement(idx.astype(float)), atol=1e-5)


@pytest.mark.parametrize("shear_zx, shape", [(0.0, SHAPE), (0.08, SHAPE), (0.0, (31, 35, 39))])
def test_inverse_and_warp_are_exact(shear_zx, shape):
    """φ⁻¹(φ(X)) = X to the Newton tolerance; warping a coordinate field returns φ⁻¹ at every voxel (also where
    a z–x shear makes the axial inverse vary along each row, which starts from its neighbour's solution, and on
    odd-sized axes, whose last plane lies on the coarse guess's last node)."""
    d = _swelling(shape=shape)
    d.homogeneous_F = d.homogeneous_F + shear_zx * np.outer([1, 0, 0], [0, 0, 1])
    X = np.random.default_rng(2).uniform(0, 31, (500, 3))
    np.testing.assert_allclose(d.inverse(d.map(X)), X, atol=1e-5)
    coords = np.indices(shape).astype(float)
    warped = d.warp({f"c{k}": (coords[k], 1) for k in range(3)})
    g = np.indices(shape).reshape(3, -1).T.astype(float)
    inv = np.stack([warped[f"c{k}"].reshape(-1) for k in range(3)], -1)
    inside = np.all((inv > 0.5) & (inv < np.asarray(shape) - 1.5), axis=1)  # linear interpolation of a linear field is exact
    np.testing.assert_allclose(d.map(inv[inside]), g[inside], atol=1e-5)


def test_folding_field_is_refused():
    with pytest.raises(FoldingError, match="det F"):
        Deformation(SHAPE, 0.2, bump_centre=[[16, 18, 20]], bump_radius=[3.0], bump_vector=[[6.0, 0, 0]]).displacement_field()
    with pytest.raises(FoldingError, match="prescribed_deformation_gradient"):
        Deformation(SHAPE, 0.2, homogeneous_F=np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(FoldingError, match="axial"):
        Deformation(SHAPE, 0.2, axial_stretch=np.full(SHAPE[0], -0.1))
    _swelling().displacement_field()  # a physical field passes


@pytest.mark.parametrize("centre, radius, push", [((16, 18, 20), 3.0, 6.0), ((15, 17, 19), 1.2, 3.0),
                                                  ((16, 18, 20), 1.2, 3.0)])
def test_fold_is_refused_and_located_by_either_pass(centre, radius, push):
    """The fold search looks at every second voxel first (a wide bump folds some of them), then at all: a fold
    confined to voxels between those (radius 1.2 voxels: no all-even voxel but the centre, where F = 0, is
    within reach) is refused by the full pass. Either way the reported voxel, and every voxel of the error's
    ``voxels`` (the worst of each folding grid row, what the truth damps kernels by), is one where det F ≤ 0
    (by the truth API's F)."""
    d = Deformation(SHAPE, 0.2, bump_centre=[centre], bump_radius=[radius], bump_vector=[[push, 0, 0]])
    with pytest.raises(FoldingError, match="det F") as err:
        d.displacement_field()
    voxel = [int(v) for v in err.value.args[0].split("(z, y, x) = (")[1].split(")")[0].split(",")]
    assert np.linalg.det(d.gradient(np.array([voxel], float))[0]) <= 0
    assert voxel in err.value.voxels.tolist()
    assert np.all(np.linalg.det(d.gradient(err.value.voxels)) <= 0)


def test_strain_measures_agree_with_spam_decomposeF():
    spam_def = pytest.importorskip("spam.deformation")
    d = _swelling()
    X = np.random.default_rng(3).uniform(4, 28, (20, 3))
    ours = d.strain(X)
    for i, F in enumerate(d.gradient(X)):
        ref = spam_def.decomposeF(F.copy())
        for key in ("vol", "dev", "volss", "devss"):
            assert ours[key][i] == pytest.approx(ref[key], abs=1e-9), key
        np.testing.assert_allclose(ours["U"][i], ref["U"], atol=1e-9)
        np.testing.assert_allclose(ours["z"][i], ref["z"], atol=1e-9)


def test_relative_field_between_scans_composes(tmp_path):
    """Φ(T0→T2) at X equals Φ(T1→T2) at φ1(X) composed with Φ(T0→T1) at X, and deformation.json round-trips."""
    d1 = _swelling(0.15)
    d2 = _swelling(0.3)
    (tmp_path / "deformation.json").write_text(__import__("json").dumps(d2.to_dict()))
    d2 = load_deformation(tmp_path)
    X = np.random.default_rng(4).uniform(5, 27, (50, 3))
    x1 = d1.map(X)
    phi12, back = relative(d1, d2, x1)
    np.testing.assert_allclose(back, X, atol=1e-5)
    np.testing.assert_allclose(phi12[:, :3, :3] @ d1.gradient(X), d2.gradient(X), atol=1e-6)
    np.testing.assert_allclose(x1 + phi12[:, :3, 3], d2.map(X), atol=1e-6)


def test_decompose_F_volumetric_strain_of_isotropic_swelling():
    F = np.eye(3) * 1.2
    out = decompose_F(F[None])
    assert out["vol"][0] == pytest.approx(1.2**3 - 1)
    assert out["dev"][0] == pytest.approx(0, abs=1e-12)


def test_compiled_kernels_match_the_numpy_reference():
    d = _swelling()
    P = np.random.default_rng(5).uniform(-10, 45, (5000, 3))
    fast = d._local_sum(P, True)
    d.backend = "numpy"
    ref = d._local_sum(P, True)
    np.testing.assert_allclose(fast[0], ref[0], atol=1e-12)
    np.testing.assert_allclose(fast[1], ref[1], atol=1e-12)
    with pytest.raises(ValueError, match="backend"):
        Deformation(SHAPE, 0.2, backend="cuda")


@settings(max_examples=25, deadline=None)
@given(amp=st.floats(-0.3, 1.0), radius=st.floats(2.0, 9.0), bump=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_hessian_bound_holds_over_the_margin_ball(amp, radius, bump, seed):
    """acc[12] of the compiled sums bounds max_c ‖∇∇(Σu_k)_c‖_F at every point of the ball of radius ``margin``
    around each point (what a Newton step taken on its Taylor bound relies on); the Hessian here comes from
    central differences of the NumPy reference gradient."""
    from phantoms import _kernels as compiled

    d = Deformation(SHAPE, 0.2, swell_centre=[[16, 18, 20], [15, 20, 25]], swell_radius=[radius, 3.0],
                    swell_amplitude=[amp, 0.4], bump_centre=[[14, 16, 18]], bump_radius=[6.0], bump_vector=[bump])
    rng = np.random.default_rng(seed)
    margin = 0.05
    P = rng.uniform(5, 30, (400, 3))
    P = P[np.argsort(P[:, 2])]
    acc, seen, cand = compiled._scratch(d._kern(), len(P))
    compiled._row_sums(P[:, 0].copy(), P[:, 1].copy(), P[:, 2].copy(), P[:, 2].copy(), len(P), d._kern(), True, margin,
                       acc, seen, cand)
    bound = acc[12]
    d.backend = "numpy"
    offset = rng.normal(size=P.shape)
    Q = P + margin * rng.uniform(0, 1, (len(P), 1)) * offset / np.linalg.norm(offset, axis=1, keepdims=True)
    h = 1e-4
    hessian = np.stack([(d._local_sum(Q + h * e, True)[1] - d._local_sum(Q - h * e, True)[1]) / (2 * h)
                        for e in np.eye(3)], -1)  # (n, c, i, j) = ∂_j ∂_i u_c
    actual = np.sqrt((hessian ** 2).sum(axis=(2, 3))).max(axis=1)
    # measured over 15 such draws: actual ≤ 0.80 bound; the differences' own error at h = 1e-4 is ~2e-6 (they
    # moved by 2e-4 from h = 1e-3, O(h²)), which the slack covers
    assert np.all(actual <= bound * (1 + 1e-6) + 1e-6), (actual - bound).max()


def test_inverse_steps_taken_on_their_taylor_bound_meet_the_tolerance():
    """φ⁻¹ on the grid with steps taken on their Taylor bound needs fewer kernel sums and still maps back to
    every voxel within the Newton tolerance (NumPy reference map; ×|∇(H∘A)| ≤ 1.3 from L's space to x).
    The passes are :meth:`Deformation.warp`'s (a coarse guess on every 2nd voxel, then every voxel)."""
    from phantoms import _kernels as compiled
    from phantoms.deformation import CERTIFIED_STEP_VOX, NEWTON_TOL_VOX

    d = _swelling()
    kern, outer = d._kern(), d._outer_params(True)
    x = np.indices(SHAPE).reshape(3, -1).T.astype(float)
    evaluations = {}
    for margin in (0.0, CERTIFIED_STEP_VOX):
        coarse = np.empty((3,) + tuple(n // 2 + 1 for n in SHAPE), np.float32)
        _, coarse_evaluations = compiled.inverse_slab(0, 2, coarse, np.empty((3, 0, 0, 0)), kern, outer,
                                                      NEWTON_TOL_VOX, margin, True)
        X = np.empty((3,) + SHAPE)
        residual, fine_evaluations = compiled.inverse_slab(0, 1, X, coarse, kern, outer, NEWTON_TOL_VOX, margin, False)
        assert residual < NEWTON_TOL_VOX
        np.testing.assert_allclose(d.map(X.reshape(3, -1).T), x, atol=1.3 * NEWTON_TOL_VOX)
        evaluations[margin] = coarse_evaluations + fine_evaluations
    assert evaluations[CERTIFIED_STEP_VOX] < 0.9 * evaluations[0.0]  # measured: 56468 / 71328 = 0.79


def test_fine_inverse_starts_from_the_coarse_guess_interpolated_with_quadratic_precision():
    """With a tolerance every start meets, the fine inverse returns its start: Y + the coarse guess
    interpolated between its nodes (every 2nd voxel). The interpolation (Catmull-Rom) reproduces a quadratic
    exactly, so a guess holding one gives that quadratic at every voxel whose four nodes per axis lie in the
    grid, on an odd-sized grid too; and it keeps the nodes' values at every voxel on them."""
    from phantoms import _kernels as compiled

    shape = (31, 35, 39)
    d = Deformation(shape, 0.2, bump_centre=[[15, 17, 19]], bump_radius=[100.0], bump_vector=[[0.1, 0.0, 0.0]])
    kern, outer = d._kern(), d._outer_params(True)

    def quadratic(z, y, x):
        return np.stack([0.001 * (z * z - 3 * y * x + 2 * x), 0.002 * (y * y + z * x) - 0.01 * z,
                         0.003 * (x * x - z * y) + 0.5])

    guess = quadratic(*np.indices(tuple(n // 2 + 1 for n in shape)) * 2.0).astype(np.float32)  # at the nodes' voxels
    X = np.empty((3,) + shape)
    compiled.inverse_slab(0, 1, X, guess, kern, outer, 1e3, 0.0, False)
    voxels = np.indices(shape).astype(float)
    start = X - voxels  # Y = x here (no H, no A)
    expected = quadratic(*voxels)
    n_nodes = np.array([n // 2 + 1 for n in shape])
    # an odd voxel 2c + 1 uses nodes c − 1 … c + 2: all in the grid for 1 ≤ c ≤ n_nodes − 3
    inside = np.ones(shape, bool)
    on_nodes = np.ones(shape, bool)
    for axis, coordinate in enumerate(voxels):
        c = coordinate.astype(int) // 2
        odd = coordinate.astype(int) % 2 == 1
        inside &= ~odd | ((c >= 1) & (c <= n_nodes[axis] - 3))
        on_nodes &= ~odd
    assert inside.sum() > 0.5 * inside.size
    # atol: the guess is float32 (values ≤ 5, rounding ≤ 3e-7 × Σ|w| ≤ 1.25³); measured 1.8e-7; trilinear misses by 1e-3
    for component in range(3):
        np.testing.assert_allclose(start[component][inside], expected[component][inside], atol=1e-5)
        np.testing.assert_allclose(start[component][on_nodes], expected[component][on_nodes], atol=1e-5)
