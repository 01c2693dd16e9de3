"""The main job as a library: pretrain on the source digits, transfer to the shifted target
digits, on one backend (:func:`run`, what ``xfer run`` prints) or the same transfer on several
(:func:`transfer_on_backends`, what ``xfer compare`` checks with :mod:`xfer.compare`).

The pretrained source model of the default task ships as *neutral* weights
(``xfer/_data/``), so every backend on every machine transfers from the very same numbers
(that is what makes ``xfer compare`` a comparison, and the README's table reproducible).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xfer import _config, model_spec, models
from xfer import select as S
from xfer._adapter import load_adapter
from xfer.data import digits
from xfer.data import images as images_data
from xfer.export import check_export_path, export_onnx
from xfer.pipeline import History, Stage, TransferPipeline, evaluate, presets
from xfer.weights import export_weights, import_weights, load_weights

WIDTH = 16
# The source model of the default task (seed 0), pretrained once with `xfer pretrain
# --backend torch --seed 0` and shipped: each framework's Adam puts epsilon elsewhere, so
# pretraining on another backend (or another machine's kernels) starts the transfer from
# different weights, and `xfer run` would print different numbers on each machine.
SHIPPED_SEED = 0
SHIPPED = f"digits-source-w{WIDTH}-seed{SHIPPED_SEED}.safetensors"
PRETRAIN_EPOCHS = 8


def shipped_path() -> Path:
    """The neutral weights of the source model that ship inside the package (seed 0).

    Example:
        >>> shipped_path().name
        'digits-source-w16-seed0.safetensors'
    """
    return Path(str(importlib.resources.files("xfer").joinpath("_data", SHIPPED)))


# The models `xfer compare --model` offers. "resnet18" is xfer.models.resnet(18) narrow
# (width 4: 44,545 parameters) on the digits upsampled to 16x16 (nearest neighbour), so that
# every stride-2 layer halves an even size down to 1x1 (where the frameworks' padding
# conventions would differ, as tests/parity.py checks); it starts from freshly initialised
# seeded weights (no pretraining: nothing of it is cached or shipped), built once on the first
# backend and handed to the others as neutral weights like the small CNN's.
RESNET_WIDTH = 4
RESNET_UPSAMPLE = 2
# The reference models by name: (num_classes, in_channels, seed, backend) -> native model.
# One line adds one (its units base.** and head.**, as the presets expect).
REFERENCE_MODELS: dict[str, Callable[[int, int, int, str], Any]] = {
    # No Dropout: each framework draws its own masks, and `xfer compare` must see the same
    # numbers on every backend.
    "small_cnn": lambda classes, channels, seed, backend: models.small_cnn(
        classes, channels, width=WIDTH, dropout=0.0, seed=seed, backend=backend
    ),
    "resnet18": lambda classes, channels, seed, backend: models.resnet(
        18, classes, channels, width=RESNET_WIDTH, seed=seed, backend=backend
    ),
    # xfer.models.resnet50 (the keras.applications v1 layout), full width, as resnet18.
    "resnet50": lambda classes, channels, seed, backend: models.resnet50(
        classes, input_shape=(None, None, channels), seed=seed, backend=backend
    ),
}
MODELS = tuple(REFERENCE_MODELS)


def build_model(backend: str, seed: int, model: str = "small_cnn") -> Any:
    """A fresh ``model`` (one of :data:`MODELS`) for the digits task on ``backend``, its
    weights initialised from ``seed``.

    Example:
        >>> net = build_model("torch", seed=0)
        >>> export_weights(net)["base.block1.conv.kernel"].shape
        (3, 3, 1, 16)
    """
    if model not in REFERENCE_MODELS:
        raise ValueError(f"Unknown model {model!r}: expected one of {', '.join(MODELS)}.")
    task = digits.TransferTask
    return REFERENCE_MODELS[model](task.num_classes, task.in_channels, seed, backend)


def pretrain(
    backend: str,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    epochs: int = PRETRAIN_EPOCHS,
) -> Any:
    """Pretrain the source model on the source digits (0-4) on ``backend``; return the model.

    The recipe the shipped weights were made with (``epochs=8``): Adam, lr 3e-3, batch 32,
    BN trained, data order from ``seed``. Takes seconds on a CPU.

    Example:
        >>> model = pretrain("torch", seed=1, epochs=1)
        >>> round(source_accuracy("torch", model, seed=1), 1) > 0.2   # better than chance
        True
    """
    model = build_model(backend, seed)
    task = digits.transfer_task(seed=seed)
    stage = Stage("pretrain", train=S.all(), bn="train", lr=3e-3, epochs=epochs)
    TransferPipeline(
        model, [stage], optimizer="adam", batch_size=32, seed=seed, progress=progress
    ).fit(task.source_train)
    return model


def source_accuracy(backend: str, model: Any, seed: int = 0) -> float:
    """Accuracy of the source model on the source validation digits.

    Example:
        >>> model = build_model("torch", seed=0)
        >>> load_weights(model, shipped_path())
        >>> round(source_accuracy("torch", model), 3)
        0.978
    """
    _, accuracy = evaluate(load_adapter(backend), model, digits.transfer_task(seed=seed).source_val)
    return accuracy


def _images_for(model: str, data: tuple) -> tuple:
    """The task's (x, y) at the input size ``model`` expects (see MODELS)."""
    if model not in ("resnet18", "resnet50"):
        return data
    x, y = data
    return np.repeat(np.repeat(x, RESNET_UPSAMPLE, axis=1), RESNET_UPSAMPLE, axis=2), y


