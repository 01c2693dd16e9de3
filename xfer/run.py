"""The main job: pretrain on the source digits, transfer to the shifted target digits.

The pretrained weights are cached as *neutral* weights, so every backend transfers from
the very same pretrained model (that is what makes ``xfer compare`` a comparison).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xfer import datasets, models, presets
from xfer import select as S
from xfer._adapter import load_adapter
from xfer.pipeline import History, Stage, TransferPipeline, evaluate
from xfer.weights import export_weights, import_weights, load_weights, save_weights

WIDTH = 16
TASK_VERSION = 3  # bump when the task or the pretraining recipe changes


def cache_dir() -> Path:
    """Where pretrained weights are kept: ``$XFER_CACHE`` or ``~/.cache/xfer``."""
    return Path(os.environ.get("XFER_CACHE") or Path.home() / ".cache" / "xfer")


# The models `xfer compare --model` offers. "resnet18" is xfer.models.resnet(18) narrow
# (width 4: 44,545 parameters) on the digits upsampled to 16x16 (nearest neighbour), so that
# every stride-2 layer halves an even size down to 1x1 (where the frameworks' padding
# conventions would differ, as tests/parity.py checks); it starts from freshly initialised
# seeded weights (no pretraining: nothing of it is cached or shipped), built once on the first
# backend and handed to the others as neutral weights like the small CNN's.
MODELS = ("small_cnn", "resnet18")
RESNET_WIDTH = 4
RESNET_UPSAMPLE = 2


def _model(backend: str, seed: int, model: str = "small_cnn") -> Any:
    if model == "resnet18":
        return models.resnet(
            18, datasets.TransferTask.num_classes, 1, width=RESNET_WIDTH, seed=seed, backend=backend
        )
    if model != "small_cnn":
        raise ValueError(f"Unknown model {model!r}: expected one of {', '.join(MODELS)}.")
    # No Dropout: each framework draws its own masks, and `xfer compare` must see the same
    # numbers on every backend.
    return models.small_cnn(
        datasets.TransferTask.num_classes, 1, width=WIDTH, dropout=0.0, seed=seed, backend=backend
    )


def _images_for(model: str, data: tuple) -> tuple:
    """The task's (x, y) at the input size ``model`` expects (see MODELS)."""
    if model != "resnet18":
        return data
    x, y = data
    return np.repeat(np.repeat(x, RESNET_UPSAMPLE, axis=1), RESNET_UPSAMPLE, axis=2), y


