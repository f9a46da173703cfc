"""Strong scaling of a sweep: the same sweep with 1 and with N Dask workers, each from an empty cache.

Prints JSON: seconds with 1 worker, with N, speed-up t1/tN and parallel efficiency speed-up/N.
Both sweeps run in this process one after the other, so they see the same machine.

    python benchmarks/bench_sweep_scaling.py [--scenario tiny] [--workers 2] [--param reconstruction.delta_beta=150,200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from twin.sweep import parse_param, run_sweep


def main(scenario: str = "tiny", workers: int = 2, param: str = "reconstruction.delta_beta=150,200") -> dict:
    seconds = {}
    for n in (1, workers):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            run_sweep(scenario, [parse_param(param)], Path(tmp) / "sweep",
                      overrides=[f"run.workers={n}", "segmentation.baselines=[]"])
            seconds[n] = time.perf_counter() - start
    speedup = seconds[1] / seconds[workers]
    result = {"scenario": scenario, "param": param, "workers": workers, "seconds_1_worker": seconds[1],
              f"seconds_{workers}_workers": seconds[workers], "speedup": speedup, "efficiency": speedup / workers}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--param", default="reconstruction.delta_beta=150,200")
    main(**vars(parser.parse_args()))
