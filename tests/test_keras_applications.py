"""xfer's guarantees on keras.applications models, trained with Keras's own ``compile``
and ``fit`` after the xfer calls.

Each model is built once per module (``weights=None``, 32x32 inputs, the smallest they
all accept) in the Keras transfer guide's layout: inputs -> base(training=False) ->
pooling -> dense, the base keeping its own name (``mobilenetv2_0.35_32`` has a dot in it).
ConvNeXtTiny has LayerNorm and no BatchNorm: a BN policy does not apply to it, and
``set_bn`` with the default ``S.bn()`` is the usual "selector matches nothing" error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import xfer
from xfer import select as S
from xfer._adapter import find_adapter

pytestmark = pytest.mark.backends("keras-jax", "keras-torch")

NUM_CLASSES = 3
SIZE = 32
BN_STATS = ("moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class Application:
    factory: str
    options: tuple = ()
    last_block: str = ""  # a glob, inside the base, of the block that is fine-tuned
    bn: bool = True
    dropout: bool = False


APPLICATIONS = {
    "MobileNetV2": Application("MobileNetV2", (("alpha", 0.35),), "block_16_*"),
    "MobileNetV3Small": Application("MobileNetV3Small", (), "expanded_conv_10_*"),
    "EfficientNetB0": Application("EfficientNetB0", (), "block7a_*", dropout=True),
    "ResNet50": Application("ResNet50", (), "conv5_block3_*"),
    "ConvNeXtTiny": Application("ConvNeXtTiny", (), "convnext_tiny_stage_3_block_2_*", bn=False),
}


# Each model on one Keras engine (MobileNetV2, the smallest, on both): building and
# fitting them is most of a Keras session's time, and the engines share the model code.
ENGINES = {
    "MobileNetV2": ("keras-jax", "keras-torch"),
    "MobileNetV3Small": ("keras-torch",),
    "EfficientNetB0": ("keras-jax",),
    "ResNet50": ("keras-torch",),
    "ConvNeXtTiny": ("keras-jax",),
}


def _on_this_engine(kit, name: str) -> None:
    if kit.id not in ENGINES[name]:
        pytest.skip(f"{name} runs in tests-{ENGINES[name][0]}")


@pytest.fixture(scope="module")
def built():
    """name -> (model, base), each built on first use and kept for the module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            import keras

            spec = APPLICATIONS[name]
            base = getattr(keras.applications, spec.factory)(
                weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), **dict(spec.options)
            )
            inputs = keras.Input((SIZE, SIZE, 3))
            x = base(inputs, training=False)
            x = keras.layers.GlobalAveragePooling2D()(x)
            model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))
            cache[name] = model, base
        return cache[name]

    return get


def _data(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(n, SIZE, SIZE, 3)).astype("float32")
    return x, (np.arange(n) % NUM_CLASSES).astype("int32")


def _numpy(tensor) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(tensor)


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_summary_paths_are_the_keras_layer_names_and_globs_select_them(kit, built, name):
    _on_this_engine(kit, name)
    model, base = built(name)
    units = find_adapter(model).units(model)
    rows = xfer.summary(model, print_fn=None).rows
    assert [r.path for r in rows] == [u.path for u in units]
    top = [u.path for u in units if u.depth == 1]
    assert top == [layer.name for layer in model.layers[1:]]
    inside = [u for u in units if u.depth == 2]
    assert [u.name for u in inside] == [layer.name for layer in base.layers[1:]]
    assert {u.segments[0] for u in inside} == {base.name}

    # By glob on the names as Keras prints them, dots and digits included.
    last = APPLICATIONS[name].last_block
    expected = [layer.name for layer in base.layers if _glob(layer.name, last)]
    assert expected
    assert [u.name for u in S.path(f"{base.name}.{last}")(units)] == expected
    assert [u.path for u in S.name(base.name)(units)] == [base.name]
    # S.from_index counts as model.layers does: 0 is the InputLayer, 1 the base.
    assert [u.path for u in S.from_index(2)(units)] == top[1:]
    assert len(S.from_index(1)(units)) == len(units)


def _glob(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_frozen_tensors_and_pinned_bn_and_dropout_hold_under_fit(kit, built, name):
    _on_this_engine(kit, name)
    import keras

    spec = APPLICATIONS[name]
    model, base = built(name)
    everything = S.path(f"{base.name}.**")
    last = S.path(f"{base.name}.{spec.last_block}")
    # The Keras guide's fine-tuning stage on the last block: the rest of the base frozen
    # (BN "frozen"), the last block's BN "affine", the whole base pinned to inference.
    xfer.freeze(model, everything)
    xfer.set_mode(model, "inference", everything)
    xfer.unfreeze(model, last)
    units = find_adapter(model).units(model)
    keys = xfer.frozen_tensors(model)
    before = xfer.snapshot(model)
    stats = [k for k in before if k.rpartition(".")[2] in BN_STATS]
    last_paths = {u.path for u in last(units)}
    gammas = [k for k in before if k.rpartition(".")[0] in last_paths and k.endswith(".gamma")]
    if spec.bn:
        assert stats and set(stats) <= set(keys)
        assert {xfer.summary(model, print_fn=None).row(u.path).bn for u in S.bn()(units)} == {
            "frozen",
            "affine",
        }
        assert gammas
    else:
        assert not stats and not S.bn()(units)
        norms = [f"{u.path}.gamma" for u in S.type("norm")(units) if u.path not in last_paths]
        assert norms and set(norms) <= set(keys)  # frozen LayerNorm: no policy, just frozen
    assert len(keys) > len(stats)

    x, y = _data()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    after = xfer.snapshot(model)
    assert xfer.changed_tensors(before, after, keys) == []
    trained = [k for k in before if k not in keys]
    assert set(xfer.changed_tensors(before, after, trained)) >= {
        k for k in trained if k.startswith(model.layers[-1].name + ".")
    }
    if spec.bn:
        # "affine" trains gamma (one step may leave one behind a saturated activation).
        assert xfer.changed_tensors(before, after, gammas)

    # Everything in the base is pinned: training=True is the same deterministic function,
    # and it moves no statistic.
    first = _numpy(model(x[:4], training=True))
    np.testing.assert_array_equal(_numpy(model(x[:4], training=True)), first)
    assert xfer.changed_tensors(after, xfer.snapshot(model), list(after)) == []
    dropouts = S.type("dropout")(units)
    assert bool(dropouts) == spec.dropout
    for unit in dropouts:
        z = np.ones((4, 2, 2, 8), "float32")
        np.testing.assert_array_equal(_numpy(unit.native(z, training=True)), z)
    if not spec.bn:
        with pytest.raises(xfer.SelectionError, match=r"bn\(\) matches no unit.*Some paths"):
            xfer.set_bn(model, "frozen")
        with pytest.raises(xfer.SelectionError, match="matches no BatchNorm unit"):
            xfer.set_bn(model, "affine", everything)
