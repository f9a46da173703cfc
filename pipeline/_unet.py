"""The attention residual U-Net of the seed (Supplementary Note 4), built from Keras 3 layers only.

Architecture (Oktay et al. 2018 attention gates on a residual U-Net, Zhang et
al. 2018), as the seed lists it:

* encoder and decoder made of *residual blocks*: two 3x3 convolutions with
  batch normalization and ReLU, dropout (seed: p = 0.2), plus a 1x1 projection
  shortcut, added before the last ReLU:
  ``y = ReLU(BN(conv(ReLU(BN(conv(x))))) + BN(conv1x1(x)))``;
* an *attention gate* on every skip connection. With skip features ``x`` (at
  resolution r) and the gating signal ``g`` from the coarser level (r/2):

  .. math:: \\alpha = \\sigma\\big(\\psi^T\\,\\mathrm{ReLU}(W_x * x\\,|_{\\downarrow 2} + W_g * g)\\big)\\big|_{\\uparrow 2},
            \\qquad \\hat x = \\alpha \\odot x

  so :math:`\\alpha \\in [0, 1]` (one channel) rescales every skip feature;
* an *upsampling* decoder: nearest-neighbour upsampling of ``g``, concatenation
  with the gated skip, residual block;
* a 1x1 convolution with a sigmoid: P(Si) per pixel (the seed's two classes,
  binary cross-entropy); or, for more classes (background, Si without lithium,
  lithiated Si), a softmax over them (categorical cross-entropy).

The first layer is a ``Rescaling`` that maps the training data's grey-value
range to [0, 1]; it is part of the saved model, so a ``.keras`` file carries
its own normalization and inference needs nothing else.

Only built-in layers are used (no ``Lambda``), so the ``.keras`` file loads with
``safe_mode=True``. The spatial input size is left open (``None``): the network
is fully convolutional and accepts any size divisible by ``2**depth``; the
seed's tile (256, 512) is what training and tiled inference feed it.

Layer names are stable and used by the tests: ``enc{i}_add`` (residual sum of
encoder level i), ``att{i}_alpha`` (gate coefficients), ``att{i}_gated``
(gated skip), ``dec{i}_add``, ``probability``.

References
----------
Oktay O. et al., "Attention U-Net: Learning Where to Look for the Pancreas",
MIDL 2018, arXiv:1804.03999.
Zhang Z., Liu Q., Wang Y., "Road Extraction by Deep Residual U-Net", IEEE GRSL
15, 749 (2018), doi:10.1109/LGRS.2018.2802944.
Ronneberger O., Fischer P., Brox T., "U-Net", MICCAI 2015, doi:10.1007/978-3-319-24574-4_28.
"""

from __future__ import annotations

import numpy as np


def _layers():
    import keras

    return keras.layers


def _seed(rng) -> int | None:
    """A layer's own seed drawn from ``rng`` (numpy Generator), or None: Keras then draws one from Python's
    process-wide ``random``, which other threads (a Dask worker's event loop) may consume meanwhile."""
    return None if rng is None else int(rng.integers(2**31 - 1))


def _conv(filters: int, size: int, rng, **kwargs):
    """``Conv2D`` with Keras' default Glorot-uniform kernel initializer, seeded by ``_seed(rng)``."""
    import keras

    return keras.layers.Conv2D(filters, size, kernel_initializer=keras.initializers.GlorotUniform(seed=_seed(rng)),
                               **kwargs)


