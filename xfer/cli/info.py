"""``xfer info``: the installed frameworks, and which xfer backends can run here."""

from __future__ import annotations

import argparse
import importlib.metadata
import json

from xfer import _config
from xfer.cli.options import add_format

HELP = "Installed frameworks and which xfer backends can run."
# Every package a backend needs, in the registry's order: torch, keras, jax, flax, optax.
PACKAGES = tuple(dict.fromkeys(p for f in _config.REGISTRY for p in f.packages))


def version(package: str) -> str | None:
    """The installed version of ``package``, or ``None`` when it is not installed.

    Example:
        >>> version("numpy") is not None, version("no-such-package")
        (True, None)
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_format(parser)


def cmd_info(args: argparse.Namespace) -> int:
    """Print each framework's installed version, and for each backend whether it can run
    (else the extra that installs it). Exits 0.

    Example:
        >>> cmd_info(argparse.Namespace(format="text"))   # doctest: +ELLIPSIS
        xfer ...
          torch  ...
          backend torch ...
        0
    """
    versions = {p: version(p) for p in PACKAGES}
    runnable = {
        b: "ready" if not _config.missing(b) else f'pip install "xfer[{b}]"'
        for b in _config.BACKENDS
    }
    if args.format == "json":
        print(json.dumps({"xfer": version("xfer"), "packages": versions, "backends": runnable}))
        return 0
    print(f"xfer {version('xfer')}")
    for package, installed in versions.items():
        print(f"  {package:<6} {installed or 'not installed'}")
    for backend, status in runnable.items():
        print(f"  backend {backend:<5} {status}")
    return 0
