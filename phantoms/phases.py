"""The phase labels of the phantom's ``phase`` volume (uint8), shared by every stage that reads the truth."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Phase(IntEnum):
    """Material of one voxel of the truth."""

    ELECTROLYTE = 0  # electrolyte-filled pore
    SI_CRYSTALLINE = 1  # pristine c-Si
    SI_LITHIATED = 2  # amorphous Li_xSi (x > 0)
    SI_AMORPHOUS = 3  # delithiated a-Si left behind by lithiation (Figs S14, S15, S17)
    CBD = 4  # carbon-binder domain: PAA + carbon black + SWCNT
    SEI = 5  # solid-electrolyte interphase shell
    COPPER = 6  # current collector
    SEPARATOR = 7  # separator / electrolyte region above the electrode
    GAS = 8  # transient gas bubble (Fig S13)


SILICON_PHASES = (Phase.SI_CRYSTALLINE, Phase.SI_LITHIATED, Phase.SI_AMORPHOUS)


def si_mask(phase: np.ndarray) -> np.ndarray:
    """Boolean mask of every silicon voxel (crystalline, lithiated or amorphous): the seed's 'Si' class."""
    return np.isin(phase, np.asarray(SILICON_PHASES, dtype=phase.dtype))
