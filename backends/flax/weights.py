"""Every parameter and BN statistic of a Flax NNX model, natively and in the neutral layout.

NNX kernels are already channels-last (Conv ``(*k, in/groups, out)``, Linear ``(in, out)``),
so the neutral layout only renames: NNX's variable names become Keras's role names per
module type (RMSNorm's ``scale`` is Keras's name too). ConvTranspose keeps NNX's kernel,
``(*k, in, out)`` and unflipped unless ``transpose_kernel``: no fixed permutation matches
Keras's or PyTorch's transposed convs.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from xfer.backends.flax.units import is_param, own_variables, walk

_BN_ROLES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
_ROLES = (
    (nnx.BatchNorm, _BN_ROLES),
    ((nnx.LayerNorm, nnx.GroupNorm, nnx.InstanceNorm), {"scale": "gamma", "bias": "beta"}),
    (nnx.Embed, {"embedding": "embeddings"}),
)


def _exported(variable: nnx.Variable) -> bool:
    # Parameters (trainable or frozen) and BN statistics; not RNG streams or counters.
    return is_param(variable) or isinstance(variable, nnx.BatchStat)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    for path, module, _ in walk(model):
        for key, variable in own_variables(module):
            if _exported(variable):
                yield _key(path, key), np.asarray(variable.get_value())


def _neutral_variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    """``(neutral key, variable)`` of every exported variable, a tied one once.

    Example:
        >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> [key for key, _ in _neutral_variables(model)]
        ['layers.0.kernel', 'layers.0.bias']
    """
    seen = set()
    for path, module, _ in walk(model):
        roles = next((r for types, r in _ROLES if isinstance(module, types)), {})
        for key, variable in own_variables(module):
            if _exported(variable) and id(variable) not in seen:
                seen.add(id(variable))
                yield _key(path, roles.get(key, key)), variable


def weight_arrays(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    for key, variable in _neutral_variables(model):
        yield key, np.asarray(variable.get_value())


def assign_weights(model: nnx.Module, weights: dict[str, np.ndarray]) -> None:
    planned = []
    for key, variable in _neutral_variables(model):
        old = variable.get_value()
        placed = old.sharding if isinstance(old, jax.Array) else None
        planned.append((variable, jax.device_put(weights[key], placed)))
    for variable, value in planned:
        # The value only: the Variable object, and so its type (Param, Frozen), stays.
        variable.set_value(value)


def persistence() -> str:
    return (
        "nnx.split/nnx.merge (graphdef + state), copy.deepcopy and pickle keep the frozen "
        "partition and the mode pins; a checkpoint of nnx.state(model) (orbax, "
        "nnx.to_pure_dict) restored into a freshly built model keeps values only: save "
        "xfer.export_state(model) beside it and re-apply it with xfer.import_state."
    )
