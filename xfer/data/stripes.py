"""The synthetic task of ``xfer demo``: noisy stripes, with a shifted target domain.

Four classes (the stripes' direction) on small colour images; the target domain is the
same task under a real shift of the input statistics, which is what BN policies are about.
Made on the spot from a seed: nothing is shipped or downloaded.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 4
SIZE = 12


def stripes_task(n: int, domain: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images of stripes; the label is their direction (—, |, \\, /).

    The ``"target"`` domain is inverted and re-contrasted per channel: the same task under
    a real shift of the input statistics, which is what BN policies are about.

    Example:
        >>> x, y = stripes_task(8, "source", seed=0)
        >>> x.shape, y.shape
        ((8, 12, 12, 3), (8,))
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    # Direction of each class as a projection: rows, cols, rows+cols, rows-cols.
    projections = np.stack([rows, cols, rows + cols, rows - cols])
    phase = rng.integers(0, 4, size=n)
    stripes = ((projections[y] + phase[:, None, None]) % 4 < 2).astype("float64")
    x = stripes[..., None] + rng.normal(0.0, 1.2, size=(n, SIZE, SIZE, 3))
    if domain == "target":
        x = 2.0 - x * np.array([1.6, 0.4, 1.0])
    return x.astype("float32"), y.astype("int64")
