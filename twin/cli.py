"""The ``twin`` command line (also ``python -m twin``).

Commands and output files are the contract of ARCHITECTURE.md. Exit codes:
0 success, 2 invalid input (the message names the field or file), 3 a stage
that is not available here or not built yet, 1 anything else.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from twin.errors import TwinError

app = typer.Typer(
    help="Digital twin of in situ X-ray nano-holotomography of Si anodes (ESRF ID16B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

ScenarioArg = Annotated[str, typer.Argument(help="Bundled scenario name (tiny, quickstart, core_shell, pathway, paper) or a TOML path.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: dotted.key=value (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory.")]
ScanOpt = Annotated[Optional[str], typer.Option("--scan", help="Only this scan (T0, T1, ...).")]
StageScenarioOpt = Annotated[str, typer.Option("--scenario", help="Scenario whose parameters this stage uses.")]


@app.callback()
def _root(verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="-v info, -vv debug.")] = 0) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _scenario(source: str, overrides: list[str] | None):
    from twin.scenario import load_scenario

    return load_scenario(source, overrides or [])


@app.command()
def check(
    scenario: ScenarioArg = "quickstart",
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Accept a scenario that exceeds this machine's memory.")] = False,
) -> None:
    """Print the resolved scenario and an estimate of its memory and time; exit 2 if invalid or too big."""
    from twin.estimate import estimate, format_estimate, machine_memory_bytes
    from twin.scenario import to_toml

    sc = _scenario(scenario, set_)
    out.print(to_toml(sc), markup=False, highlight=False)
    est = estimate(sc)
    out.print(format_estimate(est), markup=False, highlight=False)
    available = machine_memory_bytes()
    if est.peak_memory_bytes > available and not force:
        err.print(
            f"scenario {sc.name!r} needs about {est.peak_memory_bytes / 2**30:.1f} GiB at its peak "
            f"({est.peak_stage}); this machine has {available / 2**30:.1f} GiB. "
            "Run it on a bigger machine or a Dask cluster, scale it down, or pass --force.",
            markup=False, soft_wrap=True,
        )
        raise typer.Exit(2)


@app.command()
def phantom(scenario: ScenarioArg = "quickstart", out_dir: OutOpt = Path("phantom"), scan: ScanOpt = None, set_: SetOpt = None) -> None:
    """Write phantom.nc (phase, particle, lithiation, delta, beta, displacement) and phantom.png.

    Without --scan: the pristine electrode (T0), no rehearsal needed. With --scan Ti: the truth at that
    scan, through the cached stages (rehearsal -> microstructure -> truth).
    """
    import xarray as xr

    from phantoms.truth import pristine_phantom, write_phantom_png
    from twin.io import atomic_path, write_netcdf
    from twin.orchestrate import run_nodes, scan_targets

    sc = _scenario(scenario, set_)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scan is None:
        ds, table, _ = pristine_phantom(sc)
        write_netcdf(ds, out_dir / "phantom.nc")
        with atomic_path(out_dir / "particles.csv") as tmp:
            table.to_csv(tmp, index=False)
    else:
        runner = run_nodes(sc, out_dir, scan_targets("truth", scan), console=err)
        from twin.runner import publish

        publish(runner.output("truth", scan), out_dir)
        ds = xr.load_dataset(out_dir / "phantom.nc", engine="h5netcdf")
    write_phantom_png(ds, out_dir / "phantom.png")
    out.print(f"wrote {out_dir / 'phantom.nc'} and {out_dir / 'phantom.png'} ({' x '.join(map(str, ds['phase'].shape))} voxels "
              f"of {ds.attrs['voxel_size_um']:g} um, scan {ds.attrs.get('scan', 'T0')})", markup=False, highlight=False)


@app.command()
def rehearse(
    scenario: ScenarioArg = "quickstart",
    out_dir: OutOpt = Path("rehearsal"),
    monte_carlo: Annotated[int, typer.Option("--monte-carlo", min=0, help="Number of Monte Carlo beamtimes.")] = 0,
    set_: SetOpt = None,
) -> None:
    """Rehearse the beamtime: schedule.csv, timeseries.nc, rehearsal.json, timeline.png (montecarlo.csv)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from twin.rehearse import rehearse as run_rehearsal

    sc = _scenario(scenario, set_)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        summary = run_rehearsal(sc, out_dir, monte_carlo_runs=monte_carlo, progress=progress)
    nomenclature = summary["seed_nomenclature"]
    out.print(f"{len(summary['scans'])} scans {summary['scans'][0]}..{summary['scans'][-1]} in {summary['series_duration_h']:.2f} h; "
              f"charge {summary['charge_passed_mah'] * 1e3:.1f} µAh, discharge {summary['discharge_capacity_mah'] * 1e3:.1f} µAh; "
              f"seed nomenclature {'matched' if nomenclature['matches'] else 'differs'} {nomenclature['twin']}", markup=False)
    if "monte_carlo" in summary:
        mc = summary["monte_carlo"]
        out.print(f"Monte Carlo ({mc['runs']} beamtimes): P(>=1 complete series) = {mc['p_at_least_one_complete_series']:.3f}, "
                  f"E[complete series] = {mc['expected_complete_series']:.2f}, utilization = {mc['utilization_mean']:.2f}, "
                  f"lost scans = {mc['lost_scans_mean']:.2f}", markup=False)
    out.print(f"written to {out_dir}", markup=False)


