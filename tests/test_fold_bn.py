"""xfer.fold_bn on every backend: the deploy copy computes what the model computes in
inference, with no BatchNorm left after a conv or dense layer, and the model is untouched.

The models are xfer's own (small_cnn, ResNet-18, ResNet-50) with BN statistics, gamma and
beta moved away from their initial 0/1/1/0 (so a missing or wrong fold shows in the logits).
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import select as S
from xfer._adapter import find_adapter

BN_ROLES = {
    "moving_mean": (0.0, 0.5),
    "moving_variance": None,
    "gamma": (1.0, 0.2),
    "beta": (0.0, 0.2),
}


def _with_moved_statistics(model, seed=0):
    rng = np.random.default_rng(seed)
    weights = xfer.export_weights(model)
    for name, value in weights.items():
        role = name.rsplit(".", 1)[-1]
        if role == "moving_variance":
            weights[name] = rng.uniform(0.5, 2.0, value.shape).astype(value.dtype)
        elif BN_ROLES.get(role):
            centre, spread = BN_ROLES[role]
            weights[name] = rng.normal(centre, spread, value.shape).astype(value.dtype)
    xfer.import_weights(model, weights)
    return model


def _bn_paths(model):
    return [u.path for u in find_adapter(model).units(model) if u.is_bn]


def _backend(kit):
    return kit.id.split("-")[0]


MODELS = {
    "small_cnn": (
        lambda backend: xfer.models.small_cnn(4, 3, width=8, seed=0, backend=backend),
        16,
    ),
    "resnet18": (
        lambda backend: xfer.models.resnet(18, 4, 3, width=8, seed=0, backend=backend),
        32,
    ),
    "resnet50": (
        lambda backend: xfer.models.resnet50(4, input_shape=(32, 32, 3), seed=0, backend=backend),
        32,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_folded_copy_gives_the_models_inference_logits_without_batchnorm(kit, name):
    build, size = MODELS[name]
    model = _with_moved_statistics(build(_backend(kit)))
    x = np.random.default_rng(1).normal(0.5, 2.0, (4, size, size, 3)).astype("float32")
    expected = kit.predict(model, x)
    before = xfer.snapshot(model)
    folded = xfer.fold_bn(model)
    got = kit.predict(folded, x)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert _bn_paths(folded) == []
    assert xfer.changed_tensors(before, xfer.snapshot(model), list(before)) == []
    assert len(_bn_paths(model)) > 0  # the model keeps its BNs


def test_the_model_keeps_its_pins_and_its_mode(kit):
    model = _with_moved_statistics(kit.model(dropout=0.0))
    xfer.set_bn(model, "frozen")
    adapter = find_adapter(model)
    pins = {u.path: adapter.get_mode(u) for u in adapter.units(model)}
    kit.fit(model, *_data(), epochs=1)  # the framework's own loop leaves torch/NNX in train mode
    modes = {u.path: adapter.current_mode(u) for u in adapter.units(model)}
    xfer.fold_bn(model)
    assert {u.path: adapter.get_mode(u) for u in adapter.units(model)} == pins
    assert {u.path: adapter.current_mode(u) for u in adapter.units(model)} == modes


def test_a_bn_pinned_to_train_is_refused_naming_it_and_nothing_changes(kit):
    model = kit.model(dropout=0.0)
    xfer.set_mode(model, "train", where=S.path("base.block2.bn"))
    before = xfer.snapshot(model)
    with pytest.raises(ValueError, match=r"pinned to 'train' \(base\.block2\.bn\)"):
        xfer.fold_bn(model)
    assert xfer.changed_tensors(before, xfer.snapshot(model), list(before)) == []


def test_where_folds_only_the_selected_bn_and_warns_about_none(kit, recwarn):
    model = _with_moved_statistics(kit.model(dropout=0.0))
    x = _data()[0]
    folded = xfer.fold_bn(model, where=S.path("base.block1.bn"))
    assert _bn_paths(folded) == ["base.block2.bn"]
    assert np.abs(kit.predict(folded, x) - kit.predict(model, x)).max() <= 1e-5
    assert not [w for w in recwarn if "fold_bn" in str(w.message)]


def test_selecting_a_layer_that_is_not_batchnorm_is_refused(kit):
    with pytest.raises(xfer.SelectionError, match="not BatchNorm .*base.block1.conv"):
        xfer.fold_bn(kit.model(), where=S.path("base.block1.conv"))


def _data():
    from kits import data

    return data(16)
