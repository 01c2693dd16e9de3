"""What ``--model`` names, and the native model it builds for the user's data: a reference
model (``small_cnn``, ``resnet18``...), ``keras:NAME`` (a keras.applications backbone, Keras
only) or ``package.module:function`` (a user factory returning a native model).

A keras.applications backbone and a factory's model get the transfer head of
:func:`xfer.models.attach_head` for the data's classes (``head=True``, their default), so
the presets' stages (``head.**``, ``base.**``) apply; a reference model is built for the
data's classes and channels. Nothing here imports a framework until a model is built.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from xfer import models
from xfer._adapter import find_adapter

# What a factory may take, passed by name when its signature has it.
FACTORY_ARGUMENTS = ("num_classes", "input_shape", "backend", "seed")


def kind(spec: str, reference: dict[str, Callable]) -> str:
    """``"reference"``, ``"keras"`` or ``"factory"``; a ``ValueError`` for anything else.

    Example:
        >>> kind("keras:MobileNetV2", {}), kind("mypkg.nets:build", {})
        ('keras', 'factory')
    """
    if spec in reference:
        return "reference"
    if spec.startswith("keras:") and len(spec) > len("keras:"):
        return "keras"
    module, _, function = spec.partition(":")
    if module and function.isidentifier() and all(p.isidentifier() for p in module.split(".")):
        return "factory"
    raise ValueError(
        f"--model {spec!r}: expected a reference model ({', '.join(reference)}), "
        "keras:NAME (a keras.applications model, e.g. keras:MobileNetV2) or "
        "package.module:function (a factory returning a native model)."
    )


def backends_for(spec: str, reference: dict[str, Callable]) -> tuple[str, ...] | None:
    """The backends that can build ``spec`` from the same weights (``None``: any): a
    keras.applications model needs Keras (on either engine).

    Example:
        >>> backends_for("keras:MobileNetV2", {}), backends_for("small_cnn", {"small_cnn": None})
        (('keras',), None)
    """
    return ("keras",) if kind(spec, reference) == "keras" else None


def build(
    spec: str,
    backend: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    seed: int,
    reference: dict[str, Callable],
    head: bool | None = None,
    weights: str | None = None,
) -> Any:
    """The native model ``spec`` names, on ``backend``, for ``num_classes`` classes of
    channels-last images of ``input_shape``.

    Args:
        head: attach xfer's transfer head to the backbone (default: yes for
            ``keras:``/factory models; a reference model has its own for the classes).
        weights: ``"imagenet"`` for a keras.applications model (downloaded by Keras).

    Raises:
        ValueError: an unknown name, a model for another backend, ``--no-head`` on a
            keras.applications backbone, ``weights`` on anything but ``keras:``.
        ImportError: a factory's module does not import.
        TypeError: a factory that is not callable, or returns no native model.
        ConnectionError: the ImageNet weights could not be downloaded.

    Example:
        >>> from xfer.job import REFERENCE_MODELS
        >>> net = build("small_cnn", "torch", num_classes=3, input_shape=(8, 8, 1), seed=0,
        ...             reference=REFERENCE_MODELS)
        >>> type(net).__name__
        'SmallCNN'
    """
    what = kind(spec, reference)
    if weights is not None and what != "keras":
        raise ValueError(
            f"--weights {weights}: downloaded weights are for keras.applications models "
            f"(--model keras:NAME), not {spec}."
        )
    if what == "reference":
        return reference[spec](num_classes, input_shape[-1], seed, backend)
    if what == "keras":
        if backend != "keras":
            raise ValueError(
                f"--model {spec}: keras.applications models run on Keras: pass --backend keras "
                f"(got {backend})."
            )
        if head is False:
            raise ValueError(
                f"--model {spec} --no-head: the backbone is built without its top, so it needs "
                "xfer's head for the classes: leave out --no-head."
            )
        from xfer.backends.keras.models import application

        base = application(spec.partition(":")[2], input_shape, weights)
    else:
        base = _call_factory(spec, backend, num_classes, input_shape, seed)
    if head is False:
        return base
    return models.attach_head(base, num_classes, dropout=0.0, input_shape=input_shape, seed=seed)


def _call_factory(spec: str, backend: str, num_classes, input_shape, seed) -> Any:
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"--model {spec}: the module {module_name!r} does not import ({error}); is it on "
            "PYTHONPATH (or installed)?"
        ) from error
    factory = getattr(module, name, None)
    if not callable(factory):
        found = "has no" if factory is None else "has a non-callable"
        raise TypeError(
            f"--model {spec}: {module_name} {found} {name!r}; expected a function "
            "returning a native model."
        )
    values = dict(num_classes=num_classes, input_shape=input_shape, backend=backend, seed=seed)
    parameters = inspect.signature(factory).parameters
    model = factory(**{k: v for k, v in values.items() if k in parameters})
    try:
        adapter = find_adapter(model)
    except TypeError as error:
        raise TypeError(
            f"--model {spec} returned a {type(model).__module__}.{type(model).__qualname__}: "
            "expected a native model (keras.Model, torch.nn.Module or flax.nnx.Module)."
        ) from error
    if adapter.name != backend:
        raise ValueError(
            f"--model {spec} returned a {adapter.name} model, for --backend {backend}: pass "
            f"--backend {adapter.name}, or give the factory a `backend` argument to build for each."
        )
    return model
