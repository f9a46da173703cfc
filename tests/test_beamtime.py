"""The Fig S6 protocol in SimPy against hand-worked timelines, with the linear stand-in cell.

The stand-in: U(q) = 3.0 V + 30 V/mAh · q, R = 10 kΩ (so 1 µA gives 10 mV),
solved in closed form. Every number in the expected timelines below is worked
out in the comments from those two lines.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.beamtime import (ProtocolTimes, Realities, monte_carlo, pretest_failure_posterior, run_beamtime,
                           spares_needed)
from twin.electrochem import LinearCell, SegmentCache, Step

MIN = 60.0


def _times(**kw) -> ProtocolTimes:
    base = dict(charge_a=1e-5, upper_v=3.5, cv_threshold_a=4e-6, discharge_a=5e-6, lower_v=3.0, interval_s=30 * MIN,
                pre_ocv_s=1 * MIN, scan_s=13 * MIN, max_charge_scans=6, final_scans=2, beamtime_s=72 * 3600.0, exchange_s=0.0)
    base.update(kw)
    return ProtocolTimes(**base)


def _cell(**kw) -> LinearCell:
    return LinearCell(**{"ocv0_v": 3.0, "ocv_slope_v_per_mah": 30.0, "resistance_kohm": 10.0, **kw})


def test_linear_cell_cc_reaches_limit_when_worked_out_by_hand():
    # CC at 10 µA: V = 3.0 + 0.1 (IR) + 30 V/mAh · 0.01 mA · t/3600 = 3.1 + 0.3 V/h · t -> 3.5 V after 4/3 h.
    seg = _cell().advance(0.0, Step("cc", 3 * 3600, current_a=1e-5, limit_v=3.5))
    assert seg.ended_by == "limit"
    assert seg.duration_s == pytest.approx(4800.0, rel=1e-12)
    assert seg.charge_mah == pytest.approx(0.01 * 4800 / 3600, rel=1e-12)
    assert seg.voltage_v[-1] == pytest.approx(3.5, abs=1e-12)


def test_nominal_timeline_matches_hand_worked_one():
    """T0, two CC timer scans, V >= limit -> CV, CV current threshold, N_max, discharge timer scans, double scan."""
    res = run_beamtime(_times(), SegmentCache(_cell()), single_series=True)
    # T0: 1 min OCV then the scan: 1-14 min. CC chunks of 29 min (timer 30 min minus the 1 min OCV):
    # T1 at 44, T2 at 87 min. The third chunk reaches 3.5 V after 80 - 58 = 22 min of CC: at 100 + 22 = 122 min.
    # CV at 3.5 V: OCV = 3.4 V, I0 = 0.1 V / 10 kΩ = 10 µA, τ = 3600 s · 10/30 = 20 min; I = 4 µA after
    # 20 ln 2.5 = 18.326 min -> OCV 1 min -> T3 at 141.326 min. Back in CV the OCV is 3.46 V, so I = 4 µA at
    # once: T4, T5, T6 follow each 14 min later. N_max = 6 -> discharge.
    cv_min = 20 * math.log(2.5)
    t3 = 122 + cv_min + 1
    # Discharge at 5 µA from q = 4/3·0.01 + 0.01 mA · 1200 s · 0.6 / 3600 = 0.015333 mAh: V = 3.41 V - 0.15 V/h · t,
    # 3.0 V after 2.7333 h = 164 min: five timer scans (29 min + OCV + 13 min each), the cut-off 19 min into
    # the sixth chunk, then the double scan.
    d0 = t3 + 3 * 14 + 13
    discharge = [d0 + 30 + 43 * k for k in range(5)]
    cutoff = d0 + 5 * 43 + 19
    expected = [1, 44, 87, t3, t3 + 14, t3 + 28, t3 + 42, *discharge, cutoff + 1, cutoff + 14]
    starts = [s.start_s / MIN for s in res.scans]
    assert [s.name for s in res.scans] == [f"T{i}" for i in range(len(expected))]
    np.testing.assert_allclose(starts, expected, atol=1e-6)
    assert [s.phase for s in res.scans] == (["pristine", "charge-CC", "charge-CC"] + ["charge-CV"] * 4 + ["discharge"] * 5
                                            + ["relaxation"] * 2)
    np.testing.assert_allclose([s.end_s - s.start_s for s in res.scans], 13 * MIN)
    assert res.cells[0].outcome == "complete"
    # The voltage just before the OCV pause: on the CC line at the T1 timer, V = 3.1 + 0.3 · 29/60.
    assert res.scans[1].voltage_v == pytest.approx(3.1 + 0.3 * 29 / 60, abs=1e-9)
    assert res.scans[3].current_a == pytest.approx(4e-6, rel=1e-9)
    assert res.scans[-1].voltage_v == pytest.approx(3.0, abs=1e-9)


def test_every_scan_is_preceded_by_the_ocv_pause_and_followed_by_resume():
    res = run_beamtime(_times(), SegmentCache(_cell()), single_series=True)
    pieces = res.pieces
    for scan in res.scans:
        k = next(i for i, p in enumerate(pieces) if p.phase == "scan" and abs(p.start_s - scan.start_s) < 1e-9)
        before = pieces[k - 1]
        if before.phase == "scan":  # the second scan of the double scan follows the first back to back
            assert scan.phase == "relaxation"
            continue
        assert before.phase == "ocv" and before.segment.step.kind == "rest"
        assert before.end_s - before.start_s == pytest.approx(1 * MIN)
    # Post-scan resume: after each charge scan the next piece is the same kind of step with a fresh 29-min timer.
    for k, p in enumerate(pieces[:-1]):
        if p.phase == "scan" and pieces[k + 1].phase in ("charge-CC", "charge-CV", "discharge"):
            assert pieces[k + 1].segment.step.duration_s == pytest.approx(29 * MIN)


def test_n_max_ends_charging_in_cc_when_the_limit_is_never_reached():
    # upper 4.3 V needs 4 h of CC; N_max = 2 scans come first.
    res = run_beamtime(_times(upper_v=4.3, max_charge_scans=2), SegmentCache(_cell()), single_series=True)
    phases = [s.phase for s in res.scans]
    assert phases[:3] == ["pristine", "charge-CC", "charge-CC"]
    assert "charge-CV" not in phases
    assert phases[3] in ("discharge", "relaxation")


def test_cv_timer_scans_when_the_threshold_is_unreachable():
    # Threshold 1 µA below a 20-min τ from 10 µA needs 46 min > 29 min: every CV scan comes from the timer.
    res = run_beamtime(_times(cv_threshold_a=1e-6, max_charge_scans=3), SegmentCache(_cell()), single_series=True)
    cv = [p for p in res.pieces if p.phase == "charge-CV"]
    assert cv and all(p.segment.ended_by == "time" for p in cv)
    assert all(p.end_s - p.start_s == pytest.approx(29 * MIN) for p in cv)


def test_scheduled_refill_loses_the_scan_it_hits_and_the_cell_carries_on():
    # A refill at 50 min falls in T1 (44-57 min): T1 is lost, the timeline is unchanged.
    real = Realities(refill_period_s=50 * MIN, refill_s=2 * MIN)
    res = run_beamtime(_times(), SegmentCache(_cell()), real, single_series=True)
    nominal = run_beamtime(_times(), SegmentCache(_cell()), single_series=True)
    assert res.scans[1].status.startswith("lost")
    assert res.scans[0].status == "acquired"
    np.testing.assert_allclose([s.start_s for s in res.scans], [s.start_s for s in nominal.scans])


def test_segment_cache_reuses_identical_paths():
    cache = SegmentCache(_cell())
    run_beamtime(_times(), cache, single_series=True)
    solves = cache.solves
    run_beamtime(_times(exchange_s=17 * MIN), cache, single_series=True)  # same path, shifted in time
    assert cache.solves == solves and cache.hits >= solves


def test_monte_carlo_without_failures_fills_the_beamtime_with_identical_series():
    times = _times(beamtime_s=24 * 3600.0, exchange_s=30 * MIN)
    nominal = run_beamtime(times, SegmentCache(_cell()), single_series=True)
    series_s = nominal.cells[0].end_s - nominal.cells[0].start_s
    rows = monte_carlo(times, SegmentCache(_cell()), Realities(spare_cells=10), 3, np.random.default_rng(1))
    expected = math.floor(times.beamtime_s / (series_s + times.exchange_s))
    assert [r["complete_series"] for r in rows] == [expected] * 3
    assert all(r["scans_lost"] <= 1 for r in rows)  # at most the series cut by the end of the beamtime


def test_pretest_posterior_matches_closed_forms():
    # 4 of 5: equal mixture of Beta(1,6) and Beta(2,5): mean (1/7 + 2/7)/2 = 3/14.
    assert pretest_failure_posterior(5, 4)["mean"] == pytest.approx(3 / 14, rel=1e-12)
    # 5 of 5: Beta(1,6), whose CDF is 1 - (1-p)^6: 95 % quantile 1 - 0.05^(1/6).
    assert pretest_failure_posterior(5, 5)["upper"] == pytest.approx(1 - 0.05 ** (1 / 6), rel=1e-9)


def test_spares_needed_matches_geometric_rule():
    # One series wanted: smallest s with 1 - p^(s+1) >= target.
    for p in (0.05, 3 / 14, 0.5, 0.66):
        s = spares_needed(p, 0.95)
        assert 1 - p ** (s + 1) >= 0.95 and (s == 0 or 1 - p**s < 0.95)


def _overlaps(a0, a1, b0, b1) -> bool:
    return min(a1, b1) - max(a0, b0) > 1e-9


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    interval_min=st.floats(10, 60), pre_min=st.floats(0, 4), scan_min=st.floats(2, 20), n_max=st.integers(1, 8),
    final=st.integers(1, 3), beamtime_h=st.floats(3, 40), charge_ua=st.floats(3, 30), threshold_frac=st.floats(0.05, 0.9),
    resistance_kohm=st.floats(1, 30), fail_p=st.floats(0, 0.9), loss_rate_per_h=st.floats(0, 0.5),
    spares=st.integers(0, 3), exchange_min=st.floats(0, 60), refill_h=st.sampled_from([0.0, 2.0, 5.0]), seed=st.integers(0, 2**32 - 1),
)
def test_invariants_over_random_protocols_and_failures(interval_min, pre_min, scan_min, n_max, final, beamtime_h, charge_ua,
                                                       threshold_frac, resistance_kohm, fail_p, loss_rate_per_h, spares,
                                                       exchange_min, refill_h, seed):
    if pre_min >= interval_min:
        pre_min = interval_min / 2
    times = _times(interval_s=interval_min * MIN, pre_ocv_s=pre_min * MIN, scan_s=scan_min * MIN, max_charge_scans=n_max,
                   final_scans=final, beamtime_s=beamtime_h * 3600, charge_a=charge_ua * 1e-6,
                   cv_threshold_a=threshold_frac * charge_ua * 1e-6, discharge_a=charge_ua * 0.5e-6, upper_v=4.0,
                   exchange_s=exchange_min * MIN)
    cell = _cell(resistance_kohm=resistance_kohm, samples=401)
    real = Realities(refill_period_s=refill_h * 3600, refill_s=10 * MIN, beam_loss_rate_per_s=loss_rate_per_h / 3600,
                     beam_loss_mean_s=30 * MIN, failure_probability=fail_p,
                     failure_modes={"short_circuit": 0.5, "seal_leak": 0.25, "contact_loss": 0.25}, spare_cells=spares,
                     series_duration_s=6 * 3600)
    res = run_beamtime(times, SegmentCache(cell), real, rng=np.random.default_rng(seed))
    assert res.error is None
    scans = sorted(res.scans, key=lambda s: s.start_s)
    # Scans never overlap (one beamline) and never outlast the beamtime.
    for a, b in zip(scans, scans[1:]):
        assert b.start_s >= a.end_s - 1e-9
    assert all(s.end_s <= times.beamtime_s + 1e-9 for s in scans)
    assert all(p.end_s <= times.beamtime_s + 1e-9 for p in res.pieces)
    assert all(c.end_s <= times.beamtime_s + 1e-9 for c in res.cells)
    # An acquired scan saw the beam for its whole window; outages end within the beamtime.
    for kind, a, b in res.downtimes:
        assert b <= times.beamtime_s + 1e-9
        assert not any(s.status == "acquired" and _overlaps(a, b, s.start_s, s.end_s) for s in scans)
    # The cell carries no current during any scan.
    for s in scans:
        for p in res.pieces:
            if p.cell_id == s.cell_id and _overlaps(p.start_s, p.end_s, s.start_s, s.end_s):
                assert p.segment.step.kind == "rest"
    # Charge is conserved: ∫I dt over the pieces before a scan equals the charge the protocol recorded for it.
    for cell_id in {c.cell_id for c in res.cells}:
        pieces = sorted((p for p in res.pieces if p.cell_id == cell_id), key=lambda p: p.start_s)
        starts = np.array([p.start_s for p in pieces])
        cumulative = np.cumsum([0.0] + [np.trapezoid(p.segment.current_a, p.segment.time_s) / 3.6 for p in pieces])
        for s in (s for s in scans if s.cell_id == cell_id):
            integral_mah = cumulative[np.searchsorted(starts, s.start_s - 1e-9)]
            # trapezoid on 401 samples of an exponential, τ >= 120 s, over <= 60 min: relative error <= (9 s / 120 s)² / 12 = 5e-4
            assert integral_mah == pytest.approx(s.charge_mah, rel=2e-3, abs=1e-9)
    # Cells are mounted one after another, each after the exchange time.
    for a, b in zip(res.cells, res.cells[1:]):
        assert b.mounted_s >= a.end_s - 1e-9
        if math.isnan(b.start_s):  # the beamtime ended while the spare was being mounted and aligned
            assert b.mounted_s + times.exchange_s >= times.beamtime_s - 1e-9
        else:
            assert b.start_s == pytest.approx(b.mounted_s + times.exchange_s)
