"""The agreement check of ``xfer compare``: do the backends give the same numbers?

``xfer compare`` is a check, not only a table: the same stages, weights and batches must
give the same numbers on every backend (:func:`xfer.job.transfer_on_backends` runs them;
:mod:`xfer.cli.report` writes the report). Each compared value (per epoch: the training and the
validation loss; at the end of each stage: also the validation accuracy) is compared between
every pair of backends by its *relative* difference::

    |a - b| / max(|a|, |b|, FLOOR)

and the backends agree when no relative difference exceeds the tolerance
(:data:`DEFAULT_TOLERANCE`, ``xfer compare --tolerance``).

- ``DEFAULT_TOLERANCE = 1e-2``: float32 rounding grown by the steps taken. The head stage
  agrees to about 2e-7 on every machine measured; fine-tuning the whole model grows it by
  how far each CPU's kernels round apart: 7.4e-6 on the machine of issue 11, 4.0e-3 on an
  AMD EPYC (flax against the other three, which agree to 3e-6 there; finetune epoch 19,
  validation loss). A real disagreement (a scrambled weights handoff: 8e-2 on
  ``--quick``, 37 loss points on the full job) is still many times past it.
- ``FLOOR = 1e-2``: a value near zero (a loss that has gone to 0.001, an accuracy of 0) is
  compared absolutely, to within ``tolerance * FLOOR`` (1e-6 at the default), instead of
  relative to a tiny number that would turn float32 noise into a large ratio.
- Validation accuracy is a count, compared *absolutely*, to within
  :data:`DEFAULT_ACCURACY_TOLERANCE` (0.005, half a percentage point;
  ``--accuracy-tolerance``): an image whose logits lie within float32 rounding of the
  decision boundary flips between backends whose losses agree to 1e-6 (measured: one or two
  of the 796 target validation images, with ``--seed 1`` and ``--bn adapt``), which would be
  3e-3 relative, past a loss tolerance that still catches the bugs a comparison is for.

Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from xfer.pipeline import History

DEFAULT_TOLERANCE = 1e-2
DEFAULT_ACCURACY_TOLERANCE = 5e-3
FLOOR = 1e-2
# The metrics compared, in the order they are checked within an epoch.
METRICS = ("loss", "val loss", "val acc")
ACCURACY = "val acc"  # compared absolutely, against the accuracy tolerance


def relative_difference(a: float, b: float, floor: float = FLOOR) -> float:
    """``|a - b| / max(|a|, |b|, floor)``: how far apart two backends' values are.

    Example:
        >>> relative_difference(2.0, 1.0)
        0.5
        >>> relative_difference(0.0, 1e-4)  # near zero: relative to the floor
        0.01
    """
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf  # a NaN must never pass as "no difference"
    return abs(a - b) / max(abs(a), abs(b), floor)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One compared value on two backends: where (stage, epoch, metric) and how far apart.

    ``reference`` is the backend that ran first, ``other`` the one compared with it;
    ``epoch`` counts from 1 within the stage.

    Example:
        >>> d = Divergence("torch", "keras-torch", "head", 1, "loss", 1.224, 38.46)
        >>> round(d.relative, 2)
        0.97
        >>> d.describe(1e-4)
        "keras-torch vs torch diverged in stage 'head', epoch 1: loss 38.46 vs 1.224 (relative 0.97 > tolerance 0.0001)"
    """

    reference: str
    other: str
    stage: str
    epoch: int
    metric: str
    reference_value: float
    other_value: float

    @property
    def relative(self) -> float:
        return relative_difference(self.reference_value, self.other_value)

    @property
    def absolute(self) -> float:
        if not (math.isfinite(self.reference_value) and math.isfinite(self.other_value)):
            return math.inf
        return abs(self.reference_value - self.other_value)

    @property
    def pair(self) -> str:
        return f"{self.other} vs {self.reference}"

    def exceeds(
        self, tolerance: float, accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE
    ) -> bool:
        """Past the tolerance: relative for losses, absolute for the accuracy."""
        if self.metric == ACCURACY:
            return self.absolute > accuracy_tolerance
        return self.relative > tolerance

    def describe(
        self, tolerance: float, accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE
    ) -> str:
        """One line: the pair, where, both values, and how far apart against which tolerance."""
        past = self.exceeds(tolerance, accuracy_tolerance)
        verb, sign = ("diverged", ">") if past else ("agree", "<=")
        if self.metric == ACCURACY:
            apart = f"apart {self.absolute:.2g} {sign} accuracy tolerance {accuracy_tolerance:g}"
        else:
            apart = f"relative {self.relative:.2g} {sign} tolerance {tolerance:g}"
        return (
            f"{self.pair} {verb} in stage {self.stage!r}, epoch {self.epoch}: {self.metric} "
            f"{self.other_value:.4g} vs {self.reference_value:.4g} ({apart})"
        )

    def to_dict(self) -> dict:
        return {
            "pair": [self.other, self.reference],
            "stage": self.stage,
            "epoch": self.epoch,
            "metric": self.metric,
            "values": {self.other: self.other_value, self.reference: self.reference_value},
            "relative": self.relative,
            "absolute": self.absolute,
        }


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`check`: do the backends agree, and where are they furthest apart.

    Attributes:
        tolerance: the largest relative difference of a loss allowed.
        backends: the backends compared, the first being everyone's reference.
        first: the first value past its tolerance in training order (stage, epoch, then
            metric), or None when they agree.
        largest: the largest relative difference of a loss (None: fewer than two backends).
        largest_per_stage: the largest relative difference of a loss in each stage.
        accuracy_tolerance: the largest absolute difference of an accuracy allowed.
        largest_accuracy_gap: the largest absolute difference of an accuracy, if any.

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> def run(loss):
        ...     return History("x", [StageRecord("head", 1, 1, 0, [], [EpochRecord(1, loss, None, None, 0.0)])])
        >>> verdict = check({"torch": run(1.224), "keras-jax": run(1.224001), "flax": run(1.224)})
        >>> verdict.exit_status, verdict.summary()
        (0, "torch, keras-jax, flax agree to within tolerance 0.01: largest relative difference 8.2e-07 (keras-jax vs torch, stage 'head', epoch 1, loss)")
    """

    tolerance: float
    backends: tuple[str, ...]
    first: Divergence | None
    largest: Divergence | None
    largest_per_stage: dict[str, Divergence]
    accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE
    largest_accuracy_gap: Divergence | None = None

    @property
    def status(self) -> str:
        """``"agree"``, ``"diverged"``, or ``"nothing to compare"`` (one backend ran)."""
        if len(self.backends) < 2:
            return "nothing to compare"
        return "diverged" if self.first is not None else "agree"

    @property
    def exit_status(self) -> int:
        """What ``xfer compare`` exits with: 1 when the backends diverged, else 0."""
        return 1 if self.status == "diverged" else 0

    def summary(self) -> str:
        """One line: the verdict, and the pair, stage and epoch that decided it."""
        if self.first is not None:
            return self.first.describe(self.tolerance, self.accuracy_tolerance)
        if self.largest is None:
            return f"only {', '.join(self.backends)} ran: nothing to compare it with"
        d = self.largest
        return (
            f"{', '.join(self.backends)} agree to within tolerance {self.tolerance:g}: "
            f"largest relative difference {d.relative:.1e} ({d.pair}, stage {d.stage!r}, "
            f"epoch {d.epoch}, {d.metric})"
        ) + (
            f"; accuracies within {self.largest_accuracy_gap.absolute:.3g} of each other"
            if self.largest_accuracy_gap is not None
            else ""
        )

    def to_dict(self) -> dict:
        return {
            "verdict": self.status,
            "tolerance": self.tolerance,
            "accuracy_tolerance": self.accuracy_tolerance,
            "floor": FLOOR,
            "first_divergence": self.first.to_dict() if self.first else None,
            "largest": self.largest.to_dict() if self.largest else None,
            "largest_per_stage": {s: d.to_dict() for s, d in self.largest_per_stage.items()},
            "largest_accuracy_gap": (
                self.largest_accuracy_gap.to_dict() if self.largest_accuracy_gap else None
            ),
        }


def compared_values(history: History) -> list[tuple[str, int, str, float]]:
    """``(stage, epoch, metric, value)`` of everything :func:`check` compares, in training
    order: each epoch's training and validation loss, and each stage's final validation
    accuracy.

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> stage = StageRecord("head", 10, 90, 4, [], [EpochRecord(1, 1.2, 1.3, 0.5, 0.1)])
        >>> compared_values(History("torch", [stage]))
        [('head', 1, 'loss', 1.2), ('head', 1, 'val loss', 1.3), ('head', 1, 'val acc', 0.5)]
    """
    values = []
    for stage in history.stages:
        for record in stage.epochs:
            values.append((stage.name, record.epoch, "loss", record.loss))
            if record.val_loss is not None:
                values.append((stage.name, record.epoch, "val loss", record.val_loss))
        last = stage.epochs[-1] if stage.epochs else None
        if last is not None and last.val_accuracy is not None:
            values.append((stage.name, last.epoch, "val acc", last.val_accuracy))
    return values


def differences(histories: dict[str, History]) -> list[Divergence]:
    """Every compared value on every pair of backends, in training order (within one value:
    pairs in the order the backends ran).

    Raises:
        ValueError: two backends did not run the same stages and epochs (then their
            numbers cannot be compared at all).

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> def run(loss):
        ...     return History("x", [StageRecord("head", 1, 1, 0, [], [EpochRecord(1, loss, None, None, 0.0)])])
        >>> [d.pair for d in differences({"torch": run(1.2), "keras-jax": run(1.2), "flax": run(1.3)})]
        ['keras-jax vs torch', 'flax vs torch', 'flax vs keras-jax']
    """
    names = list(histories)
    values = {name: compared_values(h) for name, h in histories.items()}
    for name in names[1:]:
        if [v[:3] for v in values[name]] != [v[:3] for v in values[names[0]]]:
            raise ValueError(
                f"{name} and {names[0]} did not run the same stages and epochs "
                f"({_shape(histories[name])} vs {_shape(histories[names[0]])}): run compare "
                "with the same --preset, --quick and --model for every backend."
            )
    out = []
    for index, (stage, epoch, metric, _) in enumerate(values[names[0]] if names else []):
        for reference, other in itertools.combinations(names, 2):
            out.append(
                Divergence(
                    reference,
                    other,
                    stage,
                    epoch,
                    metric,
                    values[reference][index][3],
                    values[other][index][3],
                )
            )
    return out


def _shape(history: History) -> str:
    return ", ".join(f"{s.name} x{len(s.epochs)}" for s in history.stages) or "no stages"


def check(
    histories: dict[str, History],
    tolerance: float = DEFAULT_TOLERANCE,
    accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE,
) -> Verdict:
    """Do the backends agree? Compares every pair (see :func:`differences`): losses by
    relative difference against ``tolerance``, accuracies by absolute difference against
    ``accuracy_tolerance``.

    Raises:
        ValueError: ``tolerance`` is negative or not a number, or the backends did not run
            the same stages.

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> def run(loss):
        ...     return History("x", [StageRecord("head", 1, 1, 0, [], [EpochRecord(1, loss, None, None, 0.0)])])
        >>> check({"torch": run(1.224), "flax": run(1.224001)}).status
        'agree'
        >>> verdict = check({"torch": run(1.224), "keras-torch": run(38.46)})
        >>> verdict.exit_status, verdict.first.pair
        (1, 'keras-torch vs torch')
    """
    for name, value, default in (
        ("tolerance", tolerance, DEFAULT_TOLERANCE),
        ("accuracy_tolerance", accuracy_tolerance, DEFAULT_ACCURACY_TOLERANCE),
    ):
        if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ValueError(
                f"{name} must be a finite number >= 0, got {value!r} (the default is {default:g})."
            )
    found = differences(histories)
    past = [d for d in found if d.exceeds(tolerance, accuracy_tolerance)]
    losses = [d for d in found if d.metric != ACCURACY]
    accuracies = [d for d in found if d.metric == ACCURACY]
    per_stage: dict[str, Divergence] = {}
    for d in losses:
        if d.stage not in per_stage or d.relative > per_stage[d.stage].relative:
            per_stage[d.stage] = d
    return Verdict(
        tolerance=float(tolerance),
        backends=tuple(histories),
        first=past[0] if past else None,
        largest=max(losses, key=lambda d: d.relative) if losses else None,
        largest_per_stage=per_stage,
        accuracy_tolerance=float(accuracy_tolerance),
        largest_accuracy_gap=max(accuracies, key=lambda d: d.absolute) if accuracies else None,
    )


def final_metrics(histories: dict[str, History]) -> dict[str, dict[str, dict]]:
    """Per backend and stage: the last epoch's loss, validation loss and accuracy.

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> stage = StageRecord("head", 10, 90, 4, [], [EpochRecord(1, 1.2, 1.3, 0.5, 0.1)])
        >>> final_metrics({"torch": History("torch", [stage])})
        {'torch': {'head': {'loss': 1.2, 'val_loss': 1.3, 'val_accuracy': 0.5}}}
    """
    return {
        backend: {
            s.name: {
                "loss": s.epochs[-1].loss,
                "val_loss": s.epochs[-1].val_loss,
                "val_accuracy": s.epochs[-1].val_accuracy,
            }
            for s in history.stages
            if s.epochs
        }
        for backend, history in histories.items()
    }
