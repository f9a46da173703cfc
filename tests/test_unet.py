"""Layer-level tests of the attention residual U-Net (pipeline._unet)."""

import numpy as np
import pytest

from pipeline.segmentation import configure_tensorflow

configure_tensorflow(threads=1)  # share the CI cores


@pytest.fixture(scope="module")
def model():
    import keras

    from pipeline._unet import build_unet

    keras.utils.set_random_seed(3)
    return build_unet(depth=2, base_filters=4, dropout=0.2, input_offset=-0.5, input_scale=2.0)


def _outputs(model, names, x):
    import keras

    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return [np.asarray(o) for o in probe(x, training=False)]


def test_shapes_and_probability_range(model):
    x = np.random.default_rng(0).random((2, 32, 48, 1)).astype(np.float32)
    y = np.asarray(model(x, training=False))
    assert y.shape == (2, 32, 48, 1)
    assert np.all((y >= 0) & (y <= 1))
    # any size divisible by 2**depth works (fully convolutional)
    assert model(np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 16, 16, 1)


def test_every_skip_connection_is_gated(model):
    names = {layer.name for layer in model.layers}
    assert {"att0_gated", "att1_gated", "att0_alpha", "att1_alpha"} <= names
    # the decoder concatenates the gated skip, never the raw encoder output
    for i in (0, 1):
        concat = model.get_layer(f"dec{i}_concat")
        inbound = {t._keras_history[0].name for t in concat.input}
        assert f"att{i}_gated" in inbound and f"enc{i}_out" not in inbound


def test_attention_gate_is_in_unit_interval_and_multiplies_skip(model):
    x = np.random.default_rng(1).normal(0.5, 0.3, (2, 32, 32, 1)).astype(np.float32)
    for i, filters in ((0, 4), (1, 8)):
        skip, alpha, gated = _outputs(model, [f"enc{i}_out", f"att{i}_alpha", f"att{i}_gated"], x)
        assert alpha.shape == skip.shape[:3] + (1,)
        assert skip.shape[-1] == filters
        assert np.all((alpha >= 0) & (alpha <= 1))
        np.testing.assert_allclose(gated, skip * alpha, rtol=1e-6, atol=1e-7)


def test_residual_path_adds_shortcut_to_convolutions(model):
    x = np.random.default_rng(2).random((1, 32, 32, 1)).astype(np.float32)
    for block in ("enc0", "enc1", "bottleneck", "dec0"):
        shortcut, conv, total, out = _outputs(
            model, [f"{block}_shortcut_bn", f"{block}_bn2", f"{block}_add", f"{block}_out"], x)
        # at inference dropout is the identity, so the sum is exact
        np.testing.assert_allclose(total, shortcut + conv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out, np.maximum(total, 0), rtol=1e-6, atol=1e-7)


def test_rescaling_layer_normalizes_input(model):
    (normalized,) = _outputs(model, ["normalize"], np.full((1, 16, 16, 1), 0.75, np.float32))
    np.testing.assert_allclose(normalized, (0.75 - 0.25) * 2.0, rtol=1e-6)


def test_dropout_rate_and_batchnorm_present(model):
    drops = [layer for layer in model.layers if layer.__class__.__name__ == "Dropout"]
    assert drops and all(d.rate == pytest.approx(0.2) for d in drops)
    assert sum(layer.__class__.__name__ == "BatchNormalization" for layer in model.layers) == 3 * 5  # 5 blocks x 3


def test_invalid_depth_is_refused():
    from pipeline._unet import build_unet

    with pytest.raises(ValueError, match="depth"):
        build_unet(depth=0)


def test_three_class_output_is_a_softmax_over_the_classes():
    from pipeline._unet import build_unet

    model = build_unet(depth=1, base_filters=4, n_classes=3)
    x = np.random.default_rng(1).random((2, 16, 24, 1)).astype(np.float32)
    y = np.asarray(model(x, training=False))
    assert y.shape == (2, 16, 24, 3)
    assert y.min() >= 0.0
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="n_classes"):
        build_unet(depth=1, n_classes=1)
