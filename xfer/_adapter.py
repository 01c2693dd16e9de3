"""The contract every framework adapter implements, and how xfer finds the adapter.

A native model is seen as a tree of *units* (every layer/submodule below the root).
Each unit owns its *own* parameters (not its children's), has a ``trainable`` flag
and a ``mode`` pin. The neutral operations in ``xfer.state`` validate, then call the
adapter; the adapter only does the framework-specific part.

The adapter for a model is found from the model's type, and only for frameworks that
are already imported (a model of a framework cannot exist without it): xfer never
imports a framework to look at an object.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from xfer.data import PREDICT_CHUNK

Mode = Literal["train", "inference", "inherit"]
MODES: tuple[str, ...] = ("train", "inference", "inherit")

# Kinds a unit can have; selectors use these names (S.type("batchnorm")).
KINDS = ("batchnorm", "dropout", "conv", "dense", "norm", "container", "other")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One layer of a native model, as xfer sees it.

    ``path`` is dotted from the model root (``base.block1.bn``); ``segments`` are its parts
    as the framework names them (``("base", "block1", "bn")``), kept apart because a Keras
    layer name may itself contain a dot (``mobilenetv2_1.00_224``): nothing re-splits
    ``path``. An adapter whose names never contain a dot (torch, Flax) may leave
    ``segments`` out; they are then ``path``'s dotted parts. ``index`` is the position of
    the unit's top-level ancestor among the root's children, counted as the framework's
    own list counts them (Keras's ``model.layers``, torch's ``children()``), which
    ``S.top``/``S.from_index`` use; ``n_params`` counts the elements of the unit's own
    parameters; ``native`` is the framework object itself.

    Example:
        >>> Unit("base.mobilenetv2_1.00_32", "container", 0, 0, None, None,
        ...      segments=("base", "mobilenetv2_1.00_32")).name
        'mobilenetv2_1.00_32'
    """

    path: str
    kind: str
    index: int
    n_params: int
    native: Any = dataclasses.field(compare=False, repr=False)
    root: Any = dataclasses.field(compare=False, repr=False)
    params: tuple[str, ...] = ()  # native names of the unit's own parameters
    stats: tuple[str, ...] = ()  # native names of its own BN moving statistics
    segments: tuple[str, ...] = ()  # path's parts; () with a non-empty path: its dotted parts

    def __post_init__(self) -> None:
        if not self.segments and self.path:
            object.__setattr__(self, "segments", tuple(self.path.split(".")))
        elif ".".join(self.segments) != self.path:
            raise ValueError(
                f"Unit path {self.path!r} is not its segments {self.segments!r} joined."
            )

    @property
    def name(self) -> str:
        """The unit's own name: its last segment (``bn`` of ``base.block1.bn``)."""
        return self.segments[-1] if self.segments else ""

    @property
    def depth(self) -> int:
        """How far below the root: 0 for the root, 1 for its children, ..."""
        return len(self.segments)

    @property
    def is_bn(self) -> bool:
        return self.kind == "batchnorm"


