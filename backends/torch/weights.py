"""A torch model's parameters and buffers as numpy, natively and in the neutral layout.

The neutral layout is Keras's (``xfer._adapter.Weights``): conv kernels ``(*spatial, in,
out)`` where torch stores ``(out, in, *spatial)``, dense kernels ``(in, out)`` where a
``Linear`` stores ``(out, in)``, and Keras's role names (``gamma``, ``moving_variance``...).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

# Native -> neutral (Keras) names per module type; _NormBase covers BatchNorm and InstanceNorm.
# Variables of other modules keep their native names (and layouts).
BN_ROLES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
ROLES = (
    (_NormBase, BN_ROLES),
    ((nn.LayerNorm, nn.GroupNorm), {"weight": "gamma", "bias": "beta"}),
    (nn.RMSNorm, {"weight": "scale"}),
    ((_ConvNd, nn.Linear), {"weight": "kernel"}),
    (nn.Embedding, {"weight": "embeddings"}),
)


def layout(native: nn.Module, name: str) -> tuple[int, ...] | None:
    """The permutation from the native layout of ``native``'s variable ``name`` to the
    neutral one (``None``: the same layout).

    Example:
        >>> layout(nn.Conv2d(3, 8, 3), "weight"), layout(nn.Linear(3, 2), "bias")
        ((2, 3, 1, 0), None)
    """
    if name != "weight":
        return None
    if isinstance(native, _ConvNd):
        # (out, in/groups, *k) -> (*k, in/groups, out): grouped and depthwise convs come out
        # as Keras Conv(groups=) and Flax Conv(feature_group_count=) store them. Transposed
        # convs, (in, out/groups, *k) -> (*k, out/groups, in), come out in Keras's
        # Conv*Transpose layout (checked numerically against Keras for valid padding).
        spatial = native.weight.dim() - 2
        return (*range(2, spatial + 2), 1, 0)
    if isinstance(native, nn.Linear):
        return (1, 0)
    return None


def neutral_variables(
    model: nn.Module,
) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...] | None]]:
    """(neutral key, tensor, permutation) of every parameter and persistent buffer, once each.

    Example:
        >>> [(key, perm) for key, _, perm in neutral_variables(nn.Sequential(nn.Linear(3, 2)))]
        [('0.kernel', (1, 0)), ('0.bias', None)]
    """
    seen = set()
    for path, module in model.named_modules():
        roles = next((r for types, r in ROLES if isinstance(module, types)), {})
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
            yield (f"{path}.{role}" if path else role), tensor, layout(module, name)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy on the CPU (sharing memory where it can); bfloat16 as float32.

    Example:
        >>> to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype
        dtype('float32')
    """
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        tensor = tensor.float()
    return tensor.numpy()


# --- Weights (xfer._adapter.Weights) ---------------------------------------------------------


def tensors(model: nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        yield name, tensor.detach().cpu().numpy()


def weight_arrays(model: nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    for key, tensor, perm in neutral_variables(model):
        array = to_numpy(tensor)
        yield key, (array.transpose(perm) if perm else array)


def assign_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    # Everything converted first, then copied: a conversion error assigns nothing.
    planned = [
        (
            tensor,
            torch.tensor(weights[key].transpose(np.argsort(perm)) if perm else weights[key]),
        )
        for key, tensor, perm in neutral_variables(model)
    ]
    with torch.no_grad():
        for tensor, value in planned:
            tensor.copy_(value)  # in place: same Parameter, device, dtype, requires_grad


def persistence() -> str:
    return (
        "state_dict keeps weights only; save xfer.export_state(model) beside it "
        "(torch.save({'model': model.state_dict(), 'xfer': xfer.export_state(model)}, f)) "
        "and restore with xfer.import_state."
    )
