"""ONNX export (``xfer.export_onnx``) on flax: the backend part of ``xfer._adapter.Export``.

``jax2onnx.to_onnx`` converts the NNX module's ``__call__`` (the copy ``xfer.fold_bn`` made,
in ``eval()``) traced on the example batch's shape.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

onnx_requires = ("jax2onnx",)
onnx_layout = "channels_last"


def export_onnx(model: nnx.Module, path: str, x: np.ndarray) -> None:
    import onnx
    from jax2onnx import to_onnx

    model.eval()
    onnx.save_model(to_onnx(model, [x.shape]), path)
