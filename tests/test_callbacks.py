"""The pipeline's callbacks (xfer.pipeline.callbacks), on a real model with real training:
each built-in (Checkpointing, NaNRollback, Progress) on its own, and a user's callback that
hears every hook in the documented order with the documented arguments."""

from __future__ import annotations

import os

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S
from xfer.checkpoint import read_checkpoint
from xfer.pipeline import (
    Callback,
    Checkpointing,
    EpochProgress,
    Interrupted,
    NaNRollback,
    NonFiniteLoss,
    Progress,
)

TRAIN, VAL = data(16), data(8, seed=1)  # batch_size 8: two steps an epoch


def _stages():
    return [
        xfer.Stage(
            "head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=2
        ),
        xfer.Stage("finetune", train=S.all(), bn="affine", lr=0.01, epochs=1),
    ]


def _pipe(model, **options):
    options.setdefault("optimizer", "momentum")
    return xfer.TransferPipeline(model, options.pop("stages", _stages()), batch_size=8, **options)


def _assert_same_weights(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class _Recorder(Callback):
    """Every hook, with what it was given."""

    def __init__(self):
        self.events = []

    def on_check(self, pipeline, train, val, resume):
        self.events.append(("check", pipeline, train, val, resume))

    def on_fit_start(self, pipeline, history):
        self.events.append(("fit_start", history, len(history.stages)))

    def on_stage_start(self, pipeline, stage, index, trained):
        self.events.append(("stage_start", stage, index, trained))

    def on_epoch_start(self, pipeline, stage, index, epoch):
        self.events.append(("epoch_start", stage, index, epoch))

    def on_step_end(self, pipeline, stage, index, epoch, step, loss):
        self.events.append(("step_end", stage, index, epoch, step, loss))

    def on_train_error(self, pipeline, stage, index, epoch, error):
        self.events.append(("train_error", stage, index, epoch, error))

    def on_epoch_end(self, pipeline, stage, index, record):
        self.events.append(("epoch_end", stage, index, record))

    def on_stage_end(self, pipeline, stage, index, record):
        self.events.append(("stage_end", stage, index, record))

    def on_fit_end(self, pipeline, history):
        self.events.append(("fit_end", history))

    def on_exception(self, pipeline, index, error):
        self.events.append(("exception", index, error))

    def on_message(self, pipeline, text):
        self.events.append(("message", text))

    def names(self):
        return [e[0] for e in self.events]


# --- a user's callback -------------------------------------------------------------------


def test_a_users_callback_hears_every_hook_in_order_with_its_arguments(kit):
    model = kit.model(dropout=0.0)
    recorder = _Recorder()
    pipe = _pipe(model, callbacks=[recorder])
    history = pipe.fit(TRAIN, VAL)
    head, finetune = pipe.stages
    stage_names = [n for n in recorder.names() if n != "message"]
    epoch = ["epoch_start", "step_end", "step_end", "epoch_end"]
    assert stage_names == [
        "check", "fit_start",
        "stage_start", *epoch, *epoch, "stage_end",
        "stage_start", *epoch, "stage_end",
        "fit_end",
    ]  # fmt: skip

    events = [e for e in recorder.events if e[0] != "message"]
    assert events[0] == ("check", pipe, TRAIN, VAL, False)
    assert events[1] == ("fit_start", history, 0)  # the history fit returns, empty then
    starts = [e for e in events if e[0] == "stage_start"]
    assert [(e[1], e[2]) for e in starts] == [(head, 0), (finetune, 1)]
    for (_, _, index, trained), record in zip(starts, history.stages, strict=True):
        # The native model the optimizer updates: the head alone when its inputs are cached.
        assert (trained is model) == (not record.cache.startswith(("memory", "disk"))), index
    assert [e[1:4] for e in events if e[0] == "epoch_start"] == [
        (head, 0, 1), (head, 0, 2), (finetune, 1, 1)
    ]  # fmt: skip
    # Each step's loss, and each epoch's record: the record's loss is the mean of its steps'.
    steps = [e for e in events if e[0] == "step_end"]
    assert [e[2:5] for e in steps] == [
        (0, 1, 1),
        (0, 1, 2),
        (0, 2, 1),
        (0, 2, 2),
        (1, 1, 1),
        (1, 1, 2),
    ]
    epoch_ends = [e for e in events if e[0] == "epoch_end"]
    records = [r for s in history.stages for r in s.epochs]
    assert [e[3] for e in epoch_ends] == records and all(
        a is b for a, b in zip((e[3] for e in epoch_ends), records, strict=True)
    )
    for k, record in enumerate(records):
        step_losses = [e[5] for e in steps[2 * k : 2 * k + 2]]
        assert all(isinstance(loss, float) and np.isfinite(loss) for loss in step_losses)
        assert record.loss == pytest.approx(np.mean(step_losses), rel=1e-6)
        assert record.val_loss is not None and 0 <= record.val_accuracy <= 1
    stage_ends = [e for e in events if e[0] == "stage_end"]
    assert [(e[1], e[2]) for e in stage_ends] == [(head, 0), (finetune, 1)]
    assert all(e[3] is r for e, r in zip(stage_ends, history.stages, strict=True))
    assert stage_ends[0][3].kept == 12 and stage_ends[0][3].changed == []
    assert events[-1] == ("fit_end", history)
    # A stage that caches its features says so before it starts.
    for index, record in enumerate(history.stages):
        if record.cache.startswith(("memory", "disk")):
            position = recorder.events.index(starts[index])
            assert recorder.events[position - 1][0] == "message"
            assert recorder.events[position - 1][1].startswith(f"{record.name}: caching")


def test_check_calls_only_on_check_and_the_callbacks_follow_the_built_ins(kit, tmp_path):
    recorder = _Recorder()
    pipe = _pipe(
        kit.model(dropout=0.0), progress=print, checkpoint_dir=tmp_path, callbacks=[recorder]
    )
    assert [type(c) for c in pipe.callbacks] == [Progress, NaNRollback, Checkpointing, _Recorder]
    pipe.check(TRAIN, VAL)
    assert recorder.names() == ["check"] and os.listdir(tmp_path) == []
    # A NaNRollback of the user's takes the built-in's place.
    own = NaNRollback()
    assert _pipe(kit.model(), callbacks=[own]).callbacks == [own]


def test_a_hook_that_raises_stops_the_run_and_the_others_hear_of_it(kit):
    model = kit.model(dropout=0.0)
    start = xfer.export_weights(model)

    class Stop(Callback):
        def on_step_end(self, pipeline, stage, index, epoch, step, loss):
            if (index, epoch, step) == (0, 2, 1):
                raise RuntimeError("enough")

    recorder = _Recorder()
    with pytest.raises(RuntimeError, match="enough") as error:
        _pipe(model, callbacks=[Stop(), recorder]).fit(TRAIN)
    # Stop comes first, so the recorder never heard of that step: the epoch failed there.
    assert recorder.names()[-4:] == ["epoch_end", "epoch_start", "train_error", "exception"]
    _, stage, index, epoch, seen = recorder.events[-2]
    assert (stage.name, index, epoch, seen) == ("head", 0, 2, error.value)
    assert recorder.events[-1] == ("exception", 0, error.value)
    # NaNRollback put back the weights of the start of epoch 2 (not the first ones).
    assert not all(np.array_equal(v, start[k]) for k, v in xfer.export_weights(model).items())


@pytest.mark.parametrize("bad", [object(), Progress])
def test_callbacks_that_are_not_callback_instances_are_refused(kit, bad):
    with pytest.raises(TypeError, match="Callback instances"):
        _pipe(kit.model(), callbacks=[bad])


def test_two_checkpoint_writers_are_refused(kit, tmp_path):
    with pytest.raises(ValueError, match="one checkpoint"):
        _pipe(kit.model(), checkpoint_dir=tmp_path, callbacks=[Checkpointing(tmp_path / "b")])


# --- Checkpointing -----------------------------------------------------------------------


class _Saved(Callback):
    """What the checkpoint directory holds after each stage (runs after Checkpointing)."""

    def __init__(self, directory):
        self.directory, self.seen = directory, []

    def on_stage_end(self, pipeline, stage, index, record):
        checkpoint = read_checkpoint(self.directory)
        self.seen.append((index, checkpoint.finished, checkpoint.next_stage))
        self.history = checkpoint.history


class _CtrlC(Callback):
    def __init__(self, stage_index, epoch):
        self.at = (stage_index, epoch)

    def on_epoch_start(self, pipeline, stage, index, epoch):
        if (index, epoch) == self.at:
            raise KeyboardInterrupt


def test_checkpointing_writes_after_each_stage_and_resumes_where_it_stopped(kit, tmp_path):
    whole = kit.model(dropout=0.0)
    want = _pipe(whole).fit(TRAIN, VAL)

    saved = _Saved(tmp_path)
    recorder = _Recorder()
    model = kit.model(dropout=0.0)
    with pytest.raises(Interrupted) as stop:
        _pipe(model, callbacks=[Checkpointing(tmp_path), saved, _CtrlC(1, 1), recorder]).fit(
            TRAIN, VAL
        )
    assert saved.seen == [(0, 0, "finetune")]  # written when stage 0 ended, before stage 1
    assert (stop.value.stage, stop.value.next_stage) == ("finetune", "finetune")
    # The callbacks after Checkpointing hear of the Interrupted that took the Ctrl-C's place.
    assert recorder.events[-1] == ("exception", 1, stop.value)

    # Resuming, in another model: stage 0 comes from the checkpoint, only stage 1 runs.
    resumed, saved, recorder = kit.model(seed=1, dropout=0.0), _Saved(tmp_path), _Recorder()
    history = _pipe(resumed, checkpoint_dir=tmp_path, callbacks=[saved, recorder]).fit(
        TRAIN, VAL, resume=True
    )
    assert recorder.events[0][-1] is True  # on_check(..., resume=True)
    assert recorder.events[1][2] == 1  # on_fit_start: the restored stage is in the history
    assert [e[2] for e in recorder.events if e[0] == "stage_start"] == [1]
    assert saved.seen == [(1, 1, None)]
    assert history.losses() == want.losses() and [s.name for s in history.stages] == [
        "head",
        "finetune",
    ]
    assert saved.history == history.to_dict()
    _assert_same_weights(xfer.export_weights(resumed), xfer.export_weights(whole))


# --- NaNRollback -------------------------------------------------------------------------


class _Blowup(Callback):
    """At the start of ``epoch`` (after NaNRollback kept the weights), sets the head's
    kernel and bias to +-3e38 by class, so that the logits of the classes are more than
    float32's largest number apart: the first step's loss is not finite."""

    def __init__(self, epoch):
        self.epoch, self.kept = epoch, None

    def on_epoch_start(self, pipeline, stage, index, epoch):
        if epoch == self.epoch:
            weights = xfer.export_weights(pipeline.model)
            self.kept = {k: v.copy() for k, v in weights.items()}
            sign = np.where(np.arange(weights["head.dense.bias"].size) % 2 == 0, 1, -1)
            weights["head.dense.kernel"] = np.ones_like(weights["head.dense.kernel"]) * sign * 3e38
            weights["head.dense.bias"] = (sign * 3e38).astype("float32")
            xfer.import_weights(pipeline.model, weights)


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_nan_rollback_restores_the_epochs_start_bit_for_bit_and_raises(kit, tmp_path, cache):
    model = kit.model(dropout=0.0)
    start = xfer.export_weights(model)
    blowup, recorder = _Blowup(epoch=2), _Recorder()
    stages = [xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=3)]  # fmt: skip
    pipe = _pipe(
        model, stages=stages, cache=cache, cache_dir=tmp_path, callbacks=[blowup, recorder]
    )
    with pytest.raises(NonFiniteLoss, match=r"Stage 'head', epoch 2, step 1: the loss is") as error:
        pipe.fit(TRAIN)
    assert "weights from the start of the epoch are restored" in str(error.value)
    # Bit for bit the weights of the start of epoch 2: trained by epoch 1, not the first ones.
    _assert_same_weights(xfer.export_weights(model), blowup.kept)
    assert not np.array_equal(blowup.kept["head.dense.kernel"], start["head.dense.kernel"])
    # The step never reached the recorder, which heard of the failure after the restore.
    assert recorder.names()[-3:] == ["epoch_start", "train_error", "exception"]
    assert recorder.events[-2][-1] is error.value
    assert os.listdir(tmp_path) == []  # the kept weights' file is gone


