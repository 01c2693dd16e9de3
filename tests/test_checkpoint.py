"""Checkpoints on every backend: an interrupted or failed pipeline loses no finished stage.

A resumed run must end bit-for-bit where an uninterrupted one ends: stages are declarative
and the data order is seeded by (seed, stage, epoch), so weights and a stage index suffice.
Dropout is off: the frameworks' RNG streams are not part of a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S
from xfer.checkpoint import MANIFEST, CheckpointError, read_checkpoint
from xfer.data import data_fingerprint
from xfer.pipeline import Interrupted

TRAIN, VAL = data(32), data(16, seed=1)


def _stages(second: str = "finetune"):
    return [
        xfer.Stage(
            "head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=1
        ),
        xfer.Stage(second, train=S.all(), bn="affine", lr=0.01, epochs=2),
    ]


def _pipe(model, directory=None, stages=None, progress=None, **kwargs):
    kwargs.setdefault("optimizer", "momentum")
    return xfer.TransferPipeline(
        model,
        stages or _stages(),
        batch_size=8,
        seed=3,
        checkpoint_dir=directory,
        progress=progress,
        **kwargs,
    )


def _interrupt_at(message: str):
    def progress(line: str) -> None:
        if line == message:
            raise KeyboardInterrupt

    return progress


def _assert_same_weights(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


_UNINTERRUPTED = {}


@pytest.fixture
def uninterrupted(kit):
    """Final weights and losses of a full run without checkpoints, from the same start."""
    if kit.id not in _UNINTERRUPTED:
        model = kit.model(dropout=0.0)
        history = _pipe(model).fit(TRAIN, VAL)
        _UNINTERRUPTED[kit.id] = xfer.export_weights(model), history
    return _UNINTERRUPTED[kit.id]


def _checkpoint_of_head(kit, directory):
    """A checkpoint after stage 'head' of _pipe (for refusals)."""
    _interrupted_after_head(kit, directory)


def _interrupted_after_head(kit, directory):
    """A real checkpoint: head finished, Ctrl-C in finetune."""
    pipe = _pipe(kit.model(dropout=0.0), directory, progress=_interrupt_at("finetune: epoch 1/2"))
    with pytest.raises(Interrupted):
        pipe.fit(TRAIN)


def _weights_and_state(model):
    return xfer.export_weights(model), xfer.export_state(model)


def _assert_unchanged(model, before):
    weights, state = _weights_and_state(model)
    _assert_same_weights(weights, before[0])
    assert state == before[1]


def test_an_interrupted_run_resumes_to_the_same_weights_bit_for_bit(kit, tmp_path, uninterrupted):
    want_weights, want_history = uninterrupted
    model = kit.model(dropout=0.0)
    # Ctrl-C in the second epoch of the second stage: that stage is half trained in memory.
    with pytest.raises(Interrupted) as error:
        _pipe(model, tmp_path, progress=_interrupt_at("finetune: epoch 2/2")).fit(TRAIN, VAL)
    assert isinstance(error.value, KeyboardInterrupt)
    assert (error.value.stage, error.value.next_stage) == ("finetune", "finetune")
    checkpoint = read_checkpoint(tmp_path)
    assert (checkpoint.finished, checkpoint.next_stage) == (0, "finetune")
    assert checkpoint.manifest["pipeline"]["backend"] == kit.id
    # The half-trained weights in memory are not what the checkpoint holds.
    in_memory, saved = xfer.export_weights(model), _loaded(kit, checkpoint)
    assert not all(np.array_equal(in_memory[k], saved[k]) for k in saved)

    # A new process: another model object with other initial weights.
    resumed = kit.model(seed=1, dropout=0.0)
    history = _pipe(resumed, tmp_path).fit(TRAIN, VAL, resume=True)
    _assert_same_weights(xfer.export_weights(resumed), want_weights)
    assert [s.name for s in history.stages] == ["head", "finetune"]
    assert history.losses() == want_history.losses()
    assert history.ok and history.backend == want_history.backend
    assert read_checkpoint(tmp_path).next_stage is None
    # The state is the last stage's: everything trains, BN "affine".
    assert xfer.summary(resumed, print_fn=None).row("base.block1.bn").bn == "affine"


def _loaded(kit, checkpoint):
    model = kit.model(seed=1, dropout=0.0)
    xfer.load_weights(model, checkpoint.weights_path)
    return xfer.export_weights(model)


def test_interrupted_names_the_next_stage_and_how_to_resume(kit, tmp_path):
    pipe = _pipe(kit.model(dropout=0.0), tmp_path, progress=_interrupt_at("finetune: epoch 1/2"))
    with pytest.raises(Interrupted) as error:
        pipe.fit(TRAIN)
    message = str(error.value)
    assert "during stage 'finetune' (2 of 2)" in message
    assert "goes on with stage 'finetune'" in message
    assert "fit(..., resume=True)" in message and "xfer run --resume" in message
    assert str(tmp_path) in message

    # In the first stage nothing is saved yet: resuming starts from the beginning.
    empty = tmp_path / "empty"
    pipe = _pipe(kit.model(dropout=0.0), empty, progress=_interrupt_at("head: epoch 1/1"))
    with pytest.raises(Interrupted, match="starts with stage 'head'") as error:
        pipe.fit(TRAIN)
    assert error.value.next_stage == "head" and read_checkpoint(empty) is None


def test_ctrl_c_while_saving_names_what_the_disk_holds(kit, tmp_path, monkeypatch):
    calls, replace = [], os.replace

    def interrupted_replace(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # the second stage's manifest, before it replaced the first's
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(Interrupted, match="while saving the checkpoint of stage 'finetune'") as e:
        _pipe(kit.model(dropout=0.0), tmp_path).fit(TRAIN)
    assert e.value.next_stage == "finetune" and read_checkpoint(tmp_path).finished == 0


def test_without_a_checkpoint_dir_ctrl_c_is_a_plain_keyboard_interrupt(kit):
    pipe = _pipe(kit.model(dropout=0.0), progress=_interrupt_at("finetune: epoch 1/2"))
    with pytest.raises(KeyboardInterrupt) as error:
        pipe.fit(TRAIN)
    assert type(error.value) is KeyboardInterrupt


@pytest.mark.parametrize("failing_call", [3, 4], ids=["weights", "manifest"])
def test_a_failed_write_leaves_the_previous_checkpoint_intact(
    kit, tmp_path, monkeypatch, uninterrupted, failing_call
):
    # Each checkpoint is two renames, weights then manifest: calls 3 and 4 are the second
    # stage's, so the first stage's checkpoint must survive either failure.
    calls, replace = [], os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        _pipe(kit.model(dropout=0.0), tmp_path).fit(TRAIN, VAL)
    monkeypatch.setattr(os, "replace", replace)

    checkpoint = read_checkpoint(tmp_path)
    assert (checkpoint.finished, checkpoint.next_stage) == (0, "finetune")
    assert os.path.isfile(checkpoint.weights_path)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    # Intact and loadable: resuming from it ends where the uninterrupted run ends.
    resumed = kit.model(seed=1, dropout=0.0)
    history = _pipe(resumed, tmp_path).fit(TRAIN, VAL, resume=True)
    _assert_same_weights(xfer.export_weights(resumed), uninterrupted[0])
    assert history.losses() == uninterrupted[1].losses()
    # The successful write removed the orphaned weights of the failed one.
    weights = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert weights == [read_checkpoint(tmp_path).manifest["weights"]]


def test_a_checkpoint_of_another_pipeline_is_refused_and_the_model_unchanged(kit, tmp_path):
    _checkpoint_of_head(kit, tmp_path)
    model = kit.model(seed=1, dropout=0.0)
    before = _weights_and_state(model)
    other = _pipe(model, tmp_path, stages=_stages(second="unfreeze"))
    with pytest.raises(CheckpointError, match="belongs to another pipeline") as error:
        other.fit(TRAIN, resume=True)
    message = str(error.value)
    assert "'finetune'" in message and "'unfreeze'" in message
    assert "--checkpoint" in message and "delete" in message
    other = xfer.TransferPipeline(
        model, _stages(), optimizer="momentum", batch_size=4, seed=4, checkpoint_dir=tmp_path
    )
    with pytest.raises(
        CheckpointError,
        match="batch_size: 8 in the checkpoint, 4 here; seed: 3 in the checkpoint, 4 here",
    ):
        other.fit(TRAIN, resume=True)
    _assert_unchanged(model, before)


def test_a_checkpoint_of_another_architecture_is_refused_and_the_model_unchanged(kit, tmp_path):
    _checkpoint_of_head(kit, tmp_path)
    # Same units and stages, other widths: only the weights can tell.
    manifest_path = tmp_path / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    wide = xfer.models.small_cnn(4, 3, width=16, dropout=0.0, seed=0, backend=_backend(kit))
    before = _weights_and_state(wide)
    with pytest.raises(CheckpointError, match="cannot be loaded into") as error:
        _pipe(wide, tmp_path).fit(TRAIN, resume=True)
    assert "shape mismatches" in str(error.value) and "--checkpoint" in str(error.value)
    _assert_unchanged(wide, before)
    # Other units: refused before the weights are even read.
    manifest["state"]["units"]["extra.dense"] = {"trainable": True, "mode": "inherit"}
    manifest_path.write_text(json.dumps(manifest))
    model = kit.model(seed=1, dropout=0.0)
    before = _weights_and_state(model)
    with pytest.raises(CheckpointError, match=r"another architecture.*extra\.dense"):
        _pipe(model, tmp_path).fit(TRAIN, resume=True)
    _assert_unchanged(model, before)


def _backend(kit):
    return "keras" if kit.id.startswith("keras") else kit.id


def test_resume_with_an_empty_directory_starts_from_the_beginning(kit, tmp_path, uninterrupted):
    model = kit.model(dropout=0.0)
    history = _pipe(model, tmp_path / "new").fit(TRAIN, VAL, resume=True)
    _assert_same_weights(xfer.export_weights(model), uninterrupted[0])
    assert [s.name for s in history.stages] == ["head", "finetune"]
    assert sorted(os.listdir(tmp_path / "new")) == [
        MANIFEST,
        read_checkpoint(tmp_path / "new").manifest["weights"],
    ]


def test_starting_over_on_a_checkpoint_and_resuming_without_one_are_refused(kit, tmp_path):
    model = kit.model(dropout=0.0)
    with pytest.raises(ValueError, match="needs a checkpoint directory"):
        _pipe(model).fit(TRAIN, resume=True)
    _checkpoint_of_head(kit, tmp_path)
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint.*resume=True"):
        _pipe(model, tmp_path).fit(TRAIN)


def test_a_resumed_finished_run_just_loads_the_result(kit, tmp_path):
    model = kit.model(dropout=0.0)
    first = _pipe(model, tmp_path).fit(TRAIN, VAL)
    resumed = kit.model(seed=1, dropout=0.0)
    history = _pipe(resumed, tmp_path, progress=_interrupt_at("head: epoch 1/1")).fit(
        TRAIN, VAL, resume=True
    )  # nothing runs, so the progress callback is never called
    assert history.to_dict() == first.to_dict()
    _assert_same_weights(xfer.export_weights(resumed), xfer.export_weights(model))


def test_a_non_finite_loss_keeps_the_finished_stages_checkpoint(kit, tmp_path):
    stages = [_stages()[0], xfer.Stage("boom", train=S.all(), bn="affine", lr=1e30, epochs=2)]
    model = kit.model(dropout=0.0)
    with pytest.raises(xfer.NonFiniteLoss, match="holds the stages up to 'head'.*'boom'"):
        _pipe(model, tmp_path, stages=stages).fit(TRAIN)
    checkpoint = read_checkpoint(tmp_path)
    assert (checkpoint.finished, checkpoint.next_stage) == (0, "boom")
    assert len(checkpoint.history["stages"]) == 1


def _head(**changes):
    return [dataclasses.replace(_stages()[0], **changes), _stages()[1]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": _head(lr=0.01)}, "stage 'head' lr: 0.05 in the checkpoint, 0.01 here"),
        ({"stages": _head(bn="affine")}, "stage 'head' bn: 'frozen' in the checkpoint, 'affine'"),
        ({"stages": _head(mode=None)}, "stage 'head' mode: 'inference' in the checkpoint, None"),
        ({"stages": _head(epochs=2)}, "stage 'head' epochs: 1 in the checkpoint, 2 here"),
        ({"stages": _head(optimizer="sgd")}, "stage 'head' optimizer: None in the checkpoint"),
        (
            {"stages": _head(train=S.path("head.**") | S.bn())},
            "stage 'head' train: path('head.**') in the checkpoint, (path('head.**') | bn()) here",
        ),
        (
            {"stages": _head(lr_groups=((S.path("head.**"), 0.1),))},
            "stage 'head' lr_groups: [] in the checkpoint, [(path('head.**'), 0.1)] here",
        ),
        ({"optimizer": "adam"}, "optimizer: 'momentum' in the checkpoint, 'adam' here"),
        ({"weight_decay": 1e-4, "optimizer": "adamw"}, "weight_decay: 0.0 in the checkpoint, 0.0001 here"),
        ({"train": data(32, seed=2)}, "data: 'sha256:"),
        ({"train": [TRAIN]}, "data: 'sha256:"),
    ],
    ids=[
        "lr", "bn", "mode", "epochs", "stage-optimizer", "train", "lr_groups", "optimizer",
        "weight_decay", "other-data", "batches",
    ],
)  # fmt: skip
def test_resuming_a_finished_stage_run_differently_is_refused_by_name(
    kit, tmp_path, change, message
):
    _interrupted_after_head(kit, tmp_path)
    train = change.pop("train", TRAIN)
    model = kit.model(seed=1, dropout=0.0)
    before = _weights_and_state(model)
    with pytest.raises(CheckpointError) as error:
        _pipe(model, tmp_path, **change).fit(train, resume=True)
    assert message in str(error.value)
    assert "--checkpoint" in str(error.value) and "delete" in str(error.value).lower()
    _assert_unchanged(model, before)


def test_a_checkpoint_of_another_backend_or_loss_is_refused_by_name(kit, tmp_path):
    _interrupted_after_head(kit, tmp_path)
    path = tmp_path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["pipeline"].update(backend="other-backend", loss="hinge")
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as error:
        _pipe(kit.model(dropout=0.0), tmp_path).fit(TRAIN, resume=True)
    assert f"backend: 'other-backend' in the checkpoint, '{kit.id}' here" in str(error.value)
    assert "loss: 'hinge' in the checkpoint, 'sparse_categorical_crossentropy'" in str(error.value)


def test_an_unfinished_stage_may_change_and_the_change_is_recorded(kit, tmp_path):
    # What the NaN message says to do: lower the lr of the failed stage and resume.
    stages = [_stages()[0], xfer.Stage("boom", train=S.all(), bn="affine", lr=1e30, epochs=2)]
    with pytest.raises(xfer.NonFiniteLoss):
        _pipe(kit.model(dropout=0.0), tmp_path, stages=stages).fit(TRAIN)
    stages[1] = dataclasses.replace(stages[1], lr=0.01)
    history = _pipe(kit.model(seed=1, dropout=0.0), tmp_path, stages=stages).fit(TRAIN, resume=True)
    assert [s.name for s in history.stages] == ["head", "boom"] and history.ok
    manifest = read_checkpoint(tmp_path).manifest
    assert [s["lr"] for s in manifest["stages"]] == [0.05, 0.01]  # what each stage ran with
    assert manifest["changes"] == [
        {"resumed_after": "head", "stage": "boom", "field": "lr", "checkpoint": 1e30, "here": 0.01}
    ]


def _flip_a_bit(path):
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # in the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-16])


@pytest.mark.parametrize("damage", [_flip_a_bit, _truncate], ids=["bit-flip", "truncated"])
def test_a_damaged_weights_file_is_refused_before_anything_is_assigned(kit, tmp_path, damage):
    _interrupted_after_head(kit, tmp_path)
    damage(tmp_path / read_checkpoint(tmp_path).manifest["weights"])
    model = kit.model(seed=1, dropout=0.0)
    before = _weights_and_state(model)
    with pytest.raises(CheckpointError, match="digest") as error:
        _pipe(model, tmp_path).fit(TRAIN, resume=True)
    assert "delete" in str(error.value).lower()
    _assert_unchanged(model, before)


def _outside_weights(kit, tmp_path):
    # A valid weights file of the same model outside the checkpoint directory.
    path = tmp_path / "outside.safetensors"
    return path, xfer.save_weights(kit.model(seed=5, dropout=0.0), path)


def _edit(manifest, kit, tmp_path, how):
    if how in ("last_finished", "history", "state", "pipeline"):
        del manifest[how]
    elif how == "history-type":
        manifest["history"] = []
    elif how == "history-record":
        del manifest["history"]["stages"][0]["epochs"]
    elif how == "index-out-of-range":
        manifest["last_finished"]["index"] = 7
    elif how in ("absolute-path", "dot-dot"):
        path, digest = _outside_weights(kit, tmp_path)
        manifest["weights_digest"] = digest
        manifest["weights"] = str(path) if how == "absolute-path" else "../outside.safetensors"


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("last_finished", "last_finished is missing"),
        ("history", "history is missing"),
        ("state", "state is missing"),
        ("pipeline", "pipeline is missing"),
        ("history-type", "history must be"),
        ("history-record", "its history is not one xfer wrote"),
        ("index-out-of-range", "last_finished.index is 7"),
        ("absolute-path", "weights must be a plain file name"),
        ("dot-dot", "weights must be a plain file name"),
    ],
)
def test_a_malformed_manifest_is_refused_by_name_and_the_model_unchanged(
    kit, tmp_path, how, message
):
    directory = tmp_path / "ckpt"
    _interrupted_after_head(kit, directory)
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    _edit(manifest, kit, tmp_path, how)
    path.write_text(json.dumps(manifest))
    model = kit.model(seed=1, dropout=0.0)
    before = _weights_and_state(model)
    with pytest.raises(CheckpointError, match="not a valid xfer checkpoint") as error:
        _pipe(model, directory).fit(TRAIN, resume=True)
    assert message in str(error.value) and "delete" in str(error.value).lower()
    _assert_unchanged(model, before)


def test_an_old_checkpoint_without_digests_is_refused_with_how_to_start_over(kit, tmp_path):
    _interrupted_after_head(kit, tmp_path)
    path = tmp_path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format"] = "xfer-checkpoint/1"
    manifest.pop("weights_digest", None)
    path.write_text(json.dumps(manifest))
    model = kit.model(seed=1, dropout=0.0)
    before = _weights_and_state(model)
    with pytest.raises(CheckpointError, match="older xfer") as error:
        _pipe(model, tmp_path).fit(TRAIN, resume=True)
    assert "start over" in str(error.value) and "xfer-checkpoint/2" in str(error.value)
    _assert_unchanged(model, before)


def test_the_data_fingerprint_sees_values_dtype_shape_and_batches_not_memory_layout():
    x, y = np.arange(96, dtype="float32").reshape(4, 2, 3, 4), np.arange(4)
    same = data_fingerprint((x, y))
    assert data_fingerprint((np.asfortranarray(x), y.astype(">i8"))) == same  # same values
    others = [
        (x.astype("float64"), y),
        (x.reshape(4, 3, 2, 4), y),
        (x + np.float32(1e-6) * (x == 5), y),
        (x, y[::-1].copy()),
    ]
    assert all(data_fingerprint(other) != same for other in others)
    # Batches are trained on as they come (not shuffled by xfer): their order is the data.
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    assert data_fingerprint(batches) not in (same, data_fingerprint(batches[::-1]))
