"""The benchmark scripts run end to end, on tiny jobs (the tests never look at the times):
``benchmarks/gpu.sh --tiny`` (what a GPU machine runs, here on the CPU) and
``benchmarks/scaling.py --quick``. That a stage compiles once, not per epoch, is
tests/test_compiles_per_stage.py."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(command: list[str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    env["KERAS_HOME"] = str(tmp_path / "keras")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_gpu_script_times_both_precisions_and_writes_json_and_markdown(kit, tmp_path):
    out = tmp_path / "results"
    command = ["bash", "benchmarks/gpu.sh", "--tiny", "--backends", kit.id, "--out", str(out)]
    # On the JAX engines stage 1 only: compiling stage 2 twice per process (warm-up and
    # timed run, each variant) would take minutes of the test run for no other code path.
    stages = [1, 2] if kit.id in ("torch", "keras-torch") else [1]
    _run([*command, "--stages", *map(str, stages)], tmp_path)
    result = json.loads((out / "gpu.json").read_text())
    rows = result["rows"]
    assert result["failed"] == []
    expected = sorted((p, s) for p in ("bf16", "float32") for s in stages)
    assert sorted((r["precision"], r["stage"]) for r in rows) == expected
    assert all(r["native_images_s"] > 0 and r["xfer_images_s"] > 0 for r in rows)
    table = (out / "gpu.md").read_text()
    assert table.count(f"| {kit.id} | cpu") == len(expected) and "images/s" in table


@pytest.mark.backends("torch")
def test_the_scaling_benchmark_writes_its_table_and_plot(kit, tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "before\n<!-- bench:scaling:start -->\nold\n<!-- bench:scaling:end -->\nafter\n"
    )
    plot, rows = tmp_path / "scaling.png", tmp_path / "scaling.json"
    command = [sys.executable, "benchmarks/scaling.py", "--quick", "--backends", kit.id]
    _run([*command, "--markdown", str(page), "--plot", str(plot), "--json", str(rows)], tmp_path)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    measured = json.loads(rows.read_text())
    assert sorted((r["stage"], r["epochs"]) for r in measured) == [(1, 1), (1, 3), (2, 1)]
    assert plot.read_bytes().startswith(b"\x89PNG")
