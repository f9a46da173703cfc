"""Phantom benchmark: a 256³ phantom (~120 large particles + fragments) plus one warped scan, ÷ one map_coordinates pass.

In one run:

* ``reference_s``: one ``scipy.ndimage.map_coordinates`` pass (order 1) over the
  same volume, at coordinates displaced by a smooth field (the bare cost of one warp; median of three);
* ``ours_s`` (after a small warm-up phantom: numba's compile is once per installation):
  :func:`phantoms.microstructure.generate_microstructure` plus
  :func:`phantoms.truth.truth_for_scan` of one lithiated scan (lithiation, optics,
  SEI, deformation with its fold check, exact inverse, warp of five volumes);
* ``ratio`` = ours ÷ reference (target <= 5); ``written_ratio``: the same with the scan written to
  ``phantom.nc`` slab by slab (:func:`phantoms.truth.write_truth`, gzip: what the ``truth`` stage does);
* ``peak_memory_ratio`` = the peak resident memory of the microstructure and of the written scan (with the
  microstructure held), over the resident set before them (``peak_memory.peak_growth``: the kernel's
  high-water mark, every allocation counted, numba's included), ÷ the size of one float32 volume (target <= 6);
  ``in_memory_peak_memory_ratio`` with the scan held in memory instead (``truth_for_scan``).

Geometry: 100 nm voxels, 25.6 µm field of view and height (1 µm Cu, 18 µm
electrode, 6.6 µm headroom), 5 µm median particles: ~120 large particles (the issue asks ~50:
``--median-diameter-um 6.5`` gives that).
Run: ``python benchmarks/bench_phantoms.py [--size 256] [--median-diameter-um 5] [--threads N]`` (``--size`` scales
the voxel). ``threads``: the compiled passes run on every core; the reference pass is serial, so the ratio falls
with the number of cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import gc
import sys
from pathlib import Path

import numba
import numpy as np
import psutil
from scipy import ndimage

from phantoms.microstructure import generate_microstructure
from phantoms.truth import truth_for_scan, write_truth
from twin.scenario import load_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_growth  # noqa: E402


def _warm_up(sc) -> None:
    """One small phantom first, held and written: numba compiles (or loads from its cache) the kernels once per
    installation, for the array layouts of both paths (the written one's slabs are contiguous, the held one's not)."""
    small = sc.model_copy(update={"sample": sc.sample.model_copy(update={"lateral_size_um": 6.4, "headroom_um": 1.0})})
    ms = generate_microstructure(small.sample, np.random.default_rng(0))
    f = np.full(len(ms.particles), 0.3)
    args = (ms, small.sample, small.beamline.energy_kev, f, f)
    truth_for_scan(*args, scan="T1", scan_index=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        write_truth(*args, scan="T1", scan_index=1, seed=0, path=Path(tmp) / "phantom.nc")


def _steps(sc) -> tuple[list[float], list[int], np.ndarray]:
    """Seconds and peak resident bytes over the resident set before the microstructure of (microstructure,
    in-memory scan, written scan): the microstructure, held throughout, counts in all three; and which particles
    are large."""
    gc.collect()
    base = psutil.Process().memory_info().rss
    ms, t_ms, peak_ms = peak_growth(lambda: generate_microstructure(sc.sample, np.random.default_rng(1)))
    held = psutil.Process().memory_info().rss - base
    big = ~ms.particles["fragment"].to_numpy(bool)
    f = np.where(big, 0.3, 0.5) * np.exp(-ms.particles["depth_um"].to_numpy() / 20)
    args = (ms, sc.sample, sc.beamline.energy_kev, f, f)
    in_memory, t_scan, peak_scan = peak_growth(lambda: truth_for_scan(*args, scan="T1", scan_index=1, seed=1))
    del in_memory
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        _, t_written, peak_written = peak_growth(
            lambda: write_truth(*args, scan="T1", scan_index=1, seed=1, path=Path(tmp) / "phantom.nc"))
    return [t_ms, t_scan, t_written], [peak_ms, held + peak_scan, held + peak_written], big


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--median-diameter-um", type=float, default=5.0,
                    help="particles' median diameter (6.5: the issue's ~50 particles at 256³)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the compiled passes (default: numba's, one per core); the reference is serial")
    args = ap.parse_args()
    if args.threads is not None:
        numba.set_num_threads(args.threads)
    n = args.size
    a = 25.6 / n
    sc = load_scenario("quickstart", [f"sample.voxel_size_um={a}", "sample.lateral_size_um=25.6",
                                      "sample.current_collector_thickness_um=1.0", "sample.electrode_thickness_um=18.0",
                                      "sample.headroom_um=6.6", f"beamline.detector_pixels={n}",
                                      f"sample.particle_median_diameter_um={args.median_diameter_um}"])
    shape = sc.volume_shape

    vol = np.random.default_rng(0).random(shape, dtype=np.float32)
    g = np.indices(shape, dtype=np.float64)  # float64 and the output given: the pass itself, no conversions
    g[0] += 2.0 * np.sin(g[2] / 17.0)
    warped = np.empty_like(vol)
    passes = []
    for _ in range(3):  # the median of three (one pass alone, converting its inputs, varied 1.0-2.3 s here)
        t = time.perf_counter()
        ndimage.map_coordinates(vol, g, output=warped, order=1, mode="nearest")
        passes.append(time.perf_counter() - t)
    reference_s = float(np.median(passes))
    del g, warped

    _warm_up(sc)
    (t_ms, t_scan, t_written), (ms_peak, scan_peak, written_peak), big = _steps(sc)
    volume_bytes = 4 * int(np.prod(shape))
    print(json.dumps({
        "shape": list(shape), "voxel_size_um": a, "threads": numba.get_num_threads(), "n_particles": int(big.sum()), "n_fragments": int((~big).sum()),
        "reference_s": round(reference_s, 3), "microstructure_s": round(t_ms, 2), "scan_s": round(t_scan, 2),
        "ours_s": round(t_ms + t_scan, 2), "ratio": round((t_ms + t_scan) / reference_s, 1), "target_ratio": 5,
        "written_scan_s": round(t_written, 2), "written_ratio": round((t_ms + t_written) / reference_s, 1),
        "peak_memory_ratio": round(max(ms_peak, written_peak) / volume_bytes, 2), "target_peak_memory_ratio": 6,
        "in_memory_peak_memory_ratio": round(max(ms_peak, scan_peak) / volume_bytes, 2),
        "microstructure_peak_memory_ratio": round(ms_peak / volume_bytes, 2),
    }))


if __name__ == "__main__":
    main()
