"""The PyTorch transfer-learning tutorial itself, on torchvision's ``resnet18``
(weights=None): "ConvNet as fixed feature extractor" and fine-tuning; ``mobilenet_v3_small``;
and detection backbones that hold torchvision's ``FrozenBatchNorm2d``, which xfer reports
as frozen BN. Runs in ``nox -s tests-torchvision`` (torchvision needs torch 2.14.1).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch import nn  # noqa: E402

import xfer  # noqa: E402
from external_checks import (  # noqa: E402
    assert_changed,
    assert_deterministic_in_train_mode,
    assert_glob_selects_subtree,
    assert_paths_are_named_modules,
    assert_random_in_train_mode,
    assert_same,
    bn_stats,
    images,
)
from xfer import select as S  # noqa: E402


def _resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 3)  # the tutorial's new head
    return model


def _train_model(model, optimizer, epochs: int = 2):
    """The tutorial's ``train_model``, on one tiny batch per phase: ``model.train()`` for
    the training phase and ``model.eval()`` for validation, every epoch."""
    criterion = nn.CrossEntropyLoss()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    x, y = images(4, 32)
    for _epoch in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            optimizer.zero_grad()
            with torch.set_grad_enabled(phase == "train"):
                loss = criterion(model(x), y)
                if phase == "train":
                    loss.backward()
                    optimizer.step()
        scheduler.step()


def _params(model, prefixes):
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def test_fixed_feature_extractor_as_the_tutorial_writes_it_moves_bn_statistics():
    # The tutorial: requires_grad=False on every parameter, a new fc, SGD on fc only.
    model = _resnet18()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("fc.")
    stats = bn_stats(model)
    _train_model(model, torch.optim.SGD(model.fc.parameters(), lr=1e-3, momentum=0.9))
    moved = [k for k, v in bn_stats(model).items() if not (v == stats[k]).all()]
    assert moved == list(stats)  # the "fixed" features are not fixed: train() moves BN


def test_fixed_feature_extractor_with_xfer_is_fixed():
    model = _resnet18()
    assert_paths_are_named_modules(model)
    assert_glob_selects_subtree(model, "layer4.1")
    xfer.freeze(model, ~S.path("fc"))  # BN "frozen": statistics pinned too
    before, stats = xfer.snapshot(model), bn_stats(model)
    _train_model(model, torch.optim.SGD(model.fc.parameters(), lr=1e-3, momentum=0.9))
    after = xfer.snapshot(model)
    assert_same(before, after, [k for k in before if not k.startswith("fc.")])
    assert_same(stats, bn_stats(model))
    assert_changed(before, after, ["fc.weight", "fc.bias"])
    assert_deterministic_in_train_mode(model, model, images(4, 32)[0])


def test_finetuning_with_early_layers_frozen_and_bn_affine():
    # The tutorial's fine-tuning (SGD on model.parameters()), with the stem and layer1
    # frozen and every other BN "affine": gamma/beta train, statistics stay.
    model = _resnet18()
    early = S.path("conv1") | S.path("bn1") | S.path("layer1.**")
    xfer.freeze(model, early)
    xfer.set_bn(model, "affine", S.path("layer[234].**"))
    summary = xfer.summary(model, print_fn=None)
    assert summary.row("layer1.0.bn2").bn == "frozen" and summary.row("layer3.1.bn1").bn == "affine"
    before, frozen, stats = xfer.snapshot(model), xfer.frozen_tensors(model), bn_stats(model)
    _train_model(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    after = xfer.snapshot(model)
    assert set(_params(model, ("conv1.", "bn1.", "layer1."))) <= set(frozen)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(model))
    assert_changed(before, after, _params(model, ("layer2.", "layer3.", "layer4.", "fc.")))


def test_mobilenet_v3_small_backbone_frozen_and_its_dropout_pinned():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=3)
    x = images(4, 32)[0]
    assert_random_in_train_mode(model, model, x)  # classifier.2 is a Dropout
    assert_glob_selects_subtree(model, "features.12")
    xfer.freeze(model, S.path("features.**"))
    xfer.set_mode(model, "inference", S.path("classifier.2"))
    before, frozen, stats = xfer.snapshot(model), xfer.frozen_tensors(model), bn_stats(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_model(model, optimizer)
    after = xfer.snapshot(model)
    assert set(_params(model, "features.")) <= set(frozen)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(model))
    assert_changed(before, after, _params(model, "classifier."))
    assert_deterministic_in_train_mode(model, model, x)


def _frozen_bn_rows(model):
    frozen_bn = torchvision.ops.misc.FrozenBatchNorm2d
    paths = {n for n, m in model.named_modules() if isinstance(m, frozen_bn)}
    rows = [r for r in xfer.summary(model, print_fn=None).rows if r.path in paths]
    assert paths and len(rows) == len(paths)
    return rows


def _assert_reported_frozen(model) -> None:
    for row in _frozen_bn_rows(model):
        assert (row.kind, row.bn, row.mode, row.trainable) == (
            "batchnorm",
            "frozen",
            "inference",
            "no",
        )
        assert row.n_trainable == 0 and row.n_frozen > 0  # gamma and beta, held as buffers
    paths = {r.path for r in _frozen_bn_rows(model)}
    findings = [f for f in xfer.audit(model) if f.code.startswith("bn-")]
    assert not [f for f in findings if paths.intersection(f.paths)]


def test_detection_backbone_with_frozen_batchnorm_is_reported_and_trains():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=2)
    assert_paths_are_named_modules(model)
    _assert_reported_frozen(model)
    xfer.freeze(model, S.path("body.**") & ~S.path("body.layer4.**"))
    xfer.set_bn(model, "affine")  # FrozenBatchNorm2d cannot train: left frozen, no error
    _assert_reported_frozen(model)
    before, frozen = xfer.snapshot(model), xfer.frozen_tensors(model)
    assert "body.layer3.1.bn2.running_var" in frozen and "body.layer3.1.bn2.weight" in frozen
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x = images(2, 64)[0]
    for _ in range(2):
        model.train()
        optimizer.zero_grad()
        sum(level.square().mean() for level in model(x).values()).backward()
        optimizer.step()
    after = xfer.snapshot(model)
    assert_same(before, after, frozen)
    assert_same(before, after, [k for k in before if ".bn" in k or "downsample.1" in k])
    assert_changed(before, after, _params(model, ("body.layer4.", "fpn.")))


def test_faster_rcnn_frozen_batchnorm_is_reported():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    # fasterrcnn_resnet50_fpn uses FrozenBatchNorm2d only with pretrained weights; its
    # backbone builder, as here, has it by default.
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    model = torchvision.models.detection.FasterRCNN(backbone, num_classes=3)
    _assert_reported_frozen(model)
    xfer.freeze(model, S.path("backbone.body.**"))
    summary = xfer.summary(model, print_fn=None)
    assert summary.row("backbone.body.layer4.1.conv2").trainable == "no"
    assert summary.row("roi_heads.box_predictor.cls_score").trainable == "yes"


def test_fold_bn_folds_every_bn_of_resnet18_and_mobilenet_v3_within_float32_rounding():
    # torchvision's own models, traced by torch.fx: every BN follows a conv.
    for model in (_resnet18(), torchvision.models.mobilenet_v3_small(weights=None, num_classes=3)):
        x = images(2, 32)[0]
        model.train()
        with torch.no_grad():
            for _ in range(5):  # statistics away from 0/1
                model(torch.randn(8, 3, 32, 32) * 2 + 1)
        model.eval()
        with torch.no_grad():
            expected = model(x)
            folded = xfer.fold_bn(model)
            got = folded(x)
        assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
