"""``twin run``: the whole twin through the cached runner, published into one directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from twin.io import atomic_path
from twin.parallel import executor
from twin.runner import NodeReport, Runner, publish
from twin.scenario import Scenario, to_toml
from twin.stages import twin_stages


def run_twin(sc: Scenario, out_dir: Path, *, force: list[str] = (), console: Console | None = None) -> Runner:
    """Run every stage for every scan; publish outputs under ``out_dir`` (per-scan files in ``out_dir/<scan>/``).

    Parameters
    ----------
    sc
        The validated scenario.
    out_dir
        Run directory; the cache defaults to ``out_dir/cache`` (``run.cache_dir``).
    force
        Stage names to recompute even when cached.
    """
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(sc.run.cache_dir) if sc.run.cache_dir else out_dir / "cache"
    with atomic_path(out_dir / "scenario.toml") as tmp:
        tmp.write_text(to_toml(sc))
    start = time.perf_counter()

    def show(report: NodeReport) -> None:
        where = f"{report.stage}[{report.item}]" if report.item else report.stage
        took = f"{report.seconds:6.1f} s" if report.status == "computed" else "   cached"
        console.print(f"  {report.status:<8} {where:<28} {took}  {report.key[:12]}", markup=False, highlight=False)

    console.print(f"twin run {sc.name}: cache {cache_dir}", markup=False)
    with executor(sc.run) as parallel_map:
        runner = Runner(sc, twin_stages(), cache_dir, force=force, executor=parallel_map, progress=show)
        targets = [("validation", None)]
        results = runner.run(targets)
    for report in runner.reports:
        publish(report.path, out_dir / (report.item or ""))
    summary = {"scenario": sc.name, "seconds": time.perf_counter() - start,
               "nodes": [{"stage": r.stage, "item": r.item, "key": r.key, "status": r.status, "seconds": r.seconds}
                         for r in runner.reports]}
    with atomic_path(out_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    del results
    return runner
