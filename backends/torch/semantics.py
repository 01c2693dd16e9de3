"""What PyTorch's own switches do, measured on tiny models; the same probes through xfer.

Each probe is the function named like its row of ``xfer.semantics.ROWS`` and returns
``{"native": value, "xfer": value, "detail": str}`` (``xfer.semantics.probe(module)`` finds
and runs them; a row with no function here does not apply to PyTorch, as Keras's nested
``training`` argument). Nothing is assumed about the installed version: every value comes
from running the framework. Each probe draws from torch's RNG seeded with 0 and leaves the
global RNG as it was (``torch.random.fork_rng``).

Example:
    >>> import sys
    >>> from xfer.semantics import probe
    >>> probe(sys.modules[__name__])["parent_train_undoes_child_eval"]["native"]
    True
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import xfer
from xfer import select as S
from xfer.semantics import fast_variance_cell, variance_error, variance_estimator_cell


def versions() -> dict[str, str]:
    """The installed versions these probes measure.

    Example:
        >>> versions()["torch"] == torch.__version__.split("+")[0]
        True
    """
    return {"torch": torch.__version__.split("+")[0]}


def _seeded(probe: Callable[[], dict]) -> Callable[[], dict]:
    """The probe, run on torch's RNG seeded with 0, the global RNG left as it was."""

    @functools.wraps(probe)
    def seeded() -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return probe()

    return seeded


def _net() -> nn.Sequential:
    base = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            drop=nn.Dropout(0.5),
        )
    )
    head = nn.Sequential(
        OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), dense=nn.Linear(4, 2))
    )
    return nn.Sequential(OrderedDict(base=base, head=head))


def _images(n: int = 8, size: int = 6, offset: float = 0.5) -> torch.Tensor:
    # A non-zero mean and a non-unit spread, so that BN statistics visibly move.
    return torch.randn(n, 3, size, size) * 2.0 + offset


def _stats(bn: nn.Module) -> list[torch.Tensor]:
    return [bn.running_mean.clone(), bn.running_var.clone()]


def _changed(before: list[torch.Tensor], bn: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, _stats(bn), strict=True))


