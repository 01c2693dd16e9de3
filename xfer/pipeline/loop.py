"""The stage loop: each stage sets the neutral state, trains, evaluates, and verifies that
every tensor it froze is bit-identical afterwards. What is optional around it (progress,
NaN rollback, checkpoints, a user's own hooks) is a callback (:mod:`xfer.pipeline.callbacks`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from xfer import data as D
from xfer import distributed as W
from xfer._adapter import Adapter, StepOptions, find_adapter
from xfer.pipeline import cache as C
from xfer.pipeline.callbacks import Callback
from xfer.pipeline.checkpointing import Checkpointing
from xfer.pipeline.history import EpochRecord, History, StageRecord
from xfer.pipeline.interrupt import StopRequest
from xfer.pipeline.preflight import PRECISIONS, check_data, check_options, with_built_ins
from xfer.pipeline.stage import Stage, apply_stage, check_stage
from xfer.recalibration import recalibrate_bn, statistics_keys
from xfer.state import changed_tensors, fingerprints, frozen_tensors

# Training steps per call of a step's compiled program (``run_steps``): long enough that
# the call's cost vanishes beside a head's steps, short enough that Ctrl-C and the
# callbacks' on_step_end (a NaN) are heard within a fraction of an epoch.
STEPS_PER_PROGRAM = 64


class TransferPipeline:
    """Train a native model through stages, the same way on every backend.

    Callbacks (:class:`xfer.pipeline.Callback`) hook into every point of :meth:`fit`; the
    built-ins are switched on by the arguments: ``progress`` (a callable taking a line of
    text, or a :class:`~xfer.pipeline.Progress`) hears of each epoch as it starts; a NaN or
    infinite loss always puts back the weights of the start of the epoch and raises
    :class:`~xfer.pipeline.NonFiniteLoss` (:class:`~xfer.pipeline.NaNRollback`; the weights
    go to a temporary file in ``cache_dir``); with ``checkpoint_dir``, the weights, xfer
    state and history are saved (atomically) after each finished stage, and
    ``fit(..., resume=True)`` continues from there (:class:`~xfer.pipeline.Checkpointing`,
    :mod:`xfer.checkpoint`). ``callbacks`` run after those, in their order.

    With ``cache="auto"`` (the default), a stage that trains only the model's last
    top-level child (the head) behind a frozen prefix pinned to inference computes the
    prefix's outputs once, in memory up to ``cache_memory`` bytes, then on disk in
    ``cache_dir``; see :mod:`xfer.pipeline.cache`.

    ``device="auto"`` trains on CUDA when the framework sees a GPU, else on the CPU
    (PyTorch: the model is moved there; Keras and JAX place variables themselves, so
    ``"cpu"``/``"cuda"`` only check that they do). The history records the device.
    ``precision="bf16"`` (or ``"bfloat16"``) is mixed precision in each framework's own
    way, for the training steps: PyTorch ``autocast``; Keras the ``mixed_bfloat16`` dtype
    policy on every float32 layer; Flax ``dtype=bfloat16`` on every layer that has a
    ``dtype`` (``param_dtype`` unchanged). Weights, BN moving statistics, frozen tensors and
    the optimizer state stay float32; evaluation and the feature cache's pass run in the
    model's own precision. ``compile_step=True`` turns on the framework's optional compiler
    (``torch.compile``; Keras ``jit_compile=True``; Flax steps are always ``nnx.jit``).

    ``distributed="auto"`` (the default) trains data-parallel when a launcher started the
    process (PyTorch: ``torchrun --nproc-per-node N``, which sets ``WORLD_SIZE``): every rank
    takes its part of each global batch of the single-process batch order, the model is
    wrapped in ``DistributedDataParallel`` per stage, after the stage's state is applied, a
    stage with nothing to train adapts BN on the global batch's statistics, and rank 0 alone
    reports and writes checkpoints; after each stage the ranks' weights are checked to be
    bit-identical. ``sync_bn=True``: every training-mode BN normalises with the global
    batch's statistics (else each rank's own part's, and rank 0's moving statistics are
    kept, as DDP keeps them). ``devices=N``: data-parallel in this one process over N
    devices, the JAX way (Flax NNX: a device mesh; Keras on jax:
    ``keras.distribution.DataParallel``): the state replicated, each batch sharded, BN on
    the whole batch. See :mod:`xfer.distributed` and docs/distributed.md.

    Example:
        >>> import numpy as np, xfer
        >>> from xfer import select as S
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> x, y = np.random.default_rng(0).random((16, 8, 8, 3), "float32"), np.arange(16) % 4
        >>> stages = [
        ...     xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", epochs=2),
        ...     xfer.Stage("finetune", train=S.all(), bn="affine", lr=1e-5),
        ... ]
        >>> pipe = xfer.TransferPipeline(model, stages, optimizer="adam", batch_size=8, seed=0)
        >>> history = pipe.fit((x, y), (x, y))
        >>> [len(s.epochs) for s in history.stages], history.ok
        ([2, 1], True)
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
        progress: Callable[[str], None] | Callback | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        cache: str = "auto",
        cache_memory: int = C.DEFAULT_MEMORY,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str = "float32",
        compile_step: bool = False,
        distributed: bool | str = "auto",
        sync_bn: bool = False,
        devices: int | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        self.adapter = find_adapter(model)
        self.world = W.resolve(distributed)  # None: one process
        if not isinstance(sync_bn, bool):
            raise TypeError(f"sync_bn must be True or False, got {sync_bn!r}.")
        self.sync_bn = sync_bn
        self.devices = W.check_devices(devices, self.world)
        if self.world is not None and not self.world.is_main:
            progress = None  # rank 0 reports
        check_options(
            self.adapter, stages, loss=loss, optimizer=optimizer, metrics=metrics,
            batch_size=batch_size, weight_decay=weight_decay, seed=seed, cache=cache,
            cache_memory=cache_memory, cache_dir=cache_dir, device=device, precision=precision,
        )  # fmt: skip
        self.model, self.stages, self.loss = model, list(stages), loss  # loss: for checkpoints
        self.optimizer, self.batch_size = optimizer, batch_size
        self.weight_decay, self.seed, self.progress = weight_decay, seed, progress
        self.cache, self.cache_memory = cache, cache_memory
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.device, self.compile_step = device, bool(compile_step)
        self.precision = PRECISIONS[precision]  # bf16 -> bfloat16
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.callbacks = with_built_ins(
            callbacks, progress=progress, checkpoint_dir=self.checkpoint_dir
        )
        self._placed = "cpu"  # where fit() put the model
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
            >>> import numpy as np, tempfile, xfer
            >>> model = xfer.models.small_cnn(4, backend="torch")
            >>> x, y = np.ones((8, 8, 8, 3), "float32"), np.arange(8) % 4
            >>> stages = [xfer.Stage("head", train=xfer.select.path("head.**")), xfer.Stage("all")]
            >>> with tempfile.TemporaryDirectory() as ckpt:
            ...     history = xfer.TransferPipeline(model, stages, checkpoint_dir=ckpt).fit((x, y))
            ...     # After a Ctrl-C, resume=True goes on with the stage it stopped; here every
            ...     # stage is saved, so it just loads the result.
            ...     pipe = xfer.TransferPipeline(model, stages, checkpoint_dir=ckpt)
            ...     again = pipe.fit((x, y), resume=True)
            >>> again.losses() == history.losses()
            True
        """
        history = History(self.adapter.name, device=self._checked(train, val, resume))
        history.processes = 1 if self.world is None else self.world.size
        history.devices, history.precision = self.devices, self.precision
        self._placed = history.device
        self._emit("on_fit_start", history)
        if self.world is not None:  # every rank starts from rank 0's (or the checkpoint's)
            self.adapter.broadcast_model(self.model, self.world)
        index = start = len(history.stages)  # past the stages a checkpoint restored
        try:
            with StopRequest(terminate=self.world is not None) as self._stop:
                for index in range(start, len(self.stages)):
                    self._stop.check()
                    stage = self.stages[index]
                    history.stages.append(self._run_stage(index, stage, train, val))
                    self._emit("on_stage_end", stage, index, history.stages[-1])
                    if self.world is not None:  # rank 0's checkpoint is written by now
                        self.adapter.gather(None, self.world)
                    self._stop.check()
                self._emit("on_fit_end", history)
        except BaseException as error:
            index = min(index, len(self.stages) - 1)  # on_fit_end of a run resumed when done
            for callback in self.callbacks:
                try:
                    callback.on_exception(self, index, error)
                except BaseException as replacement:  # Checkpointing: Ctrl-C -> Interrupted
                    error = replacement
            raise error
        return history

    def check(self, train: D.Data, val: D.Data | None = None, *, resume: bool = False) -> None:
        """Everything :meth:`fit` checks before its first step, without training: every
        stage's selectors against the model, the data against the model's inputs and
        outputs, the callbacks' checks (the checkpoint directory and, with ``resume``,
        that its checkpoint fits this run), the device. Raises what ``fit`` would raise;
        changes nothing (on PyTorch the model is moved to the device, as ``fit`` moves it).

        Example:
            >>> import numpy as np, xfer
            >>> model = xfer.models.small_cnn(4, backend="torch")
            >>> x, y = np.ones((8, 8, 8, 3), "float32"), np.arange(8) % 4
            >>> xfer.TransferPipeline(model, [xfer.Stage("all")]).check((x, y + 1))
            Traceback (most recent call last):
            ...
            ValueError: train: labels must lie in [0, 4) for this model's 4 outputs, ...
        """
        self._checked(train, val, resume)

    def _checked(self, train: D.Data, val: D.Data | None, resume: bool) -> str:
        """:meth:`check`, returning the device."""
        if resume and not any(isinstance(c, Checkpointing) for c in self.callbacks):
            raise ValueError(
                "fit(resume=True) needs a checkpoint directory to resume from: pass "
                "TransferPipeline(..., checkpoint_dir=...)."
            )
        # A refused run leaves the model, its state and the file system as they were.
        units = self.adapter.units(self.model)
        for stage in self.stages:
            check_stage(stage, units)
        check_data(self.adapter, self.model, train, val, batch_size=self.batch_size)
        device = self.device
        sizes = []
        if D.is_arrays(train):
            sizes = [len(i) for i in D.batch_indices(len(train[1]), self.batch_size, (0,))]
        if self.devices > 1:
            W.check_sharding(sizes, self.devices, self.adapter.device_count(), self.adapter.name)
        if self.world is not None:
            W.check_batch_sizes(sizes, self.world)
            device = self.adapter.join_world(self.world, device)
            # Rank 0 may still be writing the checkpoint of a run that stopped (a rank that
            # raised first left early): every rank reads the checkpoint after this barrier.
            self.adapter.gather(None, self.world)
        self._emit("on_check", train, val, resume)
        return self.adapter.place(self.model, device)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _run_stage(
        self, index: int, stage: Stage, train: D.Data, val: D.Data | None
    ) -> StageRecord:
        adapter, model = self.adapter, self.model
        apply_stage(model, stage, adapter)
        if stage.recalibrates == "before":  # so the stage then verifies the new statistics
            recalibrate_bn(model, D.arrays(train)[0], batch_size=self.batch_size)
        units = adapter.units(model)
        groups = [(sorted(sel.paths(units)), lr) for sel, lr in stage.lr_groups]
        counts = [adapter.param_counts(u) for u in units]
        keys = frozen_tensors(model)
        if stage.recalibrates == "after":  # the BN statistics it re-estimates change then
            keys = [k for k in keys if k not in set(statistics_keys(units))]
        # Digests, not copies, of what must stay bit-identical: a copy of the frozen weights
        # held through the stage would cost memory the framework's own loop does not use.
        before = fingerprints(model, keys)
        record = StageRecord(
            stage.name, sum(t for t, _ in counts), sum(f for _, f in counts), len(keys), []
        )
        features, record.cache = C.prepare(
            adapter, model, train, val, memory=self.cache_memory,
            setting="off" if stage.recalibrates == "after" else self.cache,
            directory=self.cache_dir, batch_size=self.batch_size,
            progress=lambda text: self._emit("on_message", text), stage=stage.name,
        )  # fmt: skip
        try:
            trained, val_model = model, model
            if features is not None:
                # Only the last child trains, on its cached inputs; the prefix is constant.
                trained, train, groups = features.suffix, features.train, features.relative(groups)
                if features.val is not None:
                    val_model, val = features.suffix, features.val
            self._emit("on_stage_start", stage, index, trained)
            self._train_epochs(
                index, stage, trained, train, val_model, val, groups, record, features is not None
            )
        finally:
            if features is not None:
                features.close()
        record.changed = changed_tensors(before, fingerprints(model, keys), keys)
        if self.world is not None:
            self._check_ranks_agree(stage, units)
        return record

    def _check_ranks_agree(self, stage: Stage, units: list) -> None:
        """Every rank holds the same weights after ``stage``, and then rank 0's BN
        statistics (without ``sync_bn``, a training-mode BN's are each rank's own)."""
        statistics = set(statistics_keys(units))
        keys = [k for k, _ in self.adapter.tensors(self.model) if k not in statistics]
        ranks = self.adapter.gather(fingerprints(self.model, keys), self.world)
        differ = sorted({k for other in ranks[1:] for k in keys if other[k] != ranks[0][k]})
        if differ:
            raise RanksDiverged(
                f"stage {stage.name!r}: the {self.world.size} processes hold different "
                f"weights afterwards ({len(differ)} tensors, e.g. {', '.join(differ[:3])}); "
                "xfer re-wraps the model per stage so that this cannot happen: please report "
                "it, with the stages and the launcher's command."
            )
        self.adapter.broadcast_model(self.model, self.world)

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
        cached: bool,
    ) -> None:
        options = StepOptions(
            stage.optimizer or self.optimizer, stage.lr, weight_decay=self.weight_decay,
            lr_groups=tuple((tuple(paths), lr) for paths, lr in groups),
            precision=self.precision, compile_step=self.compile_step,
        )  # fmt: skip
        if self.world is not None:  # built now, after the stage's state: DDP registers
            step = self.adapter.distributed_trainer(  # what trains when it wraps
                trained, options, self.world, sync_bn=self.sync_bn
            )
        elif self.devices > 1:
            step = self.adapter.sharded_trainer(trained, options, self.devices)
        else:
            step = self.adapter.trainer(trained, options)
        try:
            self._epochs(index, stage, step, trained, train, val_model, val, record, cached)
        finally:
            getattr(step, "finish", lambda: None)()  # a sharded state back on one device

    def _epochs(
        self,
        index: int,
        stage: Stage,
        step: Callable[[Any, Any], float],
        trained: Any,
        train: D.Data,
        val_model: Any,
        val: D.Data | None,
        record: StageRecord,
        cached: bool,
    ) -> None:
        # Arrays that fit the memory budget go to the device once, not batch by batch: on a
        # GPU, and where the step runs chunks of steps as one compiled program (the JAX
        # engines) on the cached features of a stage. Images on the CPU are there already,
        # and a converted copy would only cost memory.
        run_steps = getattr(step, "run_steps", None) if cached else None
        on_device = None
        if (self._placed != "cpu" or run_steps) and D.is_arrays(train):
            if train[0].nbytes <= self.cache_memory:
                on_device = self.adapter.to_device(trained, *train)
        for epoch in range(1, stage.epochs + 1):
            self._emit("on_epoch_start", stage, index, epoch)
            start, total, seen = time.perf_counter(), 0.0, 0
            try:
                seed = (self.seed, index, epoch - 1)
                steps = self._steps(step, run_steps, train, on_device, seed)
                for i, (loss, size) in enumerate(steps, 1):
                    self._emit("on_step_end", stage, index, epoch, i, loss)
                    total, seen = total + loss * size, seen + size
                    self._stop.check()
            except Exception as error:
                # NaN, or a framework error mid-epoch (a bad batch, out of memory): the
                # callbacks undo the epoch's partial updates (NaNRollback).
                self._emit("on_train_error", stage, index, epoch, error)
                raise
            if stage.recalibrates == "after" and epoch == stage.epochs:
                recalibrate_bn(trained, D.arrays(train)[0], batch_size=self.batch_size)
            val_loss = val_accuracy = None
            if val is not None:
                val_loss, val_accuracy = evaluate(
                    self.adapter, val_model, val, batch_size=self.batch_size
                )
            seconds = time.perf_counter() - start
            record.epochs.append(EpochRecord(epoch, total / seen, val_loss, val_accuracy, seconds))
            self._emit("on_epoch_end", stage, index, record.epochs[-1])

    def _steps(
        self, step: Callable[[Any, Any], float], run_steps: Callable | None, train: D.Data,
        on_device: tuple | None, seed: tuple,
    ) -> Iterator[tuple[float, int]]:  # fmt: skip
        """Train one epoch, yielding each step's loss and batch size in the batch order;
        with ``run_steps``, the full batches of the arrays on the device in chunks of
        :data:`STEPS_PER_PROGRAM` steps, each chunk one call of the compiled program."""
        if on_device is None:
            for x, y in D.batches(train, self.batch_size, seed):
                yield step(x, y), len(y)
            return
        x_all, y_all = on_device
        indices = list(D.batch_indices(len(train[1]), self.batch_size, seed))
        full = 0  # the batches run by the compiled program: all but an odd-sized last one
        if run_steps is not None:
            full = sum(len(i) == self.batch_size for i in indices)
        for start in range(0, full, STEPS_PER_PROGRAM):
            # One shape for every chunk: rows past ``count`` are padding the program skips.
            chunk = indices[start : min(start + STEPS_PER_PROGRAM, full)]
            order = np.zeros((STEPS_PER_PROGRAM, self.batch_size), np.int32)
            order[: len(chunk)] = chunk
            for loss in run_steps(x_all, y_all, order, len(chunk)):
                yield loss, self.batch_size
        if run_steps is not None:  # an odd-sized last batch from the host: a gather on
            x_all, y_all = D.arrays(train)  # the device would compile for its shape
        for i in indices[full:]:
            yield step(x_all[i], y_all[i]), len(i)


class RanksDiverged(RuntimeError):
    """The processes of a distributed run hold different weights after a stage."""


def evaluate(
    adapter: Adapter, model: Any, data: D.Data, *, batch_size: int = D.PREDICT_CHUNK
) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy in inference mode, computed the same way
    for every backend from the logits, ``batch_size`` images per forward pass.

    Example:
        >>> import numpy as np, xfer
        >>> from xfer._adapter import find_adapter
        >>> from xfer.pipeline import evaluate
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> x, y = np.zeros((6, 8, 8, 3), "float32"), np.arange(6) % 4
        >>> loss, accuracy = evaluate(find_adapter(model), model, (x, y))
        >>> 0 < loss < 10 and 0 <= accuracy <= 1
        True
    """
    x, y = D.arrays(data)
    logits = adapter.predict(model, x, batch_size=batch_size).astype("float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())
