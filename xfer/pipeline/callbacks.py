"""Callbacks: what is optional around the stage loop, as in Keras and Lightning.

A callback subclasses :class:`Callback` and overrides the hooks it needs; every hook gets
the pipeline first. ``TransferPipeline(..., callbacks=[...])`` runs them after its
built-ins, which its own arguments switch on as before:

- :class:`Progress` (``progress=``): a line as each epoch starts, and the pipeline's notes;
- :class:`NaNRollback` (always): a NaN or infinite loss puts back the weights of the start
  of the epoch and raises :class:`NonFiniteLoss`;
- :class:`Checkpointing` (``checkpoint_dir=``): a checkpoint after each finished stage,
  ``fit(..., resume=True)``, and Ctrl-C as :class:`Interrupted`.

Example:
    >>> import numpy as np, xfer
    >>> class Losses(xfer.pipeline.Callback):
    ...     def on_epoch_end(self, pipeline, stage, index, record):
    ...         print(stage.name, record.epoch, record.loss > 0)
    >>> model = xfer.models.small_cnn(4, backend="torch")
    >>> x, y = np.random.default_rng(0).random((8, 8, 8, 3), "float32"), np.arange(8) % 4
    >>> stages = [xfer.Stage("all", epochs=2)]
    >>> _ = xfer.TransferPipeline(model, stages, batch_size=4, callbacks=[Losses()]).fit((x, y))
    all 1 True
    all 2 True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from xfer import data as D
from xfer.checkpoint import (
    Checkpoint,
    CheckpointError,
    backend_id,
    read_checkpoint,
    run_config,
    write_checkpoint,
)
from xfer.fingerprint import data_fingerprint
from xfer.pipeline.history import EpochRecord, History, StageRecord
from xfer.pipeline.rollback import Rollback
from xfer.pipeline.stage import Stage
from xfer.policy import BNPolicy

if TYPE_CHECKING:
    from xfer.pipeline.loop import TransferPipeline


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


class Callback:
    """A hook for each point of :meth:`TransferPipeline.fit`; each does nothing here.

    In :meth:`~TransferPipeline.fit`, in this order (``index`` is the stage's position in
    ``pipeline.stages``, from 0; ``epoch`` and ``step`` count from 1, as in the records)::

        on_check
        on_fit_start
        for each stage still to run:
            on_stage_start
            for each epoch:
                on_epoch_start
                on_step_end            after each step (on_train_error if a step raised)
                on_epoch_end
            on_stage_end
        on_fit_end
        on_exception                   instead of the rest, if anything above raised

    :meth:`~TransferPipeline.check` calls only ``on_check``; ``on_message`` comes whenever
    the pipeline has something to say besides epochs. The callbacks of a pipeline are
    called in the order of ``pipeline.callbacks``: the built-ins, then yours.

    Example:
        >>> import xfer
        >>> class Stages(xfer.pipeline.Callback):
        ...     def on_stage_end(self, pipeline, stage, index, record):
        ...         print(f"{stage.name}: {record.kept - len(record.changed)}/{record.kept} kept")
    """

    def on_check(
        self, pipeline: TransferPipeline, train: D.Data, val: D.Data | None, resume: bool
    ) -> None:
        """Before anything changes, after the pipeline checked the stages and the data
        against the model: raise to refuse the run (the model and files as they were)."""

    def on_fit_start(self, pipeline: TransferPipeline, history: History) -> None:
        """The checks passed and no stage has run. ``history`` is the one :meth:`fit`
        returns; a callback that restores finished stages appends their records to
        ``history.stages``, and fit starts with the first stage that has no record."""

    def on_stage_start(
        self, pipeline: TransferPipeline, stage: Stage, index: int, trained: Any
    ) -> None:
        """``stage``'s state is applied and its optimizer is about to be built. ``trained``
        is the native model the optimizer updates: ``pipeline.model``, or its last child
        when the stage trains on the cached features of a frozen prefix."""

    def on_epoch_start(
        self, pipeline: TransferPipeline, stage: Stage, index: int, epoch: int
    ) -> None:
        """Epoch ``epoch`` of ``stage.epochs`` is about to train."""

    def on_step_end(
        self,
        pipeline: TransferPipeline,
        stage: Stage,
        index: int,
        epoch: int,
        step: int,
        loss: float,
    ) -> None:
        """A training step is done; ``loss`` is its batch's mean loss. Raise to stop."""

    def on_train_error(
        self,
        pipeline: TransferPipeline,
        stage: Stage,
        index: int,
        epoch: int,
        error: Exception,
    ) -> None:
        """A training step of ``epoch`` raised ``error`` (a ``NonFiniteLoss``, or a framework
        error; not Ctrl-C). It goes on to :meth:`on_exception` after these hooks."""

    def on_epoch_end(
        self, pipeline: TransferPipeline, stage: Stage, index: int, record: EpochRecord
    ) -> None:
        """The epoch has trained and been evaluated; ``record`` holds its numbers."""

    def on_stage_end(
        self, pipeline: TransferPipeline, stage: Stage, index: int, record: StageRecord
    ) -> None:
        """The stage has finished; ``record``, with the verification of every tensor it
        froze, is the last of the history's stages."""

    def on_fit_end(self, pipeline: TransferPipeline, history: History) -> None:
        """Every stage has finished; ``history`` is what :meth:`fit` returns."""

    def on_exception(self, pipeline: TransferPipeline, index: int, error: BaseException) -> None:
        """``error`` (Ctrl-C included) is ending :meth:`fit` in stage ``index``. A hook may
        raise another exception in its place; the callbacks after it, and fit's caller,
        get that one."""

    def on_message(self, pipeline: TransferPipeline, text: str) -> None:
        """A line about what the pipeline does besides epochs (caching features)."""


