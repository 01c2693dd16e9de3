"""Keras 3 adapter: variable ``trainable`` flags for freezing, BN's own ``trainable`` for
frozen statistics, an instance-level ``call`` pin for the other modes.

Why these mechanisms (checked against keras/src/layers/layer.py, 3.15.1):

- Freezing sets ``v.trainable`` on a layer's *own* variables only. A model's optimizer
  trains exactly ``model.trainable_variables`` = the variables with ``v.trainable``
  (the root's ``trainable`` aside), so per-layer freezing needs no recursion; Keras's own
  ``layer.trainable = ...`` setter recurses into every sublayer, which is what xfer avoids.
- BatchNormalization computes ``if training and self.trainable``: ``bn.trainable = False``
  is Keras's native "inference mode" for BN, whatever ``fit()`` or an outer
  ``training=True`` says. So a BN pinned to inference is ``bn._trainable = False`` (the
  private field, so the gamma/beta flags stay as they are: BN "affine" is ``_trainable``
  False with trainable gamma/beta). It is in the layer config, so it survives ``.keras``.
- Every other pin rewrites ``training`` in the layer's own ``call``. In a functional model
  the outer ``training`` overwrites a stored ``base(x, training=False)``, and ``fit()``
  always passes ``training=True``; the one place that sees the final value is the call
  itself. Keras's ``Operation.__call__`` looks ``self.call`` up on the instance, so the pin
  is an instance attribute ``call`` wrapping the class's method (traced as a Python
  constant under jit, so it holds inside ``fit()``; compile after pinning, as Keras requires
  after any change of state).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras.src.models.functional import Functional

from xfer._adapter import Unit
from xfer.data import PREDICT_CHUNK, inference_chunks

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


# Keras layer modules whose computation depends on `training` (dropout inside RNNs and
# attention; augmentation in preprocessing).
_MODE_DEPENDENT = tuple(
    f"keras.src.layers.{m}"
    for m in (
        "normalization.batch_normalization", "regularization.", "rnn.", "attention.",
        "preprocessing.",
    )
)  # fmt: skip


def _eager_inference(model):
    import torch

    def forward(x):
        # As Keras's own predict_step on torch: no autograd graph through trainable layers.
        with torch.no_grad():
            return model(x, training=False)

    return forward


def _inference(model):
    """(pins, variables, forward, jitted forward): ``model(x, training=False)`` as a pure
    function of the variables' values, cached on the model per pin state (jax engine)."""
    import jax

    pins = tuple(
        (layer.__dict__.get("_xfer_mode"), getattr(layer, "_trainable", None))
        for layer in model._flatten_layers()
    )
    cached = model.__dict__.get("_xfer_inference")
    if cached is None or cached[0] != pins:
        variables = list(model.weights)  # a fixed order, whatever the trainable flags

        def forward(values, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return model(x, training=False)

        cached = (pins, variables, forward, jax.jit(forward))
        model.__dict__["_xfer_inference"] = cached  # beside Keras's tracking, like the pins
    return cached


def _own_weights(layer) -> list:
    seen, out = set(), []
    for v in [*layer._trainable_variables, *layer._non_trainable_variables]:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _children(layer) -> list:
    return [c for c in getattr(layer, "_layers", []) if not isinstance(c, L.InputLayer)]


def _segment(parent, child) -> str:
    # Subclassed layers: the attribute the parent holds the child under. With
    # KERAS_BACKEND=torch, sublayers live in torch's ``_modules``, not ``__dict__``.
    for attrs in (vars(parent), getattr(parent, "_modules", {})):
        for attr, value in attrs.items():
            if value is child and not attr.startswith("_"):
                return attr
    return child.name


def _kind(layer) -> str:
    if isinstance(layer, L.BatchNormalization):
        return "batchnorm"
    if isinstance(layer, _DROPOUTS):
        return "dropout"
    if isinstance(layer, _CONVS):
        return "conv"
    if isinstance(layer, (L.Dense, L.EinsumDense)):
        return "dense"
    if isinstance(layer, _NORMS):
        return "norm"
    if _children(layer) and not _own_weights(layer):
        return "container"
    return "other"


def _pinned_call(layer, *args, **kwargs):
    # A module-level function behind functools.partial: nothing for .keras saving to walk
    # (it only follows Keras objects), and the class's call stays the one in the config.
    mode = layer.__dict__.get("_xfer_mode")
    if mode in ("train", "inference"):
        training = mode == "train"
        position = layer.call_signature_parameters.index("training")
        if len(args) > position:
            args = (*args[:position], training, *args[position + 1 :])
        else:
            kwargs["training"] = training
    return type(layer).call(layer, *args, **kwargs)


def _install_pin(layer, mode: str | None) -> None:
    # Written to __dict__ directly: Keras's tracker and torch's __setattr__ need not see it.
    if mode is None:
        layer.__dict__.pop("_xfer_mode", None)
        layer.__dict__.pop("call", None)
        return
    layer.__dict__["_xfer_mode"] = mode
    # A container (sublayers, no variables) has no computation of its own to pin, and a
    # Keras container forwards `training` explicitly to its children (Functional and
    # Sequential do), so rewriting it would pin the whole subtree. Its pin is recorded,
    # not applied, as a torch container's `training` flag does not reach its children
    # either; select "block.**" to pin what is inside. A non-container layer with
    # sublayers that forwards `training` by hand does pass its pinned value on.
    if layer._call_has_training_arg and _kind(layer) != "container":
        layer.__dict__["call"] = functools.partial(_pinned_call, layer)


def _parents(unit: Unit) -> list:
    """The layers from the root down to ``unit``'s parent.

    Found by identity, not by splitting the path: a layer name may contain a dot
    (``mobilenetv2_1.00_224``, ``Sequential(name="a.b")``).
    """

    def chain(layer, target, seen) -> list | None:
        for child in _children(layer):
            if child is target:
                return [layer]
            if id(child) not in seen:
                seen.add(id(child))
                below = chain(child, target, seen)
                if below is not None:
                    return [layer, *below]
        return None

    if unit.native is unit.root:
        return []
    parents = chain(unit.root, unit.native, set())
    if parents is None:
        raise ValueError(
            f"xfer cannot find the Keras layer {unit.path!r} inside its model any more; "
            "was the model changed after xfer listed its units? Call the operation again."
        )
    return parents


@keras.saving.register_keras_serializable(package="xfer")
class _Block(keras.layers.Layer):
    """conv -> BN -> ReLU for ``small_cnn``; its sublayers are in its config so that their
    ``trainable`` flags (BN "frozen" included) survive ``.keras``."""

    def __init__(self, filters: int, conv=None, bn=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        load = keras.saving.deserialize_keras_object
        self.conv = load(conv) if conv else L.Conv2D(filters, 3, padding="same")
        self.bn = load(bn) if bn else L.BatchNormalization(epsilon=1e-3, momentum=0.9)

    def build(self, input_shape):
        if not self.conv.built:  # deserialized sublayers arrive built
            self.conv.build(input_shape)
        if not self.bn.built:
            self.bn.build((*input_shape[:-1], self.filters))

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x)))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        save = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "filters": self.filters,
            "conv": save(self.conv),
            "bn": save(self.bn),
        }


