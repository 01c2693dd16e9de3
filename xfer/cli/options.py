"""The options several commands share, and the argparse types that check them.

Each ``add_*`` adds one option (or one group, :func:`add_transfer_options`) to a command's
parser, with the same name, default and help in every command; the backend choices come
from the registry (:data:`xfer._config.BACKENDS`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="xfer demo")
    >>> add_backends(parser)
    >>> add_seed(parser)
    >>> parser.parse_args(["--backend", "torch", "--backend", "flax", "--seed", "3"])
    Namespace(backend=['torch', 'flax'], seed=3)
"""

from __future__ import annotations

import argparse

from xfer import _config

FORMATS = ("text", "json")


def parse_seed(text: str) -> int:
    """argparse type of ``--seed``: it seeds numpy's generator, which takes no negative.

    Example:
        >>> parse_seed("3")
        3
        >>> parse_seed("-1")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected an integer >= 0, got '-1'
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parse_tolerance(text: str) -> float:
    """argparse type of ``--tolerance`` and ``--accuracy-tolerance``: a finite number >= 0.

    Example:
        >>> parse_tolerance("1e-4")
        0.0001
        >>> parse_tolerance("inf")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected a finite number >= 0 (a relative difference, e.g. 1e-4), got 'inf'
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a finite number >= 0 (a relative difference, e.g. 1e-4), got {text!r}"
        )
    return value


def add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend B``: the one backend a command runs on (see :func:`chosen_backend`)."""
    parser.add_argument(
        "--backend", choices=_config.BACKENDS, help="default: XFER_BACKEND or the first installed"
    )


def add_backends(
    parser: argparse.ArgumentParser,
    help_text: str = "repeatable; default: every installed backend",
) -> None:
    """``--backend B`` repeatable: the backends a command runs on (see
    :func:`chosen_backends`)."""
    parser.add_argument("--backend", action="append", choices=_config.BACKENDS, help=help_text)


def add_seed(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """``--seed N`` (default 0), checked by :func:`parse_seed`."""
    parser.add_argument("--seed", type=parse_seed, default=0, help=help_text)


def add_format(parser: argparse.ArgumentParser, formats: tuple[str, ...] = FORMATS) -> None:
    """``--format``: text for a person (the default), json (or markdown) for a machine."""
    parser.add_argument("--format", choices=formats, default="text")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress on stderr (see :mod:`xfer.cli.progress`)."""
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def add_transfer_options(parser: argparse.ArgumentParser) -> None:
    """What ``xfer run`` and ``xfer compare`` both take: ``--preset``, ``--bn``,
    ``--seed``, ``--format``, ``--quiet`` and ``--quick``."""
    from xfer.pipeline.presets import PRESETS
    from xfer.policy import PRESETS as BN_PRESETS

    parser.add_argument("--preset", choices=tuple(PRESETS), default="keras_guide")
    parser.add_argument(
        "--bn",
        choices=tuple(BN_PRESETS),
        help="BN policy for every stage (default: the preset's)",
    )
    add_seed(parser)
    add_format(parser)
    add_quiet(parser)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: at most 2 epochs a stage"
    )


def transfer_options(args: argparse.Namespace) -> dict:
    """The job's options among those :func:`add_transfer_options` added (``--format`` and
    ``--quiet`` are the command's own), as keyword arguments of :func:`xfer.job.run` and
    :func:`xfer.job.transfer_on_backends`.

    Example:
        >>> args = argparse.Namespace(preset="fine_tune", bn=None, seed=1, quick=True)
        >>> transfer_options(args)
        {'preset': 'fine_tune', 'bn': None, 'seed': 1, 'quick': True}
    """
    return dict(preset=args.preset, bn=args.bn, seed=args.seed, quick=args.quick)


def chosen_backend(args: argparse.Namespace) -> str:
    """The backend of ``--backend``, else of ``XFER_BACKEND``, else the first installed;
    an ``ImportError`` naming the extra to install if it cannot run.

    Example:
        >>> chosen_backend(argparse.Namespace(backend="torch"))
        'torch'
    """
    backend = args.backend or _config.get_backend()
    _config.require(backend)
    return backend


def chosen_backends(args: argparse.Namespace) -> list[str]:
    """The backends of the repeated ``--backend``, else every installed one.

    Example:
        >>> chosen_backends(argparse.Namespace(backend=["flax", "torch"]))
        ['flax', 'torch']
    """
    return args.backend or [b for b in _config.BACKENDS if not _config.missing(b)]
