"""What tests/test_sharding_jax.py runs in a fresh interpreter with two forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set by the test before JAX starts):
``python sharding_worker.py BACKEND``, BACKEND ``flax`` or ``keras`` (jax engine). It trains
the same stages from the same weights on one device and sharded over two, in this one
process, and prints one JSON line (``xfer.subprocesses.answer``) for the test to assert on.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

import xfer
from xfer import job
from xfer import select as S
from xfer.subprocesses import answer
from xfer.weights import export_weights


def run(backend: str, stages, devices):
    pipe, train, val = job.transfer_pipeline(backend)
    weights, _ = job.pretrained(backend, 0)
    xfer.import_weights(pipe.model, job.start_weights(backend, weights, 0))
    seen = SeenDevices()
    sharded = xfer.TransferPipeline(
        pipe.model, stages, optimizer="momentum", batch_size=16, devices=devices,
        callbacks=[seen],
    )  # fmt: skip
    history = sharded.fit(train, val)
    seen.after = _devices_of(pipe.model)
    return export_weights(pipe.model), history, seen


class SeenDevices(xfer.pipeline.Callback):
    """How many devices the model's arrays lie on while a stage trains, and after."""

    def __init__(self):
        self.during, self.after = set(), set()

    def on_step_end(self, pipeline, stage, index, epoch, step, loss):
        self.during |= _devices_of(pipeline.model)


def _devices_of(model) -> set[int]:
    return {len(a.devices()) for a in jax.tree.leaves(_arrays(model))}


def _arrays(model):
    if hasattr(model, "weights"):  # Keras
        return [v.value for v in model.weights]
    from flax import nnx

    return nnx.state(model)


def main() -> None:
    backend = sys.argv[1]
    keras_guide = job.stages_for("keras_guide", None, None, quick=True)
    train_bn = [xfer.Stage("all", train=S.all(), bn="train", lr=0.01, epochs=2)]
    report = {"devices": jax.local_device_count()}
    for name, stages in (("keras_guide", keras_guide), ("train_bn", train_bn)):
        one, one_history, _ = run(backend, stages, None)
        two, two_history, seen = run(backend, stages, 2)
        report[name] = {
            "largest_difference": max(float(np.abs(one[k] - two[k]).max()) for k in one),
            "losses": [one_history.losses(), two_history.losses()],
            "ok": two_history.ok,
            "history_devices": two_history.devices,
            "devices_during": sorted(seen.during),
            "devices_after": sorted(seen.after),
            "table": str(two_history).splitlines()[0],
        }
    answer(report)


if __name__ == "__main__":
    main()
