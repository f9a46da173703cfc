"""Scores against the truth (validation.segmentation_scores) checked on shapes with known answers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantoms.phases import Phase
from validation.segmentation_scores import (
    lithiation_scores,
    mask_scores,
    particle_detection_rate,
    segmentation_scores,
)


def _ball(shape, center, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def test_shifted_box_has_the_analytic_dice_and_iou():
    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    predicted = np.roll(truth, 2, axis=2)  # overlap 10*10*8
    s = mask_scores(predicted, truth, voxel_size_um=0.5)
    assert s["dice_si"] == pytest.approx(2 * 800 / 2000)
    assert s["iou_si"] == pytest.approx(800 / 1200)


def test_concentric_balls_surface_distance_is_the_radius_difference():
    truth = _ball((48, 48, 48), (24, 24, 24), 15)
    predicted = _ball((48, 48, 48), (24, 24, 24), 12)
    s = mask_scores(predicted, truth, voxel_size_um=0.1)
    # boundaries 3 voxels apart: voxelization moves each sphere by < 1 voxel
    assert s["mean_surface_distance_um"] == pytest.approx(0.3, abs=0.1)
    assert s["boundary_f1"] < 0.05  # nothing within the 1-voxel tolerance
    near = mask_scores(_ball((48, 48, 48), (24, 24, 24), 15.4), truth, voxel_size_um=0.1)
    assert near["boundary_f1"] > 0.95


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_identical_masks_score_perfectly_and_complement_scores_zero(seed):
    mask = np.random.default_rng(seed).random((6, 10, 12)) > 0.6
    s = mask_scores(mask, mask, voxel_size_um=1.0)
    assert s == {"dice_si": 1.0, "iou_si": 1.0, "boundary_f1": 1.0, "mean_surface_distance_um": 0.0}
    assert mask_scores(~mask, mask, voxel_size_um=1.0)["dice_si"] == 0.0


def test_particle_detection_counts_half_covered_particles():
    particle = np.zeros((1, 10, 40), np.int32)
    for i in range(4):
        particle[0, 2:8, 10 * i + 2:10 * i + 8] = i + 1  # 36 voxels each
    truth = particle > 0
    predicted = np.zeros_like(truth)
    predicted[0, 2:8, 2:8] = True  # particle 1: all
    predicted[0, 2:5, 12:18] = True  # particle 2: exactly half
    predicted[0, 2:4, 22:28] = True  # particle 3: a third
    assert particle_detection_rate(predicted, truth, particle) == pytest.approx(2 / 4)


def test_names_follow_the_metrics_contract():
    phase = np.full((4, 8, 8), Phase.ELECTROLYTE, np.uint8)
    phase[1:3, 2:6, 2:6] = Phase.SI_LITHIATED
    phase[0] = Phase.COPPER
    particle = (phase == Phase.SI_LITHIATED).astype(np.int32)
    labels = (phase == Phase.SI_LITHIATED).astype(np.uint8)
    scores = segmentation_scores(labels, phase, particle, scan="T3", voxel_size_um=0.4, name_suffix="_otsu")
    assert scores["segmentation.dice_si_otsu.T3"] == 1.0
    assert set(scores) == {f"segmentation.{m}_otsu.T3" for m in
                           ("dice_si", "iou_si", "boundary_f1", "mean_surface_distance_um", "particle_detection_rate")}


@pytest.mark.parametrize("lithiated_share", [0.0, 0.25, 0.5])
def test_grey_level_ceiling_of_si_hidden_in_the_matrix(lithiated_share):
    """Si at δ = 2, matrix at 1, Cu at 5, and a share s of the Si at the matrix's δ: ceiling 2(1 − s)/(2 − s)."""
    from phantoms.phases import Phase
    from validation.segmentation_scores import grey_level_ceiling

    rng = np.random.default_rng(3)
    phase = np.full((40, 40, 40), Phase.ELECTROLYTE, np.uint8)
    phase[:4] = Phase.COPPER
    si = rng.random(phase.shape) < 0.4
    si[:4] = False
    phase[si] = Phase.SI_CRYSTALLINE
    hidden = si & (rng.random(phase.shape) < lithiated_share)
    phase[hidden] = Phase.SI_LITHIATED
    delta = np.select([phase == Phase.COPPER, phase == Phase.SI_CRYSTALLINE], [5.0, 2.0], 1.0)
    s = hidden.sum() / si.sum()
    assert grey_level_ceiling(delta, phase) == pytest.approx(2 * (1 - s) / (2 - s), abs=1e-12)


def test_lithiation_scores_of_a_front_placed_two_voxels_deep():
    # 20 Si voxel layers along x, the true lithiated shell the first 10; the segmentation puts the front at 8
    phase = np.full((4, 4, 30), Phase.ELECTROLYTE, np.uint8)
    phase[..., :20] = Phase.SI_CRYSTALLINE
    phase[..., :10] = Phase.SI_LITHIATED
    phase[..., 15:20] = Phase.SI_AMORPHOUS  # delithiated Si belongs with the crystalline
    labels = np.zeros(phase.shape, np.uint8)
    labels[..., :20] = 1
    labels[..., :8] = 2
    scores = lithiation_scores(labels, phase)
    assert scores["dice_lithiated_si"] == pytest.approx(2 * 8 / (8 + 10))
    assert scores["dice_si_without_lithium"] == pytest.approx(2 * 10 / (12 + 10))
    assert scores["lithiated_share_error"] == pytest.approx(abs(8 / 20 - 10 / 20))
    named = segmentation_scores(labels, phase, None, scan="T4", voxel_size_um=0.4, n_classes=3)
    assert named["segmentation.dice_si.T4"] == 1.0  # both Si classes count as Si
    assert named["segmentation.lithiated_share_error.T4"] == pytest.approx(0.1)
    assert "segmentation.dice_lithiated_si.T4" not in segmentation_scores(labels > 0, phase, None, scan="T4",
                                                                          voxel_size_um=0.4)