# The optimizers every backend builds (Engine.trainer), with the settings they share so
# that the backends agree: Adam's epsilon is Keras's default (torch's and optax's is 1e-8).
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
MOMENTUM = 0.9
ADAM_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How :meth:`Engine.trainer` builds its step.

    ``optimizer`` is one of :data:`OPTIMIZERS`; every parameter trains with ``lr`` except
    those of the units of each ``lr_groups`` entry (unit paths, lr; a unit in several
    entries takes the first). ``precision="bfloat16"``: mixed precision, the step's
    computation in bfloat16 by the framework's own mechanism, every variable in float32;
    ``compile_step``: the framework's optional compiler (``torch.compile``, Keras
    ``jit_compile=True``), where steps are not compiled anyway.

    Example:
        >>> StepOptions("adamw", 1e-3, weight_decay=1e-4).lr_groups
        ()
    """

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    lr_groups: tuple[tuple[tuple[str, ...], float], ...] = ()
    precision: str = "float32"
    compile_step: bool = False


@runtime_checkable
class Units(Protocol):
    """Unit discovery and the two switches: what trains, and each unit's pinned mode."""

    def units(self, model: Any) -> list[Unit]:
        """Every unit below the root, parents before children, in definition order.

        The root itself is a unit (path ``""``, index -1) only if it has parameters of its
        own; a model that is a single layer is one unit (path ``""``, index 0).
        """

    def chain(self, model: Any) -> list[Any] | None:
        """The model's top-level children in the order its forward applies them, when the
        forward is exactly their composition (``head(base(x))``); ``None`` when xfer cannot
        know that. Feature caching splits a model there.
        """

    def mode_free(self, unit: Unit) -> bool:
        """Whether the unit's own computation is the same in training and inference mode
        (a conv, a pooling, a container that only calls its children), as far as the
        framework's own layer types tell; unknown user layers are not.
        """

    def param_counts(self, unit: Unit) -> tuple[int, int]:
        """Elements of the unit's own parameters: (trainable, frozen)."""

    def set_trainable(self, unit: Unit, trainable: bool) -> None:
        """Freeze or unfreeze the unit's own parameters with the framework's mechanism."""

    def get_mode(self, unit: Unit) -> Mode:
        """The unit's pinned mode (``"inherit"`` when not pinned)."""

    def set_mode(self, unit: Unit, mode: Mode) -> None:
        """Pin the unit's own computation to a mode that survives the framework's switches."""

    def current_mode(self, unit: Unit) -> str:
        """``"train"`` or ``"inference"``: how the unit would compute if called now (a pin
        wins; torch's ``training`` flag, NNX's ``use_running_average``). Keras has no
        persistent mode: an unpinned layer reads ``"train"`` (it follows ``training=``)."""

    def bn_momentum(self, unit: Unit) -> float | None:
        """A BN unit's momentum as the framework states it; ``None`` for a cumulative
        moving average (torch ``momentum=None``) or a unit that is not a BN."""


@runtime_checkable
class Weights(Protocol):
    """Every parameter and BN statistic, in the framework's layout and in the neutral one."""

    def tensors(self, model: Any) -> Iterator[tuple[str, np.ndarray]]:
        """Every parameter and BN statistic as numpy, keyed ``<unit path>.<native name>``,
        one at a time. An array may share memory with the model: use it before the model
        changes, or copy it (``xfer.snapshot`` does)."""

    def weight_arrays(self, model: Any) -> Iterator[tuple[str, np.ndarray]]:
        """Every parameter and BN statistic as numpy in the neutral layout, one at a time;
        an array may share memory with the model, as in ``tensors`` (``xfer.export_weights``
        copies).

        Keys ``<unit path>.<role>`` with Keras's role names (``kernel``, ``bias``, ``gamma``,
        ``beta``, ``moving_mean``, ``moving_variance``); conv kernels ``(*spatial, in,
        out)``, dense kernels ``(in, out)``. A variable left in its native layout keeps its
        native name. Tied variables appear once.
        """

    def assign_weights(self, model: Any, weights: dict[str, np.ndarray]) -> None:
        """Assign values in the neutral layout, converted back to the native one, in place.

        Called only after ``xfer.weights`` checked that ``weights`` has exactly the names,
        shapes and dtypes of ``weight_arrays(model)``. Variable objects, their types,
        devices and trainable flags stay as they are.
        """

    def persistence(self) -> str:
        """One sentence: what of the xfer state the framework's own save format keeps."""


