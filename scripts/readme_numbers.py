"""Write the README's main-job numbers from ``xfer run --format json``, so they are what a
fresh machine prints (tests/test_source_weights.py checks them against a fresh run).

    python scripts/readme_numbers.py            # the `xfer run --backend torch` block
    python scripts/readme_numbers.py --table    # and the BN-policy table over three seeds

Each run is ``python -m xfer run --backend torch --format json`` in a subprocess with an
empty ``XFER_CACHE`` (nothing from an older xfer can leak in); the README is rewritten
between its ``<!-- readme_numbers:NAME -->`` and ``<!-- /readme_numbers:NAME -->`` markers
through xfer's one writer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from xfer.cli import run_text
from xfer.files import write_text

README = Path(__file__).resolve().parent.parent / "README.md"
SEEDS = (0, 1, 2)
POLICIES = {  # --bn: what happens (the prose is the README's; the numbers are measured)
    None: ("(the preset's: `frozen`, then `affine`)", "the Keras guide's recipe"),
    "frozen": ("`frozen`", "BN normalises the inverted digits with the source statistics"),
    "affine": ("`affine`", "gamma/beta can rescale; the statistics stay the source's"),
    "adapt": ("`adapt`", "statistics re-estimated on the target (AdaBN)"),
    "train": ("`train`", "statistics and affine follow the target"),
}


def xfer_run(*options: str) -> dict:
    """``xfer run --backend torch --format json OPTIONS`` on a fresh cache; its report."""
    with tempfile.TemporaryDirectory() as cache:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "xfer",
                "run",
                "--backend",
                "torch",
                "--format",
                "json",
                *options,
            ],
            env={**os.environ, "XFER_CACHE": cache},
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"xfer run {' '.join(options)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def final_accuracy(report: dict) -> float:
    return report["history"]["stages"][-1]["epochs"][-1]["val_accuracy"]


def bn_table() -> str:
    lines = [
        "| `--bn` | " + " | ".join(f"seed {s}" for s in SEEDS) + " | what happens |",
        "|---|" + "---|" * len(SEEDS) + "---|",
    ]
    for bn, (label, prose) in POLICIES.items():
        accuracies = [
            final_accuracy(xfer_run(*(["--bn", bn] if bn else []), "--seed", str(seed)))
            for seed in SEEDS
        ]
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in accuracies) + f" | {prose} |")
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with what lies between the ``name`` markers replaced by ``body``."""
    pattern = re.compile(
        rf"(<!-- readme_numbers:{name} -->\n).*?(\n<!-- /readme_numbers:{name} -->)", re.S
    )
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- readme_numbers:{name} --> ... block to replace.")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="also the BN-policy table (15 runs)")
    args = parser.parse_args()
    text = README.read_text()
    block = f"```text\n$ xfer run --backend torch\n{run_text(xfer_run())}\n```"
    text = replace_block(text, "run", block)
    if args.table:
        text = replace_block(text, "bn-table", bn_table())
    write_text(README, text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
