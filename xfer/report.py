"""Tables and reports for ``xfer run`` and ``xfer compare``: text, Markdown, a PNG plot."""

from __future__ import annotations

import os
from pathlib import Path

from xfer._table import table
from xfer.files import write_atomic, write_text
from xfer.pipeline import History


def divergence(histories: dict[str, History]) -> float:
    """The largest difference between any two backends' training losses, epoch by epoch."""
    curves = [h.losses() for h in histories.values()]
    return max(
        (
            abs(a - b)
            for i, c in enumerate(curves)
            for d in curves[i + 1 :]
            for a, b in zip(c, d, strict=True)
        ),
        default=0.0,
    )


def compare_rows(histories: dict[str, History]) -> list[tuple[str, ...]]:
    """Per stage and backend: final loss, validation accuracy, seconds per epoch, verification."""
    rows = []
    for index, name in enumerate(s.name for s in next(iter(histories.values())).stages):
        for backend, history in histories.items():
            stage = history.stages[index]
            seconds = sum(e.seconds for e in stage.epochs) / len(stage.epochs)
            rows.append((
                name,
                backend,
                f"{stage.loss:.4f}",
                f"{stage.val_accuracy:.3f}" if stage.val_accuracy is not None else "",
                f"{seconds:.2f}",
                f"{stage.kept - len(stage.changed)}/{stage.kept}",
            ))  # fmt: skip
    return rows


COMPARE_HEADER = ("stage", "backend", "loss", "val acc", "s/epoch", "frozen kept")


def write_compare_report(
    histories: dict[str, History], directory: str | os.PathLike, title: str
) -> list[Path]:
    """Write ``report.md`` and, when matplotlib is installed, ``loss_curves.png``.

    Each file is written to a temporary name and renamed, so a report is never half
    written. Returns the paths written.

    Example:
        >>> write_compare_report(histories, "xfer-report", "compare")   # doctest: +SKIP
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plot = _plot(histories, out / "loss_curves.png")
    lines = [
        f"# {title}",
        "",
        table(COMPARE_HEADER, compare_rows(histories), markdown=True),
        "",
        f"Largest difference between backends' training losses: {divergence(histories):.2e}.",
        "",
        f"![loss curves]({plot.name})"
        if plot
        else '(install matplotlib for the plot: pip install "xfer[report]")',
    ]
    written.append(write_text(out / "report.md", "\n".join(lines) + "\n"))
    return [*written, *([plot] if plot else [])]


def _plot(histories: dict[str, History], path: Path) -> Path | None:
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
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("the same stages, weights and batches on each backend")
    ax.legend()
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
