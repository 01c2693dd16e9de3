"""``xfer semantics``: measure what each framework's own switches do, beside xfer's
guarantees (the measuring is :mod:`xfer.semantics`')."""

from __future__ import annotations

import argparse
import sys

from xfer.cli.options import add_backends, add_format, add_quiet
from xfer.cli.progress import terminal_progress

HELP = "Measure what each framework's own freeze/mode switches do here, beside xfer's guarantees."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backends(
        parser, "repeatable; default: every installed backend (Keras on each installed engine)"
    )
    add_format(parser, ("text", "json", "markdown"))
    add_quiet(parser)


def cmd_semantics(args: argparse.Namespace) -> int:
    """Print the truth table as text, JSON or Markdown; exit 1 (naming the cells on
    stderr) when one of xfer's guarantees did not hold.

    Example:
        >>> from xfer.cli import main
        >>> main(["semantics", "--backend", "torch", "--format", "json"])   # doctest: +ELLIPSIS
        {
          "xfer": ...
        }
        0
    """
    from xfer import semantics

    with terminal_progress(args) as progress:
        report = semantics.measure(args.backend, progress=progress)
    render = {
        "text": semantics.to_text,
        "json": semantics.to_json,
        "markdown": semantics.to_markdown,
    }[args.format]
    print(render(report).rstrip("\n"))
    failed = semantics.broken(report)
    if failed:
        print(f"xfer guarantees that did not hold: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