# The head's pooling by the rank of the base's output: spatial axes averaged, (batch,
# features) passed through.
_POOLS = {
    2: L.Identity,
    3: L.GlobalAveragePooling1D,
    4: L.GlobalAveragePooling2D,
    5: L.GlobalAveragePooling3D,
}


def _input_shape(base) -> tuple:
    """The image shape of a functional or Sequential base; an error for a subclassed one."""
    try:
        inputs = base.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"attach_head: the base {base.name!r} ({type(base).__name__}) has no defined "
            "input, so its output shape is unknown. Pass input_shape=(height, width, "
            "channels), e.g. input_shape=(224, 224, 3), or build the base functionally "
            "(keras.applications models are)."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"attach_head: the base {base.name!r} has {len(inputs)} inputs; the transfer head "
            "expects a base that takes one image batch."
        )
    return tuple(inputs[0].shape[1:])


# Matched on every backend: Adam's epsilon is Keras's default, SGD momentum 0.9.
_OPTIMIZERS = {
    "sgd": lambda lr, wd: keras.optimizers.SGD(lr),
    "momentum": lambda lr, wd: keras.optimizers.SGD(lr, momentum=0.9),
    "adam": lambda lr, wd: keras.optimizers.Adam(lr, epsilon=1e-7),
    "adamw": lambda lr, wd: keras.optimizers.AdamW(lr, weight_decay=wd, epsilon=1e-7),
}


