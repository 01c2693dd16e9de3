"""xfer.recalibrate_bn on every backend: population statistics, nothing else changes.

Checked against tests/parity.py's float64 reference of the model: the recalibrated
statistics are the equal-weight average over the batches of each BN's batch mean and
variance (torch's variance unbiased, as torch stores it).
"""

from __future__ import annotations

import numpy as np
import pytest

import parity
import xfer
from xfer import select as S

BATCH = 8


def _changed(before, after):
    return sorted(xfer.changed_tensors(before, after, list(before)))


def _bn(model, path):
    from xfer._adapter import find_adapter

    adapter = find_adapter(model)
    return next(u.native for u in adapter.units(model) if u.path == path)


def _model(kit):
    model = kit.model(dropout=0.0)
    xfer.import_weights(model, parity.reference_weights())
    return model


def _images(n=3 * BATCH, seed=3):
    # Far from the data the reference statistics describe: a shifted, wider distribution.
    return (
        np.random.default_rng(seed).normal(1.5, 2.0, (n, 8, 8, parity.CHANNELS)).astype("float32")
    )


def _expected(kit, x, batch=BATCH):
    """The population statistics over the batches, from the float64 reference."""
    w = parity.reference_weights()
    per_batch = [
        parity.numpy_forward(w, x[i : i + batch], train=True)[1] for i in range(0, len(x), batch)
    ]
    n = batch * x.shape[1] * x.shape[2]
    correction = n / (n - 1) if kit.running_var_unbiased else 1.0
    return {
        bn: (
            np.mean([b[bn][0] for b in per_batch], axis=0),
            np.mean([b[bn][1] for b in per_batch], axis=0) * correction,
        )
        for bn in parity.BN_UNITS
    }


@pytest.mark.parametrize("policy", ["frozen", "affine", "adapt", "train"])
def test_recalibrated_statistics_are_the_population_average(kit, policy):
    model = _model(kit)
    xfer.set_bn(model, policy)
    x = _images()
    assert xfer.recalibrate_bn(model, x, batch_size=BATCH) == 3
    after = xfer.export_weights(model)
    for bn, (mean, var) in _expected(kit, x).items():
        np.testing.assert_allclose(after[f"{bn}.moving_mean"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(after[f"{bn}.moving_variance"], var, rtol=1e-5, atol=1e-5)
    # Not an exponential moving average: the statistics moved all the way.
    assert not np.allclose(
        after["base.block1.bn.moving_mean"],
        parity.reference_weights()["base.block1.bn.moving_mean"],
        atol=0.1,
    )


def test_nothing_else_changes_and_every_pin_stays(kit):
    model = _model(kit)
    xfer.freeze(model, S.path("base.**"))
    xfer.set_bn(model, "frozen", S.path("base.block1.**"))
    xfer.set_bn(model, "train", S.path("base.block2.**"))  # pinned to train: must not learn
    xfer.set_mode(model, "inference", S.path("head.**"))
    before, summary = xfer.snapshot(model), str(xfer.summary(model))
    momentum = _bn(model, "base.block1.bn").momentum
    xfer.recalibrate_bn(model, _images(), where=S.path("base.block1.bn"), batch_size=BATCH)
    changed = _changed(before, xfer.snapshot(model))
    stats = [n for n in changed if "block1.bn" in n]
    assert changed == stats and len(stats) == 2, changed
    assert str(xfer.summary(model)) == summary
    assert _bn(model, "base.block1.bn").momentum == momentum
    if kit.id == "torch":
        assert _bn(model, "base.block2.bn").num_batches_tracked.item() == 0


def test_the_model_still_trains_with_the_frameworks_own_loop_afterwards(kit):
    model = _model(kit)
    xfer.set_bn(model, "frozen", S.path("base.**"))
    xfer.recalibrate_bn(model, _images(), batch_size=BATCH)
    before = xfer.snapshot(model)
    x, y = parity.batch()
    kit.fit(model, x, y, epochs=1, batch_size=len(x), lr=0.05, optimizer="sgd")
    after = xfer.snapshot(model)
    # Still pinned: the frozen BN keeps the recalibrated statistics while the loop trains.
    assert all(
        np.array_equal(before[k], after[k])
        for k in before
        if ".bn." in k and ("mean" in k or "var" in k)
    )


def test_iterables_of_batches_and_num_batches(kit):
    x = _images()
    a, b = _model(kit), _model(kit)
    xfer.recalibrate_bn(a, x[: 2 * BATCH], batch_size=BATCH)
    used = xfer.recalibrate_bn(
        b, ((x[i : i + BATCH], None) for i in range(0, len(x), BATCH)), num_batches=2
    )
    assert used == 2
    wa, wb = xfer.export_weights(a), xfer.export_weights(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"where": S.path("head.**")}, "not BatchNorm"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"num_batches": 0}, "num_batches must be an integer >= 1"),
        ({"where": S.path("nothing.**")}, "matches no unit"),
    ],
)
def test_a_refused_call_changes_nothing(kit, kwargs, message):
    model = _model(kit)
    before = xfer.snapshot(model)
    with pytest.raises((ValueError, xfer.SelectionError), match=message):
        xfer.recalibrate_bn(model, _images(), **kwargs)
    assert not _changed(before, xfer.snapshot(model))


def test_a_failure_part_way_puts_the_statistics_back(kit):
    model = _model(kit)
    before = xfer.snapshot(model)
    x = _images()

    def batches():
        yield x[:BATCH]
        yield x[BATCH : BATCH + 1]  # one image: refused, after one batch was measured

    with pytest.raises(ValueError, match="at least 2"):
        xfer.recalibrate_bn(model, batches())
    assert not _changed(before, xfer.snapshot(model))
