"""xfer inside other libraries' training loops.

Each module here imports its framework when it is imported, not before: ``import xfer``
(and ``import xfer.integrations``) imports none of them.

- :mod:`xfer.integrations.lightning`: ``XferFinetuning``, a Lightning callback that
  unfreezes a backbone at an epoch, as ``BackboneFinetuning`` does, with BatchNorm kept
  the way an xfer policy says.
"""
