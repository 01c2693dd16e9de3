"""PyTorch-specific guarantees, each beside the native behaviour it protects against."""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S

pytestmark = pytest.mark.backends("torch")
torch = pytest.importorskip("torch")


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=False)  # keeps zero-filled gradients, as older code does
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _nchw(kit):
    x, y = data()
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)


def _train_one_step_then_freeze(kit, freeze):
    model = kit.model()
    x, y = _nchw(kit)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    _step(model, opt, x, y)
    freeze(model)
    before = xfer.snapshot(model)
    for _ in range(3):
        _step(model, opt, x, y)
    return before, xfer.snapshot(model)


def test_native_requires_grad_false_does_not_protect_from_adamw_with_stale_gradients(kit):
    before, after = _train_one_step_then_freeze(kit, lambda m: m.base.requires_grad_(False))
    assert not np.array_equal(before["base.block1.conv.weight"], after["base.block1.conv.weight"])


def test_xfer_freeze_is_safe_from_adamw_with_stale_gradients(kit):
    before, after = _train_one_step_then_freeze(kit, lambda m: xfer.freeze(m, S.path("base.**")))
    for key in before:
        if key.startswith("base."):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert not np.array_equal(before["head.dense.weight"], after["head.dense.weight"])


def test_native_parent_train_undoes_child_eval_but_not_an_xfer_pin(kit):
    x, _ = _nchw(kit)
    native, pinned = kit.model(), kit.model()
    native.base.eval()
    xfer.set_mode(pinned, "inference", S.path("base.**"))
    for model in (native, pinned):
        model.train()  # what every training loop does each epoch
        with torch.no_grad():
            model(x)
    assert native.base.block1.bn.training  # the native trap
    assert int(native.base.block1.bn.num_batches_tracked) == 1
    assert not pinned.base.block1.bn.training
    assert int(pinned.base.block1.bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(
        pinned.base.block1.bn.running_mean.numpy(), np.zeros(8, "float32")
    )


def test_predict_runs_the_pinned_modes_without_the_pin_hooks_and_puts_them_back(kit):
    # predict lifts the pins' hooks for its forwards (PyTorch's fast call path), with
    # every pinned mode applied once; the hooks, a user's among them, come back in order.
    x, _ = data(12)
    model = kit.model(dropout=0.5)
    xfer.set_mode(model, "inference", S.path("base.**"))
    xfer.set_mode(model, "train", S.path("head.drop"))
    seen = []
    model.base.block1.bn.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, len(m._forward_pre_hooks)))
    )
    hooks = {name: list(m._forward_pre_hooks.values()) for name, m in model.named_modules()}
    assert len(hooks["base.block1.bn"]) == 2
    adapter = xfer._adapter.find_adapter(model)
    first, second = (adapter.predict(model, x, batch_size=4) for _ in range(2))
    assert seen == [(False, 1)] * 6  # 2 predicts of 3 chunks: the user's hook alone
    assert not np.allclose(first, second)  # the head's Dropout pinned to train draws masks
    assert {n: list(m._forward_pre_hooks.values()) for n, m in model.named_modules()} == hooks
    model.train()  # and the pins hold again in the user's own loop
    with torch.no_grad():
        model(_nchw(kit)[0])
    assert seen[-1] == (False, 2) and int(model.base.block1.bn.num_batches_tracked) == 0


def test_pinned_model_still_deepcopies_and_pickles(kit, tmp_path):
    import copy

    model = kit.model()
    xfer.freeze(model, S.path("base.**"))
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    for other in (clone, loaded):
        assert xfer.export_state(other) == xfer.export_state(model)
        other.train()
        with torch.no_grad():
            other(_nchw(kit)[0])
        assert not other.base.block2.bn.training


def test_a_bare_layer_is_one_unit(kit):
    layer = torch.nn.Linear(3, 2)
    xfer.freeze(layer)
    s = xfer.summary(layer, print_fn=None)
    assert [(r.path, r.trainable, r.n_frozen) for r in s.rows] == [("", "no", 8)]


class _UserNet(torch.nn.Module):
    """A user's module with BatchNorm1d, which raises in training mode on a batch of one."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 16))
        self.bn = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.features(x))))


def _user_stage():
    return [xfer.Stage("all", train=S.all(), bn="train", lr=0.05, epochs=2)]


def test_a_trailing_batch_of_one_does_not_crash_batchnorm1d():
    """17 images in batches of 8 once left a batch of 1 after two batches had trained."""
    model = _UserNet()
    history = xfer.TransferPipeline(model, _user_stage(), optimizer="sgd", batch_size=8).fit(
        data(17)
    )
    assert all(np.isfinite(history.losses()))


def test_an_error_mid_epoch_puts_back_the_weights_of_the_epoch_start():
    """A user's own batches can still end with one example: torch raises on the last
    batch, after the first two trained; none of their updates may stay."""
    model = _UserNet()
    before = xfer.export_weights(model)  # every parameter and statistic the rollback keeps
    x, y = data(17)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    pipe = xfer.TransferPipeline(model, _user_stage(), optimizer="sgd")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        pipe.fit(batches)
    after = xfer.export_weights(model)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_a_refused_fit_leaves_the_modules_in_the_mode_they_were_in(kit):
    model = kit.model()
    model.train()
    model.base.drop.eval()  # a user's own mix of modes
    modes = {name: m.training for name, m in model.named_modules()}
    x, y = data(8)
    with pytest.raises(ValueError, match="labels must lie in"):
        xfer.TransferPipeline(model, _user_stage()).fit((x, y + 10))
    assert {name: m.training for name, m in model.named_modules()} == modes
