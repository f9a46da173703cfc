"""The twin's DAG: which stage reads which scenario fields and needs which inputs.

Stage implementations live with their physics (``twin.electrochem``,
``phantoms``, ``twin.instrument``, ``pipeline``, ``validation``); this module
only declares how they connect. Per-scan stages take their items (``T0``,
``T1``, ...) from the rehearsal's ``schedule.csv``.
"""

from __future__ import annotations

import csv

from twin.runner import Runner, Stage, not_built


def scans(runner: Runner) -> list[str]:
    """Scan names in acquisition order, from the rehearsal's schedule."""
    path = runner.output("rehearsal") / "schedule.csv"
    with open(path, newline="") as fh:
        return [row["name"] for row in csv.DictReader(fh)]


def _previous(item: str | None, runner: Runner) -> str | None:
    names = scans(runner)
    i = names.index(item)
    return names[i - 1] if i > 0 else None


def _training_scans(runner: Runner) -> list[str]:
    """The scans whose slices train the two models: the seed annotates each model's own time range."""
    names = scans(runner)
    split = runner.scenario.segmentation.second_model_from_scan
    first, second = names[:split], names[split:]
    return [s for s in (first[:1] + second[:1]) if s]


def twin_stages() -> list[Stage]:
    """Every stage of ``twin run``, in data-flow order."""
    return [
        Stage("rehearsal", 1, ("cell", "protocol"), not_built("rehearsal", 4)),
        Stage("microstructure", 1, ("sample", "beamline.energy_kev"), not_built("microstructure", 3)),
        Stage("truth", 1, ("sample", "beamline.energy_kev"), not_built("truth", 3),
              needs=lambda item, r: [("microstructure", None), ("rehearsal", None)], items=scans),
        Stage("holograms", 1, ("beamline", "sample.voxel_size_um"), not_built("holograms", 5),
              needs=lambda item, r: [("truth", item)], items=scans),
        Stage("reconstruction", 1, ("reconstruction", "beamline", "sample.voxel_size_um"), not_built("reconstruction", 5),
              needs=lambda item, r: [("holograms", item)], items=scans),
        Stage("segmentation_training", 1, ("segmentation",), not_built("segmentation_training", 6),
              needs=lambda item, r: [n for s in _training_scans(r) for n in (("truth", s), ("reconstruction", s))]),
        Stage("segmentation", 1, ("segmentation",), not_built("segmentation", 6),
              needs=lambda item, r: [("reconstruction", item), ("segmentation_training", None)], items=scans),
        Stage("dic", 1, ("dic",), not_built("dic", 7),
              needs=lambda item, r: [("reconstruction", _previous(item, r)), ("reconstruction", item)],
              items=lambda r: scans(r)[1:]),
        Stage("validation", 1, ("validation",), not_built("validation", 8),
              needs=lambda item, r: [("rehearsal", None)]
              + [(stage, s) for s in scans(r) for stage in ("truth", "reconstruction", "segmentation")]
              + [("dic", s) for s in scans(r)[1:]]),
    ]
