"""Compiled evaluation of the deformation (numba, already required by spam).

The same equations as :class:`phantoms.deformation.Deformation` (its NumPy
methods are the reference, tested equal to these), evaluated row by row:

* :func:`_row_sums`: Σ u_k and Σ ∇u_k of the local kernels at the points of one
  grid row, kernel by kernel over the points its support reaches (found through a
  uniform-cell hash of the kernel centres), in loops LLVM vectorises: time goes
  with the (point, kernel) pairs in reach;
* :func:`sum_kernels`: the same at arbitrary points, grouped by hash cell;
* :func:`displacement_slab`: u = φ(X) − X on grid voxels with det F, fused (no
  (n, 3, 3) temporaries);
* :func:`inverse_slab`: φ⁻¹ on grid voxels, H and A inverted in closed form / by
  1-D Newton and L by Newton iterations, a row's points together;
* :func:`sample_nearest`, :func:`sample_linear`: ``map_coordinates`` of order 0
  and 1 with ``mode="nearest"``; :func:`sample_optics`: δ and β evaluated where
  sampled; :func:`sample_scan`: all five of a scan's volumes in one pass.

Grid kernels run rows of a slab in parallel (``prange``; numba's OpenMP/TBB
layers are thread-safe) and release the GIL, so a writer thread compresses the
previous slab meanwhile (:class:`twin.io.WriteBehind`).

``kern`` below is the tuple (n_swell, centres, 1 / radii, amps, vectors, supports,
1 / transition, origin, 1 / h, dims, starts, order) that :meth:`Deformation._kern`
builds; ``outer`` is (rigid_below_z, rigid_ramp_vox, λ nodes, w nodes, F_h or
F_h⁻¹, volume centre).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from phantoms.phases import Phase


def build_hash(centres: np.ndarray, supports: np.ndarray):
    """Uniform cells (edge: half the median support) listing every kernel whose support box overlaps them (CSR)."""
    h = float(max(2.0, np.median(supports) / 2))
    lo = (centres - supports[:, None]).min(axis=0)
    origin = lo - h
    dims = np.floor(((centres + supports[:, None]).max(axis=0) + h - origin) / h).astype(np.int64) + 1
    cells, owners = [], []
    for k, (c, s) in enumerate(zip(centres, supports)):
        a = np.floor((c - s - origin) / h).astype(np.int64)
        b = np.floor((c + s - origin) / h).astype(np.int64)
        g = np.stack(np.meshgrid(*[np.arange(i, j + 1) for i, j in zip(a, b)], indexing="ij"), -1).reshape(-1, 3)
        cells.append((g[:, 0] * dims[1] + g[:, 1]) * dims[2] + g[:, 2])
        owners.append(np.full(len(g), k, np.int64))
    cells, owners = np.concatenate(cells), np.concatenate(owners)
    order = np.argsort(cells, kind="stable")
    starts = np.searchsorted(cells[order], np.arange(int(np.prod(dims)) + 1)).astype(np.int64)
    return origin.astype(np.float64), h, dims, starts, owners[order]


@njit(cache=True, error_model="numpy", inline="always")
def _smooth(s):
    if s <= 0.0:
        return 0.0, 0.0
    if s >= 1.0:
        return 1.0, 0.0
    return s * s * s * (10.0 - 15.0 * s + 6.0 * s * s), 30.0 * s * s * (1.0 - s) * (1.0 - s)


@njit(cache=True, error_model="numpy", inline="always")
def _candidates(lo0, hi0, lo1, hi1, lo2, hi2, origin, inv_h, dims, starts, order, seen, out):
    """The kernels listed in the hash cells that the box [lo, hi] touches, each once, into ``out``; their count.
    ``seen`` (bool, one per kernel, all False) is left all False."""
    a0 = max(int(np.floor((lo0 - origin[0]) * inv_h)), 0)
    b0 = min(int(np.floor((hi0 - origin[0]) * inv_h)), dims[0] - 1)
    a1 = max(int(np.floor((lo1 - origin[1]) * inv_h)), 0)
    b1 = min(int(np.floor((hi1 - origin[1]) * inv_h)), dims[1] - 1)
    a2 = max(int(np.floor((lo2 - origin[2]) * inv_h)), 0)
    b2 = min(int(np.floor((hi2 - origin[2]) * inv_h)), dims[2] - 1)
    n = 0
    for c0 in range(a0, b0 + 1):
        for c1 in range(a1, b1 + 1):
            for c2 in range(a2, b2 + 1):
                cell = (c0 * dims[1] + c1) * dims[2] + c2
                for q in range(starts[cell], starts[cell + 1]):
                    k = order[q]
                    if not seen[k]:
                        seen[k] = True
                        out[n] = k
                        n += 1
    for i in range(n):
        seen[out[i]] = False
    return n


@njit(cache=True, error_model="numpy", inline="always")
def _row_box(P0, P1, P2, gx, n):
    """The (z, y) box of the points i < n of a row and how far they lie from their grid x ``gx``: lo0, hi0, lo1,
    hi1, reach (the box :func:`_candidates` searches is that, x widened by reach)."""
    lo0 = hi0 = P0[0]
    lo1 = hi1 = P1[0]
    reach = 0.0
    for i in range(n):
        lo0, hi0 = min(lo0, P0[i]), max(hi0, P0[i])
        lo1, hi1 = min(lo1, P1[i]), max(hi1, P1[i])
        reach = max(reach, abs(P2[i] - gx[i]))
    return lo0, hi0, lo1, hi1, reach


@njit(cache=True, error_model="numpy", inline="always")
def _row_sums(P0, P1, P2, gx, n, kern, gradient, margin, acc, seen, cand):
    """Σ u_k into acc[0:3, i] and (if ``gradient``) Σ ∇u_k into acc[3:12, i] (row-major 3×3) at the points
    (P0[i], P1[i], P2[i]), i < n, of one row of a grid, ``gx`` their grid x (ascending).

    Kernel by kernel (found through the cell hash from the points' box), over the points whose row
    passes through its support: the chord from the nearest the points' (z, y) box comes to the
    centre, widened by how far the points lie from their grid x. The loop over those points is
    contiguous and branch-free (the smoothstep clamped, so a point beyond the support adds exactly 0),
    so LLVM vectorises it (unsigned indices: numba adds no negative-index wraparound).
    With ``margin`` > 0 (voxels), acc[12, i] bounds the Hessian of Σ u_k over the ball of that radius around
    each point (see :func:`_add_kernel`; the supports are searched that much wider).
    ``seen``, ``cand``: scratch, one entry per kernel.
    """
    n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims, starts, order = kern
    acc[:, :n] = 0.0
    if n == 0:
        return
    lo0, hi0, lo1, hi1, reach = _row_box(P0, P1, P2, gx, n)
    m = _candidates(lo0 - margin, hi0 + margin, lo1 - margin, hi1 + margin, gx[0] - reach - margin,
                    gx[n - 1] + reach + margin, origin, inv_h, dims, starts, order, seen, cand)
    for j in range(m):
        k = cand[j]
        sup = supports[k] + margin
        d0 = max(lo0 - centres[k, 0], 0.0, centres[k, 0] - hi0)
        d1 = max(lo1 - centres[k, 1], 0.0, centres[k, 1] - hi1)
        rho2 = d0 * d0 + d1 * d1
        if rho2 >= sup * sup:
            continue
        half = np.sqrt(sup * sup - rho2) + reach
        first = np.uint64(np.searchsorted(gx[:n], centres[k, 2] - half))
        end = np.uint64(np.searchsorted(gx[:n], centres[k, 2] + half, side="right"))
        _add_kernel(k, first, end, P0, P1, P2, n_swell, centres, inv_radii, amps, vectors, inv_transition, gradient,
                    margin, acc)


@njit(cache=True, error_model="numpy", inline="always")
def _bump_curvature(k, inv_radii, vectors):
    """A bound on max_c ‖∇∇(u_k)_c‖_F (voxel⁻¹) for bump k, u = B(r) v with B = 1 − S(r/R), S the quintic
    smoothstep: ∂ᵢ∂ⱼu_c = v_c [B″ nᵢnⱼ + (B′/r)(δᵢⱼ − nᵢnⱼ)] with |B″| ≤ (10/√3)/R², |B′/r| ≤ 30·(4/27)/R²."""
    iR = inv_radii[k]
    v = np.sqrt(vectors[k, 0] ** 2 + vectors[k, 1] ** 2 + vectors[k, 2] ** 2)
    return v * iR * iR * (10.0 / np.sqrt(3.0) + np.sqrt(2.0) * 40.0 / 9.0)


@njit(cache=True, error_model="numpy", inline="always")
def _add_kernel(k, first, end, P0, P1, P2, n_swell, centres, inv_radii, amps, vectors, inv_transition, gradient,
                margin, acc):
    """Add kernel k's u and ∇u at points first ≤ i < end (unsigned) into acc; with ``margin`` > 0 a bound on
    max_c ‖∇∇(u_k)_c‖_F over the ball of that radius around each point into acc[12].

    Swelling, u = a g(r) y with g = 1 − S(s), s = (r/R − 1)/t: ∂ᵢ∂ⱼu_c = a [g″ r nᵢnⱼn_c + g′(δᵢⱼn_c +
    δⱼ_c nᵢ + δᵢ_c nⱼ − nᵢnⱼn_c)], so ‖·‖_F ≤ |a| (|g″| r + (3 + √3)|g′|), g′ = −S′/(Rt), g″ = −S″/(Rt)²;
    over the ball r grows by the margin and s moves by margin/(Rt), which moves |S′| and |S″| by at most
    their Lipschitz constants max|S″| = 10/√3 and max|S‴| = 60 times that (0 inside R: u = a y is linear).
    Bumps: :func:`_bump_curvature` wherever the ball meets their support.
    """
    c0, c1, c2 = centres[k, 0], centres[k, 1], centres[k, 2]
    iR = inv_radii[k]
    if k < n_swell:
        a = amps[k]
        ds = margin * iR * inv_transition
        abs_a_iR_it = abs(a) * iR * inv_transition
        for i in range(first, end):
            y0, y1, y2 = P0[i] - c0, P1[i] - c1, P2[i] - c2
            r = np.sqrt(y0 * y0 + y1 * y1 + y2 * y2)
            s_free = (r * iR - 1.0) * inv_transition
            s = min(max(s_free, 0.0), 1.0)
            aG = a * (1.0 - s * s * s * (10.0 - 15.0 * s + 6.0 * s * s))
            acc[0, i] += aG * y0
            acc[1, i] += aG * y1
            acc[2, i] += aG * y2
            if gradient:
                c = -a * 30.0 * s * s * (1.0 - s) * (1.0 - s) * iR * inv_transition / max(r, 1e-300)
                acc[3, i] += c * y0 * y0 + aG
                acc[4, i] += c * y0 * y1
                acc[5, i] += c * y0 * y2
                acc[6, i] += c * y1 * y0
                acc[7, i] += c * y1 * y1 + aG
                acc[8, i] += c * y1 * y2
                acc[9, i] += c * y2 * y0
                acc[10, i] += c * y2 * y1
                acc[11, i] += c * y2 * y2 + aG
            if margin > 0.0:
                s1 = 30.0 * s * s * (1.0 - s) * (1.0 - s) + 10.0 / np.sqrt(3.0) * ds
                s2 = abs(60.0 * s * (1.0 - s) * (1.0 - 2.0 * s)) + 60.0 * ds
                acc[12, i] += abs_a_iR_it * (s2 * (r + margin) * iR * inv_transition + (3.0 + np.sqrt(3.0)) * s1)
    else:
        v0, v1, v2 = vectors[k, 0], vectors[k, 1], vectors[k, 2]
        curvature = _bump_curvature(k, inv_radii, vectors)
        r_reach = 1.0 / iR + margin
        for i in range(first, end):
            y0, y1, y2 = P0[i] - c0, P1[i] - c1, P2[i] - c2
            r = np.sqrt(y0 * y0 + y1 * y1 + y2 * y2)
            s = min(r * iR, 1.0)
            B = 1.0 - s * s * s * (10.0 - 15.0 * s + 6.0 * s * s)
            acc[0, i] += B * v0
            acc[1, i] += B * v1
            acc[2, i] += B * v2
            if gradient:
                c = -30.0 * s * s * (1.0 - s) * (1.0 - s) * iR / max(r, 1e-300)
                acc[3, i] += v0 * c * y0
                acc[4, i] += v0 * c * y1
                acc[5, i] += v0 * c * y2
                acc[6, i] += v1 * c * y0
                acc[7, i] += v1 * c * y1
                acc[8, i] += v1 * c * y2
                acc[9, i] += v2 * c * y0
                acc[10, i] += v2 * c * y1
                acc[11, i] += v2 * c * y2
            if margin > 0.0:
                acc[12, i] += curvature if r < r_reach else 0.0


@njit(cache=True, error_model="numpy", inline="always")
def _scratch(kern, n):
    """Work arrays of :func:`_row_sums` for rows of up to n points: acc, seen, cand."""
    n_kernels = kern[1].shape[0]
    return np.empty((13, n)), np.zeros(n_kernels, np.bool_), np.empty(n_kernels, np.int64)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sum_kernels(P, groups, kern, gradient):
    """Σ u_k (n, 3) and Σ ∇u_k (n, 3, 3) at points P (n, 3), given as ``groups`` (CSR starts) of points that
    share a hash cell in (z, y), each sorted by x (see :meth:`Deformation._local_sum`)."""
    n = P.shape[0]
    u = np.zeros((n, 3))
    F = np.zeros((n, 3, 3)) if gradient else np.zeros((1, 3, 3))
    for g in prange(groups.size - 1):
        lo, hi = groups[g], groups[g + 1]
        acc, seen, cand = _scratch(kern, hi - lo)
        P2 = np.ascontiguousarray(P[lo:hi, 2])
        _row_sums(np.ascontiguousarray(P[lo:hi, 0]), np.ascontiguousarray(P[lo:hi, 1]), P2, P2, hi - lo, kern,
                  gradient, 0.0, acc, seen, cand)
        for i in range(hi - lo):
            u[lo + i, 0], u[lo + i, 1], u[lo + i, 2] = acc[0, i], acc[1, i], acc[2, i]
            if gradient:
                for q in range(9):
                    F[lo + i, q // 3, q % 3] = acc[3 + q, i]
    return u, F


@njit(cache=True, error_model="numpy", inline="always")
def _masked(acc, i, p0, rigid_z, inv_ramp):
    """u_L = m Σu_k, ∇u_L = m Σ∇u_k + Σu_k ⊗ m′ e_z with the Cu mask m(z) at height p0 (see Deformation._local),
    from point i of :func:`_row_sums`' acc: the tuple (u0, u1, u2, F00, F01, …, F22)."""
    m, dm = _smooth((p0 - rigid_z) * inv_ramp)
    dm *= inv_ramp
    u0, u1, u2 = acc[0, i], acc[1, i], acc[2, i]
    return (m * u0, m * u1, m * u2, m * acc[3, i] + u0 * dm, m * acc[4, i], m * acc[5, i], m * acc[6, i] + u1 * dm,
            m * acc[7, i], m * acc[8, i], m * acc[9, i] + u2 * dm, m * acc[10, i], m * acc[11, i])


@njit(cache=True, error_model="numpy", inline="always")
def _lam_w(z, lam, w_nodes):
    """λ(z) (piecewise linear, constant beyond the nodes) and w(z) = ∫₀^z (λ − 1) (see Deformation._w)."""
    n = lam.size
    zc = min(max(z, 0.0), n - 1.0)
    if n > 1:
        k = min(int(np.floor(zc)), n - 2)
        s = zc - k
        slope = lam[k + 1] - lam[k]
        w = w_nodes[k] + (lam[k] - 1.0) * s + 0.5 * slope * s * s
        lz = lam[k] + slope * s
    else:
        w = 0.0
        lz = lam[0]
    return lz, w + (lam[0] - 1.0) * min(z, 0.0) + (lam[n - 1] - 1.0) * max(z - (n - 1.0), 0.0)


@njit(cache=True, error_model="numpy", inline="always")
def _det3(F00, F01, F02, F10, F11, F12, F20, F21, F22):
    return F00 * (F11 * F22 - F12 * F21) - F01 * (F10 * F22 - F12 * F20) + F02 * (F10 * F21 - F11 * F20)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def displacement_slab(z0, stride, out, kern, outer, check):
    """u = φ(X) − X (voxels) at the grid points X = (z0 + i, j, k)·stride into out (3, nzs, ny, nx) float32.

    Returns, per row (iz, iy) of the slab, the smallest det F and the flat index into the slab where it
    occurs (+inf when not ``check``): every fold is reported, so the caller can tell which kernels fold.
    """
    rigid_z, ramp, lam, w_nodes, Fh, centre = outer
    det_h = _det3(Fh[0, 0], Fh[0, 1], Fh[0, 2], Fh[1, 0], Fh[1, 1], Fh[1, 2], Fh[2, 0], Fh[2, 1], Fh[2, 2])
    inv_ramp = 1.0 / ramp
    _, nzs, ny, nx = out.shape
    row_min = np.full(nzs * ny, np.inf)
    row_at = np.zeros(nzs * ny, np.int64)
    for row in prange(nzs * ny):
        iz, iy = row // ny, row % ny
        p0, p1 = float((z0 + iz) * stride), float(iy * stride)
        P2 = np.arange(nx) * float(stride)
        acc, seen, cand = _scratch(kern, nx)
        _row_sums(np.full(nx, p0), np.full(nx, p1), P2, P2, nx, kern, check, 0.0, acc, seen, cand)
        for ix in range(nx):
            p2 = P2[ix]
            u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22 = _masked(acc, ix, p0, rigid_z, inv_ramp)
            lz, w = _lam_w(p0 + u0, lam, w_nodes)
            Z0, Z1, Z2 = p0 + u0 + w - centre[0], p1 + u1 - centre[1], p2 + u2 - centre[2]
            out[0, iz, iy, ix] = centre[0] + Fh[0, 0] * Z0 + Fh[0, 1] * Z1 + Fh[0, 2] * Z2 - p0
            out[1, iz, iy, ix] = centre[1] + Fh[1, 0] * Z0 + Fh[1, 1] * Z1 + Fh[1, 2] * Z2 - p1
            out[2, iz, iy, ix] = centre[2] + Fh[2, 0] * Z0 + Fh[2, 1] * Z1 + Fh[2, 2] * Z2 - p2
            if check:
                d = det_h * lz * _det3(1.0 + F00, F01, F02, F10, 1.0 + F11, F12, F20, F21, 1.0 + F22)
                if d < row_min[row]:
                    row_min[row] = d
                    row_at[row] = (iz * ny + iy) * nx + ix
    return row_min, row_at


@njit(cache=True, error_model="numpy", inline="always")
def _trilinear(v, z0, z1, y0, y1, x0, x1, fz, fy, fx):
    """v interpolated trilinearly between the corner indices (z0 | z1, …) with weights fz, fy, fx ∈ [0, 1]."""
    a = (v[z0, y0, x0] * (1 - fx) + v[z0, y0, x1] * fx) * (1 - fy) + (v[z0, y1, x0] * (1 - fx) + v[z0, y1, x1] * fx) * fy
    b = (v[z1, y0, x0] * (1 - fx) + v[z1, y0, x1] * fx) * (1 - fy) + (v[z1, y1, x0] * (1 - fx) + v[z1, y1, x1] * fx) * fy
    return a * (1 - fz) + b * fz


@njit(cache=True, error_model="numpy", inline="always")
def _catmull_rom(t):
    """The Catmull-Rom weights of nodes −1, 0, 1, 2 at fraction t ∈ [0, 1] between nodes 0 and 1 (1 on node 0 at
    t = 0: the nodes' values are kept)."""
    t2 = t * t
    t3 = t2 * t
    return (0.5 * (-t3 + 2.0 * t2 - t), 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0), 0.5 * (-3.0 * t3 + 4.0 * t2 + t),
            0.5 * (t3 - t2))


