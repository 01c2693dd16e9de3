"""xfer inside Lightning: stages applied to a ``LightningModule`` trained by
``lightning.Trainer``, and ``xfer.integrations.lightning.XferFinetuning`` against
Lightning's own ``BackboneFinetuning`` on the same model.

``BackboneFinetuning`` freezes the backbone with ``train_bn=True``: during its frozen
epochs the backbone's BN keeps batch statistics, moves its running statistics and trains
gamma/beta — which is why XferFinetuning exists. Its pins also hold when the module calls
``self.train()`` each epoch (as much user code, and Lightning before 2.2, do).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

pytestmark = [
    # Pinned units have training=False at fit start: what the pins are for.
    pytest.mark.filterwarnings("ignore:Found .* module.* in eval mode:UserWarning"),
    # Lightning's own use of a torch API that torch 2.13 deprecates.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

from lightning.pytorch.callbacks import BackboneFinetuning, Callback  # noqa: E402

import xfer  # noqa: E402
from external_checks import (  # noqa: E402
    assert_changed,
    assert_deterministic_in_train_mode,
    assert_paths_are_named_modules,
    assert_same,
    bn_stats,
    images,
)
from xfer import select as S  # noqa: E402
from xfer.integrations.lightning import XferFinetuning  # noqa: E402
from xfer.pipeline import apply_stage  # noqa: E402
from xfer.state import SelectionError  # noqa: E402


class Classifier(L.LightningModule):
    """``backbone`` (two conv-BN blocks, a Dropout between) and ``head``, as
    ``BackboneFinetuning`` expects; the optimizer takes what trains when it is built."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        torch.manual_seed(0)
        block = lambda c_in, c_out: torch.nn.Sequential(  # noqa: E731
            torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out),
            torch.nn.ReLU(),
        )  # fmt: skip
        self.backbone = torch.nn.Sequential(
            block(3, 8), torch.nn.Dropout(0.3), block(8, 8), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )  # fmt: skip
        self.head = torch.nn.Linear(8, 3)
        self.lr = lr

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=self.lr)


def _loader():
    x, y = images(8, 16)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _trainer(tmp_path, epochs: int, callbacks=(), checkpoints: bool = False) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=checkpoints, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=list(callbacks),
    )  # fmt: skip


class Recorder(Callback):
    """Copies of the model's tensors and BN statistics at the end of every epoch."""

    def __init__(self):
        self.snapshots, self.stats, self.groups = [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots.append(xfer.snapshot(pl_module))
        self.stats.append(bn_stats(pl_module))
        self.groups.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def _params(module, prefix):
    return [n for n, _ in module.named_parameters() if n.startswith(prefix)]


def test_xfer_stages_inside_a_lightning_module(tmp_path):
    module = Classifier()
    assert_paths_are_named_modules(module)
    before, stats = xfer.snapshot(module), bn_stats(module)

    apply_stage(module, xfer.Stage("head", train=S.path("head"), bn="frozen", mode="inference"))
    frozen = xfer.frozen_tensors(module)
    _trainer(tmp_path, 2).fit(module, _loader())
    after = xfer.snapshot(module)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(module))
    assert_changed(before, after, _params(module, "head."))
    assert_deterministic_in_train_mode(module, module, images(4, 16)[0])  # Dropout pinned off

    # Fine-tune the second block (a digit in its path) with BN "affine": the first block and
    # every BN statistic stay as they were.
    finetune = xfer.Stage("finetune", train=S.path("backbone.2.**") | S.path("head"), bn="affine")
    apply_stage(module, finetune)
    assert xfer.summary(module, print_fn=None).row("backbone.2.1").bn == "affine"
    before, frozen = xfer.snapshot(module), xfer.frozen_tensors(module)
    _trainer(tmp_path, 2).fit(module, _loader())
    after = xfer.snapshot(module)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(module))
    assert_changed(before, after, _params(module, "backbone.2.") + _params(module, "head."))
    assert_same(before, after, _params(module, "backbone.0.0."))  # its conv; its BN: affine


