"""Callbacks: what is optional around the stage loop, as in Keras and Lightning.

A callback subclasses :class:`Callback` and overrides the hooks it needs; every hook gets
the pipeline first. ``TransferPipeline(..., callbacks=[...])`` runs them after its
built-ins, which its own arguments switch on as before:

- :class:`Progress` (``progress=``): a line as each epoch starts, and the pipeline's notes;
- :class:`NaNRollback` (always): a NaN or infinite loss puts back the weights of the start
  of the epoch and raises :class:`NonFiniteLoss`;
- :class:`~xfer.pipeline.checkpointing.Checkpointing` (``checkpoint_dir=``): a checkpoint
  after each finished stage, ``fit(..., resume=True)``, and Ctrl-C as ``Interrupted``.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xfer import data as D
from xfer.pipeline.history import EpochRecord, History, StageRecord
from xfer.pipeline.rollback import Rollback
from xfer.pipeline.stage import Stage
from xfer.policy import BNPolicy

if TYPE_CHECKING:
    from xfer.pipeline.loop import TransferPipeline


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the weights were restored."""


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
        on_exception                   instead of the rest, if anything after on_fit_start raised

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
        """A training step is done; ``loss`` is its batch's mean loss. Raise to stop.

        On the JAX engines a head stage on cached features runs its steps in compiled
        chunks (``xfer.pipeline.loop.STEPS_PER_PROGRAM`` at a time): this hook then hears of
        each of the chunk's steps in order, with its own loss, after the chunk ran. A raise
        stops the epoch all the same (NaNRollback puts back the epoch's start)."""

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

    def on_stage_end(
        self, pipeline: TransferPipeline, stage: Stage, index: int, record: StageRecord
    ) -> None:
        self._close()

    def on_exception(self, pipeline: TransferPipeline, index: int, error: BaseException) -> None:
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
