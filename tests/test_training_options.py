"""Training options of the pipeline: where it trains (``device``) and the framework's
optional compiler (``compile_step``); mixed precision is tests/test_mixed_precision.py."""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S


def _stages():
    return [
        xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05),
        xfer.Stage("finetune", train=S.all(), bn="affine", lr=0.01, epochs=2),
    ]


def _fit(kit, stages=None, **options):
    model = kit.model(seed=3, dropout=0.0)
    options = {"optimizer": "adam", "batch_size": 8, **options}
    history = xfer.TransferPipeline(model, stages or _stages(), **options).fit(
        data(32), data(12, seed=1)
    )
    return model, history


def test_device_auto_trains_where_the_framework_computes_and_says_so(kit):
    _, history = _fit(kit, stages=_stages()[:1], device="auto")
    expected = "cuda" if _gpu(kit) else "cpu"
    assert history.device == expected and str(history).startswith(f"{kit.id.split('-')[0]} on")


def test_a_device_that_is_not_there_is_refused_before_training(kit):
    if kit.id == "torch" and _gpu(kit):
        pytest.skip("PyTorch moves the model to either device")
    model = kit.model(seed=3)
    before = xfer.export_weights(model)
    missing = "cpu" if _gpu(kit) else "cuda"
    with pytest.raises(ValueError, match=f"device='{missing}', but"):
        xfer.TransferPipeline(model, _stages(), device=missing).fit(data(16))
    after = xfer.export_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        xfer.TransferPipeline(model, _stages(), device="gpu")


def _gpu(kit) -> bool:
    if kit.id in ("torch", "keras-torch"):
        import torch

        return torch.cuda.is_available()
    import jax

    return jax.default_backend() == "gpu"


@pytest.mark.backends("torch", "keras-torch")
def test_compile_step_gives_the_eager_numbers(kit):
    # torch.compile (Keras on torch: jit_compile=True, which is torch.compile too).
    stages = [xfer.Stage("all", train=S.all(), bn="train", lr=0.01)]
    # SGD: Adam would magnify the float noise in the conv biases' (near-zero) gradients.
    plain, plain_history = _fit(kit, stages, optimizer="momentum")
    compiled, history = _fit(kit, stages, optimizer="momentum", compile_step=True)
    np.testing.assert_allclose(history.losses(), plain_history.losses(), rtol=1e-4, atol=1e-5)
    expected, got = xfer.export_weights(plain), xfer.export_weights(compiled)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_step_takes_batches_already_on_the_device(kit):
    # What the pipeline does on a GPU: the arrays go to the device once, batches are indexed
    # there with numpy indices, and the step takes them as it takes numpy batches.
    from xfer._adapter import StepOptions, find_adapter

    x, y = data(16)
    index = np.arange(16)[::-1].copy()
    losses = []
    for on_device in (False, True):
        model = kit.model(seed=3, dropout=0.0)
        adapter = find_adapter(model)
        xfer.pipeline.apply_stage(model, _stages()[1], adapter)
        step = adapter.trainer(model, StepOptions("momentum", 0.01))
        if on_device:
            x_all, y_all = adapter.to_device(model, x, y)
            batch = (x_all[index], y_all[index])
        else:
            batch = (x[index], y[index])
        losses.append([step(*batch) for _ in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
