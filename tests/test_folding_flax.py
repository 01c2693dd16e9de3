"""xfer.fold_bn on Flax NNX: xfer's models and models written as users write them.

The BN statistics, scale and bias are moved away from 0/1 first, so that a fold that
forgot a term (or folded the wrong BN) is off by far more than the tolerance. Each test
asserts the copy's eval() logits against the model's, what is left of BatchNorm in the
copy, and that the model itself is exactly as it was: every variable's value and type,
every module's class (its pin) and mode attributes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import xfer
from xfer import select as S

pytestmark = pytest.mark.backends("flax")

nnx = pytest.importorskip("flax.nnx")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from xfer.backends.flax import Frozen  # noqa: E402
from xfer.backends.flax.folding import FoldedBatchNorm  # noqa: E402

MODES = ("use_running_average", "deterministic")


def _perturbed(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            c = module.mean.shape[-1]
            for variable, value in (
                (module.mean, rng.normal(0.0, 0.5, c)),
                (module.var, rng.uniform(0.3, 3.0, c)),
                (module.scale, rng.uniform(0.5, 1.5, c)),
                (module.bias, rng.normal(0.0, 0.5, c)),
            ):
                if variable is not None:
                    variable[...] = jnp.asarray(value, variable[...].dtype)
    return model


def _images(shape=(32, 32, 3), n=3, seed=2):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _state(model):
    """Everything fold_bn must leave as it was: values, variable types, classes, modes."""
    values = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        values[path] = (type(variable), np.asarray(value))
    modules = [
        (path, type(m), {a: vars(m)[a] for a in MODES if a in vars(m)})
        for path, m in nnx.iter_modules(model)
    ]
    return values, modules


def _assert_same(before, after):
    (values, modules), (values_after, modules_after) = before, after
    assert modules_after == modules
    assert values_after.keys() == values.keys()
    for path, (kind, value) in values.items():
        kind_after, value_after = values_after[path]
        assert kind_after is kind, path
        assert value_after.dtype == value.dtype and np.array_equal(value_after, value), path


def _eval_logits(model, x, *, set_eval=True):
    """The logits in eval() (with ``set_eval``; else in the model's own modes), of a merged
    copy under jit: one compilation instead of one per operation, and the model's own
    modes and variables stay as they are."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        if set_eval:
            module.eval()
        return module(x)

    return np.asarray(jax.jit(forward)(state, x))


def _batchnorms(model):
    return [
        ".".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)
    ]


def _fold_and_check(model, x, tolerance=1e-5):
    before = _state(model)
    expected = _eval_logits(model, x)
    folded = xfer.fold_bn(model)
    _assert_same(before, _state(model))
    assert all(vars(m).get(a, True) for _, m in nnx.iter_modules(folded) for a in MODES)
    difference = float(np.max(np.abs(_eval_logits(folded, x, set_eval=False) - expected)))
    assert difference <= tolerance, difference
    return folded, difference


# --- xfer's models ---------------------------------------------------------------------


@functools.cache
def _built(builder: str):
    # Building (eager initialisation) takes far longer than folding: once per model here,
    # and each test gets its own copy.
    return {
        "small_cnn": lambda: xfer.models.small_cnn(4, 3, width=8, backend="flax"),
        "resnet18": lambda: xfer.models.resnet(18, 4, width=8, backend="flax"),
        "resnet50": lambda: xfer.models.resnet50(4, backend="flax"),
    }[builder]()


def _small_cnn():
    return nnx.clone(_built("small_cnn"))


def _resnet18():
    return nnx.clone(_built("resnet18"))


def _resnet50():
    return nnx.clone(_built("resnet50"))


