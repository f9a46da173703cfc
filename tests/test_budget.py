"""The error budget's arithmetic: contributions of the oracle ablations add up to the run's error."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from validation.budget import BUDGET_METRICS, ORACLES, REMAINDER, budget_table, error_budget, oracle_overrides

STAGES = [s for s, _ in ORACLES]
errors = st.floats(min_value=0, max_value=1e3, allow_nan=False)


@given(st.lists(errors, min_size=4 * len(BUDGET_METRICS), max_size=4 * len(BUDGET_METRICS)))
def test_contributions_add_up_to_the_run_error(values):
    it = iter(values)
    base = {m: next(it) for m in BUDGET_METRICS}
    ablations = {s: {m: next(it) for m in BUDGET_METRICS} for s in STAGES}
    budget = error_budget(base, ablations)
    for m in BUDGET_METRICS:
        parts = [budget[f"budget.{s}.{m}"] for s in STAGES + [REMAINDER]]
        assert math.fsum(parts) == pytest.approx(base[m], rel=1e-12, abs=1e-9)
        assert budget[f"budget.{REMAINDER}.{m}"] == ablations[STAGES[-1]][m]
        assert budget[f"budget.{STAGES[0]}.{m}"] == base[m] - ablations[STAGES[0]][m]


def test_unchanged_error_is_credited_to_no_stage():
    """A stage whose oracle leaves a metric unchanged (DIC never reads the segmentation) contributes exactly 0."""
    base = {m: 0.3 for m in BUDGET_METRICS}
    ablations = {"holograms": {m: 0.2 for m in BUDGET_METRICS}, "reconstruction": {m: 0.05 for m in BUDGET_METRICS},
                 "segmentation": {m: 0.05 for m in BUDGET_METRICS}}
    budget = error_budget(base, ablations)
    assert budget["budget.segmentation.dic.displacement_rmse_vx.max"] == 0.0
    assert budget["budget.holograms.dic.displacement_rmse_vx.max"] == pytest.approx(0.1)
    assert budget["budget.dic.dic.displacement_rmse_vx.max"] == 0.05


def test_missing_or_nan_metrics_are_left_out_and_missing_ablations_refused():
    base = {m: 1.0 for m in BUDGET_METRICS}
    ablations = {s: {m: 0.5 for m in BUDGET_METRICS} for s in STAGES}
    ablations["reconstruction"][BUDGET_METRICS[0]] = float("nan")
    del ablations["segmentation"][BUDGET_METRICS[1]]
    budget = error_budget(base, ablations)
    assert not any(BUDGET_METRICS[0] in k or BUDGET_METRICS[1] in k for k in budget)
    assert f"budget.dic.{BUDGET_METRICS[2]}" in budget
    rows = budget_table(base, budget)
    assert [r[0] for r in rows] == [BUDGET_METRICS[2]]
    with pytest.raises(ValueError, match="segmentation"):
        error_budget(base, {"holograms": {}, "reconstruction": {}})


def test_ablations_switch_oracles_on_cumulatively_in_data_flow_order():
    runs = oracle_overrides()
    assert [s for s, _ in runs] == STAGES
    for k, (_, fields) in enumerate(runs):
        assert list(fields) == [f for _, f in ORACLES[: k + 1]] and all(fields.values())