def pretrained(
    backend: str,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
) -> tuple[dict, bool]:
    """Neutral weights of the source model, and whether they came from the cache.

    Example:
        >>> weights, cached = pretrained("torch")            # doctest: +SKIP
    """
    name = f"digits-source-v{TASK_VERSION}-w{WIDTH}-seed{seed}{'-quick' if quick else ''}"
    path = cache_dir() / f"{name}.safetensors"
    model = _model(backend, seed)
    if path.exists():
        load_weights(model, path)
        return export_weights(model), True
    task = datasets.transfer_task(seed=seed)
    stage = Stage("pretrain", train=S.all(), bn="train", lr=3e-3, epochs=1 if quick else 8)
    TransferPipeline(model, [stage], optimizer="adam", seed=seed, progress=progress).fit(
        task.source_train
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    return export_weights(model), False


def stages_for(preset: str, model: Any, bn: str | None, quick: bool = False) -> list[Stage]:
    """The preset's stages for the embedded task, with ``bn`` (if given) in every stage;
    ``quick``: at most two epochs per stage (a smoke run)."""
    tuned = {
        "keras_guide": dict(lr=0.05, epochs=20, finetune_lr=5e-4, finetune_epochs=20),
        "fine_tune": dict(lr=0.05, freeze_epochs=10, epochs=20),
        "gradual": dict(lr=0.01, epochs_per_stage=15),
        "discriminative": dict(lr=0.01, epochs=30),
    }
    stages = presets.preset(preset, model, **tuned.get(preset, {}))
    changes = {"bn": bn} if bn else {}
    return [
        dataclasses.replace(s, **changes, **({"epochs": min(s.epochs, 2)} if quick else {}))
        for s in stages
    ]


@dataclasses.dataclass
class RunResult:
    backend: str
    preset: str
    bn: str | None
    pretrained_cached: bool
    source_accuracy: float  # the pretrained model on its own (source) validation data
    history: History


def start_weights(
    backend: str, pretrained_weights: dict | None, seed: int = 0, model: str = "small_cnn"
) -> dict:
    """The transfer's starting point as neutral weights: the pretrained base and a freshly
    initialised head (the target classes are new), built once so that every backend starts
    from the same numbers. ``pretrained_weights=None``: everything freshly initialised
    (seeded), as for ``model="resnet18"``.

    Example:
        >>> start = start_weights("torch", weights)          # doctest: +SKIP
        >>> fresh = start_weights("torch", None, model="resnet18")   # doctest: +SKIP
    """
    start = export_weights(_model(backend, seed + 1, model))
    if pretrained_weights is not None:
        start.update({k: v for k, v in pretrained_weights.items() if k.startswith("base.")})
    return start


def transfer(
    backend: str,
    start: dict,
    *,
    preset: str = "keras_guide",
    bn: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    cache: str = "auto",
    device: str = "auto",
    model: str = "small_cnn",
) -> tuple[History, Any]:
    """Train from the neutral ``start`` weights (see :func:`start_weights`) on the target
    task with the preset's stages on ``backend``; ``model`` is one of :data:`MODELS`.
    Returns the history and the model.

    Example:
        >>> history, model = transfer("torch", start, bn="adapt")   # doctest: +SKIP
    """
    task = datasets.transfer_task(seed=seed)
    name, model = model, _model(backend, seed, model)
    import_weights(model, start)
    stages = stages_for(preset, model, bn, quick)
    # SGD with momentum: the frameworks' Adam differ in where epsilon goes (Keras adds it
    # before the bias correction), which fifty epochs turn into visibly different curves.
    pipe = TransferPipeline(
        model,
        stages,
        optimizer="momentum",
        batch_size=16,
        seed=seed,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        cache=cache,
        device=device,
    )
    train, val = _images_for(name, task.target_train), _images_for(name, task.target_val)
    return pipe.fit(train, val, resume=resume), model


def transfer_on_other_keras_engine(
    engine: str,
    start: dict,
    *,
    preset: str,
    bn: str | None,
    seed: int,
    quick: bool,
    model: str = "small_cnn",
) -> History:
    """:func:`transfer` on Keras with ``engine`` (jax or torch), in a subprocess: Keras reads
    KERAS_BACKEND once per process. Starts from the same neutral weights.

    Example:
        >>> history = transfer_on_other_keras_engine("torch", start, preset="keras_guide",
        ...                                          bn=None, seed=0, quick=False)  # doctest: +SKIP
    """
    from xfer.files import write_arrays

    code = (
        "import json, sys\n"
        "from safetensors.numpy import load_file\n"
        "from xfer import run\n"
        "preset, bn, seed, quick = sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), sys.argv[5] == '1'\n"
        "history, _ = run.transfer('keras', load_file(sys.argv[1]), preset=preset, bn=bn, seed=seed, quick=quick, model=sys.argv[6])\n"
        "print(json.dumps(history.to_dict()))\n"
    )
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "start.safetensors")
        write_arrays(path, start)  # contiguous first: see xfer.files
        args = [path, preset, bn or "", str(seed), "1" if quick else "0", model]
        # From the temporary directory: `python -c` puts the working directory first on
        # sys.path, and a source checkout there would shadow the installed xfer.
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            env={**os.environ, "KERAS_BACKEND": engine},
            capture_output=True,
            text=True,
            cwd=directory,
        )
    if done.returncode != 0:
        raise RuntimeError(f"keras-{engine} failed in its subprocess: {done.stderr.strip()[-800:]}")
    return History.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(
    backend: str,
    *,
    preset: str = "keras_guide",
    bn: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    cache: str = "auto",
    device: str = "auto",
) -> RunResult:
    """Pretrain (or load the cached source model), then transfer. The main job.

    Example:
        >>> result = run("torch", bn="adapt")                 # doctest: +SKIP
        >>> print(result.history)                             # doctest: +SKIP
    """
    weights, cached = pretrained(backend, seed, progress, quick)
    source_model = _model(backend, seed)
    import_weights(source_model, weights)
    _, source_accuracy = evaluate(
        load_adapter(backend), source_model, datasets.transfer_task(seed=seed).source_val
    )
    start = start_weights(backend, weights, seed)
    history, _ = transfer(
        backend,
        start,
        preset=preset,
        bn=bn,
        seed=seed,
        progress=progress,
        quick=quick,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        cache=cache,
        device=device,
    )
    return RunResult(backend, preset, bn, cached, source_accuracy, history)