def pretrained(
    backend: str,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
    weights: str | os.PathLike | None = None,
) -> tuple[dict, str]:
    """Neutral weights of the source model, and where they came from: ``"file"`` (the
    ``weights`` file given), ``"shipped"`` (seed 0: the package's own file) or
    ``"pretrained"`` (any other seed: pretrained now, ``quick``: for one epoch).

    Nothing is cached: pretraining takes seconds, and a cache keyed by less than everything
    that determines the weights is how machines came to print different numbers.

    Raises:
        FileNotFoundError: ``weights`` names no file.
        ValueError: ``weights`` is not xfer neutral weights of the source model.

    Example:
        >>> weights, origin = pretrained("torch")
        >>> origin, weights["base.block1.conv.kernel"].shape
        ('shipped', (3, 3, 1, 16))
    """
    if weights is None and seed == SHIPPED_SEED:
        weights, origin = shipped_path(), "shipped"
    elif weights is not None:
        origin = "file"
    if weights is None:
        model = pretrain(backend, seed, progress, epochs=1 if quick else PRETRAIN_EPOCHS)
        return export_weights(model), "pretrained"
    model = build_model(backend, seed)
    load_weights(model, weights)
    return export_weights(model), origin


def zero_head(start: dict) -> dict:
    """Zeros for everything of ``start`` outside ``base.``: the new task's head starts at
    zero, as the ViT paper's fine-tuning heads do.

    Why not a random head: each framework initialises a new layer with its own generator
    and rule, so a backend's own head starts the transfer from other numbers on each
    backend; and a random head drawn once for all (Glorot-uniform, with numpy) gave a loss
    spike at fine-tuning large enough that float32 rounding, 1e-7 apart on the four
    backends, grew to 2e-4 by the last epoch (`xfer compare` caught it). A zero head is the
    same everywhere by construction, and the head's first steps already break the symmetry
    (each class's column gets its own gradient).

    Example:
        >>> head = zero_head({"base.conv.kernel": np.ones((3, 3)), "head.dense.kernel": np.ones((16, 5))})
        >>> sorted(head), float(abs(head["head.dense.kernel"]).max())
        (['head.dense.kernel'], 0.0)
    """
    return {k: np.zeros_like(v) for k, v in start.items() if not k.startswith("base.")}