class EpochProgress(str):
    """The line :class:`Progress` reports as an epoch starts (``"head: epoch 3/20"``), which
    also carries ``stage``, ``epoch`` and ``epochs``: what a ``progress=`` callable reads
    to draw bars. A display of its own can subclass :class:`Progress` instead.

    Example:
        >>> event = EpochProgress("head", 3, 20)
        >>> event, event.epochs
        ('head: epoch 3/20', 20)
    """

    def __new__(cls, stage: str, epoch: int, epochs: int) -> EpochProgress:
        event = super().__new__(cls, f"{stage}: epoch {epoch}/{epochs}")
        event.stage, event.epoch, event.epochs = stage, epoch, epochs
        return event


class Progress(Callback):
    """Reports progress as lines of text: an :class:`EpochProgress` as each epoch starts,
    the pipeline's notes (``"head: caching the features of 32 images ..."``), and with
    ``results=True`` each finished epoch's numbers.

    Args:
        report: called with each line; ``TransferPipeline(progress=report)`` is
            ``callbacks=[Progress(report)]``.
        results: also report each finished epoch's loss, validation loss and accuracy.

    Example:
        >>> import numpy as np, xfer
        >>> from xfer.pipeline import Progress
        >>> model = xfer.models.small_cnn(4, dropout=0.0, backend="torch")
        >>> x, y = np.zeros((4, 8, 8, 3), "float32"), np.zeros(4, "int64")
        >>> pipe = xfer.TransferPipeline(model, [xfer.Stage("all")], callbacks=[Progress()])
        >>> _ = pipe.fit((x, y))
        all: epoch 1/1
    """

    def __init__(self, report: Callable[[str], None] = print, *, results: bool = False):
        if not callable(report):
            raise TypeError(f"progress must be a callable taking a line of text, got {report!r}.")
        self.report, self.results = report, results

    def on_epoch_start(
        self, pipeline: TransferPipeline, stage: Stage, index: int, epoch: int
    ) -> None:
        self.report(EpochProgress(stage.name, epoch, stage.epochs))

    def on_epoch_end(
        self, pipeline: TransferPipeline, stage: Stage, index: int, record: EpochRecord
    ) -> None:
        if self.results:
            line = f"{stage.name}: epoch {record.epoch}/{stage.epochs} loss {record.loss:.4f}"
            if record.val_loss is not None:
                line += f", val loss {record.val_loss:.4f}, val acc {record.val_accuracy:.3f}"
            self.report(f"{line} ({record.seconds:.1f} s)")

    def on_message(self, pipeline: TransferPipeline, text: str) -> None:
        self.report(text)


