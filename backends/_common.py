"""What every backend shares: the rules and tables each backend package would otherwise
write again. No framework is imported here.

The ResNet layout (which blocks, how wide, which stride) is decided here once, so the three
reference ResNets cannot drift apart; each backend only turns a :class:`BlockSpec` into its
framework's layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from xfer._adapter import (
    Adapter,
    Distributed,
    Engine,
    Export,
    Folding,
    Models,
    Recalibration,
    Units,
    Weights,
)

# Which module of a backend package implements which contract.
CONTRACTS = {
    "units": Units,
    "weights": Weights,
    "engine": Engine,
    "models": Models,
    "recalibration": Recalibration,
    "folding": Folding,
    "export": Export,
    "distributed": Distributed,
}


def contract_members(protocol: type) -> list[str]:
    """The names a module must define to implement ``protocol``: its methods, in the order
    the Protocol declares them, and its data attributes (``Export.onnx_layout``).

    Example:
        >>> contract_members(Models)
        ['small_cnn', 'resnet', 'resnet50', 'keras_applications_resnet50', 'recognise', 'attach_head']
    """
    own = [n for n in vars(protocol) if not n.startswith("_")]
    methods = [n for n in own if inspect.isfunction(vars(protocol)[n])]
    return [*methods, *vars(protocol).get("__annotations__", {})]


def assemble(name: str, **modules: types.ModuleType) -> Adapter:
    """The adapter object of backend ``name``, from its modules ``units``, ``weights``,
    ``engine``, ``models``, ``recalibration``, ``folding``, ``export`` and ``distributed``: each defines, as module-level functions (and data), the
    members of its Protocol under the same names. A missing member is an ``AttributeError``
    at import, not a failure deep in a training run.

    Example:
        >>> from xfer.backends.torch import engine, models, units, weights  # doctest: +SKIP
        >>> ADAPTER = assemble("torch", units=units, weights=weights, ...)  # doctest: +SKIP
    """
    if sorted(modules) != sorted(CONTRACTS):
        raise TypeError(f"assemble needs the modules {sorted(CONTRACTS)}, got {sorted(modules)}")
    namespace: dict[str, Any] = {
        "name": name,
        "__doc__": f"The {name} adapter (xfer._adapter.Adapter).",
    }
    for role, protocol in CONTRACTS.items():
        module = modules[role]
        for member in contract_members(protocol):
            if not hasattr(module, member):
                raise AttributeError(
                    f"backend {name!r}: {module.__name__} does not define {member!r}, which "
                    f"{protocol.__name__} asks for (see docs/adding-a-backend.md)."
                )
            value = getattr(module, member)
            namespace[member] = staticmethod(value) if callable(value) else value
    return type(f"{name.capitalize()}Adapter", (), namespace)()


def single_process_only(backend: str) -> tuple[Callable, ...]:
    """The ``Distributed`` members of a backend that cannot train across processes yet:
    each refuses, before anything joins or trains, saying what to do instead.

    Example:
        >>> join_world, *_ = single_process_only("flax")
        >>> join_world(None, "cpu")
        Traceback (most recent call last):
        ...
        ValueError: flax: training across processes (WORLD_SIZE > 1, ...) is built for the ...
    """
    message = (
        f"{backend}: training across processes (WORLD_SIZE > 1, a launcher such as torchrun) "
        "is built for the torch backend only; on JAX, one process trains on several devices "
        "with devices=N (xfer run --devices N). Pass distributed=False (or run one process) "
        "to train here."
    )

    def join_world(world, device: str) -> str:
        raise ValueError(message)

    def distributed_trainer(model, options, world, *, sync_bn: bool):
        raise ValueError(message)

    def broadcast_model(model, world) -> None:
        raise ValueError(message)

    def gather(value, world) -> list:
        raise ValueError(message)

    return join_world, distributed_trainer, broadcast_model, gather


def use_jax_compile_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in xfer's cache directory (see
    :mod:`xfer.compile_cache`) and return the directory JAX uses, ``None`` when off. A
    directory the program chose itself is kept. Called when a JAX backend loads.

    Example:
        >>> use_jax_compile_cache()   # doctest: +SKIP
        '/root/.cache/xfer/jax'
    """
    import jax

    from xfer import compile_cache

    if jax.config.jax_compilation_cache_dir:  # the program's own choice
        return jax.config.jax_compilation_cache_dir
    if not compile_cache.enabled():
        return None
    path = compile_cache.jax_directory()
    jax.config.update("jax_compilation_cache_dir", str(path))
    # xfer's steps on small models compile in well under JAX's default threshold (1 s),
    # and those are the compilations a transfer job repeats on every run.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # JAX decides once whether to use the cache; a program that compiled before this
    # backend loaded has decided "no" already.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    return str(path)


