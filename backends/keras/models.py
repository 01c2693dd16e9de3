"""Keras 3 reference models and new heads, built as the Keras transfer-learning guide
builds them: a functional ``base`` called with ``training=False`` inside a functional
model (the nesting whose ``training=False`` an outer ``fit()`` overrides, DESIGN §1.3);
the ``Models`` members.

xfer's own layers keep their sublayers in their config, so that the sublayers'
``trainable`` flags (BN "frozen" included) survive ``.keras``; they are registered under
the package ``xfer`` with their names of the first release (``xfer>_Block``...), which
saved files refer to.
"""

from __future__ import annotations

import importlib
import socket

import keras
import numpy as np

from xfer.backends._common import RESNET50_WIDTH, RESNET_STYLES, resnet_layout

L = keras.layers

# Seconds a socket of a --weights imagenet download may wait: without a network, fail at
# once instead of hanging (Keras's download sets no timeout).
DOWNLOAD_TIMEOUT = 20


def application(name: str, input_shape: tuple[int, int, int], weights: str | None = None):
    """``keras.applications.<name>`` without its top (``include_top=False``) on images of
    ``input_shape``: the backbone of ``xfer run --model keras:NAME`` (``weights=None``:
    random weights; ``"imagenet"``: downloaded by Keras, which needs the network once).

    Called on Keras only (``xfer.job`` imports this module on the Keras backend): not a
    ``Models`` member, keras.applications has no counterpart in the other frameworks.
    """
    factory = getattr(keras.applications, name, None)
    if not name[:1].isupper() or not callable(factory):
        raise ValueError(
            f"keras:{name}: keras.applications has no model {name!r}; e.g. keras:MobileNetV2, "
            "keras:ResNet50, keras:EfficientNetB0 (the names are case-sensitive)."
        )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return factory(weights=weights, include_top=False, input_shape=tuple(input_shape))
    except ValueError as error:
        raise ValueError(
            f"keras:{name} does not take images of shape {tuple(input_shape)}: "
            f"{' '.join(str(error).split())} (see --image-size and --color)"
        ) from error
    except Exception as error:  # Keras wraps a failed download in a bare Exception
        raise ConnectionError(
            f"keras:{name} --weights {weights}: the weights could not be downloaded "
            f"({' '.join(str(error).split())}). They need the network once (Keras keeps them "
            "in ~/.keras/models); leave out --weights to start from random weights."
        ) from error
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_preprocessing(name: str):
    """What ``keras.applications.<name>``'s ImageNet weights expect of [0, 1] images: the
    model module's own ``preprocess_input`` on 0-255 pixels (``[-1, 1]`` for MobileNetV2,
    BGR minus the ImageNet mean for ResNet50, unchanged for EfficientNet, which rescales
    inside the model). Returns the numpy function and how the report states it."""
    module = importlib.import_module(getattr(keras.applications, name).__module__)
    public = module.__name__.replace("keras.src.", "keras.")

    def preprocess(x01):
        return np.asarray(module.preprocess_input(np.asarray(x01, "float32") * 255.0), "float32")

    return preprocess, f"{public}.preprocess_input on 0-255 pixels (the ImageNet weights' own)"


@keras.saving.register_keras_serializable(package="xfer")
class _Block(keras.layers.Layer):
    """conv -> BN -> ReLU for ``small_cnn``."""

    FOLDS = (("conv", "bn"),)  # see _Parts.FOLDS

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


# --- ResNet (xfer.models.resnet) -----------------------------------------------------------
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
    # The (conv, bn) parts whose call is bn(conv(x)) with conv's output read nowhere else:
    # what xfer.fold_bn folds (backends/keras/folding.py), Keras cannot see inside a call.
    FOLDS: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        filters: int,
        stride: int = 1,
        downsample: bool = False,
        style: str = "classic",
        **kwargs,
    ):
        configs = {name: kwargs.pop(name, None) for name in self.PARTS}
        if isinstance(downsample, dict):  # get_config's "downsample" holds the part's config
            configs["downsample"], downsample = downsample, True
        super().__init__(**kwargs)
        self.filters, self.stride, self.has_downsample = filters, stride, downsample
        self.style = style  # a key of RESNET_STYLES: files saved before it are "classic"
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
            "style": self.style,
            **parts,
        }


def _rconv(style: str, filters: int, kernel: int, stride: int = 1):
    bias = RESNET_STYLES[style].conv_bias
    return L.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=bias)


def _rbn(style: str):
    s = RESNET_STYLES[style]
    return L.BatchNormalization(epsilon=s.epsilon, momentum=s.momentum)


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetStem(_Parts):
    PARTS = ("conv", "bn")
    FOLDS = (("conv", "bn"),)

    def _parts(self):
        return {"conv": _rconv(self.style, self.filters, 7, 2), "bn": _rbn(self.style)}

    def build(self, input_shape):
        _build_part(self.bn, _build_part(self.conv, _padded(input_shape, 3)))

    def call(self, x, training=None):
        x = keras.ops.relu(self.bn(self.conv(_pad(x, 3)), training=training))
        # Zero padding is -inf padding here: the input is a ReLU output.
        return keras.ops.max_pool(_pad(x, 1), 3, 2, padding="valid")


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetDownsample(_Parts):
    PARTS = ("conv", "bn")
    FOLDS = (("conv", "bn"),)

    def _parts(self):
        return {"conv": _rconv(self.style, self.filters, 1, self.stride), "bn": _rbn(self.style)}

    def build(self, input_shape):
        _build_part(self.bn, _build_part(self.conv, input_shape))

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)


