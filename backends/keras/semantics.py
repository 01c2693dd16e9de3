"""What Keras 3's own switches do, measured on tiny fresh models; the same probes through xfer.

Each probe is the function named like its row of ``xfer.semantics.ROWS`` (which
``xfer.semantics.probe(module)`` finds and runs) and returns ``{"native": value, "xfer":
value, "detail": str}``; nothing is assumed about the installed version. Keras reads
``KERAS_BACKEND`` once per process, so this measures the engine of this process only
(``xfer.semantics`` runs the other engine in a subprocess). Every probe builds fresh layers
and seeds its own Dropout, so the global seed is never touched.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import keras
import numpy as np

import xfer
from xfer import select as S
from xfer.semantics import (
    batch_of_one_cell,
    fast_variance_cell,
    frozen_bn_cell,
    variance_error,
    variance_estimator_cell,
)

L = keras.layers
_SHAPE = (6, 6, 3)


def versions() -> dict[str, str]:
    """The installed versions these probes measure: Keras and its engine.

    Example:
        >>> versions()                                        # doctest: +SKIP
        {'keras': '3.15.1', 'jax': '0.10.2'}
    """
    # The local part ("+cpu") names a build, not a behaviour.
    engine = keras.backend.backend()
    version = importlib.metadata.version(engine).split("+")[0]
    return {"keras": keras.__version__, engine: version}


def _images(n: int = 8, offset: float = 0.5, seed: int = 0) -> np.ndarray:
    # A non-zero mean and a non-unit spread, so that BN statistics visibly move.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *_SHAPE)) * 2.0 + offset).astype("float32")


def _np(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _base() -> keras.Model:
    inputs = keras.Input(_SHAPE)
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Dropout(0.5, seed=1, name="drop")(x)
    return keras.Model(inputs, L.GlobalAveragePooling2D(name="pool")(x), name="base")


def _functional() -> tuple[keras.Model, keras.Model]:
    """The transfer-learning guide's nesting: ``base(inputs, training=False)``."""
    base = _base()
    inputs = keras.Input(_SHAPE)
    outputs = L.Dense(2, name="dense")(base(inputs, training=False))
    return keras.Model(inputs, outputs, name="model"), base


class _Subclassed(keras.Model):
    """A subclassed model whose call passes ``training=False`` to its base explicitly."""

    def __init__(self):
        super().__init__(name="subclassed")
        self.base = _base()
        self.dense = L.Dense(2, name="dense")

    def call(self, x, training=None):
        return self.dense(self.base(x, training=False))


def _subclassed() -> tuple[keras.Model, keras.Model]:
    model = _Subclassed()
    model(_images(2))
    return model, model.base


def _stats(base: keras.Model) -> list[np.ndarray]:
    bn = base.get_layer("bn")
    return [_np(bn.moving_mean).copy(), _np(bn.moving_variance).copy()]


def _changed(before: list[np.ndarray], base: keras.Model) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, _stats(base), strict=True))


def _fit(model: keras.Model, x: np.ndarray) -> None:
    # Keras's own loop, compiled after any change of state as Keras requires.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, np.zeros((len(x), 2), "float32"), batch_size=8, epochs=1, verbose=0)


def _kept(model, action: Callable[[], None]) -> bool:
    """Whether every tensor xfer promised to keep is bit-identical after ``action``."""
    keys = xfer.frozen_tensors(model)
    before = xfer.snapshot(model)
    action()
    return bool(keys) and not xfer.changed_tensors(before, xfer.snapshot(model), keys)


def freeze_stops_bn_stats() -> dict:
    x = _images()
    model, base = _functional()
    base.trainable = False
    before = _stats(base)
    model(x, training=True)
    native = not _changed(before, base)

    model, _ = _functional()
    xfer.freeze(model, S.path("base.**"))
    kept = _kept(model, lambda: _fit(model, x))
    return {
        "native": native,
        "xfer": kept,
        "detail": "base.trainable=False, model(x, training=True): moving statistics "
        + ("unchanged (BN with trainable=False runs in inference)" if native else "changed"),
    }


def parent_train_undoes_child_eval() -> dict:
    x = _images()
    model, base = _functional()
    xfer.set_mode(model, "inference", S.path("base.**"))
    reference = _np(model(x, training=False))
    before = _stats(base)
    same = np.array_equal(_np(model(x, training=True)), reference)
    kept = not _changed(before, base)
    return {
        "native": "n/a",
        "xfer": same and kept,
        "detail": "Keras layers have no persistent mode (the call's `training` decides); xfer: "
        "base pinned to inference, model(x, training=True) gives the inference output",
    }


