"""Baseline segmentations with the U-Net's interface, to show what the U-Net buys.

* :class:`OtsuSegmenter` – one global Otsu threshold of the volume's grey values
  (Otsu 1979, ``skimage.filters.threshold_otsu``); the annotated slices only
  decide which side of the threshold is Si. For three classes, the two
  thresholds of multi-level Otsu (``skimage.filters.threshold_multiotsu``),
  its three grey-level bands given to the annotated classes in the order of
  their mean grey values.
* :class:`RandomForestSegmenter` – a pixel classifier on multi-scale filter
  features, in the manner of ilastik's pixel classification (Berg et al. 2019):
  Gaussian-smoothed intensity, gradient magnitude and Hessian eigenvalues at
  scales 0.7-10 px (``skimage.feature.multiscale_basic_features``), a scikit-learn
  random forest trained through ``skimage.future.fit_segmenter``.

Both: ``fit(images, masks, rng)`` then ``segment(volume) -> uint8 labels``
(0 background, 1 Si; with three classes 2 lithiated Si, as
:func:`pipeline.segmentation.labels_from_phase`).

References
----------
Otsu N., IEEE Trans. SMC 9, 62 (1979), doi:10.1109/TSMC.1979.4310076.
Berg S. et al., "ilastik: interactive machine learning for (bio)image analysis",
Nat. Methods 16, 1226 (2019), doi:10.1038/s41592-019-0582-9.
"""

from __future__ import annotations

import numpy as np


def _check(images, masks, n_classes: int):
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks)
    if images.ndim != 3 or images.shape != masks.shape:
        raise ValueError(f"images and masks: need equal (n, height, width) shapes, got {images.shape} and {masks.shape}")
    present = np.unique(masks).tolist()
    if not set(present) <= set(range(n_classes)) or 0 not in present or len(present) < 2:
        raise ValueError(f"masks: the annotations need background (0) and Si (1..{n_classes - 1}) pixels and no other "
                         f"values, found {present}")
    return images, masks.astype(np.uint8), present


def _as_volume(volume) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    return volume[None] if volume.ndim == 2 else volume


class OtsuSegmenter:
    """Global (multi-level) Otsu thresholds; the annotated classes take the grey-level bands in the order of their means."""

    def __init__(self, *, n_classes: int = 2):
        self.n_classes = n_classes
        self.class_of_band = np.arange(n_classes, dtype=np.uint8)

    def fit(self, images, masks, rng: np.random.Generator | None = None) -> OtsuSegmenter:
        """Learn which grey-level band is which class: the annotated classes ordered by their mean grey value
        (one band per class present in the annotations)."""
        images, masks, present = _check(images, masks, self.n_classes)
        means = [images[masks == k].mean() for k in present]
        self.class_of_band = np.asarray(present, np.uint8)[np.argsort(means, kind="stable")]
        return self

    def segment(self, volume) -> np.ndarray:
        """(z, y, x) uint8 labels from the Otsu threshold(s) of the whole volume."""
        from skimage.filters import threshold_multiotsu, threshold_otsu

        volume = _as_volume(volume)
        bands = len(self.class_of_band)
        thresholds = [threshold_otsu(volume)] if bands == 2 else threshold_multiotsu(volume, bands)
        band = np.digitize(volume, thresholds, right=True)  # band 0: <= the first threshold
        return self.class_of_band[band]


