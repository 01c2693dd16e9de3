"""Flax NNX adapter: a ``Frozen`` variable type for trainable, a pinned subclass for modes.

Why a variable type: NNX decides what the optimizer and the gradient see by the type of
each ``Variable``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.grad`` /
``nnx.value_and_grad`` (default ``nnx.Param``). A frozen parameter is retyped to
:class:`Frozen`, which is not a ``Param`` subclass, so it forms its own partition that the
standard filter leaves out, and the user's own loop needs no xfer code. The variable is
retyped *in place* (same object, same value), so a reference to it elsewhere (tied
weights, a handle the user kept, a list or dict holding it) stays the same variable;
unfreezing gives it back its original type, ``nnx.Param`` or a subclass such as
``nnx.LoRAParam``. Select the frozen partition yourself with ``nnx.state(model, Frozen)``.
Note that ``nnx.state(model, nnx.Param)`` leaves frozen parameters out: checkpoint the
whole ``nnx.state(model)``.

Why a class swap for modes: NNX modes are plain attributes (``use_running_average`` of
BatchNorm, ``deterministic`` of Dropout) that ``model.train()``, ``model.eval()``,
``nnx.view`` and ``nnx.with_attributes`` overwrite on every submodule. A pinned module's
class becomes a cached subclass of its class (same name, one per class and mode) whose
``__setattr__`` keeps the pinned value whatever sets it, and whose ``__call__`` also
overrides those arguments when a parent passes them explicitly
(``self.bn(x, use_running_average=not train)``). The class is part of NNX's graphdef, so
``nnx.split``/``nnx.merge``, ``copy.deepcopy`` and pickle keep the pin, and ``nnx.jit``
traces again when a pin changes instead of reusing a stale trace.

Paths are NNX's own attribute keys joined by ".": ``nnx.Sequential(a, b)`` has the units
``layers`` (its ``nnx.List``) and ``layers.0``, ``layers.1``. For ``S.top``/``S.from_index``
the root's ``nnx.List``/``nnx.Dict`` children are looked through, as Keras's ``model.layers``
lists the layers held in a list: the list entries are the top-level units (the collection
itself has index -1, like the root).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xfer._adapter import Unit
from xfer.data import PREDICT_CHUNK, inference_chunks

__all__ = [
    "ADAPTER",
    "FlaxAdapter",
    "Frozen",
    "GlobalAvgPool",
    "ResNet",
    "SmallCNN",
    "TransferHead",
    "TransferModel",
]


class Frozen(nnx.Variable):
    """A parameter frozen by xfer: not an ``nnx.Param``, so ``wrt=nnx.Param`` leaves it out.

    Example:
        >>> from xfer.backends.flax import Frozen
        >>> frozen_weights = nnx.state(model, Frozen)        # doctest: +SKIP
    """


# Metadata naming the original type of a frozen Param subclass (plain nnx.Param is the
# default), kept on the variable so that nnx.split/merge carries it.
_ORIGINAL_TYPE = "xfer_param_type"
_MODE_ATTRIBUTES = ("use_running_average", "deterministic")
_COLLECTIONS = (nnx.List, nnx.Dict)
_NORMS = (nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm, nnx.InstanceNorm)
# NNX -> neutral (Keras) names per module type. NNX kernels are already channels-last
# (Conv (*k, in/groups, out), Linear (in, out)); RMSNorm's "scale" is Keras's name too.
# ConvTranspose keeps NNX's kernel, (*k, in, out) and unflipped unless transpose_kernel:
# no fixed permutation matches Keras's or PyTorch's transposed convs.
_BN_ROLES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
_ROLES = (
    (nnx.BatchNorm, _BN_ROLES),
    ((nnx.LayerNorm, nnx.GroupNorm, nnx.InstanceNorm), {"scale": "gamma", "bias": "beta"}),
    (nnx.Embed, {"embedding": "embeddings"}),
)
_KINDS = (
    (nnx.BatchNorm, "batchnorm"),
    (nnx.Dropout, "dropout"),
    ((nnx.Conv, nnx.ConvTranspose), "conv"),
    ((nnx.Linear, nnx.LinearGeneral, nnx.Einsum), "dense"),
    (_NORMS, "norm"),
)


def _flatten(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (nnx.Module, nnx.Variable)):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _flatten(f"{key}.{i}", item)
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _flatten(f"{key}.{k}", item)


# NNX re-sorts a module's attributes by name when a jitted step writes the model back, so
# definition order (which S.top/S.from_index and the summary follow) is recorded on each
# module the first time xfer walks it, as a static attribute that split/merge keep.
_ORDER = "_xfer_order"


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


def _own_variables(module: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    return [(k, v) for k, v in _members(module) if isinstance(v, nnx.Variable)]


def _size(variable: nnx.Variable) -> int:
    # By shape, so that abstract models (nnx.eval_shape) count too.
    shape = getattr(variable.get_value(), "shape", None)
    return int(np.prod(shape)) if shape is not None else int(np.size(variable.get_value()))


def _is_param(variable: nnx.Variable) -> bool:
    return isinstance(variable, (nnx.Param, Frozen))


def _walk(model: nnx.Module) -> list[tuple[str, nnx.Module, int]]:
    """(path, module, top-level index) of every module, parents first, in definition order."""
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


def _kind(module: nnx.Module) -> str:
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    has_children = any(isinstance(v, nnx.Module) for _, v in _members(module))
    if has_children and not any(_is_param(v) for _, v in _own_variables(module)):
        return "container"
    return "other"


def _retype(variable: nnx.Variable, new_type: type) -> None:
    if not isinstance(type(variable), type(nnx.Variable)):
        raise TypeError(
            f"xfer cannot freeze a {type(variable).__name__} (a hijax variable); create the "
            "model with nnx.var_defaults(hijax=False) or leave this parameter trainable."
        )
    variable.__class__ = new_type


def _freeze(variable: nnx.Variable) -> None:
    original = type(variable)
    _retype(variable, Frozen)
    if original is not nnx.Param:
        variable.set_metadata(_ORIGINAL_TYPE, original)


def _unfreeze(variable: nnx.Variable) -> None:
    original = variable.get_metadata(_ORIGINAL_TYPE, nnx.Param)
    if variable.has_metadata(_ORIGINAL_TYPE):
        variable.del_metadata(_ORIGINAL_TYPE)
    _retype(variable, original)


_PINNED: dict[tuple[type, str], type] = {}


def _restore_pinned(base: type, mode: str, state: dict) -> nnx.Module:
    # Pickle finds classes by name, and the pinned class has its base's name.
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
        if name in _MODE_ATTRIBUTES:
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
            for name in _MODE_ATTRIBUTES:
                if name in kwargs:
                    kwargs[name] = pinned_value
            return call(self, *args, **kwargs)

        namespace["__call__"] = __call__
    # The class's own metaclass registers the subclass as an NNX graph node and JAX pytree.
    _PINNED[key] = type(base)(base.__name__, (base,), namespace)
    return _PINNED[key]


class FlaxAdapter:
    mixed_precision = (
        "Flax NNX modules choose their computation dtype when built. Build them with "
        "dtype=jnp.bfloat16 (parameters stay float32, param_dtype) and train with xfer's "
        "default precision='float32'."
    )
    name = "flax"

    def units(self, model: nnx.Module) -> list[Unit]:
        found = _walk(model)
        has_children = len(found) > 1
        units = []
        for path, module, index in found:
            own = _own_variables(module)
            params = tuple(k for k, v in own if _is_param(v))
            n_params = sum(_size(v) for _, v in own if _is_param(v))
            if path == "":
                if n_params == 0 and has_children:
                    continue
                index = -1 if has_children else 0
            kind = _kind(module)
            stats = (
                tuple(k for k, v in own if isinstance(v, nnx.BatchStat))
                if kind == "batchnorm"
                else ()
            )
            name = path.rpartition(".")[2]
            depth = path.count(".") + bool(path)
            units.append(
                Unit(path, name, kind, index, depth, n_params, module, model, params, stats)
            )
        return units

    def param_counts(self, unit: Unit) -> tuple[int, int]:
        variables = [v for _, v in _own_variables(unit.native)]
        trainable = sum(_size(v) for v in variables if isinstance(v, nnx.Param))
        return trainable, sum(_size(v) for v in variables if isinstance(v, Frozen))

    def set_trainable(self, unit: Unit, trainable: bool) -> None:
        for _, variable in _own_variables(unit.native):
            if trainable and isinstance(variable, Frozen):
                _unfreeze(variable)
            elif not trainable and isinstance(variable, nnx.Param):
                _freeze(variable)

    def get_mode(self, unit: Unit) -> str:
        return getattr(type(unit.native), "_xfer_pinned_mode", "inherit")

    def set_mode(self, unit: Unit, mode: str) -> None:
        module = unit.native
        base = getattr(type(module), "_xfer_base", type(module))
        # object.__setattr__: NNX's own __setattr__ would record __class__ as an attribute.
        if mode == "inherit":
            object.__setattr__(module, "__class__", base)
            return
        object.__setattr__(module, "__class__", _pinned_class(base, mode))
        for name in _MODE_ATTRIBUTES:
            if name in vars(module):
                setattr(module, name, mode == "inference")

    def tensors(self, model: nnx.Module):
        for path, module, _ in _walk(model):
            for key, variable in _own_variables(module):
                if _is_param(variable) or isinstance(variable, nnx.BatchStat):
                    yield (f"{path}.{key}" if path else key), np.asarray(variable.get_value())

    def _neutral_variables(self, model: nnx.Module):
        seen = set()
        for path, module, _ in _walk(model):
            roles = next((r for types, r in _ROLES if isinstance(module, types)), {})
            for key, variable in _own_variables(module):
                exported = _is_param(variable) or isinstance(variable, nnx.BatchStat)
                if exported and id(variable) not in seen:
                    seen.add(id(variable))
                    role = roles.get(key, key)
                    yield (f"{path}.{role}" if path else role), variable

    def weight_arrays(self, model: nnx.Module):
        for key, variable in self._neutral_variables(model):
            yield key, np.asarray(variable.get_value())

    def assign_weights(self, model: nnx.Module, weights: dict[str, np.ndarray]) -> None:
        planned = []
        for key, variable in self._neutral_variables(model):
            old = variable.get_value()
            placed = old.sharding if isinstance(old, jax.Array) else None
            planned.append((variable, jax.device_put(weights[key], placed)))
        for variable, value in planned:
            # The value only: the Variable object, and so its type (Param, Frozen), stays.
            variable.set_value(value)

    def persistence(self) -> str:
        return (
            "nnx.split/nnx.merge (graphdef + state), copy.deepcopy and pickle keep the frozen "
            "partition and the mode pins; a checkpoint of nnx.state(model) (orbax, "
            "nnx.to_pure_dict) restored into a freshly built model keeps values only: save "
            "xfer.export_state(model) beside it and re-apply it with xfer.import_state."
        )

    def small_cnn(
        self, num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int
    ):
        model = SmallCNN(num_classes, in_channels, width, dropout, rngs=nnx.Rngs(seed))
        self.units(model)  # records the definition order now, before any jit sees the model
        return model

    def resnet(self, depth: int, num_classes: int, in_channels: int, *, width: int, seed: int):
        model = ResNet(depth, num_classes, in_channels, width, rngs=nnx.Rngs(seed))
        self.units(model)  # records the definition order now, before any jit sees the model
        return model

    def attach_head(self, base: nnx.Module, num_classes, *, dropout, input_shape, seed):
        if input_shape is None:
            raise ValueError(
                "attach_head: a Flax base needs input_shape=(height, width, channels): an "
                "nnx.Module does not record its output width, so xfer learns it from an "
                "abstract forward pass. Pass the shape of one channels-last image, e.g. "
                "input_shape=(224, 224, 3)."
            )
        features = _output_width(base, input_shape)
        head = TransferHead(features, num_classes, dropout, rngs=nnx.Rngs(seed))
        model = TransferModel(base, head)
        self.units(model)  # records the definition order now, before any jit sees the model
        return model

    def fit(self, model, x, y, *, epochs, batch_size, lr, weight_decay) -> list[float]:
        # The Flax docs loop, with no xfer code in it: an Optimizer over nnx.Param,
        # nnx.value_and_grad (default nnx.Param) and model.train() every epoch.
        optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)
        xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
        losses = []
        for _ in range(epochs):
            model.train()
            total = 0.0
            for i in range(0, len(xs), batch_size):
                loss = _train_step(model, optimizer, xs[i : i + batch_size], ys[i : i + batch_size])
                total += float(loss) * len(ys[i : i + batch_size])
            losses.append(total / len(ys))
        return losses

    def trainer(
        self,
        model,
        *,
        optimizer,
        lr,
        weight_decay,
        lr_groups,
        precision="float32",
        compile_step=False,
    ):
        # The step is nnx.jit-compiled whatever ``compile_step`` says; ``precision`` is
        # always float32 here (the pipeline refuses others, see ``mixed_precision``).
        tx = _OPTIMIZERS[optimizer](lr, weight_decay)
        if lr_groups:
            # One transformation per learning rate, chosen per parameter by its unit path.
            group_of = {}
            for i, (paths, _) in reversed(list(enumerate(lr_groups))):  # the first group wins
                group_of.update(dict.fromkeys(paths, f"group{i}"))
            transforms = {"default": tx}
            for i, (_, group_lr) in enumerate(lr_groups):
                transforms[f"group{i}"] = _OPTIMIZERS[optimizer](group_lr, weight_decay)
            tx = optax.multi_transform(transforms, functools.partial(_labels, group_of))
        # The Flax docs loop: an Optimizer over nnx.Param (frozen parameters are not
        # Params, so they get no optimizer state), model.train(), a jitted step.
        # Built compiled: eagerly, each zeros_like of the optimizer state compiles on its own.
        opt = nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param))(model)

        def step(x: np.ndarray, y: np.ndarray) -> float:
            model.train()
            if isinstance(x, np.ndarray):
                # Converted on the host: jnp.asarray(labels, int32) compiles a conversion.
                x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
            return float(_train_step(model, opt, x, y))

        return step

    def to_device(self, model, x, y):
        return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

    def predict(self, model, x, *, batch_size=PREDICT_CHUNK) -> np.ndarray:
        model.eval()
        # Compiled, on padded chunks: one compilation per module state instead of one per
        # operation (eager JAX compiles every new primitive shape). The model is split once
        # (Flax's functional API), not by nnx.jit on every chunk: that walk of the module
        # graph cost as much as a ResNet-18's forward on 32 small images.
        graphdef, rngs, rest = nnx.split(model, nnx.RngState, ...)
        out = []
        for c, n in inference_chunks(x, pad=True, size=batch_size):
            logits, rngs = _infer(graphdef, rngs, rest, jnp.asarray(c))
            out.append(np.asarray(logits)[:n])
        nnx.update(model, rngs)  # a Dropout pinned to training draws new masks next time
        return np.concatenate(out)

    def place(self, model: nnx.Module, device: str) -> str:
        # JAX puts arrays on its default device itself.
        actual = "cuda" if jax.default_backend() == "gpu" else "cpu"
        if device not in ("auto", actual):
            raise ValueError(
                f"device={device!r}, but JAX's default device here is {actual}. Use "
                "device='auto', or choose the device before starting Python (JAX_PLATFORMS=cpu "
                "or JAX_PLATFORMS=cuda)."
            )
        return actual

    def output_shape(self, model, x) -> tuple[int, ...]:
        # A probe must not change the model: eval() sets use_running_average/deterministic
        # everywhere, and a fit refused after the probe would leave them set.
        saved = [
            (module, name, getattr(module, name))
            for _, module in nnx.iter_modules(model)
            for name in _MODE_ATTRIBUTES
            if name in vars(module)
        ]
        try:
            model.eval()
            return nnx.eval_shape(lambda m, x: m(x), model, jnp.asarray(x, jnp.float32)).shape
        finally:
            for module, name, value in saved:
                setattr(module, name, value)

    def chain(self, model: nnx.Module) -> list[nnx.Module] | None:
        if type(model) is nnx.Sequential:
            return list(model.layers)
        names = getattr(type(model), "xfer_chain", None)
        return None if names is None else [getattr(model, name) for name in names]

    def mode_free(self, unit: Unit) -> bool:
        # NNX's train()/eval() set exactly these attributes wherever a module has them.
        return not any(hasattr(unit.native, a) for a in ("deterministic", "use_running_average"))


# Matched on every backend: Adam's epsilon is Keras's default, SGD momentum 0.9.
_OPTIMIZERS = {
    "sgd": lambda lr, wd: optax.sgd(lr),
    "momentum": lambda lr, wd: optax.sgd(lr, momentum=0.9),
    "adam": lambda lr, wd: optax.adam(lr, eps=1e-7),
    "adamw": lambda lr, wd: optax.adamw(lr, eps=1e-7, weight_decay=wd),
}


def _labels(group_of: dict[str, str], params):
    """optax.multi_transform labels: each parameter's group, found from its unit path."""

    def label(keypath, _):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
        if keys and keys[-1] == "value":  # the leaf inside a Variable
            keys = keys[:-1]
        return group_of.get(".".join(keys[:-1]), "default")

    return jax.tree_util.tree_map_with_path(label, params)