@app.command()
def simulate(scenario: ScenarioArg = "quickstart", out_dir: OutOpt = Path("holograms"), scan: ScanOpt = None, set_: SetOpt = None) -> None:
    """Write one NXtomo HDF5 file of holograms per scan (OUT/<scan>/scan.nx), through the cached stages."""
    from twin.orchestrate import run_nodes, scan_targets

    sc = _scenario(scenario, set_)
    runner = run_nodes(sc, out_dir, scan_targets("holograms", scan), console=err)
    done = [r.item for r in runner.reports if r.stage == "holograms"]
    out.print(f"wrote {', '.join(str(out_dir / s / 'scan.nx') for s in done)}", markup=False, highlight=False)


@app.command()
def reconstruct(
    input_file: Annotated[Path, typer.Argument(help="NXtomo HDF5 file.")],
    out_dir: OutOpt = Path("reconstruction"),
    scenario: StageScenarioOpt = "quickstart",
    set_: SetOpt = None,
) -> None:
    """Reconstruct a volume (TIFF and .nc with voxel size) from an NXtomo file."""
    from pipeline.reconstruction import reconstruct_file, write_volume

    sc = _scenario(scenario, set_)
    # A beamline file carries its own geometry: check distances only when the user sets them.
    distances = sc.beamline.propagation_distances_m if any(o.startswith("beamline.propagation_distances_m") for o in set_ or []) else None
    result = reconstruct_file(input_file, sc.reconstruction, expected_distances_m=distances, workers=sc.run.workers)
    nc_path, tif_path = write_volume(result, out_dir, attrs={"source": str(input_file)})
    out.print(f"wrote {nc_path} and {tif_path}: {result.delta.shape} voxels of {result.voxel_size_um:g} µm; "
              f"rotation axis {result.info['center_offset_used_px']:+.2f} px", markup=False, highlight=False)


@app.command()
def segment(
    volume: Annotated[Path, typer.Argument(help="Reconstructed volume (.nc or .tif).")],
    model: Annotated[Path, typer.Option("--model", help="Trained U-Net (.keras).")],
    out_dir: OutOpt = Path("segmentation"),
    scenario: StageScenarioOpt = "quickstart",
    set_: SetOpt = None,
) -> None:
    """Segment a volume into a label volume: labels.nc (`labels` uint8, 1 = Si; 2 = lithiated Si for a
    three-class model) and labels.tif."""
    import numpy as np

    from twin.io import read_volume
    from pipeline.segmentation import LABEL_LITHIATED_SI, UNetSegmenter, si_from_labels, write_labels

    sc = _scenario(scenario, set_).segmentation
    data, _ = read_volume(volume)
    seg = UNetSegmenter.load(model, tile_shape_px=sc.tile_shape_px, tile_overlap_fraction=sc.tile_overlap_fraction,
                             inference_batch_size=sc.inference_batch_size, probability_threshold=sc.probability_threshold,
                             slice_planes=sc.slice_planes)
    labels = seg.segment(data)
    write_labels(out_dir, labels, volume_path=volume, attrs={"method": "unet", "model": str(model)},
                 n_classes=seg.n_classes)
    si = si_from_labels(labels)
    lithiated = (f", lithiated share of the Si {np.count_nonzero(labels == LABEL_LITHIATED_SI) / max(si.sum(), 1):.3f}"
                 if seg.n_classes == 3 else "")
    out.print(f"{out_dir / 'labels.nc'}: {labels.shape} voxels, Si fraction {si.mean():.3f}{lithiated}", markup=False)


