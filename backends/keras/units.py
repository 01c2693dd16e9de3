"""Keras 3 units: which layers xfer sees, their kind and own parameters, and the two
switches (the ``trainable`` flags, the ``call`` pins); the ``Units`` members.

The few Keras internals this needs, where Keras has no public equivalent, are each one
small function in the "Keras private API" section below, written for the Keras versions
of ``KERAS_TESTED`` (``__init__.py``); ``tests/test_keras.py`` checks each does what is
relied on.
"""

from __future__ import annotations

import functools
import inspect

import keras
import numpy as np

from xfer._adapter import Unit
from xfer.backends._common import root_index, unit_kind

L = keras.layers
_DROPOUTS = (L.Dropout, L.GaussianDropout, L.AlphaDropout)  # SpatialDropout* subclass Dropout
_CONVS = (
    L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose,
    L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D,
)  # fmt: skip
_NORMS = tuple(
    getattr(L, n)
    for n in ("LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization")
    if hasattr(L, n)
)
_KINDS = (  # (layer types, unit kind), the first match wins
    (L.BatchNormalization, "batchnorm"),
    (_DROPOUTS, "dropout"),
    (_CONVS, "conv"),
    ((L.Dense, L.EinsumDense), "dense"),
    (_NORMS, "norm"),
)
# Keras layer modules whose computation depends on `training` (dropout inside RNNs and
# attention; augmentation in preprocessing). Module names are Keras's source layout, not
# API: tests/test_keras.py checks that each prefix still holds such layers.
MODE_DEPENDENT = tuple(
    f"keras.src.layers.{m}"
    for m in (
        "normalization.batch_normalization", "regularization.", "rnn.", "attention.",
        "preprocessing.",
    )
)  # fmt: skip
_XFER_LAYERS = f"{__package__}.models"  # xfer's reference blocks only call their sublayers
_PIN = "_xfer_mode"  # xfer's own instance attribute, beside Keras's tracking


# --- Keras private API ---------------------------------------------------------------------
# Keras 3 has no public way to do the five things below; each is one small function, so
# that a Keras release that changes them breaks in one place, and tests/test_keras.py
# (test_private_keras_*) says which. Checked against keras/src 3.8.0 and 3.15.1: the range
# of xfer.backends.keras.KERAS_TESTED, outside which importing the backend warns.


def tracked_variables(layer) -> tuple[list, list]:
    """The layer's own variables, not its sublayers': (created trainable, created
    non-trainable), i.e. its parameters, frozen or not, and its buffers (BN statistics).

    Private: Keras files a variable in ``_trainable_variables`` or ``_non_trainable_variables``
    by its flag when the layer creates it and never moves it; the public
    ``trainable_weights``/``non_trainable_weights`` add the sublayers' variables and sort
    by the *current* flag, where a frozen parameter looks like a buffer.
    """
    return list(layer._trainable_variables), list(layer._non_trainable_variables)


def children(layer) -> list:
    """The layers ``layer`` holds directly, in the order it made them (InputLayer aside).

    Private: only a ``Model`` has a public ``layers``; a plain ``Layer`` with sublayers
    (xfer's blocks, a user's custom layer) lists them in ``_layers``, as Keras's own walks do.
    """
    return [c for c in getattr(layer, "_layers", []) if not isinstance(c, L.InputLayer)]


def set_own_trainable(layer, trainable: bool) -> None:
    """Set the layer's own ``trainable`` flag only.

    Private: the public setter also sets every variable's flag and recurses into every
    sublayer; xfer freezes per variable and uses a layer's own flag for what it alone
    means (BN's inference switch; a model's gate over its ``trainable_variables``).
    """
    layer._trainable = trainable


def producer(tensor) -> tuple:
    """The operation that computed a symbolic tensor, and that call's input tensors.

    Private: a KerasTensor records its call in ``_keras_history``; the public
    ``Operation.input`` gives the inputs of a layer's *first* call, another graph's when
    the layer is shared between models.
    """
    operation, node_index, _ = tensor._keras_history
    return operation, operation._inbound_nodes[node_index].input_tensors


def graph_calls(function) -> list[tuple]:
    """Every call of a functional model's graph, each once: (operation, input tensors,
    output tensors), found from its outputs back to its inputs.

    Private: as :func:`producer`; a layer called twice in the graph has two calls here
    (the public ``Functional.operations`` lists it once).
    """
    calls, seen = [], set()
    stack = list(function.outputs)
    inputs = {id(t) for t in function.inputs}
    while stack:
        tensor = stack.pop()
        if id(tensor) in inputs:
            continue
        operation, node_index, _ = tensor._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) not in seen:
            seen.add(id(node))
            calls.append((operation, list(node.input_tensors), list(node.output_tensors)))
            stack.extend(node.input_tensors)
    return calls