@functools.partial(jax.jit, static_argnums=0)
def _infer(graphdef, rngs, rest, x):
    # The modes are static graph data (pinned subclasses, use_running_average): a change of
    # state is another graphdef, which retraces. Only the RNG state changes in inference.
    model = nnx.merge(graphdef, rngs, rest)
    return model(x), nnx.state(model, nnx.RngState)


def _cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_cross_entropy)(model, x, y)
    optimizer.update(model, grads)
    return loss


class _Block(nnx.Module):
    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(c_out, epsilon=1e-3, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class _GlobalAvgPool(nnx.Module):
    def __call__(self, x):
        return x.mean(axis=(1, 2))


class _Base(nnx.Module):
    def __init__(self, in_channels: int, width: int, dropout: float, rngs: nnx.Rngs):
        self.block1 = _Block(in_channels, width, rngs)
        self.block2 = _Block(width, width, rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.pool = _GlobalAvgPool()

    def __call__(self, x):
        return self.pool(self.drop(self.block2(self.block1(x))))


class _Head(nnx.Module):
    def __init__(self, width: int, num_classes: int, dropout: float, rngs: nnx.Rngs):
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.drop(x))


class TransferModel(nnx.Module):
    """``xfer.models.attach_head``'s model: any ``base`` then a :class:`TransferHead` (NHWC);
    the reference models are built on it too."""

    def __init__(self, base: nnx.Module, head: nnx.Module):
        self.base = base
        self.head = head

    xfer_chain = ("base", "head")  # __call__ is head(base(x)): feature caching may split it

    def __call__(self, x):
        return self.head(self.base(x))


class SmallCNN(TransferModel):
    """The reference model: base (two conv-BN-ReLU blocks, dropout, pooling) and head."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 8,
        dropout: float = 0.2,
        *,
        rngs: nnx.Rngs,
    ):
        base = _Base(in_channels, width, dropout, rngs)
        super().__init__(base, _Head(width, num_classes, dropout, rngs))


def _output_width(base: nnx.Module, input_shape) -> int:
    """The channels of ``base``'s output, from an abstract forward pass in eval mode.

    The pass runs on a merged copy under ``jax.eval_shape``: no computation, and the base's
    BN statistics, RNG streams and mode attributes stay as they are.
    """
    graphdef, state = nnx.split(base)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(x)

    dummy = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    try:
        out = jax.eval_shape(forward, state, dummy)
    except Exception as error:
        reason = str(error).rstrip(".")
        raise ValueError(
            f"attach_head: the base failed on a batch of shape {dummy.shape} (NHWC, from "
            f"input_shape={input_shape}): {reason}. input_shape must be one channels-last "
            "image the base accepts, (height, width, channels)."
        ) from error
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) < 2:
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ValueError(
            f"attach_head: the base must return one array, (batch, *spatial, channels) or "
            f"(batch, features), got {got}. Wrap the base in a Module that returns the "
            "feature map the head should pool."
        )
    return int(out.shape[-1])


class GlobalAvgPool(nnx.Module):
    """The mean over the spatial axes of an (N, *spatial, C) map; an (N, C) input passes."""

    def __call__(self, x):
        return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


class TransferHead(nnx.Module):
    """The head of ``xfer.models.attach_head``: pool, dropout, dense."""

    def __init__(self, features: int, num_classes: int, dropout: float, *, rngs: nnx.Rngs):
        self.pool = GlobalAvgPool()
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.drop(self.pool(x)))


ADAPTER = FlaxAdapter()


# --- ResNet reference model (xfer.models.resnet) -------------------------------------------


def _conv(c_in: int, c_out: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding: "SAME" with stride 2 pads asymmetrically, unlike PyTorch.
    p = kernel // 2
    return nnx.Conv(
        c_in,
        c_out,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=False,
        rngs=rngs,
    )


def _bn(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, epsilon=1e-3, momentum=0.9, rngs=rngs)


class _Stem(nnx.Module):
    def __init__(self, in_channels: int, width: int, rngs: nnx.Rngs):
        self.conv = _conv(in_channels, width, 7, 2, rngs)
        self.bn = _bn(width, rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class _Downsample(nnx.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
        self.conv = _conv(c_in, c_out, 1, stride, rngs)
        self.bn = _bn(c_out, rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class _BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, rngs: nnx.Rngs):
        self.conv1 = _conv(c_in, planes, 3, stride, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, rngs)
        self.bn2 = _bn(planes, rngs)
        changes = stride != 1 or c_in != planes
        self.downsample = _Downsample(c_in, planes, stride, rngs) if changes else None

    def __call__(self, x):
        out = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + shortcut)


class _Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, rngs: nnx.Rngs):
        c_out = planes * 4
        self.conv1 = _conv(c_in, planes, 1, 1, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, stride, rngs)
        self.bn2 = _bn(planes, rngs)
        self.conv3 = _conv(planes, c_out, 1, 1, rngs)
        self.bn3 = _bn(c_out, rngs)
        changes = stride != 1 or c_in != c_out
        self.downsample = _Downsample(c_in, c_out, stride, rngs) if changes else None

    def __call__(self, x):
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(nnx.relu(self.bn2(self.conv2(out)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + shortcut)


RESNET_STAGES = {18: ((2, 2, 2, 2), _BasicBlock), 50: ((3, 4, 6, 3), _Bottleneck)}


class _ResNetBase(nnx.Module):
    def __init__(self, depth: int, in_channels: int, width: int, rngs: nnx.Rngs):
        counts, block = RESNET_STAGES[depth]
        self.stem = _Stem(in_channels, width, rngs)
        c_in = width
        for i, count in enumerate(counts):
            planes = width * 2**i
            blocks = []
            for j in range(count):
                blocks.append(block(c_in, planes, 2 if i > 0 and j == 0 else 1, rngs))
                c_in = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.pool = _GlobalAvgPool()
        self.features = c_in

    def __call__(self, x):
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return self.pool(x)


class _ResNetHead(nnx.Module):
    def __init__(self, features: int, num_classes: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


class ResNet(TransferModel):
    """``xfer.models.resnet``: base (stem, layer1..layer4, pool) and head (dense), NHWC."""

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, width: int = 64, *, rngs
    ):
        base = _ResNetBase(depth, in_channels, width, rngs)
        super().__init__(base, _ResNetHead(base.features, num_classes, rngs))
