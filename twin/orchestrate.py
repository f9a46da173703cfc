"""Running parts of the twin's DAG and publishing their outputs: behind `twin run`, `phantom`, `simulate`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from twin.io import atomic_path
from twin.parallel import executor
from twin.runner import Node, NodeReport, Runner, publish
from twin.scenario import Scenario, to_toml, validate
from twin.stages import scans, twin_stages


def run_nodes(
    sc: Scenario,
    out_dir: Path,
    targets: Callable[[Runner], Sequence[Node]],
    *,
    force: Sequence[str] = (),
    console: Console | None = None,
    publish_all: bool = False,
) -> Runner:
    """Bring ``targets(runner)`` up to date through the cache and publish them under ``out_dir``.

    Per-scan outputs go to ``out_dir/<scan>/``, the others to ``out_dir``. With
    ``publish_all`` every node the targets needed is published too (``twin run``).
    The cache is ``run.cache_dir`` or ``out_dir/cache``.
    """
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(sc.run.cache_dir) if sc.run.cache_dir else out_dir / "cache"
    with atomic_path(out_dir / "scenario.toml") as tmp:
        tmp.write_text(to_toml(sc))
    start = time.perf_counter()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console.print(f"twin {sc.name}: cache {cache_dir}", markup=False, highlight=False)
    with executor(sc.run) as parallel_map, Progress(
            TextColumn("stages"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=None)

        def show(report: NodeReport) -> None:
            where = f"{report.stage}[{report.item}]" if report.item else report.stage
            took = f"{report.seconds:6.1f} s" if report.status == "computed" else "  cached "
            bar.console.print(f"  {report.status:<8} {where:<28} {took}  {report.key[:12]}", markup=False, highlight=False)
            bar.advance(task)

        runner = Runner(sc, twin_stages(), cache_dir, force=force, executor=parallel_map, progress=show)
        wanted = list(targets(runner))
        bar.update(task, total=len(runner.plan(wanted)), completed=len(runner.reports))
        results = runner.run(wanted)
    chosen = [(r.stage, r.item, r.path) for r in runner.reports] if publish_all else [(s, i, p) for (s, i), p in results.items()]
    for stage, item, path in chosen:
        if stage != "microstructure":
            publish(path, out_dir / (item or ""))
    summary = {"scenario": sc.name, "seconds": time.perf_counter() - start,
               "nodes": [{"stage": r.stage, "item": r.item, "key": r.key, "status": r.status, "seconds": r.seconds}
                         for r in runner.reports]}
    with atomic_path(out_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return runner


def scan_targets(stage: str, scan: str | None) -> Callable[[Runner], list[Node]]:
    """All scans of a per-scan stage, or one (checked against the schedule)."""

    def targets(runner: Runner) -> list[Node]:
        names = scans(runner)
        if scan is None:
            return [(stage, s) for s in names]
        if scan not in names:
            from twin.errors import ScenarioError

            raise ScenarioError(f"--scan {scan}: not in this scenario's schedule ({', '.join(names)})")
        return [(stage, scan)]

    return targets


def run_twin(sc: Scenario, out_dir: Path, *, force: Sequence[str] = (), console: Console | None = None) -> Runner:
    """`twin run`: every stage for every scan, everything published under ``out_dir``, then ``report.html``.

    With ``validation.error_budget`` (and no oracle already switched on) the
    chain is rerun with the truth substituted stage by stage
    (:mod:`validation.budget`); each ablation's validation outputs go to
    ``out_dir/budget/<stage>/``, their metrics into ``budget.json`` and the
    ``budget.*`` metrics into ``metrics.json``.
    """
    from validation.report import build_report

    runner = run_nodes(sc, out_dir, lambda r: [("validation", None)], force=force, console=console, publish_all=True)
    if sc.validation.error_budget and not any(sc.oracle.model_dump().values()):
        run_error_budget(sc, Path(out_dir), runner.cache.root, force=force, console=console)
    build_report(out_dir)
    return runner


def run_error_budget(sc: Scenario, out_dir: Path, cache_dir: Path, *, force: Sequence[str] = (),
                     console: Console | None = None) -> dict[str, float]:
    """Run the oracle ablations through the shared cache and merge ``budget.*`` into ``out_dir/metrics.json``.

    Upstream nodes an ablation does not change (rehearsal, truth, and for the
    later ablations the holograms) keep their keys and are reused from the run.
    """
    from validation.budget import error_budget, oracle_overrides
    from validation.metrics import write_metrics

    console = console or Console(stderr=True)
    base = json.loads((out_dir / "metrics.json").read_text())
    ablations: dict[str, dict[str, float]] = {}
    for stage, fields in oracle_overrides():
        data = sc.model_dump(mode="json")
        for dotted in fields:
            section, name = dotted.split(".")
            data[section][name] = True
        data["run"]["cache_dir"] = str(cache_dir)
        # the baselines feed neither DIC nor tracking: the ablations skip them (half the segmentation time)
        data["segmentation"]["baselines"] = []
        variant = validate(data, source=f"{sc.name} with the truth up to {stage}")
        console.print(f"error budget: truth substituted up to {stage} ({', '.join(fields)})", markup=False, highlight=False)
        target = out_dir / "budget" / stage
        run_nodes(variant, target, lambda r: [("validation", None)], force=force, console=console)
        ablations[stage] = json.loads((target / "metrics.json").read_text())
    budget = error_budget(base, ablations)
    with atomic_path(out_dir / "budget.json") as tmp:
        # the run's own metrics and the budget are in metrics.json; this keeps what only the ablations know
        tmp.write_text(json.dumps({"ablations": ablations}, indent=1, allow_nan=True))
    write_metrics({k: v for k, v in base.items() if not k.startswith("budget.")} | budget, out_dir)
    return budget


#: What `twin run` prints when it finishes (the full set is in metrics.json and report.html).
def run_summary(out_dir: Path) -> list[str]:
    """Lines naming the headline metrics of a finished run and, for the budgeted errors, each stage's share."""
    from validation import HEADLINE_METRICS
    from validation.budget import BUDGET_METRICS, BUDGET_STAGES

    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    lines = [f"{out_dir}: {int(metrics.get('schedule.n_scans', 0))} scans; open {out_dir / 'report.html'}"]
    for name in HEADLINE_METRICS:
        if name not in metrics:
            continue
        line = f"  {name:<38} {metrics[name]:<9.4g}"
        shares = [(s, metrics.get(f"budget.{s}.{name}")) for s in BUDGET_STAGES]
        if name in BUDGET_METRICS and metrics[name] and all(v is not None for _, v in shares):
            line += " budget: " + ", ".join(f"{s} {100 * v / metrics[name]:.0f} %" for s, v in shares)
        lines.append(line.rstrip())
    return lines
