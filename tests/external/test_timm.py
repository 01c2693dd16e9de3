"""xfer on timm models (random weights): ``resnet50``, ``efficientnet_b0`` with drop-path,
and a model after ``timm.layers.freeze_batch_norm_2d`` (timm's ``FrozenBatchNormAct2d``),
trained with timm's own optimizer factory and loss. Runs in ``nox -s tests-torchvision``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

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


def _model(name: str, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def _train(model, epochs: int = 2):
    """timm's pieces of a training loop: its optimizer factory (which skips parameters that
    do not require grad) and its label-smoothing loss; ``model.train()`` every epoch."""
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    x, y = images(4, 32)
    for _epoch in range(epochs):
        model.train()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def _params(model, prefixes):
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def test_resnet50_head_and_last_block_train_the_rest_is_frozen():
    model = _model("resnet50")
    assert_paths_are_named_modules(model)
    assert_glob_selects_subtree(model, "layer4.2")
    xfer.freeze(model, ~S.path("fc"))
    xfer.unfreeze(model, S.path("layer4.2.**"))
    xfer.set_bn(model, "affine", S.path("layer4.2.**"))
    assert xfer.summary(model, print_fn=None).row("layer4.2.bn3").bn == "affine"
    before, frozen, stats = xfer.snapshot(model), xfer.frozen_tensors(model), bn_stats(model)
    _train(model)
    after = xfer.snapshot(model)
    assert set(_params(model, ("conv1.", "layer1.", "layer4.1."))) <= set(frozen)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(model))
    assert_changed(before, after, _params(model, ("layer4.2.", "fc.")))
    assert_deterministic_in_train_mode(model, model.forward_features, images(4, 32)[0])


def test_efficientnet_b0_drop_path_is_off_in_the_pinned_backbone():
    model = _model("efficientnet_b0", drop_path_rate=0.2, drop_rate=0.2)
    x = images(4, 32)[0]
    assert_random_in_train_mode(model, model.forward_features, x)  # DropPath in blocks
    assert_glob_selects_subtree(model, "blocks.5.0")
    backbone = ~S.path("classifier")
    xfer.freeze(model, backbone)
    xfer.set_mode(model, "inference", backbone)  # DropPath (timm's own module) too
    drop_paths = [
        r for r in xfer.summary(model, print_fn=None).rows if r.path.endswith("drop_path")
    ]
    assert drop_paths and {r.mode for r in drop_paths} == {"inference"}
    before, frozen, stats = xfer.snapshot(model), xfer.frozen_tensors(model), bn_stats(model)
    _train(model)
    after = xfer.snapshot(model)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(model))
    assert_changed(before, after, _params(model, "classifier."))
    assert_deterministic_in_train_mode(model, model.forward_features, x)


def test_freeze_batch_norm_2d_is_reported_as_frozen_bn():
    model = timm.layers.freeze_batch_norm_2d(_model("efficientnet_b0"))
    frozen_bn = {n for n, m in model.named_modules() if type(m).__name__ == "FrozenBatchNormAct2d"}
    assert frozen_bn and type(model.bn1).__module__.startswith("timm.")
    rows = [r for r in xfer.summary(model, print_fn=None).rows if r.path in frozen_bn]
    assert len(rows) == len(frozen_bn)
    assert {(r.kind, r.bn, r.mode, r.trainable) for r in rows} == {
        ("batchnorm", "frozen", "inference", "no")
    }
    assert not [f for f in xfer.audit(model) if f.code.startswith("bn-")]
    xfer.freeze(model, S.path("blocks.**"))
    before, frozen = xfer.snapshot(model), xfer.frozen_tensors(model)
    assert "blocks.6.0.bn1.running_mean" in frozen and "bn2.weight" in frozen
    _train(model)
    after = xfer.snapshot(model)
    assert_same(before, after, frozen)
    assert_same(before, after, [k for k in before if ".bn" in k or k.startswith("bn")])
    assert_changed(before, after, _params(model, ("conv_stem.", "conv_head.", "classifier.")))
