"""BatchNorm folding (``xfer.fold_bn``) on keras: the backend part of ``xfer._adapter.Folding``.

The copy is rebuilt from the model's config, as ``keras.models.clone_model`` rebuilds one,
so that a folded pair can be rebuilt differently: the conv or dense layer with
``use_bias=True``, the BN as a ``keras.layers.Identity`` of the same name (so every other
unit keeps its path). Functional and Sequential models, nested ones included, are cloned
with ``clone_model(..., recursive=True)``; every other layer is copied through its
serialized config (``serialize_keras_object``/``deserialize_keras_object``), which is also
how a layer that keeps its sublayers in its config (xfer's ResNet blocks) has its folded
parts replaced. The variables are then copied unit by unit, by path, the folded kernels and
biases from ``xfer.folding.folded_kernel_and_bias``; xfer's pins and ``trainable`` flags go
with them, so an unfolded BN behaves as in the model.

The pairs: in a functional graph, a selected BN called once on one tensor that a conv or
dense layer made in its one call, read by nothing else (no other call, not an output of
the graph); in a Sequential, a BN right after such a layer; inside a layer's own ``call``,
which Keras cannot see, the ``(conv, bn)`` attribute pairs its class declares in ``FOLDS``
(xfer's blocks do, ``backends/keras/models.py``). The layer is a Conv1D/2D/3D (grouped
too), a transposed conv, a DepthwiseConv1D/2D or a Dense, with no activation of its own,
channels last, neither quantized nor with LoRA; the BN normalises the last axis and both
appear once in the model. Any other BN stays as it is (``xfer.fold_bn`` warns).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import keras
import numpy as np

from xfer._adapter import Unit
from xfer.backends.keras import units as ku
from xfer.folding import folded_kernel_and_bias

L = keras.layers


@keras.saving.register_keras_serializable(package="xfer")
class FoldedBatchNormalization(L.Layer):
    """Where a folded BatchNormalization was: its input, unchanged (the BN's transform is now
    in the layer before it). It takes BN's call arguments, which a functional graph's node
    passes on (``training``, ``mask``), and ignores them.

    Example:
        >>> import numpy as np
        >>> FoldedBatchNormalization(name="bn")(np.ones((1, 2)), training=False, mask=None).shape
        (1, 2)
    """

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)  # kernel (*window, in / groups, out)
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)  # (*window, out, in)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)  # (*window, in, multiplier)


def fold_bn(model: Any, units: list[Unit]) -> tuple[Any, list[tuple[str, str]]]:
    selected = {id(u.native) for u in units}
    parents = Counter(id(c) for layer in ku.walk(model) for c in ku.children(layer))
    found = [
        (layer, bn)
        for layer, bn in _candidates(model)
        if id(bn) in selected and _foldable(layer, bn, parents)
    ]
    folded = {id(layer): _folded(layer, bn) for layer, bn in found}
    removed = {id(bn) for _, bn in found}
    copy = _clone(model, folded, removed)
    _copy_state(model, copy, folded, removed)
    paths = {id(u.native): u.path for u in ku.units(model)}
    return copy, [(paths[id(layer)], paths[id(bn)]) for layer, bn in found]


# --- Which pairs ---------------------------------------------------------------------------


def _candidates(model) -> list[tuple[Any, Any]]:
    """(layer, layer) pairs where the second reads the first's output, and only it does."""
    pairs = []
    for container in ku.walk(model):
        if isinstance(container, keras.Sequential):
            layers = container.layers
            pairs += list(zip(layers[:-1], layers[1:], strict=True))
        elif isinstance(container, keras.Model) and isinstance(container, keras.Function):
            pairs += _graph_pairs(container)
        for layer_name, bn_name in getattr(type(container), "FOLDS", ()):
            layer, bn = getattr(container, layer_name, None), getattr(container, bn_name, None)
            if layer is not None and bn is not None:
                pairs.append((layer, bn))
    return pairs


def _graph_pairs(function) -> list[tuple[Any, Any]]:
    calls = ku.graph_calls(function)
    times = Counter(id(operation) for operation, _, _ in calls)
    readers = Counter(id(t) for _, inputs, _ in calls for t in inputs)
    readers.update(id(t) for t in function.outputs)
    made_by = {id(t): operation for operation, _, outputs in calls for t in outputs}
    pairs = []
    for operation, inputs, _ in calls:
        if len(inputs) != 1 or times[id(operation)] != 1:
            continue
        source = made_by.get(id(inputs[0]))
        if source is not None and times[id(source)] == 1 and readers[id(inputs[0])] == 1:
            pairs.append((source, operation))
    return pairs


def _foldable(layer, bn, parents: Counter) -> bool:
    if not isinstance(bn, L.BatchNormalization) or not (layer.built and bn.built):
        return False
    if parents[id(layer)] != 1 or parents[id(bn)] != 1:
        return False  # shared: another use of it would change too
    if bn.axis not in (-1, bn.input_spec.ndim - 1) or _out_axis(layer) is None:
        return False
    if getattr(layer, "activation", None) is not keras.activations.linear:
        return False  # the BN reads activation(x @ kernel), not what the kernel computes
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        return False
    return _kernel(layer)[0].shape[-1] == bn.moving_mean.shape[0]


