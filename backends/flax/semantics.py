"""What Flax NNX's own switches do, measured on tiny models; the same probes through xfer.

Each probe is named like the row of ``xfer.semantics.ROWS`` it answers (``xfer.semantics.probe``
finds it by that name) and returns ``{"native": value, "xfer": value, "detail": str}``;
nothing is assumed about the installed version. NNX "freezes" by leaving variables out of
the optimizer's and the gradient's filter, so the native probes do exactly that; the
probes run eagerly (no ``nnx.jit``) because they are a few steps each.

Example (``xfer.semantics.probe(module)`` runs them all and tabulates the cells):
    >>> bn_default_epsilon()["native"]
    1e-05
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import xfer
from xfer import select as S
from xfer.semantics import (
    batch_of_one_cell,
    fast_variance_cell,
    frozen_bn_cell,
    variance_error,
    variance_estimator_cell,
)


def versions() -> dict[str, str]:
    """The installed versions these probes measure.

    Example:
        >>> sorted(versions())
        ['flax', 'jax']
    """
    return {"flax": importlib.metadata.version("flax"), "jax": jax.__version__}


class _Base(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(nnx.relu(self.bn(self.conv(x)))).mean(axis=(1, 2))


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.base = _Base(rngs)
        self.dense = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.base(x))


class _DropoutNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(16, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.dense(x))


def _net() -> _Net:
    return _Net(nnx.Rngs(0))


def _images(n: int = 8, size: int = 6, offset: float = 0.5) -> jnp.ndarray:
    # A non-zero mean and a non-unit spread, so that BN statistics visibly move.
    rng = np.random.default_rng(0)
    return jnp.asarray((rng.normal(size=(n, size, size, 3)) * 2.0 + offset).astype("float32"))


def _stats(bn: nnx.BatchNorm) -> list[np.ndarray]:
    return [np.array(bn.mean.get_value()), np.array(bn.var.get_value())]


def _changed(before: list[np.ndarray], bn: nnx.BatchNorm) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, _stats(bn), strict=True))


def _step(model: nnx.Module, x: jnp.ndarray, wrt) -> None:
    """One step of the Flax docs loop with the filter ``wrt``, after ``model.train()``."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=wrt)
    model.train()

    def loss(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)


def _kept(model: nnx.Module, action: Callable[[], None]) -> bool:
    """Whether every tensor xfer promised to keep is bit-identical after ``action``."""
    keys = xfer.frozen_tensors(model)
    before = xfer.snapshot(model)
    action()
    return bool(keys) and not xfer.changed_tensors(before, xfer.snapshot(model), keys)


_HEAD_ONLY = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("base")))


def freeze_stops_bn_stats() -> dict:
    x = _images()
    model = _net()
    before = _stats(model.base.bn)
    _step(model, x, _HEAD_ONLY)
    native = not _changed(before, model.base.bn)

    model = _net()
    xfer.freeze(model, S.path("base.**"))
    kept = _kept(model, lambda: _step(model, x, nnx.Param))
    return {
        "native": native,
        "xfer": kept,
        "detail": "base left out of nnx.Optimizer(wrt=...) and the grad filter, one step after "
        f"model.train(): BN statistics {'unchanged' if native else 'changed'}",
    }


def parent_train_undoes_child_eval() -> dict:
    x = _images()
    model = _net()
    model.base.bn.eval()
    model.train()
    child = bool(model.base.bn.use_running_average)
    before = _stats(model.base.bn)
    model(x)
    native = not child and _changed(before, model.base.bn)

    model = _net()
    xfer.set_mode(model, "inference", S.path("base.**"))

    def train_forward() -> None:
        model.train()
        train_forward.out = np.asarray(model(x))

    kept = _kept(model, train_forward)
    model.eval()
    same = np.array_equal(train_forward.out, np.asarray(model(x)))
    return {
        "native": native,
        "xfer": kept and same,
        "detail": "bn.eval() then model.train(): bn.use_running_average="
        f"{child}, " + ("the next forward updated its statistics" if native else "kept"),
    }


