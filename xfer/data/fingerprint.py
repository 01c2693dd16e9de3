"""A fingerprint of training data: what a checkpoint compares to tell the same data from other.

The digest covers every array's shape, dtype and values (in C order, native byte order,
so a transposed copy or a big-endian array with the same values gives the same digest),
and, for an iterable of batches, every batch in order: xfer shuffles numpy arrays itself
but trains on batches as they come, so ``(x, y)`` and ``[(x, y)]`` are different data.

Nothing here imports a framework.
"""

from __future__ import annotations

import hashlib
from typing import Any

from xfer.data.batching import is_arrays
from xfer.files import canonical_array


def data_fingerprint(data: Any) -> str:
    """The digest of ``data``, numpy ``(x, y)`` or an iterable of ``(x, y)`` batches.

    Example:
        >>> import numpy as np
        >>> from xfer.data import data_fingerprint
        >>> x, y = np.zeros((4, 2, 2, 1), "float32"), np.arange(4)
        >>> data_fingerprint((x, y)) == data_fingerprint((x.copy(), y.copy()))
        True
        >>> data_fingerprint((x, y)) == data_fingerprint([(x, y)])
        False
    """
    digest = hashlib.sha256()
    digest.update(b"arrays" if is_arrays(data) else b"batches")
    for batch in [data] if is_arrays(data) else data:
        for array in batch:
            array = canonical_array(array)
            digest.update(f"|{array.dtype.str}{array.shape}|".encode())
            digest.update(array)  # C-contiguous: hashed in place, without a copy
    return f"sha256:{digest.hexdigest()}"
