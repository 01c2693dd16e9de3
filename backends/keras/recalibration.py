"""BatchNorm recalibration (``xfer.recalibrate_bn``) on Keras: the backend part of
``xfer._adapter.Recalibration``.

For one eager ``model(x, training=False)``, a selected ``BatchNormalization`` is pinned to
train mode with its own ``trainable`` flag on (Keras's BN updates its statistics only when
both hold) and ``momentum=0``, so its moving statistics become the batch's (Keras's moving
update is ``moving * momentum + batch * (1 - momentum)``); any other BN that trains in that
forward (one pinned to "train") gets ``momentum=1``, which keeps its statistics exactly. The
pins, the flags and the momenta are put back afterwards; no variable's ``trainable`` changes.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from xfer._adapter import Unit
from xfer.backends.keras.engine import _eager_inference
from xfer.backends.keras.units import _PIN, _install_pin, set_own_trainable, walk

L = keras.layers


def batch_statistics(
    model, units: list[Unit], x: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    for unit in units:
        if not isinstance(unit.native, L.BatchNormalization):
            raise ValueError(
                f"recalibrate_bn: {unit.path} is a {type(unit.native).__name__}, which keeps no "
                "moving statistics to re-estimate (expected a keras.layers.BatchNormalization). "
                "Leave it out of `where`."
            )
    selected = [unit.native for unit in units]
    bns = [layer for layer in walk(model) if isinstance(layer, L.BatchNormalization)]
    with contextlib.ExitStack() as undo:
        for layer in bns:
            undo.callback(
                _restore, layer, layer.momentum, layer.__dict__.get(_PIN), layer._trainable
            )
            if any(layer is s for s in selected):
                layer.momentum = 0.0
                set_own_trainable(layer, True)
                _install_pin(layer, "train")
            else:
                layer.momentum = 1.0
        _forward(model, keras.ops.convert_to_tensor(x))
        return {
            unit.path: (
                np.array(keras.ops.convert_to_numpy(unit.native.moving_mean)),
                np.array(keras.ops.convert_to_numpy(unit.native.moving_variance)),
            )
            for unit in units
        }


def assign_statistics(
    model, units: list[Unit], values: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    for unit in units:
        mean, var = values[unit.path]
        for variable, value in (
            (unit.native.moving_mean, mean),
            (unit.native.moving_variance, var),
        ):
            variable.assign(np.asarray(value).astype(variable.dtype))


def _forward(model, x) -> None:
    if keras.backend.backend() == "torch":
        _eager_inference(model)(x)  # no autograd graph, as Keras's own predict_step
    else:
        model(x, training=False)  # eager: the moving statistics are assigned as it runs


def _restore(layer, momentum: float, pin: str | None, trainable: bool) -> None:
    layer.momentum = momentum
    set_own_trainable(layer, trainable)
    _install_pin(layer, pin)
