"""BatchNorm folding (``xfer.fold_bn``) on torch: the backend part of ``xfer._adapter.Folding``."""
