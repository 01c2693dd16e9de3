"""What the pipeline checks before it changes anything: its constructor's arguments (and
the callbacks they make), and the training data against the model. Kept out of the stage
loop so the loop reads as one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xfer import data as D
from xfer._adapter import OPTIMIZERS, Adapter
from xfer._checks import check_integer, is_number
from xfer.pipeline import cache as C
from xfer.pipeline.callbacks import Callback, NaNRollback, Progress
from xfer.pipeline.checkpointing import Checkpointing
from xfer.pipeline.stage import Stage

DEVICES = ("auto", "cpu", "cuda")
# precision name -> the one the engines take; "bf16"/"fp32" are how the frameworks' docs
# and command lines often write them.
PRECISIONS = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
LOSSES = ("sparse_categorical_crossentropy",)
METRICS = ("accuracy",)


def check_options(
    adapter: Adapter,
    stages: Sequence[Stage],
    *,
    loss: str,
    optimizer: str,
    metrics: Sequence[str],
    batch_size: int,
    weight_decay: float,
    seed: int,
    cache: str,
    cache_memory: int,
    cache_dir: str | os.PathLike | None,
    device: str,
    precision: str,
) -> None:
    """Refuse a ``TransferPipeline`` argument that cannot work, naming it and what it takes.

    Example:
        >>> import xfer
        >>> xfer.TransferPipeline(xfer.models.small_cnn(4, backend="torch"), [xfer.Stage("all")],
        ...                       optimizer="lamb")
        Traceback (most recent call last):
        ...
        ValueError: Unknown optimizer 'lamb': expected one of sgd, momentum, adam, adamw.
    """
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise TypeError("TransferPipeline needs a non-empty list of xfer.Stage.")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"Stage names must be unique, got {names}.")
    for stage in stages:
        stage.validate()
    if loss not in LOSSES:
        raise ValueError(
            f"Unknown loss {loss!r}: expected one of {LOSSES} (on logits, integer labels)."
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}."
        )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}: expected some of {METRICS}.")
    check_integer(batch_size, "batch_size", 1)
    check_integer(seed, "seed (it seeds numpy's generator, which takes no negative)", 0)
    _check_weight_decay(weight_decay, optimizer, stages)
    if cache not in C.CACHE_SETTINGS:
        raise ValueError(
            f"Unknown cache setting {cache!r}: expected one of {', '.join(C.CACHE_SETTINGS)} "
            "('auto' caches a frozen prefix's features when a stage allows it)."
        )
    if isinstance(cache_memory, bool) or not isinstance(cache_memory, int) or cache_memory < 0:
        raise ValueError(
            f"cache_memory must be a number of bytes >= 0, got {cache_memory!r} "
            "(0 keeps every cached feature on disk)."
        )
    if device not in DEVICES:
        raise ValueError(
            f"Unknown device {device!r}: expected one of {', '.join(DEVICES)} ('auto' "
            "takes CUDA when the framework sees a GPU, else the CPU)."
        )
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)} "
            "(bf16: mixed precision, the step computes in bfloat16, weights stay float32)."
        )
    if cache_dir is not None and not os.path.isdir(cache_dir):
        raise FileNotFoundError(
            f"cache_dir {os.fspath(cache_dir)!r} is not a directory. Create it first, or "
            "leave cache_dir=None for the system's temporary directory."
        )


def _check_weight_decay(weight_decay: object, optimizer: str, stages: Sequence[Stage]) -> None:
    if not (is_number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    if weight_decay == 0:
        return
    # Only AdamW decays weights here (decoupled, as torch/optax/Keras AdamW do); with the
    # others the value would change nothing at all.
    ignoring = [s.name for s in stages if (s.optimizer or optimizer) != "adamw"]
    if ignoring:
        raise ValueError(
            f"weight_decay={weight_decay} is applied only by optimizer 'adamw', but stages "
            f"{ignoring} use {sorted({s.optimizer or optimizer for s in stages} - {'adamw'})}, "
            "where it would be silently ignored. Use optimizer='adamw' (for the pipeline or "
            "those stages), or weight_decay=0."
        )


def check_data(
    adapter: Adapter, model: Any, train: D.Data, val: D.Data | None, *, batch_size: int = 1
) -> None:
    """Refuse training (and validation) data that do not fit the model's inputs and outputs.

    The model's output shape comes from a probe on the first ``batch_size`` training
    images: the pipeline passes its batch size, so that where the probe runs the model (an
    eager PyTorch forward) it has the shape of the training steps, and fills no shape-keyed
    cache of the framework (oneDNN's primitives, about 1 MiB a shape; cuDNN's plans) that the
    steps would not fill anyway.

    Example:
        >>> import numpy as np, xfer
        >>> from xfer._adapter import find_adapter
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> x = np.zeros((2, 8, 8, 3), "float32")
        >>> check_data(find_adapter(model), model, (x, np.array([0, 4])), None)
        Traceback (most recent call last):
        ...
        ValueError: train: labels must lie in [0, 4) ...
    """
    num_classes, in_channels = _model_shape(adapter, model, train, batch_size)
    D.check(train, name="train", num_classes=num_classes, in_channels=in_channels)
    if val is not None:
        D.check(val, name="val", num_classes=num_classes, in_channels=in_channels)


def _model_shape(adapter: Adapter, model: Any, train: D.Data, batch_size: int) -> tuple[int, int]:
    """(number of classes, input channels), from the model's output on the first images."""
    x = D.first_images(train, name="train")
    if x.ndim != 4:
        raise ValueError(
            f"train: images must be (batch, height, width, channels), got shape {x.shape}."
        )
    try:
        logits = adapter.output_shape(model, np.asarray(x[:batch_size], "float32"))
    except Exception as error:
        raise ValueError(
            f"train: the model does not accept images of shape {x.shape[1:]}; they must be "
            f"channels-last (height, width, channels). The model said: {error}"
        ) from error
    return int(logits[-1]), int(x.shape[-1])


def with_built_ins(
    callbacks: Sequence[Callback],
    *,
    progress: Callable[[str], None] | Callback | None,
    checkpoint_dir: str | None,
) -> list[Callback]:
    """The callbacks of a ``TransferPipeline``: the built-ins its arguments switch on
    (:class:`Progress`, :class:`NaNRollback` unless ``callbacks`` has one,
    :class:`Checkpointing`), then ``callbacks``.

    Example:
        >>> [type(c).__name__ for c in with_built_ins([], progress=print, checkpoint_dir=None)]
        ['Progress', 'NaNRollback']
    """
    callbacks = list(callbacks)
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be xfer.pipeline.Callback instances, got {callback!r}: "
                "subclass Callback and override the hooks you need."
            )
    built_in: list[Callback] = []
    if progress is not None:
        built_in.append(progress if isinstance(progress, Callback) else Progress(progress))
    if not any(isinstance(c, NaNRollback) for c in callbacks):
        built_in.append(NaNRollback())
    if checkpoint_dir is not None:
        built_in.append(Checkpointing(checkpoint_dir))
    if sum(isinstance(c, Checkpointing) for c in built_in + callbacks) > 1:
        raise ValueError(
            "A pipeline writes one checkpoint: give checkpoint_dir= or a Checkpointing in "
            "callbacks, not both (nor two Checkpointing)."
        )
    return built_in + callbacks
