"""Where xfer keeps what it caches between runs, and the JAX engines' compilation cache.

JAX compiles every jitted step the first time it sees its shapes; on a small transfer job
that is most of the run, paid again by every new process (docs/benchmarks.md, "JAX
compilation cache", measured by benchmarks/compile_cache.py). xfer turns on JAX's own
persistent compilation cache
(``jax_compilation_cache_dir``) in :func:`directory` ``/jax`` when a JAX backend loads
(Flax NNX, Keras on jax), unless:

- ``XFER_COMPILE_CACHE=0`` (``xfer run --no-compile-cache``) turns it off;
- the program set ``jax_compilation_cache_dir`` itself (xfer keeps the user's choice).

The cache holds compiled XLA programs keyed by JAX on the program, its shapes, the
devices and the versions: a warm run computes exactly what a cold run computes.
Nothing here imports a framework.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SWITCH = "XFER_COMPILE_CACHE"  # "0": off


def directory(environ: Mapping[str, str] | None = None) -> Path:
    """xfer's cache directory: ``$XFER_CACHE``, else ``$XDG_CACHE_HOME/xfer``, else
    ``~/.cache/xfer``.

    Example:
        >>> str(directory({"XFER_CACHE": "/tmp/xfer-cache"}))
        '/tmp/xfer-cache'
        >>> str(directory({"XDG_CACHE_HOME": "/var/cache"}))
        '/var/cache/xfer'
    """
    environ = os.environ if environ is None else environ
    if environ.get("XFER_CACHE"):
        return Path(environ["XFER_CACHE"])
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xfer"


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether xfer turns on JAX's compilation cache (``XFER_COMPILE_CACHE`` is not ``0``).

    Example:
        >>> enabled({}), enabled({"XFER_COMPILE_CACHE": "0"})
        (True, False)
    """
    environ = os.environ if environ is None else environ
    return environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def jax_directory(environ: Mapping[str, str] | None = None) -> Path:
    """Where JAX's compiled programs go.

    Example:
        >>> str(jax_directory({"XFER_CACHE": "/tmp/c"}))
        '/tmp/c/jax'
    """
    return directory(environ) / "jax"
