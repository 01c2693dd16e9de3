"""ONNX export (``xfer.export_onnx``) on keras: the backend part of ``xfer._adapter.Export``.

Keras's own ``model.export(path, format="onnx")``: on the jax engine it converts through
jax2onnx, on the torch engine through ``torch.onnx`` (which needs a static input shape,
so the signature is the example batch's shape on both).
"""

from __future__ import annotations

import keras
import numpy as np

# Keras exports through jax2onnx on the jax engine, torch.onnx (onnxscript) on torch.
onnx_requires = ("jax2onnx",) if keras.backend.backend() == "jax" else ("onnxscript",)
onnx_layout = "channels_last"


def export_onnx(model: keras.Model, path: str, x: np.ndarray) -> None:
    signature = [keras.InputSpec(shape=x.shape, dtype="float32")]
    model.export(path, format="onnx", input_signature=signature, verbose=False)
