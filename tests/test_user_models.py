"""Real backbones through the whole API: ``attach_head``, selectors, freeze/set_bn, summary
and the staged pipeline, on Keras applications and on arbitrary torch and NNX modules.

Each framework's own parameter count is the reference for xfer's summary. Inputs are
small so that the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import select as S
from xfer._adapter import find_adapter

NUM_CLASSES = 3


def _images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, size=(n, size, size, 3)).astype("float32")
    return x, (np.arange(n) % NUM_CLASSES).astype("int64")


def _head_then_finetune(finetune: S.Selector) -> list[xfer.Stage]:
    return [
        xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=1e-2),
        xfer.Stage("finetune", train=finetune | S.path("head.**"), bn="affine", lr=1e-3),
    ]


def _counts(model) -> tuple[int, int]:
    summary = xfer.summary(model, print_fn=None)
    return summary.n_trainable, summary.n_frozen


# --- the neutral function ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"num_classes": True}, "num_classes must be an integer >= 2"),
        ({"num_classes": 3.0}, "num_classes must be an integer >= 2"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.2"}, "dropout must be a number"),
        ({"input_shape": (32, 32)}, r"input_shape must be one channels-last image shape"),
        ({"input_shape": (1, 32, 32, 3)}, "without the batch dimension"),
        ({"input_shape": (32, 0, 3)}, "positive integers"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_attach_head_rejects_bad_arguments_before_looking_at_the_base(kwargs, message):
    arguments = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=message):
        xfer.models.attach_head(object(), **arguments)


def test_attach_head_names_what_it_cannot_work_on():
    with pytest.raises(TypeError, match="expected a keras.Layer/keras.Model, a torch.nn.Module"):
        xfer.models.attach_head(object(), NUM_CLASSES)


# --- PyTorch: any nn.Module -----------------------------------------------------------


def _torch_resnet(flat: bool = False):
    """A torchvision-style ResNet trunk: conv1/bn1/relu, then layer1/layer2 as nn.Sequential
    of BasicBlocks (residual add, a downsample branch). ``flat``: ends with avgpool and
    flatten, as torchvision's resnet with ``fc = nn.Identity()`` does."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.downsample = None
            if stride != 1 or c_in != c_out:
                self.downsample = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
            self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
            self.avgpool = nn.AdaptiveAvgPool2d(1) if flat else None

        def forward(self, x):
            x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
            return x if self.avgpool is None else torch.flatten(self.avgpool(x), 1)

    torch.manual_seed(0)
    return TinyResNet()


