"""Data for the pipeline: numpy in, xfer's own seeded batch order, checks before training.

xfer shuffles numpy data itself, with a generator seeded by (seed, stage, epoch), so every
backend sees the same batches in the same order: that is what makes loss curves comparable
across frameworks. ``xfer.data`` re-exports every name of this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from xfer._checks import all_finite

Batches = Iterable[tuple[np.ndarray, np.ndarray]]
Data = tuple[np.ndarray, np.ndarray] | Batches


def is_arrays(data: object) -> bool:
    """Whether ``data`` is numpy ``(x, y)`` (which xfer batches and shuffles itself), not an
    iterable of batches.

    Example:
        >>> import numpy as np
        >>> x, y = np.zeros((4, 2, 2, 1)), np.arange(4)
        >>> is_arrays((x, y)), is_arrays([(x, y)])
        (True, False)
    """
    return (
        isinstance(data, tuple) and len(data) == 2 and all(isinstance(a, np.ndarray) for a in data)
    )


def first_images(data: Data, *, name: str) -> np.ndarray:
    """The images of the first batch, after checking that ``data`` is data xfer can use.

    Raises:
        TypeError: ``data`` is neither numpy ``(x, y)`` nor an iterable of batches (an
            iterator, used up after one epoch, is refused too).
        ValueError: the iterable of batches is empty.

    Example:
        >>> import numpy as np
        >>> first_images([(np.zeros((2, 8, 8, 1)), np.arange(2))], name="train").shape
        (2, 8, 8, 1)
    """
    if is_arrays(data):
        return data[0]
    if isinstance(data, Iterable) and not isinstance(data, (tuple, np.ndarray, str, bytes)):
        if iter(data) is data:
            raise TypeError(
                f"{name}: got an iterator, which would be used up after one epoch. Pass a "
                "list of (x, y) batches, or numpy arrays (x, y) for xfer to batch and shuffle."
            )
        for x, _ in data:
            return np.asarray(x)
        raise ValueError(f"{name}: the iterable of batches is empty.")
    raise TypeError(
        f"{name}: expected numpy arrays (x, y) or an iterable of (x, y) numpy batches, got "
        f"{type(data).__name__}."
    )


def check(data: Data, *, name: str, num_classes: int, in_channels: int) -> None:
    """Refuse, before any training, data whose shapes or labels do not fit the model.

    Example:
        >>> import numpy as np
        >>> check((np.zeros((4, 8, 8, 3), "float32"), np.array([0, 1, 2, 3])),
        ...       name="train", num_classes=4, in_channels=3)
    """
    first_images(data, name=name)
    examples = 0
    for x, y in [data] if is_arrays(data) else data:
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind not in "biuf":
            # Checked first: isfinite on object arrays is a raw numpy TypeError.
            raise TypeError(
                f"{name}: images must be numbers (float32, or integers such as uint8 pixels), "
                f"got {x.dtype} arrays. Convert them first, e.g. np.asarray(images, 'float32')."
            )
        examples += len(x)
        if x.ndim != 4 or x.shape[-1] != in_channels:
            raise ValueError(
                f"{name}: images must be (batch, height, width, {in_channels}) channels-last, "
                f"got shape {x.shape}. Transpose NCHW data with x.transpose(0, 2, 3, 1)."
            )
        if not all_finite(x):  # no boolean temporary the size of the data set
            raise ValueError(
                f"{name}: {int(np.size(x) - np.isfinite(x).sum())} image values are NaN or "
                "infinite. Clean or drop those images (on the JAX backends a NaN can slip "
                "through ReLU unseen and poison the BN statistics)."
            )
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{name}: labels must be integers of shape ({len(x)},), got {y.dtype} {y.shape}."
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name}: labels must lie in [0, {num_classes}) for this model's "
                f"{num_classes} outputs, got values from {y.min()} to {y.max()}."
            )
    if not examples:
        raise ValueError(
            f"{name}: no examples (every batch is empty). Pass at least one image and label."
        )


def batches(
    data: Data, batch_size: int, seed: tuple[int, ...]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of one epoch: numpy data shuffled by ``seed``, an iterable as it comes.

    Example:
        >>> import numpy as np
        >>> x, y = np.zeros((5, 2, 2, 1), "float32"), np.arange(5)
        >>> [len(b[1]) for b in batches((x, y), 2, seed=(0, 0, 0))]
        [2, 3]
    """
    if not is_arrays(data):
        yield from data
        return
    x, y = data
    for index in batch_indices(len(x), batch_size, seed):
        yield x[index], y[index]


def batch_indices(n: int, batch_size: int, seed: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The indices of each batch of one epoch of ``n`` examples, shuffled by ``seed``.

    A last batch of a single example is merged into the batch before it: BatchNorm in
    training mode cannot normalise one example (PyTorch raises for ``BatchNorm1d``, and a
    variance of zero makes any BN's output meaningless), so the step would fail, or
    learn nothing, after the epoch's other batches had trained. Merging keeps every
    example in every epoch, and the larger batch has the same shape every epoch (one
    more compilation on JAX, once).

    Example:
        >>> [i.tolist() for i in batch_indices(3, 2, seed=(0, 0, 0))]
        [[2, 0, 1]]
        >>> [len(i) for i in batch_indices(7, 3, seed=(0, 0, 0))]
        [3, 4]
    """
    order = np.random.default_rng(list(seed)).permutation(n)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]


PREDICT_CHUNK = 256


def inference_chunks(
    x: np.ndarray, *, pad: bool, size: int = PREDICT_CHUNK
) -> Iterator[tuple[np.ndarray, int]]:
    """``x`` in chunks of ``size`` images for a forward pass in inference mode, each with its
    number of real images. ``pad``: the last chunk is zero-padded to full size, so a
    compiled (JAX) forward sees one shape and compiles once; in inference mode every image
    is computed on its own, so the padding changes no real output.

    Example:
        >>> import numpy as np
        >>> [(c.shape[0], n) for c, n in inference_chunks(np.zeros((300, 1)), pad=True)]
        [(256, 256), (256, 44)]
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive int (images per forward), got {size!r}.")
    x = np.asarray(x, "float32")
    for i in range(0, len(x), size):
        chunk = x[i : i + size]
        n = len(chunk)
        if pad and n < size:
            chunk = np.concatenate([chunk, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        yield chunk, n


def arrays(data: Data) -> tuple[np.ndarray, np.ndarray]:
    """All of ``data`` as two arrays (for evaluation).

    Example:
        >>> import numpy as np
        >>> batch = (np.zeros((2, 8, 8, 1)), np.arange(2))
        >>> [a.shape for a in arrays([batch, batch])]
        [(4, 8, 8, 1), (4,)]
    """
    if is_arrays(data):
        return data
    xs, ys = zip(*data, strict=True)
    return np.concatenate(xs), np.concatenate(ys)
