"""``xfer.fold_bn``: a deploy copy with inference BatchNorm folded into the conv/dense before it."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from xfer import select as S
from xfer.state import SelectionError, resolve


def fold_bn(model: Any, *, where: S.Selector | None = None) -> Any:
    """A deploy copy of ``model`` with each inference BatchNorm folded into the layer before it.

    A BN in inference computes ``gamma * (y - mean) / sqrt(var + eps) + beta`` with constants,
    so when ``y`` is a convolution's or dense layer's output (and nothing else reads it) the
    layer can compute it directly: its kernel scaled per output channel by
    ``gamma / sqrt(var + eps)`` and its bias set to ``(bias - mean) * that + beta``, the BN
    removed. The folded copy runs faster and is what ONNX export, TensorRT or a phone
    runtime expects. The arithmetic is float64 (:func:`folded_kernel_and_bias`), so the copy's
    logits stay within float32 rounding of the model's in inference (``model.eval()`` on
    torch and NNX, ``training=False`` on Keras).

    The copy is in inference mode (torch and NNX: ``eval()``, whatever mode the model was
    left in; Keras: call it with ``training=False``, its default); the model itself is
    untouched. A BN pinned to "train" (which normalises with batch statistics even in
    inference) is refused: no folded layer can reproduce it. A BN that does not directly follow a conv or dense layer (after
    a pooling, an addition, or at the start of a pre-activation block) stays in the copy
    as it is, named in a warning.

    How: torch traces the model with ``torch.fx`` and folds the conv→BN and linear→BN
    pairs of the graph (as ``torch.fx.experimental.optimization.fuse``), so the copy is a
    ``GraphModule``; Keras clones the model (``keras.models.clone_model``) with the pairs
    folded; Flax NNX copies the module (``nnx.clone``) and replaces each folded BN by an
    identity.

    Args:
        model: a torch, Keras or Flax NNX model.
        where: the BN units to fold (default ``S.bn()``, every BatchNorm).

    Returns:
        The folded copy, of the model's framework.

    Example:
        >>> import numpy as np, torch, xfer
        >>> model = xfer.models.small_cnn(4, 3, seed=0, backend="torch")
        >>> deploy = xfer.fold_bn(model)
        >>> any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
        False
        >>> x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype("float32"))
        >>> bool((deploy(x) - model.eval()(x)).abs().max() < 1e-5)
        True
    """
    where = S.bn() if where is None else where
    adapter, _, units = resolve(model, where)
    not_bn = [u.path for u in units if not u.is_bn]
    if not_bn:
        raise SelectionError(
            f"fold_bn: {where!r} selects units that are not BatchNorm ({', '.join(not_bn[:4])}). "
            "Select BatchNorm units only, e.g. S.bn() & S.path('base.**')."
        )
    training = [u.path for u in units if adapter.get_mode(u) == "train"]
    if training:
        raise ValueError(
            f"fold_bn: {len(training)} BatchNorm unit(s) are pinned to 'train' "
            f"({_listed(training)}): they normalise with batch statistics even in inference, "
            "which no folded layer can reproduce. Pin them to inference first, e.g. "
            "xfer.set_bn(model, 'frozen')."
        )
    folded, pairs = adapter.fold_bn(model, units)
    left = [u.path for u in units if u.path not in {bn for _, bn in pairs}]
    if left:
        warnings.warn(
            f"fold_bn: {len(left)} BatchNorm unit(s) do not directly follow a conv or dense "
            f"layer and stay in the copy unfolded: {_listed(left)}.",
            stacklevel=2,
        )
    return folded


def folded_kernel_and_bias(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    *,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    out_axis: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of a layer followed by an inference BN, folded: computed in float64,
    returned in the kernel's dtype. ``out_axis`` is the kernel's output-channel axis (torch
    conv and linear: 0; Keras and Flax: -1); ``gamma``/``beta`` ``None`` for a BN without
    scale/center, ``bias`` ``None`` for a layer without one.

    Example:
        >>> k, b = folded_kernel_and_bias(np.ones((3, 2), "float32"), None, gamma=np.array([2.0, 1.0]),
        ...     beta=np.array([0.0, 1.0]), mean=np.array([1.0, 0.0]), var=np.array([3.0, 0.0]),
        ...     eps=1.0, out_axis=-1)
        >>> k[0].tolist(), b.tolist(), k.dtype.name
        ([1.0, 1.0], [-1.0, 1.0], 'float32')
    """
    channels = kernel.shape[out_axis]
    scale = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    if gamma is not None:
        scale = scale * np.asarray(gamma, np.float64)
    shape = [1] * kernel.ndim
    shape[out_axis] = channels
    new_kernel = np.asarray(kernel, np.float64) * scale.reshape(shape)
    new_bias = (np.zeros(channels) if bias is None else np.asarray(bias, np.float64)) - mean
    new_bias = new_bias * scale + (0.0 if beta is None else np.asarray(beta, np.float64))
    return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)


def _listed(paths: list[str], most: int = 6) -> str:
    more = f", and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(paths[:most]) + more