def _scale_learning_rates(optimizer, factors: dict[int, float]) -> None:
    """Give variables their own learning rate (``factor`` x the optimizer's).

    Keras 3 optimizers have no parameter groups; every engine updates the variables in
    ``_backend_update_step(grads, variables, learning_rate)`` (torch fuses it, jax loops),
    so the variables are split by factor there and each group updated with its own rate.
    AdamW's decoupled weight decay still uses the optimizer's rate.
    """
    update = optimizer._backend_update_step

    def grouped_update(grads, variables, learning_rate):
        groups: dict[float, tuple[list, list]] = {}
        for grad, variable in zip(grads, variables, strict=True):
            group = groups.setdefault(factors.get(id(variable), 1.0), ([], []))
            group[0].append(grad)
            group[1].append(variable)
        for factor, (group_grads, group_variables) in groups.items():
            update(group_grads, group_variables, learning_rate * factor)

    # An instance attribute, past Keras's attribute tracking: this optimizer only.
    optimizer.__dict__["_backend_update_step"] = grouped_update


class KerasAdapter:
    mixed_precision = (
        "Keras chooses mixed precision when the layers are built. Build the model under "
        "keras.config.set_dtype_policy('mixed_bfloat16') and train it with xfer's default "
        "precision='float32'."
    )
    name = "keras"

    def units(self, model) -> list[Unit]:
        units: list[Unit] = []

        def add(layer, path: str, index: int) -> None:
            params = layer._trainable_variables
            n_params = sum(int(np.prod(v.shape)) for v in params)
            # Moving statistics are BN's non-trainable variables (never parameters).
            stats = (
                layer._non_trainable_variables if isinstance(layer, L.BatchNormalization) else []
            )
            name, depth = path.rpartition(".")[2], path.count(".") + bool(path)
            units.append(
                Unit(
                    path,
                    name,
                    _kind(layer),
                    index,
                    depth,
                    n_params,
                    layer,
                    model,
                    tuple(v.name for v in params),
                    tuple(v.name for v in stats),
                )  # fmt: skip
            )

        def visit(layer, path: str, index: int) -> None:
            add(layer, path, index)
            for child in _children(layer):
                visit(child, f"{path}.{_segment(layer, child)}", index)

        top = _children(model)
        if not top or _own_weights(model):
            add(model, "", -1 if top else 0)
        for i, child in enumerate(top):
            visit(child, _segment(model, child), i)
        return units

    def small_cnn(
        self, num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int
    ):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((None, None, in_channels))
        x = _Block(width, name="block1")(inputs)
        x = _Block(width, name="block2")(x)
        x = L.Dropout(dropout, name="drop")(x)
        base = keras.Model(inputs, L.GlobalAveragePooling2D(name="pool")(x), name="base")
        head = keras.Sequential(
            [
                keras.Input((width,)),
                L.Dropout(dropout, name="drop"),
                L.Dense(num_classes, name="dense"),
            ],
            name="head",
        )
        inputs = keras.Input((None, None, in_channels))
        # The transfer-learning guide's nested call, whose training=False fit() overrides.
        return keras.Model(inputs, head(base(inputs, training=False)), name="small_cnn")

    def resnet(self, depth: int, num_classes: int, in_channels: int, *, width: int, seed: int):
        keras.utils.set_random_seed(seed)
        counts, block = RESNET_STAGES[depth]
        inputs = keras.Input((None, None, in_channels))
        x = _ResNetStem(width, name="stem")(inputs)
        c_in = width
        for i, count in enumerate(counts):
            planes, blocks = width * 2**i, []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                c_out = planes * block.expansion
                # Blocks named "0", "1", ...: a Sequential's units are named by layer name.
                down = stride != 1 or c_in != c_out
                blocks.append(block(planes, stride, down, name=str(j)))
                c_in = c_out
            x = keras.Sequential(blocks, name=f"layer{i + 1}")(x)
        base = keras.Model(inputs, L.GlobalAveragePooling2D(name="pool")(x), name="base")
        head = keras.Sequential(
            [keras.Input((c_in,)), L.Dense(num_classes, name="dense")], name="head"
        )
        inputs = keras.Input((None, None, in_channels))
        return keras.Model(inputs, head(base(inputs, training=False)), name=f"resnet{depth}")

    def attach_head(self, base, num_classes, *, dropout, input_shape, seed):
        shape = input_shape or _input_shape(base)
        inputs = keras.Input(shape)
        try:
            # The guide's nested call; xfer's pins, not this training=False, decide the mode.
            features = base(inputs, training=False)
        except Exception as error:
            reason = str(error).rstrip(".")
            raise ValueError(
                f"attach_head: the base does not accept images of shape {shape}: {reason}. "
                "input_shape must be one channels-last image (height, width, channels)."
            ) from error
        rank = len(getattr(features, "shape", ()))
        if rank not in _POOLS:
            raise ValueError(
                f"attach_head: the base must return one tensor, (batch, *spatial, channels) "
                f"or (batch, features), got {getattr(features, 'shape', type(features))}. "
                "Build the base with include_top=False (keras.applications) or wrap it in "
                "a model that returns the feature map the head should pool."
            )
        head = keras.Sequential(
            [
                keras.Input(tuple(features.shape[1:])),
                _POOLS[rank](name="pool"),
                L.Dropout(dropout, seed=seed, name="drop"),
                L.Dense(
                    num_classes,
                    kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                    name="dense",
                ),
            ],
            name="head",
        )
        original = base.name
        # A functional model knows its layers by name: the name gives the paths base.**,
        # and the .keras config keeps it (an attribute would be lost on loading).
        base.name = "base"
        return keras.Model(inputs, head(features), name=f"{original}_with_head")

    def fit(self, model, x, y, *, epochs, batch_size, lr, weight_decay) -> list[float]:
        # Keras's own loop; compiling here also rebuilds the train step after xfer calls.
        model.compile(
            optimizer=keras.optimizers.AdamW(lr, weight_decay=weight_decay),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(
            np.asarray(x, "float32"), np.asarray(y), batch_size=batch_size, epochs=epochs,
            shuffle=False, verbose=0,
        )  # fmt: skip
        return [float(v) for v in history.history["loss"]]

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
        # ``precision`` is always float32 here (the pipeline refuses others: mixed_precision).
        native = _OPTIMIZERS[optimizer](lr, weight_decay)
        if lr_groups:
            layers = {u.path: u.native for u in self.units(model)}
            factors = {}
            for paths, group_lr in reversed(lr_groups):  # the first group wins
                for path in paths:
                    factors.update(
                        dict.fromkeys(map(id, layers[path]._trainable_variables), group_lr / lr)
                    )
            _scale_learning_rates(native, factors)
        # Keras's own loop: compile after the xfer calls (Keras collects the trainable
        # variables there), then train_on_batch, which returns that batch's loss.
        model.compile(
            optimizer=native,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True if compile_step else "auto",  # "auto": XLA on jax, eager on torch
        )

        def step(x, y) -> float:
            if isinstance(x, np.ndarray):
                x, y = np.asarray(x, "float32"), np.asarray(y)
            return float(model.train_on_batch(x, y))

        return step

    def to_device(self, model, x, y):
        convert = keras.ops.convert_to_tensor
        return convert(np.asarray(x, "float32")), convert(np.asarray(y))

    def predict(self, model, x, *, batch_size=PREDICT_CHUNK) -> np.ndarray:
        # Not model.predict(): its cached function would not see pins changed since it was
        # traced. On jax, a function compiled per pin state instead of eager calls (eager
        # JAX compiles every new primitive shape); on torch, eager calls.
        jax_engine = keras.backend.backend() == "jax"
        if jax_engine:
            _, variables, _, compiled = _inference(model)
            forward = lambda x: compiled([v.value for v in variables], x)  # noqa: E731
        else:
            forward = _eager_inference(model)
        out = [
            keras.ops.convert_to_numpy(forward(c))[:n]
            for c, n in inference_chunks(x, pad=jax_engine, size=batch_size)
        ]
        return np.concatenate(out)

    def place(self, model, device: str) -> str:
        # Keras puts every variable on its engine's default device itself.
        engine = keras.backend.backend()
        if engine == "torch":
            from keras.src.backend.torch.core import get_device

            actual = "cuda" if str(get_device()).startswith("cuda") else "cpu"
            how = "CUDA_VISIBLE_DEVICES='' hides the GPU from torch"
        else:
            import jax

            actual = "cuda" if jax.default_backend() == "gpu" else "cpu"
            how = "JAX_PLATFORMS=cpu or =cuda picks the device"
        if device not in ("auto", actual):
            raise ValueError(
                f"device={device!r}, but Keras on {engine} places its variables on {actual} "
                f"itself. Use device='auto', or choose the device before starting Python "
                f"({how})."
            )
        return actual

    def output_shape(self, model, x) -> tuple[int, ...]:
        if keras.backend.backend() != "jax":
            return self.predict(model, x).shape  # eager torch: as cheap as tracing
        import jax

        _, variables, forward, _ = _inference(model)
        values = [v.value for v in variables]
        return tuple(jax.eval_shape(forward, values, np.asarray(x, "float32")).shape)

    def chain(self, model) -> list | None:
        if isinstance(model, keras.Sequential):
            return list(model.layers)
        if not isinstance(model, Functional) or len(model.inputs) != 1 or len(model.outputs) != 1:
            return None
        # Walk back from the output: a chain is one layer per step, each on one tensor, and
        # no other operation anywhere in the graph.
        layers, tensor = [], model.outputs[0]
        while tensor is not model.inputs[0]:
            operation, node_index, _ = tensor._keras_history
            node = operation._inbound_nodes[node_index]
            if not isinstance(operation, L.Layer) or len(node.input_tensors) != 1:
                return None
            layers.append(operation)
            tensor = node.input_tensors[0]
        operations = [op for op in model._operations if not isinstance(op, L.InputLayer)]
        return layers[::-1] if len(operations) == len(layers) else None

    def mode_free(self, unit: Unit) -> bool:
        module = type(unit.native).__module__
        if module.startswith("keras.src.models.") or module == __name__:
            return True  # Functional and Sequential, and xfer's layers, only call their children
        return module.startswith("keras.src.layers.") and not module.startswith(_MODE_DEPENDENT)

    def param_counts(self, unit: Unit) -> tuple[int, int]:
        params = unit.native._trainable_variables
        trainable = sum(int(np.prod(v.shape)) for v in params if v.trainable)
        return trainable, sum(int(np.prod(v.shape)) for v in params) - trainable

    def set_trainable(self, unit: Unit, trainable: bool) -> None:
        layer = unit.native
        for v in layer._trainable_variables:
            v.trainable = trainable
        if not isinstance(layer, L.BatchNormalization) and not _children(layer):
            # The private field, as Keras's setter would recurse; BN's encodes its mode.
            layer._trainable = trainable
        if trainable:
            # A model with trainable=False has no trainable_variables at all, whatever its
            # variables' flags, so fit() would train nothing; its sub-models likewise for
            # anyone who trains or counts them alone. Parents have no variables of their
            # own, so this changes no other unit's state.
            for parent in _parents(unit):
                parent._trainable = True

    def get_mode(self, unit: Unit) -> str:
        layer = unit.native
        if isinstance(layer, L.BatchNormalization) and not layer._trainable:
            return "inference"
        return layer.__dict__.get("_xfer_mode") or "inherit"

    def set_mode(self, unit: Unit, mode: str) -> None:
        layer = unit.native
        if isinstance(layer, L.BatchNormalization):
            # Keras's native inference BN; the call pin is left for "train" only.
            layer._trainable = mode != "inference"
            _install_pin(layer, "train" if mode == "train" else None)
            return
        _install_pin(layer, None if mode == "inherit" else mode)

    def tensors(self, model):
        units = self.units(model)
        root = [] if any(u.path == "" for u in units) else [("", model)]
        for path, layer in [*root, *((u.path, u.native) for u in units)]:
            for v in _own_weights(layer):
                key = f"{path}.{v.name}" if path else v.name
                yield key, keras.ops.convert_to_numpy(v.value)

    def _neutral_variables(self, model):
        # Keras's own names and layouts are the neutral ones (DepthwiseConv's (*k, in,
        # multiplier) kernel included: it stays Keras's, the other frameworks store a
        # depthwise conv as a grouped one, (*k, 1, in * multiplier)).
        seen = set()
        units = self.units(model)
        root = [] if any(u.path == "" for u in units) else [("", model)]
        for path, layer in [*root, *((u.path, u.native) for u in units)]:
            for v in _own_weights(layer):
                if id(v) not in seen:
                    seen.add(id(v))
                    yield (f"{path}.{v.name}" if path else v.name), v

    def weight_arrays(self, model):
        for key, v in self._neutral_variables(model):
            yield key, keras.ops.convert_to_numpy(v.value)

    def assign_weights(self, model, weights: dict[str, np.ndarray]) -> None:
        # v.assign keeps the variable object, its trainable flag and its device.
        for key, v in list(self._neutral_variables(model)):
            v.assign(weights[key])

    def persistence(self) -> str:
        return (
            ".keras keeps each layer's `trainable` (so BN 'frozen' survives natively, for "
            "layers the config records: functional/Sequential ones and sublayers a custom "
            "layer serializes in get_config) but not the mode pins of other layers nor "
            "trainable gamma/beta under a BN pinned to inference; save "
            "xfer.export_state(model) beside it and re-apply it with xfer.import_state."
        )


ADAPTER = KerasAdapter()


# --- ResNet reference model (xfer.models.resnet) -------------------------------------------
# Convs pad explicitly and symmetrically (keras.ops.pad, then "valid"): "same" with stride 2
# pads asymmetrically in TF/JAX, unlike PyTorch. Padding and ReLU are ops, not layers, so
# that the units are the same as in the PyTorch and Flax models.


def _pad(x, p: int):
    return x if p == 0 else keras.ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])


