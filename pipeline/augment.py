"""The seed's training-set augmentation with albumentations (Supplementary Note 4).

The seed (albumentations 1.4.18) applies to every annotated slice, three times,
the list::

    A.HorizontalFlip(p=0.5)
    A.RandomScale(p=0.5)
    A.ElasticTransform(alpha=30, sigma=50, p=0.3)
    A.Affine(shear=(-10, 10), p=0.3)
    A.Affine(rotate=(0, 20), p=0.3)

and keeps the original, so 12 slices give 12 x (1 + 3) = 48 images per model.

Mapping to albumentations 2.0 (installed), argument by argument, so the
transforms do what 1.4.18 did with the seed's arguments and 1.4.18's defaults:

* ``HorizontalFlip(p=0.5)``: unchanged.
* ``RandomScale(p=0.5)``: 1.4.18's default ``scale_limit=0.1`` is written out
  as 2.0's ``scale_limit=(-0.1, 0.1)``; linear interpolation for the image,
  nearest for the mask (both versions' defaults).
* ``ElasticTransform(alpha=30, sigma=50, p=0.3)``: 1.4.18 drew the displacement
  noise uniformly in [-1, 1] and reflected at the border
  (``BORDER_REFLECT_101``); 2.0 defaults to Gaussian noise and a constant
  border, so ``noise_distribution="uniform"`` and
  ``border_mode=cv2.BORDER_REFLECT_101`` are given explicitly. (1.4.18's
  deprecated ``alpha_affine`` was already ignored there.)
* ``Affine(shear=(-10, 10), p=0.3)`` and ``Affine(rotate=(0, 20), p=0.3)``:
  same meaning in both versions (degrees; a shear tuple draws the x- and
  y-shear independently), constant zero fill (1.4.18: ``mode=BORDER_CONSTANT,
  cval=0``; 2.0: ``border_mode=BORDER_CONSTANT, fill=0``), nearest for masks.

``RandomScale`` changes the image size and the seed does not say how its
images were brought back to the network's (256, 512) input. We reflect-pad
(``A.PadIfNeeded``) and centre-crop (``A.CenterCrop``) back to the slice's
size: this keeps the scale change (a resize back would undo it) and keeps
image and mask aligned.

Randomness: one ``A.Compose`` is seeded from the caller's numpy Generator
(albumentations 2 ``Compose(seed=...)``), so a given Generator state gives the
same images.
"""

from __future__ import annotations

import numpy as np

SEED_TRANSFORMS = (
    "HorizontalFlip(p=0.5)",
    "RandomScale(p=0.5)",
    "ElasticTransform(alpha=30, sigma=50, p=0.3)",
    "Affine(shear=(-10, 10), p=0.3)",
    "Affine(rotate=(0, 20), p=0.3)",
)


def seed_pipeline(height_px: int, width_px: int, *, seed: int):
    """The seed's augmentation list as an albumentations 2 ``Compose``, followed by pad/crop back to size.

    Parameters
    ----------
    height_px, width_px
        Size of the slices (and of the output), px.
    seed
        Seed of albumentations' own generator.

    Returns
    -------
    albumentations.Compose
    """
    import albumentations as A
    import cv2

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.RandomScale(scale_limit=(-0.1, 0.1), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=0.5),
            A.ElasticTransform(alpha=30, sigma=50, noise_distribution="uniform", border_mode=cv2.BORDER_REFLECT_101,
                               interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=0.3),
            A.Affine(shear=(-10, 10), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.3),
            A.Affine(rotate=(0, 20), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.3),
            # back to the input size (RandomScale changed it); not one of the seed's random transforms
            A.PadIfNeeded(min_height=height_px, min_width=width_px, border_mode=cv2.BORDER_REFLECT_101, p=1.0),
            A.CenterCrop(height=height_px, width=width_px, p=1.0),
        ],
        seed=seed,
    )


def augment_slices(
    images: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    augmentations_per_slice: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Each slice plus ``augmentations_per_slice`` random transforms of it (seed: 12 x (1 + 3) = 48).

    Parameters
    ----------
    images
        (n, height, width) float32 grey values.
    masks
        (n, height, width) labels (0 background, 1 Si), any integer or bool type.
    rng
        The caller's generator; it seeds albumentations.
    augmentations_per_slice
        Random draws of the seed's list per slice (seed: 3).

    Returns
    -------
    images, masks
        (n * (1 + augmentations_per_slice), height, width): float32 and uint8;
        slice i's originals come first, then its augmentations, in slice order.
    """
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim != 3 or images.shape != masks.shape:
        raise ValueError(f"images and masks: need equal (n, height, width) shapes, got {images.shape} and {masks.shape}")
    if augmentations_per_slice < 0:
        raise ValueError(f"augmentations_per_slice: must be >= 0, got {augmentations_per_slice}")
    n, h, w = images.shape
    pipeline = seed_pipeline(h, w, seed=int(rng.integers(2**31 - 1)))
    out_images, out_masks = [], []
    for image, mask in zip(images.astype(np.float32), masks.astype(np.uint8)):
        out_images.append(image)
        out_masks.append(mask)
        for _ in range(augmentations_per_slice):
            result = pipeline(image=image, mask=mask)
            out_images.append(np.asarray(result["image"], dtype=np.float32).reshape(h, w))
            out_masks.append(np.asarray(result["mask"], dtype=np.uint8).reshape(h, w))
    return np.stack(out_images), np.stack(out_masks)
