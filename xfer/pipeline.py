"""The staged transfer pipeline: each stage sets the neutral state, trains, evaluates, and
verifies that every tensor it froze is bit-identical afterwards.

A stage is declarative: it says what trains (``train``), what BN does (``bn``) and how the
units that do not train behave (``mode``); applying it first resets every unit, so a stage
never depends on what the previous one left behind (and ``--resume`` can start anywhere).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xfer import cache as C
from xfer import data as D
from xfer import select as S
from xfer._adapter import OPTIMIZERS, Adapter, StepOptions, Unit, find_adapter
from xfer._checks import check_integer, check_positive, is_number
from xfer._table import table
from xfer.checkpoint import (
    Checkpoint,
    CheckpointError,
    backend_id,
    read_checkpoint,
    run_config,
    write_checkpoint,
)
from xfer.fingerprint import data_fingerprint
from xfer.interrupt import StopRequest
from xfer.policy import BNPolicy
from xfer.rollback import Rollback
from xfer.state import _check_mode, changed_tensors, fingerprints, frozen_tensors

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("float32", "bfloat16")
LOSSES = ("sparse_categorical_crossentropy",)
METRICS = ("accuracy",)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the weights were restored."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a pipeline with a checkpoint directory: the finished stages are saved.

    Attributes:
        checkpoint_dir: where they are saved.
        stage: the stage that was interrupted (its partial training is not saved).
        next_stage: the stage a resumed run starts with (``None``: every stage is saved).

    The model in memory keeps the interrupted stage's partial training; the checkpoint
    does not.
    """

    def __init__(self, message: str, *, checkpoint_dir: str, stage: str, next_stage: str | None):
        super().__init__(message)
        self.checkpoint_dir, self.stage, self.next_stage = checkpoint_dir, stage, next_stage


