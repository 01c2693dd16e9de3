"""Checkpointing: the built-in callback that saves each finished stage, resumes, and says
what is saved when Ctrl-C stops a run (the files themselves: :mod:`xfer.checkpoint`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from xfer.data import data_fingerprint
from xfer.distributed import PeerLost
from xfer.pipeline.callbacks import Callback, NonFiniteLoss
from xfer.pipeline.history import History, StageRecord
from xfer.pipeline.stage import Stage

if TYPE_CHECKING:
    from xfer.pipeline.loop import TransferPipeline


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
        if pipeline.world is not None and not pipeline.world.is_main:
            return  # rank 0 writes; every rank can resume from it
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
        if isinstance(error, (NonFiniteLoss, PeerLost)):
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
            precision=pipeline.precision,
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
