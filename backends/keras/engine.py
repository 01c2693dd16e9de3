"""Keras 3 engine: training with Keras's own ``compile``/``train_on_batch``/``fit``,
inference per pin state, and where Keras puts the variables; the ``Engine`` members.

Everything trains through ``model.compile`` called after the xfer calls, as Keras requires
after any change of ``trainable`` (it collects the trainable variables there). The one
thing Keras has no public API for, a learning rate per group of variables, is
:func:`scale_learning_rates`.
"""

from __future__ import annotations

import keras
import numpy as np

from xfer._adapter import ADAM_EPSILON, MOMENTUM, StepOptions
from xfer.backends._common import attribute_set, group_of_path
from xfer.backends.keras.units import own_params, pin_state, units, walk
from xfer.data import PREDICT_CHUNK, inference_chunks

# (lr, weight decay) -> the optimizer; settings shared with the other backends.
OPTIMIZERS = {
    "sgd": lambda lr, wd: keras.optimizers.SGD(lr),
    "momentum": lambda lr, wd: keras.optimizers.SGD(lr, momentum=MOMENTUM),
    "adam": lambda lr, wd: keras.optimizers.Adam(lr, epsilon=ADAM_EPSILON),
    "adamw": lambda lr, wd: keras.optimizers.AdamW(lr, weight_decay=wd, epsilon=ADAM_EPSILON),
}


def scale_learning_rates(optimizer, factors: dict[int, float]) -> None:
    """Give variables their own learning rate: ``factors[id(variable)]`` times the
    optimizer's (1 for a variable not in ``factors``). AdamW's decoupled weight decay
    still uses the optimizer's rate.

    Private Keras API, for want of a public one: Keras 3 optimizers have no parameter
    groups, and the public ``update_step`` is bypassed by the torch engine's fused
    optimizers. Every engine updates the variables in ``_backend_update_step(grads,
    variables, learning_rate)`` (torch fuses it, jax loops), so the variables are split by
    factor there and each group updated with its own rate. Written for
    ``units.KERAS_TESTED``; tests/test_keras.py checks the hook still scales the step.
    """
    update = optimizer._backend_update_step

    def grouped_update(grads, variables, learning_rate):
        groups: dict[float, tuple[list, list]] = {}
        for grad, variable in zip(grads, variables, strict=True):
            group = groups.setdefault(factors.get(id(variable), 1.0), ([], []))
            group[0].append(grad)
            group[1].append(variable)
        for factor, (group_grads, group_variables) in groups.items():
            update(group_grads, group_variables, learning_rate * factor)

    # An instance attribute, past Keras's attribute tracking: this optimizer only.
    optimizer.__dict__["_backend_update_step"] = grouped_update


def _lr_factors(model, options: StepOptions) -> dict[int, float]:
    # {id(variable): group lr / lr}; a variable of units in several groups takes the first.
    group_of = group_of_path(options.lr_groups)
    grouped = sorted(
        ((group_of[u.path], u.native) for u in units(model) if u.path in group_of),
        key=lambda pair: pair[0],
    )
    factors: dict[int, float] = {}
    for group, layer in grouped:
        for v in own_params(layer):
            factors.setdefault(id(v), options.lr_groups[group][1] / options.lr)
    return factors


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _inference(model):
    """(variables, forward, jitted forward): ``model(x, training=False)`` as a pure
    function of the variables' values, cached on the model per pin state (jax engine)."""
    import jax

    pins = pin_state(model)
    cached = model.__dict__.get("_xfer_inference")
    if cached is None or cached[0] != pins:
        variables = list(model.weights)  # a fixed order, whatever the trainable flags

        def forward(values, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return model(x, training=False)

        cached = (pins, variables, forward, jax.jit(forward))
        model.__dict__["_xfer_inference"] = cached  # beside Keras's tracking, like the pins
    return cached[1:]


def _eager_inference(model):
    import torch

    def forward(x):
        # As Keras's own predict_step on torch: no autograd graph through trainable layers.
        with torch.no_grad():
            return model(x, training=False)

    return forward


def default_device() -> tuple[str, str]:
    """Where Keras puts new variables (``"cuda"`` or ``"cpu"``), and how to choose it."""
    if keras.backend.backend() == "torch":
        # A new tensor goes where Keras puts variables (its default device, or the
        # keras.device scope's).
        device = str(keras.ops.convert_to_tensor(0.0).device)
        return ("cuda" if device.startswith("cuda") else "cpu"), (
            "CUDA_VISIBLE_DEVICES='' hides the GPU from torch"
        )
    import jax

    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    return device, "JAX_PLATFORMS=cpu or =cuda picks the device"


# --- Engine members --------------------------------------------------------------------------


def fit(model, x, y, *, epochs, batch_size, lr, weight_decay) -> list[float]:
    # Keras's own loop; compiling here also rebuilds the train step after xfer calls.
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=weight_decay), loss=_loss())
    history = model.fit(
        np.asarray(x, "float32"), np.asarray(y), batch_size=batch_size, epochs=epochs,
        shuffle=False, verbose=0,
    )  # fmt: skip
    return [float(v) for v in history.history["loss"]]


