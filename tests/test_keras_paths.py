"""Keras paths on the models that broke them (issue 13): a dot in a layer name, layers
held in a list or dict of a subclassed model, and ``S.from_index`` against
``model.layers``.

Each test uses the real model that showed the defect, with ``weights=None`` and the
smallest input it accepts.
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import select as S
from xfer._adapter import find_adapter

pytestmark = pytest.mark.backends("keras-jax", "keras-torch")

NUM_CLASSES = 3


def _paths(model, where=None) -> list[str]:
    units = find_adapter(model).units(model)
    return [u.path for u in (units if where is None else where(units))]


def _transfer_model(base):
    # The Keras transfer-learning guide's layout, the base keeping its own name.
    import keras

    inputs = keras.Input(base.input_shape[1:])
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))


@pytest.fixture(scope="module")
def mobilenet_v2():
    import keras

    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), include_top=False, alpha=0.35
    )


# --- a dot in a layer name -------------------------------------------------------------


def test_a_dotted_keras_name_is_one_path_segment(kit, mobilenet_v2):
    base = mobilenet_v2
    assert base.name == "mobilenetv2_0.35_32"
    model = _transfer_model(base)
    units = find_adapter(model).units(model)
    top = units[0]
    assert (top.path, top.name, top.depth, top.segments) == (base.name, base.name, 1, (base.name,))
    conv = next(u for u in units if u.native is base.get_layer("Conv1"))
    assert (conv.path, conv.name, conv.depth) == (f"{base.name}.Conv1", "Conv1", 2)

    assert [u.native for u in S.name(base.name)(units)] == [base]
    inside = _paths(model, S.path(f"{base.name}.**"))
    assert len(inside) == 1 + len(base.layers) - 1  # the base and its layers but the InputLayer
    # A glob matches the segment whole, its dots included; a piece of it is no segment.
    assert _paths(model, S.path("mobilenetv2*.**")) == inside
    assert _paths(model, S.path("*.Conv1")) == [f"{base.name}.Conv1"]
    assert _paths(model, S.path(f"{base.name}.block_16_*")) == [
        f"{base.name}.{layer.name}" for layer in base.layers if layer.name.startswith("block_16_")
    ]
    with pytest.raises(xfer.SelectionError, match="matches no unit"):
        xfer.freeze(model, S.path("0_32.**"))

    # The calls that raised a bare StopIteration from the parent lookup.
    xfer.freeze(model, S.path(f"{base.name}.**"))
    xfer.unfreeze(model, S.path(f"{base.name}.block_16_*"))
    summary = xfer.summary(model, print_fn=None)
    assert summary.row(f"{base.name}.block_16_project_BN").bn == "affine"
    assert summary.row(f"{base.name}.block_15_project_BN").bn == "frozen"
    assert base.trainable  # the parents of what trains are trainable, or fit trains nothing
    xfer.set_bn(model, "affine", S.path(f"{base.name}.**") & S.bn())
    assert xfer.summary(model, print_fn=None).row(f"{base.name}.bn_Conv1").bn == "affine"
    xfer.set_bn(model, "train")
    assert {r.bn for r in xfer.summary(model, print_fn=None).rows if r.bn} == {"train"}
    xfer.import_state(model, xfer.export_state(model))

    # The base itself: its own layers are the top-level paths.
    xfer.unfreeze(base)
    xfer.set_bn(base, "affine", S.path("block_1*") & S.bn())
    assert xfer.summary(base, print_fn=None).row("block_16_project_BN").bn == "affine"
    xfer.set_bn(base, "train")
    assert _paths(base)[:2] == [layer.name for layer in base.layers[1:3]]


def test_the_audit_and_the_feature_cache_see_a_dotted_block_whole(kit, mobilenet_v2):
    base = mobilenet_v2
    model = _transfer_model(base)
    xfer.unfreeze(model)
    xfer.set_bn(model, "train")
    xfer.freeze(model, S.path(f"{base.name}.**"), bn=None)
    codes = {f.code: f.paths for f in xfer.audit(model)}
    assert f"{base.name}.block_16_project_BN" in codes["bn-stats-update-under-frozen-affine"]
    xfer.set_bn(model, "frozen", S.path(f"{base.name}.**") & S.bn())

    from xfer.pipeline.cache import _split

    data = np.zeros((4, 32, 32, 3), "float32"), np.zeros(4, "int64")
    prefix, last, head = _split(find_adapter(model), model, data)
    assert [layer.name for layer in prefix] == [base.name, model.layers[2].name]
    assert (last, head) == (model.layers[3], model.layers[3].name)


# --- layers in a list or dict ------------------------------------------------------------


def _list_model_class():
    import keras

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4)
            self.bn = keras.layers.BatchNormalization()

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.blocks = [Block(), Block()]
            self.heads = {"coarse": keras.layers.Dense(2), "fine": keras.layers.Dense(NUM_CLASSES)}

        def call(self, x, training=None):
            for block in self.blocks:
                x = block(x, training=training)
            return self.heads["fine"](x)

    return Net


def test_layers_in_a_list_or_dict_get_stable_paths(kit):
    net_class = _list_model_class()
    a, b = net_class(), net_class()
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    a(x), b(x)
    expected = [
        "blocks.0", "blocks.0.dense", "blocks.0.bn", "blocks.1", "blocks.1.dense", "blocks.1.bn",
        "heads.coarse", "heads.fine",
    ]  # fmt: skip
    assert _paths(a) == _paths(b) == expected
    assert find_adapter(a).units(a)[1].segments == ("blocks", "0", "dense")

    xfer.freeze(a, S.path("blocks.0.**"))
    xfer.set_mode(a, "inference", S.path("heads.*"))
    xfer.import_state(b, xfer.export_state(a))
    assert xfer.export_state(b) == xfer.export_state(a)
    assert not b.blocks[0].dense.kernel.trainable and b.blocks[1].dense.kernel.trainable

    import keras

    xfer.import_weights(b, xfer.export_weights(a))
    outputs = [keras.ops.convert_to_numpy(net(x, training=False)) for net in (a, b)]
    np.testing.assert_array_equal(*outputs)
    assert sorted(xfer.export_weights(b)) == sorted(xfer.export_weights(a))


# --- S.from_index counts as model.layers does ----------------------------------------------


def test_from_index_is_the_keras_fine_tune_at_recipe_on_mobilenet_v3(kit):
    import keras

    def build():
        return keras.applications.MobileNetV3Small(
            weights=None, input_shape=(32, 32, 3), include_top=False, include_preprocessing=False
        )

    def frozen(model) -> list[str]:
        return sorted(v.path for v in model.weights if not v.trainable)

    fine_tune_at = 100
    by_keras, by_xfer = build(), build()
    assert isinstance(by_keras.layers[0], keras.layers.InputLayer)
    # The Keras transfer-learning tutorial's recipe.
    for layer in by_keras.layers[:fine_tune_at]:
        layer.trainable = False
    xfer.freeze(by_xfer, ~S.from_index(fine_tune_at))
    assert frozen(by_xfer) == frozen(by_keras)
    assert len(frozen(by_xfer)) > len([v for v in by_xfer.weights if "moving" in v.path])

    units = find_adapter(by_xfer).units(by_xfer)
    layer = by_xfer.layers[fine_tune_at]
    assert [u.native for u in S.from_index(fine_tune_at)(units)][0] is layer
    top = [u.native for u in units if u.depth == 1]
    assert [u.native for u in S.top(2)(units)] == top[-2:] == by_xfer.layers[-2:]
    assert [u.native for u in S.from_index(-2)(units)] == by_xfer.layers[-2:]