def _out_axis(layer) -> int | None:
    if isinstance(layer, (*_CONVS, *_DEPTHWISE, L.Dense)):
        return -1
    if isinstance(layer, _TRANSPOSED):
        return -2
    return None


# --- The fold ------------------------------------------------------------------------------


def _array(variable) -> np.ndarray | None:
    # A copy: on the torch engine convert_to_numpy may share the variable's memory.
    return None if variable is None else np.array(keras.ops.convert_to_numpy(variable.value))


def _kernel(layer) -> tuple[np.ndarray, int]:
    """The kernel with its output channels on the last axis (a depthwise kernel's are
    ``in * multiplier``, channel ``i * multiplier + m``), and that view's out axis."""
    kernel = _array(layer.kernel)
    if isinstance(layer, _DEPTHWISE):
        return kernel.reshape(*kernel.shape[:-2], -1), -1
    if isinstance(layer, _TRANSPOSED):
        return np.moveaxis(kernel, -2, -1), -1
    return kernel, -1


def _folded(layer, bn) -> tuple[np.ndarray, np.ndarray]:
    """The layer's folded kernel, in its own shape, and bias."""
    view, out_axis = _kernel(layer)
    kernel, bias = folded_kernel_and_bias(
        view,
        _array(layer.bias),
        gamma=_array(bn.gamma),
        beta=_array(bn.beta),
        mean=_array(bn.moving_mean),
        var=_array(bn.moving_variance),
        eps=float(bn.epsilon),
        out_axis=out_axis,
    )
    shape = tuple(layer.kernel.shape)
    if isinstance(layer, _TRANSPOSED):
        kernel = np.moveaxis(kernel, -1, -2)
    return kernel.reshape(shape), bias


# --- The copy ------------------------------------------------------------------------------


def _clone(model, folded: dict, removed: set):
    custom = {type(layer).__name__: type(layer) for layer in ku.walk(model)}

    def clone_layer(layer):
        if id(layer) in removed:
            return FoldedBatchNormalization(name=layer.name)
        config = keras.saving.serialize_keras_object(layer)
        _edit(config, layer, folded, removed)
        return keras.saving.deserialize_keras_object(config, custom_objects=custom)

    try:
        if isinstance(model, (keras.Sequential, keras.Function)):
            return keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
        return clone_layer(model)
    except Exception as error:  # Keras raises many types: NotImplementedError, TypeError, ...
        raise ValueError(
            f"fold_bn: Keras cannot copy this {type(model).__name__} ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}). Give its class a get_config() (and "
            "from_config()) that rebuild it, build it as a functional or Sequential model, "
            "or fold a part of it that Keras can copy (e.g. model.get_layer('base'))."
        ) from error


def _edit(config: dict, layer, folded: dict, removed: set) -> None:
    """Edit a layer's serialized config in place: a folded layer gets a bias, and a
    sublayer kept in the config under its attribute's name is edited in turn, a folded BN
    replaced by an identity."""
    inner = config.get("config", {})
    if id(layer) in folded:
        inner["use_bias"] = True
    for key, value in inner.items():
        part = getattr(layer, key, None) if isinstance(value, dict) else None
        if not isinstance(part, L.Layer) or part is layer:
            continue
        if id(part) in removed:
            inner[key] = keras.saving.serialize_keras_object(
                FoldedBatchNormalization(name=part.name)
            )
        else:
            _edit(value, part, folded, removed)


def _copy_state(model, copy, folded: dict, removed: set) -> None:
    """The model's variables, flags and pins into the copy, unit by unit, by path."""
    twins = {u.path: u.native for u in ku.units(copy)}
    ku.set_own_trainable(copy, model.trainable)
    for unit in ku.units(model):
        layer, twin = unit.native, twins.get(unit.path)
        if id(layer) in removed:
            continue
        ours, theirs = ku.own_variables(layer), ku.own_variables(twin) if twin else []
        if id(layer) in folded:
            kernel, bias = folded[id(layer)]
            pairs = [(twin.kernel, kernel, layer.kernel), (twin.bias, bias, layer.kernel)]
        elif twin is not None and [v.shape for v in ours] == [v.shape for v in theirs]:
            pairs = [(t, _array(v), v) for v, t in zip(ours, theirs, strict=True)]
        else:
            raise ValueError(
                f"fold_bn: the copy Keras rebuilt of this {type(model).__name__} differs from "
                f"it at {unit.path!r} ({type(layer).__name__}): its config does not rebuild "
                "it. Give the layer a get_config() that keeps what its __init__ needs."
            )
        for target, value, source in pairs:
            target.assign(value.astype(target.dtype))
            target.trainable = source.trainable
        if twin is not copy:
            ku.set_own_trainable(twin, layer.trainable)
        ku._install_pin(twin, layer.__dict__.get(ku._PIN))
