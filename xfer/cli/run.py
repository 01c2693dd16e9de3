"""``xfer run``: the main job on one backend, and the text it prints (the job itself is
:func:`xfer.job.run`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from xfer import _config
from xfer.cli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail, one_line
from xfer.cli.info import version
from xfer.cli.options import (
    add_backend,
    add_data_options,
    add_transfer_options,
    chosen_backend,
    data_options,
    parse_devices,
    transfer_options,
)
from xfer.cli.progress import terminal_progress

HELP = "The main job: from the shipped source model (digits 0-4), transfer to shifted digits 5-9."

_ORIGIN = {
    "shipped": "shipped with xfer",
    "file": "from --weights",
    "pretrained": "pretrained now",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help="neutral weights of the source model (default: the shipped ones for "
        "seed 0, pretrained now for another seed); with --data: imagenet (a keras: "
        "model, downloaded by Keras) or neutral weights of the whole model",
    )
    parser.add_argument(
        "--checkpoint", metavar="DIR", help="save a checkpoint after each stage here"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run saved in --checkpoint DIR"
    )
    parser.add_argument(
        "--cache",
        choices=("auto", "off"),
        default="auto",
        help="cache a frozen base's features when a stage allows it (default: auto)",
    )
    parser.add_argument(
        "--export",
        metavar="PATH.onnx",
        help="write the transferred model to this ONNX file (BN folded, checked by "
        "onnxruntime; needs xfer[onnx]); checked before training",
    )
    parser.add_argument(
        "--recalibrate",
        nargs="?",
        const="after",
        choices=("before", "after"),
        help="re-estimate every BN's statistics on the training images (xfer.recalibrate_bn): "
        "after the last stage trains (the default), or before the first one (AdaBN)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when the framework sees a GPU",
    )
    parser.add_argument(
        "--devices",
        type=parse_devices,
        default=None,
        metavar="N",
        help="data-parallel over N devices of this process (flax, keras on jax: each batch "
        "sharded, BN on the whole batch); PyTorch: torchrun --nproc-per-node N -m xfer run",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "bf16"),
        default="float32",
        help="bf16: mixed precision, the framework's own (torch autocast, Keras "
        "mixed_bfloat16, Flax layer dtypes); weights, BN statistics and optimizer state "
        "stay float32",
    )
    add_backend(parser)
    add_data_options(parser)
    add_transfer_options(parser)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the main job and print its per-stage table (or its report as JSON). Exits 1
    when the run failed or a frozen tensor changed, 2 for input to fix (a ``--weights``
    file that is not the source model's, ``--resume`` without ``--checkpoint``), 130 on
    Ctrl-C (saying what the checkpoint holds and how to resume).

    Example:
        >>> from xfer.cli import main
        >>> main(["run", "--backend", "torch", "--quick"])   # doctest: +ELLIPSIS
        xfer run: torch ..., preset keras_guide, BN policy of the preset
        ...
        0
    """
    from xfer import job

    backend = chosen_backend(args)
    from xfer.checkpoint import CheckpointError
    from xfer.pipeline import Interrupted, NonFiniteLoss

    if args.resume and not args.checkpoint:
        return fail(
            "run",
            "--resume needs --checkpoint DIR (the directory of the interrupted run).",
            EXIT_BAD_INPUT,
        )
    data = data_options(args)
    if data is not None:
        return _run_on_data(args, backend, data)
    if args.model not in (None, "small_cnn") or args.head is not None:
        return fail(
            "run",
            f"{'--model ' + args.model if args.model else '--head/--no-head'} needs --data "
            "DIR (your images): the embedded task transfers the shipped "
            "small_cnn (xfer compare --model resnet18 runs the ResNet on it).",
            EXIT_BAD_INPUT,
        )
    if args.weights:
        # Checked before any training, in one line: the usual mistake is another model's file.
        try:
            job.pretrained(backend, args.seed, weights=args.weights)
        except (OSError, ValueError) as error:
            return fail(
                "run",
                f"--weights {args.weights}: {one_line(error)} Expected neutral "
                "weights of the source model; `xfer pretrain --out PATH` writes one.",
                EXIT_BAD_INPUT,
            )
    with terminal_progress(args) as progress:
        try:
            result = job.run(
                backend,
                **transfer_options(args),
                progress=progress,
                checkpoint_dir=args.checkpoint,
                resume=args.resume,
                cache=args.cache,
                device=args.device,
                devices=args.devices,
                precision=args.precision,
                weights_file=args.weights,
                recalibrate=args.recalibrate,
                export=args.export,
            )
        except Interrupted as stop:
            print(f"\n{stop}", file=sys.stderr)  # it says what is saved and how to resume
            return EXIT_INTERRUPTED
        except (NonFiniteLoss, CheckpointError) as error:
            return fail("run", one_line(error))
    report = dataclasses.asdict(result)
    report.update(backend=_config.label(backend), version=version(backend))
    print(json.dumps(report) if args.format == "json" else run_text(report))
    return 0 if result.history.ok else 1


