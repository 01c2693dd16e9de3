"""xfer's reference models in PyTorch (``xfer.models``) and the head ``attach_head`` adds.

Every model is a :class:`TransferModel`, ``head(base(x))`` on NCHW tensors. Keras/Flax BN
momentum 0.9 is torch momentum 0.1, and epsilon is set explicitly everywhere (torch's
default differs from Keras's); convs pad explicitly and symmetrically, as the Keras and
Flax models do, so every framework computes the same.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from xfer.backends._common import (
    CLASSIC,
    KERAS_V1,
    RESNET50_WIDTH,
    BlockSpec,
    ResNetStyle,
    resnet_layout,
)
from xfer.backends.torch.units import modes_restored


def _bn(channels: int, style: ResNetStyle = CLASSIC) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=style.epsilon, momentum=1 - style.momentum)


def _conv(
    c_in: int, c_out: int, kernel: int, stride: int = 1, style: ResNetStyle = CLASSIC
) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=style.conv_bias)


class _SpatialMean(nn.Module):
    """The mean over the two spatial axes of an (N, C, H, W) map."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class GlobalAvgPool(nn.Module):
    """The mean over the spatial axes of an (N, C, *spatial) map; an (N, C) input passes."""

    def forward(self, x):
        return x.flatten(2).mean(2) if x.dim() > 2 else x


class TransferModel(nn.Module):
    """``xfer.models.attach_head``'s model: any ``base`` then a :class:`TransferHead`; the
    reference models are built on it too.

    ``forward`` takes NCHW tensors, like the base.
    """

    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base = base
        self.head = head

    xfer_chain = ("base", "head")  # forward is head(base(x)): feature caching may split it

    def forward(self, x):
        return self.head(self.base(x))


class TransferHead(nn.Module):
    """The head of ``xfer.models.attach_head``: pool, dropout, dense."""

    def __init__(self, features: int, num_classes: int, dropout: float):
        super().__init__()
        self.pool = GlobalAvgPool()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.dense(self.drop(self.pool(x)))


# --- the small BN-CNN (xfer.models.small_cnn) ------------------------------------------------


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = _bn(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _SmallBase(nn.Module):
    def __init__(self, in_channels: int, width: int, dropout: float):
        super().__init__()
        self.block1 = _ConvBlock(in_channels, width)
        self.block2 = _ConvBlock(width, width)
        self.drop = nn.Dropout(dropout)
        self.pool = _SpatialMean()

    def forward(self, x):
        return self.pool(self.drop(self.block2(self.block1(x))))


class _SmallHead(nn.Module):
    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.dense(self.drop(x))


class SmallCNN(TransferModel):
    """The reference model: base (two conv-BN-ReLU blocks, dropout, pooling) and head."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: int = 8, dropout: float = 0.2
    ):
        super().__init__(
            _SmallBase(in_channels, width, dropout), _SmallHead(width, num_classes, dropout)
        )


# --- the ResNet (xfer.models.resnet) ---------------------------------------------------------


class _Stem(nn.Module):
    def __init__(self, in_channels: int, width: int, style: ResNetStyle):
        super().__init__()
        self.conv = _conv(in_channels, width, 7, 2, style)
        self.bn = _bn(width, style)

    def forward(self, x):
        return nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 3, 2, padding=1)


class _Downsample(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, style: ResNetStyle):
        super().__init__()
        self.conv = _conv(c_in, c_out, 1, stride, style)
        self.bn = _bn(c_out, style)

    def forward(self, x):
        return self.bn(self.conv(x))


class _ResidualBlock(nn.Module):
    """A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) block: ``conv1``/``bn1``..,
    then ``downsample`` where the shape changes (``None`` where it does not)."""

    def __init__(self, spec: BlockSpec, style: ResNetStyle):
        super().__init__()
        convs = spec.convs
        self.n_convs = len(convs)
        for i, (c_in, c_out, kernel, stride) in enumerate(convs, 1):
            setattr(self, f"conv{i}", _conv(c_in, c_out, kernel, stride, style))
            setattr(self, f"bn{i}", _bn(c_out, style))
        self.downsample = (
            _Downsample(spec.c_in, spec.c_out, spec.stride, style) if spec.downsample else None
        )

    def forward(self, x):
        out = x
        for i in range(1, self.n_convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n_convs:
                out = torch.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class _SpatialMax(nn.Module):
    """The maximum over the two spatial axes of an (N, C, H, W) map."""

    def forward(self, x):
        return x.amax(dim=(2, 3))


_POOLS = {"avg": _SpatialMean, "max": _SpatialMax}  # xfer.models.resnet50(pooling=)


class _ResNetBase(nn.Module):
    """Stem, layer1..layer4 and (unless ``pooling`` is None) a global ``pool``."""

    def __init__(
        self,
        depth: int,
        in_channels: int,
        width: int,
        style: ResNetStyle = CLASSIC,
        pooling: str | None = "avg",
    ):
        super().__init__()
        self.stem = _Stem(in_channels, width, style)
        stages, self.features = resnet_layout(depth, width, style.stride_first)
        for i, blocks in enumerate(stages, 1):
            stage = nn.Sequential(*(_ResidualBlock(b, style) for b in blocks))
            setattr(self, f"layer{i}", stage)
        self.pool = _POOLS[pooling]() if pooling else None

    def forward(self, x):
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x if self.pool is None else self.pool(x)


class _ResNetHead(nn.Module):
    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.dense = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.dense(x)


class ResNet(TransferModel):
    """``xfer.models.resnet``: base (stem, layer1..layer4, pool) and head (dense), NCHW."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 64):
        base = _ResNetBase(depth, in_channels, width)
        super().__init__(base, _ResNetHead(base.features, num_classes))