def _padded(shape, p: int) -> tuple:
    grow = lambda d: None if d is None else d + 2 * p  # noqa: E731
    return (shape[0], grow(shape[1]), grow(shape[2]), shape[3])


def _build_part(layer, shape) -> tuple:
    if not layer.built:  # deserialized sublayers arrive built
        layer.build(shape)
    return layer.compute_output_shape(shape)


class _Parts(keras.layers.Layer):
    """A layer of named sublayers kept in its config (as ``_Block``), so that their
    ``trainable`` flags survive ``.keras``. ``_parts()`` makes fresh ones: name -> layer."""

    PARTS: tuple[str, ...] = ()

    def __init__(self, filters: int, stride: int = 1, downsample: bool = False, **kwargs):
        configs = {name: kwargs.pop(name, None) for name in self.PARTS}
        super().__init__(**kwargs)
        self.filters, self.stride, self.has_downsample = filters, stride, downsample
        fresh = self._parts()
        for name in self.PARTS:
            config = configs[name]
            part = keras.saving.deserialize_keras_object(config) if config else fresh[name]
            setattr(self, name, part)

    def _parts(self) -> dict:
        raise NotImplementedError

    def get_config(self):
        save = keras.saving.serialize_keras_object
        parts = {n: save(getattr(self, n)) for n in self.PARTS if getattr(self, n) is not None}
        return {
            **super().get_config(),
            "filters": self.filters,
            "stride": self.stride,
            "downsample": self.has_downsample,
            **parts,
        }


