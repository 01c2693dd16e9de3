"""``xfer.models.resnet``: the same unit paths, neutral weights and logits on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from test_weights import _pairs

import xfer
from xfer import select as S
from xfer._adapter import load_adapter

NUM_CLASSES, WIDTH, IN_CHANNELS = 4, 8, 3
# Units, neutral variables and their total size (moving statistics included), at width 8.
COUNTS = {18: (60, 102, 178_172), 50: (135, 267, 381_820)}
TRAINABLE = {18: 176_972, 50: 375_180}


def _backend(kit) -> str:
    return kit.id.split("-")[0]


def _build(backend: str, depth: int, seed: int = 0):
    return xfer.models.resnet(
        depth, NUM_CLASSES, IN_CHANNELS, width=WIDTH, seed=seed, backend=backend
    )


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(0.5, 2.0, (n, 32, 32, IN_CHANNELS)).astype("float32")


def expected_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """The neutral {name: shape} of the classic ResNet, written out from its definition."""
    shapes: dict[str, tuple[int, ...]] = {}

    def unit(conv: str, bn: str, kernel: int, c_in: int, c_out: int) -> None:
        shapes[f"{conv}.kernel"] = (kernel, kernel, c_in, c_out)
        for leaf in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"{bn}.{leaf}"] = (c_out,)

    unit("base.stem.conv", "base.stem.bn", 7, IN_CHANNELS, WIDTH)
    counts = (2, 2, 2, 2) if depth == 18 else (3, 4, 6, 3)
    expansion = 1 if depth == 18 else 4
    c_in = WIDTH
    for i, count in enumerate(counts):
        planes = WIDTH * 2**i
        c_out = planes * expansion
        for j in range(count):
            b = f"base.layer{i + 1}.{j}"
            if depth == 18:
                unit(f"{b}.conv1", f"{b}.bn1", 3, c_in, planes)
                unit(f"{b}.conv2", f"{b}.bn2", 3, planes, planes)
            else:
                unit(f"{b}.conv1", f"{b}.bn1", 1, c_in, planes)
                unit(f"{b}.conv2", f"{b}.bn2", 3, planes, planes)
                unit(f"{b}.conv3", f"{b}.bn3", 1, planes, c_out)
            if (i > 0 and j == 0) or c_in != c_out:
                unit(f"{b}.downsample.conv", f"{b}.downsample.bn", 1, c_in, c_out)
            c_in = c_out
    shapes["head.dense.kernel"] = (c_in, NUM_CLASSES)
    shapes["head.dense.bias"] = (NUM_CLASSES,)
    return shapes


@pytest.mark.parametrize("depth", [18, 50])
def test_paths_and_weights_are_the_same_on_every_backend(kit, depth):
    model = _build(_backend(kit), depth)
    rows = xfer.summary(model, print_fn=None).rows
    paths = [r.path for r in rows]
    n_units, n_names, n_values = COUNTS[depth]
    assert len(paths) == n_units
    kinds = {r.path: r.kind for r in rows}
    for path, kind in {
        "base.stem.conv": "conv",
        "base.stem.bn": "batchnorm",
        "base.layer1.0.conv1": "conv",
        "base.layer1.1.bn2": "batchnorm",
        "base.layer2.0.downsample.conv": "conv",
        "base.layer4.1.conv2": "conv",
        "base.pool": "other",
        "head.dense": "dense",
    }.items():
        assert kinds[path] == kind, path
    assert paths[:6] == [
        "base",
        "base.stem",
        "base.stem.conv",
        "base.stem.bn",
        "base.layer1",
        "base.layer1.0",
    ]
    assert paths[-3:] == ["base.pool", "head", "head.dense"]
    assert ("base.layer1.0.downsample" in paths) == (depth == 50)
    assert ("base.layer1.0.conv3" in paths) == (depth == 50)
    shapes = {k: v.shape for k, v in xfer.export_weights(model).items()}
    assert shapes == expected_shapes(depth)
    assert len(shapes) == n_names
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_values


def test_bad_arguments_are_a_clear_error():
    with pytest.raises(ValueError, match=r"depth must be one of 18, 50, got 34"):
        xfer.models.resnet(34, 10)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2, got 1"):
        xfer.models.resnet(18, 1)
    with pytest.raises(ValueError, match=r"width must be an integer >= 1, got 0"):
        xfer.models.resnet(18, 10, width=0)
    with pytest.raises(ValueError, match=r"in_channels must be an integer >= 1"):
        xfer.models.resnet(50, 10, in_channels=True)


@pytest.mark.parametrize("depth", [18, 50])
def test_freezing_the_base_freezes_every_base_parameter(kit, depth):
    model = _build(_backend(kit), depth)
    xfer.freeze(model, S.path("base.**"))
    xfer.set_bn(model, "frozen")
    s = xfer.summary(model, print_fn=None)
    head = NUM_CLASSES * (WIDTH * 8 * (1 if depth == 18 else 4) + 1)
    assert s.n_frozen == TRAINABLE[depth] - head
    assert s.n_trainable == head
    assert {r.bn for r in s.rows if r.kind == "batchnorm"} == {"frozen"}
    assert all(r.n_trainable == 0 for r in s.rows if r.path.startswith("base"))


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("source, target", _pairs(), ids=lambda name: name)
def test_weights_move_between_frameworks_with_the_same_logits(source, target, depth):
    original = _build(source, depth, seed=0)
    # BN statistics and affine values away from 0/1, so that their layouts show.
    weights = xfer.export_weights(original)
    rng = np.random.default_rng(0)
    for key in weights:
        if key.endswith(("moving_mean", "beta")):
            weights[key] = rng.uniform(-0.5, 0.5, weights[key].shape).astype("float32")
        elif key.endswith("moving_variance"):
            weights[key] = rng.uniform(0.5, 1.5, weights[key].shape).astype("float32")
        elif key.endswith("gamma"):
            weights[key] = rng.uniform(0.5, 1.5, weights[key].shape).astype("float32")
    xfer.import_weights(original, weights)
    copy = _build(target, depth, seed=1)
    xfer.import_weights(copy, xfer.export_weights(original))
    x = _images()
    expected = load_adapter(source).predict(original, x)
    got = load_adapter(target).predict(copy, x)
    assert np.abs(expected).max() > 1e-2  # not a degenerate all-zero comparison
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_resnet_survives_a_keras_file(kit, tmp_path):
    import keras

    model = _build("keras", 18)
    xfer.freeze(model, S.path("base.layer1.**"))
    xfer.set_bn(model, "frozen", S.path("base.stem.**"))
    path = str(tmp_path / "resnet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _images()
    np.testing.assert_allclose(kit.predict(loaded, x), kit.predict(model, x), atol=1e-6)
    assert [r.path for r in xfer.summary(loaded, print_fn=None).rows] == [
        r.path for r in xfer.summary(model, print_fn=None).rows
    ]
    assert xfer.export_state(loaded) == xfer.export_state(model)
