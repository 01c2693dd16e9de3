"""Feature caching: a frozen prefix pinned to inference is a pure function of its input, so
a stage that trains only what comes after it computes the prefix's outputs once and trains
the rest on them, instead of running the prefix again every epoch.

When a stage caches (``TransferPipeline(cache="auto")``, the default):

- the model is a chain of top-level children (``head(base(x))``: xfer's models, a
  ``Sequential``, a Keras functional model without branches; see ``Adapter.chain``), and the
  last child is the only one with anything that trains;
- every unit before it is frozen and behaves the same in training and inference (pinned to
  ``"inference"``, or a layer without a mode, like a conv), so its outputs in training are
  exactly its outputs in inference;
- the training data are numpy arrays, which xfer batches itself (an iterable of batches
  may change between epochs, with augmentation say, so it is not cached);
- for a user's class that declares its chain (``xfer_chain = ("base", "head")``), the
  model's own output equals the last child applied to the cached features, checked on a few
  training images (a forward that does more than the chain is not cached). xfer's models,
  ``Sequential`` and functional models are chains by construction.

The features live in memory up to ``cache_memory`` bytes, then in a temporary file on disk
(``cache_dir``); when the disk has no room either, the stage trains without a cache. The
batches are the same as without a cache (same seeded order), so the trained weights are
the uncached run's up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from xfer import data as D
from xfer._adapter import Adapter, Unit

CACHE_SETTINGS = ("auto", "off")
DEFAULT_MEMORY = 1 << 30  # bytes of features kept in memory before spilling to disk
_BATCHES_PER_CALL = 8  # batches of features computed per call to the prefix


@dataclasses.dataclass
class Features:
    """The cached outputs of a stage's frozen prefix, and the part of the model that trains.

    Attributes:
        suffix: the native child that trains on the features (the model's last child).
        suffix_path: its unit path; learning-rate groups are made relative to it.
        train, val: ``(features, labels)``; ``val`` is ``None`` when it is not cached.
        where: ``"memory"`` or ``"disk"``.
    """

    suffix: Any
    suffix_path: str
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray] | None
    where: str
    nbytes: int
    directory: str | None = None

    def describe(self) -> str:
        return f"{self.where} ({_size(self.nbytes)})"

    def relative(self, groups: list[tuple[list[str], float]]) -> list[tuple[list[str], float]]:
        """Learning-rate groups of unit paths, as paths inside the suffix."""
        prefix = f"{self.suffix_path}."
        out = []
        for paths, lr in groups:
            inside = [
                "" if p == self.suffix_path else p[len(prefix) :]
                for p in paths
                if p == self.suffix_path or p.startswith(prefix)
            ]
            if inside:
                out.append((inside, lr))
        return out

    def close(self) -> None:
        """Drop the features (and their file on disk)."""
        self.train = self.val = None  # type: ignore[assignment]
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def prepare(
    adapter: Adapter,
    model: Any,
    train: D.Data,
    val: D.Data | None,
    *,
    setting: str = "auto",
    memory: int = DEFAULT_MEMORY,
    directory: str | None = None,
    batch_size: int = D.PREDICT_CHUNK,
    progress: Callable[[str], None] | None = None,
    stage: str = "",
) -> tuple[Features | None, str]:
    """Cache the frozen prefix's outputs for the model's current state, when it can be.

    The prefix runs on ``batch_size`` images at a time: with the training batch size, the
    pass needs no more memory for activations than one training step's forward.
    Returns the features (or ``None``) and a line for the history: where they are, or why
    the stage trains without a cache.

    Example:
        >>> from xfer.pipeline import cache
        >>> features, note = cache.prepare(adapter, model, (x, y), None)   # doctest: +SKIP
        >>> note                                                           # doctest: +SKIP
        'memory (40.0 KiB)'
    """
    if setting == "off":
        return None, "off"
    split = _split(adapter, model, train)
    if isinstance(split, str):
        return None, f"off: {split}"
    prefix, suffix, suffix_path = split
    x, y = train
    # The pass's first batch, which also sizes the cache: probes of the training batch's
    # shape fill no shape-keyed cache of the framework (oneDNN's primitives on the CPU, about
    # 1 MiB a shape; cuDNN's plans; XLA's programs) that the stage's steps do not fill anyway.
    first = _forward(adapter, prefix, x[:batch_size], batch_size)
    if _declared(model) and not np.allclose(
        adapter.predict(suffix, first, batch_size=batch_size),
        adapter.predict(model, x[:batch_size], batch_size=batch_size),
        rtol=1e-4,
        atol=1e-5,
    ):
        return None, (
            f"off: the model's output is not {suffix_path!r} applied to the output of the "
            "children before it, so its forward does more than the chain"
        )
    arrays = [("train", train)] + ([("val", val)] if val is not None and D.is_arrays(val) else [])
    per_image = int(np.prod(first.shape[1:])) * 4
    nbytes = sum(len(data[0]) for _, data in arrays) * per_image
    where, folder = "memory", None
    if nbytes > memory:
        folder = tempfile.mkdtemp(prefix="xfer-features-", dir=directory)
        free = shutil.disk_usage(folder).free
        if free < nbytes * 1.05:
            shutil.rmtree(folder, ignore_errors=True)
            return None, (
                f"off: the features need {_size(nbytes)}, more than cache_memory "
                f"({_size(memory)}) and the free disk in {os.path.dirname(folder)} ({_size(free)})"
            )
        where = "disk"
    if progress is not None:
        images = sum(len(data[0]) for _, data in arrays)
        progress(f"{stage}: caching the features of {images:,} images ({_size(nbytes)}, {where})")
    cached = {}
    try:
        for name, (images, labels) in arrays:
            shape = (len(images), *first.shape[1:])
            if folder is None:
                out = np.empty(shape, "float32")
            else:
                out = np.lib.format.open_memmap(
                    os.path.join(folder, f"{name}.npy"), "w+", "float32", shape
                )
            done = 0
            if name == "train":
                out[: len(first)], done = first, len(first)
            # A few batches per call: fewer calls, each with its own overhead (converting,
            # walking a Flax module graph), and little memory for their outputs.
            rows = _BATCHES_PER_CALL * batch_size
            for i in range(done, len(images), rows):
                out[i : i + rows] = _forward(adapter, prefix, images[i : i + rows], batch_size)
            cached[name] = (out, labels)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    features = Features(
        suffix, suffix_path, cached["train"], cached.get("val"), where, nbytes, folder
    )
    return features, features.describe()


def _split(adapter: Adapter, model: Any, train: D.Data) -> tuple[list, Any, str] | str:
    """(prefix children, last child, its path), or why the model cannot be split."""
    if not D.is_arrays(train):
        return "the training data is an iterable of batches, which may change between epochs"
    chain = adapter.chain(model)
    if not chain or len(chain) < 2:
        return (
            "the model is not a chain of top-level children that xfer can split (xfer's "
            "models, a Sequential, a functional model without branches)"
        )
    units = adapter.units(model)
    path_of = {id(u.native): u.path for u in units if u.depth == 1}
    if not all(id(child) in path_of for child in chain):
        return "a top-level child of the model is not a unit xfer can see"
    paths = [path_of[id(child)] for child in chain]
    for unit in units:
        top = unit.segments[0] if unit.segments else ""
        if top not in paths[:-1]:
            continue
        reason = _not_constant(adapter, unit)
        if reason:
            return f"{unit.path!r} {reason}, so {top!r} is not a fixed function of the input"
    return chain[:-1], chain[-1], paths[-1]


def _declared(model: Any) -> bool:
    """The chain is the user's claim (a class attribute), not the model's structure."""
    cls = type(model)
    return hasattr(cls, "xfer_chain") and not cls.__module__.startswith("xfer.")


def _not_constant(adapter: Adapter, unit: Unit) -> str | None:
    if adapter.param_counts(unit)[0]:
        return "trains"
    if adapter.get_mode(unit) == "inference" or adapter.mode_free(unit):
        return None
    return f"behaves differently in training (mode {adapter.get_mode(unit)!r})"


def _forward(adapter: Adapter, prefix: list, x: np.ndarray, batch_size: int) -> np.ndarray:
    for child in prefix:
        x = adapter.predict(child, x, batch_size=batch_size)
    return np.asarray(x, "float32")


def _size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    exponent = min(int(math.log(nbytes, 1024)), 4)
    return f"{nbytes / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exponent]}"