def stages_for(
    preset: str, model: Any, bn: str | None, quick: bool = False, recalibrate: str | None = None
) -> list[Stage]:
    """The preset's stages for the embedded task, with ``bn`` (if given) in every stage;
    ``quick``: at most two epochs per stage (a smoke run); ``recalibrate``: ``"after"``,
    the last stage re-estimates the BN statistics on the training images before its last
    evaluation; ``"before"``, the first stage does before it trains (``Stage.recalibrate``)."""
    tuned = {
        # Fine-tuning at 1e-4: at 5e-4 the first fine-tuning epoch's loss spiked to ~10
        # and float32 rounding grew past compare's tolerance on some seeds and policies.
        "keras_guide": dict(lr=0.05, epochs=20, finetune_lr=1e-4, finetune_epochs=20),
        "fine_tune": dict(lr=0.05, freeze_epochs=10, epochs=20),
        "gradual": dict(lr=0.01, epochs_per_stage=15),
        "discriminative": dict(lr=0.01, epochs=30),
    }
    stages = presets.preset(preset, model, **tuned.get(preset, {}))
    changes = {"bn": bn} if bn else {}
    stages = [
        dataclasses.replace(s, **changes, **({"epochs": min(s.epochs, 2)} if quick else {}))
        for s in stages
    ]
    if recalibrate:
        at = -1 if recalibrate == "after" else 0
        stages[at] = dataclasses.replace(stages[at], recalibrate=recalibrate)
    return stages


@dataclasses.dataclass
class RunResult:
    backend: str
    preset: str
    bn: str | None
    source_weights: str  # "shipped", "file" or "pretrained": see pretrained()
    weights_path: str | None  # the file the source weights were loaded from
    source_accuracy: float  # the pretrained model on its own (source) validation data
    history: History
    recalibrate: str | None = None  # "after" the last stage or "before" the first: see stages_for
    export: str | None = None  # the ONNX file written (xfer run --export)


def start_weights(
    backend: str, pretrained_weights: dict | None, seed: int = 0, model: str = "small_cnn"
) -> dict:
    """The transfer's starting point as neutral weights: the pretrained base and a freshly
    initialised head (the target classes are new), built once so that every backend starts
    from the same numbers. ``pretrained_weights=None``: everything freshly initialised
    (seeded), as for ``model="resnet18"``.

    Example:
        >>> weights, _ = pretrained("torch")
        >>> start = start_weights("torch", weights)
        >>> float(abs(start["head.dense.kernel"]).max())   # the head starts at zero
        0.0
        >>> fresh = start_weights("torch", None, model="resnet18")
    """
    start = export_weights(build_model(backend, seed + 1, model))
    if pretrained_weights is not None:
        start.update({k: v for k, v in pretrained_weights.items() if k.startswith("base.")})
        start.update(zero_head(start))  # not the backend's own initialiser
    return start


