"""``xfer.models.resnet50`` and ``xfer.convert``: one architecture, the same weights and
logits in every framework, keras.applications.ResNet50 included.

Each test runs with the frameworks this process can hold (Keras only where the session set
its engine, as in test_weights). nox runs the file once, in the ``parity`` session, where
every framework is installed: the whole chain keras.applications -> torch -> flax -> Keras
(a ResNet-50 build per framework is too slow to repeat in every per-framework session).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_weights import _frameworks, _pairs

import xfer
from xfer.convert import applications_key, architecture, xfer_key

SHAPE, CLASSES = (32, 32, 3), 5
TOLERANCE = 1e-4  # max |logit difference| between any two frameworks (docs/convert.md)
# keras.applications.ResNet50(include_top=False): 23,587,712 values, moving statistics
# included; the top adds a 2048 x CLASSES dense layer.
BACKBONE_VALUES = 23_587_712
FRAMEWORKS = _frameworks()
OTHERS = [f for f in FRAMEWORKS if f != "keras"]
needs_keras = pytest.mark.skipif(
    "keras" not in FRAMEWORKS, reason="Keras runs in the keras-jax / keras-torch sessions"
)


def _images(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 1.0, (n, *SHAPE)).astype("float32")


def _predict(backend: str, model, x: np.ndarray | None = None) -> np.ndarray:
    """The model's output in inference mode, channels-last. Called eagerly: a compiled
    predict of a ResNet-50 costs seconds per model, and every test makes several."""
    x = _images() if x is None else x
    if backend == "keras":
        import keras

        return keras.ops.convert_to_numpy(model(x, training=False))
    model.eval()
    if backend == "flax":
        return np.asarray(model(x))
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _randomise(model) -> None:
    """BN statistics and affine values away from 0/1, so that their layouts show."""
    weights = xfer.export_weights(model)
    rng = np.random.default_rng(0)
    for key, value in weights.items():
        if key.endswith(("moving_mean", "beta")):
            weights[key] = rng.uniform(-0.5, 0.5, value.shape).astype("float32")
        elif key.endswith(("moving_variance", "gamma")):
            weights[key] = rng.uniform(0.5, 1.5, value.shape).astype("float32")
    xfer.import_weights(model, weights)


def _applications(include_top: bool, pooling: str | None, **kwargs):
    import keras

    model = keras.applications.ResNet50(
        include_top=include_top,
        weights=kwargs.pop("weights", None),
        input_shape=SHAPE,
        pooling=pooling,
        classes=CLASSES if include_top else 1000,
        classifier_activation=kwargs.pop("classifier_activation", None),
    )
    return model


def _worst(outputs: dict[str, np.ndarray]) -> tuple[float, str]:
    pairs = itertools.combinations(outputs, 2)
    return max((float(np.abs(outputs[a] - outputs[b]).max()), f"{a} vs {b}") for a, b in pairs)


# --- the name map (no framework) -------------------------------------------------------------


def _application_names() -> list[str]:
    names = ["conv1_conv", "conv1_bn", "predictions"]
    for stage, count in zip(range(2, 6), (3, 4, 6, 3), strict=True):
        for block in range(1, count + 1):
            parts = range(4) if block == 1 else range(1, 4)
            names += [f"conv{stage}_block{block}_{p}_{k}" for p in parts for k in ("conv", "bn")]
    return names


def test_the_name_map_is_one_to_one_both_ways():
    keys = [f"{n}.kernel" for n in _application_names()]
    for include_top in (True, False):
        mapped = [xfer_key(k, include_top) for k in keys]
        assert len(set(mapped)) == len(keys)
        assert [applications_key(k) for k in mapped] == keys
    assert xfer_key("dense.kernel", False) == "dense.kernel"  # import_weights names it
    assert xfer_key("conv4_block1_0_conv.bias", True) == "base.layer3.0.downsample.conv.bias"


def test_bad_resnet50_arguments_are_a_clear_error():
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2, got 1"):
        xfer.models.resnet50(1)
    with pytest.raises(ValueError, match=r"include_top=True needs num_classes"):
        xfer.models.resnet50(include_top=True)
    with pytest.raises(ValueError, match=r"pooling='max' is for the backbone alone"):
        xfer.models.resnet50(10, pooling="max")
    with pytest.raises(ValueError, match=r"num_classes=10 with include_top=False"):
        xfer.models.resnet50(10, include_top=False)
    with pytest.raises(ValueError, match=r"pooling must be None, 'avg' or 'max', got 'mean'"):
        xfer.models.resnet50(pooling="mean")
    with pytest.raises(ValueError, match=r"input_shape must be one channels-last image"):
        xfer.models.resnet50(10, input_shape=(3, 32, 32, 1))


# --- xfer.models.resnet50 on every backend ---------------------------------------------------

_BUILT: dict = {}


def _resnet50(backend: str):
    """One randomised ResNet-50 per framework and process (a build takes seconds)."""
    if backend not in _BUILT:
        model = xfer.models.resnet50(CLASSES, input_shape=SHAPE, seed=0, backend=backend)
        _randomise(model)
        _BUILT[backend] = model
    return _BUILT[backend]


def _resnet50_any_size():
    return xfer.models.resnet50(CLASSES, backend="keras")  # input_shape (None, None, 3)


def test_resnet50_has_keras_layout_and_xfer_paths(kit):
    backend = kit.id.split("-")[0]
    model = _resnet50(backend)
    paths = [r.path for r in xfer.summary(model, print_fn=None).rows]
    assert paths[:4] == ["base", "base.stem", "base.stem.conv", "base.stem.bn"]
    assert paths[-3:] == ["base.pool", "head", "head.dense"]
    shapes = {k: v.shape for k, v in xfer.export_weights(model).items()}
    # keras.applications' v1 layout: conv biases, the stride on the first 1x1 conv, a
    # projection shortcut on the first block of every stage, layer1 included.
    assert shapes["base.stem.conv.kernel"] == (7, 7, 3, 64)
    assert shapes["base.stem.conv.bias"] == (64,)
    assert shapes["base.layer1.0.downsample.conv.kernel"] == (1, 1, 64, 256)
    assert "base.layer1.1.downsample.conv.kernel" not in shapes
    assert shapes["head.dense.kernel"] == (2048, CLASSES)
    assert sum(int(np.prod(s)) for s in shapes.values()) == BACKBONE_VALUES + 2049 * CLASSES
    backbone = xfer.models.resnet50(pooling="max", input_shape=SHAPE, backend=backend)
    paths = [r.path for r in xfer.summary(backbone, print_fn=None).rows]
    assert paths[:3] == ["stem", "stem.conv", "stem.bn"] and paths[-1] == "pool"
    assert _predict(backend, backbone).shape == (2, 2048)
    flat = xfer.models.resnet50(input_shape=SHAPE, backend=backend)  # the last feature map
    assert _predict(backend, flat).shape == (2, 1, 1, 2048)


@pytest.mark.parametrize("source, target", _pairs(), ids=lambda name: name)
def test_resnet50_gives_the_same_logits_in_every_framework(source, target):
    original = _resnet50(source)
    copy = xfer.convert(original, target)
    expected, got = _predict(source, original), _predict(target, copy)
    assert np.abs(expected).max() > 0.1  # not a degenerate all-zero comparison
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


# --- keras.applications.ResNet50 --------------------------------------------------------------


@needs_keras
@pytest.mark.parametrize(
    "include_top, pooling", [(True, None), (False, "avg")], ids=["top", "no-top-avg"]
)
def test_keras_applications_round_trip_through_every_framework(include_top, pooling):
    source = _applications(include_top, pooling)
    _randomise(source)
    outputs = {"keras.applications": _predict("keras", source)}
    model = xfer.convert(source, "keras")  # xfer's Keras model: paths, not layer names
    outputs["keras"] = _predict("keras", model)
    for backend in OTHERS:  # torch -> flax: each converted from the one before
        model = xfer.convert(model, backend)
        outputs[backend] = _predict(backend, model)
    back = xfer.convert(model, "keras", keras_applications=True)
    outputs["keras.applications (back)"] = _predict("keras", back)
    worst, where = _worst(outputs)
    print(f"\nResNet-50 include_top={include_top} pooling={pooling}: max |diff| {worst:.2e}")
    assert worst <= TOLERANCE, where
    assert np.abs(outputs["keras.applications"]).max() > 0.1
    # Every value, BN moving statistics included, bit for bit after the round trip.
    before, after = xfer.export_weights(source), xfer.export_weights(back)
    assert before.keys() == after.keys()
    assert [k for k in before if not np.array_equal(before[k], after[k])] == []
    assert architecture(back)["names"] == "keras.applications"
    assert type(back).__name__ == type(source).__name__


@needs_keras
def test_a_weights_file_saved_by_keras_converts(tmp_path):
    source = _applications(True, None, classifier_activation="softmax")
    _randomise(source)
    path = str(tmp_path / "resnet50.weights.h5")
    source.save_weights(path)
    loaded = _applications(True, None, weights=path, classifier_activation="softmax")
    probabilities = _predict("keras", loaded)
    np.testing.assert_array_equal(probabilities, _predict("keras", source))
    for backend in ["keras", *OTHERS]:
        logits = _predict(backend, xfer.convert(loaded, backend))
        # xfer's models give logits: the softmax is not carried over.
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(
            exp / exp.sum(axis=1, keepdims=True), probabilities, atol=1e-5, rtol=0
        )


@needs_keras
def test_what_convert_cannot_map_is_refused_clearly():
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"cannot convert a keras\.src\..*Sequential.*it converts"):
        xfer.convert(other, "torch")
    with pytest.raises(ValueError, match=r"keras_applications=True builds.*small_cnn"):
        xfer.convert(xfer.models.small_cnn(3, backend="keras"), "keras", keras_applications=True)
    with pytest.raises(ValueError, match=r"needs a fixed image size.*input_shape=\(224, 224, 3\)"):
        xfer.convert(_resnet50_any_size(), "keras", keras_applications=True)
    with pytest.raises(ValueError, match=r"input_shape is for a ResNet-50"):
        xfer.convert(xfer.models.small_cnn(3, backend="keras"), "torch", input_shape=SHAPE)


# --- xfer's other reference models ------------------------------------------------------------


@pytest.mark.parametrize("source, target", _pairs(), ids=lambda name: name)
@pytest.mark.parametrize("builder", ["small_cnn", "resnet"])
def test_reference_models_convert_with_their_arguments(source, target, builder):
    if builder == "small_cnn":
        original = xfer.models.small_cnn(3, 1, width=4, dropout=0.3, backend=source)
    else:
        original = xfer.models.resnet(18, 3, 1, width=4, backend=source)
    _randomise(original)
    copy = xfer.convert(original, target)
    assert architecture(copy) == architecture(original)
    x = np.random.default_rng(1).normal(0.5, 1.0, (2, 16, 16, 1)).astype("float32")
    expected = _predict(source, original, x)
    np.testing.assert_allclose(_predict(target, copy, x), expected, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match=r"keras_applications=True builds"):
        xfer.convert(original, target, keras_applications=True)


def test_a_model_xfer_did_not_build_is_refused_with_what_is_supported():
    if "torch" not in FRAMEWORKS:
        pytest.skip("the refusal is shown on a torch module")
    from torch import nn

    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear \(torch\).*resnet50"):
        xfer.convert(nn.Linear(2, 3), "flax")
    with pytest.raises(ValueError, match=r"Unknown xfer backend 'tensorflow'"):
        xfer.convert(xfer.models.small_cnn(3, backend="torch"), "tensorflow")
