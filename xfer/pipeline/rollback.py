"""The weights to go back to when training diverges, kept on disk rather than in memory.

The pipeline saves the model's weights at the start of every epoch and restores them when
the loss turns NaN or infinite. A copy in memory would be a second copy of the model
through all of training, which the framework's own loop does not hold (on a ResNet-50,
~100 MB); a temporary ``.npz`` file, written one tensor at a time, costs no memory. Where
the file cannot be written (no room, a read-only directory), the copy stays in memory.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any

import numpy as np

from xfer._adapter import find_adapter
from xfer.weights import export_weights, import_weights


class Rollback:
    """Save the weights of ``model`` with :meth:`save`, put them back with :meth:`restore`.

    Example:
        >>> from xfer.pipeline.rollback import Rollback
        >>> with Rollback(model) as rollback:                    # doctest: +SKIP
        ...     rollback.save()
        ...     train_one_epoch(model)
        ...     rollback.restore()
    """

    def __init__(self, model: Any, directory: str | None = None):
        self.model = model
        self.directory = directory
        self.path: str | None = None
        self.in_memory: dict[str, np.ndarray] | None = None

    def save(self) -> None:
        """Keep the current weights (replacing what was kept)."""
        self.in_memory = None
        try:
            if self.path is None:
                fd, self.path = tempfile.mkstemp(
                    prefix="xfer-rollback-", suffix=".npz", dir=self.directory
                )
                os.close(fd)
            # The format of np.savez, written tensor by tensor: np.savez would need them
            # all in memory at once.
            with zipfile.ZipFile(self.path, "w", allowZip64=True) as archive:
                for key, array in find_adapter(self.model).weight_arrays(self.model):
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
        except OSError:
            self.close()
            self.in_memory = export_weights(self.model)

    def restore(self) -> None:
        """Put the kept weights back into the model."""
        if self.in_memory is not None:
            import_weights(self.model, self.in_memory)
            return
        with np.load(self.path, allow_pickle=False) as kept:
            import_weights(self.model, {key: kept[key] for key in kept.files})

    def close(self) -> None:
        """Delete the kept weights."""
        self.in_memory = None
        if self.path is not None:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self) -> Rollback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
