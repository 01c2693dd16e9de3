"""Neutral weights: every parameter and BN statistic in one layout that all backends share.

A weights dict maps ``"{unit path}.{role}"`` (a root-level variable: just the role) to a
numpy array. Roles are named as Keras names them (``kernel``, ``bias``, ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``, ``scale``, ``embeddings``) and arrays are laid out
channels-last: conv kernels ``(*spatial, in, out)`` (HWIO), dense kernels ``(in, out)``.
A variable the adapter leaves in its native layout keeps its native name, so a canonical
name always means the canonical layout. Each adapter converts to and from its own layout;
this module validates, casts and keeps files; it imports no framework.

The neutral layer validates everything against the model's own export before the adapter
assigns anything, so bad input leaves the model unchanged; xfer's state (frozen flags, mode
pins, Flax ``Frozen`` variable types) is never touched, only values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from xfer._adapter import Adapter, find_adapter
from xfer._checks import all_finite
from xfer.files import write_arrays

FORMAT = "xfer-neutral-weights/1"
_SHOWN = 5  # offending names listed per kind of problem; the counts say how many in all


def export_weights(model: Any) -> dict[str, np.ndarray]:
    """Every parameter and BN moving statistic of ``model`` in the canonical neutral layout.

    Keys are ``"{unit path}.{role}"`` with Keras's role names; conv kernels are HWIO (1-D:
    WIO, 3-D: DHWIO), dense kernels ``(in, out)``. The arrays are numpy copies. PyTorch's
    ``num_batches_tracked`` is left out, as the other frameworks have no such counter.

    Example:
        >>> import xfer
        >>> weights = xfer.export_weights(torch_model)               # doctest: +SKIP
        >>> weights["base.block1.conv.kernel"].shape                 # doctest: +SKIP
        (3, 3, 3, 8)
        >>> xfer.import_weights(flax_model, weights)                 # doctest: +SKIP
    """
    return {k: np.array(a, copy=True) for k, a in find_adapter(model).weight_arrays(model)}


def import_weights(model: Any, weights: Mapping[str, Any]) -> None:
    """Load neutral weights (from :func:`export_weights`, of any backend) into ``model``.

    Values only: trainable flags, mode pins and Flax ``Frozen`` variable types stay as they
    are. Names and shapes must match the model's own export exactly; arrays are cast to the
    model's dtypes. Anything wrong raises before a single value is assigned, so the model is
    left unchanged.

    Raises:
        TypeError: ``weights`` is not a mapping of names to arrays.
        ValueError: names missing, names unexpected or shapes different (all listed at
            once); or values that would wreck training: NaN or inf, values that overflow
            the model's dtype (float64 1e300 into float32), negative BN moving variances.

    Example:
        >>> import xfer
        >>> weights = xfer.export_weights(pretrained)                # doctest: +SKIP
        >>> xfer.import_weights(model, weights)                      # doctest: +SKIP
    """
    _import(model, weights, "import_weights", "the weights")


def save_weights(model: Any, path: str | os.PathLike) -> str:
    """Write :func:`export_weights` of ``model`` to a safetensors file at ``path``; return
    the file's digest (``"sha256:..."``, for :func:`xfer.files.verify_digest`).

    The file records the format (``xfer-neutral-weights/1``), the backend and xfer's version.
    The write goes through :func:`xfer.files.write_arrays`: atomic and fsynced (a failure
    leaves no partial file and an existing file untouched), every array C-contiguous first.

    Example:
        >>> import xfer
        >>> xfer.save_weights(model, "small_cnn.safetensors")       # doctest: +SKIP
        'sha256:...'
    """
    from xfer import __version__

    adapter = find_adapter(model)
    metadata = {"format": FORMAT, "backend": adapter.name, "xfer_version": __version__}
    return write_arrays(path, dict(adapter.weight_arrays(model)), metadata)


def load_weights(model: Any, path: str | os.PathLike) -> None:
    """Load a file written by :func:`save_weights` (on any backend) into ``model``.

    Validated as :func:`import_weights` validates: on any mismatch the model is unchanged.
    The format, names and shapes are checked from the file's header before any tensor is
    read, so a foreign or mismatched file of any size is refused at once.

    Raises:
        ValueError: the file is not a safetensors file, or not one written by xfer, or its
            weights do not fit the model.

    Example:
        >>> import xfer
        >>> xfer.load_weights(model, "small_cnn.safetensors")       # doctest: +SKIP
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_weights: no file at {path!r}.")
    # The header first (format, names, shapes): a foreign or mismatched file is refused
    # before a single tensor is read, whatever its size.
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:
        raise ValueError(
            f"load_weights: {path!r} is not a safetensors file ({error}). "
            "Expected a file written by xfer.save_weights."
        ) from None
    _check_format(path, metadata)
    source = f"the weights in {path!r} (saved from {metadata.get('backend', '?')})"
    adapter = find_adapter(model)
    current = dict(adapter.weight_arrays(model))  # views: only shapes are read here
    _refuse(adapter, model, "load_weights", source, _layout(current, shapes))
    del current
    try:
        with safe_open(path, framework="np") as f:
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise ValueError(
            f"load_weights: the tensors of {path!r} cannot be read ({error}). "
            "Expected a file written by xfer.save_weights."
        ) from None
    _import(model, weights, "load_weights", source)


def _check_format(path: str, metadata: dict) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"load_weights: {path!r} is a safetensors file but not xfer neutral weights "
            f"(its metadata format is {metadata.get('format')!r}, expected {FORMAT!r}). "
            "Write it with xfer.save_weights, or load a dict with xfer.import_weights after "
            "renaming and transposing its arrays to the neutral layout."
        )


