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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xfer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("--format", choices=("text", "json"), default="text")
    info.set_defaults(run=cmd_info)
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