class EpochProgress(str):
    """What the pipeline tells its ``progress`` callback as an epoch starts: a line of text
    (``"head: epoch 3/20"``) that also carries ``stage``, ``epoch`` and ``epochs`` for bars.

    Example:
        >>> event = EpochProgress("head", 3, 20)
        >>> event, event.epochs
        ('head: epoch 3/20', 20)
    """

    def __new__(cls, stage: str, epoch: int, epochs: int) -> EpochProgress:
        event = super().__new__(cls, f"{stage}: epoch {epoch}/{epochs}")
        event.stage, event.epoch, event.epochs = stage, epoch, epochs
        return event


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: what trains, the BN policy, the mode of what does not train, how long.

    Args:
        name: shown in the history and the checkpoint.
        train: the units whose parameters train; every other unit is frozen.
        bn: BN policy for every BN unit (overrides ``train`` for gamma/beta); ``None``:
            BN units that train get ``"train"``, the others ``"frozen"``.
        mode: pin for the units that do not train (``"inference"`` in the Keras guide);
            ``None`` leaves them to the framework.
        lr, epochs, optimizer: ``optimizer`` ``None`` takes the pipeline's.
        lr_groups: discriminative learning rates, ``((selector, lr), ...)``; a unit in
            several groups takes the first.

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=1e-3)
        Stage(name='head', ...)
    """

    name: str
    train: S.Selector = dataclasses.field(default_factory=S.all)
    bn: str | BNPolicy | None = None
    mode: str | None = None
    lr: float = 1e-3
    epochs: int = 1
    optimizer: str | None = None
    lr_groups: tuple[tuple[S.Selector, float], ...] = ()

    def __repr__(self) -> str:
        return f"Stage(name={self.name!r}, ...)"

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage name must be a non-empty string, got {self.name!r}.")
        S._check(self.train)
        if self.bn is not None:
            BNPolicy.of(self.bn)
        if self.mode is not None:
            _check_mode(self.mode)
        check_positive(self.lr, f"Stage {self.name!r}: lr")
        check_integer(self.epochs, f"Stage {self.name!r}: epochs", 1)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Stage {self.name!r}: unknown optimizer {self.optimizer!r}; expected one of "
                f"{', '.join(OPTIMIZERS)}."
            )
        if not isinstance(self.lr_groups, (tuple, list)):
            raise TypeError(
                f"Stage {self.name!r}: lr_groups must be a tuple of (selector, lr) pairs, got "
                f"{type(self.lr_groups).__name__}."
            )
        for group in self.lr_groups:
            if not isinstance(group, (tuple, list)) or len(group) != 2:
                raise ValueError(
                    f"Stage {self.name!r}: lr_groups entries are (selector, positive lr), got {group!r}."
                )
            S._check(group[0])
            check_positive(group[1], f"Stage {self.name!r}: the lr of lr_groups entry {group[0]!r}")


@dataclasses.dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclasses.dataclass
class StageRecord:
    name: str
    n_trainable: int
    n_frozen: int
    kept: int  # tensors that had to stay bit-identical
    changed: list[str]  # those that did not (empty when xfer kept its promise)
    epochs: list[EpochRecord] = dataclasses.field(default_factory=list)
    cache: str = ""  # where the frozen prefix's features were cached, or "off: why not"

    @property
    def loss(self) -> float:
        return self.epochs[-1].loss

    @property
    def val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy


@dataclasses.dataclass
class History:
    """Per stage, per epoch: loss, validation loss and accuracy, counts, time; and the
    verification of frozen tensors.

    Example:
        >>> history = pipe.fit((x, y), (val_x, val_y))      # doctest: +SKIP
        >>> history.stages[0].changed                        # doctest: +SKIP
        []
    """

    backend: str
    stages: list[StageRecord] = dataclasses.field(default_factory=list)
    device: str = ""

    @property
    def ok(self) -> bool:
        """Every tensor that had to stay bit-identical did."""
        return all(not s.changed for s in self.stages)

    def losses(self) -> list[float]:
        """The training loss of every epoch, stage after stage."""
        return [e.loss for s in self.stages for e in s.epochs]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict` (a checkpoint stores the history that way).

        Example:
            >>> History.from_dict(history.to_dict()) == history   # doctest: +SKIP
            True
        """
        stages = [
            StageRecord(**{**s, "epochs": [EpochRecord(**e) for e in s["epochs"]]})
            for s in data["stages"]
        ]
        return cls(data["backend"], stages, data.get("device", ""))

    def __str__(self) -> str:
        header = (
            "stage",
            "epochs",
            "loss",
            "val loss",
            "val acc",
            "trainable",
            "frozen",
            "frozen tensors",
            "features cached",
        )
        rows = []
        for s in self.stages:
            last = s.epochs[-1]
            kept = f"{s.kept - len(s.changed)}/{s.kept} bit-identical"
            rows.append((
                s.name,
                str(len(s.epochs)),
                f"{last.loss:.4f}",
                "" if last.val_loss is None else f"{last.val_loss:.4f}",
                "" if last.val_accuracy is None else f"{last.val_accuracy:.3f}",
                f"{s.n_trainable:,}",
                f"{s.n_frozen:,}",
                kept + (f" CHANGED: {', '.join(s.changed[:3])}" if s.changed else ""),
                s.cache.split(":")[0],
            ))  # fmt: skip
        where = f" on {self.device}" if self.device else ""
        return f"{self.backend}{where}\n{table(header, rows)}"


