"""``xfer demo``: the Keras-guide recipe with each framework's own loop, checked (the demo
job itself is :mod:`xfer.demo`)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from xfer import _config
from xfer.cli.info import version
from xfer.cli.options import add_backends, add_format, add_quiet, add_seed, chosen_backends
from xfer.cli.progress import terminal_progress
from xfer.tables import table

HELP = (
    "Pretrain, then transfer in two stages with each framework's own loop; verify frozen tensors."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backends(parser)
    add_seed(parser)
    add_format(parser)
    add_quiet(parser)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo on each backend; print a table per backend and the last model's
    summary (or, with ``--format json``, every stage's results). Exits 1 when a tensor xfer
    promised to keep changed.

    Example:
        >>> from xfer.cli import main
        >>> main(["demo", "--backend", "torch", "--format", "json"])   # doctest: +ELLIPSIS
        {"torch": [{"stage": "pretrain", ...}]}
        0
    """
    from xfer import demo
    from xfer.summary import summary

    backends = chosen_backends(args)
    report, failures = {}, 0
    with terminal_progress(args) as progress:
        for backend in backends:
            _config.require(backend)
            results, model = demo.run(backend, seed=args.seed, progress=progress)
            failures += sum(bool(r.changed) for r in results)
            report[backend] = [dataclasses.asdict(r) for r in results]
            if args.format == "text":
                # The Keras engine after a slash: this is the framework's name, with its
                # version beside it, not a registry label.
                engine = f"{backend}/{_config.keras_engine()}" if backend == "keras" else backend
                print(f"{engine} ({version(backend) or '?'})\n{stages_table(results)}", end="\n\n")
                if backend == backends[-1]:
                    summary(model)
    if args.format == "json":
        print(json.dumps(report))
    elif not failures:
        print(
            "\nEvery tensor xfer promised to keep is bit-identical, with no xfer code in the loops."
        )
    return 1 if failures else 0


def stages_table(results: list) -> str:
    """The demo's stages (:class:`xfer.demo.StageResult`) as a table: what trained, the BN
    policy, loss and accuracy, parameter counts, and the tensors kept bit-identical.

    Example:
        >>> from xfer.demo import StageResult
        >>> print(stages_table([StageResult("head", "head", "frozen", 0.21, 0.99, 36, 840, 12, [], 0.04)]))
        stage  what trains  BN      loss   target acc  trainable  frozen  kept bit-identical  s
        head   head         frozen  0.210  0.990       36         840     12/12               0.0
    """
    header = (
        "stage",
        "what trains",
        "BN",
        "loss",
        "target acc",
        "trainable",
        "frozen",
        "kept bit-identical",
        "s",
    )
    rows = [
        (
            r.stage,
            r.trains,
            r.bn,
            f"{r.loss:.3f}",
            f"{r.accuracy:.3f}",
            f"{r.n_trainable:,}",
            f"{r.n_frozen:,}",
            f"{r.kept - len(r.changed)}/{r.kept}"
            + (f" CHANGED: {', '.join(r.changed[:3])}" if r.changed else ""),
            f"{r.seconds:.1f}",
        )
        for r in results
    ]
    return table(header, rows)
