"""Moved to :mod:`xfer.cli.tables`; this name stays until xfer/pipeline.py imports
``table`` from there.

Example:
    >>> from xfer._table import table   # the same function as xfer.cli.tables'
"""

from xfer.cli.tables import table

__all__ = ["table"]
