"""Strain of gridded displacement fields (spam Q8) against analytic strain."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dic import make_grid
from pipeline.strain import strain_field


@settings(max_examples=20, deadline=None)
@given(a=st.lists(st.floats(-0.05, 0.05), min_size=9, max_size=9), t=st.lists(st.floats(-5, 5), min_size=3, max_size=3))
def test_linear_displacement_gives_analytic_strain(a, t):
    """u = A X + t ⇒ F = I + A everywhere, ε_v = det(I + A) − 1, e = ½(A + Aᵀ)."""
    A = np.array(a).reshape(3, 3)
    nodes, dims = make_grid((50, 40, 30), 7, 3)
    u = nodes @ A.T + np.array(t)
    s = strain_field(nodes, dims, u)
    assert s.volumetric.shape == tuple(d - 1 for d in dims)
    np.testing.assert_allclose(s.F, np.broadcast_to(np.eye(3) + A, s.F.shape), atol=1e-10)
    np.testing.assert_allclose(s.volumetric, np.linalg.det(np.eye(3) + A) - 1, atol=1e-10)
    np.testing.assert_allclose(s.e, np.broadcast_to(0.5 * (A + A.T), s.e.shape), atol=1e-10)
    np.testing.assert_allclose(s.axial, A[0, 0], atol=1e-10)


def test_cell_centres_lie_between_nodes_and_nan_stays_local():
    nodes, dims = make_grid((40, 40, 40), 8, 3)
    u = 0.01 * nodes
    u[13] = np.nan  # one failed node
    s = strain_field(nodes, dims, u)
    grid = nodes.reshape(*dims, 3)
    np.testing.assert_allclose(s.cell_centres[0, 0, 0], grid[0, 0, 0] + 4.0)
    bad = np.isnan(s.volumetric)
    assert 1 <= bad.sum() <= 8  # only the cells touching the failed node
    np.testing.assert_allclose(s.volumetric[~bad], 1.01**3 - 1, atol=1e-12)
