"""The progress display of the commands: on stderr, while a person is watching.

The pipeline reports progress by calling a function (``TransferPipeline(progress=...)``)
with an :class:`xfer.pipeline.EpochProgress` after each epoch, or with a line of text for
anything else (pretraining a source model, a probe, a subprocess); :class:`TerminalProgress`
is that function for a terminal: a bar per pipeline stage (tqdm), a line for the rest.
Silent with ``--quiet``, ``--format json``, or when stderr is not a terminal, so that what a
machine reads stays clean.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator


class TerminalProgress:
    """Progress on stderr: a bar per pipeline stage (tqdm), a line for anything else.

    Example:
        >>> from xfer.pipeline import EpochProgress
        >>> progress = TerminalProgress()
        >>> progress(EpochProgress("head", 1, 20))   # draws (or moves) the bar of "head"
        >>> progress("pretraining")   # closes the bar; stderr: "  ... pretraining"
        >>> progress.close()
    """

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, message: str) -> None:
        from tqdm import tqdm

        from xfer.pipeline import EpochProgress

        if not isinstance(message, EpochProgress):
            self.close()
            print(f"  ... {message}", file=sys.stderr, flush=True)
            return
        if self.bar is None or self.bar.desc != message.stage:
            self.close()
            self.bar = tqdm(
                total=message.epochs, desc=message.stage, unit="epoch", file=sys.stderr, leave=False
            )
        self.bar.n = message.epoch - 1
        self.bar.refresh()

    def close(self) -> None:
        """Take the bar away (a finished stage leaves no bar behind)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def terminal_progress(args: argparse.Namespace) -> Iterator[TerminalProgress | None]:
    """The progress function for a command's ``args``, closed when the block ends (a
    failure included): ``None`` with ``--quiet``, ``--format`` other than text, or when
    stderr is not a terminal.

    Example:
        >>> with terminal_progress(argparse.Namespace(quiet=True, format="text")) as progress:
        ...     progress is None
        True
    """
    if args.quiet or args.format != "text" or not sys.stderr.isatty():
        yield None
        return
    progress = TerminalProgress()
    try:
        yield progress
    finally:
        progress.close()
