"""``xfer.summary``: both switches of every unit, in one table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from xfer._adapter import find_adapter
from xfer.policy import BNPolicy
from xfer.tables import table


@dataclasses.dataclass(frozen=True)
class UnitRow:
    """One line of the summary."""

    path: str
    kind: str
    trainable: str  # "yes", "no", "partly", or "" for a unit without parameters
    mode: str
    bn: str  # the BN policy name, "" for other units
    n_trainable: int
    n_frozen: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """What ``xfer.summary`` returns: the rows, the totals and a note on saving."""

    backend: str
    model: str
    rows: tuple[UnitRow, ...]
    persistence: str

    @property
    def n_trainable(self) -> int:
        return sum(r.n_trainable for r in self.rows)

    @property
    def n_frozen(self) -> int:
        return sum(r.n_frozen for r in self.rows)

    def row(self, path: str) -> UnitRow:
        """The row of the unit at ``path``."""
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(
            f"No unit {path!r} in this summary; paths: {[r.path for r in self.rows][:8]}"
        )

    def __str__(self) -> str:
        header = ("path", "kind", "trainable", "mode", "bn policy", "# trainable", "# frozen")
        body = [
            (r.path, r.kind, r.trainable, r.mode, r.bn, f"{r.n_trainable:,}", f"{r.n_frozen:,}")
            for r in self.rows
        ]
        top, *rows = table(header, body, right={5, 6}).split("\n")
        rule = "-" * len(top)
        lines = [f"{self.model} ({self.backend})", top, rule, *rows, rule]
        lines.append(
            f"total: {self.n_trainable:,} trainable, {self.n_frozen:,} frozen parameters "
            f"in {len(self.rows)} units"
        )
        lines.append(f"saving: {self.persistence}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Summary({self.model}, {len(self.rows)} units, "
            f"{self.n_trainable:,} trainable, {self.n_frozen:,} frozen)"
        )


def summary(model: Any, print_fn: Callable[[str], None] | None = print) -> Summary:
    """Print and return, per unit: path, kind, trainable, mode, BN policy and parameter counts.

    Pass ``print_fn=None`` to only get the structured result.

    Example:
        >>> import xfer
        >>> s = xfer.summary(model)                          # doctest: +SKIP
        >>> s.row("base.bn1").bn                             # doctest: +SKIP
        'frozen'
    """
    adapter = find_adapter(model)
    rows = []
    for unit in adapter.units(model):
        n_trainable, n_frozen = adapter.param_counts(unit)
        mode = adapter.get_mode(unit)
        if n_trainable + n_frozen == 0:
            trainable = ""
        else:
            trainable = "partly" if n_trainable and n_frozen else ("yes" if n_trainable else "no")
        bn = BNPolicy.from_state(n_frozen == 0, mode).name if unit.is_bn else ""
        rows.append(UnitRow(unit.path, unit.kind, trainable, mode, bn, n_trainable, n_frozen))
    result = Summary(adapter.name, type(model).__name__, tuple(rows), adapter.persistence())
    if print_fn is not None:
        print_fn(str(result))
    return result
