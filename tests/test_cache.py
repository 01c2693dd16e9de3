"""Feature caching (xfer.pipeline.cache): a stage that trains only the head behind a frozen,
inference-pinned base trains on the base's cached outputs, and ends with the weights of the
same stage run without a cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S


def _stages(head_mode="inference"):
    return [
        xfer.Stage(
            "head",
            train=S.path("head.**"),
            bn="frozen",
            mode=head_mode,
            lr=0.05,
            epochs=3,
            optimizer="adamw",
            lr_groups=((S.path("head.dense"), 0.02),),
        ),
        xfer.Stage("finetune", train=S.all(), bn="affine", lr=0.01, epochs=1),
    ]


def _fit(kit, cache, stages=None, **options):
    model = kit.model(seed=3)  # dropout 0.5 in base and head: the RNG streams must match too
    pipe = xfer.TransferPipeline(
        model, stages or _stages(), optimizer="adamw", batch_size=8, weight_decay=0.1,
        cache=cache, **options,
    )  # fmt: skip
    history = pipe.fit(data(40), data(12, seed=1))
    return model, history


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_cached_head_stage_ends_with_the_uncached_weights(kit, where, tmp_path):
    plain, plain_history = _fit(kit, "off")
    options = {"cache_memory": 0, "cache_dir": tmp_path} if where == "disk" else {}
    cached, history = _fit(kit, "auto", **options)

    head, finetune = history.stages
    assert head.cache.startswith(where), head.cache
    assert finetune.cache.startswith("off: 'base"), finetune.cache  # the base trains there
    assert [s.cache for s in plain_history.stages] == ["off", "off"]
    assert history.ok
    np.testing.assert_allclose(history.losses(), plain_history.losses(), rtol=1e-5, atol=1e-6)
    val = [e.val_loss for s in history.stages for e in s.epochs]
    plain_val = [e.val_loss for s in plain_history.stages for e in s.epochs]
    np.testing.assert_allclose(val, plain_val, rtol=1e-5, atol=1e-6)
    expected, got = xfer.export_weights(plain), xfer.export_weights(cached)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert os.listdir(tmp_path) == []  # the spilled features are deleted after the stage


def test_a_base_that_is_not_pinned_to_inference_is_not_cached(kit):
    # bn="frozen" pins the BNs, but the base's Dropout still follows the training mode.
    _, history = _fit(kit, "auto", stages=_stages(head_mode=None)[:1])
    assert history.stages[0].cache.startswith("off: 'base.drop' behaves differently"), (
        history.stages[0].cache
    )


def test_batches_given_as_an_iterable_are_not_cached(kit):
    model = kit.model(seed=3)
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    history = xfer.TransferPipeline(model, _stages()[:1], batch_size=8).fit(batches)
    assert history.stages[0].cache.startswith("off: the training data is an iterable")


def test_the_features_go_nowhere_when_neither_memory_nor_disk_can_hold_them(kit, monkeypatch):
    import shutil

    class Usage:
        free = 10

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    _, history = _fit(kit, "auto", stages=_stages()[:1], cache_memory=0)
    note = history.stages[0].cache
    assert note.startswith("off: the features need") and "cache_memory (0 B)" in note, note


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cache": "on"}, "Unknown cache setting 'on'"),
        ({"cache_memory": -1}, "cache_memory must be a number of bytes"),
        ({"cache_memory": 1.5}, "cache_memory must be a number of bytes"),
    ],
)
def test_bad_cache_options_are_refused(kit, options, message):
    with pytest.raises(ValueError, match=message):
        xfer.TransferPipeline(kit.model(), _stages(), **options)


@pytest.mark.backends("torch")
def test_torch_a_forward_that_is_not_the_chain_is_not_cached(kit):
    import torch

    class Doubled(torch.nn.Module):
        xfer_chain = ("base", "head")  # claims head(base(x)), but computes more

        def __init__(self, model):
            super().__init__()
            self.base, self.head = model.base, model.head

        def forward(self, x):
            return self.head(2 * self.base(x))

    model = Doubled(kit.model(seed=3))
    history = xfer.TransferPipeline(model, _stages()[:1], batch_size=8).fit(data(16))
    assert history.stages[0].cache.startswith("off: the model's output is not 'head'")


@pytest.mark.backends("torch")
def test_torch_no_autograd_graph_through_the_frozen_base(kit):
    # Without a cache, the frozen base still runs each step, but builds no graph.
    model = kit.model(seed=3)
    seen = []
    model.base.register_forward_hook(lambda m, args, out: seen.append(out.requires_grad))
    model.head.register_forward_hook(lambda m, args, out: seen.append(out.requires_grad))
    xfer.TransferPipeline(model, _stages()[:1], batch_size=8, cache="off").fit(data(16))
    assert seen[-2:] == [False, True]


@pytest.mark.backends("torch")
def test_torch_every_forward_of_a_cached_stage_has_the_training_batch_shape(kit):
    # The probes (the data check's output shape, the cache's first batch) run on a training
    # batch: each other shape would fill oneDNN's primitive cache (~1 MiB a shape) or
    # cuDNN's plans, which the framework's own loop does not.
    model = kit.model(seed=3)
    seen = []
    for module in (model, model.base, model.head):
        module.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    history = xfer.TransferPipeline(model, _stages()[:1], batch_size=8).fit(data(32))
    assert history.stages[0].cache.startswith("memory")
    assert seen and set(seen) == {8}, seen


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_a_functional_model_with_a_branch_is_not_cached(kit):
    import keras

    model = kit.model(seed=3)
    base, head = model.get_layer("base"), model.get_layer("head")
    inputs = keras.Input((None, None, 3))
    features = base(inputs, training=False)
    branched = keras.Model(inputs, keras.layers.Add()([head(features), head(features)]))
    history = xfer.TransferPipeline(branched, _stages()[:1], batch_size=8).fit(data(16))
    assert history.stages[0].cache.startswith("off: the model is not a chain")
