"""The Keras 3 backend, on its jax and torch engines (``KERAS_BACKEND``, read once per
process): variable ``trainable`` flags for freezing, BN's own ``trainable`` for frozen
statistics, an instance-level ``call`` pin for the other modes.

Why these mechanisms (checked against keras/src/layers/layer.py, 3.15.1):

- Freezing sets ``v.trainable`` on a layer's *own* variables only. A model's optimizer
  trains exactly ``model.trainable_variables`` = the variables with ``v.trainable`` (the
  root's ``trainable`` aside), so per-layer freezing needs no recursion; Keras's own
  ``layer.trainable = ...`` setter recurses into every sublayer, which is what xfer avoids.
  On the torch engine the flag is also the tensor's ``requires_grad``.
- BatchNormalization computes ``if training and self.trainable``: ``bn.trainable = False``
  is Keras's native "inference mode" for BN, whatever ``fit()`` or an outer
  ``training=True`` says. So a BN policy is two flags: ``stats="frozen"`` is the BN's own
  ``trainable`` False, set without the setter's recursion (``units.set_own_trainable``),
  and ``affine`` is the gamma/beta variables' flags (BN "affine": the BN's own flag False,
  gamma/beta trainable). The BN's own flag is in the layer config, so it survives ``.keras``.
- Every other pin rewrites ``training`` in the layer's own ``call``. In a functional model
  the outer ``training`` overwrites a stored ``base(x, training=False)``, and ``fit()``
  always passes ``training=True``; the one place that sees the final value is the call
  itself. Keras's ``Operation.__call__`` looks ``self.call`` up on the instance, so the pin
  is an instance attribute ``call`` wrapping the class's method. On the jax engine Keras
  traces the step and the pin is a Python constant of the trace, so it holds inside
  ``fit()``: compile after pinning, as Keras requires after any change of state. xfer's own
  inference compiles ``model(x, training=False)`` once per pin state (``engine.predict``);
  on the torch engine everything runs eagerly.
- Per-group learning rates split the optimizer's update step (``engine.scale_learning_rates``):
  Keras 3 optimizers have no parameter groups.

The few private Keras internals this needs are each one small function (``units.py``'s
"Keras private API" section, ``engine.scale_learning_rates``), written for the Keras
versions of :data:`KERAS_TESTED`; importing the backend under another Keras warns.
With ``KERAS_BACKEND=torch`` every Keras layer is also a ``torch.nn.Module``: xfer finds
this adapter for it before the torch one.
"""

from __future__ import annotations

import re
import warnings

import keras

from xfer.backends._common import assemble, use_jax_compile_cache

KERAS_TESTED = ("3.8", "3.16")  # from 3.8 (pyproject's floor) up to, not including, 3.16


def untested_keras(version: str) -> str | None:
    """A warning for a Keras ``version`` outside :data:`KERAS_TESTED`, else ``None``.

    Example:
        >>> untested_keras("3.15.1") is None, untested_keras("3.16.0") is None
        (True, False)
    """
    low, high = (tuple(map(int, v.split("."))) for v in KERAS_TESTED)
    if low <= tuple(map(int, re.findall(r"\d+", version)[:2])) < high:
        return None
    return (
        f"xfer's Keras backend was written for Keras >= {KERAS_TESTED[0]}, < "
        f"{KERAS_TESTED[1]} and relies on a few private Keras internals (a layer's own "
        "variable lists and trainable flag, the functional graph, the optimizer's update "
        f"step); Keras {version} is outside that range. If freezing, mode pins or "
        "per-group learning rates misbehave, install a Keras in the range."
    )


if (_untested := untested_keras(keras.__version__)) is not None:
    warnings.warn(_untested, stacklevel=2)

# Warn first: a new Keras may break an import below.
from xfer.backends.keras import (  # noqa: E402
    distributed,
    engine,
    export,
    folding,
    models,
    recalibration,
    units,
    weights,
)

if keras.backend.backend() == "jax":
    use_jax_compile_cache()  # xfer.compile_cache: compiled steps kept between runs

ADAPTER = assemble(
    "keras",
    units=units,
    weights=weights,
    engine=engine,
    models=models,
    recalibration=recalibration,
    folding=folding,
    export=export,
    distributed=distributed,
)

__all__ = ["ADAPTER", "KERAS_TESTED", "untested_keras"]
