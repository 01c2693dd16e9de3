"""``XferFinetuning``: Lightning's ``BackboneFinetuning`` with BatchNorm kept pinned.

Lightning's ``BackboneFinetuning`` freezes the backbone's parameters but not its
BatchNorm: it freezes with ``train_bn=True`` whatever its own ``train_bn`` says, so during
the frozen epochs BN normalises with batch statistics, moves its running statistics and
trains gamma/beta; and an ``eval()`` would last only until the next ``model.train()``.
This callback does the same schedule — backbone frozen, then unfrozen at
``unfreeze_at_epoch`` as a new optimizer param group with its own learning rate — with
xfer's switches: BN follows an xfer policy before and after the unfreeze, and the pins
survive ``model.train()`` (see ``xfer.set_mode``).

Imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``) when imported.
"""

from __future__ import annotations

from typing import Any

import torch

import xfer
from xfer import select as S
from xfer._checks import check_integer, check_positive
from xfer.policy import BNPolicy
from xfer.state import check_mode, resolve

try:
    from lightning.pytorch.callbacks import BaseFinetuning
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import BaseFinetuning

__all__ = ["XferFinetuning"]


class XferFinetuning(BaseFinetuning):
    """Freeze the backbone, then unfreeze it at ``unfreeze_at_epoch`` with its own learning
    rate, keeping its BatchNorm under an xfer policy throughout.

    Args:
        unfreeze_at_epoch: the epoch (from 0) at whose start the backbone starts training.
        backbone: the units of the ``LightningModule`` that form the backbone; by default
            its ``backbone`` attribute, as ``BackboneFinetuning`` expects.
        frozen_bn: BN policy of the backbone's BN while it is frozen (``"frozen"``: moving
            statistics used and never changed).
        bn: BN policy of the backbone's BN once it trains (``"affine"``: gamma/beta train,
            statistics stay frozen — the Keras fine-tuning guide's choice).
        frozen_mode: pin of the backbone's other units while frozen (``"inference"``:
            Dropout and drop-path off); ``None`` leaves them to ``model.train()``. After the
            unfreeze they follow the model again.
        backbone_lr: the backbone's learning rate; ``None``: the first param group's
            learning rate times ``lr_ratio`` (``BackboneFinetuning``'s
            ``backbone_initial_ratio_lr``). It stays constant.
        lr_ratio: see ``backbone_lr``.

    ``configure_optimizers`` must give the optimizer only the parameters that train at the
    start (``filter(lambda p: p.requires_grad, self.parameters())``): the backbone's join
    as a new param group at the unfreeze. Fitting refuses an optimizer that already holds
    them, since they would train at the head's learning rate.

    Example:
        >>> import lightning as L  # doctest: +SKIP
        >>> from xfer import select as S
        >>> from xfer.integrations.lightning import XferFinetuning  # doctest: +SKIP
        >>> finetune = XferFinetuning(unfreeze_at_epoch=5, bn="affine", backbone_lr=1e-4)  # doctest: +SKIP
        >>> trainer = L.Trainer(max_epochs=10, callbacks=[finetune])  # doctest: +SKIP
        >>> trainer.fit(module, train_loader)  # module.backbone, module.head  # doctest: +SKIP
        >>> XferFinetuning(backbone=S.path("resnet.encoder.**"))  # a Hugging Face model  # doctest: +SKIP
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 10,
        backbone: S.Selector | None = None,
        *,
        frozen_bn: str | BNPolicy = "frozen",
        bn: str | BNPolicy = "affine",
        frozen_mode: str | None = "inference",
        backbone_lr: float | None = None,
        lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        check_integer(unfreeze_at_epoch, "XferFinetuning: unfreeze_at_epoch", 0)
        self.backbone = S.check_selector(S.path("backbone.**") if backbone is None else backbone)
        self.frozen_bn = BNPolicy.of(frozen_bn)
        self.bn = BNPolicy.of(bn)
        self.frozen_mode = None if frozen_mode is None else check_mode(frozen_mode)
        if backbone_lr is not None:
            check_positive(backbone_lr, "XferFinetuning: backbone_lr")
        check_positive(lr_ratio, "XferFinetuning: lr_ratio")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr = backbone_lr
        self.lr_ratio = lr_ratio
        self._unfrozen = False  # in this process; a resumed run unfreezes again, idempotently

    def __repr__(self) -> str:
        return (
            f"XferFinetuning(unfreeze_at_epoch={self.unfreeze_at_epoch}, "
            f"backbone={self.backbone!r}, frozen_bn={self.frozen_bn.name!r}, "
            f"bn={self.bn.name!r})"
        )

    def _has_bn(self, pl_module: Any) -> bool:
        return any(u.is_bn for u in resolve(pl_module, self.backbone)[2])

    def backbone_parameters(self, pl_module: Any) -> list[torch.nn.Parameter]:
        """The parameters of the backbone's units, each once, in definition order."""
        found: dict[int, torch.nn.Parameter] = {}
        for unit in resolve(pl_module, self.backbone)[2]:
            for p in unit.native.parameters(recurse=False):
                found.setdefault(id(p), p)
        return list(found.values())

    def freeze_before_training(self, pl_module: Any) -> None:
        """Freeze the backbone; pin its BN to ``frozen_bn`` and the rest to ``frozen_mode``."""
        self._unfrozen = False
        resolve(pl_module, self.backbone)  # a selector that matches nothing fails here
        if self.frozen_mode is not None:
            xfer.set_mode(pl_module, self.frozen_mode, self.backbone)
        xfer.freeze(pl_module, self.backbone, bn=None)
        if self._has_bn(pl_module):
            xfer.set_bn(pl_module, self.frozen_bn, self.backbone)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch > self.unfreeze_at_epoch:
            return  # a resumed run: the optimizer was restored with the backbone's group
        # Frozen ones only: a frozen_bn that trains gamma/beta puts them there rightly.
        frozen = {id(p) for p in self.backbone_parameters(pl_module) if not p.requires_grad}
        for optimizer in trainer.optimizers:
            held = [p for g in optimizer.param_groups for p in g["params"] if id(p) in frozen]
            if held:
                raise ValueError(
                    f"XferFinetuning: the optimizer already holds {len(held)} frozen backbone "
                    f"parameters ({self.backbone!r}), so they would train at its learning "
                    "rate from the unfreeze on. Give it only the trainable ones: "
                    "filter(lambda p: p.requires_grad, self.parameters()) in "
                    "configure_optimizers."
                )

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        """At ``unfreeze_at_epoch`` (or later, when resuming): the backbone trains, its BN
        under ``bn``, as a new param group of ``optimizer``."""
        if self._unfrozen or epoch < self.unfreeze_at_epoch:
            return
        xfer.set_mode(pl_module, "inherit", self.backbone)
        xfer.unfreeze(pl_module, self.backbone)
        if self._has_bn(pl_module):
            xfer.set_bn(pl_module, self.bn, self.backbone)
        lr = self.backbone_lr or optimizer.param_groups[0]["lr"] * self.lr_ratio
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [
            p for p in self.backbone_parameters(pl_module) if p.requires_grad and id(p) not in held
        ]
        if params:  # none after a resume: the restored optimizer has the group already
            optimizer.add_param_group({"params": params, "lr": lr})
        self._unfrozen = True
