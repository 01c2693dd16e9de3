"""PyTorch adapter: ``requires_grad`` for trainable, a forward pre-hook for pinned modes.

Why a pre-hook: ``model.train()`` recurses into every child and overwrites
``module.training``; the hook sets the pinned value back right before the module
computes, so a pinned module keeps its mode under any ``train()``/``eval()`` call.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from xfer._adapter import Unit
from xfer.data import PREDICT_CHUNK, inference_chunks

_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _kind(module: nn.Module) -> str:
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, _DropoutNd):
        return "dropout"
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return "dense"
    if isinstance(module, _NORMS):
        return "norm"
    if next(module.children(), None) is not None and not module._parameters:
        return "container"
    return "other"


# Native -> neutral (Keras) names per module type; _NormBase covers BatchNorm and InstanceNorm.
# Variables of other modules keep their native names (and layouts).
_BN_ROLES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_ROLES = (
    (_NormBase, _BN_ROLES),
    ((nn.LayerNorm, nn.GroupNorm), {"weight": "gamma", "bias": "beta"}),
    (nn.RMSNorm, {"weight": "scale"}),
    ((_ConvNd, nn.Linear), {"weight": "kernel"}),
    (nn.Embedding, {"weight": "embeddings"}),
)


def _layout(module: nn.Module, name: str) -> tuple[int, ...] | None:
    """The permutation from the native layout to the neutral one (None: the same layout)."""
    if name != "weight":
        return None
    if isinstance(module, _ConvNd):
        # (out, in/groups, *k) -> (*k, in/groups, out): grouped and depthwise convs come out
        # as Keras Conv(groups=) and Flax Conv(feature_group_count=) store them. Transposed
        # convs, (in, out/groups, *k) -> (*k, out/groups, in), come out in Keras's
        # Conv*Transpose layout (checked numerically against Keras for valid padding).
        spatial = module.weight.dim() - 2
        return (*range(2, spatial + 2), 1, 0)
    if isinstance(module, nn.Linear):
        return (1, 0)
    return None


def _neutral_variables(model: nn.Module):
    """(neutral key, tensor, permutation) of every parameter and persistent buffer, once each."""
    seen = set()
    for path, module in model.named_modules():
        roles = next((r for types, r in _ROLES if isinstance(module, types)), {})
        buffers = [
            (n, b)
            for n, b in module._buffers.items()
            if n not in module._non_persistent_buffers_set
            # A step counter the other frameworks do not have; it only matters for momentum=None.
            and not (isinstance(module, _NormBase) and n == "num_batches_tracked")
        ]
        for name, tensor in [*module._parameters.items(), *buffers]:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            role = roles.get(name, name)
            yield (f"{path}.{role}" if path else role), tensor, _layout(module, name)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        tensor = tensor.float()
    return tensor.numpy()


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module._parameters.values() if p is not None]


def _apply_pin(module: nn.Module, args) -> None:
    # A module-level function, so models with pins still pickle and deepcopy.
    mode = module.__dict__.get("_xfer_mode")
    if mode is not None:
        module.training = mode == "train"


class TorchAdapter:
    mixed_precision = None  # autocast applies it to any model
    name = "torch"

    def units(self, model: nn.Module) -> list[Unit]:
        top = {name: i for i, (name, _) in enumerate(model.named_children())}
        units = []
        for path, module in model.named_modules():
            n_params = sum(p.numel() for p in _own_params(module))
            if path == "":
                if n_params == 0 and top:
                    continue
                index = -1 if top else 0
            else:
                index = top[path.split(".")[0]]
            name = path.rpartition(".")[2]
            depth = path.count(".") + bool(path)
            params = tuple(n for n, p in module._parameters.items() if p is not None)
            stats = ("running_mean", "running_var") if isinstance(module, _BatchNorm) else ()
            units.append(
                Unit(
                    path, name, _kind(module), index, depth, n_params, module, model, params, stats
                )
            )
        return units

    def param_counts(self, unit: Unit) -> tuple[int, int]:
        params = _own_params(unit.native)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, sum(p.numel() for p in params) - trainable

    def set_trainable(self, unit: Unit, trainable: bool) -> None:
        for p in _own_params(unit.native):
            p.requires_grad_(trainable)
            if not trainable:
                # A stale (even zero) gradient makes AdamW/SGD still apply weight decay
                # and momentum; optimizers skip parameters whose grad is None.
                p.grad = None

    def get_mode(self, unit: Unit) -> str:
        return unit.native.__dict__.get("_xfer_mode") or "inherit"

    def set_mode(self, unit: Unit, mode: str) -> None:
        module = unit.native
        hooks = module._forward_pre_hooks
        registered = [k for k, h in hooks.items() if h is _apply_pin]
        if mode == "inherit":
            module.__dict__.pop("_xfer_mode", None)
            for key in registered:
                del hooks[key]
            module.training = unit.root.training
            return
        module._xfer_mode = mode
        module.training = mode == "train"
        if not registered:
            module.register_forward_pre_hook(_apply_pin)

    def tensors(self, model: nn.Module):
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            yield name, tensor.detach().cpu().numpy()

    def weight_arrays(self, model: nn.Module):
        for key, tensor, perm in _neutral_variables(model):
            array = _numpy(tensor)
            yield key, (array.transpose(perm) if perm else array)

    def assign_weights(self, model: nn.Module, weights: dict[str, np.ndarray]) -> None:
        # Everything converted first, then copied: a conversion error assigns nothing.
        planned = [
            (
                tensor,
                torch.tensor(weights[key].transpose(np.argsort(perm)) if perm else weights[key]),
            )
            for key, tensor, perm in _neutral_variables(model)
        ]
        with torch.no_grad():
            for tensor, value in planned:
                tensor.copy_(value)  # in place: same Parameter, device, dtype, requires_grad

    def persistence(self) -> str:
        return (
            "state_dict keeps weights only; save xfer.export_state(model) beside it "
            "(torch.save({'model': model.state_dict(), 'xfer': xfer.export_state(model)}, f)) "
            "and restore with xfer.import_state."
        )

    def small_cnn(
        self, num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int
    ):
        torch.manual_seed(seed)
        return SmallCNN(num_classes, in_channels, width, dropout)

    def resnet(self, depth: int, num_classes: int, in_channels: int, *, width: int, seed: int):
        torch.manual_seed(seed)
        return ResNet(depth, num_classes, in_channels, width)

    def attach_head(self, base: nn.Module, num_classes, *, dropout, input_shape, seed):
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

    def fit(self, model, x, y, *, epochs, batch_size, lr, weight_decay) -> list[float]:
        # The PyTorch tutorial loop, with no xfer code in it: AdamW over model.parameters()
        # and model.train() every epoch; the xfer state makes it do the right thing.
        device = next(model.parameters()).device
        xs, ys = _to_tensor(x, device), torch.from_numpy(np.asarray(y)).long().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        for _ in range(epochs):
            model.train()
            total = 0.0
            for i in range(0, len(xs), batch_size):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(
                    model(xs[i : i + batch_size]), ys[i : i + batch_size]
                )
                loss.backward()
                opt.step()
                total += loss.item() * len(ys[i : i + batch_size])
            losses.append(total / len(ys))
        return losses

    def trainer(
        self,
        model,
        *,
        optimizer,
        lr,
        weight_decay,
        lr_groups,
        precision="float32",
        compile_step=False,
    ):
        # An optimizer over exactly the trainable parameters (frozen ones get no state),
        # one parameter group per learning rate.
        modules = dict(model.named_modules())
        grouped, groups = set(), []
        for paths, group_lr in lr_groups:
            params = [p for path in paths for p in _own_params(modules[path]) if p.requires_grad]
            grouped.update(map(id, params))
            groups.append({"params": params, "lr": group_lr})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
        groups = [g for g in [{"params": rest, "lr": lr}, *groups] if g["params"]]
        opt = _OPTIMIZERS[optimizer](groups, lr, weight_decay)
        device = _device(model)
        forward = torch.compile(model) if compile_step else model  # shares the parameters
        # Mixed precision the PyTorch way: autocast the forward pass, parameters in float32.
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bfloat16")

        def step(x, y) -> float:
            model.train()
            opt.zero_grad()
            if not isinstance(x, torch.Tensor):  # else already on the device (to_device)
                x, y = self.to_device(model, x, y)
            with autocast:
                loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    def to_device(self, model, x, y):
        device = _device(model)
        return _to_tensor(x, device), torch.from_numpy(np.asarray(y)).long().to(device)

    def predict(self, model, x, *, batch_size=PREDICT_CHUNK) -> np.ndarray:
        model.eval()
        device = _device(model)
        chunks = inference_chunks(x, pad=False, size=batch_size)
        with torch.no_grad():
            out = [model(_to_tensor(c, device)) for c, _ in chunks]
        return _channels_last(torch.cat(out).cpu().numpy())

    def place(self, model: nn.Module, device: str) -> str:
        cuda = torch.cuda.is_available()
        if device == "cuda" and not cuda:
            raise ValueError(
                "device='cuda', but torch sees no CUDA device (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}). Use device='auto' or 'cpu'."
            )
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        model.to(device)
        return device

    def output_shape(self, model, x) -> tuple[int, ...]:
        # A probe must not change the model: predict() switches it to eval(), and a fit
        # refused after the probe would leave the user's model there.
        flags = [(m, m.training) for m in model.modules()]
        try:
            return self.predict(model, x).shape  # eager: as cheap as tracing
        finally:
            for module, training in flags:
                module.training = training

    def chain(self, model: nn.Module) -> list[nn.Module] | None:
        if type(model) is nn.Sequential:
            return list(model.children())
        names = getattr(type(model), "xfer_chain", None)
        return None if names is None else [getattr(model, name) for name in names]

    def mode_free(self, unit: Unit) -> bool:
        module = unit.native
        if isinstance(module, _MODE_DEPENDENT):
            return False
        # torch's own layers other than those, and xfer's, which only call their children.
        return type(module).__module__.startswith(("torch.nn.modules.", __name__))


# Matched on every backend: Adam's epsilon is Keras's default, SGD momentum 0.9.
_OPTIMIZERS = {
    "sgd": lambda groups, lr, wd: torch.optim.SGD(groups, lr=lr),
    "momentum": lambda groups, lr, wd: torch.optim.SGD(groups, lr=lr, momentum=0.9),
    "adam": lambda groups, lr, wd: torch.optim.Adam(groups, lr=lr, eps=1e-7),
    "adamw": lambda groups, lr, wd: torch.optim.AdamW(groups, lr=lr, eps=1e-7, weight_decay=wd),
}


def _to_tensor(x: np.ndarray, device) -> torch.Tensor:
    """Channels-last numpy images (or feature maps) to a channels-first tensor; a
    ``(batch, features)`` array as it is."""
    x = np.asarray(x, "float32")
    if x.ndim >= 3:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    return torch.from_numpy(x).to(device)


def _channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def _device(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


# torch layers whose computation depends on train/eval (dropout inside RNNs and attention).
_MODE_DEPENDENT = (
    _BatchNorm,
    _DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        # Keras/Flax momentum 0.9 is torch momentum 0.1; epsilon set explicitly everywhere.
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.1)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class _Base(nn.Module):
    def __init__(self, in_channels: int, width: int, dropout: float):
        super().__init__()
        self.block1 = _Block(in_channels, width)
        self.block2 = _Block(width, width)
        self.drop = nn.Dropout(dropout)
        self.pool = _GlobalAvgPool()

    def forward(self, x):
        return self.pool(self.drop(self.block2(self.block1(x))))


class _Head(nn.Module):
    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.dense(self.drop(x))


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


class SmallCNN(TransferModel):
    """The reference model: base (two conv-BN-ReLU blocks, dropout, pooling) and head."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: int = 8, dropout: float = 0.2
    ):
        super().__init__(_Base(in_channels, width, dropout), _Head(width, num_classes, dropout))


