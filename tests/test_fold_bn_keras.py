"""xfer.fold_bn on Keras models nobody here wrote: keras.applications, a user's functional
model; the folded copy saves and loads as a .keras file."""

from __future__ import annotations

import numpy as np
import pytest

import xfer

pytestmark = pytest.mark.backends("keras-jax", "keras-torch")

# One application per engine (building them is most of the time), MobileNetV2 on both.
APPLICATIONS = {
    "keras-jax": [("MobileNetV2", {"alpha": 0.35}), ("ResNet50", {})],
    "keras-torch": [("MobileNetV2", {"alpha": 0.35}), ("EfficientNetB0", {})],
}


def _moved(model, seed=0):
    rng = np.random.default_rng(seed)
    weights = xfer.export_weights(model)
    for name, value in weights.items():
        if name.endswith("moving_variance"):
            weights[name] = rng.uniform(0.5, 2.0, value.shape).astype(value.dtype)
        elif name.endswith(("moving_mean", "beta")):
            weights[name] = rng.normal(0.0, 0.3, value.shape).astype(value.dtype)
    xfer.import_weights(model, weights)
    return model


def _numpy(tensor):
    import keras

    return keras.ops.convert_to_numpy(tensor)


def _bns(model):
    import keras

    return [x for x in model._flatten_layers() if isinstance(x, keras.layers.BatchNormalization)]


def test_keras_applications_fold_every_bn_within_float32_rounding(kit):
    import keras

    for name, options in APPLICATIONS[kit.id]:
        base = getattr(keras.applications, name)(
            weights=None, include_top=False, input_shape=(32, 32, 3), **options
        )
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
        model = _moved(keras.Model(inputs, keras.layers.Dense(3)(x)))
        images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
        expected = _numpy(model(images, training=False))
        folded = xfer.fold_bn(model)
        got = _numpy(folded(images, training=False))
        assert _bns(folded) == [] and len(_bns(model)) > 10, name
        assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max()), name


def test_a_bn_after_pooling_stays_warned_and_the_copy_round_trips_a_keras_file(kit, tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.ReLU()(x))
    x = keras.layers.BatchNormalization(name="bn_pool")(x)
    model = _moved(keras.Model(inputs, keras.layers.Dense(2, name="dense")(x)))
    images = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype("float32")
    with pytest.warns(UserWarning, match=r"1 BatchNorm unit\(s\) .* unfolded: bn_pool"):
        folded = xfer.fold_bn(model)
    assert [bn.name for bn in _bns(folded)] == ["bn_pool"]
    assert folded.get_layer("conv").use_bias  # the folded BN's shift is the conv's bias now
    expected = _numpy(model(images, training=False))
    assert np.abs(_numpy(folded(images, training=False)) - expected).max() <= 1e-5
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras")
    assert np.abs(_numpy(loaded(images, training=False)) - expected).max() <= 1e-5
