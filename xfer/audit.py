"""``xfer.audit``: the freezing and inference-mode mistakes xfer can see in a model."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

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

    Deploy checks on the BN statistics, read through the adapter's ``tensors``:
    ``bn-stats-look-reset`` reports a BN whose moving mean is all 0 and moving variance all 1
    (what ``torch.optim.swa_utils.update_bn`` leaves on a BN pinned to inference: it resets
    the statistics and never re-estimates them) *on a model that was trained*. "Trained"
    means: the BN's own gamma/beta are not at their initial 1/0, or another BN of the
    model has statistics other than 0/1. A freshly built model therefore gives no finding.
    ``bn-batch-of-one`` reports only BNs that compute with batch statistics at the moment
    of the call (``Units.current_mode``): ``model.eval()`` on torch clears it; on Keras an
    unpinned BN follows ``training=`` and is reported. ``bn-cumulative-average-in-pinned-unit``
    reports a BN with a cumulative average (torch ``momentum=None``) that is pinned or
    has a pinned ancestor.
    ``bn-stats-low-precision`` reports BN statistics stored in float16/bfloat16.

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
            [u for u in bns if adapter.current_mode(u) == "train"],
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
    reset, low = _stat_problems(adapter, model, bns)
    add(
        "bn-stats-look-reset",
        "error",
        reset,
        "BatchNorm moving statistics are exactly mean 0 / variance 1 on a model that "
        "was trained: they look reset and never re-estimated (torch's "
        "swa_utils.update_bn does this to a BN pinned to inference), so inference "
        "normalises with meaningless statistics.",
        "xfer.recalibrate_bn(model, batches) to estimate them on data, or restore "
        "them from a checkpoint.",
    )
    add(
        "bn-stats-low-precision",
        "warning",
        low,
        "BatchNorm moving statistics are stored in float16/bfloat16: the running "
        "variance loses precision (small updates vanish, tiny variances round off).",
        "Keep BN in float32: torch model.half() then bn.float() for each BN (or "
        "autocast instead of half); Keras's mixed_float16 policy keeps them float32.",
    )
    pinned = {u.segments for u in units if modes[u.path] != "inherit"}
    add(
        "bn-cumulative-average-in-pinned-unit",
        "warning",
        [
            u
            for u in bns
            if adapter.bn_momentum(u) is None
            and any(u.segments[:i] in pinned for i in range(len(u.segments) + 1))
        ],
        "BatchNorm with a cumulative moving average (momentum=None) in a pinned unit: its "
        "statistics weight every batch by num_batches_tracked, which keeps counting across "
        "pin/unpin cycles, so batches seen after a re-pin barely move them and the mix of "
        "old and new data is not what either phase intended.",
        "Give the BN a momentum (bn.momentum = 0.1), or re-estimate with "
        "xfer.recalibrate_bn(model, batches) after the last unpin.",
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


_LOW = ("float16", "bfloat16")


def _is(array, value: float) -> bool:
    return bool(np.all(np.asarray(array, dtype=np.float64) == value))


def _stat_problems(adapter, model, bns: list[Unit]) -> tuple[list[Unit], list[Unit]]:
    # The BNs whose statistics look reset, and those stored in low precision.
    if not bns:
        return [], []
    arrays = {}
    for key, array in adapter.tensors(model):
        arrays[key.lstrip(".")] = (str(array.dtype), np.asarray(array, dtype=np.float64))

    def get(unit: Unit, name: str):
        return arrays.get(f"{unit.path}.{name}".lstrip("."))

    default, trained_own, low = {}, {}, []
    for u in bns:
        stats = [get(u, n) for n in u.stats]
        stats = [s for s in stats if s is not None]
        if len(stats) >= 2:
            default[u.path] = _is(stats[0][1], 0.0) and _is(stats[1][1], 1.0)
        if any(dtype in _LOW for dtype, _ in stats):
            low.append(u)
        params = [get(u, n) for n in u.params]
        params = [p for p in params if p is not None]
        trained_own[u.path] = len(params) >= 2 and not (
            _is(params[0][1], 1.0) and _is(params[1][1], 0.0)
        )
    reset = [
        u
        for u in bns
        if default.get(u.path)
        and (trained_own[u.path] or any(not d for p, d in default.items() if p != u.path))
    ]
    return reset, low
