"""Flax NNX-specific guarantees, each beside the native behaviour it protects against."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S

pytestmark = pytest.mark.backends("flax")
nnx = pytest.importorskip("flax.nnx")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

from xfer.backends.flax import Frozen  # noqa: E402 - needs flax, skipped above without it

BASE_PARAM_KEYS = {
    f"base.{block}.{layer}.{leaf}"
    for block in ("block1", "block2")
    for layer, leaves in (("conv", ("kernel", "bias")), ("bn", ("scale", "bias")))
    for leaf in leaves
}


def _keys(state) -> set[str]:
    return {".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _bn_stats(model) -> np.ndarray:
    bn = model.base.block1.bn
    return np.concatenate([np.asarray(bn.mean.get_value()), np.asarray(bn.var.get_value())])


def test_frozen_parameters_are_their_own_partition_left_out_by_the_standard_filters(kit):
    model = kit.model()
    x, y = data(8)
    xfer.freeze(model, S.path("base.**"))
    assert _keys(nnx.state(model, Frozen)) == BASE_PARAM_KEYS
    params = _keys(nnx.state(model, nnx.Param))
    assert params == {"head.dense.kernel", "head.dense.bias"}
    grads = nnx.grad(_loss)(model, jnp.asarray(x), jnp.asarray(y, dtype=jnp.int32))
    assert _keys(grads) == params
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)
    opt_keys = _keys(nnx.state(optimizer, nnx.OptState))
    assert opt_keys and not any(".base." in f".{k}." for k in opt_keys)
    assert {k for k in opt_keys if ".head.dense." in f".{k}."}
    # BN statistics are not parameters: they stay BatchStat, out of both partitions.
    assert "base.block1.bn.mean" in _keys(nnx.state(model, nnx.BatchStat))


def test_native_train_undoes_eval_on_bn_but_not_an_xfer_pin(kit):
    x, _ = data(8)
    native, pinned = kit.model(), kit.model()
    native.base.eval()
    xfer.set_mode(pinned, "inference", S.path("base.**"))
    moved = {}
    for name, model in (("native", native), ("pinned", pinned)):
        before = _bn_stats(model)
        model.train()  # what every training loop does each epoch
        model(jnp.asarray(x))
        moved[name] = not np.array_equal(before, _bn_stats(model))
    assert native.base.block1.bn.use_running_average is False  # the native trap
    assert moved["native"]
    assert pinned.base.block1.bn.use_running_average is True
    assert pinned.base.drop.deterministic is True
    assert not moved["pinned"]


def test_pin_wins_over_nnx_view_and_an_explicit_call_argument(kit):
    model = kit.model()
    xfer.set_mode(model, "inference", S.bn())
    view = nnx.view(model, use_running_average=False, deterministic=False)
    assert view.base.block1.bn.use_running_average is True
    assert view.base.drop.deterministic is False  # not pinned: follows the view
    # A parent passing the mode itself, as code ported from Linen does.
    before = _bn_stats(model)
    model.base.block1.bn(jnp.full((4, 8), 5.0), use_running_average=False)
    np.testing.assert_array_equal(_bn_stats(model), before)


def test_pins_and_frozen_partition_survive_split_merge_deepcopy_and_pickle(kit):
    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    xfer.set_mode(model, "inference", S.path("head.drop"))
    state = xfer.export_state(model)
    graphdef, variables = nnx.split(model)
    copies = {
        "merge": nnx.merge(graphdef, variables),
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
    }
    for how, other in copies.items():
        assert xfer.export_state(other) == state, how
        assert _keys(nnx.state(other, Frozen)) == BASE_PARAM_KEYS, how
        other.train()
        assert other.base.block1.bn.use_running_average is True, how
        assert other.head.drop.deterministic is True, how
        assert type(other.head.drop).__name__ == "Dropout"


def test_a_jitted_step_follows_a_mode_change_instead_of_a_stale_trace(kit):
    x, _ = data(8)
    model = kit.model()
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(1)
        return model(x)

    xs = jnp.asarray(x)
    model.train()
    forward(model, xs)
    before = _bn_stats(model)
    xfer.set_bn(model, "frozen")
    model.train()
    forward(model, xs)
    np.testing.assert_array_equal(_bn_stats(model), before)
    assert len(traces) == 2
    xfer.set_bn(model, "train")
    model.train()
    forward(model, xs)
    assert not np.array_equal(_bn_stats(model), before)
    assert len(traces) == 2  # the first trace again: same classes, same attributes


class Adapter(nnx.Param):
    """A Param subclass, as nnx.LoRAParam is one."""


def test_unfreeze_restores_the_original_type_values_and_identity(kit):
    model = kit.model()
    dense = model.head.dense
    dense.bias = Adapter(dense.bias.get_value())
    kernel, bias = dense.kernel, dense.bias
    values = {k: v.copy() for k, v in xfer.snapshot(model).items()}
    xfer.freeze(model, S.path("head.dense"))
    assert type(kernel) is Frozen and type(bias) is Frozen
    assert not isinstance(bias, nnx.Param)
    xfer.unfreeze(model, S.path("head.dense"))
    assert type(kernel) is nnx.Param and type(bias) is Adapter
    assert dense.kernel is kernel and dense.bias is bias
    assert "xfer_param_type" not in bias.get_metadata()
    after = xfer.snapshot(model)
    for key, value in values.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_sequential_keeps_flax_paths_and_top_looks_through_its_list(kit):
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 2, rngs=rngs))
    rows = xfer.summary(model, print_fn=None).rows
    assert [(r.path, r.kind) for r in rows] == [
        ("layers", "container"),
        ("layers.0", "dense"),
        ("layers.2", "dense"),
    ]
    assert set(xfer.snapshot(model)) == _keys(nnx.state(model, nnx.Param))
    xfer.freeze(model)
    xfer.unfreeze(model, S.top(1))
    assert _keys(nnx.state(model, nnx.Param)) == {"layers.2.kernel", "layers.2.bias"}


def test_set_backend_flax(kit):
    xfer.set_backend("flax")
    assert xfer.get_backend() == "flax"
    with xfer.backend_context("flax"):
        assert xfer.summary(kit.model(), print_fn=None).backend == "flax"


def test_reference_model_trains_with_the_adapter_loop_and_keeps_frozen_tensors(kit):
    from xfer._adapter import load_adapter

    adapter = load_adapter("flax")
    model = xfer.models.small_cnn(4, backend="flax")
    assert [r.path for r in xfer.summary(model, print_fn=None).rows] == [
        r.path for r in xfer.summary(kit.model(), print_fn=None).rows
    ]
    x, y = data(16)
    xfer.freeze(model, S.path("base.**"))
    keys = xfer.frozen_tensors(model)
    assert set(keys) >= BASE_PARAM_KEYS | {"base.block1.bn.mean", "base.block2.bn.var"}
    before = xfer.snapshot(model)
    losses = adapter.fit(model, x, y, epochs=1, batch_size=8, lr=1e-2, weight_decay=0.1)
    assert len(losses) == 1 and np.isfinite(losses).all()
    assert xfer.changed_tensors(before, xfer.snapshot(model), keys) == []
    assert adapter.predict(model, x).shape == (16, 4)


def test_unit_order_survives_nnx_resorting_attributes_after_a_jitted_step(kit):
    # NNX writes a jitted step's result back with attributes sorted by name (head before
    # stem here); xfer keeps the definition order it recorded, so S.top(1) is still "head".
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(2, 2, rngs=rngs)
            self.base = nnx.Linear(2, 2, rngs=rngs)
            self.head = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.base(self.stem(x)))

    model = Net(nnx.Rngs(0))
    order = [r.path for r in xfer.summary(model, print_fn=None).rows]
    assert order == ["stem", "base", "head"]
    kit.fit(model, np.ones((4, 2), "float32"), np.zeros(4, "int64"), epochs=1, batch_size=4)
    assert list(vars(model))[-3:] == ["base", "head", "stem"]  # NNX re-sorted them
    assert [r.path for r in xfer.summary(model, print_fn=None).rows] == order
    xfer.freeze(model, S.top(1))
    assert xfer.summary(model, print_fn=None).row("head").trainable == "no"


def test_a_refused_fit_leaves_the_modules_in_the_mode_they_were_in(kit):
    model = kit.model()
    model.train()
    bn = model.base.block1.bn
    assert bn.use_running_average is False
    x, y = data(8)
    stages = [xfer.Stage("all", train=S.all(), lr=0.05)]
    with pytest.raises(ValueError, match="labels must lie in"):
        xfer.TransferPipeline(model, stages).fit((x, y + 10))
    assert bn.use_running_average is False and model.base.drop.deterministic is False
