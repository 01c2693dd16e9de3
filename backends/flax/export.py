"""ONNX export (``xfer.export_onnx``) on flax: the backend part of ``xfer._adapter.Export``."""
