"""Scores of a Si segmentation against the phantom's truth (issue 6), as flat ``metrics.json`` entries.

For a predicted Si mask P and the true Si mask T (``phantoms.phases.si_mask``):

* Dice :math:`D = 2|P \\cap T| / (|P| + |T|)` and IoU (Jaccard)
  :math:`J = |P \\cap T| / |P \\cup T|` (both 1 when both masks are empty);
* boundary F1 (Csurka et al. 2013): boundary voxels of P within ``tolerance``
  voxels of T's boundary give the precision, and vice versa the recall;
  :math:`F_1 = 2 p r / (p + r)`;
* mean (symmetric) surface distance: the mean over the boundary voxels of
  both masks of the Euclidean distance to the other mask's boundary, µm;
* per-particle detection rate: the fraction of true particles (``particle``
  ids > 0) with at least half of their Si voxels labelled Si;
* for a three-class segmentation (``labels.nc`` attribute ``n_classes = 3``,
  labels of :func:`pipeline.segmentation.labels_from_phase`): the Dice of
  each Si class, ``dice_lithiated_si`` (label 2 against ``Phase.SI_LITHIATED``)
  and ``dice_si_without_lithium`` (label 1 against crystalline and
  delithiated amorphous Si), and ``lithiated_share_error``: the absolute
  difference between the labelled and the true share of the Si volume that
  is lithiated, the quantity a reaction-front or state-of-charge analysis
  reads off the images;
* the grey-level ceiling ``segmentation.dice_si_grey_ceiling.<scan>``: the
  best Dice a global threshold on the *true* δ reaches (Cu voxels left out,
  as every segmenter learns to; 4096 thresholds over δ's range):
  :math:`\\max_t D(\\{δ > t\\}, T)`. Lithiated Si (LixSi at x ≈ 2 has the δ of
  the carbon–binder domain and the electrolyte at 29.6 keV) cannot be told
  from the matrix by its grey value alone, however perfect the image; only
  context (a particle's outline around its shell) can take a segmenter past
  this bound.

Names: ``segmentation.<metric>.<scan>`` for the main labels and
``segmentation.<metric>_<baseline>.<scan>`` for a baseline's labels
(``segmentation.dice_si_otsu.T3``).

References
----------
Dice L. R., Ecology 26, 297 (1945), doi:10.2307/1932409.
Csurka G., Larlus D., Perronnin F., "What is a good evaluation measure for
semantic segmentation?", BMVC 2013, doi:10.5244/C.27.32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("dice_si", "iou_si", "boundary_f1", "mean_surface_distance_um", "particle_detection_rate")
#: Added for three-class segmentations.
LITHIATION_METRICS = ("dice_lithiated_si", "dice_si_without_lithium", "lithiated_share_error")


def _boundary(mask: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(mask, mode="inner")


def _distance_to(boundary: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if not boundary.any():
        return np.full(boundary.shape, np.inf)
    return ndimage.distance_transform_edt(~boundary)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    p, t = np.asarray(predicted).astype(bool), np.asarray(truth).astype(bool)
    total = np.count_nonzero(p) + np.count_nonzero(t)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(p & t) / total


def lithiation_scores(labels: np.ndarray, phase: np.ndarray) -> dict[str, float]:
    """Per-class Dice of a three-class label volume and the error of its lithiated share of the Si volume."""
    from phantoms.phases import Phase, si_mask
    from pipeline.segmentation import LABEL_LITHIATED_SI, LABEL_SI, si_from_labels

    labels, phase = np.asarray(labels), np.asarray(phase)
    true_lithiated = phase == Phase.SI_LITHIATED
    true_si = si_mask(phase)
    predicted_si = np.count_nonzero(si_from_labels(labels))
    share = np.count_nonzero(labels == LABEL_LITHIATED_SI) / predicted_si if predicted_si else float("nan")
    true_share = np.count_nonzero(true_lithiated) / np.count_nonzero(true_si) if true_si.any() else float("nan")
    return {
        "dice_lithiated_si": dice(labels == LABEL_LITHIATED_SI, true_lithiated),
        "dice_si_without_lithium": dice(labels == LABEL_SI, true_si & ~true_lithiated),
        "lithiated_share_error": float(abs(share - true_share)),
    }


def mask_scores(predicted: np.ndarray, truth: np.ndarray, *, voxel_size_um: float,
                boundary_tolerance_px: float = 1.0) -> dict[str, float]:
    """Dice, IoU, boundary F1 and mean surface distance (µm) of two boolean masks of equal shape."""
    p = np.asarray(predicted).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"predicted and truth: shapes differ, {p.shape} vs {t.shape}")
    inter, sp, st = np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)
    union = sp + st - inter
    iou = 1.0 if union == 0 else inter / union
    bp, bt = _boundary(p), _boundary(t)
    if not bp.any() and not bt.any():
        f1, msd = 1.0, 0.0
    elif not bp.any() or not bt.any():
        f1, msd = 0.0, float("inf")
    else:
        dist_to_t, dist_to_p = _distance_to(bt), _distance_to(bp)
        precision = float(np.mean(dist_to_t[bp] <= boundary_tolerance_px))
        recall = float(np.mean(dist_to_p[bt] <= boundary_tolerance_px))
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        msd = float(np.concatenate([dist_to_t[bp], dist_to_p[bt]]).mean()) * voxel_size_um
    return {"dice_si": dice(p, t), "iou_si": float(iou), "boundary_f1": float(f1), "mean_surface_distance_um": msd}


def particle_detection_rate(predicted: np.ndarray, truth: np.ndarray, particle: np.ndarray,
                            *, min_fraction: float = 0.5) -> float:
    """Fraction of true particles with at least ``min_fraction`` of their Si voxels labelled Si (nan if none)."""
    p = np.asarray(predicted).astype(bool)
    ids = np.where(np.asarray(truth).astype(bool), np.asarray(particle), 0).ravel()
    total = np.bincount(ids)
    hit = np.bincount(ids, weights=p.ravel(), minlength=len(total))
    present = np.flatnonzero(total[1:]) + 1
    if len(present) == 0:
        return float("nan")
    return float(np.mean(hit[present] >= min_fraction * total[present]))


def segmentation_scores(labels: np.ndarray, phase: np.ndarray, particle: np.ndarray | None, *, scan: str,
                        voxel_size_um: float, name_suffix: str = "", n_classes: int = 2) -> dict[str, float]:
    """All scores of one label volume against the truth, named ``segmentation.<metric><suffix>.<scan>``.

    Parameters
    ----------
    labels
        (z, y, x) predicted labels: 1 = Si (2 = lithiated Si with three classes).
    phase
        (z, y, x) the phantom's ``phase`` (``phantoms.phases.Phase``).
    particle
        (z, y, x) the phantom's particle ids, or ``None`` to skip the detection rate.
    scan
        Scan name for the metric names (``"T3"``).
    voxel_size_um
        Voxel edge, µm.
    name_suffix
        Appended to each metric name (``"_otsu"``).
    n_classes
        2, or 3 to add :data:`LITHIATION_METRICS`.
    """
    from phantoms.phases import si_mask
    from pipeline.segmentation import si_from_labels

    truth = si_mask(np.asarray(phase))
    predicted = si_from_labels(labels)
    scores = mask_scores(predicted, truth, voxel_size_um=voxel_size_um)
    if particle is not None:
        scores["particle_detection_rate"] = particle_detection_rate(predicted, truth, particle)
    if n_classes == 3:
        scores.update(lithiation_scores(labels, phase))
    return {f"segmentation.{k}{name_suffix}.{scan}": v for k, v in scores.items()}


def grey_level_ceiling(delta: np.ndarray, phase: np.ndarray, *, n_thresholds: int = 4096) -> float:
    """Best Dice of {δ > t} against the true Si, Cu excluded, over ``n_thresholds`` t evenly spread over δ's range.

    One pass: histograms of δ inside and outside the true Si, accumulated from
    the top, give the Dice of every threshold at once (memory of the histograms only).
    """
    from phantoms.phases import Phase, si_mask

    keep = np.asarray(phase) != Phase.COPPER
    truth, values = si_mask(np.asarray(phase))[keep], np.asarray(delta)[keep]
    if not truth.any():
        return float("nan")
    edges = np.linspace(values.min(), values.max(), n_thresholds + 1)
    si_above = np.cumsum(np.histogram(values[truth], edges)[0][::-1])  # Si voxels above each edge, from the top
    all_above = np.cumsum(np.histogram(values, edges)[0][::-1])
    return float(np.max(2 * si_above / (all_above + truth.sum())))


def score_files(labels_nc: str | Path, phantom_nc: str | Path, *, scan: str) -> dict[str, float]:
    """Scores of ``labels.nc`` (``labels`` and every ``labels_<baseline>``) against ``phantom.nc``."""
    import xarray as xr

    from twin.errors import InputFileError
    from twin.io import NETCDF_ENGINE

    try:
        with xr.open_dataset(phantom_nc, engine=NETCDF_ENGINE) as truth:
            phase = truth["phase"].values
            delta = truth["delta"].values if "delta" in truth else None
            particle = truth["particle"].values if "particle" in truth else None
            voxel_size_um = float(truth.attrs["voxel_size_um"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(phantom_nc, f"cannot read phase/voxel_size_um ({type(exc).__name__}: {exc})") from None
    scores: dict[str, float] = {}
    if delta is not None:
        scores[f"segmentation.dice_si_grey_ceiling.{scan}"] = grey_level_ceiling(delta, phase)
    try:
        with xr.open_dataset(labels_nc, engine=NETCDF_ENGINE) as ds:
            variables = {name: ds[name].values for name in ds.data_vars if name.startswith("labels")}
            n_classes = int(ds.attrs.get("n_classes", 2))
    except (OSError, ValueError) as exc:
        raise InputFileError(labels_nc, f"cannot read labels ({type(exc).__name__}: {exc})") from None
    if "labels" not in variables:
        raise InputFileError(labels_nc, "no variable 'labels'")
    for name, labels in variables.items():
        if labels.shape != phase.shape:
            raise InputFileError(labels_nc, f"{name} has shape {labels.shape}, the truth {phase.shape}")
        suffix = name[len("labels"):]
        scores.update(segmentation_scores(labels, phase, particle, scan=scan, voxel_size_um=voxel_size_um,
                                          name_suffix=suffix, n_classes=n_classes))
    return scores