def _output_width(base: nn.Module, input_shape, reference) -> int:
    """The channels of ``base``'s output, from one forward pass in eval mode."""
    height, width, channels = input_shape
    device = reference.device if reference is not None else "cpu"
    floating = reference is not None and reference.is_floating_point()
    # Two images: a BN without running statistics cannot normalise a batch of one.
    dummy = torch.zeros(
        2, channels, height, width, device=device, dtype=reference.dtype if floating else None
    )
    flags = {module: module.training for module in base.modules()}
    # Pins lifted for the pass: a BN pinned to "train" would learn from the dummy batch.
    pins = {m: m.__dict__.pop("_xfer_mode") for m in flags if "_xfer_mode" in m.__dict__}
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
    finally:
        for module, training in flags.items():
            module.training = training
        for module, mode in pins.items():
            module.__dict__["_xfer_mode"] = mode
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"attach_head: the base must return one tensor, (batch, channels, *spatial) or "
            f"(batch, features), got {got}. Wrap the base in a Module that returns the "
            "feature map the head should pool."
        )
    return int(out.shape[1])


class GlobalAvgPool(nn.Module):
    """The mean over the spatial axes of an (N, C, *spatial) map; an (N, C) input passes."""

    def forward(self, x):
        return x.flatten(2).mean(2) if x.dim() > 2 else x


