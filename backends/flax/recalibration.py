"""BatchNorm recalibration (``xfer.recalibrate_bn``) on flax: the backend part of ``xfer._adapter.Recalibration``."""
