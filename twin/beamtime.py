"""The automated protocol of Fig S6 and the beamtime around it, as SimPy processes.

One :class:`Beamtime` holds a SimPy environment with the beamline (a
``PreemptiveResource``: one scan at a time, pre-empted by refills and beam
losses), the potentiostat (a ``Resource``: one cell on the protocol at a time)
and the cells (a ``Store`` of pre-tested cells). A campaign process mounts a
cell, aligns it, and runs the protocol on it; a failure process may interrupt
it (short circuit, seal leak, contact loss); the next spare is then mounted.

The protocol process is the seed's flowchart (Note 3, Fig S6), step by step:

1. Initialization: the pristine cell at OCV; scan T0; n = 0.
2. CC at the charge current for the timer (``scan_interval_min``) or until
   V ≥ ``upper_cutoff_v``. Timer: scan, n += 1, timer reset, CC again.
   Voltage: go to CV (fresh timer, no scan).
3. CV at ``upper_cutoff_v`` for the timer or until |I| ≤ I_threshold; either
   way a scan, n += 1, timer reset; continue CV while n < N_max.
4. Discharge at the discharge current to ``lower_cutoff_v``, a scan each time
   the timer fires; at the cut-off two back-to-back scans at OCV (the double
   scan).

Every scan is preceded by ``pre_scan_ocv_min`` at OCV and lasts
``scan_duration_min`` at OCV. A timer scan starts when the timer fires, so
the active step runs (interval − pre-scan pause); a scan caused by a limit
(CV current, discharge cut-off) starts one pause after the limit is reached,
since the script cannot know it a minute ahead. The loop also leaves CC when
n reaches N_max (the seed's flowchart checks N_max only in CV; without this
check a cell that never reaches 4.3 V would scan until the beamtime ends).

The cell behind the protocol is anything with the :class:`twin.electrochem.Cell`
interface, reached through a :class:`twin.electrochem.SegmentCache`: SimPy
asks it to advance over one step from the present state and waits for as long
as the step actually lasted. The script is not beam-aware (as in the seed): a
scan that meets a refill or a beam loss is lost, and the cell carries on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy
from scipy import optimize, stats

from twin.electrochem import Segment, SegmentCache, Step

PHASES = ("pristine", "charge-CC", "charge-CV", "discharge", "relaxation")


@dataclass
class ScanRecord:
    """One scan of the schedule."""

    name: str
    cell_id: int
    series: int
    start_s: float
    end_s: float
    phase: str
    voltage_v: float
    current_a: float
    charge_mah: float
    lithiated_fraction: np.ndarray | None = None
    status: str = "running"  # acquired | lost: <reason>


@dataclass
class Piece:
    """One cell segment as it happened on the beamtime clock (cut short by a failure or the end of beamtime)."""

    cell_id: int
    start_s: float
    segment: Segment
    phase: str
    end_s: float

    def __post_init__(self):
        self.end_s = min(self.end_s, self.start_s + self.segment.duration_s)


@dataclass
class CellRecord:
    cell_id: int
    mounted_s: float
    start_s: float = math.nan
    end_s: float = math.nan
    outcome: str = "running"  # complete | failed: <mode> | beamtime over


@dataclass
class BeamtimeResult:
    """What happened during one beamtime."""

    beamtime_s: float
    scans: list[ScanRecord]
    pieces: list[Piece]
    cells: list[CellRecord]
    downtimes: list[tuple[str, float, float]]
    error: str | None = None

    @property
    def complete_series(self) -> int:
        """Series whose protocol ran to its end with every scan acquired."""
        done = 0
        for c in self.cells:
            if c.outcome == "complete" and all(s.status == "acquired" for s in self.scans if s.cell_id == c.cell_id):
                done += 1
        return done

    @property
    def scans_acquired(self) -> int:
        return sum(s.status == "acquired" for s in self.scans)

    @property
    def scans_lost(self) -> int:
        return sum(s.status != "acquired" for s in self.scans)

    @property
    def utilization(self) -> float:
        """Fraction of the beamtime during which a cell was running its protocol on the beam."""
        busy = sum(min(c.end_s, self.beamtime_s) - c.start_s for c in self.cells if not math.isnan(c.start_s))
        return busy / self.beamtime_s


@dataclass
class ProtocolTimes:
    """The protocol in SI units (currents in A from C-rates and the cell capacity)."""

    charge_a: float
    upper_v: float
    cv_threshold_a: float
    discharge_a: float
    lower_v: float
    interval_s: float
    pre_ocv_s: float
    scan_s: float
    max_charge_scans: int
    final_scans: int
    beamtime_s: float
    exchange_s: float

    @classmethod
    def from_scenario(cls, protocol, capacity_mah: float) -> ProtocolTimes:
        p = protocol
        one_c_a = capacity_mah * 1e-3
        return cls(charge_a=p.charge_c_rate * one_c_a, upper_v=p.upper_cutoff_v, cv_threshold_a=p.cv_current_threshold_c_rate * one_c_a,
                   discharge_a=p.discharge_c_rate * one_c_a, lower_v=p.lower_cutoff_v, interval_s=p.scan_interval_min * 60,
                   pre_ocv_s=p.pre_scan_ocv_min * 60, scan_s=p.scan_duration_min * 60, max_charge_scans=p.max_charge_scans,
                   final_scans=p.final_scans, beamtime_s=p.beamtime_h * 3600, exchange_s=p.cell_exchange_min * 60)


@dataclass
class Realities:
    """Seeded beamtime realities: refills, beam losses, cell failures, spares."""

    refill_period_s: float = 0.0
    refill_s: float = 0.0
    beam_loss_rate_per_s: float = 0.0
    beam_loss_mean_s: float = 0.0
    failure_probability: float = 0.0
    failure_modes: dict[str, float] = field(default_factory=lambda: {"short_circuit": 1.0})
    spare_cells: int = 0
    series_duration_s: float = 0.0  # failures strike uniformly over one nominal series

    @classmethod
    def from_scenario(cls, protocol, *, random: bool, series_duration_s: float = 0.0) -> Realities:
        """Scheduled refills always; random beam losses, failures and spares only when ``random``."""
        p = protocol
        base = cls(refill_period_s=p.refill_period_h * 3600, refill_s=p.refill_duration_min * 60)
        if not random:
            return base
        fail = p.cell_failure_probability
        if fail is None:
            fail = pretest_failure_posterior(p.pretest_cells, p.pretest_required_consistent)["mean"]
        base.beam_loss_rate_per_s = p.beam_loss_rate_per_h / 3600
        base.beam_loss_mean_s = p.beam_loss_mean_min * 60
        base.failure_probability = fail
        base.failure_modes = dict(p.failure_mode_shares)
        base.spare_cells = p.spare_cells
        base.series_duration_s = series_duration_s
        return base


class _Run:
    """Mutable state of the protocol on one cell."""

    def __init__(self, cell_id: int, series: int):
        self.cell_id = cell_id
        self.series = series
        self.key = SegmentCache.ROOT
        self.n = 0
        self.charge_mah = 0.0
        self.last_active: Segment | None = None
        self.last: Segment | None = None
        self.piece: Piece | None = None
        self.acquisition: simpy.Process | None = None
        self.scan: ScanRecord | None = None


class Beamtime:
    """One beamtime: the Fig S6 protocol on one cell after another, co-simulated with the cell model.

    Parameters
    ----------
    times
        The protocol in SI units.
    cells
        The cell model behind its segment cache (shared between beamtimes for reuse).
    realities
        Refills, beam losses, failures, spares.
    rng
        Seeded generator for the random realities.
    single_series
        Stop after the first cell's series (the nominal rehearsal).
    record
        Keep segments and lithiation maps (off in Monte Carlo).
    """

    def __init__(self, times: ProtocolTimes, cells: SegmentCache, realities: Realities | None = None, *,
                 rng: np.random.Generator | None = None, single_series: bool = False, record: bool = True):
        self.t = times
        self.cells = cells
        self.real = realities or Realities()
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.single_series = single_series
        self.record = record
        self.env = simpy.Environment()
        self.beamline = simpy.PreemptiveResource(self.env, capacity=1)
        self.potentiostat = simpy.Resource(self.env, capacity=1)
        self.spares = simpy.Store(self.env)
        for i in range(1 + (0 if single_series else self.real.spare_cells)):
            self.spares.put(i)
        self.scans: list[ScanRecord] = []
        self.pieces: list[Piece] = []
        self.cell_records: list[CellRecord] = []
        self.downtimes: list[tuple[str, float, float]] = []
        self.error: str | None = None

    # Driving ------------------------------------------------------------------------
    def run(self) -> BeamtimeResult:
        """Simulate until the campaign ends or the beamtime runs out."""
        env = self.env
        if self.real.refill_period_s > 0 and self.real.refill_s > 0:
            env.process(self._refills())
        if self.real.beam_loss_rate_per_s > 0:
            env.process(self._beam_losses())
        campaign = env.process(self._campaign())
        try:
            env.run(until=simpy.AnyOf(env, [campaign, env.timeout(self.t.beamtime_s)]))
        except _ProtocolFailure as exc:
            self.error = str(exc)
        end = self.t.beamtime_s
        for s in self.scans:
            if s.status == "running":
                s.status = "lost: beamtime over" if self.error is None else "lost: simulation error"
            s.end_s = min(s.end_s, env.now)
        for c in self.cell_records:
            if c.outcome == "running":
                c.outcome = "beamtime over" if self.error is None else "error"
                c.end_s = env.now
        for p in self.pieces:
            p.end_s = min(p.end_s, env.now, end)
        self.downtimes = [(kind, a, min(b, env.now)) for kind, a, b in self.downtimes]
        return BeamtimeResult(beamtime_s=end, scans=self.scans, pieces=self.pieces, cells=self.cell_records,
                              downtimes=self.downtimes, error=self.error)

    def _campaign(self):
        env = self.env
        series = 0
        while len(self.spares.items) > 0:
            cell_id = yield self.spares.get()
            record = CellRecord(cell_id=cell_id, mounted_s=env.now)
            self.cell_records.append(record)
            yield env.timeout(self.t.exchange_s)  # handling and alignment on the beam
            with self.potentiostat.request() as req:
                yield req
                record.start_s = env.now
                run = _Run(cell_id, series)
                proc = env.process(self._series(run, record))
                if self.real.failure_probability > 0 and self.rng.random() < self.real.failure_probability:
                    modes = list(self.real.failure_modes)
                    shares = np.array([self.real.failure_modes[m] for m in modes], float)
                    mode = modes[int(self.rng.choice(len(modes), p=shares / shares.sum()))]
                    env.process(self._failure(proc, self.rng.uniform(0, self.real.series_duration_s), mode))
                yield proc
            series += 1
            if self.single_series:
                return

    def _failure(self, proc: simpy.Process, after_s: float, mode: str):
        yield self.env.timeout(after_s)
        if proc.is_alive:
            proc.interrupt(mode)

    def _refills(self):
        k = 1
        while True:
            yield self.env.timeout(max(k * self.real.refill_period_s - self.env.now, 0.0))  # late after a long beam loss
            yield self.env.process(self._outage("refill", self.real.refill_s))
            k += 1

    def _beam_losses(self):
        while True:
            yield self.env.timeout(self.rng.exponential(1 / self.real.beam_loss_rate_per_s))
            yield self.env.process(self._outage("beam loss", self.rng.exponential(self.real.beam_loss_mean_s)))

    def _outage(self, kind: str, duration_s: float):
        with self.beamline.request(priority=0, preempt=True) as req:
            yield req
            self.downtimes.append((kind, self.env.now, self.env.now + duration_s))  # clipped to the beamtime in run()
            yield self.env.timeout(duration_s)

    # The protocol (Fig S6) ------------------------------------------------------------
    def _series(self, run: _Run, record: CellRecord):
        t = self.t
        timer_s = t.interval_s - t.pre_ocv_s  # the active step's share of the timer; its last minute is the OCV pause
        charge = Step("cc", timer_s, current_a=t.charge_a, limit_v=t.upper_v)
        hold = Step("cv", timer_s, voltage_v=t.upper_v, limit_a=t.cv_threshold_a)
        discharge = Step("cc", timer_s, current_a=-t.discharge_a, limit_v=t.lower_v)
        try:
            # 1. Initialization: OCV recorded, the pristine scan T0, n = 0.
            yield from self._scan(run, "pristine")
            run.n = 0
            # 2-3. The CC/CV loop.
            mode = "cc"
            while run.n < t.max_charge_scans:
                if mode == "cc":
                    seg = yield from self._step(run, charge, "charge-CC")
                    if seg.ended_by == "limit":
                        mode = "cv"
                        continue
                    yield from self._scan(run, "charge-CC")
                else:
                    yield from self._step(run, hold, "charge-CV")
                    yield from self._scan(run, "charge-CV")
                run.n += 1
            # 4. Discharge with timer scans, then the double scan at the cut-off.
            while True:
                seg = yield from self._step(run, discharge, "discharge")
                if seg.ended_by == "limit":
                    break
                yield from self._scan(run, "discharge")
                run.n += 1
            for k in range(t.final_scans):  # back to back: only the first has the OCV pause
                yield from self._scan(run, "relaxation", pause=(k == 0))
            record.outcome = "complete"
            record.end_s = self.env.now
        except simpy.Interrupt as intr:
            now = self.env.now
            record.outcome = f"failed: {intr.cause}"
            record.end_s = now
            if run.piece is not None:
                run.piece.end_s = min(run.piece.end_s, now)
            if run.scan is not None and run.scan.start_s <= now < run.scan.end_s:
                run.scan.end_s = now  # the scan window closes with the cell
            if run.acquisition is not None and run.acquisition.is_alive:
                run.acquisition.interrupt(f"cell failed ({intr.cause})")

    def _step(self, run: _Run, step: Step, phase: str):
        """Advance the cell through one step and wait as long as it lasted."""
        try:
            seg = self.cells.advance(run.key, step)
        except Exception as exc:
            raise _ProtocolFailure(f"cell {run.cell_id}, {phase} step at t = {self.env.now / 3600:.3f} h: {exc}") from exc
        if self.record:
            run.piece = Piece(run.cell_id, self.env.now, seg, phase, self.env.now + seg.duration_s)
            self.pieces.append(run.piece)
        yield self.env.timeout(seg.duration_s)
        run.key = seg.key
        run.charge_mah += seg.charge_mah
        run.last = seg
        if step.kind != "rest":
            run.last_active = seg
        return seg

    def _scan(self, run: _Run, phase: str, pause: bool = True):
        """Pre-scan OCV pause, then one scan at OCV while the beamline acquires."""
        t = self.t
        active = run.last_active  # voltage and current just before the OCV pause
        if pause and t.pre_ocv_s > 0:
            yield from self._step(run, Step("rest", t.pre_ocv_s), "ocv")
        if active is not None:
            v, i = float(active.voltage_v[-1]), float(active.current_a[-1])
        else:  # T0: the recorded OCV of the pristine cell
            v, i = (float(run.last.voltage_v[-1]) if run.last is not None else math.nan), 0.0
        name = f"T{sum(s.cell_id == run.cell_id for s in self.scans)}"
        scan = ScanRecord(name=name, cell_id=run.cell_id, series=run.series, start_s=self.env.now,
                          end_s=self.env.now + t.scan_s, phase=phase, voltage_v=v, current_a=i, charge_mah=run.charge_mah)
        self.scans.append(scan)
        run.scan = scan
        run.acquisition = self.env.process(self._acquire(scan))
        seg = yield from self._step(run, Step("rest", t.scan_s), "scan")
        if self.record:
            scan.lithiated_fraction = seg.lithiated_fraction_at(seg.duration_s / 2)  # the imaged state: mid-scan
        yield run.acquisition

    def _acquire(self, scan: ScanRecord):
        """The beamline's side of a scan: lost if the beam is off at its start or pre-empted during it."""
        if self.beamline.count > 0:
            scan.status = "lost: beam off"
            return
        with self.beamline.request(priority=1, preempt=False) as req:
            yield req
            try:
                yield self.env.timeout(self.t.scan_s)
                scan.status = "acquired"
            except simpy.Interrupt as intr:
                cause = intr.cause
                scan.status = f"lost: {cause}" if isinstance(cause, str) else "lost: beam off"


