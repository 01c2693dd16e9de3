"""Flax NNX models written as users write them, trained with NNX's own loop after the xfer
calls: nested modules, layers in ``nnx.List`` / ``nnx.data([...])`` / ``nnx.Dict``,
``nnx.Sequential``, and a ``__call__`` that passes ``use_running_average=`` and
``deterministic=`` explicitly (the Flax way of writing ``training=``).

Each test asserts on values: frozen tensors bit-identical, BN moving statistics of a pinned
BN unchanged, Dropout in a pinned unit off, unit paths equal to NNX's own
``nnx.iter_modules`` paths. Also: an ``nnx.Optimizer`` built before ``xfer.freeze`` fails
with an error that names the fix.
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import select as S
from xfer._adapter import find_adapter

pytestmark = pytest.mark.backends("flax")

nnx = pytest.importorskip("flax.nnx")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

NUM_CLASSES = 3


class ConvBlock(nnx.Module):
    """conv-BN-ReLU-Dropout, the mode passed explicitly as many Flax examples do."""

    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, c_out, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, train: bool):
        x = self.bn(self.conv(x), use_running_average=not train)
        return self.drop(nnx.relu(x), deterministic=not train)


class Stage(nnx.Module):
    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.blocks = nnx.List([ConvBlock(c_in, c_out, rngs), ConvBlock(c_out, c_out, rngs)])

    def __call__(self, x, train: bool):
        for block in self.blocks:
            x = block(x, train)
        return x


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Sequential(
            nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        )
        # nnx.data marks a plain list as data: Flax 0.12 refuses a bare list of modules.
        self.stages = nnx.data([Stage(4, 8, rngs), Stage(8, 8, rngs)])

    def __call__(self, x, train: bool):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x, train)
        return x.mean(axis=(1, 2))


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.encoder = Encoder(rngs)
        self.heads = nnx.Dict({"digits": nnx.Linear(8, NUM_CLASSES, rngs=rngs)})

    def __call__(self, x, train: bool = True):
        return self.heads["digits"](self.encoder(x, train))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, size=(8, 12, 12, 3)).astype("float32")
    return x, (np.arange(8) % NUM_CLASSES).astype("int32")


def _train(model: Classifier, steps: int = 3) -> list[float]:
    """The NNX tutorial loop: optimizer over nnx.Param, model.train(), value_and_grad, update."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    x, y = _data()
    return [float(step(model, optimizer, x, y)) for _ in range(steps)]


def test_unit_paths_are_nnx_attribute_paths():
    model = Classifier(nnx.Rngs(0))
    summary = xfer.summary(model, print_fn=None)
    nnx_paths = {".".join(map(str, path)) for path, _ in nnx.iter_modules(model)} - {""}
    assert {row.path for row in summary.rows} == nnx_paths
    assert "encoder.stages.1.blocks.0.bn" in nnx_paths and "heads.digits" in nnx_paths
    assert "encoder.stem.layers.1" in nnx_paths


def test_glob_on_digit_segments_selects_the_framework_paths():
    model = Classifier(nnx.Rngs(0))
    xfer.freeze(model, S.path("encoder.stages.1.**"))
    frozen = {r.path for r in xfer.summary(model, print_fn=None).rows if r.trainable == "no"}
    assert frozen == {
        "encoder.stages.1.blocks.0.conv",
        "encoder.stages.1.blocks.0.bn",
        "encoder.stages.1.blocks.1.conv",
        "encoder.stages.1.blocks.1.bn",
    }
    adapter = find_adapter(model)
    assert len(S.name("bn")(adapter.units(model))) == 4  # the blocks' BN, not the stem's
    assert [u.path for u in S.path("encoder.stem.layers.1")(adapter.units(model))] == [
        "encoder.stem.layers.1"
    ]


@pytest.mark.parametrize("policy", ["frozen", "affine"])
def test_pinned_bn_keeps_its_statistics_through_explicit_use_running_average(policy):
    model = Classifier(nnx.Rngs(0))
    xfer.freeze(model, S.path("encoder.**"))
    xfer.set_bn(model, policy, S.path("encoder.**"))
    keys = xfer.frozen_tensors(model)
    assert any(k.endswith("bn.mean") for k in keys) and any(k.endswith("bn.var") for k in keys)
    before = xfer.snapshot(model)
    losses = _train(model)
    after = xfer.snapshot(model)
    assert np.isfinite(losses).all()
    assert xfer.changed_tensors(before, after, keys) == []
    # The head trained; the encoder's BN scale trains only under "affine".
    assert xfer.changed_tensors(before, after, ["heads.digits.kernel"]) == ["heads.digits.kernel"]
    scale = "encoder.stages.0.blocks.0.bn.scale"
    assert bool(xfer.changed_tensors(before, after, [scale])) == (policy == "affine")


def test_unpinned_bn_does_update_its_statistics_in_the_same_loop():
    """The control: without the pin, the same loop moves the statistics."""
    model = Classifier(nnx.Rngs(0))
    # Freezing a BN unit pins it as Keras's trainable=False does: leave BN out of the freeze.
    xfer.freeze(model, S.path("encoder.**") & ~S.bn())
    before = xfer.snapshot(model)
    _train(model)
    moved = xfer.changed_tensors(before, xfer.snapshot(model), ["encoder.stem.layers.1.mean"])
    assert moved == ["encoder.stem.layers.1.mean"]


def test_dropout_in_a_pinned_unit_is_off_even_when_called_with_train_true():
    model = Classifier(nnx.Rngs(0))
    x, _ = _data()
    model.train()
    first, second = model(x, train=True), model(x, train=True)
    assert not np.array_equal(np.asarray(first), np.asarray(second))  # dropout is on
    xfer.set_mode(model, "inference", S.path("encoder.**"))
    model.train()  # NNX's own switch: the pin outlasts it
    first, second = model(x, train=True), model(x, train=True)
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_optimizer_built_before_freeze_names_the_fix():
    from xfer.backends.flax.engine import StaleOptimizer

    model = Classifier(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)  # too early
    xfer.freeze(model, S.path("encoder.**"))
    x, y = _data()

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    grads = nnx.grad(loss_fn)(model)
    with pytest.raises(StaleOptimizer, match="built before xfer changed what trains") as error:
        optimizer.update(model, grads)
    assert "Build the optimizer after xfer.freeze" in str(error.value)
    assert isinstance(error.value.__cause__, ValueError)  # JAX's own error stays chained
    # Built after the xfer calls, the same update goes through.
    nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param).update(model, grads)


def test_optimizer_built_before_unfreeze_inside_jit_names_the_fix():
    from xfer.backends.flax.engine import StaleOptimizer

    model = Classifier(nnx.Rngs(0))
    xfer.freeze(model, S.path("encoder.**"))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    xfer.unfreeze(model, S.path("encoder.stages.1.**"))
    x, y = _data()

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss_fn)(model))

    with pytest.raises(StaleOptimizer, match="wrt=Param"):
        step(model, optimizer)


def test_errors_that_are_not_a_stale_optimizer_pass_through_unchanged():
    from xfer.backends.flax.engine import StaleOptimizer

    model = Classifier(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(Exception) as error:  # gradients of another model's shape
        optimizer.update(model, nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param))
    assert not isinstance(error.value, StaleOptimizer)
