"""``xfer.recalibrate_bn``: population BatchNorm statistics on new data (PreciseBN, AdaBN)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from xfer import select as S
from xfer._adapter import Unit
from xfer.state import SelectionError, resolve


def recalibrate_bn(
    model: Any,
    data: Any,
    *,
    num_batches: int | None = None,
    where: S.Selector | None = None,
    batch_size: int = 32,
) -> int:
    """Re-estimate the moving statistics of the selected BatchNorm units on ``data``.

    The estimate is the *population* statistic: the equal-weight average over the batches of
    each BN's per-batch mean and variance (PreciseBN, fvcore's ``update_bn_stats``), not an
    exponential moving average, which weights the last batches most and depends on the
    momentum; the variance is each framework's own convention (torch stores the unbiased
    batch variance, Keras and Flax the biased one). Each batch runs through the model in
    inference mode, except that the selected BNs normalise with the batch's statistics (as
    they would while training), so a later BN sees what it would see in training.

    Only the selected units' moving statistics change: every parameter, every other BN's
    statistics, every pin and BN policy are the same afterwards, also for a BN that xfer
    pinned to inference (on which ``torch.optim.swa_utils.update_bn`` resets the
    statistics and never re-estimates them). An error part-way leaves the statistics as
    they were.

    Args:
        model: a torch, Keras or Flax NNX model.
        data: channels-last images (an array, split into ``batch_size`` batches, the last
            one merged into the one before if it would hold one image), ``(x, y)``
            (labels ignored), or an iterable of image batches or ``(x, y)`` batches.
        num_batches: use at most this many batches (``None``: all of them).
        where: the BN units to recalibrate (default ``S.bn()``, every BatchNorm).
        batch_size: for array data; at least 2 (one image has no variance).

    Returns:
        The number of batches averaged.

    Example:
        >>> import numpy as np, xfer
        >>> model = xfer.models.small_cnn(4, 3, seed=0, backend="torch")
        >>> images = np.random.default_rng(0).normal(2.0, 1.0, (64, 16, 16, 3)).astype("float32")
        >>> xfer.recalibrate_bn(model, images, batch_size=16)
        4
        >>> bool(model.base.block1.bn.running_mean.abs().max() > 0.1)   # moved to the new data
        True
    """
    for name, value, least in (("batch_size", batch_size, 2), ("num_batches", num_batches, 1)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise ValueError(
                f"recalibrate_bn: {name} must be an integer >= {least}, got {value!r}."
            )
    where = S.bn() if where is None else where
    adapter, _, units = resolve(model, where)
    not_bn = [u.path for u in units if not u.is_bn]
    if not_bn:
        raise SelectionError(
            f"recalibrate_bn: {where!r} selects units that are not BatchNorm ({', '.join(not_bn[:4])}). "
            "Select BatchNorm units only, e.g. S.bn() & S.path('base.**')."
        )
    before = _statistics(adapter, model, units)
    sums: dict[str, list[np.ndarray]] = {}
    count = 0
    try:
        for x in _image_batches(data, batch_size):
            if num_batches is not None and count >= num_batches:
                break
            if len(x) < 2:
                raise ValueError(
                    f"recalibrate_bn: batch {count} holds {len(x)} image; BatchNorm statistics "
                    "need at least 2 per batch. Use larger batches."
                )
            for path, (mean, var) in adapter.batch_statistics(model, units, x).items():
                if path in sums:
                    sums[path][0] += mean
                    sums[path][1] += var
                else:
                    sums[path] = [mean.astype(np.float64), var.astype(np.float64)]
            count += 1
        if not count:
            raise ValueError("recalibrate_bn: `data` gave no batch. Pass at least 2 images.")
    except BaseException:
        adapter.assign_statistics(model, units, before)
        raise
    adapter.assign_statistics(
        model, units, {path: (mean / count, var / count) for path, (mean, var) in sums.items()}
    )
    return count


def statistics_keys(units: list[Unit]) -> list[str]:
    """The ``Weights.tensors`` keys of the BN units' moving mean and variance (what
    :func:`recalibrate_bn` re-estimates), in ``units``' order.

    Example:
        >>> import xfer
        >>> from xfer._adapter import find_adapter
        >>> model = xfer.models.small_cnn(4, 3, seed=0, backend="torch")
        >>> statistics_keys([u for u in find_adapter(model).units(model) if u.is_bn])[:2]
        ['base.block1.bn.running_mean', 'base.block1.bn.running_var']
    """
    return [_key(u, name) for u in units if u.is_bn for name in u.stats[:2]]


def _key(unit: Unit, name: str) -> str:
    return f"{unit.path}.{name}" if unit.path else name


def _statistics(adapter, model, units) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Each unit's moving mean and variance (Unit.stats names them in that order), copied.
    native = dict(adapter.tensors(model))
    return {
        u.path: tuple(np.array(native[_key(u, name)], dtype=np.float64) for name in u.stats[:2])
        for u in units
    }


def _image_batches(data: Any, batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], (int, float)):
        data = data[0]
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        x = np.asarray(data)
        starts = list(range(0, len(x), batch_size))
        if len(starts) > 1 and len(x) - starts[-1] < 2:
            starts.pop()
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(x)
            yield x[start:end]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"recalibrate_bn: data must be an array of images, (x, y) or an iterable of "
            f"batches, got a {type(data).__name__}."
        )
    for batch in data:
        yield np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch)
