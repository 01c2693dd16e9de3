"""xfer's reference models and new heads as Flax NNX modules (NHWC, as NNX computes).

BatchNorm is built with Keras's epsilon and momentum (``1e-3``, ``0.9``, the weight of
the old value), and convs with explicit symmetric padding, so that every backend computes
the same numbers from the same weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xfer.backends._common import (
    CLASSIC,
    KERAS_V1,
    RESNET50_WIDTH,
    BlockSpec,
    ResNetStyle,
    resnet_layout,
)
from xfer.backends.flax.units import walk


def _bn(channels: int, rngs: nnx.Rngs, style: ResNetStyle = CLASSIC) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, epsilon=style.epsilon, momentum=style.momentum, rngs=rngs)


class _GlobalAvgPool(nnx.Module):
    def __call__(self, x):
        return x.mean(axis=(1, 2))


class _GlobalMaxPool(nnx.Module):
    def __call__(self, x):
        return x.max(axis=(1, 2))


_POOLS = {"avg": _GlobalAvgPool, "max": _GlobalMaxPool}  # xfer.models.resnet50(pooling=)


class TransferModel(nnx.Module):
    """``xfer.models.attach_head``'s model: any ``base`` then a :class:`TransferHead` (NHWC);
    the reference models are built on it too."""

    def __init__(self, base: nnx.Module, head: nnx.Module):
        self.base = base
        self.head = head

    xfer_chain = ("base", "head")  # __call__ is head(base(x)): feature caching may split it

    def __call__(self, x):
        return self.head(self.base(x))


# --- the small BN-CNN (xfer.models.small_cnn) ----------------------------------------------


class _Block(nnx.Module):
    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.bn = _bn(c_out, rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class _Base(nnx.Module):
    def __init__(self, in_channels: int, width: int, dropout: float, rngs: nnx.Rngs):
        self.block1 = _Block(in_channels, width, rngs)
        self.block2 = _Block(width, width, rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.pool = _GlobalAvgPool()

    def __call__(self, x):
        return self.pool(self.drop(self.block2(self.block1(x))))


class _Head(nnx.Module):
    def __init__(self, width: int, num_classes: int, dropout: float, rngs: nnx.Rngs):
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.drop(x))


class SmallCNN(TransferModel):
    """The reference model: base (two conv-BN-ReLU blocks, dropout, pooling) and head."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 8,
        dropout: float = 0.2,
        *,
        rngs: nnx.Rngs,
    ):
        base = _Base(in_channels, width, dropout, rngs)
        super().__init__(base, _Head(width, num_classes, dropout, rngs))


# --- the ResNet (xfer.models.resnet) -------------------------------------------------------


def _conv(
    c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs, style: ResNetStyle
) -> nnx.Conv:
    # Explicit symmetric padding: "SAME" with stride 2 pads asymmetrically, unlike PyTorch.
    p = kernel // 2
    return nnx.Conv(
        c_in,
        c_out,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=style.conv_bias,
        rngs=rngs,
    )


class _Stem(nnx.Module):
    def __init__(self, in_channels: int, width: int, rngs: nnx.Rngs, style: ResNetStyle):
        self.conv = _conv(in_channels, width, 7, 2, rngs, style)
        self.bn = _bn(width, rngs, style)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        # The padding as its own op (-inf: what max pooling pads with), and keywords:
        # jax2onnx (xfer.export_onnx) converts nnx.max_pool with keyword options and "VALID".
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


class _Downsample(nnx.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs, style: ResNetStyle):
        self.conv = _conv(c_in, c_out, 1, stride, rngs, style)
        self.bn = _bn(c_out, rngs, style)

    def __call__(self, x):
        return self.bn(self.conv(x))


class _ResidualBlock(nnx.Module):
    """A basic block or a bottleneck: ``conv1``/``bn1``, ``conv2``/``bn2``(, ``conv3``/``bn3``),
    ReLU between them, and ``downsample`` on the shortcut where the shape changes."""

    def __init__(self, spec: BlockSpec, rngs: nnx.Rngs, style: ResNetStyle):
        convs = spec.convs
        for i, (c_in, c_out, kernel, stride) in enumerate(convs, 1):
            setattr(self, f"conv{i}", _conv(c_in, c_out, kernel, stride, rngs, style))
            setattr(self, f"bn{i}", _bn(c_out, rngs, style))
        self.downsample = (
            _Downsample(spec.c_in, spec.c_out, spec.stride, rngs, style)
            if spec.downsample
            else None
        )
        self.n_convs = len(convs)

    def __call__(self, x):
        out = x
        for i in range(1, self.n_convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n_convs:
                out = nnx.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + shortcut)


