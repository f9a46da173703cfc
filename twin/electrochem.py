"""The in situ cell behind a small interface the SimPy protocol drives step by step.

The protocol (:mod:`twin.beamtime`) never sees a precomputed curve: it asks the
cell to *advance* from its present state through one :class:`Step` (constant
current until a voltage limit, constant voltage until a current limit, or
rest), each bounded by a duration, and gets back a :class:`Segment` saying
when and why the step ended. Two cells implement the interface:

* :class:`LinearCell`, a stand-in with a linear open-circuit voltage and a
  series resistance, solved in closed form, so the protocol logic can be
  tested against hand-worked timelines;
* :class:`PybammCell`, PyBaMM's DFN with a particle-size distribution in a Si
  anode against NMC811 (parameters built from PyBaMM's ``Chen2020`` and the Si
  phase of ``Chen2020_composite``; every change is listed in
  docs/rehearsal.md), continued from its last state by PyBaMM's own
  experiment machinery (``Simulation.solve(starting_solution=...)``).

:class:`SegmentCache` sits in front of either: a segment is stored under the
key of its starting state and its step, so Monte Carlo beamtimes that walk the
same electrochemical path never solve it twice.

Sign convention: a positive current charges the cell (lithiates the Si anode);
PyBaMM's own convention (positive = discharge) stays inside
:class:`PybammCell`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from twin.errors import StageError

FARADAY_C_PER_MOL = 96485.33212
SI_MOLAR_MASS_KG_PER_MOL = 0.0280855
SI_DENSITY_KG_M3 = 2330.0
X_FULL_LITHIATION = 3.75  # Li15Si4, the contract's "full lithiation"


@dataclass(frozen=True)
class Step:
    """One instruction to the potentiostat.

    Parameters
    ----------
    kind
        ``"cc"`` constant current, ``"cv"`` constant voltage, ``"rest"`` open circuit.
    duration_s
        Longest time the step may run, s (the protocol's timer).
    current_a
        ``cc``: applied current, A; positive charges the cell.
    limit_v
        ``cc``: stop when the terminal voltage reaches this value, V
        (from below when charging, from above when discharging).
    voltage_v
        ``cv``: held terminal voltage, V.
    limit_a
        ``cv``: stop when the terminal current falls to this magnitude, A.
    """

    kind: Literal["cc", "cv", "rest"]
    duration_s: float
    current_a: float = 0.0
    limit_v: float | None = None
    voltage_v: float = 0.0
    limit_a: float | None = None

    def __post_init__(self):
        if self.kind not in ("cc", "cv", "rest"):
            raise ValueError(f"Step.kind: must be 'cc', 'cv' or 'rest', got {self.kind!r}")
        if not (self.duration_s >= 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"Step.duration_s: must be finite and >= 0, got {self.duration_s}")


@dataclass
class Segment:
    """What one :class:`Step` did to the cell.

    Attributes
    ----------
    step
        The step that was asked for.
    time_s
        Sample times from the start of the segment, s (first 0, last the duration).
    voltage_v, current_a
        Terminal voltage, V, and current, A (positive = charge), at ``time_s``.
    ended_by
        ``"time"`` (the step's duration ran out) or ``"limit"`` (its voltage or current limit).
    charge_mah
        Charge passed through the terminals during the segment, mAh (positive = charge).
    lithiated_fraction
        X(depth, radius) at each sample, shape (time, depth, radius), fraction of Li15Si4.
    state
        The cell model's state at the end (opaque; pass it to the next ``advance``).
    key
        Cache key of the state at the end (set by :class:`SegmentCache`).
    """

    step: Step
    time_s: np.ndarray
    voltage_v: np.ndarray
    current_a: np.ndarray
    ended_by: Literal["time", "limit"]
    charge_mah: float
    lithiated_fraction: np.ndarray
    state: Any = None
    key: str = ""

    @property
    def duration_s(self) -> float:
        return float(self.time_s[-1])

    def lithiated_fraction_at(self, t_s: float) -> np.ndarray:
        """X(depth, radius) at ``t_s`` seconds into the segment (linear in time between samples)."""
        if len(self.time_s) == 1:
            return self.lithiated_fraction[0]
        t = float(np.clip(t_s, 0.0, self.duration_s))
        i = min(int(np.searchsorted(self.time_s, t, side="right")) - 1, len(self.time_s) - 2)
        t0, t1 = self.time_s[i], self.time_s[i + 1]
        w = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
        return (1 - w) * self.lithiated_fraction[i] + w * self.lithiated_fraction[i + 1]

    def charge_until_mah(self, t_s: float) -> float:
        """Charge passed from the start of the segment to ``t_s``, mAh.

        Exact for CC and rest (constant current); trapezoid on the samples for CV.
        """
        t = float(np.clip(t_s, 0.0, self.duration_s))
        if self.duration_s == 0:
            return 0.0
        if self.step.kind != "cv":
            return self.charge_mah * t / self.duration_s
        ts = np.append(self.time_s[self.time_s < t], t)
        return float(np.trapezoid(np.interp(ts, self.time_s, self.current_a), ts)) / 3.6


class Cell(Protocol):
    """What the protocol needs from a cell model."""

    capacity_mah: float
    depth_um: np.ndarray
    radius_um: np.ndarray
    radius_weights: np.ndarray  # share of the Si volume at each radius, sums to 1
    initial_lithiated_fraction: float  # X of the pristine anode

    def initial_state(self) -> Any: ...

    def advance(self, state: Any, step: Step) -> Segment: ...


# The stand-in cell -------------------------------------------------------------------


@dataclass
class LinearCell:
    """A cell with a linear OCV and a series resistance, solved in closed form.

    Written by hand because it *is* the hand-worked reference: the protocol's
    timelines are tested against it, so it must be simple enough to work out on
    paper. The state is the stored charge q (mAh):

    .. math::

        U(q) = U_0 + k\\,q, \\qquad V = U(q) + R\\,I

    CC at current I reaches a voltage limit V* at
    :math:`t^* = 3600\\,(V^* - U(q_0) - R I)/(k I)` s (q in mAh, I in mA, k in V/mAh);
    CV at V* decays as :math:`I(t) = I_0 e^{-t/\\tau}` with
    :math:`\\tau = 3600\\,R/k` s (R in kΩ so that I is in mA) and
    :math:`I_0 = (V^* - U(q_0))/R`; rest keeps q.

    Parameters
    ----------
    ocv0_v
        U at q = 0, V.
    ocv_slope_v_per_mah
        k, V per mAh stored.
    resistance_kohm
        R, kΩ (so that V / kΩ = mA).
    capacity_mah
        Nominal capacity that defines a C-rate, mAh.
    anode_capacity_mah
        Charge that fully lithiates the anode, mAh (X = q / this, uniform in depth and radius).
    """

    ocv0_v: float = 3.0
    ocv_slope_v_per_mah: float = 30.0
    resistance_kohm: float = 10.0
    capacity_mah: float = 0.0333
    anode_capacity_mah: float = 0.105
    samples: int = 41
    depth_um: np.ndarray = field(default_factory=lambda: np.linspace(0.0, 20.0, 5))
    radius_um: np.ndarray = field(default_factory=lambda: np.array([1.0, 2.5, 5.0]))
    radius_weights: np.ndarray = field(default_factory=lambda: np.full(3, 1 / 3))
    initial_lithiated_fraction: float = 0.0

    def initial_state(self) -> float:
        return 0.0

    def ocv_v(self, q_mah: float) -> float:
        return self.ocv0_v + self.ocv_slope_v_per_mah * q_mah

    def advance(self, state: float, step: Step) -> Segment:
        q0, k, r = float(state), self.ocv_slope_v_per_mah, self.resistance_kohm
        duration, ended = step.duration_s, "time"
        if step.kind == "rest":
            current = lambda t: np.zeros_like(t)  # noqa: E731
            charge = lambda t: np.zeros_like(t)  # noqa: E731
        elif step.kind == "cc":
            i_ma = step.current_a * 1e3
            if step.limit_v is not None and i_ma != 0:
                v_start = self.ocv_v(q0) + r * i_ma
                reached = (v_start >= step.limit_v) if i_ma > 0 else (v_start <= step.limit_v)
                t_hit = 0.0 if reached else 3600.0 * (step.limit_v - v_start) / (k * i_ma)
                if t_hit <= duration:
                    duration, ended = max(t_hit, 0.0), "limit"
            current = lambda t: np.full_like(t, i_ma)  # noqa: E731
            charge = lambda t: i_ma * t / 3600.0  # noqa: E731
        else:
            i0 = (step.voltage_v - self.ocv_v(q0)) / r
            tau = 3600.0 * r / k
            if step.limit_a is not None:
                i_lim = step.limit_a * 1e3
                t_hit = 0.0 if abs(i0) <= i_lim else tau * math.log(abs(i0) / i_lim)
                if t_hit <= duration:
                    duration, ended = t_hit, "limit"
            current = lambda t: i0 * np.exp(-t / tau)  # noqa: E731
            charge = lambda t: i0 * tau * (1 - np.exp(-t / tau)) / 3600.0  # noqa: E731
        t = np.linspace(0.0, duration, self.samples)
        q = q0 + charge(t)
        i_ma = current(t)
        x = np.clip(q / self.anode_capacity_mah, 0.0, 1.0)
        shape = (len(t), len(self.depth_um), len(self.radius_um))
        return Segment(
            step=step, time_s=t, voltage_v=self.ocv_v(q) + r * i_ma, current_a=i_ma * 1e-3, ended_by=ended,
            charge_mah=float(q[-1] - q0), lithiated_fraction=np.broadcast_to(x[:, None, None], shape).copy(), state=float(q[-1]),
        )


# Segment reuse -----------------------------------------------------------------------


class SegmentCache:
    """Solved segments keyed by (key of the starting state, step); a tree of paths from the pristine cell.

    The key of a state is the hash of its parent's key and the step that led
    to it, so two beamtimes that ask the same cell the same steps in the same
    order reach the same key whatever the wall-clock times, and the second one
    is a dictionary look-up.
    """

    ROOT = "pristine"

    def __init__(self, cell: Cell):
        self.cell = cell
        self._segments: dict[str, Segment] = {}
        self.solves = 0
        self.hits = 0

    def advance(self, key: str, step: Step) -> Segment:
        """The segment of ``step`` from the state with ``key`` (solved once, then reused)."""
        new_key = hashlib.sha256(f"{key}|{step!r}".encode()).hexdigest()[:24]
        seg = self._segments.get(new_key)
        if seg is not None:
            self.hits += 1
            return seg
        state = self.cell.initial_state() if key == self.ROOT else self._segments[key].state
        seg = self.cell.advance(state, step)
        seg.key = new_key
        self._segments[new_key] = seg
        self.solves += 1
        return seg


# The PyBaMM cell ---------------------------------------------------------------------


def electrode_area_m2(diameter_mm: float) -> float:
    """Disk area π d²/4, m²."""
    return math.pi * (diameter_mm * 1e-3 / 2) ** 2


def cell_capacity_mah(scenario) -> float:
    """Cathode-limited nominal capacity that defines the C-rate, mAh (areal capacity × disk area)."""
    c = scenario.cell
    return c.cathode_capacity_mah_cm2 * electrode_area_m2(c.electrode_diameter_mm) * 1e4


def build_parameter_values(scenario):
    """PyBaMM parameter values of the in situ cell: Chen2020 with a Si negative electrode.

    Every change to PyBaMM's sets is listed, with its reason, in
    docs/rehearsal.md. In short: the negative electrode takes the Si phase of
    ``Chen2020_composite`` (OCP with lithiation/delithiation hysteresis,
    diffusivity, exchange current) with c_max of Li15Si4, a 20 µm thickness
    and an active fraction that gives the seed's areal capacity; the NMC811
    cathode keeps Chen2020's material and is thinned to 3.5 mAh cm⁻²; both disks
    have the seed's 1.1 mm diameter; the Si particle radii follow the sample's
    lognormal size distribution.

    Returns
    -------
    pybamm.ParameterValues
    """
    import pybamm
    from pybamm.input.parameters.lithium_ion import Chen2020_composite as composite

    c, s = scenario.cell, scenario.sample
    pv = pybamm.ParameterValues("Chen2020")
    si = pybamm.ParameterValues("Chen2020_composite")
    area_m2 = electrode_area_m2(c.electrode_diameter_mm)
    side_m = math.sqrt(area_m2)
    thickness_m = s.electrode_thickness_um * 1e-6
    c_max_si = X_FULL_LITHIATION * SI_DENSITY_KG_M3 / SI_MOLAR_MASS_KG_PER_MOL
    anode_c_per_m2 = c.anode_capacity_mah_cm2 * 3.6 * 1e4
    eps_si = anode_c_per_m2 / (FARADAY_C_PER_MOL * c_max_si * thickness_m)
    if not 0 < eps_si < 0.9:
        raise StageError(
            f"cell.anode_capacity_mah_cm2: {c.anode_capacity_mah_cm2} mAh/cm² in a {s.electrode_thickness_um} µm Si electrode "
            f"needs an active volume fraction of {eps_si:.3g}; it must be below 0.9"
        )
    # Chen2020's NMC811 window: stoichiometry 0.9084 (discharged) to 0.2661 (charged at 4.2 V vs graphite).
    y_discharged, y_charged = 0.9084, 0.2661
    c_max_p = pv["Maximum concentration in positive electrode [mol.m-3]"]
    eps_p = pv["Positive electrode active material volume fraction"]
    cathode_c_per_m2 = c.cathode_capacity_mah_cm2 * 3.6 * 1e4
    thickness_p_m = cathode_c_per_m2 / (FARADAY_C_PER_MOL * c_max_p * eps_p * (y_discharged - y_charged))
    # Number-weighted lognormal of radius (median d/2, σ of ln) -> area-weighted: median × exp(2σ²).
    sigma = max(s.particle_diameter_log_sigma, 1e-3)
    r_area_median_m = s.particle_median_diameter_um / 2 * 1e-6 * math.exp(2 * sigma**2)

    def area_weighted_radius_pdf(radius_m):
        return pybamm.exp(-(pybamm.log(radius_m / r_area_median_m) ** 2) / (2 * sigma**2)) / (
            radius_m * sigma * math.sqrt(2 * math.pi)
        )

    r_p = pv["Positive particle radius [m]"]
    capacity_ah = cell_capacity_mah(scenario) * 1e-3
    pv.update(
        {
            "Electrode height [m]": side_m,
            "Electrode width [m]": side_m,
            "Negative electrode thickness [m]": thickness_m,
            "Separator thickness [m]": c.separator_thickness_um * 1e-6,
            "Positive electrode thickness [m]": thickness_p_m,
            "Maximum concentration in negative electrode [mol.m-3]": c_max_si,
            "Negative electrode active material volume fraction": eps_si,
            "Negative electrode porosity": max(0.05, 1 - eps_si - 0.12),
            "Negative particle diffusivity [m2.s-1]": si["Secondary: Negative particle diffusivity [m2.s-1]"],
            "Negative electrode OCP [V]": composite.silicon_ocp_average_Mark2016,
            "Negative electrode lithiation OCP [V]": composite.silicon_ocp_lithiation_Mark2016,
            "Negative electrode delithiation OCP [V]": composite.silicon_ocp_delithiation_Mark2016,
            "Negative electrode exchange-current density [A.m-2]": composite.silicon_LGM50_electrolyte_exchange_current_density_Chen2020,
            "Negative electrode density [kg.m-3]": SI_DENSITY_KG_M3,
            "Negative particle radius [m]": r_area_median_m,
            "Negative minimum particle radius [m]": r_area_median_m * math.exp(-3 * sigma),
            "Negative maximum particle radius [m]": r_area_median_m * math.exp(3 * sigma),
            "Negative area-weighted particle-size distribution [m-1]": area_weighted_radius_pdf,
            # The cathode keeps one size: a narrow distribution is how PyBaMM's "distribution" option wants it.
            "Positive minimum particle radius [m]": 0.8 * r_p,
            "Positive maximum particle radius [m]": 1.2 * r_p,
            "Positive area-weighted particle-size distribution [m-1]": lambda radius_m: pybamm.exp(
                -(((radius_m - r_p) / (0.05 * r_p)) ** 2) / 2
            ) / (0.05 * r_p * math.sqrt(2 * math.pi)),
            "Initial concentration in negative electrode [mol.m-3]": c.initial_anode_lithiated_fraction * c_max_si,
            "Initial concentration in positive electrode [mol.m-3]": y_discharged * c_max_p,
            "Contact resistance [Ohm]": c.series_resistance_ohm,
            "Nominal cell capacity [A.h]": capacity_ah,
            "Current function [A]": capacity_ah,
            # The protocol's own limits decide every step; PyBaMM's cut-offs only guard the OCP fits.
            "Lower voltage cut-off [V]": 1.0,
            "Upper voltage cut-off [V]": 5.0,
            "Ambient temperature [K]": 273.15 + c.temperature_c,
            "Initial temperature [K]": 273.15 + c.temperature_c,
            "Reference temperature [K]": 298.15,
        },
        check_already_exists=False,
    )
    return pv


class PybammCell:
    """The PyBaMM cell, advanced step by step from its last state.

    Each distinct :class:`Step` becomes a one-step ``pybamm.Experiment`` whose
    ``Simulation`` is built once and reused; ``solve(starting_solution=...)``
    continues from the previous segment's last state, so nothing is
    precomputed open-loop. A leakage current I_leak (SEI formation while
    charging) flows beside the electrode reactions: during CC charge PyBaMM
    sees I - I_leak, during CV the potentiostat reads PyBaMM's current +
    I_leak, so the CV current can never fall below I_leak (Fig S4's flat tail).

    Parameters
    ----------
    scenario
        Reads ``cell``, ``sample.electrode_thickness_um``,
        ``sample.particle_median_diameter_um`` and ``sample.particle_diameter_log_sigma``.
    n_depth, radius_points, period_s
        Output depth grid size, PyBaMM's particle-size grid size, and output sampling period, s.
    """

    def __init__(self, scenario, *, n_depth: int = 21, radius_points: int = 9, period_s: float = 30.0):
        import pybamm

        self._pybamm = pybamm
        c = scenario.cell
        self.parameter_values = build_parameter_values(scenario)
        self.capacity_mah = cell_capacity_mah(scenario)
        self.leak_a = c.leakage_current_ua * 1e-6
        self.thickness_um = scenario.sample.electrode_thickness_um
        self.initial_lithiated_fraction = c.initial_anode_lithiated_fraction
        options = {"particle size": "distribution", "contact resistance": "true",
                   "open-circuit potential": ("current sigmoid", "single")}
        if c.model != "DFN":
            options["surface form"] = "algebraic"  # PyBaMM requires it for SPM(e) with size distributions
        self.model = getattr(pybamm.lithium_ion, c.model)(options)
        self.var_pts = {"x_n": 10, "x_s": 4, "x_p": 6, "r_n": 8, "r_p": 6, "R_n": radius_points, "R_p": 3}
        self.period_s = period_s
        self.depth_um = np.linspace(0.0, self.thickness_um, n_depth)
        self._sims: dict[Step, Any] = {}
        self._grids()

    def _grids(self) -> None:
        sim = self._simulation(Step("rest", 1.0))
        sol = sim.solve()
        mesh = sim.mesh
        self.radius_um = np.asarray(mesh["negative particle size"].nodes) * 1e6
        # Share of the Si volume in each radius bin, from PyBaMM's own volume-weighted distribution.
        f_v = np.asarray(sol["Negative volume-weighted particle-size distribution [m-1]"].entries)
        f_v = f_v.reshape(len(self.radius_um), -1)[:, 0] * np.diff(np.asarray(mesh["negative particle size"].edges))
        self.radius_weights = f_v / f_v.sum()
        # x from the current collector; depth below the separator-side surface = L - x
        self._node_depth_um = self.thickness_um - np.asarray(mesh["negative electrode"].nodes) * 1e6
        # Finite-volume shell volumes of the radial mesh (scaled to each particle's radius by PyBaMM), for the
        # particle average: PyBaMM reports c(r) per (R, x) but no r-average per (R, x).
        edges = np.asarray(mesh["negative particle"].edges)
        shells = np.diff(edges**3)
        self._shell_weights = shells / shells.sum()

    def _simulation(self, step: Step):
        pybamm = self._pybamm
        sim = self._sims.get(step)
        if sim is not None:
            return sim
        period = min(self.period_s, max(step.duration_s / 4, 1e-3))
        if step.kind == "rest":
            pstep = pybamm.step.rest(step.duration_s, period=period)
        elif step.kind == "cc":
            electrode_a = step.current_a - (self.leak_a if step.current_a > 0 else 0.0)
            term = None if step.limit_v is None else [f"{step.limit_v} V"]
            pstep = pybamm.step.current(-electrode_a, duration=step.duration_s, termination=term, period=period)
        else:
            term = None
            if step.limit_a is not None and step.limit_a - self.leak_a > 0:
                term = [f"{step.limit_a - self.leak_a} A"]
            pstep = pybamm.step.voltage(step.voltage_v, duration=step.duration_s, termination=term, period=period)
        sim = pybamm.Simulation(self.model, parameter_values=self.parameter_values, experiment=pybamm.Experiment([pstep]),
                                var_pts=self.var_pts, solver=pybamm.IDAKLUSolver())
        self._sims[step] = sim
        return sim

    def initial_state(self):
        return None

    def advance(self, state, step: Step) -> Segment:
        """Solve ``step`` from ``state`` (a PyBaMM step solution, or None for the pristine cell)."""
        pybamm = self._pybamm
        if step.duration_s <= 0:
            return self._empty(state, step)
        sim = self._simulation(step)
        level = pybamm.logger.level
        pybamm.logger.setLevel("ERROR")  # a step infeasible at its start is normal here (see below), not a warning
        try:
            sol = sim.solve(starting_solution=state) if state is not None else sim.solve()
        except pybamm.SolverError as exc:
            raise StageError(f"PyBaMM failed in step {_describe(step)}: {exc}") from exc
        finally:
            pybamm.logger.setLevel(level)
        part = sol.cycles[-1] if sol.cycles else None
        if part is None or (state is not None and (part is state or part.t[-1] <= state.t[-1])):
            # PyBaMM skips a step whose limit is already met at its start (e.g. CC resumed above 4.3 V
            # once the IR drop is back): the step ends at once on its limit.
            return self._empty(state, step)
        t = part["Time [s]"].entries
        t = t - t[0]
        v = part["Voltage [V]"].entries
        leak = self.leak_a if (step.kind == "cv" or (step.kind == "cc" and step.current_a > 0)) else 0.0
        i = -part["Current [A]"].entries + leak
        q_ah = -(part["Discharge capacity [A.h]"].entries[-1] - part["Discharge capacity [A.h]"].entries[0])
        ended = "time" if part.termination == "final time" else "limit"
        x = self._lithiation(part)
        return Segment(step=step, time_s=t, voltage_v=v, current_a=i, ended_by=ended,
                       charge_mah=q_ah * 1e3 + leak * t[-1] / 3.6, lithiated_fraction=x, state=part)

    def _lithiation(self, part) -> np.ndarray:
        """X(depth, radius) per sample: PyBaMM's Si stoichiometry c/c_max averaged over each particle's volume.

        Returns shape (time, depth, radius), interpolated linearly from PyBaMM's cell centres onto
        :attr:`depth_um` (held constant in the half cells next to both surfaces).
        """
        sto_r = np.asarray(part["Negative particle stoichiometry distribution"].entries)  # (r, R, x, t)
        sto = np.einsum("i,iRxt->tRx", self._shell_weights, sto_r)
        order = np.argsort(self._node_depth_um)
        nodes, sto = self._node_depth_um[order], sto[:, :, order]
        out = np.empty((sto.shape[0], len(self.depth_um), sto.shape[1]))
        for k in range(sto.shape[1]):
            for j in range(sto.shape[0]):
                out[j, :, k] = np.interp(self.depth_um, nodes, sto[j, k])
        return np.clip(out, 0.0, 1.0)

    def _empty(self, state, step: Step) -> Segment:
        if state is None:
            raise StageError(f"PyBaMM: step {_describe(step)} cannot start the pristine cell")
        v = float(state["Voltage [V]"].entries[-1])
        x = self._lithiation(state)[-1:]
        ended = "limit" if step.duration_s > 0 else "time"
        return Segment(step=step, time_s=np.zeros(1), voltage_v=np.array([v]), current_a=np.zeros(1), ended_by=ended,
                       charge_mah=0.0, lithiated_fraction=x, state=state)


def _describe(step: Step) -> str:
    """The step in words, for error messages."""
    if step.kind == "cc":
        until = "" if step.limit_v is None else f" or until {step.limit_v} V"
        return f"CC {step.current_a * 1e6:.4g} µA for {step.duration_s:.0f} s{until}"
    if step.kind == "cv":
        until = "" if step.limit_a is None else f" or until {step.limit_a * 1e6:.4g} µA"
        return f"CV {step.voltage_v} V for {step.duration_s:.0f} s{until}"
    return f"rest for {step.duration_s:.0f} s"
