"""BatchNorm folding (``xfer.fold_bn``) on flax: the backend part of ``xfer._adapter.Folding``."""

from __future__ import annotations

from typing import Any

from xfer._adapter import Unit


def fold_bn(model: Any, units: list[Unit]) -> tuple[Any, list[tuple[str, str]]]:
    raise NotImplementedError("fold_bn: not yet on flax (issue 14).")