def _outer_training(build: Callable[[], tuple[keras.Model, keras.Model]]) -> dict:
    x = _images()
    model, base = build()
    base.trainable = True
    before = _stats(base)
    first = _np(model(x, training=True))
    call_stats = _changed(before, base)
    dropout = not np.array_equal(first, _np(model(x, training=True)))
    model, base = build()
    base.trainable = True
    before = _stats(base)
    _fit(model, x)
    fit_stats = _changed(before, base)

    model, _ = build()
    xfer.freeze(model, S.path("base.**"))
    xfer.unfreeze(model, S.path("base.**"))
    kept = _kept(model, lambda: _fit(model, x))

    def said(flag: bool) -> str:
        return "yes" if flag else "no"

    return {
        "native": call_stats or fit_stats or dropout,
        "xfer": kept,
        "detail": f"model(x, training=True): inner BN statistics updated {said(call_stats)}, "
        f"inner Dropout active {said(dropout)}; fit(): inner BN statistics updated "
        f"{said(fit_stats)}",
    }


def outer_training_overrides_inner_false_functional() -> dict:
    return _outer_training(_functional)


def outer_training_overrides_inner_false_subclassed() -> dict:
    return _outer_training(_subclassed)


def _dropout_model() -> keras.Sequential:
    return keras.Sequential(
        [keras.Input((16,)), L.Dense(16, name="dense"), L.Dropout(0.5, seed=1, name="drop")]
    )


def dropout_active_when_frozen() -> dict:
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    model = _dropout_model()
    model.trainable = False
    native = not np.array_equal(_np(model(x, training=True)), _np(model(x, training=False)))

    model = _dropout_model()
    xfer.freeze(model)
    xfer.set_mode(model, "inference", S.type("dropout"))
    same = np.array_equal(_np(model(x, training=True)), _np(model(x, training=False)))
    return {
        "native": native,
        "xfer": same,
        "detail": "model.trainable=False, model(x, training=True): Dropout "
        + ("still drops units" if native else "is off"),
    }


def _bn_forward(bn, x: np.ndarray) -> tuple[bool, bool]:
    """(training-mode output equals the inference output, moving statistics kept)."""
    reference = _np(bn(x, training=False))
    before = [_np(bn.moving_mean).copy(), _np(bn.moving_variance).copy()]
    out = _np(bn(x, training=True))
    after = [_np(bn.moving_mean), _np(bn.moving_variance)]
    kept = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    return np.array_equal(out, reference), kept


def trainable_false_forces_inference() -> dict:
    x = _images()
    bn = L.BatchNormalization()
    bn.build(x.shape)
    bn.trainable = False
    native = _bn_forward(bn, x)
    bn = L.BatchNormalization()
    bn.build(x.shape)
    xfer.freeze(bn)
    detail = "BatchNormalization.trainable=False, called with training=True: " + (
        "inference output, moving statistics kept" if all(native) else "batch statistics"
    )
    return frozen_bn_cell(native, _bn_forward(bn, x), detail)


def bn_default_momentum() -> dict:
    momentum = L.BatchNormalization().momentum
    return {
        "native": f"{momentum:g} (keeps {momentum:g})",
        "xfer": "n/a",
        "detail": f"BatchNormalization().momentum={momentum:g} is the weight of the old value",
    }


def bn_default_epsilon() -> dict:
    return {
        "native": float(L.BatchNormalization().epsilon),
        "xfer": "n/a",
        "detail": "BatchNormalization().epsilon",
    }


def _estimate(x: np.ndarray) -> np.ndarray:
    # momentum=0: the moving variance becomes the batch estimate itself.
    bn = L.BatchNormalization(momentum=0.0)
    bn.build(x.shape)
    bn(x, training=True)
    return _np(bn.moving_variance).astype("float64")


def running_var_estimator() -> dict:
    x = _images(4)[:, :3, :3]
    return variance_estimator_cell(_estimate(x), x, "moving_variance")


def fast_variance() -> dict:
    x = _images(4, offset=1e4)[:, :3, :3]
    return fast_variance_cell(variance_error(_estimate(x), x))


def bn_batch_counter() -> dict:
    bn = L.BatchNormalization()
    bn.build((None, 4))
    names = [v.name for v in bn.weights]
    counter = [n for n in names if n not in ("gamma", "beta", "moving_mean", "moving_variance")]
    return {"native": bool(counter), "xfer": "n/a", "detail": "variables: " + ", ".join(names)}


def batch_of_one_train_mode() -> dict:
    short = []
    for size in (1, 3):
        x = _images(1)[:, :size, :size]
        bn = L.BatchNormalization()
        bn.build(x.shape)
        try:
            out = _np(bn(x, training=True))
            beta = np.allclose(out, _np(bn.beta), atol=1e-3)
            short.append(f"runs at {size}x{size}" + (" (output = beta)" if beta else ""))
        except Exception as error:  # the error is the measurement
            short.append(f"{type(error).__name__} at {size}x{size}: {str(error)[:60]}")

    x = _images(1)[:, :1, :1]
    bn = L.BatchNormalization()
    bn.build(x.shape)
    xfer.set_bn(bn, "frozen")

    def held() -> bool:
        return np.array_equal(_np(bn(x, training=True)), _np(bn(x, training=False)))

    return batch_of_one_cell(short, held, "BatchNormalization(training=True), one image of HxWx3")
