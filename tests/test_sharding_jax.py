"""Data parallelism in one process over two devices (JAX: a device mesh for Flax NNX,
``keras.distribution.DataParallel`` for Keras on jax): the same numbers as one device,
BN on the whole batch's statistics, every freeze kept, the state back on one device
afterwards. Two CPU devices need XLA_FLAGS before JAX starts, so the runs are in a fresh
interpreter (tests/sharding_worker.py)."""

from __future__ import annotations

import pathlib

import pytest
from conftest import BACKENDS

from xfer.subprocesses import run_python

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
SHARDED = {"flax": "flax", "keras-jax": "keras"}


@pytest.mark.parametrize("backend", [b for b in SHARDED if b in BACKENDS])
def test_two_devices_give_the_one_device_run(backend):
    report = run_python(
        f"import runpy; runpy.run_path({str(WORKER)!r}, run_name='__main__')",
        [SHARDED[backend]],
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "KERAS_BACKEND": "jax",
        },
        what=f"the sharded runs on {backend}",
    )
    assert report["devices"] == 2
    for case in ("keras_guide", "train_bn"):  # BN pinned to inference; BN in training mode
        run = report[case]
        assert run["largest_difference"] <= 1e-5, (case, run)
        one, two = run["losses"]
        assert one == pytest.approx(two, rel=1e-5)
        assert run["ok"] and run["history_devices"] == 2
        assert 2 in run["devices_during"], run  # it did train sharded
        assert run["devices_after"] == [1]  # and put the state back on one device
        assert run["table"].endswith("on cpu x 2 devices")
    # Everything trains with BN in training mode: the moving statistics equal one device's,
    # so each step normalised with the whole batch's statistics, not a half's.
    assert report["train_bn"]["devices_during"] == [2]


CLI = """
import contextlib, io, sys
from xfer.cli import main
from xfer.subprocesses import answer
out = io.StringIO()
with contextlib.redirect_stdout(out):
    status = main(["run", "--backend", sys.argv[1], "--devices", "2", "--quick"])
answer({"status": status, "stdout": out.getvalue()})
"""


@pytest.mark.parametrize("backend", [b for b in SHARDED if b in BACKENDS])
def test_xfer_run_devices_2_trains_sharded(backend):
    report = run_python(
        CLI,
        [backend.split("-")[0]],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"},
        what=f"xfer run --devices 2 on {backend}",
    )
    assert report["status"] == 0, report
    assert f"{backend.split('-')[0]} on cpu x 2 devices" in report["stdout"]
    assert "12/12 bit-identical" in report["stdout"] and "4/4 bit-identical" in report["stdout"]