class TrainEachEpoch(Classifier):
    """A module that sets train mode at each epoch start, as much user code does (and as
    Lightning itself did before 2.2, which now restores the modes it found)."""

    def on_train_epoch_start(self):
        self.train()


def _run(tmp_path, callback, module_type=Classifier) -> tuple[Classifier, Recorder, dict]:
    module, recorder = module_type(), Recorder()
    initial = xfer.snapshot(module)
    _trainer(tmp_path, 3, [callback, recorder]).fit(module, _loader())
    return module, recorder, initial


# BackboneFinetuning's BN trained from the start, so its unfreeze finds them in the
# optimizer already and warns: part of what this test shows.
@pytest.mark.filterwarnings("ignore:The provided params to be frozen already exist")
@pytest.mark.parametrize("module_type", [Classifier, TrainEachEpoch], ids=lambda t: t.__name__)
def test_xfer_finetuning_keeps_bn_pinned_where_backbone_finetuning_moves_it(tmp_path, module_type):
    # Same model, same data, same schedule: frozen in epoch 0, the backbone trains from 1.
    native = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=1e-3)
    ours = XferFinetuning(unfreeze_at_epoch=1, frozen_bn="frozen", bn="affine", backbone_lr=1e-3)
    _, native_log, initial = _run(tmp_path / "native", native, module_type)
    module, xfer_log, initial_too = _run(tmp_path / "xfer", ours, module_type)
    assert_same(initial, initial_too)  # the same start

    stats = {k: initial[k] for k in bn_stats(module)}
    backbone = _params(module, "backbone.")
    bn_affine = [k for k in backbone if k.startswith(("backbone.0.1.", "backbone.2.1."))]
    convs = [k for k in backbone if k not in bn_affine]
    for log in (native_log, xfer_log):
        # Epoch 0: the backbone's convs are frozen under both callbacks ...
        assert_same(initial, log.snapshots[0], convs)
        assert_changed(initial, log.snapshots[0], _params(module, "head."))
        # ... and from the unfreeze epoch on, both train it (a second param group).
        assert_changed(log.snapshots[0], log.snapshots[2], backbone)
        assert len(log.groups[0]) == 1 and log.groups[2][1] > 0

    # Only xfer's keeps the frozen BN as it was. BackboneFinetuning freezes with
    # BaseFinetuning.freeze(train_bn=True) whatever its own train_bn says: the backbone's
    # BN stays trainable and in train mode, its statistics and gamma/beta move in the
    # frozen epoch. xfer's pins also outlive the module's own model.train() each epoch.
    moved = [k for k in stats if not np.array_equal(stats[k], native_log.stats[0][k])]
    assert moved == list(stats)
    assert_changed(initial, native_log.snapshots[0], bn_affine)
    assert_same(initial, xfer_log.snapshots[0], backbone)
    for epoch in range(3):  # frozen in epoch 0, then "affine": statistics never move
        assert_same(stats, xfer_log.stats[epoch])
    assert xfer_log.groups[2][1] == pytest.approx(1e-3)  # the backbone's own lr
    assert_changed(xfer_log.snapshots[0], xfer_log.snapshots[2], bn_affine)  # gamma/beta train
    summary = xfer.summary(module, print_fn=None)
    assert {summary.row(p).bn for p in ("backbone.0.1", "backbone.2.1")} == {"affine"}
    assert summary.row("backbone.1").mode == "inherit"  # Dropout follows the model again


def test_xfer_finetuning_pins_dropout_while_frozen(tmp_path):
    module = Classifier()
    callback = XferFinetuning(unfreeze_at_epoch=5)
    _trainer(tmp_path, 1, [callback]).fit(module, _loader())
    assert xfer.summary(module, print_fn=None).row("backbone.1").mode == "inference"
    assert_deterministic_in_train_mode(module, module, images(4, 16)[0])


