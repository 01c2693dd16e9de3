"""Aligned text (or Markdown) tables for history, demo and compare output."""

from __future__ import annotations


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool = False) -> str:
    """Rows aligned as text, or as a Markdown table.

    Example:
        >>> print(table(("a", "b"), [("1", "22")]))
        a  b
        1  22
    """
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )
