"""Training and inference with Flax NNX's own tools: ``nnx.Optimizer``, optax, ``nnx.jit``.

Every step is the Flax docs loop: an ``nnx.Optimizer`` over ``nnx.Param`` (frozen
parameters are :class:`~xfer.backends.flax.Frozen`, not Params, so they get no gradient
and no optimizer state), ``model.train()``, a jitted ``nnx.value_and_grad`` step. JAX
places arrays on its default device itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xfer._adapter import ADAM_EPSILON, MOMENTUM, StepOptions
from xfer.backends._common import attribute_set, group_of_path
from xfer.backends.flax.units import MODE_ATTRIBUTES
from xfer.data import PREDICT_CHUNK, inference_chunks

# optax transformations by xfer._adapter.OPTIMIZERS name: (learning rate, weight decay).
_OPTIMIZERS = {
    "sgd": lambda lr, wd: optax.sgd(lr),
    "momentum": lambda lr, wd: optax.sgd(lr, momentum=MOMENTUM),
    "adam": lambda lr, wd: optax.adam(lr, eps=ADAM_EPSILON),
    "adamw": lambda lr, wd: optax.adamw(lr, eps=ADAM_EPSILON, weight_decay=wd),
}


def _cross_entropy(model, x, y):
    logits = model(x).astype(jnp.float32)  # a no-op, except in mixed precision
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _update(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_cross_entropy)(model, x, y)
    optimizer.update(model, grads)
    return loss


_train_step = nnx.jit(_update)


@nnx.jit
def _train_steps(model, optimizer, x_all, y_all, order, count):
    # ``count`` steps in one program, step i on the batch ``order[i]``: the model and the
    # optimizer cross into lax.fori_loop as NNX state (Flax's nnx.split / nnx.merge). A
    # traced count: one compilation for every chunk of the stage, the epoch's last included.
    graphdef, state = nnx.split((model, optimizer))

    def body(i, carry):
        state, losses = carry
        model, optimizer = nnx.merge(graphdef, state)
        loss = _update(model, optimizer, x_all[order[i]], y_all[order[i]])
        return nnx.state((model, optimizer)), losses.at[i].set(loss)

    losses = jnp.zeros(order.shape[0], jnp.float32)
    state, losses = jax.lax.fori_loop(0, count, body, (state, losses))
    nnx.update((model, optimizer), state)
    return losses


@functools.partial(jax.jit, static_argnums=0)
def _infer(graphdef, rngs, rest, x):
    # The modes are static graph data (pinned subclasses, use_running_average): a change of
    # state is another graphdef, which retraces. Only the RNG state changes in inference.
    model = nnx.merge(graphdef, rngs, rest)
    return model(x), nnx.state(model, nnx.RngState)


def _labels(group_of: dict[str, str], params):
    """optax.multi_transform labels: each parameter's group, found from its unit path."""

    def label(keypath, _):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
        if keys and keys[-1] == "value":  # the leaf inside a Variable
            keys = keys[:-1]
        return group_of.get(".".join(keys[:-1]), "default")

    return jax.tree_util.tree_map_with_path(label, params)


def _transform(options: StepOptions) -> optax.GradientTransformation:
    """The optax transformation of ``options``: one per learning rate, chosen per parameter
    by its unit path when there are learning-rate groups."""
    make = _OPTIMIZERS[options.optimizer]
    tx = make(options.lr, options.weight_decay)
    if not options.lr_groups:
        return tx
    group_of = {path: f"group{i}" for path, i in group_of_path(options.lr_groups).items()}
    transforms = {"default": tx}
    for i, (_, group_lr) in enumerate(options.lr_groups):
        transforms[f"group{i}"] = make(group_lr, options.weight_decay)
    return optax.multi_transform(transforms, functools.partial(_labels, group_of))


# --- the Engine contract -----------------------------------------------------------------


def fit(model, x, y, *, epochs, batch_size, lr, weight_decay) -> list[float]:
    # The Flax docs loop, with no xfer code in it: an Optimizer over nnx.Param,
    # nnx.value_and_grad (default nnx.Param) and model.train() every epoch.
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)
    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    losses = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for i in range(0, len(xs), batch_size):
            loss = _train_step(model, optimizer, xs[i : i + batch_size], ys[i : i + batch_size])
            total += float(loss) * len(ys[i : i + batch_size])
        losses.append(total / len(ys))
    return losses


def trainer(model: nnx.Module, options: StepOptions) -> Callable[[object, object], float]:
    # The step is nnx.jit-compiled whatever ``compile_step`` says.
    tx = _transform(options)
    # Built compiled: eagerly, each zeros_like of the optimizer state compiles on its own.
    opt = nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param))(model)

    # Mixed precision the Flax way: dtype=bfloat16 (the computation) on every layer that
    # has one beside its param_dtype, which stays float32; BatchNorm reduces in float32.
    # Set while a step runs: the dtype is static graph data, so nnx.jit compiles the step
    # once for it, and evaluation keeps the model's own.
    mixed = _float32_layers(model) if options.precision == "bfloat16" else []

    def step(x, y) -> float:
        model.train()
        if isinstance(x, np.ndarray):
            # Converted on the host: jnp.asarray(labels, int32) compiles a conversion.
            x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
        with attribute_set(mixed, "dtype", jnp.bfloat16):
            return float(_train_step(model, opt, x, y))

    def run_steps(x_all, y_all, order, count) -> list[float]:
        model.train()
        with attribute_set(mixed, "dtype", jnp.bfloat16):
            return np.asarray(_train_steps(model, opt, x_all, y_all, order, count))[:count].tolist()

    step.run_steps = run_steps
    return step


def _float32_layers(model: nnx.Module) -> list[nnx.Module]:
    """Flax's layers (Linear, Conv, BatchNorm, ...) that compute in float32: a ``dtype``
    (None: the inputs' and parameters' dtype) beside a float32 ``param_dtype``."""
    return [
        module
        for _, module in nnx.iter_modules(model)
        if "param_dtype" in vars(module)
        and jnp.dtype(module.param_dtype) == jnp.float32
        and (module.dtype is None or jnp.dtype(module.dtype) == jnp.float32)
    ]


def to_device(model, x, y):
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def predict(model, x, *, batch_size=PREDICT_CHUNK) -> np.ndarray:
    model.eval()
    # Compiled, on padded chunks: one compilation per module state instead of one per
    # operation (eager JAX compiles every new primitive shape). The model is split once
    # (Flax's functional API), not by nnx.jit on every chunk: that walk of the module
    # graph cost as much as a ResNet-18's forward on 32 small images.
    graphdef, rngs, rest = nnx.split(model, nnx.RngState, ...)
    out = []
    for c, n in inference_chunks(x, pad=True, size=batch_size):
        logits, rngs = _infer(graphdef, rngs, rest, jnp.asarray(c))
        out.append(np.asarray(logits)[:n])
    nnx.update(model, rngs)  # a Dropout pinned to training draws new masks next time
    return np.concatenate(out)


def place(model: nnx.Module, device: str) -> str:
    # JAX puts arrays on its default device itself.
    actual = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if device not in ("auto", actual):
        raise ValueError(
            f"device={device!r}, but JAX's default device here is {actual}. Use "
            "device='auto', or choose the device before starting Python (JAX_PLATFORMS=cpu "
            "or JAX_PLATFORMS=cuda)."
        )
    return actual


def output_shape(model, x) -> tuple[int, ...]:
    # A probe must not change the model: eval() sets use_running_average/deterministic
    # everywhere, and a fit refused after the probe would leave them set.
    saved = [
        (module, name, getattr(module, name))
        for _, module in nnx.iter_modules(model)
        for name in MODE_ATTRIBUTES
        if name in vars(module)
    ]
    try:
        model.eval()
        return nnx.eval_shape(lambda m, x: m(x), model, jnp.asarray(x, jnp.float32)).shape
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# --- a user's nnx.Optimizer built before the xfer calls -----------------------------------


class StaleOptimizer(ValueError):
    """An ``nnx.Optimizer`` built over other parameters than the model's trainable ones now.

    Raised from ``optimizer.update`` in place of JAX's pytree-structure error when xfer's
    freezing changed the model after the optimizer was built (see
    :func:`explain_stale_optimizers`).

    Example:
        >>> from xfer.backends.flax.engine import StaleOptimizer
        >>> issubclass(StaleOptimizer, ValueError)
        True
    """


def _stale_message(optimizer: nnx.Optimizer, model: nnx.Module) -> str | None:
    """Why ``optimizer`` cannot update ``model``, or None when its state fits the model."""
    params = nnx.as_pure(nnx.state(model, optimizer.wrt, graph=optimizer.graph))
    # The state the optimizer would have if it were built now, by shape only (no compute).
    fresh = jax.eval_shape(optimizer.tx.init, params)
    if jax.tree.structure(fresh) == jax.tree.structure(nnx.as_pure(optimizer.opt_state)):
        return None
    n_now = len(jax.tree.leaves(params))
    wrt = getattr(optimizer.wrt, "__name__", repr(optimizer.wrt))
    return (
        f"this nnx.Optimizer was built before xfer changed what trains: the model now has "
        f"{n_now} trainable parameter arrays (wrt={wrt}) and the optimizer's state "
        "was made for another set. Build the optimizer after xfer.freeze/unfreeze/set_bn, "
        "as Keras compiles after them: nnx.Optimizer(model, tx, wrt=nnx.Param)."
    )


def explain_stale_optimizers() -> None:
    """Make ``nnx.Optimizer.update`` name the fix when the optimizer predates a freeze.

    An optimizer built before ``xfer.freeze`` holds state for parameters that are now
    :class:`~xfer.backends.flax.Frozen`; its next ``update`` fails deep inside JAX with a
    pytree-structure error that names neither xfer nor the fix. NNX has no hook for this, so
    the method is wrapped once: only a failing update is looked at, and only an optimizer
    whose state no longer fits the model's parameters gets :class:`StaleOptimizer` (the
    JAX error chained); every other error passes through unchanged. Installed when the
    Flax backend loads.

    Example:
        >>> explain_stale_optimizers()   # idempotent
        >>> nnx.Optimizer.update.__xfer_explains_stale__
        True
    """
    update = nnx.Optimizer.update
    if getattr(update, "__xfer_explains_stale__", False):
        return

    @functools.wraps(update)
    def update_naming_the_fix(self, model, grads, /, **kwargs):
        try:
            return update(self, model, grads, **kwargs)
        except (ValueError, TypeError) as error:
            message = _stale_message(self, model)
            if message is None:
                raise
            raise StaleOptimizer(message) from error

    update_naming_the_fix.__xfer_explains_stale__ = True
    nnx.Optimizer.update = update_naming_the_fix


explain_stale_optimizers()