def transfer_pipeline(
    backend: str,
    *,
    preset: str = "keras_guide",
    bn: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
    checkpoint_dir: str | None = None,
    cache: str = "auto",
    device: str = "auto",
    model: str = "small_cnn",
    data: dict | None = None,
    head: bool | None = None,
    recalibrate: str | None = None,
    devices: int | None = None,
    precision: str = "float32",
) -> tuple[TransferPipeline, tuple, tuple]:
    """The pipeline of the transfer on the target task (its model freshly built on
    ``backend``, one of :data:`MODELS`), with the training and validation data.
    ``data``: the user's images instead (the options of :func:`load_data`), ``model``
    then anything :mod:`xfer.model_spec` builds, with ``head`` (random weights: the start
    is imported after). ``recalibrate``: see :func:`stages_for`. ``devices``: data-parallel
    over that many devices of this process (``TransferPipeline(devices=...)``);
    ``precision``: ``"bf16"`` for mixed precision (``TransferPipeline(precision=...)``).

    Example:
        >>> pipe, train, val = transfer_pipeline("torch", bn="adapt")
        >>> pipe.check(train, val)   # refuses, before any training, what would fail
        >>> [(s.name, s.bn) for s in pipe.stages], train[0].shape
        ([('head', 'adapt'), ('finetune', 'adapt')], (100, 8, 8, 1))
    """
    if data is None:
        task = digits.transfer_task(seed=seed)
        net = build_model(backend, seed, model)
        train, val = _images_for(model, task.target_train), _images_for(model, task.target_val)
    else:
        images = load_data(data, seed)
        net = data_model(backend, model, images, seed=seed, head=head)
        train, val = images.train, images.val
    options = dict(
        checkpoint_dir=checkpoint_dir, cache=cache, device=device, devices=devices,
        precision=precision,
    )  # fmt: skip
    pipe = pipeline_for(net, preset, bn, seed, quick, progress, recalibrate=recalibrate, **options)
    return pipe, train, val


def pipeline_for(
    net, preset, bn, seed, quick, progress, *, recalibrate: str | None = None, **options
) -> TransferPipeline:
    """The job's pipeline on ``net``: the preset's stages, the job's optimizer and batch
    size; shared by the digits job and the data job (xfer/data_job.py).

    Example:
        >>> pipe = pipeline_for(build_model("torch", 0), "keras_guide", None, 0, True, None)
        >>> [stage.name for stage in pipe.stages]
        ['head', 'finetune']
    """
    # SGD with momentum: the frameworks' Adam differ in where epsilon goes (Keras adds it
    # before the bias correction), which fifty epochs turn into visibly different curves.
    return TransferPipeline(
        net,
        stages_for(preset, net, bn, quick, recalibrate),
        optimizer="momentum",
        batch_size=16,
        seed=seed,
        progress=progress,
        **options,
    )


def load_data(data: dict, seed: int = 0) -> images_data.ImageData:
    """The user's images of ``data`` (``path``, and optionally ``image_size`` (h, w),
    ``color``, ``val_fraction``: those of :func:`xfer.data.images.load`), split by ``seed``.

    Example:
        >>> images = load_data({"path": "my_images/", "image_size": (32, 32)})   # doctest: +SKIP
    """
    options = dict(data)
    if options.get("image_size") is not None:
        options["image_size"] = tuple(options["image_size"])
    return images_data.load(options.pop("path"), seed=seed, **options)


def data_model(
    backend: str,
    model: str,
    images: images_data.ImageData,
    *,
    seed: int = 0,
    head: bool | None = None,
    weights: str | None = None,
) -> Any:
    """``model`` (a name of :data:`MODELS`, ``keras:NAME`` or ``package.module:function``:
    see :func:`xfer.model_spec.build`) for ``images``' classes and image shape.

    Example:
        >>> net = data_model("torch", "keras:MobileNetV2", images)   # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: --model keras:MobileNetV2: keras.applications models run on Keras: ...
    """
    return model_spec.build(
        model,
        backend,
        num_classes=images.num_classes,
        input_shape=images.image_shape,
        seed=seed,
        reference=REFERENCE_MODELS,
        head=head,
        weights=weights,
    )


def transfer(
    backend: str, start: dict, *, resume: bool = False, **options: Any
) -> tuple[History, Any]:
    """Train from the neutral ``start`` weights (see :func:`start_weights`) on the target
    task with the preset's stages on ``backend``; ``options`` are those of
    :func:`transfer_pipeline`. Returns the history and the model.

    Example:
        >>> start = start_weights("torch", pretrained("torch")[0])
        >>> history, model = transfer("torch", start, bn="adapt", quick=True)
        >>> [len(s.epochs) for s in history.stages], history.ok
        ([2, 2], True)
    """
    pipe, train, val = transfer_pipeline(backend, **options)
    import_weights(pipe.model, start)
    return pipe.fit(train, val, resume=resume), pipe.model


