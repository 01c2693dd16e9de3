"""``xfer compare``: the same run on several backends, side by side, as a check.

The runs are :func:`xfer.job.transfer_on_backends`, the verdict :func:`xfer.compare.check`,
the report :mod:`xfer.cli.report`; this module reads the options and prints.
"""

from __future__ import annotations

import argparse
import json

from xfer import _config
from xfer.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, fail, one_line
from xfer.cli.options import (
    add_backends,
    add_data_options,
    add_transfer_options,
    chosen_backends,
    data_options,
    parse_tolerance,
    transfer_options,
)
from xfer.cli.progress import terminal_progress

HELP = (
    "The same run on every installed backend, from the same weights and batches; a check: "
    "exits 1 when two backends differ past --tolerance."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xfer.compare import DEFAULT_ACCURACY_TOLERANCE, DEFAULT_TOLERANCE, FLOOR

    add_backends(parser)
    parser.add_argument(
        "--out", default="xfer-report", help="directory for report.md and loss_curves.png"
    )
    parser.add_argument(
        "--tolerance",
        type=parse_tolerance,
        default=DEFAULT_TOLERANCE,
        help="largest relative difference |a-b|/max(|a|,|b|,"
        f"{FLOOR:g}) allowed between two backends' losses "
        f"(default: {DEFAULT_TOLERANCE:g}); past it compare exits 1",
    )
    parser.add_argument(
        "--accuracy-tolerance",
        type=parse_tolerance,
        default=DEFAULT_ACCURACY_TOLERANCE,
        help="largest difference allowed between two backends' validation accuracies "
        f"(default: {DEFAULT_ACCURACY_TOLERANCE:g}: an image on the decision boundary "
        "may flip with float32 rounding); past it compare exits 1",
    )
    add_data_options(parser)
    add_transfer_options(parser)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the transfer on each backend, check that they agree, write the report, and print
    the table and the verdict (or all of it as JSON). Exits 1 when two backends diverged
    past the tolerance (naming the first pair, stage and epoch on stderr), a run failed, or
    a frozen tensor changed.

    Example:
        >>> import tempfile
        >>> from xfer.cli import main
        >>> out = tempfile.mkdtemp()
        >>> main(["compare", "--backend", "torch", "--backend", "flax", "--quick", "--out", out])
        ... # doctest: +ELLIPSIS
        stage     backend  loss    val loss  val acc  s/epoch  frozen kept  rel. diff vs torch
        head      torch    ...
        <BLANKLINE>
        agree: torch, flax agree to within tolerance 0.01: ...
        report: .../report.md, .../loss_curves.png
        0
    """
    from xfer import job
    from xfer.cli import report
    from xfer.compare import check, final_metrics

    data = data_options(args)
    model = args.model or "small_cnn"
    if data is None and model not in job.MODELS:
        raise ValueError(
            f"--model {model} needs --data DIR (your images); on the embedded digits: "
            f"{', '.join(job.MODELS)}."
        )
    if (
        data is not None
        and not args.backend
        and job.model_spec.backends_for(model, job.REFERENCE_MODELS)
    ):
        backends = ["keras"]  # and its other engine, in a subprocess
    else:
        backends = chosen_backends(args)
    for backend in backends:
        _config.require(backend)
    with terminal_progress(args) as progress:
        try:
            histories = job.transfer_on_backends(
                backends,
                **transfer_options(args),
                model=model,
                data=data,
                head=args.head,
                progress=progress,
            )
            verdict = check(histories, args.tolerance, args.accuracy_tolerance)
        except (RuntimeError, ValueError, ConnectionError) as error:
            # One line, not a traceback: what failed is in the message.
            return fail(
                "compare",
                one_line(error),
                EXIT_BAD_INPUT if isinstance(error, ValueError) else EXIT_FAILED,
            )
    on = f" on {data['path']}" if data else ""
    title = (
        f"xfer compare: {model}{on}, preset {args.preset}, BN {args.bn or 'of the preset'}"
        f"{', quick' if args.quick else ''}"
    )
    written = report.write_compare_report(histories, args.out, title, verdict)
    unchanged = all(h.ok for h in histories.values())
    if args.format == "json":
        print(json.dumps({
            "backends": final_metrics(histories),
            **verdict.to_dict(),
            "frozen_tensors_kept": unchanged,
            "histories": {b: h.to_dict() for b, h in histories.items()},
            "report": [str(p) for p in written],
        }))  # fmt: skip
    else:
        print(report.compare_table(histories))
        print(f"\n{verdict.status}: {verdict.summary()}")
        print(f"report: {', '.join(str(p) for p in written)}")
    if verdict.exit_status:
        fail("compare", verdict.summary())
    return 1 if verdict.exit_status or not unchanged else 0
