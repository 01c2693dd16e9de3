"""Write the README's main-job numbers from ``xfer run --format json``, so they are what a
fresh machine prints (tests/test_source_weights.py checks them against a fresh run).

    python scripts/readme_numbers.py            # the `xfer run --backend torch` blocks
    python scripts/readme_numbers.py --table    # and the BN-policy table over three seeds
    python scripts/readme_numbers.py --adabn    # and docs/deploy.md's recalibration table

Each run is ``xfer run --backend torch --format json`` through the CLI's own ``main``
(xfer caches nothing, so every run starts from the shipped weights); the README is rewritten
between its ``<!-- readme_numbers:NAME -->`` and ``<!-- /readme_numbers:NAME -->`` markers
through xfer's one writer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

from xfer.cli import main as xfer_main
from xfer.cli.run import data_run_text, run_text
from xfer.files import write_text
from xfer.job import shipped_path
from xfer.tables import table

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
    """The report of ``xfer run --backend torch --format json OPTIONS``, run as a user runs
    it (through the CLI's ``main``); nothing is cached between runs, so each is fresh."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = xfer_main(["run", "--backend", "torch", "--format", "json", "--quiet", *options])
    if status != 0:
        raise SystemExit(f"xfer run {' '.join(options)} exited {status}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


# The README's second example: the embedded digits written as PNG class folders by
# `xfer digits`, then the main job on them as on any user's images.
DATA_COMMANDS = ("xfer digits digits", "xfer run --backend torch --data digits --preset fine_tune")


def data_run() -> str:
    """The README's ``xfer run --data`` block: both commands run in a fresh folder (so the
    report names ``digits`` as the user's shell would)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as directory:
        os.chdir(directory)
        try:
            with contextlib.redirect_stdout(io.StringIO()) as written:
                xfer_main(DATA_COMMANDS[0].split()[1:])
            report = xfer_run(*DATA_COMMANDS[1].split()[4:])
        finally:
            os.chdir(here)
    first, second = DATA_COMMANDS
    return (
        f"```text\n$ {first}\n{written.getvalue().strip()}\n$ {second}\n"
        f"{data_run_text(report)}\n```"
    )


def final_accuracy(report: dict) -> float:
    return report["history"]["stages"][-1]["epochs"][-1]["val_accuracy"]


def bn_table() -> str:
    """Every seed from the shipped source model (``--weights``): another seed would otherwise
    pretrain its own, and pretraining's float32 rounding differs from CPU to CPU (other
    oneDNN kernels), grown by eight epochs of Adam into other weights and other numbers."""
    header = ("`--bn`", *(f"seed {s}" for s in SEEDS), "what happens")
    shipped = ["--weights", str(shipped_path())]
    rows = []
    for bn, (label, prose) in POLICIES.items():
        accuracies = [
            final_accuracy(xfer_run(*(["--bn", bn] if bn else []), "--seed", str(seed), *shipped))
            for seed in SEEDS
        ]
        rows.append((label, *(f"{a:.3f}" for a in accuracies), prose))
    return table(header, rows, markdown=True)


DEPLOY = README.parent / "docs" / "deploy.md"
# docs/deploy.md's AdaBN table: --bn, --recalibrate (None: without), the BN statistics.
RECALIBRATION = (
    ("frozen", None, "the source statistics throughout"),
    ("frozen", "before", "re-estimated on the target before training, then frozen (AdaBN)"),
    ("frozen", "after", "the source statistics while training, then re-estimated on the target"),
    ("adapt", None, "follow the target while training (moving average)"),
    ("adapt", "after", "the same, then the moving average replaced by population statistics"),
)


def adabn_table() -> str:
    """docs/deploy.md's table: final target accuracy with and without ``--recalibrate``,
    from the shipped source model, over :data:`SEEDS` (as :func:`bn_table`)."""
    header = ("`--bn`", "`--recalibrate`", *(f"seed {s}" for s in SEEDS), "BN statistics")
    shipped = ["--weights", str(shipped_path())]
    rows = []
    for bn, when, prose in RECALIBRATION:
        options = ["--bn", bn, *(["--recalibrate", when] if when else [])]
        accuracies = [
            final_accuracy(xfer_run(*options, "--seed", str(seed), *shipped)) for seed in SEEDS
        ]
        rows.append((f"`{bn}`", when or "no", *(f"{a:.3f}" for a in accuracies), prose))
    return table(header, rows, markdown=True)


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with what lies between the ``name`` markers replaced by ``body``."""
    pattern = re.compile(
        rf"(<!-- readme_numbers:{name} -->\n).*?(\n<!-- /readme_numbers:{name} -->)", re.S
    )
    if not pattern.search(text):
        raise SystemExit(f"no <!-- readme_numbers:{name} --> ... block to replace.")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="also the BN-policy table (15 runs)")
    parser.add_argument(
        "--adabn", action="store_true", help="also docs/deploy.md's recalibration table (15 runs)"
    )
    args = parser.parse_args()
    if args.adabn:
        write_text(DEPLOY, replace_block(DEPLOY.read_text(), "adabn", adabn_table()))
        print(f"updated {DEPLOY}")
    text = README.read_text()
    block = f"```text\n$ xfer run --backend torch\n{run_text(xfer_run())}\n```"
    text = replace_block(text, "run", block)
    text = replace_block(text, "run-data", data_run())
    if args.table:
        text = replace_block(text, "bn-table", bn_table())
    write_text(README, text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