class TransferHead(nn.Module):
    """The head of ``xfer.models.attach_head``: pool, dropout, dense."""

    def __init__(self, features: int, num_classes: int, dropout: float):
        super().__init__()
        self.pool = GlobalAvgPool()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.dense(self.drop(self.pool(x)))


ADAPTER = TorchAdapter()


# --- ResNet reference model (xfer.models.resnet) -------------------------------------------


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # Explicit symmetric padding, the same as the Keras and Flax models.
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.1)


class _Stem(nn.Module):
    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv = _conv(in_channels, width, 7, 2)
        self.bn = _bn(width)

    def forward(self, x):
        return nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 3, 2, padding=1)


class _Downsample(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv = _conv(c_in, c_out, 1, stride)
        self.bn = _bn(c_out)

    def forward(self, x):
        return self.bn(self.conv(x))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = _bn(planes)
        changes = stride != 1 or c_in != planes
        self.downsample = _Downsample(c_in, planes, stride) if changes else None

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * 4
        self.conv1 = _conv(c_in, planes, 1)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = _bn(planes)
        self.conv3 = _conv(planes, c_out, 1)
        self.bn3 = _bn(c_out)
        changes = stride != 1 or c_in != c_out
        self.downsample = _Downsample(c_in, c_out, stride) if changes else None

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


RESNET_STAGES = {18: ((2, 2, 2, 2), _BasicBlock), 50: ((3, 4, 6, 3), _Bottleneck)}


class _ResNetBase(nn.Module):
    def __init__(self, depth: int, in_channels: int, width: int):
        super().__init__()
        counts, block = RESNET_STAGES[depth]
        self.stem = _Stem(in_channels, width)
        c_in = width
        for i, count in enumerate(counts):
            planes = width * 2**i
            blocks = []
            for j in range(count):
                blocks.append(block(c_in, planes, 2 if i > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = _GlobalAvgPool()
        self.features = c_in

    def forward(self, x):
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.pool(x)


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
