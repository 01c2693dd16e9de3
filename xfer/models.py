"""Reference models, defined the same way on every backend (same unit paths)."""

from __future__ import annotations

from typing import Any

from xfer._adapter import load_adapter
from xfer._config import get_backend


def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    *,
    width: int = 8,
    dropout: float = 0.2,
    seed: int = 0,
    backend: str | None = None,
) -> Any:
    """A small BN-CNN: ``base`` (``block1``/``block2`` each conv-BN-ReLU, ``drop``, ``pool``)
    and ``head`` (``drop``, ``dense``), on channels-last images with ``in_channels`` channels.

    BatchNorm uses epsilon 1e-3 and momentum 0.9 (0.1 in PyTorch's convention) everywhere.

    Example:
        >>> import xfer
        >>> model = xfer.models.small_cnn(10, in_channels=1, backend="torch")   # doctest: +SKIP
    """
    for name, value, low in (
        ("num_classes", num_classes, 2),
        ("in_channels", in_channels, 1),
        ("width", width, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"small_cnn: {name} must be an integer >= {low}, got {value!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"small_cnn: dropout must be in [0, 1), got {dropout!r}.")
    adapter = load_adapter(backend or get_backend())
    return adapter.small_cnn(num_classes, in_channels, width=width, dropout=dropout, seed=seed)
