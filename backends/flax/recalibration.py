"""BatchNorm recalibration (``xfer.recalibrate_bn``) on Flax NNX: the backend part of
``xfer._adapter.Recalibration``.

For one forward in ``model.eval()``, a selected ``nnx.BatchNorm`` is pinned to train mode
(``use_running_average=False``) with ``momentum=0``, so its ``BatchStat`` variables become
the batch's statistics (NNX's update is ``momentum * ra + (1 - momentum) * batch``); any
other BN that trains in that forward (one pinned to "train") gets ``momentum=1``, which keeps
its statistics exactly. Every module's class (its pin) and mode attributes, and the momenta,
are put back afterwards.
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xfer._adapter import Unit
from xfer.backends.flax.units import MODE_ATTRIBUTES, set_mode


@nnx.jit
def _forward(model: nnx.Module, x: jnp.ndarray) -> None:
    model(x)  # nnx.jit writes the updated BatchStat variables back into the model


def batch_statistics(
    model: nnx.Module, units: list[Unit], x: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    for unit in units:
        if not isinstance(unit.native, nnx.BatchNorm) or unit.native.mean is None:
            raise ValueError(
                f"recalibrate_bn: {unit.path} is a {type(unit.native).__name__}, which keeps no "
                "moving statistics to re-estimate (expected an nnx.BatchNorm). Leave it out "
                "of `where`."
            )
    selected = {id(unit.native): unit for unit in units}
    modules = [module for _, module in nnx.iter_modules(model)]
    with contextlib.ExitStack() as undo:
        for module in modules:
            undo.callback(_restore, module, type(module), _mode_attributes(module))
            if isinstance(module, nnx.BatchNorm):
                momentum = module.momentum
                undo.callback(setattr, module, "momentum", momentum)
                module.momentum = 0.0 if id(module) in selected else 1.0
        for unit in units:
            set_mode(unit, "train")
        model.eval()
        _forward(model, jnp.asarray(x))
        return {
            unit.path: (np.array(unit.native.mean[...]), np.array(unit.native.var[...]))
            for unit in units
        }


def assign_statistics(
    model: nnx.Module, units: list[Unit], values: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    for unit in units:
        mean, var = values[unit.path]
        for variable, value in ((unit.native.mean, mean), (unit.native.var, var)):
            variable[...] = jnp.asarray(np.asarray(value), dtype=variable[...].dtype)


def _mode_attributes(module: nnx.Module) -> dict:
    return {name: vars(module)[name] for name in MODE_ATTRIBUTES if name in vars(module)}


def _restore(module: nnx.Module, cls: type, attributes: dict) -> None:
    # object.__setattr__: NNX's own __setattr__ would record __class__ as an attribute.
    object.__setattr__(module, "__class__", cls)
    for name, value in attributes.items():
        setattr(module, name, value)
