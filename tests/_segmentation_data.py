"""Synthetic images for the segmentation tests: bright disks (the 'Si') on a dark background with noise."""

from __future__ import annotations

import numpy as np


def disk_slices(n: int, height_px: int, width_px: int, rng: np.random.Generator, *, n_disks: int = 6,
                radius_px=(5.0, 12.0), noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (grey 0.2 background, 0.8 disks, Gaussian noise of rms ``noise``) and their disk masks."""
    yy, xx = np.mgrid[:height_px, :width_px]
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((height_px, width_px), bool)
        for _ in range(n_disks):
            cy, cx, r = rng.uniform(0, height_px), rng.uniform(0, width_px), rng.uniform(*radius_px)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        images.append(0.2 + 0.6 * mask + rng.normal(0.0, noise, mask.shape))
        masks.append(mask)
    return np.asarray(images, np.float32), np.asarray(masks, np.uint8)


def core_shell_slices(n: int, height_px: int, width_px: int, rng: np.random.Generator, *, n_disks: int = 5,
                      radius_px=(8.0, 14.0), core_fraction: float = 0.55,
                      noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Disks with a bright core (label 1, grey 0.8) inside a darker shell (label 2, grey 0.5) on 0.2 background:
    the three classes of a three-class segmentation; images with Gaussian noise of rms ``noise``."""
    yy, xx = np.mgrid[:height_px, :width_px]
    images, labels = [], []
    for _ in range(n):
        lab = np.zeros((height_px, width_px), np.uint8)
        for _ in range(n_disks):
            cy, cx, r = rng.uniform(0, height_px), rng.uniform(0, width_px), rng.uniform(*radius_px)
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            lab[(d2 < r**2) & (lab == 0)] = 2
            lab[d2 < (core_fraction * r) ** 2] = 1
        images.append(np.choose(lab, [0.2, 0.8, 0.5]) + rng.normal(0.0, noise, lab.shape))
        labels.append(lab)
    return np.asarray(images, np.float32), np.asarray(labels, np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient written out independently of validation.segmentation_scores."""
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))
