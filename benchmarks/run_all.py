"""Run ``benchmarks/transfer.py`` for every backend, each in its own process, and tabulate.

Keras reads ``KERAS_BACKEND`` once per process, so each backend (torch, keras-jax,
keras-torch, flax) runs in a fresh subprocess with its own environment; the JSON each one
writes is collected into one markdown table: per backend and stage, the wall times, the
speed-up of xfer over the framework's own tutorial loop, the peak memory ratio, and whether
the targets are met (stage 1 at least 3x faster, stage 2 no slower than 1.05x native, peak
memory no higher than native).

Usage:
    python benchmarks/run_all.py                                  # markdown to stdout
    python benchmarks/run_all.py --markdown docs/benchmarks.md    # the table in the docs
    python benchmarks/run_all.py --backends torch flax --quick
    python benchmarks/run_all.py --repeats 3 --width 32           # other options go to transfer.py

With ``--markdown`` a file holding the markers ``<!-- bench:results:start -->`` and
``<!-- bench:results:end -->`` gets only the text between them replaced; any other file is
written whole.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from xfer._config import LABELS
from xfer.tables import table

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = LABELS
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="xfer against each framework's own loop, every backend in its own process.",
        epilog="Any other option (--quick, --repeats, --n, --width, ...) goes to transfer.py.",
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument(
        "--gpu", action="store_true", help="let the frameworks use a GPU (default: CPU only)"
    )
    parser.add_argument("--markdown", help="write the table here (between the markers if any)")
    parser.add_argument("--json", help="write every backend's results here, as one list")
    return parser.parse_known_args(argv)


def run_backend(backend: str, gpu: bool, extra: list[str], workdir: str) -> dict | None:
    out = os.path.join(workdir, f"{backend}.json")
    command = [
        sys.executable,
        os.path.join(HERE, "transfer.py"),
        "--backend",
        backend,
        "--device",
        "auto" if gpu else "cpu",
        "--json",
        out,
        *extra,
    ]
    env = {**os.environ, "KERAS_HOME": tempfile.mkdtemp(prefix="xfer-bench-keras-")}
    if not gpu:
        env["JAX_PLATFORMS"] = "cpu"
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"{backend}: failed with exit status {done.returncode}", file=sys.stderr)
        return None
    print(f"{backend}: {seconds:.0f} s in all", flush=True)
    with open(out) as results:
        return {**json.load(results), "total_s": seconds}


def _mib(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def _met(flag: bool | None) -> str:
    return "-" if flag is None else ("met" if flag else "**missed**")


def markdown(results: list[dict], command: str, seconds: float) -> str:
    first = results[0]
    machine, config = first["machine"], first["config"]
    versions: dict[str, str] = {}
    for result in results:
        versions.update(result["versions"])
    versions.pop("keras engine", None)
    lines = [
        f"Measured {datetime.date.today().isoformat()} with `{command}` "
        f"({seconds / 60:.1f} min in all).",
        "",
        f"- Machine: {machine['cpu']}, {machine['cpus_usable']} CPUs usable "
        f"({machine['cpus']} online), {machine['ram_gib']} GiB RAM, {machine['os']}",
        "- Device: " + ", ".join(f"{r['backend']} {r['device']}" for r in results),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Job: ResNet-{config['depth']} width {config['width']}, {config['n']} random "
        f"{config['size']}x{config['size']}x3 images, 10 classes, batch {config['batch_size']}, "
        f"Adam; stage 1 {config['epochs1']} epochs (lr {config['lr1']}), stage 2 "
        f"{config['epochs2']} epochs (lr {config['lr2']}); best of {config['repeats']} "
        "timed run(s) per variant, compilation included",
        f"- Memory: {first['memory_method']}; met when {first['memory_noise']}",
        "- CPUs kept busy by other processes during each backend's run (mean): "
        + ", ".join(f"{r['backend']} {r['other_cpus']}" for r in results),
        "",
    ]
    header = (
        "backend",
        "stage",
        "native s",
        "xfer s",
        "speed-up (native/xfer)",
        "target",
        "native peak MiB",
        "xfer peak MiB",
        "memory ratio (xfer/native)",
        "time",
        "memory",
        "xfer cache",
    )
    rows = []
    for result in results:
        for row in result["stages"]:
            stage = "1 head (frozen base)" if row["stage"] == 1 else "2 fine-tune"
            goal = row["speedup_target"]  # transfer.py's TARGET_SPEEDUP, one place
            target = f">= {goal:g}x" if goal >= 1 else f">= {goal:.2f}x (<= {1 / goal:g}x time)"
            ratio = f"{row['memory_ratio']:.2f}" if "memory_ratio" in row else "-"
            rows.append((
                result["backend"],
                stage,
                f"{row['native_best_s']:.2f}",
                f"{row['xfer_best_s']:.2f}",
                f"{row['speedup']:.2f}x",
                target,
                _mib(row, "native_peak_mib"),
                _mib(row, "xfer_peak_mib"),
                ratio,
                _met(row["time_met"]),
                _met(row.get("memory_met")),
                row["cache"].split(":")[0],
            ))  # fmt: skip
    numbers = {2, 3, 4, 6, 7, 8}
    return "\n".join([*lines, table(header, rows, markdown=True, right=numbers)]) + "\n"


def write_markdown(path: str, text: str, start: str = START, end: str = END) -> None:
    """Write ``text`` to ``path``: between its ``start`` and ``end`` markers when it has
    them (the rest of the page kept), else as the whole file. Every benchmark writes its
    part of docs/benchmarks.md through this."""
    old = open(path).read() if os.path.exists(path) else ""
    if start in old and end in old:
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
        text = pattern.sub(lambda _: f"{start}\n{text}{end}", old, count=1)
    with open(path, "w") as out:
        out.write(text)
    print(f"wrote {path}")


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs the machine keeps busy, over ``seconds`` (Linux's /proc/stat)."""

    def busy() -> float:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    try:
        before = busy()
        time.sleep(seconds)
        return (busy() - before) / seconds
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    busy = busy_cpus()
    if busy is not None and busy > 0.2:
        print(
            f"warning: other processes keep {busy:.1f} CPUs busy; they make the times "
            "noisy (--repeats helps)",
            file=sys.stderr,
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xfer-bench-") as workdir:
        results = [run_backend(b, args.gpu, extra, workdir) for b in args.backends]
    seconds = time.perf_counter() - start
    done = [r for r in results if r is not None]
    if not done:
        return 1
    command = shlex.join(["python", "benchmarks/run_all.py", *(argv or sys.argv[1:])])
    text = markdown(done, command, seconds)
    print()
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(done, out, indent=2)
    return 0 if len(done) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
