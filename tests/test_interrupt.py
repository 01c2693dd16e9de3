"""Ctrl-C on the real command: ``xfer run --checkpoint DIR`` interrupted a fraction of a
second into a stage stops at a step boundary, keeps the checkpoint, and exits 130, every
time. On the JAX engines a KeyboardInterrupt raised inside a jitted dispatch used to end
in a segmentation fault (exit 139) about one time in three."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TRIES = 3


def _interrupt_once(backend: str, engine: str | None, workdir, cache) -> tuple[int, str]:
    ckpt = workdir / "ckpt"
    env = {**os.environ, "XFER_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    if engine:
        env["KERAS_BACKEND"] = engine
    # From a directory of its own: `-m` puts the working directory first on sys.path, and
    # a source checkout there would shadow the installed xfer.
    process = subprocess.Popen(
        [sys.executable, "-m", "xfer", "run", "--backend", backend, "--checkpoint", str(ckpt)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    # The first checkpoint appears when stage 1 has finished: stage 2 is starting.
    while not (ckpt / "checkpoint.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the run ended before its first checkpoint: {err[-2000:]}")
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=240)
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert manifest["last_finished"]["name"] == "head", manifest["last_finished"]
    return process.returncode, err


@pytest.mark.backends("flax", "keras-jax", "torch")
def test_ctrl_c_mid_stage_exits_130_and_keeps_the_checkpoint_every_time(kit, tmp_path):
    backend, _, engine = kit.id.partition("-")
    cache = tmp_path / "cache"
    for attempt in range(TRIES):
        workdir = tmp_path / f"try{attempt}"
        workdir.mkdir()
        code, err = _interrupt_once(backend, engine or None, workdir, cache)
        assert code == 130, f"try {attempt + 1}: exit {code}\n{err[-2000:]}"
        assert "Interrupted during stage 'finetune'" in err and "Traceback" not in err
        assert "--resume" in err or "resume" in err


def test_under_a_launcher_sigterm_is_a_stop_request_and_the_handler_is_put_back():
    """torchrun sends SIGTERM to the other processes when one fails: under a launcher it
    stops the run at a step boundary, as Ctrl-C does; elsewhere it is left alone."""
    import os
    import signal

    from xfer.pipeline.interrupt import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(terminate=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt, match="step boundary"):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) == before
    with StopRequest() as stop:  # one process: SIGTERM is not xfer's
        assert signal.getsignal(signal.SIGTERM) == before