def _output_width(base: nn.Module, input_shape, reference) -> int:
    """The channels of ``base``'s output, from one forward pass in eval mode."""
    height, width, channels = input_shape
    device = reference.device if reference is not None else "cpu"
    floating = reference is not None and reference.is_floating_point()
    # Two images: a BN without running statistics cannot normalise a batch of one.
    dummy = torch.zeros(
        2, channels, height, width, device=device, dtype=reference.dtype if floating else None
    )
    with modes_restored(base, lift_pins=True):
        try:
            base.eval()
            with torch.no_grad():
                out = base(dummy)
        except Exception as error:
            reason = str(error).rstrip(".")
            raise ValueError(
                f"attach_head: the base failed on a dummy batch of shape {tuple(dummy.shape)} "
                f"(NCHW, from input_shape={input_shape}): {reason}. input_shape must be one "
                "channels-last image the base accepts, (height, width, channels)."
            ) from error
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"attach_head: the base must return one tensor, (batch, channels, *spatial) or "
            f"(batch, features), got {got}. Wrap the base in a Module that returns the "
            "feature map the head should pool."
        )
    return int(out.shape[1])


# --- Models (xfer._adapter.Models) -----------------------------------------------------------


def small_cnn(num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int):
    torch.manual_seed(seed)
    return SmallCNN(num_classes, in_channels, width, dropout)


def resnet(depth: int, num_classes: int, in_channels: int, *, width: int, seed: int):
    torch.manual_seed(seed)
    return ResNet(depth, num_classes, in_channels, width)


def resnet50(num_classes, input_shape, *, include_top: bool, pooling, seed: int):
    torch.manual_seed(seed)
    style, width, channels = KERAS_V1, RESNET50_WIDTH, input_shape[-1]
    if not include_top:
        return _ResNetBase(50, channels, width, style, pooling)
    base = _ResNetBase(50, channels, width, style, "avg")
    return TransferModel(base, _ResNetHead(base.features, num_classes))


def keras_applications_resnet50(num_classes, input_shape, *, include_top, pooling):
    raise ValueError(
        "keras.applications.ResNet50 is a Keras model: convert to backend='keras' for it; "
        "on torch, xfer.convert builds xfer.models.resnet50."
    )


def recognise(model: nn.Module) -> dict | None:
    return None  # torch models xfer did not build: none it can convert yet


def attach_head(base: nn.Module, num_classes, *, dropout, input_shape, seed):
    if input_shape is None:
        raise ValueError(
            "attach_head: a torch base needs input_shape=(height, width, channels): a "
            "torch Module does not record its output width, so xfer learns it from one "
            "dummy forward pass. Pass the shape of one channels-last image, e.g. "
            "input_shape=(224, 224, 3)."
        )
    reference = next(itertools.chain(base.parameters(), base.buffers()), None)
    features = _output_width(base, input_shape, reference)
    # The head's initialisation follows `seed` without moving the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = TransferHead(features, num_classes, dropout)
    if reference is not None:
        floating = reference.is_floating_point()
        head.to(device=reference.device, dtype=reference.dtype if floating else None)
    return TransferModel(base, head)
