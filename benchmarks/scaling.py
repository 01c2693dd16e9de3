"""How xfer's ratio to each framework's own loop grows with the job: stage 1 epochs, images,
depth; every backend, each point a fresh ``benchmarks/transfer.py`` process.

Stage 1 (the head on the frozen base) costs xfer one pass of the base over the images, then
only the head per epoch (the feature cache); the native loop pays the base every epoch, so
the speed-up should grow with the epochs towards epochs x (base + head) / head. Stage 2
(everything trains) should stay at the native step's cost at every size. On the JAX engines
the count of XLA programs per stage shows that nothing recompiles across epochs.

The matrix (defaults; about 15 minutes on 2 CPU cores):

- stage 1 at epochs {1, 5, 20} x images {1024, 8192}, ResNet-18;
- stage 1 at 5 epochs, 1024 images, ResNet-50;
- stage 2 (one epoch) at images {1024, 8192} x depth {18, 50}.

Each point runs ``--repeats`` timed runs per variant (the minimum kept), compilation
included, the JAX compilation cache off (as in a fresh process with no cache).

Usage:
    python benchmarks/scaling.py                                    # markdown to stdout
    python benchmarks/scaling.py --markdown docs/benchmarks.md --plot docs/scaling.png
    python benchmarks/scaling.py --quick --backends torch           # a smoke run
    python benchmarks/scaling.py --targets --compile-cache warm --marker scaling-warm \
        --markdown docs/benchmarks.md        # the stage-1 targets, JAX engines warm
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from typing import Any

from run_all import BACKENDS, busy_cpus, run_backend, write_markdown

from xfer.tables import table

# (stage, epochs1, images, depth) of every point; stage 2 ignores epochs1.
MATRIX = (
    *((1, e, n, 18) for n in (1024, 8192) for e in (1, 5, 20)),
    (1, 5, 1024, 50),
    *((2, 1, n, d) for d in (18, 50) for n in (1024, 8192)),
)
QUICK_MATRIX = ((1, 1, 64, 18), (1, 3, 64, 18), (2, 1, 64, 18))
# The stage-1 targets: >= 3x at 5 epochs on 1,024 images, >= 10x at 20 on 8,192.
TARGET_MATRIX = ((1, 5, 1024, 18), (1, 20, 8192, 18))
SIZE, WIDTH = 16, 8  # small enough for the whole matrix on 2 CPU cores
CACHE_TEXT = {
    "off": "JAX compilation cache off",
    "warm": "JAX engines warm: xfer's persistent compilation cache on, filled by the "
    "warm-up, for both variants, as on a second run of the job",
}


def runs(matrix) -> list[dict[str, Any]]:
    """The transfer.py processes the matrix needs: one per (images, depth, epochs1), each
    timing the stages that matrix points ask of it (stage 2 joins the 1-epoch run)."""
    grouped: dict[tuple[int, int, int], set[int]] = {}
    for stage, epochs, n, depth in matrix:
        grouped.setdefault((n, depth, epochs if stage == 1 else 1), set()).add(stage)
    return [
        {"n": n, "depth": depth, "epochs1": epochs, "stages": sorted(stages)}
        for (n, depth, epochs), stages in grouped.items()
    ]


def point_flags(run: dict[str, Any], args) -> list[str]:
    return [
        "--n", str(run["n"]), "--depth", str(run["depth"]), "--epochs1", str(run["epochs1"]),
        "--epochs2", "1", "--size", str(args.size), "--width", str(args.width),
        "--batch-size", "32", "--repeats", str(args.repeats), "--no-memory",
        "--stages", *map(str, run["stages"]), "--compile-cache", args.compile_cache,
    ]  # fmt: skip


def measure(args) -> list[dict[str, Any]]:
    """One row per (backend, matrix point): native and xfer seconds, the speed-up, the
    head's epoch time and the XLA programs compiled (JAX engines)."""
    matrix = QUICK_MATRIX if args.quick else TARGET_MATRIX if args.targets else MATRIX
    rows = []
    with tempfile.TemporaryDirectory(prefix="xfer-scaling-") as workdir:
        for backend in args.backends:
            for run in runs(matrix):
                result = run_backend(backend, False, point_flags(run, args), workdir)
                if result is None:
                    raise SystemExit(f"{backend} {run}: transfer.py failed (its output above)")
                for row in result["stages"]:
                    rows.append(_row(backend, run, row, result))
    return rows


def _row(backend: str, run: dict, stage: dict, result: dict) -> dict[str, Any]:
    head_epochs = stage["xfer_epoch_s"][1:]  # after the first, which holds the feature pass
    compiles = stage.get("xfer_compiles")
    return {
        "backend": backend,
        "stage": stage["stage"],
        "epochs": run["epochs1"] if stage["stage"] == 1 else 1,
        "images": run["n"],
        "depth": run["depth"],
        "native_s": stage["native_best_s"],
        "xfer_s": stage["xfer_best_s"],
        "speedup": stage["speedup"],
        "head_epoch_s": min(head_epochs) if stage["stage"] == 1 and head_epochs else None,
        "xfer_programs": None if compiles is None else compiles["compiled"],
        "native_programs": (stage.get("native_compiles") or {}).get("compiled"),
        "other_cpus": result["other_cpus"],
        "versions": result["versions"],
        "machine": result["machine"],
    }


def recompiles(rows: list[dict]) -> dict[str, bool]:
    """Per JAX backend: whether xfer's stage 1 compiled the same number of programs at every
    epoch count of one (images, depth) job, i.e. nothing recompiled per epoch."""
    verdict: dict[str, bool] = {}
    for row in rows:
        if row["stage"] != 1 or row["xfer_programs"] is None:
            continue
        same_job = [
            r["xfer_programs"]
            for r in rows
            if (r["backend"], r["stage"], r["images"], r["depth"])
            == (row["backend"], 1, row["images"], row["depth"])
        ]
        verdict[row["backend"]] = verdict.get(row["backend"], True) and len(set(same_job)) == 1
    return verdict


