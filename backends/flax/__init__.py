"""Flax NNX backend: a ``Frozen`` variable type for freezing, a pinned subclass for modes.

Freezing is a variable type. NNX decides what the optimizer and the gradient see by the
type of each ``Variable``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.grad`` /
``nnx.value_and_grad`` (default ``nnx.Param``). A frozen parameter is retyped to
:class:`Frozen`, which is not a ``Param`` subclass, so it forms its own partition that the
standard filter leaves out, and the user's own loop needs no xfer code. The variable is
retyped *in place* (same object, same value), so a reference to it elsewhere (tied
weights, a handle the user kept, a list or dict holding it) stays the same variable;
unfreezing gives it back its original type, ``nnx.Param`` or a subclass such as
``nnx.LoRAParam``. Select the frozen partition yourself with ``nnx.state(model, Frozen)``.
Note that ``nnx.state(model, nnx.Param)`` leaves frozen parameters out: checkpoint the
whole ``nnx.state(model)``.

A mode pin is a class swap. NNX modes are plain attributes (``use_running_average`` of
BatchNorm, ``deterministic`` of Dropout) that ``model.train()``, ``model.eval()``,
``nnx.view`` and ``nnx.with_attributes`` overwrite on every submodule. A pinned module's
class becomes a cached subclass of its class (same name, one per class and mode) whose
``__setattr__`` keeps the pinned value whatever sets it, and whose ``__call__`` also
overrides those arguments when a parent passes them explicitly
(``self.bn(x, use_running_average=not train)``). The class is part of NNX's graphdef, so
``nnx.split``/``nnx.merge``, ``copy.deepcopy`` and pickle keep the pin, and ``nnx.jit``
traces again when a pin changes instead of reusing a stale trace.

A BN policy is the two together on an ``nnx.BatchNorm``: ``affine`` freezes or unfreezes
its ``scale``/``bias`` (the ``Frozen`` type); ``stats="frozen"`` pins it to inference
(``use_running_average=True``: moving statistics used, never updated, its ``BatchStat``
variables untouched), ``stats="update"`` leaves it unpinned, following ``model.train()``.

Paths are NNX's own attribute keys joined by ".": ``nnx.Sequential(a, b)`` has the units
``layers`` (its ``nnx.List``) and ``layers.0``, ``layers.1``. For ``S.top``/``S.from_index``
the root's ``nnx.List``/``nnx.Dict`` children are looked through, as Keras's ``model.layers``
lists the layers held in a list: the list entries are the top-level units (the collection
itself has index -1, like the root).

Modules: ``units`` (the module tree, kinds, freezing, pins), ``weights`` (native and neutral
layouts), ``engine`` (optimizers, training and inference steps, devices), ``models`` (the
reference models and heads), ``semantics`` (the ``xfer semantics`` probes).

Example:
    >>> from xfer.backends.flax import ADAPTER
    >>> ADAPTER.name
    'flax'
"""

from __future__ import annotations

from xfer.backends._common import assemble, use_jax_compile_cache
from xfer.backends.flax import (
    distributed,
    engine,
    export,
    folding,
    models,
    recalibration,
    units,
    weights,
)
from xfer.backends.flax.models import (
    GlobalAvgPool,
    ResNet,
    SmallCNN,
    TransferHead,
    TransferModel,
)
from xfer.backends.flax.units import Frozen

__all__ = [
    "ADAPTER",
    "Frozen",
    "GlobalAvgPool",
    "ResNet",
    "SmallCNN",
    "TransferHead",
    "TransferModel",
]

use_jax_compile_cache()  # xfer.compile_cache: compiled steps kept between runs

ADAPTER = assemble(
    "flax",
    units=units,
    weights=weights,
    engine=engine,
    models=models,
    recalibration=recalibration,
    folding=folding,
    export=export,
    distributed=distributed,
)
