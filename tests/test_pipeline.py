"""The staged pipeline on every backend: state per stage, verification, data, bad input.

That the same stages give the same numbers on every backend is checked in test_reference_numbers.py
(the ``pipeline`` group of tests/parity.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from kits import NUM_CLASSES, data
from xfer import select as S
from xfer._adapter import find_adapter
from xfer.recalibration import statistics_keys


def _stages(**finetune):
    return [
        xfer.Stage(
            "head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=2
        ),
        xfer.Stage(
            **{"name": "finetune", "train": S.all(), "bn": "affine", "lr": 0.01, **finetune}
        ),
    ]


def test_each_stage_sets_the_state_trains_and_verifies_what_it_froze(kit):
    model = kit.model(dropout=0.0)
    x, y = data(32)
    history = xfer.TransferPipeline(model, _stages(), optimizer="momentum", batch_size=8).fit(
        (x, y), data(16, seed=1)
    )
    head, finetune = history.stages
    assert history.ok and head.changed == [] and finetune.changed == []
    assert (head.kept, finetune.kept) == (12, 4)  # base params + BN stats; then BN stats only
    assert (head.n_trainable, head.n_frozen) == (36, 840)
    assert (finetune.n_trainable, finetune.n_frozen) == (876, 0)
    assert [len(s.epochs) for s in history.stages] == [2, 1]
    assert all(np.isfinite(history.losses())) and head.val_accuracy is not None
    s = xfer.summary(model, print_fn=None)
    assert s.row("base.block1.bn").bn == "affine" and s.row("base.drop").mode == "inherit"
    assert "finetune" in str(history) and "4/4 bit-identical" in str(history)


def test_a_stage_that_trains_nothing_adapts_the_bn_statistics_alone(kit):
    """An "adapt" stage (AdaBN by training-mode forward passes): no parameter to train
    (torch.optim refuses an empty list; xfer's step then runs the forward alone), the
    statistics move and every parameter is bit-identical."""
    model = kit.model(dropout=0.0)
    before = xfer.snapshot(model)
    stages = [xfer.Stage("adapt", train=S.bn(), bn="adapt", epochs=2)]
    history = xfer.TransferPipeline(model, stages, batch_size=8).fit(data(32))
    assert history.ok and history.stages[0].n_trainable == 0
    after = xfer.snapshot(model)
    statistics = set(statistics_keys(find_adapter(model).units(model)))
    assert len(statistics) == 4
    assert all(not np.array_equal(after[k], before[k]) for k in statistics)
    counters = {k for k in after if k.endswith("num_batches_tracked")}  # torch counts batches
    assert all(np.array_equal(after[k], before[k]) for k in after.keys() - statistics - counters)


def test_a_list_of_batches_is_used_in_its_own_order(kit):
    model = kit.model(dropout=0.0)
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    stages = [xfer.Stage("all", train=S.all(), lr=0.01, epochs=2)]
    history = xfer.TransferPipeline(model, stages, optimizer="sgd").fit(batches, batches)
    assert len(history.losses()) == 2 and history.ok


def test_lr_groups_give_units_their_own_learning_rate(kit):
    model = kit.model(dropout=0.0)
    x, y = data(16)
    before = xfer.snapshot(model)
    stages = [xfer.Stage("all", train=S.all(), lr=0.05, lr_groups=((S.path("base.**"), 1e-30),))]
    xfer.TransferPipeline(model, stages, optimizer="sgd", batch_size=16).fit((x, y))
    after = xfer.snapshot(model)
    kernel = f"head.dense.{kit.dense_kernel}"
    assert not np.array_equal(before[kernel], after[kernel])
    conv = next(k for k in before if k.startswith("base.block1.conv."))
    np.testing.assert_allclose(after[conv], before[conv], atol=1e-20)


def test_a_non_finite_loss_stops_restores_and_explains(kit):
    model = kit.model(dropout=0.0)
    x, y = data(32)
    # BN on moving statistics does not bound the activations: lr=1e30 overflows float32.
    stages = [xfer.Stage("boom", train=S.all(), bn="affine", lr=1e30, epochs=3)]
    pipe = xfer.TransferPipeline(model, stages, optimizer="sgd", batch_size=8)
    with pytest.raises(
        xfer.NonFiniteLoss, match=r"Stage 'boom', epoch (\d), step \d+.*lr=1e\+30"
    ) as error:
        pipe.fit((x, y))
    # The weights of the start of that epoch are back: finite, and the initial ones if the
    # loss broke in the first epoch.
    weights = xfer.export_weights(model)
    assert all(np.isfinite(v).all() for v in weights.values())
    if "epoch 1," in str(error.value):
        for key, value in xfer.export_weights(kit.model(dropout=0.0)).items():
            np.testing.assert_array_equal(weights[key], value, err_msg=key)


def _with_values(x, values):
    x = x.copy()
    for index, value in values.items():
        x.flat[index] = value
    return x


def _bad_fits():
    x, y = data(8)
    return {
        "channels-first images": ((x.transpose(0, 3, 1, 2), y), ValueError, "channels-last"),
        "labels out of range": ((x, y + NUM_CLASSES), ValueError, r"labels must lie in \[0, 4\)"),
        "float labels": ((x, y.astype("float32")), ValueError, "labels must be integers"),
        "NaN images": (
            (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y),
            ValueError,
            "1 image values are NaN",
        ),
        "infinite images": (
            (_with_values(x, {3: np.inf, 9: -np.inf}), y),
            ValueError,
            "2 image values are NaN or infinite",
        ),
        "an iterator": (iter([(x, y)]), TypeError, "used up after one epoch"),
        "not data": ("train.csv", TypeError, "expected numpy arrays"),
    }


@pytest.mark.parametrize("case", list(_bad_fits()))
def test_data_that_does_not_fit_is_refused_before_training(kit, case):
    model = kit.model()
    train, error, message = _bad_fits()[case]
    before = xfer.snapshot(model)
    with pytest.raises(error, match=message):
        xfer.TransferPipeline(model, _stages()).fit(train)
    after = xfer.snapshot(model)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_the_data_check_allocates_nothing_the_size_of_the_images():
    # np.isfinite(x).all() held a boolean per value: 3 MiB for 1,024 images of 32x32x3,
    # more than a head stage on cached features uses in all (docs/benchmarks.md).
    import tracemalloc

    x = np.ones((256, 32, 32, 3), "float32")
    y = np.zeros(256, "int64")
    tracemalloc.start()
    try:
        xfer.data.check((x, y), name="train", num_classes=4, in_channels=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 100, peak


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda m: xfer.TransferPipeline(m, []), TypeError, "non-empty list of xfer.Stage"),
        (
            lambda m: xfer.TransferPipeline(m, _stages(optimizer="lamb")),
            ValueError,
            "unknown optimizer 'lamb'",
        ),
        (lambda m: xfer.TransferPipeline(m, _stages(lr=-1)), ValueError, "lr must be a positive"),
        (
            lambda m: xfer.TransferPipeline(m, _stages(bn="frozzen")),
            ValueError,
            "Unknown BN policy",
        ),
        (lambda m: xfer.TransferPipeline(m, _stages(name="head")), ValueError, "must be unique"),
        (
            lambda m: xfer.TransferPipeline(m, _stages(), loss="mse"),
            ValueError,
            "Unknown loss 'mse'",
        ),
        (
            lambda m: xfer.TransferPipeline(m, _stages(), metrics=["f1"]),
            ValueError,
            "Unknown metrics",
        ),
        (
            lambda m: xfer.TransferPipeline(m, [xfer.Stage("x", train=S.type("dropout"))]).fit(
                data(8)
            ),
            ValueError,
            "selects no unit with parameters",
        ),
    ],
)
def test_bad_pipelines_are_clear_errors(kit, build, error, message):
    with pytest.raises(error, match=message):
        build(kit.model())
