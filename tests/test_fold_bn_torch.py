"""xfer.fold_bn on user-style torch modules: what torch.fx sees decides what folds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import xfer  # noqa: E402

pytestmark = pytest.mark.backends("torch")


def _moved(model):
    # BN statistics and affine away from 0/1/1/0, so a wrong fold shows in the output.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
    return model.eval()


def _bns(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Shared(nn.Module):
    """conv -> bn, and the same conv output also read by a shortcut: that pair cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.bn_pool = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.conv(x)
        y = torch.relu(self.bn(y)) + y
        y = self.bn_up(self.up(y))
        z = self.bn_fc(self.fc(y.mean((2, 3))))
        return self.bn_pool(torch.relu(z))


def test_conv_transpose_and_linear_fold_a_shared_output_and_a_bn_after_relu_stay():
    model = _moved(Shared())
    x = torch.randn(3, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"2 BatchNorm unit\(s\) .* unfolded: bn, bn_pool"):
        folded = xfer.fold_bn(model)
    assert _bns(folded) == ["bn", "bn_pool"]
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-5
    assert folded.up.bias is not None and folded.fc.bias is not None


def test_a_model_left_in_train_mode_folds_its_inference_computation_and_stays_in_train_mode():
    model = _moved(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).train()
    folded = xfer.fold_bn(model)
    assert model.training and model[1].training and not folded.training
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max() <= 1e-6


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return x


def test_a_model_torch_fx_cannot_trace_is_refused_naming_it():
    with pytest.raises(ValueError, match="torch.fx cannot trace this Branches"):
        xfer.fold_bn(Branches().eval())


def test_a_frozen_batchnorm_is_traced_through_and_reported():
    class FrozenBatchNorm2d(nn.Module):  # torchvision's, as detection backbones carry it
        def __init__(self, n):
            super().__init__()
            for name, value in (("weight", 1.5), ("bias", 0.1), ("running_mean", 0.2)):
                self.register_buffer(name, torch.full((n,), value))
            self.register_buffer("running_var", torch.ones(n))

        def forward(self, x):
            scale = self.weight * (self.running_var + 1e-5).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)).eval()
    with pytest.warns(UserWarning, match=r"unfolded: 1"):
        folded = xfer.fold_bn(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
