"""Data-parallel training across processes (``xfer._adapter.Distributed``) on Keras:
not built. The launcher xfer supports is torchrun, for PyTorch; JAX's own model is one
process per host driving all of its devices (``jax.distributed.initialize`` across
hosts), which xfer does not drive yet. Every member refuses with what to use instead.
"""

from xfer.backends._common import single_process_only

join_world, distributed_trainer, broadcast_model, gather = single_process_only("keras")
