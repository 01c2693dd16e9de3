"""What tests/test_distributed_torch.py starts under torchrun (and in one process, to compare):
``python distributed_worker.py CASE OUT``. Each rank writes ``OUT/rank<R>.npz`` (its neutral
weights) and ``OUT/rank<R>.json`` (what the test asserts on).

Cases:
- ``job``: the main job, ``xfer.job.run("torch")`` (keras_guide on the shipped source model).
- ``adapt``: one stage that trains nothing and adapts BN (``bn="adapt"``).
- ``sync_bn``: one stage that trains everything with BN in training mode, ``sync_bn=True``.
- ``resume``: the job with a checkpoint directory ``OUT/ckpt``, then resumed from it.
- ``wrap_once``: the naive recipe, no xfer: DDP wraps the model while only the head trains,
  then the base is unfrozen and trained under the same wrap.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import torch

import xfer
from xfer import job
from xfer import select as S
from xfer.distributed import PeerLost
from xfer.pipeline import Interrupted
from xfer.weights import export_weights

RANK = int(os.environ.get("RANK", "0"))


def write(out: str, model, **report) -> None:
    np.savez(f"{out}/rank{RANK}.npz", **export_weights(model))
    with open(f"{out}/rank{RANK}.json", "w") as f:
        json.dump(report, f)


def history_report(history) -> dict:
    return {
        "losses": history.losses(),
        "val_losses": [e.val_loss for s in history.stages for e in s.epochs],
        "ok": history.ok,
        "processes": history.processes,
    }


def job_pipeline(**options):
    """The main job's pipeline from its starting point: the shipped source base, a zero head."""
    pipe, train, val = job.transfer_pipeline("torch", **options)
    weights, _ = job.pretrained("torch", 0)
    xfer.import_weights(pipe.model, job.start_weights("torch", weights, 0))
    return pipe, train, val


def one_stage(out: str, stage: xfer.Stage, **options) -> None:
    pipe, train, val = job_pipeline()
    model = pipe.model
    before = export_weights(model)
    pipe = xfer.TransferPipeline(model, [stage], optimizer="momentum", batch_size=16, **options)
    history = pipe.fit(train, val)
    write(
        out, model, start=before["base.block1.bn.moving_mean"].tolist(), **history_report(history)
    )


class StopAfterFirstStage(xfer.pipeline.Callback):
    def on_stage_end(self, pipeline, stage, index, record):
        if index == 0:
            raise RuntimeError("stopped")


class KillRankOneAfterFirstStage(xfer.pipeline.Callback):
    def on_stage_end(self, pipeline, stage, index, record):
        if index == 0 and RANK == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def wrap_once(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    pipe, train, _ = job_pipeline()
    model = pipe.model
    xfer.freeze(model, ~S.path("head.**"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = train
    part = slice(RANK * len(y) // 2, (RANK + 1) * len(y) // 2)  # each rank its own images
    xs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x[part], -1, 1)))
    ys = torch.from_numpy(y[part]).long()
    for unfrozen in (False, True):
        if unfrozen:
            xfer.unfreeze(model, S.all())  # after the wrap: DDP does not know these
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(xs), ys).backward()
            opt.step()
    write(out, model)


def main() -> None:
    case, out = sys.argv[1], sys.argv[2]
    if case == "job":
        pipe, train, val = job_pipeline()
        write(out, pipe.model, **history_report(pipe.fit(train, val)))
    elif case == "adapt":
        one_stage(out, xfer.Stage("adapt", train=S.bn(), bn="adapt", epochs=2))
    elif case == "sync_bn":
        stage = xfer.Stage("all", train=S.all(), bn="train", lr=0.01, epochs=2)
        one_stage(out, stage, sync_bn=True)
    elif case == "resume":
        whole, train, val = job_pipeline(quick=True)
        whole.fit(train, val)
        checkpoint = os.path.join(out, "ckpt")
        pipe, train, val = job_pipeline(quick=True, checkpoint_dir=checkpoint)
        pipe.callbacks.append(StopAfterFirstStage())
        try:
            pipe.fit(train, val)
        except RuntimeError as stop:
            assert str(stop) == "stopped", stop
        again, train, val = job_pipeline(quick=True, checkpoint_dir=checkpoint)
        resumed = again.fit(train, val, resume=True)
        expected, found = export_weights(whole.model), export_weights(again.model)
        same = all(np.array_equal(expected[k], found[k]) for k in expected)
        write(out, again.model, same_as_uninterrupted=same, **history_report(resumed))
    elif case == "kill":  # rank 1 dies (SIGKILL) once the first stage's checkpoint is written
        pipe, train, val = job_pipeline(quick=True, checkpoint_dir=os.path.join(out, "ckpt"))
        pipe.callbacks.append(KillRankOneAfterFirstStage())
        try:
            pipe.fit(train, val)
        except (PeerLost, Interrupted) as error:  # what rank 0 says, in one line
            print(f"STOPPED rank {RANK}: {type(error).__name__}: {error}", file=sys.stderr)
            raise SystemExit(1) from None
    elif case == "resume_killed":
        whole, train, val = job_pipeline(quick=True)
        whole.fit(train, val)
        pipe, train, val = job_pipeline(quick=True, checkpoint_dir=os.path.join(out, "ckpt"))
        resumed = pipe.fit(train, val, resume=True)
        expected, found = export_weights(whole.model), export_weights(pipe.model)
        same = all(np.array_equal(expected[k], found[k]) for k in expected)
        write(out, pipe.model, same_as_uninterrupted=same, **history_report(resumed))
    elif case == "wrap_once":
        wrap_once(out)
    else:
        raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    main()
