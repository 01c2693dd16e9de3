"""A stage of the pipeline, declared: what trains, what BN does, how the rest behaves.

Applying a stage first resets every unit, so a stage never depends on what the previous
one left behind (and a resumed run can start at any stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from xfer import select as S
from xfer._adapter import OPTIMIZERS, Adapter, Unit, find_adapter
from xfer._checks import check_integer, check_positive
from xfer.policy import BNPolicy
from xfer.state import check_mode

# Stage.recalibrate's values -> when (True is "after": the PreciseBN use).
RECALIBRATE = {False: None, True: "after", "before": "before", "after": "after"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: what trains, the BN policy, the mode of what does not train, how long.

    Args:
        name: shown in the history and the checkpoint.
        train: the units whose parameters train; every other unit is frozen.
        bn: BN policy for every BN unit (overrides ``train`` for gamma/beta); ``None``:
            BN units that train get ``"train"``, the others ``"frozen"``.
        mode: pin for the units that do not train (``"inference"`` in the Keras guide);
            ``None`` leaves them to the framework.
        lr, epochs, optimizer: ``optimizer`` ``None`` takes the pipeline's.
        lr_groups: discriminative learning rates, ``((selector, lr), ...)``; a unit in
            several groups takes the first.
        recalibrate: re-estimate every BN's moving statistics on the stage's training
            images with :func:`xfer.recalibrate_bn` (population statistics; pins and
            policies kept). ``"before"``: before the stage trains (AdaBN: a frozen BN then
            normalises with the target's statistics, and the stage verifies that they stay
            so). ``"after"`` (or ``True``): after the last epoch trains and before it is
            evaluated (PreciseBN); those statistics are then not among the tensors the stage
            verifies, and it trains without a feature cache (the frozen prefix's outputs
            would change).

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=1e-3)
        Stage(name='head', ...)
    """

    name: str
    train: S.Selector = dataclasses.field(default_factory=S.all)
    bn: str | BNPolicy | None = None
    mode: str | None = None
    lr: float = 1e-3
    epochs: int = 1
    optimizer: str | None = None
    lr_groups: tuple[tuple[S.Selector, float], ...] = ()
    recalibrate: bool | str = False

    def __repr__(self) -> str:
        return f"Stage(name={self.name!r}, ...)"

    def validate(self) -> None:
        """Refuse a field that cannot be right on any model (``check_stage`` does the rest).

        Example:
            >>> Stage("head", lr=-1).validate()
            Traceback (most recent call last):
            ...
            ValueError: Stage 'head': lr must be a positive finite number, got -1.
        """
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage name must be a non-empty string, got {self.name!r}.")
        S.check_selector(self.train)
        if self.bn is not None:
            BNPolicy.of(self.bn)
        if self.mode is not None:
            check_mode(self.mode)
        check_positive(self.lr, f"Stage {self.name!r}: lr")
        check_integer(self.epochs, f"Stage {self.name!r}: epochs", 1)
        if not isinstance(self.recalibrate, (bool, str)) or self.recalibrate not in RECALIBRATE:
            raise ValueError(
                f"Stage {self.name!r}: recalibrate must be False, 'before', 'after' or True "
                f"(= 'after'), got {self.recalibrate!r}."
            )
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Stage {self.name!r}: unknown optimizer {self.optimizer!r}; expected one of "
                f"{', '.join(OPTIMIZERS)}."
            )
        if not isinstance(self.lr_groups, (tuple, list)):
            raise TypeError(
                f"Stage {self.name!r}: lr_groups must be a tuple of (selector, lr) pairs, got "
                f"{type(self.lr_groups).__name__}."
            )
        for group in self.lr_groups:
            if not isinstance(group, (tuple, list)) or len(group) != 2:
                raise ValueError(
                    f"Stage {self.name!r}: lr_groups entries are (selector, positive lr), got {group!r}."
                )
            S.check_selector(group[0])
            check_positive(group[1], f"Stage {self.name!r}: the lr of lr_groups entry {group[0]!r}")

    @property
    def recalibrates(self) -> str | None:
        """When the stage re-estimates the BN statistics: ``"before"``, ``"after"`` or ``None``.

        Example:
            >>> Stage("head", recalibrate=True).recalibrates
            'after'
        """
        return RECALIBRATE.get(self.recalibrate)


def apply_stage(model: Any, stage: Stage, adapter: Adapter | None = None) -> list[Unit]:
    """Set the model's state for ``stage``; return the units that train.

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> from xfer.pipeline import apply_stage
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> [u.path for u in apply_stage(model, xfer.Stage("head", train=S.path("head.**")))]
        ['head', 'head.drop', 'head.dense']
    """
    adapter = adapter or find_adapter(model)
    units = adapter.units(model)
    chosen = check_stage(stage, units)
    policy = BNPolicy.of(stage.bn) if stage.bn is not None else None
    for unit in units:
        trains = unit.path in chosen
        if unit.is_bn:
            unit_policy = policy or BNPolicy.of("train" if trains else "frozen")
            adapter.set_trainable(unit, unit_policy.trainable)
            adapter.set_mode(unit, unit_policy.mode)
            continue
        if unit.n_params:
            adapter.set_trainable(unit, trains)
        adapter.set_mode(unit, stage.mode if (stage.mode and not trains) else "inherit")
    return [u for u in units if u.path in chosen]


def check_stage(stage: Stage, units: Sequence[Unit]) -> set[str]:
    """The paths ``stage.train`` selects among ``units``, after checking that the stage
    fits the model: something with parameters trains, and every ``lr_groups`` selector
    picks a unit whose parameters train in this stage (a group that picks none would be
    ignored without a word). Changes nothing, so the pipeline checks every stage before
    the first one trains.

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> from xfer._adapter import find_adapter
        >>> from xfer.pipeline import check_stage
        >>> model = xfer.models.small_cnn(4, backend="torch")
        >>> units = find_adapter(model).units(model)
        >>> sorted(check_stage(xfer.Stage("head", train=S.path("head.**")), units))
        ['head', 'head.dense', 'head.drop']
    """
    chosen = set(stage.train.paths(units))
    policy = BNPolicy.of(stage.bn) if stage.bn is not None else None

    def trains(unit: Unit) -> bool:
        if not unit.n_params:
            return False
        if unit.is_bn and policy is not None:
            return policy.trainable
        return unit.path in chosen

    some = ", ".join(u.path for u in units[:8])
    if not any(u.path in chosen and u.n_params for u in units):
        raise ValueError(
            f"Stage {stage.name!r}: train={stage.train!r} selects no unit with parameters, so "
            f"nothing would train. Some paths: {some}."
        )
    training = {u.path for u in units if trains(u)}
    for selector, lr in stage.lr_groups:
        if not training.intersection(selector.paths(units)):
            raise ValueError(
                f"Stage {stage.name!r}: the lr_groups selector {selector!r} (lr={lr}) picks no "
                f"unit whose parameters train in this stage, so its learning rate would never "
                f"be used. Units that train here: {', '.join(sorted(training)[:8])}."
            )
    return chosen
