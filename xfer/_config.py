"""The backend flag: which framework xfer uses for what it builds itself.

Read once from ``XFER_BACKEND``; changed with :func:`set_backend` or, for a block,
:func:`backend_context`. Models passed to the state operations are recognised from
their type, whatever the flag says. Nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator

BACKENDS = ("torch", "keras", "flax")

# The packages each backend needs, and the extra that installs them.
_REQUIRES = {"torch": ("torch",), "keras": ("keras",), "flax": ("flax", "optax", "jax")}
_KERAS_ENGINES = ("jax", "torch")  # tensorflow is not supported by xfer

_current: str | None = None


def _validate(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"Unknown xfer backend {name!r}: expected one of {', '.join(BACKENDS)}. "
            "Set it with xfer.set_backend('torch') or XFER_BACKEND=torch."
        )
    return name.lower()


def is_installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    return package in sys.modules or importlib.util.find_spec(package) is not None


def missing(backend: str) -> list[str]:
    """The packages ``backend`` needs that are not installed."""
    return [p for p in _REQUIRES[backend] if not is_installed(p)]


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
        if engine.lower() not in _KERAS_ENGINES:
            raise ImportError(
                f"KERAS_BACKEND={engine} is not an engine xfer can use: xfer supports the "
                "jax and torch engines of Keras; set KERAS_BACKEND=jax or torch."
            )
        return
    for engine in _KERAS_ENGINES:
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
        return _validate(env)
    for name in BACKENDS:
        if all(is_installed(p) for p in _REQUIRES[name]):
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
    name = _validate(name)
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
