"""Inference helpers: ``fold_conv_bn`` (eval-mode BatchNorm folded into the preceding Conv/Linear),
``FrozenBatchNorm2d`` (statistics and affine frozen, as detection models use it) and ``freeze``."""
from typing import Optional

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ._fx import module_call_counts, traced_copy
from .convert import foreign_batch_norm
from .functional import batch_norm_eval
from .modules import FusedBatchNorm2d, FusedBatchNormReLU1d, FusedBatchNormReLU2d, FusedBatchNormReLU3d
from .report import Report

# The BatchNorm a layer folds into, and the dimensionality of the layer's output (batched, channels at dim 1)
# for which that BatchNorm normalizes exactly the layer's output channels.
_FOLDABLE = {nn.Linear: (nn.BatchNorm1d, 2), nn.Conv1d: (nn.BatchNorm1d, 3), nn.Conv2d: (nn.BatchNorm2d, 4),
             nn.Conv3d: (nn.BatchNorm3d, 5)}
_NOT_A_BATCH_NORM = (FusedBatchNormReLU1d, FusedBatchNormReLU2d, FusedBatchNormReLU3d)  # a ReLU follows


def _unprovable(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, source: fx.Node, shaped: bool):
    """Why folding ``bn`` into ``layer`` (called at ``source``) is not provably equivalent, or None when it is.
    BatchNorm2d/3d take only 4-D/5-D input, so a Conv2d/3d before one ran batched; BatchNorm1d takes (N, C)
    and (N, C, L), so it normalizes the layer's output channels only for some shapes, seen with ``shaped``."""
    bn_class, dims = _FOLDABLE[type(layer)]
    if bn_class is not nn.BatchNorm1d:
        return None
    name = type(layer).__name__
    if not shaped:
        return f"BatchNorm1d takes 2-D or 3-D input: pass example_inputs to fold {name} -> BatchNorm1d"
    shape = tuple(getattr(source.meta.get("tensor_meta"), "shape", ()))
    if len(shape) == dims and shape[1] == bn.num_features:
        return None
    return f"{name} output {shape} is not {'(N, C)' if dims == 2 else '(N, C, L)'}: BatchNorm1d normalizes dim 1"


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


def fold_conv_bn(model: nn.Module, example_inputs=None, *, report: Optional[Report] = None) -> nn.Module:
    """Returns a ``torch.fx`` copy of ``model`` in which every BatchNorm in eval mode
    with running statistics (torch's or fusedbn's) that directly follows a Conv1d/2d/3d or Linear (of
    matching dimensionality, called once, its output used by nothing else) is folded into that layer's
    weight and bias and removed, where that is provably equivalent. Training-mode BatchNorm and shared
    layers are left alone; ``model`` itself is not changed.

    Conv2d/3d -> BatchNorm2d/3d always fold. Linear/Conv1d -> BatchNorm1d fold only given
    ``example_inputs`` (a tuple of inputs to ``model``, or one tensor), through which the traced copy is run
    once in eval mode (no grad, parameters and buffers unchanged) to see the layer's output shape: they fold
    where it is (N, C) for Linear, (N, C, L) for Conv1d, i.e. where BatchNorm1d normalizes the layer's
    output channels (not so for a Linear on (N, L, F) or an unbatched Conv1d). The folded model is then
    equivalent for inputs of those shapes. ``report`` (a :class:`fusedbn.Report`), when given, records each
    fold (``("folded", bn, layer)``) and each pair not folded for this, with the reason.

    A model torch.fx cannot trace is returned as an unfolded copy, with a warning."""
    report = Report() if report is None else report
    model, gm = traced_copy(model, "fold_conv_bn", "nothing folded", leaves=(nn.modules.batchnorm._BatchNorm,))
    if gm is None:
        report.skipped.append(("", "torch.fx cannot trace the model: nothing folded"))
        return model
    if example_inputs is not None:
        _propagate_shapes(gm, (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs))
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        bn, source = modules[node.target], node.args[0]
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or isinstance(bn, _NOT_A_BATCH_NORM)
                or bn.training or bn.running_mean is None or source.op != "call_module"
                or len(source.users) != 1 or calls[source.target] != 1 or calls[node.target] != 1):
            continue
        layer = modules[source.target]
        if (type(layer) not in _FOLDABLE or not isinstance(bn, _FOLDABLE[type(layer)][0])
                or layer.weight.shape[0] != bn.num_features):
            continue
        reason = _unprovable(layer, bn, source, example_inputs is not None)
        if reason is not None:
            report.skipped.append((node.target, f"not folded into {source.target}: {reason}"))
            continue
        _fold_into(layer, bn)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        report.done.append(("folded", node.target, source.target))
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Records each node's output shape in ``node.meta["tensor_meta"]``, running ``gm`` once in eval mode
    without grad; its modules' training flags are restored after, and eval mode changes no buffer."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training


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


class FrozenBatchNormReLU2d(FrozenBatchNorm2d):
    """:class:`FrozenBatchNorm2d` then ReLU, after adding an optional residual: what ``freeze`` makes of a
    ``FusedBatchNormReLU2d``, called as it was."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype
                                     or residual.device != input.device):
            return torch.relu(super().forward(input) + residual)  # broadcast or promoted, as + allows
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        return batch_norm_eval(input, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                               residual, True)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", relu=True"


_FROZEN_FOR = {nn.BatchNorm2d: FrozenBatchNorm2d, FusedBatchNorm2d: FrozenBatchNorm2d,
               FusedBatchNormReLU2d: FrozenBatchNormReLU2d}


def freeze(model: nn.Module, *, report: Optional[Report] = None) -> nn.Module:
    """Replaces every BatchNorm2d with running statistics under ``model`` (torch's or fusedbn's, not
    ``model`` itself) by a :class:`FrozenBatchNorm2d` holding its statistics and affine parameters, in
    place, and returns ``model``; a fused BatchNorm+ReLU becomes a :class:`FrozenBatchNormReLU2d`, relu
    kept. Subclasses (timm's BatchNormAct2d, ...) are left alone, with a warning where they have a forward
    of their own. ``report`` (a :class:`fusedbn.Report`), when given, records what was frozen and left."""
    report = Report() if report is None else report
    for parent_name, parent in model.named_modules():
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            frozen = _FROZEN_FOR.get(type(child))
            if frozen is not None and child.track_running_stats and child.running_mean is not None:
                setattr(parent, name, frozen.from_batch_norm(child))
                report.done.append(("frozen", full_name, frozen.__name__))
            elif frozen is None:
                foreign_batch_norm(full_name, child, "freeze", report)
    return model
