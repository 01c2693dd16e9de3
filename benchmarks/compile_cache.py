"""JAX's persistent compilation cache (xfer.compile_cache): the main job's wall time on the
JAX engines with the cache off, cold (empty) and warm (filled by the cold run), each run a
fresh ``xfer run`` process as a user starts it.

Usage:
    python benchmarks/compile_cache.py                      # the main job, markdown to stdout
    python benchmarks/compile_cache.py --quick --repeats 1
    python benchmarks/compile_cache.py --markdown docs/benchmarks.md   # between the markers

The baseline here is xfer itself with the cache off (``XFER_COMPILE_CACHE=0``), the
framework's default; the ratio is off / warm. Each setting is timed ``--repeats`` times and
the median kept; the cold run is repeated on a new empty directory each time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from run_all import write_markdown

from xfer.tables import table

START, END = "<!-- bench:compile-cache:start -->", "<!-- bench:compile-cache:end -->"
ENGINES = {"flax": {}, "keras-jax": {"KERAS_BACKEND": "jax"}}


def timed_run(backend: str, cache: str | None, quick: bool, workdir: str) -> float:
    """Seconds of one ``xfer run`` process; ``cache=None``: the cache off."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env.update(ENGINES[backend], KERAS_HOME=os.path.join(workdir, "keras"))
    if cache is None:
        env["XFER_COMPILE_CACHE"] = "0"
    else:
        env["XFER_CACHE"] = cache
    command = [sys.executable, "-m", "xfer", "run", "--backend", backend.split("-")[0]]
    start = time.perf_counter()
    subprocess.run(
        [*command, *(["--quick"] if quick else [])], env=env, cwd=workdir, check=True,
        capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def measure(backend: str, quick: bool, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"off": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="xfer-bench-") as workdir:
        for repeat in range(repeats):
            cache = os.path.join(workdir, f"cache{repeat}")
            times["off"].append(timed_run(backend, None, quick, workdir))
            times["cold"].append(timed_run(backend, cache, quick, workdir))
            times["warm"].append(timed_run(backend, cache, quick, workdir))
    return {name: statistics.median(values) for name, values in times.items()}


def markdown(results: dict[str, dict[str, float]], quick: bool, repeats: int) -> str:
    rows = [
        (
            b,
            f"{r['off']:.1f}",
            f"{r['cold']:.1f}",
            f"{r['warm']:.1f}",
            f"{r['off'] / r['warm']:.2f}x",
        )
        for b, r in results.items()
    ]
    job = "`xfer run --quick`" if quick else "`xfer run` (the main job)"
    header = ("backend", "cache off (s)", "cold (s)", "warm (s)", "off / warm")
    return (
        f"{job}, each a fresh process, median of {repeats}; "
        f"`python benchmarks/compile_cache.py{' --quick' if quick else ''}`.\n\n"
        + table(header, rows, markdown=True)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--quick", action="store_true", help="xfer run --quick")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="write the table between the markers of this file")
    args = parser.parse_args(argv)
    results = {b: measure(b, args.quick, args.repeats) for b in args.backends}
    text = markdown(results, args.quick, args.repeats)
    if args.markdown:
        write_markdown(args.markdown, text + "\n", START, END)
    print(text)


if __name__ == "__main__":
    main()
