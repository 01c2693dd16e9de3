"""A pipeline run is checked whole before its first step trains, and what it is given is
taken as meant: a refused run changes nothing, and nothing is ignored without a word.

Each case here was once found only after training had started (a later stage's selector,
a checkpoint directory under a file, ``seed=-1``), or silently did nothing
(``weight_decay`` with SGD, an ``lr_groups`` selector that matched nothing, ``lr=True``).
"""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S
from xfer.checkpoint import read_checkpoint
from xfer.data import batch_indices
from xfer.pipeline import Interrupted

TRAIN, VAL = data(32), data(16, seed=1)


def _stages(**finetune):
    return [
        xfer.Stage(
            "head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=1
        ),
        xfer.Stage(
            **{"name": "finetune", "train": S.all(), "bn": "affine", "lr": 0.01, **finetune}
        ),
    ]


def _unchanged(model, before_weights, before_state):
    after = xfer.snapshot(model)
    assert after.keys() == before_weights.keys()
    for key in after:
        np.testing.assert_array_equal(after[key], before_weights[key], err_msg=key)
    assert xfer.export_state(model) == before_state


def _refused_before_training(kit, stages, match, error=ValueError, **options):
    model = kit.model(dropout=0.0)
    xfer.freeze(model, S.path("base.**"))  # a state of the user's, to be left as it was
    weights, state = xfer.snapshot(model), xfer.export_state(model)
    pipe = xfer.TransferPipeline(model, stages, optimizer="momentum", batch_size=8, **options)
    with pytest.raises(error, match=match):
        pipe.fit(TRAIN, VAL)
    _unchanged(model, weights, state)


def test_a_later_stage_that_selects_nothing_is_refused_before_the_first_trains(kit):
    stages = _stages(train=S.path("backbone.**"))  # a typo'd path in stage 2
    _refused_before_training(kit, stages, r"Stage 'finetune'.*selects no unit with parameters")


def test_an_lr_group_that_selects_nothing_trainable_is_refused(kit):
    typo = _stages(lr_groups=((S.path("bsae.**"), 1e-4),))
    _refused_before_training(kit, typo, r"lr_groups selector path\('bsae.\*\*'\).*picks no unit")
    # A group of units that stay frozen in that stage would be ignored just the same.
    frozen = [
        xfer.Stage("head", train=S.path("head.**"), lr=0.05, lr_groups=((S.path("base.**"), 1e-4),))
    ]
    _refused_before_training(kit, frozen, r"Stage 'head': the lr_groups selector")


def test_a_checkpoint_dir_that_cannot_be_created_is_refused_before_training(kit, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _refused_before_training(
        kit,
        _stages(),
        r"checkpoint_dir .* cannot be created or written: .*a-file' is a file",
        error=NotADirectoryError,
        checkpoint_dir=blocker / "ckpt",
    )
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_a_missing_cache_dir_is_refused_when_the_pipeline_is_built(kit, tmp_path):
    with pytest.raises(FileNotFoundError, match="cache_dir .*nope' is not a directory"):
        xfer.TransferPipeline(kit.model(), _stages(), cache_dir=tmp_path / "nope")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"seed": -1}, r"seed .* must be an integer >= 0, got -1"),
        ({"seed": "0"}, r"seed .* must be an integer >= 0, got '0'"),
        ({"seed": True}, r"seed .* got True"),
        ({"seed": 1.5}, r"seed .* got 1.5"),
        ({"batch_size": True}, r"batch_size must be an integer >= 1, got True"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0, got -0.1"),
        ({"weight_decay": math.nan}, r"weight_decay must be a finite number >= 0, got nan"),
        ({"weight_decay": True}, r"weight_decay must be a finite number >= 0, got True"),
        (
            {"weight_decay": 0.1, "optimizer": "adam"},
            r"applied only by optimizer 'adamw', but stages \['head', 'finetune'\] use \['adam'\]",
        ),
        (
            {"weight_decay": 0.1, "optimizer": "momentum"},
            r"use \['momentum'\], where it would be silently ignored",
        ),
    ],
)
def test_pipeline_options_are_taken_as_meant_or_refused(kit, options, match):
    model = kit.model()
    with pytest.raises((TypeError, ValueError), match=match):
        xfer.TransferPipeline(model, _stages(), **options)


