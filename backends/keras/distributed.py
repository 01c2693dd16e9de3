"""Data parallelism on Keras 3 with Keras's own ``keras.distribution.DataParallel``
(``xfer._adapter.Distributed``), on the jax engine: one process drives several devices.

``DataParallel`` lays out the variables a model creates *under* it. xfer's pipeline gets a
model already built, so for the stage its variables are replicated over the
distribution's mesh (``keras.distribution.distribute_tensor`` with the distribution's own
variable layout, then ``assign``), and every ``train_on_batch`` runs in
``distribution.scope()``: Keras then shards each batch along its first axis, builds the
optimizer's variables replicated, and compiles the step with the variables' shardings. The
loss, the gradients and BatchNormalization's batch statistics are the whole batch's.

Not built: Keras on the torch engine (Keras 3.15 has no data parallelism there), and
training across processes. Those refuse with what to do instead.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from xfer._adapter import StepOptions
from xfer.backends._common import single_process_only
from xfer.backends.keras.engine import trainer

join_world, distributed_trainer, broadcast_model, gather = single_process_only("keras")


def device_count() -> int:
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.local_device_count()


def sharded_trainer(model, options: StepOptions, devices: int) -> Callable[[object, object], float]:
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"devices={devices}: keras.distribution.DataParallel runs on the jax engine only "
            "(Keras 3 has no data parallelism on the torch engine): use KERAS_BACKEND=jax, or "
            "xfer's torch backend under torchrun for a plain torch model, or leave devices unset."
        )
    import jax

    distribution = keras.distribution.DataParallel(devices=jax.local_devices()[:devices])
    for variable in model.weights:
        layout = distribution.get_variable_layout(variable)
        variable.assign(keras.distribution.distribute_tensor(variable.value, layout))
    with distribution.scope():
        step = trainer(model, options)

    def sharded_step(x, y) -> float:
        with distribution.scope():
            return step(x, y)

    def finish() -> None:
        for variable in model.weights:  # back on one device, as before the stage
            variable.assign(jax.device_put(variable.value, jax.local_devices()[0]))

    sharded_step.finish = finish
    return sharded_step
