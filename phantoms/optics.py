"""Optical constants δ, β of every phase from composition and density (xraylib), and the LixSi density law.

The complex refractive index is n = 1 − δ + iβ. xraylib returns Re(n) and
Im(n) of a compound at a given energy and density (Schoonjans et al. 2011,
doi:10.1016/j.sab.2011.09.011); δ of a mixture is the sum of its components'
δ at their partial densities (δ is proportional to the electron density), so
porous phases are computed as volume-weighted mixtures.

Density law of LixSi
--------------------
The volume per Si atom grows linearly with x from amorphous Si to Li15Si4
(Obrovac & Krause 2007, doi:10.1149/1.2402112; Chevrier & Dahn 2009,
doi:10.1149/1.3111037):

    Ω(x) = Ω_a + (x / 3.75) (Ω_full − Ω_a),   Ω_full = (1 + ε_full) Ω_c,

with Ω_c = M_Si / (N_A ρ_c) of crystalline Si (ρ_c = 2.329 g cm⁻³),
Ω_a = M_Si / (N_A ρ_a) of amorphous Si (ρ_a = 2.287 g cm⁻³, 1.8 % below
c-Si: Custer et al. 1994, doi:10.1063/1.111030) and ε_full = 2.8 (+280 %,
scenario ``sample.lithiated_volume_expansion``). The density is then

    ρ(x) = (M_Si + x M_Li) / (N_A Ω(x)),

which gives ρ(3.75) = 1.18 g cm⁻³ (Li15Si4: 1.179 g cm⁻³ measured).
The same Ω(x)/Ω_c is the local volume ratio J that drives the swelling.

Sanity (tested): c-Si at 29.6 keV has δ = 5.51e-7, δ/β = 477. The seed
retrieves phase with δ/β = 170 on purpose (a sharper, less blurred
reconstruction than the physical ratio would give).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xraylib

from phantoms.phases import Phase

X_FULL = 3.75  # x of Li15Si4, full lithiation
M_SI = 28.0855  # g/mol
M_LI = 6.94  # g/mol
RHO_C_SI = 2.329  # g/cm³, crystalline Si
RHO_A_SI = 2.287  # g/cm³, amorphous Si (Custer et al. 1994)

# Densities of the other materials, g/cm³. Literature values where they are
# standard (Cu, LiF, Li2CO3, PP); typical values where a range is reported.
RHO_PAA = 1.30  # polyacrylic acid solid, typical 1.2-1.4
RHO_CARBON_BLACK = 1.90  # typical 1.8-2.1
RHO_SWCNT = 1.50  # bundles, typical 1.3-1.6
RHO_CU = 8.96
RHO_FEC, RHO_DEC = 1.45, 0.975  # fluoroethylene carbonate, diethyl carbonate
LIPF6_G_PER_CM3 = 0.1519  # 1 mol/L × 151.9 g/mol
RHO_SEI = 2.2  # dense inorganic SEI (LiF / Li2CO3), typical 2.0-2.6
RHO_PP = 0.90  # polypropylene separator fibres
SEPARATOR_POROSITY = 0.45  # non-woven PP, electrolyte-filled
RHO_GAS = 1.18e-3  # ethylene (C2H4) at 1 bar, 25 °C: the main gas of FEC/VC reduction


@dataclass(frozen=True)
class Mixture:
    """A material as (xraylib formula, partial density in g/cm³) pairs."""

    parts: tuple[tuple[str, float], ...]

    @property
    def density_g_cm3(self) -> float:
        return float(sum(rho for _, rho in self.parts))


def refractive_index(mixture: Mixture, energy_kev: float) -> tuple[float, float]:
    """δ and β of a mixture at one energy.

    Parameters
    ----------
    mixture
        Components with their partial densities, g/cm³.
    energy_kev
        Photon energy, keV.

    Returns
    -------
    (delta, beta)
        Dimensionless; δ = Σ (1 − Re n_i), β = Σ Im n_i over components.

    Examples
    --------
    >>> d, b = refractive_index(Mixture((("Si", 2.329),)), 29.6)
    >>> round(d / b)
    477
    """
    if energy_kev <= 0:
        raise ValueError(f"energy_kev: must be > 0, got {energy_kev}")
    delta = sum(1.0 - xraylib.Refractive_Index_Re(f, energy_kev, rho) for f, rho in mixture.parts if rho > 0)
    beta = sum(xraylib.Refractive_Index_Im(f, energy_kev, rho) for f, rho in mixture.parts if rho > 0)
    return float(delta), float(beta)


def electrolyte() -> Mixture:
    """1 M LiPF6 in FEC:DEC 2:8 v/v + 2 wt% VC (seed Note 2; VC folded into FEC: similar carbonate)."""
    return Mixture((("C3H3FO3", 0.2 * RHO_FEC), ("C5H10O3", 0.8 * RHO_DEC), ("LiPF6", LIPF6_G_PER_CM3)))


def cbd_solid(binder: float, carbon_black: float, swcnt: float) -> Mixture:
    """The carbon-binder domain's solid (no pores) from the recipe's mass fractions.

    The solid's partial densities are the mass fractions times the solid density
    ρ_s = 1 / Σ (w_i / ρ_i) (ideal mixing of volumes).
    """
    total = binder + carbon_black + swcnt
    w = np.array([binder, carbon_black, swcnt]) / total
    rho_s = 1.0 / float(np.sum(w / np.array([RHO_PAA, RHO_CARBON_BLACK, RHO_SWCNT])))
    return Mixture((("C3H4O2", w[0] * rho_s), ("C", (w[1] + w[2]) * rho_s)))


def scaled(m: Mixture, volume_fraction: float) -> Mixture:
    """The mixture occupying ``volume_fraction`` of a voxel (partial densities scaled)."""
    return Mixture(tuple((f, rho * volume_fraction) for f, rho in m.parts))


def combine(*mixtures: Mixture) -> Mixture:
    return Mixture(tuple(p for m in mixtures for p in m.parts))


def lixsi_volume_ratio(x, *, expansion: float = 2.8, amorphous: bool = True):
    """Ω(x)/Ω_c: volume per Si atom relative to c-Si (the module's density law).

    Parameters
    ----------
    x
        Li per Si, 0 ≤ x ≤ 3.75 (scalar or array).
    expansion
        ε_full, relative volume change at x = 3.75 (seed: +280 %).
    amorphous
        False for crystalline Si (only meaningful at x = 0: ratio 1).
    """
    x = np.asarray(x, dtype=float)
    omega_a = RHO_C_SI / RHO_A_SI if amorphous else 1.0
    return omega_a + (x / X_FULL) * (1.0 + expansion - omega_a)


def lixsi_density_g_cm3(x, *, expansion: float = 2.8):
    """ρ(x) of amorphous LixSi, g/cm³ (see module docstring)."""
    x = np.asarray(x, dtype=float)
    return RHO_C_SI * (1.0 + x * M_LI / M_SI) / lixsi_volume_ratio(x, expansion=expansion)


def lixsi_table(energy_kev: float, *, expansion: float = 2.8, n: int = 151) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """δ(x) and β(x) of amorphous LixSi on x = 0 … 3.75 (n points), for interpolation.

    Returns
    -------
    x, delta, beta : arrays of length n
    """
    xs = np.linspace(0.0, X_FULL, n)
    rho = lixsi_density_g_cm3(xs, expansion=expansion)
    out = np.array([refractive_index(Mixture((("Li", x * M_LI / (M_SI + x * M_LI) * r),
                                              ("Si", M_SI / (M_SI + x * M_LI) * r))), energy_kev)
                    for x, r in zip(xs, rho)])
    return xs, out[:, 0], out[:, 1]


@dataclass(frozen=True)
class OpticalConstants:
    """δ, β of every phase at one energy, plus the LixSi table and the CBD's two end members."""

    energy_kev: float
    phase_delta: dict[Phase, float]
    phase_beta: dict[Phase, float]
    lixsi_x: np.ndarray
    lixsi_delta: np.ndarray
    lixsi_beta: np.ndarray
    cbd_solid_delta: float
    cbd_solid_beta: float

    def lixsi(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """δ, β of amorphous LixSi at local x (linear interpolation in the 151-point table)."""
        return (np.interp(x, self.lixsi_x, self.lixsi_delta).astype(np.float32),
                np.interp(x, self.lixsi_x, self.lixsi_beta).astype(np.float32))


def optical_constants(energy_kev: float, *, binder: float = 0.09, carbon_black: float = 0.018, swcnt: float = 0.002,
                      cbd_nanoporosity: float = 0.5, expansion: float = 2.8) -> OpticalConstants:
    """δ and β of every :class:`~phantoms.phases.Phase` at ``energy_kev``.

    Parameters
    ----------
    energy_kev
        Photon energy, keV (seed: 29.6).
    binder, carbon_black, swcnt
        Recipe mass fractions of the CBD's solids (seed: 9, 1.8, 0.2 wt%).
    cbd_nanoporosity
        Mean electrolyte volume fraction inside the CBD (its voxels mix solid and electrolyte).
    expansion
        ε_full of the LixSi density law.

    Notes
    -----
    ``SI_LITHIATED`` holds the value at x = 3.75; voxels with other x use :meth:`OpticalConstants.lixsi`.
    """
    el = electrolyte()
    solid = cbd_solid(binder, carbon_black, swcnt)
    sep = combine(Mixture((("C3H6", (1 - SEPARATOR_POROSITY) * RHO_PP),)), scaled(el, SEPARATOR_POROSITY))
    mixtures = {
        Phase.ELECTROLYTE: el,
        Phase.SI_CRYSTALLINE: Mixture((("Si", RHO_C_SI),)),
        Phase.SI_AMORPHOUS: Mixture((("Si", RHO_A_SI),)),
        Phase.CBD: combine(scaled(solid, 1 - cbd_nanoporosity), scaled(el, cbd_nanoporosity)),
        Phase.SEI: Mixture((("LiF", 0.5 * RHO_SEI), ("Li2CO3", 0.5 * RHO_SEI))),
        Phase.COPPER: Mixture((("Cu", RHO_CU),)),
        Phase.SEPARATOR: sep,
        Phase.GAS: Mixture((("C2H4", RHO_GAS),)),
    }
    deltas, betas = {}, {}
    for phase, m in mixtures.items():
        deltas[phase], betas[phase] = refractive_index(m, energy_kev)
    xs, dl, bl = lixsi_table(energy_kev, expansion=expansion)
    deltas[Phase.SI_LITHIATED], betas[Phase.SI_LITHIATED] = float(dl[-1]), float(bl[-1])
    sd, sb = refractive_index(solid, energy_kev)
    return OpticalConstants(energy_kev, deltas, betas, xs, dl, bl, sd, sb)
