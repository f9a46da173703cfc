"""The ``validation`` stage: every product of a run scored against the truth.

Writes ``metrics.json`` (a flat mapping of stable dotted names to numbers;
renaming one is a breaking change) and ``metrics.nc`` (per-scan metrics as
variables over a ``scan`` dimension). Scores come from the modules that know
each product (``validation.segmentation_scores``, ``validation.dic_scores``);
this module gathers them and adds the reconstruction, schedule,
electrochemistry and runtime figures. The scores of the images (reconstruction,
segmentation, resolution, mechanism) are a stage of their own, ``image_scores``,
so that a sweep over DIC settings computes them once per reconstruction.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from twin.io import atomic_path, write_netcdf
from twin.runner import StageContext, recorded_seconds

_PER_SCAN = re.compile(r"^(?P<name>.+)\.(?P<scan>T\d+)$")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays over their jointly finite voxels."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def reconstruction_metrics(truth_nc: Path, volume_nc: Path, scan: str) -> dict[str, float]:
    """``recon.delta_pearson.<scan>``: correlation of the reconstructed δ with the true δ on the same grid."""
    import xarray as xr

    with xr.open_dataset(truth_nc, engine="h5netcdf") as truth, xr.open_dataset(volume_nc, engine="h5netcdf") as rec:
        true_delta, rec_delta = truth["delta"].values, rec["delta"].values
    if true_delta.shape != rec_delta.shape:
        from twin.errors import StageError

        raise StageError(f"validation: {volume_nc} has shape {rec_delta.shape}, the truth {truth_nc} {true_delta.shape}")
    return {f"recon.delta_pearson.{scan}": pearson(true_delta, rec_delta)}


def runtime_metrics(ctx: StageContext) -> dict[str, float]:
    """``runtime_s.<stage>``: seconds each stage took, summed over its scans (0 for entries reused from the cache)."""
    seconds: dict[str, float] = {}
    for (stage, _item), path in ctx.inputs.items():
        seconds[stage] = seconds.get(stage, 0.0) + recorded_seconds(path)
    return {f"runtime_s.{stage}": s for stage, s in sorted(seconds.items())}


def _mean_over_scans(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    values = [v for k, v in metrics.items() if k.startswith(prefix + ".T") and np.isfinite(v)]
    return {f"{prefix}.mean": float(np.mean(values))} if values else {}


def _scans_of(ctx: StageContext) -> list[str]:
    return sorted({item for (stage, item) in ctx.inputs if stage == "truth"}, key=lambda s: int(s[1:]))


def compute_image_scores(ctx: StageContext) -> None:
    """Stage ``image_scores`` (once): the scores of the reconstructions and segmentations.

    Everything validation measures that does not depend on the DIC: ``recon.delta_pearson.*``,
    ``segmentation.*``, the resolution (Fig S8; ``recon.resolution_*``, ``truth.resolution_*`` and
    ``resolution.png``) and ``lithiation.mechanism_*``. Inputs: ``rehearsal``, and per scan ``truth``,
    ``reconstruction``, ``segmentation``, ``particle_labels``. Writes ``image_scores.json`` (flat metrics)
    and ``resolution.png``; ``validation`` gathers them, so a sweep over DIC settings scores the images once.
    """
    from validation import figures
    from validation.mechanism import mechanism_metrics
    from validation.resolution_scores import FWHM_PER_SIGMA, resolution_metrics
    from validation.segmentation_scores import score_files

    scans = _scans_of(ctx)
    phantoms = {s: ctx.input("truth", s) / "phantom.nc" for s in scans}
    metrics: dict[str, float] = {}
    for s in scans:
        metrics.update(reconstruction_metrics(phantoms[s], ctx.input("reconstruction", s) / "volume.nc", s))
        metrics.update(score_files(ctx.input("segmentation", s) / "labels.nc", phantoms[s], scan=s))
    metrics.update(_mean_over_scans(metrics, "recon.delta_pearson"))
    metrics.update(_mean_over_scans(metrics, "segmentation.dice_si"))
    metrics.update(_mean_over_scans(metrics, "segmentation.dice_si_grey_ceiling"))
    for name in ("dice_lithiated_si", "lithiated_share_error"):  # three-class segmentations only
        metrics.update(_mean_over_scans(metrics, f"segmentation.{name}"))

    out = Path(ctx.out_dir)
    voxel_um = ctx.scenario.sample.voxel_size_um
    first = scans[0]
    resolution, example = resolution_metrics(ctx.scenario, phantoms[first], ctx.input("reconstruction", first) / "volume.nc",
                                             ctx.input("segmentation", first) / "labels.nc")
    metrics.update(resolution)
    figures.resolution_figure(example, resolution, voxel_um, out / "resolution.png")

    charged = most_charged_scan(ctx.input("rehearsal") / "schedule.csv")
    # the classifier's synthetic particles get the blur the reconstruction was measured to have (where it could
    # not be measured, the instrument's: the reconstruction's own widening then goes unmodelled)
    fwhm_nm = resolution["recon.resolution_fwhm_nm"]
    if not np.isfinite(fwhm_nm):
        fwhm_nm = resolution["truth.resolution_fwhm_nm"]
    blur_sigma_px = fwhm_nm / FWHM_PER_SIGMA / (voxel_um * 1e3)
    metrics.update(mechanism_metrics(ctx.input("reconstruction", charged) / "volume.nc",
                                     ctx.input("segmentation", charged) / "labels.nc",
                                     ctx.input("particle_labels", charged) / "particle_labels.nc", phantoms[charged],
                                     ctx.input("truth", charged) / "particles.csv", blur_sigma_px=blur_sigma_px, rng=ctx.rng))
    with atomic_path(out / "image_scores.json") as tmp:
        tmp.write_text(json.dumps({k: float(v) for k, v in sorted(metrics.items())}, indent=1, allow_nan=True))


def compute_validation(ctx: StageContext) -> None:
    """Stage ``validation`` (once): gather the scores of every product into metrics.json and metrics.nc.

    Takes ``image_scores`` (and its ``resolution.png``) as they are and adds the schedule, electrochemistry,
    DIC and tracking scores, the runtimes and the DIC figures.
    """
    import shutil

    from validation.dic_scores import dic_metrics

    scans = _scans_of(ctx)
    phantoms = {s: ctx.input("truth", s) / "phantom.nc" for s in scans}
    metrics: dict[str, float] = {}

    rehearsal = json.loads((ctx.input("rehearsal") / "rehearsal.json").read_text())
    metrics["schedule.n_scans"] = float(len(scans))
    metrics["electrochem.discharge_capacity_mAh"] = float(rehearsal["discharge_capacity_mah"])
    metrics["electrochem.charge_passed_mAh"] = float(rehearsal["charge_passed_mah"])

    image_scores = Path(ctx.input("image_scores"))
    metrics.update(json.loads((image_scores / "image_scores.json").read_text()))
    shutil.copy2(image_scores / "resolution.png", Path(ctx.out_dir) / "resolution.png")

    dic_dirs = {s: ctx.input("dic", s) for s in scans[1:]}
    metrics.update(dic_metrics(ctx.input("dic_composition"), phantoms, dic_dirs=dic_dirs,
                               tracking_dir=ctx.input("tracking")))
    metrics.update(runtime_metrics(ctx))
    _dic_figures(ctx, phantoms)
    write_metrics(metrics, ctx.out_dir)


def most_charged_scan(schedule_csv: Path) -> str:
    """The scan with the most charge passed (``schedule.csv`` ``charge_mah``): the deepest lithiation, known without the truth."""
    import pandas as pd

    table = pd.read_csv(schedule_csv)
    if "cell_id" in table:
        table = table[table["cell_id"] == table["cell_id"].iloc[0]]
    return str(table.loc[table["charge_mah"].idxmax(), "name"])


def _dic_figures(ctx: StageContext, phantoms: dict[str, Path]) -> None:
    """The DIC figures report.html embeds: strain of the most charged scan, VOI strain curves, trajectories."""
    import pandas as pd
    import xarray as xr

    from validation import figures

    out = Path(ctx.out_dir)
    charged = most_charged_scan(ctx.input("rehearsal") / "schedule.csv")
    with xr.open_dataset(Path(ctx.input("dic_composition")) / "cumulative.nc", engine="h5netcdf") as ds:
        cumulative = ds.load()
    # the true strain at the DIC nodes, once per scan, shared by both figures
    true = {s: figures.true_strain(cumulative, phantoms[s]) for s in cumulative["scan"].values.tolist() if s in phantoms}
    if charged in true:
        figures.strain_figure(cumulative, charged, true[charged], out / "strain.png")
    tracking = Path(ctx.input("tracking"))
    vois = pd.read_csv(tracking / "vois.csv")
    if len(vois) and "voi" in vois:
        figures.voi_strain_figure(vois, cumulative, true, ctx.scenario.validation.voi_size_um, out / "voi_strain.png")
    trajectories = pd.read_csv(tracking / "trajectories.csv")
    if len(trajectories) and "dz_um" in trajectories:
        figures.trajectories_figure(trajectories, phantoms, ctx.scenario.sample.voxel_size_um, out / "trajectories.png")


def write_metrics(metrics: dict[str, float], out_dir: Path) -> None:
    """``metrics.json`` (flat, sorted) and ``metrics.nc`` (per-scan names as variables over ``scan``)."""
    import xarray as xr

    clean = {k: float(v) for k, v in sorted(metrics.items())}
    with atomic_path(Path(out_dir) / "metrics.json") as tmp:
        tmp.write_text(json.dumps(clean, indent=1, allow_nan=True))
    per_scan: dict[str, dict[str, float]] = {}
    for key, value in clean.items():
        m = _PER_SCAN.match(key)
        if m:
            per_scan.setdefault(m["name"], {})[m["scan"]] = value
    scans = sorted({s for d in per_scan.values() for s in d}, key=lambda s: int(s[1:]))
    ds = xr.Dataset({name: ("scan", [d.get(s, np.nan) for s in scans]) for name, d in per_scan.items()},
                    coords={"scan": scans})
    ds.attrs["scalars"] = json.dumps({k: v for k, v in clean.items() if not _PER_SCAN.match(k)})
    write_netcdf(ds, Path(out_dir) / "metrics.nc")