def _step(model: nn.Module, x: torch.Tensor) -> None:
    """One step of the tutorial loop: optimizer over model.parameters(), model.train()."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _kept(model: nn.Module, action: Callable[[], None]) -> bool:
    """Whether every tensor xfer promised to keep is bit-identical after ``action``."""
    keys = xfer.frozen_tensors(model)
    before = xfer.snapshot(model)
    action()
    return bool(keys) and not xfer.changed_tensors(before, xfer.snapshot(model), keys)


@_seeded
def freeze_stops_bn_stats() -> dict:
    x = _images()
    model = _net()
    model.requires_grad_(False)
    model.train()
    before = _stats(model.base.bn)
    model(x)
    plain = _changed(before, model.base.bn)
    before = _stats(model.base.bn)
    with torch.no_grad():
        model(x)
    no_grad = _changed(before, model.base.bn)

    model = _net()
    xfer.freeze(model, S.path("base.**"))
    kept = _kept(model, lambda: _step(model, x))
    return {
        "native": not (plain or no_grad),
        "xfer": kept,
        "detail": (
            f"requires_grad_(False) then a train() forward: running stats "
            f"{'changed' if plain else 'unchanged'}; inside torch.no_grad(): "
            f"{'changed' if no_grad else 'unchanged'}"
        ),
    }


@_seeded
def parent_train_undoes_child_eval() -> dict:
    x = _images()
    model = _net()
    model.base.eval()
    model.train()
    before = _stats(model.base.bn)
    with torch.no_grad():
        model(x)
    child_training = model.base.bn.training
    native = child_training and _changed(before, model.base.bn)

    model = _net()
    xfer.set_mode(model, "inference", S.path("base.**"))

    def train_forward() -> None:
        model.train()
        with torch.no_grad():
            train_forward.out = model(x)

    kept = _kept(model, train_forward)
    model.eval()
    with torch.no_grad():
        same = torch.equal(train_forward.out, model(x))
    return {
        "native": bool(native),
        "xfer": kept and same,
        "detail": f"base.eval() then model.train(): base.bn.training={child_training}, "
        + ("the next forward updated its running stats" if native else "running stats unchanged"),
    }


@_seeded
def dropout_active_when_frozen() -> dict:
    x = torch.randn(8, 16)
    model = nn.Sequential(OrderedDict(dense=nn.Linear(16, 16), drop=nn.Dropout(0.5)))
    model.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        model.train()
        native = not torch.equal(model(x), reference)

    model = nn.Sequential(OrderedDict(dense=nn.Linear(16, 16), drop=nn.Dropout(0.5)))
    xfer.freeze(model)
    xfer.set_mode(model, "inference", S.type("dropout"))
    model.eval()
    with torch.no_grad():
        reference = model(x)
        model.train()
        same = torch.equal(model(x), reference)
    return {
        "native": native,
        "xfer": same,
        "detail": "requires_grad_(False), train(): Dropout "
        + ("still drops units" if native else "is off"),
    }


@_seeded
def trainable_false_forces_inference() -> dict:
    x = _images()

    def measure(bn: nn.Module) -> tuple[bool, bool]:
        bn.eval()
        with torch.no_grad():
            reference = bn(x)
            bn.train()
            before = _stats(bn)
            out = bn(x)
        return torch.equal(out, reference), not _changed(before, bn)

    bn = nn.BatchNorm2d(3)
    bn.requires_grad_(False)
    same, kept = measure(bn)
    bn = nn.BatchNorm2d(3)
    xfer.freeze(bn)
    xfer_same, xfer_kept = measure(bn)
    return {
        "native": same and kept,
        "xfer": xfer_same and xfer_kept,
        "detail": "BatchNorm2d.requires_grad_(False) in train(): "
        + ("inference output" if same else "batch statistics used, forward unchanged by freezing"),
    }


@_seeded
def bn_default_momentum() -> dict:
    momentum = nn.BatchNorm2d(4).momentum
    return {
        "native": f"{momentum:g} (keeps {1.0 - momentum:g})",
        "xfer": "n/a",
        "detail": f"BatchNorm2d().momentum={momentum:g} is the weight of the new batch",
    }


@_seeded
def bn_default_epsilon() -> dict:
    return {"native": float(nn.BatchNorm2d(4).eps), "xfer": "n/a", "detail": "BatchNorm2d().eps"}


def _estimate(x: torch.Tensor) -> np.ndarray:
    # momentum=1: the running variance becomes the batch estimate itself.
    bn = nn.BatchNorm2d(x.shape[1], momentum=1.0)
    bn.train()
    with torch.no_grad():
        bn(x)
    return bn.running_var.double().numpy()


@_seeded
def running_var_estimator() -> dict:
    x = _images(4, 3)
    return variance_estimator_cell(_estimate(x), x.numpy(), "running_var", channel_axis=1)


@_seeded
def fast_variance() -> dict:
    x = _images(4, 3, offset=1e4)
    return fast_variance_cell(variance_error(_estimate(x), x.numpy(), channel_axis=1))


@_seeded
def bn_batch_counter() -> dict:
    bn = nn.BatchNorm2d(4)
    names = [n for n, _ in bn.named_buffers()]
    counter = [n for n in names if n not in ("running_mean", "running_var")]
    return {
        "native": bool(counter),
        "xfer": "n/a",
        "detail": "buffers: " + ", ".join(names),
    }


@_seeded
def batch_of_one_train_mode() -> dict:
    short, long = [], []
    for size in (1, 3):
        bn = nn.BatchNorm2d(4)
        bn.train()
        try:
            with torch.no_grad():
                out = bn(torch.randn(1, 4, size, size))
            beta = torch.equal(out, torch.zeros_like(out))
            short.append(f"runs at {size}x{size}" + (" (output = beta)" if beta else ""))
        except Exception as error:  # the message is the measurement
            short.append(f"{type(error).__name__} at {size}x{size}")
            long.append(f"{size}x{size}: {_short(error)}")

    model = _net()
    xfer.set_bn(model, "frozen")
    x = _images(1, 1)
    model.eval()
    with torch.no_grad():
        reference = model.base.bn(model.base.conv(x))
        model.train()
        try:
            held = torch.equal(model.base.bn(model.base.conv(x)), reference)
        except Exception:
            held = False
    return {
        "native": "; ".join(short),
        "xfer": held,
        "detail": "BatchNorm2d, input 1x4xHxW in train(): " + "; ".join(long or short),
    }


def _short(error: Exception, limit: int = 110) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