# --- Unit helpers ----------------------------------------------------------------------------


def own_params(layer) -> list:
    """The layer's own parameters, frozen or not.

    Example:
        >>> bn = keras.layers.BatchNormalization()
        >>> bn.build((None, 4))
        >>> [v.name for v in own_params(bn)], [v.name for v in own_variables(bn)][2:]
        (['gamma', 'beta'], ['moving_mean', 'moving_variance'])
    """
    return tracked_variables(layer)[0]


def own_variables(layer) -> list:
    """The layer's own parameters and buffers, each once."""
    params, buffers = tracked_variables(layer)
    return list({id(v): v for v in [*params, *buffers]}.values())


def _size(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def kind(layer) -> str:
    """The unit kind of a layer (one of ``xfer._adapter.KINDS``).

    Example:
        >>> layers = keras.layers.Conv2D(4, 3), keras.layers.ReLU()
        >>> [kind(x) for x in (*layers, keras.Sequential([keras.layers.Dense(2)]))]
        ['conv', 'other', 'container']
    """
    container = bool(children(layer)) and not own_variables(layer)
    return unit_kind(layer, _KINDS, container)


def segments(parent, child) -> tuple[str, ...]:
    """The child's path segments below ``parent``: for a subclassed layer the attribute the
    parent holds it under (with KERAS_BACKEND=torch in torch's ``_modules``, not
    ``__dict__``), followed by the position or key when that attribute is a list or dict of
    layers (``blocks.0``, as torch's ``ModuleList`` and Flax give); else its Keras name,
    one segment even when the name has a dot in it (``mobilenetv2_1.00_224``).

    Example:
        >>> class Net(keras.layers.Layer):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = [keras.layers.Dense(2), keras.layers.Dense(2)]
        >>> net = Net()
        >>> segments(net, net.blocks[1]), segments(net, keras.layers.Dense(2, name="a.b"))
        (('blocks', '1'), ('a.b',))
    """
    attrs = [
        (attr, value)
        for held in (vars(parent), getattr(parent, "_modules", {}))
        for attr, value in held.items()
        if not attr.startswith("_")
    ]
    # An attribute of its own first: a list may also hold a layer that has one.
    for attr, value in attrs:
        if value is child:
            return (attr,)
    for attr, value in attrs:
        inside = _held_in(value, child)
        if inside is not None:
            return (attr, *inside)
    return (child.name,)


def _held_in(value, child) -> tuple[str, ...] | None:
    # Keras tracks layers in list, tuple and dict attributes (TrackedList/TrackedDict);
    # the segments are positions and keys, as torch's ModuleList/ModuleDict name them.
    if isinstance(value, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        return None
    for key, item in items:
        if item is child:
            return (key,)
        inside = _held_in(item, child)
        if inside is not None:
            return (key, *inside)
    return None


def walk(layer) -> list:
    """``layer`` and every layer below it, each once, parents first."""
    found: dict[int, object] = {}

    def visit(current) -> None:
        if id(current) not in found:
            found[id(current)] = current
            for child in children(current):
                visit(child)

    visit(layer)
    return list(found.values())


def parents(unit: Unit) -> list:
    """The layers from the root down to ``unit``'s parent.

    Found by identity, not by splitting the path: a layer name may contain a dot
    (``mobilenetv2_1.00_224``, ``Sequential(name="a.b")``).
    """

    def chain_to(layer, target, seen) -> list | None:
        for child in children(layer):
            if child is target:
                return [layer]
            if id(child) not in seen:
                seen.add(id(child))
                below = chain_to(child, target, seen)
                if below is not None:
                    return [layer, *below]
        return None

    if unit.native is unit.root:
        return []
    found = chain_to(unit.root, unit.native, set())
    if found is None:
        raise ValueError(
            f"xfer cannot find the Keras layer {unit.path!r} inside its model any more; "
            "was the model changed after xfer listed its units? Call the operation again."
        )
    return found


# --- Mode pins -------------------------------------------------------------------------------


def _pinned_call(layer, position: int, *args, **kwargs):
    # A module-level function behind functools.partial: nothing for .keras saving to walk
    # (it only follows Keras objects), and the class's call stays the one in the config.
    mode = layer.__dict__.get(_PIN)
    if mode in ("train", "inference"):
        training = mode == "train"
        if len(args) > position:
            args = (*args[:position], training, *args[position + 1 :])
        else:
            kwargs["training"] = training
    return type(layer).call(layer, *args, **kwargs)


def _install_pin(layer, mode: str | None) -> None:
    # Written to __dict__ directly: Keras's tracker and torch's __setattr__ need not see it.
    if mode is None:
        layer.__dict__.pop(_PIN, None)
        layer.__dict__.pop("call", None)
        return
    layer.__dict__[_PIN] = mode
    # The class's call signature, as Keras reads it (the instance's call may be a pin).
    names = list(inspect.signature(functools.partial(type(layer).call, layer)).parameters)
    # A container (sublayers, no variables) has no computation of its own to pin, and a
    # Keras container forwards `training` explicitly to its children (Functional and
    # Sequential do), so rewriting it would pin the whole subtree. Its pin is recorded,
    # not applied, as a torch container's `training` flag does not reach its children
    # either; select "block.**" to pin what is inside. A non-container layer with
    # sublayers that forwards `training` by hand does pass its pinned value on.
    if "training" in names and kind(layer) != "container":
        layer.__dict__["call"] = functools.partial(_pinned_call, layer, names.index("training"))


def pin_state(model) -> tuple:
    """Every layer's pin and own ``trainable`` flag: what a traced forward depends on."""
    return tuple((layer.__dict__.get(_PIN), layer.trainable) for layer in walk(model))


# --- Units members ---------------------------------------------------------------------------


def units(model) -> list[Unit]:
    found: list[Unit] = []

    def add(layer, path: tuple[str, ...], index: int) -> None:
        params, buffers = tracked_variables(layer)
        # Moving statistics are BN's non-trainable variables (never parameters).
        stats = buffers if isinstance(layer, L.BatchNormalization) else []
        names = {"params": tuple(v.name for v in params), "stats": tuple(v.name for v in stats)}
        size = _size(params)
        found.append(
            Unit(".".join(path), kind(layer), index, size, layer, model, **names, segments=path)
        )

    def visit(layer, path: tuple[str, ...], index: int) -> None:
        add(layer, path, index)
        for child in children(layer):
            visit(child, (*path, *segments(layer, child)), index)

    top = children(model)
    root = root_index(len(own_variables(model)), bool(top))
    if root is not None:
        add(model, (), root)
    # A top-level layer's index is its position in `model.layers`, which for a functional
    # model starts with the InputLayer(s): S.from_index(i) is then `model.layers[i:]`.
    listed = {id(layer): i for i, layer in enumerate(getattr(model, "layers", top))}
    for i, child in enumerate(top):
        visit(child, segments(model, child), listed.get(id(child), i))
    return found


def chain(model) -> list | None:
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    # keras.Function: a functional model (a Sequential is not one).
    if not isinstance(model, keras.Function) or len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    # Walk back from the output: a chain is one layer per step, each on one tensor, and
    # no other operation anywhere in the graph.
    layers, tensor = [], model.outputs[0]
    while tensor is not model.inputs[0]:
        operation, inputs = producer(tensor)
        if not isinstance(operation, L.Layer) or len(inputs) != 1:
            return None
        layers.append(operation)
        tensor = inputs[0]
    operations = [op for op in model.operations if not isinstance(op, L.InputLayer)]
    return layers[::-1] if len(operations) == len(layers) else None


def mode_free(unit: Unit) -> bool:
    module = type(unit.native).__module__
    if module.startswith("keras.src.models.") or module == _XFER_LAYERS:
        return True  # Functional and Sequential, and xfer's layers, only call their children
    return module.startswith("keras.src.layers.") and not module.startswith(MODE_DEPENDENT)


def param_counts(unit: Unit) -> tuple[int, int]:
    params = own_params(unit.native)
    trainable = _size(v for v in params if v.trainable)
    return trainable, _size(params) - trainable


def set_trainable(unit: Unit, trainable: bool) -> None:
    layer = unit.native
    for v in own_params(layer):
        v.trainable = trainable
    if not isinstance(layer, L.BatchNormalization) and not children(layer):
        set_own_trainable(layer, trainable)  # BN's own flag encodes its mode instead
    if trainable:
        # A model with trainable=False has no trainable_variables at all, whatever its
        # variables' flags, so fit() would train nothing; its sub-models likewise for
        # anyone who trains or counts them alone. Parents have no variables of their
        # own, so this changes no other unit's state.
        for parent in parents(unit):
            set_own_trainable(parent, True)


def get_mode(unit: Unit) -> str:
    layer = unit.native
    if isinstance(layer, L.BatchNormalization) and not layer.trainable:
        return "inference"
    return layer.__dict__.get(_PIN) or "inherit"


def set_mode(unit: Unit, mode: str) -> None:
    layer = unit.native
    if isinstance(layer, L.BatchNormalization):
        # Keras's native inference BN; the call pin is left for "train" only.
        set_own_trainable(layer, mode != "inference")
        _install_pin(layer, "train" if mode == "train" else None)
        return
    _install_pin(layer, None if mode == "inherit" else mode)


def current_mode(unit: Unit) -> str:
    # Keras has no persistent mode: an unpinned layer follows the call's ``training=``.
    return "inference" if get_mode(unit) == "inference" else "train"


def bn_momentum(unit: Unit) -> float | None:
    return float(unit.native.momentum) if unit.is_bn else None