def _import(model: Any, weights: Mapping[str, Any], op: str, source: str) -> None:
    adapter = find_adapter(model)
    current = export_weights(model)
    prepared = _validate(adapter, model, current, weights, op, source)
    try:
        adapter.assign_weights(model, prepared)
    except BaseException:
        # Validation makes this unlikely (a device error, an interrupt); put back what was
        # there so that no half-applied state is left.
        adapter.assign_weights(model, current)
        raise


def _validate(
    adapter: Adapter,
    model: Any,
    current: dict[str, np.ndarray],
    weights: Mapping[str, Any],
    op: str,
    source: str,
) -> dict[str, np.ndarray]:
    """The weights as numpy arrays of the model's dtypes, or the error that lists every problem."""
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"{op}: expected a dict of name -> numpy array (as xfer.export_weights returns), "
            f"got {type(weights).__name__}."
        )
    bad_keys = [k for k in weights if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"{op}: names must be strings, got {_listed(map(repr, bad_keys))}.")
    arrays, not_arrays = {}, []
    for key, value in weights.items():
        array = _as_array(value)
        if array is None:
            not_arrays.append(f"{key} ({type(value).__name__})")
        else:
            arrays[key] = array
    if not_arrays:
        raise TypeError(
            f"{op}: every value must be an array (numpy, jax, or a detached torch tensor); "
            f"not arrays ({len(not_arrays)}): {_listed(not_arrays)}."
        )
    if not current and arrays:
        raise ValueError(
            f"{op}: this {type(model).__name__} ({adapter.name}) has no weights yet to load "
            "into. Build it first: Keras model.build(input_shape) or one call on a batch; "
            "PyTorch lazy modules, one forward pass."
        )
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    wrong_dtype = [
        f"{k} ({arrays[k].dtype})"
        for k in current
        if k in arrays and not _castable(arrays[k].dtype, current[k].dtype)
    ]
    _refuse(
        adapter,
        model,
        op,
        source,
        [*_layout(current, shapes), ("non-numeric arrays", wrong_dtype, ", ")],
    )
    prepared = {k: _cast(arrays[k], current[k].dtype) for k in current}
    _refuse_values(adapter, model, op, source, arrays, prepared)
    return prepared


def _layout(current: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> list:
    """(what, offending names, separator) for names missing, unexpected and of the wrong shape."""
    missing = [k for k in current if k not in shapes]
    unexpected = [k for k in shapes if k not in current]
    wrong_shape = [
        f"{k}: expected {tuple(current[k].shape)}, got {tuple(shapes[k])}"
        for k in current
        if k in shapes and tuple(shapes[k]) != tuple(current[k].shape)
    ]
    return [
        ("missing names", missing, ", "),
        ("unexpected names", unexpected, ", "),
        ("shape mismatches", wrong_shape, "; "),
    ]


def _refuse(adapter: Adapter, model: Any, op: str, source: str, problems: list) -> None:
    listed = [
        f"\n  {what} ({len(names)}): {_listed(names, sep)}"
        for what, names, sep in problems
        if names
    ]
    if listed:
        raise ValueError(
            f"{op}: {source} do not fit this {type(model).__name__} ({adapter.name}); "
            f"the model was left unchanged.{''.join(listed)}\n"
            "Neutral weights load into the same architecture they were exported from (same "
            "layers, widths and number of classes): export them with xfer.export_weights or "
            "xfer.save_weights from the same reference model, built with the same arguments."
        )


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by name instead
        return array.astype(dtype, copy=False)


def _refuse_values(
    adapter: Adapter,
    model: Any,
    op: str,
    source: str,
    given: Mapping[str, np.ndarray],
    prepared: Mapping[str, np.ndarray],
) -> None:
    """Refuse values that would load fine and then wreck training, where the loss curve
    would blame the learning rate: NaN/inf, finite values that overflow the model's dtype,
    and negative BN moving variances (the square root of one is NaN)."""
    non_finite = [k for k in prepared if not all_finite(given[k])]
    overflow = [k for k in prepared if k not in non_finite and not all_finite(prepared[k])]
    negative = [
        k
        for k in prepared
        if k.rsplit(".", 1)[-1] in _VARIANCES
        and all_finite(prepared[k])
        and (prepared[k] < 0).any()
    ]
    if non_finite or overflow or negative:
        dtypes = sorted({str(prepared[k].dtype) for k in overflow})
        problems = [
            ("NaN or infinite values", non_finite),
            (f"values too large for {', '.join(dtypes)}", overflow),
            ("negative moving variances", negative),
        ]
        listed = "".join(
            f"\n  {what} ({len(names)}): {_listed(names)}" for what, names in problems if names
        )
        raise ValueError(
            f"{op}: {source} hold values this {type(model).__name__} ({adapter.name}) must "
            f"not train from; the model was left unchanged.{listed}\n"
            "Fix or re-export the source weights: a NaN, an overflow to inf or a negative "
            "variance would show up later as a diverging loss, not as a loading error."
        )


_VARIANCES = ("moving_variance", "running_var")


def _as_array(value: Any) -> np.ndarray | None:
    # Only real arrays: a list or a float would be silently broadcast or reshaped.
    if not isinstance(value, np.ndarray) and not (
        hasattr(value, "__array__") and hasattr(value, "shape")
    ):
        return None
    try:
        return np.asarray(value)
    except Exception:  # e.g. a torch tensor that requires grad
        return None


def _castable(got: np.dtype, want: np.dtype) -> bool:
    return got == want or (got.kind in "biuf" and (want.kind in "biuf" or want.kind == "V"))


def _listed(names, sep: str = ", ") -> str:
    names = list(names)
    shown = sep.join(names[:_SHOWN])
    return shown + (f"{sep}... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")
