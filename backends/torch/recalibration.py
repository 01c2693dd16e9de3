"""BatchNorm recalibration (``xfer.recalibrate_bn``) on torch: the backend part of ``xfer._adapter.Recalibration``."""
