"""``xfer.audit``: the freezing and inference-mode mistakes xfer can see in a model."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from xfer._adapter import Unit, find_adapter


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: a code to filter on, the units concerned, what is wrong, how to fix it."""

    code: str
    severity: Literal["error", "warning"]
    paths: tuple[str, ...]
    message: str
    fix: str

    def __str__(self) -> str:
        shown = ", ".join(self.paths[:4]) + (
            f" (+{len(self.paths) - 4} more)" if len(self.paths) > 4 else ""
        )
        return f"[{self.severity}] {self.code}: {self.message} Units: {shown}. Fix: {self.fix}"


def _parent(unit: Unit) -> tuple[str, ...]:
    # By segments: a Keras layer name may contain a dot.
    return unit.segments[:-1]


def audit(model: Any, batch_size: int | None = None) -> list[Finding]:
    """Look for the usual freezing/inference-mode mistakes; return the findings.

    Pass the batch size you train with to also check BatchNorm against it.

    Example:
        >>> import xfer
        >>> for finding in xfer.audit(model, batch_size=1):   # doctest: +SKIP
        ...     print(finding)
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(
            f"audit: batch_size must be a positive integer or None, got {batch_size!r}."
        )
    adapter = find_adapter(model)
    units = adapter.units(model)
    counts = {u.path: adapter.param_counts(u) for u in units}
    modes = {u.path: adapter.get_mode(u) for u in units}
    findings: list[Finding] = []

    def add(code, severity, chosen: list[Unit], message, fix):
        if chosen:
            paths = tuple(u.path for u in chosen)
            findings.append(Finding(code, severity, paths, message, fix))

    bns = [u for u in units if u.is_bn]
    add(
        "bn-stats-update-under-frozen-affine",
        "warning",
        [u for u in bns if counts[u.path][0] == 0 and modes[u.path] != "inference"],
        "BatchNorm with frozen gamma/beta still updates its moving statistics whenever the "
        "model trains (freezing parameters does not stop BN statistics).",
        "xfer.set_bn(model, 'frozen', where) to freeze the statistics too; keep it only if "
        "you chose 'adapt' (re-estimating statistics on new data) on purpose.",
    )
    add(
        "bn-batch-statistics-at-inference",
        "warning",
        [u for u in bns if modes[u.path] == "train"],
        "BatchNorm pinned to train mode normalises with the statistics of each batch even at "
        "inference, so predictions depend on the batch (one image at a time gives odd results).",
        "xfer.set_mode(model, 'inherit', where) or xfer.set_bn(model, 'frozen'|'affine', where).",
    )
    if batch_size is not None and batch_size < 2:
        add(
            "bn-batch-of-one",
            "error",
            [u for u in bns if modes[u.path] != "inference"],
            f"Training with batch size {batch_size}: BatchNorm in train mode normalises each "
            "sample by itself (zero variance), which breaks training and its statistics.",
            "Use a larger batch, or xfer.set_bn(model, 'frozen'|'affine') so BN uses its "
            "moving statistics.",
        )
    frozen_blocks = set()
    for block in {_parent(u) for u in units} - {()}:
        inside = [counts[u.path] for u in units if u.segments[: len(block)] == block != u.segments]
        if sum(f for _, f in inside) and not sum(t for t, _ in inside):
            frozen_blocks.add(block)
    add(
        "dropout-active-in-frozen-block",
        "warning",
        [
            u
            for u in units
            if u.kind == "dropout" and modes[u.path] != "inference" and _parent(u) in frozen_blocks
        ],
        "Dropout inside a fully frozen block is still active in training: it adds noise to "
        "features that cannot adapt to it (the Keras guide runs a frozen base in inference mode).",
        "xfer.set_mode(model, 'inference', S.path('<block>.**')) for the frozen block.",
    )
    total_trainable = sum(t for t, _ in counts.values())
    if not total_trainable and any(f for _, f in counts.values()):
        findings.append(
            Finding(
                "nothing-trainable",
                "warning",
                (),
                "Every parameter is frozen: training will change nothing but BN statistics.",
                "xfer.unfreeze(model, S.path('head.**')) or another part you want to train.",
            )
        )
    return findings