def _rconv(filters: int, kernel: int, stride: int = 1):
    return L.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False)


def _rbn():
    return L.BatchNormalization(epsilon=1e-3, momentum=0.9)


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetStem(_Parts):
    PARTS = ("conv", "bn")

    def _parts(self):
        return {"conv": _rconv(self.filters, 7, 2), "bn": _rbn()}

    def build(self, input_shape):
        _build_part(self.bn, _build_part(self.conv, _padded(input_shape, 3)))

    def call(self, x, training=None):
        x = keras.ops.relu(self.bn(self.conv(_pad(x, 3)), training=training))
        # Zero padding is -inf padding here: the input is a ReLU output.
        return keras.ops.max_pool(_pad(x, 1), 3, 2, padding="valid")


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetDownsample(_Parts):
    PARTS = ("conv", "bn")

    def _parts(self):
        return {"conv": _rconv(self.filters, 1, self.stride), "bn": _rbn()}

    def build(self, input_shape):
        _build_part(self.bn, _build_part(self.conv, input_shape))

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetBasicBlock(_Parts):
    PARTS = ("conv1", "bn1", "conv2", "bn2", "downsample")
    expansion = 1

    def _parts(self):
        f, s = self.filters, self.stride
        down = _ResNetDownsample(f, s) if self.has_downsample else None
        return {
            "conv1": _rconv(f, 3, s),
            "bn1": _rbn(),
            "conv2": _rconv(f, 3),
            "bn2": _rbn(),
            "downsample": down,
        }

    def build(self, input_shape):
        shape = _build_part(self.bn1, _build_part(self.conv1, _padded(input_shape, 1)))
        _build_part(self.bn2, _build_part(self.conv2, _padded(shape, 1)))
        if self.downsample is not None and not self.downsample.built:
            self.downsample.build(input_shape)

    def call(self, x, training=None):
        out = keras.ops.relu(self.bn1(self.conv1(_pad(x, 1)), training=training))
        out = self.bn2(self.conv2(_pad(out, 1)), training=training)
        shortcut = x if self.downsample is None else self.downsample(x, training=training)
        return keras.ops.relu(out + shortcut)


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetBottleneck(_Parts):
    PARTS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
    expansion = 4

    def _parts(self):
        f, s = self.filters, self.stride
        down = _ResNetDownsample(4 * f, s) if self.has_downsample else None
        return {
            "conv1": _rconv(f, 1),
            "bn1": _rbn(),
            "conv2": _rconv(f, 3, s),
            "bn2": _rbn(),
            "conv3": _rconv(4 * f, 1),
            "bn3": _rbn(),
            "downsample": down,
        }

    def build(self, input_shape):
        shape = _build_part(self.bn1, _build_part(self.conv1, input_shape))
        shape = _build_part(self.bn2, _build_part(self.conv2, _padded(shape, 1)))
        _build_part(self.bn3, _build_part(self.conv3, shape))
        if self.downsample is not None and not self.downsample.built:
            self.downsample.build(input_shape)

    def call(self, x, training=None):
        out = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        out = keras.ops.relu(self.bn2(self.conv2(_pad(out, 1)), training=training))
        out = self.bn3(self.conv3(out), training=training)
        shortcut = x if self.downsample is None else self.downsample(x, training=training)
        return keras.ops.relu(out + shortcut)


RESNET_STAGES = {18: ((2, 2, 2, 2), _ResNetBasicBlock), 50: ((3, 4, 6, 3), _ResNetBottleneck)}