@pytest.mark.parametrize("build", [_small_cnn, _resnet18, _resnet50], ids=lambda b: b.__name__[1:])
def test_xfer_models_fold_every_bn_and_keep_their_logits(build):
    model = _perturbed(build())
    model.train()  # the copy is in eval() whatever mode the model was left in
    bns = _batchnorms(model)
    folded, _ = _fold_and_check(model, _images())
    assert _batchnorms(folded) == []
    bn_modes = [
        m.use_running_average for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)
    ]
    assert not any(bn_modes)  # the model is still in train()
    identities = {
        ".".join(map(str, p)): m.folded_into
        for p, m in nnx.iter_modules(folded)
        if isinstance(m, FoldedBatchNorm)
    }
    assert sorted(identities) == sorted(bns)
    # Each BN folded into the conv beside it: base.block1.bn into base.block1.conv, etc.
    for bn, layer in identities.items():
        assert layer.rsplit(".", 1)[0] == bn.rsplit(".", 1)[0]
        assert layer.rsplit(".", 1)[1] == bn.rsplit(".", 1)[1].replace("bn", "conv")


def test_pins_and_frozen_variables_stay_on_the_model_and_the_frozen_bns_fold():
    model = _perturbed(_small_cnn())
    xfer.freeze(model, S.path("base.**"))  # BN frozen (pinned to inference), convs Frozen
    xfer.set_mode(model, "inference", S.path("head.**"))
    folded, _ = _fold_and_check(model, _images())
    assert _batchnorms(folded) == []
    # The folded conv keeps its trainability: a frozen conv stays frozen in the copy.
    assert isinstance(folded.base.block1.conv.kernel, Frozen)
    assert isinstance(folded.base.block1.conv.bias, Frozen)


def test_a_bn_pinned_to_train_is_refused_and_the_model_left_as_it_was():
    model = _perturbed(_small_cnn())
    xfer.set_mode(model, "train", S.path("base.block2.bn"))
    before = _state(model)
    with pytest.raises(ValueError, match="pinned to 'train'.*base.block2.bn"):
        xfer.fold_bn(model)
    _assert_same(before, _state(model))


def test_a_bn_with_the_train_policy_follows_eval_and_folds():
    # On NNX, set_bn("train") leaves the BN unpinned (stats="update" follows model.train()),
    # so in the copy's eval() it uses its moving statistics like any other.
    model = _perturbed(_small_cnn())
    xfer.set_bn(model, "train")
    folded, _ = _fold_and_check(model, _images())
    assert _batchnorms(folded) == []


def test_where_folds_only_the_selected_bns():
    model = _perturbed(_small_cnn())
    folded = xfer.fold_bn(model, where=S.path("base.block1.**") & S.bn())
    assert _batchnorms(folded) == ["base.block2.bn"]
    x = _images()
    np.testing.assert_allclose(np.asarray(folded(x)), _eval_logits(model, x), atol=1e-5)


# --- models written as users write them ---------------------------------------------------


class UserNet(nnx.Module):
    """Conv -> BatchNorm -> relu -> mean -> Linear, the conv without a bias."""

    def __init__(self, rngs, use_bias=False):
        self.conv = nnx.Conv(3, 6, (3, 3), use_bias=use_bias, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.dense = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


@pytest.mark.parametrize("use_bias", [False, True])
def test_a_user_conv_bn_model_folds_and_gets_a_bias(use_bias):
    model = _perturbed(UserNet(nnx.Rngs(0), use_bias=use_bias))
    folded, _ = _fold_and_check(model, _images())
    assert _batchnorms(folded) == [] and isinstance(folded.bn, FoldedBatchNorm)
    assert folded.conv.use_bias and isinstance(folded.conv.bias, nnx.Param)
    assert model.conv.use_bias is use_bias and (model.conv.bias is None) is not use_bias


def test_the_folded_copy_runs_eagerly_and_under_nnx_jit_alike():
    model = _perturbed(UserNet(nnx.Rngs(0)))
    folded = xfer.fold_bn(model)
    x = _images()
    jitted = nnx.jit(lambda m, x: m(x))(folded, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(folded(x)), rtol=1e-5, atol=1e-5)


class DenseNet(nnx.Module):
    """Linear -> BatchNorm on (batch, features), in an nnx.List, and a BN after a mean."""

    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)])
        self.out = nnx.Linear(4, 2, rngs=rngs)
        self.after_mean = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        y = self.out(nnx.relu(x))
        return self.after_mean(y - y.mean(axis=-1, keepdims=True))


