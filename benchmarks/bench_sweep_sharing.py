"""What sharing stages saves in a sensitivity sweep: a 5 δ/β × 3 node-spacing sweep ÷ its 15 points run alone.

Runs the sweep from an empty cache (``twin.sweep.run_sweep``, baselines off as in the docs' worked example),
then reads every node's recorded seconds from the cache manifests:

- ``sharing_ratio``: stage seconds the sweep computed ÷ the stage seconds of its points run alone (target ≤ 0.25);
- per stage (``twin.sweep.plan_sweep`` with the recorded seconds): seconds computed, seconds alone, and how many
  distinct nodes the points needed out of how many in all, so the table shows which stages every point must
  recompute (those bound the ratio from below).

Both figures come from the same nodes of the same run, so machine load cancels out to first order.

    python benchmarks/bench_sweep_sharing.py [--scenario tiny] [--out DIR]   # ~15 min on 2 cores for tiny
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from twin.runner import recorded_seconds
from twin.sweep import parse_param, plan_sweep, run_sweep

DELTA_BETA = "reconstruction.delta_beta=100,170,300,477,1000"
NODE_SPACING = "dic.node_spacing_px=[12,8],[16,12],[20,16]"
OVERRIDES = ["segmentation.baselines=[]"]


def recorded(sc, runner, stage: str, key: str) -> float:
    """The seconds a finished node recorded in its manifest."""
    return recorded_seconds(runner.cache.entry(stage, key))


def main(scenario: str = "tiny", out: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(out) if out else Path(tmp) / "sweep"
        start = time.perf_counter()
        params = [parse_param(DELTA_BETA), parse_param(NODE_SPACING)]
        ds = run_sweep(scenario, params, out_dir, overrides=OVERRIDES)
        wall = time.perf_counter() - start
        plan = plan_sweep(scenario, params, out_dir, overrides=OVERRIDES, cost=recorded)
    stages = {name: {"computed_s": r.seconds_distinct, "alone_s": r.seconds_alone, "nodes": r.nodes, "distinct": r.distinct}
              for name, r in plan.items()}
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
