"""``xfer demo``: the Keras-guide transfer recipe, run with each framework's *own* loop.

A small BN-CNN is pretrained on a source domain, then transferred to a shifted target
domain in two stages (head on a frozen base pinned to inference; then everything at a
low learning rate with BN ``"affine"``). Between stages only xfer calls change the model;
the training itself is the framework's standard loop. After each stage the demo checks
that every tensor xfer promised to keep is bit-identical.

This is the demo *job* (a library function, :func:`run`); the ``xfer demo`` command that
prints it is :mod:`xfer.cli.demo`, its data :mod:`xfer.data.stripes`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import xfer
from xfer import select as S
from xfer._adapter import load_adapter
from xfer.data.stripes import NUM_CLASSES, stripes_task


@dataclasses.dataclass
class StageResult:
    stage: str
    trains: str
    bn: str
    loss: float
    accuracy: float
    n_trainable: int
    n_frozen: int
    kept: int  # tensors that had to stay bit-identical
    changed: list[str]  # those that did not
    seconds: float


def run(
    backend: str, seed: int = 0, progress: Callable[[str], None] | None = None
) -> tuple[list[StageResult], Any]:
    """Run the three stages on ``backend``; return the per-stage results and the model.

    Example:
        >>> results, model = run("torch")
        >>> [r.changed for r in results]
        [[], [], []]
    """
    adapter = load_adapter(backend)
    source_x, source_y = stripes_task(256, "source", seed)
    target_x, target_y = stripes_task(64, "target", seed + 1)
    val_x, val_y = stripes_task(256, "target", seed + 2)
    model = xfer.models.small_cnn(NUM_CLASSES, 3, width=8, dropout=0.2, seed=seed, backend=backend)

    def stage(name, trains, x, y, epochs, lr):
        if progress is not None:
            progress(f"{backend}: {name} ({epochs} epochs on {len(x)} images)")
        keys = xfer.frozen_tensors(model)
        before = xfer.snapshot(model)
        start = time.perf_counter()
        losses = adapter.fit(model, x, y, epochs=epochs, batch_size=32, lr=lr, weight_decay=1e-4)
        seconds = time.perf_counter() - start
        accuracy = float((adapter.predict(model, val_x).argmax(-1) == val_y).mean())
        s = xfer.summary(model, print_fn=None)
        bn = sorted({r.bn for r in s.rows if r.bn})
        changed = xfer.changed_tensors(before, xfer.snapshot(model), keys)
        return StageResult(
            name,
            trains,
            "/".join(bn),
            losses[-1],
            accuracy,
            s.n_trainable,
            s.n_frozen,
            len(keys),
            changed,
            seconds,
        )

    results = [stage("pretrain", "everything, on the source domain", source_x, source_y, 8, 1e-2)]
    xfer.freeze(model, S.path("base.**"))
    xfer.set_mode(model, "inference", S.path("base.**"))
    results.append(stage("head", "head; base frozen, in inference", target_x, target_y, 20, 1e-2))
    xfer.unfreeze(model, S.path("base.**"))
    results.append(
        stage("finetune", "everything; BN statistics frozen", target_x, target_y, 10, 1e-3)
    )
    return results, model