@app.command()
def dic(
    reference: Annotated[Path, typer.Argument(help="Reference volume.")],
    volume: Annotated[Path, typer.Argument(help="Deformed volume.")],
    out_dir: OutOpt = Path("dic"),
    scenario: StageScenarioOpt = "quickstart",
    set_: SetOpt = None,
) -> None:
    """Register and correlate two volumes: phi_field.nc, strain TIFFs, nodes.csv."""
    from pipeline.dic import correlate_files

    sc = _scenario(scenario, set_)
    summary = correlate_files(reference, volume, out_dir, sc, attrs={"reference": str(reference), "deformed": str(volume)})
    final = summary["levels"][-1]
    out.print(f"{final['converged_fraction']:.0%} of {final['n_nodes'] - final['n_background']} textured nodes converged "
              f"at node spacing {final['node_spacing_px']} px; files in {out_dir}", markup=False, highlight=False)


@app.command()
def train(
    images: Annotated[Path, typer.Argument(help="Grey-value slices: a 2D TIFF or a stack (n, y, x).")],
    annotations: Annotated[Path, typer.Argument(help="Their annotations (TIFF, same shape), e.g. exported from ilastik.")],
    si_label: Annotated[int, typer.Option("--si-label", help="Value of the Si class in the annotations (two classes; "
                                          "with segmentation.n_classes=3 they must hold 0, 1 and 2).")] = 1,
    out_dir: OutOpt = Path("model"),
    scenario: StageScenarioOpt = "quickstart",
    set_: SetOpt = None,
) -> None:
    """Train the U-Net on annotated slices: model.keras and training.json (for `twin segment --model`)."""
    import json

    import numpy as np

    from pipeline.segmentation import UNetSegmenter, read_annotated_slices, tiles_from_slices
    from twin.io import atomic_path

    sc = _scenario(scenario, set_)
    grey, mask = read_annotated_slices(images, annotations, si_label=si_label, n_classes=sc.segmentation.n_classes)
    tiles, tile_masks = tiles_from_slices(grey, mask, tuple(sc.segmentation.tile_shape_px))
    seg = UNetSegmenter.from_scenario(sc.segmentation).fit(tiles, tile_masks, np.random.default_rng(sc.run.seed))
    seg.save(out_dir / "model.keras")
    with atomic_path(out_dir / "training.json") as tmp:
        tmp.write_text(json.dumps({"images": str(images), "annotations": str(annotations), "si_label": si_label,
                                   "n_tiles": len(tiles), **seg.history}, indent=1))
    out.print(f"{out_dir / 'model.keras'}: trained on {len(tiles)} tiles on {seg.history['device']} "
              f"in {seg.history['seconds']:.0f} s, final loss {seg.history['loss'][-1]:.4f}", markup=False)


@app.command()
def run(
    scenario: ScenarioArg = "quickstart",
    out_dir: OutOpt = Path("runs/quickstart"),
    set_: SetOpt = None,
    force_stage: Annotated[Optional[list[str]], typer.Option("--force", help="Recompute this stage even if cached (repeatable).")] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of an existing Dask scheduler.")] = None,
) -> None:
    """Run the whole twin for all scans: every product, metrics.json, metrics.nc, report.html."""
    from twin.orchestrate import run_twin

    overrides = list(set_ or [])
    if scheduler:
        overrides.append(f"run.scheduler={scheduler!r}".replace("'", '"'))
    sc = _scenario(scenario, overrides)
    run_twin(sc, out_dir, force=force_stage or [], console=err)
    from twin.orchestrate import run_summary

    for line in run_summary(out_dir):
        out.print(line, markup=False, highlight=False)