class NaNRollback(Callback):
    """Keeps the weights of the start of each epoch and puts them back when a step fails:
    a NaN or infinite loss (then raises :class:`NonFiniteLoss`, naming the stage, epoch,
    step and the likely cause) or a framework error (a bad batch, out of memory). An
    epoch's partial updates are never kept. Always on in a ``TransferPipeline``.

    The weights go to a temporary file in the pipeline's ``cache_dir``, not to memory (see
    :mod:`xfer.pipeline.rollback`), and only those that train: with cached features, the
    last child's.

    Example:
        >>> import numpy as np, xfer
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> x, y = np.ones((8, 8, 8, 3), "float32"), np.arange(8) % 4
        >>> boom = xfer.Stage("boom", bn="affine", lr=1e30, optimizer="sgd")
        >>> xfer.TransferPipeline(model, [boom], batch_size=4).fit((x, y))
        Traceback (most recent call last):
        ...
        xfer.pipeline.callbacks.NonFiniteLoss: Stage 'boom', epoch 1, step ...
    """

    def __init__(self) -> None:
        self._rollback: Rollback | None = None

    def on_stage_start(
        self, pipeline: TransferPipeline, stage: Stage, index: int, trained: Any
    ) -> None:
        self._close()
        self._rollback = Rollback(trained, pipeline.cache_dir)

    def on_epoch_start(
        self, pipeline: TransferPipeline, stage: Stage, index: int, epoch: int
    ) -> None:
        self._rollback.save()

    def on_step_end(
        self,
        pipeline: TransferPipeline,
        stage: Stage,
        index: int,
        epoch: int,
        step: int,
        loss: float,
    ) -> None:
        if not math.isfinite(loss):
            raise _diverged(stage, epoch, step, loss)

    def on_train_error(
        self,
        pipeline: TransferPipeline,
        stage: Stage,
        index: int,
        epoch: int,
        error: Exception,
    ) -> None:
        self._rollback.restore()

    def on_stage_end(self, *args: Any) -> None:
        self._close()

    def on_exception(self, *args: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._rollback is not None:
            self._rollback.close()
            self._rollback = None


def _diverged(stage: Stage, epoch: int, step: int, loss: float) -> NonFiniteLoss:
    # The inputs were checked before training: the training itself diverged.
    causes = f"a learning rate too high for this stage (lr={stage.lr})"
    if BNPolicy.of(stage.bn or "train").stats == "update":
        causes += (
            ", or BN statistics updating on small or shifted batches "
            f"(bn={stage.bn!r}: try 'frozen' or 'affine')"
        )
    return NonFiniteLoss(
        f"Stage {stage.name!r}, epoch {epoch}, step {step}: the loss is {loss}. The "
        f"weights from the start of the epoch are restored. Likely cause: {causes}."
    )


class Checkpointing(Callback):
    """Saves the weights, xfer state and history (atomically) in ``directory`` after each
    finished stage; lets ``fit(..., resume=True)`` go on from the first unfinished stage
    after checking that the checkpoint is this run's (see :mod:`xfer.checkpoint`); turns
    Ctrl-C into :class:`Interrupted` and adds to a :class:`NonFiniteLoss` what is saved.
    ``TransferPipeline(checkpoint_dir=directory)`` is ``callbacks=[Checkpointing(directory)]``.

    Example:
        >>> import numpy as np, tempfile, xfer
        >>> from xfer.checkpoint import read_checkpoint
        >>> from xfer.pipeline import Checkpointing
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> x, y = np.zeros((4, 8, 8, 3), "float32"), np.zeros(4, "int64")
        >>> stages = [xfer.Stage("head", train=xfer.select.path("head.**")), xfer.Stage("all")]
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     pipe = xfer.TransferPipeline(model, stages, callbacks=[Checkpointing(directory)])
        ...     _ = pipe.fit((x, y))
        ...     read_checkpoint(directory).stage_names
        ['head', 'all']
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._config: dict[str, Any] | None = None  # what this run's checkpoints record
        self._resume_from: Checkpoint | None = None
        self._history: History | None = None
        self._saving = False

    def on_check(
        self, pipeline: TransferPipeline, train: D.Data, val: D.Data | None, resume: bool
    ) -> None:
        self._check_directory()
        self._resume_from = self._resume_point(pipeline, resume, train)

    def on_fit_start(self, pipeline: TransferPipeline, history: History) -> None:
        # fit() keeps the checkpoint its checks found instead of reading it again.
        checkpoint, self._resume_from = self._resume_from, None
        self._history, self._saving = history, False
        if checkpoint is not None:
            restored = History.from_dict(checkpoint.history)
            checkpoint.restore(pipeline.model)
            history.stages.extend(restored.stages)

    def on_stage_end(
        self, pipeline: TransferPipeline, stage: Stage, index: int, record: StageRecord
    ) -> None:
        self._saving = True
        write_checkpoint(
            self.directory,
            pipeline.model,
            config=self._config,
            finished=index,
            history=self._history.to_dict(),
        )
        self._saving = False

    def on_exception(self, pipeline: TransferPipeline, index: int, error: BaseException) -> None:
        if isinstance(error, NonFiniteLoss):
            error.args = (f"{error.args[0]} {self._saved_so_far(pipeline.stages)}",)
        elif isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            raise self._interrupted(pipeline.stages, index) from error

    def _resume_point(
        self, pipeline: TransferPipeline, resume: bool, train: D.Data
    ) -> Checkpoint | None:
        """The checkpoint to resume from (``None``: start from the first stage), after
        checking that it fits this run; changes nothing but ``self._config``, what the
        checkpoints record: this run's stages and pipeline settings, the training data's
        fingerprint, and the changes a resume made to stages that had not finished.
        """
        self._config = run_config(
            pipeline.stages,
            loss=pipeline.loss,
            optimizer=pipeline.optimizer,
            weight_decay=pipeline.weight_decay,
            batch_size=pipeline.batch_size,
            seed=pipeline.seed,
            backend=backend_id(pipeline.model),
            data=data_fingerprint(train),
        )
        checkpoint = read_checkpoint(self.directory)
        if checkpoint is None:
            return None
        if not resume:
            # Starting over would replace finished work the moment the first stage ends.
            raise CheckpointError(
                f"{self.directory!r} already holds a checkpoint (stages "
                f"{checkpoint.stage_names}, finished up to {checkpoint.stage_names[checkpoint.finished]!r}). "
                "Continue it with fit(..., resume=True) (xfer run --resume), or start over "
                "in a different checkpoint directory, or delete this one."
            )
        self._config = checkpoint.check(self._config)
        try:
            History.from_dict(checkpoint.history)
        except (KeyError, TypeError) as error:
            raise CheckpointError(
                f"The checkpoint in {self.directory!r} is not a valid xfer checkpoint: "
                f"its history is not one xfer wrote ({type(error).__name__}: {error}); the "
                "model was left unchanged. "
                "Delete the directory (or use another checkpoint directory) to start over."
            ) from None
        return checkpoint

    def _saved_so_far(self, stages: Sequence[Stage]) -> str:
        checkpoint = read_checkpoint(self.directory)
        if checkpoint is None:
            return (
                f"No stage had finished, so {self.directory!r} holds no checkpoint yet; "
                f"fit(..., resume=True) (xfer run --resume) starts with stage "
                f"{stages[0].name!r}."
            )
        last = checkpoint.stage_names[checkpoint.finished]
        if checkpoint.next_stage is None:
            return (
                f"Every stage had finished and is saved in {self.directory!r}; "
                "fit(..., resume=True) (xfer run --resume) just loads the result."
            )
        return (
            f"The checkpoint in {self.directory!r} holds the stages up to {last!r}; "
            f"fit(..., resume=True) (xfer run --resume) goes on with stage "
            f"{checkpoint.next_stage!r}."
        )

    def _interrupted(self, stages: Sequence[Stage], index: int) -> Interrupted:
        # What is on disk says what is saved: an interrupt while a checkpoint was being
        # written may have come before or after its manifest was replaced.
        checkpoint = read_checkpoint(self.directory)
        next_index = 0 if checkpoint is None else checkpoint.finished + 1
        next_stage = stages[next_index].name if next_index < len(stages) else None
        stage = stages[index].name
        where = (
            f"while saving the checkpoint of stage {stage!r}"
            if self._saving
            else f"during stage {stage!r} ({index + 1} of {len(stages)}); its partial "
            "training is not saved"
        )
        return Interrupted(
            f"Interrupted {where}. {self._saved_so_far(stages)}",
            checkpoint_dir=self.directory,
            stage=stage,
            next_stage=next_stage,
        )

    def _check_directory(self) -> None:
        """Refuse, before training, a directory that could not be created or written
        (checked on the nearest existing ancestor; nothing is created here)."""
        path = os.path.abspath(self.directory)
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
                f"checkpoint_dir {self.directory!r} cannot be created or written: "
                f"{problem}. Choose a directory you can write (xfer run --checkpoint DIR)."
            )


def with_built_ins(
    callbacks: Sequence[Callback],
    *,
    progress: Callable[[str], None] | Progress | None,
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
