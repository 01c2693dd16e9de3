"""Neutral weights: one naming and layout on every backend, validated imports, safe files.

The per-backend tests use the kit's real reference model; the cross-framework tests move
weights between frameworks in one process and compare inference logits.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from conftest import BACKENDS

import xfer
from kits import IMAGE_SHAPE, NUM_CLASSES, data
from xfer import select as S

NEUTRAL_SHAPES = {
    "base.block1.conv.kernel": (3, 3, 3, 8),
    "base.block1.conv.bias": (8,),
    "base.block1.bn.gamma": (8,),
    "base.block1.bn.beta": (8,),
    "base.block1.bn.moving_mean": (8,),
    "base.block1.bn.moving_variance": (8,),
    "base.block2.conv.kernel": (3, 3, 8, 8),
    "base.block2.conv.bias": (8,),
    "base.block2.bn.gamma": (8,),
    "base.block2.bn.beta": (8,),
    "base.block2.bn.moving_mean": (8,),
    "base.block2.bn.moving_variance": (8,),
    "head.dense.kernel": (8, 4),
    "head.dense.bias": (4,),
}


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def set_some_state(model) -> None:
    xfer.freeze(model, S.path("base.**"))
    xfer.unfreeze(model, S.path("base.block2.**"))
    xfer.set_bn(model, "adapt", S.path("base.block1.**"))
    xfer.set_mode(model, "inference", S.path("head.drop"))


def test_names_and_shapes_are_the_same_on_every_backend(kit):
    weights = xfer.export_weights(kit.model())
    assert {k: v.shape for k, v in weights.items()} == NEUTRAL_SHAPES
    assert {v.dtype for v in weights.values()} == {np.dtype("float32")}


def test_export_is_a_copy(kit):
    model = kit.model()
    weights = xfer.export_weights(model)
    weights["head.dense.bias"] += 1.0
    assert not np.array_equal(
        xfer.export_weights(model)["head.dense.bias"], weights["head.dense.bias"]
    )


def test_import_reproduces_the_model_bit_for_bit(kit):
    source, target = kit.model(seed=0), kit.model(seed=1)
    x, _ = data()
    weights = xfer.export_weights(source)
    assert not np.array_equal(kit.predict(source, x), kit.predict(target, x))
    xfer.import_weights(target, weights)
    np.testing.assert_array_equal(kit.predict(target, x), kit.predict(source, x))
    assert_same_weights(xfer.export_weights(target), weights)


def test_import_keeps_xfer_state_and_only_changes_values(kit):
    target = kit.model(seed=1)
    set_some_state(target)
    state = xfer.export_state(target)
    weights = xfer.export_weights(kit.model(seed=0))
    xfer.import_weights(target, weights)
    assert xfer.export_state(target) == state
    assert_same_weights(xfer.export_weights(target), weights)
    # Frozen stays frozen in the framework's own loop after the import.
    x, y = data()
    before = xfer.snapshot(target)
    kit.fit(target, x, y, epochs=1)
    after = xfer.snapshot(target)
    for key in xfer.frozen_tensors(target):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.backends("flax")
def test_flax_frozen_variables_stay_frozen_after_import(kit):
    from xfer.backends.flax import Frozen

    target = kit.model(seed=1)
    xfer.freeze(target, S.path("base.**"))
    kernel = target.base.block1.conv.kernel
    xfer.import_weights(target, xfer.export_weights(kit.model(seed=0)))
    assert target.base.block1.conv.kernel is kernel and type(kernel) is Frozen
    assert type(target.head.dense.kernel).__name__ == "Param"


@pytest.mark.backends("torch")
def test_torch_import_keeps_parameter_objects(kit):
    target = kit.model(seed=1)
    xfer.freeze(target, S.path("base.**"))
    params = list(target.parameters())
    flags = [p.requires_grad for p in params]
    xfer.import_weights(target, xfer.export_weights(kit.model(seed=0)))
    assert [id(p) for p in target.parameters()] == [id(p) for p in params]
    assert [p.requires_grad for p in target.parameters()] == flags


def test_import_casts_to_the_model_dtype(kit):
    model = kit.model(seed=1)
    weights = {k: v.astype("float64") for k, v in xfer.export_weights(kit.model()).items()}
    xfer.import_weights(model, weights)
    exported = xfer.export_weights(model)
    assert {v.dtype for v in exported.values()} == {np.dtype("float32")}
    assert_same_weights(exported, {k: v.astype("float32") for k, v in weights.items()})


def _bad_weights():
    def missing(w):
        for key in ["head.dense.bias", "base.block1.bn.moving_mean", "base.block2.conv.kernel"]:
            del w[key]
        return w

    def wrong_shape(w):
        w["head.dense.kernel"] = np.zeros((8, 5), "float32")
        return w

    def everything_wrong(w):
        w = missing(wrong_shape(w))
        w["head.dense.weight"] = np.zeros((4, 8), "float32")
        return w

    def strings(w):
        w["head.dense.bias"] = np.array(["a", "b", "c", "d"])
        return w

    return {
        "missing names": (
            missing,
            ValueError,
            r"missing names \(3\): base\.block1\.bn\.moving_mean, base\.block2\.conv\.kernel",
        ),
        "unexpected name": (
            lambda w: {**w, "head.dense.weight": np.zeros((4, 8), "float32")},
            ValueError,
            r"left unchanged\.\n  unexpected names \(1\): head\.dense\.weight\n",
        ),
        "wrong shape": (
            wrong_shape,
            ValueError,
            r"shape mismatches \(1\): head\.dense\.kernel: expected \(8, 4\), got \(8, 5\)",
        ),
        "all at once": (
            everything_wrong,
            ValueError,
            r"(?s)missing names \(3\).*unexpected names \(1\).*shape mismatches \(1\).*"
            r"same architecture",
        ),
        "a list value": (
            lambda w: {**w, "head.dense.bias": [0.0, 0.0, 0.0, 0.0]},
            TypeError,
            r"not arrays \(1\): head\.dense\.bias \(list\)",
        ),
        "string array": (strings, ValueError, r"non-numeric arrays \(1\): head\.dense\.bias"),
        "not a dict": (lambda w: list(w.values()), TypeError, "expected a dict of name"),
        # Values that would load and then make training blame "a learning rate too high".
        "nan and inf": (
            lambda w: _poke(_poke(w, "head.dense.kernel", np.nan), "base.block1.conv.bias", np.inf),
            ValueError,
            r"NaN or infinite values \(2\): base\.block1\.conv\.bias, head\.dense\.kernel",
        ),
        "negative moving variance": (
            lambda w: _poke(w, "base.block2.bn.moving_variance", -1.0),
            ValueError,
            r"negative moving variances \(1\): base\.block2\.bn\.moving_variance",
        ),
        "float64 overflowing float32": (
            lambda w: {**w, "head.dense.bias": np.full(4, 1e300)},
            ValueError,
            r"too large for float32 \(1\): head\.dense\.bias",
        ),
        "non-string name": (lambda w: {**w, 3: np.zeros(1)}, TypeError, "names must be strings"),
    }


def _poke(weights, key, value):
    weights[key].flat[0] = value
    return weights


@pytest.mark.parametrize("case", list(_bad_weights()))
def test_bad_weights_are_a_clear_error_and_leave_the_model_unchanged(kit, case):
    model = kit.model(seed=0)
    set_some_state(model)
    state, before = xfer.export_state(model), xfer.snapshot(model)
    change, error, message = _bad_weights()[case]
    weights = change(xfer.export_weights(kit.model(seed=1)))
    with pytest.raises(error, match=message):
        xfer.import_weights(model, weights)
    assert xfer.export_state(model) == state
    assert_same_weights(xfer.snapshot(model), before)


def test_a_failure_while_assigning_rolls_back(kit, monkeypatch):
    model = kit.model(seed=0)
    before = xfer.snapshot(model)
    adapter = xfer._adapter.find_adapter(model)
    assign = adapter.assign_weights
    calls = []

    def assign_then_fail(m, weights):
        assign(m, weights)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")

    monkeypatch.setattr(adapter, "assign_weights", assign_then_fail)
    with pytest.raises(RuntimeError, match="device lost"):
        xfer.import_weights(model, xfer.export_weights(kit.model(seed=1)))
    assert_same_weights(xfer.snapshot(model), before)


def test_save_and_load_round_trip(kit, tmp_path):
    from safetensors import safe_open

    source, target = kit.model(seed=0), kit.model(seed=1)
    set_some_state(target)
    state = xfer.export_state(target)
    path = tmp_path / "small_cnn.safetensors"
    xfer.save_weights(source, path)
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "xfer-neutral-weights/1"
    assert metadata["backend"] == xfer._adapter.find_adapter(source).name
    assert metadata["xfer_version"] == xfer.__version__
    xfer.load_weights(target, str(path))
    assert_same_weights(xfer.export_weights(target), xfer.export_weights(source))
    assert xfer.export_state(target) == state
    assert os.listdir(tmp_path) == ["small_cnn.safetensors"]


def test_a_failed_save_leaves_no_partial_file_and_the_old_file_untouched(
    kit, tmp_path, monkeypatch
):
    import safetensors.numpy

    model = kit.model()
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"the previous file")

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        xfer.save_weights(model, path)
    assert path.read_bytes() == b"the previous file"
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_saving_into_a_missing_directory_is_a_clear_error(kit, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        xfer.save_weights(kit.model(), tmp_path / "nope" / "w.safetensors")
    assert os.listdir(tmp_path) == []


def test_loading_a_file_that_is_not_xfer_weights_is_a_clear_error(kit, tmp_path):
    from safetensors.numpy import save_file

    model = kit.model()
    before = xfer.snapshot(model)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros((2, 2), "float32")}, str(foreign))
    with pytest.raises(ValueError, match="not xfer neutral weights"):
        xfer.load_weights(model, foreign)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="is not a safetensors file"):
        xfer.load_weights(model, junk)
    with pytest.raises(FileNotFoundError, match="no file at"):
        xfer.load_weights(model, tmp_path / "missing.safetensors")
    assert_same_weights(xfer.snapshot(model), before)


def _write_header_only_safetensors(path, tensors: dict, metadata: dict) -> None:
    """A valid safetensors file of BF16 tensors: numpy cannot read BF16, so any attempt
    to read a tensor fails, and an error about names proves none was read."""
    import json
    import struct

    header, offset = {"__metadata__": metadata}, 0
    for key, shape in tensors.items():
        size = 2 * int(np.prod(shape))
        header[key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


def test_load_checks_the_header_before_reading_any_tensor(kit, tmp_path):
    model = kit.model()
    before = xfer.snapshot(model)
    wrong = tmp_path / "wrong_names.safetensors"
    _write_header_only_safetensors(
        wrong, {"encoder.weight": (64, 64)}, {"format": "xfer-neutral-weights/1"}
    )
    with pytest.raises(ValueError, match=r"(?s)unexpected names \(1\): encoder\.weight"):
        xfer.load_weights(model, wrong)
    foreign = tmp_path / "foreign.safetensors"
    _write_header_only_safetensors(foreign, {"encoder.weight": (64, 64)}, {"format": "pt"})
    with pytest.raises(ValueError, match="not xfer neutral weights"):
        xfer.load_weights(model, foreign)
    shapes = tmp_path / "wrong_shape.safetensors"
    _write_header_only_safetensors(
        shapes,
        {**NEUTRAL_SHAPES, "head.dense.kernel": (8, 5)},
        {"format": "xfer-neutral-weights/1"},
    )
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): head\.dense\.kernel"):
        xfer.load_weights(model, shapes)
    assert_same_weights(xfer.snapshot(model), before)


def test_loading_weights_of_another_architecture_lists_the_mismatch(kit, tmp_path):
    path = tmp_path / "narrow.safetensors"
    narrow = xfer.models.small_cnn(
        NUM_CLASSES, IMAGE_SHAPE[2], width=4, dropout=0.0, backend=kit.id.split("-")[0]
    )
    xfer.save_weights(narrow, path)
    model = kit.model()
    before = xfer.snapshot(model)
    with pytest.raises(
        ValueError, match=r"(?s)in '.*narrow\.safetensors'.*shape mismatches \(13\)"
    ):
        xfer.load_weights(model, path)
    assert_same_weights(xfer.snapshot(model), before)


# Cross-framework: every ordered pair whose frameworks can live in this process and at
# least one of which this session tests (so a pair is not run again by every session).
def _frameworks() -> list[str]:
    found = [name for name in ("torch", "flax") if importlib.util.find_spec(name)]
    # Keras reads KERAS_BACKEND once per process; conftest sets it for a keras session.
    if importlib.util.find_spec("keras") and os.environ.get("KERAS_BACKEND") in ("jax", "torch"):
        found.append("keras")
    return found


def _pairs() -> list[tuple[str, str]]:
    session = {b.split("-")[0] for b in BACKENDS}
    names = _frameworks()
    return [(a, b) for a in names for b in names if a != b and session & {a, b}]


@pytest.mark.parametrize("source, target", _pairs(), ids=lambda name: name)
def test_weights_move_between_frameworks_with_the_same_logits(source, target):
    from xfer._adapter import load_adapter

    def build(backend: str, seed: int):
        return xfer.models.small_cnn(
            NUM_CLASSES, IMAGE_SHAPE[2], width=8, dropout=0.0, seed=seed, backend=backend
        )

    x, _ = data()
    original = build(source, seed=0)
    # Moving statistics away from their initial 0/1, so that the test sees their layout.
    weights = xfer.export_weights(original)
    rng = np.random.default_rng(0)
    for key in weights:
        if key.endswith(("moving_mean", "moving_variance", "gamma", "beta")):
            weights[key] = (weights[key] + rng.uniform(0.5, 1.5, weights[key].shape)).astype(
                "float32"
            )
    xfer.import_weights(original, weights)
    copy = build(target, seed=1)
    xfer.import_weights(copy, xfer.export_weights(original))
    expected = load_adapter(source).predict(original, x)
    got = load_adapter(target).predict(copy, x)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert_same_weights(xfer.export_weights(copy), weights)


# One layer of each kind the adapters rename or transpose, built the same way in each
# framework (channels-last input; `channels_first` says whether torch needs NCHW).
LAYERS = {
    "conv1d": (
        (2, 7, 4),
        True,
        lambda nn: nn.Conv1d(4, 6, 3),
        lambda nnx, r: nnx.Conv(4, 6, (3,), padding="VALID", rngs=r),
        lambda L: L.Conv1D(6, 3),
    ),
    "conv2d-grouped": (
        (2, 5, 5, 4),
        True,
        lambda nn: nn.Conv2d(4, 6, 3, groups=2),
        lambda nnx, r: nnx.Conv(4, 6, (3, 3), padding="VALID", feature_group_count=2, rngs=r),
        lambda L: L.Conv2D(6, 3, groups=2),
    ),
    "conv2d-depthwise": (
        (2, 5, 5, 4),
        True,
        lambda nn: nn.Conv2d(4, 8, 3, groups=4),
        lambda nnx, r: nnx.Conv(4, 8, (3, 3), padding="VALID", feature_group_count=4, rngs=r),
        lambda L: L.Conv2D(8, 3, groups=4),
    ),
    "conv3d": (
        (1, 4, 4, 4, 2),
        True,
        lambda nn: nn.Conv3d(2, 3, 2),
        lambda nnx, r: nnx.Conv(2, 3, (2, 2, 2), padding="VALID", rngs=r),
        lambda L: L.Conv3D(3, 2),
    ),
    "dense": (
        (2, 5),
        False,
        lambda nn: nn.Linear(5, 3),
        lambda nnx, r: nnx.Linear(5, 3, rngs=r),
        lambda L: L.Dense(3),
    ),
    "batchnorm": (
        (3, 5),
        False,
        lambda nn: nn.BatchNorm1d(5, eps=1e-3),
        lambda nnx, r: nnx.BatchNorm(5, epsilon=1e-3, rngs=r),
        lambda L: L.BatchNormalization(epsilon=1e-3),
    ),
    "layernorm": (
        (2, 5),
        False,
        lambda nn: nn.LayerNorm(5, eps=1e-6),
        lambda nnx, r: nnx.LayerNorm(5, epsilon=1e-6, rngs=r),
        lambda L: L.LayerNormalization(epsilon=1e-6),
    ),
    "groupnorm": (
        (2, 3, 3, 4),
        True,
        lambda nn: nn.GroupNorm(2, 4, eps=1e-6),
        lambda nnx, r: nnx.GroupNorm(4, num_groups=2, epsilon=1e-6, rngs=r),
        lambda L: L.GroupNormalization(2, epsilon=1e-6),
    ),
    "rmsnorm": (
        (2, 5),
        False,
        lambda nn: nn.RMSNorm(5, eps=1e-6),
        lambda nnx, r: nnx.RMSNorm(5, epsilon=1e-6, rngs=r),
        lambda L: L.RMSNormalization(epsilon=1e-6),
    ),
}


def _run_layer(framework: str, case: str, weights: dict | None, x: np.ndarray):
    """(exported weights, inference output) of a fresh layer, after importing ``weights``."""
    shape, channels_first, make_torch, make_flax, make_keras = LAYERS[case]
    if framework == "torch":
        import torch

        layer = make_torch(torch.nn).eval()
        if weights is not None:
            xfer.import_weights(layer, weights)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1) if channels_first else x))
        with torch.no_grad():
            out = layer(xt).numpy()
        out = np.moveaxis(out, 1, -1) if channels_first else out
    elif framework == "flax":
        from flax import nnx

        layer = make_flax(nnx, nnx.Rngs(0))
        layer.eval()
        if weights is not None:
            xfer.import_weights(layer, weights)
        out = np.asarray(layer(x))
    else:
        import keras

        layer = make_keras(keras.layers)
        layer.build(shape)
        if weights is not None:
            xfer.import_weights(layer, weights)
        out = keras.ops.convert_to_numpy(layer(x, training=False))
    return xfer.export_weights(layer), out


@pytest.mark.parametrize("case", list(LAYERS))
@pytest.mark.parametrize("source, target", _pairs(), ids=lambda name: name)
def test_each_kind_of_layer_moves_between_frameworks(source, target, case):
    rng = np.random.default_rng(0)
    x = rng.normal(size=LAYERS[case][0]).astype("float32")
    weights, _ = _run_layer(source, case, None, x)
    # Random values everywhere (a variance stays positive), so every layout shows.
    weights = {k: rng.uniform(0.5, 1.5, v.shape).astype("float32") for k, v in weights.items()}
    exported, expected = _run_layer(source, case, weights, x)
    imported, got = _run_layer(target, case, exported, x)
    assert_same_weights(imported, weights)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
