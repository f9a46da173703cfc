"""How time and peak memory grow with the voxel count and the projection count, as measured exponents.

Each measurement runs in a child process that first builds its inputs, then times one stage call; the peak
growth of the resident set over the one before the call (``peak_memory.peak_growth``: the kernel's high-water
mark on Linux) is the stage's working memory (inputs excluded; outputs held in memory included). Stages and what they get:

- ``holograms``: :func:`twin.instrument.write_scan` (what the stage runs: simulated and written a chunk of
  angles at a time) of an n³ phantom (``quickstart``'s optics, n detector columns) at ``n_projections`` angles,
  with chunks of ``--chunk-mib`` (default 64 MiB instead of the stage's 1 GiB, so that the sizes measured here
  are chunked as ``paper``'s are);
- ``reconstruction``: :meth:`pipeline.reconstruction.Reconstructor.run` on that scan;
- ``segmentation``: :meth:`pipeline.segmentation.UNetSegmenter.segment` of an n³ volume (``tiny``'s
  network: depth 2, 8 base filters, zx and zy slices; weights from one short fit: inference cost does not
  depend on them);
- ``dic``: :func:`pipeline.dic.correlate_pair` of a textured n³ pair under a smooth known displacement, node
  spacings [16, 8] voxels (the node count grows with the volume, as a fixed physical spacing would), in one
  process.

Exponents are least-squares slopes of log(seconds) and log(peak bytes) against log(voxels) over n = 64, 128,
256 at 64 projections, and against log(projections) over 32, 64, 128 projections at n = 128. A memory exponent
below 1 against the voxel count means the stage holds less than whole-volume copies per voxel as it grows
(chunked); ``memory_per_volume`` is the peak ÷ one float32 volume of the size, per size.

    python benchmarks/bench_growth.py [--sizes 64,128,256] [--projections 32,64,128] [--stages holograms,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

STAGES = ("holograms", "reconstruction", "segmentation", "dic")
CHUNK_ENV = "TWIN_BENCH_HOLOGRAM_CHUNK_MIB"


def _scenario(n: int, n_projections: int):
    from twin.scenario import load_scenario

    voxel_um = load_scenario("quickstart").sample.voxel_size_um
    return load_scenario("quickstart", [f"beamline.n_projections={n_projections}", f"beamline.detector_pixels={n}",
                                        f"sample.lateral_size_um={n * voxel_um}"])


def _scan(n: int, n_projections: int, path: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_instrument import _phantom

    import twin.instrument
    from twin.instrument import Instrument, write_scan

    twin.instrument.HOLOGRAM_CHUNK_BYTES = int(float(os.environ.get(CHUNK_ENV, 64)) * 2**20)

    sc = _scenario(n, n_projections)
    delta, beta = _phantom((n, n, n), np.random.default_rng(0))
    inst = Instrument(sc, volume_shape=(n, n, n))
    return sc, lambda: write_scan(path, inst, delta, beta, rng=np.random.default_rng(1))


def _textured_pair(n: int, rng: np.random.Generator):
    import scipy.ndimage as ndi

    fine = ndi.gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), 1.5)
    blobs = ndi.gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), 4.0)
    f = (0.3 * fine / fine.std() + (blobs > 0.05 * blobs.std())).astype(np.float32)
    z = np.arange(n, dtype=np.float32)[:, None, None] / n
    coords = np.indices((n, n, n), dtype=np.float32)
    coords[0] -= 0.5 + 2.0 * z**2  # axial displacement growing toward the top, as in the electrode
    coords[2] -= 0.3
    g = ndi.map_coordinates(f, coords, order=1, mode="nearest").astype(np.float32)
    return f, g


def _prepare(stage: str, n: int, n_projections: int, tmp: Path):
    """The stage call, with its inputs built (not timed)."""
    if stage == "holograms":
        return _scan(n, n_projections, tmp / "scan.nx")[1]
    if stage == "reconstruction":
        from pipeline.nxtomo_io import open_scan
        from pipeline.reconstruction import Reconstructor

        sc, write = _scan(n, n_projections, tmp / "scan.nx")
        write()
        rec = Reconstructor(open_scan(tmp / "scan.nx"), sc.reconstruction)
        return rec.run
    if stage == "segmentation":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from _segmentation_data import disk_slices

        from pipeline.segmentation import UNetSegmenter

        rng = np.random.default_rng(0)
        images, masks = disk_slices(4, 64, 64, rng)
        seg = UNetSegmenter(tile_shape_px=(64, 64), depth=2, base_filters=8, epochs=1, learning_rate=1e-3,
                            slice_planes=("zx", "zy")).fit(images, masks, rng)
        volume = disk_slices(n, n, n, rng)[0].astype(np.float32)
        seg.probability(volume[:2])  # build the predict function outside the timing
        return lambda: seg.segment(volume)
    if stage == "dic":
        from pipeline.dic import DICSettings, correlate_pair

        reference, deformed = _textured_pair(n, np.random.default_rng(0))
        # one process: spam's pool workers are forked copies whose resident sets would count the parent's pages again
        settings = DICSettings(node_spacing_px=(16, 8), max_iterations=300, retry_max_iterations=(300,), processes=1)
        return lambda: correlate_pair(reference, deformed, settings)
    raise ValueError(f"stage: one of {STAGES}, got {stage!r}")


def child(stage: str, n: int, n_projections: int) -> dict:
    import gc

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peak_memory import peak_growth

    with tempfile.TemporaryDirectory() as tmp:
        call = _prepare(stage, n, n_projections, Path(tmp))
        gc.collect()
        _, seconds, peak = peak_growth(call)
    return {"stage": stage, "n": n, "n_projections": n_projections, "seconds": seconds, "peak_bytes": peak}


def _measure(stage: str, n: int, n_projections: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", stage, str(n), str(n_projections)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{stage} n={n} projections={n_projections}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(x, y) -> float:
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.maximum(np.asarray(y, float), 1.0)), 1)[0])


def main(sizes=(64, 128, 256), projections=(32, 64, 128), stages=STAGES, n_for_projections: int = 128,
         projections_for_sizes: int = 64) -> dict:
    result: dict = {"sizes": list(sizes), "projections": list(projections), "stages": {}}
    for stage in stages:
        rows = [_measure(stage, n, projections_for_sizes) for n in sizes]
        entry = {"by_size": rows,
                 "time_exponent_voxels": _slope([n**3 for n in sizes], [r["seconds"] for r in rows]),
                 "memory_exponent_voxels": _slope([n**3 for n in sizes], [r["peak_bytes"] for r in rows]),
                 "memory_per_volume": [r["peak_bytes"] / (4 * r["n"] ** 3) for r in rows]}
        if stage in ("holograms", "reconstruction"):
            prow = [_measure(stage, n_for_projections, p) for p in projections]
            entry["by_projections"] = prow
            entry["time_exponent_projections"] = _slope(projections, [r["seconds"] for r in prow])
            entry["memory_exponent_projections"] = _slope(projections, [r["peak_bytes"] for r in prow])
        result["stages"][stage] = entry
        print(f"{stage:<15} time ∝ voxels^{entry['time_exponent_voxels']:.2f}, memory ∝ voxels^"
              f"{entry['memory_exponent_voxels']:.2f}, peak/volume "
              + ", ".join(f"{m:.1f}" for m in entry["memory_per_volume"])
              + (f"; time ∝ projections^{entry['time_exponent_projections']:.2f}, memory ∝ projections^"
                 f"{entry['memory_exponent_projections']:.2f}" if "by_projections" in entry else ""), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--projections", default="32,64,128")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--chunk-mib", type=float, default=64.0)
    args = parser.parse_args()
    os.environ[CHUNK_ENV] = str(args.chunk_mib)
    main(tuple(int(v) for v in args.sizes.split(",")), tuple(int(v) for v in args.projections.split(",")),
         tuple(args.stages.split(",")))
