"""Benchmark the reconstruction: ratios against references measured in the same run. Prints JSON.

* reconstruction stage (flat/dark, Paganin, axis, deringing, FBP, equalization) ÷ bare
  ASTRA FBP of sinograms of the same size (target ≤ 1.3);
* our FBP vs ``skimage.transform.iradon`` on the same sinogram (speed-up);
* peak memory reconstructing a 256³ volume ÷ the output volume's size (target ≤ 3),
  measured in a child process as the growth of its resident set (sampled every 5 ms)
  during the reconstruction; the output holds two such volumes (δ and equalized).

    python benchmarks/bench_reconstruction.py [--skip-memory]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _simulate(path: Path, overrides: list[str], shape=None) -> tuple:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_instrument import _phantom

    from twin.instrument import Instrument, write_nxtomo
    from twin.scenario import load_scenario

    sc = load_scenario("quickstart", overrides)
    shape = shape or sc.volume_shape
    delta, beta = _phantom(shape, np.random.default_rng(0))
    inst = Instrument(sc, volume_shape=shape)
    write_nxtomo(path, inst, inst.simulate(delta, beta, rng=np.random.default_rng(1)))
    return sc, inst


def _bare_astra_fbp(sinos: np.ndarray, angles: np.ndarray, shape) -> float:
    """Seconds for plain ASTRA CPU FBP (no padding, no centring) of every sinogram."""
    import astra

    vol_geom = astra.create_vol_geom(*shape)
    proj_geom = astra.create_proj_geom("parallel", 1.0, sinos.shape[-1], angles)
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    t0 = time.perf_counter()
    for sino in sinos:
        sino_id = astra.data2d.create("-sino", proj_geom, sino)
        rec_id = astra.data2d.create("-vol", vol_geom)
        cfg = astra.astra_dict("FBP")
        cfg.update(ProjectionDataId=sino_id, ReconstructionDataId=rec_id, ProjectorId=projector)
        alg = astra.algorithm.create(cfg)
        astra.algorithm.run(alg)
        astra.data2d.get(rec_id)
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, rec_id])
    seconds = time.perf_counter() - t0
    astra.projector.delete(projector)
    return seconds


def speed(tmp: Path, n_projections: int = 200) -> dict:
    from pipeline.fbp import make_backend
    from pipeline.reconstruction import Reconstructor
    from pipeline.nxtomo_io import open_scan

    path = tmp / "speed.nx"
    sc, inst = _simulate(path, [f"beamline.n_projections={n_projections}"])
    g = inst.geometry
    rec = Reconstructor(open_scan(path), sc.reconstruction)
    rec.run()  # warm: imports and first-call costs out of the timing
    t0 = time.perf_counter()
    rec.run()
    stage_s = time.perf_counter() - t0
    sinos = np.random.default_rng(0).random((g.volume_shape[0], n_projections, g.n_columns), dtype=np.float32)
    angles = np.deg2rad(g.angles_deg)
    fbp_s = _bare_astra_fbp(sinos, angles, g.volume_shape[1:])
    fbp = make_backend("astra", g.n_columns, angles, g.volume_shape[1:])

    from skimage.transform import iradon

    one = sinos[:1]
    t0 = time.perf_counter()
    for _ in range(3):
        fbp(one)
    ours_one_s = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    iradon(one[0].T, theta=g.angles_deg, filter_name="ramp", circle=False, output_size=g.n_columns)
    iradon_s = time.perf_counter() - t0
    return {
        "volume_shape": list(g.volume_shape),
        "sinogram": [g.volume_shape[0], n_projections, g.n_columns],
        "reconstruction_stage_s": stage_s,
        "bare_astra_fbp_s": fbp_s,
        "ratio_stage_over_bare_fbp": stage_s / fbp_s,
        "target_ratio_stage": 1.3,
        "fbp_one_slice_s": ours_one_s,
        "skimage_iradon_one_slice_s": iradon_s,
        "speedup_over_iradon": iradon_s / ours_one_s,
    }


_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from peak_memory import peak_growth
from pipeline.nxtomo_io import open_scan
from pipeline.reconstruction import Reconstructor
from twin.scenario import load_scenario
import nabu.preproc.phase, nabu.preproc.flatfield, nabu.estimation.cor, nabu.reconstruction.rings, astra, skimage.exposure
scan = open_scan(sys.argv[1])
rec = Reconstructor(scan, load_scenario("quickstart").reconstruction)
result, _, grown = peak_growth(rec.run)
print(json.dumps({"peak_growth_bytes": grown, "output_bytes": result.delta.nbytes, "shape": list(result.delta.shape)}))
"""


def memory(tmp: Path, n_projections: int = 128) -> dict:
    path = tmp / "mem.nx"
    _simulate(path, [f"beamline.n_projections={n_projections}", "sample.lateral_size_um=51.2", "beamline.detector_pixels=256"],
              shape=(256, 256, 256))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak_growth_bytes"]
    return {
        "memory_volume_shape": r["shape"],
        "memory_n_projections": n_projections,
        "peak_growth_bytes": grown,
        "output_volume_bytes": r["output_bytes"],
        "ratio_peak_memory_over_output": grown / r["output_bytes"],
        "target_ratio_memory": 3.0,
    }


def main(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = speed(tmp)
        if "--skip-memory" not in argv:
            result.update(memory(tmp))
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
