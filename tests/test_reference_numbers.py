"""Parity in every session: each backend against a numpy reference and the golden values.

The golden values (tests/golden/parity.npz) are what ``tests/parity.py`` computed on one
backend; test_backends_agree.py compares the backends with each other directly.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import parity
import xfer


@functools.cache
def _results(kit_id: str) -> dict[str, np.ndarray]:
    from kits import load_kit

    return parity.run_checks(load_kit(kit_id))


@pytest.fixture
def loaded(kit):
    model = kit.model(dropout=0.0)
    xfer.import_weights(model, parity.reference_weights())
    return model


def test_inference_logits_match_the_numpy_reference(kit, loaded):
    x, _ = parity.batch()
    expected, _ = parity.numpy_forward(parity.reference_weights(), x, train=False)
    np.testing.assert_allclose(kit.predict(loaded, x), expected, atol=1e-5, rtol=1e-5)


def test_training_forward_and_bn_updates_match_the_numpy_reference(kit, loaded):
    weights = parity.reference_weights()
    x, _ = parity.batch()
    expected, used = parity.numpy_forward(weights, x, train=True)
    np.testing.assert_allclose(kit.forward_train(loaded, x), expected, atol=1e-5, rtol=1e-5)
    after = parity.keras_convention(kit, weights, xfer.export_weights(loaded), x.shape[0] * 64)
    for unit, (mean, var) in used.items():
        keep = parity.KEEP
        np.testing.assert_allclose(
            after[f"{unit}.moving_mean"],
            keep * weights[f"{unit}.moving_mean"] + (1 - keep) * mean,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            after[f"{unit}.moving_variance"],
            keep * weights[f"{unit}.moving_variance"] + (1 - keep) * var,
            atol=1e-5,
        )


def test_every_check_matches_the_golden_values(kit):
    golden = dict(np.load(parity.GOLDEN))
    results = _results(kit.id)
    assert set(results) == set(golden)
    worst = {}
    for key, expected in golden.items():
        diff = float(np.max(np.abs(results[key] - expected)))
        group = parity.check_group(key)
        worst[group] = max(worst.get(group, 0.0), diff)
        assert diff <= parity.tolerance(key), f"{key}: max |diff| {diff:.2e}"
    print(f"\n{kit.id} vs golden, largest |diff| per check: {worst}")


def test_frozen_tensors_are_the_golden_reference_weights_bit_for_bit(kit):
    # Under "frozen", nothing in the base may move on any backend: not even by rounding.
    results = _results(kit.id)
    weights = parity.reference_weights()
    for key, value in weights.items():
        if key.startswith("base."):
            np.testing.assert_array_equal(results[f"policy_frozen.{key}"], value, err_msg=key)
