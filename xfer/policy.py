"""BatchNorm policies: two independent halves, with four named presets.

A BN unit's policy is not extra state: it *is* the unit's two switches seen from BN's
side. ``affine`` is the unit's ``trainable`` flag (gamma/beta); ``stats="frozen"`` is
the unit pinned to inference (moving statistics used, never changed) and
``stats="update"`` is the unit following the framework's mode (batch statistics and
updates while training, moving statistics at inference).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

AFFINE = ("trainable", "frozen")
STATS = ("update", "frozen")


@dataclasses.dataclass(frozen=True)
class BNPolicy:
    """What a BatchNorm unit does with its affine parameters and its moving statistics.

    Example:
        >>> from xfer import BNPolicy
        >>> BNPolicy(affine="trainable", stats="frozen").name
        'affine'
        >>> BNPolicy.of("adapt")
        BNPolicy(affine='frozen', stats='update')
    """

    affine: Literal["trainable", "frozen"]
    stats: Literal["update", "frozen"]

    def __post_init__(self) -> None:
        if self.affine not in AFFINE or self.stats not in STATS:
            raise ValueError(
                f"BNPolicy(affine={self.affine!r}, stats={self.stats!r}) is invalid: affine "
                f"must be one of {AFFINE} and stats one of {STATS}."
            )

    @property
    def name(self) -> str:
        """The preset name of this policy."""
        return next(n for n, p in PRESETS.items() if p == self)

    @property
    def trainable(self) -> bool:
        """The unit's ``trainable`` flag under this policy."""
        return self.affine == "trainable"

    @property
    def mode(self) -> str:
        """The unit's mode pin under this policy."""
        return "inference" if self.stats == "frozen" else "inherit"

    @classmethod
    def of(cls, policy: str | BNPolicy) -> BNPolicy:
        """A policy from a preset name or a ``BNPolicy``."""
        if isinstance(policy, BNPolicy):
            return policy
        if isinstance(policy, str) and policy in PRESETS:
            return PRESETS[policy]
        raise ValueError(
            f"Unknown BN policy {policy!r}: expected one of {', '.join(PRESETS)} "
            "or BNPolicy(affine='trainable'|'frozen', stats='update'|'frozen')."
        )

    @classmethod
    def from_state(cls, trainable: bool, mode: str) -> BNPolicy:
        """The policy a BN unit with these switches follows."""
        return cls(
            affine="trainable" if trainable else "frozen",
            stats="frozen" if mode == "inference" else "update",
        )


PRESETS: dict[str, BNPolicy] = {
    "frozen": BNPolicy(affine="frozen", stats="frozen"),
    "affine": BNPolicy(affine="trainable", stats="frozen"),
    "adapt": BNPolicy(affine="frozen", stats="update"),
    "train": BNPolicy(affine="trainable", stats="update"),
}
