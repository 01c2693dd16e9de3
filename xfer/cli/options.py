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
    Namespace(backend=['torch', 'flax'], no_compile_cache=False, seed=3)
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


def parse_devices(text: str) -> int:
    """argparse type of ``--devices``: how many devices to shard each batch over.

    Example:
        >>> parse_devices("2")
        2
        >>> parse_devices("0")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected an integer >= 1 (devices), got '0'
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (devices), got {text!r}")
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
    add_compile_cache(parser)


def add_backends(
    parser: argparse.ArgumentParser,
    help_text: str = "repeatable; default: every installed backend",
) -> None:
    """``--backend B`` repeatable: the backends a command runs on (see
    :func:`chosen_backends`)."""
    parser.add_argument("--backend", action="append", choices=_config.BACKENDS, help=help_text)
    add_compile_cache(parser)


def add_compile_cache(parser: argparse.ArgumentParser) -> None:
    """``--no-compile-cache``: JAX compiles afresh, without xfer's persistent compilation
    cache (:mod:`xfer.compile_cache`; the command's child processes inherit it)."""
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="JAX backends: do not use the persistent compilation cache in ~/.cache/xfer/jax "
        "(XFER_CACHE moves it; XFER_COMPILE_CACHE=0 is the same switch)",
    )


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


def parse_val_fraction(text: str) -> float:
    """argparse type of ``--val-fraction``: a number in (0, 1).

    Example:
        >>> parse_val_fraction("0.25")
        0.25
        >>> parse_val_fraction("1")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected a number in (0, 1), e.g. 0.2, got '1'
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), e.g. 0.2, got {text!r}")
    return value


def parse_image_size(text: str) -> tuple[int, int]:
    """argparse type of ``--image-size``: ``N`` or ``HxW`` (see
    :func:`xfer.data.images.parse_image_size`).

    Example:
        >>> parse_image_size("16")
        (16, 16)
    """
    from xfer.data.images import parse_image_size as parse

    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """What ``xfer run`` and ``xfer compare`` take for the user's data and model:
    ``--data``, ``--model``, ``--head``/``--no-head``, ``--image-size``, ``--color``,
    ``--val-fraction``."""
    from xfer.data.images import COLORS
    from xfer.job import MODELS

    parser.add_argument(
        "--data",
        metavar="DIR",
        help="your images: a folder with one sub-folder of PNG/JPEG images per class "
        "(classes: the sorted folder names), or an .npz with arrays x and y "
        "(default: the embedded digits task)",
    )
    parser.add_argument(
        "--model",
        metavar="M",
        help=f"{', '.join(MODELS)} (reference models; without --data: small_cnn, or "
        "resnet18 on compare), keras:NAME (a keras.applications backbone, Keras only, "
        "random weights unless --weights imagenet) or package.module:function (your "
        "factory returning a native model) (default: small_cnn)",
    )
    parser.add_argument(
        "--head",
        action=argparse.BooleanOptionalAction,
        help="give a keras:/factory backbone xfer's head for the data's classes "
        "(head.pool, head.drop, head.dense; default: on); --no-head: the factory's model "
        "already has its head.** units",
    )
    parser.add_argument(
        "--image-size", type=parse_image_size, metavar="N|HxW", help="resize every image (Pillow)"
    )
    parser.add_argument("--color", choices=COLORS, help="convert every image to RGB or grayscale")
    parser.add_argument(
        "--val-fraction",
        type=parse_val_fraction,
        default=0.2,
        help="share of each class held out for validation, seeded by --seed (default: 0.2)",
    )


def data_options(args: argparse.Namespace) -> dict | None:
    """The ``data`` of :func:`xfer.data_job.run_on_data` (``None`` without ``--data``); a
    ``ValueError`` for a data option given without ``--data``.

    Example:
        >>> data_options(argparse.Namespace(data="imgs", image_size=(8, 8), color=None,
        ...                                 val_fraction=0.2))
        {'path': 'imgs', 'image_size': [8, 8], 'color': None, 'val_fraction': 0.2}
    """
    if args.data is None:
        given = [o for o, v in (("--image-size", args.image_size), ("--color", args.color)) if v]
        if given or args.val_fraction != 0.2:
            raise ValueError(
                f"{' and '.join(given) or '--val-fraction'} apply to your images: pass --data DIR too."
            )
        return None
    size = list(args.image_size) if args.image_size else None  # json-ready for a subprocess
    return dict(path=args.data, image_size=size, color=args.color, val_fraction=args.val_fraction)


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
