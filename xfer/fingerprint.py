"""Moved to :mod:`xfer.data.fingerprint`; this name stays until xfer/pipeline.py imports
``data_fingerprint`` from ``xfer.data``.

Example:
    >>> from xfer.fingerprint import data_fingerprint   # the same function as xfer.data's
"""

from xfer.data.fingerprint import data_fingerprint

__all__ = ["data_fingerprint"]
