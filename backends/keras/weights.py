"""Keras 3 weights: every variable as numpy, in Keras's layout and the neutral one, and
what ``.keras`` files keep; the ``Weights`` members.

Keras's own names and layouts are the neutral ones (channels-last, conv kernels
``(*spatial, in, out)``, dense kernels ``(in, out)``), so the neutral conversion is the
identity. DepthwiseConv's ``(*k, in, multiplier)`` kernel stays Keras's too: the other
frameworks store a depthwise conv as a grouped one, ``(*k, 1, in * multiplier)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np

from xfer.backends.keras.units import own_variables, units


def owners(model) -> list[tuple[str, object]]:
    """(unit path, layer) of every layer that can own variables, the root included (path
    ``""``) even when it is no unit."""
    found = [(u.path, u.native) for u in units(model)]
    return found if any(path == "" for path, _ in found) else [("", model), *found]


def _key(path: str, variable) -> str:
    return f"{path}.{variable.name}" if path else variable.name


def neutral_variables(model) -> Iterator[tuple[str, object]]:
    """(neutral name, variable) of every variable of the model, a tied one once."""
    seen = set()
    for path, layer in owners(model):
        for v in own_variables(layer):
            if id(v) not in seen:
                seen.add(id(v))
                yield _key(path, v), v


def tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    for path, layer in owners(model):
        for v in own_variables(layer):
            yield _key(path, v), keras.ops.convert_to_numpy(v.value)


def weight_arrays(model) -> Iterator[tuple[str, np.ndarray]]:
    for key, v in neutral_variables(model):
        yield key, keras.ops.convert_to_numpy(v.value)


def assign_weights(model, weights: dict[str, np.ndarray]) -> None:
    # v.assign keeps the variable object, its trainable flag and its device.
    for key, v in list(neutral_variables(model)):
        v.assign(weights[key])


def persistence() -> str:
    return (
        ".keras keeps each layer's `trainable` (so BN 'frozen' survives natively, for "
        "layers the config records: functional/Sequential ones and sublayers a custom "
        "layer serializes in get_config) but not the mode pins of other layers nor "
        "trainable gamma/beta under a BN pinned to inference; save "
        "xfer.export_state(model) beside it and re-apply it with xfer.import_state."
    )
