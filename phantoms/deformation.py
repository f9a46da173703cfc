"""The exactly known deformation of a scan, and the truth API that scores DIC against it.

All positions are in voxels, (z, y, x), voxel centres at integer indices, as in
spam. The map from the pristine (T0) configuration X to the scan's x is

    φ = H ∘ A ∘ L,

* L(X) = X + Σ_k u_k(X): local, compactly supported kernels. A *swelling*
  kernel (centre c, radius R, amplitude a) is u = a (X − c) G(|X − c|/R) with
  G = 1 for t ≤ 1 (homogeneous expansion by 1 + a inside the particle's
  equivalent sphere), G = 1 − S((t − 1)/(T − 1)) for 1 < t < T and 0 beyond,
  S(s) = 10s³ − 15s⁴ + 6s⁵ (C² smoothstep), T = 2.5: the surroundings are pushed
  and compressed (pores close). A *bump* kernel (centre c, radius R, vector d)
  is u = d (1 − S(|X − c|/R)). Gas bubbles are swelling kernels of a pore.
* A(Y) = Y + w(Y_z) e_z, w(z) = ∫₀^z (λ(ζ) − 1) dζ: the electrode-scale axial
  response. λ is piecewise linear between voxel layers (so w is exact and
  piecewise quadratic): 1 + α·(slab-mean swelling of Si at that height,
  smoothed over half a particle radius) + a prescribed ε_zz = g (z − z_cu).
* H(Z) = c + F_h (Z − c): a prescribed homogeneous gradient about the volume centre.

The local part is multiplied by a smooth mask m(z) that is 0 in the Cu foil and
rises to 1 over 3 voxels above it: the current collector stays rigid.

F = F_h · (I + (λ(Y_z) − 1) e_z e_zᵀ) · (I + Σ ∇u_k(X)), Y = L(X), is evaluated
analytically at any point. The map is checked to fold nowhere (det F > 0 at
every voxel and λ > 0) and inverted exactly: A and H in closed form / 1-D
Newton, L by Newton iterations with the analytic F (residual < 1e-6 voxel).

Φ in spam's convention at a node X: the 4×4 matrix with F in Φ[:3, :3] and the
displacement u(X) = φ(X) − X in Φ[:3, 3]; a point X + dX maps to
X + u(X) + F dX to first order (spam.DIC applies Φ about the node centre).
Strain measures follow ``spam.deformation.decomposeF`` (tested against it).

The kernel sums at arbitrary points and the grid passes (the displacement with
det F, the warp's inverse and its sampling) run in :mod:`phantoms._kernels`
(numba, which spam already requires); ``backend="numpy"`` selects the NumPy
reference of the kernel sums, equal to 1e-12, against which the grid passes
are tested.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from phantoms import _kernels as compiled
from twin.errors import ScenarioError, StageError

log = logging.getLogger("phantoms.deformation")

SUPPORT = 2.5  # swelling kernels reach SUPPORT × R: wide enough to fold nowhere for (1 + a)³ up to ~4
NEWTON_TOL_VOX = 1e-6
CERTIFIED_STEP_VOX = 0.02  # a Newton step this short may be taken on its Taylor bound (see _kernels.inverse_slab)
GROUP_POINTS = 4096  # points the compiled kernel sums at arbitrary points take together (12 float64 each)
SLAB_VOXELS = 1 << 19  # voxels per slab of the grid passes (the warp's inverse coordinates: 24 bytes per voxel)


def _smoothstep(s):
    s = np.clip(s, 0.0, 1.0)
    return s**3 * (10 - 15 * s + 6 * s**2)


def _dsmoothstep(s):
    inside = (s > 0) & (s < 1)
    return np.where(inside, 30 * s**2 * (1 - s) ** 2, 0.0)


class FoldingError(ScenarioError):
    """A deformation whose Jacobian is not positive everywhere (the map folds material onto itself).

    ``voxels`` (n, 3): reference voxels (z, y, x) where det F ≤ 0, the worst of each grid row that folds
    (empty when the fold is not found on the grid, e.g. a negative λ).
    """

    def __init__(self, problems, voxels=None):
        super().__init__(problems)
        self.voxels = np.zeros((0, 3)) if voxels is None else np.asarray(voxels, float).reshape(-1, 3)


@dataclass
class Deformation:
    """φ = H ∘ A ∘ L for one scan (see module docstring).

    Attributes
    ----------
    shape
        Volume shape (z, y, x) in voxels.
    voxel_size_um
        Voxel edge, µm.
    swell_centre, swell_radius, swell_amplitude
        Swelling kernels: (K, 3) voxels, (K,) voxels, (K,) dimensionless a (1 + a = linear stretch).
    bump_centre, bump_radius, bump_vector
        Bump kernels: (B, 3), (B,), (B, 3) voxels.
    axial_stretch
        λ at z = 0, 1, …, nz − 1 (piecewise linear, constant beyond).
    homogeneous_F
        F_h (3×3), applied about the volume centre.
    """

    shape: tuple[int, int, int]
    voxel_size_um: float
    swell_centre: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    swell_radius: np.ndarray = field(default_factory=lambda: np.zeros(0))
    swell_amplitude: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bump_centre: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    bump_radius: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bump_vector: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    axial_stretch: np.ndarray | None = None
    homogeneous_F: np.ndarray = field(default_factory=lambda: np.eye(3))
    rigid_below_z: float | None = None
    rigid_ramp_vox: float = 3.0
    backend: str = "numba"

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        for name in ("swell_centre", "bump_centre", "bump_vector"):
            setattr(self, name, np.asarray(getattr(self, name), float).reshape(-1, 3))
        for name in ("swell_radius", "swell_amplitude", "bump_radius"):
            setattr(self, name, np.asarray(getattr(self, name), float).reshape(-1))
        if self.axial_stretch is None:
            self.axial_stretch = np.ones(self.shape[0])
        self.axial_stretch = np.asarray(self.axial_stretch, float)
        self.homogeneous_F = np.asarray(self.homogeneous_F, float).reshape(3, 3)
        if np.any(self.axial_stretch <= 0):
            raise FoldingError(f"axial stretch λ(z) must be > 0, got min {self.axial_stretch.min():.3g}")
        if np.linalg.det(self.homogeneous_F) <= 0:
            raise FoldingError(f"sample.prescribed_deformation_gradient: det F must be > 0, got "
                               f"{np.linalg.det(self.homogeneous_F):.3g}")
        if np.any(self.swell_amplitude <= -1):
            raise FoldingError("swelling kernel amplitude must be > -1 (a particle cannot shrink to nothing)")
        lam = self.axial_stretch
        self._w_nodes = np.concatenate([[0.0], np.cumsum(0.5 * (lam[1:] + lam[:-1]) - 1.0)])  # w at z = 0..nz-1
        self._centre = (np.asarray(self.shape, float) - 1) / 2
        self._support = np.concatenate([SUPPORT * self.swell_radius, self.bump_radius])
        if self.backend not in ("numba", "numpy"):
            raise ValueError(f"backend: must be 'numba' or 'numpy', got {self.backend!r}")
        self._hash = None

    # --- the three parts -------------------------------------------------------------
    def _lam(self, z):
        return np.interp(z, np.arange(len(self.axial_stretch)), self.axial_stretch)

    def _w(self, z):
        """w(z) = ∫₀^z (λ − 1), exact for the piecewise linear λ (constant extrapolation)."""
        lam = self.axial_stretch
        n = len(lam)
        zc = np.clip(z, 0, n - 1)
        k = np.clip(np.floor(zc).astype(int), 0, max(n - 2, 0))
        s = zc - k
        if n > 1:
            slope = lam[k + 1] - lam[k]
            w = self._w_nodes[k] + (lam[k] - 1) * s + 0.5 * slope * s**2
        else:
            w = np.zeros_like(zc)
        return w + (lam[0] - 1) * np.minimum(z, 0) + (lam[-1] - 1) * np.maximum(z - (n - 1), 0)

    def _kernels(self, y: np.ndarray, k: int, gradient: bool):
        """Displacement (and gradient) of kernel k at offsets y = X − c (…, 3)."""
        nk = len(self.swell_radius)
        r = np.linalg.norm(y, axis=-1)
        if k < nk:
            R, a = self.swell_radius[k], self.swell_amplitude[k]
            t = r / R
            s = (t - 1) / (SUPPORT - 1)
            G = 1 - _smoothstep(s)
            u = a * y * G[..., None]
            if not gradient:
                return u, None
            dG = -_dsmoothstep(s) / (SUPPORT - 1) / R  # dG/dr
            with np.errstate(invalid="ignore", divide="ignore"):
                coef = np.where(r > 0, dG / r, 0.0)
            F = (a * coef)[..., None, None] * y[..., :, None] * y[..., None, :]
            diag = np.einsum("...ii->...i", F)  # a writable view of the diagonal
            diag += (a * G)[..., None]
            return u, F
        b = k - nk
        R, d = self.bump_radius[b], self.bump_vector[b]
        t = r / R
        B = 1 - _smoothstep(t)
        u = B[..., None] * d
        if not gradient:
            return u, None
        with np.errstate(invalid="ignore", divide="ignore"):
            coef = np.where(r > 0, -_dsmoothstep(t) / R / r, 0.0)
        F = d[:, None] * (coef[..., None, None] * y[..., None, :])
        return u, F

    @property
    def _kernel_centres(self):
        return np.concatenate([self.swell_centre, self.bump_centre])

    def _local(self, P: np.ndarray, gradient: bool):
        """u_L and ∇u_L at points P: the kernels' sum, times a smooth mask m(z) that keeps the Cu foil rigid
        (m = 0 below ``rigid_below_z``, rising to 1 over ``rigid_ramp_vox``): u = m Σu_k, ∇u = m Σ∇u_k + Σu_k ⊗ m′ e_z."""
        u, F = self._local_sum(P, gradient)
        if self.rigid_below_z is None:
            return u, F
        s = (P[..., 0] - self.rigid_below_z) / self.rigid_ramp_vox
        m = _smoothstep(s)
        if gradient:
            F *= m[..., None, None]
            F[..., :, 0] += u * (_dsmoothstep(s) / self.rigid_ramp_vox)[..., None]
        u *= m[..., None]
        return u, F

    def _local_sum(self, P: np.ndarray, gradient: bool):
        """Σ u_k (n, 3) and Σ ∇u_k (n, 3, 3) at points P (n, 3); the NumPy backend finds points with a KD-tree."""
        u = np.zeros(P.shape)
        F = np.zeros(P.shape[:-1] + (3, 3)) if gradient else None
        centres = self._kernel_centres
        if len(centres) == 0:
            return u, F
        if self.backend == "numba":
            flat = np.asarray(P, dtype=np.float64).reshape(-1, 3)
            kern = self._kern()
            # points grouped by hash cell in (z, y) (kern[7], kern[8]: the hash's origin and 1 / cell edge), each
            # group sorted by x and cut into runs of at most GROUP_POINTS: what compiled.sum_kernels sums like rows
            cells = np.floor((flat[:, :2] - kern[7][:2]) * kern[8]).astype(np.int64)
            order = np.lexsort((flat[:, 2], cells[:, 1], cells[:, 0]))
            new_cell = np.flatnonzero((np.diff(cells[order], axis=0) != 0).any(axis=1)) + 1
            bounds = np.concatenate([[0], new_cell, [len(flat)]])
            runs = [np.arange(lo, hi, GROUP_POINTS) for lo, hi in zip(bounds[:-1], bounds[1:])]
            groups = np.append(np.concatenate(runs), len(flat)).astype(np.int64)
            uf, Ff = compiled.sum_kernels(flat[order], groups, kern, gradient)
            u.reshape(-1, 3)[order] = uf
            if gradient:
                F.reshape(-1, 3, 3)[order] = Ff
            return u, F
        flat = P.reshape(-1, 3)
        tree = cKDTree(flat)
        for k, (c, sup) in enumerate(zip(centres, self._support)):
            idx = np.asarray(tree.query_ball_point(c, sup), dtype=int)
            if idx.size == 0:
                continue
            du, dF = self._kernels(flat[idx] - c, k, gradient)
            u.reshape(-1, 3)[idx] += du
            if gradient:
                F.reshape(-1, 3, 3)[idx] += dF
        return u, F

    def _kern(self):
        """The kernels as :mod:`phantoms._kernels` takes them (built once: the cell hash costs up to ~0.1 s)."""
        if self._hash is None:
            centres = self._kernel_centres
            if len(centres) == 0:  # an empty hash: one cell, no kernel
                hashed = (np.zeros(3), 1.0, np.ones(3, np.int64), np.zeros(2, np.int64), np.zeros(0, np.int64))
            else:
                hashed = _cell_hash(centres, self._support)
            self._hash = (len(self.swell_radius), np.ascontiguousarray(centres, dtype=np.float64),
                          1.0 / np.concatenate([self.swell_radius, self.bump_radius]),
                          np.concatenate([self.swell_amplitude, np.zeros(len(self.bump_radius))]),
                          np.concatenate([np.zeros((len(self.swell_radius), 3)), self.bump_vector]),
                          self._support, 1.0 / (SUPPORT - 1.0), hashed[0], 1.0 / hashed[1], *hashed[2:])
        return self._hash

    def _outer_params(self, inverse: bool):
        rigid = -np.inf if self.rigid_below_z is None else float(self.rigid_below_z)
        Fh = np.linalg.inv(self.homogeneous_F) if inverse else self.homogeneous_F
        return (rigid, float(self.rigid_ramp_vox), self.axial_stretch, self._w_nodes, np.ascontiguousarray(Fh),
                self._centre)

    def _outer(self, Y: np.ndarray, gradient: bool):
        """H ∘ A at points Y and its gradient (…, 3, 3)."""
        Z = Y.copy()
        Z[..., 0] = Y[..., 0] + self._w(Y[..., 0])
        x = self._centre + (Z - self._centre) @ self.homogeneous_F.T
        if not gradient:
            return x, None
        FA = np.broadcast_to(np.eye(3), Y.shape[:-1] + (3, 3)).copy()
        FA[..., 0, 0] = self._lam(Y[..., 0])
        return x, self.homogeneous_F @ FA

    # --- public truth API -------------------------------------------------------------
    def map(self, points) -> np.ndarray:
        """φ(X): positions at this scan of material points X (n, 3), voxels."""
        P = np.asarray(points, float).reshape(-1, 3)
        uL, _ = self._local(P, False)
        return self._outer(P + uL, False)[0]

    def displacement(self, points) -> np.ndarray:
        """u(X) = φ(X) − X at reference points X (n, 3), voxels (components z, y, x)."""
        P = np.asarray(points, float).reshape(-1, 3)
        return self.map(P) - P

    def gradient(self, points) -> np.ndarray:
        """F(X) = ∂φ/∂X (n, 3, 3) at reference points X, rows/columns (z, y, x)."""
        P = np.asarray(points, float).reshape(-1, 3)
        uL, FL = self._local(P, True)
        _, Fo = self._outer(P + uL, True)
        return Fo @ (np.eye(3) + FL)

    def phi(self, points) -> np.ndarray:
        """spam's 4×4 Φ at each reference node X (n, 4, 4): F in [:3, :3], u(X) in [:3, 3]."""
        P = np.asarray(points, float).reshape(-1, 3)
        out = np.zeros((len(P), 4, 4))
        out[:, :3, :3] = self.gradient(P)
        out[:, :3, 3] = self.displacement(P)
        out[:, 3, 3] = 1.0
        return out

    def strain(self, points) -> dict[str, np.ndarray]:
        """Strain measures of F at reference points, as ``spam.deformation.decomposeF`` defines them."""
        return decompose_F(self.gradient(points))

    def inverse(self, points) -> np.ndarray:
        """φ⁻¹(x): reference positions of the material now at x (n, 3), voxels."""
        x = np.asarray(points, float).reshape(-1, 3)
        return self._invert_local(self._invert_outer(x))

    # --- inversion -------------------------------------------------------------------
    def _invert_outer(self, x: np.ndarray) -> np.ndarray:
        Z = self._centre + (x - self._centre) @ np.linalg.inv(self.homogeneous_F).T
        target = Z[..., 0]
        # start from a tabulated inverse of the monotone z ↦ z + w(z), then 1-D Newton
        n = self.shape[0]
        lo, hi = float(min(target.min(), 0)) - 1, float(max(target.max(), n)) + 1
        zt = np.linspace(lo - abs(self._w(lo)), hi + abs(self._w(hi)), 8 * (n + 8))
        z = np.interp(target, zt + self._w(zt), zt)
        for _ in range(50):
            step = (z + self._w(z) - target) / self._lam(z)
            z = z - step
            if np.max(np.abs(step), initial=0.0) < 1e-10:
                break
        Y = Z.copy()
        Y[..., 0] = z
        return Y

    def _invert_local(self, Y: np.ndarray) -> np.ndarray:
        """Solve X + u_L(X) = Y (points (n, 3)) by Newton iterations, steps clipped to 1 voxel (the kernels are
        strongly nonlinear where they compress; unclipped steps overshoot)."""
        uL, _ = self._local(Y, False)
        X = Y - uL
        todo = np.arange(len(X))
        err = np.inf
        for _ in range(100):
            uL, FL = self._local(X[todo], True)
            r = X[todo] + uL - Y[todo]
            bad = np.abs(r).max(axis=1) >= NEWTON_TOL_VOX
            err = float(np.abs(r).max(initial=0.0))
            if not bad.any():
                return X
            todo, r, J = todo[bad], r[bad], np.eye(3) + FL[bad]
            step = _solve3(J, r)
            step *= np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(step, axis=1), 1e-300))[:, None]
            X[todo] -= step
        raise StageError(f"deformation: inverse map did not converge (residual {err:.2e} voxel); the field folds")

    # --- grid passes (compiled) -----------------------------------------------------------
    def displacement_field(self, *, check: bool = True, out=None):
        """u on every voxel of the reference grid, float32 (3, z, y, x), voxels; checks det F > 0 on the way.

        Parameters
        ----------
        check
            Evaluate det F at every voxel and refuse a fold.
        out
            Where to write u: anything that takes ``out[:, z0:z1] = slab`` (an h5py / h5netcdf
            variable streams it to disk; each slab is a fresh array, which a
            :class:`twin.io.WriteBehind` target may hold); default a new array, returned.

        Raises
        ------
        FoldingError
            When det F ≤ 0 at some voxel (the worst, with its value; ``voxels``: the worst of each grid row
            that folds). Every second voxel is checked first (an eighth of the work) and all its folds are
            reported, so most folds are refused before the full pass; a fold between those voxels is found
            by the full pass, which goes first through the slabs where that coarse det F is smallest and
            stops after the first slab that folds.
        """
        kern, outer = self._kern(), self._outer_params(False)
        if check:  # every 2nd voxel first: a folding field (the truth's retries) is refused at an eighth of the cost
            nz, ny, nx = self.shape
            coarse = (-(-nz // 2), -(-ny // 2), -(-nx // 2))
            step = max(1, SLAB_VOXELS // (coarse[1] * coarse[2]))
            scratch = np.empty((3, step) + coarse[1:], np.float32)
            folds, plane_min = [], []
            for z0 in range(0, coarse[0], step):
                slab = scratch[:, :min(step, coarse[0] - z0)]
                result = compiled.displacement_slab(z0, 2, slab, kern, outer, True)
                folds.append(self._folds(result, z0, 2, slab.shape[1:]))
                plane_min.append(result[0].reshape(slab.shape[1], -1).min(axis=1))
            self._refuse_folds(folds)
            plane_min = np.concatenate(plane_min)
        out = np.empty((3,) + self.shape, np.float32) if out is None else out
        slabs = self._slabs()
        if check:  # the slabs where the coarse det F comes nearest to 0 first: a fold between its voxels stops early
            slabs.sort(key=lambda zs: plane_min[max(0, zs[0] // 2 - 1):zs[1] // 2 + 2].min())
        for z0, z1 in slabs:
            slab = out[:, z0:z1] if isinstance(out, np.ndarray) else np.empty((3, z1 - z0) + self.shape[1:], np.float32)
            self._refuse_folds([self._folds(compiled.displacement_slab(z0, 1, slab, kern, outer, check), z0, 1,
                                            slab.shape[1:])])
            if not isinstance(out, np.ndarray):
                out[:, z0:z1] = slab
        return out

    @staticmethod
    def _folds(result, z0: int, stride: int, slab_shape) -> tuple[np.ndarray, np.ndarray]:
        """det F ≤ 0 found by a grid pass (:func:`phantoms._kernels.displacement_slab`): the values and the
        reference voxels (n, 3) of the worst of each row that folds."""
        row_min, row_at = result
        bad = np.flatnonzero(row_min <= 0)
        voxels = np.column_stack(np.unravel_index(row_at[bad], slab_shape)) * stride
        voxels[:, 0] += z0 * stride
        return row_min[bad], voxels

    @staticmethod
    def _refuse_folds(folds) -> None:
        """Raise FoldingError if any of ``folds`` (:meth:`_folds` of slabs) holds a fold, naming the worst voxel."""
        det = np.concatenate([d for d, _ in folds])
        if det.size:
            voxels = np.concatenate([v for _, v in folds])
            worst = int(np.argmin(det))
            raise FoldingError(
                f"deformation folds: det F = {det[worst]:.3g} at voxel (z, y, x) = {tuple(int(i) for i in voxels[worst])}"
                f" (and {det.size - 1} more grid rows); reduce sample.prescribed_bumps / "
                f"sample.prescribed_deformation_gradient / sample.lithiated_volume_expansion", voxels=voxels)

    def _slabs(self):
        """(z0, z1) of the slabs of ~SLAB_VOXELS voxels the grid passes go by (bounding their work arrays)."""
        nz, ny, nx = self.shape
        step = max(1, SLAB_VOXELS // (ny * nx))
        return [(z0, min(nz, z0 + step)) for z0 in range(0, nz, step)]

    def warp(self, volumes: dict[str, tuple[np.ndarray, int]], out: dict | None = None,
             derived: dict | None = None) -> dict:
        """The volumes as imaged at this scan: v_i(x) = v_0(φ⁻¹(x)).

        Parameters
        ----------
        volumes
            name → (reference volume (z, y, x), interpolation order: 0 for labels, 1 for fields; higher
            orders go through ``scipy.ndimage.map_coordinates``).
        derived
            (name, …) → (sampler, dtype or one dtype per name): fields sampled together; ``sampler(coords,
            dest, …)`` writes the fields at reference coordinates (3, n) into one ``dest`` (n,) per name, in one
            pass (the truth's δ and β are evaluated from phase, x and CBD porosity where they are sampled, and
            its five volumes are sampled at once).
        out
            name → where to write the warped volume (anything that takes ``out[name][z0:z1] = slab``:
            an h5py / h5netcdf variable streams it to disk; each slab is a fresh array); default new arrays
            of the volumes' dtypes.

        Notes
        -----
        Slab by slab: φ⁻¹ of the slab's voxel centres (Newton to 1e-6 voxel, see
        :meth:`inverse`), then nearest or trilinear sampling with ``mode="nearest"``
        (material from outside the field of view repeats the border).
        """
        derived = derived or {}
        if out is None:
            out = {name: np.empty(self.shape, v.dtype) for name, (v, _) in volumes.items()}
            out.update({name: np.empty(self.shape, dtype) for names, (_, dtypes) in derived.items()
                        for name, dtype in zip(names, _per_name(dtypes, names))})
        kern, outer = self._kern(), self._outer_params(True)
        nz, ny, nx = self.shape
        # L⁻¹'s displacement on every 2nd voxel first: interpolated, it starts each voxel's Newton iterations close
        coarse = np.empty((3, nz // 2 + 1, ny // 2 + 1, nx // 2 + 1), np.float32)  # a few voxels: float32 holds 1e-7
        self._check_inverse(compiled.inverse_slab(0, 2, coarse, np.empty((3, 0, 0, 0)), kern, outer, NEWTON_TOL_VOX,
                                                  CERTIFIED_STEP_VOX, True))
        for z0, z1 in self._slabs():
            X = np.empty((3, z1 - z0, ny, nx))
            self._check_inverse(compiled.inverse_slab(z0, 1, X, coarse, kern, outer, NEWTON_TOL_VOX,
                                                      CERTIFIED_STEP_VOX, False))
            coords = X.reshape(3, -1)
            for name, (v, order) in volumes.items():
                target = out[name]
                dest = target[z0:z1] if isinstance(target, np.ndarray) else np.empty(X.shape[1:], v.dtype)
                if order == 0:
                    compiled.sample_nearest(v, coords, dest.reshape(-1))
                elif order == 1:
                    compiled.sample_linear(v, coords, dest.reshape(-1))
                else:
                    dest[...] = ndimage.map_coordinates(v, X, order=order, mode="nearest")
                if not isinstance(target, np.ndarray):
                    target[z0:z1] = dest
            for names, (sampler, dtypes) in derived.items():
                targets = [out[name] for name in names]
                dests = [t[z0:z1] if isinstance(t, np.ndarray) else np.empty(X.shape[1:], dtype)
                         for t, dtype in zip(targets, _per_name(dtypes, names))]
                sampler(coords, *(dest.reshape(-1) for dest in dests))
                for target, dest in zip(targets, dests):
                    if not isinstance(target, np.ndarray):
                        target[z0:z1] = dest
        return out

    @staticmethod
    def _check_inverse(result):
        residual, iterations = result
        log.debug("inverse: %d Newton iterations, max residual %.2e voxel", iterations, residual)
        if residual >= NEWTON_TOL_VOX:
            raise StageError(f"deformation: inverse map did not converge (residual {residual:.2e} voxel); the field folds")

    # --- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "voxel_size_um": self.voxel_size_um,
                "swell_centre": self.swell_centre.tolist(), "swell_radius": self.swell_radius.tolist(),
                "swell_amplitude": self.swell_amplitude.tolist(), "bump_centre": self.bump_centre.tolist(),
                "bump_radius": self.bump_radius.tolist(), "bump_vector": self.bump_vector.tolist(),
                "axial_stretch": self.axial_stretch.tolist(), "homogeneous_F": self.homogeneous_F.tolist(),
                "rigid_below_z": self.rigid_below_z, "rigid_ramp_vox": self.rigid_ramp_vox}

    @classmethod
    def from_dict(cls, d: dict) -> Deformation:
        return cls(**{k: d[k] for k in ("shape", "voxel_size_um", "swell_centre", "swell_radius", "swell_amplitude",
                                          "bump_centre", "bump_radius", "bump_vector", "axial_stretch", "homogeneous_F",
                                          "rigid_below_z", "rigid_ramp_vox")})


_last_cell_hash = (b"", None)


def _per_name(dtypes, names) -> tuple:
    """A derived sampler's dtypes, one per name (one dtype given stands for all)."""
    return tuple(dtypes) if isinstance(dtypes, (tuple, list)) else (dtypes,) * len(names)


def _cell_hash(centres: np.ndarray, supports: np.ndarray):
    """:func:`phantoms._kernels.build_hash`, the last one kept: a fold retry rebuilds the same kernels with
    other amplitudes, and the hash depends only on their centres and supports."""
    global _last_cell_hash
    key = np.ascontiguousarray(centres, dtype=np.float64).tobytes() + np.ascontiguousarray(supports, dtype=np.float64).tobytes()
    cached_key, hashed = _last_cell_hash
    if cached_key != key:
        hashed = compiled.build_hash(centres, supports)
        _last_cell_hash = (key, hashed)  # one rebinding: threads see the old pair or the new one
    return hashed


def _solve3(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve A x = b for a stack of 3×3 systems by the adjugate (several times faster than np.linalg.solve here)."""
    c0 = np.cross(A[:, 1], A[:, 2])
    c1 = np.cross(A[:, 2], A[:, 0])
    c2 = np.cross(A[:, 0], A[:, 1])
    det = np.einsum("ij,ij->i", A[:, 0], c0)
    return (c0 * b[:, :1] + c1 * b[:, 1:2] + c2 * b[:, 2:3]) / det[:, None]


def load_deformation(path: str | Path) -> Deformation:
    """Read a scan's ``deformation.json`` (or the truth directory that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "deformation.json"
    return Deformation.from_dict(json.loads(path.read_text()))


def decompose_F(F: np.ndarray) -> dict[str, np.ndarray]:
    """Strain measures of a field of F (…, 3, 3), with ``spam.deformation.decomposeF``'s definitions.

    Returns
    -------
    dict
        ``vol`` = det F − 1; ``U`` = (FᵀF)^½; ``dev`` = ‖U det(F)^(−1/3) − I‖;
        ``e`` = ½(F + Fᵀ) − I; ``volss`` = tr e; ``devss`` = ‖e − (tr e / 3) I‖;
        ``z`` = diag U (zoom along z, y, x: the axial component is ``z[..., 0]``).
    """
    F = np.asarray(F, float)
    C = np.swapaxes(F, -1, -2) @ F
    lam, V = np.linalg.eigh(C)
    U = (V * np.sqrt(np.clip(lam, 0, None))[..., None, :]) @ np.swapaxes(V, -1, -2)
    det = np.linalg.det(F)
    eye = np.eye(3)
    dev = np.linalg.norm(U * np.cbrt(det)[..., None, None] ** -1 - eye, axis=(-2, -1))
    e = 0.5 * (F + np.swapaxes(F, -1, -2)) - eye
    volss = np.trace(e, axis1=-2, axis2=-1)
    devss = np.linalg.norm(e - volss[..., None, None] / 3 * eye, axis=(-2, -1))
    return {"vol": det - 1, "dev": dev, "U": U, "e": e, "volss": volss, "devss": devss,
            "z": np.diagonal(U, axis1=-2, axis2=-1)}


def relative(reference: Deformation, deformed: Deformation, points) -> tuple[np.ndarray, np.ndarray]:
    """Truth between two scans i → j at points x given in scan i's volume (voxels).

    Returns
    -------
    phi : (n, 4, 4)
        spam Φ at each node: F_ij = F_j(X) F_i(X)⁻¹ and u_ij = φ_j(X) − x, X = φ_i⁻¹(x).
    X : (n, 3)
        The reference (T0) positions of those material points.

    Notes
    -----
    This is what a DIC between consecutive scans T(i) → T(j) measures; compose
    with :meth:`Deformation.phi` of T0 → T(i) for the cumulative field.
    """
    x = np.asarray(points, float).reshape(-1, 3)
    X = reference.inverse(x)
    out = np.zeros((len(x), 4, 4))
    out[:, :3, :3] = deformed.gradient(X) @ np.linalg.inv(reference.gradient(X))
    out[:, :3, 3] = deformed.map(X) - x
    out[:, 3, 3] = 1.0
    return out, X
