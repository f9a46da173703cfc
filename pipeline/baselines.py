"""Baseline segmentations with the U-Net's interface, to show what the U-Net buys.

* :class:`OtsuSegmenter` – one global Otsu threshold of the volume's grey values
  (Otsu 1979, ``skimage.filters.threshold_otsu``); the annotated slices only
  decide which side of the threshold is Si.
* :class:`RandomForestSegmenter` – a pixel classifier on multi-scale filter
  features, in the manner of ilastik's pixel classification (Berg et al. 2019):
  Gaussian-smoothed intensity, gradient magnitude and Hessian eigenvalues at
  scales 0.7-10 px (``skimage.feature.multiscale_basic_features``), a scikit-learn
  random forest trained through ``skimage.future.fit_segmenter``.

Both: ``fit(images, masks, rng)`` then ``segment(volume) -> uint8 labels``
slice by slice along z (0 background, 1 Si).

References
----------
Otsu N., IEEE Trans. SMC 9, 62 (1979), doi:10.1109/TSMC.1979.4310076.
Berg S. et al., "ilastik: interactive machine learning for (bio)image analysis",
Nat. Methods 16, 1226 (2019), doi:10.1038/s41592-019-0582-9.
"""

from __future__ import annotations

import numpy as np


def _check(images, masks):
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks)
    if images.ndim != 3 or images.shape != masks.shape:
        raise ValueError(f"images and masks: need equal (n, height, width) shapes, got {images.shape} and {masks.shape}")
    if not (masks.astype(bool).any() and (~masks.astype(bool)).any()):
        raise ValueError("masks: the annotations need both Si (1) and background (0) pixels")
    return images, masks.astype(bool)


def _as_volume(volume) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    return volume[None] if volume.ndim == 2 else volume


class OtsuSegmenter:
    """Global Otsu threshold; Si is the side of the threshold where the annotated Si lies."""

    def __init__(self):
        self.si_is_bright = True

    def fit(self, images, masks, rng: np.random.Generator | None = None) -> OtsuSegmenter:
        """Learn the polarity: is annotated Si brighter than the annotated background?"""
        images, masks = _check(images, masks)
        self.si_is_bright = bool(images[masks].mean() >= images[~masks].mean())
        return self

    def segment(self, volume) -> np.ndarray:
        """(z, y, x) uint8 labels from one Otsu threshold of the whole volume."""
        from skimage.filters import threshold_otsu

        volume = _as_volume(volume)
        t = threshold_otsu(volume)
        return ((volume > t) if self.si_is_bright else (volume <= t)).astype(np.uint8)


class RandomForestSegmenter:
    """ilastik-like pixel classification: multi-scale filter features + random forest.

    Parameters
    ----------
    n_estimators
        Trees in the forest.
    max_pixels_per_class
        Training pixels drawn per class (balanced), to keep training time
        bounded on large annotated sets; ilastik trains on sparse scribbles too.
    sigma_min_px, sigma_max_px
        Range of the feature scales, px (ilastik's defaults span 0.7-10).
    slice_planes
        Planes whose slices a volume is classified in ("yx", "zx", "zy"), the
        probabilities averaged over the planes, as the U-Net does: the forest
        should see slices of the planes it was trained on.
    """

    def __init__(self, *, n_estimators: int = 50, max_pixels_per_class: int = 20000,
                 sigma_min_px: float = 0.7, sigma_max_px: float = 10.0, slice_planes=("yx",)):
        self.n_estimators = n_estimators
        self.max_pixels_per_class = max_pixels_per_class
        self.sigma_min_px, self.sigma_max_px = sigma_min_px, sigma_max_px
        self.slice_planes = tuple(slice_planes)
        self.classifier = None

    def features(self, image: np.ndarray) -> np.ndarray:
        """(height, width, n_features) filter responses of one 2D slice."""
        from skimage.feature import multiscale_basic_features

        return multiscale_basic_features(image, intensity=True, edges=True, texture=True,
                                         sigma_min=self.sigma_min_px, sigma_max=self.sigma_max_px)

    def fit(self, images, masks, rng: np.random.Generator) -> RandomForestSegmenter:
        """Train the forest on a balanced random subset of the annotated pixels."""
        from sklearn.ensemble import RandomForestClassifier
        from skimage.future import fit_segmenter

        images, masks = _check(images, masks)
        feats = np.concatenate([self.features(im).reshape(im.size, -1) for im in images])
        truth = masks.reshape(-1)
        picked = []
        for cls in (False, True):
            idx = np.flatnonzero(truth == cls)
            picked.append(rng.choice(idx, size=min(len(idx), self.max_pixels_per_class), replace=False))
        picked = np.concatenate(picked)
        # fit_segmenter takes a label image with 0 = unlabelled: labels 1 background, 2 Si
        labels = np.zeros(len(truth), np.uint8)
        labels[picked] = truth[picked] + 1
        clf = RandomForestClassifier(n_estimators=self.n_estimators, n_jobs=1,
                                     random_state=int(rng.integers(2**31 - 1)))
        self.classifier = fit_segmenter(labels, feats, clf)
        return self

    def _probability_of_slice(self, image: np.ndarray) -> np.ndarray:
        features = self.features(image)
        proba = self.classifier.predict_proba(features.reshape(-1, features.shape[-1]))
        return proba[:, list(self.classifier.classes_).index(2)].reshape(image.shape)  # label 2 = Si

    def probability(self, volume) -> np.ndarray:
        """P(Si) of every voxel, (z, y, x) float32, averaged over the slices of each of ``slice_planes``."""
        from pipeline.segmentation import as_plane_stack, from_plane_stack

        if self.classifier is None:
            raise ValueError("RandomForestSegmenter: call fit() first")
        planes = self.slice_planes if np.ndim(volume) == 3 else ("yx",)
        volume = _as_volume(volume)
        total = np.zeros(volume.shape, np.float32)
        for plane in planes:
            stack = as_plane_stack(volume, plane)
            total += from_plane_stack(np.stack([self._probability_of_slice(s) for s in stack]), plane)
        return total / len(planes)

    def segment(self, volume) -> np.ndarray:
        """(z, y, x) uint8 labels: 1 where the plane-averaged P(Si) > 0.5."""
        return (self.probability(volume) > 0.5).astype(np.uint8)


def make_baseline(method: str, *, n_estimators: int = 50, slice_planes=("yx",)):
    """A baseline segmenter by name: ``"otsu"`` or ``"random_forest"`` (classifying slices of ``slice_planes``)."""
    if method == "otsu":
        return OtsuSegmenter()
    if method == "random_forest":
        return RandomForestSegmenter(n_estimators=n_estimators, slice_planes=slice_planes)
    raise ValueError(f"Unknown baseline segmentation method: {method!r}. Available are: ['otsu', 'random_forest']")
