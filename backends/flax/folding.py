"""BatchNorm folding (``xfer.fold_bn``) on flax: the backend part of ``xfer._adapter.Folding``."""
