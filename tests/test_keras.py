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


# --- The private Keras API the backend relies on -------------------------------------------
# backends/keras/units.py ("Keras private API") and engine.scale_learning_rates use a few
# Keras internals for want of a public API. Each test below fails, naming the internal,
# when a Keras release changes what the backend relies on; KERAS_TESTED is the range they
# passed on.


def test_the_installed_keras_is_in_the_range_the_private_api_was_checked_for(kit):
    import keras

    from xfer.backends.keras import KERAS_TESTED, untested_keras

    assert untested_keras(keras.__version__) is None, (
        f"Keras {keras.__version__} is outside KERAS_TESTED={KERAS_TESTED}: once the "
        "test_private_keras_* tests pass on it, widen the range"
    )
    message = untested_keras("3.16.0")
    assert "Keras 3.16.0 is outside" in message and ">= 3.8, < 3.16" in message
    assert untested_keras("3.7.1") and untested_keras("3.16.0.dev2026") and untested_keras("4.0")


def test_private_keras_own_variable_lists_keep_the_flag_a_variable_was_created_with(kit):
    import keras

    from xfer.backends.keras import units

    bn = keras.layers.BatchNormalization()
    bn.build((None, 4))
    bn.gamma.trainable = False  # a frozen parameter is still a parameter
    params, buffers = units.tracked_variables(bn)
    assert [v.name for v in params] == ["gamma", "beta"], "Layer._trainable_variables changed"
    assert [v.name for v in buffers] == ["moving_mean", "moving_variance"], (
        "Layer._non_trainable_variables changed"
    )
    model = keras.Sequential([keras.Input((4,)), bn])
    assert units.tracked_variables(model) == ([], []), "they now hold sublayers' variables"


def test_private_keras_sublayers_of_a_plain_layer(kit):
    import keras

    from xfer.backends.keras import units

    class Pair(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(2)
            self.second = keras.layers.Dense(2)

    pair = Pair()
    assert units.children(pair) == [pair.first, pair.second], "Layer._layers changed"
    dense = keras.layers.Dense(2)
    assert units.children(keras.Sequential([keras.Input((3,)), dense])) == [dense]


def test_private_keras_own_trainable_flag_without_the_setters_recursion(kit):
    import keras

    from xfer.backends.keras import units

    x = data()[0].reshape(-1, 3)
    bn = keras.layers.BatchNormalization()
    bn.build(x.shape)
    units.set_own_trainable(bn, False)
    assert not bn.trainable, "Layer._trainable no longer backs Layer.trainable"
    assert bn.gamma.trainable and bn.beta.trainable, "the variables' flags changed with it"
    mean = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(bn(x, training=True)),
        keras.ops.convert_to_numpy(bn(x, training=False)),
        err_msg="BN with its own trainable False no longer runs in inference",
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), mean)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    units.set_own_trainable(model, False)
    assert model.layers[0].trainable and not model.trainable_variables
    units.set_own_trainable(model, True)
    assert len(model.trainable_variables) == 2, "a model's own flag no longer gates its variables"


def test_private_keras_the_call_that_made_a_symbolic_tensor(kit):
    import keras

    from xfer.backends.keras import units

    shared = keras.layers.Dense(2)
    first = keras.Input((3,))
    shared(first)  # its first call, in another graph
    inputs = keras.Input((3,))
    operation, called_on = units.producer(shared(inputs))
    assert operation is shared and len(called_on) == 1 and called_on[0] is inputs, (
        "KerasTensor._keras_history or Operation._inbound_nodes changed"
    )
    assert shared.input is first  # why the public Operation.input does not do


def test_private_keras_optimizer_update_step_takes_a_learning_rate_per_group(kit):
    import keras

    from xfer.backends.keras import engine

    a, b = (keras.Variable(np.ones(3, "float32")) for _ in range(2))
    for optimizer in (keras.optimizers.SGD(0.1), keras.optimizers.Adam(0.1)):
        # Adam's first step is lr * sign(gradient): a rate, not a gradient, was scaled.
        engine.scale_learning_rates(optimizer, {id(b): 3.0})
        before = [keras.ops.convert_to_numpy(v).copy() for v in (a, b)]
        optimizer.apply_gradients([(keras.ops.ones(3), a), (keras.ops.ones(3), b)])
        moved = [before[i] - keras.ops.convert_to_numpy(v) for i, v in enumerate((a, b))]
        np.testing.assert_allclose(
            moved,
            [np.full(3, 0.1), np.full(3, 0.3)],
            rtol=1e-4,
            err_msg=f"{type(optimizer).__name__}._backend_update_step no longer takes every "
            "variable's update with the learning rate",
        )


def test_private_keras_module_layout_that_mode_free_reads(kit):
    import keras

    from xfer.backends.keras import units

    L = keras.layers
    dependent = [L.BatchNormalization, L.Dropout, L.LSTM, L.MultiHeadAttention, L.RandomFlip]
    for prefix in units.MODE_DEPENDENT:
        assert any(c.__module__.startswith(prefix) for c in dependent), f"{prefix} moved"
    for layer in (L.Conv2D, L.Dense, L.GlobalAveragePooling2D, L.ReLU, L.LayerNormalization):
        module = layer.__module__
        assert module.startswith("keras.src.layers.") and not module.startswith(
            units.MODE_DEPENDENT
        ), f"{layer.__name__} is in {module}"
    model = kit.model()
    assert type(model).__module__.startswith("keras.src.models.")
    found = {u.path: u for u in units.units(model)}
    assert units.mode_free(found["base.block1"]) and not units.mode_free(found["base.block1.bn"])


def test_output_shape_is_read_from_a_built_model_and_traced_for_any_other(kit):
    # A functional model's output shape is Keras's own, computed when it was built (no
    # trace); a subclassed model, or an input the model does not declare, is traced.
    import keras

    from xfer.backends.keras.engine import _declared_output_shape, output_shape, predict

    model = kit.model()
    x, _ = data(3)
    assert _declared_output_shape(model, x) == predict(model, x).shape == (3, 4)
    assert _declared_output_shape(model, x[..., :2]) is None  # 2 channels, 3 declared

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(5)

        def call(self, inputs):
            return self.dense(keras.ops.mean(inputs, axis=(1, 2)))

    subclassed = Subclassed()
    assert _declared_output_shape(subclassed, x) is None
    assert output_shape(subclassed, x) == (3, 5)