class _ResNetBase(nnx.Module):
    """Stem, layer1..layer4 and (unless ``pooling`` is None) a global ``pool``."""

    def __init__(
        self,
        depth: int,
        in_channels: int,
        width: int,
        rngs: nnx.Rngs,
        style: ResNetStyle = CLASSIC,
        pooling: str | None = "avg",
    ):
        stages, features = resnet_layout(depth, width, style.stride_first)
        self.stem = _Stem(in_channels, width, rngs, style)
        for i, blocks in enumerate(stages, 1):
            stage = nnx.List([_ResidualBlock(b, rngs, style) for b in blocks])
            setattr(self, f"layer{i}", stage)
        self.pool = _POOLS[pooling]() if pooling else None
        self.features = features

    def __call__(self, x):
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x if self.pool is None else self.pool(x)


class _ResNetHead(nnx.Module):
    def __init__(self, features: int, num_classes: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


class ResNet(TransferModel):
    """``xfer.models.resnet``: base (stem, layer1..layer4, pool) and head (dense), NHWC."""

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, width: int = 64, *, rngs
    ):
        base = _ResNetBase(depth, in_channels, width, rngs)
        super().__init__(base, _ResNetHead(base.features, num_classes, rngs))


# --- a new head (xfer.models.attach_head) --------------------------------------------------


class GlobalAvgPool(nnx.Module):
    """The mean over the spatial axes of an (N, *spatial, C) map; an (N, C) input passes."""

    def __call__(self, x):
        return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


class TransferHead(nnx.Module):
    """The head of ``xfer.models.attach_head``: pool, dropout, dense."""

    def __init__(self, features: int, num_classes: int, dropout: float, *, rngs: nnx.Rngs):
        self.pool = GlobalAvgPool()
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.drop(self.pool(x)))


def _output_width(base: nnx.Module, input_shape) -> int:
    """The channels of ``base``'s output, from an abstract forward pass in eval mode.

    The pass runs on a merged copy under ``jax.eval_shape``: no computation, and the base's
    BN statistics, RNG streams and mode attributes stay as they are.
    """
    graphdef, state = nnx.split(base)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(x)

    dummy = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    try:
        out = jax.eval_shape(forward, state, dummy)
    except Exception as error:
        reason = str(error).rstrip(".")
        raise ValueError(
            f"attach_head: the base failed on a batch of shape {dummy.shape} (NHWC, from "
            f"input_shape={input_shape}): {reason}. input_shape must be one channels-last "
            "image the base accepts, (height, width, channels)."
        ) from error
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) < 2:
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ValueError(
            f"attach_head: the base must return one array, (batch, *spatial, channels) or "
            f"(batch, features), got {got}. Wrap the base in a Module that returns the "
            "feature map the head should pool."
        )
    return int(out.shape[-1])


# --- the Models contract -------------------------------------------------------------------


def _walked(model: TransferModel) -> TransferModel:
    walk(model)  # records the definition order now, before any jit sees the model
    return model


def small_cnn(num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int):
    return _walked(SmallCNN(num_classes, in_channels, width, dropout, rngs=nnx.Rngs(seed)))


def resnet(depth: int, num_classes: int, in_channels: int, *, width: int, seed: int):
    return _walked(ResNet(depth, num_classes, in_channels, width, rngs=nnx.Rngs(seed)))


def resnet50(num_classes, input_shape, *, include_top: bool, pooling, seed: int):
    rngs, style, width, channels = nnx.Rngs(seed), KERAS_V1, RESNET50_WIDTH, input_shape[-1]
    if not include_top:
        return _walked(_ResNetBase(50, channels, width, rngs, style, pooling))
    base = _ResNetBase(50, channels, width, rngs, style, "avg")
    return _walked(TransferModel(base, _ResNetHead(base.features, num_classes, rngs)))


def keras_applications_resnet50(num_classes, input_shape, *, include_top, pooling):
    raise ValueError(
        "keras.applications.ResNet50 is a Keras model: convert to backend='keras' for it; "
        "on Flax, xfer.convert builds xfer.models.resnet50."
    )


def recognise(model: nnx.Module) -> dict | None:
    return None  # Flax models xfer did not build: none it can convert yet


def attach_head(base: nnx.Module, num_classes, *, dropout, input_shape, seed):
    if input_shape is None:
        raise ValueError(
            "attach_head: a Flax base needs input_shape=(height, width, channels): an "
            "nnx.Module does not record its output width, so xfer learns it from an "
            "abstract forward pass. Pass the shape of one channels-last image, e.g. "
            "input_shape=(224, 224, 3)."
        )
    features = _output_width(base, input_shape)
    head = TransferHead(features, num_classes, dropout, rngs=nnx.Rngs(seed))
    return _walked(TransferModel(base, head))