def _torch_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _torch_total(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.backends("torch")
def test_torch_backbone_gets_the_head_with_torchvision_paths_and_shared_weights(kit):
    import torch

    base = _torch_resnet()
    xfer.set_mode(base, "train", S.path("layer1.0.bn1"))  # a pin must not learn from the dummy
    base.train()
    stats = {k: v.clone() for k, v in base.state_dict().items()}
    model = xfer.models.attach_head(base, NUM_CLASSES, input_shape=(16, 16, 3))

    assert model.base is base and all(m.training for m in base.modules())
    assert all(torch.equal(stats[k], v) for k, v in base.state_dict().items())
    paths = [row.path for row in xfer.summary(model, print_fn=None).rows]
    for path in ("base.layer1.0.bn1", "base.layer2.0.downsample.1", "head.pool", "head.dense"):
        assert path in paths
    assert model.head.dense.in_features == 16
    x = torch.zeros(4, 3, 16, 16)  # NCHW, like any torch model
    assert tuple(model.eval()(x).shape) == (4, NUM_CLASSES)
    assert find_adapter(model).predict(model, _images(2, 16)[0]).shape == (2, NUM_CLASSES)


@pytest.mark.backends("torch")
def test_torch_backbone_with_a_flat_output_skips_pooling(kit):
    model = xfer.models.attach_head(_torch_resnet(flat=True), NUM_CLASSES, input_shape=(16, 16, 3))
    assert model.head.dense.in_features == 16
    logits = find_adapter(model).predict(model, _images(2, 16)[0])
    assert logits.shape == (2, NUM_CLASSES) and np.isfinite(logits).all()


@pytest.mark.backends("torch")
def test_torch_backbone_summary_counts_match_requires_grad(kit):
    model = xfer.models.attach_head(_torch_resnet(), NUM_CLASSES, input_shape=(16, 16, 3))
    assert _counts(model) == (_torch_total(model), 0)

    xfer.freeze(model, S.path("base.**"))
    trainable = _torch_trainable(model)
    assert trainable == 16 * NUM_CLASSES + NUM_CLASSES
    assert _counts(model) == (trainable, _torch_total(model) - trainable)

    xfer.unfreeze(model, S.path("base.layer2.**"))
    xfer.set_bn(model, "adapt", S.path("base.layer2.1.**"))
    trainable = _torch_trainable(model)
    assert _counts(model) == (trainable, _torch_total(model) - trainable)
    summary = xfer.summary(model, print_fn=None)
    assert summary.row("base.layer2.0.bn1").bn == "affine"
    assert summary.row("base.layer2.1.bn2").bn == "adapt"
    assert summary.row("base.layer1.0.bn1").bn == "frozen"


@pytest.mark.backends("torch")
def test_torch_backbone_runs_the_pipeline_and_keeps_frozen_tensors(kit):
    model = xfer.models.attach_head(_torch_resnet(), NUM_CLASSES, input_shape=(16, 16, 3))
    history = xfer.TransferPipeline(
        model, _head_then_finetune(S.path("base.layer2.**")), batch_size=8
    ).fit(_images(16, 16), _images(8, 16, seed=1))
    head, finetune = history.stages
    assert history.ok and head.kept > finetune.kept > 0  # layer2 and head train
    assert head.n_trainable == 16 * NUM_CLASSES + NUM_CLASSES
    assert np.isfinite(history.losses()).all()


# --- Keras: keras.applications --------------------------------------------------------


def _mobilenet(**kwargs):
    keras = pytest.importorskip("keras")
    options = {"weights": None, "include_top": False, "input_shape": (32, 32, 3), "alpha": 0.35}
    return keras.applications.MobileNetV2(**{**options, **kwargs})


def _keras_trainable(model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _keras_total(model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights) + sum(
        int(np.prod(v.shape)) for v in model.non_trainable_weights if "moving" not in v.path
    )


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_mobilenet_through_freeze_summary_and_the_pipeline(kit):
    base = _mobilenet()
    model = xfer.models.attach_head(base, NUM_CLASSES, seed=1)

    # The Keras guide's layout: inputs -> base(training=False) -> a Sequential head.
    assert [layer.name for layer in model.layers[1:]] == ["base", "head"]
    assert model.get_layer("base") is base
    assert [layer.name for layer in model.get_layer("head").layers] == ["pool", "drop", "dense"]
    assert _counts(model) == (_keras_total(model), 0) == (_keras_trainable(model), 0)

    xfer.freeze(model, S.path("base.**"))
    trainable = _keras_trainable(model)
    assert trainable == 1280 * NUM_CLASSES + NUM_CLASSES
    assert _counts(model) == (trainable, _keras_total(model) - trainable)

    history = xfer.TransferPipeline(
        model,
        [xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=1e-2)],
        batch_size=8,
    ).fit(_images(8, 32), _images(4, 32, seed=1))
    assert history.ok and history.stages[0].kept > 200
    assert np.isfinite(history.losses()).all()

    xfer.unfreeze(model, S.path("base.block_16_*"))
    trainable = _keras_trainable(model)
    assert trainable > 1280 * NUM_CLASSES + NUM_CLASSES
    assert _counts(model) == (trainable, _keras_total(model) - trainable)
    assert xfer.summary(model, print_fn=None).row("base.block_16_project_BN").bn == "affine"


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_resnet50v2_preact_bn_selected_by_name(kit):
    keras = pytest.importorskip("keras")
    base = keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(32, 32, 3))
    model = xfer.models.attach_head(base, NUM_CLASSES)
    xfer.freeze(model, S.path("base.**"))
    xfer.set_bn(model, "train", S.name("*preact_bn"))

    summary = xfer.summary(model, print_fn=None)
    preact = [r for r in summary.rows if r.path.endswith("_preact_bn")]
    assert len(preact) == 16 and preact[0].path == "base.conv2_block1_preact_bn"
    assert {r.bn for r in preact} == {"train"}
    other_bn = [r for r in summary.rows if r.kind == "batchnorm" and r not in preact]
    assert other_bn and {r.bn for r in other_bn} == {"frozen"}
    trainable = _keras_trainable(model)
    assert trainable == sum(r.n_trainable for r in preact) + 2048 * NUM_CLASSES + NUM_CLASSES
    assert _counts(model) == (trainable, _keras_total(model) - trainable)


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_applications_load_a_local_weights_file(kit, tmp_path):
    # weights="imagenet" downloads that same kind of file; a path is what a user with a
    # downloaded (or offline-copied) file passes, and it goes through the same loader.
    base = _mobilenet()
    path = str(tmp_path / "mobilenet_v2.weights.h5")
    base.save_weights(path)
    loaded = _mobilenet(weights=path, pooling="avg")  # a flat (batch, 1280) output

    x = _images(2, 32)[0]
    adapter = find_adapter(base)
    pooled_here = adapter.predict(xfer.models.attach_head(base, NUM_CLASSES, seed=3), x)
    pooled_there = xfer.models.attach_head(loaded, NUM_CLASSES, seed=3)
    assert type(pooled_there.get_layer("head").get_layer("pool")).__name__ == "Identity"
    np.testing.assert_allclose(adapter.predict(pooled_there, x), pooled_here, atol=1e-5)


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_base_paths_survive_a_keras_file_and_subclassed_bases_need_a_shape(kit, tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    base = keras.Model(inputs, x, name="my.backbone_v1.0")  # a dot would break dotted paths
    model = xfer.models.attach_head(base, NUM_CLASSES)
    xfer.freeze(model, S.path("base.**"))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    rows = xfer.summary(loaded, print_fn=None).rows
    assert [r.path for r in rows] == [
        "base", "base.conv", "base.bn", "head", "head.pool", "head.drop", "head.dense"
    ]  # fmt: skip
    assert xfer.summary(loaded, print_fn=None).row("base.bn").bn == "frozen"

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"Pass input_shape=\(height, width, channels\)"):
        xfer.models.attach_head(Subclassed(), NUM_CLASSES)
    model = xfer.models.attach_head(Subclassed(), NUM_CLASSES, input_shape=(8, 8, 3))
    assert find_adapter(model).predict(model, _images(2, 8)[0]).shape == (2, NUM_CLASSES)