@app.command()
def sweep(
    scenario: ScenarioArg = "quickstart",
    param: Annotated[Optional[list[str]], typer.Option("--param", help="KEY=v1,v2,... or KEY=lo:hi with --samples (repeatable).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, help="Latin-hypercube points over the lo:hi ranges.")] = None,
    out_dir: OutOpt = Path("sweep"),
    set_: SetOpt = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of an existing Dask scheduler.")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Only say what the sweep would compute (nodes per stage, shared, "
                                                      "cached, modelled time); runs nothing but the rehearsal.")] = False,
) -> None:
    """Run a grid of scenarios through one shared cache: sweep.nc (swept dims × metrics) and sweep.png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twin.errors import ScenarioError
    from twin.sweep import format_plan, parse_param, plan_sweep, run_sweep

    if not param:
        raise ScenarioError("--param: give at least one KEY=v1,v2,...")
    overrides = list(set_ or [])
    if scheduler:
        overrides.append(f'run.scheduler="{scheduler}"')
    params = [parse_param(p) for p in param]
    if plan:
        out.print(format_plan(plan_sweep(scenario, params, out_dir, overrides=overrides, samples=samples)),
                  markup=False, highlight=False, soft_wrap=True)
        return
    with Progress(TextColumn("{task.fields[what]:<6}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err) as bar:
        points_task = bar.add_task("", total=None, what="points")
        nodes_task = bar.add_task("", total=None, what="stages")

        def show(done: int, total: int, point: dict) -> None:
            described = ", ".join(f"{k}={v}" for k, v in point.items())
            bar.update(points_task, completed=done, total=total, description=f"last finished: {described}")
            if not err.is_terminal:  # a batch job's log gets a line per point
                err.print(f"point {done}/{total} finished: {described}", markup=False, highlight=False)

        def show_nodes(done: int, total: int) -> None:
            bar.update(nodes_task, completed=done, total=total)

        ds = run_sweep(scenario, params, out_dir, overrides=overrides, samples=samples, progress=show,
                       node_progress=show_nodes)
    shared = (f"; shared stages: {ds.attrs['sharing_ratio']:.2f} of the stage time its {ds.attrs['n_points']} points"
              " take run alone") if "sharing_ratio" in ds.attrs else ""
    out.print(f"wrote {out_dir / 'sweep.nc'} and {out_dir / 'sweep.png'}{shared}", markup=False)
    if "failed_points" in ds.attrs:
        from twin.errors import StageError

        failures = json.loads(ds.attrs["failed_points"])
        lines = [f"{', '.join(f'{k}={v}' for k, v in f['point'].items())}: {f['error']}" for f in failures]
        raise StageError(f"{len(failures)} of {ds.attrs['n_points']} points failed (NaN in sweep.nc, attribute "
                         f"failed_points; the others finished):\n  " + "\n  ".join(lines))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A directory written by `twin run`.")]) -> None:
    """(Re)build report.html of a run from its published files."""
    from validation.report import build_report

    out.print(f"wrote {build_report(run_dir)}", markup=False)


@app.command()
def bench(
    out_dir: OutOpt = Path("bench"),
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run benchmarks whose name contains this (repeatable).")] = None,
) -> None:
    """Run the benchmark suite: a table of ratios against references measured in the same run, and bench.json."""
    import json

    from rich.table import Table

    from twin.bench import run_benchmarks
    from twin.io import atomic_path

    results = run_benchmarks(only, progress=lambda name: err.print(f"running {name} ...", markup=False))
    table = Table(title="twin bench (ratios: lower is better unless named otherwise)")
    for col in ("benchmark", "figure", "value"):
        table.add_column(col)
    for name, figures in results.items():
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.add_row(name, key, shown)
    out.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "bench.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    if any("error" in figures for figures in results.values()):
        raise typer.Exit(1)


def main() -> None:
    """Entry point: run the app and map the twin's errors to exit codes (usage errors exit 2 by click)."""
    try:
        app()
    except TwinError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
