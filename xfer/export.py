"""``xfer.export_onnx``: a fine-tuned model as an ONNX file, BN folded, checked by onnxruntime."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from xfer._adapter import find_adapter
from xfer.files import write_atomic
from xfer.folding import fold_bn


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    tolerance: float = 1e-5,
) -> Path:
    """Write ``model``'s inference computation to the ONNX file ``path``, checked by onnxruntime.

    BatchNorm is folded first (:func:`xfer.fold_bn`: a BN pinned to "train" is refused, one
    that cannot fold stays an ONNX ``BatchNormalization``, with a warning). The exporter is
    the framework's own: ``torch.onnx.export`` (the dynamo exporter), Keras's
    ``model.export(path, format="onnx")`` (jax2onnx on the jax engine, torch.onnx on the
    torch engine), ``jax2onnx.to_onnx`` for Flax NNX. Before the file takes its name,
    onnxruntime runs it on a random batch and its outputs must match the model's own
    inference to ``tolerance`` (absolute, on outputs scaled to at most 1); an exporter error
    or a mismatch raises ``ValueError`` and leaves no file (written atomically: an existing
    ``path`` stays as it was).

    The file takes images in the framework's own layout (torch: NCHW; Keras, Flax: NHWC)
    with a static shape: ``(batch_size, *input_shape)`` in that layout. Needs the ``onnx``
    extra (``pip install 'xfer[onnx]'``).

    Args:
        model: a torch, Keras or Flax NNX model.
        path: the ``.onnx`` file to write.
        input_shape: one image, channels-last as everywhere in xfer: ``(H, W, C)``.
        batch_size: the file's batch dimension.
        tolerance: the largest difference allowed between onnxruntime and the model.

    Returns:
        ``path``, as a ``Path``.

    Example:
        >>> import os, tempfile, xfer
        >>> model = xfer.models.small_cnn(4, 3, seed=0, backend="torch")
        >>> path = xfer.export_onnx(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), (16, 16, 3))
        >>> import onnxruntime
        >>> [i.shape for i in onnxruntime.InferenceSession(path).get_inputs()]
        [[1, 3, 16, 16]]
    """
    shape = _checked_shape(input_shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"export_onnx: batch_size must be an integer >= 1, got {batch_size!r}.")
    adapter = find_adapter(model)
    path = check_export_path(path, adapter.name)
    import onnxruntime

    deploy = _folded(model, adapter)
    x = np.random.default_rng(0).normal(size=(batch_size, *shape)).astype("float32")
    expected = np.asarray(adapter.predict(model, x))
    native = _to_layout(x, adapter.onnx_layout)

    def write(tmp: str) -> None:
        try:
            adapter.export_onnx(deploy, tmp, native)
        except Exception as error:  # exporters raise anything: a layer without an ONNX op...
            raise ValueError(
                f"export_onnx: the {adapter.name} ONNX exporter could not export this "
                f"{type(model).__name__}: {type(error).__name__}: {_first_line(error)}"
            ) from error
        try:
            session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: native})[0]
        except Exception as error:  # onnxruntime's own Fail, InvalidArgument, ...
            raise ValueError(
                f"export_onnx: the {adapter.name} exporter wrote a file onnxruntime cannot run "
                f"({_first_line(error)}); nothing was written to {str(path)!r}. See "
                "docs/deploy.md for what each exporter supports."
            ) from error
        got = _from_layout(got, adapter.onnx_layout) if got.ndim == 4 else got
        scale = max(1.0, float(np.abs(expected).max()))
        if got.shape != expected.shape or np.abs(got - expected).max() > tolerance * scale:
            difference = (
                f"shape {got.shape} instead of {expected.shape}"
                if got.shape != expected.shape
                else f"by {float(np.abs(got - expected).max()):.3g} (tolerance {tolerance * scale:.3g})"
            )
            raise ValueError(
                f"export_onnx: onnxruntime's output of the exported file differs from the "
                f"model's own inference {difference}; nothing was written to {str(path)!r}."
            )

    return write_atomic(path, write)


def _folded(model: Any, adapter: Any) -> Any:
    # A model without BatchNorm has nothing to fold (fold_bn would find no unit to select).
    return fold_bn(model) if any(unit.is_bn for unit in adapter.units(model)) else model


def _checked_shape(input_shape: Any) -> tuple[int, ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise ValueError(
            f"export_onnx: input_shape must be one image's shape as positive integers, "
            f"channels-last (H, W, C), e.g. (224, 224, 3); got {input_shape!r}."
        )
    return shape


def check_export_path(path: str | os.PathLike, backend: str) -> Path:
    """Everything :func:`export_onnx` needs to write ``path`` from a ``backend`` model,
    checked before any work (``xfer run --export`` calls it before training): the name ends
    in ``.onnx``, its directory exists, onnxruntime and the backend's exporter are installed.

    Example:
        >>> check_export_path("model.pt", "torch")
        Traceback (most recent call last):
        ...
        ValueError: export_onnx: 'model.pt' does not end in .onnx; name the file *.onnx.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"export_onnx: {str(path)!r} does not end in .onnx; name the file *.onnx.")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"export_onnx: the directory {str(directory)!r} of {str(path)!r} does not exist; "
            "create it first or choose another path."
        )
    from xfer._adapter import load_adapter

    for module in ("onnx", "onnxruntime", *load_adapter(backend).onnx_requires):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"export_onnx on {backend} needs {module}, which is not installed: "
                "pip install 'xfer[onnx]'."
            )
    return path


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return (
        np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if layout == "channels_first" and x.ndim == 4
        else x
    )


def _from_layout(y: np.ndarray, layout: str) -> np.ndarray:
    return y.transpose(0, 2, 3, 1) if layout == "channels_first" else y


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch.onnx colours its text
    return text.splitlines()[0] if text else "(no message)"