def transfer_on_other_keras_engine(
    engine: str,
    start: dict,
    *,
    preset: str,
    bn: str | None,
    seed: int,
    quick: bool,
    model: str = "small_cnn",
    data: dict | None = None,
    head: bool | None = None,
) -> History:
    """:func:`transfer` on Keras with ``engine`` (jax or torch), in a subprocess: Keras reads
    KERAS_BACKEND once per process. Starts from the same neutral weights.

    Example:
        >>> history = transfer_on_other_keras_engine("torch", start, preset="keras_guide",
        ...                                          bn=None, seed=0, quick=False)  # doctest: +SKIP
    """
    from xfer.files import write_arrays
    from xfer.subprocesses import run_python

    code = (
        "import json, sys\n"
        "from safetensors.numpy import load_file\n"
        "from xfer import job\n"
        "from xfer.subprocesses import answer\n"
        "history, _ = job.transfer('keras', load_file(sys.argv[1]), **json.loads(sys.argv[2]))\n"
        "answer(history.to_dict())\n"
    )
    options = dict(preset=preset, bn=bn, seed=seed, quick=quick, model=model, data=data, head=head)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "start.safetensors")
        write_arrays(path, start)  # contiguous first: see xfer.files
        done = run_python(
            code,
            [path, json.dumps(options)],
            env={"KERAS_BACKEND": engine},
            what=f"keras-{engine} (in its subprocess)",
        )
    return History.from_dict(done)


def transfer_on_backends(
    backends: list[str],
    *,
    preset: str = "keras_guide",
    bn: str | None = None,
    seed: int = 0,
    quick: bool = False,
    model: str = "small_cnn",
    data: dict | None = None,
    head: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, History]:
    """The same transfer on each of ``backends``, from the same start weights and data
    order: what ``xfer compare`` checks (:func:`xfer.compare.check`). The start is built
    once on the first backend (``model="small_cnn"``: its pretrained source model; the
    ResNet: fresh seeded weights, see :data:`MODELS`); when Keras is among ``backends`` and
    its other engine is installed, that engine runs too, in a subprocess.

    Args:
        backends: the frameworks, the first one being everyone's reference.
        preset, bn, seed, quick, model, data, head: as for :func:`transfer_pipeline`
            (``data``: the user's images; every model then starts from fresh seeded
            weights, built once on the first backend).
        progress: called with a line (or an epoch's progress) as the runs go.

    Returns:
        Each run's history, by label (``torch``, ``keras-jax``...), in the order they ran.

    Example:
        >>> histories = transfer_on_backends(["torch"], quick=True)
        >>> list(histories), histories["torch"].ok
        (['torch'], True)
    """
    options = dict(preset=preset, bn=bn, seed=seed, quick=quick, model=model)
    if data is not None:
        # Checked, and the start built, before anything trains: the data, the model, and
        # that it runs where asked (a keras.applications model: Keras only).
        allowed = model_spec.backends_for(model, REFERENCE_MODELS)
        refused = [b for b in backends if allowed is not None and b not in allowed]
        if refused:
            raise ValueError(
                f"--model {model} runs on {', '.join(allowed)} only (both Keras engines), "
                f"not {', '.join(refused)}: pass --backend {allowed[0]}."
            )
        options.update(data=data, head=head)
        start = export_weights(
            data_model(backends[0], model, load_data(data, seed), seed=seed + 1, head=head)
        )
    elif model == "small_cnn":
        weights, _ = pretrained(backends[0], seed, progress, quick)
        start = start_weights(backends[0], weights, seed, model=model)
    else:  # see MODELS: the ResNet starts from fresh seeded weights
        start = start_weights(backends[0], None, seed, model=model)
    histories = {}
    for backend in backends:
        history, _ = transfer(backend, start, progress=progress, **options)
        histories[_config.label(backend)] = history
    if "keras" in backends:
        # Keras reads KERAS_BACKEND once per process: its other engine runs in a subprocess.
        other = _config.other_keras_engine()
        if _config.is_installed(other):
            label = next(f.label for f in _config.REGISTRY if f.keras_engine == other)
            if progress is not None:
                progress(f"{label} (in a subprocess: one Keras engine per process)")
            histories[label] = transfer_on_other_keras_engine(other, start, **options)
    return histories


