"""Cost of the cache, as ratios against a reference measured in the same run.

- commit_overhead: time to run a stage that writes N MB through the runner
  (checksums, manifest, fsync, rename) ÷ time to write the same bytes directly;
- reuse_cost: time to validate and reuse that entry on a rerun ÷ the direct write
  (reuse reads and checksums every byte, so it should stay near or below 1);
- key_cost_us: microseconds to compute the keys of a 9-stage × 10-scan DAG.

Run: python benchmarks/bench_runner.py [--mb 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from twin.runner import Runner, Stage
from twin.scenario import load_scenario


def _payload(mb: int) -> np.ndarray:
    return np.random.default_rng(0).random(mb * 2**20 // 8)


def compute_write(ctx) -> None:
    np.save(ctx.out_dir / "data.npy", _payload(ctx.scenario.segmentation.epochs))


def _best(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=64)
    args = parser.parse_args()
    sc = load_scenario("tiny", [f"segmentation.epochs={args.mb}"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counter = iter(range(10**6))

        def direct():
            p = tmp / f"direct-{next(counter)}.npy"
            np.save(p, _payload(args.mb))

        def through_runner():
            Runner(sc, [Stage("write", 1, ("segmentation.epochs",), compute_write)],
                   tmp / f"cache-{next(counter)}").run([("write", None)])

        reuse_root = tmp / "reuse"
        Runner(sc, [Stage("write", 1, ("segmentation.epochs",), compute_write)], reuse_root).run([("write", None)])

        def reuse():
            r = Runner(sc, [Stage("write", 1, ("segmentation.epochs",), compute_write)], reuse_root)
            r.run([("write", None)])
            assert r.reports[0].status == "reused"

        t_direct = _best(direct)
        t_runner = _best(through_runner)
        t_reuse = _best(reuse)

        from twin.stages import twin_stages

        stages = [s for s in twin_stages()]
        items = [f"T{i}" for i in range(10)]
        dag = [Stage(s.name, s.version, s.reads, s.compute,
                     needs=(lambda item, r, name=s.name: [] if name == "rehearsal" else [("rehearsal", None)]),
                     items=None if s.items is None else (lambda r: items)) for s in stages]
        t0 = time.perf_counter()
        r = Runner(load_scenario("quickstart"), dag, tmp / "keys")
        for s in dag:
            for i in (items if s.items else [None]):
                r.key((s.name, i))
        t_keys = time.perf_counter() - t0
    result = {
        "payload_mb": args.mb,
        "direct_write_s": t_direct,
        "commit_overhead": t_runner / t_direct,
        "reuse_cost": t_reuse / t_direct,
        "key_cost_us": t_keys * 1e6,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