def apply_stage(model: Any, stage: Stage, adapter: Adapter | None = None) -> list[Unit]:
    """Set the model's state for ``stage``; return the units that train.

    Example:
        >>> import xfer
        >>> xfer.pipeline.apply_stage(model, xfer.Stage("head", train=S.path("head.**")))  # doctest: +SKIP
    """
    adapter = adapter or find_adapter(model)
    units = adapter.units(model)
    chosen = check_stage(stage, units)
    policy = BNPolicy.of(stage.bn) if stage.bn is not None else None
    for unit in units:
        trains = unit.path in chosen
        if unit.is_bn:
            unit_policy = policy or BNPolicy.of("train" if trains else "frozen")
            adapter.set_trainable(unit, unit_policy.trainable)
            adapter.set_mode(unit, unit_policy.mode)
            continue
        if unit.n_params:
            adapter.set_trainable(unit, trains)
        adapter.set_mode(unit, stage.mode if (stage.mode and not trains) else "inherit")
    return [u for u in units if u.path in chosen]


def check_stage(stage: Stage, units: Sequence[Unit]) -> set[str]:
    """The paths ``stage.train`` selects among ``units``, after checking that the stage
    fits the model: something with parameters trains, and every ``lr_groups`` selector
    picks a unit whose parameters train in this stage (a group that picks none would be
    ignored without a word). Changes nothing, so the pipeline checks every stage before
    the first one trains.

    Example:
        >>> from xfer.pipeline import check_stage
        >>> check_stage(xfer.Stage("head", train=S.path("head.**")), units)   # doctest: +SKIP
        {'head', 'head.dense'}
    """
    chosen = set(stage.train.paths(units))
    policy = BNPolicy.of(stage.bn) if stage.bn is not None else None

    def trains(unit: Unit) -> bool:
        if not unit.n_params:
            return False
        if unit.is_bn and policy is not None:
            return policy.trainable
        return unit.path in chosen

    some = ", ".join(u.path for u in units[:8])
    if not any(u.path in chosen and u.n_params for u in units):
        raise ValueError(
            f"Stage {stage.name!r}: train={stage.train!r} selects no unit with parameters, so "
            f"nothing would train. Some paths: {some}."
        )
    training = {u.path for u in units if trains(u)}
    for selector, lr in stage.lr_groups:
        if not training.intersection(selector.paths(units)):
            raise ValueError(
                f"Stage {stage.name!r}: the lr_groups selector {selector!r} (lr={lr}) picks no "
                f"unit whose parameters train in this stage, so its learning rate would never "
                f"be used. Units that train here: {', '.join(sorted(training)[:8])}."
            )
    return chosen