@njit(cache=True, error_model="numpy", inline="always")
def _row_is_rigid(Y, gx, n, kern, rigid_z, seen, cand):
    """Whether u_L = 0 at all points Y (3, n) of a row (grid x ``gx``): they lie in the Cu foil (mask 0), or no
    kernel's hash cell meets their box (no kernel reaches them)."""
    lo0, hi0, lo1, hi1, reach = _row_box(Y[0], Y[1], Y[2], gx, n)
    if hi0 <= rigid_z:
        return True
    _, _, _, _, _, _, _, origin, inv_h, dims, starts, order = kern
    return _candidates(lo0, hi0, lo1, hi1, gx[0] - reach, gx[n - 1] + reach, origin, inv_h, dims, starts, order, seen,
                       cand) == 0


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def inverse_slab(z0, stride, X, guess, kern, outer, tol, margin, relative):
    """φ⁻¹(x) (voxels) at the grid points x = (z0 + i, j, k)·stride into X (3, nzs, ny, nx); with ``relative``
    its local part φ⁻¹(x) − Y, Y = (H ∘ A)⁻¹(x): a few voxels at most, which float32 holds to ~1e-7.

    ``guess``: that local part on the grid of every 2nd voxel (from a ``stride=2``, ``relative``
    call), interpolated (Catmull-Rom cubic) and added to Y as the starting point; empty (shape (3, 0, 0, 0)):
    start from Y − u_L(Y).
    A row's points iterate together, the kernel sums of those not yet converged evaluated at
    once (:func:`_row_sums`); a row no kernel reaches (or in the Cu foil) takes X = Y = (H ∘ A)⁻¹(x).
    Newton steps on L are clipped to one voxel (the kernels are strongly nonlinear where they compress).
    A step s no longer than ``margin`` (voxels) whose residual is bounded below ``tol`` by Taylor's theorem,
    |L(X − s) − Y| ≤ ½ M |s|² with M the kernels' Hessian bound within ``margin`` (:func:`_row_sums`), is
    taken without evaluating L again; the Cu mask must be constant (0 or 1) there. Returns the largest final residual |φ(X) − x|∞ (voxels; for a step so taken, its bound)
    and the total number of Newton iterations (kernel sums at a point).
    """
    rigid_z, ramp, lam, w_nodes, Fh_inv, centre = outer
    inv_ramp = 1.0 / ramp
    mask_one = rigid_z + ramp  # the Cu mask is 1 above
    _, nzs, ny, nx = X.shape
    worst = np.zeros(nzs * ny)
    iterations = np.zeros(nzs * ny, np.int64)
    for row in prange(nzs * ny):
        iz, iy = row // ny, row % ny
        gz, gy = z0 + iz * stride, iy * stride
        gx = np.arange(nx) * float(stride)
        Y = np.empty((3, nx))
        P = np.empty((3, nx))
        z = solved = np.nan
        for ix in range(nx):
            x0, x1, x2 = gz - centre[0], gy - centre[1], gx[ix] - centre[2]
            target = centre[0] + Fh_inv[0, 0] * x0 + Fh_inv[0, 1] * x1 + Fh_inv[0, 2] * x2  # H⁻¹
            Y[1, ix] = centre[1] + Fh_inv[1, 0] * x0 + Fh_inv[1, 1] * x1 + Fh_inv[1, 2] * x2
            Y[2, ix] = centre[2] + Fh_inv[2, 0] * x0 + Fh_inv[2, 1] * x1 + Fh_inv[2, 2] * x2
            # A⁻¹: z + w(z) = target by 1-D Newton from the row's previous solution; once a row unless H shears z
            if target != solved:
                if ix == 0:
                    z = target
                for _ in range(100):
                    lz, w = _lam_w(z, lam, w_nodes)
                    step = (z + w - target) / lz
                    z -= step
                    if abs(step) < 1e-10:
                        break
                solved = target
            Y[0, ix] = z
        acc, seen, cand = _scratch(kern, nx)
        if _row_is_rigid(Y, gx, nx, kern, rigid_z, seen, cand):  # L is the identity there: X = Y exactly
            for ix in range(nx):
                for c in range(3):
                    X[c, iz, iy, ix] = 0.0 if relative else Y[c, ix]
            continue
        if guess.shape[1] > 0:
            # Catmull-Rom cubic between the guess's nodes (its own values on them): where L⁻¹ is smooth over a few
            # voxels it lands far closer than trilinear, so more first Newton steps are short enough to certify
            ncz, ncy, ncx = guess.shape[1], guess.shape[2], guess.shape[3]
            wz, wy = _catmull_rom(0.5 * (gz % 2)), _catmull_rom(0.5 * (gy % 2))
            guess_row = np.zeros((3, ncx))  # interpolated in (z, y) once for the row, then along x
            for a in range(4):
                cz = min(max(gz // 2 - 1 + a, 0), ncz - 1)
                for b in range(4):
                    w = wz[a] * wy[b]
                    if w == 0.0:
                        continue
                    cy = min(max(gy // 2 - 1 + b, 0), ncy - 1)
                    for c in range(3):
                        for cx in range(ncx):
                            guess_row[c, cx] += w * guess[c, cz, cy, cx]
            for ix in range(nx):
                wx = _catmull_rom(0.5 * ((ix * stride) % 2))
                for c in range(3):
                    g = 0.0
                    for a in range(4):
                        g += wx[a] * guess_row[c, min(max((ix * stride) // 2 - 1 + a, 0), ncx - 1)]
                    P[c, ix] = Y[c, ix] + g
        else:  # L⁻¹ by Newton from X = Y − u_L(Y)
            _row_sums(Y[0], Y[1], Y[2], gx, nx, kern, False, 0.0, acc, seen, cand)
            for ix in range(nx):
                t = _masked(acc, ix, Y[0, ix], rigid_z, inv_ramp)
                for c in range(3):
                    P[c, ix] = Y[c, ix] - t[c]
        # the points still iterating, gathered: their sums are evaluated together
        active = np.arange(nx)
        Pa = np.empty((3, nx))
        ga = np.empty(nx)
        n_active = nx
        for it in range(100):
            for j in range(n_active):
                i = active[j]
                Pa[0, j], Pa[1, j], Pa[2, j], ga[j] = P[0, i], P[1, i], P[2, i], gx[i]
            iterations[row] += n_active
            _row_sums(Pa[0], Pa[1], Pa[2], ga, n_active, kern, True, margin, acc, seen, cand)
            still = 0
            for j in range(n_active):
                i = active[j]
                u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22 = _masked(acc, j, Pa[0, j], rigid_z, inv_ramp)
                r0, r1, r2 = Pa[0, j] + u0 - Y[0, i], Pa[1, j] + u1 - Y[1, i], Pa[2, j] + u2 - Y[2, i]
                res = max(abs(r0), abs(r1), abs(r2))
                if res < tol:
                    worst[row] = max(worst[row], res)
                    continue
                F00 += 1.0
                F11 += 1.0
                F22 += 1.0
                c00 = F11 * F22 - F12 * F21
                c01 = F02 * F21 - F01 * F22
                c02 = F01 * F12 - F02 * F11
                c10 = F12 * F20 - F10 * F22
                c11 = F00 * F22 - F02 * F20
                c12 = F02 * F10 - F00 * F12
                c20 = F10 * F21 - F11 * F20
                c21 = F01 * F20 - F00 * F21
                c22 = F00 * F11 - F01 * F10
                inv_det = 1.0 / (F00 * c00 + F01 * c10 + F02 * c20)
                s0 = (c00 * r0 + c01 * r1 + c02 * r2) * inv_det
                s1 = (c10 * r0 + c11 * r1 + c12 * r2) * inv_det
                s2 = (c20 * r0 + c21 * r1 + c22 * r2) * inv_det
                norm = np.sqrt(s0 * s0 + s1 * s1 + s2 * s2)
                bound = 0.5 * acc[12, j] * norm * norm
                mask_constant = Pa[0, j] - margin >= mask_one or Pa[0, j] + margin <= rigid_z
                if norm <= margin and bound < 0.5 * tol and mask_constant:
                    P[0, i] -= s0
                    P[1, i] -= s1
                    P[2, i] -= s2
                    worst[row] = max(worst[row], bound)
                    continue
                shrink = 1.0 / norm if norm > 1.0 else 1.0
                P[0, i] -= shrink * s0
                P[1, i] -= shrink * s1
                P[2, i] -= shrink * s2
                if it == 99:  # out of iterations: the residual before this step is the one reported
                    worst[row] = max(worst[row], res)
                active[still] = i
                still += 1
            n_active = still
            if n_active == 0:
                break
        for ix in range(nx):
            for c in range(3):
                X[c, iz, iy, ix] = P[c, ix] - Y[c, ix] if relative else P[c, ix]
    return worst.max(), iterations.sum()


@njit(cache=True, error_model="numpy", inline="always")
def _nearest(c, n):
    """The index of the voxel nearest coordinate c along an axis of n voxels (clamped: mode "nearest")."""
    return min(max(int(np.floor(c + 0.5)), 0), n - 1)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sample_nearest(volume, coords, out):
    """out[i] = volume at the voxel nearest coords[:, i] (clamped to the volume: mode "nearest")."""
    nz, ny, nx = volume.shape
    for i in prange(coords.shape[1]):
        out[i] = volume[_nearest(coords[0, i], nz), _nearest(coords[1, i], ny), _nearest(coords[2, i], nx)]


@njit(cache=True, error_model="numpy", inline="always")
def _cell(c, n):
    c = min(max(c, 0.0), n - 1.0)
    i = min(int(np.floor(c)), max(n - 2, 0))
    return i, min(i + 1, n - 1), c - i


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sample_linear(volume, coords, out):
    """out[i] = trilinear interpolation of volume at coords[:, i], coordinates clamped (mode "nearest")."""
    nz, ny, nx = volume.shape
    for i in prange(coords.shape[1]):
        z0, z1, fz = _cell(coords[0, i], nz)
        y0, y1, fy = _cell(coords[1, i], ny)
        x0, x1, fx = _cell(coords[2, i], nx)
        out[i] = _trilinear(volume, z0, z1, y0, y1, x0, x1, fz, fy, fx)


_CBD, _SI_CRYSTALLINE = int(Phase.CBD), int(Phase.SI_CRYSTALLINE)
_SILICON = (int(Phase.SI_CRYSTALLINE), int(Phase.SI_LITHIATED), int(Phase.SI_AMORPHOUS))


@njit(cache=True, error_model="numpy", inline="always")
def _optics_of(ph, x, p, lut, lixsi, inv_dx, consts):
    """(δ, β) of a voxel of phase ``ph`` with Li content x and CBD porosity p, SEI partial volume aside.

    ``lut`` (phases, 2): per-phase values; ``lixsi`` (n, 3): x, δ, β of LixSi at n equally spaced x
    (indexed directly, 1 / spacing ``inv_dx``, no search); ``consts``: CBD solid δ, β; electrolyte δ, β;
    c-Si δ, β; LixSi at x = 0 δ, β; SEI δ, β; SEI partial-volume weight.
    (:class:`phantoms.truth.OpticsRules` documents the rules; this evaluates them where the warp samples.)
    """
    if ph == _CBD:
        return (1.0 - p) * consts[0] + p * consts[2], (1.0 - p) * consts[1] + p * consts[3]
    if ph == _SILICON[0] or ph == _SILICON[1] or ph == _SILICON[2]:
        lo, t = _table_position(x, lixsi, inv_dx)
        delta = lixsi[lo, 1] * (1.0 - t) + lixsi[lo + 1, 1] * t
        beta = lixsi[lo, 2] * (1.0 - t) + lixsi[lo + 1, 2] * t
        if ph == _SI_CRYSTALLINE:
            delta += consts[4] - consts[6]
            beta += consts[5] - consts[7]
        return delta, beta
    return lut[ph, 0], lut[ph, 1]


@njit(cache=True, error_model="numpy", inline="always")
def _table_position(x, lixsi, inv_dx):
    """Where x lies in the LixSi table (clamped to it): the interval [lo, lo + 1] and the fraction t in it."""
    n = lixsi.shape[0]
    s = min(max((x - lixsi[0, 0]) * inv_dx, 0.0), n - 1.0)
    lo = min(int(s), n - 2)
    return lo, s - lo


@njit(cache=True, error_model="numpy", inline="always")
def _optics_at(v, phase, lith, porosity, partial, lut, lixsi, inv_dx, consts):
    """(δ, β) of reference voxel v (flat index) from its phase, Li content, CBD porosity and SEI partial volume
    (``partial``: flat bool, or empty); see :func:`_optics_of`."""
    delta, beta = _optics_of(phase[v], lith[v], porosity[v], lut, lixsi, inv_dx, consts)
    if partial.size > 0 and partial[v]:
        delta = (1.0 - consts[10]) * delta + consts[10] * consts[8]
        beta = (1.0 - consts[10]) * beta + consts[10] * consts[9]
    return delta, beta


@njit(cache=True, error_model="numpy", inline="always")
def _corner_weight(corner, fz, fy, fx):
    """The trilinear weight of corner (dz, dy, dx) = bits 2, 1, 0 of ``corner``."""
    return ((fz if corner >> 2 else 1.0 - fz) * (fy if (corner >> 1) & 1 else 1.0 - fy)
            * (fx if corner & 1 else 1.0 - fx))


@njit(cache=True, error_model="numpy", inline="always")
def _optics_trilinear(z0, z1, y0, y1, x0, x1, fz, fy, fx, ny, nx, phase_f, lith_f, porosity_f, partial_f, lut, lixsi,
                      inv_dx, consts):
    """(δ, β) interpolated trilinearly between the corner voxels (z0 | z1, …; weights fz, fy, fx) of δ and β
    evaluated per voxel by :func:`_optics_at` (flat volumes).

    Where the eight voxels are all of one phase (no SEI partial volume) whose δ and β are affine in what
    varies between them, the rule is evaluated once at that quantity interpolated, which is the same sum:
    a constant phase; CBD (affine in its porosity); Si whose eight x lie in one interval of the LixSi table.
    """
    base = (z0 * ny + y0) * nx + x0
    step_z, step_y, step_x = (z1 - z0) * ny * nx, (y1 - y0) * nx, x1 - x0
    ph = phase_f[base]
    uniform = partial_f.size == 0 or not partial_f[base]
    x_min = x_max = lith_f[base]
    for corner in range(1, 8):
        v = base + (corner >> 2) * step_z + ((corner >> 1) & 1) * step_y + (corner & 1) * step_x
        uniform = uniform and phase_f[v] == ph and (partial_f.size == 0 or not partial_f[v])
        x_min, x_max = min(x_min, lith_f[v]), max(x_max, lith_f[v])
    silicon = ph == _SILICON[0] or ph == _SILICON[1] or ph == _SILICON[2]
    if uniform and (not silicon or _table_position(x_min, lixsi, inv_dx)[0] == _table_position(x_max, lixsi, inv_dx)[0]):
        x = p = 0.0
        for corner in range(8):
            v = base + (corner >> 2) * step_z + ((corner >> 1) & 1) * step_y + (corner & 1) * step_x
            w = _corner_weight(corner, fz, fy, fx)
            x += w * lith_f[v] if silicon else 0.0
            p += w * porosity_f[v] if ph == _CBD else 0.0
        return _optics_of(ph, x, p, lut, lixsi, inv_dx, consts)
    delta = beta = 0.0
    for corner in range(8):
        w = _corner_weight(corner, fz, fy, fx)
        d, b = _optics_at(base + (corner >> 2) * step_z + ((corner >> 1) & 1) * step_y + (corner & 1) * step_x, phase_f,
                          lith_f, porosity_f, partial_f, lut, lixsi, inv_dx, consts)
        delta += w * d
        beta += w * b
    return delta, beta


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sample_optics(phase, lith, porosity, partial, lut, lixsi, consts, coords, out_delta, out_beta):
    """out_delta[i], out_beta[i] = trilinear interpolation at coords[:, i] of δ and β evaluated per voxel by
    :func:`_optics_at` (coordinates clamped: mode "nearest"; see :func:`_optics_trilinear`). Volumes
    C-contiguous; ``partial``: bool volume, or shape (0, 0, 0)."""
    nz, ny, nx = phase.shape
    phase_f, lith_f, porosity_f, partial_f = phase.reshape(-1), lith.reshape(-1), porosity.reshape(-1), partial.reshape(-1)
    inv_dx = (lixsi.shape[0] - 1) / (lixsi[lixsi.shape[0] - 1, 0] - lixsi[0, 0])
    for i in prange(coords.shape[1]):
        z0, z1, fz = _cell(coords[0, i], nz)
        y0, y1, fy = _cell(coords[1, i], ny)
        x0, x1, fx = _cell(coords[2, i], nx)
        out_delta[i], out_beta[i] = _optics_trilinear(z0, z1, y0, y1, x0, x1, fz, fy, fx, ny, nx, phase_f, lith_f,
                                                      porosity_f, partial_f, lut, lixsi, inv_dx, consts)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sample_scan(phase, particle, lith, porosity, partial, lut, lixsi, consts, coords, out_phase, out_particle,
                out_lith, out_delta, out_beta):
    """A scan's five warped volumes in one pass over coords (3, n): phase and particle as :func:`sample_nearest`,
    lithiation as :func:`sample_linear`, δ and β as :func:`sample_optics` (the same values: each point's cell
    is found once and its voxels read once for all five)."""
    nz, ny, nx = phase.shape
    phase_f, lith_f, porosity_f, partial_f = phase.reshape(-1), lith.reshape(-1), porosity.reshape(-1), partial.reshape(-1)
    particle_f = particle.reshape(-1)
    inv_dx = (lixsi.shape[0] - 1) / (lixsi[lixsi.shape[0] - 1, 0] - lixsi[0, 0])
    for i in prange(coords.shape[1]):
        c0, c1, c2 = coords[0, i], coords[1, i], coords[2, i]
        near = (_nearest(c0, nz) * ny + _nearest(c1, ny)) * nx + _nearest(c2, nx)
        out_phase[i] = phase_f[near]
        out_particle[i] = particle_f[near]
        z0, z1, fz = _cell(c0, nz)
        y0, y1, fy = _cell(c1, ny)
        x0, x1, fx = _cell(c2, nx)
        out_lith[i] = _trilinear(lith, z0, z1, y0, y1, x0, x1, fz, fy, fx)
        out_delta[i], out_beta[i] = _optics_trilinear(z0, z1, y0, y1, x0, x1, fz, fy, fx, ny, nx, phase_f, lith_f,
                                                      porosity_f, partial_f, lut, lixsi, inv_dx, consts)
