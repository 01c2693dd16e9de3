"""Data-parallel training over processes: which process this is, and its part of each batch.

A launcher (``torchrun``) starts one process per device and tells each, in its environment,
its ``RANK`` among ``WORLD_SIZE`` processes and its ``LOCAL_RANK`` on its node. Every rank
runs the same pipeline on the same data in the same seeded batch order, and trains on one
contiguous part of each *global* batch: the global batch is the single-process batch, so a
distributed run computes what a single process computes, up to the order of float sums.

Nothing here imports a framework; each backend's ``distributed`` module joins the process
group, wraps the model and reduces across ranks (``xfer._adapter.Distributed``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

# A launcher sets these; torchrun sets all three (and MASTER_ADDR, MASTER_PORT).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes that train one model together.

    Example:
        >>> world = World(rank=1, size=2)
        >>> world.is_main, world.shard(16), world.shard(5)
        (False, slice(8, 16, None), slice(3, 5, None))
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that reports and writes checkpoints (rank 0)."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` examples; the parts'
        sizes differ by at most one (``numpy.array_split``'s split), and every rank has at
        least one example when ``n >= size``."""
        bounds = np.cumsum([0, *(len(p) for p in np.array_split(np.arange(n), self.size))])
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))


class PeerLost(RuntimeError):
    """Another process of a distributed run stopped (killed, crashed or out of memory), so
    this one cannot go on: what the last finished stage saved is kept; resume every rank
    from it."""


def launched_world(environ: Mapping[str, str] | None = None) -> World | None:
    """The :class:`World` a launcher described in the environment, or ``None`` for a
    single process (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``).

    Example:
        >>> launched_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
        World(rank=1, size=2, local_rank=1)
        >>> launched_world({}) is None
        True
    """
    environ = os.environ if environ is None else environ
    if int(environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    missing = [name for name in LAUNCHER_VARIABLES if name not in environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the "
            "processes with a launcher that sets RANK, WORLD_SIZE and LOCAL_RANK (torchrun "
            "--nproc-per-node N ...), or unset WORLD_SIZE for one process."
        )
    world = World(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    if not 0 <= world.rank < world.size:
        raise ValueError(f"RANK={world.rank} must lie in [0, WORLD_SIZE={world.size}).")
    return world


def resolve(setting: object, environ: Mapping[str, str] | None = None) -> World | None:
    """The world for ``TransferPipeline(distributed=setting)``: ``"auto"`` (the default)
    is the launcher's when there is one; ``True`` requires one; ``False`` is one process
    even under a launcher.

    Example:
        >>> resolve("auto", {}) is None, resolve(False, {"WORLD_SIZE": "2"}) is None
        (True, True)
        >>> resolve(True, {})
        Traceback (most recent call last):
        ...
        ValueError: distributed=True, but this process was not started by a launcher ...
    """
    if not isinstance(setting, bool) and setting != "auto":
        raise ValueError(
            f"distributed must be 'auto', True or False, got {setting!r}: 'auto' trains "
            "data-parallel when started by torchrun (WORLD_SIZE > 1)."
        )
    if setting is False:
        return None
    world = launched_world(environ)
    if setting is True and world is None:
        raise ValueError(
            "distributed=True, but this process was not started by a launcher (WORLD_SIZE is "
            "unset or 1): run it as `torchrun --nproc-per-node N your_script.py` (or "
            "`torchrun --nproc-per-node N -m xfer run ...`), or pass distributed='auto'."
        )
    return world


def check_batch_sizes(sizes: list[int], world: World, *, name: str = "train") -> None:
    """Refuse a batch order in which a global batch has fewer examples than processes
    (a rank would have nothing to train on).

    Example:
        >>> check_batch_sizes([16, 16, 4], World(0, 2))
        >>> check_batch_sizes([3], World(0, 4))
        Traceback (most recent call last):
        ...
        ValueError: train: with 4 processes every batch needs at least 4 examples, ...
    """
    smallest = min(sizes, default=world.size)
    if smallest < world.size:
        raise ValueError(
            f"{name}: with {world.size} processes every batch needs at least {world.size} "
            f"examples, one per process, but a batch of this data has {smallest}: use a "
            f"batch size and a number of examples that leave at least {world.size} in the "
            "last batch, or fewer processes."
        )


def check_devices(devices: object, world: World | None) -> int:
    """``TransferPipeline(devices=...)`` as a number of devices (``None``: 1).

    Example:
        >>> check_devices(None, None), check_devices(2, None)
        (1, 2)
        >>> check_devices(2, World(0, 2))
        Traceback (most recent call last):
        ...
        ValueError: devices=2 and a launcher's 2 processes: ...
    """
    if devices is None:
        return 1
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer or None, got {devices!r}.")
    if devices > 1 and world is not None:
        raise ValueError(
            f"devices={devices} and a launcher's {world.size} processes: one or the other. "
            "Under torchrun each process trains on one device (leave devices unset); "
            "devices=N shards each batch over N devices of one process (JAX)."
        )
    return devices


def check_sharding(sizes: list[int], devices: int, available: int, backend: str) -> None:
    """Refuse ``devices`` that this process does not have, or batches that do not split
    evenly over them.

    Example:
        >>> check_sharding([16, 4], 2, 2, "flax")
        >>> check_sharding([16, 5], 2, 2, "flax")
        Traceback (most recent call last):
        ...
        ValueError: devices=2: every batch is split evenly over the devices, but a batch ...
    """
    if devices > available:
        raise ValueError(
            f"devices={devices}, but the {backend} backend can shard a batch over "
            f"{available} device(s) in this process. PyTorch trains one process per device: "
            f"launch `torchrun --nproc-per-node {devices}` and leave devices unset. Keras "
            "shards on the jax engine only. JAX on the CPU has one device unless "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} is set before it "
            "starts."
        )
    uneven = [n for n in sizes if n % devices]
    if uneven:
        raise ValueError(
            f"devices={devices}: every batch is split evenly over the devices, but a batch "
            f"of this data has {uneven[0]} examples: choose a batch size and a number of "
            f"examples that are multiples of {devices}."
        )
