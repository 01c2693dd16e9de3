"""Data parallelism on Flax NNX the JAX way (``xfer._adapter.Distributed``): one process
drives several devices. The model's state is replicated over a one-axis
``jax.sharding.Mesh``, each global batch is sharded along it (``NamedSharding``), and the
same ``nnx.jit`` step runs as one SPMD program: XLA inserts the reductions, so the loss,
the gradients and BatchNorm's batch statistics are those of the whole batch, as on one
device.

Across processes (a launcher such as torchrun): not built; JAX's own model for several
hosts is ``jax.distributed.initialize`` with one process per host, which xfer does not
drive yet. Those members refuse with what to do instead.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xfer._adapter import StepOptions
from xfer.backends._common import single_process_only
from xfer.backends.flax.engine import trainer

join_world, distributed_trainer, broadcast_model, gather = single_process_only("flax")


def device_count() -> int:
    return jax.local_device_count()


def sharded_trainer(
    model: nnx.Module, options: StepOptions, devices: int
) -> Callable[[object, object], float]:
    mesh = Mesh(np.array(jax.local_devices()[:devices]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec("data"))
    _move_state(model, replicated)
    step = trainer(model, options)  # its optimizer state is built replicated, like the model

    def sharded_step(x, y) -> float:
        if isinstance(x, np.ndarray):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
        return step(jax.device_put(x, batch), jax.device_put(y, batch))

    sharded_step.finish = lambda: _move_state(model, jax.local_devices()[0])
    return sharded_step


def _move_state(model: nnx.Module, where) -> None:
    """Every array of the model's state (parameters, frozen tensors, BN statistics, RNG
    state) put on ``where``, a device or a sharding."""
    nnx.update(model, jax.device_put(nnx.state(model), where))
