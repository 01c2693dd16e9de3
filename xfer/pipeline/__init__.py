"""The staged transfer pipeline: stages and presets, the stage loop, its callbacks, the
feature cache.

- :mod:`~xfer.pipeline.stage`: :class:`Stage`, and applying or checking one on a model;
- :mod:`~xfer.pipeline.presets`: the common recipes as lists of stages;
- :mod:`~xfer.pipeline.loop`: :class:`TransferPipeline`, the stage loop;
- :mod:`~xfer.pipeline.callbacks`: :class:`Callback`, and the built-ins :class:`Progress`
  and :class:`NaNRollback`; :mod:`~xfer.pipeline.checkpointing`: :class:`Checkpointing`;
- :mod:`~xfer.pipeline.history`: what a run records;
- :mod:`~xfer.pipeline.preflight`: what is checked before anything changes;
- :mod:`~xfer.pipeline.cache`, :mod:`~xfer.pipeline.rollback`,
  :mod:`~xfer.pipeline.interrupt`: feature caching, the weights kept for a NaN, Ctrl-C at
  step boundaries.

Example:
    >>> from xfer.pipeline import Stage, TransferPipeline, presets
    >>> [s.name for s in presets.keras_guide()]
    ['head', 'finetune']
"""

from xfer.pipeline import presets
from xfer.pipeline.callbacks import Callback, EpochProgress, NaNRollback, NonFiniteLoss, Progress
from xfer.pipeline.checkpointing import Checkpointing, Interrupted
from xfer.pipeline.history import EpochRecord, History, StageRecord
from xfer.pipeline.loop import RanksDiverged, TransferPipeline, evaluate
from xfer.pipeline.stage import Stage, apply_stage, check_stage

__all__ = [
    "Callback",
    "Checkpointing",
    "EpochProgress",
    "EpochRecord",
    "History",
    "Interrupted",
    "NaNRollback",
    "NonFiniteLoss",
    "Progress",
    "RanksDiverged",
    "Stage",
    "StageRecord",
    "TransferPipeline",
    "apply_stage",
    "check_stage",
    "evaluate",
    "presets",
]
