"""The PyTorch backend: xfer's state on a plain ``torch.nn.Module``, with torch's own switches.

- **Freezing** (:mod:`.units`): ``requires_grad_(False)`` on a unit's own parameters, and
  their ``grad`` set to ``None``: a stale (even zero) gradient would still let AdamW apply
  weight decay and SGD momentum, while optimizers skip a parameter whose grad is ``None``.
  The standard loop (an optimizer over ``model.parameters()``) then leaves them bit-identical;
  xfer's own step builds its optimizer over the trainable parameters only (:mod:`.engine`).
- **Mode pins** (:mod:`.units`): ``model.train()`` recurses into every child and overwrites
  ``module.training``, so a pin is ``module._xfer_mode`` plus a forward pre-hook that sets
  ``training`` back right before the module computes; it survives any ``train()``/``eval()``
  call and the pinned model still pickles and deepcopies.
- **BN policies**: the two switches above on each ``_BatchNorm``: ``affine`` is whether
  ``weight``/``bias`` train, ``stats`` is the mode pin (a BN pinned to inference uses and
  keeps its running statistics, whatever ``model.train()`` said; freezing alone does not
  stop torch from updating them, nor does ``torch.no_grad()``).
- **Weights** (:mod:`.weights`): conv kernels OIHW and ``Linear`` (out, in) to the neutral
  HWIO / (in, out); ``num_batches_tracked`` is left out (the other frameworks have none).

Example:
    >>> import xfer
    >>> model = xfer.models.small_cnn(4, 3, seed=0, backend="torch")
    >>> ADAPTER.units(model)[3].path, ADAPTER.units(model)[3].kind
    ('base.block1.bn', 'batchnorm')
"""

from xfer.backends._common import assemble
from xfer.backends.torch import (
    distributed,
    engine,
    export,
    folding,
    models,
    recalibration,
    units,
    weights,
)
from xfer.backends.torch.models import GlobalAvgPool, ResNet, SmallCNN, TransferHead, TransferModel

__all__ = ["ADAPTER", "GlobalAvgPool", "ResNet", "SmallCNN", "TransferHead", "TransferModel"]

ADAPTER = assemble(
    "torch",
    units=units,
    weights=weights,
    engine=engine,
    models=models,
    recalibration=recalibration,
    folding=folding,
    export=export,
    distributed=distributed,
)