def run(
    backend: str,
    *,
    resume: bool = False,
    weights_file: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    **options: Any,
) -> RunResult:
    """Load the source model (shipped, ``weights_file``, or pretrained now for another
    seed: see :func:`pretrained`), then transfer. The main job.

    Args:
        backend: the framework to run on.
        resume: continue the run saved in ``checkpoint_dir``.
        weights_file: neutral weights of the source model to start from.
        export: an ``.onnx`` file to write the transferred model to (:func:`export_after`).
        **options: those of :func:`transfer_pipeline` (``preset``, ``bn``, ``seed``,
            ``progress``, ``quick``, ``checkpoint_dir``, ``cache``, ``device``,
            ``devices``, ``precision``), with its defaults.

    Example:
        >>> result = run("torch", bn="adapt", quick=True)
        >>> result.source_weights, round(result.source_accuracy, 3)
        ('shipped', 0.978)
        >>> print(result.history)                             # doctest: +ELLIPSIS
        torch on ...
        stage     epochs  loss ...
        head      2 ...
        finetune  2 ...
    """
    pipe, train, val = transfer_pipeline(backend, **options)
    # The options with transfer_pipeline's defaults filled in: its signature is the one
    # list of them (an unknown name was a TypeError above).
    bound = inspect.signature(transfer_pipeline).bind(backend, **options)
    bound.apply_defaults()
    seed, quick = bound.arguments["seed"], bound.arguments["quick"]
    if bound.arguments["model"] != "small_cnn":
        raise ValueError(
            f"run transfers the pretrained small_cnn, got model={bound.arguments['model']!r}: "
            "transfer_on_backends (xfer compare --model) runs the other models."
        )
    # Everything the transfer needs (device, checkpoint, stages) is checked before the
    # source model is loaded or pretrained.
    pipe.check(train, val, resume=resume)
    if export is not None:
        check_export_path(export, backend)
    weights, origin = pretrained(
        backend, seed, bound.arguments["progress"], quick, weights=weights_file
    )
    source_model = build_model(backend, seed)
    import_weights(source_model, weights)
    accuracy = source_accuracy(backend, source_model, seed)
    import_weights(pipe.model, start_weights(backend, weights, seed))
    history = pipe.fit(train, val, resume=resume)
    path = {"shipped": str(shipped_path()), "file": os.fspath(weights_file or "")}.get(origin)
    preset, bn = bound.arguments["preset"], bound.arguments["bn"]
    recalibrate = bound.arguments["recalibrate"]
    exported = export_after(pipe.model, history, export, train[0].shape[1:])
    result = RunResult(backend, preset, bn, origin, path, accuracy, history, recalibrate)
    return dataclasses.replace(result, export=exported)


def export_after(model: Any, history: History, path: Any, image_shape: tuple) -> str | None:
    """Write the transferred ``model`` to the ONNX file ``path`` (``xfer.export_onnx``:
    BN folded, checked by onnxruntime) when the run kept its promises (``history.ok``);
    the path written, or ``None`` (no ``path``, or a run that failed: nothing to deploy).

    Example:
        >>> export_after(model, history, "model.onnx", (8, 8, 1))   # doctest: +SKIP
        'model.onnx'
    """
    if path is None or not history.ok:
        return None
    return os.fspath(export_onnx(model, path, tuple(image_shape)))
