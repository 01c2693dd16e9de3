"""Stage recipes for the common ways to transfer: each returns a list of ``xfer.Stage``.

- :func:`keras_guide`: the Keras transfer-learning guide. Train the head on a frozen base
  pinned to inference, then everything at a low learning rate with BN statistics frozen.
- :func:`fine_tune`: fastai's ``fine_tune``: frozen epochs with BN trainable
  (``train_bn``), then everything, BN trainable, at half the learning rate.
- :func:`gradual`: ULMFiT's gradual unfreezing: one more top-level group per stage, from
  the top.
- :func:`discriminative`: one stage where each top-level group, counted from the top,
  learns ``decay`` times slower than the one above it (ULMFiT's 2.6).
"""

from __future__ import annotations

from typing import Any

from xfer import select as S
from xfer._adapter import find_adapter
from xfer.pipeline.stage import Stage

HEAD = S.path("head.**")


def keras_guide(
    *,
    head=HEAD,
    lr: float = 1e-3,
    epochs: int = 5,
    finetune_lr: float = 1e-5,
    finetune_epochs: int = 3,
) -> list[Stage]:
    """Head on a frozen base in inference mode, then all with BN ``"affine"``.

    Example:
        >>> [s.name for s in keras_guide()]
        ['head', 'finetune']
    """
    return [
        Stage("head", train=head, bn="frozen", mode="inference", lr=lr, epochs=epochs),
        Stage("finetune", train=S.all(), bn="affine", lr=finetune_lr, epochs=finetune_epochs),
    ]


def fine_tune(
    *, head=HEAD, lr: float = 2e-3, freeze_epochs: int = 1, epochs: int = 3
) -> list[Stage]:
    """fastai's ``fine_tune``: head (and BN) first, then everything at ``lr / 2``.

    Example:
        >>> [(s.name, s.bn) for s in fine_tune()]
        [('frozen', 'train'), ('unfrozen', 'train')]
    """
    return [
        Stage("frozen", train=head, bn="train", lr=lr, epochs=freeze_epochs),
        Stage("unfrozen", train=S.all(), bn="train", lr=lr / 2, epochs=epochs),
    ]


def _top_level_indices(model: Any) -> list[int]:
    # The framework's own positions (Keras's model.layers starts with the InputLayer of a
    # functional model, which is no unit), so they may start above 0.
    return sorted({u.index for u in find_adapter(model).units(model) if u.index >= 0})


def gradual(
    model: Any, *, lr: float = 1e-3, epochs_per_stage: int = 1, bn: str = "affine"
) -> list[Stage]:
    """ULMFiT's gradual unfreezing over the model's top-level units: ``top1``, ``top2``, ...

    Example:
        >>> [s.name for s in gradual(model)]                 # doctest: +SKIP
        ['top1', 'top2']
    """
    n = len(_top_level_indices(model))
    return [
        Stage(f"top{k}", train=S.top(k), bn=bn, mode="inference", lr=lr, epochs=epochs_per_stage)
        for k in range(1, n + 1)
    ]


def discriminative(
    model: Any, *, lr: float = 1e-3, decay: float = 2.6, epochs: int = 3, bn: str = "affine"
) -> list[Stage]:
    """One stage, everything trains; the k-th top-level unit from the top gets ``lr / decay**k``.

    Example:
        >>> stage, = discriminative(model)                   # doctest: +SKIP
    """
    indices = _top_level_indices(model)
    n = len(indices)
    groups = tuple(
        (S.from_index(i) & ~S.from_index(i + 1), lr / decay ** (n - 1 - k))
        for k, i in enumerate(indices[:-1])
    )
    return [Stage("discriminative", train=S.all(), bn=bn, lr=lr, epochs=epochs, lr_groups=groups)]


PRESETS = {
    "keras_guide": lambda model, **kw: keras_guide(**kw),
    "fine_tune": lambda model, **kw: fine_tune(**kw),
    "gradual": gradual,
    "discriminative": discriminative,
}


def preset(name: str, model: Any, **kwargs: Any) -> list[Stage]:
    """The stages of the named preset for ``model``.

    Example:
        >>> [s.name for s in preset("keras_guide", None)]
        ['head', 'finetune']
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: expected one of {', '.join(PRESETS)}.")
    return PRESETS[name](model, **kwargs)