def test_nan_rollback_keeps_each_epochs_start_and_leaves_a_finished_run_alone(kit, tmp_path):
    model = kit.model(dropout=0.0)
    history = _pipe(model, cache_dir=tmp_path).fit(TRAIN)
    assert history.ok and all(np.isfinite(history.losses()))
    assert os.listdir(tmp_path) == []


# --- Progress ----------------------------------------------------------------------------


def _cached(history):
    return [s.name for s in history.stages if s.cache.startswith(("memory", "disk"))]


def test_progress_reports_each_epoch_and_with_results_its_numbers(kit):
    lines = []
    history = _pipe(kit.model(dropout=0.0), callbacks=[Progress(lines.append, results=True)]).fit(
        TRAIN, VAL
    )
    notes = [line for line in lines if ": caching the features of " in line]
    assert [n.split(":")[0] for n in notes] == _cached(history)
    assert all(n.startswith(f"{n.split(':')[0]}: caching the features of 24 images") for n in notes)
    expected = []
    for stage, record in zip(_stages(), history.stages, strict=True):
        for e in record.epochs:
            expected.append(f"{stage.name}: epoch {e.epoch}/{stage.epochs}")
            expected.append(
                f"{stage.name}: epoch {e.epoch}/{stage.epochs} loss {e.loss:.4f}, "
                f"val loss {e.val_loss:.4f}, val acc {e.val_accuracy:.3f} ({e.seconds:.1f} s)"
            )
    assert [line for line in lines if line not in notes] == expected
    starts = [line for line in lines if isinstance(line, EpochProgress)]
    assert [(s.stage, s.epoch, s.epochs) for s in starts] == [("head", 1, 2), ("head", 2, 2), ("finetune", 1, 1)]  # fmt: skip


def test_the_progress_argument_is_a_progress_callback_reporting_as_before(kit):
    lines = []
    pipe = _pipe(kit.model(dropout=0.0), progress=lines.append)
    assert isinstance(pipe.callbacks[0], Progress) and pipe.callbacks[0].report == lines.append
    history = pipe.fit(TRAIN)  # without val: no numbers either way
    # One line as each epoch starts (and the caching notes); no result lines.
    assert [line for line in lines if "caching" not in line] == [
        "head: epoch 1/2",
        "head: epoch 2/2",
        "finetune: epoch 1/1",
    ]
    assert len(lines) == 3 + len(_cached(history))
    own = Progress(lines.append, results=True)
    assert _pipe(kit.model(), progress=own).callbacks[0] is own


def test_progress_refuses_what_cannot_take_a_line(kit):
    with pytest.raises(TypeError, match="progress must be a callable"):
        _pipe(kit.model(), progress="stderr")
