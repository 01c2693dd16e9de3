"""BatchNorm recalibration (``xfer.recalibrate_bn``) on torch: the backend part of
``xfer._adapter.Recalibration``.

A selected BN is made to normalise with the batch's statistics and to store them whole
(``momentum=1``) for one forward in ``eval()``; any other BN that trains in that forward (one
pinned to "train") gets ``momentum=0``, which keeps its running statistics exactly. Each BN's
``momentum``, ``training`` and ``num_batches_tracked`` are put back afterwards.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from xfer._adapter import Unit
from xfer.backends.torch.engine import device_of, to_tensor
from xfer.backends.torch.units import modes_restored


def batch_statistics(
    model: nn.Module, units: list[Unit], x: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    selected = {unit.native: unit.path for unit in units}
    for module, path in selected.items():
        if (
            not isinstance(module, nn.modules.batchnorm._BatchNorm)
            or not module.track_running_stats
        ):
            raise ValueError(
                f"recalibrate_bn: {path} is a {type(module).__name__}, which keeps no running "
                "statistics to re-estimate (expected a torch BatchNorm with "
                "track_running_stats=True). Leave it out of `where`."
            )
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = {m: (m.momentum, m.num_batches_tracked.clone()) for m in bns if m.track_running_stats}
    with contextlib.ExitStack() as undo, modes_restored(model), torch.no_grad():
        for module in saved:
            module.momentum = 1.0 if module in selected else 0.0
        undo.callback(_restore, saved)
        for module in selected:
            # After xfer's own pin hook, which sets `training` right before the module runs.
            hook = module.register_forward_pre_hook(lambda m, args: setattr(m, "training", True))
            undo.callback(hook.remove)
        model.eval()
        model(to_tensor(x, device_of(model)))
        return {
            path: (_numpy(module.running_mean), _numpy(module.running_var))
            for module, path in selected.items()
        }


def assign_statistics(
    model: nn.Module, units: list[Unit], values: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    with torch.no_grad():
        for unit in units:
            mean, var = values[unit.path]
            for buffer, value in ((unit.native.running_mean, mean), (unit.native.running_var, var)):
                buffer.copy_(torch.from_numpy(np.asarray(value)).to(buffer.dtype))


def _restore(saved: dict) -> None:
    with torch.no_grad():
        for module, (momentum, tracked) in saved.items():
            module.momentum = momentum
            module.num_batches_tracked.copy_(tracked)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()
