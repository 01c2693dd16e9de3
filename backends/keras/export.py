"""ONNX export (``xfer.export_onnx``) on keras: the backend part of ``xfer._adapter.Export``."""
