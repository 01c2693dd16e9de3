"""BatchNorm folding (``xfer.fold_bn``) on torch: the backend part of ``xfer._adapter.Folding``.

The pairs come from the model's graph, traced by ``torch.fx`` (as torch's own
``torch.fx.experimental.optimization.fuse``, which reports nothing about what it fused): a
``call_module`` BN whose one input is the output of a conv or linear module called once, and
read by nothing else. The conv's weights become the folded ones and the BN node leaves the
graph, so the copy is a ``GraphModule`` in ``eval()``; an unfolded BN keeps its module (and
xfer's pin hook) in it.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from xfer._adapter import Unit
from xfer.folding import folded_kernel_and_bias


def fold_bn(model: nn.Module, units: list[Unit]) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    try:
        traced = fx.symbolic_trace(copy.deepcopy(model))
    except Exception as error:  # fx raises many types: TraceError, TypeError, ...
        raise ValueError(
            f"fold_bn: torch.fx cannot trace this {type(model).__name__} ({type(error).__name__}: "
            f"{error}). Fold a part of it that traces (e.g. model.base), or make its forward "
            "free of data-dependent Python control flow."
        ) from error
    selected = {unit.path for unit in units}
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    pairs = []
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or node.target not in selected or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer, bn = modules[source.target], modules[node.target]
        out_axis = _out_axis(layer, bn)
        if out_axis is None or len(source.users) != 1 or calls[source.target] != 1:
            continue
        _fold(layer, bn, out_axis)
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        pairs.append((source.target, node.target))
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval(), pairs


def _out_axis(layer: nn.Module, bn: nn.Module) -> int | None:
    # The weight axis of the output channels, which BN's channel axis (1) holds; None when
    # the pair cannot fold (a BN without statistics, a transposed conv with groups).
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats:
        return None
    if isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
        axis = 0
    elif isinstance(layer, _ConvNd) and _spatial_dims(layer) == _spatial_dims(bn):
        if layer.transposed and layer.groups != 1:
            return None
        axis = 1 if layer.transposed else 0
    else:
        return None
    return axis if layer.weight.shape[axis] == bn.num_features else None


def _spatial_dims(module: nn.Module) -> int | None:
    for dims, types in enumerate(
        (
            (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
            (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
            (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
        ),
        start=1,
    ):
        if isinstance(module, types):
            return dims
    return None


def _fold(layer: nn.Module, bn: _BatchNorm, out_axis: int) -> None:
    def array(tensor):
        return None if tensor is None else tensor.detach().to(torch.float64).cpu().numpy()

    weight = layer.weight
    kernel, bias = folded_kernel_and_bias(
        array(weight),
        array(layer.bias),
        gamma=array(bn.weight),
        beta=array(bn.bias),
        mean=array(bn.running_mean),
        var=array(bn.running_var),
        eps=bn.eps,
        out_axis=out_axis,
    )

    def parameter(value):
        tensor = torch.from_numpy(value).to(device=weight.device, dtype=weight.dtype)
        return nn.Parameter(tensor, requires_grad=weight.requires_grad)

    layer.weight, layer.bias = parameter(kernel), parameter(bias)
