"""The argument checks that several public functions share: one wording, one rule.

``True`` is an ``int`` to Python, but ``Stage(epochs=True)`` or ``width=True`` is a
mistake, so booleans are never numbers here; numpy's integer and float scalars are.
"""

from __future__ import annotations

import math

import numpy as np


def is_number(value: object) -> bool:
    """A real number (int, float or a numpy scalar of either), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_integer(value: object, what: str, minimum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (>= ``minimum``).

    Example:
        >>> check_integer(3, "epochs", 1)
        >>> check_integer(True, "epochs", 1)
        Traceback (most recent call last):
        ...
        ValueError: epochs must be an integer >= 1, got True.
    """
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not integer or (minimum is not None and value < minimum):
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {expected}, got {value!r}.")


def check_positive(value: object, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive finite number.

    Example:
        >>> check_positive(1e-3, "lr")
        >>> check_positive(float("inf"), "lr")
        Traceback (most recent call last):
        ...
        ValueError: lr must be a positive finite number, got inf.
    """
    if not (is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}.")


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a numeric array is finite, without a temporary of the array's
    size: ``np.isfinite(x).all()`` would allocate a boolean per value (3 MiB for 1,024
    small images, more than a training step of a small model uses), while min and max
    propagate NaN and reach an infinity. Integer arrays are finite; other number types
    (e.g. ml_dtypes' bfloat16) are compared as float32.

    Example:
        >>> all_finite(np.ones((2, 3), "float32")), all_finite(np.array([1.0, np.nan]))
        (True, False)
    """
    array = np.asarray(array)
    if array.dtype.kind in "biu" or array.size == 0:
        return True
    if array.dtype.kind != "f":
        array = array.astype("float32")
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))
