"""Units of a Flax NNX model: the module tree, unit kinds, frozen variables and mode pins.

Freezing retypes a parameter to :class:`Frozen` in place; a mode pin swaps the module's
class for a cached subclass that keeps its mode attributes (see the package docstring).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax import nnx

from xfer._adapter import Mode, Unit
from xfer.backends._common import root_index, unit_kind


class Frozen(nnx.Variable):
    """A parameter frozen by xfer: not an ``nnx.Param``, so ``wrt=nnx.Param`` leaves it out.

    Example:
        >>> from xfer.backends.flax import Frozen
        >>> frozen_weights = nnx.state(model, Frozen)        # doctest: +SKIP
    """

    # Its public home: pickles name it there, as they did before the package had modules.
    __module__ = "xfer.backends.flax"


# The attributes NNX's train()/eval() set wherever a module has them.
MODE_ATTRIBUTES = ("use_running_average", "deterministic")
# Metadata naming the original type of a frozen Param subclass (plain nnx.Param is the
# default), kept on the variable so that nnx.split/merge carries it.
_ORIGINAL_TYPE = "xfer_param_type"
_COLLECTIONS = (nnx.List, nnx.Dict)
_KINDS = (
    (nnx.BatchNorm, "batchnorm"),
    (nnx.Dropout, "dropout"),
    ((nnx.Conv, nnx.ConvTranspose), "conv"),
    ((nnx.Linear, nnx.LinearGeneral, nnx.Einsum), "dense"),
    ((nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm, nnx.InstanceNorm), "norm"),
)
# NNX re-sorts a module's attributes by name when a jitted step writes the model back, so
# definition order (which S.top/S.from_index and the summary follow) is recorded on each
# module the first time xfer walks it, as a static attribute that split/merge keep.
_ORDER = "_xfer_order"


# --- the module tree ---------------------------------------------------------------------


def _flatten(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (nnx.Module, nnx.Variable)):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _flatten(f"{key}.{i}", item)
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _flatten(f"{key}.{k}", item)


def _attribute_names(module: nnx.Module) -> list[str]:
    names = [n for n in vars(module) if not n.startswith("_pytree__") and n != _ORDER]
    recorded = vars(module).get(_ORDER)
    if recorded is None:
        if not isinstance(module, _COLLECTIONS):
            setattr(module, _ORDER, tuple(names))
        return names
    position = {name: i for i, name in enumerate(recorded)}
    return sorted(names, key=lambda n: position.get(n, len(position)))


def _members(module: nnx.Module) -> Iterator[tuple[str, Any]]:
    """The modules and variables a module holds itself, in definition order."""
    for name in _attribute_names(module):
        yield from _flatten(name, getattr(module, name))


def own_variables(module: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    """``(attribute key, variable)`` of the variables a module holds itself, not its children's."""
    return [(k, v) for k, v in _members(module) if isinstance(v, nnx.Variable)]


def is_param(variable: nnx.Variable) -> bool:
    """Whether a variable is a parameter, trainable (``nnx.Param``) or frozen by xfer."""
    return isinstance(variable, (nnx.Param, Frozen))


