"""xfer.audit's deploy checks on BN statistics, on real models and real framework calls."""

import numpy as np
import pytest

import xfer
from xfer import select as S
from xfer._adapter import find_adapter


def _codes(model, **kw):
    return {f.code for f in xfer.audit(model, **kw)}


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 4, n)


def test_fresh_and_trained_models_do_not_look_reset(kit):
    model = kit.model()
    assert "bn-stats-look-reset" not in _codes(model)
    x, y = _data()
    kit.fit(model, x, y, epochs=1)
    assert "bn-stats-look-reset" not in _codes(model)
    assert "bn-stats-low-precision" not in _codes(model)


@pytest.mark.backends("torch")
def test_update_bn_on_a_pinned_bn_is_reported(kit):
    import torch

    model = kit.model()
    x, y = _data()
    kit.fit(model, x, y, epochs=1)
    bn = [u.path for u in find_adapter(model).units(model) if u.is_bn][0]
    xfer.set_mode(model, "inference", S.path(bn))
    loader = [torch.from_numpy(x).permute(0, 3, 1, 2)]
    torch.optim.swa_utils.update_bn(loader, model)
    findings = [f for f in xfer.audit(model) if f.code == "bn-stats-look-reset"]
    assert findings and findings[0].paths == (bn,)


@pytest.mark.backends("torch")
def test_half_model_has_low_precision_stats(kit):
    model = kit.model().half()
    assert "bn-stats-low-precision" in _codes(model)
    for m in model.modules():
        if isinstance(m, __import__("torch").nn.modules.batchnorm._BatchNorm):
            m.float()
    assert "bn-stats-low-precision" not in _codes(model)


@pytest.mark.backends("torch")
def test_batch_of_one_follows_the_current_mode(kit):
    model = kit.model()
    assert "bn-batch-of-one" in _codes(model.train(), batch_size=1)
    assert "bn-batch-of-one" not in _codes(model.eval(), batch_size=1)


@pytest.mark.backends("torch")
def test_cumulative_average_in_pinned_unit(kit):
    from torch import nn

    model = kit.model()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns[0].momentum = None
    assert "bn-cumulative-average-in-pinned-unit" not in _codes(model)
    xfer.set_mode(model, "inference")
    assert "bn-cumulative-average-in-pinned-unit" in _codes(model)


# The same findings on every backend, produced through the neutral API.


def test_statistics_set_to_zero_and_one_after_training_look_reset(kit):
    model = kit.model()
    kit.fit(model, *_data(), epochs=1)
    bn = [u.path for u in find_adapter(model).units(model) if u.is_bn][1]
    weights = xfer.export_weights(model)
    weights[f"{bn}.moving_mean"] = np.zeros_like(weights[f"{bn}.moving_mean"])
    weights[f"{bn}.moving_variance"] = np.ones_like(weights[f"{bn}.moving_variance"])
    xfer.import_weights(model, weights)
    findings = [f for f in xfer.audit(model) if f.code == "bn-stats-look-reset"]
    assert [f.paths for f in findings] == [(bn,)]


def test_batch_of_one_is_reported_until_bn_is_pinned_to_inference(kit):
    model = kit.model()
    if kit.id == "torch":
        model.train()
    assert "bn-batch-of-one" in _codes(model, batch_size=1)
    assert "bn-batch-of-one" not in _codes(model, batch_size=2)
    xfer.set_mode(model, "inference", S.bn())
    assert "bn-batch-of-one" not in _codes(model, batch_size=1)


def test_a_cumulative_average_exists_only_on_torch(kit):
    # Keras and Flax BNs always keep an exponential moving average.
    model = kit.model()
    xfer.set_mode(model, "inference")
    assert "bn-cumulative-average-in-pinned-unit" not in _codes(model)


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_float16_bn_has_low_precision_stats(kit):
    import keras

    def model(dtype):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
        x = keras.layers.BatchNormalization(name="bn", dtype=dtype)(x)
        return keras.Model(inputs, x)

    findings = [f for f in xfer.audit(model("float16")) if f.code == "bn-stats-low-precision"]
    assert [f.paths for f in findings] == [("bn",)]
    # mixed_float16 computes in float16 but keeps the variables, statistics too, in float32.
    assert "bn-stats-low-precision" not in _codes(model("mixed_float16"))


@pytest.mark.backends("flax")
def test_flax_statistics_cast_to_bfloat16_are_low_precision(kit):
    # NNX creates BatchStat in float32 whatever param_dtype says; casting a whole model for
    # bf16 inference (nnx.state, tree.map astype, nnx.update) takes the statistics along.
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = kit.model()
    assert "bn-stats-low-precision" not in _codes(model)
    state = nnx.state(model, nnx.BatchStat)
    nnx.update(model, jax.tree.map(lambda v: v.astype(jnp.bfloat16), state))
    findings = [f for f in xfer.audit(model) if f.code == "bn-stats-low-precision"]
    assert [f.paths for f in findings] == [("base.block1.bn", "base.block2.bn")]
