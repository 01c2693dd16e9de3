"""ONNX export (``xfer.export_onnx``) on torch: the backend part of ``xfer._adapter.Export``.

``torch.onnx.export`` with the dynamo exporter (torch's default since 2.9; it needs
onnxscript), weights inside the file (``external_data=False``: the file is renamed into
place after it is written, which would break a reference to a side file).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

onnx_requires = ("onnxscript",)  # the dynamo exporter
onnx_layout = "channels_first"


def export_onnx(model: nn.Module, path: str, x: np.ndarray) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.from_numpy(x).to(device)
    model.eval()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=["images"],
            output_names=["outputs"],
            dynamo=True,
            external_data=False,
            verbose=False,
        )
