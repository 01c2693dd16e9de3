"""xfer: freezing and inference mode done right, the same way, on PyTorch, Keras 3 and Flax NNX.

``import xfer`` imports no framework: each adapter is loaded when a model of its
framework is first passed in, or when its backend is chosen.

Example:
    >>> import xfer
    >>> from xfer import select as S
    >>> xfer.freeze(model, S.path("base.**"))               # doctest: +SKIP
    >>> xfer.set_bn(model, "affine", S.path("base.**"))     # doctest: +SKIP
    >>> xfer.summary(model)                                 # doctest: +SKIP
"""

from xfer import checkpoint, models, pipeline, select
from xfer._adapter import Adapter, Unit
from xfer._config import backend_context, get_backend, set_backend
from xfer.audit import Finding, audit
from xfer.checkpoint import CheckpointError
from xfer.convert import convert
from xfer.export import export_onnx
from xfer.folding import fold_bn
from xfer.models import attach_head
from xfer.pipeline import History, Interrupted, NonFiniteLoss, Stage, TransferPipeline, presets
from xfer.policy import PRESETS as BN_PRESETS
from xfer.policy import BNPolicy
from xfer.recalibration import recalibrate_bn
from xfer.state import (
    SelectionError,
    changed_tensors,
    export_state,
    fingerprints,
    freeze,
    frozen_tensors,
    import_state,
    set_bn,
    set_mode,
    snapshot,
    unfreeze,
)
from xfer.summary import Summary, summary
from xfer.weights import export_weights, import_weights, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Interrupted",
    "attach_head",
    "checkpoint",
    "convert",
    "presets",
    "History",
    "NonFiniteLoss",
    "Stage",
    "TransferPipeline",
    "pipeline",
    "BN_PRESETS",
    "Adapter",
    "BNPolicy",
    "Finding",
    "SelectionError",
    "Summary",
    "Unit",
    "audit",
    "backend_context",
    "changed_tensors",
    "export_onnx",
    "export_state",
    "export_weights",
    "fingerprints",
    "fold_bn",
    "freeze",
    "frozen_tensors",
    "get_backend",
    "import_state",
    "import_weights",
    "load_weights",
    "models",
    "recalibrate_bn",
    "save_weights",
    "select",
    "set_backend",
    "set_bn",
    "set_mode",
    "snapshot",
    "summary",
    "unfreeze",
]
