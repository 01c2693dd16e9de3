"""The conformance suite: the same guarantees, asserted on tensors, on every backend.

Each test builds the kit's real model, applies xfer operations, trains with the
framework's *own* standard loop (no xfer code in it) and compares tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import xfer
from kits import UNIT_PATHS, data
from xfer import select as S

BN_UNITS = ["base.block1.bn", "base.block2.bn"]
ROLES = ("gamma", "beta", "mean", "var")
# Parameter elements of the standard model: conv 3x3x3x8+8, bn 2x8, conv 3x3x8x8+8, bn 2x8.
BASE_PARAMS = 224 + 16 + 584 + 16
HEAD_PARAMS = 8 * 4 + 4


def bn_key(kit, unit: str, role: str) -> str:
    return f"{unit}.{kit.bn_names[role]}"


def moved(before, after, key) -> bool:
    return not np.array_equal(before[key], after[key])


def assert_unchanged(before, after, keys):
    assert keys, "nothing to compare"
    for key in keys:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_units_have_the_same_paths_and_kinds_on_every_backend(kit):
    rows = xfer.summary(kit.model(), print_fn=None).rows
    assert [r.path for r in rows] == UNIT_PATHS
    kinds = {r.path: r.kind for r in rows}
    assert kinds["base.block1.conv"] == "conv"
    assert kinds["base.block2.bn"] == "batchnorm"
    assert kinds["base.drop"] == kinds["head.drop"] == "dropout"
    assert kinds["head.dense"] == "dense"
    assert kinds["base"] == kinds["base.block1"] == kinds["head"] == "container"


def test_frozen_base_is_bit_identical_after_native_training(kit):
    model = kit.model()
    x, y = data()
    xfer.freeze(model, S.path("base.**"))
    before = xfer.snapshot(model)
    losses = kit.fit(model, x, y)
    after = xfer.snapshot(model)
    assert all(np.isfinite(losses))
    assert_unchanged(before, after, [k for k in before if k.startswith("base.")])
    assert moved(before, after, f"head.dense.{kit.dense_kernel}")


@pytest.mark.parametrize(
    "policy, moving",
    [
        ("frozen", set()),
        ("affine", {"gamma", "beta"}),
        ("adapt", {"mean", "var"}),
        ("train", {"gamma", "beta", "mean", "var"}),
    ],
)
def test_each_bn_policy_moves_exactly_its_tensors(kit, policy, moving):
    model = kit.model()
    x, y = data()
    xfer.freeze(model, S.path("base.**"))
    xfer.set_bn(model, policy, S.path("base.**"))
    before = xfer.snapshot(model)
    kit.fit(model, x, y)
    after = xfer.snapshot(model)
    for unit in BN_UNITS:
        for role in ROLES:
            key = bn_key(kit, unit, role)
            assert moved(before, after, key) == (role in moving), f"{policy}: {key}"
    conv_keys = [k for k in before if k.startswith("base.block") and ".conv." in k]
    assert_unchanged(before, after, conv_keys)


def test_freeze_then_unfreeze_gives_the_keras_guide_fine_tuning_state(kit):
    model = kit.model()
    xfer.freeze(model)
    frozen = xfer.summary(model, print_fn=None)
    assert {frozen.row(u).bn for u in BN_UNITS} == {"frozen"}
    assert frozen.n_trainable == 0 and frozen.n_frozen == BASE_PARAMS + HEAD_PARAMS
    xfer.unfreeze(model)
    s = xfer.summary(model, print_fn=None)
    assert {s.row(u).bn for u in BN_UNITS} == {"affine"}
    assert {s.row(u).mode for u in BN_UNITS} == {"inference"}
    assert s.n_frozen == 0


def test_pinned_inference_turns_off_dropout_and_bn_updates_in_training_mode(kit):
    model = kit.model(dropout=0.9)
    x, _ = data()
    xfer.set_mode(model, "inference", S.all())
    before = xfer.snapshot(model)
    reference = kit.predict(model, x)
    out = kit.forward_train(model, x)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
    assert_unchanged(before, xfer.snapshot(model), list(before))


def test_unpinned_model_does_use_dropout_and_batch_statistics_in_training_mode(kit):
    # The control for the test above: the framework's own training mode is different.
    model = kit.model(dropout=0.9)
    x, _ = data()
    before = xfer.snapshot(model)
    reference = kit.predict(model, x)
    out = kit.forward_train(model, x)
    assert not np.allclose(out, reference, atol=1e-3)
    assert moved(before, xfer.snapshot(model), bn_key(kit, "base.block1.bn", "mean"))


def test_inherit_releases_a_pin(kit):
    model = kit.model(dropout=0.9)
    x, _ = data()
    xfer.set_mode(model, "inference", S.all())
    xfer.set_mode(model, "inherit", S.all())
    assert not np.allclose(kit.forward_train(model, x), kit.predict(model, x), atol=1e-3)
    assert {r.mode for r in xfer.summary(model, print_fn=None).rows} == {"inherit"}


def test_bn_pinned_to_train_uses_batch_statistics_at_inference(kit):
    model = kit.model()
    x, _ = data()
    plain = kit.predict(model, x)
    xfer.set_mode(model, "train", S.bn())
    assert not np.allclose(kit.predict(model, x), plain, atol=1e-3)
    codes = {f.code for f in xfer.audit(model)}
    assert "bn-batch-statistics-at-inference" in codes


def test_summary_shows_both_switches_and_counts(kit):
    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    xfer.set_mode(model, "inference", S.path("base.drop"))
    lines = []
    s = xfer.summary(model, print_fn=lines.append)
    assert s.row("base.block1.conv").trainable == "no"
    assert s.row("head.dense").trainable == "yes"
    assert s.row("base.pool").trainable == ""
    assert s.row("base.block2.bn").bn == "frozen"
    assert s.row("base.drop").mode == "inference" and s.row("head.drop").mode == "inherit"
    assert (s.n_trainable, s.n_frozen) == (HEAD_PARAMS, BASE_PARAMS)
    text = lines[0]
    assert f"total: {HEAD_PARAMS} trainable, {BASE_PARAMS} frozen parameters" in text
    assert "base.block2.bn" in text and "saving:" in text


def test_audit_finds_bn_statistics_updating_under_a_frozen_affine(kit):
    model = kit.model()
    xfer.freeze(model, S.path("base.**"), bn=None)  # what requires_grad=False alone does
    findings = {f.code: f for f in xfer.audit(model)}
    assert set(findings["bn-stats-update-under-frozen-affine"].paths) == set(BN_UNITS)
    assert findings["dropout-active-in-frozen-block"].paths == ("base.drop",)
    assert findings["bn-stats-update-under-frozen-affine"].fix


def test_audit_is_clean_for_the_keras_guide_setup_and_flags_batch_of_one(kit):
    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    xfer.set_mode(model, "inference", S.path("base.**"))
    assert xfer.audit(model) == []
    xfer.set_bn(model, "adapt", S.path("base.**"))
    codes = {f.code for f in xfer.audit(model, batch_size=1)}
    assert "bn-batch-of-one" in codes


def test_state_survives_the_native_save_format_with_export_state(kit, tmp_path):
    model = kit.model()
    x, y = data()
    xfer.freeze(model, S.path("base.**"))
    xfer.unfreeze(model, S.path("base.block2.**"))
    xfer.set_bn(model, "adapt", S.path("base.block1.**"))
    xfer.set_mode(model, "inference", S.path("head.drop"))
    state = json.loads(json.dumps(xfer.export_state(model)))
    loaded = kit.save_load(model, str(tmp_path))
    xfer.import_state(loaded, state)
    assert xfer.export_state(loaded) == state
    before = xfer.snapshot(loaded)
    np.testing.assert_array_equal(
        before[f"head.dense.{kit.dense_kernel}"],
        xfer.snapshot(model)[f"head.dense.{kit.dense_kernel}"],
    )
    kit.fit(loaded, x, y)
    after = xfer.snapshot(loaded)
    assert_unchanged(before, after, [k for k in before if k.startswith("base.block1.conv.")])
    assert moved(before, after, bn_key(kit, "base.block1.bn", "mean"))  # adapt
    assert not moved(before, after, bn_key(kit, "base.block1.bn", "gamma"))
    assert moved(before, after, bn_key(kit, "base.block2.bn", "gamma"))  # affine
    assert not moved(before, after, bn_key(kit, "base.block2.bn", "mean"))


def test_selector_that_matches_nothing_names_itself_and_lists_paths(kit):
    model = kit.model()
    with pytest.raises(xfer.SelectionError, match=r"path\('nope\.\*\*'\).*base\.block1"):
        xfer.freeze(model, S.path("nope.**"))


def _bad_calls():
    return {
        "unknown mode": (
            lambda m: xfer.set_mode(m, "eval"),
            ValueError,
            "expected one of train, inference, inherit",
        ),
        "unknown bn policy": (
            lambda m: xfer.set_bn(m, "frozzen"),
            ValueError,
            "expected one of frozen, affine, adapt, train",
        ),
        "unknown freeze bn": (
            lambda m: xfer.freeze(m, S.all(), bn="nope"),
            ValueError,
            "Unknown BN policy",
        ),
        "string selector": (
            lambda m: xfer.freeze(m, "base"),
            TypeError,
            "Expected an xfer selector",
        ),
        "no bn selected": (
            lambda m: xfer.set_bn(m, "train", S.path("head.**")),
            xfer.SelectionError,
            "no BatchNorm",
        ),
        "containers only": (
            lambda m: xfer.freeze(m, S.path("base")),
            xfer.SelectionError,
            r"S\.path\('block\.\*\*'\)",
        ),
        "foreign state": (
            lambda m: xfer.import_state(
                m, {"xfer_state": 1, "units": {"x": {"trainable": True, "mode": "inherit"}}}
            ),
            ValueError,
            "paths only in the state: \\['x'\\]",
        ),
        "bad mode in state": (
            lambda m: xfer.import_state(
                m,
                {
                    **xfer.export_state(m),
                    "units": {p: {"trainable": None, "mode": "on"} for p in UNIT_PATHS},
                },
            ),
            ValueError,
            "Unknown mode 'on'",
        ),
        # "no" is truthy: applied as given it made a unit trainable on keras-jax and flax,
        # and on torch raised a raw TypeError after changing every unit before it.
        "non-bool trainable in state": (
            lambda m: xfer.import_state(
                m,
                {
                    **xfer.export_state(m),
                    "units": {
                        **xfer.export_state(m)["units"],
                        "head.dense": {"trainable": "no", "mode": "inherit"},
                        "base.block1.conv": {"trainable": "no", "mode": "inherit"},
                    },
                },
            ),
            ValueError,
            r"trainable must be True, False or None .*got base\.block1\.conv \('no'\), "
            r"head\.dense \('no'\)",
        ),
        "state entry not a dict": (
            lambda m: xfer.import_state(
                m, {**xfer.export_state(m), "units": {p: "frozen" for p in UNIT_PATHS}}
            ),
            ValueError,
            "expected a dict with 'trainable' and 'mode'",
        ),
        "non-string mode": (
            lambda m: xfer.set_mode(m, ["inference"]),
            ValueError,
            "Unknown mode",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_is_a_clear_error_and_leaves_the_model_unchanged(kit, case):
    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    state, weights = xfer.export_state(model), xfer.snapshot(model)
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call(model)
    assert xfer.export_state(model) == state
    assert_unchanged(weights, xfer.snapshot(model), list(weights))


def _fail_on_call(monkeypatch, adapter, method, n):
    """Make the ``n``-th call of ``adapter.<method>`` fail, after the calls before it ran."""
    original, calls = getattr(adapter, method), []

    def change_then_fail(*args):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("device lost")
        original(*args)

    monkeypatch.setattr(adapter, method, change_then_fail)
    return original


# Each call changes a unit before the n-th call of the adapter method fails.
_MIDWAY = {
    "freeze": (lambda m: xfer.freeze(m, S.all()), "set_trainable", 3),
    "unfreeze": (lambda m: xfer.unfreeze(m, S.all()), "set_trainable", 3),
    "set_mode": (lambda m: xfer.set_mode(m, "train", S.all()), "set_mode", 3),
    "set_bn": (lambda m: xfer.set_bn(m, "frozen"), "set_mode", 2),
    "import_state": (lambda m: xfer.import_state(m, _all_frozen_state(m)), "set_trainable", 3),
}


@pytest.mark.parametrize("case", list(_MIDWAY))
def test_a_failure_midway_puts_the_previous_state_back(kit, monkeypatch, case):
    model = kit.model()
    xfer.freeze(model, S.type("conv"), bn=None)
    xfer.set_mode(model, "inference", S.path("head.drop"))
    state, weights = xfer.export_state(model), xfer.snapshot(model)
    call, method, n = _MIDWAY[case]
    _fail_on_call(monkeypatch, xfer._adapter.find_adapter(model), method, n)
    with pytest.raises(RuntimeError, match="device lost"):
        call(model)
    monkeypatch.undo()
    assert xfer.export_state(model) == state
    assert_unchanged(weights, xfer.snapshot(model), list(weights))


def _all_frozen_state(model):
    state = xfer.export_state(model)
    for entry in state["units"].values():
        if entry["trainable"] is not None:
            entry["trainable"] = False
        entry["mode"] = "inference"
    return state
