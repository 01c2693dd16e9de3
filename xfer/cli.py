"""xfer: freezing and inference mode done right on PyTorch, Keras 3 and Flax NNX (also: python -m xfer)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import warnings
from typing import NoReturn

from xfer import _config

_PACKAGES = ("torch", "keras", "jax", "flax", "optax")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cmd_info(args: argparse.Namespace) -> int:
    """Installed frameworks and which xfer backends can run."""
    versions = {p: _version(p) for p in _PACKAGES}
    runnable = {
        b: "ready" if not _config.missing(b) else f'pip install "xfer[{b}]"'
        for b in _config.BACKENDS
    }
    if args.format == "json":
        print(json.dumps({"xfer": _version("xfer"), "packages": versions, "backends": runnable}))
        return 0
    print(f"xfer {_version('xfer')}")
    for package, version in versions.items():
        print(f"  {package:<6} {version or 'not installed'}")
    for backend, status in runnable.items():
        print(f"  backend {backend:<5} {status}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain, then transfer in two stages with each framework's own loop; verify frozen tensors."""
    import dataclasses

    from xfer import demo
    from xfer.summary import summary

    backends = args.backend or [b for b in _config.BACKENDS if not _config.missing(b)]
    report, failures = {}, 0
    for backend in backends:
        _config.require(backend)
        results, model = demo.run(backend, seed=args.seed, progress=_progress(args))
        failures += sum(bool(r.changed) for r in results)
        report[backend] = [dataclasses.asdict(r) for r in results]
        if args.format == "text":
            engine = f"{backend}/{_keras_engine()}" if backend == "keras" else backend
            print(demo.format_table(engine, _version(backend) or "?", results), end="\n\n")
            if backend == backends[-1]:
                summary(model)
    if args.format == "json":
        print(json.dumps(report))
    elif not failures:
        print(
            "\nEvery tensor xfer promised to keep is bit-identical, with no xfer code in the loops."
        )
    return 1 if failures else 0


def cmd_semantics(args: argparse.Namespace) -> int:
    """Measure what each framework's own freeze/mode switches do here, beside xfer's guarantees."""
    from xfer import semantics

    report = semantics.measure(args.backend, progress=_progress(args))
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


def _backends(args: argparse.Namespace) -> list[str]:
    return args.backend or [b for b in _config.BACKENDS if not _config.missing(b)]


def _label(backend: str) -> str:
    return f"keras-{_keras_engine()}" if backend == "keras" else backend


_ORIGIN = {
    "shipped": "shipped with xfer",
    "file": "from --weights",
    "pretrained": "pretrained now",
}


