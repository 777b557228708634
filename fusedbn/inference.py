"""Inference helpers: ``fold_conv_bn`` (eval-mode BatchNorm folded into the preceding Conv/Linear),
``FrozenBatchNorm2d`` (statistics and affine frozen, as detection models use it) and ``freeze``."""
from dataclasses import dataclass, field
from typing import List

import torch
from torch import Tensor, fx, nn

from ._fx import module_call_counts, traced_copy
from .functional import batch_norm_eval

_FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
             nn.Linear: nn.BatchNorm1d}


@dataclass
class FoldReport:
    """What ``fold_conv_bn`` did: the (layer, BatchNorm) pairs folded, by module name."""

    folded: List[tuple] = field(default_factory=list)
    traced: bool = True

    def __str__(self) -> str:
        if not self.traced:
            return "not traceable by torch.fx: nothing folded"
        return f"folded {len(self.folded)} BatchNorm layers: " + ", ".join(f"{bn} into {layer}"
                                                                           for layer, bn in self.folded)


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """layer(x) then bn in eval is layer'(x) with W' = W * s and b' = (b - mean) * s + beta per output
    channel, s = gamma / sqrt(running_var + eps); computed in float64 and cast back to the layer's dtype."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)


def fold_conv_bn(model: nn.Module):
    """Returns ``(folded, report)``: a ``torch.fx`` copy of ``model`` in which every BatchNorm in eval mode
    with running statistics that directly follows a Conv1d/2d/3d or Linear (of matching dimensionality,
    called once, its output used by nothing else) is folded into that layer's weight and bias and
    removed. Training-mode BatchNorm and shared layers are left alone; ``model`` itself is not changed.
    A model torch.fx cannot trace is returned as an unfolded copy, with a warning."""
    model, gm = traced_copy(model, "fold_conv_bn", "nothing folded")
    if gm is None:
        return model, FoldReport(traced=False)
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm)
    report = FoldReport()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        bn, source = modules[node.target], node.args[0]
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None
                or source.op != "call_module" or len(source.users) != 1 or calls[source.target] != 1
                or calls[node.target] != 1):
            continue
        layer = modules[source.target]
        expected = _FOLDABLE.get(type(layer))
        if expected is None or not isinstance(bn, expected) or layer.weight.shape[0] != bn.num_features:
            continue
        _fold_into(layer, bn)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        report.folded.append((source.target, node.target))
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, report


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with frozen statistics and affine parameters (buffers, not parameters), computed by the
    fusedbn eval kernel; gradients flow to the input only. Loads a ``nn.BatchNorm2d`` state_dict."""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        options = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **options))
        self.register_buffer("bias", torch.zeros(num_features, **options))
        self.register_buffer("running_mean", torch.zeros(num_features, **options))
        self.register_buffer("running_var", torch.ones(num_features, **options))

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps, device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d state_dict has one
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        return batch_norm_eval(input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, None,
                               False)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze(model: nn.Module) -> int:
    """Replaces every BatchNorm2d of ``model`` (torch's or fusedbn's, not ``model`` itself) by a
    :class:`FrozenBatchNorm2d` with its statistics and affine parameters, in place; returns how many."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and child.track_running_stats:
                setattr(parent, name, FrozenBatchNorm2d.from_batch_norm(child))
                count += 1
    return count