# depth -> (blocks per stage, block type); the torchvision / Keras-applications table.
RESNET_STAGES = {18: ((2, 2, 2, 2), "basic"), 50: ((3, 4, 6, 3), "bottleneck")}
EXPANSION = {"basic": 1, "bottleneck": 4}  # a block's output channels / its planes


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: ``kind`` (``basic`` or ``bottleneck``), ``c_in`` input channels,
    ``planes`` (the inner width), ``stride`` of its first conv; ``c_out`` output channels;
    ``downsample``: whether the shortcut needs a 1x1 conv + BN (shape changes)."""

    kind: str
    c_in: int
    planes: int
    stride: int
    stride_first: bool = False  # a bottleneck's stride on its first 1x1 conv (Keras v1)

    @property
    def c_out(self) -> int:
        return self.planes * EXPANSION[self.kind]

    @property
    def downsample(self) -> bool:
        return self.stride != 1 or self.c_in != self.c_out

    @property
    def convs(self) -> list[tuple[int, int, int, int]]:
        """``(c_in, c_out, kernel, stride)`` of each conv of the block, in order (``conv1``,
        ``conv2``(, ``conv3``)); a BN follows each.

        Example:
            >>> BlockSpec("basic", 8, 16, 2).convs
            [(8, 16, 3, 2), (16, 16, 3, 1)]
        """
        if self.kind == "basic":
            return [(self.c_in, self.planes, 3, self.stride), (self.planes, self.planes, 3, 1)]
        first, middle = (self.stride, 1) if self.stride_first else (1, self.stride)
        return [
            (self.c_in, self.planes, 1, first),
            (self.planes, self.planes, 3, middle),
            (self.planes, self.c_out, 1, 1),
        ]


def resnet_layout(
    depth: int, width: int, stride_first: bool = False
) -> tuple[list[list[BlockSpec]], int]:
    """The blocks of each of the four stages (``layer1``..``layer4``) of the reference
    ResNet of ``depth`` whose stem has ``width`` channels, and the width of its features.

    Stage ``i`` (from 0) has planes ``width * 2**i``; its first block has stride 2, except
    in the first stage. ``stride_first`` puts a bottleneck's stride on its first 1x1 conv
    (keras.applications ResNet50, "v1") instead of its 3x3 conv (torchvision, "v1.5").

    Example:
        >>> stages, features = resnet_layout(18, 4)
        >>> [len(s) for s in stages], stages[1][0].stride, features
        ([2, 2, 2, 2], 2, 32)
    """
    counts, kind = RESNET_STAGES[depth]
    stages, c_in = [], width
    for i, count in enumerate(counts):
        blocks = []
        for j in range(count):
            stride = 2 if i > 0 and j == 0 else 1
            block = BlockSpec(kind, c_in, width * 2**i, stride, stride_first)
            blocks.append(block)
            c_in = block.c_out
        stages.append(blocks)
    return stages, c_in


@dataclasses.dataclass(frozen=True)
class ResNetStyle:
    """How a reference ResNet's convs and BNs are built: conv biases, BN epsilon and BN
    momentum (Keras's convention: the weight of the old value), stride placement."""

    conv_bias: bool
    epsilon: float
    momentum: float
    stride_first: bool


# xfer.models.resnet: torchvision's blocks, xfer's BN constants.
CLASSIC = ResNetStyle(conv_bias=False, epsilon=1e-3, momentum=0.9, stride_first=False)
# xfer.models.resnet50: keras.applications.ResNet50 exactly (Keras's default momentum).
KERAS_V1 = ResNetStyle(conv_bias=True, epsilon=1.001e-5, momentum=0.99, stride_first=True)
RESNET_STYLES = {"classic": CLASSIC, "keras_v1": KERAS_V1}  # by the name Keras configs keep
RESNET50_WIDTH = 64


def unit_kind(native: Any, kinds: Sequence[tuple[Any, str]], container: bool) -> str:
    """A unit's kind (``xfer._adapter.KINDS``): the first of ``kinds`` (types, kind) whose
    types ``native`` is an instance of; else ``container`` when it only holds children
    (``container``: it has children and no parameters of its own), else ``other``.

    Example:
        >>> unit_kind(1.5, [(float, "dense")], container=False), unit_kind("x", [], True)
        ('dense', 'container')
    """
    for classes, name in kinds:
        if isinstance(native, classes):
            return name
    return "container" if container else "other"


def root_index(own_params: int, has_children: bool) -> int | None:
    """The index the root of a model gets as a unit, or ``None`` when it is not one.

    The root is a unit only when it has parameters of its own (index -1, before every
    top-level child), or when it is a single layer with no children (index 0).

    Example:
        >>> root_index(0, True) is None, root_index(10, True), root_index(0, False)
        (True, -1, 0)
    """
    if not has_children:
        return 0
    return -1 if own_params else None


def group_of_path(lr_groups: Sequence[tuple[Sequence[str], float]]) -> dict[str, int]:
    """``{unit path: index of its learning-rate group}``; a unit in several groups belongs
    to the first (``StepOptions.lr_groups``).

    Example:
        >>> group_of_path([(["head"], 1e-3), (["head", "base"], 1e-5)])
        {'head': 0, 'base': 1}
    """
    found: dict[str, int] = {}
    for i, (paths, _) in enumerate(lr_groups):
        for path in paths:
            found.setdefault(path, i)
    return found


@contextlib.contextmanager
def attribute_set(objects: Sequence[Any], name: str, value: Any) -> Iterator[None]:
    """Set attribute ``name`` of every object to ``value`` for the ``with`` block, then put
    each one's own value back (also when the block raises).

    How Keras and Flax train one step in mixed precision: the computation dtype is an
    attribute of each built layer (Keras's ``dtype_policy``, Flax's ``dtype``), read when
    the layer is called, so the step sets it and evaluation keeps the model's own.

    Example:
        >>> import types
        >>> layers = [types.SimpleNamespace(dtype="float32")]
        >>> with attribute_set(layers, "dtype", "bfloat16"):
        ...     layers[0].dtype
        'bfloat16'
        >>> layers[0].dtype
        'float32'
    """
    saved = [getattr(item, name) for item in objects]
    try:
        for item in objects:
            setattr(item, name, value)
        yield
    finally:
        for item, own in zip(objects, saved, strict=True):
            setattr(item, name, own)
