"""BatchNorm folding (``xfer.fold_bn``) on Flax NNX: the backend part of ``xfer._adapter.Folding``.

An NNX module has no graph: which layer feeds a BatchNorm is decided by its ``__call__``,
Python code. So the pairs come from one trace of the model in ``eval()``
(``jax.make_jaxpr`` of a split/merged copy, as ``models._output_width`` does, so the model
is never called or changed), with each ``nnx.Conv``/``nnx.Linear`` output and each
selected ``nnx.BatchNorm`` input tagged by ``jax.ad_checkpoint.checkpoint_name`` (an
identity that stays in the jaxpr as a ``name`` equation): the tagging is a class swap on
the merged copy's modules only, so no class is patched and nothing needs putting back, and
a pinned module (xfer's subclass) is tagged like any other. The jaxpr then shows what
torch.fx's graph shows: a BN folds into a layer when its input *is* the layer's tagged
output and nothing else reads that value, each is called once, the BN uses its moving
statistics there (``use_running_average``, the last axis its feature axis), and the layer
is a plain Conv or Linear (a subclass that overrides ``__call__``, e.g. a
weight-standardised conv, is left alone) whose kernel and bias no other module shares.
(An eager probe matching array objects would show that a BN's input is a layer's output,
not that nothing else reads it: the jaxpr counts the readers.)

The copy is ``nnx.clone(model)`` (pins, ``Frozen`` variables, sharing and the recorded
definition order come along; the record of the xfer architecture does not, as the folded
copy is no longer it) in ``eval()``. Each folded layer gets the kernel and bias of
:func:`xfer.folding.folded_kernel_and_bias` (a bias variable, of the kernel's trainability,
and ``use_bias=True`` where it had none: ``nnx.Conv`` reads ``use_bias``, ``nnx.Linear``
asserts it matches ``bias``), and every reference to the BN becomes a
:class:`FoldedBatchNorm`, an identity. Last, the copy and the model (a merged copy, in
``eval()``, under ``jax.jit``) run on the probe batch, and a difference beyond float32
rounding is a ``ValueError``.

The trace needs an input shape, which an ``nnx.Module`` does not record: it is the one
xfer recorded when it built the model (``xfer.models``), else that of the model's first
conv or dense layer in definition order (32 per spatial axis for a conv). The model is
called with that batch alone; one that fails on it (or needs more arguments) is a
``ValueError`` that says so.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from xfer._adapter import Unit
from xfer.backends.flax.units import Frozen, own_variables, walk
from xfer.folding import folded_kernel_and_bias
from xfer.models import ARCHITECTURE

_TAG = "xfer_fold"  # the prefix of the checkpoint names in the trace
_SPATIAL = 32  # the probe's height/width where the model does not fix it
_PROBE_BATCH = 4
# The check: a folded copy computes the same function up to float32 rounding, relative
# to the size of the outputs; a wrong fold is off by the BN's whole transform.
_TOLERANCE = 1e-4


class FoldedBatchNorm(nnx.Module):
    """Where a folded ``nnx.BatchNorm`` was: its input, unchanged (the BN's transform is
    now in the kernel and bias of ``folded_into``, the path of the layer before it).

    Example:
        >>> import jax.numpy as jnp
        >>> FoldedBatchNorm("conv")(jnp.ones(2), use_running_average=True).tolist()
        [1.0, 1.0]
    """

    def __init__(self, folded_into: str):
        self.folded_into = folded_into

    def __call__(self, x, *args, **kwargs):  # the BN's own arguments are accepted and unused
        return x


def fold_bn(model: nnx.Module, units: list[Unit]) -> tuple[nnx.Module, list[tuple[str, str]]]:
    x, origin = _probe_batch(model)
    try:
        pairs = _pairs(model, {unit.path for unit in units}, x)
    except Exception as error:  # whatever the model's own code raises on the probe
        raise ValueError(
            f"fold_bn: xfer traces this {type(model).__name__} once in eval(), called with a "
            f"probe batch of shape {x.shape} alone ({origin}), to find the layer that feeds each BatchNorm (an NNX "
            f"module has no graph), and it failed: {type(error).__name__}: {error}. Fold a "
            "module whose first conv or dense layer (in definition order) takes its input, "
            "e.g. xfer.fold_bn(model.base)."
        ) from error
    folded = nnx.clone(model)
    modules = {path: module for path, module, _ in walk(folded)}
    shared = _shared_variables(modules.values())
    pairs = [(layer, bn) for layer, bn in pairs if _foldable(modules[layer], modules[bn], shared)]
    for layer, bn in pairs:
        _fold(modules[layer], modules[bn])
    _replace(folded, {id(modules[bn]): FoldedBatchNorm(layer) for layer, bn in pairs})
    if ARCHITECTURE in vars(folded):
        delattr(folded, ARCHITECTURE)
    folded.eval()
    _check(model, folded, x)
    return folded, pairs


# --- the probe: an input, a trace, the pairs ---------------------------------------------


def _probe_batch(model: nnx.Module) -> tuple[np.ndarray, str]:
    shape, origin = _recorded_shape(model)
    if shape is None:
        shape, origin = _first_layer_shape(model)
    if shape is None:
        raise ValueError(
            f"fold_bn: xfer traces the model once to find the layer that feeds each "
            f"BatchNorm, and needs its input shape: this {type(model).__name__} was not "
            "built by xfer.models and has no nnx.Conv or nnx.Linear to take it from. Fold "
            "a module whose first layer is a conv or dense layer on its input."
        )
    rng = np.random.default_rng(0)
    return rng.normal(size=(_PROBE_BATCH, *shape)).astype(np.float32), origin


def _recorded_shape(model: nnx.Module) -> tuple[tuple | None, str]:
    recorded = vars(model).get(ARCHITECTURE)
    if not isinstance(recorded, str):
        return None, ""
    arguments = json.loads(recorded)
    if "input_shape" in arguments:
        *spatial, channels = arguments["input_shape"]
        shape = (*(d or _SPATIAL for d in spatial), channels)
    elif "in_channels" in arguments:
        shape = (_SPATIAL, _SPATIAL, arguments["in_channels"])
    else:
        return None, ""
    return shape, f"the input of xfer.models.{arguments['builder']}"


def _first_layer_shape(model: nnx.Module) -> tuple[tuple | None, str]:
    for path, module, _ in walk(model):
        if isinstance(module, nnx.Conv):
            shape = (_SPATIAL,) * len(module.kernel_size) + (module.in_features,)
        elif isinstance(module, nnx.Linear):
            shape = (module.in_features,)
        else:
            continue
        return shape, f"the input of its first layer, {path or 'the model'}"
    return None, ""


def _pairs(model: nnx.Module, selected: set[str], x: np.ndarray) -> list[tuple[str, str]]:
    graphdef, state = nnx.split(model)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        for path, submodule, _ in walk(module):
            role = _role(submodule, path in selected)
            if role is not None:
                object.__setattr__(submodule, "__class__", _tagging_class(type(submodule), role))
                object.__setattr__(submodule, "_xfer_fold_path", path)
        return module(x)

    tags: dict[str, list] = collections.defaultdict(list)
    uses: dict[int, collections.Counter] = {}
    closed = jax.make_jaxpr(forward)(state, x)  # held: ``uses`` is keyed by its jaxprs' ids
    _scan(closed.jaxpr, tags, uses)
    pairs = []
    for name, found in tags.items():
        if not name.startswith(f"{_TAG}:bn:") or len(found) != 1:
            continue
        jaxpr, eqn = found[0]
        source = eqn.invars[0]
        for layer_name, (layer_jaxpr, layer_eqn) in _layer_tags(tags):
            if layer_jaxpr is jaxpr and layer_eqn.outvars[0] is source:
                if uses[id(jaxpr)][source] == 1:  # the BN is its only reader
                    pairs.append((layer_name, name.removeprefix(f"{_TAG}:bn:")))
    return pairs


def _layer_tags(tags: dict[str, list]):
    prefix = f"{_TAG}:layer:"
    for name, found in tags.items():
        if name.startswith(prefix) and len(found) == 1:  # a layer called twice stays
            yield name.removeprefix(prefix), found[0]


def _scan(jaxpr, tags: dict[str, list], uses: dict[int, collections.Counter]) -> None:
    """The tag equations of ``jaxpr`` and the jaxprs inside it, and how often each value
    is read in its own jaxpr (a value passed into an inner jaxpr is read by that call)."""
    counts = collections.Counter()
    for eqn in jaxpr.eqns:
        counts.update(v for v in eqn.invars if isinstance(v, jex.Var))
        name = eqn.params.get("name") if eqn.primitive.name == "name" else None
        if isinstance(name, str) and name.startswith(f"{_TAG}:"):
            tags[name].append((jaxpr, eqn))
        for inner in _inner_jaxprs(eqn.params.values()):
            _scan(inner, tags, uses)
    counts.update(v for v in jaxpr.outvars if isinstance(v, jex.Var))
    uses[id(jaxpr)] = counts


def _inner_jaxprs(values):
    for value in values:
        if isinstance(value, jex.Jaxpr):
            yield value
        elif isinstance(value, jex.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):  # cond's branches
            yield from _inner_jaxprs(value)


def _own_call(cls: type):
    # From the class's own MRO: on a class, getattr could find the metaclass's __call__.
    return next((c.__dict__["__call__"] for c in cls.__mro__ if "__call__" in c.__dict__), None)


def _role(module: nnx.Module, selected: bool) -> str | None:
    call = _own_call(getattr(type(module), "_xfer_base", type(module)))
    if call is nnx.Conv.__call__ or call is nnx.Linear.__call__:
        return "layer"
    if selected and call is nnx.BatchNorm.__call__ and module.mean is not None:
        return "bn"
    return None


_TAGGING: dict[tuple[type, str], type] = {}


def _tagging_class(cls: type, role: str) -> type:
    """A subclass of ``cls`` (perhaps xfer's pinned one) whose calls tag the layer's output
    or the BN's input, where the BN would fold."""
    if (cls, role) in _TAGGING:
        return _TAGGING[(cls, role)]
    call = _own_call(cls)

    def __call__(self, *args, **kwargs):
        path = vars(self)["_xfer_fold_path"]
        if role == "layer":
            out = call(self, *args, **kwargs)
            return checkpoint_name(out, f"{_TAG}:layer:{path}") if _is_array(out) else out
        if not args:  # x by keyword: left as it is
            return call(self, *args, **kwargs)
        x, *rest = args
        if _is_array(x) and _normalises_last_axis_with_moving_statistics(self, x, rest, kwargs):
            x = checkpoint_name(x, f"{_TAG}:bn:{path}")
        return call(self, x, *rest, **kwargs)

    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    namespace["__call__"] = __call__
    _TAGGING[(cls, role)] = type(cls)(cls.__name__, (cls,), namespace)
    return _TAGGING[(cls, role)]


def _is_array(value) -> bool:
    return isinstance(value, jax.Array)


def _normalises_last_axis_with_moving_statistics(bn: nnx.BatchNorm, x, rest, kwargs) -> bool:
    pinned = getattr(type(bn), "_xfer_pinned_mode", None)
    if pinned is not None:
        inference = pinned == "inference"
    else:
        passed = kwargs.get("use_running_average", rest[0] if rest else None)
        inference = bn.use_running_average if passed is None else passed
    axes = bn.axis if isinstance(bn.axis, (tuple, list)) else (bn.axis,)
    last = [a % x.ndim for a in axes] == [x.ndim - 1]
    return bool(inference) and last and tuple(bn.mean.shape) == (x.shape[-1],)


# --- the fold, on the copy ---------------------------------------------------------------


def _shared_variables(modules) -> set[int]:
    counts = collections.Counter(id(v) for m in modules for _, v in own_variables(m))
    return {key for key, n in counts.items() if n > 1}


def _foldable(layer: nnx.Module, bn: nnx.BatchNorm, shared: set[int]) -> bool:
    # A kernel or bias another module holds too (tied weights) would change there as well.
    tied = any(v is not None and id(v) in shared for v in (layer.kernel, layer.bias))
    return not tied and layer.kernel.shape[-1] == bn.mean.shape[0]


def _fold(layer: nnx.Module, bn: nnx.BatchNorm) -> None:
    def array(variable):
        return None if variable is None else np.asarray(variable[...])

    kernel, bias = folded_kernel_and_bias(
        array(layer.kernel),
        array(layer.bias),
        gamma=array(bn.scale),
        beta=array(bn.bias),
        mean=array(bn.mean),
        var=array(bn.var),
        eps=bn.epsilon,
        out_axis=-1,
    )
    layer.kernel[...] = _placed(kernel, layer.kernel[...])
    if layer.bias is None:
        kind = Frozen if isinstance(layer.kernel, Frozen) else nnx.Param
        layer.bias = kind(_placed(bias, layer.kernel[...]))
        layer.use_bias = True
    else:
        old = layer.bias[...]
        layer.bias[...] = _placed(bias.astype(old.dtype), old)


def _placed(value: np.ndarray, like: jax.Array) -> jax.Array:
    # On the device (and sharding) of the value it replaces.
    return jax.device_put(jnp.asarray(value), getattr(like, "sharding", None))


def _replace(model: nnx.Module, replacements: dict[int, nnx.Module]) -> None:
    """Every reference to a replaced module, in any module of ``model``, to its replacement."""
    for _, module, _ in walk(model):
        for name, value in list(vars(module).items()):
            if name.startswith("_pytree__"):
                continue
            new = _substituted(value, replacements)
            if new is not value:
                setattr(module, name, new)


def _substituted(value: Any, replacements: dict[int, nnx.Module]) -> Any:
    if isinstance(value, nnx.Module):
        return replacements.get(id(value), value)
    if isinstance(value, (list, tuple)):
        items = [_substituted(item, replacements) for item in value]
        changed = any(a is not b for a, b in zip(items, value, strict=True))
        return type(value)(items) if changed else value
    if isinstance(value, dict):
        items = {k: _substituted(item, replacements) for k, item in value.items()}
        return items if any(items[k] is not value[k] for k in value) else value
    return value


def _check(model: nnx.Module, folded: nnx.Module, x: np.ndarray) -> None:
    expected, got = jax.tree.leaves(_outputs(model, x)), jax.tree.leaves(_outputs(folded, x))
    for want, have in zip(expected, got, strict=True):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        difference = float(np.max(np.abs(want - have), initial=0.0))
        if not difference <= _TOLERANCE * scale:
            raise ValueError(
                f"fold_bn: the folded copy of this {type(model).__name__} differs from it in "
                f"eval() by {difference:.3g} on a probe batch (outputs up to {scale:.3g}), "
                "beyond float32 rounding: something reads a folded layer's output besides "
                "its BatchNorm in a way the trace did not show. Nothing was folded; fold "
                "fewer BatchNorms with where=, and please report the model."
            )


def _outputs(model: nnx.Module, x: np.ndarray) -> Any:
    """``model``'s outputs in eval() on ``x``, from a merged copy under ``jax.jit`` (one
    compilation, not one per operation): the model's modes, statistics and RNG streams
    stay as they are."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(x)

    return jax.jit(forward)(state, x)