class _ProtocolFailure(Exception):
    pass


def run_beamtime(times: ProtocolTimes, cells: SegmentCache, realities: Realities | None = None, *,
                 rng: np.random.Generator | None = None, single_series: bool = False, record: bool = True) -> BeamtimeResult:
    """Simulate one beamtime (see :class:`Beamtime`)."""
    return Beamtime(times, cells, realities, rng=rng, single_series=single_series, record=record).run()


# The pre-test rule ---------------------------------------------------------------------


def pretest_failure_posterior(n_cells: int, n_required: int, *, upper_quantile: float = 0.95) -> dict[str, float]:
    """What passing "at least ``n_required`` of ``n_cells`` consistent" says about the failure probability p.

    With a uniform prior on p and k ~ Binomial(n, p) failed cells, passing
    means k ≤ n − m. Each allowed k contributes C(n,k) B(k+1, n−k+1) = 1/(n+1)
    to the evidence, so the posterior is the equal-weight mixture of
    Beta(k+1, n−k+1), k = 0 … n − m, with mean

    .. math:: E[p \\mid \\text{pass}] = \\frac{1}{n-m+1}\\sum_{k=0}^{n-m}\\frac{k+1}{n+2}

    (3/14 ≈ 0.214 for the seed's 4 of 5).

    Returns
    -------
    dict
        ``mean`` (the predictive probability that the next cell fails),
        ``upper`` (the ``upper_quantile`` quantile) and ``pass_probability_at_mean``.
    """
    ks = range(0, n_cells - n_required + 1)
    mean = float(np.mean([(k + 1) / (n_cells + 2) for k in ks]))

    def cdf(p: float) -> float:
        return float(np.mean([stats.beta.cdf(p, k + 1, n_cells - k + 1) for k in ks]))

    upper = optimize.brentq(lambda p: cdf(p) - upper_quantile, 0.0, 1.0)
    pass_at_mean = float(stats.binom.cdf(n_cells - n_required, n_cells, mean))
    return {"mean": mean, "upper": float(upper), "pass_probability_at_mean": pass_at_mean}


