"""BatchNorm recalibration (``xfer.recalibrate_bn``) on keras: the backend part of ``xfer._adapter.Recalibration``."""
