"""One architecture, its weights in another framework: ``xfer.convert``.

A model xfer built records which builder made it and with what arguments
(``xfer.models.ARCHITECTURE``); a model xfer did not build but knows
(``keras.applications.ResNet50``) is recognised by its backend. ``convert`` builds the same
architecture on the target backend and moves every parameter and BN moving statistic
through the neutral weights (``xfer.export_weights`` / ``xfer.import_weights``), renaming
Keras's layer names to xfer's paths and back where one side is keras.applications. The
values are copied, never recomputed: BN statistics arrive bit for bit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from xfer import models
from xfer._adapter import find_adapter, load_adapter
from xfer._config import validate_backend
from xfer.weights import export_weights, import_weights

SUPPORTED = (
    "xfer.models.small_cnn, xfer.models.resnet and xfer.models.resnet50 (built on any "
    "backend), and keras.applications.ResNet50 (weights=None, 'imagenet' or a local file)"
)
XFER, APPLICATIONS = "xfer", "keras.applications"  # how a model's layers are named
_BUILDERS = {"small_cnn": models.small_cnn, "resnet": models.resnet, "resnet50": models.resnet50}


def convert(
    model: Any,
    backend: str,
    *,
    keras_applications: bool = False,
    input_shape: tuple[int, int, int] | None = None,
) -> Any:
    """The same architecture as ``model``, with the same weights (parameters and BN moving
    statistics, copied exactly), as a native model of ``backend``.

    ``model`` is one of xfer's reference models (``xfer.models.small_cnn``, ``resnet``,
    ``resnet50``) on any backend, or a ``keras.applications.ResNet50`` (``include_top``
    True or False, any ``pooling``; its ImageNet weights too, loaded by Keras from a local
    file with ``weights=path``), which becomes ``xfer.models.resnet50``: Keras's
    ``conv2_block1_1_conv`` is xfer's ``base.layer1.0.conv1``, ``conv2_block1_0_conv``
    its ``downsample.conv``, ``predictions`` its ``head.dense``. The converted model gives
    logits: a keras.applications classifier's softmax is not carried over.

    Args:
        model: the native model to convert.
        backend: ``"torch"``, ``"keras"`` or ``"flax"`` (or ``"jax"``, as elsewhere).
        keras_applications: build a ``keras.applications.ResNet50`` (``weights=None``, then
            these weights; ``classifier_activation=None``) instead of
            ``xfer.models.resnet50``; Keras and a ResNet-50 only.
        input_shape: the Keras input, ``(height, width, channels)``, when it should differ
            from the source's (a keras.applications model with its top needs a fixed one).

    Returns:
        The new native model, in training mode as a freshly built one is; the source is
        left as it was.

    Raises:
        TypeError: ``model`` is no architecture convert knows (the message names its type
            and what is supported).
        ValueError: an unknown backend, or ``keras_applications`` for something else than
            a ResNet-50 on Keras.

    Example:
        >>> import keras, xfer                                           # doctest: +SKIP
        >>> source = keras.applications.ResNet50(weights="resnet50.h5")  # doctest: +SKIP
        >>> model = xfer.convert(source, "torch")                        # doctest: +SKIP
        >>> back = xfer.convert(model, "keras", keras_applications=True) # doctest: +SKIP
    """
    backend = validate_backend(backend)
    source = architecture(model)
    builder = source.pop("builder")
    naming = source.pop("names")
    source.pop("classifier_activation", None)
    if input_shape is not None:
        if builder != "resnet50":
            raise ValueError(
                f"convert: input_shape is for a ResNet-50; this model is xfer.models.{builder}, "
                "which takes any image size."
            )
        source["input_shape"] = input_shape
    if keras_applications and (builder != "resnet50" or not backend.startswith("keras")):
        raise ValueError(
            "convert: keras_applications=True builds a keras.applications.ResNet50, for a "
            f"ResNet-50 on backend='keras'; got xfer.models.{builder} to {backend!r}. "
            "Leave it out for xfer's own model on that backend."
        )
    if keras_applications:
        shape = models._image_shape(source.get("input_shape"))
        if source["include_top"] and None in shape[:2]:
            raise ValueError(
                f"convert: a keras.applications.ResNet50 with its top needs a fixed image "
                f"size, and this model takes any (input_shape={shape}). Pass "
                "input_shape=(height, width, channels), e.g. input_shape=(224, 224, 3)."
            )
        target = load_adapter(backend).keras_applications_resnet50(
            source["num_classes"],
            shape,
            include_top=source["include_top"],
            pooling=source["pooling"],
        )
    else:
        target = _BUILDERS[builder](**source, backend=backend)
    weights = export_weights(model)
    if naming == APPLICATIONS:
        weights = {xfer_key(k, source["include_top"]): v for k, v in weights.items()}
    if keras_applications:
        weights = {applications_key(k): v for k, v in weights.items()}
    import_weights(target, weights)
    return target


def architecture(model: Any) -> dict[str, Any]:
    """What ``model`` is, for :func:`convert`: ``{"builder": name in xfer.models, "names":
    "xfer" or "keras.applications", **the builder's arguments}``.

    Raises ``TypeError`` naming the model's type and what convert supports.

    Example:
        >>> import xfer
        >>> architecture(xfer.models.small_cnn(3, backend="torch"))["builder"]  # doctest: +SKIP
        'small_cnn'
    """
    adapter = find_adapter(model)
    recorded = getattr(model, models.ARCHITECTURE, None)
    if isinstance(recorded, str):
        found = {**json.loads(recorded), "names": XFER}
        if isinstance(found.get("input_shape"), list):
            found["input_shape"] = tuple(found["input_shape"])
        return found
    found = adapter.recognise(model)
    if found is None:
        raise TypeError(
            f"convert: xfer cannot convert a {type(model).__module__}."
            f"{type(model).__qualname__} ({adapter.name}): it converts {SUPPORTED}. "
            "A Keras model loaded from a .keras file has lost xfer's record of its builder: "
            "build it again with xfer.models and load its weights (xfer.load_weights)."
        )
    return dict(found)


# keras.applications.ResNet50's layer names <-> xfer.models.resnet50's unit paths.
_STEM = re.compile(r"conv1_(conv|bn)")
_BLOCK = re.compile(r"conv([2-5])_block(\d+)_(\d)_(conv|bn)")
_XFER_STEM = re.compile(r"(?:base\.)?stem\.(conv|bn)")
_XFER_BLOCK = re.compile(r"(?:base\.)?layer([1-4])\.(\d+)\.(?:(conv|bn)(\d)|downsample\.(conv|bn))")


def xfer_key(key: str, include_top: bool) -> str:
    """The xfer.models.resnet50 name of a keras.applications.ResNet50 weight; the
    backbone's paths (``include_top=False``) have no ``base.`` prefix.

    Example:
        >>> xfer_key("conv2_block1_1_conv.kernel", True), xfer_key("conv3_block1_0_bn.beta", False)
        ('base.layer1.0.conv1.kernel', 'layer2.0.downsample.bn.beta')
        >>> xfer_key("predictions.bias", True), xfer_key("conv1_bn.gamma", True)
        ('head.dense.bias', 'base.stem.bn.gamma')
    """
    layer, _, role = key.rpartition(".")
    base = "base." if include_top else ""
    if layer == "predictions":
        return f"head.dense.{role}"
    if m := _STEM.fullmatch(layer):
        return f"{base}stem.{m[1]}.{role}"
    if m := _BLOCK.fullmatch(layer):
        stage, block, index, kind = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
        unit = f"downsample.{kind}" if index == "0" else f"{kind}{index}"
        return f"{base}layer{stage}.{block}.{unit}.{role}"
    return key  # not a ResNet-50 layer: import_weights names it as unexpected


def applications_key(key: str) -> str:
    """The keras.applications.ResNet50 name of an xfer.models.resnet50 weight.

    Example:
        >>> applications_key("base.layer1.0.conv1.kernel"), applications_key("stem.bn.beta")
        ('conv2_block1_1_conv.kernel', 'conv1_bn.beta')
        >>> applications_key("layer4.2.downsample.bn.gamma"), applications_key("head.dense.bias")
        ('conv5_block3_0_bn.gamma', 'predictions.bias')
    """
    unit, _, role = key.rpartition(".")
    if unit == "head.dense":
        return f"predictions.{role}"
    if m := _XFER_STEM.fullmatch(unit):
        return f"conv1_{m[1]}.{role}"
    if m := _XFER_BLOCK.fullmatch(unit):
        stage, block = int(m[1]) + 1, int(m[2]) + 1
        kind, index = (m[3], m[4]) if m[3] else (m[5], "0")
        return f"conv{stage}_block{block}_{index}_{kind}.{role}"
    return key