def trainer(model, options: StepOptions):
    native = OPTIMIZERS[options.optimizer](options.lr, options.weight_decay)
    if options.lr_groups:
        scale_learning_rates(native, _lr_factors(model, options))
    # Keras's own loop: compile after the xfer calls (Keras collects the trainable
    # variables there), then train_on_batch, which returns that batch's loss.
    model.compile(
        optimizer=native,
        loss=_loss(),
        jit_compile=True if options.compile_step else "auto",  # "auto": XLA on jax, eager on torch
    )

    # Mixed precision the Keras way, on a built model: the mixed_bfloat16 policy (float32
    # variables, bfloat16 computation) on every float32 layer while a step runs; BN computes
    # its statistics in float32 and Keras's losses take float32. On jax the step is traced
    # at its first call, under the policy; evaluation runs under the model's own.
    mixed = _float32_layers(model) if options.precision == "bfloat16" else []

    def step(x, y) -> float:
        if isinstance(x, np.ndarray):
            x, y = np.asarray(x, "float32"), np.asarray(y)
        with attribute_set(mixed, "dtype_policy", "mixed_bfloat16"):
            return float(model.train_on_batch(x, y))

    if keras.backend.backend() == "jax":
        step.run_steps = _compiled_steps(model, mixed)
    return step


def _compiled_steps(model, mixed: list):
    """The step's ``run_steps`` on the jax engine: Keras's own stateless ``train_step`` (what
    ``train_on_batch`` jits) in a ``lax.fori_loop``, the state carried through as in Keras's
    guide to a JAX training loop and assigned back to the variables after the program."""
    import jax
    import jax.numpy as jnp

    def steps(state, metrics, x_all, y_all, order, count):
        def body(i, carry):
            (trainable, non_trainable, optimizer), losses = carry
            batch = (x_all[order[i]], y_all[order[i]])
            logs, (trainable, non_trainable, optimizer, _) = model.train_step(
                (trainable, non_trainable, optimizer, metrics), batch
            )
            return (trainable, non_trainable, optimizer), losses.at[i].set(logs["loss"])

        losses = jnp.zeros(order.shape[0], jnp.float32)
        return jax.lax.fori_loop(0, count, body, (state, losses))

    compiled = jax.jit(steps, donate_argnums=0)  # the state, as train_on_batch donates it

    def run_steps(x_all, y_all, order, count) -> list[float]:
        if not model.optimizer.built:  # as train_on_batch builds it, and Keras's JAX guide
            model.optimizer.build(model.trainable_variables)
        groups = (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
        )
        model.reset_metrics()  # each step's logs["loss"] is its batch's, as train_on_batch's
        state = tuple([v.value for v in group] for group in groups)
        metrics = [v.value for v in model.metrics_variables]
        with attribute_set(mixed, "dtype_policy", "mixed_bfloat16"):  # traced under it
            state, losses = compiled(state, metrics, x_all, y_all, order, count)
        for group, values in zip(groups, state, strict=True):
            for variable, value in zip(group, values, strict=True):
                variable.assign(value)
        return np.asarray(losses)[:count].tolist()

    return run_steps


def _float32_layers(model) -> list:
    """The layers the mixed_bfloat16 policy changes: float32 variables and computation
    (a layer built mixed, quantized or integer keeps its own)."""
    return [layer for layer in walk(model) if layer.dtype_policy.name == "float32"]


def to_device(model, x, y):
    convert = keras.ops.convert_to_tensor
    return convert(np.asarray(x, "float32")), convert(np.asarray(y))


def predict(model, x, *, batch_size=PREDICT_CHUNK) -> np.ndarray:
    # Not model.predict(): its cached function would not see pins changed since it was
    # traced. On jax, a function compiled per pin state instead of eager calls (eager
    # JAX compiles every new primitive shape); on torch, eager calls.
    jax_engine = keras.backend.backend() == "jax"
    if jax_engine:
        variables, _, compiled = _inference(model)
        forward = lambda x: compiled([v.value for v in variables], x)  # noqa: E731
    else:
        forward = _eager_inference(model)
    out = [
        keras.ops.convert_to_numpy(forward(c))[:n]
        for c, n in inference_chunks(x, pad=jax_engine, size=batch_size)
    ]
    return np.concatenate(out)


def place(model, device: str) -> str:
    # Keras puts every variable on its engine's default device itself.
    actual, how = default_device()
    if device not in ("auto", actual):
        raise ValueError(
            f"device={device!r}, but Keras on {keras.backend.backend()} places its variables "
            f"on {actual} itself. Use device='auto', or choose the device before starting "
            f"Python ({how})."
        )
    return actual


def output_shape(model, x) -> tuple[int, ...]:
    declared = _declared_output_shape(model, x)
    if declared is not None:
        return declared
    if keras.backend.backend() != "jax":
        return predict(model, x).shape  # eager torch: as cheap as tracing
    import jax

    variables, forward, _ = _inference(model)
    values = [v.value for v in variables]
    return tuple(jax.eval_shape(forward, values, np.asarray(x, "float32")).shape)


def _declared_output_shape(model, x) -> tuple[int, ...] | None:
    """The output shape Keras computed when it built a functional or ``Sequential`` model,
    for inputs of the shape it declares (a ``None`` dimension: any size), when that shape
    has no ``None`` left past the batch; else None. No trace: on jax, tracing a ResNet-18
    for its shape costs 0.3 s, more than a short head stage."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):  # a subclassed model, or one never built
        return None
    if not inputs or len(inputs) != 1 or len(outputs or ()) != 1:
        return None
    declared, given = tuple(inputs[0].shape[1:]), tuple(np.shape(x)[1:])
    if len(declared) != len(given) or any(
        d not in (None, g) for d, g in zip(declared, given, strict=True)
    ):
        return None
    shape = tuple(outputs[0].shape[1:])
    return None if None in shape else (len(x), *shape)
