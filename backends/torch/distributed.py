"""Data-parallel training the PyTorch way: ``torch.distributed`` (gloo on the CPU, nccl on
CUDA) from torchrun's environment, and ``DistributedDataParallel``, built per stage.

Why per stage: DDP registers the parameters that require a gradient *when it wraps the
model*. A parameter unfrozen after the wrap trains without its gradient being all-reduced,
and the ranks silently drift apart; freezing one after the wrap raises inside DDP. So each
stage's step wraps the model after the stage's state is applied (:func:`distributed_trainer`).
DDP refuses a model with nothing to train, so a stage that only adapts BN statistics runs the
forward passes without it.

BatchNorm: ``nn.SyncBatchNorm.convert_sync_batchnorm`` builds new modules (xfer's pins,
forward pre-hooks on the old ones, would be lost) and does not run on the CPU. Instead, for
the duration of a step, each BN module's ``forward`` normalises with the moments of the
global batch, all-reduced across ranks (:func:`_global_moments_forward`); the module, its
hooks and its pins stay as they are, and nothing is left on it after the step.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn

from xfer._adapter import StepOptions
from xfer.backends.torch.engine import (
    OPTIMIZERS,
    device_of,
    param_groups,
    resolved_device,
    to_device,
    training_mode,
)
from xfer.distributed import PeerLost, World

# How long a rank waits for the others at a collective before it gives up (a rank that
# died). torch's default is 30 minutes; a transfer step takes well under a second.
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("XFER_DISTRIBUTED_TIMEOUT", "300")))


def join_world(world: World, device: str) -> str:
    cuda = resolved_device(device) == "cuda"
    if cuda:
        torch.cuda.set_device(world.local_rank)  # "cuda" is now this rank's own GPU
    # On the CPU, conv's backward gives a one-input-channel kernel's gradient strides of
    # its own ((9, 1, 3, 1) for (16, 1, 3, 3)), equal in memory order, which DDP reports
    # as a possible slowdown once per process; it is not one here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        # Torn down before the interpreter's: a process group left to static destruction
        # aborts the process ("terminate called without an active exception") now and then.
        atexit.register(_leave)
    if (dist.get_rank(), dist.get_world_size()) != (world.rank, world.size):
        raise ValueError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, but "
            f"the environment says {world.rank} of {world.size}: initialise it from the "
            "launcher's environment (init_method='env://'), or let xfer do it."
        )
    return "cuda" if cuda else "cpu"


@contextlib.contextmanager
def _peers(world: World) -> Iterator[None]:
    """A collective that failed because another rank is gone, as :class:`PeerLost`."""
    try:
        yield
    except RuntimeError as error:
        # gloo raises a plain RuntimeError from its transport, nccl a DistBackendError.
        if not isinstance(error, dist.DistBackendError) and not any(
            sign in str(error) for sign in ("gloo", "Connection closed", "Connection reset")
        ):
            raise
        raise PeerLost(
            f"rank {world.rank}: another of the {world.size} processes stopped "
            f"({_first_sentence(error)})"
        ) from error


def _first_sentence(error: Exception) -> str:
    """gloo's "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:7563. This is ..."
    as "Connection closed by peer [127.0.0.1]:7563"."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split("] ", 1)[-1].split(". ")[0][:200]


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def distributed_trainer(
    model: nn.Module, options: StepOptions, world: World, *, sync_bn: bool
) -> Callable[[object, object], float]:
    groups = param_groups(model, options)
    device = device_of(model)
    bfloat16 = options.precision == "bfloat16"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bfloat16)
    enter_training = training_mode(model)
    if not groups:  # nothing trains: BN statistics only, always from the global batch
        return _statistics_step(model, world, autocast)
    opt = OPTIMIZERS[options.optimizer](groups, options.lr, options.weight_decay)
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    forward = torch.compile(wrapped) if options.compile_step else wrapped

    def step(x, y) -> float:
        enter_training()
        opt.zero_grad()
        x, y, count = _local_part(model, x, y, world)
        with _peers(world):
            with autocast, _global_bn(model, sync_bn):
                summed = nn.functional.cross_entropy(forward(x), y, reduction="sum")
            # DDP averages the ranks' gradients; scaled so, that average is the gradient of
            # the whole batch's mean loss, whatever the parts' sizes.
            (summed * (world.size / count)).backward()
            opt.step()
            return _batch_mean(summed.detach(), count)

    return step


def _statistics_step(model: nn.Module, world: World, autocast) -> Callable[[object, object], float]:
    enter_training = training_mode(model)

    def step(x, y) -> float:
        enter_training()
        x, y, count = _local_part(model, x, y, world)
        with _peers(world), torch.no_grad(), autocast, _global_bn(model, True):
            summed = nn.functional.cross_entropy(model(x), y, reduction="sum")
            return _batch_mean(summed, count)

    return step


def _local_part(model: nn.Module, x, y, world: World) -> tuple[torch.Tensor, torch.Tensor, int]:
    count = len(y)
    if count < world.size:
        raise ValueError(
            f"a batch of {count} examples cannot be split over {world.size} processes: "
            "every batch needs at least one example per process."
        )
    part = world.shard(count)
    x, y = x[part], y[part]
    if not isinstance(x, torch.Tensor):  # else already on the device (to_device)
        x, y = to_device(model, x, y)
    return x, y, count


def _batch_mean(summed: torch.Tensor, count: int) -> float:
    total = summed.float().clone()
    dist.all_reduce(total)
    return total.item() / count


@contextlib.contextmanager
def _global_bn(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, every ``_BatchNorm`` of the model that computes in training mode
    uses (and stores) the global batch's statistics."""
    if not enabled:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.forward = _global_moments_forward(module)
    try:
        yield
    finally:
        for module in norms:
            del module.forward  # the class's own forward again


def _global_moments_forward(bn: nn.modules.batchnorm._BatchNorm) -> Callable:
    own = type(bn).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not bn.training:  # xfer's pin (a pre-hook) has set this by now
            return own(bn, x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        reduce = dist_functional.all_reduce if torch.is_grad_enabled() else _all_reduce
        count = float(x.numel() // x.shape[1]) * torch.ones((), device=x.device)
        count = _all_reduce(count)
        mean = reduce(x.sum(dims)) / count
        centred = x - mean.reshape(shape)
        variance = reduce((centred * centred).sum(dims)) / count  # two passes, as torch does
        if bn.track_running_stats and bn.running_mean is not None:
            _update_running(bn, mean.detach(), variance.detach(), count)
        out = centred * torch.rsqrt(variance + bn.eps).reshape(shape)
        if bn.affine:
            out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        return out

    return forward


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _update_running(bn, mean: torch.Tensor, variance: torch.Tensor, count: torch.Tensor) -> None:
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        # momentum=None: torch's cumulative average.
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = variance * count / (count - 1)  # torch stores the unbiased variance
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def broadcast_model(model: nn.Module, world: World) -> None:
    with _peers(world), torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def gather(value, world: World) -> list:
    values = [None] * world.size
    with _peers(world):
        dist.all_gather_object(values, value)
    return values


def device_count() -> int:
    return 1  # one process per device: torchrun


def sharded_trainer(model: nn.Module, options: StepOptions, devices: int):
    raise ValueError(
        f"devices={devices}: PyTorch trains one process per device, not several devices "
        f"from one process: launch `torchrun --nproc-per-node {devices} ...` (xfer then "
        "uses DistributedDataParallel; see docs/distributed.md) and leave devices unset."
    )
