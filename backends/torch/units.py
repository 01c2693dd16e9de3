"""The units of a torch model and the two switches: ``requires_grad`` and mode pins.

A unit is a submodule (``named_modules``); its own parameters are its ``_parameters``, not
its children's. A pinned mode is ``module._xfer_mode`` plus a forward pre-hook that sets
``module.training`` back to it right before the module computes: ``model.train()`` recurses
into every child and overwrites ``training``, so nothing else would survive it.

A ``FrozenBatchNorm2d`` (torchvision, timm, detectron2) is a BN unit that is frozen by
construction: its gamma/beta buffers count as frozen parameters and its mode is inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from xfer._adapter import Mode, Unit
from xfer.backends._common import root_index, unit_kind

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, _InstanceNorm)
_KINDS = (  # (module types, unit kind), the first match wins
    (_BatchNorm, "batchnorm"),
    (_DropoutNd, "dropout"),
    (_ConvNd, "conv"),
    ((nn.Linear, nn.Bilinear), "dense"),
    (NORMS, "norm"),
)

# torch layers whose computation depends on train/eval (dropout inside RNNs and attention).
MODE_DEPENDENT = (
    _BatchNorm,
    _DropoutNd,
    _InstanceNorm,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)

PIN = "_xfer_mode"  # the attribute that holds a module's pinned mode
BN_STATS = ("running_mean", "running_var")
FROZEN_BN_TENSORS = ("weight", "bias", *BN_STATS)


def is_frozen_bn(native: nn.Module) -> bool:
    """Whether ``native`` is a BatchNorm frozen by construction: torchvision's
    ``FrozenBatchNorm2d`` (detection backbones) or timm's ``FrozenBatchNorm2d``/
    ``FrozenBatchNormAct2d`` (``timm.layers.freeze_batch_norm_2d``). They hold gamma, beta
    and the statistics as buffers and always normalise with the statistics; recognised by
    name and buffers, so that neither library is imported here.

    Example:
        >>> is_frozen_bn(nn.BatchNorm2d(4)), is_frozen_bn(nn.ReLU())
        (False, False)
    """
    if not type(native).__name__.startswith("FrozenBatchNorm") or own_params(native):
        return False
    return all(isinstance(native._buffers.get(n), torch.Tensor) for n in FROZEN_BN_TENSORS)


def kind(native: nn.Module) -> str:
    """The unit kind (``xfer._adapter.KINDS``) of a module.

    Example:
        >>> kind(nn.BatchNorm2d(4)), kind(nn.Sequential(nn.ReLU())), kind(nn.ReLU())
        ('batchnorm', 'container', 'other')
    """
    if is_frozen_bn(native):
        return "batchnorm"
    container = next(native.children(), None) is not None and not native._parameters
    return unit_kind(native, _KINDS, container)


def own_params(native: nn.Module) -> list[nn.Parameter]:
    """The module's own parameters, not its children's.

    Example:
        >>> [tuple(p.shape) for p in own_params(nn.Linear(3, 2))]
        [(2, 3), (2,)]
    """
    return [p for p in native._parameters.values() if p is not None]


def _apply_pin(module: nn.Module, args) -> None:
    # A module-level function, so models with pins still pickle and deepcopy.
    mode = module.__dict__.get(PIN)
    if mode is not None:
        module.training = mode == "train"


@contextlib.contextmanager
def pins_applied(model: nn.Module) -> Iterator[None]:
    """Every pinned module of ``model`` in its pinned mode, with the pins' forward pre-hooks
    lifted for the block and put back after, in their order: for xfer's own loops of
    forwards (predict), which change no mode between them. A module with a hook leaves
    PyTorch's fast call path; on a small ResNet the hooks cost a fifth of a forward.

    Example:
        >>> model = nn.Sequential(nn.Dropout())
        >>> model[0].__dict__[PIN] = "train"
        >>> _ = model[0].register_forward_pre_hook(_apply_pin)
        >>> _ = model.eval()
        >>> with pins_applied(model):
        ...     model[0].training, len(model[0]._forward_pre_hooks)
        (True, 0)
        >>> len(model[0]._forward_pre_hooks)
        1
    """
    lifted = []
    for module in model.modules():
        hooks = module._forward_pre_hooks
        if any(h is _apply_pin for h in hooks.values()):
            _apply_pin(module, ())
            lifted.append((module, dict(hooks)))
            for key in [k for k, h in hooks.items() if h is _apply_pin]:
                del hooks[key]
    try:
        yield
    finally:
        for module, saved in lifted:
            added = {k: h for k, h in module._forward_pre_hooks.items() if k not in saved}
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update({**saved, **added})


@contextlib.contextmanager
def modes_restored(model: nn.Module, *, lift_pins: bool = False) -> Iterator[None]:
    """Every module's ``training`` flag as it was after the block; with ``lift_pins``, the
    pins are lifted inside it (a BN pinned to "train" would learn from a probe batch) and
    put back after.

    Example:
        >>> model = nn.Sequential(nn.Dropout())
        >>> with modes_restored(model):
        ...     _ = model.eval()
        >>> model[0].training
        True
    """
    flags = {module: module.training for module in model.modules()}
    pins = {m: m.__dict__.pop(PIN) for m in flags if lift_pins and PIN in m.__dict__}
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training
        for module, mode in pins.items():
            module.__dict__[PIN] = mode


# --- Units (xfer._adapter.Units) -------------------------------------------------------------


def units(model: nn.Module) -> list[Unit]:
    top = {name: i for i, (name, _) in enumerate(model.named_children())}
    found = []
    for path, module in model.named_modules():
        n_params = sum(p.numel() for p in own_params(module))
        if path == "":
            index = root_index(n_params, bool(top))
            if index is None:
                continue
        else:
            index = top[path.split(".")[0]]
        params = tuple(n for n, p in module._parameters.items() if p is not None)
        stats = BN_STATS if isinstance(module, _BatchNorm) else ()
        if is_frozen_bn(module):  # gamma/beta are buffers: frozen tensors, as the stats
            params, stats = FROZEN_BN_TENSORS[:2], BN_STATS
        found.append(Unit(path, kind(module), index, n_params, module, model, params, stats))
    return found


def chain(model: nn.Module) -> list[nn.Module] | None:
    if type(model) is nn.Sequential:
        return list(model.children())
    names = getattr(type(model), "xfer_chain", None)
    return None if names is None else [getattr(model, name) for name in names]


def mode_free(unit: Unit) -> bool:
    module = unit.native
    if isinstance(module, MODE_DEPENDENT):
        return False
    # torch's own layers other than those, and xfer's, which only call their children.
    return type(module).__module__.startswith(("torch.nn.modules.", f"{__package__}."))


def param_counts(unit: Unit) -> tuple[int, int]:
    if is_frozen_bn(unit.native):  # gamma and beta never train: frozen parameters
        return 0, sum(unit.native._buffers[n].numel() for n in FROZEN_BN_TENSORS[:2])
    params = own_params(unit.native)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) - trainable


def set_trainable(unit: Unit, trainable: bool) -> None:
    for p in own_params(unit.native):
        p.requires_grad_(trainable)
        if not trainable:
            # A stale (even zero) gradient makes AdamW/SGD still apply weight decay
            # and momentum; optimizers skip parameters whose grad is None.
            p.grad = None


def get_mode(unit: Unit) -> Mode:
    if is_frozen_bn(unit.native):  # normalises with its statistics whatever the mode
        return "inference"
    return unit.native.__dict__.get(PIN) or "inherit"


def set_mode(unit: Unit, mode: Mode) -> None:
    module = unit.native
    hooks = module._forward_pre_hooks
    registered = [k for k, h in hooks.items() if h is _apply_pin]
    if mode == "inherit":
        module.__dict__.pop(PIN, None)
        for key in registered:
            del hooks[key]
        module.training = unit.root.training
        return
    setattr(module, PIN, mode)
    module.training = mode == "train"
    if not registered:
        module.register_forward_pre_hook(_apply_pin)


def current_mode(unit: Unit) -> str:
    if is_frozen_bn(unit.native):
        return "inference"
    pin = unit.native.__dict__.get(PIN)  # a pin wins: its hook resets ``training``
    return pin or ("train" if unit.native.training else "inference")


def bn_momentum(unit: Unit) -> float | None:
    if is_frozen_bn(unit.native):  # never updates its statistics
        return 0.0
    return unit.native.momentum if unit.is_bn else None