def _run_on_data(args: argparse.Namespace, backend: str, data: dict) -> int:
    """``xfer run --data``: :func:`xfer.data_job.run_on_data`, printed like the embedded task."""
    from xfer import data_job
    from xfer.checkpoint import CheckpointError
    from xfer.pipeline import Interrupted, NonFiniteLoss

    with terminal_progress(args) as progress:
        try:
            result = data_job.run_on_data(
                backend,
                data,
                model=args.model or "small_cnn",
                head=args.head,
                weights=args.weights,
                **transfer_options(args),
                progress=progress,
                checkpoint_dir=args.checkpoint,
                resume=args.resume,
                cache=args.cache,
                device=args.device,
                devices=args.devices,
                precision=args.precision,
                recalibrate=args.recalibrate,
                export=args.export,
            )
        except Interrupted as stop:
            print(f"\n{stop}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (NonFiniteLoss, CheckpointError, ConnectionError) as error:
            return fail("run", one_line(error))
    report = dataclasses.asdict(result)
    report.update(backend=_config.label(backend), version=version(backend))
    print(json.dumps(report) if args.format == "json" else data_run_text(report))
    return 0 if result.history.ok else 1


_WEIGHTS = {
    "random": "random weights (seeded)",
    "imagenet": "ImageNet weights",
    "file": "from --weights",
}


def data_run_text(report: dict) -> str:
    """The text ``xfer run --data`` prints, from its ``--format json`` report.

    Example:
        >>> from xfer.pipeline import History
        >>> data = {"source": "digits", "classes": ["5", "6"], "image_shape": [8, 8, 1],
        ...         "counts": {"5": {"train": 8, "val": 2}, "6": {"train": 8, "val": 2}},
        ...         "normalisation": "pixels / 255 (8-bit images to [0, 1])", "skipped": 0}
        >>> report = {"backend": "torch", "version": "2.13.0", "preset": "keras_guide", "bn": None,
        ...           "model": "small_cnn", "weights": "random", "data": data,
        ...           "history": History("torch", [], "cpu").to_dict()}
        >>> print(data_run_text(report))  # doctest: +NORMALIZE_WHITESPACE
        xfer run: torch 2.13.0, preset keras_guide, BN policy of the preset
        model: small_cnn, random weights (seeded)
        data: digits, 2 classes, 16 training and 4 validation images of 8x8x1, normalised: pixels / 255 (8-bit images to [0, 1])
        classes (train/val): 5 8/2, 6 8/2
        <BLANKLINE>
        torch on cpu
        stage  epochs  loss  val loss  val acc  trainable  frozen  frozen tensors  features cached
    """
    from xfer.pipeline import History

    data = report["data"]
    counts = data["counts"]
    train = sum(c["train"] for c in counts.values())
    val = sum(c["val"] for c in counts.values())
    skipped = f", {data['skipped']} unreadable files skipped" if data["skipped"] else ""
    classes = ", ".join(f"{name} {c['train']}/{c['val']}" for name, c in counts.items())
    return (
        f"{_header(report)}\n"
        f"model: {report['model']}, {_WEIGHTS[report['weights']]}\n"
        f"data: {data['source']}, {len(counts)} classes, {train} training and {val} "
        f"validation images of {'x'.join(map(str, data['image_shape']))}, normalised: "
        f"{data['normalisation']}{skipped}\n"
        f"classes (train/val): {classes}\n\n"
        f"{History.from_dict(report['history'])}{_exported(report)}"
    )


def _exported(report: dict) -> str:
    path = report.get("export")
    return f"\n\nexported: {path} (ONNX, BN folded, checked by onnxruntime)" if path else ""


def _header(report: dict) -> str:
    when = {"after": "after the last stage", "before": "before the first stage"}
    recalibrate = report.get("recalibrate")
    recalibrated = f", BN statistics re-estimated {when[recalibrate]}" if recalibrate else ""
    return (
        f"xfer run: {report['backend']} {report['version']}, preset {report['preset']}, "
        f"BN policy {report['bn'] or 'of the preset'}{recalibrated}"
    )


def run_text(report: dict) -> str:
    """The text ``xfer run`` prints, from its ``--format json`` report (so that the README's
    block, made from the json by scripts/readme_numbers.py, is what a user sees).

    Example:
        >>> from xfer.pipeline import EpochRecord, History, StageRecord
        >>> head = StageRecord("head", 85, 2544, 12, [], [EpochRecord(1, 1.6848, 1.6087, 0.201, 0.1)], "off")
        >>> report = {"backend": "torch", "version": "2.13.0", "preset": "keras_guide", "bn": None,
        ...           "source_weights": "shipped", "source_accuracy": 0.978,
        ...           "history": History("torch", [head], "cpu").to_dict()}
        >>> print(run_text(report))
        xfer run: torch 2.13.0, preset keras_guide, BN policy of the preset
        source model (digits 0-4, shipped with xfer): validation accuracy 0.978
        target: digits 5-9, ink inverted and contrast changed, 20 labelled images per class
        <BLANKLINE>
        torch on cpu
        stage  epochs  loss    val loss  val acc  trainable  frozen  frozen tensors       features cached
        head   1       1.6848  1.6087    0.201    85         2,544   12/12 bit-identical  off
    """
    from xfer.pipeline import History

    origin = _ORIGIN[report["source_weights"]]
    return (
        f"{_header(report)}\n"
        f"source model (digits 0-4, {origin}): validation accuracy {report['source_accuracy']:.3f}\n"
        "target: digits 5-9, ink inverted and contrast changed, 20 labelled images per class\n\n"
        f"{History.from_dict(report['history'])}{_exported(report)}"
    )