# --- Flax NNX: any nnx.Module ---------------------------------------------------------


def _flax_backbone():
    """Conv-BN-ReLU residual blocks in an nnx.List after a stem held as attributes."""
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, channels: int, rngs: nnx.Rngs):
            self.conv = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(channels, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(x + self.bn(self.conv(x)))

    class Backbone(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
            self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
            self.blocks = nnx.List([Block(8, rngs), Block(8, rngs)])

        def __call__(self, x):
            x = nnx.relu(self.stem_bn(self.stem(x)))
            for block in self.blocks:
                x = block(x)
            return x

    return Backbone(nnx.Rngs(0))


def _flax_counts(model) -> tuple[int, int]:
    import jax
    from flax import nnx

    from xfer.backends.flax import Frozen

    def size(state) -> int:
        return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(state))

    return size(nnx.state(model, nnx.Param)), size(nnx.state(model, Frozen))


@pytest.mark.backends("flax")
def test_flax_backbone_gets_the_head_and_is_left_as_it_was(kit):
    base = _flax_backbone()
    xfer.set_mode(base, "train", S.path("blocks.0.bn"))
    before = xfer.snapshot(base)
    model = xfer.models.attach_head(base, NUM_CLASSES, input_shape=(16, 16, 3))

    assert model.base is base and base.stem_bn.use_running_average is False
    after = xfer.snapshot(base)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    paths = [row.path for row in xfer.summary(model, print_fn=None).rows]
    for path in ("base.stem_bn", "base.blocks.1.bn", "head.pool", "head.drop", "head.dense"):
        assert path in paths
    assert model.head.dense.in_features == 8
    logits = find_adapter(model).predict(model, _images(2, 16)[0])
    assert logits.shape == (2, NUM_CLASSES) and np.isfinite(logits).all()
    with pytest.raises(ValueError, match="a Flax base needs input_shape"):
        xfer.models.attach_head(base, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"the base failed on a batch of shape \(2, 16, 16, 4\)"):
        xfer.models.attach_head(base, NUM_CLASSES, input_shape=(16, 16, 4))


@pytest.mark.backends("flax")
def test_flax_backbone_summary_counts_match_nnx_state(kit):
    model = xfer.models.attach_head(_flax_backbone(), NUM_CLASSES, input_shape=(16, 16, 3))
    assert _counts(model) == _flax_counts(model)
    xfer.freeze(model, S.path("base.**"))
    assert _counts(model) == _flax_counts(model) == (8 * NUM_CLASSES + NUM_CLASSES, 1424)
    xfer.unfreeze(model, S.path("base.blocks.1.**"))
    assert _counts(model) == _flax_counts(model)
    assert xfer.summary(model, print_fn=None).row("base.blocks.1.bn").bn == "affine"


@pytest.mark.backends("flax")
def test_flax_backbone_runs_the_pipeline_and_keeps_frozen_tensors(kit):
    model = xfer.models.attach_head(_flax_backbone(), NUM_CLASSES, input_shape=(16, 16, 3))
    history = xfer.TransferPipeline(
        model, _head_then_finetune(S.path("base.blocks.1.**")), batch_size=8
    ).fit(_images(16, 16), _images(8, 16, seed=1))
    assert history.ok and all(stage.kept > 0 for stage in history.stages)
    assert history.stages[0].n_trainable == 8 * NUM_CLASSES + NUM_CLASSES
    assert np.isfinite(history.losses()).all()


# --- torch-only error paths -----------------------------------------------------------


@pytest.mark.backends("torch")
def test_torch_base_needs_an_input_shape_it_accepts(kit):
    base = _torch_resnet()
    with pytest.raises(ValueError, match="a torch base needs input_shape"):
        xfer.models.attach_head(base, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"dummy batch of shape \(2, 4, 16, 16\)"):
        xfer.models.attach_head(base, NUM_CLASSES, input_shape=(16, 16, 4))
    assert all(m.training for m in base.modules())  # flags restored after a failure too