@keras.saving.register_keras_serializable(package="xfer")
class _ResNetBasicBlock(_Parts):
    PARTS = ("conv1", "bn1", "conv2", "bn2", "downsample")
    FOLDS = (("conv1", "bn1"), ("conv2", "bn2"))

    def _parts(self):
        f, s, style = self.filters, self.stride, self.style
        down = _ResNetDownsample(f, s, style=style) if self.has_downsample else None
        return {
            "conv1": _rconv(style, f, 3, s),
            "bn1": _rbn(style),
            "conv2": _rconv(style, f, 3),
            "bn2": _rbn(style),
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
    FOLDS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def _parts(self):
        f, s, style = self.filters, self.stride, self.style
        down = _ResNetDownsample(4 * f, s, style=style) if self.has_downsample else None
        # keras.applications ("v1") strides the first 1x1 conv, torchvision the 3x3.
        first, middle = (s, 1) if RESNET_STYLES[style].stride_first else (1, s)
        return {
            "conv1": _rconv(style, f, 1, first),
            "bn1": _rbn(style),
            "conv2": _rconv(style, f, 3, middle),
            "bn2": _rbn(style),
            "conv3": _rconv(style, 4 * f, 1),
            "bn3": _rbn(style),
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


_BLOCKS = {"basic": _ResNetBasicBlock, "bottleneck": _ResNetBottleneck}  # BlockSpec.kind


# --- Models members --------------------------------------------------------------------------


def small_cnn(num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int):
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


_GLOBAL_POOLS = {"avg": L.GlobalAveragePooling2D, "max": L.GlobalMaxPooling2D}


def _resnet_base(depth, input_shape, width, style, pooling, name):
    """A functional model: stem, layer1..layer4 and (unless ``pooling`` is None) ``pool``."""
    stride_first = RESNET_STYLES[style].stride_first
    stages, features = resnet_layout(depth, width, stride_first)
    inputs = keras.Input(input_shape)
    x = _ResNetStem(width, style=style, name="stem")(inputs)
    for i, blocks in enumerate(stages):
        # Blocks named "0", "1", ...: a Sequential's units are named by layer name.
        layers = [
            _BLOCKS[b.kind](b.planes, b.stride, b.downsample, style=style, name=str(j))
            for j, b in enumerate(blocks)
        ]
        x = keras.Sequential(layers, name=f"layer{i + 1}")(x)
    if pooling:
        x = _GLOBAL_POOLS[pooling](name="pool")(x)
    return keras.Model(inputs, x, name=name), features


def _with_head(base, input_shape, features, num_classes, name):
    head = keras.Sequential(
        [keras.Input((features,)), L.Dense(num_classes, name="dense")], name="head"
    )
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, head(base(inputs, training=False)), name=name)


def resnet(depth: int, num_classes: int, in_channels: int, *, width: int, seed: int):
    keras.utils.set_random_seed(seed)
    shape = (None, None, in_channels)
    base, features = _resnet_base(depth, shape, width, "classic", "avg", "base")
    return _with_head(base, shape, features, num_classes, f"resnet{depth}")


def resnet50(num_classes, input_shape, *, include_top: bool, pooling, seed: int):
    keras.utils.set_random_seed(seed)
    if not include_top:
        return _resnet_base(50, input_shape, RESNET50_WIDTH, "keras_v1", pooling, "resnet50")[0]
    base, features = _resnet_base(50, input_shape, RESNET50_WIDTH, "keras_v1", "avg", "base")
    return _with_head(base, input_shape, features, num_classes, "resnet50")


def keras_applications_resnet50(num_classes, input_shape, *, include_top, pooling):
    # Logits, as xfer's models give: the softmax of keras.applications' default is left off.
    return keras.applications.ResNet50(
        include_top=include_top,
        weights=None,
        input_shape=input_shape,
        pooling=None if include_top else pooling,
        classes=num_classes if include_top else 1000,
        classifier_activation=None,
    )


# Layers a keras.applications ResNet50 (v1) has, and layers of its relatives it has not:
# ResNet50V2 (pre-activation, "post_bn"), ResNet101/152 (more blocks in conv4).
_APPLICATION_LAYERS = ("conv1_pad", "conv1_conv", "pool1_pool", "conv4_block6_3_conv")
_RELATIVES_LAYERS = ("post_bn", "conv4_block7_1_conv", "conv5_block4_1_conv")


def recognise(model) -> dict | None:
    if not isinstance(model, keras.Model) or isinstance(model, keras.Sequential):
        return None
    names = {layer.name for layer in model.layers}
    if not all(n in names for n in _APPLICATION_LAYERS) or any(
        n in names for n in _RELATIVES_LAYERS
    ):
        return None
    top = model.get_layer("predictions") if "predictions" in names else None
    pooling = "avg" if "avg_pool" in names else "max" if "max_pool" in names else None
    activation = None
    if top is not None:
        activation = getattr(top.activation, "__name__", str(top.activation))
    return {
        "builder": "resnet50",
        "names": "keras.applications",
        "num_classes": top.units if top is not None else None,
        "include_top": top is not None,
        "pooling": None if top is not None else pooling,
        "input_shape": tuple(model.input_shape[1:]),
        "classifier_activation": activation,
    }


def attach_head(base, num_classes, *, dropout, input_shape, seed):
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
