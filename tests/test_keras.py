"""Keras-specific guarantees, each beside the native behaviour it protects against.

Everything trains with Keras's own ``compile``/``fit``, called after the xfer calls as
Keras requires for any change of ``trainable``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S

# Every test takes the `kit` fixture, so none is collected without a Keras engine; keras
# itself is imported inside the tests (without KERAS_BACKEND it would pick tensorflow).
pytestmark = pytest.mark.backends("keras-jax", "keras-torch")

BN_UNITS = ("base.block1.bn", "base.block2.bn")
BN_STATS = ("moving_mean", "moving_variance")


def _moved(before, after, key) -> bool:
    return not np.array_equal(before[key], after[key])


def _inference_loss(model, x, y) -> float:
    import keras

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return float(keras.ops.convert_to_numpy(loss(y, model(x, training=False))))


def test_plain_keras_nested_training_false_does_not_protect_bn_statistics(kit):
    # The guide's recipe without xfer: base(x, training=False), train the head with
    # base.trainable=False, then base.trainable=True and fit again. fit's training=True
    # overrides the stored training=False, so the inner BN statistics move.
    model = kit.model()
    x, y = data()
    base = model.get_layer("base")
    base.trainable = False
    before = xfer.snapshot(model)
    kit.fit(model, x, y, epochs=1)
    after_head = xfer.snapshot(model)
    assert not any(_moved(before, after_head, f"{u}.{s}") for u in BN_UNITS for s in BN_STATS)

    base.trainable = True
    kit.fit(model, x, y, epochs=1)
    after = xfer.snapshot(model)
    assert all(_moved(after_head, after, f"{u}.{s}") for u in BN_UNITS for s in BN_STATS)


def test_xfer_freeze_then_unfreeze_keeps_bn_statistics_in_the_nested_case(kit):
    model = kit.model()
    x, y = data()
    xfer.freeze(model, S.path("base.**"))
    xfer.unfreeze(model, S.path("base.**"))
    assert {xfer.summary(model, print_fn=None).row(u).bn for u in BN_UNITS} == {"affine"}
    before = xfer.snapshot(model)
    kit.fit(model, x, y)
    after = xfer.snapshot(model)
    for unit in BN_UNITS:
        for stat in BN_STATS:
            np.testing.assert_array_equal(after[f"{unit}.{stat}"], before[f"{unit}.{stat}"])
        assert _moved(before, after, f"{unit}.gamma") and _moved(before, after, f"{unit}.beta")
    assert _moved(before, after, "base.block1.conv.kernel")
    assert _moved(before, after, "base.block2.conv.kernel")


def test_dropout_pinned_to_inference_is_off_under_training_true(kit):
    model = kit.model(dropout=0.9)
    x, _ = data()
    xfer.set_bn(model, "frozen")  # so only Dropout depends on `training`
    assert not np.allclose(kit.forward_train(model, x), kit.predict(model, x), atol=1e-3)
    xfer.set_mode(model, "inference", S.type("dropout"))
    np.testing.assert_allclose(
        kit.forward_train(model, x), kit.predict(model, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("pinned", [True, False])
def test_fit_loss_is_the_inference_loss_when_dropout_is_pinned(kit, pinned):
    # One full batch, one step: fit reports the loss of the forward pass before the update,
    # computed by Keras's (jit-compiled on jax) train step with training=True.
    model = kit.model(dropout=0.9)
    x, y = data()
    xfer.freeze(model, S.path("base.**"))
    if pinned:
        xfer.set_mode(model, "inference", S.type("dropout"))
    expected = _inference_loss(model, x, y)
    (loss,) = kit.fit(model, x, y, epochs=1, batch_size=len(x))
    assert np.isclose(loss, expected, rtol=1e-5) == pinned


def test_keras_save_keeps_trainable_natively_but_not_mode_pins(kit, tmp_path):
    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    xfer.set_bn(model, "affine", S.path("base.block2.**"))
    xfer.set_mode(model, "inference", S.type("dropout"))
    before = xfer.summary(model, print_fn=None)
    assert before.row("base.block2.bn").bn == "affine"
    assert before.row("head.drop").mode == "inference"

    loaded = kit.save_load(model, str(tmp_path))  # saving works with pins installed
    s = xfer.summary(loaded, print_fn=None)
    assert s.row("base.block1.bn").bn == "frozen"
    assert s.row("base.block1.conv").trainable == "no"
    assert s.row("head.dense").trainable == "yes"
    # Lost, as persistence() says: mode pins, and gamma/beta trainable under an inference BN.
    assert s.row("base.drop").mode == s.row("head.drop").mode == "inherit"
    assert s.row("base.block2.bn").bn == "frozen"
    assert "xfer.export_state" in s.persistence and "trainable" in s.persistence


def test_set_backend_keras_and_the_adapter_is_found_under_either_engine(kit):
    import keras

    xfer.set_backend("keras")
    assert xfer.get_backend() == "keras"
    model = kit.model()
    adapter = xfer._adapter.find_adapter(model)
    assert adapter.name == "keras" and adapter is xfer._adapter.load_adapter("keras")
    if keras.backend.backend() == "torch":
        import torch

        # Every Keras layer is also a torch Module here; Keras must still win.
        assert isinstance(model, torch.nn.Module)
        with xfer.backend_context("torch"):
            assert xfer._adapter.find_adapter(model).name == "keras"
    assert kit.id == f"keras-{os.environ['KERAS_BACKEND']}"


def test_a_pin_on_a_container_alone_does_not_reach_its_children(kit):
    # Functional/Sequential forward `training` to every child explicitly, so rewriting a
    # container's `training` would pin its whole subtree; like a torch container's flag,
    # the pin is recorded and its children follow the call. S.path("base.**") pins them.
    model = kit.model()
    x, _ = data()
    xfer.set_mode(model, "inference", S.path("base"))
    assert xfer.summary(model, print_fn=None).row("base").mode == "inference"
    before = xfer.snapshot(model)
    kit.forward_train(model, x)
    assert _moved(before, xfer.snapshot(model), "base.block1.bn.moving_mean")


def test_unfreeze_inside_a_natively_frozen_model_reaches_the_optimizer(kit):
    # Keras: a model with trainable=False has no trainable_variables, whatever the flags of
    # the variables below it; fit() would train nothing.
    model = kit.model()
    x, y = data()
    model.trainable = False
    xfer.unfreeze(model, S.path("head.dense"))
    assert model.trainable and model.get_layer("head").trainable
    assert not model.get_layer("base").trainable
    before = xfer.snapshot(model)
    kit.fit(model, x, y, epochs=1)
    after = xfer.snapshot(model)
    assert _moved(before, after, "head.dense.kernel")
    assert not _moved(before, after, "base.block1.conv.kernel")


def test_bn_pinned_to_train_and_dropout_pins_work_under_fit(kit):
    model = kit.model()
    x, y = data()
    xfer.freeze(model, S.path("base.**"), bn=None)
    xfer.set_mode(model, "train", S.bn())
    xfer.set_mode(model, "inference", S.type("dropout"))
    before = xfer.snapshot(model)
    losses = kit.fit(model, x, y, epochs=1)
    after = xfer.snapshot(model)
    assert np.isfinite(losses).all()
    assert _moved(before, after, "base.block1.bn.moving_mean")
    assert not _moved(before, after, "base.block1.bn.gamma")


def test_native_trainable_setter_after_xfer_overrides_bn_and_summary_tells(kit):
    # Keras's setter recurses and sets BN's own `trainable`, which is its frozen-statistics
    # switch: after `base.trainable = True` the BN statistics update again. xfer reads the
    # native state, so the summary shows it; call pins on other layers are untouched.
    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    xfer.set_mode(model, "inference", S.type("dropout"))
    model.get_layer("base").trainable = True
    s = xfer.summary(model, print_fn=None)
    assert {s.row(u).bn for u in BN_UNITS} == {"train"}
    assert s.row("base.drop").mode == "inference"
    assert "bn-stats-update-under-frozen-affine" not in {f.code for f in xfer.audit(model)}


def test_snapshot_names_and_parameter_counts(kit):
    model = kit.model()
    snap = xfer.snapshot(model)
    assert set(snap) == {
        *(f"base.block{i}.conv.{n}" for i in (1, 2) for n in ("kernel", "bias")),
        *(f"{u}.{n}" for u in BN_UNITS for n in ("gamma", "beta", *BN_STATS)),
        "head.dense.kernel",
        "head.dense.bias",
    }
    assert snap["base.block1.conv.kernel"].shape == (3, 3, 3, 8)  # HWIO, the neutral layout
    counts = {r.path: (r.n_trainable, r.n_frozen) for r in xfer.summary(model, print_fn=None).rows}
    assert counts["base.block1.bn"] == (16, 0)  # moving statistics are not parameters


def _dotted_model():
    import keras

    inner = keras.Sequential(
        [keras.layers.Dense(4, name="dense"), keras.layers.BatchNormalization(name="bn")],
        name="a.b",
    )
    inputs = keras.Input((3,))
    nested = keras.Model(inputs, keras.layers.Dense(2, name="out")(inner(inputs)), name="m")
    return nested


# Keras on torch cannot build such a model at all (torch refuses "." in parameter names).
@pytest.mark.backends("keras-jax")
def test_state_ops_work_on_layers_whose_names_have_a_dot(kit):
    # _parents used to walk the dotted path and raise a bare StopIteration after the
    # first unit had changed.
    model = _dotted_model()
    xfer.freeze(model, S.all())
    xfer.unfreeze(model, S.all())
    assert all(e["trainable"] in (True, None) for e in xfer.export_state(model)["units"].values())
    assert model.trainable_weights
    xfer.set_bn(model, "frozen")
    xfer.set_bn(model, "affine")
    bns = [u for u in xfer._adapter.find_adapter(model).units(model) if u.is_bn]
    assert bns and all(u.native.gamma.trainable for u in bns)
