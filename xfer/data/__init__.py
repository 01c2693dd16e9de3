"""Data for xfer: the embedded data sets, and what the pipeline does with numpy data.

- :mod:`xfer.data.batching`: numpy in, xfer's own seeded batch order, checks before
  training, forward passes in chunks (what the pipeline and every backend use);
- :mod:`xfer.data.digits`: the embedded handwritten digits and the default transfer task
  of ``xfer run`` and ``xfer compare`` (a real domain shift);
- :mod:`xfer.data.stripes`: the synthetic task of ``xfer demo``;
- :mod:`xfer.data.fingerprint`: the digest of training data a checkpoint compares.

Nothing here imports a framework.

Example:
    >>> import numpy as np
    >>> from xfer.data import batch_indices, is_arrays
    >>> is_arrays((np.zeros((3, 2, 2, 1)), np.arange(3)))
    True
    >>> [len(i) for i in batch_indices(5, 2, seed=(0,))]
    [2, 3]
"""

from xfer.data.batching import (
    PREDICT_CHUNK,
    Batches,
    Data,
    arrays,
    batch_indices,
    batches,
    check,
    first_images,
    inference_chunks,
    is_arrays,
)
from xfer.data.fingerprint import data_fingerprint

__all__ = [
    "PREDICT_CHUNK",
    "Batches",
    "Data",
    "arrays",
    "batch_indices",
    "batches",
    "check",
    "data_fingerprint",
    "first_images",
    "inference_chunks",
    "is_arrays",
]
