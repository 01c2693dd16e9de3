"""On the JAX engines a stage compiles its programs once: the same number of XLA programs
at 1 and at 3 epochs, the last partial batch included (its step compiles once per stage,
not once per epoch), counted with JAX's own monitoring events."""

from __future__ import annotations

import pytest

import xfer
from kits import data
from xfer import select as S

PROGRAM = "/jax/core/compile/backend_compile_duration"  # compiled, or loaded from the cache


def _stages(epochs: int) -> list[xfer.Stage]:
    return [
        xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", epochs=epochs),
        xfer.Stage("finetune", train=S.all(), bn="train", lr=0.01, epochs=epochs),
    ]


@pytest.mark.backends("keras-jax", "flax")
def test_a_stage_compiles_as_many_programs_at_3_epochs_as_at_1(kit):
    import jax

    programs: list[str] = []

    def count(event: str, _seconds: float, **_) -> None:
        if event == PROGRAM:
            programs.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        counted = {}
        for epochs in (1, 3):
            model = kit.model(seed=3, dropout=0.0)  # built first: its initialisers compile
            jax.clear_caches()
            programs.clear()
            pipe = xfer.TransferPipeline(model, _stages(epochs), optimizer="adam", batch_size=8)
            history = pipe.fit(data(20), data(6, seed=1))  # batches of 8, 8 and 4
            assert history.stages[0].cache.startswith("memory")
            counted[epochs] = len(programs)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert counted[1] == counted[3] > 0, counted