@runtime_checkable
class Engine(Protocol):
    """Training and inference with the framework's own optimizer, loop and devices."""

    def fit(
        self,
        model: Any,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
    ) -> list[float]:
        """Train with the framework's own standard loop (AdamW, batches in order); mean loss per epoch."""

    def trainer(self, model: Any, options: StepOptions) -> Callable[[Any, Any], float]:
        """A training step for ``model`` as it is now: the framework's optimizer
        (``options.optimizer``) over exactly the trainable parameters, learning rates and
        precision as :class:`StepOptions` says.

        The step takes a batch (channels-last images, integer labels, as numpy or as
        ``to_device`` gives them), runs the framework's training mode, mean softmax
        cross-entropy on logits, one update, and returns the loss computed before the
        update.

        Where the framework compiles a loop (the JAX engines), the step also has
        ``run_steps(x, y, order, count) -> list[float]``: ``count`` steps as one call of a
        compiled program, step ``i`` on the batch ``x[order[i]], y[order[i]]`` of the
        arrays ``to_device`` gave; ``order`` is an integer array of one shape for every
        call (its rows from ``count`` on are padding), and the losses are each step's, as
        the step returns them. The pipeline uses it for a head stage on cached features,
        whose steps are too small to be worth a call each.
        """

    def to_device(self, model: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """Images (channels-last) and labels as the framework's arrays on the model's
        device, in the layout the step takes; indexing them with numpy indices gives batches
        that a ``trainer`` step accepts as it accepts numpy."""

    def predict(self, model: Any, x: np.ndarray, *, batch_size: int = PREDICT_CHUNK) -> np.ndarray:
        """Outputs in the framework's inference mode, for channels-last numpy inputs: the
        logits of a classifier; a feature map comes back channels-last too. The forward
        runs on ``batch_size`` images at a time (``xfer.data.inference_chunks``)."""

    def place(self, model: Any, device: str) -> str:
        """Put the model on ``device`` (``"auto"``: CUDA when present, else the CPU) and
        return where it is (``"cpu"``, ``"cuda"``). Where the framework places variables
        itself (JAX), a ``ValueError`` when it does not place them on ``device``; the
        model is unchanged on error.
        """

    def output_shape(self, model: Any, x: np.ndarray) -> tuple[int, ...]:
        """The shape of ``predict(model, x)``, traced abstractly where the framework can
        (JAX: nothing is compiled or computed); errors as ``predict`` would raise them."""


@runtime_checkable
class Models(Protocol):
    """xfer's reference models and new heads, built in the framework."""

    def small_cnn(
        self, num_classes: int, in_channels: int, *, width: int, dropout: float, seed: int
    ) -> Any:
        """The reference model of ``xfer.models.small_cnn`` in this framework."""

    def resnet(
        self, depth: int, num_classes: int, in_channels: int, *, width: int, seed: int
    ) -> Any:
        """The reference ResNet of ``xfer.models.resnet`` (depth 18 or 50) in this framework.

        Called with validated arguments. Units ``base.stem`` (``conv``, ``bn``),
        ``base.layer1``..``base.layer4`` (blocks ``0``, ``1``, ... with ``conv1``/``bn1``..,
        and ``downsample.conv``/``downsample.bn`` where the shape changes), ``base.pool``
        and ``head.dense``; explicit symmetric padding so every framework computes the same.
        """

    def resnet50(
        self,
        num_classes: int | None,
        input_shape: tuple,
        *,
        include_top: bool,
        pooling: str | None,
        seed: int,
    ) -> Any:
        """``xfer.models.resnet50`` (keras.applications' ResNet50 layout, xfer's unit paths),
        called with validated arguments: ``base`` (``stem``, ``layer1``..``layer4``, ``pool``)
        and ``head.dense``; with ``include_top=False`` the base alone (units ``stem``, ...,
        and ``pool`` unless ``pooling`` is None). Styled by ``_common.KERAS_V1``."""

    def keras_applications_resnet50(
        self,
        num_classes: int | None,
        input_shape: tuple,
        *,
        include_top: bool,
        pooling: str | None,
    ) -> Any:
        """A ``keras.applications.ResNet50`` (``weights=None``, logits) for ``xfer.convert``;
        a ``ValueError`` saying so on a backend that is not Keras."""

    def recognise(self, model: Any) -> dict[str, Any] | None:
        """For a model xfer did not build but ``xfer.convert`` can map (on Keras: a
        ``keras.applications.ResNet50``): ``{"builder": ..., "names": ..., **arguments}``,
        the ``xfer.models`` builder of the same architecture, the naming of its layers and
        the builder's arguments; else ``None``."""

    def attach_head(
        self,
        base: Any,
        num_classes: int,
        *,
        dropout: float,
        input_shape: tuple[int, int, int] | None,
        seed: int,
    ) -> Any:
        """A new model of ``xfer.models.attach_head``: units ``base.**`` (``base`` itself,
        weights shared) and ``head`` (``head.pool`` global average pooling over the spatial
        axes, ``head.drop``, ``head.dense`` with ``num_classes`` outputs).

        Called with validated arguments; ``input_shape`` is channels-last or ``None``. Where
        the base's output width needs a forward pass and ``input_shape`` is ``None``, a
        ``ValueError`` that asks for it. The base's weights, BN statistics and mode flags
        are as they were afterwards.
        """


@runtime_checkable
class Recalibration(Protocol):
    """Re-estimating BatchNorm statistics on new data, for ``xfer.recalibrate_bn``."""

    def batch_statistics(
        self, model: Any, units: list[Unit], x: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One forward of the channels-last batch ``x`` in the framework's inference mode,
        except that the BatchNorm ``units`` normalise with the batch's own statistics;
        returns, per unit path, the batch mean and variance as the framework would store
        them in its moving statistics (torch: the unbiased variance; Keras, Flax: the
        biased one).

        Pins, policies, modes, parameters and every other BN's statistics are as they were
        afterwards; the ``units``' own moving statistics may hold this batch's values
        (``xfer.recalibrate_bn`` assigns them at the end). A ``ValueError`` naming the unit,
        before anything changes, for a BN whose statistics cannot be re-estimated.
        """

    def assign_statistics(
        self, model: Any, units: list[Unit], values: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> None:
        """Set each unit's moving mean and variance to ``values[unit.path]`` (float64
        arrays of the right shape), in the variables' own dtype, in place."""


@runtime_checkable
class Folding(Protocol):
    """A deploy copy with inference BatchNorm folded into the layer before it, for ``xfer.fold_bn``."""

    def fold_bn(self, model: Any, units: list[Unit]) -> tuple[Any, list[tuple[str, str]]]:
        """A deploy copy of ``model`` in which each BN among ``units`` whose input is the
        output of a conv or dense unit, and only its input, is folded into that unit: the
        unit's kernel and bias become ``xfer.folding.folded_kernel_and_bias`` of the pair (a
        bias is added where there was none) and the BN is removed or made an identity.

        The copy is in the framework's inference mode (torch and NNX: ``eval()``; Keras is
        called with ``training=False``) and computes what the model computes there, within
        float32 rounding; the model itself is untouched (no tensor, pin or mode changes). Returns the copy and the
        ``(layer path, BN path)`` pairs folded, paths as in ``model``. A ``ValueError``
        naming the model's type when the framework cannot copy or trace it.
        """


@runtime_checkable
class Export(Protocol):
    """ONNX export with the framework's own exporter, for ``xfer.export_onnx``."""

    # "channels_first" (torch: NCHW) or "channels_last": how the ONNX file takes images,
    # the framework's own layout, as its deploy tools expect.
    onnx_layout: str
    # The modules the exporter imports (torch.onnx: onnxscript; jax2onnx), which
    # ``xfer.export_onnx`` checks for before any work.
    onnx_requires: tuple[str, ...]

    def export_onnx(self, model: Any, path: str, x: np.ndarray) -> None:
        """Write the inference computation of ``model`` (BN already folded) to the ONNX file
        ``path`` with the framework's own exporter, traced on the batch ``x`` (in
        ``onnx_layout``; its shape is the file's static input shape). The exporter's own
        error propagates; ``xfer.export_onnx`` words it and removes the file."""


@runtime_checkable
class Distributed(Protocol):
    """Data-parallel training over processes started by a launcher (``xfer.distributed``)."""

    def join_world(self, world: Any, device: str) -> str:
        """Join the process group of ``world`` (an ``xfer.distributed.World``) once per
        process and return the device this rank trains on (``"cpu"``, ``"cuda"``; with
        CUDA, ``"cuda"`` is then the rank's own GPU, ``LOCAL_RANK``). A ``ValueError``
        saying what to use instead where the backend cannot train across processes."""

    def distributed_trainer(
        self, model: Any, options: StepOptions, world: Any, *, sync_bn: bool
    ) -> Callable[[Any, Any], float]:
        """A training step like ``Engine.trainer``'s for the model's state *now*, taking
        the *global* batch: this rank trains on ``world.shard(len(y))`` of it, gradients are
        averaged so that the update is the single-process update of the whole batch, and it
        returns the whole batch's mean loss. A BN whose statistics update normalises with
        the global batch's statistics when ``sync_bn`` (always, in a step with nothing to
        train), so every rank holds the same statistics. Build it after the stage's state
        is applied: what trains is fixed when it is built."""

    def broadcast_model(self, model: Any, world: Any) -> None:
        """Every tensor of the model (parameters and statistics) set to rank 0's, in place."""

    def gather(self, value: Any, world: Any) -> list[Any]:
        """``value`` (picklable) from every rank, in rank order, on every rank."""

    def device_count(self) -> int:
        """How many devices one process can shard a batch over (JAX: its local devices;
        PyTorch: 1, as torch trains one process per device)."""

    def sharded_trainer(
        self, model: Any, options: StepOptions, devices: int
    ) -> Callable[[Any, Any], float]:
        """A training step like ``Engine.trainer``'s, data-parallel in this process over
        the first ``devices`` devices: the model's state replicated, each global batch
        sharded along its first axis (its length a multiple of ``devices``), BN on the
        global batch's statistics, so the step computes the one-device step. The step's
        ``finish()`` puts the state back on the default device (the pipeline calls it
        after the stage). A ``ValueError`` naming the alternative where the framework
        cannot (PyTorch: torchrun)."""


@runtime_checkable
class Adapter(
    Units, Weights, Engine, Models, Recalibration, Folding, Export, Distributed, Protocol
):
    """What each backend package (``backends/torch/``, ``keras/``, ``flax/``) provides, as
    one object in its ``__init__.py``: the eight small contracts and the backend's name."""

    name: str


_FRAMEWORKS = (
    # Keras first: with KERAS_BACKEND=torch every Keras layer is also a torch Module.
    ("keras", "keras", "Layer"),
    ("torch", "torch.nn", "Module"),
    ("flax", "flax.nnx", "Module"),
)
_adapters: dict[str, Adapter] = {}


def load_adapter(backend: str) -> Adapter:
    """The adapter of ``backend``, importing its module (and so the framework).

    Raises ``ValueError`` listing the backends for an unknown name, ``ImportError`` naming
    the extra to install for a missing framework.
    """
    from xfer import _config

    backend = _config.validate_backend(backend)
    if backend not in _adapters:
        _config.require(backend)
        module = importlib.import_module(f"xfer.backends.{backend}")
        _adapters[backend] = module.ADAPTER
    return _adapters[backend]


def find_adapter(model: Any) -> Adapter:
    """The adapter for a native model, found from its type.

    Raises ``TypeError`` naming the type and the supported ones.
    """
    for backend, module_name, class_name in _FRAMEWORKS:
        module = sys.modules.get(module_name)
        base = getattr(module, class_name, None) if module is not None else None
        if base is not None and isinstance(model, base):
            return load_adapter(backend)
    raise TypeError(
        f"xfer cannot work on a {type(model).__module__}.{type(model).__qualname__}: "
        "expected a keras.Layer/keras.Model, a torch.nn.Module or a flax.nnx.Module. "
        "Pass the model object itself (not its weights or a function)."
    )
