"""Reference models, defined the same way on every backend (same unit paths), and the
transfer head that turns any backbone into a model with those paths (``attach_head``)."""

from __future__ import annotations

import json
from typing import Any

from xfer._adapter import find_adapter, load_adapter
from xfer._checks import check_integer
from xfer._config import get_backend


def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    *,
    width: int = 8,
    dropout: float = 0.2,
    seed: int = 0,
    backend: str | None = None,
) -> Any:
    """A small BN-CNN: ``base`` (``block1``/``block2`` each conv-BN-ReLU, ``drop``, ``pool``)
    and ``head`` (``drop``, ``dense``), on channels-last images with ``in_channels`` channels.

    BatchNorm uses epsilon 1e-3 and momentum 0.9 (0.1 in PyTorch's convention) everywhere.

    Example:
        >>> import xfer
        >>> model = xfer.models.small_cnn(10, in_channels=1, backend="torch")   # doctest: +SKIP
    """
    for name, value, low in (
        ("num_classes", num_classes, 2),
        ("in_channels", in_channels, 1),
        ("width", width, 1),
    ):
        check_integer(value, f"small_cnn: {name}", low)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"small_cnn: dropout must be in [0, 1), got {dropout!r}.")
    adapter = load_adapter(backend or get_backend())
    model = adapter.small_cnn(num_classes, in_channels, width=width, dropout=dropout, seed=seed)
    _record(
        model,
        "small_cnn",
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        dropout=dropout,
    )
    return model


