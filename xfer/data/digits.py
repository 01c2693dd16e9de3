"""The embedded default task: handwritten digits, with a real domain shift.

The digits (UCI optical digits, 1797 images of 8x8, shipped in ``xfer/_data``) are split
into a *source* task the model is pretrained on (digits 0-4, as drawn) and a *target* task
it transfers to (digits 5-9, other classes, with the ink inverted and the contrast
changed, and only a few labels). The shift changes the input statistics, which is what BN
policies are about; the new classes make the head start from scratch.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources

import numpy as np

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as channels-last images in [0, 1] of shape (8, 8, 1), and labels.

    Example:
        >>> x, y = digits()
        >>> x.shape, y[:5].tolist()
        ((1797, 8, 8, 1), [0, 1, 2, 3, 4])
    """
    raw = importlib.resources.files("xfer").joinpath("_data/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",")
    x = (table[:, :64] / 16.0).reshape(-1, 8, 8, 1).astype("float32")
    return x, table[:, 64].astype("int64")


@dataclasses.dataclass(frozen=True)
class TransferTask:
    """Source and target data, each channels-last images with labels 0..4."""

    source_train: tuple[np.ndarray, np.ndarray]
    source_val: tuple[np.ndarray, np.ndarray]
    target_train: tuple[np.ndarray, np.ndarray]
    target_val: tuple[np.ndarray, np.ndarray]
    num_classes: int = 5
    in_channels: int = 1


def shift(x: np.ndarray) -> np.ndarray:
    """The target domain's look: inverted ink, lower contrast, a brighter background.

    Example:
        >>> import numpy as np
        >>> print(shift(np.array([0.0, 1.0])))   # background, ink
        [0.9 0.3]
    """
    return (0.9 - 0.6 * x).astype("float32")


def transfer_task(target_per_class: int = 20, seed: int = 0) -> TransferTask:
    """The embedded task: pretrain on digits 0-4, transfer to shifted digits 5-9 with
    ``target_per_class`` labelled images per class (the rest of them validate).

    Example:
        >>> task = transfer_task(target_per_class=10)
        >>> task.target_train[0].shape
        (50, 8, 8, 1)
    """
    if not isinstance(target_per_class, int) or not 1 <= target_per_class <= 150:
        raise ValueError(
            f"target_per_class must be an integer in [1, 150], got {target_per_class!r}."
        )
    x, y = digits()
    rng = np.random.default_rng(seed)
    source = np.flatnonzero(np.isin(y, SOURCE_CLASSES))
    source = rng.permutation(source)
    cut = int(0.8 * len(source))
    train_index, val_index = [], []
    for label in TARGET_CLASSES:
        members = rng.permutation(np.flatnonzero(y == label))
        train_index.extend(members[:target_per_class])
        val_index.extend(members[target_per_class:])
    train_index, val_index = np.array(train_index), np.array(val_index)
    target_label = {c: i for i, c in enumerate(TARGET_CLASSES)}
    relabel = np.vectorize(target_label.get)
    return TransferTask(
        source_train=(x[source[:cut]], y[source[:cut]]),
        source_val=(x[source[cut:]], y[source[cut:]]),
        target_train=(shift(x[train_index]), relabel(y[train_index]).astype("int64")),
        target_val=(shift(x[val_index]), relabel(y[val_index]).astype("int64")),
    )
