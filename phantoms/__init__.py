"""Synthetic Si-anode electrodes with known lithiation and deformation: the twin's truth (issue #3).

Public API: :func:`generate_microstructure`, :func:`optical_constants`, :func:`lithiate`,
:class:`Deformation` (the truth API: displacement, F, spam Φ, strain, inverse, warp),
:func:`load_deformation`, :func:`relative`, :func:`pristine_phantom`, :func:`truth_for_scan` (in memory),
:func:`write_truth` (streamed to ``phantom.nc``), :func:`write_phantom_png`, and the stage functions
:func:`compute_microstructure`, :func:`compute_truth`.
"""

from phantoms.deformation import Deformation, FoldingError, decompose_F, load_deformation, relative
from phantoms.lithiation import lithiate, lithiate_particle
from phantoms.microstructure import Microstructure, generate_microstructure, recipe_fractions
from phantoms.optics import lixsi_density_g_cm3, optical_constants
from phantoms.phases import Phase, si_mask
from phantoms.truth import (compute_microstructure, compute_truth, load_microstructure, particle_fractions,
                            pristine_phantom, truth_for_scan, write_phantom_png, write_truth)

__all__ = ["Deformation", "FoldingError", "Microstructure", "Phase", "compute_microstructure", "compute_truth",
           "decompose_F", "generate_microstructure", "lithiate", "lithiate_particle", "lixsi_density_g_cm3",
           "load_deformation", "load_microstructure", "optical_constants", "particle_fractions", "pristine_phantom",
           "recipe_fractions", "relative", "si_mask", "truth_for_scan", "write_phantom_png", "write_truth"]
