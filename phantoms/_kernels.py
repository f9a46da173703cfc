"""Compiled sum of the deformation's local kernels (numba, already required by spam).

The same equations as :meth:`phantoms.deformation.Deformation._kernels` (the
NumPy reference, tested equal to this to 1e-12), evaluated point by point with a
uniform-cell hash of the kernel centres: no (n, 3, 3) temporaries per kernel, so
memory stays at the outputs and time at ~the number of (point, kernel) pairs
that are in reach.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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


@njit(cache=True)
def _smooth(s):
    if s <= 0.0:
        return 0.0, 0.0
    if s >= 1.0:
        return 1.0, 0.0
    return s * s * s * (10.0 - 15.0 * s + 6.0 * s * s), 30.0 * s * s * (1.0 - s) * (1.0 - s)


@njit(cache=True)
def sum_kernels(P, n_swell, centres, radii, amps, vectors, supports, transition, origin, h, dims, starts, order,
                gradient):
    """Σ u_k (n, 3) and Σ ∇u_k (n, 3, 3) at points P (n, 3); kernels < n_swell swell, the rest are bumps."""
    n = P.shape[0]
    u = np.zeros((n, 3))
    F = np.zeros((n, 3, 3)) if gradient else np.zeros((1, 3, 3))
    y = np.empty(3)
    for p in range(n):
        cell = 0
        for d in range(3):
            c = int(np.floor((P[p, d] - origin[d]) / h))
            if c < 0 or c >= dims[d]:
                cell = -1
                break
            cell = cell * dims[d] + c
        if cell < 0:
            continue
        for q in range(starts[cell], starts[cell + 1]):
            k = order[q]
            for d in range(3):
                y[d] = P[p, d] - centres[k, d]
            r2 = y[0] * y[0] + y[1] * y[1] + y[2] * y[2]
            if r2 >= supports[k] * supports[k]:
                continue
            r = np.sqrt(r2)
            R = radii[k]
            if k < n_swell:
                S, dS = _smooth((r / R - 1.0) / transition)
                G = 1.0 - S
                a = amps[k]
                for i in range(3):
                    u[p, i] += a * G * y[i]
                if gradient:
                    coef = -dS / (transition * R) / r if r > 0 else 0.0
                    for i in range(3):
                        for j in range(3):
                            F[p, i, j] += a * coef * y[i] * y[j]
                        F[p, i, i] += a * G
            else:
                S, dS = _smooth(r / R)
                B = 1.0 - S
                for i in range(3):
                    u[p, i] += B * vectors[k, i]
                if gradient:
                    coef = -dS / R / r if r > 0 else 0.0
                    for i in range(3):
                        for j in range(3):
                            F[p, i, j] += vectors[k, i] * coef * y[j]
    return u, F