def test_weight_decay_is_accepted_where_adamw_applies_it(kit):
    model = kit.model()
    stages = _stages(optimizer="adamw")
    stages[0] = xfer.Stage("head", train=S.path("head.**"), optimizer="adamw")
    xfer.TransferPipeline(model, stages, weight_decay=0.1)  # no error
    xfer.TransferPipeline(model, _stages(), weight_decay=0.1, optimizer="adamw")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"epochs": True}, r"epochs must be an integer >= 1, got True"),
        ({"epochs": 2.0}, r"epochs must be an integer >= 1, got 2.0"),
        ({"lr": True}, r"lr must be a positive finite number, got True"),
        ({"lr": math.inf}, r"lr must be a positive finite number, got inf"),
        ({"lr": "0.1"}, r"lr must be a positive finite number, got '0.1'"),
        ({"lr_groups": ((S.all(), True),)}, r"the lr of lr_groups entry all\(\)"),
        ({"lr_groups": (S.all(), 0.1)}, r"lr_groups entries are \(selector, positive lr\)"),
    ],
)
def test_stage_fields_are_taken_as_meant_or_refused(kit, fields, match):
    stage = xfer.Stage("s", train=S.all(), **fields)
    with pytest.raises((TypeError, ValueError), match=match):
        xfer.TransferPipeline(kit.model(), [stage])


def test_a_last_batch_of_one_example_joins_the_batch_before_it():
    assert [len(i) for i in batch_indices(17, 8, seed=(0, 0, 0))] == [8, 9]
    assert [len(i) for i in batch_indices(18, 8, seed=(0, 0, 0))] == [8, 8, 2]
    assert [len(i) for i in batch_indices(1, 8, seed=(0, 0, 0))] == [1]
    every = np.concatenate(list(batch_indices(17, 8, seed=(3, 1, 2))))
    assert sorted(every.tolist()) == list(range(17))  # every example, once


def test_a_pipeline_on_a_batch_size_that_leaves_one_example_over_trains(kit):
    model = kit.model(dropout=0.0)
    history = xfer.TransferPipeline(model, _stages(), optimizer="momentum", batch_size=8).fit(
        data(17), VAL
    )
    assert history.ok and all(np.isfinite(history.losses()))


def test_ctrl_c_stops_at_a_step_boundary_and_saves_the_finished_stages(kit, tmp_path):
    """SIGINT arrives while stage 2 trains; the pipeline stops after the step it is in,
    as :class:`Interrupted`, with stage 1 saved, and gives SIGINT back to Python."""
    model = kit.model(dropout=0.0)
    sent = []

    def progress(event):
        if getattr(event, "stage", None) == "finetune" and event.epoch == 2 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    ckpt = tmp_path / "ckpt"
    pipe = xfer.TransferPipeline(
        model,
        _stages(epochs=3),
        optimizer="momentum",
        batch_size=8,
        checkpoint_dir=ckpt,
        progress=progress,
    )
    with pytest.raises(Interrupted, match="during stage 'finetune'") as stop:
        pipe.fit(TRAIN, VAL)
    assert sent and stop.value.next_stage == "finetune"
    assert read_checkpoint(ckpt).next_stage == "finetune"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = xfer.TransferPipeline(
        kit.model(dropout=0.0),
        _stages(epochs=3),
        optimizer="momentum",
        batch_size=8,
        checkpoint_dir=ckpt,
    ).fit(TRAIN, VAL, resume=True)
    assert [s.name for s in resumed.stages] == ["head", "finetune"]
    assert len(resumed.stages[1].epochs) == 3


def test_ctrl_c_without_a_checkpoint_is_a_keyboard_interrupt_at_a_step_boundary(kit):
    model = kit.model(dropout=0.0)

    def progress(event):
        if getattr(event, "stage", None) == "head":
            os.kill(os.getpid(), signal.SIGINT)

    pipe = xfer.TransferPipeline(model, _stages(), batch_size=8, progress=progress)
    with pytest.raises(KeyboardInterrupt) as stop:
        pipe.fit(TRAIN, VAL)
    assert not isinstance(stop.value, Interrupted)
    assert "step boundary" in str(stop.value)


def test_xfer_run_refuses_a_missing_gpu_before_pretraining(kit, monkeypatch, capsys):
    """--device cuda on a CPU machine was once found only after the source model had been
    pretrained (seed 1 pretrains); now the whole transfer is checked first."""
    from xfer import job
    from xfer.cli import main

    if (
        job.transfer_pipeline(kit.id.partition("-")[0])[0].adapter.place(kit.model(), "auto")
        != "cpu"
    ):
        pytest.skip("this machine has a GPU")

    def pretrain(*args, **kwargs):
        raise AssertionError("pretrained before the device was checked")

    monkeypatch.setattr(job, "pretrain", pretrain)
    args = ["run", "--backend", kit.id.partition("-")[0], "--device", "cuda", "--seed", "1"]
    assert main([*args, "--quiet"]) == 2
    assert "device='cuda'" in capsys.readouterr().err
