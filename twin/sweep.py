"""``twin sweep``: sensitivity studies over scenario fields, sharing every common stage.

A sweep is a list of *points*, each a set of ``--set`` overrides of one base
scenario: a full grid (``--param reconstruction.delta_beta=120,170,300``) or
``--samples N`` Latin-hypercube points over ranges (``KEY=lo:hi``). All points
run through one cache (``OUT/cache``), so a stage whose fields and inputs are
equal between points is computed once: a δ/β sweep simulates the holograms
once, a node-spacing sweep reconstructs once per δ/β. The points' DAGs run as
one: every node goes to the executor as soon as its inputs are done, so a Dask
cluster works on all points at once; in one process the first point finishes
first, then the next (:func:`twin.runner.run_together`).

``OUT/sweep.nc`` (swept dimensions × metrics, NaN where a point has not finished)
is rewritten atomically as each point finishes, so a killed sweep resumes: a rerun
finds every finished node in the cache and only computes what is missing.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin.errors import ScenarioError
from twin.io import atomic_path, write_netcdf
from twin.parallel import executor
from twin.runner import Runner, Stage, recorded_seconds, run_together
from twin.scenario import Scenario, load_scenario, parse_override

MetricsOf = Callable[[Runner], dict[str, float]]


@dataclass(frozen=True)
class Param:
    """One swept field: explicit values, or a range ``lo:hi`` for sampling."""

    key: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_range(self) -> bool:
        return self.low is not None


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so list values (``[20,10],[30,15]``) survive."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (ch == "[") - (ch == "]")
        current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def parse_param(text: str) -> Param:
    """Parse ``KEY=v1,v2,...`` or ``KEY=lo:hi``; each value is read like a ``--set`` value."""
    if "=" not in text:
        raise ScenarioError(f"--param {text!r}: expected KEY=v1,v2,... or KEY=lo:hi")
    key, raw = (s.strip() for s in text.split("=", 1))
    if ":" in raw and not raw.startswith(("[", '"')) and "//" not in raw:
        lo, _, hi = raw.partition(":")
        try:
            low, high = float(lo), float(hi)
        except ValueError:
            raise ScenarioError(f"--param {text!r}: a range needs two numbers, lo:hi") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ScenarioError(f"--param {text!r}: a range needs finite lo < hi")
        return Param(key, low=low, high=high)
    values = tuple(parse_override(f"{key}={v}")[1] for v in _split_top_level(raw))
    if not values or any(v == "" for v in values):
        raise ScenarioError(f"--param {text!r}: empty value")
    return Param(key, values=values)


def sweep_points(params: Sequence[Param], samples: int | None, seed: int) -> list[dict[str, Any]]:
    """The points of a sweep: the full grid of explicit values, or ``samples`` Latin-hypercube points.

    Ranges need ``samples``; explicit values are crossed with the sampled ranges' points.
    """
    from scipy.stats import qmc

    ranges = [p for p in params if p.is_range]
    grids = [p for p in params if not p.is_range]
    if len({p.key for p in params}) != len(params):
        raise ScenarioError("--param: a field is swept twice")
    if ranges and not samples:
        raise ScenarioError(f"--param {ranges[0].key}={ranges[0].low}:{ranges[0].high}: a range needs --samples N")
    grid_points = [dict(zip([p.key for p in grids], combo)) for combo in itertools.product(*[p.values for p in grids])]
    if not ranges:
        return grid_points
    unit = qmc.LatinHypercube(d=len(ranges), seed=np.random.default_rng(seed)).random(samples)
    sampled = [{p.key: float(p.low + u[i] * (p.high - p.low)) for i, p in enumerate(ranges)} for u in unit]
    return [{**g, **s} for g in grid_points for s in sampled]


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def _coordinate(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=float)
    return np.asarray([json.dumps(v) for v in values], dtype=object)


def _point_scenarios(base: str | Path, params: Sequence[Param], overrides: Sequence[str], samples: int | None):
    """The base scenario, the points and each point's scenario, every point validated before anything runs
    (a bad value fails the sweep at once, naming the field)."""
    base_sc = load_scenario(base, list(overrides))
    points = sweep_points(params, samples, base_sc.run.seed)
    scenarios = [load_scenario(base, [*overrides, *(_override(k, v) for k, v in p.items())]) for p in points]
    return base_sc, points, scenarios


@dataclass
class StagePlan:
    """What one stage of a sweep costs: nodes its points need (summed), distinct ones, those already cached, and the
    one-core seconds of the distinct uncached nodes, of every distinct node, and of every needed node (the points
    run alone)."""

    nodes: int = 0
    distinct: int = 0
    cached: int = 0
    seconds: float = 0.0
    seconds_distinct: float = 0.0
    seconds_alone: float = 0.0
    modelled: bool = True


def modelled_seconds(sc: Scenario, runner: Runner, stage: str, key: str) -> float | None:
    """A node's one-core seconds by the calibrated cost model (:func:`twin.estimate.seconds_per_node`); None for a
    stage it does not model."""
    from twin.estimate import seconds_per_node

    return seconds_per_node(sc).get(stage)


def plan_sweep(base: str | Path, params: Sequence[Param], out_dir: Path, *, overrides: Sequence[str] = (),
               samples: int | None = None, cost: Callable[[Scenario, Runner, str, str], float | None] = modelled_seconds,
               ) -> dict[str, StagePlan]:
    """What a sweep would compute, before computing it: per stage, a :class:`StagePlan`.

    Node keys come from the DAG as :func:`run_sweep` computes them, so the plan shows exactly which nodes the points
    share; seconds come from ``cost(scenario, runner, stage, key)``: by default the calibrated cost model (stages it
    does not model count 0 and say so); ``benchmarks/bench_sweep_sharing.py`` passes the seconds a finished sweep
    recorded. Only the rehearsal runs (into ``out_dir``'s cache): its schedule lists the scans.
    """
    from twin.runner import MANIFEST
    from twin.stages import twin_stages

    base_sc, _, scenarios = _point_scenarios(base, params, overrides, samples)
    cache_dir = Path(base_sc.run.cache_dir) if base_sc.run.cache_dir else Path(out_dir) / "cache"
    plan: dict[str, StagePlan] = {}
    seen: set[tuple[str, str]] = set()
    for sc in scenarios:
        runner = Runner(sc, twin_stages(), cache_dir)
        for stage, item in runner.plan([("validation", None)]):
            key = runner.key((stage, item))
            seconds = cost(sc, runner, stage, key)
            row = plan.setdefault(stage, StagePlan(modelled=seconds is not None))
            seconds = seconds or 0.0
            row.nodes += 1
            row.seconds_alone += seconds
            if (stage, key) in seen:
                continue
            seen.add((stage, key))
            row.distinct += 1
            row.seconds_distinct += seconds
            if (runner.cache.entry(stage, key) / MANIFEST).is_file():
                row.cached += 1
            else:
                row.seconds += seconds
    return plan


def format_plan(plan: dict[str, StagePlan]) -> str:
    """The plan as a table, with the modelled sharing ratio."""
    from twin.estimate import _human_seconds

    lines = [f"# sweep plan: {plan['validation'].nodes} points (one-core seconds from the calibrated cost model; - : not modelled)",
             f"# {'stage':<22}{'needed':>8}{'distinct':>10}{'cached':>8}{'to compute':>12}{'alone':>10}"]
    for name, r in plan.items():
        seconds, alone = (_human_seconds(r.seconds), _human_seconds(r.seconds_alone)) if r.modelled else ("-", "-")
        lines.append(f"# {name:<22}{r.nodes:>8}{r.distinct:>10}{r.cached:>8}{seconds:>12}{alone:>10}")
    spent = sum(r.seconds for r in plan.values())
    alone = sum(r.seconds_alone for r in plan.values())
    if alone > 0:
        lines.append(f"# modelled: {_human_seconds(spent)} to compute, {_human_seconds(alone)} for the points run alone "
                     f"(sharing ratio {spent / alone:.2f}, counting cached nodes as free)")
    return "\n".join(lines)


def run_sweep(
    base: str | Path,
    params: Sequence[Param],
    out_dir: Path,
    *,
    overrides: Sequence[str] = (),
    samples: int | None = None,
    stages: Callable[[], list[Stage]] | None = None,
    targets: Sequence[tuple[str, str | None]] = (("validation", None),),
    metrics_of: MetricsOf | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    node_progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Run every point of a sweep through one shared cache; return the ``sweep.nc`` dataset.

    Parameters
    ----------
    base
        Scenario name or path; ``overrides`` apply to every point.
    params
        Swept fields (:func:`parse_param`).
    out_dir
        Receives ``sweep.nc``, ``sweep.png``, ``points.json`` and the shared ``cache/``.
    samples
        Number of Latin-hypercube samples over the range parameters.
    stages, targets, metrics_of
        The DAG, the nodes each point needs, and how to read a finished point's
        metrics (default: the validation stage's ``metrics.json``).
    progress
        ``progress(points_done, n_points, point)`` as each point finishes.
    node_progress
        ``node_progress(nodes_done, n_nodes)`` as each distinct node of the sweep's DAG finishes.
    """
    import xarray as xr

    from twin.stages import twin_stages

    stages = stages or twin_stages
    metrics_of = metrics_of or _validation_metrics
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_sc, points, scenarios = _point_scenarios(base, params, overrides, samples)
    with atomic_path(out_dir / "points.json") as tmp:
        tmp.write_text(json.dumps({"base": str(base), "overrides": list(overrides), "points": points}, indent=1))

    gridded = samples is None
    dims = [p.key for p in params] if gridded else ["point"]
    coords = {p.key: _coordinate(list(p.values)) for p in params} if gridded else {"point": np.arange(len(points))}
    shape = tuple(len(c) for c in coords.values())
    results: dict[str, np.ndarray] = {}
    cache_dir = Path(base_sc.run.cache_dir) if base_sc.run.cache_dir else out_dir / "cache"
    start = time.perf_counter()
    runners = [Runner(sc, stages(), cache_dir) for sc in scenarios]
    finished: list[int] = []
    failures: list[dict[str, Any]] = []
    ds = None

    def write() -> None:
        nonlocal ds
        ds = _dataset(results, dims, coords, base_sc, points, time.perf_counter() - start, failures)
        write_netcdf(ds, out_dir / "sweep.nc")

    def point_failed(n: int, error: Exception) -> None:
        failures.append({"point": points[n], "error": str(error)})
        write()

    def point_done(n: int) -> None:
        runner, point = runners[n], points[n]
        metrics = metrics_of(runner)
        metrics["runtime_s.point"] = sum(r.seconds for r in runner.reports)
        metrics["runtime_s.point_alone"] = sum(recorded_seconds(r.path) for r in runner.reports)
        metrics["computed_nodes"] = sum(r.status == "computed" for r in runner.reports)
        index = (tuple(list(p.values).index(point[p.key]) for p in params) if gridded else (n,))
        for name, value in metrics.items():
            results.setdefault(name, np.full(shape, np.nan))[index] = float(value)
        write()
        finished.append(n)
        if progress is not None:
            progress(len(finished), len(points), point)

    with executor(base_sc.run) as pool:
        run_together([(runner, list(targets)) for runner in runners], pool, runner_done=point_done,
                     node_done=node_progress, runner_failed=point_failed)
    plot_sweep(ds, out_dir / "sweep.png")
    return xr.load_dataset(out_dir / "sweep.nc", engine="h5netcdf")


def _dataset(results, dims, coords, base_sc: Scenario, points, seconds: float, failures: list[dict[str, Any]]):
    """``sweep.nc``; attribute ``sharing_ratio``: stage seconds the sweep computed ÷ what its points cost run alone.

    Attribute ``failed_points`` (JSON, when a point failed): its fields and the error; its metrics are NaN.
    """
    import xarray as xr

    data_vars = {name: (dims, values) for name, values in results.items()}
    ds = xr.Dataset(data_vars, coords={k: (k, v) for k, v in coords.items()})
    ds.attrs.update(scenario=base_sc.name, n_points=len(points), seconds=seconds, seed=base_sc.run.seed)
    if failures:
        ds.attrs["failed_points"] = json.dumps(failures)
    spent, alone = (np.nansum(results.get(k, np.nan)) for k in ("runtime_s.point", "runtime_s.point_alone"))
    if alone > 0:
        ds.attrs["sharing_ratio"] = float(spent / alone)
    return ds


def _validation_metrics(runner: Runner) -> dict[str, float]:
    path = runner.output("validation") / "metrics.json"
    return {k: float(v) for k, v in json.loads(path.read_text()).items()}


#: What sweep.png shows by default, when the sweep has them: in the plot's order (the errors a sweep is usually
#: run to lower first), and the runtime; not validation.HEADLINE_METRICS, which is the run summary's order.
HEADLINE_METRICS = ("dic.volumetric_strain_mae.max", "dic.displacement_rmse_vx.max", "tracking.axial_displacement_rmse_um",
                    "segmentation.dice_si.mean", "recon.delta_pearson.mean", "runtime_s.point_alone")


def lower_is_better(metric: str) -> bool:
    """Errors, biases, distances and runtimes are minimized; scores (Dice, Pearson, fractions) maximized."""
    return any(word in metric for word in ("rmse", "mae", "bias", "error", "distance", "runtime", "fwhm", "seconds"))


def best_index(metric: str, values: np.ndarray) -> int:
    """Flat index of the best finite value: the smallest |bias|, the smallest error, or the largest score."""
    if "bias" in metric:
        return int(np.nanargmin(np.abs(values)))
    return int(np.nanargmin(values) if lower_is_better(metric) else np.nanargmax(values))


def plot_sweep(ds, path: Path, metrics: Sequence[str] | None = None) -> Path:
    """Metric-versus-parameter curves (one line per value of the second swept field), best setting marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = [m for m in HEADLINE_METRICS if m in ds.data_vars]
    names = list(metrics or headline or [m for m in ds.data_vars if m not in ("computed_nodes",)])[:6]
    dims = [d for d in ds.dims]
    ncols = min(3, max(1, len(names)))
    nrows = math.ceil(max(1, len(names)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        da = ds[name]
        x_dim = dims[0]
        x = ds[x_dim].values
        numeric_x = x.dtype.kind in "fi"
        xs = x if numeric_x else np.arange(len(x))
        others = [d for d in da.dims if d != x_dim]
        lines = [({}, da)] if not others else [({others[0]: v}, da.sel({others[0]: v})) for v in ds[others[0]].values]
        for label, line in lines:
            if line.ndim > 1:  # further swept dims: show their best value
                rest = [d for d in line.dims if d != x_dim]
                line = (abs(line).min(rest) if "bias" in name else line.min(rest) if lower_is_better(name)
                        else line.max(rest))
            ax.plot(xs, line.values, "o-", label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in label.items()) or None)
        values = da.values
        if np.isfinite(values).any():
            idx = np.unravel_index(best_index(name, values), values.shape)
            ax.plot(xs[idx[da.dims.index(x_dim)]], values[idx], "r*", ms=16, label="best")
        if not numeric_x:
            ax.set_xticks(xs, [str(v) for v in x], rotation=30)
        ax.set_xlabel(x_dim)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