def own_params(module: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    """The module's own parameters, trainable or frozen."""
    return [(k, v) for k, v in own_variables(module) if is_param(v)]


def _size(variable: nnx.Variable) -> int:
    # By shape, so that abstract models (nnx.eval_shape) count too.
    shape = getattr(variable.get_value(), "shape", None)
    return int(np.prod(shape)) if shape is not None else int(np.size(variable.get_value()))


def walk(model: nnx.Module) -> list[tuple[str, nnx.Module, int]]:
    """(path, module, top-level index) of every module, parents first, in definition order.

    The first walk of a module records its definition order (see ``_ORDER``): call it on a
    model xfer builds before any jit sees it.
    """
    found: list[tuple[str, nnx.Module, int]] = []
    seen: set[int] = set()
    positions = itertools.count()

    def visit(module: nnx.Module, path: str, index: int, at_top: bool) -> None:
        if id(module) in seen:  # a shared module is a unit once, at its first path
            return
        seen.add(id(module))
        found.append((path, module, index))
        for key, child in _members(module):
            if not isinstance(child, nnx.Module):
                continue
            child_path = f"{path}.{key}" if path else key
            if not at_top:
                visit(child, child_path, index, False)
            elif isinstance(child, _COLLECTIONS):
                visit(child, child_path, -1, True)
            else:
                visit(child, child_path, next(positions), False)

    visit(model, "", -1, True)
    return found


def kind(module: nnx.Module) -> str:
    """The unit kind of a module (``xfer._adapter.KINDS``)."""
    has_children = any(isinstance(v, nnx.Module) for _, v in _members(module))
    return unit_kind(module, _KINDS, container=has_children and not own_params(module))


# --- the Units contract ------------------------------------------------------------------


def units(model: nnx.Module) -> list[Unit]:
    found = walk(model)
    has_children = len(found) > 1
    result = []
    for path, module, index in found:
        params = own_params(module)
        n_params = sum(_size(v) for _, v in params)
        if path == "":
            index = root_index(n_params, has_children)
            if index is None:
                continue
        unit_kind = kind(module)
        stats = ()
        if unit_kind == "batchnorm":
            stats = tuple(k for k, v in own_variables(module) if isinstance(v, nnx.BatchStat))
        names = tuple(k for k, _ in params)
        result.append(Unit(path, unit_kind, index, n_params, module, model, names, stats))
    return result


def chain(model: nnx.Module) -> list[nnx.Module] | None:
    if type(model) is nnx.Sequential:
        return list(model.layers)
    names = getattr(type(model), "xfer_chain", None)
    return None if names is None else [getattr(model, name) for name in names]


def mode_free(unit: Unit) -> bool:
    return not any(hasattr(unit.native, a) for a in MODE_ATTRIBUTES)


def param_counts(unit: Unit) -> tuple[int, int]:
    variables = [v for _, v in own_params(unit.native)]
    trainable = sum(_size(v) for v in variables if isinstance(v, nnx.Param))
    return trainable, sum(_size(v) for v in variables if isinstance(v, Frozen))


def set_trainable(unit: Unit, trainable: bool) -> None:
    for _, variable in own_params(unit.native):
        if trainable and isinstance(variable, Frozen):
            original = variable.get_metadata(_ORIGINAL_TYPE, nnx.Param)
            if variable.has_metadata(_ORIGINAL_TYPE):
                variable.del_metadata(_ORIGINAL_TYPE)
            _retype(variable, original)
        elif not trainable and isinstance(variable, nnx.Param):
            original = type(variable)
            _retype(variable, Frozen)
            if original is not nnx.Param:
                variable.set_metadata(_ORIGINAL_TYPE, original)


def get_mode(unit: Unit) -> Mode:
    return getattr(type(unit.native), "_xfer_pinned_mode", "inherit")


def set_mode(unit: Unit, mode: Mode) -> None:
    module = unit.native
    base = getattr(type(module), "_xfer_base", type(module))
    # object.__setattr__: NNX's own __setattr__ would record __class__ as an attribute.
    if mode == "inherit":
        object.__setattr__(module, "__class__", base)
        return
    object.__setattr__(module, "__class__", _pinned_class(base, mode))
    for name in MODE_ATTRIBUTES:
        if name in vars(module):
            setattr(module, name, mode == "inference")


# --- the mechanisms: a variable's type, a module's class ---------------------------------


def _retype(variable: nnx.Variable, new_type: type) -> None:
    # In place: the same object, so tied weights and handles the user kept stay the same.
    if not isinstance(type(variable), type(nnx.Variable)):
        raise TypeError(
            f"xfer cannot freeze a {type(variable).__name__} (a hijax variable); create the "
            "model with nnx.var_defaults(hijax=False) or leave this parameter trainable."
        )
    variable.__class__ = new_type


_PINNED: dict[tuple[type, str], type] = {}


def _restore_pinned(base: type, mode: str, state: dict) -> nnx.Module:
    """Unpickle a pinned module (pickle finds classes by name; a pinned class has its base's)."""
    module = object.__new__(_pinned_class(base, mode))
    vars(module).update(state)
    return module


def _pinned_class(base: type, mode: str) -> type:
    """The subclass of ``base`` that keeps its mode attributes at the pinned value."""
    key = (base, mode)
    if key in _PINNED:
        return _PINNED[key]
    pinned_value = mode == "inference"

    def __setattr__(self, name, value):
        if name in MODE_ATTRIBUTES:
            value = pinned_value
        base.__setattr__(self, name, value)

    def __reduce_ex__(self, protocol):
        return _restore_pinned, (base, mode, self.__getstate__())

    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__setattr__": __setattr__,
        "__reduce_ex__": __reduce_ex__,
        "_xfer_pinned_mode": mode,
        "_xfer_base": base,
    }
    # From the class's own MRO: on a class, getattr would find the metaclass's __call__.
    call = next((c.__dict__["__call__"] for c in base.__mro__ if "__call__" in c.__dict__), None)
    if call is not None:
        # A parent passing the mode explicitly is NNX's "outer training=True": the pin wins.
        @functools.wraps(call)
        def __call__(self, *args, **kwargs):
            for name in MODE_ATTRIBUTES:
                if name in kwargs:
                    kwargs[name] = pinned_value
            return call(self, *args, **kwargs)

        namespace["__call__"] = __call__
    # The class's own metaclass registers the subclass as an NNX graph node and JAX pytree.
    _PINNED[key] = type(base)(base.__name__, (base,), namespace)
    return _PINNED[key]


def current_mode(unit: Unit) -> str:
    # An unpinned module's flag may be stale (left by an earlier pin, or flipped by the
    # next model.train()), so only a pin counts as inference.
    return "inference" if get_mode(unit) == "inference" else "train"


def bn_momentum(unit: Unit) -> float | None:
    return float(unit.native.momentum) if unit.is_bn else None
