"""How the twin's stages scale, measured on finished runs, and what that says about `paper`.

For each run directory (written by ``twin run``) this reads the seconds each
stage's nodes took (``run.json``, first computation only: reused nodes count
with the seconds recorded when they were computed) and the scenario's size, and
prints, per stage:

- the measured seconds (summed over scans, i.e. CPU-seconds of one worker);
- the cost model's prediction for the same scenario and number of scans (``twin.estimate``, one core);
- measured ÷ model;
- the exponent α of seconds ∝ (voxels × projections)^α (holograms, reconstruction)
  or ∝ voxels^α (the others) between the smallest and the largest run;
- ``paper``: the model's one-core hours (at its planned 17 scans) times the largest run's measured ÷ model.

Run: python benchmarks/scaling.py RUN_DIR [RUN_DIR ...]   (prints a table and JSON)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from twin.estimate import estimate
from twin.runner import recorded_seconds
from twin.scenario import load_scenario

STAGES = ("truth", "holograms", "reconstruction", "segmentation", "dic")
# the cost model's "segmentation" covers training and inference; "dic" the increments and their composition
GROUPS = {"segmentation_training": "segmentation", "dic_composition": "dic"}


def measured_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds per cost-model stage, from the cache manifests of every node the run used."""
    sc = load_scenario(run_dir / "scenario.toml")
    cache = Path(sc.run.cache_dir) if sc.run.cache_dir else run_dir / "cache"
    seconds: dict[str, float] = {}
    for node in json.loads((run_dir / "run.json").read_text())["nodes"]:
        stage = GROUPS.get(node["stage"], node["stage"])
        if stage not in STAGES:
            continue
        seconds[stage] = seconds.get(stage, 0.0) + recorded_seconds(cache / node["stage"] / node["key"])
    return seconds


def size(sc, stage: str) -> float:
    nz, ny, nx = sc.volume_shape
    voxels = nz * ny * nx
    return voxels * sc.beamline.n_projections if stage in ("holograms", "reconstruction") else voxels


def main(run_dirs: list[str]) -> dict:
    runs = []
    for d in run_dirs:
        d = Path(d)
        sc = load_scenario(d / "scenario.toml")
        est = estimate(sc, cores=1, calibrated=False)
        n_scans = len({n["item"] for n in json.loads((d / "run.json").read_text())["nodes"] if n["stage"] == "truth"})
        # the model plans for the most scans the protocol allows; compare at the number the run made
        model = {k: v * n_scans / est.n_scans for k, v in est.seconds.items()}
        runs.append({"dir": str(d), "scenario": sc, "measured": measured_seconds(d), "model": model})
    runs.sort(key=lambda r: math.prod(r["scenario"].volume_shape))
    paper = estimate(load_scenario("paper"), cores=1, calibrated=False).seconds
    small, large = runs[0], runs[-1]
    table = {}
    for stage in STAGES:
        row = {}
        for r in runs:
            m, e = r["measured"].get(stage, float("nan")), r["model"][stage]
            row[r["scenario"].name] = {"measured_s": m, "model_s": e, "measured_over_model": m / e}
        if len(runs) > 1:
            ratio_t = large["measured"].get(stage, float("nan")) / small["measured"].get(stage, float("nan"))
            ratio_n = size(large["scenario"], stage) / size(small["scenario"], stage)
            row["exponent"] = math.log(ratio_t) / math.log(ratio_n)
        row["paper_hours_one_core"] = paper[stage] * row[large["scenario"].name]["measured_over_model"] / 3600
        table[stage] = row
    names = [r["scenario"].name for r in runs]
    print(f"{'stage':<15}" + "".join(f"{n + ' s':>14}{'÷ model':>9}" for n in names) + f"{'α':>7}{'paper h/core':>14}")
    for stage, row in table.items():
        cells = "".join(f"{row[n]['measured_s']:>14.1f}{row[n]['measured_over_model']:>9.2f}" for n in names)
        print(f"{stage:<15}{cells}{row.get('exponent', float('nan')):>7.2f}{row['paper_hours_one_core']:>14.0f}")
    result = {"runs": [{"dir": r["dir"], "scenario": r["scenario"].name, "volume_shape": r["scenario"].volume_shape,
                        "n_projections": r["scenario"].beamline.n_projections} for r in runs], "stages": table}
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/scaling.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
