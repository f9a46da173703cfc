"""Optical constants against an analytic reference and the seed's numbers."""

import numpy as np
import pytest

from phantoms import optics
from phantoms.phases import Phase

R_E_M = 2.8179403262e-15  # classical electron radius
N_A = 6.02214076e23


def test_c_si_delta_beta_at_29p6_kev():
    """The issue's sanity numbers: δ ≈ 5.5e-7 and δ/β ≈ 477 for c-Si at 29.6 keV."""
    d, b = optics.refractive_index(optics.Mixture((("Si", optics.RHO_C_SI),)), 29.6)
    assert d == pytest.approx(5.5e-7, rel=0.01)
    assert d / b == pytest.approx(477, rel=0.01)


@pytest.mark.parametrize("formula,rho,z,m", [("Si", 2.329, 14, 28.0855), ("Cu", 8.96, 29, 63.546)])
def test_delta_matches_electron_density_formula(formula, rho, z, m):
    """Far above the K edges δ = r_e λ² n_e / 2π with n_e = ρ N_A Z / M; anomalous f' makes it 1-2 % lower for Cu."""
    lam_m = 1.239841984e-6 / 29.6e3
    n_e_m3 = rho * 1e6 * N_A * z / m
    reference = R_E_M * lam_m**2 * n_e_m3 / (2 * np.pi)
    d, _ = optics.refractive_index(optics.Mixture(((formula, rho),)), 29.6)
    assert d == pytest.approx(reference, rel=0.03)


def test_lixsi_density_law():
    """Li15Si4 (x = 3.75) from the law: 1.18 g/cm³ (measured 1.179); a-Si at x = 0; volume +280 % linear in x."""
    assert optics.lixsi_density_g_cm3(3.75) == pytest.approx(1.179, abs=0.01)
    assert optics.lixsi_density_g_cm3(0.0) == pytest.approx(optics.RHO_A_SI)
    x = np.linspace(0, 3.75, 7)
    ratio = optics.lixsi_volume_ratio(x)
    assert ratio[-1] == pytest.approx(3.8)
    assert np.allclose(np.diff(ratio, 2), 0)


def test_every_phase_has_constants_and_lithiation_lowers_delta():
    oc = optics.optical_constants(29.6)
    assert set(oc.phase_delta) == set(Phase)
    # electron density drops as Li (3 e, 6.94 g/mol) dilutes Si: δ falls monotonically with x
    assert np.all(np.diff(oc.lixsi_delta) < 0)
    assert oc.phase_delta[Phase.COPPER] > oc.phase_delta[Phase.SI_CRYSTALLINE] > oc.phase_delta[Phase.SI_LITHIATED]
    assert oc.phase_delta[Phase.SI_CRYSTALLINE] > oc.phase_delta[Phase.SI_AMORPHOUS]
    assert oc.phase_delta[Phase.CBD] > oc.phase_delta[Phase.ELECTROLYTE] > oc.phase_delta[Phase.GAS]
