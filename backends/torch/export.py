"""ONNX export (``xfer.export_onnx``) on torch: the backend part of ``xfer._adapter.Export``."""
