"""A BatchNorm frozen by construction (torchvision's, timm's and detectron2's
``FrozenBatchNorm2d``: gamma, beta and the statistics held as buffers) is a BN unit that
xfer reports as ``"frozen"``, and whose tensors count among the frozen ones.

Here as detectron2 writes it (``detectron2/layers/batch_norm.py``), so that the torch
session checks the rule without torchvision; tests/external/test_torchvision.py and
test_timm.py check torchvision's and timm's own classes.
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import select as S

pytestmark = pytest.mark.backends("torch")
torch = pytest.importorskip("torch")
nn = torch.nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class FrozenBatchNormLookalike(nn.Module):
    """The name alone is not enough: this one has a trainable parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale.reshape(1, -1, 1, 1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4), FrozenBatchNormLookalike(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip


def test_frozen_batchnorm_is_a_frozen_bn_unit(kit):
    model = _model()
    summary = xfer.summary(model, print_fn=None)
    row = summary.row("1")
    assert (row.kind, row.bn, row.mode, row.trainable) == ("batchnorm", "frozen", "inference", "no")
    assert (row.n_trainable, row.n_frozen) == (0, 8)  # gamma and beta
    assert summary.row("4").bn == "train" and summary.row("5").kind == "other"
    assert [f for f in xfer.audit(model) if "1" in f.paths] == []
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= set(
        xfer.frozen_tensors(model)
    )


def test_policies_on_a_frozen_batchnorm_leave_it_frozen_and_training_keeps_it(kit):
    model = _model()
    xfer.set_bn(model, "train")  # selects both BN units; the frozen one cannot train
    xfer.freeze(model, S.path("0"))
    summary = xfer.summary(model, print_fn=None)
    assert summary.row("1").bn == "frozen" and summary.row("4").bn == "train"
    before, frozen = xfer.snapshot(model), xfer.frozen_tensors(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    after = xfer.snapshot(model)
    assert frozen and xfer.changed_tensors(before, after, frozen) == []
    assert not np.array_equal(before["4.running_mean"], after["4.running_mean"])
