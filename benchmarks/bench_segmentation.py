"""Segmentation benchmark: training and inference speed of the CI configuration, as ratios in one run.

Prints JSON. Absolute numbers (seconds per epoch, voxels per second) depend on
the machine; the ratios compare against references measured in the same run:

* ``inference_over_bare_predict``: :meth:`UNetSegmenter.probability` on a volume
  (tiling, blending, chunking) ÷ a bare ``model.predict`` of the same slices
  stacked (target <= 1.3), with slices the size of a tile (the ``tiny``
  scenario's 64 x 64) and with slices of 2 x 2 tiles (overlap costs extra);
* ``random_forest_over_unet`` and ``otsu_over_unet``: the baselines' time to
  segment the same volume ÷ the U-Net's.

Run: ``python benchmarks/bench_segmentation.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _segmentation_data import dice, disk_slices  # noqa: E402

from pipeline.baselines import make_baseline  # noqa: E402
from pipeline.segmentation import UNetSegmenter, configure_tensorflow, tensorflow_device  # noqa: E402


def _best_of(*fns, repeats: int = 5) -> list[float]:
    """Best wall time of each function, timed in turns so that load changes on a shared machine hit all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_tensorflow(args.threads)
    rng = np.random.default_rng(0)
    images, masks = disk_slices(4, 64, 64, rng)  # the tiny scenario: 4 slices of 64 x 64
    seg = UNetSegmenter(tile_shape_px=(64, 64), depth=2, base_filters=8, epochs=5, learning_rate=1e-3).fit(images, masks, rng)
    model = seg.model
    result = {"device": tensorflow_device(), "threads": args.threads,
              "training_seconds_per_epoch": seg.history["seconds_per_epoch"],
              "training_seconds": seg.history["seconds"], "training_images": seg.history["n_train_images"]}
    for name, shape in (("tile_sized_slices", (70, 64, 64)), ("slices_of_2x2_tiles", (16, 128, 128))):
        volume, truth = disk_slices(shape[0], shape[1], shape[2], rng)
        seg.probability(volume[:2])  # warm up the predict function
        bare, tiled = _best_of(lambda: model.predict(volume[..., None], batch_size=seg.inference_batch_size, verbose=0),
                               lambda: seg.probability(volume))
        result[name] = {"shape": list(shape), "voxels_per_second": volume.size / tiled,
                        "inference_over_bare_predict": tiled / bare, "dice": dice(seg.segment(volume), truth)}
    volume, truth = disk_slices(70, 64, 64, rng)
    otsu = make_baseline("otsu").fit(images, masks, rng)
    forest = make_baseline("random_forest").fit(images, masks, rng)
    unet_s, otsu_s, forest_s = _best_of(lambda: seg.segment(volume), lambda: otsu.segment(volume),
                                        lambda: forest.segment(volume), repeats=2)
    for method, baseline, seconds in (("otsu", otsu, otsu_s), ("random_forest", forest, forest_s)):
        result[f"{method}_over_unet"] = seconds / unet_s
        result[f"{method}_dice"] = dice(baseline.segment(volume), truth)
    result["unet_dice"] = dice(seg.segment(volume), truth)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
