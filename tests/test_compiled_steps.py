"""On the JAX engines, a head stage on cached features runs its steps in chunks of
``STEPS_PER_PROGRAM``, each chunk one call of a compiled program (the step's ``run_steps``):
the losses and weights of one call of the step per batch, bit-identical for a dense head,
to float rounding for a whole CNN (XLA fuses a convolution's step in a loop differently)."""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S
from xfer._adapter import StepOptions, find_adapter
from xfer.pipeline import Callback
from xfer.pipeline.loop import STEPS_PER_PROGRAM


@pytest.mark.backends("keras-jax", "flax")
def test_run_steps_gives_each_steps_loss_and_the_weights_of_one_call_per_batch(kit):
    # The whole model, BN in training mode and dropout included: its moving statistics
    # and RNG state are carried through the program too.
    x, y = data(48)
    order = np.random.default_rng(0).permutation(48).reshape(6, 8)
    chunks = np.zeros((2, STEPS_PER_PROGRAM, 8), np.int32)  # rows past a chunk's count: padding
    chunks[0, :5], chunks[1, :1] = order[:5], order[5:]
    results = []
    for compiled in (False, True):
        model = kit.model(seed=1)
        adapter = find_adapter(model)
        # SGD: Adam would turn the rounding noise of a conv bias before BN (its gradient
        # is zero but for rounding) into steps of the full learning rate.
        step = adapter.trainer(model, StepOptions("momentum", 0.05))
        if compiled:
            on_device = adapter.to_device(model, x, y)
            losses = step.run_steps(*on_device, chunks[0], 5) + step.run_steps(
                *on_device, chunks[1], 1
            )
        else:
            losses = [step(x[i], y[i]) for i in order]
        results.append((losses, xfer.export_weights(model)))
    (losses, weights), (compiled_losses, compiled_weights) = results
    assert len(compiled_losses) == 6 and all(isinstance(v, float) for v in compiled_losses)
    np.testing.assert_allclose(compiled_losses, losses, rtol=1e-6)
    assert compiled_losses != losses[:5] + losses[:1]  # each step on its own batch
    for key, value in weights.items():
        np.testing.assert_allclose(compiled_weights[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


class _Losses(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float]] = []

    def on_step_end(self, pipeline, stage, index, epoch, step, loss):
        self.steps.append((epoch, step, loss))


@pytest.mark.backends("keras-jax", "flax")
def test_a_cached_head_stage_in_compiled_chunks_matches_its_run_step_by_step(kit, tmp_path):
    # 70 full batches (a chunk of 64 and one of 6, padded) and an odd-sized last one of 3,
    # two epochs; features in memory take the compiled chunks, on disk one step per batch.
    stages = [
        xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", epochs=2),
    ]
    runs = []
    for options in ({}, {"cache_memory": 0, "cache_dir": tmp_path}):
        model = kit.model(seed=2, dropout=0.0)
        losses = _Losses()
        pipe = xfer.TransferPipeline(
            model, stages, optimizer="adam", batch_size=8, callbacks=[losses], **options
        )
        history = pipe.fit(data(8 * 70 + 3))
        runs.append((history.stages[0], losses.steps, xfer.export_weights(model)))
    (disk, disk_steps, disk_weights), (memory, memory_steps, memory_weights) = runs[1], runs[0]
    assert memory.cache.startswith("memory") and disk.cache.startswith("disk")
    assert [(e, s) for e, s, _ in memory_steps] == [(e, s) for e in (1, 2) for s in range(1, 72)]
    assert memory_steps == disk_steps
    assert [e.loss for e in memory.epochs] == [e.loss for e in disk.epochs]
    for key, value in disk_weights.items():
        np.testing.assert_array_equal(memory_weights[key], value, err_msg=key)


@pytest.mark.backends("torch", "keras-torch")
def test_eager_engines_have_no_compiled_steps(kit):
    # Their head stage runs one step per batch: PyTorch has no compiled loop over batches
    # to hand them to (torch.compile compiles one step).
    model = kit.model()
    step = find_adapter(model).trainer(model, StepOptions("adam", 0.01))
    assert not hasattr(step, "run_steps")
