"""Compiled voxel passes of the microstructure generator (numba, already required by spam)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, error_model="numpy")
def nearest_fragment(centres, radii, reach, pore, noise):
    """Fragment owning each pore voxel, or -1.

    A voxel belongs to the candidate whose (integer) centre is nearest (the first
    one on ties), if that centre is within ``reach`` voxels, and is inside the
    fragment where its distance d ≤ r (1 + 0.25 n), n the noise at the voxel
    clipped to [−4, 4]. With reach ≥ 2 max r + 1 this equals taking the nearest
    centre over all candidates (a Voronoi partition by distance transform): a
    voxel with no centre in reach is inside no fragment.

    Parameters
    ----------
    centres : (n, 3) int64 voxel indices; radii : (n,) voxels; reach : float;
    pore : bool volume (where fragments may go); noise : float32 volume (unit std).

    Returns
    -------
    int32 volume of candidate indices, -1 outside every fragment.
    """
    nz, ny, nx = pore.shape
    best = np.full(pore.shape, np.inf, np.float32)
    owner = np.full(pore.shape, -1, np.int32)
    w = int(np.floor(reach))
    reach2 = reach * reach
    for i in range(centres.shape[0]):
        cz, cy, cx = centres[i, 0], centres[i, 1], centres[i, 2]
        for z in range(max(0, cz - w), min(nz, cz + w + 1)):
            for y in range(max(0, cy - w), min(ny, cy + w + 1)):
                for x in range(max(0, cx - w), min(nx, cx + w + 1)):
                    d2 = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2
                    if d2 <= reach2 and d2 < best[z, y, x]:
                        best[z, y, x] = d2
                        owner[z, y, x] = i
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                i = owner[z, y, x]
                if i < 0:
                    continue
                n = min(max(noise[z, y, x], -4.0), 4.0)
                if not pore[z, y, x] or np.sqrt(best[z, y, x]) > radii[i] * (1 + 0.25 * n):
                    owner[z, y, x] = -1
    return owner


@njit(cache=True, parallel=True, error_model="numpy")
def fits_in_pore(centres, radii, pore):
    """Whether each ball fits: no voxel outside ``pore`` lies closer than r + ½ to its centre.

    The same as ``distance_to_background(pore)[centre] >= r + 0.5`` (voxels beyond the volume's
    border count as pore), without the whole volume's distance transform.

    Parameters
    ----------
    centres : (n, 3) int64 voxel indices; radii : (n,) voxels; pore : bool volume.
    """
    nz, ny, nx = pore.shape
    fits = np.empty(centres.shape[0], np.bool_)
    for i in prange(centres.shape[0]):
        cz, cy, cx = centres[i, 0], centres[i, 1], centres[i, 2]
        reach2 = (radii[i] + 0.5) ** 2
        w = int(radii[i] + 0.5) + 1
        ok = True
        for z in range(max(0, cz - w), min(nz, cz + w + 1)):
            for y in range(max(0, cy - w), min(ny, cy + w + 1)):
                for x in range(max(0, cx - w), min(nx, cx + w + 1)):
                    if not pore[z, y, x] and (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < reach2:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        fits[i] = ok
    return fits


@njit(cache=True, parallel=True, error_model="numpy")
def power_cells(z_offset, seeds, weights, facets, h_min, roundness, shape_noise, noise_amplitude, block, cell, gauge):
    """Laguerre cell (1-based seed index) and perturbed gauge of every voxel of an (ez, ny, nx) box.

    The cell of X minimises the power |X − s_i|² − w_i. Per block of ``block``³
    voxels, only seeds whose smallest power over the block is at most the smallest
    largest power of any seed can own one of its voxels (powers are convex in X:
    their largest value over a box is at a corner), so each voxel compares a handful
    of seeds and the result is exact. Gauge: g = ((1 − β) max_k (f_ik · y) + β |y| / h_min,i)
    (1 + amplitude · noise), y = X − s_i, β = roundness_i (see module docstring of
    :mod:`phantoms.microstructure`). Voxel (k, j, i) sits at X = (z_offset + k, j, i).
    """
    ez, ny, nx = cell.shape
    n = seeds.shape[0]
    nbz, nby, nbx = (ez + block - 1) // block, (ny + block - 1) // block, (nx + block - 1) // block
    for b in prange(nbz * nby * nbx):
        bz, by, bx = b // (nby * nbx), (b // nbx) % nby, b % nbx
        z0, y0, x0 = bz * block, by * block, bx * block
        z1, y1, x1 = min(ez, z0 + block), min(ny, y0 + block), min(nx, x0 + block)
        lo = np.array([z_offset + z0, y0, x0], np.float64)
        hi = np.array([z_offset + z1 - 1, y1 - 1, x1 - 1], np.float64)
        upper = np.inf
        for j in range(n):
            p = -weights[j]
            for a in range(3):
                p += max((lo[a] - seeds[j, a]) ** 2, (hi[a] - seeds[j, a]) ** 2)
            upper = min(upper, p)
        cand = np.empty(n, np.int64)
        nc = 0
        for j in range(n):
            p = -weights[j]
            for a in range(3):
                p += (min(max(seeds[j, a], lo[a]), hi[a]) - seeds[j, a]) ** 2
            if p <= upper:
                cand[nc] = j
                nc += 1
        for z in range(z0, z1):
            for y in range(y0, y1):
                for x in range(x0, x1):
                    pz, py, px = z_offset + z, float(y), float(x)
                    best = np.inf
                    lab = 0
                    for c in range(nc):
                        j = cand[c]
                        p = (pz - seeds[j, 0]) ** 2 + (py - seeds[j, 1]) ** 2 + (px - seeds[j, 2]) ** 2 - weights[j]
                        if p < best:
                            best = p
                            lab = j
                    dz, dy, dx = pz - seeds[lab, 0], py - seeds[lab, 1], px - seeds[lab, 2]
                    g_facet = -np.inf
                    for k in range(facets.shape[1]):
                        g_facet = max(g_facet, facets[lab, k, 0] * dz + facets[lab, k, 1] * dy + facets[lab, k, 2] * dx)
                    g_round = np.sqrt(dz * dz + dy * dy + dx * dx) / h_min[lab]
                    beta = roundness[lab]
                    cell[z, y, x] = lab + 1
                    gauge[z, y, x] = ((1 - beta) * g_facet + beta * g_round) * (1 + noise_amplitude * shape_noise[z, y, x])


@njit(cache=True, error_model="numpy")
def label_centres(labels, n):
    """Voxel count and centre (mean index, (n + 1, 3)) of labels 0 … n."""
    count = np.zeros(n + 1)
    total = np.zeros((n + 1, 3))
    nz, ny, nx = labels.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = labels[z, y, x]
                count[k] += 1
                total[k, 0] += z
                total[k, 1] += y
                total[k, 2] += x
    return count, total / np.maximum(count, 1)[:, None]


@njit(cache=True, error_model="numpy")
def silicon_sums(particle, x, phase, crystalline, n):
    """Over the voxels of labels 1 … n: per label (n + 1,) and per z-plane, the voxel count, Σ x and the count
    of phase ``crystalline``: (count, x_sum, crystalline_count, plane_count, plane_x_sum, plane_crystalline)."""
    count, x_sum, cryst = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1)
    nz, ny, nx = particle.shape
    plane_count, plane_x, plane_cryst = np.zeros(nz), np.zeros(nz), np.zeros(nz)
    for z in range(nz):
        for y in range(ny):
            for i in range(nx):
                k = particle[z, y, i]
                if k == 0:
                    continue
                xi = float(x[z, y, i])
                c = 1.0 if phase[z, y, i] == crystalline else 0.0
                count[k] += 1.0
                x_sum[k] += xi
                cryst[k] += c
                plane_count[z] += 1.0
                plane_x[z] += xi
                plane_cryst[z] += c
    return count, x_sum, cryst, plane_count, plane_x, plane_cryst


@njit(cache=True, parallel=True, error_model="numpy")
def band_distance(labels, planes, starts, noise, roughness, z0):
    """max(0, min over its particle's planes of |X · n − o| + roughness · noise) at every labelled voxel, else 0.

    ``planes`` (P, 4) rows (n_z, n_y, n_x, o) with |n| = 1; particle k owns rows starts[k]:starts[k + 1].
    ``labels`` and ``noise`` are the layers from z = z0 on: voxel (k, j, i) sits at X = (z0 + k, j, i).
    """
    nz, ny, nx = labels.shape
    out = np.zeros(labels.shape, np.float32)
    for z in prange(nz):
        for y in range(ny):
            for x in range(nx):
                k = labels[z, y, x]
                if k == 0 or starts[k] == starts[k + 1]:
                    continue
                best = np.inf
                for p in range(starts[k], starts[k + 1]):
                    best = min(best, abs((z0 + z) * planes[p, 0] + y * planes[p, 1] + x * planes[p, 2] - planes[p, 3]))
                out[z, y, x] = max(0.0, best + roughness * noise[z, y, x])
    return out
