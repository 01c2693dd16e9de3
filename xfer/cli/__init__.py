"""xfer: freezing and inference mode done right on PyTorch, Keras 3 and Flax NNX (also: python -m xfer).

The command line: :func:`main` (the ``xfer`` console script) and its parser. Each command
is a module of this package (``info``, ``demo``, ``semantics``, ``pretrain``, ``run``,
``compare``, ``digits``) with the same three names: ``HELP`` (its line in ``xfer --help``),
``add_arguments(parser)`` and ``cmd_<name>(args)`` (returns the exit status). Beside them:
:mod:`~xfer.cli.options` (options several commands share), :mod:`~xfer.cli.progress` (the
progress display), :mod:`~xfer.cli.report` (the compare report) and :mod:`~xfer.cli.errors`
(one-line errors); tables are laid out by the library's one formatter, :mod:`xfer.tables`.

The command modules import xfer's library and the frameworks only when they run, so that
``xfer info`` and ``xfer --help`` start at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import NoReturn

from xfer.cli import compare, demo, digits, info, pretrain, run, semantics
from xfer.cli.compare import cmd_compare
from xfer.cli.demo import cmd_demo
from xfer.cli.digits import cmd_digits
from xfer.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, one_line
from xfer.cli.info import cmd_info
from xfer.cli.pretrain import cmd_pretrain
from xfer.cli.run import cmd_run
from xfer.cli.semantics import cmd_semantics

__all__ = ["build_parser", "exit_status", "main"]

DESCRIPTION = (
    "xfer: freezing and inference mode done right on PyTorch, Keras 3 and Flax NNX "
    "(also: python -m xfer)."
)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``xfer run: argument --seed: ...``) like
    every other error of the CLI; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``xfer --help`` lists them.

    Example:
        >>> args = build_parser().parse_args(["run", "--backend", "torch", "--quick"])
        >>> args.command, args.backend, args.preset, args.quick
        ('run', 'torch', 'keras_guide', True)
    """
    parser = _Parser(prog="xfer", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    for module, handler in (
        (info, cmd_info),
        (demo, cmd_demo),
        (semantics, cmd_semantics),
        (pretrain, cmd_pretrain),
        (run, cmd_run),
        (compare, cmd_compare),
        (digits, cmd_digits),
    ):
        command = commands.add_parser(module.__name__.rpartition(".")[2], help=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=handler)
    return parser


# xfer's errors for bad input (a name, a value, a path, a missing framework): the message
# says what to fix, so the user sees it alone; anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, TypeError, ImportError, FileNotFoundError, NotADirectoryError,
             IsADirectoryError, FileExistsError, PermissionError)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xfer`` console script.

    xfer's own errors come out as one line on stderr, ``xfer <command>: <message>``, with
    exit status 2 for bad input (a name, value, path or missing framework) and 1 for a run
    that failed (a non-finite loss); Ctrl-C exits 130. ``XFER_DEBUG=1`` shows the traceback.

    Example:
        >>> from xfer.cli import main
        >>> main(["info", "--format", "json"])   # doctest: +ELLIPSIS
        {"xfer": ..., "backends": {"torch": ...}}
        0
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "no_compile_cache", False):
        from xfer.compile_cache import SWITCH

        os.environ[SWITCH] = "0"  # before any backend loads; inherited by child processes
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as quiet:
            if not os.environ.get("XFER_DEBUG"):
                # A warning is a note to the user, not a source line of xfer's.
                warnings.showwarning = lambda message, *_, **__: print(
                    f"xfer {args.command}: note: {one_line(message)}", file=sys.stderr
                )
            if not _reports():  # under torchrun, rank 0 speaks for every rank
                warnings.simplefilter("ignore")
                quiet.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115
            return args.run(args)
    except KeyboardInterrupt:
        if os.environ.get("XFER_DEBUG"):
            raise
        print(f"xfer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        status = exit_status(error)
        if status is None or os.environ.get("XFER_DEBUG"):
            raise
        message = one_line(error)
        print(f"xfer {args.command}: {message or type(error).__name__}", file=sys.stderr)
        return status


def _reports() -> bool:
    """Whether this process prints results: not a rank other than 0 of a distributed launch
    (those print only their errors)."""
    from xfer.distributed import launched_world

    try:
        world = launched_world()
    except ValueError:
        return True  # the run itself refuses the environment, in one line
    return world is None or world.is_main


def exit_status(error: Exception) -> int | None:
    """2 for bad input, 1 for a failed run, ``None`` for an error that is not xfer's to word
    (a bug: :func:`main` lets its traceback through).

    Example:
        >>> exit_status(FileNotFoundError("no such file")), exit_status(ZeroDivisionError())
        (2, None)
    """
    from xfer.distributed import PeerLost
    from xfer.pipeline import NonFiniteLoss  # imports no framework

    if isinstance(error, (NonFiniteLoss, PeerLost)):
        return EXIT_FAILED
    return EXIT_BAD_INPUT if isinstance(error, BAD_INPUT) else None
