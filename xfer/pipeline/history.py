"""What a pipeline run records: per stage, per epoch, and the verification of what it froze."""

from __future__ import annotations

import dataclasses
from typing import Any

from xfer.tables import table


@dataclasses.dataclass
class EpochRecord:
    """One epoch: its number (from 1), mean training loss, validation loss and accuracy
    (``None`` without validation data), seconds.

    Example:
        >>> EpochRecord(1, 0.69, None, None, 0.5).loss
        0.69
    """

    epoch: int
    loss: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclasses.dataclass
class StageRecord:
    """One stage: parameter counts, the frozen tensors it verified, its epochs.

    Example:
        >>> record = StageRecord("head", 36, 840, 12, [], [EpochRecord(1, 0.69, 0.7, 0.5, 0.1)])
        >>> record.loss, record.val_accuracy
        (0.69, 0.5)
    """

    name: str
    n_trainable: int
    n_frozen: int
    kept: int  # tensors that had to stay bit-identical
    changed: list[str]  # those that did not (empty when xfer kept its promise)
    epochs: list[EpochRecord] = dataclasses.field(default_factory=list)
    cache: str = ""  # where the frozen prefix's features were cached, or "off: why not"

    @property
    def loss(self) -> float:
        return self.epochs[-1].loss

    @property
    def val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy


@dataclasses.dataclass
class History:
    """Per stage, per epoch: loss, validation loss and accuracy, counts, time; and the
    verification of frozen tensors.

    Example:
        >>> stage = StageRecord("head", 36, 840, 12, [], [EpochRecord(1, 0.69, 0.7, 0.5, 0.1)])
        >>> history = History("torch", [stage])
        >>> history.ok, history.losses()
        (True, [0.69])
    """

    backend: str
    stages: list[StageRecord] = dataclasses.field(default_factory=list)
    device: str = ""
    processes: int = 1  # data-parallel processes (torchrun), each on its own device
    devices: int = 1  # devices one process shards each batch over (a JAX mesh)
    precision: str = "float32"  # of the training steps ("bfloat16": mixed precision)

    @property
    def ok(self) -> bool:
        """Every tensor that had to stay bit-identical did."""
        return all(not s.changed for s in self.stages)

    def losses(self) -> list[float]:
        """The training loss of every epoch, stage after stage."""
        return [e.loss for s in self.stages for e in s.epochs]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict` (a checkpoint stores the history that way).

        Example:
            >>> history = History("torch", [StageRecord("head", 1, 2, 3, [], [])])
            >>> History.from_dict(history.to_dict()) == history
            True
        """
        stages = [
            StageRecord(**{**s, "epochs": [EpochRecord(**e) for e in s["epochs"]]})
            for s in data["stages"]
        ]
        return cls(
            data["backend"],
            stages,
            data.get("device", ""),
            data.get("processes", 1),
            data.get("devices", 1),
            data.get("precision", "float32"),
        )

    def __str__(self) -> str:
        header = (
            "stage",
            "epochs",
            "loss",
            "val loss",
            "val acc",
            "trainable",
            "frozen",
            "frozen tensors",
            "features cached",
        )
        rows = []
        for s in self.stages:
            last = s.epochs[-1]
            kept = f"{s.kept - len(s.changed)}/{s.kept} bit-identical"
            rows.append((
                s.name,
                str(len(s.epochs)),
                f"{last.loss:.4f}",
                "" if last.val_loss is None else f"{last.val_loss:.4f}",
                "" if last.val_accuracy is None else f"{last.val_accuracy:.3f}",
                f"{s.n_trainable:,}",
                f"{s.n_frozen:,}",
                kept + (f" CHANGED: {', '.join(s.changed[:3])}" if s.changed else ""),
                s.cache.split(":")[0],
            ))  # fmt: skip
        where = f" on {self.device}" if self.device else ""
        if self.processes > 1:
            where += f" x {self.processes} processes"
        if self.devices > 1:
            where += f" x {self.devices} devices"
        if self.precision != "float32":
            where += f", {self.precision} mixed precision"
        return f"{self.backend}{where}\n{table(header, rows)}"