def spares_needed(failure_probability: float, target_probability: float, series_wanted: int = 1) -> int:
    """Fewest spares so that ``series_wanted`` series succeed with ``target_probability``.

    Cells fail independently with ``failure_probability`` per series; with
    1 + s cells the number of good series is Binomial(1 + s, 1 − p).
    """
    if failure_probability <= 0:
        return max(series_wanted - 1, 0)
    for spares in range(0, 1000):
        cells = 1 + spares
        if stats.binom.sf(series_wanted - 1, cells, 1 - failure_probability) >= target_probability:
            return spares
    raise ValueError(f"failure_probability={failure_probability}: no number of spares below 1000 reaches {target_probability}")


# Monte Carlo ---------------------------------------------------------------------------


def monte_carlo(times: ProtocolTimes, cells: SegmentCache, realities: Realities, n_runs: int, rng: np.random.Generator,
                progress: Any = None) -> list[dict[str, float]]:
    """``n_runs`` random beamtimes sharing one segment cache; one row of outcomes per beamtime."""
    rows = []
    for k in range(n_runs):
        res = run_beamtime(times, cells, realities, rng=rng, record=False)
        failures = sum(c.outcome.startswith("failed") for c in res.cells)
        rows.append({"run": k, "complete_series": res.complete_series, "cells_used": len(res.cells), "failures": failures,
                     "scans_acquired": res.scans_acquired, "scans_lost": res.scans_lost,
                     "utilization": res.utilization, "beam_downtime_h": sum(e - s for _, s, e in res.downtimes) / 3600})
        if progress is not None:
            progress()
    return rows
