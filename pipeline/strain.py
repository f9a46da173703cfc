"""Strain from a gridded displacement field, with spam (seed Note 5, step 6).

The deformation gradient F = I + ∂u/∂X is computed in the centre of each
8-node cell of the node grid with ``spam.deformation.FfieldRegularQ8``
(trilinear shape functions), then ``spam.deformation.decomposeFfield`` gives

* volumetric strain  ε_v = det F − 1  (spam's ``vol``),
* deviatoric strain  ‖U det(F)^(−1/3) − I‖  (``dev``, U from F = RU),
* the small-strain tensor e = ½(F + Fᵀ) − I  (``e``; e_zz is the axial strain
  along the electrode normal).

``FfieldRegularGeers`` is not used: in spam 0.9.1 it is wrong on boundary
nodes (see :mod:`pipeline._spam_compat`).

References
----------
Stamati, O. et al. (2020) spam. J. Open Source Softw. 5(51), 2286. doi:10.21105/joss.02286
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline._spam_compat import spam_call


@dataclass
class StrainField:
    """Strains at the cell centres of a node grid (one fewer than the nodes along each axis)."""

    cell_centres: np.ndarray  # (nz-1, ny-1, nx-1, 3) z, y, x voxels
    F: np.ndarray  # (..., 3, 3)
    volumetric: np.ndarray  # det F - 1
    deviatoric: np.ndarray
    e: np.ndarray  # (..., 3, 3) small-strain tensor, z y x

    @property
    def axial(self) -> np.ndarray:
        """e_zz: strain along the electrode normal."""
        return self.e[..., 0, 0]


def strain_field(nodes: np.ndarray, dims, displacement: np.ndarray, *, processes: int = 1) -> StrainField:
    """Q8 strains of a displacement field given on a regular node grid.

    Parameters
    ----------
    nodes
        (N, 3) node positions z, y, x in voxels, C order of the grid.
    dims
        Number of nodes along z, y, x.
    displacement
        (N, 3) displacements in voxels; NaN nodes give NaN in the 8 cells around them.
    processes
        spam processes.
    """
    import spam.deformation

    dims = tuple(int(d) for d in dims)
    if min(dims) < 2:
        raise ValueError(f"strain needs at least 2 nodes along each axis, got node grid {dims}")
    spacing = np.array([np.diff(np.unique(nodes[:, i]))[0] for i in range(3)], dtype=float)
    disp = np.asarray(displacement, dtype=float).reshape(*dims, 3)
    with spam_call(processes, "FfieldRegularQ8/decomposeFfield"):
        F = spam.deformation.FfieldRegularQ8(disp, nodeSpacing=spacing.copy(), nProcesses=processes)
        parts = spam.deformation.decomposeFfield(F, ["vol", "dev", "e"], nProcesses=processes)
    centres = nodes.reshape(*dims, 3)[:-1, :-1, :-1] + spacing / 2.0
    return StrainField(centres, F, parts["vol"], parts["dev"], parts["e"])
