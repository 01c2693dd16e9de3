"""Data-parallel training under torchrun (2 processes, gloo, CPU): the ranks stay
bit-identical, equal one process on the same global batches, and keep every freeze and BN
guarantee; the naive recipe (wrap once, unfreeze after) drifts. The worker is
tests/distributed_worker.py."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKENDS

pytestmark = pytest.mark.skipif("torch" not in BACKENDS, reason="torch's own session runs these")

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def _launch(arguments: list[str], cwd: pathlib.Path, processes: int) -> subprocess.CompletedProcess:
    """``arguments`` as one process, or under torchrun as ``processes``; in ``cwd`` (a
    checkout there would shadow the installed xfer for ``-m``)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(
        [*launcher, *arguments], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_worker(case: str, tmp_path: pathlib.Path, processes: int) -> list[tuple[dict, dict]]:
    out = tmp_path / f"{case}-{processes}"
    out.mkdir()
    _launch([str(WORKER), case, str(out)], tmp_path, processes)
    return [
        (dict(np.load(out / f"rank{r}.npz")), json.loads((out / f"rank{r}.json").read_text()))
        for r in range(processes)
    ]


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_main_job_on_two_processes_is_the_one_process_job(tmp_path):
    """keras_guide (head on a frozen base in inference mode, then everything with BN
    "affine"): both ranks end bit-identical, within float reordering of one process."""
    ((single, one),) = _run_worker("job", tmp_path, 1)
    (rank0, report0), (rank1, report1) = _run_worker("job", tmp_path, 2)
    assert _bit_identical(rank0, rank1)
    assert report0 == report1 and report0["processes"] == 2
    assert report0["ok"]  # every frozen tensor and pinned BN statistic bit-identical
    assert _largest_difference(rank0, single) <= 1e-5
    np.testing.assert_allclose(report0["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(report0["val_losses"], one["val_losses"], rtol=1e-5)
    assert one["losses"][-1] < one["losses"][0] - 0.2  # it learnt: the comparison means something
    # The source base's BN statistics were pinned (frozen, then affine) all along.
    weights = _start()
    for key in (k for k in weights if "moving_" in k):
        np.testing.assert_array_equal(rank0[key], weights[key])


def _start() -> dict:
    from xfer import job

    weights, _ = job.pretrained("torch", 0)
    return job.start_weights("torch", weights, 0)


def test_an_adapt_stage_trains_nothing_and_gives_every_rank_the_global_statistics(tmp_path):
    """DDP refuses a model with nothing to train; xfer runs the forward passes without it,
    on the global batch's moments, so the statistics are the one-process statistics."""
    ((single, _),) = _run_worker("adapt", tmp_path, 1)
    (rank0, report0), (rank1, _) = _run_worker("adapt", tmp_path, 2)
    assert _bit_identical(rank0, rank1) and report0["ok"]
    moved = np.abs(rank0["base.block1.bn.moving_mean"] - np.array(report0["start"])).max()
    assert moved > 0.05  # the statistics did adapt
    for key in single:
        tolerance = 1e-5 * max(1.0, float(np.abs(single[key]).max()))
        np.testing.assert_allclose(rank0[key], single[key], rtol=0, atol=tolerance, err_msg=key)


def test_sync_bn_trains_on_the_global_batch_statistics(tmp_path):
    """Everything trains with BN in training mode: with sync_bn the two ranks normalise
    with the whole batch's moments, as one process does, and store the same statistics."""
    ((single, one),) = _run_worker("sync_bn", tmp_path, 1)
    (rank0, report0), (rank1, _) = _run_worker("sync_bn", tmp_path, 2)
    assert _bit_identical(rank0, rank1)
    assert _largest_difference(rank0, single) <= 1e-5
    np.testing.assert_allclose(report0["losses"], one["losses"], rtol=1e-5)


def test_a_run_stopped_after_a_stage_resumes_on_every_rank(tmp_path):
    """Rank 0 writes the checkpoint; both ranks resume from it and end where an
    uninterrupted run ends."""
    (rank0, report0), (rank1, report1) = _run_worker("resume", tmp_path, 2)
    assert report0["same_as_uninterrupted"] and report1["same_as_uninterrupted"]
    assert _bit_identical(rank0, rank1)
    assert sorted(p.name for p in (tmp_path / "resume-2" / "ckpt").iterdir())  # rank 0 wrote


def test_a_killed_rank_stops_the_other_clearly_and_the_run_resumes(tmp_path):
    """Rank 1 is SIGKILLed after the first stage's checkpoint: rank 0 says, in one line,
    that a peer stopped and what is saved; a new launch resumes every rank from it and
    ends where an uninterrupted run ends."""
    out = tmp_path / "killed"
    out.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*launcher, str(WORKER), "kill", str(out)], cwd=tmp_path, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("STOPPED")]
    assert len(said) == 1 and said[0].startswith("STOPPED rank 0: PeerLost"), done.stderr[-2000:]
    assert "another of the 2 processes stopped" in said[0]
    assert "holds the stages up to 'head'" in said[0] and "'finetune'" in said[0]
    assert "SIGKILL" in done.stderr  # torchrun names the rank that died
    _launch([str(WORKER), "resume_killed", str(out)], tmp_path, 2)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["same_as_uninterrupted"] and r["ok"] for r in reports)


def test_unfreezing_after_a_single_wrap_drifts_apart(tmp_path):
    """Why xfer wraps per stage: DDP all-reduces only the gradients of the parameters that
    trained when it wrapped the model; a base unfrozen later trains on each rank's own
    images alone, and the ranks' weights part."""
    (rank0, _), (rank1, _) = _run_worker("wrap_once", tmp_path, 2)
    head = [k for k in rank0 if k.startswith("head.")]
    base = [k for k in rank0 if k.startswith("base.") and "moving_" not in k]
    assert all(np.array_equal(rank0[k], rank1[k]) for k in head)  # registered at the wrap
    assert max(float(np.abs(rank0[k] - rank1[k]).max()) for k in base) > 1e-3


def test_xfer_run_under_torchrun_reports_once(tmp_path):
    done = _launch(["-m", "xfer", "run", "--backend", "torch", "--quick"], tmp_path, 2)
    assert done.stdout.count("torch on cpu x 2 processes") == 1, done.stdout
    assert "finetune" in done.stdout and "bit-identical" in done.stdout