def markdown(rows: list[dict], command: str, seconds: float, args) -> str:
    first = rows[0]
    machine = first["machine"]
    versions: dict[str, str] = {}
    for row in rows:
        versions.update(row["versions"])
    versions.pop("keras engine", None)
    header = (
        "backend", "stage", "epochs", "images", "depth", "native s", "xfer s",
        "speed-up (native/xfer)", "xfer head epoch s", "XLA programs xfer / native",
    )  # fmt: skip
    table_rows = [
        (
            r["backend"],
            str(r["stage"]),
            str(r["epochs"]),
            str(r["images"]),
            str(r["depth"]),
            f"{r['native_s']:.2f}",
            f"{r['xfer_s']:.2f}",
            f"{r['speedup']:.2f}x",
            "-" if r["head_epoch_s"] is None else f"{r['head_epoch_s']:.3f}",
            "-" if r["xfer_programs"] is None else f"{r['xfer_programs']} / {r['native_programs']}",
        )  # fmt: skip
        for r in rows
    ]
    verdict = recompiles(rows)
    compiled = ", ".join(
        f"{b}: {'the same at every epoch count' if same else '**more with more epochs**'}"
        for b, same in verdict.items()
    )
    busy = max(r["other_cpus"] or 0.0 for r in rows)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}` ({seconds / 60:.1f} min in "
        "all); each point a fresh process, best of "
        f"{args.repeats}, compilation included ({CACHE_TEXT[args.compile_cache]}).",
        "",
        f"- Machine: {machine['cpu']}, {machine['cpus_usable']} CPUs usable, "
        f"{machine['ram_gib']} GiB RAM; CPUs kept busy by other processes: at most {busy}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Job: ResNet-18/50 width {args.width}, random {args.size}x{args.size}x3 images, 10 "
        "classes, batch 32, Adam; stage 1 the head on the frozen base (lr 1e-3), stage 2 "
        "everything (lr 1e-4), one epoch",
        f"- XLA programs xfer compiled in stage 1, per job: {compiled or 'not measured'}",
        "",
        table(header, table_rows, markdown=True, right={5, 6, 7, 8}),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """The speed-up against each axis: stage 1 against epochs (1024 and 8192 images),
    stage 1 and 2 against images, and against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = dict(zip(BACKENDS, ("C0", "C1", "C2", "C3"), strict=False))

    def line(ax, backend, points, x_key, style, label):
        points = sorted(points, key=lambda r: r[x_key])
        if len(points) > 1:
            ax.plot(
                [r[x_key] for r in points], [r["speedup"] for r in points], style,
                color=colours.get(backend), marker="o", label=label,
            )  # fmt: skip

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for b in backends:
        mine = [r for r in rows if r["backend"] == b]
        for n, style in ((min(r["images"] for r in mine), "-"), (8192, "--")):
            points = [r for r in mine if r["stage"] == 1 and r["images"] == n and r["depth"] == 18]
            line(axes[0], b, points, "epochs", style, f"{b}, {n} images")
        for stage, style in ((1, "-"), (2, "--")):
            points = [
                r for r in mine if r["stage"] == stage and r["depth"] == 18
                and (stage == 2 or r["epochs"] == 5)
            ]  # fmt: skip
            line(axes[1], b, points, "images", style, f"{b}, stage {stage}")
            points = [
                r for r in mine if r["stage"] == stage and r["images"] == 1024
                and (stage == 2 or r["epochs"] == 5)
            ]  # fmt: skip
            line(axes[2], b, points, "depth", style, f"{b}, stage {stage}")
    titles = (
        ("stage 1 against epochs (ResNet-18)", "stage 1 epochs"),
        ("against images (ResNet-18; stage 1: 5 epochs)", "training images"),
        ("against depth (1024 images; stage 1: 5 epochs)", "ResNet depth"),
    )
    for ax, (title, xlabel) in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up, native s / xfer s")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_xscale("log")
    axes[1].set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--quick", action="store_true", help="a three-point smoke matrix")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (min)")
    parser.add_argument("--size", type=int, default=SIZE, help="image side")
    parser.add_argument("--width", type=int, default=WIDTH, help="ResNet width")
    parser.add_argument(
        "--targets", action="store_true", help="only the issue's two stage-1 target points"
    )
    parser.add_argument(
        "--compile-cache", choices=("off", "warm"), default="off",
        help="JAX engines: off (every point compiles afresh) or warm (transfer.py's)",
    )  # fmt: skip
    parser.add_argument("--markdown", help="write the table between this file's markers")
    parser.add_argument(
        "--marker", default="scaling", help="the markers bench:MARKER:start/end to write between"
    )
    parser.add_argument("--plot", help="write the PNG here")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args(argv)
    busy = busy_cpus()
    if busy is not None and busy > 0.2:
        print(f"warning: other processes keep {busy:.1f} CPUs busy", file=sys.stderr)
    start = time.perf_counter()
    rows = measure(args)
    seconds = time.perf_counter() - start
    command = shlex.join(["python", "benchmarks/scaling.py", *(argv or sys.argv[1:])])
    text = markdown(rows, command, seconds, args)
    print(text)
    if args.markdown:
        write_markdown(
            args.markdown, text, f"<!-- bench:{args.marker}:start -->",
            f"<!-- bench:{args.marker}:end -->",
        )  # fmt: skip
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