def evaluate(
    adapter: Adapter, model: Any, data: D.Data, *, batch_size: int = D.PREDICT_CHUNK
) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy in inference mode, computed the same way
    for every backend from the logits, ``batch_size`` images per forward pass.

    Example:
        >>> from xfer.pipeline import evaluate
        >>> loss, accuracy = evaluate(adapter, model, (x, y))   # doctest: +SKIP
    """
    x, y = D.arrays(data)
    logits = adapter.predict(model, x, batch_size=batch_size).astype("float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


class TransferPipeline:
    """Train a native model through stages, the same way on every backend.

    With ``checkpoint_dir``, the weights, xfer state and history are saved (atomically)
    after each finished stage, and ``fit(..., resume=True)`` continues from there; see
    :mod:`xfer.checkpoint`.

    With ``cache="auto"`` (the default), a stage that trains only the model's last
    top-level child (the head) behind a frozen prefix pinned to inference computes the
    prefix's outputs once and trains the head on them; ``cache_memory`` bytes of features
    stay in memory, more go to a temporary file in ``cache_dir``. ``cache="off"`` always
    runs the whole model. Each stage's record says which it did and why; see
    :mod:`xfer.cache`. The weights of the start of each epoch, put back if the loss turns
    NaN, go to a temporary file in ``cache_dir`` too (see :mod:`xfer.rollback`).

    ``device="auto"`` trains on CUDA when the framework sees a GPU, else on the CPU
    (PyTorch: the model is moved there; Keras and JAX place variables themselves, so
    ``"cpu"``/``"cuda"`` only check that they do). The history records the device.
    ``precision="bfloat16"`` is mixed precision where the framework applies it to a built
    model (PyTorch autocast; Keras and Flax choose it when the layers are built, and say
    so), and ``compile_step=True`` turns on the framework's optional compiler
    (``torch.compile``; Keras ``jit_compile=True``; Flax steps are always ``nnx.jit``).

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> stages = [
        ...     xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=1e-3, epochs=5),
        ...     xfer.Stage("finetune", train=S.all(), bn="affine", lr=1e-5, epochs=3),
        ... ]
        >>> pipe = xfer.TransferPipeline(model, stages, optimizer="adam", seed=0)   # doctest: +SKIP
        >>> history = pipe.fit((x, y), (val_x, val_y))                              # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        stages: Sequence[Stage],
        *,
        loss: str = "sparse_categorical_crossentropy",
        optimizer: str = "adam",
        metrics: Sequence[str] = ("accuracy",),
        batch_size: int = 32,
        weight_decay: float = 0.0,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        cache: str = "auto",
        cache_memory: int = C.DEFAULT_MEMORY,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str = "float32",
        compile_step: bool = False,
    ):
        self.adapter = find_adapter(model)
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
                f"Unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}."
            )
        if precision != "float32" and self.adapter.mixed_precision:
            raise ValueError(
                f"precision={precision!r} on {self.adapter.name}: {self.adapter.mixed_precision}"
            )
        if cache_dir is not None and not os.path.isdir(cache_dir):
            raise FileNotFoundError(
                f"cache_dir {os.fspath(cache_dir)!r} is not a directory. Create it first, or "
                "leave cache_dir=None for the system's temporary directory."
            )
        self.device, self.precision, self.compile_step = device, precision, bool(compile_step)
        self._placed = "cpu"  # where fit() put the model
        self.cache, self.cache_memory = cache, cache_memory
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.model, self.stages = model, list(stages)
        self.optimizer, self.batch_size = optimizer, batch_size
        self.weight_decay, self.seed, self.progress = weight_decay, seed, progress
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.loss = loss  # recorded in checkpoints
        self._stop = StopRequest()  # replaced by fit's own while it trains

    def fit(self, train: D.Data, val: D.Data | None = None, *, resume: bool = False) -> History:
        """Run every stage; return the :class:`History`.

        With ``checkpoint_dir``, a checkpoint is written after each finished stage, and
        ``resume=True`` continues from the first unfinished one (from the start if the
        directory holds no checkpoint). The data order is seeded per stage and epoch, so an
        interrupted and resumed run ends with the same weights as an uninterrupted one.

        Raises:
            NonFiniteLoss: the loss became NaN or infinite (weights restored to the start of
                the epoch; the checkpoint of the stages finished before is left as it was).
            Interrupted: Ctrl-C with a ``checkpoint_dir``; the message says how to resume.
            CheckpointError: ``resume=True`` and the checkpoint is another pipeline's or
                another model's (the model is unchanged); or ``resume=False`` and the
                directory already holds a checkpoint that starting over would overwrite.

        Example:
            >>> pipe = xfer.TransferPipeline(model, stages, checkpoint_dir="ckpt")  # doctest: +SKIP
            >>> pipe.fit(train, val)                 # Ctrl-C in stage 2 ...       # doctest: +SKIP
            >>> pipe.fit(train, val, resume=True)    # ... goes on with stage 2    # doctest: +SKIP
        """
        checkpoint, device = self._checked(train, val, resume)
        history, start = self._start(checkpoint)
        history.device = self._placed = device
        index, saving = start, False
        try:
            with StopRequest() as self._stop:
                for index in range(start, len(self.stages)):
                    self._stop.check()
                    history.stages.append(self._run_stage(index, self.stages[index], train, val))
                    if self.checkpoint_dir is not None:
                        saving = True
                        self._save(index, history)
                        saving = False
                    self._stop.check()
        except KeyboardInterrupt as interrupt:
            if self.checkpoint_dir is None or isinstance(interrupt, Interrupted):
                raise
            raise self._interrupted(index, saving) from interrupt
        except NonFiniteLoss as error:
            if self.checkpoint_dir is not None:
                error.args = (f"{error.args[0]} {self._saved_so_far()}",)
            raise
        return history

    def check(self, train: D.Data, val: D.Data | None = None, *, resume: bool = False) -> None:
        """Everything :meth:`fit` checks before its first step, without training: every
        stage's selectors against the model, the checkpoint directory (and, with
        ``resume``, that its checkpoint fits this run), the data against the model's
        inputs and outputs, the device. Raises what ``fit`` would raise; changes nothing
        (on PyTorch the model is moved to the device, as ``fit`` moves it).

        Example:
            >>> pipe = xfer.TransferPipeline(model, stages, checkpoint_dir="ckpt")  # doctest: +SKIP
            >>> pipe.check(train, val)     # before an hour of something else      # doctest: +SKIP
        """
        self._checked(train, val, resume)

    def _checked(
        self, train: D.Data, val: D.Data | None, resume: bool
    ) -> tuple[Checkpoint | None, str]:
        """:meth:`check`, returning the checkpoint to resume from and the device."""
        if resume and self.checkpoint_dir is None:
            raise ValueError(
                "fit(resume=True) needs a checkpoint directory to resume from: pass "
                "TransferPipeline(..., checkpoint_dir=...)."
            )
        # A refused run leaves the model, its state and the file system as they were.
        units = self.adapter.units(self.model)
        for stage in self.stages:
            check_stage(stage, units)
        self._check_checkpoint_dir()
        num_classes, in_channels = self._model_shape(train)
        D.check(train, name="train", num_classes=num_classes, in_channels=in_channels)
        if val is not None:
            D.check(val, name="val", num_classes=num_classes, in_channels=in_channels)
        checkpoint = self._resume_point(resume, train)
        return checkpoint, self.adapter.place(self.model, self.device)

    def _start(self, checkpoint: Checkpoint | None) -> tuple[History, int]:
        """The history to extend and the first stage to run, from ``checkpoint`` if any."""
        if checkpoint is None:
            return History(self.adapter.name), 0
        restored = History.from_dict(checkpoint.history)
        checkpoint.restore(self.model)
        return History(self.adapter.name, restored.stages), checkpoint.finished + 1

    def _resume_point(self, resume: bool, train: D.Data) -> Checkpoint | None:
        """The checkpoint to resume from (``None``: start from the first stage), after
        checking that it fits this run; changes nothing but ``self._run_config``, what
        :meth:`_save` records: this run's stages and pipeline settings, the training data's
        fingerprint, and the changes a resume made to stages that had not finished.
        """
        if self.checkpoint_dir is None:
            return None
        self._run_config = run_config(
            self.stages,
            loss=self.loss,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=self.seed,
            backend=backend_id(self.model),
            data=data_fingerprint(train),
        )
        checkpoint = read_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return None
        if not resume:
            # Starting over would replace finished work the moment the first stage ends.
            raise CheckpointError(
                f"{self.checkpoint_dir!r} already holds a checkpoint (stages "
                f"{checkpoint.stage_names}, finished up to {checkpoint.stage_names[checkpoint.finished]!r}). "
                "Continue it with fit(..., resume=True) (xfer run --resume), or start over "
                "in a different checkpoint directory, or delete this one."
            )
        self._run_config = checkpoint.check(self._run_config)
        try:
            History.from_dict(checkpoint.history)
        except (KeyError, TypeError) as error:
            raise CheckpointError(
                f"The checkpoint in {self.checkpoint_dir!r} is not a valid xfer checkpoint: "
                f"its history is not one xfer wrote ({type(error).__name__}: {error}); the "
                "model was left unchanged. "
                "Delete the directory (or use another checkpoint directory) to start over."
            ) from None
        return checkpoint

    def _save(self, index: int, history: History) -> None:
        write_checkpoint(
            self.checkpoint_dir,
            self.model,
            config=self._run_config,
            finished=index,
            history=history.to_dict(),
        )

    def _saved_so_far(self) -> str:
        checkpoint = read_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return (
                f"No stage had finished, so {self.checkpoint_dir!r} holds no checkpoint yet; "
                f"fit(..., resume=True) (xfer run --resume) starts with stage "
                f"{self.stages[0].name!r}."
            )
        last = checkpoint.stage_names[checkpoint.finished]
        if checkpoint.next_stage is None:
            return (
                f"Every stage had finished and is saved in {self.checkpoint_dir!r}; "
                "fit(..., resume=True) (xfer run --resume) just loads the result."
            )
        return (
            f"The checkpoint in {self.checkpoint_dir!r} holds the stages up to {last!r}; "
            f"fit(..., resume=True) (xfer run --resume) goes on with stage "
            f"{checkpoint.next_stage!r}."
        )

    def _interrupted(self, index: int, saving: bool) -> Interrupted:
        # What is on disk says what is saved: an interrupt while a checkpoint was being
        # written may have come before or after its manifest was replaced.
        checkpoint = read_checkpoint(self.checkpoint_dir)
        next_index = 0 if checkpoint is None else checkpoint.finished + 1
        next_stage = self.stages[next_index].name if next_index < len(self.stages) else None
        stage = self.stages[index].name
        where = (
            f"while saving the checkpoint of stage {stage!r}"
            if saving
            else f"during stage {stage!r} ({index + 1} of {len(self.stages)}); its partial "
            "training is not saved"
        )
        return Interrupted(
            f"Interrupted {where}. {self._saved_so_far()}",
            checkpoint_dir=self.checkpoint_dir,
            stage=stage,
            next_stage=next_stage,
        )

    def _check_checkpoint_dir(self) -> None:
        """Refuse, before training, a checkpoint directory that could not be created or
        written (checked on the nearest existing ancestor; nothing is created here)."""
        if self.checkpoint_dir is None:
            return
        path = os.path.abspath(self.checkpoint_dir)
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        problem = None
        if not os.path.isdir(existing):
            problem = f"{existing!r} is a file, not a directory"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing!r} is not writable"
        if problem:
            raise NotADirectoryError(
                f"checkpoint_dir {self.checkpoint_dir!r} cannot be created or written: "
                f"{problem}. Choose a directory you can write (xfer run --checkpoint DIR)."
            )

    def _model_shape(self, train: D.Data) -> tuple[int, int]:
        """(number of classes, input channels), from the model's output shape on one image."""
        x = D.first_images(train, name="train")
        if x.ndim != 4:
            raise ValueError(
                f"train: images must be (batch, height, width, channels), got shape {x.shape}."
            )
        try:
            logits = self.adapter.output_shape(self.model, np.asarray(x[:1], "float32"))
        except Exception as error:
            raise ValueError(
                f"train: the model does not accept images of shape {x.shape[1:]}; they must be "
                f"channels-last (height, width, channels). The model said: {error}"
            ) from error
        return int(logits[-1]), int(x.shape[-1])

    def _run_stage(
        self, index: int, stage: Stage, train: D.Data, val: D.Data | None
    ) -> StageRecord:
        adapter, model = self.adapter, self.model
        apply_stage(model, stage, adapter)
        units = adapter.units(model)
        groups = [(sorted(sel.paths(units)), lr) for sel, lr in stage.lr_groups]
        counts = [adapter.param_counts(u) for u in units]
        keys = frozen_tensors(model)
        # Digests, not copies, of what must stay bit-identical: a copy of the frozen weights
        # held through the stage would cost memory the framework's own loop does not use.
        before = fingerprints(model, keys)
        record = StageRecord(
            stage.name, sum(t for t, _ in counts), sum(f for _, f in counts), len(keys), []
        )
        features, record.cache = C.prepare(
            adapter, model, train, val, setting=self.cache, memory=self.cache_memory,
            directory=self.cache_dir, batch_size=self.batch_size, progress=self.progress,
            stage=stage.name,
        )  # fmt: skip
        try:
            trained, train, val_model = model, train, model
            if features is not None:
                # Only the last child trains, on its cached inputs; the prefix is constant.
                trained, train, groups = features.suffix, features.train, features.relative(groups)
                if features.val is not None:
                    val_model, val = features.suffix, features.val
            self._train_epochs(index, stage, trained, train, val_model, val, groups, record)
        finally:
            if features is not None:
                features.close()
        record.changed = changed_tensors(before, fingerprints(model, keys), keys)
        return record

    def _train_epochs(
        self,
        index: int,
        stage: Stage,
        trained: Any,
        train: D.Data,
        val_model: Any,
        val: D.Data | None,
        groups: list[tuple[list[str], float]],
        record: StageRecord,
    ) -> None:
        adapter = self.adapter
        options = StepOptions(
            stage.optimizer or self.optimizer,
            stage.lr,
            weight_decay=self.weight_decay,
            lr_groups=tuple((tuple(paths), lr) for paths, lr in groups),
            precision=self.precision,
            compile_step=self.compile_step,
        )
        step = adapter.trainer(trained, options)
        # On a GPU, arrays that fit the memory budget go there once, not batch by batch (on
        # the CPU they are there already; a converted copy would only cost memory).
        on_device = None
        if self._placed != "cpu" and D.is_arrays(train) and train[0].nbytes <= self.cache_memory:
            on_device = adapter.to_device(trained, *train)
        # Only what trains can diverge: with cached features, the last child (the prefix is
        # constant); without, the model.
        with Rollback(trained, self.cache_dir) as rollback:
            for epoch in range(stage.epochs):
                if self.progress is not None:
                    self.progress(EpochProgress(stage.name, epoch + 1, stage.epochs))
                rollback.save()
                start, total, seen = time.perf_counter(), 0.0, 0
                seed = (self.seed, index, epoch)
                if on_device is None:
                    batches = D.batches(train, self.batch_size, seed)
                else:
                    x_all, y_all = on_device
                    batches = (
                        (x_all[i], y_all[i])
                        for i in D.batch_indices(len(train[1]), self.batch_size, seed)
                    )
                try:
                    for i, (x, y) in enumerate(batches):
                        loss = step(x, y)
                        if not math.isfinite(loss):
                            raise _diverged(stage, epoch, i, loss)
                        total, seen = total + loss * len(y), seen + len(y)
                        self._stop.check()
                except Exception:
                    # NaN, or a framework error mid-epoch (a bad batch, out of memory):
                    # the epoch's partial updates are not kept.
                    rollback.restore()
                    raise
                val_loss = val_accuracy = None
                if val is not None:
                    val_loss, val_accuracy = evaluate(
                        adapter, val_model, val, batch_size=self.batch_size
                    )
                seconds = time.perf_counter() - start
                record.epochs.append(
                    EpochRecord(epoch + 1, total / seen, val_loss, val_accuracy, seconds)
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


def _diverged(stage: Stage, epoch: int, step: int, loss: float) -> NonFiniteLoss:
    # The inputs were checked before training: the training itself diverged.
    causes = f"a learning rate too high for this stage (lr={stage.lr})"
    if BNPolicy.of(stage.bn or "train").stats == "update":
        causes += (
            ", or BN statistics updating on small or shifted batches "
            f"(bn={stage.bn!r}: try 'frozen' or 'affine')"
        )
    return NonFiniteLoss(
        f"Stage {stage.name!r}, epoch {epoch + 1}, step {step + 1}: the loss is {loss}. The "
        f"weights from the start of the epoch are restored. Likely cause: {causes}."
    )
