"""xfer on Hugging Face vision models (ResNet, MobileNetV2, EfficientNet from tiny configs,
random weights), trained by a plain torch loop that calls ``model.train()`` every epoch and
by ``transformers.Trainer``.

Each model: the backbone frozen with its BN pinned ("frozen"), its last stage unfrozen with
BN "affine" (gamma/beta train, statistics stay); then the frozen tensors must be
bit-identical, every BN statistic unchanged, the pinned Dropout (EfficientNet's
drop-connect) off, the summary's paths ``named_modules()`` names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

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


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A model of transformers, where its backbone is and which part of it fine-tunes."""

    name: str
    build: Callable[[], torch.nn.Module]
    backbone: str  # the attribute that holds the backbone
    last_stage: str  # a dotted path with digits inside the backbone
    features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _resnet():
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return transformers.ResNetForImageClassification(config)


def _mobilenet_v2():
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3)
    return transformers.MobileNetV2ForImageClassification(config)


def _efficientnet():
    # hidden_dim must equal the top conv's width (round_filters(1280) = 320 at width 0.25);
    # depth 0.5 repeats some blocks, and only a repeated block applies its drop-connect.
    config = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320,
        num_labels=3, drop_connect_rate=0.2, dropout_rate=0.2,
    )  # fmt: skip
    return transformers.EfficientNetForImageClassification(config)


MODELS = [
    HFModel("resnet", _resnet, "resnet", "resnet.encoder.stages.1",
            lambda m, x: m.resnet(x).pooler_output),
    HFModel("mobilenet_v2", _mobilenet_v2, "mobilenet_v2", "mobilenet_v2.layer.15",
            lambda m, x: m.mobilenet_v2(x).pooler_output),
    HFModel("efficientnet", _efficientnet, "efficientnet", "efficientnet.encoder.blocks.9",
            lambda m, x: m.efficientnet(x).pooler_output),
]  # fmt: skip


def _prepare(spec: HFModel) -> torch.nn.Module:
    torch.manual_seed(0)
    model = spec.build()
    x, _ = images()
    if spec.name == "efficientnet":  # its drop-connect Dropouts are random unpinned
        assert_random_in_train_mode(model, lambda t: spec.features(model, t), x)
    assert_paths_are_named_modules(model)
    assert_glob_selects_subtree(model, spec.last_stage)
    xfer.freeze(model, S.path(f"{spec.backbone}.**"))  # BN: "frozen"
    xfer.set_mode(model, "inference", S.path(f"{spec.backbone}.**"))  # Dropout off
    xfer.unfreeze(model, S.path(f"{spec.last_stage}.**"))
    xfer.set_bn(model, "affine", S.path(f"{spec.last_stage}.**"))
    summary = xfer.summary(model, print_fn=None)
    bns = [r for r in summary.rows if r.kind == "batchnorm"]
    last = [r for r in bns if r.path.startswith(spec.last_stage + ".")]
    assert last and {r.bn for r in last} == {"affine"}
    assert {r.bn for r in bns if r not in last} == {"frozen"}
    return model


def _check_after_training(spec, model, before, frozen, stats) -> None:
    after = xfer.snapshot(model)
    assert_same(before, after, frozen)
    assert_same(stats, bn_stats(model))
    params = [name for name, _ in model.named_parameters()]
    last_stage = [k for k in params if k.startswith(spec.last_stage + ".")]
    assert_changed(before, after, last_stage)  # the affine BN and convs of the last stage
    assert_changed(before, after, [k for k in params if k.startswith("classifier.")])
    model.train()  # as the next epoch would
    assert_deterministic_in_train_mode(model, lambda t: spec.features(model, t), images()[0])


@pytest.mark.parametrize("spec", MODELS, ids=[m.name for m in MODELS])
def test_plain_torch_loop_keeps_the_frozen_backbone(spec):
    model = _prepare(spec)
    before, frozen, stats = xfer.snapshot(model), xfer.frozen_tensors(model), bn_stats(model)
    x, y = images()
    # All parameters to AdamW with weight decay, as a user would: frozen ones get no grad.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _epoch in range(2):
        model.train()
        for i in (0, 2):
            optimizer.zero_grad()
            model(pixel_values=x[i : i + 2], labels=y[i : i + 2]).loss.backward()
            optimizer.step()
    _check_after_training(spec, model, before, frozen, stats)


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = images()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("spec", MODELS, ids=[m.name for m in MODELS])
def test_transformers_trainer_keeps_the_frozen_backbone(spec, tmp_path):
    model = _prepare(spec)
    before, frozen, stats = xfer.snapshot(model), xfer.frozen_tensors(model), bn_stats(model)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
        learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True,
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_Images())
    result = trainer.train()
    assert result.global_step == 2  # one step per epoch, model.train() before each
    _check_after_training(spec, model, before, frozen, stats)
