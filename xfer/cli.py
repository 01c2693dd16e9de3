"""The ``xfer`` command line (also ``python -m xfer``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys

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


def _progress(args: argparse.Namespace):
    """A one-line progress printer on stderr, when a person is watching."""
    if args.quiet or args.format != "text" or not sys.stderr.isatty():
        return None
    return lambda message: print(f"  ... {message}", file=sys.stderr, flush=True)


def _keras_engine() -> str:
    import keras

    return keras.backend.backend()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xfer", description=__doc__)
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
    demo.add_argument("--seed", type=int, default=0)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xfer`` console script.

    Example:
        >>> from xfer.cli import main
        >>> main(["info", "--format", "json"])   # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