def test_a_dense_bn_in_a_list_folds_and_a_bn_after_a_mean_stays_with_a_warning():
    model = _perturbed(DenseNet(nnx.Rngs(0)))
    with pytest.warns(UserWarning, match=r"1 BatchNorm unit\(s\).*after_mean"):
        folded, _ = _fold_and_check(model, _images((5,)))
    assert _batchnorms(folded) == ["after_mean"]
    assert isinstance(folded.layers[1], FoldedBatchNorm)


class SharedOutput(nnx.Module):
    """A conv output read by its BN and by the shortcut; a BN after an add; a pool."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 3, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(3, rngs=rngs)
        self.bn_add = nnx.BatchNorm(3, rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (1, 1), rngs=rngs)
        self.bn_pool = nnx.BatchNorm(4, rngs=rngs)
        self.dense = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        y = self.conv1(x)
        x = self.bn_add(self.bn1(y) + y)
        x = nnx.avg_pool(self.conv2(x), (2, 2), strides=(2, 2))
        return self.dense(self.bn_pool(x).mean(axis=(1, 2)))


def test_bns_after_a_shared_output_an_add_or_a_pool_stay_with_a_warning():
    model = _perturbed(SharedOutput(nnx.Rngs(0)))
    with pytest.warns(UserWarning, match="3 BatchNorm.*bn1, bn_add, bn_pool"):
        folded, _ = _fold_and_check(model, _images(), tolerance=0.0)
    assert _batchnorms(folded) == ["bn1", "bn_add", "bn_pool"]


class LastAxisNot(nnx.Module):
    """A BN normalising axis 1 (channels-first), and one called with batch statistics."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn_axis1 = nnx.BatchNorm(32, axis=1, rngs=rngs)
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.bn_batch = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        x = self.bn_axis1(self.conv(x)).mean(axis=(1, 2))
        return self.bn_batch(self.dense(x), use_running_average=False)


def test_a_bn_on_another_axis_or_on_batch_statistics_stays():
    model = _perturbed(LastAxisNot(nnx.Rngs(0)))
    with pytest.warns(UserWarning, match="bn_axis1, bn_batch"):
        folded = xfer.fold_bn(model)
    assert _batchnorms(folded) == ["bn_axis1", "bn_batch"]


class EmbeddingFirst(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, tokens):
        return self.bn(self.dense(self.embed(tokens)))


def test_a_model_whose_input_shape_cannot_be_found_is_refused_by_name():
    with pytest.raises(ValueError, match=r"EmbeddingFirst.*probe batch of shape \(4, 4\) alone"):
        xfer.fold_bn(EmbeddingFirst(nnx.Rngs(0)))


class CalledTwice(nnx.Module):
    """One conv called twice: folding either BN into it would change the other call."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(3, rngs=rngs)
        self.bn2 = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def test_a_layer_called_twice_keeps_its_bns():
    model = _perturbed(CalledTwice(nnx.Rngs(0)))
    with pytest.warns(UserWarning, match="bn1, bn2"):
        folded, _ = _fold_and_check(model, _images())
    assert _batchnorms(folded) == ["bn1", "bn2"]


class HeldTwiceAndJitted(nnx.Module):
    """A BN held at two paths (called through the second), inside an nnx.jit of its own."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.alias = nnx.data([self.bn])

    def __call__(self, x):
        return nnx.jit(lambda m, x: m.alias[0](m.conv(x)))(self, x)


def test_a_bn_held_twice_is_replaced_everywhere_even_under_an_inner_jit():
    model = _perturbed(HeldTwiceAndJitted(nnx.Rngs(0)))
    folded, _ = _fold_and_check(model, _images())
    assert isinstance(folded.bn, FoldedBatchNorm) and folded.alias[0] is folded.bn
    assert model.alias[0] is model.bn and isinstance(model.bn, nnx.BatchNorm)
