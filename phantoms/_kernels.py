"""Compiled evaluation of the deformation (numba, already required by spam).

The same equations as :class:`phantoms.deformation.Deformation` (its NumPy
methods are the reference, tested equal to these), evaluated point by point:

* :func:`sum_kernels`: Σ u_k and Σ ∇u_k of the local kernels, found through a
  uniform-cell hash of the kernel centres, so time goes with the (point, kernel)
  pairs in reach and memory stays at the outputs;
* :func:`displacement_slab`: u = φ(X) − X on grid voxels with det F, fused (no
  (n, 3, 3) temporaries);
* :func:`inverse_slab`: φ⁻¹ on grid voxels, H and A inverted in closed form / by
  1-D Newton and L by Newton iterations per point;
* :func:`sample_nearest`, :func:`sample_linear`: ``map_coordinates`` of order 0
  and 1 with ``mode="nearest"``.

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
def _kernel_sum(p0, p1, p2, n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h,
                dims, starts, order, gradient):
    """Σ u_k and (if ``gradient``) Σ ∇u_k at (p0, p1, p2): the tuple (u0, u1, u2, F00, F01, …, F22).

    Scalars rather than small arrays: numba keeps them in registers (~1.5× faster). The kernels come as
    ``kern``'s members, unpacked by the caller outside its loops: a tuple of arrays unpacked per point
    costs reference counting on every member (~30 ns per call measured on a synthetic field).
    """
    u0 = u1 = u2 = 0.0
    F00 = F01 = F02 = F10 = F11 = F12 = F20 = F21 = F22 = 0.0
    cz = int(np.floor((p0 - origin[0]) * inv_h))
    cy = int(np.floor((p1 - origin[1]) * inv_h))
    cx = int(np.floor((p2 - origin[2]) * inv_h))
    if cz < 0 or cz >= dims[0] or cy < 0 or cy >= dims[1] or cx < 0 or cx >= dims[2]:
        return u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22
    cell = (cz * dims[1] + cy) * dims[2] + cx
    for q in range(starts[cell], starts[cell + 1]):
        k = order[q]
        y0, y1, y2 = p0 - centres[k, 0], p1 - centres[k, 1], p2 - centres[k, 2]
        r2 = y0 * y0 + y1 * y1 + y2 * y2
        if r2 >= supports[k] * supports[k]:
            continue
        r = np.sqrt(r2)
        inv_r = 1.0 / r if r > 0 else 0.0
        iR = inv_radii[k]
        if k < n_swell:
            S, dS = _smooth((r * iR - 1.0) * inv_transition)
            a = amps[k]
            aG = a * (1.0 - S)
            u0 += aG * y0
            u1 += aG * y1
            u2 += aG * y2
            if gradient:
                c = -a * dS * iR * inv_transition * inv_r
                F00 += c * y0 * y0 + aG
                F01 += c * y0 * y1
                F02 += c * y0 * y2
                F10 += c * y1 * y0
                F11 += c * y1 * y1 + aG
                F12 += c * y1 * y2
                F20 += c * y2 * y0
                F21 += c * y2 * y1
                F22 += c * y2 * y2 + aG
        else:
            S, dS = _smooth(r * iR)
            B = 1.0 - S
            v0, v1, v2 = vectors[k, 0], vectors[k, 1], vectors[k, 2]
            u0 += B * v0
            u1 += B * v1
            u2 += B * v2
            if gradient:
                c = -dS * iR * inv_r
                F00 += v0 * c * y0
                F01 += v0 * c * y1
                F02 += v0 * c * y2
                F10 += v1 * c * y0
                F11 += v1 * c * y1
                F12 += v1 * c * y2
                F20 += v2 * c * y0
                F21 += v2 * c * y1
                F22 += v2 * c * y2
    return u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sum_kernels(P, kern, gradient):
    """Σ u_k (n, 3) and Σ ∇u_k (n, 3, 3) at points P (n, 3)."""
    n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims, starts, order = kern
    n = P.shape[0]
    u = np.zeros((n, 3))
    F = np.zeros((n, 3, 3)) if gradient else np.zeros((1, 3, 3))
    for p in prange(n):
        t = _kernel_sum(P[p, 0], P[p, 1], P[p, 2], n_swell, centres, inv_radii, amps, vectors, supports, inv_transition,
                        origin, inv_h, dims, starts, order, gradient)
        u[p, 0], u[p, 1], u[p, 2] = t[0], t[1], t[2]
        if gradient:
            F[p, 0, 0], F[p, 0, 1], F[p, 0, 2] = t[3], t[4], t[5]
            F[p, 1, 0], F[p, 1, 1], F[p, 1, 2] = t[6], t[7], t[8]
            F[p, 2, 0], F[p, 2, 1], F[p, 2, 2] = t[9], t[10], t[11]
    return u, F


@njit(cache=True, error_model="numpy", inline="always")
def _local(p0, p1, p2, n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims,
           starts, order, rigid_z, ramp, gradient):
    """u_L = m Σu_k, ∇u_L = m Σ∇u_k + Σu_k ⊗ m′ e_z with the Cu mask m(z) (see Deformation._local); same tuple."""
    u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22 = _kernel_sum(
        p0, p1, p2, n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims, starts,
        order, gradient)
    inv_ramp = 1.0 / ramp  # loop-invariant once inlined: hoisted out of the grid loops
    m, dm = _smooth((p0 - rigid_z) * inv_ramp)
    dm *= inv_ramp
    return (m * u0, m * u1, m * u2, m * F00 + u0 * dm, m * F01, m * F02, m * F10 + u1 * dm, m * F11, m * F12,
            m * F20 + u2 * dm, m * F21, m * F22)


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
    n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims, starts, order = kern
    det_h = _det3(Fh[0, 0], Fh[0, 1], Fh[0, 2], Fh[1, 0], Fh[1, 1], Fh[1, 2], Fh[2, 0], Fh[2, 1], Fh[2, 2])
    _, nzs, ny, nx = out.shape
    row_min = np.full(nzs * ny, np.inf)
    row_at = np.zeros(nzs * ny, np.int64)
    for row in prange(nzs * ny):
        iz, iy = row // ny, row % ny
        for ix in range(nx):
            p0, p1, p2 = float((z0 + iz) * stride), float(iy * stride), float(ix * stride)
            u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22 = _local(
                p0, p1, p2, n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims,
                starts, order, rigid_z, ramp, check)
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


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def inverse_slab(z0, stride, X, guess, kern, outer, tol):
    """φ⁻¹(x) (voxels) at the grid points x = (z0 + i, j, k)·stride into X (3, nzs, ny, nx) float64.

    ``guess``: φ⁻¹ on the grid of every 2nd voxel (from a ``stride=2`` call), interpolated
    trilinearly as the starting point; empty (shape (3, 0, 0, 0)): start from Y − u_L(Y).
    Newton steps on L are clipped to one voxel (the kernels are strongly nonlinear
    where they compress). Returns the largest final residual |φ(X) − x|∞ (voxels)
    and the total number of Newton iterations.
    """
    rigid_z, ramp, lam, w_nodes, Fh_inv, centre = outer
    n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h, dims, starts, order = kern
    _, nzs, ny, nx = X.shape
    worst = np.zeros(nzs * ny)
    iterations = np.zeros(nzs * ny, np.int64)
    for row in prange(nzs * ny):
        iz, iy = row // ny, row % ny
        gz, gy = z0 + iz * stride, iy * stride
        z = np.nan
        for ix in range(nx):
            gx = ix * stride
            x0, x1, x2 = gz - centre[0], gy - centre[1], gx - centre[2]
            Y0 = centre[0] + Fh_inv[0, 0] * x0 + Fh_inv[0, 1] * x1 + Fh_inv[0, 2] * x2  # H⁻¹
            Y1 = centre[1] + Fh_inv[1, 0] * x0 + Fh_inv[1, 1] * x1 + Fh_inv[1, 2] * x2
            Y2 = centre[2] + Fh_inv[2, 0] * x0 + Fh_inv[2, 1] * x1 + Fh_inv[2, 2] * x2
            target = Y0  # A⁻¹: z + w(z) = target, z ↦ z + w(z) increasing (λ > 0)
            if ix == 0:  # along a row the previous voxel's solution is the start (the same z unless F_h shears)
                z = target
            for _ in range(100):
                lz, w = _lam_w(z, lam, w_nodes)
                step = (z + w - target) / lz
                z -= step
                if abs(step) < 1e-10:
                    break
            Y0 = z
            if guess.shape[1] > 0:
                cz, cy, cx = gz // 2, gy // 2, gx // 2
                fz, fy, fx = 0.5 * (gz % 2), 0.5 * (gy % 2), 0.5 * (gx % 2)
                P0 = _trilinear(guess[0], cz, cz + 1, cy, cy + 1, cx, cx + 1, fz, fy, fx)
                P1 = _trilinear(guess[1], cz, cz + 1, cy, cy + 1, cx, cx + 1, fz, fy, fx)
                P2 = _trilinear(guess[2], cz, cz + 1, cy, cy + 1, cx, cx + 1, fz, fy, fx)
            else:  # L⁻¹ by Newton from X = Y − u_L(Y)
                t = _local(Y0, Y1, Y2, n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin,
                           inv_h, dims, starts, order, rigid_z, ramp, False)
                P0, P1, P2 = Y0 - t[0], Y1 - t[1], Y2 - t[2]
            res = np.inf
            for _ in range(100):
                iterations[row] += 1
                u0, u1, u2, F00, F01, F02, F10, F11, F12, F20, F21, F22 = _local(
                    P0, P1, P2, n_swell, centres, inv_radii, amps, vectors, supports, inv_transition, origin, inv_h,
                    dims, starts, order, rigid_z, ramp, True)
                r0, r1, r2 = P0 + u0 - Y0, P1 + u1 - Y1, P2 + u2 - Y2
                res = max(abs(r0), abs(r1), abs(r2))
                if res < tol:
                    break
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
                shrink = 1.0 / norm if norm > 1.0 else 1.0
                P0 -= shrink * s0
                P1 -= shrink * s1
                P2 -= shrink * s2
            X[0, iz, iy, ix], X[1, iz, iy, ix], X[2, iz, iy, ix] = P0, P1, P2
            if res > worst[row]:
                worst[row] = res
    return worst.max(), iterations.sum()


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sample_nearest(volume, coords, out):
    """out[i] = volume at the voxel nearest coords[:, i] (clamped to the volume: mode "nearest")."""
    nz, ny, nx = volume.shape
    for i in prange(coords.shape[1]):
        z = min(max(int(np.floor(coords[0, i] + 0.5)), 0), nz - 1)
        y = min(max(int(np.floor(coords[1, i] + 0.5)), 0), ny - 1)
        x = min(max(int(np.floor(coords[2, i] + 0.5)), 0), nx - 1)
        out[i] = volume[z, y, x]


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
def _optics_at(z, y, x, phase, lith, porosity, partial, lut, lixsi, consts):
    """(δ, β) of reference voxel (z, y, x) from its phase, Li content and CBD porosity.

    ``lut`` (phases, 2): per-phase values; ``lixsi`` (n, 3): x, δ, β of LixSi at n equally spaced x
    (indexed directly, no search); ``consts``: CBD solid δ, β; electrolyte δ, β; c-Si δ, β; LixSi at
    x = 0 δ, β; SEI δ, β; SEI partial-volume weight. (:class:`phantoms.truth.OpticsRules` documents
    the rules; this evaluates them where the warp samples.)
    """
    ph = phase[z, y, x]
    if ph == _CBD:
        p = porosity[z, y, x]
        delta = (1.0 - p) * consts[0] + p * consts[2]
        beta = (1.0 - p) * consts[1] + p * consts[3]
    elif ph == _SILICON[0] or ph == _SILICON[1] or ph == _SILICON[2]:
        n = lixsi.shape[0]
        s = (lith[z, y, x] - lixsi[0, 0]) / (lixsi[n - 1, 0] - lixsi[0, 0]) * (n - 1)
        s = min(max(s, 0.0), n - 1.0)
        lo = min(int(s), n - 2)
        t = s - lo
        delta = lixsi[lo, 1] * (1.0 - t) + lixsi[lo + 1, 1] * t
        beta = lixsi[lo, 2] * (1.0 - t) + lixsi[lo + 1, 2] * t
        if ph == _SI_CRYSTALLINE:
            delta += consts[4] - consts[6]
            beta += consts[5] - consts[7]
    else:
        delta, beta = lut[ph, 0], lut[ph, 1]
    if partial.shape[0] > 0 and partial[z, y, x]:
        delta = (1.0 - consts[10]) * delta + consts[10] * consts[8]
        beta = (1.0 - consts[10]) * beta + consts[10] * consts[9]
    return delta, beta


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def sample_optics(phase, lith, porosity, partial, lut, lixsi, consts, coords, out_delta, out_beta):
    """out_delta[i], out_beta[i] = trilinear interpolation at coords[:, i] of δ and β evaluated per voxel by
    :func:`_optics_at` (coordinates clamped: mode "nearest"). ``partial``: bool volume, or shape (0, 0, 0)."""
    nz, ny, nx = phase.shape
    for i in prange(coords.shape[1]):
        z0, z1, fz = _cell(coords[0, i], nz)
        y0, y1, fy = _cell(coords[1, i], ny)
        x0, x1, fx = _cell(coords[2, i], nx)
        delta = beta = 0.0
        for dz in range(2):
            wz = fz if dz else 1.0 - fz
            zz = z1 if dz else z0
            for dy in range(2):
                wy = wz * (fy if dy else 1.0 - fy)
                yy = y1 if dy else y0
                for dx in range(2):
                    w = wy * (fx if dx else 1.0 - fx)
                    d, b = _optics_at(zz, yy, x1 if dx else x0, phase, lith, porosity, partial, lut, lixsi, consts)
                    delta += w * d
                    beta += w * b
        out_delta[i] = delta
        out_beta[i] = beta
