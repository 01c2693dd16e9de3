"""BatchNorm folding (``xfer.fold_bn``) on keras: the backend part of ``xfer._adapter.Folding``."""