PREDICT_BATCH_PIXELS = 1 << 20


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
    n_classes
        2 (Si, background) or 3 (also lithiated Si).
    """

    def __init__(self, *, n_estimators: int = 50, max_pixels_per_class: int = 20000,
                 sigma_min_px: float = 0.7, sigma_max_px: float = 10.0, slice_planes=("yx",), n_classes: int = 2):
        self.n_estimators = n_estimators
        self.max_pixels_per_class = max_pixels_per_class
        self.sigma_min_px, self.sigma_max_px = sigma_min_px, sigma_max_px
        self.slice_planes = tuple(slice_planes)
        self.n_classes = n_classes
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

        images, masks, present = _check(images, masks, self.n_classes)
        feats = np.concatenate([self.features(im).reshape(im.size, -1) for im in images])
        truth = masks.reshape(-1)
        picked = []
        for cls in present:
            idx = np.flatnonzero(truth == cls)
            picked.append(rng.choice(idx, size=min(len(idx), self.max_pixels_per_class), replace=False))
        picked = np.concatenate(picked)
        # fit_segmenter takes a label image with 0 = unlabelled: class k is label k + 1
        labels = np.zeros(len(truth), np.uint8)
        labels[picked] = truth[picked] + 1
        clf = RandomForestClassifier(n_estimators=self.n_estimators, n_jobs=1,
                                     random_state=int(rng.integers(2**31 - 1)))
        self.classifier = fit_segmenter(labels, feats, clf)
        return self

    def _class_probabilities(self, images: np.ndarray) -> np.ndarray:
        """(n, height, width, n_classes) probabilities of a stack of 2D slices, predicted in one call."""
        features = np.stack([self.features(im) for im in images])
        proba = self.classifier.predict_proba(features.reshape(-1, features.shape[-1]))
        out = np.zeros((proba.shape[0], self.n_classes), np.float32)  # a class never annotated keeps probability 0
        out[:, np.asarray(self.classifier.classes_) - 1] = proba
        return out.reshape(*images.shape, self.n_classes)

    def class_probabilities(self, volume) -> np.ndarray:
        """Each class's probability, (z, y, x, n_classes) float32, averaged over the slices of each of ``slice_planes``.

        Slices are classified in batches of about ``PREDICT_BATCH_PIXELS`` pixels (one forest call per batch,
        the trees spread over the CPUs by scikit-learn's threads: the per-call overhead of a forest dominates
        on small slices).
        """
        from pipeline.segmentation import as_plane_stack, from_plane_stack

        if self.classifier is None:
            raise ValueError("RandomForestSegmenter: call fit() first")
        planes = self.slice_planes if np.ndim(volume) == 3 else ("yx",)
        volume = _as_volume(volume)
        total = np.zeros((*volume.shape, self.n_classes), np.float32)
        self.classifier.n_jobs = -1  # prediction only: the fitted forest is the same whatever the thread count
        for plane in planes:
            stack = as_plane_stack(volume, plane)
            step = max(1, PREDICT_BATCH_PIXELS // (stack.shape[1] * stack.shape[2]))
            per_slice = np.concatenate([self._class_probabilities(stack[i:i + step]) for i in range(0, len(stack), step)])
            total += from_plane_stack(per_slice, plane)
        return total / len(planes)

    def probability(self, volume) -> np.ndarray:
        """P(Si) of every voxel, (z, y, x) float32 (1 - P(background))."""
        return 1.0 - self.class_probabilities(volume)[..., 0]

    def segment(self, volume) -> np.ndarray:
        """(z, y, x) uint8 labels by :func:`pipeline.segmentation.labels_from_class_probabilities` at P(Si) > 0.5."""
        from pipeline.segmentation import labels_from_class_probabilities

        return labels_from_class_probabilities(self.class_probabilities(volume), 0.5)


def make_baseline(method: str, *, n_estimators: int = 50, slice_planes=("yx",), n_classes: int = 2):
    """A baseline segmenter by name: ``"otsu"`` or ``"random_forest"`` (classifying slices of ``slice_planes``)."""
    if method == "otsu":
        return OtsuSegmenter(n_classes=n_classes)
    if method == "random_forest":
        return RandomForestSegmenter(n_estimators=n_estimators, slice_planes=slice_planes, n_classes=n_classes)
    raise ValueError(f"Unknown baseline segmentation method: {method!r}. Available are: ['otsu', 'random_forest']")
