"""The backend registry and the backend flag.

``REGISTRY`` is the one table of the ways xfer runs (torch, keras-jax, keras-torch, flax):
the CLI, the reports, the benchmarks, the tests and noxfile.py all read it.

The flag says which framework xfer uses for what it builds itself.

Read once from ``XFER_BACKEND``; changed with :func:`set_backend` or, for a block,
:func:`backend_context`. Models passed to the state operations are recognised from
their type, whatever the flag says. Nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Flavour:
    """One way xfer runs: a backend, and for Keras the engine under it.

    ``label`` is how the CLI, the reports, the benchmarks, the tests and nox name it;
    ``extras`` are the ``pip install "xfer[...]"`` extras that install it; ``packages``
    must be importable for it to run (the import probe).
    """

    label: str
    backend: str
    keras_engine: str | None
    extras: tuple[str, ...]
    packages: tuple[str, ...]


# THE backend registry: every other list of backends or labels is derived from it.
REGISTRY = (
    Flavour("torch", "torch", None, ("torch",), ("torch",)),
    Flavour("keras-jax", "keras", "jax", ("keras",), ("keras", "jax")),
    Flavour("keras-torch", "keras", "torch", ("keras", "torch"), ("keras", "torch")),
    Flavour("flax", "flax", None, ("flax",), ("flax", "optax", "jax")),
)
BACKENDS = tuple(dict.fromkeys(f.backend for f in REGISTRY))  # torch, keras, flax
LABELS = tuple(f.label for f in REGISTRY)
KERAS_ENGINES = tuple(f.keras_engine for f in REGISTRY if f.keras_engine)  # no tensorflow

_current: str | None = None


def validate_backend(name: object) -> str:
    """``name`` as a backend name, or a ``ValueError`` listing the valid ones.

    Example:
        >>> validate_backend("Torch")
        'torch'
    """
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"Unknown xfer backend {name!r}: expected one of {', '.join(BACKENDS)}. "
            "Set it with xfer.set_backend('torch') or XFER_BACKEND=torch."
        )
    return name.lower()


def flavour(label: str) -> Flavour:
    """The registry entry named ``label``, or a ``ValueError`` listing the labels.

    Example:
        >>> flavour("keras-torch").keras_engine
        'torch'
    """
    for entry in REGISTRY:
        if entry.label == label:
            return entry
    raise ValueError(f"Unknown xfer backend label {label!r}: expected one of {', '.join(LABELS)}.")


def keras_engine() -> str:
    """The Keras engine of this process: Keras's own answer once Keras is imported, else
    what it will be: ``KERAS_BACKEND``, or when unset the engine :func:`require` will choose
    (the first installed). Keras reads it once per process.

    Example:
        >>> keras_engine() in KERAS_ENGINES
        True
    """
    keras = sys.modules.get("keras")
    if keras is not None:
        return keras.backend.backend()
    chosen = os.environ.get("KERAS_BACKEND")
    installed = [e for e in KERAS_ENGINES if is_installed(e)] or [KERAS_ENGINES[0]]
    return chosen.lower() if chosen else installed[0]


def label(backend: str) -> str:
    """How the CLI, the reports and the tests name ``backend`` in this process:
    ``keras-jax`` or ``keras-torch`` for Keras, else the backend name.

    Example:
        >>> label("flax")
        'flax'
    """
    return f"keras-{keras_engine()}" if validate_backend(backend) == "keras" else backend


def other_keras_engine() -> str:
    """The Keras engine this process does not run (compare and semantics run it in a
    subprocess).

    Example:
        >>> other_keras_engine() in KERAS_ENGINES
        True
    """
    return next(e for e in KERAS_ENGINES if e != keras_engine())


def is_installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    return package in sys.modules or importlib.util.find_spec(package) is not None


def missing(backend: str) -> list[str]:
    """The packages ``backend`` needs that are not installed (for Keras, Keras itself:
    its engine is checked when Keras is chosen).

    Example:
        >>> missing("torch") in ([], ["torch"])
        True
    """
    rows = [f.packages for f in REGISTRY if f.backend == validate_backend(backend)]
    needed = [p for p in rows[0] if all(p in row for row in rows)]
    return [p for p in needed if not is_installed(p)]


def require(backend: str) -> None:
    """Raise an ``ImportError`` naming the extra to install if ``backend`` cannot run."""
    if missing(backend):
        raise ImportError(
            f"xfer backend {backend!r} needs {', '.join(missing(backend))}, which is not installed. "
            f'Install it with: pip install "xfer[{backend}]"'
        )
    if backend == "keras":
        _choose_keras_engine()


def _choose_keras_engine() -> None:
    """Keras reads KERAS_BACKEND once, at import; pick an installed engine if unset."""
    if "keras" in sys.modules:
        return
    engine = os.environ.get("KERAS_BACKEND")
    if engine:
        # Refused here, before Keras's import fails deep in its own traceback.
        if engine.lower() not in KERAS_ENGINES:
            raise ImportError(
                f"KERAS_BACKEND={engine} is not an engine xfer can use: xfer supports the "
                "jax and torch engines of Keras; set KERAS_BACKEND=jax or torch."
            )
        return
    for engine in KERAS_ENGINES:
        if is_installed(engine):
            os.environ["KERAS_BACKEND"] = engine
            warnings.warn(
                f"KERAS_BACKEND is not set; xfer chose the installed {engine!r} engine for "
                "Keras. Set KERAS_BACKEND=jax or KERAS_BACKEND=torch to choose yourself.",
                stacklevel=3,
            )
            return
    raise ImportError(
        "Keras needs an engine and neither jax nor torch is installed: "
        'pip install "xfer[keras]" (jax) or "xfer[keras,torch]" with KERAS_BACKEND=torch.'
    )


def _default() -> str:
    env = os.environ.get("XFER_BACKEND")
    if env:
        return validate_backend(env)
    for name in BACKENDS:
        if not missing(name):
            return name
    raise ImportError(
        'No framework for xfer is installed: pip install "xfer[torch]", "xfer[keras]" '
        'or "xfer[flax]".'
    )


def get_backend() -> str:
    """The current backend name: ``"torch"``, ``"keras"`` or ``"flax"``.

    Example:
        >>> import xfer
        >>> xfer.get_backend() in ("torch", "keras", "flax")
        True
    """
    global _current
    if _current is None:
        _current = _default()
    return _current


def set_backend(name: str) -> None:
    """Choose the framework xfer uses for what it builds itself (models, data, the CLI).

    Raises ``ValueError`` for an unknown name and ``ImportError`` naming the extra to
    install if the framework is missing.

    Example:
        >>> import xfer
        >>> xfer.set_backend("torch")
        >>> xfer.get_backend()
        'torch'
    """
    global _current
    name = validate_backend(name)
    require(name)
    _current = name


@contextlib.contextmanager
def backend_context(name: str) -> Iterator[str]:
    """Use another backend inside a ``with`` block, then restore the previous one.

    Example:
        >>> import xfer
        >>> with xfer.backend_context("torch"):
        ...     xfer.get_backend()
        'torch'
    """
    global _current
    previous = _current
    set_backend(name)
    try:
        yield _current
    finally:
        _current = previous
