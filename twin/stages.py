"""The twin's DAG: which stage reads which scenario fields and needs which inputs.

Stage implementations live with their physics (``twin.rehearse``,
``phantoms.truth``, ``twin.instrument``, ``pipeline``, ``validation``); this
module only declares how they connect. Per-scan stages take their items
(``T0``, ``T1``, ...) from the rehearsal's ``schedule.csv``.

Implementations are imported when a stage runs, not when the DAG is built, so
``twin check`` and key computation never pay for TensorFlow or PyBaMM imports.
"""

from __future__ import annotations

import csv
import importlib

from twin.runner import Runner, Stage, StageContext


class Lazy:
    """A stage's compute function named as ``"module:function"``, imported on first call (picklable for Dask)."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, ctx: StageContext) -> None:
        module, _, name = self.target.partition(":")
        getattr(importlib.import_module(module), name)(ctx)

    def __repr__(self) -> str:
        return f"Lazy({self.target!r})"


def scans(runner: Runner) -> list[str]:
    """Scan names in acquisition order, from the rehearsal's schedule (scans of the first cell)."""
    path = runner.output("rehearsal") / "schedule.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    first_cell = rows[0].get("cell_id") if rows else None
    return [row["name"] for row in rows if row.get("cell_id") == first_cell]


def _previous(item: str | None, runner: Runner) -> str:
    names = scans(runner)
    return names[names.index(item) - 1]


def _training_scans(runner: Runner) -> list[str]:
    """Scans whose slices train the two models (seed: model 1 on T0–T2, model 2 on T3 onwards)."""
    names = scans(runner)
    split = runner.scenario.segmentation.second_model_from_scan
    return names[:split][:1] + names[split:][:1]


def _per_scan(stage: str, runner: Runner, skip_first: bool = False) -> list[tuple[str, str]]:
    names = scans(runner)
    return [(stage, s) for s in (names[1:] if skip_first else names)]


def twin_stages() -> list[Stage]:
    """Every stage of ``twin run``, in data-flow order."""
    geometry = ("sample.voxel_size_um", "sample.current_collector_thickness_um")
    return [
        Stage("rehearsal", 1, ("cell", "protocol", "sample.electrode_thickness_um", "sample.particle_median_diameter_um",
                               "sample.particle_diameter_log_sigma"), Lazy("twin.rehearse:compute_rehearsal")),
        Stage("microstructure", 2, ("sample", "beamline.energy_kev"), Lazy("phantoms.truth:compute_microstructure")),
        Stage("truth", 2, ("sample", "beamline.energy_kev"), Lazy("phantoms.truth:compute_truth"),
              needs=lambda item, r: [("microstructure", None), ("rehearsal", None)], items=scans),
        Stage("holograms", 4, ("beamline", "sample.voxel_size_um", "oracle.noise_free_holograms"),
              Lazy("twin.instrument:compute_holograms"), needs=lambda item, r: [("truth", item)], items=scans),
        Stage("reconstruction", 2, ("reconstruction", "beamline", "sample.voxel_size_um", "oracle.true_delta"),
              Lazy("pipeline.reconstruction:compute_reconstruction"),
              needs=lambda item, r: [("truth" if r.scenario.oracle.true_delta else "holograms", item)], items=scans),
        Stage("segmentation_training", 2, ("segmentation",), Lazy("pipeline.segmentation:compute_segmentation_training"),
              needs=lambda item, r: [n for s in _training_scans(r) for n in (("truth", s), ("reconstruction", s))]),
        Stage("segmentation", 4, ("segmentation", "oracle.true_labels"), Lazy("pipeline.segmentation:compute_segmentation"),
              needs=lambda item, r: [("truth", item)] if r.scenario.oracle.true_labels
              else [("reconstruction", item), ("segmentation_training", None)], items=scans),
        Stage("dic", 1, ("dic", "sample.voxel_size_um"), Lazy("pipeline.dic:compute_dic"),
              needs=lambda item, r: [("reconstruction", _previous(item, r)), ("reconstruction", item)],
              items=lambda r: scans(r)[1:]),
        Stage("dic_composition", 1, ("dic", "sample.voxel_size_um"), Lazy("pipeline.dic:compute_dic_composition"),
              needs=lambda item, r: _per_scan("dic", r, skip_first=True) + _per_scan("reconstruction", r)),
        Stage("particle_labels", 1, ("validation.particle_watershed_level",),
              Lazy("pipeline.tracking:compute_particle_labels"), needs=lambda item, r: [("segmentation", item)], items=scans),
        Stage("tracking", 3, (*geometry, "validation.voi_size_um"), Lazy("pipeline.tracking:compute_tracking"),
              needs=lambda item, r: _per_scan("particle_labels", r) + [("dic_composition", None)]),
        Stage("image_scores", 1, ("beamline", "sample.voxel_size_um"), Lazy("validation.metrics:compute_image_scores"),
              needs=lambda item, r: [("rehearsal", None)] + _per_scan("truth", r) + _per_scan("reconstruction", r)
              + _per_scan("segmentation", r) + _per_scan("particle_labels", r)),
        # validation also names the image stages' nodes, whose runtimes it reports (runtime_s.<stage>)
        Stage("validation", 3, ("validation.voi_size_um", "sample.voxel_size_um"), Lazy("validation.metrics:compute_validation"),
              needs=lambda item, r: [("rehearsal", None), ("image_scores", None), ("dic_composition", None), ("tracking", None)]
              + _per_scan("truth", r) + _per_scan("reconstruction", r) + _per_scan("segmentation", r)
              + _per_scan("particle_labels", r) + _per_scan("dic", r, skip_first=True)),
    ]