def attach_head(
    base: Any,
    num_classes: int,
    *,
    dropout: float = 0.2,
    input_shape: tuple[int, int, int] | None = None,
    seed: int = 0,
) -> Any:
    """A new model: ``base`` followed by the usual transfer head (global average pooling,
    dropout, dense), in ``base``'s own framework.

    The model's units are ``base.**`` (``base`` itself, not a copy: its weights are shared)
    and ``head`` with ``head.pool``, ``head.drop`` and ``head.dense``, so the stages and
    selectors written for ``small_cnn`` work on any backbone. ``head.pool`` averages over
    the spatial axes of a feature map and passes a ``(batch, features)`` output through.

    - Keras: a functional model ``inputs -> base(inputs, training=False) -> head`` as in
      the Keras transfer-learning guide, the head a ``Sequential`` named ``"head"``. The
      base layer is renamed ``"base"``: a functional model knows its layers by name, and
      the name is what keeps the paths ``base.**`` through a ``.keras`` round trip.
    - PyTorch: an ``nn.Module`` with ``base`` and ``head`` attributes whose ``forward``
      takes NCHW tensors like any torch model (xfer's own training and prediction convert
      channels-last numpy to NCHW); the head takes the base's NCHW feature map.
    - Flax NNX: an ``nnx.Module`` with ``base`` and ``head`` attributes, on NHWC arrays.

    Args:
        base: the backbone: a ``keras.Model``/layer, a ``torch.nn.Module`` or an
            ``nnx.Module``, e.g. ``keras.applications.MobileNetV2(include_top=False)``.
        num_classes: outputs of the dense layer (logits), an integer >= 2.
        dropout: the head's dropout rate, in [0, 1).
        input_shape: one image, channels-last ``(height, width, channels)``. PyTorch and
            Flax need it to learn the base's output width from one dummy forward pass in
            inference mode (BN statistics and mode flags are left as they were); Keras takes
            it from a functional base's input and needs it only for a subclassed base.
        seed: initialises the dense layer (and seeds the head's dropout in Keras and Flax).

    Returns:
        The new native model; train it with the framework's own loop or
        ``xfer.TransferPipeline``.

    Example:
        >>> import keras, xfer                                  # doctest: +SKIP
        >>> from xfer import select as S
        >>> base = keras.applications.MobileNetV2(
        ...     weights="imagenet", include_top=False, input_shape=(160, 160, 3)
        ... )  # doctest: +SKIP
        >>> model = xfer.models.attach_head(base, 10)            # doctest: +SKIP
        >>> xfer.freeze(model, S.path("base.**"))                # doctest: +SKIP
    """
    check_integer(num_classes, "attach_head: num_classes", 2)  # the number of output classes
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise ValueError(f"attach_head: dropout must be a number in [0, 1), got {dropout!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"attach_head: dropout must be in [0, 1), got {dropout!r}.")
    if input_shape is not None:
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
        if (
            shape is None
            or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        ):
            raise ValueError(
                "attach_head: input_shape must be one channels-last image shape "
                f"(height, width, channels) of positive integers, got {input_shape!r}; "
                "e.g. input_shape=(224, 224, 3), without the batch dimension."
            )
        input_shape = shape
    check_integer(seed, "attach_head: seed")
    adapter = find_adapter(base)
    return adapter.attach_head(
        base, num_classes, dropout=float(dropout), input_shape=input_shape, seed=seed
    )


RESNET_DEPTHS = (18, 50)


def resnet(
    depth: int,
    num_classes: int,
    in_channels: int = 3,
    *,
    width: int = 64,
    seed: int = 0,
    backend: str | None = None,
) -> Any:
    """The classic ResNet (He et al.), defined the same way on every backend, on
    channels-last images with ``in_channels`` channels.

    - ``base.stem``: ``conv`` (7x7, stride 2, no bias) -> ``bn`` -> ReLU -> 3x3 max-pool,
      stride 2, padding 1.
    - ``base.layer1``..``base.layer4``: [2, 2, 2, 2] basic blocks (depth 18: ``conv1``,
      ``bn1``, ``conv2``, ``bn2``) or [3, 4, 6, 3] bottlenecks (depth 50: also ``conv3``,
      ``bn3``, 4x expansion), blocks named ``0``, ``1``, ...; the first block of layers 2-4
      has stride 2 (on the 3x3 conv of a bottleneck), and a block whose output shape differs
      from its input has a ``downsample`` (``conv`` 1x1, ``bn``) on the shortcut.
    - ``base.pool`` (global average) and ``head.dense`` (no dropout).

    Stage widths are ``width``, 2, 4 and 8 x ``width`` (64 gives the usual ResNet). Convs
    have no bias and explicit symmetric padding (never "same" with stride 2, which TF and
    JAX pad asymmetrically), so weights moved with ``xfer.export_weights`` /
    ``xfer.import_weights`` give the same logits in every framework. BatchNorm uses epsilon
    1e-3 and momentum 0.9 (0.1 in PyTorch's convention) everywhere, as in ``small_cnn``.

    Example:
        >>> import xfer
        >>> model = xfer.models.resnet(18, 10, backend="torch")   # doctest: +SKIP
    """
    if isinstance(depth, bool) or depth not in RESNET_DEPTHS:
        raise ValueError(
            f"resnet: depth must be one of {', '.join(map(str, RESNET_DEPTHS))}, got {depth!r}."
        )
    for name, value, low in (
        ("num_classes", num_classes, 2),
        ("in_channels", in_channels, 1),
        ("width", width, 1),
    ):
        check_integer(value, f"resnet: {name}", low)
    check_integer(seed, "resnet: seed")
    adapter = load_adapter(backend or get_backend())
    model = adapter.resnet(depth, num_classes, in_channels, width=width, seed=seed)
    _record(
        model, "resnet", depth=depth, num_classes=num_classes, in_channels=in_channels, width=width
    )
    return model


RESNET50_POOLINGS = (None, "avg", "max")


def resnet50(
    num_classes: int | None = None,
    *,
    include_top: bool | None = None,
    pooling: str | None = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    seed: int = 0,
    backend: str | None = None,
) -> Any:
    """ResNet-50 exactly as ``keras.applications.ResNet50`` builds it ("v1"), with xfer's
    unit paths on every backend, on channels-last images.

    The layout is Keras's: ZeroPadding 3 then a 7x7/2 valid conv, BN, ReLU, ZeroPadding 1
    then a 3x3/2 max pool; [3, 4, 6, 3] bottlenecks whose stride sits on the first 1x1
    conv, a projection shortcut (conv + BN) on the first block of each stage; every conv
    has a bias; BatchNorm epsilon 1.001e-5 and momentum 0.99 (0.01 in PyTorch's
    convention). The paths are those of :func:`resnet`: ``base.stem.conv``/``bn``,
    ``base.layer1``..``base.layer4`` (blocks ``0``, ``1``, ... with ``conv1``/``bn1`` ..
    ``conv3``/``bn3`` and ``downsample.conv``/``downsample.bn``), ``base.pool`` and
    ``head.dense`` (logits: no softmax). ``xfer.convert`` maps it to and from a
    ``keras.applications.ResNet50`` (``conv2_block1_1_conv`` is ``base.layer1.0.conv1``).

    Args:
        num_classes: outputs of ``head.dense``, an integer >= 2; ``None`` (the default)
            builds the backbone alone (``include_top=False``).
        include_top: whether to add ``base.pool`` (average) and ``head.dense``; by default
            whenever ``num_classes`` is given. Without the top the model is the backbone
            itself, units ``stem``, ``layer1``..``layer4`` and, with ``pooling``, ``pool``.
        pooling: without the top, ``None`` (the last feature map), ``"avg"`` or ``"max"``
            (a global pool), as in keras.applications.
        input_shape: ``(height, width, channels)``; height and width may be ``None`` (the
            default is ``(None, None, 3)``). Keras builds its input from it; PyTorch and
            Flax only need the channels.
        seed: initialises the weights.

    Example:
        >>> import xfer
        >>> model = xfer.models.resnet50(10, backend="torch")   # doctest: +SKIP
        >>> backbone = xfer.models.resnet50(pooling="avg", backend="flax")   # doctest: +SKIP
    """
    if include_top is None:
        include_top = num_classes is not None
    if not isinstance(include_top, bool):
        raise ValueError(f"resnet50: include_top must be True or False, got {include_top!r}.")
    if include_top:
        if num_classes is None:
            raise ValueError(
                "resnet50: include_top=True needs num_classes, the outputs of head.dense "
                "(e.g. resnet50(1000)); leave include_top out for the backbone alone."
            )
        check_integer(num_classes, "resnet50: num_classes", 2)
        if pooling is not None:
            raise ValueError(
                f"resnet50: pooling={pooling!r} is for the backbone alone (include_top="
                "False); with the top the features are always average-pooled."
            )
    elif num_classes is not None:
        raise ValueError(
            f"resnet50: num_classes={num_classes!r} with include_top=False: the backbone "
            "has no classifier. Drop num_classes, or keep the top."
        )
    if pooling not in RESNET50_POOLINGS:
        raise ValueError(f"resnet50: pooling must be None, 'avg' or 'max', got {pooling!r}.")
    shape = _image_shape(input_shape)
    check_integer(seed, "resnet50: seed")
    adapter = load_adapter(backend or get_backend())
    model = adapter.resnet50(
        num_classes, shape, include_top=include_top, pooling=pooling, seed=seed
    )
    _record(
        model,
        "resnet50",
        num_classes=num_classes,
        include_top=include_top,
        pooling=pooling,
        input_shape=list(shape),
    )
    return model


def _image_shape(input_shape) -> tuple:
    if input_shape is None:
        return (None, None, 3)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    positive = lambda d: isinstance(d, int) and not isinstance(d, bool) and d >= 1  # noqa: E731
    if (
        len(shape) != 3
        or not positive(shape[2])
        or not all(d is None or positive(d) for d in shape[:2])
    ):
        raise ValueError(
            "resnet50: input_shape must be one channels-last image shape (height, width, "
            f"channels), height and width positive or None, got {input_shape!r}; e.g. "
            "input_shape=(224, 224, 3), without the batch dimension."
        )
    return shape


# The attribute that records which builder made a model, and with what: what
# xfer.convert rebuilds on another backend. A JSON string, which every framework keeps as
# a plain attribute (Keras does not track it, NNX keeps it as static data).
ARCHITECTURE = "xfer_architecture"


def _record(model: Any, builder: str, **arguments: Any) -> None:
    setattr(model, ARCHITECTURE, json.dumps({"builder": builder, **arguments}))
