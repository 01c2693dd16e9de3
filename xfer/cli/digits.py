"""``xfer digits``: the embedded digits as a folder of PNG images, one sub-folder per
class, so that ``xfer run --data`` can be tried (and the README's example reproduced)
without images of one's own."""

from __future__ import annotations

import argparse

from xfer.cli.options import add_seed

HELP = "Write the embedded digits as PNG class folders (DIR/0 .. DIR/9), for xfer run --data."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="DIR", help="the folder to write (must not exist yet)")
    parser.add_argument(
        "--per-class",
        type=int,
        default=30,
        help="images per digit, drawn by --seed (default: 30; at most 174)",
    )
    add_seed(parser)


def cmd_digits(args: argparse.Namespace) -> int:
    """Write ``--per-class`` 8x8 grayscale digits of each class as PNG files.

    Example:
        >>> import os, tempfile
        >>> from xfer.cli import main
        >>> out = os.path.join(tempfile.mkdtemp(), "digits")
        >>> main(["digits", out, "--per-class", "2"])   # doctest: +ELLIPSIS
        wrote 20 images of 8x8 in 10 class folders: .../digits
        0
    """
    import numpy as np

    from xfer.data import digits, images

    if not 1 <= args.per_class <= 174:  # the rarest digit has 174 images
        raise ValueError(f"--per-class must be in [1, 174], got {args.per_class}.")
    x, y = digits.digits()
    rng = np.random.default_rng(args.seed)
    chosen = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: args.per_class] for c in range(10)]
    )
    # Refused before anything is written: a second run would mix two draws.
    from pathlib import Path

    if Path(args.out).exists():
        raise FileExistsError(f"{args.out} exists: name a new folder, or remove it first.")
    root = images.write_folders(x[chosen], y[chosen], tuple(map(str, range(10))), args.out)
    print(f"wrote {len(chosen)} images of 8x8 in 10 class folders: {root}")
    return 0
