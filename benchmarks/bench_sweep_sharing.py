"""What sharing stages saves in a sensitivity sweep: a 5 δ/β × 3 node-spacing sweep ÷ its 15 points run alone.

Runs the sweep from an empty cache (``twin.sweep.run_sweep``, baselines off as in the docs' worked example),
then reads every node's recorded seconds from the cache manifests:

- ``sharing_ratio``: stage seconds the sweep computed ÷ the stage seconds of its points run alone (target ≤ 0.25);
- per stage: seconds computed, seconds alone, and how many distinct nodes the points needed out of how many in
  all, so the table shows which stages every point must recompute (those bound the ratio from below).

Both figures come from the same nodes of the same run, so machine load cancels out to first order.

    python benchmarks/bench_sweep_sharing.py [--scenario tiny] [--out DIR]   # ~15 min on 2 cores for tiny
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from twin.runner import Runner, recorded_seconds
from twin.stages import twin_stages
from twin.sweep import parse_param, run_sweep

DELTA_BETA = "reconstruction.delta_beta=100,170,300,477,1000"
NODE_SPACING = "dic.node_spacing_px=[12,8],[16,12],[20,16]"


def stage_costs(out_dir: Path) -> dict[str, dict[str, float]]:
    """Per stage: seconds computed once per distinct node, seconds summed over the points, node counts."""
    from twin.scenario import load_scenario

    spec = json.loads((out_dir / "points.json").read_text())
    cache = out_dir / "cache"
    table: dict[str, dict[str, float]] = defaultdict(lambda: {"computed_s": 0.0, "alone_s": 0.0, "nodes": 0, "distinct": 0})
    seen: set[tuple[str, str]] = set()
    for point in spec["points"]:
        sc = load_scenario(spec["base"], [*spec["overrides"], *(f"{k}={json.dumps(v)}" for k, v in point.items())])
        runner = Runner(sc, twin_stages(), cache)
        for stage, item in runner.plan([("validation", None)]):
            key = runner.key((stage, item))
            seconds = recorded_seconds(runner.cache.entry(stage, key))
            row = table[stage]
            row["alone_s"] += seconds
            row["nodes"] += 1
            if (stage, key) not in seen:
                seen.add((stage, key))
                row["computed_s"] += seconds
                row["distinct"] += 1
    return dict(table)


def main(scenario: str = "tiny", out: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(out) if out else Path(tmp) / "sweep"
        start = time.perf_counter()
        ds = run_sweep(scenario, [parse_param(DELTA_BETA), parse_param(NODE_SPACING)], out_dir,
                       overrides=["segmentation.baselines=[]"])
        wall = time.perf_counter() - start
        stages = stage_costs(out_dir)
    computed = sum(r["computed_s"] for r in stages.values())
    alone = sum(r["alone_s"] for r in stages.values())
    result = {"scenario": scenario, "points": int(ds.attrs["n_points"]), "wall_s": wall,
              "sharing_ratio": float(ds.attrs["sharing_ratio"]), "sharing_ratio_from_manifests": computed / alone,
              "target": 0.25, "stages": stages}
    width = max(map(len, stages))
    print(f"{'stage':<{width}} {'computed s':>11} {'alone s':>9} {'nodes':>12}")
    for name, r in sorted(stages.items(), key=lambda kv: -kv[1]["computed_s"]):
        print(f"{name:<{width}} {r['computed_s']:>11.1f} {r['alone_s']:>9.1f} {r['distinct']:>5}/{r['nodes']:<6}")
    print(f"sharing ratio {computed / alone:.3f} (sweep.nc: {result['sharing_ratio']:.3f}), wall {wall / 60:.1f} min")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="tiny")
    parser.add_argument("--out", default=None, help="keep the sweep (and its cache) here instead of a temporary folder")
    main(**vars(parser.parse_args()))
