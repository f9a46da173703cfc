"""The error budget: how much of each final error every stage contributes (oracle ablation).

The chain is rerun with the truth substituted for one more stage's product at a
time, cumulatively, in data-flow order (the ``oracle`` section of the scenario):

1. ``holograms``: noise-free holograms (no photon, dark-current or read noise);
2. ``reconstruction``: the true δ instead of the reconstruction (holograms no longer matter);
3. ``segmentation``: the true Si mask instead of the segmentation.

With ``e_0`` the run's error and ``e_k`` the error once stages 1…k are perfect,

    budget.<stage k>.<metric> = e_(k-1) − e_k     (what making stage k perfect removes)
    budget.dic.<metric>       = e_3               (what is left: DIC's own error, and the tracker's)

so the contributions add up to the run's error exactly. A negative contribution
means the error *grew* when that stage became perfect (possible: e.g. DIC on a
noise-free but sharper volume can land on another local optimum); it is
reported, not clipped. The attribution depends on the order, as any sequential
decomposition does; this order follows the data flow, so each stage is credited
given perfect upstream products. DIC never reads the segmentation, so
``budget.segmentation.dic.*`` is exactly 0: a fact, not an approximation.
"""

from __future__ import annotations

import math

#: Oracle stages in data-flow order, each with the scenario fields it switches on (cumulatively).
ORACLES: tuple[tuple[str, str], ...] = (
    ("holograms", "oracle.noise_free_holograms"),
    ("reconstruction", "oracle.true_delta"),
    ("segmentation", "oracle.true_labels"),
)
#: The stage the remainder is credited to: what no upstream oracle removes.
REMAINDER = "dic"
#: Every column of the budget, in order: the oracle stages, then the remainder.
BUDGET_STAGES: tuple[str, ...] = tuple(stage for stage, _ in ORACLES) + (REMAINDER,)
#: Final errors (lower is better) that the budget splits.
BUDGET_METRICS: tuple[str, ...] = (
    "dic.displacement_rmse_vx.max",
    "dic.volumetric_strain_mae.max",
    "tracking.axial_displacement_rmse_um",
)


def oracle_overrides() -> list[tuple[str, dict[str, bool]]]:
    """``[(stage, {field: True, ...}), ...]``: the cumulative overrides of each ablation run."""
    fields: dict[str, bool] = {}
    runs = []
    for stage, field in ORACLES:
        fields = {**fields, field: True}
        runs.append((stage, dict(fields)))
    return runs


def error_budget(base: dict[str, float], ablations: dict[str, dict[str, float]]) -> dict[str, float]:
    """``budget.<stage>.<metric>`` from the run's metrics and each ablation's (keyed by oracle stage).

    Metrics missing from the run or from any ablation, or not finite there, are left out.
    """
    stages = [stage for stage, _ in ORACLES]
    missing = [s for s in stages if s not in ablations]
    if missing:
        raise ValueError(f"error budget: no ablation run for {', '.join(missing)}")
    budget: dict[str, float] = {}
    for metric in BUDGET_METRICS:
        chain = [base.get(metric)] + [ablations[s].get(metric) for s in stages]
        if any(v is None or not math.isfinite(v) for v in chain):
            continue
        for stage, before, after in zip(stages, chain[:-1], chain[1:]):
            budget[f"budget.{stage}.{metric}"] = float(before - after)
        budget[f"budget.{REMAINDER}.{metric}"] = float(chain[-1])
    return budget


def budget_table(base: dict[str, float], budget: dict[str, float]) -> list[list[str]]:
    """Rows ``[metric, run's error, contribution of each stage (share of the error)…]`` for the report."""
    rows = []
    for metric in BUDGET_METRICS:
        if metric not in base or f"budget.{REMAINDER}.{metric}" not in budget:
            continue
        total = base[metric]
        row = [metric, f"{total:.4g}"]
        for stage in BUDGET_STAGES:
            value = budget[f"budget.{stage}.{metric}"]
            share = f" ({100 * value / total:.0f} %)" if total else ""
            row.append(f"{value:.3g}{share}")
        rows.append(row)
    return rows


def budget_columns() -> list[str]:
    """Column headers of :func:`budget_table`."""
    return ["metric", "run", *BUDGET_STAGES]