def residual_block(x, filters: int, *, dropout: float, name: str, momentum: float = 0.99, rng=None):
    """Two 3x3 conv + BN (+ ReLU), dropout, and a 1x1 projection shortcut added before the last ReLU.
    ``rng``: seeds the layers (see :func:`build_unet`)."""
    L = _layers()
    y = _conv(filters, 3, rng, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = L.BatchNormalization(momentum=momentum, name=f"{name}_bn1")(y)
    y = L.Activation("relu", name=f"{name}_relu1")(y)
    y = _conv(filters, 3, rng, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = L.BatchNormalization(momentum=momentum, name=f"{name}_bn2")(y)
    if dropout > 0:
        y = L.Dropout(dropout, seed=_seed(rng), name=f"{name}_dropout")(y)
    shortcut = _conv(filters, 1, rng, padding="same", use_bias=False, name=f"{name}_shortcut")(x)
    shortcut = L.BatchNormalization(momentum=momentum, name=f"{name}_shortcut_bn")(shortcut)
    y = L.Add(name=f"{name}_add")([shortcut, y])
    return L.Activation("relu", name=f"{name}_out")(y)


def attention_gate(skip, gating, inter_filters: int, *, name: str, rng=None):
    """Additive attention gate (Oktay 2018): one coefficient in [0, 1] per pixel multiplies the skip features.

    ``skip`` has twice the spatial size of ``gating``; ``rng`` seeds the layers (see :func:`build_unet`).
    """
    L = _layers()
    theta_x = _conv(inter_filters, 2, rng, strides=2, padding="same", name=f"{name}_theta_x")(skip)
    phi_g = _conv(inter_filters, 1, rng, padding="same", name=f"{name}_phi_g")(gating)
    f = L.Activation("relu", name=f"{name}_relu")(L.Add(name=f"{name}_sum")([theta_x, phi_g]))
    psi = _conv(1, 1, rng, padding="same", name=f"{name}_psi")(f)
    alpha = L.Activation("sigmoid", name=f"{name}_alpha")(L.UpSampling2D(2, name=f"{name}_up")(psi))
    gated = L.Multiply(name=f"{name}_gated")([skip, alpha])  # broadcasts the one-channel alpha over the features
    return gated


def build_unet(
    *,
    depth: int = 4,
    base_filters: int = 16,
    dropout: float = 0.2,
    n_channels: int = 1,
    input_offset: float = 0.0,
    input_scale: float = 1.0,
    batch_norm_momentum: float = 0.99,
    n_classes: int = 2,
    seed: int | None = None,
):
    """Build the (uncompiled) attention residual U-Net.

    Parameters
    ----------
    depth
        Number of 2x down-sampling steps; inputs must be divisible by ``2**depth`` px.
    base_filters
        Filters of the first level; doubled at each level down.
    dropout
        Dropout rate inside every residual block (seed: 0.2).
    n_channels
        Channels of the input image (1 for a grey-value slice).
    input_offset, input_scale
        The ``Rescaling`` layer computes ``input * input_scale + input_offset``,
        which should map the data's grey values to about [0, 1].
    batch_norm_momentum
        Momentum of the batch-normalization moving statistics (Keras' default
        0.99, which the seed's Keras 2.10 used).
    n_classes
        2 (the seed's Si vs background: one sigmoid channel) or more (one
        softmax channel per class, background first).
    seed
        Seeds every layer's initial weights and dropout masks (each layer its own seed drawn from
        ``numpy.random.default_rng(seed)``), so the model depends on nothing else; ``None``: Keras'
        global seeding, which draws from Python's process-wide ``random``.

    Returns
    -------
    keras.Model
        Input (batch, height, width, n_channels) in grey values; output
        (batch, height, width, 1): P(Si), or (batch, height, width, n_classes):
        each class's probability, dimensionless.
    """
    import keras

    L = keras.layers
    if depth < 1:
        raise ValueError(f"depth: must be >= 1, got {depth}")
    if n_classes < 2:
        raise ValueError(f"n_classes: must be >= 2, got {n_classes}")
    if base_filters < 1:
        raise ValueError(f"base_filters: must be >= 1, got {base_filters}")
    rng = None if seed is None else np.random.default_rng(seed)
    inputs = keras.Input((None, None, n_channels), name="image")
    x = L.Rescaling(scale=input_scale, offset=input_offset, name="normalize")(inputs)
    skips = []
    for i in range(depth):
        x = residual_block(x, base_filters * 2**i, dropout=dropout, name=f"enc{i}", momentum=batch_norm_momentum,
                           rng=rng)
        skips.append(x)
        x = L.MaxPooling2D(2, name=f"enc{i}_pool")(x)
    x = residual_block(x, base_filters * 2**depth, dropout=dropout, name="bottleneck", momentum=batch_norm_momentum,
                       rng=rng)
    for i in reversed(range(depth)):
        filters = base_filters * 2**i
        gated = attention_gate(skips[i], x, filters, name=f"att{i}", rng=rng)
        x = L.UpSampling2D(2, name=f"dec{i}_up")(x)
        x = L.Concatenate(name=f"dec{i}_concat")([x, gated])
        x = residual_block(x, filters, dropout=dropout, name=f"dec{i}", momentum=batch_norm_momentum, rng=rng)
    if n_classes == 2:
        outputs = _conv(1, 1, rng, activation="sigmoid", name="probability")(x)
    else:
        outputs = _conv(n_classes, 1, rng, activation="softmax", name="probability")(x)
    return keras.Model(inputs, outputs, name=f"attention_res_unet_d{depth}_f{base_filters}")
