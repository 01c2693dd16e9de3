"""Data-parallel training across processes (``xfer._adapter.Distributed``) on Keras:
not built. The launcher xfer supports is torchrun, for PyTorch; JAX's own model is one
process per host driving all of its devices (``jax.distributed.initialize`` across
hosts), which xfer does not drive yet. Every member refuses with what to use instead.
"""

from __future__ import annotations

from xfer._adapter import StepOptions
from xfer.distributed import World

REFUSAL = (
    "training across processes (WORLD_SIZE > 1, a launcher such as torchrun) is built for the "
    "torch backend only (JAX device meshes: not yet). Pass distributed=False (or run one process) to train here."
)


def join_world(world: World, device: str) -> str:
    raise ValueError(f"keras: {REFUSAL}")


def distributed_trainer(model, options: StepOptions, world: World, *, sync_bn: bool):
    raise ValueError(f"keras: {REFUSAL}")


def broadcast_model(model, world: World) -> None:
    raise ValueError(f"keras: {REFUSAL}")


def gather(value, world: World) -> list:
    raise ValueError(f"keras: {REFUSAL}")
