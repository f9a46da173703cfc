"""Si / background segmentation with the seed's attention residual U-Net (Supplementary Note 4).

Public interface (the baselines in :mod:`pipeline.baselines` share it):

* :class:`UNetSegmenter` – ``fit(images, masks, rng)`` trains on annotated 2D
  slices (augmented with the seed's list, :mod:`pipeline.augment`);
  ``probability(volume)`` runs tiled, blended, batched inference over a volume
  of any size, slice by slice in each of ``slice_planes`` (seed: the
  reconstruction's own (y, x) slices; the scaled scenarios use vertical
  (z, x) and (z, y) slices and average them); ``segment(volume)`` thresholds it into uint8 labels (0 background,
  1 Si; a three-class model also labels lithiated Si 2, see :func:`labels_from_phase`); ``save(path)`` / :meth:`UNetSegmenter.load` round-trip a ``.keras``
  file, loaded with ``safe_mode=True``.
* :func:`training_slices` picks the annotated slices the seed's way (tile-sized
  crops of slices; :func:`as_plane_stack` turns a volume into the slices of a plane) and :func:`degrade_annotation` mimics hand annotation.
* Stage functions :func:`compute_segmentation_training` (once) and
  :func:`compute_segmentation` (per scan).

TensorFlow uses the GPU when one is visible and logs which device it used
(:func:`tensorflow_device`); everything also runs on CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np

from twin.errors import InputFileError, StageError
from twin.io import atomic_path

log = logging.getLogger("twin.segmentation")

#: Tiles sent to ``model.predict`` per call: few calls (each has a fixed cost of tens of ms)
#: while bounding memory (256 tiles of 256 x 512 float32 are 134 MB).
_TILES_PER_CHUNK = 256


# Labels -------------------------------------------------------------------------------

#: Values of a label volume (uint8). The seed's two classes use 0 and 1; a three-class
#: segmentation (``segmentation.n_classes = 3``) keeps 1 for Si without lithium (crystalline,
#: or amorphous after delithiation) and labels lithiated Li_xSi 2.
LABEL_BACKGROUND, LABEL_SI, LABEL_LITHIATED_SI = 0, 1, 2
CLASS_NAMES = {2: "background Si", 3: "background Si_without_lithium lithiated_Si"}


def si_from_labels(labels: np.ndarray) -> np.ndarray:
    """Boolean Si mask of a label volume of two or three classes (labels 1 and 2)."""
    return np.isin(labels, (LABEL_SI, LABEL_LITHIATED_SI))


def labels_from_phase(phase: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """The phantom's truth as a segmentation's uint8 labels of ``n_classes`` (2 or 3) classes.

    Si is every silicon phase (``phantoms.phases.si_mask``: the seed's class);
    with three classes, Li_xSi (``Phase.SI_LITHIATED``, x > 0) is labelled 2 and
    crystalline or delithiated amorphous Si 1.
    """
    from phantoms.phases import Phase, si_mask

    if n_classes not in (2, 3):
        raise ValueError(f"n_classes: 2 or 3, got {n_classes}")
    phase = np.asarray(phase)
    labels = si_mask(phase).astype(np.uint8)
    if n_classes == 3:
        labels[phase == Phase.SI_LITHIATED] = LABEL_LITHIATED_SI
    return labels


def labels_from_class_probabilities(probabilities: np.ndarray, si_threshold: float = 0.5) -> np.ndarray:
    """uint8 labels from per-class probabilities (..., n_classes), background first.

    A voxel is Si where P(Si) = 1 - P(background) exceeds ``si_threshold`` (for
    two classes the seed's rule), and takes the likeliest Si class there. So the
    Si mask of a three-class model follows the same rule as a two-class one's.
    """
    p = np.asarray(probabilities)
    si = (1.0 - p[..., 0]) > si_threshold
    if p.shape[-1] == 2:
        return si.astype(np.uint8)
    return np.where(si, 1 + np.argmax(p[..., 1:], axis=-1), 0).astype(np.uint8)


# TensorFlow ---------------------------------------------------------------------------


def configure_tensorflow(threads: int | None = None) -> None:
    """Import TensorFlow quietly and optionally cap its CPU thread pools.

    Parameters
    ----------
    threads
        Intra- and inter-op threads; ``None`` leaves TensorFlow's default (all
        cores). Takes effect only before TensorFlow runs its first op.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already initialized: the earlier setting stays
            pass


def tensorflow_device() -> str:
    """The device TensorFlow runs the model on: ``"GPU:0 (name)"`` when a GPU is visible, else ``"CPU"``."""
    configure_tensorflow()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU:0 ({details.get('device_name', gpus[0].name)})"


# Tiling -------------------------------------------------------------------------------


def tile_starts(length_px: int, tile_px: int, overlap_px: int, align_px: int = 1) -> list[int]:
    """Start indices of tiles of ``tile_px`` covering ``length_px`` with at least ``overlap_px`` overlap.

    Starts step by the largest multiple of ``align_px`` that keeps the overlap
    (at least ``align_px``); the last tile ends at the border.
    ``length_px - tile_px`` must be a multiple of ``align_px`` (the caller
    pads), and ``length_px >= tile_px``.
    Aligning tiles to the network's pooling grid (``2**depth``) makes a tile's
    interior identical to a whole-image prediction.
    """
    if length_px < tile_px or (length_px - tile_px) % align_px:
        raise ValueError(f"length_px: need >= tile_px ({tile_px}) and a multiple of {align_px} past it, got {length_px}")
    step = max(align_px, (tile_px - overlap_px) // align_px * align_px)
    n = -(-(length_px - tile_px) // step) + 1
    return [min(i * step, length_px - tile_px) for i in range(n)]


def blend_weights(tile_shape_px: tuple[int, int], overlap_px: tuple[int, int]) -> np.ndarray:
    """Blending weight of one tile: linear ramps over the overlap at each edge, 1 inside, > 0 everywhere.

    The product of two 1D ramps ``w(i) = min(1, (i + 0.5) / overlap, (n - i - 0.5) / overlap)``.
    Neighbouring tiles' ramps cross-fade, so seams from the zero padding at a
    tile's edge get little weight; dividing by the summed weights keeps the
    result a proper average where only one tile covers a pixel.
    """
    ramps = []
    for n, o in zip(tile_shape_px, overlap_px):
        i = np.arange(n) + 0.5
        ramps.append(np.minimum(1.0, np.minimum(i, n - i) / o) if o > 0 else np.ones(n))
    return np.outer(*ramps).astype(np.float32)


def predict_tiled(
    predict_batch,
    volume: np.ndarray,
    *,
    tile_shape_px: tuple[int, int],
    overlap_px: tuple[int, int],
    align_px: int = 1,
) -> np.ndarray:
    """Apply a 2D network slice by slice to a volume in overlapping, blended tiles.

    Written here because neither Keras nor the project's other libraries tile a
    2D model over a volume with blending.

    Parameters
    ----------
    predict_batch
        ``f(tiles) -> probabilities``: (n, th, tw, 1) float32 to (n, th, tw, channels).
    volume
        (z, y, x) grey values; slices are (y, x) planes, any size (padded by
        reflection up to a tile where smaller).
    tile_shape_px
        (th, tw), px.
    overlap_px
        Overlap along y and x, px.
    align_px
        Tile starts are multiples of this (the network's ``2**depth``); slices
        are reflect-padded at the far edges to fit.

    Returns
    -------
    numpy.ndarray
        (z, y, x, channels) float32 probabilities.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume: need a (z, y, x) array, got shape {volume.shape}")
    th, tw = tile_shape_px
    nz, ny, nx = volume.shape
    pad_y, pad_x = (max(0, t - n) + (-max(0, n - t)) % align_px for n, t in ((ny, th), (nx, tw)))
    if pad_y or pad_x:
        volume = np.pad(volume, ((0, 0), (0, pad_y), (0, pad_x)), mode="symmetric")
    py, px = volume.shape[1:]
    starts = [(y0, x0) for y0 in tile_starts(py, th, overlap_px[0], align_px)
              for x0 in tile_starts(px, tw, overlap_px[1], align_px)]
    weight = blend_weights((th, tw), overlap_px)
    norm = np.zeros((py, px), np.float32)
    for y0, x0 in starts:
        norm[y0:y0 + th, x0:x0 + tw] += weight
    out = None
    slices_per_chunk = max(1, _TILES_PER_CHUNK // len(starts))
    for z0 in range(0, nz, slices_per_chunk):
        chunk = volume[z0:z0 + slices_per_chunk]
        tiles = np.stack([s[y0:y0 + th, x0:x0 + tw] for s in chunk for y0, x0 in starts])[..., None]
        probs = np.asarray(predict_batch(tiles), dtype=np.float32)
        channels = probs.shape[-1]
        probs = probs.reshape(len(chunk), len(starts), th, tw, channels)
        if out is None:
            out = np.empty((nz, ny, nx, channels), np.float32)
        acc = np.zeros((len(chunk), py, px, channels), np.float32)
        for k, (y0, x0) in enumerate(starts):
            acc[:, y0:y0 + th, x0:x0 + tw] += probs[:, k] * weight[..., None]
        out[z0:z0 + len(chunk)] = (acc / norm[..., None])[:, :ny, :nx]
    return out


# Slice planes -------------------------------------------------------------------------

#: Axis order that turns a (z, y, x) volume into a stack of 2D slices of each plane:
#: "yx" the reconstruction's own slices (stacked along z), "zx" vertical slices stacked
#: along y, "zy" vertical slices stacked along x.
PLANE_AXES = {"yx": (0, 1, 2), "zx": (1, 0, 2), "zy": (2, 0, 1)}


def as_plane_stack(volume: np.ndarray, plane: str) -> np.ndarray:
    """View a (z, y, x) volume as a stack of 2D slices of ``plane`` ("yx", "zx" or "zy")."""
    if plane not in PLANE_AXES:
        raise ValueError(f"plane: expected one of {sorted(PLANE_AXES)}, got {plane!r}")
    return np.transpose(volume, PLANE_AXES[plane])


def from_plane_stack(stack: np.ndarray, plane: str) -> np.ndarray:
    """Inverse of :func:`as_plane_stack`: back to (z, y, x); trailing axes (channels) stay last."""
    return np.transpose(stack, (*np.argsort(PLANE_AXES[plane]), *range(3, np.ndim(stack))))


# The U-Net segmenter -----------------------------------------------------------------


def batch_norm_momentum(training_steps: int, *, default: float = 0.99, initial_weight: float = 0.01) -> float:
    """Momentum of the batch-norm moving averages for a training run of ``training_steps`` updates.

    Keras' default 0.99 (the seed's) is kept unless the run is too short for
    the moving mean and variance to forget their initial values (0 and 1):
    after n steps those weigh ``momentum**n``, so the momentum is lowered to
    ``initial_weight**(1/n)`` (1 % left at the end). Without this a CI-sized
    run (a few dozen steps) predicts with the initial statistics and fails.
    """
    return float(min(default, initial_weight ** (1.0 / max(training_steps, 1))))


def recalibrate_batch_norm(model, images: np.ndarray, batch_size: int) -> None:
    """Re-estimate every batch-norm layer's moving mean and variance for the trained weights.

    Keras keeps exponential moving averages of the batch statistics, taken
    while the weights still changed; after a short run at a high learning rate
    they lag the final weights, and inference (which uses them) drifts from
    what training saw: measured on three-class core/shell disks, P(core) fell
    to a Dice of 0.03 with the moving averages and 0.96 with batch statistics.
    So after training, the statistics are recomputed as the plain average over
    the training images, in batches of the training batch size (the
    statistics training normalized with), dropout off, weights fixed: the
    standard "update bn" pass of stochastic weight averaging (Izmailov et al.
    2018, torch.optim.swa_utils.update_bn).

    Parameters
    ----------
    model
        The trained Keras model; only its batch-norm moving statistics change.
    images
        (n, height, width, channels) the training inputs.
    batch_size
        Images per batch, as in training.
    """
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    momenta, rates = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for k, start in enumerate(range(0, len(images), batch_size)):
            for layer in norms:
                layer.momentum = k / (k + 1)  # running mean over the batches: the first replaces the old value
            model(images[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate


class UNetSegmenter:
    """The seed's attention residual U-Net: train on annotated slices, segment volumes.

    Parameters
    ----------
    tile_shape_px
        Training crop and inference tile (height, width), px (seed: (256, 512)).
    depth, base_filters, dropout
        Architecture (see :func:`pipeline._unet.build_unet`); seed: dropout 0.2.
    epochs, batch_size, learning_rate, validation_split
        Training (seed: 150, 1, 1e-4 with Adam, 0.3).
    augmentations_per_slice
        Random draws of the seed's augmentation list per slice (seed: 3).
    tile_overlap_fraction
        Overlap of inference tiles, fraction of the tile side.
    inference_batch_size
        Tiles per forward pass.
    slice_planes
        Planes the 2D network is applied to at inference ("yx": the
        reconstruction's slices, the seed's; "zx", "zy": vertical slices);
        with several, the probabilities are averaged. Must match the planes it
        was trained on.
    probability_threshold
        P(Si) above which a voxel is Si.
    n_classes
        2 (the seed's Si vs background, sigmoid output) or 3 (background, Si
        without lithium, lithiated Si: softmax; see :func:`labels_from_phase`).
    model
        An already built or loaded Keras model (else built by :meth:`fit`).

    Examples
    --------
    >>> seg = UNetSegmenter(tile_shape_px=(32, 32), depth=2, base_filters=4, epochs=1)
    >>> seg.tile_shape_px
    (32, 32)
    """

    def __init__(self, *, tile_shape_px=(256, 512), depth: int = 4, base_filters: int = 16, dropout: float = 0.2,
                 epochs: int = 150, batch_size: int = 1, learning_rate: float = 1e-4, validation_split: float = 0.3,
                 augmentations_per_slice: int = 3, tile_overlap_fraction: float = 0.125,
                 inference_batch_size: int = 8, probability_threshold: float = 0.5, slice_planes=("yx",),
                 n_classes: int = 2, model=None):
        self.tile_shape_px = tuple(int(n) for n in tile_shape_px)
        if any(n % 2**depth for n in self.tile_shape_px):
            raise ValueError(f"tile_shape_px: must be divisible by 2**depth = {2**depth}, got {self.tile_shape_px}")
        self.depth, self.base_filters, self.dropout = depth, base_filters, dropout
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.validation_split = validation_split
        self.augmentations_per_slice = augmentations_per_slice
        self.tile_overlap_fraction = tile_overlap_fraction
        self.inference_batch_size = inference_batch_size
        self.probability_threshold = probability_threshold
        if n_classes not in (2, 3):
            raise ValueError(f"n_classes: 2 or 3, got {n_classes}")
        self.n_classes = n_classes
        self.slice_planes = tuple(slice_planes)
        if not self.slice_planes or any(p not in PLANE_AXES for p in self.slice_planes):
            raise ValueError(f"slice_planes: need one or more of {sorted(PLANE_AXES)}, got {slice_planes!r}")
        self.model = model
        self.history: dict = {}

    @classmethod
    def from_scenario(cls, segmentation, model=None) -> UNetSegmenter:
        """Build from a :class:`twin.scenario.Segmentation` section."""
        s = segmentation
        return cls(tile_shape_px=s.tile_shape_px, depth=s.depth, base_filters=s.base_filters, dropout=s.dropout,
                   epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
                   validation_split=s.validation_split, augmentations_per_slice=s.augmentations_per_slice,
                   tile_overlap_fraction=s.tile_overlap_fraction, inference_batch_size=s.inference_batch_size,
                   probability_threshold=s.probability_threshold, slice_planes=s.slice_planes,
                   n_classes=s.n_classes, model=model)

    # training -------------------------------------------------------------------------
    def fit(self, images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> UNetSegmenter:
        """Augment the annotated slices and train a new model on them.

        Parameters
        ----------
        images
            (n, height, width) grey values of the annotated slices, each the tile size.
        masks
            (n, height, width) annotations: 0 background, 1 Si (and 2 lithiated Si with three classes).
        rng
            Seeds the augmentation, the validation split, the initial weights and
            dropout masks (:func:`pipeline._unet.build_unet`'s ``seed``) and the batch
            order (TensorFlow's global seed via ``keras.utils.set_random_seed``).

        Notes
        -----
        The validation split (seed: 30 %) is drawn by *slice*, each slice with
        its augmentations, so no augmented copy of a validation slice is
        trained on (the seed does not say how it split). Training is repeatable
        on CPU up to float round-off of multi-threaded reductions; see the docs.
        """
        from pipeline._unet import build_unet
        from pipeline.augment import augment_slices

        configure_tensorflow()
        import keras

        images = np.asarray(images, dtype=np.float32)
        masks = np.asarray(masks)
        if images.ndim != 3 or images.shape != masks.shape or images.shape[1:] != self.tile_shape_px:
            raise ValueError(f"images, masks: need equal (n, {self.tile_shape_px[0]}, {self.tile_shape_px[1]}) shapes, "
                             f"got {images.shape} and {masks.shape}")
        if masks.size and (masks.min() < 0 or masks.max() >= self.n_classes):
            raise ValueError(f"masks: labels must lie in 0..{self.n_classes - 1} for {self.n_classes} classes, "
                             f"got {masks.min()}..{masks.max()}")
        n = len(images)
        n_val = min(n - 1, int(round(self.validation_split * n)))
        order = rng.permutation(n)
        val_idx, train_idx = order[:n_val], order[n_val:]
        x_train, y_train = augment_slices(images[train_idx], masks[train_idx], rng,
                                          augmentations_per_slice=self.augmentations_per_slice)
        x_val, y_val = (augment_slices(images[val_idx], masks[val_idx], rng,
                                       augmentations_per_slice=self.augmentations_per_slice) if n_val else (None, None))
        lo, hi = np.percentile(images, [0.5, 99.5])
        scale = 1.0 / (hi - lo) if hi > lo else 1.0
        keras.utils.set_random_seed(int(rng.integers(2**31 - 1)))
        steps = self.epochs * int(np.ceil(len(x_train) / self.batch_size))
        model = build_unet(depth=self.depth, base_filters=self.base_filters, dropout=self.dropout,
                           input_offset=float(-lo * scale), input_scale=float(scale),
                           batch_norm_momentum=batch_norm_momentum(steps), n_classes=self.n_classes,
                           seed=int(rng.integers(2**31 - 1)))
        loss = "binary_crossentropy" if self.n_classes == 2 else "sparse_categorical_crossentropy"
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=self.learning_rate), loss=loss)
        device = tensorflow_device()
        log.info("training %s on %s: %d train + %d validation images of %s px, %d epochs",
                 model.name, device, len(x_train), 0 if x_val is None else len(x_val), self.tile_shape_px, self.epochs)
        start = time.perf_counter()
        hist = model.fit(x_train[..., None], y_train[..., None].astype(np.float32), batch_size=self.batch_size,
                         epochs=self.epochs, shuffle=True, verbose=0,
                         validation_data=None if x_val is None else (x_val[..., None], y_val[..., None].astype(np.float32)))
        recalibrate_batch_norm(model, x_train[..., None], self.batch_size)
        seconds = time.perf_counter() - start
        self.model = model
        self.history = {
            "device": device,
            "seconds": seconds,
            "seconds_per_epoch": seconds / self.epochs,
            "n_train_images": int(len(x_train)),
            "n_validation_images": 0 if x_val is None else int(len(x_val)),
            "validation_slices": [int(i) for i in val_idx],
            "loss": [float(v) for v in hist.history["loss"]],
            "val_loss": [float(v) for v in hist.history.get("val_loss", [])],
            "n_parameters": int(model.count_params()),
        }
        return self

    # inference ------------------------------------------------------------------------
    def _require_model(self):
        if self.model is None:
            raise StageError("UNetSegmenter: no model; call fit() or load() first")
        return self.model

    def _plane_mean(self, volume: np.ndarray) -> np.ndarray:
        """The network's output averaged over the slices of each of ``slice_planes``: (z, y, x, 1) P(Si) for two
        classes, (z, y, x, n_classes) otherwise; tiled, blended inference."""
        model = self._require_model()
        volume = np.asarray(volume, dtype=np.float32)
        planes = self.slice_planes
        if volume.ndim == 2:  # one image: the network is applied to it as it is
            volume, planes = volume[None], ("yx",)
        overlap = tuple(int(round(self.tile_overlap_fraction * n)) for n in self.tile_shape_px)
        log.info("segmenting a %s volume on %s", volume.shape, tensorflow_device())

        def predict_batch(tiles):
            return model.predict(tiles, batch_size=self.inference_batch_size, verbose=0)

        channels = 1 if self.n_classes == 2 else self.n_classes
        total = np.zeros((*volume.shape, channels), np.float32)
        for plane in planes:
            stack = predict_tiled(predict_batch, as_plane_stack(volume, plane), tile_shape_px=self.tile_shape_px,
                                  overlap_px=overlap, align_px=2**self.depth)
            total += from_plane_stack(stack, plane)
            del stack
        total /= len(planes)
        return total

    def class_probabilities(self, volume: np.ndarray) -> np.ndarray:
        """Each class's probability, (z, y, x, n_classes) float32, background first: tiled, blended inference
        over the slices of each of ``slice_planes``, averaged over the planes."""
        total = self._plane_mean(volume)
        return np.concatenate([1.0 - total, total], axis=-1) if self.n_classes == 2 else total

    def probability(self, volume: np.ndarray) -> np.ndarray:
        """P(Si) of every voxel, (z, y, x) float32 (1 - P(background))."""
        total = self._plane_mean(volume)
        return total[..., 0] if self.n_classes == 2 else 1.0 - total[..., 0]

    def segment(self, volume: np.ndarray) -> np.ndarray:
        """Labels (z, y, x) uint8 by :func:`labels_from_class_probabilities` with ``probability_threshold``
        (for two classes straight from P(Si), without the background channel: a third of the memory)."""
        total = self._plane_mean(volume)
        if self.n_classes == 2:
            return (total[..., 0] > self.probability_threshold).astype(np.uint8)
        return labels_from_class_probabilities(total, self.probability_threshold)

    # persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the model as a ``.keras`` file, atomically (Keras insists on the suffix, so it writes a ``.keras`` temporary)."""
        model = self._require_model()
        path = Path(path)
        if path.suffix != ".keras":
            raise InputFileError(path, "a Keras 3 model file must end in .keras")
        with atomic_path(path) as tmp:
            model.save(tmp.with_suffix(".keras"))
            tmp.with_suffix(".keras").rename(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, **options) -> UNetSegmenter:
        """Load a ``.keras`` model with ``safe_mode=True`` (no arbitrary code runs while loading).

        Parameters
        ----------
        path
            The ``.keras`` file.
        options
            Inference options of :class:`UNetSegmenter` (``tile_shape_px``, ...).

        Raises
        ------
        InputFileError
            Missing, truncated or invalid file, or a model that is not this U-Net's shape.
        """
        configure_tensorflow()
        import keras

        path = Path(path)
        if not path.is_file():
            raise InputFileError(path, "no such model file")
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # keras raises ValueError, zipfile.BadZipFile, OSError, ... for a bad file
            raise InputFileError(path, f"not a loadable .keras model ({type(exc).__name__}: {exc})") from None
        channels = model.outputs[0].shape[-1]
        if len(model.inputs) != 1 or channels not in (1, 3):
            raise InputFileError(path, "expected a one-input segmentation model with one (Si) or three (background, Si, "
                                       f"lithiated Si) output channels, got {channels}")
        n_classes = 2 if channels == 1 else channels
        if options.setdefault("n_classes", n_classes) != n_classes:
            raise InputFileError(path, f"the model has {n_classes} classes, {options['n_classes']} were asked for")
        depth = sum(1 for layer in model.layers if layer.name.startswith("att") and layer.name.endswith("_alpha"))
        options.setdefault("depth", max(depth, 1))
        if any(int(n) % 2 ** options["depth"] for n in options.get("tile_shape_px", (256, 512))):
            raise InputFileError(path, f"model of depth {options['depth']} cannot take tiles {options.get('tile_shape_px')}")
        return cls(model=model, **options)


# Training data from the truth ---------------------------------------------------------


def degrade_annotation(mask: np.ndarray, rng: np.random.Generator, *, boundary_jitter_px: float = 0.0,
                       min_particle_area_px: int = 0) -> np.ndarray:
    """Mimic a hand annotation of a 2D slice: jittered boundaries and missed small particles.

    Parameters
    ----------
    mask
        (height, width) true labels: 0 background, 1 Si (and 2 lithiated Si). The
        jitter and the missed particles act on the Si outline; a pixel the
        jittered outline adds takes the class of the nearest Si pixel.
    rng
        Source of the jitter field.
    boundary_jitter_px
        rms displacement of the boundary, px: the signed distance to the
        boundary is perturbed by a smooth Gaussian random field of this rms
        (correlation length 4 px, about a brush stroke) and thresholded at 0.
    min_particle_area_px
        Connected Si regions smaller than this (px²) are left unlabelled.

    Returns
    -------
    numpy.ndarray
        (height, width) uint8 annotation.
    """
    from scipy import ndimage
    from skimage import morphology

    labels = np.asarray(mask).astype(np.uint8)
    out = labels > 0
    if min_particle_area_px > 0:
        out = morphology.remove_small_objects(out, max_size=min_particle_area_px - 1)
    if boundary_jitter_px > 0 and out.any():
        signed = ndimage.distance_transform_edt(out) - ndimage.distance_transform_edt(~out)
        noise = ndimage.gaussian_filter(rng.standard_normal(out.shape), sigma=4.0, mode="wrap")
        noise *= boundary_jitter_px / max(float(noise.std()), 1e-12)
        nearest = ndimage.distance_transform_edt(~out, return_distances=False, return_indices=True)
        labels = labels[tuple(nearest)]
        out = signed + noise > 0
    return np.where(out, labels, 0).astype(np.uint8)


def training_slices(volume: np.ndarray, mask: np.ndarray, z_indices, rng: np.random.Generator,
                    tile_shape_px: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Tile-sized crops of the given z slices, at random (y, x) offsets: the slices an annotator labels.

    Slices smaller than the tile are reflect-padded. Returns images, masks and
    the (z, y0, x0) of each crop.
    """
    th, tw = tile_shape_px
    nz, ny, nx = volume.shape
    images, masks, where = [], [], []
    for z in z_indices:
        y0 = int(rng.integers(0, max(ny - th, 0) + 1))
        x0 = int(rng.integers(0, max(nx - tw, 0) + 1))
        pads = ((0, max(0, th - ny)), (0, max(0, tw - nx)))
        images.append(np.pad(volume[z], pads, mode="symmetric")[y0:y0 + th, x0:x0 + tw])
        masks.append(np.pad(mask[z], pads, mode="symmetric")[y0:y0 + th, x0:x0 + tw])
        where.append((int(z), y0, x0))
    return np.stack(images).astype(np.float32), np.stack(masks).astype(np.uint8), where


def stratified_z(n_slices_z: int, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` slice indices, one drawn uniformly in each of ``count`` equal bins of [0, n_slices_z)."""
    edges = np.linspace(0, n_slices_z, count + 1)
    return [int(min(n_slices_z - 1, np.floor(rng.uniform(a, b)))) for a, b in zip(edges[:-1], edges[1:])]


def scan_index(scan: str) -> int:
    """The number of a scan name (``"T3"`` -> 3)."""
    m = re.fullmatch(r"\D*(\d+)", scan)
    if m is None:
        raise StageError(f"scan name {scan!r}: expected a name ending in its number, like 'T3'")
    return int(m.group(1))


def model_for_scan(scan: str, second_model_from_scan: int) -> int:
    """1 for scans before ``second_model_from_scan`` (seed: T0-T2), else 2."""
    return 1 if scan_index(scan) < second_model_from_scan else 2


def _read_variable(path: Path, name: str) -> np.ndarray:
    import xarray as xr

    from twin.io import NETCDF_ENGINE

    try:
        with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
            return ds[name].values
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(path, f"cannot read variable {name!r} ({type(exc).__name__}: {exc})") from None


# Stages -------------------------------------------------------------------------------


def compute_segmentation_training(ctx) -> None:
    """Stage ``segmentation_training`` (once): train model 1 (early scans) and model 2 (the rest).

    The annotated slices are the phantom's true labels (:func:`labels_from_phase`
    with ``segmentation.n_classes``), optionally degraded (``segmentation.annotation_*``), on tile-sized crops of
    slices of the reconstructed ``volume`` in the planes ``segmentation.slice_planes``
    (seed: the (y, x) slices; vertical (z, x) and (z, y) slices each hold the
    current collector, the electrode and the separator). Each model gets
    ``segmentation.n_training_slices`` slices spread round-robin over its scans,
    within a scan round-robin over the planes, and within a plane stratified
    along its stacking axis.

    Reads ``ctx.input("reconstruction", scan)/volume.nc`` and
    ``ctx.input("truth", scan)/phantom.nc`` for every scan among the inputs;
    writes ``model_1.keras``, ``model_2.keras``, ``training_slices.nc`` and
    ``training.json``.
    """
    import xarray as xr

    from twin.io import write_netcdf

    sc = ctx.scenario.segmentation
    scans = sorted({item for (stage, item) in ctx.inputs if stage == "reconstruction"}, key=scan_index)
    groups = {1: [s for s in scans if model_for_scan(s, sc.second_model_from_scan) == 1],
              2: [s for s in scans if model_for_scan(s, sc.second_model_from_scan) == 2]}
    for k, members in groups.items():
        if not members:
            raise StageError(f"segmentation.second_model_from_scan = {sc.second_model_from_scan}: model {k} has no scans "
                             f"among the inputs {scans}")
    rng = ctx.rng
    report: dict = {"device": tensorflow_device(), "n_classes": sc.n_classes, "models": {}}
    slices_ds = {}
    for k, members in groups.items():
        per_scan = {s: (sc.n_training_slices // len(members)) + (i < sc.n_training_slices % len(members))
                    for i, s in enumerate(members)}
        images, masks, origin = [], [], []
        for scan, count in per_scan.items():
            if count == 0:
                continue
            volume = _read_variable(ctx.input("reconstruction", scan) / "volume.nc", "volume")
            truth = labels_from_phase(_read_variable(ctx.input("truth", scan) / "phantom.nc", "phase"), sc.n_classes)
            if volume.shape != truth.shape:
                raise InputFileError(ctx.input("reconstruction", scan) / "volume.nc",
                                     f"volume shape {volume.shape} differs from the truth's {truth.shape}")
            # the scan's slices go round-robin to the planes; within a plane they are stratified
            for j, plane in enumerate(sc.slice_planes):
                n_plane = count // len(sc.slice_planes) + (j < count % len(sc.slice_planes))
                if n_plane == 0:
                    continue
                stack = as_plane_stack(volume, plane)
                im, ma, where = training_slices(stack, as_plane_stack(truth, plane),
                                                stratified_z(stack.shape[0], n_plane, rng), rng, tuple(sc.tile_shape_px))
                ma = np.stack([degrade_annotation(m, rng, boundary_jitter_px=sc.annotation_boundary_jitter_px,
                                                  min_particle_area_px=sc.annotation_min_particle_area_px) for m in ma])
                images.append(im)
                masks.append(ma)
                origin += [{"scan": scan, "plane": plane, "index": i, "row0": r0, "col0": c0} for i, r0, c0 in where]
        images_a, masks_a = np.concatenate(images), np.concatenate(masks)
        seg = UNetSegmenter.from_scenario(sc).fit(images_a, masks_a, rng)
        seg.save(ctx.out_dir / f"model_{k}.keras")
        report["models"][f"model_{k}"] = {"scans": members, "slices": origin, **seg.history}
        slices_ds[k] = (images_a, masks_a)
    n = max(len(v[0]) for v in slices_ds.values())
    th, tw = sc.tile_shape_px
    ds = xr.Dataset(
        {
            "image": (("model", "slice", "y", "x"), np.full((2, n, th, tw), np.nan, np.float32)),
            "annotation": (("model", "slice", "y", "x"), np.zeros((2, n, th, tw), np.uint8)),
            "valid": (("model", "slice"), np.zeros((2, n), bool)),
        },
        coords={"model": [1, 2]},
        attrs={"description": "annotated training slices (before augmentation) of each model",
               "flag_meanings": CLASS_NAMES[sc.n_classes]},
    )
    for k, (im, ma) in slices_ds.items():
        ds["image"][k - 1, : len(im)] = im
        ds["annotation"][k - 1, : len(ma)] = ma
        ds["valid"][k - 1, : len(im)] = True
    write_netcdf(ds, ctx.out_dir / "training_slices.nc")
    with atomic_path(ctx.out_dir / "training.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))


def read_training_slices(path: Path, model: int) -> tuple[np.ndarray, np.ndarray]:
    """The annotated slices (images, annotations) of model 1 or 2 from ``training_slices.nc``."""
    import xarray as xr

    from twin.io import NETCDF_ENGINE

    try:
        with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
            sel = ds.sel(model=model)
            valid = sel["valid"].values.astype(bool)
            return sel["image"].values[valid], sel["annotation"].values[valid]
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(path, f"cannot read the training slices ({type(exc).__name__}: {exc})") from None


def compute_segmentation(ctx) -> None:
    """Stage ``segmentation`` (per scan): label the scan's volume with its model and the baselines.

    Reads ``ctx.input("reconstruction", scan)/volume.nc`` (``volume``) and
    ``ctx.input("segmentation_training")/model_{1,2}.keras`` and
    ``training_slices.nc``; writes ``labels.nc`` (``labels`` uint8 from
    ``segmentation.method``, plus ``labels_<baseline>`` for each of
    ``segmentation.baselines``; coords in µm) and ``labels.tif``.
    """
    sc = ctx.scenario.segmentation
    scan = ctx.item
    if ctx.scenario.oracle.true_labels:
        write_true_labels(ctx.input("truth", scan) / "phantom.nc", ctx.out_dir, scan=scan, n_classes=sc.n_classes)
        return
    volume_path = ctx.input("reconstruction", scan) / "volume.nc"
    volume = _read_variable(volume_path, "volume")
    training = ctx.input("segmentation_training")
    k = model_for_scan(scan, sc.second_model_from_scan)
    results: dict[str, np.ndarray] = {}
    for method in dict.fromkeys([sc.method, *sc.baselines]):
        if method == "unet":
            seg = UNetSegmenter.load(training / f"model_{k}.keras", tile_shape_px=sc.tile_shape_px, n_classes=sc.n_classes,
                                     tile_overlap_fraction=sc.tile_overlap_fraction, slice_planes=sc.slice_planes,
                                     inference_batch_size=sc.inference_batch_size,
                                     probability_threshold=sc.probability_threshold)
        else:
            seg = _fitted_baseline(method, str(training), k, sc.random_forest_n_estimators, ctx.scenario.run.seed,
                                   tuple(sc.slice_planes), sc.n_classes)
        results[method] = seg.segment(volume)
    write_labels(ctx.out_dir, results[sc.method], volume_path=volume_path,
                 extra={f"labels_{m}": v for m, v in results.items() if m != sc.method},
                 attrs={"method": sc.method, "model": f"model_{k}.keras" if sc.method == "unet" else "", "scan": scan},
                 n_classes=sc.n_classes)


@functools.lru_cache(maxsize=4)
def _fitted_baseline(method: str, training_dir: str, model: int, n_estimators: int, seed: int,
                     slice_planes: tuple[str, ...], n_classes: int):
    """A baseline fitted on model ``model``'s annotated slices: one per model, like the U-Nets.

    Seeded by the run's seed and the model, not the scan, so every scan of a group gets the same
    baseline wherever it runs; cached per process (``training_dir`` is a content-keyed cache entry),
    so a process segmenting ten scans fits each model's forest once.
    """
    from pipeline.baselines import make_baseline

    images, masks = read_training_slices(Path(training_dir) / "training_slices.nc", model)
    rng = np.random.default_rng([seed, model, zlib.crc32(method.encode())])
    return make_baseline(method, n_estimators=n_estimators, slice_planes=slice_planes,
                         n_classes=n_classes).fit(images, masks, rng)


def write_true_labels(phantom_nc: Path, out_dir: Path, *, scan: str, n_classes: int = 2) -> None:
    """The error budget's oracle segmentation: the phantom's true labels, written as a segmentation would be."""
    phase = _read_variable(phantom_nc, "phase")
    write_labels(out_dir, labels_from_phase(phase, n_classes), volume_path=phantom_nc, n_classes=n_classes,
                 attrs={"method": "oracle", "model": "", "scan": scan})


def write_labels(out_dir: Path, labels: np.ndarray, *, volume_path: Path | None = None, extra=None, attrs=None,
                 n_classes: int = 2) -> None:
    """Write ``labels.nc`` (``labels`` uint8 + ``extra`` variables, coords/attrs copied from the volume; the
    attribute ``n_classes`` says whether label 2 means lithiated Si) and ``labels.tif``."""
    import tifffile
    import xarray as xr

    from twin.io import NETCDF_ENGINE, write_netcdf

    coords, base_attrs = {}, {}
    if volume_path is not None and Path(volume_path).suffix == ".nc":
        with xr.open_dataset(volume_path, engine=NETCDF_ENGINE) as ds:
            coords = {d: ds[d].values for d in ("z", "y", "x") if d in ds.coords and ds.sizes[d] == labels.shape["zyx".index(d)]}
            base_attrs = {k: v for k, v in ds.attrs.items() if k == "voxel_size_um"}
    flags = {"flag_values": list(range(n_classes)), "flag_meanings": CLASS_NAMES[n_classes]}
    variables = {name: (("z", "y", "x"), value.astype(np.uint8), flags)
                 for name, value in {"labels": labels, **(extra or {})}.items()}
    ds = xr.Dataset(variables, coords=coords, attrs={**base_attrs, **(attrs or {}), "n_classes": n_classes})
    out_dir = Path(out_dir)
    write_netcdf(ds, out_dir / "labels.nc")
    with atomic_path(out_dir / "labels.tif") as tmp:
        tifffile.imwrite(tmp, labels.astype(np.uint8), metadata={"axes": "ZYX"})


def read_annotated_slices(images_path: str | Path, annotations_path: str | Path, *,
                          si_label: int = 1, n_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The user's annotated slices: grey values and labels as (n, y, x).

    With two classes the labels are the Si mask (``annotation == si_label``);
    with three the annotation must hold 0 (background), 1 (Si without lithium)
    and 2 (lithiated Si) and is returned as it is.

    Raises
    ------
    InputFileError
        Unreadable files, shapes that differ, annotations without any Si or
        background, or values outside 0..2 for three classes.
    """
    from twin.io import read_volume

    grey, _ = read_volume(images_path, allow_2d=True)
    labels, _ = read_volume(annotations_path, allow_2d=True)
    if grey.shape != labels.shape:
        raise InputFileError(annotations_path, f"shape {labels.shape} differs from the images' {grey.shape} ({images_path})")
    if n_classes == 3:
        bad = ~np.isin(labels, (LABEL_BACKGROUND, LABEL_SI, LABEL_LITHIATED_SI))
        if bad.any():
            raise InputFileError(annotations_path, f"three-class annotations hold 0, 1, 2 only; found {labels[bad][0]}")
        mask = labels.astype(np.uint8)
    else:
        mask = (labels == si_label).astype(np.uint8)
    if not mask.any() or mask.all():
        raise InputFileError(annotations_path, f"needs both Si (value {si_label if n_classes == 2 else '1 or 2'}) "
                                               "and background pixels")
    return grey, mask


def tiles_from_slices(images: np.ndarray, masks: np.ndarray,
                      tile_shape_px: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cut annotated slices of any size into tiles of the network's input size.

    Tiles cover each slice edge to edge (the last one in a row or column ends
    at the border, so neighbours may overlap); slices smaller than a tile are
    reflect-padded.
    """
    th, tw = tile_shape_px
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        pads = ((0, max(0, th - image.shape[0])), (0, max(0, tw - image.shape[1])))
        image, mask = np.pad(image, pads, mode="symmetric"), np.pad(mask, pads, mode="symmetric")
        for y0 in tile_starts(image.shape[0], th, 0):
            for x0 in tile_starts(image.shape[1], tw, 0):
                out_images.append(image[y0:y0 + th, x0:x0 + tw])
                out_masks.append(mask[y0:y0 + th, x0:x0 + tw])
    return np.stack(out_images).astype(np.float32), np.stack(out_masks).astype(np.uint8)
