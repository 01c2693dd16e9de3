"""What the pipeline keeps to check and undo a stage without a copy of the model in memory:
the rollback weights of each epoch on disk (xfer.pipeline.rollback), digests of the frozen
tensors (xfer.fingerprints), and forward passes in chunks of the training batch size."""

from __future__ import annotations

import os

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S
from xfer._adapter import find_adapter
from xfer.pipeline.rollback import Rollback


def _other_weights(kit):
    return xfer.export_weights(kit.model(seed=7))


def test_the_rollback_restores_the_saved_weights_from_a_file_it_then_deletes(kit, tmp_path):
    model = kit.model()
    saved = xfer.export_weights(model)
    with Rollback(model, str(tmp_path)) as rollback:
        rollback.save()
        assert rollback.in_memory is None and os.listdir(tmp_path) == [
            os.path.basename(rollback.path)
        ]
        xfer.import_weights(model, _other_weights(kit))
        assert not np.array_equal(
            xfer.export_weights(model)["head.dense.kernel"], saved["head.dense.kernel"]
        )
        rollback.restore()
    for key, value in xfer.export_weights(model).items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)
    assert os.listdir(tmp_path) == []


def test_the_rollback_stays_in_memory_where_no_file_can_be_written(kit, tmp_path):
    model = kit.model()
    saved = xfer.export_weights(model)
    with Rollback(model, str(tmp_path / "missing")) as rollback:
        rollback.save()
        assert rollback.path is None and rollback.in_memory is not None
        xfer.import_weights(model, _other_weights(kit))
        assert not np.array_equal(
            xfer.export_weights(model)["head.dense.kernel"], saved["head.dense.kernel"]
        )
        rollback.restore()
    for key, value in xfer.export_weights(model).items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)


def test_fingerprints_are_equal_exactly_when_the_tensors_are_bit_identical(kit):
    model = kit.model()
    keys = list(xfer.snapshot(model))
    before = xfer.fingerprints(model, keys)
    assert set(before) == set(keys) and before == xfer.fingerprints(model, keys)
    weights = xfer.export_weights(model)
    kernel = f"head.dense.{kit.dense_kernel}"
    weights["head.dense.kernel"].flat[0] = np.nextafter(weights["head.dense.kernel"].flat[0], 1)
    xfer.import_weights(model, weights)
    assert xfer.changed_tensors(before, xfer.fingerprints(model, keys), keys) == [kernel]


def test_a_diverging_head_on_cached_features_is_restored_and_leaves_no_file(kit, tmp_path):
    model = kit.model(dropout=0.0)
    start = xfer.export_weights(model)
    # The softmax gradient is bounded, so the head's weights grow by about lr a step: with
    # lr=3e38 (near float32's largest) its logits overflow within a few steps.
    stage = xfer.Stage(
        "boom", train=S.path("head.**"), bn="frozen", mode="inference", lr=3e38, epochs=1
    )
    pipe = xfer.TransferPipeline(model, [stage], optimizer="sgd", batch_size=4, cache_dir=tmp_path)
    with pytest.raises(xfer.NonFiniteLoss, match=r"Stage 'boom', epoch 1, step \d+"):
        pipe.fit(data(32))
    for key, value in xfer.export_weights(model).items():
        np.testing.assert_array_equal(value, start[key], err_msg=key)
    assert os.listdir(tmp_path) == []


def test_predict_gives_the_same_outputs_in_any_batch_size_and_refuses_a_bad_one(kit):
    model = kit.model()
    adapter = find_adapter(model)
    x, _ = data(20)
    whole = adapter.predict(model, x)
    np.testing.assert_allclose(adapter.predict(model, x, batch_size=3), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        adapter.predict(model, x, batch_size=0)
