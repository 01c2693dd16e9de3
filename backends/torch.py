"""PyTorch adapter: ``requires_grad`` for trainable, a forward pre-hook for pinned modes.

Why a pre-hook: ``model.train()`` recurses into every child and overwrites
``module.training``; the hook sets the pinned value back right before the module
computes, so a pinned module keeps its mode under any ``train()``/``eval()`` call.
"""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from xfer._adapter import Unit

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


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module._parameters.values() if p is not None]


def _apply_pin(module: nn.Module, args) -> None:
    # A module-level function, so models with pins still pickle and deepcopy.
    mode = module.__dict__.get("_xfer_mode")
    if mode is not None:
        module.training = mode == "train"


class TorchAdapter:
    name = "torch"

    def owns(self, model) -> bool:
        return isinstance(model, nn.Module)

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
            units.append(
                Unit(
                    path,
                    name,
                    _kind(module),
                    index,
                    path.count(".") + bool(path),
                    n_params,
                    module,
                    model,
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

    def snapshot(self, model: nn.Module) -> dict[str, np.ndarray]:
        out = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            out[name] = tensor.detach().cpu().numpy().copy()
        return out

    def persistence(self) -> str:
        return (
            "state_dict keeps weights only; save xfer.export_state(model) beside it "
            "(torch.save({'model': model.state_dict(), 'xfer': xfer.export_state(model)}, f)) "
            "and restore with xfer.import_state."
        )


ADAPTER = TorchAdapter()
