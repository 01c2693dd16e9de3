"""THE table formatter: every table xfer prints or writes is laid out here.

The command output (``xfer run``'s stages, ``xfer demo``, ``xfer compare``, ``xfer
semantics``), ``xfer.summary``, the compare report, the README's tables and the
benchmarks' all pass a header and rows of strings to :func:`table`; what goes in a cell (a
number's digits, a unit) is the caller's, how the cells line up is decided once, here.

Nothing here imports anything.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    markdown: bool = False,
    *,
    right: Collection[int] = (),
) -> str:
    """Rows aligned as text, or as a Markdown table.

    Text: each column as wide as its widest cell, two spaces between columns, no spaces at
    the end of a line. Markdown: one line per row between pipes, under a separator line.

    Args:
        header: the column names.
        rows: the cells of each row, as strings, as many as the header has.
        markdown: a Markdown table instead of aligned text.
        right: the indices of the columns aligned to the right (numbers); in Markdown, the
            separator says so (``--:``).

    Example:
        >>> print(table(("a", "b"), [("1", "22")]))
        a  b
        1  22
        >>> print(table(("unit", "# params"), [("conv", "224"), ("bn", "16")], right={1}))
        unit  # params
        conv       224
        bn          16
        >>> print(table(("a", "b"), [("1", "22")], markdown=True, right={1}))
        | a | b |
        |---|--:|
        | 1 | 22 |
    """
    if markdown:
        rule = "|" + "".join("--:|" if i in right else "---|" for i in range(len(header)))
        lines = ["| " + " | ".join(header) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [header, *rows]
    )