def dropout_active_when_frozen() -> dict:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)).astype("float32"))
    model = _DropoutNet(nnx.Rngs(0))
    # Native "frozen": the optimizer is built over nothing of the model.
    nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Nothing)
    model.eval()
    reference = np.asarray(model(x))
    model.train()
    native = not np.array_equal(np.asarray(model(x)), reference)

    model = _DropoutNet(nnx.Rngs(0))
    xfer.freeze(model)
    xfer.set_mode(model, "inference", S.type("dropout"))
    model.eval()
    reference = np.asarray(model(x))
    model.train()
    same = np.array_equal(np.asarray(model(x)), reference)
    return {
        "native": native,
        "xfer": same,
        "detail": "parameters out of the optimizer, model.train(): Dropout "
        + ("still drops units" if native else "is off"),
    }


def _bn_forward(bn: nnx.BatchNorm, x: jnp.ndarray) -> tuple[bool, bool]:
    bn.eval()
    reference = np.asarray(bn(x))
    bn.train()
    before = _stats(bn)
    out = np.asarray(bn(x))
    return np.array_equal(out, reference), not _changed(before, bn)


def trainable_false_forces_inference() -> dict:
    x = _images()
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    nnx.Optimizer(bn, optax.sgd(0.1), wrt=nnx.Nothing)
    native = _bn_forward(bn, x)
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    xfer.freeze(bn)
    detail = "BatchNorm out of the optimizer, train(): " + (
        "inference output"
        if native[0]
        else "batch statistics used (freezing lives in the optimizer, not the module)"
    )
    return frozen_bn_cell(native, _bn_forward(bn, x), detail)


def bn_default_momentum() -> dict:
    momentum = nnx.BatchNorm(4, rngs=nnx.Rngs(0)).momentum
    return {
        "native": f"{momentum:g} (keeps {momentum:g})",
        "xfer": "n/a",
        "detail": f"nnx.BatchNorm().momentum={momentum:g} is the weight of the old value",
    }


def bn_default_epsilon() -> dict:
    epsilon = nnx.BatchNorm(4, rngs=nnx.Rngs(0)).epsilon
    return {"native": float(epsilon), "xfer": "n/a", "detail": "nnx.BatchNorm().epsilon"}


def _estimate(x: jnp.ndarray, **options) -> np.ndarray:
    # momentum=0: the moving variance becomes the batch estimate itself.
    bn = nnx.BatchNorm(x.shape[-1], momentum=0.0, rngs=nnx.Rngs(0), **options)
    bn.train()
    bn(x)
    return np.asarray(bn.var.get_value(), "float64")


def running_var_estimator() -> dict:
    x = _images(4, 3)
    return variance_estimator_cell(_estimate(x), x, "var")


def fast_variance() -> dict:
    x = _images(4, 3, offset=1e4)
    fast = variance_error(_estimate(x), x)
    exact = variance_error(_estimate(x, use_fast_variance=False), x)
    return fast_variance_cell(fast, f" by default, {exact:.1e} with use_fast_variance=False")


def bn_batch_counter() -> dict:
    bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    stats = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(bn, nnx.BatchStat))]
    counter = [n for n in stats if n not in ("mean", "var")]
    return {
        "native": bool(counter),
        "xfer": "n/a",
        "detail": "BatchStat variables: " + ", ".join(stats),
    }


def batch_of_one_train_mode() -> dict:
    short = []
    for size in (1, 3):
        bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        bn.train()
        try:
            out = np.asarray(bn(_images(1, size)))
            beta = np.allclose(out, np.asarray(bn.bias.get_value()), atol=1e-3)
            short.append(f"runs at {size}x{size}" + (" (output = beta)" if beta else ""))
        except Exception as error:  # the error is the measurement
            short.append(f"{type(error).__name__} at {size}x{size}: {str(error)[:60]}")

    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    xfer.set_bn(bn, "frozen")
    x = _images(1, 1)
    bn.eval()
    reference = np.asarray(bn(x))
    bn.train()

    def held() -> bool:
        return np.array_equal(np.asarray(bn(x)), reference)

    return batch_of_one_cell(short, held, "nnx.BatchNorm after train(), one image of HxWx3")
