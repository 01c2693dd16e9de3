"""THE report writer of ``xfer compare``: ``report.md`` and a plot of the loss curves, and
the rows of its side-by-side table (printed by the command, written in the report).

What is compared and the verdict are :mod:`xfer.compare`'s; this module only shows them.
Every file goes through xfer's one writer (:mod:`xfer.files`): a report is never half
written. matplotlib is optional (``pip install "xfer[report]"``).
"""

from __future__ import annotations

import os
from pathlib import Path

from xfer.compare import ACCURACY, FLOOR, Divergence, Verdict, check, differences
from xfer.files import write_atomic, write_text
from xfer.pipeline import History
from xfer.tables import table


def compare_rows(histories: dict[str, History]) -> list[tuple[str, ...]]:
    """Per stage and backend: final loss, validation loss and accuracy, seconds per epoch,
    frozen tensors kept, and the largest relative difference from the first backend in
    that stage.

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> stage = StageRecord("head", 10, 90, 4, [], [EpochRecord(1, 1.2, 1.3, 0.5, 0.25)])
        >>> compare_rows({"torch": History("torch", [stage])})
        [('head', 'torch', '1.2000', '1.3000', '0.500', '0.25', '4/4', '-')]
    """
    found = differences(histories)
    names = list(histories)
    rows = []
    for index, name in enumerate(s.name for s in histories[names[0]].stages):
        for backend, history in histories.items():
            stage = history.stages[index]
            last = stage.epochs[-1]
            seconds = sum(e.seconds for e in stage.epochs) / len(stage.epochs)
            apart = [
                d.relative
                for d in found
                if d.stage == name
                and d.reference == names[0]
                and d.other == backend
                and d.metric != ACCURACY
            ]
            rows.append((
                name,
                backend,
                f"{last.loss:.4f}",
                "" if last.val_loss is None else f"{last.val_loss:.4f}",
                "" if last.val_accuracy is None else f"{last.val_accuracy:.3f}",
                f"{seconds:.2f}",
                f"{stage.kept - len(stage.changed)}/{stage.kept}",
                f"{max(apart):.1e}" if apart else "-",
            ))  # fmt: skip
    return rows


def compare_header(histories: dict[str, History]) -> tuple[str, ...]:
    """The header of :func:`compare_rows`' table (the last column names the reference)."""
    reference = next(iter(histories))
    return (
        "stage",
        "backend",
        "loss",
        "val loss",
        "val acc",
        "s/epoch",
        "frozen kept",
        f"rel. diff vs {reference}",
    )


def compare_table(histories: dict[str, History], markdown: bool = False) -> str:
    """The side-by-side table of ``xfer compare`` (:func:`compare_header`,
    :func:`compare_rows`), as text or Markdown.

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> stage = StageRecord("head", 10, 90, 4, [], [EpochRecord(1, 1.2, 1.3, 0.5, 0.25)])
        >>> print(compare_table({"torch": History("torch", [stage])}))
        stage  backend  loss    val loss  val acc  s/epoch  frozen kept  rel. diff vs torch
        head   torch    1.2000  1.3000    0.500    0.25     4/4          -
    """
    return table(compare_header(histories), compare_rows(histories), markdown=markdown)


def write_compare_report(
    histories: dict[str, History],
    directory: str | os.PathLike,
    title: str,
    verdict: Verdict | None = None,
) -> list[Path]:
    """Write ``report.md`` and, when matplotlib is installed, ``loss_curves.png``, with the
    verdict of :func:`check` (at the default tolerance unless ``verdict`` is given); a
    divergence is marked in both.

    Each file is written to a temporary name and renamed, so a report is never half
    written. Returns the paths written.

    Example:
        >>> import tempfile
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> def run(loss):
        ...     return History("x", [StageRecord("head", 1, 1, 0, [], [EpochRecord(1, loss, None, None, 0.0)])])
        >>> written = write_compare_report({"torch": run(1.2), "flax": run(1.2)}, tempfile.mkdtemp(), "compare")
        >>> written[0].name, written[0].read_text().splitlines()[2][:11]   # (and the plot, with matplotlib)
        ('report.md', '**AGREE**: ')
    """
    verdict = verdict or check(histories)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plot = _plot(histories, out / "loss_curves.png", verdict)
    mark = {"agree": "AGREE", "diverged": "DIVERGED", "nothing to compare": "ONE BACKEND"}
    lines = [
        f"# {title}",
        "",
        f"**{mark[verdict.status]}**: {verdict.summary()}.",
        "",
        compare_table(histories, markdown=True),
        "",
        f"Compared on every pair of backends: each epoch's training and validation loss by "
        f"|a-b| / max(|a|, |b|, {FLOOR:g}), tolerance {verdict.tolerance:g}; each stage's "
        f"final validation accuracy by |a-b|, tolerance {verdict.accuracy_tolerance:g}.",
        "",
        *[
            f"- largest in stage {stage!r}: {d.relative:.2e} ({d.pair}, epoch {d.epoch}, {d.metric})"
            for stage, d in verdict.largest_per_stage.items()
        ],
        "",
        f"![loss curves]({plot.name})"
        if plot
        else '(install matplotlib for the plot: pip install "xfer[report]")',
    ]
    written = [write_text(out / "report.md", "\n".join(lines) + "\n")]
    return [*written, *([plot] if plot else [])]


def divergence_epoch(histories: dict[str, History], divergence: Divergence) -> int:
    """The epoch of ``divergence`` counted over all stages (1-based), as on the plot's x axis.

    Example:
        >>> from xfer.compare import check
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> def stage(name, *losses):
        ...     epochs = [EpochRecord(i, x, None, None, 0.0) for i, x in enumerate(losses, 1)]
        ...     return StageRecord(name, 1, 1, 0, [], epochs)
        >>> def run(finetune_loss):
        ...     return History("x", [stage("head", 1.0, 0.9), stage("finetune", finetune_loss)])
        >>> histories = {"torch": run(0.8), "flax": run(0.5)}
        >>> divergence_epoch(histories, check(histories).first)   # finetune's epoch 1
        3
    """
    history = histories[divergence.reference]
    before = 0
    for stage in history.stages:
        if stage.name == divergence.stage:
            return before + divergence.epoch
        before += len(stage.epochs)
    raise ValueError(f"stage {divergence.stage!r} is not in {divergence.reference}'s history.")


def _plot(histories: dict[str, History], path: Path, verdict: Verdict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for backend, history in histories.items():
        ax.plot(range(1, len(history.losses()) + 1), history.losses(), label=backend, alpha=0.8)
    boundary = 0
    for stage in next(iter(histories.values())).stages[:-1]:
        boundary += len(stage.epochs)
        ax.axvline(boundary + 0.5, color="grey", linestyle=":", linewidth=1)
    if verdict.first is not None:
        first = verdict.first
        epoch = divergence_epoch(histories, first)
        y = histories[first.other].losses()[epoch - 1]
        ax.plot([epoch], [y], marker="X", color="red", markersize=12, linestyle="none")
        ax.annotate(
            f"{first.pair} diverged\n({first.metric}, stage {first.stage!r}, epoch {first.epoch})",
            (epoch, y),
            xytext=(10, 10),
            textcoords="offset points",
            color="red",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("the same stages, weights and batches on each backend")
    ax.legend()
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
