"""``xfer pretrain``: pretrain the source model and write its neutral weights, for
``xfer run --weights`` (the job is :func:`xfer.job.pretrain`)."""

from __future__ import annotations

import argparse
import json

from xfer import _config
from xfer.cli.errors import fail, one_line
from xfer.cli.options import add_backend, add_format, add_quiet, add_seed, chosen_backend
from xfer.cli.progress import terminal_progress

HELP = "Pretrain the source model on digits 0-4 and write its neutral weights (for run --weights)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="PATH", help="the .safetensors to write")
    add_backend(parser)
    add_seed(parser, "initialisation and data order")
    add_format(parser)
    add_quiet(parser)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain on the source digits, print the source validation accuracy, and write the
    weights to ``--out`` (atomically: no partial file on failure). Exits 1 when the file
    cannot be written.

    Example:
        >>> import os, tempfile
        >>> from xfer.cli import main
        >>> out = os.path.join(tempfile.mkdtemp(), "source.safetensors")
        >>> main(["pretrain", "--backend", "torch", "--out", out])   # doctest: +ELLIPSIS
        xfer pretrain: torch, seed 0: source validation accuracy ...
        wrote ... (sha256:...); use it with `xfer run --weights ...`
        0
    """
    from xfer import job
    from xfer.weights import save_weights

    backend = chosen_backend(args)
    with terminal_progress(args) as progress:
        model = job.pretrain(backend, args.seed, progress)
    accuracy = job.source_accuracy(backend, model, args.seed)
    try:
        digest = save_weights(model, args.out)  # atomic: no partial file on failure
    except OSError as error:
        return fail("pretrain", f"cannot write --out {args.out}: {one_line(error)}")
    report = {
        "backend": _config.label(backend),
        "seed": args.seed,
        "out": args.out,
        "digest": digest,
        "source_accuracy": accuracy,
    }
    if args.format == "json":
        print(json.dumps(report))
    else:
        print(
            f"xfer pretrain: {_config.label(backend)}, seed {args.seed}: source validation accuracy "
            f"{accuracy:.3f}\nwrote {args.out} ({digest}); use it with "
            f"`xfer run --weights {args.out}`"
        )
    return 0
