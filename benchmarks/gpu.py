"""ResNet-50 at 224x224 on a GPU: stage 1 and stage 2 images/s of xfer and of each
framework's own loop, fp32 and bf16, peak GPU memory; every backend, a JSON and a markdown
table. ``benchmarks/gpu.sh`` sets up a fresh clone and runs this.

Each (backend, precision) is one ``benchmarks/transfer.py`` process (``--device auto``: the
frameworks take the GPU). Images/s = images x epochs / seconds of the whole stage, so it
includes compilation; with ``--compile-cache warm`` (the default here) the JAX engines load
their programs from the persistent cache filled by the warm-up, as on a second run.

Usage:
    python benchmarks/gpu.py --out gpu-results            # on the GPU machine (gpu.sh does it)
    python benchmarks/gpu.py --tiny --backends torch      # a tiny CPU run: what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from run_all import BACKENDS, run_backend

from xfer.tables import table

# ResNet-50 (width 64: the standard one) at 224x224, batch 128.
GPU_JOB = {
    "depth": 50, "size": 224, "width": 64, "n": 1024, "batch-size": 128, "epochs1": 3,
    "epochs2": 1,
}  # fmt: skip
TINY_JOB = {
    "depth": 18,
    "size": 16,
    "width": 8,
    "n": 64,
    "batch-size": 32,
    "epochs1": 2,
    "epochs2": 1,
}
PRECISIONS = ("float32", "bf16")


def job_flags(job: dict[str, int]) -> list[str]:
    return [f for key, value in job.items() for f in (f"--{key}", str(value))]


def rows_of(result: dict[str, Any], job: dict[str, int], precision: str) -> list[dict]:
    """Per stage of one transfer.py result: images/s of both variants and the peaks."""
    rows = []
    for stage in result["stages"]:
        epochs = job["epochs1"] if stage["stage"] == 1 else job["epochs2"]
        images = job["n"] * epochs
        rows.append({
            "backend": result["backend"],
            "device": result["device"],
            "precision": precision,
            "stage": stage["stage"],
            "native_images_s": images / stage["native_best_s"],
            "xfer_images_s": images / stage["xfer_best_s"],
            "speedup": stage["speedup"],
            "native_peak_mib": stage.get("native_peak_mib"),
            "xfer_peak_mib": stage.get("xfer_peak_mib"),
            "memory_method": result["memory_method"],
            "versions": result["versions"],
        })  # fmt: skip
    return rows


def markdown(rows: list[dict], job: dict[str, int]) -> str:
    header = (
        "backend", "device", "precision", "stage", "native images/s", "xfer images/s",
        "xfer / native", "native peak MiB", "xfer peak MiB",
    )  # fmt: skip

    def mib(value):
        return "-" if value is None else f"{value:.0f}"

    body = [
        (
            r["backend"],
            r["device"],
            r["precision"],
            "1 head (frozen base)" if r["stage"] == 1 else "2 fine-tune",
            f"{r['native_images_s']:.0f}",
            f"{r['xfer_images_s']:.0f}",
            f"{r['speedup']:.2f}x",
            mib(r["native_peak_mib"]),
            mib(r["xfer_peak_mib"]),
        )  # fmt: skip
        for r in rows
    ]
    versions: dict[str, str] = {}
    for row in rows:
        versions.update(row["versions"])
    versions.pop("keras engine", None)
    return "\n".join([
        f"ResNet-{job['depth']} width {job['width']} at {job['size']}x{job['size']}, "
        f"{job['n']} images, batch {job['batch-size']}, Adam; stage 1 {job['epochs1']} epochs, "
        f"stage 2 {job['epochs2']}; images/s over the whole stage, compilation included.",
        "",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Memory: {rows[0]['memory_method'] if rows else '-'}",
        "",
        table(header, body, markdown=True, right={4, 5, 6, 7, 8}),
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--tiny", action="store_true", help="a tiny job on the CPU (the tests)")
    parser.add_argument("--out", default="gpu-results", help="directory for gpu.json, gpu.md")
    parser.add_argument("--stages", nargs="+", choices=("1", "2"), default=["1", "2"])
    args = parser.parse_args(argv)
    job = TINY_JOB if args.tiny else GPU_JOB
    extra = [*job_flags(job), "--compile-cache", "warm", "--stages", *args.stages]
    if args.tiny:
        extra.append("--no-memory")
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="xfer-gpu-") as workdir:
        for precision in PRECISIONS:
            for backend in args.backends:
                result = run_backend(
                    backend, not args.tiny, [*extra, "--precision", precision], workdir
                )
                if result is None:
                    failed.append(f"{backend} {precision}")
                else:
                    rows += rows_of(result, job, precision)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(rows, job)
    with open(os.path.join(args.out, "gpu.json"), "w") as out:
        json.dump({"job": job, "rows": rows, "failed": failed}, out, indent=2)
    with open(os.path.join(args.out, "gpu.md"), "w") as out:
        out.write(text)
    print(text)
    if failed:
        print(f"failed: {', '.join(failed)} (their output above)", file=sys.stderr)
    print(f"wrote {args.out}/gpu.json and {args.out}/gpu.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