def run_text(report: dict) -> str:
    """The text ``xfer run`` prints, from its ``--format json`` report (so that the README's
    block, made from the json by scripts/readme_numbers.py, is what a user sees).

    Example:
        >>> print(run_text(json.loads(json_output)))          # doctest: +SKIP
    """
    from xfer.pipeline import History

    origin = _ORIGIN[report["source_weights"]]
    return (
        f"xfer run: {report['backend']} {report['version']}, preset {report['preset']}, "
        f"BN policy {report['bn'] or 'of the preset'}\n"
        f"source model (digits 0-4, {origin}): validation accuracy {report['source_accuracy']:.3f}\n"
        "target: digits 5-9, ink inverted and contrast changed, 20 labelled images per class\n\n"
        f"{History.from_dict(report['history'])}"
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: from the shipped source model (digits 0-4), transfer to shifted digits 5-9."""
    import dataclasses

    from xfer import run

    backend = args.backend or _config.get_backend()
    _config.require(backend)
    from xfer.checkpoint import CheckpointError
    from xfer.pipeline import Interrupted, NonFiniteLoss

    if args.resume and not args.checkpoint:
        print(
            "xfer run: --resume needs --checkpoint DIR (the directory of the interrupted run).",
            file=sys.stderr,
        )
        return 2
    if args.weights:
        # Checked before any training, in one line: the usual mistake is another model's file.
        try:
            run.pretrained(backend, args.seed, weights=args.weights)
        except (OSError, ValueError) as error:
            print(
                f"xfer run: --weights {args.weights}: {_one_line(error)} Expected neutral "
                "weights of the source model; `xfer pretrain --out PATH` writes one.",
                file=sys.stderr,
            )
            return 2
    progress = _progress(args)
    try:
        result = run.run(
            backend,
            preset=args.preset,
            bn=args.bn,
            seed=args.seed,
            progress=progress,
            quick=args.quick,
            checkpoint_dir=args.checkpoint,
            resume=args.resume,
            cache=args.cache,
            device=args.device,
            weights_file=args.weights,
        )
    except Interrupted as stop:
        print(f"\n{stop}", file=sys.stderr)  # it says what is saved and how to resume
        return 130
    except (NonFiniteLoss, CheckpointError) as error:
        print(f"xfer run: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    report = dataclasses.asdict(result)
    report.update(backend=_label(backend), version=_version(backend))
    print(json.dumps(report) if args.format == "json" else run_text(report))
    return 0 if result.history.ok else 1


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain the source model on digits 0-4 and write its neutral weights (for run --weights)."""
    from xfer import run
    from xfer.weights import save_weights

    backend = args.backend or _config.get_backend()
    _config.require(backend)
    progress = _progress(args)
    try:
        model = run.pretrain(backend, args.seed, progress)
    finally:
        if progress is not None:
            progress.close()
    accuracy = run.source_accuracy(backend, model, args.seed)
    try:
        digest = save_weights(model, args.out)  # atomic: no partial file on failure
    except OSError as error:
        print(f"xfer pretrain: cannot write --out {args.out}: {_one_line(error)}", file=sys.stderr)
        return 1
    report = {
        "backend": _label(backend),
        "seed": args.seed,
        "out": args.out,
        "digest": digest,
        "source_accuracy": accuracy,
    }
    if args.format == "json":
        print(json.dumps(report))
    else:
        print(
            f"xfer pretrain: {_label(backend)}, seed {args.seed}: source validation accuracy "
            f"{accuracy:.3f}\nwrote {args.out} ({digest}); use it with "
            f"`xfer run --weights {args.out}`"
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The same run on every installed backend, from the same weights and batches; a check:
    exits 1 when two backends differ past --tolerance."""
    from xfer import report, run

    backends = _backends(args)
    for backend in backends:
        _config.require(backend)
    progress = _progress(args)
    try:
        if args.model == "small_cnn":
            weights, _ = run.pretrained(backends[0], args.seed, progress, args.quick)
        else:
            weights = None  # see run.MODELS: the ResNet starts from fresh seeded weights
        start = run.start_weights(backends[0], weights, args.seed, model=args.model)
        options = dict(
            preset=args.preset, bn=args.bn, seed=args.seed, quick=args.quick, model=args.model
        )
        histories = {}
        for backend in backends:
            history, _ = run.transfer(backend, start, progress=progress, **options)
            histories[_label(backend)] = history
        if "keras" in backends:
            # Keras reads KERAS_BACKEND once per process: its other engine runs in a subprocess.
            other = "torch" if _keras_engine() == "jax" else "jax"
            if _config.is_installed(other):
                if progress is not None:
                    progress(f"keras-{other} (in a subprocess: one Keras engine per process)")
                histories[f"keras-{other}"] = run.transfer_on_other_keras_engine(
                    other, start, **options
                )
        verdict = report.check(histories, args.tolerance, args.accuracy_tolerance)
    except (RuntimeError, ValueError) as error:
        # One line, not a traceback: what failed is in the message.
        print(f"xfer compare: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    title = (
        f"xfer compare: {args.model}, preset {args.preset}, BN {args.bn or 'of the preset'}"
        f"{', quick' if args.quick else ''}"
    )
    written = report.write_compare_report(histories, args.out, title, verdict)
    unchanged = all(h.ok for h in histories.values())
    if args.format == "json":
        print(json.dumps({
            "backends": report.final_metrics(histories),
            **verdict.to_dict(),
            "frozen_tensors_kept": unchanged,
            "histories": {b: h.to_dict() for b, h in histories.items()},
            "report": [str(p) for p in written],
        }))  # fmt: skip
    else:
        print(report.table(report.compare_header(histories), report.compare_rows(histories)))
        print(f"\n{verdict.status}: {verdict.summary()}")
        print(f"report: {', '.join(str(p) for p in written)}")
    if verdict.exit_status:
        print(f"xfer compare: {verdict.summary()}", file=sys.stderr)
    return 1 if verdict.exit_status or not unchanged else 0


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a finite number >= 0 (a relative difference, e.g. 1e-4), got {text!r}"
        )
    return value


class _Progress:
    """Progress on stderr while a person is watching: a bar per pipeline stage (tqdm), a
    line for anything else. Silent with --quiet, --format json, or when not a terminal."""

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
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(args: argparse.Namespace) -> _Progress | None:
    if args.quiet or args.format != "text" or not sys.stderr.isatty():
        return None
    return _Progress()


def _keras_engine() -> str:
    from xfer.backends.keras_semantics import engine  # framework code stays in backends/

    return engine()


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``xfer run: argument --seed: ...``) like
    every other error of the CLI; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    """argparse type of --seed: it seeds numpy's generator, which takes no negative."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xfer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("--format", choices=("text", "json"), default="text")
    info.set_defaults(run=cmd_info)
    demo = commands.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument(
        "--backend",
        action="append",
        choices=_config.BACKENDS,
        help="repeatable; default: every installed backend",
    )
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--format", choices=("text", "json"), default="text")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(run=cmd_demo)
    semantics = commands.add_parser("semantics", help=cmd_semantics.__doc__)
    semantics.add_argument(
        "--backend",
        action="append",
        choices=_config.BACKENDS,
        help="repeatable; default: every installed backend (Keras on each installed engine)",
    )
    semantics.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    semantics.add_argument("--quiet", action="store_true", help="no progress lines")
    semantics.set_defaults(run=cmd_semantics)
    pretrain = commands.add_parser("pretrain", help=cmd_pretrain.__doc__)
    pretrain.add_argument("--out", required=True, metavar="PATH", help="the .safetensors to write")
    pretrain.add_argument(
        "--backend", choices=_config.BACKENDS, help="default: XFER_BACKEND or the first installed"
    )
    pretrain.add_argument("--seed", type=_seed, default=0, help="initialisation and data order")
    pretrain.add_argument("--format", choices=("text", "json"), default="text")
    pretrain.add_argument("--quiet", action="store_true", help="no progress lines")
    pretrain.set_defaults(run=cmd_pretrain)
    from xfer.pipeline.presets import PRESETS
    from xfer.policy import PRESETS as BN_PRESETS

    for name, handler in (("run", cmd_run), ("compare", cmd_compare)):
        sub = commands.add_parser(name, help=handler.__doc__)
        if name == "run":
            sub.add_argument(
                "--weights",
                metavar="PATH",
                help="neutral weights of the source model (default: the shipped ones for "
                "seed 0, pretrained now for another seed)",
            )
            sub.add_argument(
                "--checkpoint", metavar="DIR", help="save a checkpoint after each stage here"
            )
            sub.add_argument(
                "--resume", action="store_true", help="continue the run saved in --checkpoint DIR"
            )
            sub.add_argument(
                "--cache",
                choices=("auto", "off"),
                default="auto",
                help="cache a frozen base's features when a stage allows it (default: auto)",
            )
            sub.add_argument(
                "--device",
                choices=("auto", "cpu", "cuda"),
                default="auto",
                help="auto: CUDA when the framework sees a GPU",
            )
            sub.add_argument(
                "--backend",
                choices=_config.BACKENDS,
                help="default: XFER_BACKEND or the first installed",
            )
        else:
            sub.add_argument(
                "--backend",
                action="append",
                choices=_config.BACKENDS,
                help="repeatable; default: every installed backend",
            )
            sub.add_argument(
                "--out", default="xfer-report", help="directory for report.md and loss_curves.png"
            )
            from xfer.report import DEFAULT_ACCURACY_TOLERANCE, DEFAULT_TOLERANCE, FLOOR
            from xfer.run import MODELS

            sub.add_argument(
                "--tolerance",
                type=_tolerance,
                default=DEFAULT_TOLERANCE,
                help="largest relative difference |a-b|/max(|a|,|b|,"
                f"{FLOOR:g}) allowed between two backends' losses "
                f"(default: {DEFAULT_TOLERANCE:g}); past it compare exits 1",
            )
            sub.add_argument(
                "--accuracy-tolerance",
                type=_tolerance,
                default=DEFAULT_ACCURACY_TOLERANCE,
                help="largest difference allowed between two backends' validation accuracies "
                f"(default: {DEFAULT_ACCURACY_TOLERANCE:g}: an image on the decision boundary "
                "may flip with float32 rounding); past it compare exits 1",
            )
            sub.add_argument(
                "--model",
                choices=MODELS,
                default="small_cnn",
                help="small_cnn: pretrained on the source digits; resnet18: a narrow ResNet-18 "
                "from fresh seeded weights on the digits upsampled to 16x16 (default: small_cnn)",
            )
        sub.add_argument("--preset", choices=tuple(PRESETS), default="keras_guide")
        sub.add_argument(
            "--bn",
            choices=tuple(BN_PRESETS),
            help="BN policy for every stage (default: the preset's)",
        )
        sub.add_argument("--seed", type=_seed, default=0)
        sub.add_argument("--format", choices=("text", "json"), default="text")
        sub.add_argument("--quiet", action="store_true", help="no progress lines")
        sub.add_argument(
            "--quick", action="store_true", help="a smoke run: at most 2 epochs a stage"
        )
        sub.set_defaults(run=handler)
    return parser


# xfer's errors for bad input (a name, a value, a path, a missing framework): the message
# says what to fix, so the user sees it alone; anything else is a bug and keeps its traceback.
_BAD_INPUT = (ValueError, TypeError, ImportError, FileNotFoundError, NotADirectoryError,
              IsADirectoryError, FileExistsError, PermissionError)  # fmt: skip
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xfer`` console script.

    xfer's own errors come out as one line on stderr, ``xfer <command>: <message>``, with
    exit status 2 for bad input (a name, value, path or missing framework) and 1 for a run
    that failed (a non-finite loss); Ctrl-C exits 130. ``XFER_DEBUG=1`` shows the traceback.

    Example:
        >>> from xfer.cli import main
        >>> main(["info", "--format", "json"])   # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("XFER_DEBUG"):
                # A warning is a note to the user, not a source line of xfer's.
                warnings.showwarning = lambda message, *_, **__: print(
                    f"xfer {args.command}: note: {_one_line(message)}", file=sys.stderr
                )
            return args.run(args)
    except KeyboardInterrupt:
        if os.environ.get("XFER_DEBUG"):
            raise
        print(f"xfer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        status = _exit_status(error)
        if status is None or os.environ.get("XFER_DEBUG"):
            raise
        message = _one_line(error)
        print(f"xfer {args.command}: {message or type(error).__name__}", file=sys.stderr)
        return status


def _exit_status(error: Exception) -> int | None:
    """2 for bad input, 1 for a failed run, ``None`` for an error that is not xfer's to word."""
    from xfer.pipeline import NonFiniteLoss  # imports no framework

    if isinstance(error, NonFiniteLoss):
        return EXIT_FAILED
    return EXIT_BAD_INPUT if isinstance(error, _BAD_INPUT) else None


if __name__ == "__main__":
    sys.exit(main())
