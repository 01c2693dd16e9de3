"""The README's performance numbers are the ones the benchmark scripts wrote into
docs/benchmarks.md (run_all.py's table, scaling.py's two): a regenerated table that the
README does not follow fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(page: str, marker: str) -> list[dict[str, str]]:
    """The markdown table between ``bench:<marker>`` markers, as rows of header -> cell."""
    block = page.split(f"<!-- bench:{marker}:start -->")[1].split(f"<!-- bench:{marker}:end -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def _speed_paragraph() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Speed: cached features")
    return " ".join(readme[start : readme.index("JAX compiles every step afresh", start)].split())


def test_the_readme_quotes_the_benchmark_tables():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    text = _speed_paragraph()
    results = _table(page, "results")
    for row in results:
        if row["stage"].startswith("1"):
            assert f"{row['speed-up (native/xfer)']} ({row['backend']}" in text, row
    stage2 = sorted(
        float(r["speed-up (native/xfer)"].rstrip("x"))
        for r in results
        if r["stage"].startswith("2")
    )
    assert f"stage 2 is {stage2[0]:.2f}-{stage2[-1]:.2f}x faster" in text
    torch1 = next(r for r in results if r["backend"] == "torch" and r["stage"].startswith("1"))
    assert f"{torch1['xfer peak MiB']} against {torch1['native peak MiB']} MiB" in text

    def long_job(marker: str) -> dict[str, str]:
        return {
            r["backend"]: f"{float(r['speed-up (native/xfer)'].rstrip('x')):.1f}x"
            for r in _table(page, marker)
            if (r["stage"], r["epochs"], r["images"], r["depth"]) == ("1", "20", "8192", "18")
        }

    cold, warm = long_job("scaling"), long_job("scaling-warm")
    quoted = re.search(r"20 epochs on 8,192 images give (.*?) \((\S+) with its", text)
    assert quoted, text
    assert quoted.group(1) == (
        f"flax {cold['flax']}, torch {cold['torch']}, keras-torch {cold['keras-torch']} "
        f"and keras-jax {cold['keras-jax']}"
    )
    assert quoted.group(2) == warm["keras-jax"]