def test_xfer_finetuning_selects_any_backbone_and_derives_its_lr(tmp_path):
    module = Classifier(lr=1e-2)
    recorder = Recorder()
    callback = XferFinetuning(unfreeze_at_epoch=1, backbone=S.path("backbone.2.**"))
    _trainer(tmp_path, 2, [callback, recorder]).fit(module, _loader())
    assert recorder.groups[1] == [pytest.approx(1e-2), pytest.approx(1e-3)]  # lr * lr_ratio
    # backbone.0 was never selected: it trained from the start, its BN in train mode.
    assert xfer.summary(module, print_fn=None).row("backbone.0.1").bn == "train"


def test_xfer_finetuning_with_bn_training_while_frozen(tmp_path):
    # frozen_bn="train": BackboneFinetuning's BN behaviour, asked for; the convs stay.
    module, recorder = Classifier(), Recorder()
    initial = xfer.snapshot(module)
    callback = XferFinetuning(unfreeze_at_epoch=1, frozen_bn="train", bn="affine")
    _trainer(tmp_path, 2, [callback, recorder]).fit(module, _loader())
    bn = [
        k for k in _params(module, "backbone.") if k.startswith(("backbone.0.1.", "backbone.2.1."))
    ]
    convs = [k for k in _params(module, "backbone.") if k not in bn]
    assert_same(initial, recorder.snapshots[0], convs)
    assert_changed(initial, recorder.snapshots[0], bn)
    stats = bn_stats(module)
    assert_changed(initial, recorder.stats[0], stats)  # "train": statistics update in epoch 0
    assert_same(recorder.stats[0], recorder.stats[1])  # "affine" from epoch 1
    assert_changed(recorder.snapshots[0], recorder.snapshots[1], convs)


# The resumed run saves into the first run's directory, as a resumed run does.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_xfer_finetuning_resumes_after_the_unfreeze(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = Classifier()
    initial = xfer.snapshot(first)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    callbacks = [XferFinetuning(1, backbone_lr=1e-3), checkpoint]
    _trainer(tmp_path, 2, callbacks, checkpoints=True).fit(first, _loader())

    resumed, recorder = Classifier(), Recorder()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    callbacks = [XferFinetuning(1, backbone_lr=1e-3), recorder, checkpoint]
    trainer = _trainer(tmp_path, 3, callbacks, checkpoints=True)
    trainer.fit(resumed, _loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(recorder.snapshots) == 1  # epoch 2 only
    assert recorder.groups[0] == [pytest.approx(1e-2), pytest.approx(1e-3)]
    assert_changed(xfer.snapshot(first), recorder.snapshots[0], _params(resumed, "backbone."))
    assert_same({k: initial[k] for k in bn_stats(resumed)}, recorder.stats[0])
    summary = xfer.summary(resumed, print_fn=None)
    assert (
        summary.row("backbone.0.1").bn == "affine" and summary.row("backbone.1").mode == "inherit"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"unfreeze_at_epoch": -1}, ValueError, "unfreeze_at_epoch must be an integer >= 0"),
        ({"backbone": "backbone.**"}, TypeError, "Expected an xfer selector"),
        ({"bn": "frozn"}, ValueError, "Unknown BN policy 'frozn'"),
        ({"frozen_mode": "eval"}, ValueError, "Unknown mode 'eval'"),
        ({"backbone_lr": 0}, ValueError, "backbone_lr must be a positive finite number"),
    ],
)
def test_xfer_finetuning_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        XferFinetuning(**kwargs)


def test_xfer_finetuning_refuses_what_would_go_wrong_at_fit(tmp_path):
    class AllParameters(Classifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    with pytest.raises(
        ValueError, match="the optimizer already holds 8 frozen backbone parameters"
    ):
        _trainer(tmp_path, 1, [XferFinetuning(1)]).fit(AllParameters(), _loader())
    with pytest.raises(SelectionError, match=r"path\('encoder.\*\*'\) matches no unit"):
        callback = XferFinetuning(1, backbone=S.path("encoder.**"))
        _trainer(tmp_path, 1, [callback]).fit(Classifier(), _loader())
