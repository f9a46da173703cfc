"""DIC benchmark: our whole pair correlation ÷ one bare ``spam.DIC.ldic`` call, in one run.

A 128³ electrode-like pair (Cu foil at the bottom, a textured electrode of
spheres and fine binder texture, electrolyte above, noise) deformed by a
swelling field (axial displacement growing quadratically with height) is
correlated with the ``quickstart`` node spacings (25, 18, 9 px):

* ``ours_s``: :func:`pipeline.dic.correlate_pair` (eye registration,
  registration, three LDIC levels with filtering and passing, retries) plus
  :func:`pipeline.dic.write_pair` (Q8 strain, netCDF, TSV, TIFFs, CSV);
* ``bare_ldic_s``: ``spam.DIC.ldic`` once at the final level's nodes and
  windows, from the identity, with the margin and iterations of our first
  attempt and the same texture mask;
* ``ratio`` = ours ÷ bare (target <= 1.5), nodes per second of both, converged
  fractions and the displacement RMSE against the known field.

Both use spam's multiprocessing on ``--processes`` (default 2) processes.
Run: ``python benchmarks/bench_dic.py [--processes N] [--size 128]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import scipy.ndimage as ndi


def electrode_pair(size: int, rng: np.random.Generator):
    """(reference, deformed, u) with u(X) the true displacement function (voxels)."""
    shape = (size, size, size)
    cu_top, electrode_top = size // 16, size - size // 4
    zz, yy, xx = np.indices(shape)
    fine = ndi.gaussian_filter(rng.standard_normal(shape), 1.5)  # binder / carbon texture, 3-5 voxels
    f = 0.3 * fine / fine.std()
    for _ in range(int(size**3 / 4000)):
        c = rng.uniform([cu_top, 0, 0], [electrode_top, size, size])
        r = rng.uniform(3, 9)
        f += 1.0 * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r * r)
    f[:cu_top] = 3.0
    f[electrode_top:] = 0.0
    f = ndi.gaussian_filter(f, 0.7).astype(np.float32)

    def u(X):
        h = np.clip((X[0] - cu_top) / (electrode_top - cu_top), 0, None)
        return np.stack([0.5 + 2.0 * h**2, 0.2 + 0 * h, -0.3 + 0 * h])

    x = np.indices(shape).reshape(3, -1).astype(float)
    X = x.copy()
    for _ in range(8):
        X = x - u(X)
    g = ndi.map_coordinates(f, X, order=3, mode="nearest").reshape(shape).astype(np.float32)
    noise = lambda: rng.normal(0, 0.05, shape).astype(np.float32)  # noqa: E731
    return f + noise(), g + noise(), u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    import spam.DIC

    from pipeline._spam_compat import spam_call
    from pipeline.dic import DICSettings, correlate_pair, make_grid, texture_mask, write_pair

    rng = np.random.default_rng(7)
    ref, deformed, u = electrode_pair(args.size, rng)
    settings = DICSettings(node_spacing_px=(25, 18, 9), processes=args.processes)

    start = time.perf_counter()
    pair = correlate_pair(ref, deformed, settings)
    with tempfile.TemporaryDirectory() as tmp:
        write_pair(tmp, pair, 0.2, processes=args.processes)
    ours = time.perf_counter() - start

    final = pair.final
    margin, iterations = settings.attempts()[0]
    mask = texture_mask(ref, half_window_px=final.half_window_px)
    nodes, _ = make_grid(ref.shape, final.node_spacing_px, final.half_window_px)
    start = time.perf_counter()
    with spam_call(args.processes, "bare ldic"):
        phi, status, *_ = spam.DIC.ldic(ref, deformed, nodes, [final.half_window_px] * 3, processes=args.processes,
                                        im1mask=mask, margin=[-margin, margin] * 3, maskCoverage=0.5,
                                        maxIterations=iterations, deltaPhiMin=settings.delta_phi_tolerance)
    bare = time.perf_counter() - start

    truth = u(final.nodes.T).T
    textured = ~final.background
    err = final.phi[textured, :3, 3] - truth[textured]
    bare_textured = status != -5
    bare_ok = status == 2
    print(json.dumps({
        "size": args.size, "processes": args.processes, "final_nodes": int(len(final.nodes)),
        "textured_nodes": int(textured.sum()),
        "ours_s": round(ours, 2), "bare_ldic_s": round(bare, 2), "ratio": round(ours / bare, 2),
        "ours_nodes_per_s": round(sum(len(lv.nodes) for lv in pair.levels) / ours, 1),
        "bare_nodes_per_s": round(int(bare_textured.sum()) / bare, 1),
        "ours_converged_fraction": [round(lv.converged_fraction, 3) for lv in pair.levels],
        "bare_converged_fraction": round(float(bare_ok[bare_textured].mean()), 3),
        "ours_rmse_vx": round(float(np.sqrt(np.mean(err**2))), 4),
        "bare_rmse_vx": round(float(np.sqrt(np.mean((phi[bare_ok, :3, 3] - u(nodes[bare_ok].T).T) ** 2))), 4),
    }, indent=1))


if __name__ == "__main__":
    main()
