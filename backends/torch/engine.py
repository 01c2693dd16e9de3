"""Training and inference the PyTorch way: ``torch.optim`` over exactly the trainable
parameters, ``autocast`` for mixed precision, NCHW tensors on the model's device.

xfer's arrays are channels-last numpy; they become channels-first tensors here
(:func:`to_tensor`) and outputs go back channels-last (:func:`channels_last`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from xfer._adapter import ADAM_EPSILON, MOMENTUM, StepOptions
from xfer.backends._common import group_of_path
from xfer.backends.torch.units import modes_restored, own_params, pins_applied
from xfer.data import PREDICT_CHUNK, inference_chunks

# optimizer name -> (parameter groups, lr, weight decay) -> torch optimizer
OPTIMIZERS = {
    "sgd": lambda groups, lr, wd: torch.optim.SGD(groups, lr=lr),
    "momentum": lambda groups, lr, wd: torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM),
    "adam": lambda groups, lr, wd: torch.optim.Adam(groups, lr=lr, eps=ADAM_EPSILON),
    "adamw": lambda groups, lr, wd: torch.optim.AdamW(
        groups, lr=lr, eps=ADAM_EPSILON, weight_decay=wd
    ),
}


def to_tensor(x: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Channels-last numpy images (or feature maps) to a channels-first float32 tensor on
    ``device``; a ``(batch, features)`` array as it is.

    Example:
        >>> tuple(to_tensor(np.zeros((2, 8, 8, 3)), "cpu").shape)
        (2, 3, 8, 8)
    """
    x = np.asarray(x, "float32")
    if x.ndim >= 3:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    return torch.from_numpy(x).to(device)


def channels_last(x: np.ndarray) -> np.ndarray:
    """A channels-first output (a feature map) back channels-last; logits as they are.

    Example:
        >>> channels_last(np.zeros((2, 3, 8, 8))).shape, channels_last(np.zeros((2, 5))).shape
        ((2, 8, 8, 3), (2, 5))
    """
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) is; the CPU for a model with neither.

    Example:
        >>> device_of(nn.Linear(2, 2)), device_of(nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def param_groups(model: nn.Module, options: StepOptions) -> list[dict]:
    """The optimizer's parameter groups: exactly the trainable parameters (frozen ones get no
    optimizer state), the rest at ``options.lr`` first, then one group per learning-rate
    group that has any; a unit in several groups belongs to the first.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> groups = param_groups(model, StepOptions("sgd", 0.1, lr_groups=((("1",), 1.0),)))
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(2, 0.1), (2, 1.0)]
    """
    modules = dict(model.named_modules())
    groups = [{"params": [], "lr": lr} for _, lr in options.lr_groups]
    for path, group in group_of_path(options.lr_groups).items():
        groups[group]["params"] += [p for p in own_params(modules[path]) if p.requires_grad]
    grouped = {id(p) for group in groups for p in group["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    return [g for g in [{"params": rest, "lr": options.lr}, *groups] if g["params"]]


# --- Engine (xfer._adapter.Engine) -----------------------------------------------------------


def fit(model, x, y, *, epochs, batch_size, lr, weight_decay) -> list[float]:
    # The PyTorch tutorial loop, with no xfer code in it: AdamW over model.parameters()
    # and model.train() every epoch; the xfer state makes it do the right thing.
    xs, ys = to_device(model, x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for i in range(0, len(xs), batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                model(xs[i : i + batch_size]), ys[i : i + batch_size]
            )
            loss.backward()
            opt.step()
            total += loss.item() * len(ys[i : i + batch_size])
        losses.append(total / len(ys))
    return losses


def training_mode(model: nn.Module) -> Callable[[], None]:
    """What a step calls first to train ``model``: ``model.train()`` on its first call,
    then again only when the model has left training mode.

    ``model.train()`` walks every module (1 ms on a small ResNet, 4 % of its CPU step). The
    first call puts every unit the stage does not pin in training mode (a pin of an earlier
    stage may have left one in eval); between steps only the pipeline's evaluation takes the
    model out of training, with ``model.eval()`` on the whole model, which the root's flag
    shows. Pinned units keep their own mode either way.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2)).eval()
        >>> enter = training_mode(net)
        >>> enter(); net.training
        True
    """
    first = True

    def enter() -> None:
        nonlocal first
        if first or not model.training:
            model.train()
            first = False

    return enter


def trainer(model: nn.Module, options: StepOptions) -> Callable[[object, object], float]:
    groups = param_groups(model, options)
    device = device_of(model)
    # Mixed precision the PyTorch way: autocast the forward pass, parameters in float32.
    bfloat16 = options.precision == "bfloat16"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bfloat16)
    enter_training = training_mode(model)
    if not groups:
        # Nothing trains (a stage that only adapts BN statistics): torch.optim refuses an
        # empty parameter list, and the training-mode forward alone updates the statistics.
        def forward_only(x, y) -> float:
            enter_training()
            if not isinstance(x, torch.Tensor):
                x, y = to_device(model, x, y)
            with torch.no_grad(), autocast:
                return nn.functional.cross_entropy(model(x), y).item()

        return forward_only
    opt = OPTIMIZERS[options.optimizer](groups, options.lr, options.weight_decay)
    forward = torch.compile(model) if options.compile_step else model  # shares the parameters

    def step(x, y) -> float:
        enter_training()
        opt.zero_grad()
        if not isinstance(x, torch.Tensor):  # else already on the device (to_device)
            x, y = to_device(model, x, y)
        with autocast:
            loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def to_device(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    device = device_of(model)
    return to_tensor(x, device), torch.from_numpy(np.asarray(y)).long().to(device)


def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = PREDICT_CHUNK) -> np.ndarray:
    model.eval()
    device = device_of(model)
    chunks = inference_chunks(x, pad=False, size=batch_size)
    with torch.no_grad(), pins_applied(model):  # no mode changes between these forwards
        out = [model(to_tensor(c, device)) for c, _ in chunks]
    return channels_last(torch.cat(out).cpu().numpy())


def resolved_device(device: str) -> str:
    """``"cuda"`` or ``"cpu"`` for ``device`` (``"auto"``: CUDA when torch sees it); a
    ``ValueError`` for ``"cuda"`` without CUDA.

    Example:
        >>> resolved_device("cpu")
        'cpu'
    """
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError(
            "device='cuda', but torch sees no CUDA device (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}). Use device='auto' or 'cpu'."
        )
    return "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"


def place(model: nn.Module, device: str) -> str:
    device = resolved_device(device)
    model.to(device)
    return device


def output_shape(model: nn.Module, x: np.ndarray) -> tuple[int, ...]:
    # A probe must not change the model: predict() switches it to eval(), and a fit
    # refused after the probe would leave the user's model there.
    with modes_restored(model):
        return predict(model, x).shape  # eager: as cheap as tracing
